"""SSD (Mamba-2 state-space duality) scan, one-token step, depthwise causal conv1d and gated RMSNorm.

Every op has a pure-PyTorch `*_ref` twin (the CPU path, and the oracle for tests) and a dispatcher that uses
mamba-ssm 2.3.2.post1's Triton kernels on CUDA when they import. mamba-ssm's package `__init__` imports its
CUDA extension (`selective_scan_cuda`), which a `MAMBA_SKIP_CUDA_BUILD` install does not have, so the
Triton modules are loaded without running that `__init__` (see `_load_mamba_triton`).

    THINKFAST_KERNELS=ref      always the PyTorch reference
    THINKFAST_KERNELS=triton   mamba-ssm Triton kernels (error if they are missing or the tensors are not on CUDA)
    THINKFAST_KERNELS=auto     (default) Triton on CUDA when importable, else the reference

The depthwise conv has its own switch, THINKFAST_CONV=auto|ref|triton (default auto: Triton on CUDA; see `conv_kernels`).

Shapes follow mamba-ssm: x [b, l, h, p], dt [b, l, h], A [h], B/C [b, l, g, n] with h % g == 0
(head i reads group i // (h // g)), D [h] or [h, p], z [b, l, h, p], seq_idx [b, l] int32,
states [b, h, p, n]. The recurrence per head, with dt' = softplus(dt + dt_bias) when dt_softplus:

    state_t = exp(dt'_t * A) * state_{t-1} + dt'_t * outer(x_t, B_t)      y_t = state_t @ C_t + D * x_t

and y *= silu(z) when z is given. A new document (seq_idx changes) starts from a zero state.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
import types
import weakref

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 256

# --------------------------------------------------------------------------------------------------
# kernel selection


def kernel_mode() -> str:
    mode = os.environ.get("THINKFAST_KERNELS", "auto").strip().lower()
    if mode not in ("ref", "triton", "auto"):
        raise ValueError(f"THINKFAST_KERNELS must be one of ref, triton, auto; got {mode!r}")
    return mode


_MAMBA_TRITON: dict | None = None
_MAMBA_TRITON_ERROR: str | None = None


def _load_mamba_triton() -> dict | None:
    """Import mamba-ssm's Triton modules without executing `mamba_ssm/__init__.py`.

    A bare module object named `mamba_ssm` whose `__path__` is the installed package directory is put in
    `sys.modules`; submodule imports then resolve against that directory and never run the real `__init__`.
    """
    global _MAMBA_TRITON, _MAMBA_TRITON_ERROR
    if _MAMBA_TRITON is not None or _MAMBA_TRITON_ERROR is not None:
        return _MAMBA_TRITON
    try:
        if "mamba_ssm" not in sys.modules:
            spec = importlib.util.find_spec("mamba_ssm")
            if spec is None or not spec.submodule_search_locations:
                raise ImportError("mamba_ssm is not installed")
            package = types.ModuleType("mamba_ssm")
            package.__path__ = list(spec.submodule_search_locations)
            package.__file__ = spec.origin
            package.__package__ = "mamba_ssm"
            package.__spec__ = spec
            sys.modules["mamba_ssm"] = package
        # Triton reads this when the kernels' @autotune decorators run (at import): the winning configs are then
        # kept in Triton's cache dir, and every later process (each eval task, each distill stage) skips the
        # benchmarking, also choosing the same config each time. TRITON_CACHE_AUTOTUNING=0 turns it off.
        os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
        ssd_combined = importlib.import_module("mamba_ssm.ops.triton.ssd_combined")
        state_update = importlib.import_module("mamba_ssm.ops.triton.selective_state_update")
        layernorm_gated = importlib.import_module("mamba_ssm.ops.triton.layernorm_gated")
        _MAMBA_TRITON = {
            "mamba_chunk_scan_combined": ssd_combined.mamba_chunk_scan_combined,
            # the autograd.Function's two halves, for the CUDA-graphed training scan (`ScanGraph`); private names,
            # so a mamba-ssm without them only loses THINKFAST_TRAIN_SCAN=graph (eager instead)
            "scan_fwd": getattr(ssd_combined, "_mamba_chunk_scan_combined_fwd", None),
            "scan_bwd": getattr(ssd_combined, "_mamba_chunk_scan_combined_bwd", None),
            "selective_state_update": state_update.selective_state_update,
            "rmsnorm_fn": layernorm_gated.rmsnorm_fn,
        }
    except Exception as error:  # ImportError, or a Triton/CUDA mismatch surfacing at import time
        _MAMBA_TRITON_ERROR = f"{type(error).__name__}: {error}"
        _MAMBA_TRITON = None
    return _MAMBA_TRITON


def triton_available() -> bool:
    return torch.cuda.is_available() and _load_mamba_triton() is not None


def _use_triton(*tensors: torch.Tensor) -> bool:
    mode = kernel_mode()
    if mode == "ref":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if mode == "triton":
        if not on_cuda:
            raise RuntimeError("THINKFAST_KERNELS=triton needs CUDA tensors")
        if _load_mamba_triton() is None:
            raise RuntimeError(f"THINKFAST_KERNELS=triton but mamba-ssm's Triton kernels failed to import: {_MAMBA_TRITON_ERROR}")
        return True
    return on_cuda and _load_mamba_triton() is not None


# --------------------------------------------------------------------------------------------------
# SSD chunked scan (training and prefill)


def _expand_groups(t: torch.Tensor, nheads: int) -> torch.Tensor:
    """[..., g, n] -> [..., h, n]: head i uses group i // (h // g), as mamba-ssm does."""
    groups = t.shape[-2]
    if nheads % groups != 0:
        raise ValueError(f"number of heads ({nheads}) must be a multiple of the number of B/C groups ({groups})")
    return t.repeat_interleave(nheads // groups, dim=-2) if groups != nheads else t


def _prepare_dt(dt, dt_bias, dt_softplus, dt_limit=(0.0, float("inf"))):
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    if dt_limit != (0.0, float("inf")):
        dt = dt.clamp(min=dt_limit[0], max=dt_limit[1])
    return dt


def ssd_scan_ref(x, dt, A, B, C, D=None, z=None, seq_idx=None, initial_states=None, return_final_states=False,
                 chunk_size=DEFAULT_CHUNK_SIZE, dt_bias=None, dt_softplus=False, cu_seqlens=None,
                 return_varlen_states=False, dt_limit=(0.0, float("inf"))):
    """Chunked SSD in float32: quadratic inside chunks of `chunk_size`, a sequential state pass across chunks.

    Returns y [b, l, h, p] (dtype of x); with `return_final_states` also the state after the last token
    [b, h, p, n] (float32); with `return_varlen_states` (batch 1, `cu_seqlens` [n_docs + 1]) also the state at
    the end of each document [n_docs, h, p, n].
    """
    batch, seqlen, nheads, headdim = x.shape
    dstate = B.shape[-1]
    out_dtype = x.dtype
    dt = _prepare_dt(dt, dt_bias, dt_softplus, dt_limit)                       # [b, l, h]
    A = A.float()
    xf, Bf, Cf = x.float(), _expand_groups(B, nheads).float(), _expand_groups(C, nheads).float()
    if seq_idx is None:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32, device=x.device)
    seq_idx = seq_idx.to(torch.int64)

    # Pad to whole chunks with dt = 0 and x = 0: the padding neither decays nor feeds the state.
    chunk = min(chunk_size, max(seqlen, 1))
    padded = math.ceil(seqlen / chunk) * chunk
    pad = padded - seqlen
    if pad:
        xf = F.pad(xf, (0, 0, 0, 0, 0, pad))
        Bf = F.pad(Bf, (0, 0, 0, 0, 0, pad))
        Cf = F.pad(Cf, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        seq_idx = torch.cat([seq_idx, seq_idx[:, -1:].expand(batch, pad)], dim=1)
    nchunks = padded // chunk

    # [b, c, q, ...] views
    xc = xf.view(batch, nchunks, chunk, nheads, headdim)
    Bc = Bf.view(batch, nchunks, chunk, nheads, dstate)
    Cc = Cf.view(batch, nchunks, chunk, nheads, dstate)
    dtc = dt.view(batch, nchunks, chunk, nheads)
    sc = seq_idx.view(batch, nchunks, chunk)
    log_decay = dtc * A                                                        # [b, c, q, h]
    cum = torch.cumsum(log_decay, dim=2)                                      # [b, c, q, h]

    # Within a chunk: y_i += sum_{j<=i, same doc} exp(cum_i - cum_j) (C_i . B_j) dt_j x_j
    same_doc = sc.unsqueeze(-1) == sc.unsqueeze(-2)                            # [b, c, q, q]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=x.device).tril()
    keep = (same_doc & causal).unsqueeze(-1)                                   # [b, c, q, q, 1]
    seg = cum.unsqueeze(3) - cum.unsqueeze(2)                                  # [b, c, i, j, h]
    decay = torch.exp(seg.masked_fill(~keep, -float("inf")))
    scores = torch.einsum("bcihn,bcjhn->bcijh", Cc, Bc) * decay * dtc.unsqueeze(2)
    y = torch.einsum("bcijh,bcjhp->bcihp", scores, xc)

    # Each chunk's own contribution to the state at its last position (only tokens of the last token's doc).
    last_doc = sc[:, :, -1:]                                                   # [b, c, 1]
    to_end = torch.exp(cum[:, :, -1:, :] - cum) * (sc == last_doc).unsqueeze(-1) * dtc   # [b, c, q, h]
    chunk_states = torch.einsum("bcqh,bcqhp,bcqhn->bchpn", to_end, xc, Bc)

    # Across chunks: carry the state; it survives a chunk only if the chunk's last token is in the same doc
    # as the token before the chunk (documents are contiguous, so then no boundary lies in between).
    if initial_states is None:
        state = torch.zeros(batch, nheads, headdim, dstate, device=x.device, dtype=torch.float32)
    else:
        state = initial_states.float().clone()
    prev_doc = seq_idx[:, 0]
    entering = []
    for c in range(nchunks):
        entering.append(state)
        carried = (sc[:, c, -1] == prev_doc).float().view(batch, 1, 1, 1)
        state = state * torch.exp(cum[:, c, -1, :]).view(batch, nheads, 1, 1) * carried + chunk_states[:, c]
        prev_doc = sc[:, c, -1]
    entering = torch.stack(entering, dim=1)                                    # [b, c, h, p, n]
    prev_docs = torch.cat([seq_idx[:, :1], sc[:, :-1, -1]], dim=1)            # doc of the token before each chunk
    from_carry = (sc == prev_docs.unsqueeze(-1)).unsqueeze(-1) * torch.exp(cum)   # [b, c, q, h]
    y = y + torch.einsum("bcqhn,bchpn,bcqh->bcqhp", Cc, entering, from_carry)

    y = y.reshape(batch, padded, nheads, headdim)[:, :seqlen]
    x32 = x.float()
    if D is not None:
        y = y + x32 * (D.float().view(1, 1, nheads, -1))
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(out_dtype)

    outputs = [y]
    if return_final_states:
        outputs.append(state)
    if return_varlen_states:
        if cu_seqlens is None or batch != 1:
            raise ValueError("return_varlen_states needs cu_seqlens and batch size 1")
        ends = cu_seqlens[1:].long() - 1
        c_idx, q_idx = ends // chunk, ends % chunk
        # state at position t = carried part + in-chunk part up to t (same doc only)
        cum_e = cum[0, c_idx, q_idx]                                            # [d, h]
        carry = (sc[0, c_idx, q_idx] == prev_docs[0, c_idx]).float().unsqueeze(-1) * torch.exp(cum_e)
        states = entering[0, c_idx] * carry.view(-1, nheads, 1, 1)
        upto = torch.arange(chunk, device=x.device).view(1, chunk) <= q_idx.view(-1, 1)          # [d, q]
        same = sc[0, c_idx] == sc[0, c_idx, q_idx].unsqueeze(-1)                                # [d, q]
        # mask the exponent, not the product: after the document's end cum_e - cum > 0 can overflow to inf
        # (long chunks, strong decay), and inf * 0 = NaN would poison the state
        keep = (upto & same).unsqueeze(-1)
        weight = torch.exp((cum_e.unsqueeze(1) - cum[0, c_idx]).masked_fill(~keep, -float("inf"))) * dtc[0, c_idx]
        states = states + torch.einsum("dqh,dqhp,dqhn->dhpn", weight, xc[0, c_idx], Bc[0, c_idx])
        outputs.append(states)
    return outputs[0] if len(outputs) == 1 else tuple(outputs)


def ssd_scan(x, dt, A, B, C, D=None, z=None, seq_idx=None, initial_states=None, return_final_states=False,
             chunk_size=DEFAULT_CHUNK_SIZE, dt_bias=None, dt_softplus=False, cu_seqlens=None,
             return_varlen_states=False, dt_limit=(0.0, float("inf"))):
    """`ssd_scan_ref`'s contract; on CUDA runs mamba-ssm's `mamba_chunk_scan_combined` (with autograd)."""
    if _use_triton(x):
        kernels = _load_mamba_triton()
        if seq_idx is not None:
            seq_idx = seq_idx.to(torch.int32).contiguous()
        return kernels["mamba_chunk_scan_combined"](
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
            seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states, return_varlen_states=return_varlen_states)
    return ssd_scan_ref(x, dt, A, B, C, D=D, z=z, seq_idx=seq_idx, initial_states=initial_states,
                        return_final_states=return_final_states, chunk_size=chunk_size, dt_bias=dt_bias,
                        dt_softplus=dt_softplus, cu_seqlens=cu_seqlens, return_varlen_states=return_varlen_states,
                        dt_limit=dt_limit)


# --------------------------------------------------------------------------------------------------
# CUDA-graphed training scan
#
# mamba-ssm's combined scan is ~7 Triton launches forward and ~15 backward, wrapped in Python that costs ~1.3 ms
# (forward) and ~3.4 ms (backward) of host time per call (H100 profile, leaderboards/distill/bench_distill_flex):
# for Llamba's 30 layers that is ~145 ms of host work per micro-step, more than the GPU needs at micro-batch 16.
# THINKFAST_TRAIN_SCAN=graph captures each mixer's forward and backward once (training shapes are static:
# micro-batch x seq_len) and replays them, one graph launch each way. Eager mamba-ssm (the default) is the twin the
# GPU check compares against (scripts/gpu_check_kernels.py, group train_scan_graph).

_SCAN_GRAPHS = weakref.WeakKeyDictionary()       # mixer module -> ScanGraph (not module state: no state_dict entry)
_SCAN_GRAPH_FAILED = weakref.WeakSet()             # mixers whose capture raised: eager until release_scan_graphs()
_SCAN_INPUTS = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias")


TRAIN_SCAN: str | None = None    # overrides the environment in-process (a distillation stage's `train_scan`)
TRAIN_SCAN_MODES = ("eager", "graph")


def train_scan_mode() -> str:
    mode = (TRAIN_SCAN if TRAIN_SCAN is not None else os.environ.get("THINKFAST_TRAIN_SCAN", "eager")).strip().lower()
    if mode not in TRAIN_SCAN_MODES:
        raise ValueError(f"THINKFAST_TRAIN_SCAN must be one of {', '.join(TRAIN_SCAN_MODES)}, got {mode!r}")
    return mode


class ScanGraph:
    """One mixer's forward and backward of mamba-ssm's SSD scan, captured as two CUDA graphs for one set of shapes.

    The inputs are copied into static buffers and the graphs replayed; the forward's saved activations live in the
    graphs' private memory pool until the backward reads them. So a layer's forward may not run again before its
    backward (`ticket` checks it): gradient accumulation (forward, backward, forward, ...) is fine."""

    def __init__(self, kernels, inputs: dict, seq_idx, chunk_size: int, dt_softplus: bool, dt_limit):
        self.key = self.key_of(inputs, seq_idx, chunk_size, dt_softplus, dt_limit)
        self.ticket = 0
        self.static = {name: (t.detach().contiguous().clone() if t is not None else None) for name, t in inputs.items()}
        self.seq_idx = seq_idx.clone() if seq_idx is not None else None
        s = self.static
        options = dict(D=s["D"], z=s["z"], dt_bias=s["dt_bias"], seq_idx=self.seq_idx, dt_softplus=dt_softplus,
                       dt_limit=dt_limit)

        def forward():
            out, out_x, *_ = kernels["scan_fwd"](s["x"], s["dt"], s["A"], s["B"], s["C"], chunk_size, **options)
            return out, (out if s["z"] is None else out_x)    # what MambaChunkScanCombinedFn saves for backward

        def backward(saved):
            grads = kernels["scan_bwd"](self.dout, s["x"], s["dt"], s["A"], s["B"], s["C"], saved, chunk_size,
                                        **options)
            return grads[:8]                                   # dx, ddt, dA, dB, dC, dD, dz, ddt_bias

        with torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):                    # Triton autotuning and JIT happen here, not in capture
                for _ in range(2):
                    out, saved = forward()
                    self.dout = torch.zeros_like(out)
                    backward(saved)
            torch.cuda.current_stream().wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            self.forward_graph, self.backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            # thread_local: a data-loading thread's CUDA calls elsewhere must not invalidate the capture
            with torch.cuda.graph(self.forward_graph, pool=pool, capture_error_mode="thread_local"):
                self.out, self.saved = forward()
            with torch.cuda.graph(self.backward_graph, pool=pool, capture_error_mode="thread_local"):
                self.grads = backward(self.saved)

    @staticmethod
    def key_of(inputs: dict, seq_idx, chunk_size, dt_softplus, dt_limit) -> tuple:
        shapes = tuple((name, None) if t is None else (name, tuple(t.shape), t.dtype, t.device)
                       for name, t in inputs.items())
        return shapes, None if seq_idx is None else tuple(seq_idx.shape), chunk_size, bool(dt_softplus), tuple(dt_limit)

    def run_forward(self, inputs: dict, seq_idx) -> torch.Tensor:
        for name, t in inputs.items():
            if t is not None:
                self.static[name].copy_(t)
        if seq_idx is not None:
            self.seq_idx.copy_(seq_idx)
        self._replay_forward()
        self.ticket += 1
        return self.out.clone()      # the next replay overwrites self.out; whoever saves y must keep its own

    def run_backward(self, dout: torch.Tensor, ticket: int) -> tuple:
        if ticket != self.ticket:
            raise RuntimeError("graphed training scan (train_scan=graph): this layer's forward ran again before the "
                               "backward of an earlier forward (its saved activations were overwritten); run "
                               "backward after each forward, or use the eager scan (train_scan: eager)")
        self.dout.copy_(dout)
        self._replay_backward()
        return self.grads

    def _replay_forward(self):
        self.forward_graph.replay()

    def _replay_backward(self):
        self.backward_graph.replay()


