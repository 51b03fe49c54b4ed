"""Runtime shared by both students (and the Llama teacher run as an all-attention MambaInLlama).

A model is the Llama trunk (`model.embed_tokens`, `model.layers.{i}`, `model.norm`, `lm_head`) whose layers hold
one token mixer each: Llama attention (`self_attn`), MambaInLlama's Mamba-2 (`mamba`) or Llamba's discrete
Mamba-2 (`mixer`). Three ways to run it, all sharing the layer code:

* the HF forward (`model(input_ids, seq_idx=..., position_ids=...)`), with an `HybridCache` for `generate()`;
* `prefill(list_of_prompts, state, slots)`: prompts packed into one row with `seq_idx`, final states into slots;
* `decode_step(input_ids, state)`: one token per slot, static shapes, no host sync (CUDA-graph capturable).

Mixers implement `forward(hidden, ctx)` for whole sequences and `step(hidden, layer_state, ctx)` for one token,
reading what they need from the `ForwardContext`.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding,
                                                      apply_rotary_pos_emb, repeat_kv)

from . import decode_kernels as dk
from . import ssd

STATE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def state_dtype(name: str) -> torch.dtype:
    if name not in STATE_DTYPES:
        raise ValueError(f"ssm_state_dtype must be one of {sorted(STATE_DTYPES)}, got {name!r}")
    return STATE_DTYPES[name]


def fused_linear_weight(owner: nn.Module, name: str, linears: list[nn.Linear], pad_to: int = 1):
    """(weight, bias) of `linears` stacked along the output dim (zero rows appended up to a multiple of `pad_to`),
    cached on `owner` and rebuilt when a source tensor changes (data_ptr or version): one GEMM instead of several
    in the decode step. Padding matters: an output width like Llamba's 2313 or MambaInLlama's 1545 (odd) sends
    cuBLAS to an align-1 kernel ~10x slower than the aligned one (H100 profile, batch 1024)."""
    params = [t for lin in linears for t in (lin.weight, lin.bias) if t is not None]
    key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in params) + (pad_to,)
    cache = owner.__dict__.setdefault("_fused_linear_cache", {})
    hit = cache.get(name)
    if hit is None or hit[0] != key:
        with torch.no_grad():
            rows = sum(lin.out_features for lin in linears)
            pad = -rows % pad_to
            weight = torch.cat([lin.weight for lin in linears] + [linears[0].weight.new_zeros(pad, linears[0].in_features)])
            bias = None
            if any(lin.bias is not None for lin in linears):
                bias = torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                                  for lin in linears] + [linears[0].weight.new_zeros(pad)])
        hit = cache[name] = (key, weight, bias)
    return hit[1], hit[2]


def aligned_linear(x: torch.Tensor, linear: nn.Linear, multiple: int = 64) -> torch.Tensor:
    """linear(x), with the weight's output rows zero-padded to a multiple of `multiple` inside the GEMM and the
    padding sliced off the result (a view). The mixers' in_proj widths (Llamba 2313, MambaInLlama 1545) send cuBLAS
    to align-1 (sm75 cutlass) kernels in the forward and both backward GEMMs: ~18% of a Llamba training step on an
    H100 (scripts/bench_distill.py --profile). Values and gradients are linear(x)'s: the padded rows are constants."""
    pad = -linear.out_features % multiple
    if pad == 0:
        return linear(x)
    weight = F.pad(linear.weight, (0, 0, 0, pad))
    bias = None if linear.bias is None else F.pad(linear.bias, (0, pad))
    return F.linear(x, weight, bias)[..., :linear.out_features]


# --------------------------------------------------------------------------------------------------
# states


class DecodeState:
    """Static, preallocated decoding state (gpt-fast style).

    `layers[i]` is `{"conv_state": [B, conv_dim, d_conv], "ssm_state": [B, nheads, headdim, d_state]}` for a
    Mamba layer or `{"k_cache": [B, n_kv_heads, max_seqlen, head_dim], "v_cache": ...}` for an attention layer;
    `seqlens [B] int32` counts the tokens each slot holds. The conv state is a ring: a slot's input t sits at tap
    t % d_conv (`decode_kernels.conv_step`).
    """

    def __init__(self, layers: list[dict[str, torch.Tensor]], seqlens: torch.Tensor, max_seqlen: int):
        self.layers = layers
        self.seqlens = seqlens
        self.max_seqlen = max_seqlen

    @property
    def batch_size(self) -> int:
        return self.seqlens.shape[0]

    def tensors(self):
        for layer in self.layers:
            yield from layer.values()
        yield self.seqlens

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Fork: every layer's state and seqlens of slots `src` are copied to slots `dst` (same length)."""
        src = torch.as_tensor(src, device=self.seqlens.device).long()
        dst = torch.as_tensor(dst, device=self.seqlens.device).long()
        if src.shape != dst.shape:
            raise ValueError(f"copy_slots: src and dst differ in shape ({tuple(src.shape)} vs {tuple(dst.shape)})")
        for tensor in self.tensors():
            tensor.index_copy_(0, dst, tensor.index_select(0, src))

    def reset_slots(self, slots: torch.Tensor) -> None:
        slots = torch.as_tensor(slots, device=self.seqlens.device).long()
        for tensor in self.tensors():
            tensor.index_fill_(0, slots, 0)


class HybridCache:
    """The cache `generate()` carries between forwards: growing K/V for attention layers, conv + SSM state for
    Mamba layers. Not a transformers `Cache` subclass: the model builds it itself (see `_supports_default_dynamic_cache`)."""

    is_compileable = False

    def __init__(self, num_layers: int):
        self.layers: list[dict[str, torch.Tensor]] = [dict() for _ in range(num_layers)]
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            for name, tensor in layer.items():
                layer[name] = tensor.index_select(0, beam_idx.to(tensor.device))

    def __len__(self) -> int:
        return len(self.layers)


def _runs(lengths: list[int]) -> list[tuple[int, int]]:
    """Consecutive equal lengths as (length, count): [5, 5, 3, 5] -> [(5, 2), (3, 1), (5, 1)]."""
    runs: list[tuple[int, int]] = []
    for length in lengths:
        if runs and runs[-1][0] == length:
            runs[-1] = (length, runs[-1][1] + 1)
        else:
            runs.append((length, 1))
    return runs


