"""Build `leaderboards/` (tables, plots, the paper's headline) from lm-eval results and benchmark JSON.

    thinkfast leaderboard --results runs/eval --bench leaderboards/bench --out leaderboards/
    thinkfast leaderboard --results runs/eval/teacher runs/eval/llamba --bench bench.json \\
        --out leaderboards/ --ks 1 8 64 --vote-k 64 --batches 1 64 256

One command regenerates everything under `--out`; nothing there is edited by hand. Output is
deterministic (sorted models, fixed number formatting, PNGs without timestamps), so re-running on the
same inputs gives byte-identical files.

Inputs
------
1. lm-eval 0.4.13 output folders (`lm_eval ... --output_path DIR [--log_samples]`). lm-eval writes
   `DIR/<model_name_sanitized>/results_<isotime>.json` (and `samples_<task>_<isotime>.jsonl`).
   Each `--results` argument may be such a `DIR`, a `<model_name_sanitized>` folder, or any folder above;
   every `results_*.json` below it is read. Used fields of a results file:
     results[task]["<metric>@<k>,<filter>"]  metric in pass | maj | bon | weighted_bon, k = 1, 2, 4, ... N;
                                             NaN / null / "N/A" / absent = unavailable (PRM metrics without a PRM),
                                             shown as "n/a", never as 0
     n-samples[task]["effective"]            problems evaluated
     model_name, config.model_args           model identity when no sidecar names it
     config.model_num_parameters             parameter count when no sidecar gives it
     date (unix seconds), git_hash           the table's date and commit
   Tasks read: `math500_bon` (MATH-500) and `gsm8k500_bon` (GSM8K-500); other tasks are ignored. When
   several results files hold the same model and task, the newest file (by its timestamp) wins.

2. `thinkfast_meta.json`, the per-run sidecar that `thinkfast reproduce` writes next to `results_*.json`
   (in the `<model_name_sanitized>` folder). Optional, but without it a model has no architecture,
   distillation tokens or generation time (so it is left out of the time-budget plots and the headline).
   Schema (`schema` = "thinkfast_meta/1"); required: model, architecture, parameters:
     {
       "schema": "thinkfast_meta/1",
       "model": "llamba-135m",                  # display name; also the key into the bench JSON
       "architecture": "llamba",                # llamba | mambainllama | llama
       "role": "student",                       # teacher | student; default: teacher iff architecture is llama
       "parameters": 135000000,                 # int
       "distillation_tokens": 2000000000,       # int, or null (the teacher: shown as "—")
       "card": "NVIDIA H100 80GB HBM3",         # the GPU the generation ran on
       "commit": "3f2c1e0",                     # optional; overrides lm-eval's git_hash
       "bench_model": "llamba",                 # optional; its rows in the bench JSON (default: see 3.)
       "generation": {                          # per task, the whole run's sample generation
         "math500_bon": {
           "wall_clock_seconds": 812.5,         # generating every completion of the task
           "generated_tokens": 10240000,        # completion tokens, summed over every completion
           "num_samples": 32000                 # completions generated (problems x N); default from the results
         }
       }
     }

3. Benchmark JSON from `thinkfast bench` (`--bench`: its bench.json, or its --out folder, where every JSON
   but gsm8k_sampling.json is read). Used fields (see harness_ext/generation/bench.py):
     device (the card), date, results[i].row ("hf-generate" = the teacher under HF generate; "teacher",
     "mil50", "llamba" under this engine), .batch, .status ("ok" | "OOM"), .tokens_per_s (generated tokens/s
     over the whole batch), .ms_per_step, .prefill_s, .peak_mem_GB, .floor_fraction.
   A model's bench rows are those named by its sidecar's bench_model, else by its own name, else by its
   architecture (llama -> teacher, llamba -> llamba, mambainllama -> mil50). The main table shows, per model
   and batch size, the best engine's tokens/s (OOM when every engine ran out of memory).

Outputs (under --out)
---------------------
  leaderboard.md      README-ready: the main table, the headline, per-task pass/maj/bon/weighted_bon by k,
                      the time-budget table, the benchmark table, the plots
  leaderboard.csv     the main table, one row per model (same cells as the markdown)
  leaderboard.json    the main table as numbers (null = unavailable), per-model curves, the headline, bench rows
  plots/pass_at_k_<task>.png, plots/voting_vs_k_<task>.png, plots/budget_<task>.png, plots/throughput_vs_batch.png

Generation time budget (the paper's Pareto figure): a model's seconds per sample is its measured
wall_clock_seconds / num_samples from the sidecar, or, without a measured time, mean completion tokens
(generated_tokens / num_samples) / its bench tokens/s at the largest batch size that did not OOM.
Generating k samples for a problem then costs k x seconds-per-sample (time per problem, amortised over the
batch). Coverage is pass@k, accuracy is weighted_bon@k (and maj@k). `headline()` answers the paper's
claim: at the largest equal budget measured, min(teacher's largest time, largest time of any student),
each model is scored at that budget: a model whose curve ends there scores its last point; one whose curve
goes past it scores the budget's place between its two measured k around it, linear in log k (k is measured
at powers of two, so without this a model 2% slower than the budget would drop from k = 64 to k = 32; coverage
is convex in log k at these rates, so the interpolation errs towards the model that goes past). Does any
student beat the teacher on coverage and on accuracy?
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

TASKS = {"math500_bon": "MATH-500", "gsm8k500_bon": "GSM8K-500"}
METRIC_FAMILIES = ("pass", "maj", "bon", "weighted_bon")
METRIC_KEY = re.compile(r"^(pass|maj|bon|weighted_bon)@(\d+)$")
ARCHITECTURES = ("llama", "llamba", "mambainllama")
DEFAULT_PASS_KS = (1, 8, 64)
DEFAULT_VOTE_K = 64
DEFAULT_BATCHES = (1, 64, 256)
META_FILE = "thinkfast_meta.json"
META_SCHEMA = "thinkfast_meta/1"
NA = "n/a"


class LeaderboardError(ValueError):
    """Bad input to `thinkfast leaderboard` (the message names the file and the problem)."""


# ----------------------------------------------------------------------------- records

@dataclass
class TaskResult:
    task: str
    metrics: dict[tuple[str, int], float | None]  # (family, k) -> value in [0, 1], None = unavailable
    num_problems: int | None
    source: str  # results file it came from

    def get(self, family: str, k: int) -> float | None:
        return self.metrics.get((family, k))

    @property
    def max_k(self) -> int:
        return max(k for fam, k in self.metrics if fam == "pass")

    def ks(self) -> list[int]:
        return sorted({k for _, k in self.metrics})


@dataclass
class ModelEntry:
    name: str
    architecture: str | None
    role: str  # "teacher" | "student"
    parameters: int | None
    distillation_tokens: int | None
    card: str | None
    date: str | None
    commit: str | None
    bench_model: str
    bench_model_explicit: bool = False
    protocol: str | None = None  # `thinkfast reproduce --budget` of the run; None / "full" = the paper's protocol
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    generation: dict[str, dict] = field(default_factory=dict)


@dataclass
class BenchRow:
    model: str
    engine: str
    batch_size: int
    tokens_per_s: float | None  # None = OOM
    ms_per_step: float | None = None
    prefill_s: float | None = None
    peak_memory_gb: float | None = None
    bandwidth_floor_fraction: float | None = None
    card: str | None = None
    date: str | None = None

    @property
    def oom(self) -> bool:
        return self.tokens_per_s is None


@dataclass
class BudgetPoint:
    k: float          # a measured k, or fractional where read between two of them (point_at_budget)
    seconds: float
    coverage: float | None
    maj: float | None
    weighted_bon: float | None


@dataclass
class HeadlineRow:
    model: str
    role: str
    k: float | None               # fractional where interpolated
    seconds: float | None
    coverage: float | None
    accuracy: float | None
    beats_coverage: bool | None  # None: not comparable (n/a on either side); teacher row: None
    beats_accuracy: bool | None
    interpolated: bool = False


@dataclass
class Headline:
    task: str
    teacher: str | None
    budget_seconds: float | None
    rows: list[HeadlineRow]
    answer: bool | None  # True: some student beats the teacher on both; None: could not be decided
    reason: str

    def sentence(self) -> str:
        name = TASKS.get(self.task, self.task)
        if self.budget_seconds is None:
            return f"**{name}:** not decided: {self.reason}."
        verdict = {True: "**yes**", False: "**no**", None: "**undecided**"}[self.answer]
        return (f"**{name}:** at the largest equal budget measured, {fmt_seconds(self.budget_seconds)} s of "
                f"generation per problem, does a student beat the teacher ({self.teacher}) on both coverage "
                f"(pass@k) and weighted best-of-N accuracy? {verdict}: {self.reason}.")


# ----------------------------------------------------------------------------- number helpers

def as_metric(value, where: str) -> float | None:
    """A metric value from JSON: a number in [0, 1], or None when unavailable (NaN, null, "N/A")."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("n/a", "nan", "")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LeaderboardError(f"{where}: metric value {value!r} is not a number")
    value = float(value)
    if math.isnan(value):
        return None
    if not 0.0 <= value <= 1.0 + 1e-9:
        raise LeaderboardError(f"{where}: metric value {value} is outside [0, 1]")
    return value


