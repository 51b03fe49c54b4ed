"""Profile MATH-style answer grading on realistic answers: each of the first K MATH-500 problems graded against 56
answers drawn from MATH-500's gold answers (intervals, sets, radicals, text, matrices...) plus 8 correct ones.

    python scripts/profile_grading.py            # 25 problems x 64 answers, one process: seconds + cProfile top
    python scripts/profile_grading.py --problems 100 --top 40

Or a real model's answers, from an lm-eval `--log_samples` file of a best-of-N task (the slowest problems listed):
    python scripts/profile_grading.py --samples samples_math500_bon_*.jsonl --problems 80 --top 0
"""
import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from harness_ext.data import load_problems  # noqa: E402
from harness_ext.scoring.answers import grade_completions  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=25)
    ap.add_argument("--top", type=int, default=25, help="cProfile rows to print (0: none)")
    ap.add_argument("--samples", type=Path, default=None,
                    help="lm-eval samples JSONL of a best-of-N task: grade its completions (MATH style)")
    args = ap.parse_args()
    if args.samples is not None:
        records = [json.loads(line) for line in args.samples.read_text().splitlines() if line.strip()]
        jobs = [(r["target"], r["resps"][0], "math") for r in records[:args.problems]]
        names = [r["doc_id"] for r in records[:args.problems]]
    else:
        rows = load_problems("math500")
        golds = [r.answer for r in rows]
        rng = random.Random(0)
        jobs = [(r.answer, ["The answer is \\boxed{%s}." % rng.choice(golds) for _ in range(56)]
                 + ["So \\boxed{%s}" % r.answer] * 8, "math") for r in rows[:args.problems]]
        names = list(range(len(jobs)))
    profile = cProfile.Profile()
    seconds = []
    t0 = time.time()
    profile.enable()
    for job in jobs:
        start = time.time()
        grade_completions(*job)
        seconds.append(time.time() - start)
    profile.disable()
    answers = len(jobs[0][1]) if jobs else 0
    print(f"{len(jobs)} problems x {answers} answers graded in {time.time() - t0:.1f} s (one process)")
    slowest = sorted(zip(seconds, names), reverse=True)[:5]
    print("slowest problems (s, doc):", ", ".join(f"{sec:.1f} {name}" for sec, name in slowest))
    if args.top <= 0:
        return
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
