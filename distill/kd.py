"""Logit distillation (MambaInLlama; MOHAWK stage 3) and the shared model-call helpers.

    loss, stats = chunked_kd_loss(student_hidden, student_lm_head_weight, teacher_hidden, teacher_lm_head_weight,
                                  labels, divergence="reverse_kl", temperature=1.0, ce_weight=0.0)
    loss, stats = kd_loss_ref(student_logits, teacher_logits, labels, ...)     # the same loss from full logits

Divergences, per target token, averaged over tokens whose label is not -100:
  reverse_kl  KL(student || teacher)  mode-seeking; MambaInLlama's default (the paper's choice)
  forward_kl  KL(teacher || student)  mean-seeking; classic Hinton KD (MOHAWK stage 3)
and `ce_weight` mixes in next-token cross-entropy on the data: (1 - w) * KL + w * CE.
The temperature softens both distributions; the KL is scaled by T^2 so gradients keep their size. CE is on the
untempered student logits.

Why chunked: with a 49152-token vocabulary the full-logit loss holds several [tokens, vocab] fp32 tensors (3.2 GB
each at 8 x 2048 tokens) for the teacher and the student, and its memory traffic dominated the step. The chunked
loss starts from the final (normed) hidden states, computes each chunk's logits with a bf16 matmul against each
lm_head, and the log-softmaxes in fp32 for that chunk only. It also forms the loss's gradient with respect to the
chunk's student logits right there (closed form, below) and turns it into the gradients of the hidden states and
of the lm_head weight, so the backward pass is a scale by the incoming scalar gradient: no [tokens, vocab] tensor
outlives its chunk, and no logit is computed twice (Liger-kernel's fused-linear-cross-entropy idea).

Closed forms, with a = z_s / T, p = softmax(a), q = softmax(z_t / T), d = log p - log q:
  reverse:  d KL(p||q) / d a = p * (d - KL)          forward:  d KL(q||p) / d a = p - q
  so d (T^2 KL) / d z_s = T * (the above);           CE:       d CE / d z_s = softmax(z_s) - onehot(label)

Per chunk, `kd_chunk` (fp32 PyTorch, through torch.compile when the stage compiles) runs by default;
THINKFAST_KD_KERNEL=triton runs the fused Triton chunk `distill.kd_kernels.kd_chunk_triton` instead (two passes
over the logits, the gradient written over the consumed student logits; see there for why it is opt-in).
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill import kd_kernels

DIVERGENCES = ("reverse_kl", "forward_kl")
DEFAULT_CHUNK_TOKENS = 4096


@functools.lru_cache(maxsize=None)
def _accepts(cls, name: str) -> bool:
    return name in inspect.signature(cls.forward).parameters


def model_forward(model, batch: dict, **kwargs):
    """The HF forward on a packed batch. `seq_idx` goes to models that take it (the students); every model gets
    per-document positions, and no cache, so HF Llama builds a block-diagonal causal mask from them."""
    base = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if _accepts(type(base), "seq_idx"):
        kwargs["seq_idx"] = batch["seq_idx"]
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False, **kwargs)


def final_hidden(model, batch: dict) -> torch.Tensor:
    """The final normed hidden states [B, L, D] (what the lm_head reads), without the lm_head over the sequence.

    HF Llama (the teacher): its decoder `model.model` returns them. The project's students build the trunk inline in
    the causal-LM forward, so they run it with `output_hidden_states` (whose last entry is after the final norm)
    and `logits_to_keep=1` (one position of lm_head instead of all)."""
    base = getattr(model, "_orig_mod", model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if decoder is not None and decoder is not base and type(decoder).forward is not nn.Module.forward \
            and not _accepts(type(base), "seq_idx"):
        return decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       use_cache=False).last_hidden_state
    out = model_forward(model, batch, output_hidden_states=True, logits_to_keep=1)
    if out.hidden_states is None:
        raise TypeError(f"{type(base).__name__} returned no hidden_states; the chunked KD loss needs them")
    return out.hidden_states[-1]


def output_weight(model) -> torch.Tensor:
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise TypeError(f"{type(model).__name__}: the chunked KD loss needs a bias-free lm_head (nn.Linear)")
    return head.weight


# ----------------------------------------------------------------------------- reference (full logits)

def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, divergence: str = "reverse_kl",
                     temperature: float = 1.0) -> torch.Tensor:
    """Per-token divergence [..., ] in fp32 (logits may be bf16)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {DIVERGENCES}")
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if divergence == "forward_kl":
        kl = (t.exp() * (t - s)).sum(-1)
    else:
        kl = (s.exp() * (s - t)).sum(-1)
    return kl * temperature ** 2