def fmt_pct(value: float | None) -> str:
    return NA if value is None else f"{100.0 * value:.1f}"


def fmt_count(value: int | None) -> str:
    if value is None:
        return NA
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def fmt_seconds(value: float | None) -> str:
    return NA if value is None else f"{value:.3g}"


def fmt_throughput(value: float | None, oom: bool = False) -> str:
    if oom:
        return "OOM"
    return NA if value is None else f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def round6(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


# ----------------------------------------------------------------------------- lm-eval results

def find_results_files(results_dirs: list[str | Path]) -> list[Path]:
    """Every lm-eval `results_*.json` under the given folders (a folder without any is an error)."""
    found: set[Path] = set()
    for d in results_dirs:
        d = Path(d)
        if not d.exists():
            raise LeaderboardError(f"results folder {d} does not exist")
        files = [d] if d.is_file() else sorted(p for p in d.rglob("results_*.json") if p.is_file())
        if not files:
            raise LeaderboardError(
                f"no lm-eval results under {d}: expected <model_name_sanitized>/results_<time>.json "
                f"as written by `lm_eval --output_path {d}`")
        found.update(p.resolve() for p in files)
    return sorted(found)


def results_timestamp(path: Path) -> str:
    # lm-eval names files results_<datetime.isoformat() with ':' -> '-'>.json; ISO sorts as text
    return path.stem[len("results_"):] if path.stem.startswith("results_") else path.stem


def read_json(path: Path, what: str):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise LeaderboardError(f"{what} {path} is not valid JSON: {e}") from None


def parse_task_metrics(task: str, task_results: dict, where: str, filter_name: str | None = None
                       ) -> dict[tuple[str, int], float | None]:
    """`{"pass@1,none": 0.4, "pass@1_stderr,none": ..., "alias": ...}` -> {("pass", 1): 0.4, ...}."""
    if not isinstance(task_results, dict):
        raise LeaderboardError(f"{where}: results[{task!r}] is not an object")
    by_filter: dict[str, dict[tuple[str, int], float | None]] = {}
    for key, value in task_results.items():
        metric, _, filt = key.partition(",")
        m = METRIC_KEY.match(metric)
        if m and filt:
            by_filter.setdefault(filt, {})[(m.group(1), int(m.group(2)))] = as_metric(value, f"{where} {task} {key}")
    if filter_name is not None:
        if filter_name not in by_filter:
            raise LeaderboardError(f"{where}: task {task} has no metrics under filter {filter_name!r} "
                                   f"(filters: {sorted(by_filter) or 'none'})")
        chosen = filter_name
    elif "none" in by_filter or len(by_filter) == 1:
        chosen = "none" if "none" in by_filter else next(iter(by_filter))
    elif by_filter:
        raise LeaderboardError(f"{where}: task {task} reports several filters {sorted(by_filter)}; pick one with --filter")
    else:
        chosen = None
    metrics = by_filter.get(chosen, {}) if chosen else {}
    if not any(fam == "pass" for fam, _ in metrics):
        known = ", ".join(f"{f}@k" for f in METRIC_FAMILIES)
        found = sorted(k for k in task_results if k != "alias" and "_stderr" not in k)
        raise LeaderboardError(f"{where}: unknown metrics for task {task}: expected {known} as "
                               f"'<metric>@<k>,<filter>' keys, found {found}")
    return metrics


def model_name_from_results(data: dict, path: Path) -> str:
    if data.get("model_name"):
        return str(data["model_name"])
    model_args = (data.get("config") or {}).get("model_args")
    if isinstance(model_args, dict) and model_args.get("pretrained"):
        return str(model_args["pretrained"])
    if isinstance(model_args, str):
        m = re.search(r"(?:^|,)\s*pretrained=([^,]+)", model_args)
        if m:
            return m.group(1)
    return path.parent.name


def read_meta(folder: Path) -> dict | None:
    """The `thinkfast_meta.json` sidecar in `folder`, validated, or None if there is none."""
    path = folder / META_FILE
    if not path.exists():
        return None
    meta = read_json(path, "run metadata")
    if not isinstance(meta, dict):
        raise LeaderboardError(f"run metadata {path} is not a JSON object")
    if meta.get("schema", META_SCHEMA) != META_SCHEMA:
        raise LeaderboardError(f"run metadata {path}: schema {meta['schema']!r} is not {META_SCHEMA!r}")
    missing = [k for k in ("model", "architecture", "parameters") if meta.get(k) is None]
    if missing:
        raise LeaderboardError(f"run metadata {path} lacks required field(s) {missing}")
    if meta["architecture"] not in ARCHITECTURES:
        raise LeaderboardError(f"run metadata {path}: architecture {meta['architecture']!r} is not one of {ARCHITECTURES}")
    role = meta.get("role", "teacher" if meta["architecture"] == "llama" else "student")
    if role not in ("teacher", "student"):
        raise LeaderboardError(f"run metadata {path}: role {role!r} is not 'teacher' or 'student'")
    meta["role"] = role
    for key in ("parameters", "distillation_tokens"):
        if meta.get(key) is not None and (isinstance(meta[key], bool) or not isinstance(meta[key], int)):
            raise LeaderboardError(f"run metadata {path}: {key} must be an integer, got {meta[key]!r}")
    generation = meta.get("generation", {})
    if not isinstance(generation, dict):
        raise LeaderboardError(f"run metadata {path}: generation must map task -> {{wall_clock_seconds, ...}}")
    for task, gen in generation.items():
        if not isinstance(gen, dict):
            raise LeaderboardError(f"run metadata {path}: generation[{task!r}] is not an object")
        for key in ("wall_clock_seconds", "generated_tokens", "num_samples"):
            v = gen.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0):
                raise LeaderboardError(f"run metadata {path}: generation[{task!r}].{key} must be a positive number, got {v!r}")
    return meta


