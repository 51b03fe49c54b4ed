"""MOHAWK (Bick et al., "Transformers to SSMs: Distilling Quadratic Knowledge to Subquadratic Models", 2024)
for Llamba: three stages, each a separate run from the previous stage's checkpoint.

    thinkfast distill --recipe llamba --teacher ckpt/teacher --out ckpt/llamba --stage matrix
    thinkfast distill --recipe llamba --teacher ckpt/teacher --out ckpt/llamba --stage hidden
    thinkfast distill --recipe llamba --teacher ckpt/teacher --out ckpt/llamba --stage kd

1. matrix orientation (`MatrixObjective`): every student mixer gets the teacher's input to the same layer's
   attention (the teacher's normalised hidden states) and its materialised mixing matrix [B, H_s, L, L] is pulled
   towards that layer's attention matrix softmax(QK^T/sqrt(d)) (eager attention, captured by a forward hook),
   with teacher heads averaged in groups (or repeated) to the student's head count. Loss: Frobenius distance per
   (sequence, head), averaged over heads and layers; entries across packed documents are masked out.
2. hidden-state alignment (`HiddenObjective`): every student block gets the teacher's block input; the L2 distance
   between the block outputs (per token) is minimised, averaged over tokens and layers. MLPs stay frozen.
3. end-to-end KD on logits: `distill.kd.KDObjective` (forward KL by default in the recipe).

Layers that the student keeps as attention (MambaInLlama) are skipped in stages 1 and 2.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from distill.kd import model_forward


def decoder_layers(model) -> nn.ModuleList:
    try:
        return model.model.layers
    except AttributeError:
        raise TypeError(f"{type(model).__name__} has no model.layers (expected a Llama-trunk model)") from None


def ssm_mixer(layer):
    """The layer's sequence mixer if it can materialise its mixing matrix (a Mamba layer), else None."""
    mixer = getattr(layer, "token_mixer", None)
    candidates = [mixer] if mixer is not None else [getattr(layer, n, None) for n in ("mixer", "mamba")]
    return next((m for m in candidates if m is not None and hasattr(m, "materialize_mixing_matrix")), None)


