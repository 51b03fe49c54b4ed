"""The student architectures (Llamba, MambaInLlama) and loading of every checkpoint the project runs.

    from harness_ext.models import load_model
    model = load_model("ckpt/teacher")      # a Llama: converted in memory to an all-attention MambaInLlama
    model = load_model("ckpt/mil50")        # MambaInLlama
    model = load_model("ckpt/llamba")       # Llamba
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

_REGISTERED = False


def register() -> None:
    """Register both configs and models with AutoConfig / AutoModelForCausalLM (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from .llamba import LlambaConfig, LlambaForCausalLM
    from .mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

    for config_cls, model_cls in ((MambaInLlamaConfig, MambaInLlamaForCausalLM), (LlambaConfig, LlambaForCausalLM)):
        try:
            AutoConfig.register(config_cls.model_type, config_cls)
        except ValueError:          # already registered (e.g. by a second import path)
            pass
        try:
            AutoModelForCausalLM.register(config_cls, model_cls)
        except ValueError:
            pass
    _REGISTERED = True


def llama_as_mambainllama(llama_config, state_dict=None):
    """A Llama config (and optionally weights) as an all-attention MambaInLlama: same names, same maths."""
    from .mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

    fields = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version"):
        fields.pop(key, None)
    config = MambaInLlamaConfig(attn_layers=list(range(llama_config.num_hidden_layers)), **fields)
    model = MambaInLlamaForCausalLM(config)
    if state_dict is not None:
        load_state_dict_strict(model, state_dict)
    return model


def load_state_dict_strict(model, state_dict) -> None:
    """Load weights; a mismatch raises listing the missing / unexpected keys and wrong shapes."""
    own = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    missing = [k for k in own if k not in state_dict and not (tied and k == "lm_head.weight")]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError("checkpoint weights do not fit the config:"
                         + (f"\n  missing keys: {missing}" if missing else "")
                         + (f"\n  unexpected keys: {unexpected}" if unexpected else "")
                         + (f"\n  wrong shapes: {wrong}" if wrong else ""))
    model.load_state_dict(state_dict, strict=False)
    if tied:
        model.tie_weights()


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (safetensors, sharded or not; or pytorch_model*.bin)."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if files:
        from safetensors.torch import load_file

        out = {}
        for f in files:
            out.update(load_file(str(f)))
        return out
    files = sorted(path.glob("pytorch_model*.bin"))
    if files:
        out = {}
        for f in files:
            out.update(torch.load(f, map_location="cpu", weights_only=True))
        return out
    raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")


def set_ssm_state_dtype(model, name: str):
    """The dtype every SSM layer keeps its recurrent state in while generating (float32, bfloat16, float16).
    Training never stores the state; a decode step reads and writes it whole, so at GSM8K lengths bfloat16
    halves the bytes a student's step moves (vLLM's default for Mamba caches is the model dtype, too)."""
    from .runtime import state_dtype

    state_dtype(name)  # a clear error for an unknown name
    model.config.ssm_state_dtype = name
    for module in model.modules():
        if module is not model and hasattr(module, "ssm_state_dtype"):
            module.ssm_state_dtype = name
    return model


def load_model(path_or_id, device=None, dtype=None, ssm_state_dtype: str | None = None):
    """Load a Llamba, MambaInLlama or Llama checkpoint directory as a thinkfast model (eval mode).

    A Llama becomes a MambaInLlama with every layer attention, so the engine runs all three the same way.
    `ssm_state_dtype` overrides the checkpoint's (see `set_ssm_state_dtype`).
    """
    register()
    from transformers import AutoConfig

    from .llamba import LlambaForCausalLM
    from .mambainllama import MambaInLlamaForCausalLM

    path = Path(path_or_id)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no checkpoint at {path_or_id!r}: expected a directory with config.json "
                                "(nothing is downloaded; convert the teacher with `thinkfast teacher --out DIR`)")
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    dtype = dtype if dtype is not None else torch.float32
    if model_type == "mambainllama":
        model = MambaInLlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
    elif model_type == "llamba":
        model = LlambaForCausalLM.from_pretrained(str(path), dtype=dtype)
    elif model_type == "llama":
        llama_config = AutoConfig.from_pretrained(str(path))
        model = llama_as_mambainllama(llama_config, read_state_dict(path)).to(dtype)
        _copy_generation_config(path, model)
    else:
        raise ValueError(f"unknown architecture model_type={model_type!r} in {path / 'config.json'}; "
                         "expected 'llamba', 'mambainllama' or 'llama'")
    if ssm_state_dtype is not None:
        set_ssm_state_dtype(model, ssm_state_dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _copy_generation_config(path: Path, model) -> None:
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
