"""Final-answer extraction, normalisation and equivalence for MATH- and GSM8K-style answers.

    >>> extract_answer("... so the total is $\\boxed{\\frac{1}{2}}$.")
    '\\frac{1}{2}'
    >>> is_equiv("\\frac{1}{2}", "0.5")
    True
    >>> group_answers(["1/2", "0.5", None, "3"])
    [0, 0, None, 1]

Extraction order (the first that matches wins):
  1. the last `\\boxed{...}` / `\\fbox{...}` (nested braces allowed; also `\\boxed 5`);
  2. the last `#### x` line (GSM8K's own format);
  3. the last "the (final) answer is x";
  4. for `style="gsm8k"` only, the last number in the text.
A completion with none of these has no answer (None): it counts as wrong and shows as `answer: null` in the samples.

Equivalence: equal after `normalize_answer` (cheap, catches most votes), else math-verify (`math_verify.parse` /
`verify`). math-verify's own timeout uses `signal.alarm`, which only works in the main thread; elsewhere (lm-eval
under a thread pool, a PRM server...) the comparison runs in a daemon thread that is abandoned after the timeout,
and a timed-out comparison counts as "not equivalent".
"""
from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import re
import signal
import threading
import time
from typing import Sequence

TIMEOUT_S = 5

# ----------------------------------------------------------------------------- extraction

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Contents of the last \\boxed{...} or \\fbox{...} (nested braces allowed, `\\boxed 5` too), or None."""
    best, command_length = -1, 0
    for command in _BOX_COMMANDS:
        at = text.rfind(command)
        if at > best:
            best, command_length = at, len(command)
    if best < 0:
        return None
    i = best + command_length
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":
        # `\boxed 5`: a single token up to whitespace or `$`
        match = re.match(r"[^\s$]+", text[i:])
        return match.group(0) if match else None
    depth, begin = 0, i + 1
    for j in range(i, len(text)):
        if text[j] == "{" and (j == 0 or text[j - 1] != "\\"):
            depth += 1
        elif text[j] == "}" and (j == 0 or text[j - 1] != "\\"):
            depth -= 1
            if depth == 0:
                inner = text[begin:j].strip()
                return inner or None
    return None  # unbalanced: the model ran out of tokens inside the box


_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:|=)\s*:?\s*([^\n]+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _clean_tail(answer: str) -> str | None:
    answer = answer.strip()
    # "The answer is $18$." -> "18"; "is 18 dollars." keeps "18 dollars", normalisation drops the unit word later.
    answer = re.sub(r"[.\s]+$", "", answer)
    if answer.startswith("$") and answer.count("$") >= 2:
        answer = answer[1:answer.index("$", 1)]
    answer = answer.strip().strip("$").strip()
    return answer or None


def _stated_answers(text: str):
    """Candidate final answers in order of precedence: the last box, the last `####` line, the last "answer is"."""
    boxed = extract_boxed(text)
    if boxed is not None:
        yield boxed
    hashes = _HASHES.findall(text)
    if hashes:
        found = _clean_tail(hashes[-1])
        if found:
            yield found
    stated = _ANSWER_IS.findall(text)
    if stated:
        found = _clean_tail(stated[-1])
        if found:
            boxed = extract_boxed(found)
            yield boxed if boxed is not None else found


def _gsm8k_number(candidate: str) -> str | None:
    """GSM8K answers are numbers: a stated answer that is not one ("2+2=4", "3 peaches", "the same as step 3")
    stands for its last number, as in GSM8K's regex grading; None when it holds no number."""
    normalized = normalize_answer(candidate)
    if normalized is not None and _PLAIN_NUMBER.fullmatch(normalized):
        return candidate
    numbers = _NUMBER.findall(candidate)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str, style: str = "math") -> str | None:
    """The final answer of one completion, as text, or None when it states none. `style`: "math" or "gsm8k"."""
    if style not in ("math", "gsm8k"):
        raise ValueError(f"unknown answer style {style!r}; choose 'math' or 'gsm8k'")
    if not text:
        return None
    for candidate in _stated_answers(text):
        if style == "math":
            return candidate
        number = _gsm8k_number(candidate)
        if number is not None:
            return number
    if style == "gsm8k":
        numbers = _NUMBER.findall(text)
        if numbers:
            return numbers[-1].replace(",", "")
    return None


