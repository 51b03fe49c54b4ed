"""Re-grade an lm-eval `--log_samples` file of a best-of-N task with the current answer grader, keeping the logged
PRM scores, and compare every metric with the one logged (no generation, no GPU).

    python scripts/regrade_samples.py runs/eval/samples_gsm8k500_bon_*.jsonl --style gsm8k --out regraded.json

Use it when the grader changes after an expensive evaluation: the completions and PRM step scores in the samples
file are all the metrics need (see tasks/utils.py, `metrics_from_records`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness_ext.scoring.answers import grade_many  # noqa: E402
from harness_ext.tasks.utils import metrics_from_records  # noqa: E402


def regrade(samples_path: Path, style: str) -> dict:
    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{samples_path}: no samples")
    jobs, logged = [], []
    for number, row in enumerate(rows, 1):
        try:
            (completions,) = row["resps"]  # lm-eval: one request (the N repeats) -> its N completions
            records = [json.loads(r) if isinstance(r, str) else r for r in row["filtered_resps"][0]]
            gold = row["doc"]["answer"]
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError(f"{samples_path}: sample {number} is not a best-of-N record ({exc!r})") from None
        if len(records) != len(completions):
            raise ValueError(f"{samples_path}: sample {number} has {len(completions)} completions but "
                             f"{len(records)} scored records")
        jobs.append((gold, completions, style))
        logged.append(records)
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    for records, (answers, class_ids, class_correct) in zip(logged, grade_many(jobs, desc="regrading")):
        regraded = [dict(r, answer=a, **{"class": c, "correct": bool(c is not None and class_correct[c])})
                    for r, a, c in zip(records, answers, class_ids)]  # PRM steps and score kept as logged
        for totals, recs in ((before, records), (after, regraded)):
            for name, value in metrics_from_records(recs).items():
                totals[name] = totals.get(name, 0.0) + value / len(logged)
    return {"samples": str(samples_path), "problems": len(logged), "style": style,
            "logged": before, "regraded": after}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", type=Path)
    parser.add_argument("--style", choices=("math", "gsm8k"), required=True)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = regrade(args.samples, args.style)
    print(f"{'metric':>16} {'logged':>8} {'regraded':>9}")
    for name in result["regraded"]:
        print(f"{name:>16} {100 * result['logged'][name]:7.2f}% {100 * result['regraded'][name]:8.2f}%")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
