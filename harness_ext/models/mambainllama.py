"""MambaInLlama: a Llama whose attention layers, except `attn_layers`, are Mamba-2 layers built from them.

    from harness_ext.models import load_model
    model = load_model("ckpt/mil50")            # or MambaInLlamaForCausalLM.from_pretrained(...)

Config = every LlamaConfig field (RoPE incl. llama3 scaling, GQA) plus the Mamba fields below. A Mamba layer
mirrors the attention it replaces (Wang et al., "The Mamba in the Llama", 2024):

    attention            Mamba-2 layer `model.layers.{i}.mamba.`
    W_q  (q heads)   ->  C    [d_inner = num_attention_heads * head_dim]
    W_k  (kv heads)  ->  B    [d_xb = num_key_value_heads * head_dim], repeated to the q heads like GQA
    W_v  (kv heads)  ->  x    [d_xb], repeated to the q heads
    W_o              ->  out_proj
    softmax(QK^T)    ->  exp(segsum(dt * A)) * (C B^T), dt = softplus(dt + dt_bias) per head and token

in_proj rows are z, x, B, C, dt; a depthwise causal conv (SiLU) runs over x, B, C; y = scan + D * x;
out = out_proj(rmsnorm(y * silu(z)) * norm.weight), normalised in groups of `ssm_norm_group_size` channels
(default d_inner; the published MambaInLlama checkpoints use head_dim, which `convert` sets).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import LlamaConfig

from . import decode_kernels as ssd_decode
from . import ssd
from .runtime import (DecoderLayer, ForwardContext, HybridForCausalLM, LlamaAttention, SSMMixerBase, aligned_linear,
                      fused_linear_weight)


class MambaInLlamaConfig(LlamaConfig):
    model_type = "mambainllama"

    def __init__(self, attn_layers=None, d_conv: int = 4, ssm_chunk_size: int = 256, ssm_state_dtype: str = "float32",
                 ssm_norm_group_size: int | None = None, d_inner=None, d_xb=None, ssm_d_state=None, ssm_headdim=None,
                 ssm_nheads=None, **kwargs):
        super().__init__(**kwargs)
        self.architectures = kwargs.get("architectures") or ["MambaInLlamaForCausalLM"]
        head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        self.head_dim = head_dim
        self.attn_layers = sorted(int(i) for i in (attn_layers if attn_layers is not None else range(self.num_hidden_layers)))
        self.d_conv = d_conv
        self.ssm_chunk_size = ssm_chunk_size
        self.ssm_state_dtype = ssm_state_dtype
        # Derived from the attention shape (DESIGN.md); stored so the checkpoint is self-describing.
        derived = {"d_inner": self.num_attention_heads * head_dim, "d_xb": self.num_key_value_heads * head_dim,
                   "ssm_d_state": head_dim, "ssm_headdim": head_dim, "ssm_nheads": self.num_attention_heads}
        given = {"d_inner": d_inner, "d_xb": d_xb, "ssm_d_state": ssm_d_state, "ssm_headdim": ssm_headdim,
                 "ssm_nheads": ssm_nheads}
        for name, value in derived.items():
            if given[name] is not None and int(given[name]) != value:
                raise ValueError(f"mambainllama config: {name}={given[name]} does not match the attention shape "
                                 f"(expected {value} from num_attention_heads={self.num_attention_heads}, "
                                 f"num_key_value_heads={self.num_key_value_heads}, head_dim={head_dim})")
            setattr(self, name, value)
        self.ssm_norm_group_size = int(ssm_norm_group_size or self.d_inner)


class MambaInLlamaMixer(SSMMixerBase):
    """Mamba-2 with x/B at KV width repeated to the query heads; nheads = attention heads, headdim = d_state = head_dim."""

    conv_activation = "silu"

    def __init__(self, config: MambaInLlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.d_inner, self.d_xb = config.d_inner, config.d_xb
        self.nheads, self.headdim, self.d_state = config.ssm_nheads, config.ssm_headdim, config.ssm_d_state
        self.n_kv_heads = config.num_key_value_heads
        self.d_conv = config.d_conv
        self.conv_dim = 2 * self.d_xb + self.d_inner
        self.chunk_size = config.ssm_chunk_size
        self.ssm_state_dtype = config.ssm_state_dtype
        self.norm_group_size = config.ssm_norm_group_size
        self.norm_eps = config.rms_norm_eps
        self.in_proj = nn.Linear(config.hidden_size, 2 * self.d_inner + 2 * self.d_xb + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim, padding=self.d_conv - 1)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads))
        self.A_log = nn.Parameter(torch.empty(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=False)

    def reset_ssm_parameters(self, init, dt_min=1e-3, dt_max=0.1, a_min=1.0, a_max=16.0):
        """Mamba-2's init: dt log-uniform in [dt_min, dt_max] (dt_bias = softplus^-1(dt)), A uniform in [a_min, a_max]."""
        dt = torch.exp(torch.rand(self.nheads) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        init.copy_(self.dt_bias, dt + torch.log(-torch.expm1(-dt)))
        init.copy_(self.A_log, torch.log(torch.empty(self.nheads).uniform_(a_min, a_max)))
        init.ones_(self.D)
        init.ones_(self.norm.weight)

    def _split_in_proj(self, zxbcdt):
        return torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)      # z, xBC, dt

    def _heads(self, xBC):
        """xBC [..., conv_dim] -> x, B [..., nheads, headdim] (KV heads repeated), C [..., nheads, d_state]."""
        x, B, C = torch.split(xBC, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
        rep = self.nheads // self.n_kv_heads
        x = x.unflatten(-1, (self.n_kv_heads, self.headdim)).repeat_interleave(rep, dim=-2)
        B = B.unflatten(-1, (self.n_kv_heads, self.d_state)).repeat_interleave(rep, dim=-2)
        C = C.unflatten(-1, (self.nheads, self.d_state))
        return x, B, C

    def _A(self):
        return -torch.exp(self.A_log.float())

    def _out(self, y, z):
        y = ssd.gated_rmsnorm(y, z, self.norm.weight, eps=self.norm_eps, group_size=self.norm_group_size)
        return self.out_proj(y)

    def mix(self, hidden, ctx: ForwardContext):
        z, xBC, dt = self._split_in_proj(aligned_linear(hidden, self.in_proj))
        xBC, conv_state = self._conv_full(xBC, ctx)
        x, B, C = self._heads(xBC)
        y, ssm_state = self._scan_full(x, dt, self._A(), B, C, ctx, D=self.D, dt_bias=self.dt_bias, dt_softplus=True)
        if conv_state is not None:
            self._store_states(ctx, conv_state, ssm_state)
        return self._out(y.flatten(-2), z)

    def step(self, hidden, layer_state, ctx=None):
        """hidden [B, hidden]; conv/SSM state in `layer_state` updated in place; returns [B, hidden]."""
        z, xBC, dt = self._split_in_proj(self.in_proj(hidden))
        x, B, C = self._heads(self._conv_step(xBC, layer_state, ctx))
        y = ssd.ssd_step(layer_state["ssm_state"], x, dt, self._A(), B, C, D=self.D, dt_bias=self.dt_bias,
                         dt_softplus=True)
        return self._out(y.flatten(-2), z)

    def step_fast(self, hidden, layer_state, ctx=None):
        """`step` in five kernels: in_proj GEMM, conv (state shift + conv + SiLU), SSM step (dt bias/softplus, D;
        x and B read at KV width), gated RMSNorm, out_proj GEMM. hidden [B, hidden] -> [B, hidden]."""
        batch = hidden.shape[0]
        weight, _ = fused_linear_weight(self, "in_proj", [self.in_proj], pad_to=64)
        z, xBC, dt = self._split_in_proj(F.linear(hidden, weight)[:, :self.in_proj.out_features])
        xBC = ssd_decode.conv_step(layer_state["conv_state"], xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   silu=True, positions=ctx.decode_state.seqlens)
        x, B, C = torch.split(xBC, [self.d_xb, self.d_xb, self.d_inner], dim=-1)
        y = ssd_decode.ssm_step(layer_state["ssm_state"], x.view(batch, self.n_kv_heads, self.headdim), dt,
                                self.A_log, B.view(batch, self.n_kv_heads, self.d_state),
                                C.view(batch, self.nheads, self.d_state), D=self.D, dt_bias=self.dt_bias,
                                dt_softplus=True)
        gated_norm = ssd.gated_rmsnorm if y.is_cuda else ssd.gated_rmsnorm_ref
        y = gated_norm(y.view(batch, self.d_inner), z, self.norm.weight, eps=self.norm_eps,
                       group_size=self.norm_group_size)
        return F.linear(y, self.out_proj.weight)

    def materialize_mixing_matrix(self, hidden_states, seq_idx=None):
        """[B, nheads, L, L]: M with y_i = sum_j M[i, j] x_j for this mixer's (post-conv) x, before D and the gate."""
        z, xBC, dt = self._split_in_proj(aligned_linear(hidden_states, self.in_proj))
        xBC = ssd.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                                activation=self.conv_activation)
        _, B, C = self._heads(xBC)
        dt = F.softplus(dt.float() + self.dt_bias.float())
        return ssd.ssd_mixing_matrix(dt * self._A(), B, C, input_scale=dt, seq_idx=seq_idx)


class MambaInLlamaForCausalLM(HybridForCausalLM):
    config_class = MambaInLlamaConfig

    @classmethod
    def validate_config(cls, config) -> None:
        bad = [i for i in config.attn_layers if not 0 <= i < config.num_hidden_layers]
        if bad:
            raise ValueError(f"attn_layers {bad} out of range for num_hidden_layers={config.num_hidden_layers}")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError(f"num_attention_heads={config.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={config.num_key_value_heads}")
        if config.d_inner % config.ssm_norm_group_size:
            raise ValueError(f"ssm_norm_group_size={config.ssm_norm_group_size} does not divide d_inner={config.d_inner}")

    def _build_layer(self, config, layer_idx):
        if layer_idx in config.attn_layers:
            return DecoderLayer(config, layer_idx, "self_attn", LlamaAttention(config, layer_idx))
        return DecoderLayer(config, layer_idx, "mamba", MambaInLlamaMixer(config, layer_idx))