@dataclass
class ForwardContext:
    """What one forward pass tells its layers. mode: "full" (HF forward / training), "prefill", "decode"."""

    mode: str
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    attn_mask: torch.Tensor | None = None          # bool [B, 1, L, S] (True = attend) or None for plain causal
    seq_idx: torch.Tensor | None = None            # [B, L] int32
    pad_mask: torch.Tensor | None = None           # [B, L] bool, False at padding (HF left padding)
    cache: HybridCache | None = None
    decode_state: DecodeState | None = None
    doc_lens: list[int] | None = None              # prefill: prompt lengths packed in the single row
    cu_seqlens: torch.Tensor | None = None         # prefill: [n_docs + 1]; training varlen: over the B * L tokens
    train_attn: str | None = None                  # "varlen" | "flex": packed-document attention (see TRAIN_ATTN)
    max_doc_len: int | None = None                 # training varlen: upper bound of a document's length
    block_mask: object = None                      # training flex: the document-causal BlockMask
    output_attentions: bool = False
    attentions: list = field(default_factory=list)
    prefill_states: dict = field(default_factory=dict)   # prefill: layer_idx -> per-document states


# --------------------------------------------------------------------------------------------------
# attention

_VARLEN = {"checked": False, "fn": None, "kwargs": None, "gqa": False, "scale": False}


def _varlen_attn():
    """torch.nn.attention.varlen.varlen_attn (flash attention over packed documents, torch >= 2.10) and the
    keyword arguments this torch version takes for causal masking / GQA (the signature changed between
    2.10, 2.11 and 2.12); None when absent."""
    if not _VARLEN["checked"]:
        _VARLEN["checked"] = True
        try:
            import inspect

            from torch.nn.attention.varlen import varlen_attn
            params = inspect.signature(varlen_attn).parameters
            if "is_causal" in params:
                kwargs = {"is_causal": True}
            elif "window_size" in params:
                kwargs = {"window_size": (-1, 0)}
            else:
                raise TypeError("varlen_attn takes neither is_causal nor window_size")
            _VARLEN.update(fn=varlen_attn, kwargs=kwargs, gqa="enable_gqa" in params, scale="scale" in params)
        except (ImportError, TypeError, ValueError) as err:
            import warnings

            warnings.warn(f"varlen attention: no usable torch varlen_attn ({err}); using the SDPA paths instead")
    return _VARLEN["fn"]


