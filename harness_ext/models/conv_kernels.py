"""Depthwise causal conv1d over packed documents in Triton (training and prefill), forward and backward.

The Mamba mixers run a width-4 depthwise causal conv (+ SiLU) over the x/B/C channels of every token. The PyTorch
reference (`ssd.causal_conv1d_ref`) makes several float32 passes over [B, L, C] per tap; on the H100 that was a
large share of the students' prefill and training step. These kernels read x once per tile (the width-4 window
comes from L1/L2), accumulate in float32 and write the output once:

    out[b, t, c] = act(bias[c] + sum_k weight[c, k] * x[b, t - (K-1) + k, c]),  taps reading across a
                   `seq_idx` change (or before t = 0) count as zero: no state leaks between packed documents.

`causal_conv1d(x, weight, bias, seq_idx, silu)` is an autograd.Function (grads for x, weight, bias; the backward
recomputes the pre-activation instead of storing it). `causal_conv1d_with_states(..., cu_seqlens)` is the prefill
variant: it also returns each document's conv state [n_docs, C, K] (its last K inputs, newest last, zeros before the
document's start), what `ssd.conv_state_from_inputs` returns and the decode step reads.

Shapes: x [b, l, c] (channel stride 1; a column slice of the in_proj output is fine), weight [c, K], bias [c],
seq_idx [b, l] int. The reference twin is `ssd.causal_conv1d_ref`; `ssd.causal_conv1d` dispatches here when
`use_triton_conv(x)`:

    THINKFAST_CONV=auto     (default) these kernels on CUDA tensors, the reference elsewhere
    THINKFAST_CONV=ref      the PyTorch reference, everywhere
    THINKFAST_CONV=triton   these kernels on CUDA tensors (and on CPU under TRITON_INTERPRET=1, for tests)

`auto` since the H100 check (scripts/gpu_check_kernels.py --only conv, leaderboards/kernels) and the trainer
benchmark: the reference conv's float32 passes were the largest item of Llamba's training step (scripts/
bench_distill.py --profile). `CONV_MODE` below overrides the environment (the GPU check flips it to compare both
paths in one process).
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

# None: read THINKFAST_CONV on every call; "ref" / "triton": forced (scripts flip this in-process).
CONV_MODE: str | None = None

BLOCK_L = 64
BLOCK_C = 128


def conv_mode() -> str:
    mode = CONV_MODE if CONV_MODE is not None else os.environ.get("THINKFAST_CONV", "auto")
    mode = mode.strip().lower()
    if mode not in ("auto", "ref", "triton"):
        raise ValueError(f"THINKFAST_CONV must be auto, ref or triton, got {mode!r}")
    return mode


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton_conv(x: torch.Tensor) -> bool:
    """Triton conv when THINKFAST_CONV is not `ref`, Triton is importable, THINKFAST_KERNELS is not `ref`, and x is
    on CUDA (or, with THINKFAST_CONV=triton, on CPU under the Triton interpreter)."""
    mode = conv_mode()
    if mode == "ref" or triton is None:
        return False
    from .ssd import kernel_mode

    if kernel_mode() == "ref":
        return False
    return x.is_cuda or (mode == "triton" and _interpreting())


if triton is not None:
    @triton.jit
    def _tap(x_row, seq_row, rows, rows_ok, doc, c, c_ok, stride_xl, stride_sl,
             SHIFT: tl.constexpr, HAS_SEQ: tl.constexpr):
        """x[rows - SHIFT, c] as float32, zero where that source is before the row start or in another document."""
        src = rows - SHIFT
        ok = rows_ok & (src >= 0)
        if HAS_SEQ and SHIFT > 0:
            ok = ok & (tl.load(seq_row + src * stride_sl, mask=ok, other=-1) == doc)
        return tl.load(x_row + src[:, None] * stride_xl + c[None, :], mask=ok[:, None] & c_ok[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _pre_activation(x_row, seq_row, w_ptr, bias_ptr, rows, rows_ok, doc, c, c_ok, stride_xl, stride_sl,
                        WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, BLOCK_L: tl.constexpr,
                        BLOCK_C: tl.constexpr):
        acc = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        for k in tl.static_range(WIDTH):
            w = tl.load(w_ptr + c * WIDTH + k, mask=c_ok, other=0.0).to(tl.float32)
            acc += _tap(x_row, seq_row, rows, rows_ok, doc, c, c_ok, stride_xl, stride_sl, WIDTH - 1 - k,
                        HAS_SEQ) * w[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        return acc

    @triton.jit
    def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, seq_ptr, out_ptr, dout_ptr, seqlen, channels,
                         stride_xb, stride_xl, stride_sb, stride_sl, stride_ob, stride_ol, stride_db, stride_dl,
                         WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
                         SILU_GRAD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """out = act(pre); with SILU_GRAD, out = dout * silu'(pre) instead (the backward's first pass)."""
        b = tl.program_id(0)
        t = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        t_ok, c_ok = t < seqlen, c < channels
        x_row = x_ptr + b * stride_xb
        seq_row = seq_ptr + b * stride_sb
        doc = t
        if HAS_SEQ:
            doc = tl.load(seq_row + t * stride_sl, mask=t_ok, other=0)
        acc = _pre_activation(x_row, seq_row, w_ptr, bias_ptr, t, t_ok, doc, c, c_ok, stride_xl, stride_sl,
                              WIDTH, HAS_BIAS, HAS_SEQ, BLOCK_L, BLOCK_C)
        if SILU_GRAD:
            sig = tl.sigmoid(acc)
            dout = tl.load(dout_ptr + b * stride_db + t[:, None] * stride_dl + c[None, :],
                           mask=t_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
            acc = dout * sig * (1.0 + acc * (1.0 - sig))
        elif SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(out_ptr + b * stride_ob + t[:, None] * stride_ol + c[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _conv_bwd_kernel(x_ptr, w_ptr, seq_ptr, g_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                         seqlen, channels, stride_xb, stride_xl, stride_sb, stride_sl, stride_gb, stride_gl,
                         stride_dxb, stride_dxl,
                         WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr,
                         BLOCK_L: tl.constexpr, BLOCK_C: tl.constexpr):
        """g: the gradient at the pre-activation. dx[t] = sum_s weight[K-1-s] * g[t+s] (t+s in t's document);
        per-tile partial sums of dweight[c, k] = sum_t g[t] x[t-(K-1-k)] and dbias = sum_t g[t]."""
        b = tl.program_id(0)
        lblock = tl.program_id(1)
        t = lblock * BLOCK_L + tl.arange(0, BLOCK_L)
        c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        t_ok, c_ok = t < seqlen, c < channels
        x_row = x_ptr + b * stride_xb
        seq_row = seq_ptr + b * stride_sb
        g_row = g_ptr + b * stride_gb
        doc_t = t
        if HAS_SEQ:
            doc_t = tl.load(seq_row + t * stride_sl, mask=t_ok, other=0)
        dx = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        g_here = tl.zeros([BLOCK_L, BLOCK_C], dtype=tl.float32)
        for s in tl.static_range(WIDTH):
            r = t + s
            r_ok = r < seqlen
            g = tl.load(g_row + r[:, None] * stride_gl + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                        other=0.0).to(tl.float32)
            if s == 0:
                g_here = g
            w = tl.load(w_ptr + c * WIDTH + (WIDTH - 1 - s), mask=c_ok, other=0.0).to(tl.float32)
            if HAS_SEQ:
                doc_r = tl.load(seq_row + r * stride_sl, mask=r_ok, other=-1)
                g = tl.where((doc_r == doc_t)[:, None], g, 0.0)
            dx += g * w[None, :]
        tl.store(dx_ptr + b * stride_dxb + t[:, None] * stride_dxl + c[None, :], dx.to(dx_ptr.dtype.element_ty),
                 mask=t_ok[:, None] & c_ok[None, :])
        part = b * tl.num_programs(1) + lblock
        for k in tl.static_range(WIDTH):
            xk = _tap(x_row, seq_row, t, t_ok, doc_t, c, c_ok, stride_xl, stride_sl, WIDTH - 1 - k, HAS_SEQ)
            tl.store(dw_part_ptr + (part * channels + c) * WIDTH + k, tl.sum(g_here * xk, axis=0), mask=c_ok)
        if HAS_BIAS:
            tl.store(db_part_ptr + part * channels + c, tl.sum(g_here, axis=0), mask=c_ok)

    @triton.jit
    def _conv_states_kernel(x_ptr, cu_ptr, state_ptr, channels, stride_xl, stride_sd, stride_sc,
                            WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, BLOCK_C: tl.constexpr):
        """Document d's last WIDTH inputs (newest last; zeros before its start) -> state[d, c, :]."""
        d = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < channels
        start = tl.load(cu_ptr + d)
        end = tl.load(cu_ptr + d + 1)
        k = tl.arange(0, WIDTH_P2)
        src = end - WIDTH + k
        ok = (src >= start) & (k < WIDTH)
        vals = tl.load(x_ptr + src[None, :] * stride_xl + c[:, None], mask=c_ok[:, None] & ok[None, :], other=0.0)
        tl.store(state_ptr + d * stride_sd + c[:, None] * stride_sc + k[None, :], vals,
                 mask=c_ok[:, None] & (k < WIDTH)[None, :])


def _check(x, weight, bias, seq_idx):
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be [batch, seqlen, channels], got shape {tuple(x.shape)}")
    channels = x.shape[-1]
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"causal_conv1d: weight must be [channels={channels}, width], got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (channels,):
        raise ValueError(f"causal_conv1d: bias must be [{channels}], got {tuple(bias.shape)}")
    if seq_idx is not None and seq_idx.shape != x.shape[:2]:
        raise ValueError(f"causal_conv1d: seq_idx must be {tuple(x.shape[:2])}, got {tuple(seq_idx.shape)}")


def _prepare(x, weight, seq_idx):
    if x.stride(-1) != 1:
        x = x.contiguous()
    weight = weight.contiguous()
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32)
    return x, weight, seq_idx