class _GraphedScanFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graph, seq_idx, *tensors):
        ctx.graph = graph
        out = graph.run_forward(dict(zip(_SCAN_INPUTS, tensors)), seq_idx)
        ctx.ticket = graph.ticket
        # a leaf's gradient goes to AccumulateGrad, which may keep the very tensor as .grad: give it a copy, since the
        # graph's gradient buffers are rewritten at the next replay. Other gradients are consumed before that.
        ctx.leaves = tuple(t is not None and t.is_leaf for t in tensors)
        return out

    @staticmethod
    def backward(ctx, dout):
        grads = ctx.graph.run_backward(dout, ctx.ticket)
        result = []
        for grad, needed, leaf in zip(grads, ctx.needs_input_grad[2:], ctx.leaves):
            result.append(None if not needed or grad is None else (grad.clone() if leaf else grad))
        return (None, None, *result)


def ssd_scan_train(module, x, dt, A, B, C, D=None, z=None, seq_idx=None, chunk_size=DEFAULT_CHUNK_SIZE,
                   dt_bias=None, dt_softplus=False, dt_limit=(0.0, float("inf"))):
    """`ssd_scan` for a full sequence with no states in or out (training, scoring). With THINKFAST_TRAIN_SCAN=graph
    it runs through `module`'s `ScanGraph`, captured at the first call; it falls back to `ssd_scan` off CUDA, without
    mamba-ssm's kernels, without gradients, or for shapes other than the captured ones (one graph per module:
    training shapes are static; an eval batch of another size runs eager)."""
    inputs = dict(zip(_SCAN_INPUTS, (x, dt, A, B, C, D, z, dt_bias)))
    tensors = [t for t in inputs.values() if t is not None]
    graph = None
    if train_scan_mode() == "graph" and _graph_scan_eligible(tensors):
        graph_seq_idx = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
        key = ScanGraph.key_of(inputs, graph_seq_idx, chunk_size, dt_softplus, dt_limit)
        graph = _SCAN_GRAPHS.get(module)
        if graph is None and module not in _SCAN_GRAPH_FAILED:
            graph = _capture_scan_graph(module, inputs, graph_seq_idx, chunk_size, dt_softplus, dt_limit)
        elif graph is not None and graph.key != key:
            graph = None
    if graph is None:
        return ssd_scan(x, dt, A, B, C, D=D, z=z, seq_idx=seq_idx, chunk_size=chunk_size, dt_bias=dt_bias,
                        dt_softplus=dt_softplus, dt_limit=dt_limit)
    return _GraphedScanFn.apply(graph, graph_seq_idx, x, dt, A, B, C, D, z, dt_bias)


