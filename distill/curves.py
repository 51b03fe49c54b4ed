"""Plot distillation curves from the trainer's JSONL metrics (one line per logged step).

    python -m distill.curves runs/mil50/stages/0-kd/metrics.jsonl --out leaderboards/distill/mil50_curves.png
    python -m distill.curves OUT/stages/*/metrics.jsonl --out curves.png      # MOHAWK's stages side by side

Left: the training loss against tokens seen (log scale: KL falls over orders of magnitude); right: tokens/s and
MFU, so a slow stretch (checkpointing, a recompile) shows where it happened.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    from harness_ext.data import read_jsonl

    rows = read_jsonl(path)  # DataError (a ValueError) names the file and line of a malformed row
    for row in rows:
        if "tokens" not in row or "loss" not in row:
            fields = sorted(k for k in row if k != "__where__")
            raise ValueError(f"{row['__where__']}: a metrics row needs 'tokens' and 'loss', got {fields}")
    if not rows:
        raise ValueError(f"{path}: no metrics rows")
    return rows


def plot_curves(paths: list[str | Path], out: str | Path, labels: list[str] | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, speed_ax) = plt.subplots(1, 2, figsize=(11, 4))
    mfu_ax = None  # one MFU axis shared by every file
    runs = [(path, read_metrics(path)) for path in paths]
    stages = [rows[0].get("stage") or Path(path).parent.name for path, rows in runs]
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} metrics files")
    for k, ((path, rows), stage) in enumerate(zip(runs, stages)):
        # the stage names a run's curve, unless several runs share one (1 GPU vs 2): then the file does
        label = labels[k] if labels else stage if stages.count(stage) == 1 else f"{stage} ({Path(path).stem})"
        tokens = [r["tokens"] / 1e6 for r in rows]
        (line,) = loss_ax.plot(tokens, [r["loss"] for r in rows], label=label)
        speed_ax.plot(tokens, [(r.get("tokens_per_s") or float("nan")) / 1e3 for r in rows], color=line.get_color(),
                      label=f"{label} tok/s")
        if any("mfu" in r for r in rows):
            mfu_ax = mfu_ax or speed_ax.twinx()
            mfu_ax.plot(tokens, [100 * r["mfu"] if r.get("mfu") is not None else float("nan") for r in rows], "--", alpha=0.5,
                        color=line.get_color())
    if mfu_ax is not None:
        mfu_ax.set_ylabel("MFU % (dashed)")
    loss_ax.set(xlabel="tokens (M)", ylabel="loss", yscale="log", title="distillation loss")
    speed_ax.set(xlabel="tokens (M)", ylabel="k tokens/s", title="trainer throughput")
    loss_ax.legend(fontsize="small")
    loss_ax.grid(alpha=0.3)
    speed_ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("metrics", nargs="+", help="metrics.jsonl files written by the trainer")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    print(plot_curves(args.metrics, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