def _varlen_call(q, k, v, cu_seqlens, max_seqlen: int, scale: float):
    """Block-diagonal causal flash attention: q [T, hq, d], k/v [T, hkv, d] (T packed tokens, documents given by
    `cu_seqlens` [n_docs + 1] int32) -> [T, hq, d]. `max_seqlen` may be an upper bound (extra tiles exit at once).
    Returns None when this torch cannot express the call (a non-default scale on a version without `scale`)."""
    kwargs = dict(_VARLEN["kwargs"])
    n_q, n_kv = q.shape[1], k.shape[1]
    if n_q != n_kv:
        if _VARLEN["gqa"]:
            kwargs["enable_gqa"] = True
        else:
            k, v = (t.repeat_interleave(n_q // n_kv, dim=1) for t in (k, v))
    if _VARLEN["scale"]:
        kwargs["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        return None
    return _VARLEN["fn"](q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, cu_seqlens, max_seqlen,
                         max_seqlen, **kwargs)


def varlen_causal_attention(q, k, v, ctx: ForwardContext, scale: float):
    """Block-diagonal causal attention over the packed prompts of a prefill in one flash kernel call.
    q [1, hq, T, d], k/v [1, hkv, T, d] -> [1, hq, T, d]; None where unsupported (CPU, fp32, old torch, a
    failing call), and the caller falls back to `LlamaAttention._prefill_attention_ref`."""
    if (not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or len(ctx.doc_lens) == 1
            or os.environ.get("THINKFAST_PREFILL_ATTN", "varlen") != "varlen" or _varlen_attn() is None):
        return None
    qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))              # [T, heads, d]
    cu = ctx.cu_seqlens.to(torch.int32)
    longest = max(ctx.doc_lens)
    try:
        out = _varlen_call(qt, kt, vt, cu, longest, scale)
    except (RuntimeError, TypeError, ValueError) as err:
        import warnings

        warnings.warn(f"prefill attention: varlen_attn failed ({str(err)[:200]}); looping over prompts from now on")
        _VARLEN["fn"] = None
        return None
    return None if out is None else out.transpose(0, 1).unsqueeze(0)


# --------------------------------------------------------------------------------------------------
# training attention over packed documents (HF forward with seq_idx)
#
#   THINKFAST_TRAIN_ATTN=sdpa    (default) SDPA with a dense block-diagonal causal mask [B, 1, L, L]: the reference,
#                                and the CPU path. The mask rules out flash, so SDPA does the full L^2 work.
#   THINKFAST_TRAIN_ATTN=varlen  one torch varlen_attn (flash) call over all documents of all rows, with autograd;
#                                CUDA and fp16/bf16 (under autocast: the autocast dtype) only, else sdpa.
#   THINKFAST_TRAIN_ATTN=flex    FlexAttention with a document-causal block mask (compiled; eager on CPU).
# The environment's default is sdpa, the reference; the distillation recipes set flex through their `student_attn`
# stage key (checked by scripts/gpu_check_kernels.py --only train-attn and by full distillations on the GPU).
# `TRAIN_ATTN` overrides the environment in-process.

TRAIN_ATTN: str | None = None
TRAIN_ATTN_MODES = ("sdpa", "varlen", "flex")
_TRAIN_ATTN_OK: dict = {}          # (mode, device) -> usable (probed once)


def train_attn_mode() -> str:
    mode = (TRAIN_ATTN if TRAIN_ATTN is not None else os.environ.get("THINKFAST_TRAIN_ATTN", "sdpa")).strip().lower()
    if mode not in TRAIN_ATTN_MODES:
        raise ValueError(f"THINKFAST_TRAIN_ATTN must be one of {', '.join(TRAIN_ATTN_MODES)}, got {mode!r}")
    return mode


def packed_cu_seqlens(seq_idx: torch.Tensor) -> torch.Tensor:
    """Document boundaries of packed rows seq_idx [B, L] in the flattened [B * L] token order -> [n_docs + 1] int32
    (a row start always starts a document). One host sync (nonzero)."""
    batch, seqlen = seq_idx.shape
    starts = torch.ones(batch, seqlen, dtype=torch.bool, device=seq_idx.device)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    first = torch.nonzero(starts.flatten()).flatten()
    return torch.cat([first, first.new_full((1,), batch * seqlen)]).to(torch.int32)


def doc_causal_mask(seq_idx: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, L, L]: query i sees key j <= i of its own document."""
    seqlen = seq_idx.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=seq_idx.device).tril()
    return (causal & (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(1))).unsqueeze(1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype SDPA would run in: the autocast dtype when autocast is on for t's device, else t's dtype."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _flex_api():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    return flex_attention, create_block_mask


_FLEX_COMPILED = {}


def _flex_attention(q, k, v, block_mask, scale, enable_gqa):
    flex_attention, _ = _flex_api()
    if q.is_cuda and not torch.compiler.is_compiling():
        # eager flex_attention materialises the scores; compiled it is a fused kernel (inside a compiled region
        # dynamo compiles it with the region, so use the plain function there)
        if "fn" not in _FLEX_COMPILED:
            _FLEX_COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)
        flex_attention = _FLEX_COMPILED["fn"]
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def doc_block_mask(seq_idx: torch.Tensor):
    """FlexAttention block mask of `doc_causal_mask` (fully masked tiles skipped)."""
    _, create_block_mask = _flex_api()
    batch, seqlen = seq_idx.shape
    docs = seq_idx.to(torch.int32)

    def document_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (docs[b, q_idx] == docs[b, kv_idx])

    return create_block_mask(document_causal, batch, None, seqlen, seqlen, device=seq_idx.device)


def _probe_train_attn(mode: str, device: torch.device) -> bool:
    """Run the packed path once on a tiny GQA problem (forward + backward) against the dense-mask reference: an
    old torch (varlen_attn's backward broke in some versions) or a missing kernel falls back with a warning
    instead of failing mid-training."""
    key = (mode, str(device))
    if key in _TRAIN_ATTN_OK:
        return _TRAIN_ATTN_OK[key]
    if torch.compiler.is_compiling():
        return False           # probing needs eager autograd; a whole-model compile keeps the reference path
    ok, why = False, ""
    try:
        if mode == "varlen" and (device.type != "cuda" or _varlen_attn() is None):
            raise RuntimeError("varlen_attn needs CUDA and torch >= 2.10")
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
            ok, why = _probe_once(mode, device)
    except Exception as err:  # noqa: BLE001 - any failure means: use the reference path
        why = f"{type(err).__name__}: {str(err)[:300]}"
    if not ok:
        import warnings

        warnings.warn(f"training attention: THINKFAST_TRAIN_ATTN={mode} unusable on {device} ({why}); "
                      "using SDPA with a dense document mask")
    _TRAIN_ATTN_OK[key] = ok
    return ok


def _probe_once(mode: str, device: torch.device) -> tuple[bool, str]:
    gen = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1], [0, 1, 1, 1, 2, 2, 2, 2]], dtype=torch.int32, device=device)
    leaves = [(torch.randn(2, n, 8, 64, generator=gen) / 2).to(device, dtype).requires_grad_()
              for n in (6, 2, 2)]
    scale = 64 ** -0.5
    if mode == "varlen":
        flat = [t.transpose(1, 2).reshape(16, t.shape[1], 64) for t in leaves]
        out = _varlen_call(*flat, packed_cu_seqlens(seq_idx), 8, scale)
        if out is None:
            raise RuntimeError("this varlen_attn cannot take the attention scale")
        out = out.view(2, 8, 6, 64).transpose(1, 2)
    else:
        out = _flex_attention(*leaves, doc_block_mask(seq_idx), scale, True)
    grads = torch.autograd.grad(out.float().square().sum(), leaves)
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    ref = F.scaled_dot_product_attention(ref_leaves[0], *(t.repeat_interleave(3, dim=1) for t in ref_leaves[1:]),
                                         attn_mask=doc_causal_mask(seq_idx), scale=scale)
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_leaves)
    errors = [float((a.detach().float() - b.detach()).norm() / b.detach().norm())
              for a, b in zip((out, *grads), (ref, *ref_grads))]
    ok = max(errors) < 5e-2
    return ok, "" if ok else f"mismatch against the dense-mask reference (relative errors {errors})"


def plan_packed_attention(ctx: ForwardContext, seq_idx: torch.Tensor) -> bool:
    """Set up ctx for varlen/flex attention over the packed documents of seq_idx (True), or leave it to the
    dense-mask SDPA reference (False: THINKFAST_TRAIN_ATTN=sdpa, CPU for varlen, or a failed probe)."""
    mode = train_attn_mode()
    if mode == "sdpa" or not _probe_train_attn(mode, seq_idx.device):
        return False
    ctx.train_attn = mode
    if mode == "varlen":
        ctx.cu_seqlens = packed_cu_seqlens(seq_idx)
        ctx.max_doc_len = seq_idx.shape[1]      # an upper bound: static (no recompiles, no extra host sync)
    else:
        ctx.block_mask = doc_block_mask(seq_idx)
    return True


class LlamaAttention(nn.Module):
    """Llama attention (GQA, RoPE from the shared rotary embedding) with the teacher's parameter names."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim ** -0.5
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    def _qkv(self, hidden, cos, sin):
        batch, seqlen, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def _attend(self, q, k, v, mask, is_causal):
        groups = self.num_heads // self.num_kv_heads
        return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups), attn_mask=mask,
                                              is_causal=is_causal, scale=self.scaling)

    def forward(self, hidden, ctx: ForwardContext):
        batch, seqlen, _ = hidden.shape
        q, k, v = self._qkv(hidden, ctx.cos, ctx.sin)
        if ctx.mode == "prefill":
            out = varlen_causal_attention(q, k, v, ctx, self.scaling)
            if out is None:
                out = self._prefill_attention_ref(q, k, v, ctx)
            ctx.prefill_states[self.layer_idx] = (k, v)
        else:
            if ctx.cache is not None:
                layer = ctx.cache.layers[self.layer_idx]
                if "k" in layer:
                    k = torch.cat([layer["k"], k], dim=2)
                    v = torch.cat([layer["v"], v], dim=2)
                layer["k"], layer["v"] = k, v
            is_causal = ctx.attn_mask is None and seqlen > 1
            if ctx.train_attn is not None:
                out = self._packed_attention(q, k, v, ctx)
            elif ctx.output_attentions:
                groups = self.num_heads // self.num_kv_heads
                scores = torch.matmul(q, repeat_kv(k, groups).transpose(2, 3)) * self.scaling
                if ctx.attn_mask is not None:
                    allowed = ctx.attn_mask
                else:
                    allowed = torch.ones(seqlen, k.shape[2], dtype=torch.bool, device=q.device).tril(k.shape[2] - seqlen)
                probs = torch.softmax(scores.float().masked_fill(~allowed, -float("inf")), dim=-1).to(q.dtype)
                ctx.attentions.append(probs)
                out = torch.matmul(probs, repeat_kv(v, groups))
            else:
                out = self._attend(q, k, v, ctx.attn_mask, is_causal)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))

    def _packed_attention(self, q, k, v, ctx: ForwardContext):
        """Training attention over packed documents (ctx.train_attn): q [B, hq, L, d], k/v [B, hkv, L, d] ->
        [B, hq, L, d], in the dtype SDPA would use (autocast's). Falls back to the dense-mask SDPA reference where
        the flash kernel cannot run (fp32)."""
        batch, _, seqlen, head_dim = q.shape
        dtype = _compute_dtype(q)
        q, k, v = (t.to(dtype) for t in (q, k, v))
        if ctx.train_attn == "flex":
            return _flex_attention(q, k, v, ctx.block_mask, self.scaling, self.num_heads != self.num_kv_heads)
        if dtype in (torch.float16, torch.bfloat16):
            qt, kt, vt = (t.transpose(1, 2).reshape(batch * seqlen, t.shape[1], head_dim) for t in (q, k, v))
            out = _varlen_call(qt, kt, vt, ctx.cu_seqlens, ctx.max_doc_len, self.scaling)
            if out is not None:
                return out.view(batch, seqlen, self.num_heads, head_dim).transpose(1, 2)
        return self._attend(q, k, v, doc_causal_mask(ctx.seq_idx), False)

    def _prefill_attention_ref(self, q, k, v, ctx: ForwardContext):
        """Packed prompts, one SDPA per run of equal-length prompts (a dense block-diagonal mask over all packed
        tokens would not fit). The CPU path, and the fallback when the varlen kernel is unavailable."""
        outs, start = [], 0
        for length, count in _runs(ctx.doc_lens):
            sl = slice(start, start + length * count)
            qs, ks, vs = (t[0, :, sl].unflatten(1, (count, length)).transpose(0, 1) for t in (q, k, v))
            outs.append(self._attend(qs, ks, vs, None, True).transpose(0, 1).flatten(1, 2).unsqueeze(0))
            start += length * count
        return torch.cat(outs, dim=2)

    def step(self, hidden, layer_state, ctx: ForwardContext):
        """hidden [B, 1, D]; K/V written at each slot's position `seqlens`; keys beyond it are masked."""
        batch = hidden.shape[0]
        q, k, v = self._qkv(hidden, ctx.cos, ctx.sin)
        k_cache, v_cache = layer_state["k_cache"], layer_state["v_cache"]
        rows = torch.arange(batch, device=hidden.device)
        positions = ctx.decode_state.seqlens.long()
        k_cache[rows, :, positions] = k[:, :, 0].to(k_cache.dtype)
        v_cache[rows, :, positions] = v[:, :, 0].to(v_cache.dtype)
        out = F.scaled_dot_product_attention(q, k_cache.to(q.dtype), v_cache.to(q.dtype), attn_mask=ctx.attn_mask,
                                             scale=self.scaling, enable_gqa=self.num_heads != self.num_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))

    def step_fast(self, hidden, layer_state, ctx: ForwardContext):
        """hidden [B, D] -> [B, D]: one fused QKV GEMM, RoPE + cache write in one kernel, then flash-decoding
        attention over each slot's valid keys only (the query heads of a KV head share its K/V reads)."""
        batch = hidden.shape[0]
        weight, bias = fused_linear_weight(self, "qkv", [self.q_proj, self.k_proj, self.v_proj])
        qkv = F.linear(hidden, weight, bias)
        k_cache, v_cache = layer_state["k_cache"], layer_state["v_cache"]
        q = dk.rope_kv_write(qkv, self.num_heads, self.num_kv_heads, ctx.cos, ctx.sin, k_cache, v_cache,
                             ctx.decode_state.seqlens)
        if ctx.attn_mask is not None:        # THINKFAST_DECODE_ATTN=sdpa: the masked full-cache SDPA (A/B runs)
            groups = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(q.view(batch, self.num_kv_heads, groups, self.head_dim), k_cache,
                                                 v_cache, attn_mask=ctx.attn_mask, scale=self.scaling)
        else:
            out = dk.attention_decode(q, k_cache, v_cache, ctx.decode_state.seqlens, self.scaling)
        return self.o_proj(out.reshape(batch, -1))

    def allocate_state(self, batch_size, max_seqlen, device, dtype):
        shape = (batch_size, self.num_kv_heads, max_seqlen, self.head_dim)
        return {"k_cache": torch.zeros(shape, device=device, dtype=dtype),
                "v_cache": torch.zeros(shape, device=device, dtype=dtype)}