def format_date(data: dict, path: Path) -> str:
    date = data.get("date")
    if isinstance(date, (int, float)) and not isinstance(date, bool):
        return datetime.fromtimestamp(float(date), tz=timezone.utc).strftime("%Y-%m-%d")
    if isinstance(date, str) and re.match(r"^\d{4}-\d{2}-\d{2}", date):
        return date[:10]
    return results_timestamp(path)[:10]


def load_models(results_dirs: list[str | Path], filter_name: str | None = None) -> list[ModelEntry]:
    """Read every results file (and sidecar) under `results_dirs` into one entry per model."""
    files = find_results_files(results_dirs)
    by_model: dict[str, ModelEntry] = {}
    newest: dict[tuple[str, str], str] = {}  # (model, task) -> timestamp of the file that gave it
    ignored: set[str] = set()
    # oldest first, so newer files override task results, dates and metadata
    for path in sorted(files, key=lambda p: (results_timestamp(p), str(p))):
        data = read_json(path, "lm-eval results")
        if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
            raise LeaderboardError(f"lm-eval results {path} has no 'results' object; is it an lm-eval results file?")
        meta = read_meta(path.parent)
        name = meta["model"] if meta else model_name_from_results(data, path)
        config = data.get("config") or {}
        entry = by_model.get(name)
        if entry is None:
            n_params = config.get("model_num_parameters")
            entry = by_model[name] = ModelEntry(
                name=name, architecture=None, role="student",
                parameters=n_params if isinstance(n_params, int) and n_params > 0 else None,
                distillation_tokens=None, card=None, date=None, commit=None, bench_model=name)
        if meta:
            entry.architecture, entry.role = meta["architecture"], meta["role"]
            entry.parameters, entry.distillation_tokens = meta["parameters"], meta.get("distillation_tokens")
            entry.card = meta.get("card") or entry.card
            entry.bench_model = meta.get("bench_model") or meta["model"]
            entry.bench_model_explicit = bool(meta.get("bench_model"))
            entry.generation.update(meta.get("generation", {}))
            entry.protocol = (meta.get("settings") or {}).get("budget") or entry.protocol
        commit = (meta or {}).get("commit") or data.get("git_hash")
        entry.commit = str(commit)[:7] if commit else entry.commit
        entry.date = format_date(data, path)
        for task, task_results in data["results"].items():
            if task not in TASKS:
                ignored.add(task)
                continue
            metrics = parse_task_metrics(task, task_results, str(path), filter_name)
            n = (data.get("n-samples") or {}).get(task) or {}
            num = n.get("effective", n.get("original")) if isinstance(n, dict) else None
            entry.tasks[task] = TaskResult(task, metrics, num if isinstance(num, int) else None, str(path))
            newest[(name, task)] = results_timestamp(path)
    models = [m for m in by_model.values() if m.tasks]
    if not models:
        raise LeaderboardError(f"no {' / '.join(TASKS)} results in {[str(d) for d in results_dirs]} "
                               f"(tasks found: {sorted(ignored) or 'none'})")
    # teachers first, then by name: a fixed order makes every output deterministic
    return sorted(models, key=lambda m: (m.role != "teacher", m.name))