def kd_loss_ref(student_logits, teacher_logits, labels, divergence="reverse_kl", temperature=1.0, ce_weight=0.0):
    """Returns (loss, stats): stats holds detached 'kl' and, with ce_weight > 0, 'ce'. No host sync.
    `teacher_logits=None` gives plain CE (stats 'ce' only), the SFT loss."""
    if teacher_logits is None:
        ce = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
        return ce, {"ce": ce.detach()}
    mask = (labels != -100).float()
    n = mask.sum().clamp(min=1.0)
    kl = (token_divergence(student_logits, teacher_logits, divergence, temperature) * mask).sum() / n
    stats = {"kl": kl.detach()}
    loss = kl
    if ce_weight > 0:
        ce = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), ignore_index=-100)
        stats["ce"] = ce.detach()
        loss = (1.0 - ce_weight) * kl + ce_weight * ce
    return loss, stats


kd_loss = kd_loss_ref  # the historical name


# ----------------------------------------------------------------------------- chunked (from hidden states)

def kd_chunk(student_logits, teacher_logits, labels, kl_coef, ce_coef, divergence: str, temperature: float,
             with_ce: bool, need_grad: bool):
    """One chunk of tokens: (sum of masked per-token KL, sum of masked CE, d loss / d student_logits or None).
    `kl_coef` / `ce_coef` (0-d tensors) are each term's weight per token in the loss, already divided by the
    token count, so the returned gradient is the chunk's exact share. All softmax arithmetic in fp32; the
    gradient is returned in the logits' dtype (it feeds the bf16 matmuls)."""
    mask = (labels != -100).unsqueeze(-1)
    zero = student_logits.new_zeros((), dtype=torch.float32)
    kl_sum, ce_sum, grad = zero, zero, None
    s = None
    if teacher_logits is not None:
        s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        p = s.exp()
        if divergence == "forward_kl":
            q = t.exp()
            kl = (q * (t - s)).sum(-1, keepdim=True)
            d_kl = p - q if need_grad else None
        else:
            diff = s - t
            kl = (p * diff).sum(-1, keepdim=True)
            d_kl = p * (diff - kl) if need_grad else None
        kl_sum = (kl * mask).sum() * temperature ** 2
        if need_grad:
            grad = d_kl * (kl_coef * temperature)
    if with_ce:
        s1 = s if (s is not None and temperature == 1.0) else F.log_softmax(student_logits.float(), dim=-1)
        target = labels.clamp(min=0).unsqueeze(-1)
        ce_sum = -(s1.gather(-1, target) * mask).sum()
        if need_grad:
            d_ce = s1.exp().scatter_add(-1, target, torch.full_like(target, -1, dtype=s1.dtype)) * ce_coef
            grad = d_ce if grad is None else grad + d_ce
    if need_grad:
        grad = (grad * mask).to(student_logits.dtype)
    return kl_sum, ce_sum, grad


_COMPILED_CHUNK = {}
_TRITON_CHUNK_FAILED: list = []   # non-empty after the Triton chunk raised once: the reference runs from then on


def compiled_kd_chunk():
    """`kd_chunk` through torch.compile (fuses the fp32 softmax arithmetic into a few passes over the chunk);
    `kd_chunk` itself if compilation is unavailable. Failures at first call are handled by the caller."""
    if "fn" not in _COMPILED_CHUNK:
        try:
            _COMPILED_CHUNK["fn"] = torch.compile(kd_chunk, dynamic=False)
        except Exception as error:  # noqa: BLE001 - any backend problem: run eager
            warnings.warn(f"torch.compile of the KD chunk failed ({type(error).__name__}: {error}); running eager")
            _COMPILED_CHUNK["fn"] = kd_chunk
    return _COMPILED_CHUNK["fn"]


