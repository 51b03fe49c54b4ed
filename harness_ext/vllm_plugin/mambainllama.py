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

from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2, Mixer2RMSNormGated
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaMLP
from vllm.model_executor.models.utils import extract_layer_index, make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

from .config_hooks import check_mambainllama_config

# checkpoint name -> (vLLM fused parameter, shard id)
STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", "q"),
    ".k_proj.": (".qkv_proj.", "k"),
    ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


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
            ssm_state_size=config.ssm_d_state,
            conv_kernel_size=config.d_conv,
            intermediate_size=config.d_inner,
            use_conv_bias=True,
            use_bias=False,
            n_groups=config.ssm_nheads,
            num_heads=config.ssm_nheads,
            head_dim=config.ssm_headdim,
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


class MambaInLlamaMambaDecoderLayer(nn.Module):
    """A Llama decoder layer whose attention is replaced by a Mamba-2 mixer (same norms, same MLP)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.mamba = MambaInLlamaMixer(
            config,
            model_config=vllm_config.model_config,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.mamba",
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
        hidden_states = self.mamba(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class MambaInLlamaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        attn_layers = set(config.attn_layers)

        def make_layer(prefix: str) -> nn.Module:
            if extract_layer_index(prefix) in attn_layers:
                return LlamaDecoderLayer(vllm_config=vllm_config, prefix=prefix)
            return MambaInLlamaMambaDecoderLayer(vllm_config=vllm_config, prefix=prefix)

        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers, make_layer, prefix=f"{prefix}.layers"
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


class MambaInLlamaForCausalLM(nn.Module, HasInnerState, IsHybrid):
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
        "in_proj": ["in_proj"],
        "conv1d": ["conv1d"],
    }

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
        config = vllm_config.model_config.hf_config
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
            intermediate_size=config.d_inner,
            n_groups=config.ssm_nheads,  # B expanded to one group per head at load
            num_heads=config.ssm_nheads,
            head_dim=config.ssm_headdim,
            state_size=config.ssm_d_state,
            conv_kernel=config.d_conv,
            num_spec=vllm_config.num_speculative_tokens,
        )

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        check_mambainllama_config(config)
        self.config = config
        self.vllm_config = vllm_config
        self.model = MambaInLlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
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
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            if ".mamba." in name:
                tensor = expand_mamba_tensor(name.split(".mamba.", 1)[1], tensor, self.config)
                name = name.replace(".A_log", ".A")  # vLLM's loader for A applies -exp()
            for ckpt_part, (param_part, shard_id) in STACKED_PARAMS.items():
                if ckpt_part in name:
                    param_name = name.replace(ckpt_part, param_part)
                    param = self._param(params, param_name, name)
                    param.weight_loader(param, tensor, shard_id)
                    loaded.add(param_name)
                    break
            else:
                param = self._param(params, name, name)
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"MambaInLlama checkpoint lacks tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        return loaded

    @staticmethod
    def _param(params: dict[str, nn.Parameter], param_name: str, ckpt_name: str) -> nn.Parameter:
        if param_name not in params:
            raise ValueError(
                f"MambaInLlama checkpoint tensor `{ckpt_name}` has no place in the model "
                "(does config.json's attn_layers match the weights?)"
            )
        return params[param_name]
