"""Fused one-token (decode) kernels in Triton, each with a pure-PyTorch `*_ref` twin (CPU path and test oracle).

`decode_step` is memory- and launch-bound: at batch 1 a layer of a few dozen tiny elementwise kernels costs more
than its GEMMs, and at batch 1024 every extra pass over the fp32 SSM state (150 MB per layer) costs ~0.1 ms.
These kernels cut a Mamba layer to in_proj GEMM, `conv_step`, `ssm_step`, (gated norm), out_proj GEMM, and
the rest of a block to `add_rms_norm` + gate/up GEMM + `silu_mul` + down GEMM; attention gets `rope_kv_write`.
They read views of the in_proj output directly (strides are passed), never copy x/B at KV width to the query
heads (`ssm_step` maps head h to x head h // x_rep), and write the states in place.

Used when `fast_decode_enabled(tensor)`: Triton importable, tensors on CUDA, `THINKFAST_KERNELS` not `ref`; or,
for tests on CPU, `TRITON_INTERPRET=1` (set before import) with `THINKFAST_KERNELS=triton`:

    TRITON_INTERPRET=1 THINKFAST_KERNELS=triton python -m pytest tests/test_models.py -k fast_decode
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton: the *_ref twins run instead
    triton = None
    tl = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fast_decode_enabled(tensor: torch.Tensor) -> bool:
    from .ssd import kernel_mode

    mode = kernel_mode()
    if triton is None or mode == "ref":
        return False
    if tensor.is_cuda:
        return True
    return interpreting() and mode == "triton"


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


# --------------------------------------------------------------------------------------------------
# depthwise causal conv, one token: out = act(sum_k w[k] * window[k] + bias), window = the state's last K - 1
# inputs, then x. conv_state [b, c, K] holds the last K inputs, in one of two orders:
#   linear (positions=None): oldest .. newest; the step shifts the window one tap left (mamba_ssm's convention,
#       what HF generate's cache holds)
#   ring (positions [b] = inputs seen so far): input t at tap t % K; the step writes x's tap only. The decode
#       engine's order: a quarter of the shifted state's writes, and no read of the tap being dropped.


def conv_step_ref(conv_state, x, weight, bias=None, silu=False, positions=None):
    if positions is None:
        conv_state.copy_(torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1))
        window = conv_state
    else:
        batch, channels, width = conv_state.shape
        taps = ring_taps(positions, width)
        conv_state.scatter_(2, taps[:, -1:].view(batch, 1, 1).expand(batch, channels, 1),
                            x.unsqueeze(-1).to(conv_state.dtype))
        window = conv_state.gather(2, taps.view(batch, 1, width).expand(batch, channels, width))
    out = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        out = out + bias.float()
    if silu:
        out = F.silu(out)
    return out.to(x.dtype)


def ring_taps(positions, width):
    """[b, width]: the tap of each window slot, oldest first, for rows that have seen `positions` inputs; the
    last is where the new input goes."""
    return (positions.long().view(-1, 1) + 1 + torch.arange(width, device=positions.device)) % width


def ring_from_linear(conv_state, lengths):
    """Linear-order conv states [n, c, K] of rows that have seen `lengths` inputs -> the ring order."""
    n, channels, width = conv_state.shape
    source = (torch.arange(width, device=conv_state.device) - lengths.long().view(-1, 1)) % width
    return conv_state.gather(2, source.view(n, 1, width).expand(n, channels, width))


if triton is not None:
    @triton.jit
    def _conv_channels(state_ptr, xin_ptr, w_ptr, bias_ptr, cout_ptr, pos_ptr, row, c_lo, count,
                       stride_state_b, stride_state_c, stride_state_k, stride_xin_b, stride_cout_b,
                       WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                       RING: tl.constexpr, BLOCK_C: tl.constexpr):
        """`conv_step_ref` for channels [c_lo, c_lo + count) of one row."""
        k = tl.arange(0, WIDTH_P2)
        if RING:
            pos = tl.load(pos_ptr + row)
            taps = (pos + 1 + k) % WIDTH
            newest = pos % WIDTH
        else:
            taps = k + 1
        for c0 in range(0, count, BLOCK_C):
            local = c0 + tl.arange(0, BLOCK_C)
            c = c_lo + local
            c_ok = local < count
            state_ptrs = state_ptr + row * stride_state_b + c[:, None] * stride_state_c
            # every load happens before the store (linear order: it overlaps the loaded taps)
            kept = tl.load(state_ptrs + taps[None, :] * stride_state_k,
                           mask=c_ok[:, None] & (k[None, :] + 1 < WIDTH), other=0.0)
            x = tl.load(xin_ptr + row * stride_xin_b + c, mask=c_ok, other=0.0)
            window = tl.where(k[None, :] == WIDTH - 1, x.to(kept.dtype)[:, None], kept)
            w = tl.load(w_ptr + c[:, None] * WIDTH + k[None, :], mask=c_ok[:, None] & (k[None, :] < WIDTH), other=0.0)
            acc = tl.sum(window.to(tl.float32) * w.to(tl.float32), axis=1)
            if HAS_BIAS:
                acc += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
            if SILU:
                acc = acc * tl.sigmoid(acc)
            if RING:
                tl.store(state_ptr + row * stride_state_b + c * stride_state_c + newest * stride_state_k,
                         x.to(kept.dtype), mask=c_ok)
            else:
                tl.store(state_ptrs + k[None, :] * stride_state_k, window, mask=c_ok[:, None] & (k[None, :] < WIDTH))
            tl.store(cout_ptr + row * stride_cout_b + c, acc.to(cout_ptr.dtype.element_ty), mask=c_ok)

    @triton.jit
    def _conv_step_kernel(state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr, pos_ptr, channels,
                          stride_state_b, stride_state_c, stride_state_k, stride_x_b, stride_out_b,
                          WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                          RING: tl.constexpr, BLOCK_C: tl.constexpr):
        c_lo = tl.program_id(1) * BLOCK_C
        _conv_channels(state_ptr, x_ptr, w_ptr, bias_ptr, out_ptr, pos_ptr, tl.program_id(0), c_lo,
                       tl.minimum(channels - c_lo, BLOCK_C), stride_state_b, stride_state_c, stride_state_k,
                       stride_x_b, stride_out_b, WIDTH, WIDTH_P2, HAS_BIAS, SILU, RING, BLOCK_C)


def conv_step(conv_state, x, weight, bias=None, silu=False, positions=None):
    """x [b, c] (last dim contiguous; may be a column slice), weight [c, K] contiguous; state updated in place
    (any strides; positions: see the orders above)."""
    if not fast_decode_enabled(x):
        return conv_step_ref(conv_state, x, weight, bias, silu, positions)
    batch, channels = x.shape
    width = weight.shape[-1]
    assert x.stride(-1) == 1 and weight.is_contiguous() and conv_state.shape == (batch, channels, width)
    out = torch.empty(batch, channels, device=x.device, dtype=x.dtype)
    block = CONV_STEP_CONFIG["block_c"]
    _conv_step_kernel[(batch, triton.cdiv(channels, block))](
        conv_state, x, weight, bias if bias is not None else weight, out,
        positions if positions is not None else weight, channels,
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), x.stride(0), out.stride(0),
        WIDTH=width, WIDTH_P2=_pow2(width), HAS_BIAS=bias is not None, SILU=silu, RING=positions is not None,
        BLOCK_C=block, num_warps=CONV_STEP_CONFIG["num_warps"])
    return out


CONV_STEP_CONFIG = {"block_c": 256, "num_warps": 4}      # scripts/profile_decode.py --sweep-conv (H100)


# --------------------------------------------------------------------------------------------------
# SSM recurrence, one token, both students:
#   dt' = softplus(dt + dt_bias) (or dt + dt_bias);  A = -exp(A_log)
#   state = exp(A dt') state + (x if discrete else dt' x) outer B;   y = state @ C + D x;   y *= silu(z + z_bias)
# state [b, h, p, n]; x [b, h / x_rep, p] (head h reads x head h // x_rep: MambaInLlama's KV-width x);
# B [b, gB, n], C [b, gC, n] (head h reads group h // (h_total / g)); dt [b, h]; z [b, h, p]; z_bias [h * p].


def ssm_step_ref(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, z_bias=None, dt_softplus=True,
                 discrete=False):
    batch, nheads, headdim, _ = state.shape
    xf = x.float().repeat_interleave(nheads // x.shape[1], dim=1)
    Bf = B.float().repeat_interleave(nheads // B.shape[1], dim=1)
    Cf = C.float().repeat_interleave(nheads // C.shape[1], dim=1)
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0.0)
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt * -torch.exp(A_log.float()))
    inp = xf if discrete else xf * dt.unsqueeze(-1)
    new_state = state.float() * decay[..., None, None] + inp.unsqueeze(-1) * Bf.unsqueeze(-2)
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, Cf)
    if D is not None:
        y = y + xf * D.float().view(1, nheads, 1)
    if z is not None:
        zf = z.float().view(batch, nheads, headdim)
        if z_bias is not None:
            zf = zf + z_bias.float().view(nheads, headdim)
        y = y * F.silu(zf)
    return y.to(x.dtype)


if triton is not None:
    @triton.jit
    def _softplus(v):
        # F.softplus (threshold 20) in float32
        return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)

    @triton.jit
    def _ssm_head_update(state_ptrs, tile_ok, x, Bv, Cv, row, head, p, p_ok, headdim,
                         dt_ptr, stride_dt_b, dt_bias_ptr, A_log_ptr, D_ptr, z_ptr, stride_z_b, z_bias_ptr,
                         out_ptr, stride_out_b,
                         HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DISCRETE: tl.constexpr,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_Z_BIAS: tl.constexpr):
        # one head of one row, given its loaded x [p], B and C [n] and its state tile's pointers: the recurrence
        # above, the state written back in place, y (gated) stored; shared by both step kernels
        dt = tl.load(dt_ptr + row * stride_dt_b + head).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + head).to(tl.float32)
        if DT_SOFTPLUS:
            dt = _softplus(dt)
        decay = tl.exp(-tl.exp(tl.load(A_log_ptr + head).to(tl.float32)) * dt)
        state = tl.load(state_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        if DISCRETE:
            inp = x
        else:
            inp = x * dt
        state = state * decay + inp[:, None] * Bv[None, :]
        tl.store(state_ptrs, state.to(state_ptrs.dtype.element_ty), mask=tile_ok)
        y = tl.sum(state * Cv[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + head).to(tl.float32)
        if HAS_Z:
            z = tl.load(z_ptr + row * stride_z_b + head * headdim + p, mask=p_ok, other=0.0).to(tl.float32)
            if HAS_Z_BIAS:
                z += tl.load(z_bias_ptr + head * headdim + p, mask=p_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(out_ptr + row * stride_out_b + head * headdim + p, y.to(out_ptr.dtype.element_ty), mask=p_ok)

if triton is not None:
    @triton.jit
    def _ssm_step_kernel(state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_log_ptr, B_ptr, C_ptr, D_ptr, z_ptr, z_bias_ptr,
                         out_ptr, headdim, dstate, x_rep, b_rep, c_rep,
                         stride_state_b, stride_state_h, stride_state_p, stride_state_n,
                         stride_x_b, stride_x_h, stride_dt_b, stride_B_b, stride_B_g, stride_C_b, stride_C_g,
                         stride_z_b, stride_out_b,
                         HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr, DISCRETE: tl.constexpr,
                         HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_Z_BIAS: tl.constexpr,
                         BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        row = tl.program_id(1)
        head = tl.program_id(2)
        n = tl.arange(0, BLOCK_N)
        p_ok, n_ok = p < headdim, n < dstate

        x = tl.load(x_ptr + row * stride_x_b + (head // x_rep) * stride_x_h + p, mask=p_ok, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + row * stride_B_b + (head // b_rep) * stride_B_g + n, mask=n_ok, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + row * stride_C_b + (head // c_rep) * stride_C_g + n, mask=n_ok, other=0.0).to(tl.float32)
        state_ptrs = (state_ptr + row * stride_state_b + head * stride_state_h
                      + p[:, None] * stride_state_p + n[None, :] * stride_state_n)
        _ssm_head_update(state_ptrs, p_ok[:, None] & n_ok[None, :], x, Bv, Cv, row, head, p, p_ok, headdim,
                         dt_ptr, stride_dt_b, dt_bias_ptr, A_log_ptr, D_ptr, z_ptr, stride_z_b, z_bias_ptr,
                         out_ptr, stride_out_b, HAS_DT_BIAS, DT_SOFTPLUS, DISCRETE, HAS_D, HAS_Z, HAS_Z_BIAS)


# per state element size (fp32 / bf16 state): H100 sweeps of the kernel alone at Llamba's shape, batch 256 (bf16:
# 32 x 64 tiles 0.010 ms vs 0.014 ms for 16 x 64, but with the state L2-resident; a whole bench step did not move)
SSM_STEP_CONFIG = {4: {"block_p": 16, "num_warps": 4}, 2: {"block_p": 32, "num_warps": 4}}


def ssm_step(state, x, dt, A_log, B, C, D=None, z=None, dt_bias=None, z_bias=None, dt_softplus=True, discrete=False):
    """One token of the SSM for every row; `state` updated in place; returns y [b, h, p] in x's dtype.
    x/B/C/dt/z may be strided views (last dim contiguous), e.g. column slices of the in_proj output."""
    if not fast_decode_enabled(x):
        return ssm_step_ref(state, x, dt, A_log, B, C, D, z, dt_bias, z_bias, dt_softplus, discrete)
    batch, nheads, headdim, dstate = state.shape
    for name, t in (("x", x), ("B", B), ("C", C), ("dt", dt), ("z", z)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"ssm_step: {name} needs a contiguous last dimension")
    if z is not None and z.dim() == 3 and z.stride(1) != headdim:
        raise ValueError("ssm_step: z heads must be adjacent (stride headdim)")
    out = torch.empty(batch, nheads, headdim, device=x.device, dtype=x.dtype)
    # a program owns a [block_p, dstate] tile of one (row, head): the state is read and written once, rows of
    # dstate contiguous values (coalesced); `SSM_STEP_CONFIG` is tunable (scripts/profile_decode.py --sweep-ssm)
    config = SSM_STEP_CONFIG[4 if state.element_size() >= 4 else 2]
    block_p = min(config["block_p"], _pow2(headdim))
    dummy = A_log
    _ssm_step_kernel[(triton.cdiv(headdim, block_p), batch, nheads)](
        state, x, dt, dt_bias if dt_bias is not None else dummy, A_log, B, C, D if D is not None else dummy,
        z if z is not None else x, z_bias if z_bias is not None else dummy, out,
        headdim, dstate, nheads // x.shape[1], nheads // B.shape[1], nheads // C.shape[1],
        state.stride(0), state.stride(1), state.stride(2), state.stride(3),
        x.stride(0), x.stride(1), dt.stride(0), B.stride(0), B.stride(1), C.stride(0), C.stride(1),
        z.stride(0) if z is not None else 0, out.stride(0),
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, DISCRETE=discrete, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_Z_BIAS=z_bias is not None, BLOCK_P=block_p, BLOCK_N=_pow2(dstate),
        num_warps=config["num_warps"])
    return out


# --------------------------------------------------------------------------------------------------
# conv + SSM step in one launch (one kernel less per Mamba layer, and the conv output never leaves L2)
#
# A program owns one row and `heads_per_prog` consecutive heads, chosen so that every x head, B group and C group
# those heads read belongs to this program alone: heads_per_prog = the largest of the x / B / C repeat factors
# (Llamba: B/C groups; MambaInLlama: x/B at KV width), and each factor must divide it. The program first runs
# the conv for exactly those channels (conv state updated in place, output rounded to the input dtype into a
# scratch row, as `conv_step` does), then, after a barrier (other threads of the program wrote that scratch), the
# SSM recurrence of its heads over whole [headdim, dstate] tiles. No other program reads those conv channels, so
# the in-place update cannot race with a reader of the old window.


def conv_ssm_step_ref(conv_state, xBC, conv_weight, conv_bias, conv_silu, ssm_state, x_heads, b_groups, dt, A_log,
                      D=None, z=None, dt_bias=None, z_bias=None, dt_softplus=True, discrete=False, positions=None):
    """`conv_step` on xBC [b, conv_dim] (channels x, B, C), then `ssm_step` with x at `x_heads` heads of headdim,
    B at `b_groups` groups and C at the remaining (conv_dim - x - B) / d_state groups. Returns y [b, h, p]."""
    return _conv_then_ssm(conv_step_ref, ssm_step_ref, conv_state, xBC, conv_weight, conv_bias, conv_silu,
                          ssm_state, x_heads, b_groups, dt, A_log, D, z, dt_bias, z_bias, dt_softplus, discrete,
                          positions)


def _xbc_split(xBC, ssm_state, x_heads, b_groups):
    _, nheads, headdim, dstate = ssm_state.shape
    d_x, d_b = x_heads * headdim, b_groups * dstate
    d_c = xBC.shape[-1] - d_x - d_b
    c_groups = d_c // dstate if d_c > 0 else 0
    if c_groups * dstate != d_c or not c_groups or any(nheads % g for g in (x_heads, b_groups, c_groups)):
        raise ValueError(f"conv_ssm_step: {xBC.shape[-1]} conv channels do not split into x ({x_heads} x {headdim}), "
                         f"B ({b_groups} x {dstate}) and C (groups of {dstate} dividing {nheads} heads)")
    return d_x, d_b, d_c, c_groups


def _conv_then_ssm(conv_fn, ssm_fn, conv_state, xBC, conv_weight, conv_bias, conv_silu, ssm_state, x_heads, b_groups,
                   dt, A_log, D, z, dt_bias, z_bias, dt_softplus, discrete, positions):
    batch, _, headdim, dstate = ssm_state.shape
    d_x, d_b, d_c, c_groups = _xbc_split(xBC, ssm_state, x_heads, b_groups)
    x, B, C = conv_fn(conv_state, xBC, conv_weight, conv_bias, conv_silu, positions).split([d_x, d_b, d_c], dim=-1)
    return ssm_fn(ssm_state, x.view(batch, x_heads, headdim), dt, A_log, B.view(batch, b_groups, dstate),
                  C.view(batch, c_groups, dstate), D, z, dt_bias, z_bias, dt_softplus, discrete)


if triton is not None:
    @triton.jit
    def _conv_ssm_step_kernel(conv_state_ptr, xin_ptr, conv_w_ptr, conv_bias_ptr, cout_ptr, pos_ptr,
                              state_ptr, dt_ptr, dt_bias_ptr, A_log_ptr, D_ptr, z_ptr, z_bias_ptr, out_ptr,
                              headdim, dstate, heads_per_prog, x_rep, b_rep, c_rep, d_x, d_b,
                              stride_cs_b, stride_cs_c, stride_cs_k, stride_xin_b, stride_cout_b,
                              stride_state_b, stride_state_h, stride_state_p, stride_state_n,
                              stride_dt_b, stride_z_b, stride_out_b,
                              WIDTH: tl.constexpr, WIDTH_P2: tl.constexpr, HAS_CONV_BIAS: tl.constexpr,
                              CONV_SILU: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
                              DISCRETE: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                              HAS_Z_BIAS: tl.constexpr, RING: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        h0 = tl.program_id(1) * heads_per_prog
        # 1. conv over the channels only this program reads: its x heads, B groups, C groups
        _conv_channels(conv_state_ptr, xin_ptr, conv_w_ptr, conv_bias_ptr, cout_ptr, pos_ptr, row,
                       (h0 // x_rep) * headdim, (heads_per_prog // x_rep) * headdim,
                       stride_cs_b, stride_cs_c, stride_cs_k, stride_xin_b, stride_cout_b,
                       WIDTH, WIDTH_P2, HAS_CONV_BIAS, CONV_SILU, RING, BLOCK_C)
        _conv_channels(conv_state_ptr, xin_ptr, conv_w_ptr, conv_bias_ptr, cout_ptr, pos_ptr, row,
                       d_x + (h0 // b_rep) * dstate, (heads_per_prog // b_rep) * dstate,
                       stride_cs_b, stride_cs_c, stride_cs_k, stride_xin_b, stride_cout_b,
                       WIDTH, WIDTH_P2, HAS_CONV_BIAS, CONV_SILU, RING, BLOCK_C)
        _conv_channels(conv_state_ptr, xin_ptr, conv_w_ptr, conv_bias_ptr, cout_ptr, pos_ptr, row,
                       d_x + d_b + (h0 // c_rep) * dstate, (heads_per_prog // c_rep) * dstate,
                       stride_cs_b, stride_cs_c, stride_cs_k, stride_xin_b, stride_cout_b,
                       WIDTH, WIDTH_P2, HAS_CONV_BIAS, CONV_SILU, RING, BLOCK_C)
        # the SSM below reads conv outputs other threads of this program just wrote
        tl.debug_barrier()
        # 2. the SSM step of each head: `_ssm_step_kernel`'s body over a whole [headdim, dstate] tile
        p = tl.arange(0, BLOCK_P)
        n = tl.arange(0, BLOCK_N)
        p_ok, n_ok = p < headdim, n < dstate
        tile_ok = p_ok[:, None] & n_ok[None, :]
        cout_row = cout_ptr + row * stride_cout_b
        for i in range(0, heads_per_prog):
            head = h0 + i
            x = tl.load(cout_row + (head // x_rep) * headdim + p, mask=p_ok, other=0.0).to(tl.float32)
            Bv = tl.load(cout_row + d_x + (head // b_rep) * dstate + n, mask=n_ok, other=0.0).to(tl.float32)
            Cv = tl.load(cout_row + d_x + d_b + (head // c_rep) * dstate + n, mask=n_ok, other=0.0).to(tl.float32)
            state_ptrs = (state_ptr + row.to(tl.int64) * stride_state_b + head * stride_state_h
                          + p[:, None] * stride_state_p + n[None, :] * stride_state_n)
            _ssm_head_update(state_ptrs, tile_ok, x, Bv, Cv, row, head, p, p_ok, headdim,
                             dt_ptr, stride_dt_b, dt_bias_ptr, A_log_ptr, D_ptr, z_ptr, stride_z_b, z_bias_ptr,
                             out_ptr, stride_out_b, HAS_DT_BIAS, DT_SOFTPLUS, DISCRETE, HAS_D, HAS_Z, HAS_Z_BIAS)


CONV_SSM_STEP_CONFIG = {"num_warps": 4, "block_c": 64}


def use_fused_conv_ssm() -> bool:
    """`THINKFAST_DECODE_CONV=fused` runs conv_step + ssm_step as one launch; default `separate` (two launches, the
    path checked on an H100) until `scripts/profile_decode.py --check` has passed on a GPU."""
    mode = os.environ.get("THINKFAST_DECODE_CONV", "separate")
    if mode not in ("fused", "separate"):
        raise ValueError(f"THINKFAST_DECODE_CONV must be fused or separate, got {mode!r}")
    return mode == "fused"


def conv_ssm_step(conv_state, xBC, conv_weight, conv_bias, conv_silu, ssm_state, x_heads, b_groups, dt, A_log,
                  D=None, z=None, dt_bias=None, z_bias=None, dt_softplus=True, discrete=False, positions=None):
    """`conv_ssm_step_ref`'s contract in one kernel (two, `conv_step` + `ssm_step`, where the head layout does
    not split into disjoint programs or `THINKFAST_DECODE_CONV=separate`). xBC, dt and z may be column views of
    the in_proj output (last dim contiguous); conv_weight [conv_dim, d_conv] contiguous; states updated in place."""
    if not fast_decode_enabled(xBC):
        return conv_ssm_step_ref(conv_state, xBC, conv_weight, conv_bias, conv_silu, ssm_state, x_heads, b_groups,
                                 dt, A_log, D, z, dt_bias, z_bias, dt_softplus, discrete, positions)
    batch, nheads, headdim, dstate = ssm_state.shape
    d_x, d_b, _, c_groups = _xbc_split(xBC, ssm_state, x_heads, b_groups)
    reps = (nheads // x_heads, nheads // b_groups, nheads // c_groups)
    heads_per_prog = max(reps)
    if not use_fused_conv_ssm() or _CONV_SSM_BROKEN or any(heads_per_prog % r for r in reps):
        return _conv_then_ssm(conv_step, ssm_step, conv_state, xBC, conv_weight, conv_bias, conv_silu, ssm_state,
                              x_heads, b_groups, dt, A_log, D, z, dt_bias, z_bias, dt_softplus, discrete, positions)
    for name, t in (("xBC", xBC), ("dt", dt), ("z", z)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"conv_ssm_step: {name} needs a contiguous last dimension")
    width = conv_weight.shape[-1]
    assert conv_weight.is_contiguous() and conv_state.shape == (batch, xBC.shape[1], width)
    conv_out = torch.empty(batch, xBC.shape[1], device=xBC.device, dtype=xBC.dtype)
    out = torch.empty(batch, nheads, headdim, device=xBC.device, dtype=xBC.dtype)
    dummy = A_log
    # states are updated in place: on a launch failure (compile error on a new GPU/Triton) nothing ran yet,
    # so the two-kernel path can take over
    try:
        _launch_conv_ssm(conv_state, xBC, conv_weight, conv_bias, conv_silu, conv_out, ssm_state, dt, A_log, D, z,
                         dt_bias, z_bias, dt_softplus, discrete, out, heads_per_prog, reps, d_x, d_b, width, dummy,
                         positions)
    except Exception as err:  # noqa: BLE001
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        import warnings

        _CONV_SSM_BROKEN.append(repr(err))
        warnings.warn(f"fused conv + SSM step failed ({str(err)[:300]}); two kernels from now on")
        return _conv_then_ssm(conv_step, ssm_step, conv_state, xBC, conv_weight, conv_bias, conv_silu, ssm_state,
                              x_heads, b_groups, dt, A_log, D, z, dt_bias, z_bias, dt_softplus, discrete, positions)
    return out


_CONV_SSM_BROKEN: list[str] = []


def _launch_conv_ssm(conv_state, xBC, conv_weight, conv_bias, conv_silu, conv_out, ssm_state, dt, A_log, D, z,
                     dt_bias, z_bias, dt_softplus, discrete, out, heads_per_prog, reps, d_x, d_b, width, dummy,
                     positions):
    batch, nheads, headdim, dstate = ssm_state.shape
    _conv_ssm_step_kernel[(batch, nheads // heads_per_prog)](
        conv_state, xBC, conv_weight, conv_bias if conv_bias is not None else conv_weight, conv_out,
        positions if positions is not None else dummy, ssm_state, dt, dt_bias if dt_bias is not None else dummy,
        A_log, D if D is not None else dummy, z if z is not None else xBC, z_bias if z_bias is not None else dummy, out,
        headdim, dstate, heads_per_prog, reps[0], reps[1], reps[2], d_x, d_b,
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), xBC.stride(0), conv_out.stride(0),
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), ssm_state.stride(3),
        dt.stride(0), z.stride(0) if z is not None else 0, out.stride(0),
        WIDTH=width, WIDTH_P2=_pow2(width), HAS_CONV_BIAS=conv_bias is not None, CONV_SILU=conv_silu,
        HAS_DT_BIAS=dt_bias is not None, DT_SOFTPLUS=dt_softplus, DISCRETE=discrete, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_Z_BIAS=z_bias is not None, RING=positions is not None,
        BLOCK_C=CONV_SSM_STEP_CONFIG["block_c"],        BLOCK_P=_pow2(headdim), BLOCK_N=_pow2(dstate), num_warps=CONV_SSM_STEP_CONFIG["num_warps"])


# --------------------------------------------------------------------------------------------------
# Llamba's discrete scan over whole sequences (prefill): the elementwise work around the SSD scan in one pass each
#   before:  dt' = softplus(dt);  x' = x / dt'        (the scan multiplies by dt' again, so x enters unscaled)
#   after:   out = (y + D x) * silu(z + z_bias)
# Eager, these were ~10 passes over [tokens, d_inner] with fp32 intermediates per layer (H100 prefill profile).
# x [T, h, p] / z [T, h * p] may be strided row views of the in_proj output (heads adjacent, last dim contiguous).


def discrete_scan_inputs_ref(x, dt):
    """x [..., h, p], dt [..., h] (before softplus) -> (x / softplus(dt) in x's dtype, softplus(dt) float32)."""
    dt = F.softplus(dt.float())
    return (x / dt.unsqueeze(-1)).to(x.dtype), dt


def skip_gate_ref(y, x, D, z, z_bias):
    """y, x [..., h, p]; D [h]; z [..., h * p]; z_bias [h * p] -> (y + D x) * silu(z + z_bias) as [..., h * p] in
    y's dtype, float32 arithmetic (one rounding, as the decode step's kernel)."""
    out = y.float() + x.float() * D.float().view(-1, 1)
    return (out.flatten(-2) * F.silu(z.float() + z_bias.float())).to(y.dtype)


if triton is not None:
    @triton.jit
    def _discrete_inputs_kernel(x_ptr, dt_ptr, xs_ptr, dts_ptr, rows, width, headdim, stride_x, stride_dt,
                                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        ok = (t < rows)[:, None] & (c < width)[None, :]
        head = c // headdim
        dt = tl.load(dt_ptr + t[:, None] * stride_dt + head[None, :], mask=ok, other=0.0).to(tl.float32)
        dt = _softplus(dt)
        x = tl.load(x_ptr + t[:, None] * stride_x + c[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(xs_ptr + t[:, None] * width + c[None, :], (x / dt).to(xs_ptr.dtype.element_ty), mask=ok)
        nheads = width // headdim
        tl.store(dts_ptr + t[:, None] * nheads + head[None, :], dt, mask=ok & (c % headdim == 0)[None, :])

    @triton.jit
    def _skip_gate_kernel(y_ptr, x_ptr, D_ptr, z_ptr, z_bias_ptr, out_ptr, rows, width, headdim,
                          stride_y, stride_x, stride_z, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = c < width
        ok = (t < rows)[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + t[:, None] * stride_y + c[None, :], mask=ok, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + t[:, None] * stride_x + c[None, :], mask=ok, other=0.0).to(tl.float32)
        D = tl.load(D_ptr + c // headdim, mask=c_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + t[:, None] * stride_z + c[None, :], mask=ok, other=0.0).to(tl.float32)
        z += tl.load(z_bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out = (y + x * D[None, :]) * z * tl.sigmoid(z)
        tl.store(out_ptr + t[:, None] * width + c[None, :], out.to(out_ptr.dtype.element_ty), mask=ok)


_ELEMENTWISE_TILE = {"block_t": 16, "block_c": 128, "num_warps": 4}


def _rows(t: torch.Tensor, name: str, width: int) -> torch.Tensor:
    """t [..., width] (or [..., h, p] with heads adjacent) as [rows, width] with a row stride (a view if it can)."""
    flat = t.flatten(-2) if t.shape[-1] != width else t
    if flat.stride(-1) != 1 or flat.shape[-1] != width:
        raise ValueError(f"{name}: needs [..., {width}] rows with a contiguous last dimension")
    try:
        return flat.view(-1, width)
    except RuntimeError:        # leading dimensions that do not merge: one copy
        return flat.reshape(-1, width)


def _use_elementwise_kernels(x: torch.Tensor) -> bool:
    # no autograd through these launches: training runs the reference (eager; the mixers are not compiled)
    return fast_decode_enabled(x) and not torch.is_grad_enabled()


def discrete_scan_inputs(x, dt):
    """`discrete_scan_inputs_ref` in one kernel (inference); returns ([..., h, p] contiguous, [..., h] float32)."""
    if not _use_elementwise_kernels(x):
        return discrete_scan_inputs_ref(x, dt)
    nheads, headdim = x.shape[-2:]
    width = nheads * headdim
    x2, dt2 = _rows(x, "discrete_scan_inputs: x", width), _rows(dt, "discrete_scan_inputs: dt", nheads)
    xs = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    dts = torch.empty(dt.shape, device=x.device, dtype=torch.float32)
    rows, tile = x2.shape[0], _ELEMENTWISE_TILE
    if rows:
        _discrete_inputs_kernel[(triton.cdiv(rows, tile["block_t"]), triton.cdiv(width, tile["block_c"]))](
            x2, dt2, xs, dts, rows, width, headdim, x2.stride(0), dt2.stride(0),
            BLOCK_T=tile["block_t"], BLOCK_C=tile["block_c"], num_warps=tile["num_warps"])
    return xs, dts


def skip_gate(y, x, D, z, z_bias):
    """`skip_gate_ref` in one kernel (inference); returns [..., h * p] in y's dtype."""
    if not _use_elementwise_kernels(y):
        return skip_gate_ref(y, x, D, z, z_bias)
    nheads, headdim = y.shape[-2:]
    width = nheads * headdim
    y2, x2 = _rows(y, "skip_gate: y", width), _rows(x, "skip_gate: x", width)
    z2 = _rows(z, "skip_gate: z", width)
    out = torch.empty(*y.shape[:-2], width, device=y.device, dtype=y.dtype)
    rows, tile = y2.shape[0], _ELEMENTWISE_TILE
    if rows:
        _skip_gate_kernel[(triton.cdiv(rows, tile["block_t"]), triton.cdiv(width, tile["block_c"]))](
            y2, x2, D, z2, z_bias, out, rows, width, headdim, y2.stride(0), x2.stride(0), z2.stride(0),
            BLOCK_T=tile["block_t"], BLOCK_C=tile["block_c"], num_warps=tile["num_warps"])
    return out


# --------------------------------------------------------------------------------------------------
# residual add + RMSNorm (Llama's: normalise in fp32, round to the input dtype, then scale)


def add_rms_norm_ref(x, residual, weight, eps):
    """Returns (rmsnorm(x + residual) * weight, x + residual); residual None means x alone."""
    hidden = x if residual is None else x + residual
    h = hidden.float()
    normed = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(hidden.dtype)
    return weight * normed, hidden


if triton is not None:
    @triton.jit
    def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, width, eps, stride_x, stride_res,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        ok = cols < width
        h = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0)
        if HAS_RES:
            h = h + tl.load(res_ptr + row * stride_res + cols, mask=ok, other=0.0)
            tl.store(sum_ptr + row * width + cols, h, mask=ok)
        hf = h.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / width + eps)
        normed = (hf * inv).to(h.dtype)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0)
        tl.store(out_ptr + row * width + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x, residual, weight, eps):
    if not fast_decode_enabled(x):
        return add_rms_norm_ref(x, residual, weight, eps)
    batch, width = x.shape
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    hidden = x if residual is None else torch.empty_like(out)
    _add_rms_norm_kernel[(batch,)](x, residual if residual is not None else x, weight, out, hidden, width, eps,
                                   x.stride(0), residual.stride(0) if residual is not None else 0,
                                   HAS_RES=residual is not None, BLOCK=_pow2(width), num_warps=4)
    return out, hidden


# --------------------------------------------------------------------------------------------------
# Llama MLP activation: silu(gate) * up (rounded like eager: silu output in the input dtype)


def silu_mul_ref(gate, up):
    return F.silu(gate) * up


if triton is not None:
    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, width, stride_g, stride_u, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < width
        g = tl.load(g_ptr + row * stride_g + cols, mask=ok, other=0.0)
        u = tl.load(u_ptr + row * stride_u + cols, mask=ok, other=0.0)
        gf = g.to(tl.float32)
        act = (gf * tl.sigmoid(gf)).to(g.dtype)
        tl.store(out_ptr + row * width + cols, act * u, mask=ok)


def silu_mul(gate, up):
    if not fast_decode_enabled(gate):
        return silu_mul_ref(gate, up)
    batch, width = gate.shape
    out = torch.empty(batch, width, device=gate.device, dtype=gate.dtype)
    block = 512
    _silu_mul_kernel[(batch, triton.cdiv(width, block))](gate, up, out, width, gate.stride(0), up.stride(0),
                                                         BLOCK=block, num_warps=4)
    return out


# --------------------------------------------------------------------------------------------------
# attention: RoPE on q and k, k and v written into the caches at each row's position


def rope_kv_write_ref(q, k, v, cos, sin, k_cache, v_cache, positions):
    """q [b, hq, d], k/v [b, hkv, d], cos/sin [b, d] (HF layout: both halves equal); writes k (rotated) and v at
    k_cache[b, :, positions[b]]; returns rotated q [b, hq, d]."""
    def rotate(t):
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)
        return (t * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(t.dtype)

    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, :, positions] = rotate(k).to(k_cache.dtype)
    v_cache[rows, :, positions] = v.to(v_cache.dtype)
    return rotate(q)


if triton is not None:
    @triton.jit
    def _rope_kv_write_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr,
                              n_q, n_kv, stride_qkv_b, stride_cos_b,
                              stride_kc_b, stride_kc_h, stride_kc_s, stride_vc_b, stride_vc_h, stride_vc_s,
                              HALF: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)                      # 0..n_q-1: q, then n_kv k heads, then n_kv v heads
        i = tl.arange(0, HALF)
        base = qkv_ptr + row * stride_qkv_b + head * 2 * HALF
        lo = tl.load(base + i)
        hi = tl.load(base + HALF + i)
        pos = tl.load(pos_ptr + row).to(tl.int64)
        if head < n_q + n_kv:
            c_lo = tl.load(cos_ptr + row * stride_cos_b + i).to(tl.float32)
            c_hi = tl.load(cos_ptr + row * stride_cos_b + HALF + i).to(tl.float32)
            s_lo = tl.load(sin_ptr + row * stride_cos_b + i).to(tl.float32)
            s_hi = tl.load(sin_ptr + row * stride_cos_b + HALF + i).to(tl.float32)
            lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
            new_lo = (lo_f * c_lo - hi_f * s_lo).to(lo.dtype)
            new_hi = (hi_f * c_hi + lo_f * s_hi).to(lo.dtype)
            if head < n_q:
                dst = q_out_ptr + (row * n_q + head) * 2 * HALF
            else:
                dst = k_cache_ptr + row * stride_kc_b + (head - n_q) * stride_kc_h + pos * stride_kc_s
            tl.store(dst + i, new_lo.to(dst.dtype.element_ty))
            tl.store(dst + HALF + i, new_hi.to(dst.dtype.element_ty))
        else:
            dst = v_cache_ptr + row * stride_vc_b + (head - n_q - n_kv) * stride_vc_h + pos * stride_vc_s
            tl.store(dst + i, lo.to(dst.dtype.element_ty))
            tl.store(dst + HALF + i, hi.to(dst.dtype.element_ty))


def rope_kv_write(qkv, n_q, n_kv, cos, sin, k_cache, v_cache, positions):
    """qkv [b, (n_q + 2 n_kv) * d] (one fused projection, rows q, k, v); returns rotated q [b, n_q, d]."""
    batch = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if not fast_decode_enabled(qkv) or head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        q, k, v = qkv.split([n_q * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
        return rope_kv_write_ref(q.view(batch, n_q, head_dim), k.view(batch, n_kv, head_dim),
                                 v.view(batch, n_kv, head_dim), cos, sin, k_cache, v_cache, positions)
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    q_out = torch.empty(batch, n_q, head_dim, device=qkv.device, dtype=qkv.dtype)
    _rope_kv_write_kernel[(batch, n_q + 2 * n_kv)](
        qkv, cos, sin, positions, q_out, k_cache, v_cache, n_q, n_kv, qkv.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), HALF=head_dim // 2, num_warps=1)
    return q_out


# --------------------------------------------------------------------------------------------------
# attention over the KV cache, one query token per row (flash-decoding)
#
# The cache is [b, n_kv, max_seqlen, d] but row b holds only seqlens[b] + 1 keys (the new token's K/V were just
# written at position seqlens[b]). The SDPA path reads all max_seqlen keys under an additive mask; this kernel
# reads only the valid prefix. One program serves the `groups` query heads that share a KV head (GQA), so every
# K/V tile is read once; the query rows are padded to 16 for tl.dot. At small batch there are too few (row,
# kv head) pairs to fill the GPU, so the sequence is split into `num_splits` chunks (split-K), each program
# writes a partial output with its log-sum-exp, and a second kernel merges them. The split count depends only
# on static shapes (batch, heads, max_seqlen), so the step stays CUDA-graph capturable.


def attention_decode_ref(q, k_cache, v_cache, seqlens, scale):
    """q [b, hq, d] (rotated), caches [b, hkv, s, d]; row b attends to keys 0..seqlens[b]. Returns [b, hq, d]."""
    batch, n_q, head_dim = q.shape
    n_kv, max_seqlen = k_cache.shape[1], k_cache.shape[2]
    key_pos = torch.arange(max_seqlen, device=q.device)
    allowed = key_pos.view(1, -1) <= seqlens.view(-1, 1).long()
    mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    # the query heads of one KV head attend as a block of rows: no K/V repeat
    qg = q.view(batch, n_kv, n_q // n_kv, head_dim)
    out = F.scaled_dot_product_attention(qg, k_cache.to(q.dtype), v_cache.to(q.dtype),
                                         attn_mask=mask.view(batch, 1, 1, max_seqlen), scale=scale)
    return out.reshape(batch, n_q, head_dim)


if triton is not None:
    @triton.jit
    def _attention_decode_kernel(q_ptr, k_ptr, v_ptr, seqlens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                                 scale_log2e, groups, n_kv, chunk, head_dim, max_seqlen,
                                 stride_q_b, stride_q_h, stride_k_b, stride_k_h, stride_k_s,
                                 stride_v_b, stride_v_h, stride_v_s, stride_out_b, stride_out_h,
                                 NUM_SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                                 BLOCK_D: tl.constexpr, IEEE: tl.constexpr):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        g_ok, d_ok = g < groups, d < head_dim
        q_heads = kv_head * groups + g
        q = tl.load(q_ptr + row * stride_q_b + q_heads[:, None] * stride_q_h + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0)
        # keys 0..seqlens[row]; never past the cache end (a slot run to the end must not read the next row)
        length = tl.minimum(tl.load(seqlens_ptr + row).to(tl.int32) + 1, max_seqlen)
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        k_base = k_ptr + row.to(tl.int64) * stride_k_b + kv_head * stride_k_h
        v_base = v_ptr + row.to(tl.int64) * stride_v_b + kv_head * stride_v_h
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        # an empty split (start >= length: the row is shorter than this chunk) skips the loop: l = 0, m = -inf
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            ok = pos < end
            kv_ok = ok[:, None] & d_ok[None, :]
            k = tl.load(k_base + pos[:, None] * stride_k_s + d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(v_base + pos[:, None] * stride_v_s + d[None, :], mask=kv_ok, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            s = tl.where(ok[None, :], s * scale_log2e, float("-inf"))       # base-2 logits
            m_new = tl.maximum(m, tl.max(s, axis=1))                          # finite: a tile has >= 1 key
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if NUM_SPLITS == 1:
            out = acc / l[:, None]
            tl.store(out_ptr + row * stride_out_b + q_heads[:, None] * stride_out_h + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])
        else:
            # partials [b, hq, NUM_SPLITS, d] (unnormalised / l) and lse [b, hq, NUM_SPLITS] (base 2)
            part = (row * (n_kv * groups) + q_heads) * NUM_SPLITS + split
            safe_l = tl.where(l > 0, l, 1.0)
            tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], acc / safe_l[:, None],
                     mask=g_ok[:, None] & d_ok[None, :])
            tl.store(part_lse_ptr + part, tl.where(l > 0, m + tl.log2(safe_l), float("-inf")), mask=g_ok)

    @triton.jit
    def _attention_merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, n_q, head_dim, stride_out_b, stride_out_h,
                                NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0)
        head = tl.program_id(1)
        sp = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        base = (row * n_q + head) * NUM_SPLITS
        lse = tl.load(part_lse_ptr + base + sp, mask=sp < NUM_SPLITS, other=float("-inf"))
        weight = tl.exp2(lse - tl.max(lse, axis=0))                          # split 0 is never empty
        part = tl.load(part_out_ptr + (base + sp)[:, None] * head_dim + d[None, :],
                       mask=(sp < NUM_SPLITS)[:, None] & d_ok[None, :], other=0.0)
        out = tl.sum(part * weight[:, None], axis=0) / tl.sum(weight, axis=0)
        tl.store(out_ptr + row * stride_out_b + head * stride_out_h + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


_SM_COUNT: dict = {}


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4          # interpreter on CPU: exercise the split path at small batch
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


# tunable (scripts/profile_decode.py --sweep-attn): keys per tile, launch shape, and the split heuristic's target
# programs per SM
ATTN_DECODE_CONFIG = {"block_n": 64, "num_warps": 4, "num_stages": 2, "programs_per_sm": 4}


def attention_decode_splits(batch, n_kv, max_seqlen, device, block_n=None) -> int:
    """Sequence splits per (row, KV head): enough programs for `programs_per_sm` per SM, never a chunk under one tile."""
    blocks = triton.cdiv(max_seqlen, block_n or ATTN_DECODE_CONFIG["block_n"])
    want = triton.cdiv(ATTN_DECODE_CONFIG["programs_per_sm"] * _sm_count(device), batch * n_kv)
    return max(1, min(blocks, want))


def _flash_decode_supported(q, k_cache) -> bool:
    return (q.shape[-1] <= 256 and q.stride(-1) == 1
            and k_cache.stride(-1) == 1 and q.shape[1] % k_cache.shape[1] == 0)


def attention_decode(q, k_cache, v_cache, seqlens, scale, num_splits=None, block_n=None):
    """`attention_decode_ref`'s contract; reads only keys 0..seqlens[b] of each row (Triton flash-decoding).
    `num_splits` (default: `attention_decode_splits`) and `block_n` (keys per tile) are for tests and tuning."""
    if not fast_decode_enabled(q) or not use_flash_decode() or not _flash_decode_supported(q, k_cache):
        return attention_decode_ref(q, k_cache, v_cache, seqlens, scale)
    batch, n_q, head_dim = q.shape
    n_kv, max_seqlen = k_cache.shape[1], k_cache.shape[2]
    assert v_cache.shape == k_cache.shape and v_cache.stride(-1) == 1
    groups = n_q // n_kv
    block_n = block_n or ATTN_DECODE_CONFIG["block_n"]
    if num_splits is None:
        num_splits = attention_decode_splits(batch, n_kv, max_seqlen, q.device, block_n)
    chunk = triton.cdiv(triton.cdiv(max_seqlen, num_splits), block_n) * block_n
    num_splits = triton.cdiv(max_seqlen, chunk)          # no split that starts past the cache end
    out = torch.empty(batch, n_q, head_dim, device=q.device, dtype=q.dtype)
    if num_splits > 1:
        part_out = torch.empty(batch, n_q, num_splits, head_dim, device=q.device, dtype=torch.float32)
        part_lse = torch.empty(batch, n_q, num_splits, device=q.device, dtype=torch.float32)
    else:
        part_out = part_lse = out
    _attention_decode_kernel[(batch, n_kv, num_splits)](
        q, k_cache, v_cache, seqlens, out, part_out, part_lse, scale * 1.4426950408889634, groups, n_kv, chunk,
        head_dim, max_seqlen,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1),
        NUM_SPLITS=num_splits, BLOCK_G=max(16, _pow2(groups)), BLOCK_N=block_n, BLOCK_D=max(16, _pow2(head_dim)),
        IEEE=q.dtype == torch.float32, num_warps=ATTN_DECODE_CONFIG["num_warps"],
        num_stages=ATTN_DECODE_CONFIG["num_stages"])
    if num_splits > 1:
        _attention_merge_kernel[(batch, n_q)](part_out, part_lse, out, n_q, head_dim, out.stride(0), out.stride(1),
                                              NUM_SPLITS=num_splits, SPLITS_P2=_pow2(num_splits),
                                              BLOCK_D=max(16, _pow2(head_dim)), num_warps=1)
    return out


def use_flash_decode() -> bool:
    """`THINKFAST_DECODE_ATTN=sdpa` keeps the old masked-SDPA attention in the fused step (A/B comparisons)."""
    mode = os.environ.get("THINKFAST_DECODE_ATTN", "flash")
    if mode not in ("flash", "sdpa"):
        raise ValueError(f"THINKFAST_DECODE_ATTN must be flash or sdpa, got {mode!r}")
    return mode == "flash"
