"""Run one recipe under several settings at once, one GPU per variant, and compare their held-out agreement.

    # four Llamba variants at short budgets on a 4-GPU host (each variant: NAME:override[,override...])
    python scripts/distill_sweep.py --recipe llamba --teacher ckpt/teacher --out runs/llamba_sweep \
        --common stages.matrix.max_tokens=1e6 stages.hidden.max_tokens=4e6 stages.kd.max_tokens=6e6 \
        --variant recipe: --variant kd_lr1e-4:stages.kd.lr=1e-4 \
        --variant kd_lr1e-4_rkl:stages.kd.lr=1e-4,stages.kd.divergence=reverse_kl \
        --variant hid5e-4_kd1e-4:stages.hidden.lr=5e-4,stages.kd.lr=1e-4
    # CPU smoke (tiny budgets; the variants run one after another)
    python scripts/distill_sweep.py --recipe llamba --teacher T --out /tmp/sweep --smoke --variant a: --variant b:stages.kd.lr=1e-4

Each variant is a plain `thinkfast distill` run (same data, same seed) in OUT/<name>/ with CUDA_VISIBLE_DEVICES
set to its GPU; variants beyond the GPU count wait for a free one. Writes OUT/summary.json, OUT/summary.md (held-out
KL and top-1 agreement after every stage, the largest gradient norm and loss of each stage) and OUT/curves.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition(":")
    if not sep or not name or "/" in name:
        raise SystemExit(f"--variant {text!r}: expected NAME:override[,override...] (NAME without '/'; "
                         "'NAME:' for the recipe as it is)")
    items = [o.strip() for o in overrides.split(",") if o.strip()]
    bad = [o for o in items if "=" not in o]
    if bad:
        raise SystemExit(f"--variant {name}: {bad} are not key=value overrides")
    return name, items


def gpu_ids() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g for g in visible.split(",") if g.strip()]
    try:
        import torch
        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def stage_summary(variant_dir: Path) -> list[dict]:
    """Per finished stage: held-out metrics, and the worst gradient norm / loss seen while training."""
    rows = []
    evals = [json.loads(line) for line in open(variant_dir / "eval.jsonl")] if (variant_dir / "eval.jsonl").is_file() else []
    for ev in evals:
        row = {k: ev[k] for k in ("stage", "kl_forward", "kl_reverse", "top1_agreement") if k in ev}
        stage_dirs = sorted((variant_dir / "stages").glob(f"*-{ev['stage']}"))
        if stage_dirs and (stage_dirs[0] / "metrics.jsonl").is_file():
            metrics = [json.loads(line) for line in open(stage_dirs[0] / "metrics.jsonl")]
            if metrics:
                row["max_grad_norm"] = max(m.get("grad_norm", 0.0) for m in metrics)
                row["first_loss"], row["max_loss"], row["last_loss"] = (
                    metrics[0]["loss"], max(m["loss"] for m in metrics), metrics[-1]["loss"])
                row["tokens_per_s"] = sorted(m["tokens_per_s"] for m in metrics)[len(metrics) // 2]
        rows.append(row)
    return rows


def markdown(summary: dict) -> str:
    lines = [f"# distill sweep: recipe {summary['recipe']}", "",
             f"common overrides: `{' '.join(summary['common']) or '(none)'}`", "",
             "| variant | overrides | stage | top-1 agreement | KL fwd | KL rev | first / max / last loss | max grad norm | tok/s | rc |",
             "|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for v in summary["variants"]:
        for row in v["stages"] or [{}]:
            loss = (f"{row['first_loss']:.3g} / {row['max_loss']:.3g} / {row['last_loss']:.3g}"
                    if "first_loss" in row else "")
            cells = [v["name"], " ".join(v["overrides"]) or "(recipe)", row.get("stage", "-"),
                     f"{row['top1_agreement']:.3f}" if "top1_agreement" in row else "",
                     f"{row['kl_forward']:.3f}" if "kl_forward" in row else "",
                     f"{row['kl_reverse']:.3f}" if "kl_reverse" in row else "", loss,
                     f"{row['max_grad_norm']:.3g}" if "max_grad_norm" in row else "",
                     f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "", str(v["returncode"])]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", action="append", required=True, help="NAME:override[,override...] (repeatable)")
    ap.add_argument("--common", nargs="*", default=[], help="overrides every variant gets (before its own)")
    ap.add_argument("--smoke", action="store_true", help="the recipe's CPU smoke budgets")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"--variant names must differ, got {names}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = gpu_ids()
    slots = gpus or [None]          # no GPU: one variant at a time on the CPU
    print(f"[sweep] {len(variants)} variant(s) of {args.recipe} on {'GPUs ' + ','.join(gpus) if gpus else 'the CPU'}",
          flush=True)

    pending = list(variants)
    running: dict[str | None, tuple] = {}
    results = {}
    t0 = time.time()
    while pending or running:
        for slot in slots:
            if slot not in running and pending:
                name, overrides = pending.pop(0)
                cmd = [sys.executable, "-m", "harness_ext.cli", "distill", "--recipe", args.recipe, "--teacher",
                       args.teacher, "--out", str(out / name), *(["--smoke"] if args.smoke else []),
                       *args.common, *overrides]
                env = dict(os.environ)
                if slot is not None:
                    env["CUDA_VISIBLE_DEVICES"] = slot
                log = open(out / f"{name}.log", "w")
                log.write("$ " + " ".join(cmd) + "\n")
                log.flush()
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[slot] = (name, overrides, proc, log, time.time())
                print(f"[sweep +{time.time() - t0:.0f}s] {name} started on {'GPU ' + slot if slot else 'CPU'}", flush=True)
        time.sleep(2)
        for slot, (name, overrides, proc, log, start) in list(running.items()):
            if proc.poll() is not None:
                log.close()
                del running[slot]
                results[name] = {"name": name, "overrides": overrides, "returncode": proc.returncode,
                                 "seconds": round(time.time() - start, 1), "stages": stage_summary(out / name)}
                last = results[name]["stages"][-1] if results[name]["stages"] else {}
                print(f"[sweep +{time.time() - t0:.0f}s] {name} finished rc={proc.returncode} in "
                      f"{results[name]['seconds']:.0f}s; last eval {last}", flush=True)

    summary = {"recipe": args.recipe, "teacher": args.teacher, "common": args.common, "smoke": args.smoke,
               "gpus": gpus, "variants": [results[n] for n in names]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    curves = sorted(out.glob("*/stages/*/metrics.jsonl"))
    if curves:
        from distill.curves import plot_curves
        plot_curves(curves, out / "curves.png", labels=[f"{p.parents[2].name}: {p.parent.name}" for p in curves])
    return 0 if all(r["returncode"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
