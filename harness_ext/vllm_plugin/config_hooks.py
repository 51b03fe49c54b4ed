"""Load-time checks and vLLM config updates for thinkfast checkpoints.

vLLM calls `verify_and_update_config(vllm_config)` for every architecture listed in
`vllm.model_executor.models.config.MODELS_CONFIG_MAP` while it builds the engine config, in the
front-end process, before any weight is read. `harness_ext.vllm_plugin.register()` adds our two
architectures there, so a checkpoint this plugin cannot run exactly fails here, with one error naming
every problem, instead of crashing (or silently diverging from the PyTorch model) mid-request.

This module stays light on purpose: register() imports it in every vLLM process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.model_executor.models.config import MambaModelConfig, VerifyAndUpdateConfig

# RoPE variants whose vLLM implementation matches transformers' position for position (the PyTorch
# students use transformers' rope functions). "dynamic" NTK is left out: transformers rescales by the
# running sequence length, vLLM by max_position_embeddings, so greedy outputs could differ.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_STATE_DTYPES = ("float32", "bfloat16", "float16")


class UnsupportedCheckpointError(ValueError):
    """A checkpoint this plugin cannot serve exactly."""


def _fail(arch: str, problems: list[str]) -> None:
    if problems:
        lines = "\n  - ".join(problems)
        raise UnsupportedCheckpointError(
            f"thinkfast vLLM plugin cannot load this {arch} checkpoint:\n  - {lines}"
        )


def _missing(config: Any, fields: tuple[str, ...]) -> list[str]:
    return [f"config.json lacks the field `{f}`" for f in fields if getattr(config, f, None) is None]


def _rope_problems(config: Any) -> list[str]:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        return [f"rope scaling type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"]
    return []


def _state_dtype_problems(config: Any) -> list[str]:
    dtype = getattr(config, "ssm_state_dtype", "float32")
    if dtype not in SUPPORTED_STATE_DTYPES:
        return [f"ssm_state_dtype {dtype!r} is not one of {SUPPORTED_STATE_DTYPES}"]
    return []


def check_mambainllama_config(config: Any) -> None:
    """Raise UnsupportedCheckpointError naming every way `config` breaks the MambaInLlama layout."""
    arch = "MambaInLlama"
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "intermediate_size", "vocab_size", "attn_layers", "d_inner", "d_xb", "ssm_d_state",
                "ssm_headdim", "ssm_nheads", "d_conv")
    problems = _missing(config, required)
    _fail(arch, problems)

    n_heads, n_kv, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    if n_heads % n_kv:
        problems.append(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    if config.ssm_nheads != n_heads:
        problems.append(f"ssm_nheads={config.ssm_nheads} must equal num_attention_heads={n_heads}")
    if config.ssm_headdim != head_dim:
        problems.append(f"ssm_headdim={config.ssm_headdim} must equal head_dim={head_dim}")
    if config.ssm_d_state != head_dim:
        problems.append(f"ssm_d_state={config.ssm_d_state} must equal head_dim={head_dim} "
                        "(B is a key-projection: num_key_value_heads heads of head_dim)")
    if config.d_inner != n_heads * head_dim:
        problems.append(f"d_inner={config.d_inner} must be num_attention_heads*head_dim={n_heads * head_dim}")
    if config.d_xb != n_kv * head_dim:
        problems.append(f"d_xb={config.d_xb} must be num_key_value_heads*head_dim={n_kv * head_dim}")
    attn_layers = list(config.attn_layers)
    bad = [i for i in attn_layers if not (isinstance(i, int) and 0 <= i < config.num_hidden_layers)]
    if bad:
        problems.append(f"attn_layers has entries outside 0..{config.num_hidden_layers - 1}: {bad}")
    if len(set(attn_layers)) != len(attn_layers):
        problems.append(f"attn_layers has duplicates: {attn_layers}")
    if len(set(attn_layers)) >= config.num_hidden_layers:
        problems.append("every layer is attention: serve it as a LlamaForCausalLM instead")
    group = getattr(config, "ssm_norm_group_size", None) or config.d_inner
    if config.d_inner % group:
        problems.append(f"ssm_norm_group_size={group} does not divide d_inner={config.d_inner}")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    problems += _rope_problems(config) + _state_dtype_problems(config)
    _fail(arch, problems)


@dataclass(frozen=True)
class LlambaDims:
    d_inner: int
    d_state: int
    n_qk_heads: int
    n_v_heads: int
    d_conv: int
    conv_bias: bool
    conv_activation: str
    ssm_bias: bool
    chunk_size: int

    @property
    def headdim(self) -> int:
        return self.d_inner // self.n_v_heads

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.n_qk_heads * self.d_state


def llamba_dims(config: Any) -> LlambaDims:
    """The discrete Mamba-2 mixer's sizes (harness_ext/models/llamba.py documents each field)."""
    return LlambaDims(
        d_inner=int(config.d_inner),
        d_state=int(config.d_state),
        n_qk_heads=int(config.n_qk_heads),
        n_v_heads=int(config.n_v_heads),
        d_conv=int(config.d_conv),
        conv_bias=bool(getattr(config, "conv_bias", True)),
        conv_activation=str(getattr(config, "conv_activation", "identity")),
        ssm_bias=bool(getattr(config, "ssm_bias", False)),
        chunk_size=int(getattr(config, "ssm_chunk_size", 128)),
    )


