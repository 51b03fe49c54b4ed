"""GPU sampling without torch.Generator and without host synchronisation.

A token is drawn with the Gumbel-max trick: `argmax_v  logit_v / T + g_v` over the allowed tokens, where
`g_v = -log(-log(u_v))` and every uniform `u_v` is a counter-based hash of (sample key, token index, token id).
So

  * a fixed seed reproduces a sample exactly, whatever slot or batch it lands in (the engine derives each
    sample's key from `seed` and the sample's global index only: `sample_key`);
  * sampling is a pure function of static tensors and lives inside the decode step's CUDA graph;
  * the plain temperature sampler (and greedy) is one pass over the logits in one Triton kernel
    (`_gumbel_argmax_kernel`): it reads the bf16 logits once and makes its noise in registers.

Top-k / top-p keep the same noise and the same kernel: a PyTorch pre-pass (`filter_threshold`: top-k needs
`topk`, top-p a sort) finds per row the smallest logit still allowed, and the kernel skips tokens below it.
Ties at the threshold are kept (a token is allowed iff its logit >= the threshold), so the allowed set is a
function of the logits alone, not of a sort's tie order.

The token stream changed with this file (before: one uniform per row and inverse-CDF sampling): samples of a
given seed differ from the ones of earlier versions, they are still a pure function of (seed, prompt, sample).

Twins: `gumbel_argmax_torch` (vectorised PyTorch, the CPU path; same formulas op for op) and
`sample_next_ref` (row by row, noise from `hash32_int` on Python ints, the allowed set from
`filtered_probs_ref`); tests compare all three token for token.
"""
from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch twin runs
    triton = None
    tl = None

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9       # steps a sample's key per token
_VOCAB_MIX = 0x632BE5AB    # odd: spreads token ids over the 32-bit input of the hash
_FINAL_XOR = 0x5BD1E995
_TWO_POW_M24 = 2.0 ** -24


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding values in [0, 2**32)."""
    return _hash32_(x & _MASK32)


def _hash32_(x: torch.Tensor) -> torch.Tensor:
    """`hash32` of an int64 tensor already in [0, 2**32), computed in place with one scratch tensor: on the CPU
    path, [slots, vocab] int64 temporaries made sampling cost ~2.8x more (0.83 -> 0.30 s per hash at 256 x
    49,152 on one core)."""
    scratch = x >> 16
    x ^= scratch
    x.mul_(0x7FEB352D).bitwise_and_(_MASK32)   # int64 wrap-around keeps the low 32 bits exact
    torch.bitwise_right_shift(x, 15, out=scratch)
    x ^= scratch
    x.mul_(0x846CA68B).bitwise_and_(_MASK32)
    torch.bitwise_right_shift(x, 16, out=scratch)
    x ^= scratch
    return x


def hash32_int(x: int) -> int:
    """The same hash on a Python int (used on the host to derive sample keys)."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def sample_key(seed: int, sample_index: int) -> int:
    """Per-sample 32-bit key: depends only on the seed and the sample's global index."""
    seed_key = hash32_int(hash32_int(seed & _MASK32) ^ ((seed >> 32) & _MASK32))
    return hash32_int((seed_key + sample_index * _GOLDEN) & _MASK32)


# --------------------------------------------------------------------------------------------------
# noise: u = (2 * (h >> 9) + 1) / 2**24 is exact in fp32 and strictly inside (0, 1), so -log(-log(u)) is finite