def _graph_scan_eligible(tensors) -> bool:
    return (torch.is_grad_enabled() and any(t.requires_grad for t in tensors) and _use_triton(*tensors)
            and not torch.cuda.is_current_stream_capturing() and _load_mamba_triton().get("scan_bwd") is not None)


def _capture_scan_graph(module, inputs, seq_idx, chunk_size, dt_softplus, dt_limit):
    """Capture `module`'s scan, or None: the graphed scan is an optimisation, so a capture that raises (out of
    memory for the graph's pool, a driver that refuses the capture) leaves that layer on the eager scan, with a
    warning, and is not retried until `release_scan_graphs`."""
    try:
        graph = ScanGraph(_load_mamba_triton(), inputs, seq_idx, chunk_size, dt_softplus, dt_limit)
    except RuntimeError as error:       # torch.OutOfMemoryError and CUDA capture errors are RuntimeErrors
        _SCAN_GRAPH_FAILED.add(module)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        import warnings

        warnings.warn(f"graphed training scan (train_scan=graph): capturing a {type(module).__name__} failed "
                      f"({type(error).__name__}: {str(error)[:300]}); that layer trains with the eager scan")
        return None
    _SCAN_GRAPHS[module] = graph
    return graph


def release_scan_graphs():
    """Drop every captured training scan (frees their memory pools), e.g. between distillation stages, and let
    layers whose capture failed try again."""
    _SCAN_GRAPHS.clear()
    _SCAN_GRAPH_FAILED.clear()


