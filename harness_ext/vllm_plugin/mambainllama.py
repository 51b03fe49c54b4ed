"""MambaInLlama in vLLM: Llama attention layers (vLLM's own) plus Mamba-2 layers on vLLM's MambaMixer2.

    vllm serve ./checkpoints/mambainllama --dtype float32

Checkpoint layout (DESIGN.md, `harness_ext/models/mambainllama.py`): a Mamba layer's `in_proj` rows are
z, x, B, C, dt, where x and B are key/value-width (num_key_value_heads heads of head_dim) and are repeated
to num_attention_heads as GQA repeats K/V, while C has one head per query head.

vLLM's MambaMixer2 wants B and C with the same number of groups and x at full width. Repeating a row of
a linear map or a channel of a depthwise convolution commutes with the map, so we repeat the x and B
rows of in_proj (and their conv channels) per KV group at load time and run MambaMixer2 with
n_groups = num_attention_heads: the layer computes exactly what the PyTorch model computes, on vLLM's
kernels (chunked SSD for prefill, selective_state_update for decode, continuous batching, TP).
The cost is a conv state of 3 * d_inner channels instead of 2 * d_xb + d_inner (small next to the SSM state).
The gated RMSNorm's groups are the checkpoint's `ssm_norm_group_size` (default: all of d_inner).
"""
# No `from __future__ import annotations`: @support_torch_compile reads forward()'s annotations.

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2, Mixer2RMSNormGated
from vllm.model_executor.models.interfaces import IsHybrid
from vllm.model_executor.models.llama import LlamaDecoderLayer
from vllm.model_executor.models.utils import extract_layer_index

from .common import MLP_STACKED_PARAMS, Mamba2DecoderLayer, Mamba2Dims, Mamba2LlamaForCausalLM, Mamba2LlamaModel
from .config_hooks import check_mambainllama_config

# checkpoint name part -> (vLLM fused parameter part, shard id)
STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    **MLP_STACKED_PARAMS,
}


def mamba2_dims(config) -> Mamba2Dims:
    """The Mamba layers as MambaMixer2 runs them after the load-time KV-group expansion (module docstring)."""
    return Mamba2Dims(
        intermediate_size=config.d_inner,
        n_groups=config.ssm_nheads,  # B expanded to one group per head at load
        num_heads=config.ssm_nheads,
        head_dim=config.ssm_headdim,
        state_size=config.ssm_d_state,
        conv_kernel=config.d_conv,
    )


def _gated_norm_eps(config) -> float:
    return float(config.rms_norm_eps)


def _repeat_kv_rows(rows: torch.Tensor, config) -> torch.Tensor:
    """[n_kv * head_dim, ...] -> [n_heads * head_dim, ...]: query head h reads KV head h // n_rep."""
    n_kv, head_dim = config.num_key_value_heads, config.head_dim
    n_rep = config.num_attention_heads // n_kv
    grouped = rows.reshape(n_kv, head_dim, *rows.shape[1:])
    return grouped.repeat_interleave(n_rep, dim=0).reshape(n_kv * n_rep * head_dim, *rows.shape[1:])


def expand_mamba_tensor(suffix: str, tensor: torch.Tensor, config) -> torch.Tensor:
    """Map a checkpoint tensor of a Mamba layer to MambaMixer2's n_groups = num_heads layout."""
    d_inner, d_xb = config.d_inner, config.d_xb
    if suffix == "in_proj.weight":
        z, x, B, C, dt = torch.split(tensor, [d_inner, d_xb, d_xb, d_inner, config.ssm_nheads], dim=0)
        return torch.cat([z, _repeat_kv_rows(x, config), _repeat_kv_rows(B, config), C, dt], dim=0)
    if suffix in ("conv1d.weight", "conv1d.bias"):
        x, B, C = torch.split(tensor, [d_xb, d_xb, d_inner], dim=0)
        return torch.cat([_repeat_kv_rows(x, config), _repeat_kv_rows(B, config), C], dim=0)
    if suffix.startswith("in_proj.") or suffix.startswith("conv1d."):
        raise ValueError(f"unexpected Mamba tensor `{suffix}` in a MambaInLlama checkpoint")
    return tensor


class MambaInLlamaMixer(MambaMixer2):
    def __init__(self, config, model_config=None, cache_config=None, quant_config=None, prefix: str = ""):
        super().__init__(
            hidden_size=config.hidden_size,
            **mamba2_dims(config).mixer_kwargs(),
            use_conv_bias=True,
            use_bias=False,
            rms_norm_eps=_gated_norm_eps(config),
            activation="silu",
            model_config=model_config,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )
        # rmsnorm(y * silu(z)) in groups of ssm_norm_group_size channels (default all of d_inner), which is
        # not MambaMixer2's one group per B/C group.
        group_size = getattr(config, "ssm_norm_group_size", None) or config.d_inner
        self.norm = Mixer2RMSNormGated(config.d_inner, config.d_inner // group_size, eps=_gated_norm_eps(config))


class MambaInLlamaMambaDecoderLayer(Mamba2DecoderLayer):
    """A Llama decoder layer whose attention is replaced by a Mamba-2 mixer (same norms, same MLP)."""

    mixer_cls = MambaInLlamaMixer
    mixer_name = "mamba"


@support_torch_compile
class MambaInLlamaModel(Mamba2LlamaModel):
    def make_layer(self, vllm_config, prefix: str) -> nn.Module:
        if extract_layer_index(prefix) in set(self.config.attn_layers):
            return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix)
        return MambaInLlamaMambaDecoderLayer(vllm_config=vllm_config, prefix=prefix)


class MambaInLlamaForCausalLM(Mamba2LlamaForCausalLM, IsHybrid):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "in_proj": ["in_proj"],
        "conv1d": ["conv1d"],
    }
    model_cls = MambaInLlamaModel
    arch_name = "MambaInLlama"
    stacked_params = STACKED_PARAMS
    missing_param_hint = " (does config.json's attn_layers match the weights?)"
    check_config = staticmethod(check_mambainllama_config)
    mamba2_dims = staticmethod(mamba2_dims)

    def remap_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if "rotary_emb.inv_freq" in name:
            return None  # recomputed by vLLM's rotary embedding
        if ".mamba." in name:
            tensor = expand_mamba_tensor(name.split(".mamba.", 1)[1], tensor, self.config)
        return name, tensor
