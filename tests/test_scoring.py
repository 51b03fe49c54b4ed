"""Answer extraction / equivalence and the best-of-N metrics, against brute-force definitions.

    .venv/bin/python -m pytest -q tests/test_scoring.py
"""
from __future__ import annotations

import itertools
import math
import random
import threading

import pytest

from harness_ext.scoring.answers import extract_answer, extract_boxed, group_answers, is_equiv, normalize_answer
from harness_ext.scoring.metrics import (bon_at_k, bon_metrics, ks_for, maj_at_k, pass_at_k, weighted_bon_at_k)

# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("so $\\boxed{5}$.", "5"),
    ("first \\boxed{1} then \\boxed{2}", "2"),                                   # the last box wins
    ("$\\boxed{\\frac{1}{2}}$", "\\frac{1}{2}"),                                 # nested braces
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),                                          # escaped braces inside
    ("the answer is \\boxed 7 today", "7"),                                      # \boxed without braces
    ("\\fbox{x^2}", "x^2"),
    ("\\boxed{}", None),                                                         # empty box
    ("ran out of tokens in \\boxed{\\frac{1}{", None),                            # unbalanced
    ("no box here", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, style, expected", [
    ("She pays 3 + 4 = 7 dollars.\n#### 7", "gsm8k", "7"),
    ("#### 1,000", "gsm8k", "1,000"),
    ("Reasoning...\nThe answer is 42.", "math", "42"),
    ("Therefore, the final answer is: $\\frac{3}{4}$. I hope it is correct.", "math", "\\frac{3}{4}"),
    ("The final answer is $\\boxed{12}$.", "gsm8k", "12"),
    ("He has 5 apples and buys 3 more, so 8 apples", "gsm8k", "8"),              # last-number fallback
    ("He has 5 apples and buys 3 more, so 8 apples", "math", None),              # no fallback for MATH
    ("costs $1,250.50 in total", "gsm8k", "1250.50"),
    ("a total of -3 degrees", "gsm8k", "-3"),
    ("", "gsm8k", None),
    ("I am not sure.", "gsm8k", None),
    ("#### 5\nwait, actually \\boxed{6}", "gsm8k", "6"),                         # a box beats ####
    ("So the answer is 2+2=4.", "gsm8k", "4"),                                  # GSM8K: a stated answer that
    ("So the answer is 2+2=4.", "math", "2+2=4"),                               # is no number -> its last number
    ("the answer is 3 peaches", "gsm8k", "3"),
    ("Total 12 pens. The answer is correct", "gsm8k", "12"),                    # no number stated: last in text
])
def test_extract_answer(text, style, expected):
    assert extract_answer(text, style) == expected


def test_extract_answer_rejects_unknown_style():
    with pytest.raises(ValueError, match="style"):
        extract_answer("\\boxed{1}", "gsm9k")


# ----------------------------------------------------------------------------- equivalence

