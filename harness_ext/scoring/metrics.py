"""Best-of-N metrics from one pass of N samples per problem: pass@k, maj@k, bon@k, weighted_bon@k.

Each metric at k < N is the expected value of the k-sample procedure over a uniformly random k-subset of the N
samples (sampling without replacement), so one pass of N = 64 gives every k = 1, 2, 4, ..., 64 with no extra noise:

| metric            | k-sample procedure                                                  | estimator               |
| ----------------- | ------------------------------------------------------------------- | ----------------------- |
| `pass@k`          | any of the k samples is correct                                     | exact: Chen et al. 2021, 1 - C(n-c,k)/C(n,k) |
| `maj@k`           | the most frequent answer class is correct (ties split evenly)        | exact (dynamic programme over class counts) |
| `bon@k`           | the sample with the highest PRM score is correct (ties split evenly) | exact (closed form over score ranks) |
| `weighted_bon@k`  | the answer class with the largest summed PRM score is correct (ties split evenly) | exact when C(N,k) <= `MAX_EXACT_SUBSETS`, else the mean over `NUM_SUBSETS` random k-subsets from a fixed seed (deterministic) |

Inputs per problem: `class_ids` (one per sample; equal ids = equivalent answers, None = no parsable answer, which
never wins a vote and counts as wrong), `class_correct` ({class id: bool}), and PRM `scores` (one float per sample).
"""
from __future__ import annotations

import itertools
import math
from typing import Mapping, Sequence

import numpy as np

MAX_EXACT_SUBSETS = 5000
NUM_SUBSETS = 2000
SUBSET_SEED = 0


