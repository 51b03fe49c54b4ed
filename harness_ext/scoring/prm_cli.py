"""`thinkfast prm`: train the default PRM, score completions with any PRM, report a PRM's quality.

    # the embedded default (SmolLM2 teacher + LoRA/head), ~10 min on one H100; writes the trained part + manifest
    thinkfast prm train --out harness_ext/assets/prm
    thinkfast prm train --smoke --out /tmp/prm-smoke                  # tiny budgets, runs on CPU
    thinkfast prm train --smoke --backbone ckpt/tiny --out /tmp/prm   # any Llama checkpoint as the backbone

    # step scores for JSONL rows {"problem": ..., "completions": [...]} -> adds "step_scores" and "score"
    thinkfast prm score --prm default --input samples.jsonl --out scored.jsonl --aggregate min
    thinkfast prm score --prm RLHFlow/Llama3.1-8B-PRM-Deepseek-Data --input samples.jsonl --out scored.jsonl

    # held-out TRAIN-split problems: AUC for final-answer correctness, weighted_bon@16 vs maj@16 and pass@1
    thinkfast prm report --prm default --out runs/prm_report.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import fields
from pathlib import Path

ACTIONS = ("train", "score", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness_ext.scoring.prm import AGGREGATIONS, FORMATS, STEP_MODES, TrainRecipe

    parser.add_argument("action", choices=ACTIONS, help="train the default PRM, score completions, or report")
    parser.add_argument("--out", help="train: output directory; score: output JSONL; report: output JSON")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=None)
    g = parser.add_argument_group("train")
    g.add_argument("--smoke", action="store_true", help="tiny budgets (a few problems, short samples) for CPU")
    g.add_argument("--backbone", default=None,
                   help="Llama checkpoint directory used as the frozen backbone and the sampler "
                        "(default: the embedded SmolLM2 teacher via convert_teacher)")
    defaults = TrainRecipe()
    for f in fields(TrainRecipe):
        if f.name in ("seed", "lora_targets", "step_mode"):
            continue
        g.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=None,
                       help=f"default {getattr(defaults, f.name)}")
    g.add_argument("--step-mode", choices=STEP_MODES, default=None)
    g = parser.add_argument_group("score / report")
    g.add_argument("--prm", default="default", help="'default', a hub id, or a PRM directory")
    g.add_argument("--format", choices=FORMATS, default=None, help="PRM format (default: detected)")
    g.add_argument("--input", help="score: JSONL with 'problem' and 'completions' per row")
    g.add_argument("--aggregate", choices=AGGREGATIONS, default="min", help="score: per-completion aggregation")
    g.add_argument("--sampler", default=None, help="report: checkpoint that samples the completions "
                                                   "(default: the embedded teacher)")


def _recipe(args):
    from harness_ext.scoring.prm import SMOKE_RECIPE, TrainRecipe

    values = dict(SMOKE_RECIPE) if args.smoke else {}
    for f in fields(TrainRecipe):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return TrainRecipe(**values)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def run(args: argparse.Namespace) -> int:
    from harness_ext.scoring import prm as prm_lib

    if not args.out:
        print(f"thinkfast prm {args.action}: --out is required", file=sys.stderr)
        return 2
    try:
        if args.action == "train":
            manifest = prm_lib.train_default_prm(args.out, _recipe(args), backbone=args.backbone, device=args.device)
            print(json.dumps({"out": args.out, "data": manifest["data"], "metrics": manifest["metrics"],
                              "timing_s": manifest["timing_s"]}, indent=2))
            return 0
        if args.action == "score":
            return _score(args, prm_lib)
        return _report(args, prm_lib)
    except prm_lib.PRMError as exc:
        print(f"thinkfast prm {args.action}: {exc}", file=sys.stderr)
        return 2


def _score(args, prm_lib) -> int:
    if not args.input:
        print("thinkfast prm score: --input JSONL is required", file=sys.stderr)
        return 2
    rows = []
    with open(args.input) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row.get("problem"), str) or not isinstance(row.get("completions"), list):
                    raise prm_lib.PRMError(f"{args.input}:{n}: each row needs 'problem' (str) and 'completions' (list)")
                rows.append(row)
    prm = prm_lib.load_prm(args.prm, device=args.device, format=args.format)
    t0 = time.time()
    scores = prm.score_many([r["problem"] for r in rows], [r["completions"] for r in rows], progress=True)
    elapsed = time.time() - t0
    lines = []
    for row, per_completion in zip(rows, scores):
        row = {**row, "step_scores": per_completion,
               "score": [prm_lib.aggregate(s, args.aggregate) for s in per_completion], "aggregate": args.aggregate}
        lines.append(json.dumps(row))
    _atomic_write_text(Path(args.out), "\n".join(lines) + "\n")
    n = sum(len(r["completions"]) for r in rows)
    print(f"scored {n} completions of {len(rows)} problems in {elapsed:.1f}s with {prm.format} PRM -> {args.out}")
    return 0


def _report(args, prm_lib) -> int:
    import torch

    recipe = _recipe(args)
    device = prm_lib._pick_device(args.device)
    prm = prm_lib.load_prm(args.prm, device=device, format=args.format)
    if args.sampler is not None:
        sampler_dir = Path(args.sampler)
    else:
        from harness_ext.teacher import convert_teacher
        sampler_dir = convert_teacher(prm_lib.DEFAULT_TEACHER)
    # the same held-out problems `train` leaves out (same seed and sizes): never seen in training, never test
    _, evals = prm_lib._load_train_problems(recipe)
    sampler = prm_lib.Sampler(sampler_dir, device, batch_size=recipe.gen_batch_size)
    report = prm_lib.evaluate_prm(prm, sampler, evals, recipe.eval_samples, recipe.max_new_tokens,
                                  recipe.temperature, recipe.seed + 2)
    report = {"prm": args.prm, "format": prm.format, "sampler": str(sampler_dir), **report,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    _atomic_write_text(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0