EQUIVALENT = [
    # MATH style
    ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("\\frac{1}{2}", "1/2"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"), ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("x=5", "5"), ("90^\\circ", "90"), ("\\{1,2\\}", "\\{2,1\\}"),
    ("\\text{(B)}", "B"), ("(B)", "b"), ("10\\%", "10"), ("\\pi", "\\pi"), ("2\\pi", "6.283185307179586"),
    ("\\frac{3}{4}", "\\tfrac{3}{4}"), ("-\\frac{1}{3}", "\\frac{-1}{3}"), ("x^2+2x+1", "(x+1)^2"),
    ("[1,2)", "[1, 2)"), ("\\infty", "\\infty"), ("3\\sqrt{2}", "\\sqrt{18}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"), ("5\\text{ cm}", "5"), ("0.25", "\\frac{1}{4}"),
    # GSM8K style
    ("18", "18.0"), ("1,000", "1000"), ("$18", "18"), ("18 dollars", "18"), ("\\$1,250", "1250"),
    ("007", "7"), ("3.50", "3.5"), ("-4", "-4.00"), ("42.", "42"),
]
NOT_EQUIVALENT = [
    ("3", "4"), ("\\frac{1}{2}", "\\frac{1}{3}"), ("[1,2)", "[1,2]"), ("(1,2)", "(2,1)"), ("\\sqrt{2}", "2"),
    ("x^2", "2x"), ("18", "180"), ("1,000", "100"), ("0.5", "5"), ("-3", "3"), ("\\pi", "3.14"),
    ("(B)", "C"), ("\\{1,2\\}", "\\{1,3\\}"), ("12", "1.2"),
]


def test_equivalence_table_size():
    assert len(EQUIVALENT) + len(NOT_EQUIVALENT) >= 40


@pytest.mark.parametrize("a, b", EQUIVALENT)
def test_equivalent(a, b):
    assert is_equiv(a, b) and is_equiv(b, a)


@pytest.mark.parametrize("a, b", NOT_EQUIVALENT)
def test_not_equivalent(a, b):
    assert not is_equiv(a, b) and not is_equiv(b, a)


def test_none_is_never_equivalent():
    assert not is_equiv(None, None) and not is_equiv("1", None) and normalize_answer(None) is None


def test_equivalence_off_the_main_thread():
    # math-verify's own timeout uses signal.alarm, which raises off the main thread; ours must still answer
    out = {}

    def work():
        out["eq"] = is_equiv("\\frac{2}{4}", "0.5000")
        out["ne"] = is_equiv("\\frac{2}{5}", "0.5000")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert out == {"eq": True, "ne": False}


def test_signature_shortcut_agrees_with_math_verify():
    # is_equiv skips math-verify's `verify` for pairs whose signatures differ: on a pool of the answers small models
    # write (numbers, fractions, radicals, polynomials, sets, intervals), every verdict equals verify's own.
    from harness_ext.scoring.answers import _parse, _verify

    rng = random.Random(0)
    pool = sorted({a for pair in EQUIVALENT + NOT_EQUIVALENT for a in pair} | {
        rng.choice(["%d" % rng.randint(-9, 30), "%d.%d" % (rng.randint(0, 9), rng.randint(0, 99)),
                    "\\frac{%d}{%d}" % (rng.randint(1, 9), rng.randint(2, 9)), "%d\\sqrt{%d}" % (rng.randint(1, 4), 2),
                    "x^2+%dx" % rng.randint(1, 3), "%dx+%d" % (rng.randint(1, 3), rng.randint(0, 2)),
                    "\\{%d,%d\\}" % (rng.randint(1, 3), rng.randint(1, 3)), "(%d,%d]" % (rng.randint(0, 2), 3)])
        for _ in range(30)} | {
        # what small models write after "the answer is": equations, chains, sets, text
        "2+2=4", "8*10=80", "y=4", "4=2*2=4", "\\{4\\}", "\\{4,5\\}", "(4,5)", "x<4", "4 eggs and 5 hens",
        "the same as before", "80",
        # intervals and unions (an interval equals no number), and what they may be confused with
        "(5,\\infty)", "(5, \\infty)", "[2,12)\\cup(12,\\infty)", "(-\\infty,0]", "x>5", "\\{5\\}", "5",
        "(2,12)", "[2,12]", "\\infty", "(-\\infty,\\infty)", "\\mathbb{R}"})
    for a, b in itertools.combinations(pool, 2):
        na, nb = normalize_answer(a), normalize_answer(b)
        if na is None or nb is None or na == nb:
            continue
        pa, pb = _parse(na), _parse(nb)
        plain = bool(pa and pb and (_verify(pa, pb, 5) or _verify(pb, pa, 5)))
        assert is_equiv(a, b) == plain, (a, b)


def test_equation_and_huge_number_signatures_agree_with_math_verify():
    # Equations always reach `verify` (its `solve` calls two equations without solutions equal: "1+1=3" and
    # "1+1=1"); numbers beyond a float are compared by leading digits and exponent.
    from harness_ext.scoring.answers import _parse, _verify

    pool = ["x=3", "x=2x-3", "2x=4", "x=2", "y=2", "x=y", "x=2y", "a=b+1=5", "a=5", "x+y=3", "y+x=3", "a+b+c=7",
            "a+b+c=12", "a+b+c=a+b", "1+1=2", "1+1=3", "1+1=1", "\\sin A=1", "\\tan A=1", "2", "3", "\\frac{6}{2}",
            # numbers beyond a float: compared by leading digits and exponent
            "2^{4000}", "4^{2000}", "3^{4000}", "\\{2^{4000}\\}"]
    for a, b in itertools.combinations(pool, 2):
        na, nb = normalize_answer(a), normalize_answer(b)
        pa, pb = _parse(na), _parse(nb)
        plain = bool(pa and pb and (_verify(pa, pb, 5) or _verify(pb, pa, 5)))
        assert is_equiv(a, b) == plain, (a, b)


def test_group_answers():
    answers = ["1/2", "0.5", None, "3", "\\frac{1}{2}", "3.0", "7"]
    assert group_answers(answers) == [0, 0, None, 1, 0, 1, 2]


# ----------------------------------------------------------------------------- metrics vs brute force


def _subsets(n, k):
    return list(itertools.combinations(range(n), k))


def brute_maj(class_ids, class_correct, k):
    total = 0.0
    for subset in _subsets(len(class_ids), k):
        votes = {}
        for i in subset:
            if class_ids[i] is not None:
                votes[class_ids[i]] = votes.get(class_ids[i], 0) + 1
        if votes:
            top = [c for c, v in votes.items() if v == max(votes.values())]
            total += sum(class_correct[c] for c in top) / len(top)
    return total / math.comb(len(class_ids), k)


def brute_bon(scores, correct, k):
    total = 0.0
    for subset in _subsets(len(scores), k):
        best = max(scores[i] for i in subset)
        top = [i for i in subset if scores[i] == best]
        total += sum(correct[i] for i in top) / len(top)
    return total / math.comb(len(scores), k)


def brute_weighted(scores, class_ids, class_correct, k):
    total = 0.0
    for subset in _subsets(len(scores), k):
        mass = {}
        for i in subset:
            if class_ids[i] is not None:
                mass[class_ids[i]] = mass.get(class_ids[i], 0.0) + scores[i]
        if mass:
            best = max(mass.values())
            top = [c for c, v in mass.items() if abs(v - best) <= 1e-9 * max(1.0, abs(best))]
            total += sum(class_correct[c] for c in top) / len(top)
    return total / math.comb(len(scores), k)


def brute_pass(correct, k):
    return sum(any(correct[i] for i in s) for s in _subsets(len(correct), k)) / math.comb(len(correct), k)


def _random_problem(rng, n):
    n_classes = rng.randint(1, 4)
    class_ids = [rng.choice([None, *range(n_classes)]) for _ in range(n)]
    class_correct = {c: rng.random() < 0.4 for c in range(n_classes)}
    # coarse scores make ties common, so the tie rules are exercised too
    scores = [rng.choice([0.1, 0.5, 0.9, round(rng.random(), 3)]) for _ in range(n)]
    return class_ids, class_correct, scores


def test_metrics_match_brute_force_on_random_problems():
    rng = random.Random(0)
    for _ in range(150):
        n = rng.randint(1, 9)
        class_ids, class_correct, scores = _random_problem(rng, n)
        correct = [c is not None and class_correct[c] for c in class_ids]
        for k in range(1, n + 1):
            assert pass_at_k(n, sum(correct), k) == pytest.approx(brute_pass(correct, k), abs=1e-12)
            assert maj_at_k(class_ids, class_correct, k) == pytest.approx(brute_maj(class_ids, class_correct, k), abs=1e-12)
            assert bon_at_k(scores, correct, k) == pytest.approx(brute_bon(scores, correct, k), abs=1e-12)
            assert weighted_bon_at_k(scores, class_ids, class_correct, k) == pytest.approx(
                brute_weighted(scores, class_ids, class_correct, k), abs=1e-12)


def test_weighted_bon_subsampling_is_deterministic_and_close():
    rng = random.Random(1)
    class_ids, class_correct, scores = _random_problem(rng, 14)
    exact = brute_weighted(scores, class_ids, class_correct, 6)  # C(14, 6) = 3003 subsets
    a = weighted_bon_at_k(scores, class_ids, class_correct, 6, max_exact_subsets=100, num_subsets=4000)
    b = weighted_bon_at_k(scores, class_ids, class_correct, 6, max_exact_subsets=100, num_subsets=4000)
    assert a == b
    assert a == pytest.approx(exact, abs=0.03)


def test_edge_cases():
    assert ks_for(64) == [1, 2, 4, 8, 16, 32, 64] and ks_for(6) == [1, 2, 4, 6] and ks_for(1) == [1]
    assert pass_at_k(64, 0, 64) == 0.0 and pass_at_k(64, 1, 64) == 1.0 and pass_at_k(4, 1, 1) == 0.25
    assert maj_at_k([None, None], {}, 2) == 0.0                                   # nobody answered
    assert maj_at_k([0, 1], {0: True, 1: False}, 2) == 0.5                         # a tie splits evenly
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError):
        bon_at_k([0.1, float("nan")], [True, False], 1)


