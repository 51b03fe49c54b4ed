"""GPU sampling without torch.Generator and without host synchronisation.

Every random number is a counter-based hash of (sample key, token index), so

  * a fixed seed reproduces a sample exactly, whatever slot or batch it lands in
    (the engine derives each sample's key from `seed` and the sample's global index);
  * sampling is a pure function of static tensors and can live inside a CUDA graph.

A token is drawn by inverse-CDF sampling: one uniform per row, a softmax, a cumsum and a
`searchsorted`. That is exact and costs a few passes over `[B, vocab]`, unlike the Gumbel-max
trick which needs one hashed uniform per vocabulary entry. Top-k restricts the candidates with
`topk` (sorted), top-p sorts the candidates (all of the vocabulary when top-k is off) and keeps
the smallest prefix whose mass reaches `top_p`.

`sample_next_ref` draws the same distribution one row at a time with plain Python loops; tests
compare the two.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


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


def uniform(keys: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row from (key, token index); float32, 24-bit resolution."""
    h = hash32(keys + steps.long() * _GOLDEN)
    h = hash32(h ^ 0x5BD1E995)
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


def sample_next(logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature,
                top_k: int = 0, top_p=None) -> torch.Tensor:
    """Draw one token per row of `logits [B, V]`.

    keys [B] int64 and steps [B] (token index within the sample) select the random number;
    temperature > 0 (float or 0-d tensor); top_k 0 = off; top_p None = off, else float or 0-d tensor.
    Returns [B] int64. Greedy decoding (temperature 0) is `logits.argmax(-1)`, handled by the caller.
    """
    x = logits.float() / temperature
    candidates = None
    if top_k > 0 and top_k < x.shape[-1]:
        x, candidates = x.topk(top_k, dim=-1)  # sorted, largest first
    elif top_p is not None:
        x, candidates = x.sort(dim=-1, descending=True)
    probs = torch.softmax(x, dim=-1)
    if top_p is not None:
        # keep a token if the mass strictly before it is below top_p: the top token always stays
        mass_before = probs.cumsum(-1) - probs
        probs = probs * (mass_before < top_p)
    cdf = probs.cumsum(-1)
    u = uniform(keys, steps) * cdf[:, -1]
    choice = torch.searchsorted(cdf, u.unsqueeze(1).contiguous(), right=True)
    choice = choice.clamp_(max=cdf.shape[-1] - 1)
    if candidates is not None:
        choice = candidates.gather(1, choice)
    return choice.squeeze(1)


def filtered_probs_ref(logits_row: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The distribution `sample_next` draws from, for one row, written the slow obvious way."""
    x = logits_row.double() / temperature
    order = sorted(range(x.numel()), key=lambda i: -float(x[i]))
    if top_k > 0:
        order = order[:top_k]
    p = torch.softmax(x[order], dim=0)
    kept, mass = [], 0.0
    for i, pi in zip(order, p.tolist()):
        if top_p < 1.0 and mass >= top_p:
            break
        kept.append((i, pi))
        mass += pi
    total = sum(pi for _, pi in kept)
    probs = torch.zeros_like(x)
    for i, pi in kept:
        probs[i] = pi / total
    return probs


def sample_next_ref(logits: torch.Tensor, keys: torch.Tensor, steps: torch.Tensor, temperature: float,
                    top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Row-by-row inverse-CDF sampling from `filtered_probs_ref` with the same uniforms.

    The CDF runs over vocabulary order when nothing is filtered and over descending logits
    otherwise, as in `sample_next`, so both pick the same token for the same uniform
    (up to float rounding at a CDF boundary).
    """
    u = uniform(keys, steps)
    filtered = (0 < top_k < logits.shape[-1]) or top_p < 1.0
    out = []
    for row, ui in zip(logits, u.tolist()):
        probs = filtered_probs_ref(row, temperature, top_k, top_p)
        support = probs.nonzero().flatten().tolist()
        if filtered:
            support.sort(key=lambda i: -float(row[i]))
        cdf, pick = 0.0, support[-1]
        for i in support:
            cdf += float(probs[i])
            if ui < cdf:
                pick = i
                break
        out.append(pick)
    return torch.tensor(out, dtype=torch.long)
