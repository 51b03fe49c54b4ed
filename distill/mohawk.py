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

0. (optional, before stage 1; `init: {calibrate_rows: N}` in the recipe) closed-form calibration
   (`calibrate_mixers`): the attention-initialised discrete mixer sums C.B x over its whole decay window with no
   softmax to normalise it, so its output starts orders of magnitude too large (held-out KL ~19 nats). Per head,
   over a grid of decays, least squares fits a scale of the mixing matrix and the D skip so that the mixer's
   output matches the teacher attention's output (before o_proj) on the teacher's own layer inputs; the best
   decay wins. No gradient steps; seconds.

Layers that the student keeps as attention (MambaInLlama) are skipped in stages 0, 1 and 2.
"""
from __future__ import annotations

import math

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


CALIBRATION_DECAYS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@torch.no_grad()
def calibrate_mixers(student, teacher, batch, decays=CALIBRATION_DECAYS) -> list[dict]:
    """MOHAWK stage 0 (see the module docstring). `batch` is a packed batch (input_ids, position_ids, seq_idx) on
    the models' device. Per head, candidates are the head's current A and one A per decay (the decay per token at
    the batch's median dt); for each, y = M x and the least-squares (scale, D) of target ~ scale * y + D * x.
    The fit is applied to the student in place; returns one row per (layer, head) with the relative residual of
    the current parameters and of the fit."""
    layers = [i for i, layer in enumerate(decoder_layers(student)) if ssm_mixer(layer) is not None]
    if not layers:
        raise ValueError(f"{type(student).__name__} has no SSM mixer to calibrate")
    attn_in, attn_out, handles = {}, {}, []
    for i in layers:
        attn = decoder_layers(teacher)[i].self_attn
        handles.append(attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: attn_in.__setitem__(i, _TeacherCapture._first(a, kw)), with_kwargs=True))
        handles.append(attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: attn_out.__setitem__(i, a[0])))
    try:
        model_forward(teacher, batch, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
    seq_idx = batch["seq_idx"]
    rows = []
    for i in layers:
        mixer = ssm_mixer(decoder_layers(student)[i])
        if not hasattr(mixer, "set_head_fit"):
            raise TypeError(f"layer {i}: {type(mixer).__name__} has no set_head_fit(); calibration is for Llamba mixers")
        if getattr(mixer, "conv_activation", None) is not None or (
                mixer.conv1d.bias is not None and mixer.conv1d.bias.abs().max() > 0):
            raise ValueError(f"layer {i}: calibration scales C through a linear conv; it needs conv_activation="
                             "'identity' and a zero conv bias (a student straight from `thinkfast init`)")
        hidden = attn_in[i].to(next(mixer.parameters()).dtype)
        x, dt, B, C = mixer.mixing_inputs(hidden, seq_idx)
        x = x.float()
        target = attn_out[i].float().unflatten(-1, (mixer.nheads, mixer.headdim))
        A_now = mixer._A()
        dt_ref = dt.median()
        candidates = [A_now] + [torch.full_like(A_now, math.log(d) / float(dt_ref)) for d in decays]
        t2 = target.square().sum((0, 1, 3))
        best = None
        for A in candidates:
            stats = _fit_stats(mixer, dt, A, B, C, x, target, seq_idx)
            if best is None:  # candidate 0 is the current A: the current parameters are scale 1 and the current D
                now = _residual(stats, t2, torch.ones_like(A_now), mixer.D.float()) / t2
            a11, a12, a22, b1, b2 = stats
            det = (a11 * a22 - a12 * a12).clamp_min(1e-30)
            scale, skip = (b1 * a22 - b2 * a12) / det, (a11 * b2 - a12 * b1) / det
            res = _residual(stats, t2, scale, skip) / t2
            terms = (res, A, scale, skip, *stats)
            if best is None:
                best = [t.clone() for t in terms]
            else:
                better = res < best[0]
                best = [torch.where(better, v, b) for v, b in zip(terms, best)]
        _, A, scale, skip, *stats = best
        _, a12, a22, _, b2 = stats
        # The fitted scales are ~1e-2: put into C alone they would leave weights so small that one Adam step of
        # the next stage rescales them many times over. The block's input norm feeds only the mixer, and x, B and
        # C are linear in it (dt and z rows are 0 at init), so a gain g there scales M x by g^3: g carries the
        # layer's typical scale, C only each head's ratio to it (clamped to 1/16..16; D refitted where clamped).
        gain = scale.abs().clamp_min(1e-12).log().mean().exp() ** (1 / 3)
        ratio = torch.sign(scale) * (scale.abs() / gain ** 3).clamp(1 / 16, 16)
        scale = ratio * gain ** 3
        skip = (b2 - scale * a12) / a22.clamp_min(1e-30)
        res = _residual(stats, t2, scale, skip) / t2
        norm = decoder_layers(student)[i].input_layernorm
        norm.weight.mul_(gain.to(norm.weight.dtype))
        mixer.set_head_fit(ratio, A, skip / gain)
        decay = torch.exp(A * dt_ref)
        for h in range(mixer.nheads):
            rows.append({"layer": i, "head": h, "residual_before": float(now[h]), "residual_after": float(res[h]),
                         "decay": float(decay[h]), "scale": float(scale[h]), "D": float(skip[h]),
                         "norm_gain": float(gain), "c_scale": float(ratio[h])})
    return rows


def _fit_stats(mixer, dt, A, B, C, x, target, seq_idx, rows_per_chunk=4):
    """Per head, the sums the 2-parameter least squares needs, for y = M x under decay A: (y.y, y.x, x.x, y.t, x.t),
    over rows in chunks so that only a few [rows, heads, L, L] mixing matrices exist at a time."""
    from harness_ext.models import ssd
    sums = torch.zeros(5, x.shape[2], device=x.device)
    for r in range(0, x.shape[0], rows_per_chunk):
        part = slice(r, r + rows_per_chunk)
        matrix = ssd.ssd_mixing_matrix(dt[part] * A, B[part], C[part], seq_idx=seq_idx[part])    # [b, h, L, L]
        y = torch.einsum("bhij,bjhp->bihp", matrix, x[part])
        xs, ts = x[part], target[part]
        sums += torch.stack([(u * v).sum((0, 1, 3)) for u, v in ((y, y), (y, xs), (xs, xs), (y, ts), (xs, ts))])
    return tuple(sums)


def _residual(stats, t2, scale, skip):
    """Per head: the sum of squares of target - scale * y - skip * x, from the sums of `_fit_stats`."""
    a11, a12, a22, b1, b2 = stats
    return t2 - 2 * (scale * b1 + skip * b2) + scale * scale * a11 + 2 * scale * skip * a12 + skip * skip * a22