def step_keys(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per (sample, token index) row: int64 [B]."""
    return hash32(keys.long() + steps.long() * _GOLDEN)


def gumbel_noise(keys: torch.Tensor, steps: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Gumbel noise float32 [B, n] for token ids `token_ids` ([n] or [B, n]) of rows (keys [B], steps [B])."""
    row = step_keys(keys, steps).unsqueeze(1)
    h = _hash32_((row + token_ids.long() * _VOCAB_MIX).bitwise_and_(_MASK32))
    h ^= _FINAL_XOR
    h = _hash32_(h)
    h.bitwise_right_shift_(9).mul_(2).add_(1)
    u = h.to(torch.float32).mul_(_TWO_POW_M24)
    return u.log_().neg_().log_().neg_()     # -log(-log(u)), in place


def gumbel_noise_int(key: int, step: int, token_id: int) -> float:
    """One noise value from Python ints (the reference twin's independent implementation of the hash)."""
    row = hash32_int(key + step * _GOLDEN)
    h = hash32_int(hash32_int(row + token_id * _VOCAB_MIX) ^ _FINAL_XOR)
    u = ((h >> 9) * 2 + 1) * _TWO_POW_M24
    return -math.log(-math.log(u))


# --------------------------------------------------------------------------------------------------
# top-k / top-p as a per-row logit threshold


def filter_threshold(logits: torch.Tensor, temperature, top_k: int = 0, top_p=None) -> torch.Tensor | None:
    """Smallest allowed logit per row (float32 [B]) under top-k and/or top-p; None when neither is on.
    top-p keeps the shortest prefix (by descending logit) whose mass before the last token is < top_p,
    computed on the temperature-scaled softmax (over the top-k candidates when both are on)."""
    vocab = logits.shape[-1]
    use_k = 0 < top_k < vocab
    if not use_k and top_p is None:
        return None
    x = logits.float()
    if use_k:
        x = x.topk(top_k, dim=-1).values           # sorted, largest first
    elif top_p is not None:
        x = x.sort(dim=-1, descending=True).values
    if top_p is None:
        return x[:, -1].contiguous()
    probs = torch.softmax(x * (1.0 / temperature), dim=-1)
    mass_before = probs.cumsum(-1) - probs
    kept = (mass_before < top_p).sum(-1, keepdim=True).clamp(min=1)     # the top token always stays
    return x.gather(1, kept - 1).squeeze(1).contiguous()


# --------------------------------------------------------------------------------------------------
# the fused kernel: per (row, vocab split) the running (best score, first index) over BLOCK-wide tiles; with
# several splits per row (small batch: fill the GPU) a second kernel picks the best split (leftmost on ties).


if triton is not None:
    @triton.jit
    def _hash32_u32(x):
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_argmax_kernel(logits_ptr, keys_ptr, steps_ptr, temp_ptr, thr_ptr, out_ptr, part_val_ptr,
                              part_idx_ptr, inv_temperature, vocab, chunk, stride_logits,
                              NUM_SPLITS: tl.constexpr, GREEDY: tl.constexpr, TEMP_FROM_PTR: tl.constexpr,
                              HAS_THRESHOLD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        split = tl.program_id(1)
        start = split * chunk
        end = tl.minimum(start + chunk, vocab)
        base = logits_ptr + row.to(tl.int64) * stride_logits
        if not GREEDY:
            key = tl.load(keys_ptr + row).to(tl.uint32)
            step = tl.load(steps_ptr + row).to(tl.uint32)
            row_key = _hash32_u32(key + step * 0x9E3779B9)
            if TEMP_FROM_PTR:
                inv_t = 1.0 / tl.load(temp_ptr).to(tl.float32)
            else:
                inv_t = inv_temperature
        if HAS_THRESHOLD:
            threshold = tl.load(thr_ptr + row)
        best_val = tl.full((), float("-inf"), tl.float32)
        best_idx = tl.zeros((), tl.int32) + start
        for v0 in range(start, end, BLOCK):
            v = v0 + tl.arange(0, BLOCK)
            ok = v < end
            x = tl.load(base + v, mask=ok, other=float("-inf")).to(tl.float32)
            if GREEDY:
                score = x
            else:
                h = _hash32_u32(_hash32_u32(row_key + v.to(tl.uint32) * 0x632BE5AB) ^ 0x5BD1E995)
                u = ((h >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08
                score = x * inv_t - tl.log(-tl.log(u))
            if HAS_THRESHOLD:
                score = tl.where(x >= threshold, score, float("-inf"))
            score = tl.where(ok, score, float("-inf"))
            tile_best, tile_idx = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best_val                       # strict: an earlier tile wins ties
            best_idx = tl.where(better, v0 + tile_idx, best_idx)
            best_val = tl.where(better, tile_best, best_val)
        if NUM_SPLITS == 1:
            tl.store(out_ptr + row, best_idx.to(tl.int64))
        else:
            tl.store(part_val_ptr + row * NUM_SPLITS + split, best_val)
            tl.store(part_idx_ptr + row * NUM_SPLITS + split, best_idx)

    @triton.jit
    def _gumbel_merge_kernel(part_val_ptr, part_idx_ptr, out_ptr, NUM_SPLITS: tl.constexpr,
                             SPLITS_P2: tl.constexpr):
        row = tl.program_id(0)
        s = tl.arange(0, SPLITS_P2)
        ok = s < NUM_SPLITS
        val = tl.load(part_val_ptr + row * NUM_SPLITS + s, mask=ok, other=float("-inf"))
        idx = tl.load(part_idx_ptr + row * NUM_SPLITS + s, mask=ok, other=0)
        _, best = tl.max(val, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tl.store(out_ptr + row, tl.sum(tl.where(s == best, idx, 0), axis=0).to(tl.int64))


GUMBEL_CONFIG = {"block": 2048, "num_warps": 8, "programs_per_sm": 4}


_FUSED_BROKEN: list[str] = []    # set when the kernel failed to compile / launch: PyTorch from then on


def _fused_enabled(logits: torch.Tensor) -> bool:
    from harness_ext.models.decode_kernels import fast_decode_enabled

    return triton is not None and not _FUSED_BROKEN and use_fused_sampler() and fast_decode_enabled(logits)


def use_fused_sampler() -> bool:
    """`THINKFAST_SAMPLER=fused` (default) runs the Triton kernel on CUDA; `torch` its PyTorch twin (the same noise
    and tokens; 2.41 ms against 0.047 ms per step at batch 256 on an H100: `scripts/profile_decode.py --check`)."""
    mode = os.environ.get("THINKFAST_SAMPLER", "fused")
    if mode not in ("fused", "torch"):
        raise ValueError(f"THINKFAST_SAMPLER must be fused or torch, got {mode!r}")
    return mode == "fused"


def gumbel_splits(batch: int, vocab: int, device, block: int) -> int:
    """Vocabulary splits per row: enough programs for `programs_per_sm` per SM, never a split under one tile.
    Static in (batch, vocab, device), so a captured graph keeps its launch shape."""
    from harness_ext.models.decode_kernels import _sm_count

    want = -(-GUMBEL_CONFIG["programs_per_sm"] * _sm_count(device) // batch)
    return max(1, min(want, -(-vocab // block)))


def gumbel_argmax(logits: torch.Tensor, keys: torch.Tensor | None, steps: torch.Tensor | None, temperature,
                  threshold: torch.Tensor | None = None, num_splits: int | None = None,
                  block: int | None = None) -> torch.Tensor:
    """argmax over tokens of `logit / temperature + gumbel(key, step, token)` (greedy: temperature None, plain
    argmax) among tokens with logit >= threshold[row] (None: all). logits [B, V] in any float dtype (read as
    is: bf16 logits need no fp32 copy); keys [B] int64; steps [B] int; temperature a float or a 0-d tensor
    (read on the device: a captured graph follows later changes). Returns int64 [B].
    `num_splits` / `block` are for tests and tuning."""
    if not _fused_enabled(logits):
        return gumbel_argmax_torch(logits, keys, steps, temperature, threshold)
    try:
        return _gumbel_argmax_fused(logits, keys, steps, temperature, threshold, num_splits, block)
    except Exception as err:  # noqa: BLE001 - a GPU-only compile failure must not end a run: same tokens, slower
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise
        import warnings

        _FUSED_BROKEN.append(repr(err))
        warnings.warn(f"fused sampler failed ({str(err)[:300]}); using the PyTorch sampler from now on")
        return gumbel_argmax_torch(logits, keys, steps, temperature, threshold)


def _gumbel_argmax_fused(logits, keys, steps, temperature, threshold, num_splits, block):
    batch, vocab = logits.shape
    assert logits.stride(-1) == 1, "logits: last dim must be contiguous"
    greedy = temperature is None
    block = block or GUMBEL_CONFIG["block"]
    if num_splits is None:
        num_splits = gumbel_splits(batch, vocab, logits.device, block)
    chunk = -(-vocab // num_splits)
    chunk = -(-chunk // block) * block if chunk > block else chunk
    num_splits = -(-vocab // chunk)                     # no split that starts past the vocabulary's end
    out = torch.empty(batch, dtype=torch.long, device=logits.device)
    if num_splits > 1:
        part_val = torch.empty(batch, num_splits, dtype=torch.float32, device=logits.device)
        part_idx = torch.empty(batch, num_splits, dtype=torch.int32, device=logits.device)
    else:
        part_val = part_idx = out
    temp_is_tensor = isinstance(temperature, torch.Tensor)
    inv_temperature = 1.0 if greedy or temp_is_tensor else 1.0 / float(temperature)
    dummy = out
    _gumbel_argmax_kernel[(batch, num_splits)](
        logits, keys if not greedy else dummy, steps if not greedy else dummy,
        temperature if temp_is_tensor else dummy, threshold if threshold is not None else dummy, out,
        part_val, part_idx, inv_temperature, vocab, chunk, logits.stride(0),
        NUM_SPLITS=num_splits, GREEDY=greedy, TEMP_FROM_PTR=temp_is_tensor, HAS_THRESHOLD=threshold is not None,
        BLOCK=min(block, triton.next_power_of_2(chunk)), num_warps=GUMBEL_CONFIG["num_warps"])
    if num_splits > 1:
        _gumbel_merge_kernel[(batch,)](part_val, part_idx, out, NUM_SPLITS=num_splits,
                                       SPLITS_P2=triton.next_power_of_2(num_splits), num_warps=1)
    return out


def gumbel_argmax_torch(logits, keys, steps, temperature, threshold=None) -> torch.Tensor:
    """`gumbel_argmax` in PyTorch ops (CPU path; the fused kernel's twin, same formulas in the same order)."""
    x = logits.float()
    if temperature is None:
        score = x
    else:
        inv_t = 1.0 / temperature if isinstance(temperature, torch.Tensor) else 1.0 / float(temperature)
        vocab_ids = torch.arange(x.shape[-1], device=x.device)
        score = x * inv_t + gumbel_noise(keys, steps, vocab_ids)
    if threshold is not None:
        score = score.masked_fill(x < threshold.view(-1, 1), float("-inf"))
    return score.argmax(-1)


# --------------------------------------------------------------------------------------------------
# the samplers the engine calls


def sample_next(logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature,
                top_k: int = 0, top_p=None) -> torch.Tensor:
    """Draw one token per row of `logits [B, V]` (Gumbel-max, see the module docstring).

    keys [B] int64 and steps [B] (token index within the sample) select the noise; temperature > 0 (float
    or 0-d tensor); top_k 0 = off; top_p None = off, else float or 0-d tensor. Returns [B] int64.
    Greedy decoding (temperature 0) is `greedy_next`."""
    threshold = filter_threshold(logits, temperature, top_k, top_p)
    return gumbel_argmax(logits, keys, steps, temperature, threshold)


def greedy_next(logits: torch.Tensor) -> torch.Tensor:
    """`logits.argmax(-1)` (first index on ties), fused on the GPU: one read of bf16 logits."""
    return gumbel_argmax(logits, None, None, None)


def filtered_probs_ref(logits_row: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The distribution `sample_next` draws from, for one row, written the slow obvious way: sort, keep the
    top k, keep the top-p prefix, then every token tied with the last kept one."""
    x = logits_row.double() / temperature
    raw = logits_row.float().tolist()
    order = sorted(range(x.numel()), key=lambda i: -raw[i])
    if top_k > 0:
        order = order[:top_k]
    p = torch.softmax(x[order], dim=0)
    kept, mass = [], 0.0
    for i, pi in zip(order, p.tolist()):
        if top_p < 1.0 and mass >= top_p:
            break
        kept.append(i)
        mass += pi
    lowest = min(raw[i] for i in kept)
    allowed = [i for i in range(x.numel()) if raw[i] >= lowest]
    probs = torch.zeros_like(x)
    probs[allowed] = torch.softmax(x[allowed], dim=0)
    return probs


def sample_next_ref(logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature: float,
                    top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Row by row: argmax of logit / T + noise over the support of `filtered_probs_ref`, the noise from
    `gumbel_noise_int` (Python ints). Matches `sample_next` token for token (up to fp32 vs fp64 rounding of
    near-ties, which random logits practically never produce)."""
    out = []
    for row, key, step in zip(logits, keys.tolist(), steps.tolist()):
        probs = filtered_probs_ref(row, temperature, top_k, top_p)
        raw = row.float().tolist()
        support = probs.nonzero().flatten().tolist()
        scores = [raw[i] / temperature + gumbel_noise_int(key, step, i) for i in support]
        out.append(support[max(range(len(support)), key=scores.__getitem__)])
    return torch.tensor(out, dtype=torch.long)