def _conv_fwd(x, weight, bias, seq_idx, silu, block_l=BLOCK_L, block_c=BLOCK_C, dout=None):
    """act(conv(x)); given `dout`, the float32 gradient at the pre-activation: dout * silu'(pre)."""
    batch, seqlen, channels = x.shape
    out_dtype = torch.float32 if dout is not None else x.dtype
    out = torch.empty(batch, seqlen, channels, device=x.device, dtype=out_dtype)
    if out.numel() == 0:
        return out
    grid = (batch, triton.cdiv(seqlen, block_l), triton.cdiv(channels, block_c))
    seq = seq_idx if seq_idx is not None else x          # dummy pointers when HAS_SEQ / SILU_GRAD are off
    grad = dout if dout is not None else out
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, seq, out, grad, seqlen, channels,
        x.stride(0), x.stride(1), seq.stride(0) if seq_idx is not None else 0,
        seq.stride(1) if seq_idx is not None else 0, out.stride(0), out.stride(1), grad.stride(0), grad.stride(1),
        WIDTH=weight.shape[-1], HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None, SILU=silu,
        SILU_GRAD=dout is not None, BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4)
    return out


def _conv_bwd(x, weight, bias, seq_idx, dout, silu, block_l=BLOCK_L, block_c=BLOCK_C):
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    # With SiLU, the gradient at the pre-activation is written once (float32) by a forward-like pass; recomputing
    # the pre-activation at each of the K shifted rows inside one kernel cost ~7x the identity backward (H100
    # trainer profile: 2.25 vs 0.34 ms per layer).
    g = _conv_fwd(x, weight, bias, seq_idx, True, block_l, block_c, dout=dout) if silu else dout
    dx = torch.empty(batch, seqlen, channels, device=x.device, dtype=x.dtype)
    n_lblocks = triton.cdiv(seqlen, block_l)
    # float32 partial sums per (row, row block), reduced below: deterministic, unlike atomics
    dw_part = torch.empty(batch * n_lblocks, channels, width, device=x.device, dtype=torch.float32)
    db_part = torch.empty(batch * n_lblocks, channels, device=x.device, dtype=torch.float32) if bias is not None else dw_part
    grid = (batch, n_lblocks, triton.cdiv(channels, block_c))
    seq = seq_idx if seq_idx is not None else x
    _conv_bwd_kernel[grid](
        x, weight, seq, g, dx, dw_part, db_part, seqlen, channels,
        x.stride(0), x.stride(1), seq.stride(0) if seq_idx is not None else 0,
        seq.stride(1) if seq_idx is not None else 0, g.stride(0), g.stride(1), dx.stride(0), dx.stride(1),
        WIDTH=width, HAS_BIAS=bias is not None, HAS_SEQ=seq_idx is not None,
        BLOCK_L=block_l, BLOCK_C=block_c, num_warps=4)
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dweight, dbias


