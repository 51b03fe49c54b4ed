"""What the vLLM ports of Llamba and MambaInLlama share: both are a Llama whose attention layers are (all or
partly) replaced by a Mamba-2 mixer built on vLLM's MambaMixer2, so the decoder layer around the mixer, the
layer stack, the LM head, the Mamba state-cache description vLLM asks the model class for, and the weight
loading loop are the same. The architecture files (`llamba.py`, `mambainllama.py`) keep the mixers, the
checkpoint-to-vLLM tensor mapping and the config checks.
"""
# No `from __future__ import annotations`: @support_torch_compile reads forward()'s annotations, and the
# Model classes it decorates in the architecture files inherit forward() from here.

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_mixer2 import MambaMixer2
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
    MambaStateDtypeCalculator,
    MambaStateShapeCalculator,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState
from vllm.model_executor.models.llama import LlamaMLP
from vllm.model_executor.models.utils import make_layers, maybe_prefix
from vllm.sequence import IntermediateTensors

# checkpoint name part -> (vLLM fused parameter part, shard id): vLLM fuses gate/up of the Llama MLP
MLP_STACKED_PARAMS = {
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class Mamba2Dims(NamedTuple):
    """MambaMixer2's sizes as one architecture lays them out. The mixers are built from them and vLLM sizes
    the state cache from them (before any model exists), so one source keeps the two from disagreeing."""

    intermediate_size: int
    n_groups: int
    num_heads: int
    head_dim: int
    state_size: int
    conv_kernel: int

    def mixer_kwargs(self) -> dict[str, int]:
        """The same sizes under MambaMixer2.__init__'s argument names (the fields use the state-shape names)."""
        kwargs = self._asdict()
        kwargs["ssm_state_size"] = kwargs.pop("state_size")
        kwargs["conv_kernel_size"] = kwargs.pop("conv_kernel")
        return kwargs


class Mamba2DecoderLayer(nn.Module):
    """RMSNorm -> Mamba-2 mixer -> residual -> RMSNorm -> Llama MLP -> residual (a Llama layer, attention swapped).

    Subclasses name the mixer class and the mixer's module name, which must be the checkpoint's
    (`model.layers.N.<mixer_name>.in_proj.weight`) so weights load by name.
    """

    mixer_cls: type[MambaMixer2]
    mixer_name: str

    def __init__(self, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        mixer = self.mixer_cls(
            config,
            model_config=vllm_config.model_config,
            cache_config=vllm_config.cache_config,
            quant_config=vllm_config.quant_config,
            prefix=f"{prefix}.{self.mixer_name}",  # MambaMixer2 finds its state cache by this name
        )
        self.add_module(self.mixer_name, mixer)
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
        hidden_states = getattr(self, self.mixer_name)(hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class Mamba2LlamaModel(nn.Module):
    """Embedding -> decoder layers (`make_layer` picks each one's kind) -> final RMSNorm.

    Not decorated here: each architecture file decorates its own subclass with @support_torch_compile,
    which keeps one compiled graph (and compile-cache entry) per architecture under its own class name.
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: self.make_layer(vllm_config, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def make_layer(self, vllm_config: VllmConfig, prefix: str) -> nn.Module:
        raise NotImplementedError

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


class Mamba2LlamaForCausalLM(nn.Module, HasInnerState):
    """Model + LM head + weight loading; vLLM's Mamba state-cache class methods.

    An architecture sets `model_cls`, `arch_name` (for error messages), `stacked_params` and
    `missing_param_hint`, and defines `check_config`, `mamba2_dims` and `remap_checkpoint_tensor`.
    """

    model_cls: type[Mamba2LlamaModel]
    arch_name: str
    stacked_params: dict[str, tuple[str, str | int]] = MLP_STACKED_PARAMS
    missing_param_hint = ""  # appended to "checkpoint tensor ... has no place in the model"

    @staticmethod
    def check_config(config) -> None:
        """Raise a clear ValueError for a config this port cannot run."""
        raise NotImplementedError

    @staticmethod
    def mamba2_dims(config) -> Mamba2Dims:
        raise NotImplementedError

    def remap_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Checkpoint (name, tensor) -> vLLM's (name, tensor) before MLP/QKV fusion; None: skip the tensor."""
        return name, tensor

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
        return MambaStateShapeCalculator.mamba2_state_shape(
            tp_world_size=vllm_config.parallel_config.tensor_parallel_size,
            num_spec=vllm_config.num_speculative_tokens,
            **cls.mamba2_dims(vllm_config.model_config.hf_config)._asdict(),
        )

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        return MambaStateCopyFuncCalculator.mamba2_state_copy_func()

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.check_config(config)
        self.config = config
        self.vllm_config = vllm_config
        self.model = self.model_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
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
        """Load every checkpoint tensor into its place; fail on a tensor with no place or a parameter left empty."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for ckpt_name, tensor in weights:
            if ckpt_name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # the head is the embedding
            remapped = self.remap_checkpoint_tensor(ckpt_name, tensor)
            if remapped is None:
                continue
            name, tensor = remapped
            name = name.replace(".A_log", ".A")  # vLLM's loader for A applies -exp()
            param_name, shard_id = name, None
            for ckpt_part, (param_part, shard) in self.stacked_params.items():
                if ckpt_part in name:
                    param_name, shard_id = name.replace(ckpt_part, param_part), shard
                    break
            if param_name not in params:
                raise ValueError(
                    f"{self.arch_name} checkpoint tensor `{name}` has no place in the model{self.missing_param_hint}"
                )
            param = params[param_name]
            if shard_id is None:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            else:
                param.weight_loader(param, tensor, shard_id)
            loaded.add(param_name)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(
                f"{self.arch_name} checkpoint lacks tensors: {missing[:8]}{' ...' if len(missing) > 8 else ''}"
            )
        return loaded
