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
from harness_ext.scoring.metrics import bon_metrics, ks_for  # noqa: E402


def regrade(samples_path: Path, style: str) -> dict:
    rows = [json.loads(line) for line in samples_path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{samples_path}: no samples")
    jobs, logged = [], []
    for number, row in enumerate(rows, 1):
        try:
            completions = [r[0] if isinstance(r, list) else r for r in row["resps"]]
            if len(completions) == 1 and isinstance(row["resps"][0], list) and len(row["resps"][0]) > 1:
                completions = row["resps"][0]
            records = [json.loads(r) if isinstance(r, str) else r for r in row["filtered_resps"][0]]
            gold = row["doc"]["answer"]
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{samples_path}: sample {number} is not a best-of-N record ({exc!r})") from None
        if len(records) != len(completions):
            raise ValueError(f"{samples_path}: sample {number} has {len(completions)} completions but "
                             f"{len(records)} scored records")
        jobs.append((gold, completions, style))
        logged.append(records)
    graded = grade_many(jobs, desc="regrading")
    names = None
    before, after = {}, {}
    for records, (answers, class_ids, class_correct) in zip(logged, graded):
        scores = [r.get("prm_score") for r in records]
        scores = scores if all(s is not None for s in scores) else None
        ks = ks_for(len(records))
        old = bon_metrics([r["class"] for r in records],
                          {r["class"]: bool(r["correct"]) for r in records if r["class"] is not None}, scores, ks)
        new = bon_metrics(class_ids, class_correct, scores, ks)
        names = names or list(new)
        for name in names:
            before[name] = before.get(name, 0.0) + old[name] / len(logged)
            after[name] = after.get(name, 0.0) + new[name] / len(logged)
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
