"""The KD loss chunk in one Triton kernel: per-token KL (reverse or forward), optional CE, and the gradient with
respect to the student logits, in two passes over a [tokens, vocab] chunk.

The reference twin is `distill.kd.kd_chunk` (what `chunked_kd_loss` runs by default, through torch.compile on
CUDA). On an H200 the compiled reference took 1.16 ms per 4096 x 49152 chunk for reverse KL
(leaderboards/distill/bench_distill_graph/h200_profile): a looped reduction that reads both logit tensors once per
softmax statistic. Here one program per token makes

  pass 1: online log-sum-exp of the student and teacher logits (and of the untempered student logits when CE runs
          at T != 1), carrying A = sum exp(a - m_a) * (a - b) along (a = z_s / T, b = z_t / T; swapped for forward
          KL), so the KL needs no pass of its own:
              reverse:  KL(p||q) = A / Z_a - lse_a + lse_b          forward:  KL(q||p) = A_b / Z_b - lse_b + lse_a
  pass 2: the gradient (the closed forms in `distill.kd`), written in the logits' dtype over the student logits
          (`overwrite_logits=True`: `_ChunkedKD` discards them after the chunk) or into a new tensor.

Two reads of each logit tensor and one write: ~2 GB per 4096-token chunk instead of ~4. On an H200: 0.59 ms per
4096 x 49152 bf16 chunk against 1.17 ms for the compiled reference (reverse KL), 0.60 against 0.69 (forward KL).

Opt-in, because the whole trainer step did not get faster: in order-balanced A/B runs of scripts/bench_distill.py
(layers-flex-graph, micro-batch 16) the step is host-bound and the ~4.7 ms of GPU time it saves per MambaInLlama
step did not show in tokens/s (leaderboards/README.md). It saves ~1 GB of peak memory.
    THINKFAST_KD_KERNEL=ref      (default) the reference (compiled on CUDA when the stage compiles)
    THINKFAST_KD_KERNEL=triton   this kernel on CUDA (and on CPU under TRITON_INTERPRET=1, for tests)
`KD_KERNEL_MODE` overrides the environment in-process (the GPU check sets it). THINKFAST_KERNELS=ref turns it off
with every other kernel.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the reference runs instead
    triton = None
    tl = None

KD_KERNEL_MODES = ("ref", "triton")
# None: read THINKFAST_KD_KERNEL on every call; a mode string: forced.
KD_KERNEL_MODE: str | None = None

# 4096 x 8 warps: 0.59 ms per 4096 x 49152 bf16 chunk on an H200, against 0.65 (2048 x 8), 0.64 (1024 x 4) and
# 0.81 (4096 x 16) (scripts/gpu_check_kernels.py --only kd)
BLOCK_V = 4096
NUM_WARPS = 8


def kd_kernel_mode() -> str:
    mode = (KD_KERNEL_MODE if KD_KERNEL_MODE is not None else os.environ.get("THINKFAST_KD_KERNEL", "ref"))
    mode = mode.strip().lower()
    if mode not in KD_KERNEL_MODES:
        raise ValueError(f"THINKFAST_KD_KERNEL must be one of {', '.join(KD_KERNEL_MODES)}, got {mode!r}")
    return mode


def use_triton_kd(logits: torch.Tensor) -> bool:
    if kd_kernel_mode() == "ref" or triton is None:
        return False
    from harness_ext.models.ssd import kernel_mode

    if kernel_mode() == "ref":
        return False
    return logits.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


if triton is not None:
    @triton.jit
    def _kd_chunk_kernel(s_ptr, t_ptr, label_ptr, grad_ptr, kl_ptr, ce_ptr, kl_coef_ptr, ce_coef_ptr, vocab,
                         stride_s, stride_t, stride_g, inv_temp, temp,
                         HAS_TEACHER: tl.constexpr, REVERSE: tl.constexpr, WITH_CE: tl.constexpr,
                         CE_UNTEMPERED: tl.constexpr, NEED_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        label = tl.load(label_ptr + row).to(tl.int64)
        s_row = s_ptr + row * stride_s
        t_row = t_ptr + row * stride_t
        g_row = grad_ptr + row * stride_g
        offs = tl.arange(0, BLOCK)
        if label == -100:  # not a target token: no loss, zero gradient
            tl.store(kl_ptr + row, 0.0)
            tl.store(ce_ptr + row, 0.0)
            if NEED_GRAD:
                for start in range(0, vocab, BLOCK):
                    cols = start + offs
                    tl.store(g_row + cols, tl.zeros([BLOCK], dtype=tl.float32).to(grad_ptr.dtype.element_ty),
                             mask=cols < vocab)
        else:
            neg_inf = float("-inf")
            m_s = neg_inf   # running max and sum of exp of a = z_s / T
            z_s = 0.0
            m_t = neg_inf   # ... of b = z_t / T
            z_t = 0.0
            acc = 0.0       # sum exp(a - m_s) (a - b) (reverse), or exp(b - m_t) (b - a) (forward)
            m_1 = neg_inf   # ... of the untempered z_s (CE at T != 1)
            z_1 = 0.0
            for start in range(0, vocab, BLOCK):
                cols = start + offs
                ok = cols < vocab
                raw = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32)
                a_val = raw * inv_temp
                a = tl.where(ok, a_val, neg_inf)
                new_m_s = tl.maximum(m_s, tl.max(a, 0))
                e_s = tl.exp(a - new_m_s)
                scale_s = tl.exp(m_s - new_m_s)
                z_s = z_s * scale_s + tl.sum(e_s, 0)
                if HAS_TEACHER:
                    b_val = tl.load(t_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp
                    b = tl.where(ok, b_val, neg_inf)
                    new_m_t = tl.maximum(m_t, tl.max(b, 0))
                    e_t = tl.exp(b - new_m_t)
                    scale_t = tl.exp(m_t - new_m_t)
                    z_t = z_t * scale_t + tl.sum(e_t, 0)
                    diff = a_val - b_val   # 0 past the vocabulary, where e_s and e_t are 0 too
                    if REVERSE:
                        acc = acc * scale_s + tl.sum(e_s * diff, 0)
                    else:
                        acc = acc * scale_t - tl.sum(e_t * diff, 0)
                    m_t = new_m_t
                m_s = new_m_s
                if CE_UNTEMPERED:
                    r = tl.where(ok, raw, neg_inf)
                    new_m_1 = tl.maximum(m_1, tl.max(r, 0))
                    z_1 = z_1 * tl.exp(m_1 - new_m_1) + tl.sum(tl.exp(r - new_m_1), 0)
                    m_1 = new_m_1
            lse_s = m_s + tl.log(z_s)
            kl = 0.0
            lse_t = 0.0
            if HAS_TEACHER:
                lse_t = m_t + tl.log(z_t)
                if REVERSE:
                    kl = acc / z_s - lse_s + lse_t
                else:
                    kl = acc / z_t - lse_t + lse_s
            tl.store(kl_ptr + row, kl * temp * temp)
            lse_1 = lse_s
            if CE_UNTEMPERED:
                lse_1 = m_1 + tl.log(z_1)
            if WITH_CE:
                z_label = tl.load(s_row + label).to(tl.float32)
                tl.store(ce_ptr + row, lse_1 - z_label)
            else:
                tl.store(ce_ptr + row, 0.0)
            if NEED_GRAD:
                kl_scale = tl.load(kl_coef_ptr).to(tl.float32) * temp
                ce_scale = tl.load(ce_coef_ptr).to(tl.float32)
                for start in range(0, vocab, BLOCK):
                    cols = start + offs
                    ok = cols < vocab
                    raw = tl.load(s_row + cols, mask=ok, other=0.0).to(tl.float32)
                    ls = raw * inv_temp - lse_s
                    p = tl.exp(ls)
                    g = tl.zeros([BLOCK], dtype=tl.float32)
                    if HAS_TEACHER:
                        lt = tl.load(t_row + cols, mask=ok, other=0.0).to(tl.float32) * inv_temp - lse_t
                        if REVERSE:
                            g = p * (ls - lt - kl) * kl_scale
                        else:
                            g = (p - tl.exp(lt)) * kl_scale
                    if WITH_CE:
                        p_1 = p
                        if CE_UNTEMPERED:
                            p_1 = tl.exp(raw - lse_1)
                        g += (p_1 - tl.where(cols == label, 1.0, 0.0)) * ce_scale
                    tl.store(g_row + cols, g.to(grad_ptr.dtype.element_ty), mask=ok)


def kd_chunk_triton(student_logits, teacher_logits, labels, kl_coef, ce_coef, divergence: str, temperature: float,
                    with_ce: bool, need_grad: bool, overwrite_logits: bool = False):
    """`distill.kd.kd_chunk` (same arguments and returns) in one Triton kernel; logits [tokens, vocab] with unit
    stride along the vocabulary. `overwrite_logits=True` writes the gradient over `student_logits` (read-once
    buffers: saves a [tokens, vocab] allocation)."""
    if student_logits.dim() != 2 or student_logits.stride(-1) != 1:
        raise ValueError(f"kd_chunk_triton needs [tokens, vocab] logits with unit vocab stride, got shape "
                         f"{tuple(student_logits.shape)} stride {student_logits.stride()}")
    if teacher_logits is not None and (teacher_logits.shape != student_logits.shape or teacher_logits.stride(-1) != 1):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(student_logits.shape)}")
    tokens, vocab = student_logits.shape
    device = student_logits.device
    kl_rows = torch.empty(tokens, dtype=torch.float32, device=device)
    ce_rows = torch.empty(tokens, dtype=torch.float32, device=device)
    grad = None
    if need_grad:
        grad = student_logits if overwrite_logits else torch.empty_like(student_logits)
    has_teacher = teacher_logits is not None
    if tokens:
        _kd_chunk_kernel[(tokens,)](
            student_logits, teacher_logits if has_teacher else student_logits, labels.contiguous(),
            grad if need_grad else kl_rows, kl_rows, ce_rows, kl_coef.reshape(()).to(device),
            ce_coef.reshape(()).to(device), vocab, student_logits.stride(0),
            teacher_logits.stride(0) if has_teacher else 0, grad.stride(0) if need_grad else 0,
            1.0 / float(temperature), float(temperature),
            HAS_TEACHER=has_teacher, REVERSE=divergence != "forward_kl", WITH_CE=bool(with_ce),
            CE_UNTEMPERED=bool(with_ce) and float(temperature) != 1.0, NEED_GRAD=bool(need_grad),
            BLOCK=BLOCK_V, num_warps=NUM_WARPS)
    return kl_rows.sum(), ce_rows.sum(), grad
