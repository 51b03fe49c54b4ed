"""Llamba: a Llama whose every attention layer is a discrete Mamba-2 mixer (Bick et al., MOHAWK / Llamba).

    from harness_ext.models import load_model
    model = load_model("ckpt/llamba")           # or LlambaForCausalLM.from_pretrained(...)

Block: RMSNorm -> discrete Mamba-2 mixer -> residual -> RMSNorm -> Llama MLP -> residual (Cartesia's Llamba block).

Config fields and their attention analogue (the teacher's attention maps onto the mixer head for head):

    hidden_size, intermediate_size, num_hidden_layers, rms_norm_eps, hidden_act, mlp_bias, vocab_size,
    tie_word_embeddings    the Llama trunk, unchanged (Cartesia: d_model, mlp_cfg, n_layer, norm_epsilon, ...)
    n_qk_heads             heads of B and C  <-  K and Q heads (GQA K heads are repeated to the Q heads)
    n_v_heads              heads of x        <-  V heads (repeated like K); a multiple of n_qk_heads;
                           x head i reads B/C head i // (n_v_heads // n_qk_heads)
    d_state                width of a B/C head  <-  head_dim of Q/K
    d_inner                width of x, z, y = n_v_heads * headdim  <-  num_attention_heads * head_dim
                           (headdim = d_inner // n_v_heads  <-  head_dim of V); Cartesia: expand * d_model
    d_conv                 depthwise causal conv width over x, B, C (no analogue; init: identity)
    conv_bias              conv1d has a bias (Cartesia default True)
    conv_activation        after the conv: "identity" (Cartesia's Llamba) or "silu"
    ssm_bias               in_proj / out_proj biases  <-  attention_bias
    ssm_chunk_size         SSD chunk length (kernel tiling only, no effect on the maths)
    ssm_state_dtype        SSM state dtype in caches (float32)

Mixer `model.layers.{i}.mixer.` (row order of in_proj is Cartesia's):

    in_proj.weight [d_inner + 2 * n_qk_heads * d_state + d_inner + n_v_heads, hidden]  rows x, B, C, z, dt
                   x <- W_v, B <- W_k, C <- W_q, z: output gate, dt: per-head input-dependent step
    conv1d.weight  [d_inner + 2 * n_qk_heads * d_state, 1, d_conv], conv1d.bias    over x, B, C
    z_bias [d_inner]         gate bias: out = out_proj(y * silu(z + z_bias))
    A_log  [n_v_heads]       per-head A = -exp(A_log) (0 reproduces Cartesia, whose A is fixed at -1)
    D      [n_v_heads]       skip: y += D * x
    out_proj.weight [hidden, d_inner]  <- W_o

Maths per head: dt = softplus(dt_row), decay_t = exp(A * dt_t), state_t = decay_t * state_{t-1} + outer(x_t, B_t),
y_t = state_t @ C_t + D x_t -- "discrete": x enters unscaled by dt (run as the SSD scan of x / dt, as Cartesia does).
So y = M x with M[i, j] = (C_i . B_j) * prod_{j<k<=i} decay_k: attention's softmax(QK^T) with a learned decay mask.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PretrainedConfig

from . import decode_kernels as ssd_decode
from . import ssd
from .runtime import (DecoderLayer, ForwardContext, HybridForCausalLM, SSMMixerBase, aligned_linear,
                      fused_linear_weight)

SILU_INVERSE_OF_ONE = 1.2784645      # silu(z) == 1: a zero-weight gate with this bias passes y through


class LlambaConfig(PretrainedConfig):
    model_type = "llamba"

    def __init__(self, vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 rms_norm_eps=1e-5, hidden_act="silu", mlp_bias=False, tie_word_embeddings=True,
                 n_qk_heads=9, n_v_heads=9, d_state=64, d_inner=None, d_conv=4, conv_bias=True,
                 conv_activation="identity", ssm_bias=False, ssm_chunk_size=128, ssm_state_dtype="float32",
                 initializer_range=0.02, max_position_embeddings=8192, pad_token_id=None, bos_token_id=None,
                 eos_token_id=None, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.rms_norm_eps = rms_norm_eps
        self.hidden_act = hidden_act
        self.mlp_bias = mlp_bias
        self.n_qk_heads = n_qk_heads
        self.n_v_heads = n_v_heads
        self.d_state = d_state
        self.d_inner = int(d_inner or hidden_size)
        self.d_conv = d_conv
        self.conv_bias = conv_bias
        self.conv_activation = conv_activation
        self.ssm_bias = ssm_bias
        self.ssm_chunk_size = ssm_chunk_size
        self.ssm_state_dtype = ssm_state_dtype
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings   # no positions in the model; for tools that ask
        kwargs.setdefault("architectures", ["LlambaForCausalLM"])
        super().__init__(tie_word_embeddings=tie_word_embeddings, pad_token_id=pad_token_id,
                         bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def headdim(self) -> int:
        return self.d_inner // self.n_v_heads


class DiscreteMamba2(SSMMixerBase):
    """Cartesia's discrete Mamba-2 mixer (multi-head B/C like K/Q, x heads like V), plus a per-head A."""

    def __init__(self, config: LlambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner, self.d_state = config.d_inner, config.d_state
        self.n_qk_heads, self.nheads = config.n_qk_heads, config.n_v_heads
        self.headdim = config.headdim
        self.d_conv = config.d_conv
        self.conv_dim = self.d_inner + 2 * self.n_qk_heads * self.d_state
        self.conv_activation = None if config.conv_activation == "identity" else config.conv_activation
        self.chunk_size = config.ssm_chunk_size
        self.ssm_state_dtype = config.ssm_state_dtype
        self.in_proj = nn.Linear(config.hidden_size, self.conv_dim + self.d_inner + self.nheads, bias=config.ssm_bias)
        self.z_bias = nn.Parameter(torch.zeros(self.d_inner))
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.d_conv, groups=self.conv_dim,
                                padding=self.d_conv - 1, bias=config.conv_bias)
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.out_proj = nn.Linear(self.d_inner, config.hidden_size, bias=config.ssm_bias)

    def reset_ssm_parameters(self, init):
        init.zeros_(self.A_log)
        init.ones_(self.D)
        init.zeros_(self.z_bias)

    def _split_in_proj(self, xbczdt):
        return torch.split(xbczdt, [self.conv_dim, self.d_inner, self.nheads], dim=-1)      # xBC, z, dt

    def _heads(self, xBC):
        x, B, C = torch.split(xBC, [self.d_inner, self.n_qk_heads * self.d_state, self.n_qk_heads * self.d_state], dim=-1)
        return (x.unflatten(-1, (self.nheads, self.headdim)), B.unflatten(-1, (self.n_qk_heads, self.d_state)),
                C.unflatten(-1, (self.n_qk_heads, self.d_state)))

    def _A(self):
        return -torch.exp(self.A_log.float())

    def mix(self, hidden, ctx: ForwardContext):
        xBC, z, dt = self._split_in_proj(aligned_linear(hidden, self.in_proj))
        xBC, conv_state = self._conv_full(xBC, ctx)
        x, B, C = self._heads(xBC)
        x_scaled, dt = ssd_decode.discrete_scan_inputs(x, dt)
        y, ssm_state = self._scan_full(x_scaled, dt, self._A(), B, C, ctx)
        if conv_state is not None:
            self._store_states(ctx, conv_state, ssm_state)
        # skip and gate in fp32: D's gradient sums x * dy over every token, 1.2e-2 off in bf16 (GPU check)
        return self.out_proj(ssd_decode.skip_gate(y, x, self.D, z, self.z_bias))

    def step(self, hidden, layer_state, ctx=None):
        xBC, z, dt = self._split_in_proj(self.in_proj(hidden))
        x, B, C = self._heads(self._conv_step(xBC, layer_state, ctx))
        x_scaled, dt = ssd_decode.discrete_scan_inputs_ref(x, dt)
        y = ssd.ssd_step(layer_state["ssm_state"], x_scaled, dt, self._A(), B, C)
        return self.out_proj(ssd_decode.skip_gate_ref(y, x, self.D, z, self.z_bias))

    def step_fast(self, hidden, layer_state, ctx=None):
        """`step` in four kernels: in_proj GEMM, conv, discrete SSM step with D and the z gate fused, out_proj GEMM."""
        batch = hidden.shape[0]
        weight, bias = fused_linear_weight(self, "in_proj", [self.in_proj], pad_to=64)
        xBC, z, dt = self._split_in_proj(F.linear(hidden, weight, bias)[:, :self.in_proj.out_features])
        xBC = ssd_decode.conv_step(layer_state["conv_state"], xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                   silu=self.conv_activation == "silu", positions=ctx.decode_state.seqlens)
        x, B, C = torch.split(xBC, [self.d_inner, self.n_qk_heads * self.d_state, self.n_qk_heads * self.d_state], dim=-1)
        y = ssd_decode.ssm_step(layer_state["ssm_state"], x.view(batch, self.nheads, self.headdim), dt, self.A_log,
                                B.view(batch, self.n_qk_heads, self.d_state), C.view(batch, self.n_qk_heads, self.d_state),
                                D=self.D, z=z, z_bias=self.z_bias, dt_softplus=True, discrete=True)
        return F.linear(y.view(batch, self.d_inner), self.out_proj.weight, self.out_proj.bias)

    def mixing_inputs(self, hidden_states, seq_idx=None):
        """The scan's operands for a full sequence: x [b, l, h, p] (post-conv), dt [b, l, h] (after softplus), B, C."""
        xBC, _, dt = self._split_in_proj(aligned_linear(hidden_states, self.in_proj))
        xBC = ssd.causal_conv1d(xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias, seq_idx=seq_idx,
                                activation=self.conv_activation)
        x, B, C = self._heads(xBC)
        return x, F.softplus(dt.float()), B, C

    def materialize_mixing_matrix(self, hidden_states, seq_idx=None):
        """[B, n_v_heads, L, L]: y_i = sum_j M[i, j] x_j for this mixer's (post-conv) x, before D and the gate."""
        _, dt, B, C = self.mixing_inputs(hidden_states, seq_idx)
        return ssd.ssd_mixing_matrix(dt * self._A(), B, C, seq_idx=seq_idx)

    @torch.no_grad()
    def set_head_fit(self, scale, A, D):
        """Per head: M -> scale * M (C rows scaled, so B/C heads must be x heads one to one), A, and the skip D."""
        if self.n_qk_heads != self.nheads:
            raise ValueError(f"per-head calibration scales C, which n_v_heads={self.nheads} x heads share "
                             f"{self.nheads // self.n_qk_heads} at a time (n_qk_heads={self.n_qk_heads}); "
                             "it needs n_qk_heads == n_v_heads")
        c0 = self.d_inner + self.n_qk_heads * self.d_state
        rows = self.in_proj.weight[c0:c0 + self.n_qk_heads * self.d_state].view(self.n_qk_heads, self.d_state, -1)
        rows.mul_(scale.to(rows.dtype).view(-1, 1, 1))
        if self.in_proj.bias is not None:
            self.in_proj.bias[c0:c0 + self.n_qk_heads * self.d_state].view(self.n_qk_heads, -1).mul_(
                scale.to(self.in_proj.bias.dtype).view(-1, 1))
        self.A_log.copy_(torch.log(-A.float()).to(self.A_log.dtype))
        self.D.copy_(D.to(self.D.dtype))


class LlambaForCausalLM(HybridForCausalLM):
    config_class = LlambaConfig

    @classmethod
    def validate_config(cls, config) -> None:
        if config.n_v_heads % config.n_qk_heads:
            raise ValueError(f"llamba config: n_v_heads={config.n_v_heads} must be a multiple of n_qk_heads={config.n_qk_heads}")
        if config.d_inner % config.n_v_heads:
            raise ValueError(f"llamba config: d_inner={config.d_inner} must be a multiple of n_v_heads={config.n_v_heads}")
        if config.conv_activation not in ("identity", "silu"):
            raise ValueError(f"llamba config: conv_activation must be 'identity' or 'silu', got {config.conv_activation!r}")

    def _build_layer(self, config, layer_idx):
        return DecoderLayer(config, layer_idx, "mixer", DiscreteMamba2(config, layer_idx))