# ----------------------------------------------------------------------------- normalisation

_SIMPLE_REPLACEMENTS = (
    ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", ""),
    ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\:", ""), ("\\ ", ""), ("~", ""),
    ("^{\\circ}", ""), ("^\\circ", ""), ("\\circ", ""), ("\\%", ""), ("%", ""), ("\\$", ""),
    ("\\displaystyle", ""), ("\\cdot", "*"), ("\\times", "*"),
)
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(
    r"\s*(dollars?|cents?|units?|degrees?|inches|inch|feet|foot|meters?|cm|km|miles?|hours?|minutes?|seconds?|"
    r"days?|weeks?|years?|percent|people|students|apples|pages|points)$", re.IGNORECASE)


def normalize_answer(answer: str | None) -> str | None:
    """A canonical string for cheap equality and vote grouping (math-verify handles the rest)."""
    if answer is None:
        return None
    text = answer.strip()
    text = text.strip("$").strip()
    text = _TEXT.sub(r"\1", text)
    for old, new in _SIMPLE_REPLACEMENTS:
        text = text.replace(old, new)
    text = _UNIT_WORDS.sub("", text).strip()
    text = re.sub(r"^[a-zA-Z]\s*=\s*", "", text)  # "x = 5" -> "5"
    text = re.sub(r"\s+", "", text).rstrip(".")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if re.fullmatch(r"-?\d+\.\d+", text):
        text = text.rstrip("0").rstrip(".")
    if re.fullmatch(r"-?\d+", text):
        text = str(int(text))
    if re.fullmatch(r"\(?[A-Ea-e]\)?", text):  # multiple-choice letters: "(B)" == "B" == "b"
        text = text.strip("()").upper()
    return text or None


# ----------------------------------------------------------------------------- math-verify with timeouts


def _call_with_timeout(fn, timeout_s: float, default):
    """Run fn() giving up after timeout_s; `default` on timeout or error. Works in any thread."""
    if threading.current_thread() is threading.main_thread():
        try:
            return fn(int(max(1, timeout_s)))
        except Exception:
            return default
    box: list = []

    def target():
        try:
            box.append(fn(None))  # no signal.alarm off the main thread
        except Exception:
            pass

    worker = threading.Thread(target=target, daemon=True, name="thinkfast-math-verify")
    worker.start()
    worker.join(timeout_s)
    return box[0] if box else default