def match_heads(attn: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[B, H_t, L, L] teacher attention -> [B, n_heads, L, L]: average groups of consecutive teacher heads (GQA
    groups share their K/V, so consecutive query heads belong together) or repeat heads when the student has more."""
    h_t = attn.shape[1]
    if h_t == n_heads:
        return attn
    if h_t % n_heads == 0:
        return attn.unflatten(1, (n_heads, h_t // n_heads)).mean(2)
    if n_heads % h_t == 0:
        return attn.repeat_interleave(n_heads // h_t, dim=1)
    raise ValueError(f"cannot match {h_t} teacher attention heads to {n_heads} student heads (neither divides the other)")


class _TeacherCapture:
    """Forward hooks on the teacher's decoder layers: each layer's input and output hidden states, and with
    `attention=True` each attention's (normalised) input and probability matrix (needs eager attention)."""

    def __init__(self, teacher, attention: bool):
        self.teacher, self.attention = teacher, attention
        self.layer_in, self.layer_out, self.attn_in, self.attn_probs = {}, {}, {}, {}

    @staticmethod
    def _first(args, kwargs, name="hidden_states"):
        return args[0] if args else kwargs[name]

    def __enter__(self):
        self.handles = []
        for i, layer in enumerate(decoder_layers(self.teacher)):
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, a, kw, i=i: self.layer_in.__setitem__(i, self._first(a, kw)), with_kwargs=True))
            self.handles.append(layer.register_forward_hook(
                lambda m, a, o, i=i: self.layer_out.__setitem__(i, o[0] if isinstance(o, tuple) else o)))
            if self.attention:
                attn = layer.self_attn
                self.handles.append(attn.register_forward_pre_hook(
                    lambda m, a, kw, i=i: self.attn_in.__setitem__(i, self._first(a, kw)), with_kwargs=True))
                self.handles.append(attn.register_forward_hook(
                    lambda m, a, o, i=i: self.attn_probs.__setitem__(i, o[1])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _set_attn_impl(model, impl: str) -> str:
    old = model.config._attn_implementation
    if old != impl:
        model.set_attn_implementation(impl)
    return old


class MatrixObjective(nn.Module):
    """MOHAWK stage 1: mixing-matrix orientation."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.layers = [i for i, layer in enumerate(decoder_layers(student)) if ssm_mixer(layer) is not None]
        if not self.layers:
            raise ValueError(f"{type(student).__name__} has no mixer with materialize_mixing_matrix(); "
                             "MOHAWK stage 1 needs an SSM student")

    @torch.no_grad()
    def teacher_forward(self, teacher, batch):
        old = _set_attn_impl(teacher, "eager")  # only eager attention hands out its probability matrix
        try:
            with _TeacherCapture(teacher, attention=True) as cap:
                model_forward(teacher, batch, logits_to_keep=1)
        finally:
            _set_attn_impl(teacher, old)
        missing = [i for i in self.layers if cap.attn_probs.get(i) is None]
        if missing:
            raise RuntimeError(f"teacher layers {missing[:5]} returned no attention matrix (is it a Llama with eager attention?)")
        return {i: (cap.attn_in[i], cap.attn_probs[i]) for i in self.layers}

    def forward(self, batch, teacher_out):
        seq_idx = batch["seq_idx"]
        L = seq_idx.shape[1]
        allowed = (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(1)) & torch.ones(L, L, dtype=torch.bool,
                                                                               device=seq_idx.device).tril()
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L]
        layers = decoder_layers(self.student)
        dists = []
        for i in self.layers:
            hidden, probs = teacher_out[i]
            mixer = ssm_mixer(layers[i])
            m_s = mixer.materialize_mixing_matrix(hidden.to(mixer_dtype(mixer, hidden)), seq_idx=seq_idx).float()
            m_t = match_heads(probs.float(), m_s.shape[1])
            diff = torch.where(allowed, m_s - m_t, torch.zeros((), device=m_s.device))
            dists.append(diff.square().sum((-1, -2)).clamp_min(1e-12).sqrt().mean())  # Frobenius per (b, h)
        loss = torch.stack(dists).mean()
        return loss, {"frobenius": loss.detach()}


def mixer_dtype(mixer, hidden):
    return hidden.dtype if torch.is_autocast_enabled() else next(mixer.parameters()).dtype


def _forward_context(seq_idx):
    try:
        from harness_ext.models.runtime import ForwardContext
    except ImportError as e:
        raise ImportError("MOHAWK stage 2 runs student blocks one by one and needs harness_ext.models.runtime") from e
    return ForwardContext(mode="full", seq_idx=seq_idx)


class HiddenObjective(nn.Module):
    """MOHAWK stage 2: per-block hidden-state alignment (student block on the teacher's block input)."""

    def __init__(self, student):
        super().__init__()
        self.student = student
        self.layers = [i for i, layer in enumerate(decoder_layers(student)) if ssm_mixer(layer) is not None]
        if not self.layers:
            raise ValueError(f"{type(student).__name__} has no SSM layer to align")

    @torch.no_grad()
    def teacher_forward(self, teacher, batch):
        with _TeacherCapture(teacher, attention=False) as cap:
            model_forward(teacher, batch, logits_to_keep=1)
        return {i: (cap.layer_in[i], cap.layer_out[i]) for i in self.layers}

    def forward(self, batch, teacher_out):
        ctx = _forward_context(batch["seq_idx"])
        layers = decoder_layers(self.student)
        dists = []
        for i in self.layers:
            block_in, block_out = teacher_out[i]
            out = layers[i](block_in.to(mixer_dtype(layers[i], block_in)), ctx=ctx)
            dists.append((out.float() - block_out.float()).norm(dim=-1).mean())
        loss = torch.stack(dists).mean()
        return loss, {"l2": loss.detach()}