# --------------------------------------------------------------------------------------------------
# shared SSM-mixer plumbing


class SSMMixerBase(nn.Module):
    """Conv/scan/state plumbing common to both Mamba mixers. Subclasses define `conv1d`, `d_conv`, `conv_dim`,
    `nheads`, `headdim`, `d_state`, `ssm_state_dtype`, and `mix(hidden, ctx)` / `step(...)` with this help."""

    conv_activation: str | None = "silu"

    def _conv_full(self, xBC, ctx: ForwardContext):
        """Causal conv over a whole sequence; records the conv state the mode needs. Returns (conv_out, conv_state)."""
        weight = self.conv1d.weight.squeeze(1)
        initial, layer = None, None
        if ctx.cache is not None:
            layer = ctx.cache.layers[self.layer_idx]
            initial = layer.get("conv_state")
        if ctx.mode == "prefill":      # one packed row, no cache, no padding: conv and per-prompt states together
            return ssd.causal_conv1d_with_states(xBC, weight, self.conv1d.bias, seq_idx=ctx.seq_idx,
                                                 cu_seqlens=ctx.cu_seqlens, activation=self.conv_activation)
        if ctx.pad_mask is not None:
            xBC = xBC * ctx.pad_mask.unsqueeze(-1).to(xBC.dtype)
        out = ssd.causal_conv1d(xBC, weight, self.conv1d.bias, seq_idx=ctx.seq_idx, initial_state=initial,
                                activation=self.conv_activation)
        if ctx.pad_mask is not None:
            # Left padding must not feed the SSM: zero x/B/C at padded positions (the conv bias makes them nonzero).
            out = out * ctx.pad_mask.unsqueeze(-1).to(out.dtype)
        conv_state = None
        if layer is not None:
            history = xBC if initial is None else torch.cat([initial.transpose(1, 2).to(xBC.dtype), xBC], dim=1)
            conv_state = ssd.conv_state_from_inputs(history, self.d_conv)
        return out, conv_state

    def _scan_full(self, x, dt, A, B, C, ctx: ForwardContext, **kw):
        """SSD scan over a whole sequence; returns (y, ssm_state to keep or None)."""
        device_type = x.device.type
        if not torch.is_autocast_enabled(device_type):
            return self._scan_full_in(x, dt, A, B, C, ctx, **kw)
        # Mixed-precision training: A's gradient sums dA over every token with heavy cancellation, and with bf16
        # x/B/C (and autocast's bf16 einsums in the reference) both paths sat 3-4e-2 from fp32 on a Llamba layer
        # (GPU check). So the scan takes fp32 inputs here: tf32 dots in the Triton kernel, true fp32 in the reference.
        with torch.autocast(device_type, enabled=False):
            y, state = self._scan_full_in(x.float(), dt.float(), A, B.float(), C.float(), ctx, **kw)
        return y.to(x.dtype), state

    def _scan_full_in(self, x, dt, A, B, C, ctx: ForwardContext, **kw):
        layer = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        if ctx.mode == "prefill":
            y, _, states = ssd.ssd_scan(x, dt, A, B, C, seq_idx=ctx.seq_idx, cu_seqlens=ctx.cu_seqlens,
                                        return_final_states=True, return_varlen_states=True,
                                        chunk_size=self.chunk_size, **kw)
            return y, states
        if layer is not None:
            initial = layer.get("ssm_state")
            y, final = ssd.ssd_scan(x, dt, A, B, C, seq_idx=ctx.seq_idx, initial_states=initial,
                                    return_final_states=True, chunk_size=self.chunk_size, **kw)
            return y, final
        # THINKFAST_TRAIN_SCAN is read inside ssd_scan_train, which compile_mode=layers keeps out of dynamo: a
        # branch on it here would be traced once and baked into the compiled layer
        return ssd.ssd_scan_train(self, x, dt, A, B, C, seq_idx=ctx.seq_idx, chunk_size=self.chunk_size, **kw), None

    def _store_states(self, ctx: ForwardContext, conv_state, ssm_state):
        if ctx.mode == "prefill":
            ctx.prefill_states[self.layer_idx] = (conv_state, ssm_state)
        elif ctx.cache is not None:
            layer = ctx.cache.layers[self.layer_idx]
            layer["conv_state"] = conv_state
            layer["ssm_state"] = ssm_state.to(state_dtype(self.ssm_state_dtype))

    def forward(self, hidden, ctx: ForwardContext):
        layer = ctx.cache.layers[self.layer_idx] if ctx.cache is not None else None
        if layer is not None and "ssm_state" in layer and hidden.shape[1] == 1 and ctx.pad_mask is None:
            return self.step(hidden[:, 0], layer, ctx).unsqueeze(1)
        return self.mix(hidden, ctx)

    def _conv_step(self, xBC, layer_state, ctx: ForwardContext | None = None):
        # the decode engine's conv state is a ring (positions = its seqlens); HF generate's cache is linear
        positions = ctx.decode_state.seqlens if ctx is not None and ctx.decode_state is not None else None
        return dk.conv_step_ref(layer_state["conv_state"], xBC, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                self.conv_activation in ("silu", "swish"), positions)

    def allocate_state(self, batch_size, max_seqlen, device, dtype):
        # [B, conv_dim, d_conv] in ring order (`decode_kernels.conv_step`), stored tap-major: the step reads and
        # writes whole taps, which are contiguous channels
        conv_state = torch.zeros(batch_size, self.d_conv, self.conv_dim, device=device, dtype=dtype).transpose(1, 2)
        return {"conv_state": conv_state,
                "ssm_state": torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                         dtype=state_dtype(self.ssm_state_dtype))}


