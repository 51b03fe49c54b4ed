"""The math datasets, as uniform `Problem` records, from the hub or from a local JSONL directory.

    thinkfast data --name gsm8k500 --show 3
    THINKFAST_DATA_DIR=../shared/data thinkfast data --name math500 --export math500.jsonl

| name          | hub source (default)                           | local file (THINKFAST_DATA_DIR or data_dir=) |
| ------------- | ---------------------------------------------- | -------------------------------------------- |
| `math500`     | `HuggingFaceH4/MATH-500`, split test           | `math500_test.jsonl`                         |
| `gsm8k500`    | `openai/gsm8k` (main), split test, rows 0-499  | `gsm8k_test.jsonl`, rows 0-499               |
| `gsm8k_train` | `openai/gsm8k` (main), split train             | `gsm8k_train.jsonl`                          |
| `math_train`  | `EleutherAI/hendrycks_math`, every subject, train | `math_train.jsonl` (fields as MATH-500)   |

GSM8K-500 is the first 500 problems of the GSM8K test split in its published order (ids `gsm8k-test-0000` to
`gsm8k-test-0499`). It is fixed, needs no random seed, and contains the first-208 slice used for the teacher
reference. `GSM8K500_SHA256` fingerprints its questions; both sources are checked against it.

Records: `id`, `problem`, `answer` (reference final answer, text), `solution` (worked solution), `source`.
GSM8K solutions have their calculator annotations (`<<4*2=8>>`) removed and their `#### 18` line turned
into `The final answer is $\\boxed{18}$.`, so every solution ends the way the tasks ask models to end.
Test splits (`math500`, `gsm8k500`) are for evaluation only; `distill` refuses to train on them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from harness_ext.scoring.answers import extract_boxed

DATA_DIR_ENV = "THINKFAST_DATA_DIR"
GSM8K500_SIZE = 500
GSM8K500_SHA256 = "07d4c88d651ca7698fe4ef53eab851b0aefa1dae3e53a86badd7472710f59caa"


@dataclass(frozen=True)
class Problem:
    id: str
    problem: str
    answer: str
    solution: str
    source: str


@dataclass(frozen=True)
class _Spec:
    local_file: str
    hub_id: str
    hub_config: str | None
    split: str
    test: bool


SPECS = {
    "math500": _Spec("math500_test.jsonl", "HuggingFaceH4/MATH-500", None, "test", True),
    "gsm8k500": _Spec("gsm8k_test.jsonl", "openai/gsm8k", "main", "test", True),
    "gsm8k_test": _Spec("gsm8k_test.jsonl", "openai/gsm8k", "main", "test", True),
    "gsm8k_train": _Spec("gsm8k_train.jsonl", "openai/gsm8k", "main", "train", False),
    "math_train": _Spec("math_train.jsonl", "EleutherAI/hendrycks_math", None, "train", False),
}
HENDRYCKS_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
                      "number_theory", "prealgebra", "precalculus")
TEST_SETS = tuple(name for name, spec in SPECS.items() if spec.test)


class DataError(ValueError):
    pass


def load_problems(name: str, data_dir: str | os.PathLike | None = None, limit: int | None = None) -> list[Problem]:
    """Load a dataset by name. Local JSONL when `data_dir` or $THINKFAST_DATA_DIR is set, else the hub."""
    if name not in SPECS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(SPECS)}")
    spec = SPECS[name]
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    rows = _local_rows(spec, data_dir) if data_dir is not None else _hub_rows(spec, name)
    problems = [_to_problem(name, index, row) for index, row in enumerate(rows)]
    if name == "gsm8k500":
        problems = problems[:GSM8K500_SIZE]
        _check_fingerprint(problems)
    return problems[:limit] if limit is not None else problems


def _local_rows(spec: _Spec, data_dir) -> list[dict]:
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist (set by data_dir= or ${DATA_DIR_ENV})")
    path = root / spec.local_file
    if not path.is_file():
        raise DataError(f"{path} is missing: the data directory (data_dir= or ${DATA_DIR_ENV}) "
                        f"must hold {spec.local_file}")
    return read_jsonl(path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_number}: malformed JSON row ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
            row["__where__"] = f"{path}:{line_number}"
            rows.append(row)
    return rows


def _hub_rows(spec: _Spec, name: str) -> list[dict]:
    import datasets

    try:
        if spec.hub_id == "EleutherAI/hendrycks_math":
            parts = [datasets.load_dataset(spec.hub_id, subject, split=spec.split) for subject in HENDRYCKS_SUBJECTS]
            rows = [dict(row) for part in parts for row in part]
        else:
            rows = [dict(row) for row in datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.split)]
    except Exception as exc:
        raise DataError(
            f"could not load {name} from the hub ({spec.hub_id}): {exc}. Offline, point ${DATA_DIR_ENV} "
            f"(or data_dir=) at a directory holding {spec.local_file}"
        ) from exc
    for index, row in enumerate(rows):
        row["__where__"] = f"{spec.hub_id}[{spec.split}][{index}]"
    return rows


def _field(row: dict, key: str, name: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{row.get('__where__', name)}: row has no text field {key!r} (dataset {name})")
    return value


_CALCULATOR = re.compile(r"<<[^<>]*>>")


def gsm8k_final_answer(solution: str) -> str:
    if "####" not in solution:
        raise ValueError("GSM8K solution has no '#### <answer>' line")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _to_problem(name: str, index: int, row: dict) -> Problem:
    if name.startswith("gsm8k"):
        question, raw = _field(row, "question", name), _field(row, "answer", name)
        try:
            answer = gsm8k_final_answer(raw)
        except ValueError as exc:
            raise DataError(f"{row.get('__where__', name)}: {exc}") from None
        steps = _CALCULATOR.sub("", raw.rsplit("####", 1)[0]).strip()
        solution = f"{steps}\nThe final answer is $\\boxed{{{answer}}}$."
        split = "test" if SPECS[name].test else "train"
        return Problem(f"gsm8k-{split}-{index:04d}", question, answer, solution, name)
    problem, solution = _field(row, "problem", name), _field(row, "solution", name)
    answer = row.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        answer = extract_boxed(solution)
        if answer is None:
            raise DataError(f"{row.get('__where__', name)}: row has no 'answer' and its solution no \\boxed{{}}")
    ident = row.get("unique_id") or f"{name}-{index:05d}"
    return Problem(str(ident), problem, answer.strip(), solution, name)


def fingerprint(problems: list[Problem]) -> str:
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(problem.problem.strip().encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _check_fingerprint(problems: list[Problem]) -> None:
    got = fingerprint(problems)
    if len(problems) != GSM8K500_SIZE or got != GSM8K500_SHA256:
        raise DataError(
            f"GSM8K-500 does not match its definition (first {GSM8K500_SIZE} test problems, sha256 "
            f"{GSM8K500_SHA256}); got {len(problems)} problems with sha256 {got}. The source's test split differs."
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, choices=sorted(SPECS))
    parser.add_argument("--data-dir", default=None, help=f"local JSONL directory (default: ${DATA_DIR_ENV}, else the hub)")
    parser.add_argument("--show", type=int, default=0, help="print this many records")
    parser.add_argument("--export", default=None, help="write the records as JSONL here")


def run(args: argparse.Namespace) -> int:
    try:
        problems = load_problems(args.name, args.data_dir)
    except DataError as exc:
        raise SystemExit(f"thinkfast data: {exc}")
    print(f"{args.name}: {len(problems)} problems, sha256 {fingerprint(problems)}")
    for problem in problems[: args.show]:
        print(json.dumps(asdict(problem), ensure_ascii=False))
    if args.export:
        with open(args.export, "w", encoding="utf-8") as handle:
            for problem in problems:
                handle.write(json.dumps(asdict(problem), ensure_ascii=False) + "\n")
    return 0