def ssd_sequential_ref(x, dt, A, B, C, D=None, z=None, seq_idx=None, initial_states=None, dt_bias=None,
                       dt_softplus=False):
    """The recurrence token by token (slow, obviously correct): the oracle for `ssd_scan_ref` in tests."""
    batch, seqlen, nheads, headdim = x.shape
    dt = _prepare_dt(dt, dt_bias, dt_softplus)
    Bf, Cf = _expand_groups(B, nheads).float(), _expand_groups(C, nheads).float()
    state = (torch.zeros(batch, nheads, headdim, B.shape[-1], device=x.device) if initial_states is None
             else initial_states.float().clone())
    ys = []
    for t in range(seqlen):
        if seq_idx is not None and t > 0:
            new_doc = (seq_idx[:, t] != seq_idx[:, t - 1]).float().view(batch, 1, 1, 1)
            state = state * (1 - new_doc)
        decay = torch.exp(dt[:, t] * A.float()).view(batch, nheads, 1, 1)
        state = state * decay + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t].float(), Bf[:, t])
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cf[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x.float() * D.float().view(1, 1, nheads, -1)
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype), state


# --------------------------------------------------------------------------------------------------
# one-token recurrence (decode)


def ssd_step_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """One token. state [b, h, p, n] is updated in place (kept in its own dtype); x [b, h, p], dt [b, h],
    A [h], B/C [b, g, n], D [h] or [h, p], z [b, h, p]. Returns y [b, h, p] in x's dtype."""
    nheads = x.shape[1]
    dt = _prepare_dt(dt, dt_bias, dt_softplus)                                  # [b, h]
    Bf, Cf = _expand_groups(B, nheads).float(), _expand_groups(C, nheads).float()
    decay = torch.exp(dt * A.float()).unsqueeze(-1).unsqueeze(-1)
    new_state = state.float() * decay + (dt.unsqueeze(-1) * x.float()).unsqueeze(-1) * Bf.unsqueeze(-2)
    state.copy_(new_state)
    y = torch.einsum("bhpn,bhn->bhp", new_state, Cf)
    if D is not None:
        y = y + x.float() * (D.float().view(1, nheads, -1))
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