# --------------------------------------------------------------------------------------------------
# layers and the causal LM


class DecoderLayer(GradientCheckpointingLayer):
    """RMSNorm -> token mixer -> residual -> RMSNorm -> Llama MLP -> residual."""

    def __init__(self, config, layer_idx: int, mixer_name: str, mixer: nn.Module):
        super().__init__()
        self.layer_idx = layer_idx
        self.mixer_name = mixer_name
        self.is_attention = mixer_name == "self_attn"
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        setattr(self, mixer_name, mixer)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    @property
    def token_mixer(self) -> nn.Module:
        return getattr(self, self.mixer_name)

    def forward(self, hidden, ctx: ForwardContext = None, layer_state=None):
        normed = self.input_layernorm(hidden)
        if ctx.mode == "decode":
            mixed = self.token_mixer.step(normed if self.is_attention else normed[:, 0], layer_state, ctx)
            mixed = mixed if self.is_attention else mixed.unsqueeze(1)
        else:
            mixed = self.token_mixer(normed, ctx)
        hidden = hidden + mixed
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Backbone(nn.Module):
    def __init__(self, config, layers: list[DecoderLayer], use_rope: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, getattr(config, "pad_token_id", None))
        self.layers = nn.ModuleList(layers)
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config) if use_rope else None
        self.gradient_checkpointing = False