# ----------------------------------------------------------------------------- bench JSON

BENCH_ENGINE = "thinkfast-engine"
HF_GENERATE_ROW = "hf-generate"  # the teacher under plain transformers `generate`
# bench rows are built from the teacher's config, one per architecture: the default bench name of a model
BENCH_NAME_BY_ARCHITECTURE = {"llama": "teacher", "llamba": "llamba", "mambainllama": "mil50"}


def _optional_number(value, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LeaderboardError(f"{where} is not a number: {value!r}")
    return None if math.isnan(value) else float(value)


def _is_sampling_report(data) -> bool:
    # `thinkfast bench --gsm8k-sampling` writes gsm8k_sampling.json next to bench.json: not throughput rows
    return isinstance(data, dict) and "results" not in data and {"total_s", "n", "problems"} <= set(data)


def read_bench(path: str | Path) -> list[BenchRow]:
    """Throughput rows from `thinkfast bench`'s bench.json, or from every bench JSON in a folder.

    bench.json: {"device": card, "date": iso, ..., "results": [{"row": "hf-generate" | "teacher" | "mil50" |
    "llamba", "batch": int, "status": "ok" | "OOM", "tokens_per_s", "ms_per_step", "prefill_s", "peak_mem_GB",
    "floor_fraction", ...}]}. Row "hf-generate" is the teacher under HF generate; the others run on this engine.
    """
    path = Path(path)
    if not path.exists():
        raise LeaderboardError(f"bench JSON {path} does not exist")
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    rows: list[BenchRow] = []
    for f in files:
        data = read_json(f, "bench JSON")
        if path.is_dir() and _is_sampling_report(data):
            continue
        if not isinstance(data, dict) or not isinstance(data.get("results"), list) or not data["results"]:
            raise LeaderboardError(f"bench JSON {f}: expected an object with a non-empty 'results' list "
                                   f"as written by `thinkfast bench`")
        if data.get("complete") is False:
            print(f"leaderboard: {f} is a partial bench (the run stopped before its last row); "
                  f"using the {len(data['results'])} point(s) it measured", file=sys.stderr)
        for i, raw in enumerate(data["results"]):
            where = f"bench JSON {f} results[{i}]"
            if not isinstance(raw, dict):
                raise LeaderboardError(f"{where} is not an object")
            missing = [k for k in ("row", "batch", "status") if raw.get(k) is None]
            if raw.get("status") == "ok":
                missing += [k for k in ("tokens_per_s", "ms_per_step") if raw.get(k) is None]
            if missing:
                raise LeaderboardError(f"{where} lacks required field(s) {missing} (has {sorted(raw)})")
            batch, status = raw["batch"], raw["status"]
            if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
                raise LeaderboardError(f"{where}: batch must be a positive integer, got {batch!r}")
            if status not in ("ok", "OOM"):
                raise LeaderboardError(f"{where}: status must be \"ok\" or \"OOM\", got {status!r}")
            ok = status == "ok"
            tps = _optional_number(raw["tokens_per_s"], f"{where} tokens_per_s") if ok else None
            if ok and (tps is None or tps <= 0):
                raise LeaderboardError(f"{where}: tokens_per_s must be positive, got {raw['tokens_per_s']!r}")
            name = str(raw["row"])
            rows.append(BenchRow(
                model="teacher" if name == HF_GENERATE_ROW else name,
                engine=HF_GENERATE_ROW if name == HF_GENERATE_ROW else BENCH_ENGINE,
                batch_size=batch, tokens_per_s=tps,
                ms_per_step=_optional_number(raw.get("ms_per_step"), f"{where} ms_per_step") if ok else None,
                prefill_s=_optional_number(raw.get("prefill_s"), f"{where} prefill_s") if ok else None,
                peak_memory_gb=_optional_number(raw.get("peak_mem_GB"), f"{where} peak_mem_GB") if ok else None,
                bandwidth_floor_fraction=_optional_number(raw.get("floor_fraction"), f"{where} floor_fraction")
                if ok else None,
                card=data.get("device"), date=str(data["date"])[:10] if data.get("date") else None))
    if not rows:
        raise LeaderboardError(f"no bench JSON (bench.json from `thinkfast bench`) in {path}")
    return sorted(rows, key=lambda r: (r.model, r.engine, r.batch_size))


def resolve_bench_names(models: list[ModelEntry], bench: list[BenchRow]) -> None:
    """Point each model at its bench rows: the sidecar's bench_model, else its own name if the bench has it,
    else its architecture's row (bench rows are per architecture, built from the teacher's config)."""
    names = {r.model for r in bench}
    for m in models:
        if m.bench_model_explicit or m.bench_model in names:
            continue
        default = BENCH_NAME_BY_ARCHITECTURE.get(m.architecture or "")
        if default in names:
            m.bench_model = default


def best_throughput(bench: list[BenchRow], model: str, batch_size: int) -> tuple[float | None, bool]:
    """(best tokens/s over engines, every engine OOMed) for a model at one batch size."""
    rows = [r for r in bench if r.model == model and r.batch_size == batch_size]
    ok = [r.tokens_per_s for r in rows if not r.oom]
    return (max(ok) if ok else None), (bool(rows) and not ok)


# ----------------------------------------------------------------------------- time budget and headline

def seconds_per_sample(model: ModelEntry, task: str, bench: list[BenchRow]) -> tuple[float | None, str]:
    """Generation seconds per completion (amortised over the batch), and how it was obtained."""
    gen = model.generation.get(task) or {}
    result = model.tasks.get(task)
    num_samples = gen.get("num_samples")
    if num_samples is None and result is not None and result.num_problems:
        num_samples = result.num_problems * result.max_k
    if gen.get("wall_clock_seconds") and num_samples:
        return gen["wall_clock_seconds"] / num_samples, "measured"
    if gen.get("generated_tokens") and num_samples:
        rows = sorted((r for r in bench if r.model == model.bench_model and not r.oom),
                      key=lambda r: (r.batch_size, r.tokens_per_s))
        if rows:
            return gen["generated_tokens"] / num_samples / rows[-1].tokens_per_s, f"bench@{rows[-1].batch_size}"
    return None, NA


def budget_curve(model: ModelEntry, task: str, bench: list[BenchRow]) -> list[BudgetPoint]:
    """(k, seconds per problem for k samples, coverage, maj, weighted_bon) for every measured k."""
    result = model.tasks.get(task)
    sec, _ = seconds_per_sample(model, task, bench)
    if result is None or sec is None:
        return []
    return [BudgetPoint(k, k * sec, result.get("pass", k), result.get("maj", k), result.get("weighted_bon", k))
            for k in result.ks() if result.get("pass", k) is not None]


def point_at_budget(curve: list[BudgetPoint], budget: float) -> tuple[BudgetPoint | None, bool]:
    """The curve read at `budget` seconds: the last measured point when the curve ends within the budget, else the
    budget's place between the measured points around it, linear in log k (seconds are proportional to k).
    Returns (point, interpolated); (None, False) when even k = 1 costs more than the budget."""
    # tolerance: the budget is itself some model's measured point, so compare with a relative slack
    inside = [p for p in curve if p.seconds <= budget * (1 + 1e-9)]
    if not inside:
        return None, False
    below = max(inside, key=lambda p: p.k)
    above = [p for p in curve if p.k > below.k]
    if not above or below.seconds >= budget:
        return below, False
    after = min(above, key=lambda p: p.k)
    frac = math.log(budget / below.seconds) / math.log(after.seconds / below.seconds)

    def lerp(a, b):
        return None if a is None or b is None else a + frac * (b - a)

    k = below.k * budget / below.seconds
    return BudgetPoint(k, budget, lerp(below.coverage, after.coverage), lerp(below.maj, after.maj),
                       lerp(below.weighted_bon, after.weighted_bon)), True


def headline(models: list[ModelEntry], task: str, bench: list[BenchRow] | None = None) -> Headline:
    """At the largest equal wall-clock budget measured, does a student beat the teacher on both
    coverage (pass@k) and weighted_bon accuracy? See the module docstring for the budget's definition."""
    bench = bench or []
    teachers = [m for m in models if m.role == "teacher" and task in m.tasks]
    students = [m for m in models if m.role == "student" and task in m.tasks]
    if len(teachers) != 1:
        reason = "no teacher among the results" if not teachers else \
            f"several teachers ({', '.join(m.name for m in teachers)}); mark one role=teacher"
        return Headline(task, None, None, [], None, reason)
    teacher = teachers[0]
    curves = {m.name: budget_curve(m, task, bench) for m in [teacher] + students}
    if not curves[teacher.name]:
        return Headline(task, teacher.name, None, [], None, "the teacher has no generation time (sidecar or bench)")
    timed = [s for s in students if curves[s.name]]
    if not timed:
        return Headline(task, teacher.name, None, [], None, "no student has a generation time (sidecar or bench)")
    budget = min(max(p.seconds for p in curves[teacher.name]),
                 max(max(p.seconds for p in curves[s.name]) for s in timed))
    t_point, t_interp = point_at_budget(curves[teacher.name], budget)
    t_cov, t_acc = (t_point.coverage, t_point.weighted_bon) if t_point else (None, None)
    rows = [HeadlineRow(teacher.name, "teacher", t_point and t_point.k, t_point and t_point.seconds,
                        t_cov, t_acc, None, None, t_interp)]

    def beats(mine, theirs):
        return None if mine is None or theirs is None else mine > theirs

    for s in timed:
        point, interp = point_at_budget(curves[s.name], budget)
        cov, acc = (point.coverage, point.weighted_bon) if point else (None, None)
        rows.append(HeadlineRow(s.name, "student", point and point.k, point and point.seconds,
                                cov, acc, beats(cov, t_cov), beats(acc, t_acc), interp))
    winners = [r.model for r in rows[1:] if r.beats_coverage and r.beats_accuracy]
    # a student with an n/a side is undecided only if the side that is known does not already lose
    undecided = [r.model for r in rows[1:] if None in (r.beats_coverage, r.beats_accuracy)
                 and False not in (r.beats_coverage, r.beats_accuracy)]
    if winners:
        answer, reason = True, f"{', '.join(winners)} beat{'s' if len(winners) == 1 else ''} it on both"
    elif undecided:
        answer, reason = None, (f"no student beats it on both among those measured; weighted_bon or pass@k is "
                                f"n/a for {', '.join(undecided)}")
    else:
        answer, reason = False, "no student beats it on both"
    return Headline(task, teacher.name, budget, rows, answer, reason)


# ----------------------------------------------------------------------------- tables

def table_columns(ks: tuple[int, ...], vote_k: int, batches: tuple[int, ...]) -> list[str]:
    cols = ["Model", "Architecture", "Parameters", "Distillation tokens"]
    for name in TASKS.values():
        cols += [f"{name} pass@{k}" for k in ks] + [f"{name} maj@{vote_k}", f"{name} weighted_bon@{vote_k}"]
    cols += [f"tok/s @ batch {b}" for b in batches]
    return cols + ["Card", "Date", "Commit"]


def build_table(models: list[ModelEntry], bench: list[BenchRow], ks: tuple[int, ...], vote_k: int,
                batches: tuple[int, ...]) -> tuple[list[str], list[list[str]], list[dict]]:
    """The main table: header, formatted rows (markdown / CSV), and the same rows as numbers (JSON)."""
    header = table_columns(ks, vote_k, batches)
    cells, records = [], []
    for m in models:
        distill = "—" if m.role == "teacher" and not m.distillation_tokens else fmt_count(m.distillation_tokens)
        # a reduced protocol (reproduce --budget fast) is named next to the model so it is never read as the paper's
        shown = m.name if m.protocol in (None, "full") else f"{m.name} (budget {m.protocol})"
        row = [shown, m.architecture or NA, fmt_count(m.parameters), distill]
        rec = {"model": m.name, "architecture": m.architecture, "role": m.role, "parameters": m.parameters,
               "distillation_tokens": m.distillation_tokens, "protocol": m.protocol or "full"}
        for task in TASKS:
            result = m.tasks.get(task)
            values = [("pass", k) for k in ks] + [("maj", vote_k), ("weighted_bon", vote_k)]
            for fam, k in values:
                v = result.get(fam, k) if result else None
                row.append(fmt_pct(v))
                rec[f"{task}/{fam}@{k}"] = round6(v)
        cards = {r.card for r in bench if r.model == m.bench_model and r.card}
        for b in batches:
            tps, oom = best_throughput(bench, m.bench_model, b)
            row.append(fmt_throughput(tps, oom))
            rec[f"tokens_per_s@{b}"] = "OOM" if oom else round6(tps)
        card = m.card or (sorted(cards)[0] if len(cards) == 1 else None)
        row += [card or NA, m.date or NA, m.commit or NA]
        rec.update(card=card, date=m.date, commit=m.commit)
        cells.append(row)
        records.append(rec)
    return header, cells, records


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|")
    def numeric(i: int) -> bool:  # right-align columns of numbers
        return all(re.fullmatch(r"-?[\d.]+[KMBT]?|n/a|OOM|—", row[i]) for row in rows) and bool(rows)
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join("---:" if numeric(i) else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def per_k_table(models: list[ModelEntry], task: str) -> tuple[list[str], list[list[str]]] | None:
    present = [m for m in models if task in m.tasks]
    if not present:
        return None
    ks = sorted({k for m in present for k in m.tasks[task].ks()})
    header = ["Model", "Metric"] + [f"k={k}" for k in ks]
    rows = [[m.name, fam] + [fmt_pct(m.tasks[task].get(fam, k)) for k in ks]
            for m in present for fam in METRIC_FAMILIES]
    return header, rows


def budget_table(models: list[ModelEntry], task: str, bench: list[BenchRow]) -> tuple[list[str], list[list[str]]]:
    header = ["Model", "s / sample", "source", "k", "s / problem", "pass@k", "maj@k", "weighted_bon@k"]
    rows = []
    for m in models:
        if task not in m.tasks:
            continue
        sec, how = seconds_per_sample(m, task, bench)
        curve = budget_curve(m, task, bench)
        if not curve:
            rows.append([m.name, NA, how, NA, NA, NA, NA, NA])
        for p in curve:
            rows.append([m.name, fmt_seconds(sec), how, str(p.k), fmt_seconds(p.seconds), fmt_pct(p.coverage),
                         fmt_pct(p.maj), fmt_pct(p.weighted_bon)])
    return header, rows


def headline_table(h: Headline) -> tuple[list[str], list[list[str]]]:
    yes_no = {True: "yes", False: "no", None: NA}
    header = ["Model", "Role", "k within budget", "s / problem", "coverage (pass@k)", "weighted_bon@k",
              "beats teacher: coverage", "beats teacher: accuracy"]
    def fmt_k(r: HeadlineRow) -> str:
        return NA if r.k is None else f"{r.k:.1f} (log-k interpolated)" if r.interpolated else f"{r.k:g}"

    rows = [[r.model, r.role, fmt_k(r), fmt_seconds(r.seconds), fmt_pct(r.coverage),
             fmt_pct(r.accuracy), "—" if r.role == "teacher" else yes_no[r.beats_coverage],
             "—" if r.role == "teacher" else yes_no[r.beats_accuracy]] for r in h.rows]
    return header, rows


def bench_table(bench: list[BenchRow]) -> tuple[list[str], list[list[str]]]:
    header = ["Model", "Engine", "Batch", "tok/s", "ms / step", "prefill s", "peak GB", "bandwidth floor", "Card", "Date"]
    rows = [[r.model, r.engine, str(r.batch_size), fmt_throughput(r.tokens_per_s, r.oom), fmt_seconds(r.ms_per_step),
             fmt_seconds(r.prefill_s), fmt_seconds(r.peak_memory_gb),
             NA if r.bandwidth_floor_fraction is None else f"{r.bandwidth_floor_fraction:.2f}",
             r.card or NA, str(r.date) if r.date else NA] for r in bench]
    return header, rows


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.rcParams.update({"svg.hashsalt": "thinkfast", "figure.dpi": 100})
    return plt


def _plain_ticks():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda x, _: f"{x:g}")  # 64, not 2^6


def _colors(models: list[ModelEntry]) -> dict[str, str]:
    palette = [f"C{i}" for i in range(10)]
    return {m.name: palette[i % len(palette)] for i, m in enumerate(models)}


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # no Software / date metadata: re-running must write identical bytes
    fig.savefig(path, format="png", metadata={"Software": None})
    import matplotlib.pyplot as plt
    plt.close(fig)


def _xy(points):
    pts = [(x, y) for x, y in points if y is not None]
    return [x for x, _ in pts], [100.0 * y for _, y in pts]


def plot_metric_vs_k(models, task, families, path: Path) -> None:
    plt = _plt()
    colors = _colors(models)
    fig, axes = plt.subplots(1, len(families), figsize=(5 * len(families), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        for m in models:
            result = m.tasks.get(task)
            if result is None:
                continue
            xs, ys = _xy((k, result.get(fam, k)) for k in result.ks())
            if xs:
                ax.plot(xs, ys, marker="o", color=colors[m.name], label=m.name)
            else:
                ax.plot([], [], color=colors[m.name], label=f"{m.name} ({NA})")
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(_plain_ticks())
        ax.set_xlabel("k (samples per problem)")
        ax.set_ylabel(f"{fam}@k (%)")
        ax.set_title(f"{TASKS[task]}: {fam}@k")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def plot_budget(models, task, bench, head: Headline, path: Path) -> None:
    plt = _plt()
    colors = _colors(models)
    fig, (ax_cov, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in models:
        curve = budget_curve(m, task, bench)
        if not curve:
            continue
        style = "-" if m.role == "teacher" else "--"
        ax_cov.plot(*_xy((p.seconds, p.coverage) for p in curve), style, marker="o", color=colors[m.name], label=m.name)
        xs, ys = _xy((p.seconds, p.weighted_bon) for p in curve)
        if xs:
            ax_acc.plot(xs, ys, style, marker="o", color=colors[m.name], label=f"{m.name} weighted_bon")
        xs, ys = _xy((p.seconds, p.maj) for p in curve)
        if xs:
            ax_acc.plot(xs, ys, ":", marker="x", color=colors[m.name], label=f"{m.name} maj")
    for ax, what in ((ax_cov, "coverage (pass@k, %)"), (ax_acc, "accuracy (%)")):
        if head.budget_seconds is not None:
            ax.axvline(head.budget_seconds, color="grey", linestyle=":", linewidth=1, label="equal budget")
        ax.set_xscale("log")
        ax.set_xlabel("generation time per problem (s, log)")
        ax.set_ylabel(what)
        ax.set_title(f"{TASKS[task]}: {what.split(' (')[0]} vs time budget")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def plot_throughput(bench: list[BenchRow], path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series = sorted({(r.model, r.engine) for r in bench})
    for i, (model, engine) in enumerate(series):
        rows = [r for r in bench if r.model == model and r.engine == engine and not r.oom]
        label = f"{model} ({engine})"
        if any(r.oom for r in bench if r.model == model and r.engine == engine):
            label += ", OOM beyond"
        ax.plot([r.batch_size for r in rows], [r.tokens_per_s for r in rows], marker="o", color=f"C{i % 10}", label=label)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(_plain_ticks())
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode throughput (tokens/s)")
    ax.set_title("Throughput vs batch size")
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


# ----------------------------------------------------------------------------- build

def build(results_dirs: list[str | Path], out_dir: str | Path, bench_path: str | Path | None = None,
          ks: tuple[int, ...] = DEFAULT_PASS_KS, vote_k: int = DEFAULT_VOTE_K,
          batches: tuple[int, ...] = DEFAULT_BATCHES, filter_name: str | None = None,
          teacher: str | None = None) -> dict[str, Path]:
    """Regenerate every output file under `out_dir`; returns {name: path}."""
    models = load_models(results_dirs, filter_name)
    if teacher is not None:
        names = [m.name for m in models]
        if teacher not in names:
            raise LeaderboardError(f"--teacher {teacher!r} is not among the models {names}")
        for m in models:
            m.role = "teacher" if m.name == teacher else "student"
        models.sort(key=lambda m: (m.role != "teacher", m.name))
    bench = read_bench(bench_path) if bench_path else []
    resolve_bench_names(models, bench)
    out = Path(out_dir)
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    # plots of an earlier run (a task or bench no longer given) must not linger next to fresh ones
    for stale in sorted(plots.glob("*.png")):
        if re.fullmatch(r"(pass_at_k|voting_vs_k|budget)_\w+|throughput_vs_batch", stale.stem):
            stale.unlink()
    written: dict[str, Path] = {}

    header, cells, records = build_table(models, bench, tuple(ks), vote_k, tuple(batches))
    heads = {task: headline(models, task, bench) for task in TASKS if any(task in m.tasks for m in models)}

    for task in heads:
        for name, families in (("pass_at_k", ("pass",)), ("voting_vs_k", ("maj", "bon", "weighted_bon"))):
            p = plots / f"{name}_{task}.png"
            plot_metric_vs_k(models, task, families, p)
            written[p.stem] = p
        p = plots / f"budget_{task}.png"
        plot_budget(models, task, bench, heads[task], p)
        written[p.stem] = p
    if bench:
        p = plots / "throughput_vs_batch.png"
        plot_throughput(bench, p)
        written[p.stem] = p

    # markdown
    md = ["# thinkfast leaderboard", "",
          "Generated by `thinkfast leaderboard` from lm-eval results and `thinkfast bench` JSON; do not edit by hand.",
          "Scores are percentages; n/a = not measured (e.g. no process reward model for bon / weighted_bon).", "",
          "## Models", "", markdown_table(header, cells), "",
          "## Headline: students vs teacher at an equal time budget", ""]
    for task, h in heads.items():
        md += [h.sentence(), ""]
        if h.rows:
            md += [markdown_table(*headline_table(h)), ""]
    for task in heads:
        md += [f"## {TASKS[task]}", "", f"![pass@k vs k](plots/pass_at_k_{task}.png)",
               f"![maj / bon / weighted_bon vs k](plots/voting_vs_k_{task}.png)",
               f"![coverage and accuracy vs time budget](plots/budget_{task}.png)", "",
               "### By k", "", markdown_table(*per_k_table(models, task)), "",
               "### Time budget", "", markdown_table(*budget_table(models, task, bench)), ""]
    if bench:
        md += ["## Throughput", "", "![throughput vs batch size](plots/throughput_vs_batch.png)", "",
               markdown_table(*bench_table(bench)), ""]
    written["leaderboard.md"] = out / "leaderboard.md"
    written["leaderboard.md"].write_text("\n".join(md).rstrip("\n") + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(cells)
    written["leaderboard.csv"] = out / "leaderboard.csv"
    written["leaderboard.csv"].write_text(buf.getvalue())

    payload = {
        "models": records,
        "curves": {m.name: {task: {"seconds_per_sample": round6(seconds_per_sample(m, task, bench)[0]),
                                   "source": seconds_per_sample(m, task, bench)[1],
                                   "metrics": {f"{fam}@{k}": round6(r.get(fam, k)) for fam, k in sorted(r.metrics)}}
                           for task, r in sorted(m.tasks.items())} for m in models},
        "headline": {task: {"teacher": h.teacher, "budget_seconds": round6(h.budget_seconds), "answer": h.answer,
                            "reason": h.reason,
                            "rows": [{"model": r.model, "role": r.role, "k": round6(r.k), "seconds": round6(r.seconds),
                                      "interpolated": r.interpolated,
                                      "coverage": round6(r.coverage), "weighted_bon": round6(r.accuracy),
                                      "beats_coverage": r.beats_coverage, "beats_accuracy": r.beats_accuracy}
                                     for r in h.rows]} for task, h in heads.items()},
        "bench": [{"model": r.model, "engine": r.engine, "batch_size": r.batch_size,
                   "tokens_per_s": "OOM" if r.oom else round6(r.tokens_per_s), "ms_per_step": round6(r.ms_per_step),
                   "prefill_s": round6(r.prefill_s), "peak_memory_gb": round6(r.peak_memory_gb),
                   "bandwidth_floor_fraction": round6(r.bandwidth_floor_fraction), "card": r.card,
                   "date": r.date} for r in bench],
    }
    written["leaderboard.json"] = out / "leaderboard.json"
    written["leaderboard.json"].write_text(json.dumps(payload, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return written


def _positive_ints(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", nargs="+", required=True, metavar="DIR",
                        help="lm-eval --output_path folders (or model subfolders) holding results_*.json")
    parser.add_argument("--bench", metavar="JSON_OR_DIR", default=None,
                        help="`thinkfast bench` JSON file, or a folder of them (throughput columns and plot)")
    parser.add_argument("--out", default="leaderboards", help="output folder (default: leaderboards)")
    parser.add_argument("--ks", nargs="+", type=_positive_ints, default=list(DEFAULT_PASS_KS),
                        help="pass@k columns of the main table (default: 1 8 64)")
    parser.add_argument("--vote-k", type=_positive_ints, default=DEFAULT_VOTE_K,
                        help="k of the maj@k and weighted_bon@k columns (default: 64)")
    parser.add_argument("--batches", nargs="+", type=_positive_ints, default=list(DEFAULT_BATCHES),
                        help="batch sizes of the throughput columns (default: 1 64 256)")
    parser.add_argument("--filter", default=None,
                        help="lm-eval filter name of the metrics (default: 'none', or the only one present)")
    parser.add_argument("--teacher", default=None,
                        help="model name to treat as the teacher (default: the sidecar's role / architecture llama)")


def run(args: argparse.Namespace) -> int:
    try:
        written = build(args.results, args.out, args.bench, tuple(args.ks), args.vote_k, tuple(args.batches),
                        args.filter, args.teacher)
    except LeaderboardError as e:
        print(f"thinkfast leaderboard: error: {e}", file=sys.stderr)
        return 2
    for name, path in sorted(written.items()):
        print(f"wrote {path}")
    return 0