class _CausalConv1d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, seq_idx, silu, block_l, block_c):
        ctx.save_for_backward(x, weight, bias, seq_idx)
        ctx.silu, ctx.blocks = silu, (block_l, block_c)
        return _conv_fwd(x, weight, bias, seq_idx, silu, block_l, block_c)

    @staticmethod
    def backward(ctx, dout):
        x, weight, bias, seq_idx = ctx.saved_tensors
        dx, dweight, dbias = _conv_bwd(x, weight, bias, seq_idx, dout, ctx.silu, *ctx.blocks)
        return dx, dweight, dbias, None, None, None, None


def _activation_is_silu(activation) -> bool:
    if activation in ("silu", "swish"):
        return True
    if activation in (None, "identity"):
        return False
    raise ValueError(f"unknown conv activation {activation!r}")


@torch.compiler.disable   # a Triton launch behind an autograd.Function: keep dynamo out (compile_mode=layers)
def causal_conv1d(x, weight, bias=None, seq_idx=None, activation=None, block_l=BLOCK_L, block_c=BLOCK_C):
    """`ssd.causal_conv1d_ref`'s contract (without `initial_state`), with autograd. weight [c, K]."""
    _check(x, weight, bias, seq_idx)
    silu = _activation_is_silu(activation)
    x, weight, seq_idx = _prepare(x, weight, seq_idx)
    return _CausalConv1d.apply(x, weight, bias, seq_idx, silu, block_l, block_c)