def ks_for(n: int) -> list[int]:
    """k = 1, 2, 4, ... up to n, and n itself."""
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n}")
    ks = [1 << i for i in range(n.bit_length()) if (1 << i) <= n]
    if ks[-1] != n:
        ks.append(n)
    return ks


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of samples n={n}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), computed as a stable product."""
    _check_k(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c={c} correct samples out of n={n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def _sample_correct(class_ids: Sequence[int | None], class_correct: Mapping[int, bool]) -> list[bool]:
    return [cid is not None and bool(class_correct.get(cid, False)) for cid in class_ids]


def maj_at_k(class_ids: Sequence[int | None], class_correct: Mapping[int, bool], k: int) -> float:
    """Expected accuracy of majority voting over a random k-subset (ties between classes split evenly)."""
    n = len(class_ids)
    _check_k(n, k)
    classes = sorted({cid for cid in class_ids if cid is not None})
    counts = {cid: 0 for cid in classes}
    for cid in class_ids:
        if cid is not None:
            counts[cid] += 1
    n_invalid = n - sum(counts.values())
    total = 0.0
    for winner in classes:
        if not class_correct.get(winner, False):
            continue
        others = [counts[cid] for cid in classes if cid != winner]
        for a in range(1, min(counts[winner], k) + 1):
            # ways[t, s]: weighted number of ways the other classes take s samples with t of them tied at a
            ways = np.zeros((len(others) + 2, k + 1))
            ways[0, 0] = 1.0
            for count in others:
                new = np.zeros_like(ways)
                for x in range(0, min(count, a - 1) + 1):
                    new[:, x:] += math.comb(count, x) * ways[:, : k + 1 - x]
                if count >= a:
                    new[1:, a:] += math.comb(count, a) * ways[:-1, : k + 1 - a]
                ways = new
            if n_invalid:
                new = np.zeros_like(ways)
                for x in range(0, min(n_invalid, k) + 1):
                    new[:, x:] += math.comb(n_invalid, x) * ways[:, : k + 1 - x]
                ways = new
            share = ways[:, k - a] / np.arange(1, ways.shape[0] + 1)
            total += math.comb(counts[winner], a) * float(share.sum())
    return total / math.comb(n, k)


def bon_at_k(scores: Sequence[float], correct: Sequence[bool], k: int) -> float:
    """Expected accuracy of picking the highest-scoring of a random k-subset (equal top scores split evenly).

    Sample i is picked when it is in the subset, no higher-scoring sample is, and it wins the tie among the t
    equal-scoring samples drawn with it: P = sum_t C(e, t) C(n-1-h-e, k-1-t) / C(n, k) / (t + 1).
    """
    n = len(scores)
    _check_k(n, k)
    if len(correct) != n:
        raise ValueError(f"{len(scores)} scores but {len(correct)} correctness flags")
    values = np.asarray(scores, dtype=np.float64)
    if np.isnan(values).any():
        raise ValueError("PRM scores contain NaN")
    total = 0.0
    for i in range(n):
        if not correct[i]:
            continue
        higher = int((values > values[i]).sum())
        equal = int((values == values[i]).sum()) - 1
        lower = n - 1 - higher - equal
        total += sum(math.comb(equal, t) * math.comb(lower, k - 1 - t) / (t + 1)
                     for t in range(0, min(equal, k - 1) + 1))
    return total / math.comb(n, k)


def _weighted_vote(subsets: np.ndarray, weights: np.ndarray, onehot: np.ndarray, class_ok: np.ndarray) -> float:
    # per subset and class: summed score; ties at the top split evenly; subsets with no valid answer score 0
    sums = (weights[subsets][:, :, None] * onehot[subsets]).sum(axis=1)  # [S, m]
    present = onehot[subsets].any(axis=1)  # [S, m]
    sums = np.where(present, sums, -np.inf)
    best = sums.max(axis=1, keepdims=True)
    tol = 1e-9 * np.maximum(1.0, np.abs(best))
    top = present & (sums >= best - tol)
    n_top = top.sum(axis=1)
    hits = (top & class_ok[None, :]).sum(axis=1)
    return float(np.where(n_top > 0, hits / np.maximum(n_top, 1), 0.0).mean())


def weighted_bon_at_k(scores: Sequence[float], class_ids: Sequence[int | None],
                      class_correct: Mapping[int, bool], k: int,
                      max_exact_subsets: int = MAX_EXACT_SUBSETS, num_subsets: int = NUM_SUBSETS,
                      seed: int = SUBSET_SEED) -> float:
    """Expected accuracy of PRM-weighted voting over a random k-subset (class score = sum of its samples' scores).

    Exact (every k-subset) when C(n, k) <= max_exact_subsets, else the mean over `num_subsets` k-subsets drawn
    with a fixed seed, so the value is deterministic.
    """
    n = len(scores)
    _check_k(n, k)
    if len(class_ids) != n:
        raise ValueError(f"{len(scores)} scores but {len(class_ids)} class ids")
    weights = np.asarray(scores, dtype=np.float64)
    if np.isnan(weights).any():
        raise ValueError("PRM scores contain NaN")
    classes = sorted({cid for cid in class_ids if cid is not None})
    if not classes:
        return 0.0
    column = {cid: j for j, cid in enumerate(classes)}
    onehot = np.zeros((n, len(classes)), dtype=bool)
    for i, cid in enumerate(class_ids):
        if cid is not None:
            onehot[i, column[cid]] = True
    class_ok = np.array([bool(class_correct.get(cid, False)) for cid in classes])
    if math.comb(n, k) <= max_exact_subsets:
        subsets = np.array(list(itertools.combinations(range(n), k)), dtype=np.int64)
    else:
        rng = np.random.default_rng(seed)
        subsets = np.argsort(rng.random((num_subsets, n)), axis=1)[:, :k]
    return _weighted_vote(subsets, weights, onehot, class_ok)


def bon_metrics(class_ids: Sequence[int | None], class_correct: Mapping[int, bool],
                scores: Sequence[float] | None = None, ks: Sequence[int] | None = None) -> dict[str, float]:
    """Every metric for one problem at every k: {"pass@1": ..., "maj@1": ..., "bon@1": ..., ...}.

    Without PRM `scores` the PRM metrics are left out (never reported as zeros).
    """
    n = len(class_ids)
    ks = list(ks) if ks is not None else ks_for(n)
    correct = _sample_correct(class_ids, class_correct)
    c = sum(correct)
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        out[f"maj@{k}"] = maj_at_k(class_ids, class_correct, k)
        if scores is not None:
            out[f"bon@{k}"] = bon_at_k(scores, correct, k)
            out[f"weighted_bon@{k}"] = weighted_bon_at_k(scores, class_ids, class_correct, k)
    return out