def test_bon_metrics_without_prm_leaves_prm_metrics_out():
    out = bon_metrics([0, 0, 1, None], {0: True, 1: False})
    assert set(out) == {"pass@1", "maj@1", "pass@2", "maj@2", "pass@4", "maj@4"}
    assert out["maj@4"] == 1.0 and out["pass@1"] == 0.5
    with_prm = bon_metrics([0, 0, 1, None], {0: True, 1: False}, scores=[0.1, 0.2, 0.9, 0.5])
    assert with_prm["bon@4"] == 0.0 and with_prm["weighted_bon@4"] == 0.0  # 0.9 for the wrong class beats 0.3


def test_grade_many_in_worker_processes_equals_in_process():
    from harness_ext.scoring.answers import grade_completions, grade_many

    rng = random.Random(1)
    jobs = [("\\frac{1}{2}", ["\\boxed{%s}" % rng.choice(["\\frac{%d}{%d}" % (rng.randint(1, 3), rng.randint(2, 4)),
                                                          "%d" % rng.randint(0, 3), "0.5", "x+%d" % rng.randint(1, 2)])
                               for _ in range(8)] + ["no answer"], "math") for _ in range(12)]
    forked = grade_many(jobs, workers=2)
    assert forked == [grade_completions(*job) for job in jobs]
    assert all(graded[0][-1] is None and graded[1][-1] is None for graded in forked)  # unparsable: no answer, no class
    assert any(True in graded[2].values() for graded in forked)
    # in the background: the workers grade while this process works (the tasks score the PRM meanwhile)
    import os
    import time

    from harness_ext.scoring.answers import grading_in_background
    with grading_in_background(jobs, workers=2) as results:
        time.sleep(0.5)
        busy = [p for p in os.listdir("/proc") if p.isdigit() and open(f"/proc/{p}/stat").read().split()[3] == str(os.getpid())]
        assert len(busy) >= 2  # the two forked graders exist before the results are read
        assert list(results) == forked