def ssd_step(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """`ssd_step_ref`'s contract; on CUDA runs mamba-ssm's `selective_state_update` (no host sync)."""
    if _use_triton(x, state):
        kernels = _load_mamba_triton()
        nheads, headdim, dstate = state.shape[1], state.shape[2], state.shape[3]
        # Broadcast per-head scalars over headdim/dstate with stride 0: the kernel detects this ("tie_hdim").
        A_full = A.float().view(nheads, 1, 1).expand(nheads, headdim, dstate)
        dt_full = dt.view(*dt.shape, 1).expand(*dt.shape, headdim)
        # mamba-ssm 2.3.2 reads dt_bias.stride() and D.stride() unconditionally: pass zeros (stride 0) for None.
        zeros = torch.zeros((), device=x.device, dtype=torch.float32).expand(nheads, headdim)
        dt_bias_full = zeros if dt_bias is None else dt_bias.view(nheads, 1).expand(nheads, headdim)
        D_full = zeros if D is None else (D.view(nheads, 1).expand(nheads, headdim) if D.dim() == 1 else D)
        return kernels["selective_state_update"](state, x, dt_full, A_full, B, C, D=D_full, z=z,
                                                 dt_bias=dt_bias_full, dt_softplus=dt_softplus)
    return ssd_step_ref(state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus)


# --------------------------------------------------------------------------------------------------
# depthwise causal conv1d (x [b, l, c], weight [c, k]); conv state [b, c, k] holds the last k inputs


def causal_conv1d_ref(x, weight, bias=None, seq_idx=None, initial_state=None, activation=None):
    """out_t = sum_k weight[:, k] * x_{t-K+1+k} (+ bias), never reading across a `seq_idx` boundary.
    `initial_state` [b, c, K] (the previous K inputs, newest last) precedes the first document."""
    batch, seqlen, channels = x.shape
    width = weight.shape[-1]
    if initial_state is None:
        history = x.new_zeros(batch, width - 1, channels)
    else:
        history = initial_state[:, :, 1:].transpose(1, 2).to(x.dtype)
    padded = torch.cat([history, x], dim=1)                                    # [b, K-1+l, c]
    out = torch.zeros(batch, seqlen, channels, dtype=torch.float32, device=x.device)
    if seq_idx is not None:
        docs = torch.cat([seq_idx[:, :1].expand(batch, width - 1), seq_idx], dim=1)
    for k in range(width):
        shift = width - 1 - k                                                  # how far back this tap reads
        window = padded[:, k:k + seqlen].float()
        if seq_idx is not None and shift > 0:
            window = window * (docs[:, k:k + seqlen] == seq_idx).unsqueeze(-1)
        out = out + window * weight[:, k].float()
    if bias is not None:
        out = out + bias.float()
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation not in (None, "identity"):
        raise ValueError(f"unknown conv activation {activation!r}")
    return out.to(x.dtype)


def conv_state_from_inputs(x, width, seq_idx=None, cu_seqlens=None):
    """Conv state after the inputs: the last `width` inputs of each row [b, c, width] (zeros before the start),
    or with `cu_seqlens` (batch 1) of each document [n_docs, c, width], never reaching into the previous doc."""
    if cu_seqlens is None:
        xt = x.transpose(1, 2)
        return F.pad(xt, (width - xt.shape[-1], 0)) if xt.shape[-1] < width else xt[:, :, -width:].clone()
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    idx = ends.view(-1, 1) - width + torch.arange(width, device=x.device).view(1, -1)   # [d, width]
    valid = idx >= starts.view(-1, 1)
    gathered = x[0, idx.clamp(min=0)] * valid.unsqueeze(-1)                           # [d, width, c]
    return gathered.transpose(1, 2).contiguous()


def causal_conv1d(x, weight, bias=None, seq_idx=None, initial_state=None, activation=None):
    """`causal_conv1d_ref`'s contract. On CUDA (THINKFAST_CONV=auto or triton): `conv_kernels.causal_conv1d` (one pass,
    autograd); the reference otherwise, and always for a cache continuation (`initial_state`, HF generate)."""
    from . import conv_kernels

    if initial_state is None and conv_kernels.use_triton_conv(x):
        return conv_kernels.causal_conv1d(x, weight, bias, seq_idx=seq_idx, activation=activation)
    return causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, initial_state=initial_state, activation=activation)