def positions_from_seq_idx(seq_idx: torch.Tensor) -> torch.Tensor:
    """Positions restarting at 0 at every document boundary of `seq_idx` [B, L]."""
    batch, seqlen = seq_idx.shape
    idx = torch.arange(seqlen, device=seq_idx.device).expand(batch, seqlen)
    is_start = torch.ones_like(seq_idx, dtype=torch.bool)
    is_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    starts = torch.cummax(torch.where(is_start, idx, torch.zeros_like(idx)), dim=1).values
    return idx - starts


class HybridForCausalLM(PreTrainedModel, GenerationMixin):
    """Base of `MambaInLlamaForCausalLM` and `LlambaForCausalLM`. Subclasses implement `_build_layer(config, i)`."""

    base_model_prefix = "model"
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _is_stateful = True
    supports_gradient_checkpointing = True

    def __init__(self, config):
        super().__init__(config)
        self.validate_config(config)
        layers = [self._build_layer(config, i) for i in range(config.num_hidden_layers)]
        use_rope = any(layer.is_attention for layer in layers)
        self.model = Backbone(config, layers, use_rope)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # subclasses -------------------------------------------------------------------------------
    def _build_layer(self, config, layer_idx: int) -> DecoderLayer:
        raise NotImplementedError

    @classmethod
    def validate_config(cls, config) -> None:
        pass

    # HF plumbing ------------------------------------------------------------------------------
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False          # our own HybridCache, created by forward() when use_cache=True

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    @property
    def mamba_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if not layer.is_attention]

    @property
    def attention_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.model.layers) if layer.is_attention]

    def _init_weights(self, module):
        super()._init_weights(module)
        if hasattr(module, "reset_ssm_parameters"):
            module.reset_ssm_parameters(init)

    def _layer_call(self, layer, hidden, ctx, layer_state=None):
        return layer(hidden, ctx=ctx, layer_state=layer_state)

    # HF forward -------------------------------------------------------------------------------
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_hidden_states=None, output_attentions=None,
                seq_idx=None, logits_to_keep=0, return_dict=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        hidden = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seqlen = hidden.shape[:2]
        device = hidden.device
        output_hidden_states = bool(output_hidden_states)
        cache = past_key_values
        if cache is not None and not isinstance(cache, HybridCache):
            raise TypeError(f"past_key_values must be a HybridCache (from this model), got {type(cache).__name__}")
        if cache is None and use_cache:
            cache = HybridCache(len(self.model.layers))
        past = cache.seen_tokens if cache is not None else 0
        if seq_idx is not None:
            if past:
                raise ValueError("seq_idx (packed documents) cannot be combined with a non-empty cache")
            if seq_idx.shape != (batch, seqlen):
                raise ValueError(f"seq_idx must have shape {(batch, seqlen)}, got {tuple(seq_idx.shape)}")
            seq_idx = seq_idx.to(device=device, dtype=torch.int32)

        full_mask = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be a 2-D padding mask [batch, past + seqlen]")
            full_mask = attention_mask.to(device=device, dtype=torch.bool)
            if full_mask.shape[1] != past + seqlen:
                raise ValueError(f"attention_mask covers {full_mask.shape[1]} tokens, expected {past + seqlen}")
            if bool(full_mask.all()):
                full_mask = None
        pad_mask = full_mask[:, -seqlen:] if full_mask is not None else None

        if position_ids is None:
            if seq_idx is not None:
                position_ids = positions_from_seq_idx(seq_idx)
            elif full_mask is not None:
                position_ids = (full_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seqlen:]
            else:
                position_ids = torch.arange(past, past + seqlen, device=device).expand(batch, seqlen)

        ctx = ForwardContext(mode="full", seq_idx=seq_idx, pad_mask=pad_mask, cache=cache,
                             output_attentions=bool(output_attentions))
        if self.model.rotary_emb is not None:
            ctx.cos, ctx.sin = self.model.rotary_emb(hidden, position_ids)
            packed = (seq_idx is not None and full_mask is None and cache is None and not ctx.output_attentions
                      and seqlen > 1 and plan_packed_attention(ctx, seq_idx))
            if not packed and (seq_idx is not None or full_mask is not None or (past and seqlen > 1)):
                q_pos = torch.arange(past, past + seqlen, device=device)
                k_pos = torch.arange(past + seqlen, device=device)
                allowed = (k_pos.view(1, -1) <= q_pos.view(-1, 1)).unsqueeze(0)       # [1, L, S]
                if seq_idx is not None:
                    allowed = allowed & (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(1))
                if full_mask is not None:
                    allowed = allowed & full_mask.unsqueeze(1)
                    allowed = allowed | (k_pos.view(1, -1) == q_pos.view(-1, 1))      # padded rows: no NaN
                ctx.attn_mask = allowed.unsqueeze(1).expand(batch, 1, seqlen, past + seqlen)

        all_hidden = [hidden] if output_hidden_states else None
        for layer in self.model.layers:
            hidden = layer(hidden, ctx=ctx)
            if output_hidden_states:
                all_hidden.append(hidden)
        hidden = self.model.norm(hidden)
        if output_hidden_states:
            all_hidden[-1] = hidden
        if cache is not None:
            cache.seen_tokens += seqlen

        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) and logits_to_keep else slice(None)
        logits = self.lm_head(hidden[:, keep])
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1].float().reshape(-1, logits.shape[-1])
            loss = F.cross_entropy(shift_logits, labels[:, 1:].reshape(-1).to(device), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=cache,
                                      hidden_states=tuple(all_hidden) if output_hidden_states else None,
                                      attentions=tuple(ctx.attentions) if output_attentions else None)

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None, is_first_iteration=False, **kwargs):
        kwargs.setdefault("use_cache", True)
        return super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, past_key_values=past_key_values,
            attention_mask=attention_mask, inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration,
            **kwargs)

    # gpt-fast decoding API --------------------------------------------------------------------
    def allocate_decode_state(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> DecodeState:
        device = torch.device(device) if device is not None else self.lm_head.weight.device
        dtype = dtype or self.lm_head.weight.dtype
        layers = [layer.token_mixer.allocate_state(batch_size, max_seqlen, device, dtype)
                  for layer in self.model.layers]
        seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        return DecodeState(layers, seqlens, max_seqlen)

    @torch.no_grad()
    def prefill(self, input_ids_list: list[torch.Tensor], state: DecodeState, slots: torch.Tensor) -> torch.Tensor:
        """Run prompts (packed into one row), store each prompt's final state in its slot; last-token logits."""
        if len(input_ids_list) == 0:
            raise ValueError("prefill needs at least one prompt")
        slots = torch.as_tensor(slots, device=state.seqlens.device).long()
        if slots.numel() != len(input_ids_list):
            raise ValueError(f"prefill: {len(input_ids_list)} prompts but {slots.numel()} slots")
        lengths = [int(p.numel()) for p in input_ids_list]
        if min(lengths) == 0:
            raise ValueError("prefill: empty prompt")
        if max(lengths) > state.max_seqlen and self.attention_layers:
            raise ValueError(f"prefill: prompt of {max(lengths)} tokens exceeds max_seqlen={state.max_seqlen}")
        device = self.lm_head.weight.device
        tokens = torch.cat([p.reshape(-1).to(device) for p in input_ids_list]).unsqueeze(0)
        lens = torch.tensor(lengths, device=device)
        cu_seqlens = F.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens).to(torch.int32)[None]
        position_ids = positions_from_seq_idx(seq_idx)
        hidden = self.model.embed_tokens(tokens)
        ctx = ForwardContext(mode="prefill", seq_idx=seq_idx, doc_lens=lengths, cu_seqlens=cu_seqlens)
        if self.model.rotary_emb is not None:
            ctx.cos, ctx.sin = self.model.rotary_emb(hidden, position_ids)
        if dk.fast_decode_enabled(hidden):
            hidden = self._prefill_layers_fast(hidden[0], ctx).unsqueeze(0)
        else:
            for layer in self.model.layers:
                hidden = layer(hidden, ctx=ctx)
        token_slots = torch.repeat_interleave(slots.to(device), lens)
        token_pos = position_ids[0].long()
        for idx, layer in enumerate(self.model.layers):
            target = state.layers[idx]
            if layer.is_attention:
                k, v = ctx.prefill_states[idx]
                # one scatter per layer: token t of the packed row goes to (its prompt's slot, its position)
                target["k_cache"][token_slots, :, token_pos] = k[0].transpose(0, 1).to(target["k_cache"].dtype)
                target["v_cache"][token_slots, :, token_pos] = v[0].transpose(0, 1).to(target["v_cache"].dtype)
            else:
                conv_state, ssm_state = ctx.prefill_states[idx]
                conv_state = dk.ring_from_linear(conv_state, lens)
                target["conv_state"].index_copy_(0, slots, conv_state.to(target["conv_state"].dtype))
                target["ssm_state"].index_copy_(0, slots, ssm_state.to(target["ssm_state"].dtype))
        state.seqlens.index_copy_(0, slots, lens.to(torch.int32).to(state.seqlens.device))
        last = hidden[0, (cu_seqlens[1:] - 1).long()]
        return self.lm_head(self.model.norm(last)).float()

    def _prefill_layers_fast(self, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The layer loop of `prefill` on packed rows [N, D] with the decode step's fused kernels (residual add +
        RMSNorm in one, gate/up in one GEMM, SiLU * up in one); returns the residual stream after the last layer.
        Eager RMSNorm and SiLU are ~10 elementwise passes over every prompt token per layer: most of a prefill's
        kernel time at 135M width (H100 profile, 256 prompts of 512 tokens)."""
        residual = None
        for layer in self.model.layers:
            mix = lambda normed: layer.token_mixer(normed[None], ctx)[0]  # noqa: E731 - [1, N, D] in prefill
            hidden, residual = _layer_fast(layer, hidden, residual, mix)
        return hidden + residual

    @torch.no_grad()
    def decode_step(self, input_ids: torch.Tensor, state: DecodeState, float_logits: bool = True) -> torch.Tensor:
        """One token for every slot at position `state.seqlens` (all slots advance); returns logits [B, vocab].
        Fused Triton kernels on CUDA (`decode_kernels`), the layer-by-layer PyTorch reference otherwise.
        float_logits=False returns lm_head's own dtype (bf16 on GPU): a sampler that reads bf16 saves the fp32
        copy of [B, vocab] (~40 us per step at batch 256)."""
        if dk.fast_decode_enabled(self.lm_head.weight):
            return self._decode_step_fast(input_ids, state, float_logits)
        return self.decode_step_ref(input_ids, state, float_logits)

    def _decode_context(self, hidden, state: DecodeState) -> ForwardContext:
        """RoPE cos/sin and the additive key mask [B, 1, 1, max_seqlen], computed once per step for all layers."""
        ctx = ForwardContext(mode="decode", decode_state=state)
        if self.model.rotary_emb is not None:
            positions = state.seqlens.long().view(-1, 1)
            ctx.cos, ctx.sin = self.model.rotary_emb(hidden.view(positions.shape[0], 1, -1), positions)
            key_pos = torch.arange(state.max_seqlen, device=hidden.device)
            allowed = key_pos.view(1, -1) <= state.seqlens.view(-1, 1)
            ctx.attn_mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill_(
                ~allowed, float("-inf")).view(-1, 1, 1, state.max_seqlen)
        return ctx

    @torch.no_grad()
    def decode_step_ref(self, input_ids: torch.Tensor, state: DecodeState, float_logits: bool = True) -> torch.Tensor:
        """`decode_step` through the layers' PyTorch `step` (CPU path and oracle)."""
        hidden = self.model.embed_tokens(input_ids.view(-1, 1))
        ctx = self._decode_context(hidden, state)
        for layer, layer_state in zip(self.model.layers, state.layers):
            hidden = layer(hidden, ctx=ctx, layer_state=layer_state)
        logits = self.lm_head(self.model.norm(hidden[:, 0]))
        state.seqlens.add_(1)
        return logits.float() if float_logits else logits

    def _rope_table(self, max_seqlen: int, device, dtype):
        """cos/sin [max_seqlen, head_dim] for positions 0..max_seqlen-1, computed once per (length, device,
        dtype) with the rotary module's own code (so the values equal the per-step ones bit for bit): a decode
        step then gathers one row per slot instead of recomputing them in ~8 small kernels. Tables are kept
        (a few MB at most): a captured CUDA graph reads them by address."""
        key = (max_seqlen, device, dtype)
        cache = self.__dict__.setdefault("_rope_tables", {})
        if key not in cache:
            positions = torch.arange(max_seqlen, device=device).view(1, -1)
            probe = torch.empty(1, max_seqlen, 1, device=device, dtype=dtype)
            cos, sin = self.model.rotary_emb(probe, positions)
            cache[key] = (cos[0].contiguous(), sin[0].contiguous())
        return cache[key]

    def _decode_step_fast(self, input_ids: torch.Tensor, state: DecodeState, float_logits: bool = True) -> torch.Tensor:
        hidden = self.model.embed_tokens(input_ids.view(-1))                       # [B, D]
        rotary = self.model.rotary_emb
        if rotary is not None and not dk.use_flash_decode():
            # THINKFAST_DECODE_ATTN=sdpa: the previous path (per-step RoPE and key mask, masked SDPA), for A/B runs
            ctx = self._decode_context(hidden, state)
            ctx.cos, ctx.sin = ctx.cos.view(hidden.shape[0], -1), ctx.sin.view(hidden.shape[0], -1)
        else:
            # no key mask: attention_decode reads each slot's valid length from state.seqlens
            ctx = ForwardContext(mode="decode", decode_state=state)
        if ctx.cos is None and rotary is not None and getattr(rotary, "rope_type", "default") in ("default", "linear", "llama3"):
            cos_table, sin_table = self._rope_table(state.max_seqlen, hidden.device, hidden.dtype)
            # clamp: an idle slot may sit at max_seqlen; its row is garbage the engine never reads
            positions = state.seqlens.long().clamp(max=state.max_seqlen - 1)
            ctx.cos, ctx.sin = cos_table[positions], sin_table[positions]
        elif ctx.cos is None and rotary is not None:   # dynamic RoPE types rescale with the length: per step
            ctx.cos, ctx.sin = rotary(hidden.unsqueeze(1), state.seqlens.long().view(-1, 1))
            ctx.cos, ctx.sin = ctx.cos.view(hidden.shape[0], -1), ctx.sin.view(hidden.shape[0], -1)
        residual = None
        fused_conv_ssm = dk.use_fused_conv_ssm()
        for layer, layer_state in zip(self.model.layers, state.layers):
            if layer.is_attention or not fused_conv_ssm:
                mix = functools.partial(layer.token_mixer.step_fast, layer_state=layer_state, ctx=ctx)
            else:
                mix = functools.partial(_ssm_mixer_step_fused, layer.token_mixer, layer_state=layer_state,
                                        positions=state.seqlens)
            hidden, residual = _layer_fast(layer, hidden, residual, mix)
        normed, _ = dk.add_rms_norm(hidden, residual, self.model.norm.weight, self.model.norm.variance_epsilon)
        logits = self.lm_head(normed)
        state.seqlens.add_(1)
        return logits.float() if float_logits else logits


