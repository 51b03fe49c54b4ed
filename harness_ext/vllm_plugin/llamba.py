"""Llamba in vLLM: the discrete Mamba-2 mixer on vLLM's Mamba-2 kernels (attention-free).

    vllm serve ./checkpoints/llamba --dtype float32

No public vLLM port of Llamba exists; this one follows `harness_ext/models/llamba.py` (the reference):

    xBC, z, dt = in_proj(h)                    rows x, B, C, z, dt (Cartesia's order)
    x, B, C    = act(conv1d(xBC))              act: identity (Cartesia) or silu
    dt         = softplus(dt)                  no dt_bias
    y          = SSD(x / dt, dt, A = -exp(A_log), B, C) + D * x     "discrete": x enters the state unscaled by dt
    out        = out_proj(y * silu(z + z_bias))                     no norm

It reuses MambaMixer2's projections, conv weights, state layout and custom op (so continuous batching,
chunked prefill, TP by heads and torch.compile work unchanged) and overrides only `conv_ssm_forward`
(x / dt into the scan, D outside it) and `forward` (gate with z_bias instead of the gated RMSNorm).
in_proj rows are permuted at load from the checkpoint's x, B, C, z, dt to MambaMixer2's z, x, B, C, dt.
"""
# No `from __future__ import annotations`: @support_torch_compile reads forward()'s annotations.

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import is_conv_state_dim_first
from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from vllm.model_executor.layers.mamba.ops.ssd_checkpoint import store_prefill_checkpoint
from vllm.model_executor.layers.mamba.ops.ssd_combined import mamba_chunk_scan_combined_varlen
from vllm.model_executor.layers.mamba.ops.ssu_dispatch import selective_state_update
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.models.interfaces import IsAttentionFree
from vllm.model_executor.utils import set_weight_attrs
from vllm.utils.torch_utils import _encode_layer_name

from .common import Mamba2DecoderLayer, Mamba2Dims, Mamba2LlamaForCausalLM, Mamba2LlamaModel
from .config_hooks import check_llamba_config, llamba_dims


def mamba2_dims(config) -> Mamba2Dims:
    """Llamba's heads as MambaMixer2 sees them: B/C groups are the n_qk_heads, x heads the n_v_heads."""
    dims = llamba_dims(config)
    return Mamba2Dims(
        intermediate_size=dims.d_inner,
        n_groups=dims.n_qk_heads,
        num_heads=dims.n_v_heads,
        head_dim=dims.headdim,
        state_size=dims.d_state,
        conv_kernel=dims.d_conv,
    )


def reorder_in_proj_rows(tensor: torch.Tensor, config) -> torch.Tensor:
    """Checkpoint rows x, B, C, z, dt -> MambaMixer2's z, x, B, C, dt."""
    dims = llamba_dims(config)
    xBC, z, dt = torch.split(tensor, [dims.conv_dim, dims.d_inner, dims.n_v_heads], dim=0)
    return torch.cat([z, xBC, dt], dim=0)