def causal_conv1d_with_states(x, weight, bias=None, seq_idx=None, cu_seqlens=None, activation=None):
    """Prefill over prompts packed in one row x [1, l, c]: (conv output, each prompt's conv state [n, c, K])."""
    from . import conv_kernels

    if conv_kernels.use_triton_conv(x):
        return conv_kernels.causal_conv1d_with_states(x, weight, bias, seq_idx=seq_idx, cu_seqlens=cu_seqlens,
                                                      activation=activation)
    out = causal_conv1d_ref(x, weight, bias, seq_idx=seq_idx, activation=activation)
    return out, conv_state_from_inputs(x, weight.shape[-1], cu_seqlens=cu_seqlens)


# --------------------------------------------------------------------------------------------------
# gated RMSNorm: rmsnorm(x * silu(z)) * weight, normalised in groups of `group_size` channels


def gated_rmsnorm_ref(x, z, weight, eps=1e-5, group_size=None):
    dtype = x.dtype
    h = x.float()
    if z is not None:
        h = h * F.silu(z.float())
    group_size = group_size or h.shape[-1]
    grouped = h.view(*h.shape[:-1], h.shape[-1] // group_size, group_size)
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (grouped.view_as(h) * weight.float()).to(dtype)


def gated_rmsnorm(x, z, weight, eps=1e-5, group_size=None):
    if _use_triton(x):
        kernels = _load_mamba_triton()
        return kernels["rmsnorm_fn"](x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
    return gated_rmsnorm_ref(x, z, weight, eps=eps, group_size=group_size)


# --------------------------------------------------------------------------------------------------
# MOHAWK stage 1: the mixer as an explicit L x L matrix


def ssd_mixing_matrix(log_decay, B, C, input_scale=None, seq_idx=None):
    """M [b, h, L, L] with M[i, j] = (C_i . B_j) * exp(sum_{j<k<=i} log_decay_k) * input_scale_j for j <= i in the
    same document, else 0: the scan computes y = M @ x per head (before D and the gate).
    log_decay [b, l, h] (= dt * A), B/C [b, l, g, n], input_scale [b, l, h] (dt, or None for 1)."""
    nheads = log_decay.shape[-1]
    Bf, Cf = _expand_groups(B, nheads).float(), _expand_groups(C, nheads).float()
    cum = torch.cumsum(log_decay.float(), dim=1).transpose(1, 2)                 # [b, h, l]
    seqlen = cum.shape[-1]
    keep = torch.ones(seqlen, seqlen, dtype=torch.bool, device=cum.device).tril().unsqueeze(0)
    if seq_idx is not None:
        keep = keep & (seq_idx.unsqueeze(-1) == seq_idx.unsqueeze(-2))
    seg = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~keep.unsqueeze(1), -float("inf"))
    matrix = torch.einsum("bihn,bjhn->bhij", Cf, Bf) * torch.exp(seg)
    if input_scale is not None:
        matrix = matrix * input_scale.float().transpose(1, 2).unsqueeze(-2)
    return matrix