def _layer_fast(layer, hidden, residual, mix):
    """One decoder layer on rows [N, D] with the residual stream carried separately: (add +) RMSNorm, `mix`
    (the token mixer on the normed rows), add + RMSNorm, MLP; returns (MLP output, residual stream)."""
    norm = layer.input_layernorm
    normed, residual = dk.add_rms_norm(hidden, residual, norm.weight, norm.variance_epsilon)
    norm = layer.post_attention_layernorm
    normed, residual = dk.add_rms_norm(mix(normed), residual, norm.weight, norm.variance_epsilon)
    return _mlp_fast(layer.mlp, normed), residual


def _mlp_fast(mlp, normed):
    """Llama MLP on rows [N, D]: gate and up in one GEMM, SiLU * up in one kernel."""
    weight, bias = fused_linear_weight(mlp, "gate_up", [mlp.gate_proj, mlp.up_proj])
    gate_up = F.linear(normed, weight, bias)
    if mlp.config.hidden_act in ("silu", "swish"):
        act = dk.silu_mul(*gate_up.chunk(2, dim=-1))
    else:
        gate, up = gate_up.chunk(2, dim=-1)
        act = mlp.act_fn(gate) * up
    return mlp.down_proj(act)


def _ssm_mixer_step_fused(mixer, hidden, layer_state, positions):
    """The mixers' `step_fast` with the conv and the SSM step in one kernel (`decode_kernels.conv_ssm_step`):
    in_proj GEMM, conv + SSM, (MambaInLlama: gated RMSNorm), out_proj GEMM. Both mixer types, told apart by
    Llamba's `z_bias`; their tensor layouts are DESIGN.md's. `THINKFAST_DECODE_CONV=separate` runs their own
    `step_fast` instead (A/B runs); this belongs in the mixers once the A/B is settled."""
    batch = hidden.shape[0]
    weight, bias = fused_linear_weight(mixer, "in_proj", [mixer.in_proj], pad_to=64)
    projected = F.linear(hidden, weight, bias)[:, :mixer.in_proj.out_features]
    conv_weight = mixer.conv1d.weight.squeeze(1)
    if hasattr(mixer, "z_bias"):                 # Llamba: rows x, B, C, z, dt; discrete SSM, z gate fused
        xBC, z, dt = mixer._split_in_proj(projected)
        y = dk.conv_ssm_step(layer_state["conv_state"], xBC, conv_weight, mixer.conv1d.bias,
                             mixer.conv_activation == "silu", layer_state["ssm_state"], mixer.nheads,
                             mixer.n_qk_heads, dt, mixer.A_log, D=mixer.D, z=z, z_bias=mixer.z_bias,
                             dt_softplus=True, discrete=True, positions=positions)
        return F.linear(y.view(batch, mixer.d_inner), mixer.out_proj.weight, mixer.out_proj.bias)
    z, xBC, dt = mixer._split_in_proj(projected)  # MambaInLlama: rows z, x, B, C, dt; x/B at KV width
    y = dk.conv_ssm_step(layer_state["conv_state"], xBC, conv_weight, mixer.conv1d.bias, True,
                         layer_state["ssm_state"], mixer.n_kv_heads, mixer.n_kv_heads, dt, mixer.A_log, D=mixer.D,
                         dt_bias=mixer.dt_bias, dt_softplus=True, positions=positions)
    gated_norm = ssd.gated_rmsnorm if y.is_cuda else ssd.gated_rmsnorm_ref
    y = gated_norm(y.view(batch, mixer.d_inner), z, mixer.norm.weight, eps=mixer.norm_eps,
                   group_size=mixer.norm_group_size)
    return F.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)