def check_llamba_config(config: Any) -> None:
    """Raise UnsupportedCheckpointError naming every way `config` breaks the Llamba layout."""
    arch = "Llamba"
    required = ("hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "d_inner", "d_state",
                "n_qk_heads", "n_v_heads", "d_conv")
    _fail(arch, _missing(config, required))
    dims = llamba_dims(config)
    problems = []
    if dims.d_inner % dims.n_v_heads:
        problems.append(f"d_inner={dims.d_inner} is not a multiple of n_v_heads={dims.n_v_heads}")
    if dims.n_v_heads % dims.n_qk_heads:
        problems.append(f"n_v_heads={dims.n_v_heads} is not a multiple of n_qk_heads={dims.n_qk_heads}")
    if dims.conv_activation not in ("identity", "silu"):
        problems.append(f"conv_activation {dims.conv_activation!r} is not supported (identity or silu)")
    if getattr(config, "hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config.hidden_act!r} is not supported (only silu)")
    problems += _state_dtype_problems(config)
    _fail(arch, problems)


def _apply_ssm_settings(vllm_config: Any, chunk_size: int | None) -> None:
    hf_config = vllm_config.model_config.hf_config
    # vLLM reads the SSD chunk size from `mamba_chunk_size`.
    if chunk_size and getattr(hf_config, "mamba_chunk_size", None) is None:
        hf_config.mamba_chunk_size = int(chunk_size)
    # Keep the recurrent state in the checkpoint's state dtype (fp32 by default), as the PyTorch model does.
    cache_config = vllm_config.cache_config
    if cache_config.mamba_ssm_cache_dtype == "auto":
        cache_config.mamba_ssm_cache_dtype = getattr(hf_config, "ssm_state_dtype", "float32")


class MambaInLlamaVllmConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: Any) -> None:
        hf_config = vllm_config.model_config.hf_config
        check_mambainllama_config(hf_config)
        attn = set(hf_config.attn_layers)
        hf_config.layers_block_type = [
            "attention" if i in attn else "mamba" for i in range(hf_config.num_hidden_layers)
        ]
        _apply_ssm_settings(vllm_config, getattr(hf_config, "ssm_chunk_size", None))


class LlambaVllmConfig(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: Any) -> None:
        hf_config = vllm_config.model_config.hf_config
        check_llamba_config(hf_config)
        _apply_ssm_settings(vllm_config, llamba_dims(hf_config).chunk_size)
        MambaModelConfig.verify_and_update_config(vllm_config)