def conv_states(x, width, cu_seqlens, block_c=BLOCK_C):
    """Each document's last `width` inputs [n_docs, c, width] (zeros before its start) of a packed row x [1, l, c]:
    `ssd.conv_state_from_inputs(x, width, cu_seqlens=...)`."""
    if x.shape[0] != 1:
        raise ValueError("conv_states: the documents must be packed in one row (batch 1)")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cu = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
    n_docs, channels = cu.numel() - 1, x.shape[-1]
    states = torch.empty(n_docs, channels, width, device=x.device, dtype=x.dtype)
    if states.numel():
        _conv_states_kernel[(n_docs, triton.cdiv(channels, block_c))](
            x, cu, states, channels, x.stride(1), states.stride(0), states.stride(1),
            WIDTH=width, WIDTH_P2=triton.next_power_of_2(width), BLOCK_C=block_c, num_warps=4)
    return states


@torch.compiler.disable
def causal_conv1d_with_states(x, weight, bias=None, seq_idx=None, cu_seqlens=None, activation=None,
                              block_l=BLOCK_L, block_c=BLOCK_C):
    """Prefill: (conv output, per-document conv states [n_docs, c, K]) for prompts packed in one row; no autograd."""
    _check(x, weight, bias, seq_idx)
    silu = _activation_is_silu(activation)
    x, weight, seq_idx = _prepare(x, weight, seq_idx)
    out = _conv_fwd(x, weight, bias, seq_idx, silu, block_l, block_c)
    return out, conv_states(x, weight.shape[-1], cu_seqlens, block_c)
