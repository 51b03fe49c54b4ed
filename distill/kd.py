"""Logit distillation (MambaInLlama; MOHAWK stage 3) and the shared model-call helpers.

    loss = kd_loss(student_logits, teacher_logits, labels, divergence="reverse_kl", temperature=1.0, ce_weight=0.0)

Divergences, per target token, averaged over tokens whose label is not -100:
  reverse_kl  KL(student || teacher)  mode-seeking; MambaInLlama's default (the paper's choice)
  forward_kl  KL(teacher || student)  mean-seeking; classic Hinton KD (MOHAWK stage 3)
and `ce_weight` mixes in next-token cross-entropy on the data: (1 - w) * KL + w * CE.
The temperature softens both distributions; the KL is scaled by T^2 so gradients keep their size.
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

DIVERGENCES = ("reverse_kl", "forward_kl")


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


def kd_loss(student_logits, teacher_logits, labels, divergence="reverse_kl", temperature=1.0, ce_weight=0.0):
    """Returns (loss, stats): stats holds detached 'kl' and, with ce_weight > 0, 'ce'. No host sync."""
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


class KDObjective(nn.Module):
    """Student + loss in one module, so DDP sees the whole forward. The teacher is not a submodule: its
    logits come in through `teacher_out` (computed under no_grad by `teacher_forward`)."""

    def __init__(self, student, divergence="reverse_kl", temperature=1.0, ce_weight=0.0):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; choose from {DIVERGENCES}")
        self.student, self.divergence, self.temperature, self.ce_weight = student, divergence, temperature, ce_weight

    @torch.no_grad()
    def teacher_forward(self, teacher, batch):
        return model_forward(teacher, batch).logits

    def forward(self, batch, teacher_logits):
        logits = model_forward(self.student, batch).logits
        return kd_loss(logits, teacher_logits, batch["labels"], self.divergence, self.temperature, self.ce_weight)


class SFTObjective(nn.Module):
    """Plain next-token cross-entropy on the data (optional stage after KD); needs no teacher."""

    needs_teacher = False

    def __init__(self, student):
        super().__init__()
        self.student = student

    def teacher_forward(self, teacher, batch):
        return None

    def forward(self, batch, teacher_out=None):
        logits = model_forward(self.student, batch).logits
        ce = F.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten(), ignore_index=-100)
        return ce, {"ce": ce.detach()}


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
