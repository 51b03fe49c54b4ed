"""PRM scoring throughput: 500 problems x 64 completions through one PRM (target on one H100: <= 60 s).

    .venv/bin/python scripts/bench_prm.py --out runs/bench_prm                      # default PRM (needs the trained part)
    .venv/bin/python scripts/bench_prm.py --prm untrained --out runs/bench_prm      # same shapes, untrained head
    .venv/bin/python scripts/bench_prm.py --prm untrained --backbone ckpt/teacher --problems 8 --samples 4 --device cpu --out /tmp/bench_prm

Completions are real worked solutions from the GSM8K / MATH *train* splits, cut into blank-line steps (one step per
sentence) and randomly truncated / reordered per sample so lengths vary as sampled chains of thought do. Prints a
table and writes `bench_prm.json` under --out: wall time of `score_many` (loading excluded), completions/s,
tokens/s, the time spent laying out + tokenizing (measured apart), and the max |score - score_ref| over a few completions (bf16 batched vs fp32 reference).
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from harness_ext.data import load_problems
from harness_ext.scoring import prm as prm_lib


def make_completions(problems, samples: int, seed: int) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for p in problems:
        sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n+", p.solution.replace("####", "The answer is")) if s.strip()]
        comps = []
        for _ in range(samples):
            steps = list(sentences)
            if len(steps) > 2 and rng.random() < 0.3:
                i = rng.randrange(len(steps) - 1)
                steps[i], steps[i + 1] = steps[i + 1], steps[i]
            steps = steps[:max(1, rng.randint(len(steps) // 2, len(steps)))] * rng.choice([1, 1, 2])
            comps.append("\n\n".join(steps))
        out.append(comps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prm", default="default", help="'default', 'untrained', a hub id or a PRM directory")
    parser.add_argument("--problems", type=int, default=500)
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--backbone", default=None, help="with --prm untrained: backbone directory (default: teacher)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--max-batch-tokens", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    device = prm_lib._pick_device(args.device)
    if args.prm == "untrained":
        if args.backbone:
            backbone = Path(args.backbone)
        else:
            from harness_ext.teacher import convert_teacher
            backbone = convert_teacher(prm_lib.DEFAULT_TEACHER)
        prm = prm_lib.new_thinkfast_prm(backbone, prm_lib.TrainRecipe(), device,
                                        prm_lib._pick_dtype(device, None))
        prm.trained.eval()
    else:
        prm = prm_lib.load_prm(args.prm, device=device)
    if args.max_batch_tokens:
        prm.max_batch_tokens = args.max_batch_tokens

    pool = load_problems("gsm8k_train") + load_problems("math_train")
    problems = random.Random(args.seed).sample(pool, args.problems)
    completions = make_completions(problems, args.samples, args.seed)
    texts = [p.problem for p in problems]

    prm.score_many(texts[:2], completions[:2])  # warm-up: kernels, allocator
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    scores = prm.score_many(texts, completions, progress=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0

    # the layout + tokenizer share of the wall time, and the exact token count
    t1 = time.perf_counter()
    encoded = prm.encode_many([t for t, cs in zip(texts, completions) for _ in cs],
                              [prm.steps(c) for cs in completions for c in cs])
    encode_s = time.perf_counter() - t1
    n_tokens = sum(len(e.input_ids) for e in encoded)
    ref = prm.score_ref(texts[0], completions[0][:8])
    max_diff = max((abs(a - b) for r, s in zip(ref, scores[0][:8]) for a, b in zip(r, s)), default=0.0)
    n = sum(len(c) for c in completions)
    result = {
        "prm": args.prm, "format": prm.format, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(prm.dtype), "problems": len(problems), "samples": args.samples, "completions": n,
        "steps": sum(len(s) for per in scores for s in per), "tokens": n_tokens,
        "wall_s": round(wall, 2), "encode_s": round(encode_s, 2), "completions_per_s": round(n / wall, 1),
        "tokens_per_s": round(n_tokens / wall),
        "max_abs_diff_vs_ref": max_diff, "max_batch_tokens": prm.max_batch_tokens,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_prm.json").write_text(json.dumps(result, indent=2) + "\n")
    width = max(len(k) for k in result)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