def test_regrade_samples_script_keeps_prm_scores_and_applies_the_current_grader(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "regrade_samples", Path(__file__).resolve().parents[1] / "scripts" / "regrade_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    completions = ["So the answer is 2+2=4.", "The answer is 5.", "#### 4", "no idea"]
    # logged by an older grader: "2+2=4" was its own (wrong) answer class
    logged = [{"answer": "2+2=4", "class": 0, "correct": False, "prm_steps": [0.9], "prm_score": 0.9},
              {"answer": "5", "class": 1, "correct": False, "prm_steps": [0.2], "prm_score": 0.2},
              {"answer": "4", "class": 2, "correct": True, "prm_steps": [0.1], "prm_score": 0.1},
              {"answer": None, "class": None, "correct": False, "prm_steps": [0.5], "prm_score": 0.5}]
    row = {"doc": {"problem": "2+2?", "answer": "4"}, "resps": [completions],
           "filtered_resps": [[json.dumps(r) for r in logged]]}
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps(row) + "\n")
    result = module.regrade(samples, "gsm8k")
    assert result["logged"]["pass@1"] == pytest.approx(0.25) and result["regraded"]["pass@1"] == pytest.approx(0.5)
    # bon@1 is the mean correctness of single draws either way; bon@4 picks the 0.9-scored "2+2=4", now right
    assert result["logged"]["bon@4"] == 0.0 and result["regraded"]["bon@4"] == 1.0
    samples.write_text(json.dumps({"doc": {"answer": "4"}, "resps": [completions]}) + "\n")
    with pytest.raises(ValueError, match="sample 1 is not a best-of-N record"):
        module.regrade(samples, "gsm8k")


def test_an_answer_that_exhausts_verify_twice_is_not_sent_again(monkeypatch):
    # "1^{(2^2^{2342714053620040})}" ran math-verify into its 5 s time-out against every other answer of a problem
    # (2 x 19 calls, 190 s); after two timed-out pairs an answer no signature describes only equals its own text.
    # The budget is one problem's (`grade_completions` starts a fresh one), so grading stays independent of which
    # other problems a worker graded before.
    import collections
    import time

    import math_verify

    from harness_ext.scoring import answers

    calls = []

    def slow_false(gold, target, timeout_seconds=5):
        calls.append((gold, target))
        time.sleep(0.3)
        return False

    monkeypatch.setattr(math_verify, "verify", slow_false)
    answers._verified.cache_clear()
    budget = collections.Counter()
    matrix = "\\begin{pmatrix}1&2\\end{pmatrix}"
    others = ["\\begin{pmatrix}%d&2\\end{pmatrix}" % i for i in range(3, 7)]
    assert answers._signature(answers.normalize_answer(matrix))[0] == "other"    # no shortcut: verify decides
    assert not any(answers.is_equiv(matrix, other, 0.3, budget) for other in others)
    assert len(calls) == 4                      # both directions of the first two pairs; the rest skip verify
    assert answers.is_equiv(matrix, matrix, 0.3, budget)    # its own text still matches
    # a fresh problem's budget sends the pair to verify again (the cached verdict; the time-out is counted anew)
    fresh = collections.Counter()
    assert not answers.is_equiv(matrix, others[-1], 0.3, fresh) and fresh[answers.normalize_answer(matrix)] == 1
    # a plain number is never blamed: "2" keeps reaching verify however often its pairs time out
    calls.clear()
    for other in ("\\frac{4}{2}", "\\frac{6}{3}", "\\frac{8}{4}"):
        answers.is_equiv("2", other, 0.3, budget)
    assert len(calls) == 6 and budget["2"] == 0
    answers._verified.cache_clear()
