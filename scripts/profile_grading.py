"""Profile MATH-style answer grading on realistic answers: each of the first K MATH-500 problems graded against 56
answers drawn from MATH-500's gold answers (intervals, sets, radicals, text, matrices...) plus 8 correct ones.

    python scripts/profile_grading.py            # 25 problems x 64 answers, one process: seconds + cProfile top
    python scripts/profile_grading.py --problems 100 --top 40
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
    ap.add_argument("--top", type=int, default=25, help="cProfile rows to print")
    args = ap.parse_args()
    rows = load_problems("math500")
    golds = [r.answer for r in rows]
    rng = random.Random(0)
    jobs = [(r.answer, ["The answer is \\boxed{%s}." % rng.choice(golds) for _ in range(56)]
             + ["So \\boxed{%s}" % r.answer] * 8, "math") for r in rows[:args.problems]]
    profile = cProfile.Profile()
    t0 = time.time()
    profile.enable()
    for job in jobs:
        grade_completions(*job)
    profile.disable()
    print(f"{len(jobs)} problems x 64 answers graded in {time.time() - t0:.1f} s (one process)")
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(args.top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