class DiscreteMamba2Mixer(MambaMixer2):
    def __init__(self, config, model_config=None, cache_config=None, quant_config=None, prefix: str = ""):
        dims = llamba_dims(config)
        super().__init__(
            hidden_size=config.hidden_size,
            **mamba2_dims(config).mixer_kwargs(),
            use_conv_bias=dims.conv_bias,
            use_bias=dims.ssm_bias,
            activation="silu" if dims.conv_activation == "silu" else None,
            use_rms_norm=False,
            model_config=model_config,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=prefix,
        )
        if self.use_replayssm or self.num_spec > 0:
            raise ValueError("Llamba in vLLM supports neither ReplaySSM nor speculative decoding")
        # Llamba has no dt_bias; a zero buffer keeps MambaMixer2's state and op plumbing unchanged.
        del self.dt_bias
        self.register_buffer("dt_bias", torch.zeros(self.num_heads // self.tp_size), persistent=False)
        self.z_bias = nn.Parameter(torch.zeros(self.intermediate_size // self.tp_size))
        set_weight_attrs(self.z_bias, {"weight_loader": sharded_weight_loader(0)})

    def forward(self, hidden_states: torch.Tensor, mup_vector: torch.Tensor | None = None) -> torch.Tensor:
        projected_states, _ = self.in_proj(hidden_states)
        ssm_output = torch.empty(
            [hidden_states.shape[0], self.tped_intermediate_size],
            dtype=hidden_states.dtype,
            device=hidden_states.device,
        )
        torch.ops.vllm.mamba_mixer2(projected_states, ssm_output, _encode_layer_name(self.prefix))  # -> conv_ssm_forward
        z = projected_states[..., : self.tped_intermediate_size]
        output, _ = self.out_proj(ssm_output * F.silu(z + self.z_bias))
        return output

    def _unscaled_x(self, x: torch.Tensor, dt: torch.Tensor) -> torch.Tensor:
        """x / softplus(dt): the scan multiplies its input by softplus(dt); the discrete mixer must not."""
        return (x / F.softplus(dt.float()).unsqueeze(-1)).to(x.dtype)

    def conv_ssm_forward(self, projected_states: torch.Tensor, output: torch.Tensor):
        xBC, dt = torch.split(
            projected_states[..., self.tped_intermediate_size :], [self.tped_conv_size, self.tped_dt_size], dim=-1
        )
        attn_metadata = get_forward_context().attn_metadata
        meta = attn_metadata.get(self.prefix) if isinstance(attn_metadata, dict) else None
        if meta is None:  # profile run: let the Triton autotuner run before the state cache is allocated
            self._warmup_ssd_kernels(projected_states)
            return
        conv_state = self.kv_cache[0] if is_conv_state_dim_first() else self.kv_cache[0].transpose(-1, -2)
        ssm_state = self.kv_cache[1]
        n_heads, head_dim, n_groups = self.num_heads // self.tp_size, self.head_dim, self.n_groups // self.tp_size
        n_d, n_p = meta.num_decode_tokens, meta.num_prefill_tokens
        xBC_d, xBC_p = torch.split(xBC[: n_d + n_p], [n_d, n_p], dim=0)
        dt_d, dt_p = torch.split(dt[: n_d + n_p], [n_d, n_p], dim=0)
        out_d, out_p = torch.split(output[: n_d + n_p], [n_d, n_p], dim=0)

        if meta.num_prefills > 0:
            conv_in = xBC_p.transpose(0, 1)
            xBC_p = causal_conv1d_fn(
                conv_in,
                self.conv_weights,
                self.conv1d.bias,
                activation=self.activation,
                conv_states=conv_state,
                has_initial_state=meta.has_initial_states_p,
                cache_indices=meta.state_indices_tensor_p,
                metadata=meta,
                query_start_loc=meta.query_start_loc_p,
            ).transpose(0, 1)[:n_p]
            x, B, C = self.split_hidden_states_B_C_fn(xBC_p)
            x = x.reshape(n_p, n_heads, head_dim)
            initial_states = None
            if meta.has_initial_states_p is not None and meta.prep_initial_states:
                initial_states = torch.where(
                    meta.has_initial_states_p[:, None, None, None], ssm_state[meta.state_indices_tensor_p], 0
                )
            has_checkpoints = meta.checkpoint_chunk_idx is not None
            y = out_p.view(n_p, n_heads, head_dim)
            varlen_states = mamba_chunk_scan_combined_varlen(
                self._unscaled_x(x, dt_p),
                dt_p,
                self.A,
                B.reshape(n_p, n_groups, -1),
                C.reshape(n_p, n_groups, -1),
                chunk_size=meta.chunk_size,
                D=None,
                z=None,
                dt_bias=None,
                seq_idx=meta.seq_idx_p,
                cu_seqlens=meta.query_start_loc_p,
                cu_chunk_seqlens=meta.cu_chunk_seqlen_p,
                last_chunk_indices=meta.last_chunk_indices_p,
                initial_states=initial_states,
                return_intermediate_states=has_checkpoints,
                dt_softplus=True,
                dt_limit=(0.0, float("inf")),
                out=y,
                state_dtype=ssm_state.dtype,
            )
            y.add_(x * self.D.to(x.dtype).unsqueeze(-1))
            final_states = varlen_states[meta.last_chunk_indices_p] if has_checkpoints else varlen_states
            if has_checkpoints:
                store_prefill_checkpoint(
                    meta.checkpoint_meta,
                    meta.checkpoint_chunk_idx,
                    conv_in,
                    conv_state,
                    varlen_states,
                    ssm_state,
                    meta.query_start_loc_p,
                    state_len=self.conv_kernel_size - 1,
                )
            ssm_state[meta.state_indices_tensor_p] = final_states

        if meta.num_decodes > 0:
            indices = meta.state_indices_tensor_d
            xBC_d = causal_conv1d_update(
                xBC_d,
                conv_state,
                self.conv_weights,
                self.conv1d.bias,
                self.activation,
                conv_state_indices=indices,
                num_accepted_tokens=meta.num_accepted_tokens,
                query_start_loc=meta.query_start_loc_d,
                max_query_len=indices.size(-1),
            )
            x, B, C = self.split_hidden_states_B_C_fn(xBC_d)
            x = x.reshape(n_d, n_heads, head_dim)
            A = self.A[:, None, None].expand(-1, head_dim, self.ssm_state_size).to(torch.float32)
            y = out_d.view(n_d, n_heads, head_dim)
            selective_state_update(
                ssm_state,
                self._unscaled_x(x, dt_d),
                dt_d[:, :, None].expand(-1, -1, head_dim),
                A,
                B.reshape(n_d, n_groups, -1),
                C.reshape(n_d, n_groups, -1),
                None,
                None,
                dt_softplus=True,
                state_batch_indices=indices,
                dst_state_batch_indices=indices,
                out=y,
                num_accepted_tokens=meta.num_accepted_tokens,
                cu_seqlens=meta.query_start_loc_d,
                is_blackwell=self.is_blackwell,
            )
            y.add_(x * self.D.to(x.dtype).unsqueeze(-1))


class LlambaDecoderLayer(Mamba2DecoderLayer):
    """RMSNorm -> discrete Mamba-2 -> residual -> RMSNorm -> Llama MLP -> residual."""

    mixer_cls = DiscreteMamba2Mixer
    mixer_name = "mixer"


@support_torch_compile
class LlambaModel(Mamba2LlamaModel):
    def make_layer(self, vllm_config, prefix: str) -> nn.Module:
        return LlambaDecoderLayer(vllm_config=vllm_config, prefix=prefix)


class LlambaForCausalLM(Mamba2LlamaForCausalLM, IsAttentionFree):
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"], "in_proj": ["in_proj"], "conv1d": ["conv1d"]}
    model_cls = LlambaModel
    arch_name = "Llamba"
    check_config = staticmethod(check_llamba_config)
    mamba2_dims = staticmethod(mamba2_dims)

    def remap_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        if name.endswith(".mixer.in_proj.weight") or name.endswith(".mixer.in_proj.bias"):
            tensor = reorder_in_proj_rows(tensor, self.config)
        return name, tensor