def _under_alarm(fn, seconds: float):
    """fn() in the main thread, interrupted by SIGALRM after `seconds` (TimeoutError)."""
    def on_alarm(signum, frame):
        raise TimeoutError(f"gave up after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@functools.lru_cache(maxsize=65536)
def _parse(answer: str, timeout_s: float = TIMEOUT_S) -> tuple:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    configs = [LatexExtractionConfig(), ExprExtractionConfig()]

    def run(timeout):
        return parse(f"${answer}$", extraction_config=configs, parsing_timeout=timeout)

    return tuple(_call_with_timeout(run, timeout_s, default=[]))


MAX_VERIFY_TIMEOUTS = 2   # per problem: see `is_equiv`'s budget


def _verify(gold: tuple, target: tuple, timeout_s: float) -> bool:
    from math_verify import verify

    def run(timeout):
        return verify(list(gold), list(target), timeout_seconds=timeout)

    return bool(_call_with_timeout(run, timeout_s, default=False))


_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{4,}")
_MATH_WORDS = frozenset({"sqrt", "infty", "frac", "dfrac", "tfrac", "cdot", "times", "arcsin", "arccos", "arctan",
                         "sinh", "cosh", "tanh", "text", "mathrm", "mathbf", "left", "right", "begin", "pmatrix",
                         "bmatrix", "matrix", "array", "cases", "binom", "choose", "circ", "degree", "degrees",
                         "undefined", "none"})


def _is_prose(normalized: str) -> bool:
    """A run of four or more letters that is no LaTeX command or function name: words, not mathematics."""
    return any(word.lower() not in _MATH_WORDS for word in _WORD.findall(normalized))


# Probe values for the free symbols of an expression (sorted by name): equal expressions agree at any point.
_PROBES = (0.5377, 1.8339, -2.2588, 0.8622, 0.3188, -1.3077, -0.4336, 0.3426)


def _value_signature(expr, timeout_s: float) -> tuple:
    """("number", value rounded to 6 decimals) or ("expr", symbols, value at the probe point) for a sympy Expr;
    ("huge", leading digits and exponent) for a number beyond a float; ("other",) for anything else or what cannot
    be evaluated in time."""
    import sympy

    if not isinstance(expr, sympy.Expr) or isinstance(expr, sympy.MatrixBase):
        return ("other",)
    symbols = sorted(expr.free_symbols, key=lambda sym: sym.name)
    probes = dict(zip(symbols, (_PROBES[i % len(_PROBES)] + 0.1 * (i // len(_PROBES)) for i in range(len(symbols)))))

    def compute():
        value = expr.subs(probes).evalf(20) if symbols else expr.evalf(20)
        number = complex(value)
        if not (math.isfinite(number.real) and math.isfinite(number.imag)) and value.is_finite:
            return str(sympy.N(value, 15))  # finite beyond a float ("4^161536161"): leading digits and exponent
        return number

    def evaluate(seconds):  # evalf of e.g. 10^(10^10) can run for minutes: bounded like parse and verify
        return compute() if seconds is None else _under_alarm(compute, seconds)

    value = _call_with_timeout(evaluate, min(timeout_s, 1.0), default=None)
    if isinstance(value, str):
        return ("other",) if symbols else ("huge", value)
    if value is None or not (math.isfinite(value.real) and math.isfinite(value.imag)):
        return ("other",)  # what sympy cannot evaluate is left to verify
    if symbols:
        return ("expr", tuple(s.name for s in symbols), value)
    return ("number", round(value.real, 6) + 0.0, round(value.imag, 6) + 0.0)


@functools.lru_cache(maxsize=65536)
def _signature(normalized: str, timeout_s: float = TIMEOUT_S) -> tuple:
    """A cheap description of a parsed answer that rules out most unequal pairs without `verify`:
    ("number", ...) / ("expr", ...) / ("huge", ...) (see `_value_signature`); ("eq", right-hand sides) for an
    equation or a chain of them (math-verify compares an equation with a non-equation through its right-hand side);
    ("set", elements) for a finite set; ("interval",) for an interval or a union holding one; ("text", text) when
    math-verify kept only the text; ("other",) for inequalities, matrices, tuples...; ("unparsed",) when
    math-verify finds nothing."""
    if _PLAIN_NUMBER.fullmatch(normalized):  # most votes (GSM8K's all): no sympy needed
        return ("number", round(float(normalized), 6) + 0.0, 0.0)
    if _is_prose(normalized):  # "4 eggs and 5 hens": math-verify reads a product of letters; only text matches
        return ("text", normalized.lower())
    parsed = _parse(normalized, timeout_s)
    if not parsed:
        return ("unparsed",)
    import sympy

    expr = parsed[0]
    if isinstance(expr, str):
        return ("text", expr.strip().lower())
    if isinstance(expr, sympy.Equality):
        return ("eq", (_value_signature(expr.rhs, timeout_s),))
    if isinstance(expr, sympy.And) and expr.args and all(isinstance(a, sympy.Equality) for a in expr.args):
        return ("eq", tuple(_value_signature(a.rhs, timeout_s) for a in expr.args))
    if isinstance(expr, sympy.FiniteSet):
        return ("set", tuple(_value_signature(e, timeout_s) for e in expr.args))
    if isinstance(expr, sympy.Interval) or (isinstance(expr, sympy.Union)
                                            and any(isinstance(a, sympy.Interval) for a in expr.args)):
        return ("interval",)  # sympy makes [a, a] a FiniteSet: an Interval is never a single number
    return _value_signature(expr, timeout_s)


def _may_be_equal(sa: tuple, sb: tuple) -> bool:
    """False only where math-verify cannot call the two equal: two numbers that differ after its 6-decimal rounding,
    two expressions that differ at the probe point, a number against an expression in free symbols, an equation
    none of whose right-hand sides may equal the other answer, sets of different sizes, an interval against a
    number or an expression, different texts."""
    kinds = {sa[0], sb[0]}
    if "unparsed" in kinds:
        return False
    if "text" in kinds:
        return sa == sb
    if sa[0] == "eq" or sb[0] == "eq":
        if sa[0] == sb[0]:
            # equation against equation: math-verify's relational comparison decides, and its `solve` calls any two
            # equations without solutions equal ("9+1=10" and "N(N+1)=NN+N+1"), so no signature rules a pair out
            return True
        equation, other = (sa, sb) if sa[0] == "eq" else (sb, sa)
        return any(_may_be_equal(rhs, other) for rhs in equation[1])
    if "interval" in kinds:
        # a continuum equals no number or expression; against another interval, a finite set or a tuple (math-verify
        # reads "(1,2)" as an interval and as a pair, so it equals {1,2}) verify decides
        return kinds <= {"interval", "set", "other"}
    if sa[0] == "set" or sb[0] == "set":
        if sa[0] == sb[0]:
            return len(sa[1]) == len(sb[1])
        one, other = (sa, sb) if sa[0] == "set" else (sb, sa)
        if other[0] == "other":
            return True  # tuples, intervals...: (1, 2) may equal {1, 2}
        return len(one[1]) == 1 and _may_be_equal(one[1][0], other)
    if "huge" in kinds:
        # beyond a float: equal only to a number with the same leading digits and exponent (math-verify's own
        # comparison of two such powers runs into its time-out, or works out both exactly)
        return sa == sb if sa[0] == sb[0] else "other" in kinds
    if sa[0] == sb[0] == "number":
        return sa[1:] == sb[1:]
    if sa[0] == sb[0] == "expr":
        return sa[1] == sb[1] and abs(sa[2] - sb[2]) <= 1e-6 * max(1.0, abs(sa[2]), abs(sb[2]))
    return kinds != {"number", "expr"}


@functools.lru_cache(maxsize=65536)
def _verified(na: str, nb: str, timeout_s: float) -> tuple[bool, bool]:
    """`verify` both ways on two normalized answers: (verdict, whether it ran out of time). On the main thread
    math-verify's own alarm answers False, so a False that took the whole time-out counts as one."""
    pa, pb = _parse(na, timeout_s), _parse(nb, timeout_s)
    start = time.monotonic()
    verdict = _verify(pa, pb, timeout_s) or _verify(pb, pa, timeout_s)
    return verdict, not verdict and time.monotonic() - start >= 0.95 * timeout_s


def is_equiv(a: str | None, b: str | None, timeout_s: float = TIMEOUT_S,
             budget: collections.Counter | None = None) -> bool:
    """Whether two final answers are mathematically the same. None (no answer) equals nothing.

    math-verify's `verify` costs milliseconds of sympy per call, and grouping 64 samples calls it for every pair of
    distinct answers: pairs that `_signature` proves unequal skip it (16.6 s -> well under a second per MATH
    problem of 64 random answers).

    `budget` (one Counter per problem, as `grade_completions` keeps) is a time-out budget, not math-verify's
    verdict: an equation or an answer no signature describes (sympy could not evaluate it in a second, e.g.
    "1^{(2^2^{2342714053620040})}") whose pairs ran `verify` out of time MAX_VERIFY_TIMEOUTS times is compared by
    its text from then on; each further pair cost 2 x 5 s for a time-out's False (math-verify's `solve` on
    small-model equations). Numbers and expressions are never blamed."""
    if a is None or b is None:
        return False
    na, nb = normalize_answer(a), normalize_answer(b)
    if na is None or nb is None:
        return False
    if na == nb:
        return True
    sa, sb = _signature(na, timeout_s), _signature(nb, timeout_s)
    if not _may_be_equal(sa, sb):
        return False
    suspects = [n for n, s in ((na, sa), (nb, sb)) if s[0] in ("other", "eq")] if budget is not None else []
    if any(budget[n] >= MAX_VERIFY_TIMEOUTS for n in suspects):
        return False
    verdict, timed_out = _verified(na, nb, timeout_s)
    if timed_out and suspects:
        budget.update(suspects)
    return verdict


def group_answers(answers: Sequence[str | None], timeout_s: float = TIMEOUT_S,
                  budget: collections.Counter | None = None) -> list[int | None]:
    """Class id per answer: equivalent answers share an id (ids in order of first appearance); None stays None.

    Each new distinct answer is compared with the first member of every existing class, so the classes are
    deterministic given the order of `answers`. `budget`: see `is_equiv`.
    """
    class_of_key: dict[str, int] = {}
    representatives: list[str] = []
    ids: list[int | None] = []
    for answer in answers:
        key = normalize_answer(answer)
        if key is None:
            ids.append(None)
            continue
        if key not in class_of_key:
            for class_id, rep in enumerate(representatives):
                if is_equiv(rep, key, timeout_s, budget):
                    class_of_key[key] = class_id
                    break
            else:
                class_of_key[key] = len(representatives)
                representatives.append(key)
        ids.append(class_of_key[key])
    return ids


# ----------------------------------------------------------------------------- grading many problems


def grade_completions(gold: str, completions: Sequence[str], style: str
                      ) -> tuple[list[str | None], list[int | None], dict[int, bool]]:
    """Extracted answer and answer class per completion, and each class's correctness against `gold`."""
    answers = [extract_answer(text, style) for text in completions]
    budget: collections.Counter = collections.Counter()   # this problem's time-out budget (see is_equiv)
    class_ids = group_answers(answers, budget=budget)
    class_correct: dict[int, bool] = {}
    for answer, cid in zip(answers, class_ids):
        if cid is not None and cid not in class_correct:  # the class's first member stands for the class
            class_correct[cid] = is_equiv(answer, gold, budget=budget)
    return answers, class_ids, class_correct


def _grade_job(job: tuple) -> tuple:
    return grade_completions(*job)


def scoring_workers() -> int:
    """Processes for `grade_many`: $THINKFAST_SCORING_WORKERS, else one per CPU up to 16."""
    raw = os.environ.get("THINKFAST_SCORING_WORKERS")
    if raw is None:
        return max(1, min(16, os.cpu_count() or 1))
    if not raw.strip().isdigit() or int(raw) < 1:
        raise ValueError(f"THINKFAST_SCORING_WORKERS must be a positive integer, got {raw!r}")
    return int(raw)


@contextlib.contextmanager
def grading_in_background(jobs: Sequence[tuple[str, Sequence[str], str]], workers: int | None = None,
                          desc: str = "grading"):
    """Start `grade_completions` over (gold, completions, style) jobs on forked worker processes and yield an
    iterator over the results, in order: the caller can use the GPU meanwhile (the tasks score the PRM while
    math-verify runs). Small runs, or workers <= 1, grade in-process when the iterator is read."""
    from tqdm import tqdm

    workers = scoring_workers() if workers is None else workers
    if workers <= 1 or len(jobs) < 4 * workers:
        yield (grade_completions(*job) for job in tqdm(jobs, desc=desc, disable=len(jobs) < 2))
        return
    import multiprocessing

    # fork: the workers inherit the imported modules (no re-import of torch); they touch no CUDA state
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        results = pool.imap(_grade_job, jobs, chunksize=2)  # the workers start now
        yield tqdm(results, total=len(jobs), desc=f"{desc} ({workers} procs)")


def grade_many(jobs: Sequence[tuple[str, Sequence[str], str]], workers: int | None = None,
               desc: str = "grading") -> list[tuple]:
    """`grade_completions` over (gold, completions, style) jobs, in order. math-verify is CPU-bound sympy, so
    large runs (500 problems x 64 samples) fan out over forked worker processes; small ones stay in-process."""
    with grading_in_background(jobs, workers, desc) as results:
        return list(results)
