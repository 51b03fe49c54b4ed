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

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.layers.mamba.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from vllm.model_executor.layers.mamba.ops.ssd_checkpoint import store_prefill_checkpoint
from vllm.model_executor.layers.mamba.ops.ssd_combined import mamba_chunk_scan_combined_varlen
from vllm.model_executor.layers.mamba.ops.ssu_dispatch import selective_state_update
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader, sharded_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsAttentionFree
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import make_layers, maybe_prefix
from vllm.model_executor.utils import set_weight_attrs
from vllm.sequence import IntermediateTensors
from vllm.utils.torch_utils import _encode_layer_name

from .config_hooks import check_llamba_config, llamba_dims

STACKED_PARAMS = {
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


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
            ssm_state_size=dims.d_state,
            conv_kernel_size=dims.d_conv,
            intermediate_size=dims.d_inner,
            use_conv_bias=dims.conv_bias,
            use_bias=dims.ssm_bias,
            n_groups=dims.n_qk_heads,
            num_heads=dims.n_v_heads,
            head_dim=dims.headdim,
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


class LlambaDecoderLayer(nn.Module):
    """RMSNorm -> discrete Mamba-2 -> residual -> RMSNorm -> Llama MLP -> residual."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.mixer = DiscreteMamba2Mixer(
            config,
            model_config=vllm_config.model_config,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.mixer",
        )
        self.mlp = LlamaMLP(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            hidden_act=config.hidden_act,
            quant_config=vllm_config.quant_config,
            bias=getattr(config, "mlp_bias", False),
            prefix=f"{prefix}.mlp",
        )
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.mixer(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class LlambaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: LlambaDecoderLayer(vllm_config=vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        residual = None
        for layer in self.layers[self.start_layer : self.end_layer]:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlambaForCausalLM(nn.Module, HasInnerState, IsAttentionFree):
    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"], "in_proj": ["in_proj"], "conv1d": ["conv1d"]}

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
        cache_config = vllm_config.cache_config
        ssm_dtype = cache_config.mamba_ssm_cache_dtype
        if ssm_dtype == "auto":
            ssm_dtype = getattr(vllm_config.model_config.hf_config, "ssm_state_dtype", "float32")
        return MambaStateDtypeCalculator.mamba2_state_dtype(
            vllm_config.model_config.dtype, cache_config.mamba_cache_dtype, ssm_dtype
        )

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, int], tuple[int, int, int]]:
        dims = llamba_dims(vllm_config.model_config.hf_config)
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
            intermediate_size=dims.d_inner,
            n_groups=dims.n_qk_heads,
            num_heads=dims.n_v_heads,
            head_dim=dims.headdim,
            state_size=dims.d_state,
            conv_kernel=dims.d_conv,
            num_spec=vllm_config.num_speculative_tokens,
        )

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_llamba_config(config)
        self.config = config
        self.model = LlambaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(
            config.vocab_size, config.hidden_size, quant_config=vllm_config.quant_config,
            prefix=maybe_prefix(prefix, "lm_head"),
        )
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if ".mixer." in name:
                if name.endswith(".mixer.in_proj.weight") or name.endswith(".mixer.in_proj.bias"):
                    tensor = reorder_in_proj_rows(tensor, self.config)
                name = name.replace(".A_log", ".A")  # vLLM's loader for A applies -exp()
            shard_id = None
            for ckpt_part, (param_part, shard) in STACKED_PARAMS.items():
                if ckpt_part in name:
                    name, shard_id = name.replace(ckpt_part, param_part), shard
                    break
            if name not in params:
                raise ValueError(f"Llamba checkpoint tensor `{name}` has no place in the model")
            param = params[name]
            if shard_id is None:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
            loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"Llamba checkpoint lacks tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return loaded