class _ChunkedKD(torch.autograd.Function):
    """Inputs flattened to tokens: h_s [T, D], w_s [V, D], h_t [T, D] or None, w_t [V, D] or None, labels [T].
    Outputs (loss, kl_mean, ce_mean); gradients for h_s and w_s only (formed in the forward, scaled in backward)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, divergence, temperature, ce_weight, chunk_tokens, matmul_dtype,
                chunk_fn):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_grad = need_h or need_w
        with_teacher = h_t is not None
        with_ce = ce_weight > 0 or not with_teacher
        n = (labels != -100).sum().clamp(min=1).float()
        kl_w = (1.0 - ce_weight) if ce_weight > 0 else 1.0
        kl_coef = (kl_w / n) if with_teacher else n.new_zeros(())
        ce_coef = ((ce_weight if with_teacher else 1.0) / n) if with_ce else n.new_zeros(())
        ws = w_s.to(matmul_dtype)
        wt = w_t.to(matmul_dtype) if with_teacher else None
        grad_h = torch.empty_like(h_s) if need_h else None
        grad_w = torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device) if need_w else None
        kl_total = n.new_zeros(())
        ce_total = n.new_zeros(())
        for start in range(0, h_s.shape[0], chunk_tokens):
            sl = slice(start, start + chunk_tokens)
            hs = h_s[sl].to(matmul_dtype)
            zs = hs @ ws.t()
            zt = h_t[sl].to(matmul_dtype) @ wt.t() if with_teacher else None
            kl_sum, ce_sum, g = chunk_fn(zs, zt, labels[sl], kl_coef, ce_coef, divergence, float(temperature),
                                         with_ce, need_grad)
            kl_total = kl_total + kl_sum
            ce_total = ce_total + ce_sum
            if need_h:
                grad_h[sl] = (g @ ws).to(grad_h.dtype)
            if need_w:
                grad_w += (g.t() @ hs).float()
            del zs, zt, g
        kl = kl_total / n
        ce = ce_total / n
        if with_teacher:
            loss = (1.0 - ce_weight) * kl + ce_weight * ce if ce_weight > 0 else kl
        else:
            loss = ce
        if loss is kl or loss is ce:  # the stats are marked non-differentiable; the loss must be its own tensor
            loss = loss.clone()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.need_h, ctx.need_w, ctx.w_dtype = need_h, need_w, w_s.dtype
        ctx.mark_non_differentiable(kl, ce)
        return loss, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        saved = list(ctx.saved_tensors)
        grad_h = grad_w = None
        if ctx.need_h:
            stored = saved.pop(0)
            grad_h = stored * grad_loss.to(stored.dtype)
        if ctx.need_w:
            grad_w = (saved.pop(0) * grad_loss.float()).to(ctx.w_dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def _matmul_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype autocast would give the lm_head matmul (bf16 under the trainer's CUDA autocast), else hidden's."""
    device_type = hidden.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except TypeError:  # older torch: no device argument
        if device_type == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return hidden.dtype


def chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, divergence="reverse_kl",
                    temperature=1.0, ce_weight=0.0, chunk_tokens=DEFAULT_CHUNK_TOKENS, compile_chunk=False):
    """`kd_loss_ref` from final hidden states [..., D] and bias-free lm_head weights [V, D] (see the module doc).
    `teacher_hidden=None`: plain CE (SFT). Logits are computed in the autocast dtype when autocast is on (bf16 on
    CUDA), else in the hidden states' dtype. Returns (loss, stats) like `kd_loss_ref`; no host sync."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose from {DIVERGENCES}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if teacher_hidden is not None and teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher hidden {tuple(teacher_hidden.shape)} and student hidden "
                         f"{tuple(student_hidden.shape)} cover different tokens")
    if labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match the hidden states {tuple(student_hidden.shape)}")
    matmul_dtype = _matmul_dtype(student_hidden)
    reference_fn = compiled_kd_chunk() if compile_chunk else kd_chunk
    chunk_fn = reference_fn
    if not _TRITON_CHUNK_FAILED and kd_kernels.use_triton_kd(student_hidden):
        chunk_fn = functools.partial(kd_kernels.kd_chunk_triton, overwrite_logits=True)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    h_t = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) if teacher_hidden is not None else None
    args = (h_s, student_weight, h_t, teacher_weight if h_t is not None else None, labels.reshape(-1), divergence,
            temperature, float(ce_weight), int(chunk_tokens), matmul_dtype)
    try:
        loss, kl, ce = _ChunkedKD.apply(*args, chunk_fn)
    except Exception as error:  # noqa: BLE001
        if chunk_fn is kd_chunk:
            raise
        if chunk_fn is reference_fn:
            warnings.warn(f"compiled KD chunk failed ({type(error).__name__}: {error}); falling back to eager")
            _COMPILED_CHUNK["fn"] = kd_chunk
        else:
            warnings.warn(f"Triton KD chunk (distill.kd_kernels) failed ({type(error).__name__}: {error}); "
                          f"running the reference from now on")
            _TRITON_CHUNK_FAILED.append(error)
        loss, kl, ce = _ChunkedKD.apply(*args, kd_chunk if chunk_fn is reference_fn else reference_fn)
    if teacher_hidden is None:
        return loss, {"ce": ce}
    stats = {"kl": kl}
    if ce_weight > 0:
        stats["ce"] = ce
    return loss, stats


# ----------------------------------------------------------------------------- objectives

class KDObjective(nn.Module):
    """Student + loss in one module, so DDP sees the whole forward. The teacher is not a submodule: its final
    hidden states come in through `teacher_out` (computed under no_grad by `teacher_forward`, lm_head skipped),
    together with its lm_head weight. `chunked=False` runs the full-logit reference path (teacher logits in)."""

    def __init__(self, student, divergence="reverse_kl", temperature=1.0, ce_weight=0.0, chunked=True,
                 chunk_tokens=DEFAULT_CHUNK_TOKENS, compile_chunk=False):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; choose from {DIVERGENCES}")
        self.student, self.divergence, self.temperature, self.ce_weight = student, divergence, temperature, ce_weight
        self.chunked, self.chunk_tokens, self.compile_chunk = chunked, chunk_tokens, compile_chunk

    @torch.no_grad()
    def teacher_forward(self, teacher, batch):
        if not self.chunked:
            return model_forward(teacher, batch).logits
        return final_hidden(teacher, batch), output_weight(teacher)

    def forward(self, batch, teacher_out):
        if not self.chunked:
            logits = model_forward(self.student, batch).logits
            return kd_loss_ref(logits, teacher_out, batch["labels"], self.divergence, self.temperature, self.ce_weight)
        teacher_hidden, teacher_weight = teacher_out
        return chunked_kd_loss(final_hidden(self.student, batch), output_weight(self.student), teacher_hidden,
                               teacher_weight, batch["labels"], self.divergence, self.temperature, self.ce_weight,
                               self.chunk_tokens, self.compile_chunk)


class SFTObjective(nn.Module):
    """Plain next-token cross-entropy on the data (optional stage after KD); needs no teacher."""

    needs_teacher = False

    def __init__(self, student, chunked=True, chunk_tokens=DEFAULT_CHUNK_TOKENS, compile_chunk=False):
        super().__init__()
        self.student, self.chunked, self.chunk_tokens, self.compile_chunk = student, chunked, chunk_tokens, compile_chunk

    def teacher_forward(self, teacher, batch):
        return None

    def forward(self, batch, teacher_out=None):
        if not self.chunked:
            return kd_loss_ref(model_forward(self.student, batch).logits, None, batch["labels"])
        return chunked_kd_loss(final_hidden(self.student, batch), output_weight(self.student), None, None,
                               batch["labels"], chunk_tokens=self.chunk_tokens, compile_chunk=self.compile_chunk)


@torch.no_grad()
def agreement_stats(student_logits, teacher_logits, labels) -> dict[str, torch.Tensor]:
    """Sums (not means) over target tokens, for held-out evaluation: forward/reverse KL, top-1 agreement, CE."""
    mask = labels != -100
    s, t = student_logits.float(), teacher_logits.float()
    return {
        "tokens": mask.sum(),
        "kl_forward": (token_divergence(s, t, "forward_kl") * mask).sum(),
        "kl_reverse": (token_divergence(s, t, "reverse_kl") * mask).sum(),
        "top1_agree": ((s.argmax(-1) == t.argmax(-1)) & mask).sum(),
        "student_ce": F.cross_entropy(s.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum"),
        "teacher_ce": F.cross_entropy(t.flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum"),
    }
