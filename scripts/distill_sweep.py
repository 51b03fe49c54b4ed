"""Run one recipe under several settings at once, one GPU per variant, and compare their held-out agreement.

    # four Llamba variants at short budgets on a 4-GPU host (each variant: NAME:override[,override...])
    python scripts/distill_sweep.py --recipe llamba --teacher ckpt/teacher --out runs/llamba_sweep \
        --common stages.matrix.max_tokens=1e6 stages.hidden.max_tokens=4e6 stages.kd.max_tokens=6e6 \
        --variant recipe: --variant kd_lr1e-4:stages.kd.lr=1e-4 \
        --variant kd_lr1e-4_rkl:stages.kd.lr=1e-4,stages.kd.divergence=reverse_kl \
        --variant hid5e-4_kd1e-4:stages.hidden.lr=5e-4,stages.kd.lr=1e-4
    # CPU smoke (tiny budgets; the variants run one after another)
    python scripts/distill_sweep.py --recipe llamba --teacher T --out /tmp/sweep --smoke --variant a: --variant b:stages.kd.lr=1e-4

Each variant is a plain `thinkfast distill` run (same data, same seed) in OUT/<name>/, its log OUT/<name>.log, run
by `thinkfast reproduce`'s scheduler on a GPU of its own; variants beyond the GPU count wait for a free one. Writes OUT/summary.json, OUT/summary.md (held-out
KL and top-1 agreement after every stage, the largest gradient norm and loss of each stage) and OUT/curves.png.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from harness_ext.data import read_jsonl  # noqa: E402


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


def stage_summary(variant_dir: Path) -> list[dict]:
    """Per finished stage: held-out metrics, and the worst gradient norm / loss seen while training."""
    rows = []
    evals = read_jsonl(variant_dir / "eval.jsonl") if (variant_dir / "eval.jsonl").is_file() else []
    for ev in evals:
        row = {k: ev[k] for k in ("stage", "kl_forward", "kl_reverse", "top1_agreement") if k in ev}
        stage_dirs = sorted((variant_dir / "stages").glob(f"*-{ev['stage']}"))
        if stage_dirs and (stage_dirs[0] / "metrics.jsonl").is_file():
            metrics = read_jsonl(stage_dirs[0] / "metrics.jsonl")
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
             "| variant | overrides | stage | top-1 agreement | KL fwd | KL rev | first / max / last loss | max grad norm | tok/s | status |",
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
                     f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else "", v["status"]]
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
    try:
        import torch
        gpus = torch.cuda.device_count()
    except ImportError:
        gpus = 0
    # the reproduction's scheduler: one job per device, logs, Ctrl-C kills every variant's process group; a
    # failed variant does not stop the others (tolerated)
    from harness_ext.reproduce import Launch, Scheduler, devices_for
    devices = devices_for(gpus, cuda=True) if gpus else devices_for(1, cuda=False)
    print(f"[sweep] {len(variants)} variant(s) of {args.recipe} on {', '.join(d.label for d in devices)}", flush=True)
    commands = {name: [sys.executable, "-m", "harness_ext.cli", "distill", "--recipe", args.recipe, "--teacher",
                       args.teacher, "--out", str(out / name), *(["--smoke"] if args.smoke else []),
                       *args.common, *overrides] for name, overrides in variants}

    def prepare(name):
        log = out / f"{name}.log"
        shell = f"cd {shlex.quote(str(REPO))} && {shlex.join(commands[name])} > {shlex.quote(str(log))} 2>&1"
        return Launch(["bash", "-c", shell], log)

    scheduler = Scheduler(names, {}, {n: 1.0 for n in names}, devices, prepare, tolerate=lambda name: True)
    if scheduler.run() == 130:
        return 130
    results = {name: {"name": name, "overrides": overrides, "status": scheduler.status[name],
                      "stages": stage_summary(out / name)} for name, overrides in variants}
    summary = {"recipe": args.recipe, "teacher": args.teacher, "common": args.common, "smoke": args.smoke,
               "gpus": gpus, "variants": [results[n] for n in names]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary), flush=True)
    curves = sorted(out.glob("*/stages/*/metrics.jsonl"))
    if curves:
        from distill.curves import plot_curves
        plot_curves(curves, out / "curves.png", labels=[f"{p.parents[2].name}: {p.parent.name}" for p in curves])
    return 0 if all(r["status"] == "ran" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
