"""Best-of-N tasks for lm-eval: MATH-500 and GSM8K-500 with pass@k, maj@k, bon@k and weighted_bon@k.

    lm_eval --model thinkfast --model_args pretrained=ckpt/teacher --tasks math500_bon \
        --apply_chat_template --batch_size auto --log_samples --output_path runs/ \
        --gen_kwargs temperature=0.6,max_gen_toks=2048 --metadata '{"n": 16, "prm": "default"}'

One generation pass draws N samples per problem (lm-eval `repeats`); the backend turns the N identical requests
into one prompt x N samples. Scoring runs once per task, after generation (`BestOfNTask.apply_filters`): every
completion gets its extracted answer, an answer class (equivalent answers share one), its correctness and, with a
PRM, its per-step PRM scores. Those records are the task's `filtered_resps`, so `--log_samples` carries everything
the metrics need and `metrics_from_records` recomputes them from a samples file.

Task options (`--metadata '{...}'`, JSON, merged over the YAML `metadata:` defaults):

| option            | default                  | meaning                                                        |
| ----------------- | ------------------------ | -------------------------------------------------------------- |
| `n`               | 64                       | samples per problem (N); metrics at k = 1, 2, 4, ..., N         |
| `prm`             | none                     | PRM for bon@k / weighted_bon@k: "default", a hub id or a path    |
| `prm_aggregation` | `min`                    | step scores -> one score: `min`, `last`, `prod`, `mean`          |
| `prm_device`      | the PRM's own default    | device for the PRM                                               |
| `data_dir`        | $THINKFAST_DATA_DIR      | local JSONL directory for `harness_ext.data.load_problems`       |
Without `prm`, bon@k and weighted_bon@k are left out of the results (with a warning), never reported as zeros.
Temperature, top_p and max new tokens come from the YAML and `--gen_kwargs`.
"""
from __future__ import annotations

import difflib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

from lm_eval.api.metrics import mean
from lm_eval.api.task import ConfigurableTask

from harness_ext.scoring.answers import grade_completions, grading_in_background
from harness_ext.scoring.metrics import bon_metrics, ks_for

log = logging.getLogger("lm_eval.thinkfast.bon")  # under lm-eval's logger, so it shares its handler and format

# The same wording as harness_ext.scoring.prm.SOLVE_PROMPT on purpose: the default PRM was trained on the teacher's
# answers to it, so its steps (blank-line separated) look like what the PRM expects.
PROMPT = ("Solve the following math problem step by step. Separate the steps with a blank line "
          "and put the final answer in \\boxed{{}}.\n\n{problem}")

PRM_AGGREGATIONS = ("min", "last", "prod", "mean")
TASK_OPTIONS = ("n", "prm", "prm_aggregation", "prm_device", "data_dir", "answer_style")
# keys lm-eval itself puts into a task's metadata
_LM_EVAL_KEYS = ("version", "config_source", "_metadata", "num_fewshot")
# spellings people reach for; the near-miss check below catches the rest
_ALIASES = {"N": "n", "num_samples": "n", "samples": "n", "n_samples": "n", "num_return_sequences": "n",
            "reward_model": "prm", "prm_model": "prm", "prm_path": "prm", "prm_agg": "prm_aggregation",
            "aggregation": "prm_aggregation", "prm_aggregate": "prm_aggregation"}


# ----------------------------------------------------------------------------- docs


def _problems_dataset(name: str, data_dir: str | None = None, **_ignored: Any):
    """custom_dataset for lm-eval: harness_ext.data.load_problems as a DatasetDict with one `test` split.

    lm-eval calls it with the task metadata (YAML defaults, --model_args, --metadata) as keyword arguments;
    only `data_dir` is ours, the rest belongs to other components and is ignored here.
    """
    import datasets

    from harness_ext.data import load_problems

    problems = load_problems(name, data_dir=data_dir)
    rows = [{"id": p.id, "problem": p.problem, "answer": p.answer, "solution": p.solution, "source": p.source}
            for p in problems]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def math500_dataset(**metadata):
    return _problems_dataset("math500", **metadata)


def gsm8k500_dataset(**metadata):
    return _problems_dataset("gsm8k500", **metadata)


def doc_to_text(doc: dict) -> str:
    return PROMPT.format(problem=doc["problem"])


# ----------------------------------------------------------------------------- options


class BoNOptions(NamedTuple):  # not a dataclass: lm-eval executes this file before putting it in sys.modules
    n: int
    prm: str | None
    prm_aggregation: str
    prm_device: str | None
    answer_style: str


def parse_options(metadata: dict | None, task: str) -> BoNOptions:
    """Validate the task options in `metadata`; unknown-looking options are an error naming the valid ones."""
    metadata = dict(metadata or {})
    for key in metadata:
        if key in TASK_OPTIONS or key in _LM_EVAL_KEYS:
            continue
        guess = _ALIASES.get(key) or next(iter(difflib.get_close_matches(key, TASK_OPTIONS, n=1, cutoff=0.75)), None)
        if guess is None and (key.lower().startswith("prm") or "sample" in key.lower()):
            guess = "prm" if key.lower().startswith("prm") else "n"
        if guess is not None:
            raise ValueError(f"{task}: unknown task option {key!r} (did you mean {guess!r}?); "
                             f"task options are {', '.join(TASK_OPTIONS)}")
        # anything else is another component's (model args are merged into every task's metadata)
    try:
        n = int(metadata.get("n", 64))
    except (TypeError, ValueError):
        raise ValueError(f"{task}: task option n must be a positive integer, got {metadata.get('n')!r}") from None
    if n < 1 or str(metadata.get("n", 64)).strip() not in (str(n), f"{n}.0"):
        raise ValueError(f"{task}: task option n must be a positive integer, got {metadata.get('n')!r}")
    prm = metadata.get("prm")
    if prm is not None and (not isinstance(prm, str) or not prm.strip()):
        raise ValueError(f"{task}: task option prm must be a PRM name or path, got {prm!r}")
    how = metadata.get("prm_aggregation", "min")
    if how not in PRM_AGGREGATIONS:
        raise ValueError(f"{task}: task option prm_aggregation must be one of {', '.join(PRM_AGGREGATIONS)}, "
                         f"got {how!r}")
    style = metadata.get("answer_style", "math")
    if style not in ("math", "gsm8k"):
        raise ValueError(f"{task}: answer_style must be 'math' or 'gsm8k', got {style!r}")
    return BoNOptions(n=n, prm=prm.strip() if prm else None, prm_aggregation=how,
                      prm_device=metadata.get("prm_device"), answer_style=style)


# ----------------------------------------------------------------------------- scoring


class ScoredSample(dict):
    """One completion's scoring record. A dict in memory; JSON when turned into text, which is what lm-eval does
    to every `filtered_resps` item when it writes the --log_samples file."""

    def __str__(self) -> str:
        return json.dumps(self, ensure_ascii=False)

    __repr__ = __str__


# completions of this many problems share the PRM's length-sorted batches (16 x 64 = 1024 sequences a call)
PRM_PROBLEMS_PER_CALL = 16


def prm_step_scores(prm, problems: list[str], completions: list[list[str]], prepared=None) -> list[list[list[float]]]:
    """The PRM's score for every step of every completion of every problem (one shared, length-sorted batching).
    `prepared`: `prm.prepare(problems, completions)` when already done (e.g. in a thread, ahead of time)."""
    if prepared is not None:
        scored = prm.score_prepared(prepared)
    else:
        scored = prm.score_many(list(problems), [list(c) for c in completions])
    for per_problem, comps in zip(scored, completions):
        if len(per_problem) != len(comps):
            raise RuntimeError(f"PRM returned {len(per_problem)} score lists for {len(comps)} completions")
    return [[[float(x) for x in steps] for steps in per_problem] for per_problem in scored]


def prm_step_scores_grouped(prm, problems: list[str], completions: list[list[str]],
                            per_call: int = PRM_PROBLEMS_PER_CALL, desc: str = "PRM") -> list[list[list[float]]]:
    """`prm_step_scores` over `per_call` problems at a time; while one group's forwards run on the device, the
    next group's steps are laid out and tokenized in a thread (PRMs with `prepare`)."""
    from tqdm import tqdm

    groups = [(problems[i:i + per_call], completions[i:i + per_call]) for i in range(0, len(problems), per_call)]
    ahead = hasattr(prm, "prepare") and len(groups) > 1
    steps: list[list[list[float]]] = []
    with ThreadPoolExecutor(1) as pool:
        upcoming = pool.submit(prm.prepare, *groups[0]) if ahead else None
        for k in tqdm(range(len(groups)), desc=f"{desc} ({per_call} problems a call)", disable=len(groups) < 2):
            prepared = upcoming.result() if ahead else None
            if ahead and k + 1 < len(groups):
                upcoming = pool.submit(prm.prepare, *groups[k + 1])
            steps += prm_step_scores(prm, *groups[k], prepared=prepared)
    return steps


def score_completions(problem: str, gold: str, completions: list[str], style: str,
                      prm=None, prm_aggregation: str = "min", graded: tuple | None = None,
                      step_scores: list[list[float]] | None = None) -> list[dict]:
    """One record per completion: extracted answer, answer class, correctness, PRM step scores and score.
    `graded`: `grade_completions(gold, completions, style)` when already computed (`grade_many`);
    `step_scores`: this problem's part of `prm_step_scores` when already computed."""
    answers, class_ids, class_correct = graded or grade_completions(gold, completions, style)
    if step_scores is None and prm is not None:
        (step_scores,) = prm_step_scores(prm, [problem], [completions])
    scores: list[float | None] = [None] * len(completions)
    if step_scores is not None:
        from harness_ext.scoring.prm import aggregate

        # aggregate() gives a completion with no step at all (empty text) 0, below every scored one
        scores = [float(aggregate(steps, how=prm_aggregation)) for steps in step_scores]
    return [
        ScoredSample({
            "answer": answer,
            "class": cid,
            "correct": bool(cid is not None and class_correct[cid]),
            "prm_steps": step_scores[i] if step_scores is not None else None,
            "prm_score": scores[i],
        })
        for i, (answer, cid) in enumerate(zip(answers, class_ids))
    ]


def metrics_from_records(records: list) -> dict[str, float]:
    """Every metric of one problem from its scored records: dicts, or the JSON strings of a --log_samples file's
    `filtered_resps[0]`."""
    records = [json.loads(r) if isinstance(r, str) else r for r in records]
    class_ids = [r["class"] for r in records]
    class_correct = {r["class"]: bool(r["correct"]) for r in records if r["class"] is not None}
    have_prm = all(r.get("prm_score") is not None for r in records)
    scores = [r["prm_score"] for r in records] if have_prm else None
    return bon_metrics(class_ids, class_correct, scores, ks_for(len(records)))


def metric_names(n: int, with_prm: bool = True) -> list[str]:
    kinds = ("pass", "maj", "bon", "weighted_bon") if with_prm else ("pass", "maj")
    return [f"{kind}@{k}" for k in ks_for(n) for kind in kinds]


# ----------------------------------------------------------------------------- the task


class BestOfNTask(ConfigurableTask):
    """A ConfigurableTask whose `repeats` come from the `n` option and whose filter scores every completion."""

    FILTER = "none"

    def __init__(self, config: dict | None = None, **kwargs):
        config = dict(config or {})
        config.pop("class", None)
        task = config.get("task", "best-of-N task")
        self.options = parse_options(config.get("metadata"), task)
        config["repeats"] = self.options.n
        self._prm = None
        super().__init__(config=config, **kwargs)

    def build_all_requests(self, *args, **kwargs):
        if not kwargs.get("apply_chat_template"):
            log.warning("%s: its prompt is written for chat models; run lm_eval with --apply_chat_template",
                        self.config.task)
        gen = self.config.generation_kwargs or {}
        if not gen.get("do_sample", False) and self.options.n > 1:
            log.warning("%s: do_sample is off, so the %d samples per problem are identical greedy decodes",
                        self.config.task, self.options.n)
        return super().build_all_requests(*args, **kwargs)

    def _load_prm(self):
        if self.options.prm is None:
            return None
        if self._prm is None:
            try:
                from harness_ext.scoring.prm import load_prm
            except ImportError as exc:
                raise RuntimeError(f"{self.config.task}: prm={self.options.prm!r} needs harness_ext.scoring.prm "
                                   f"({exc})") from exc
            kwargs = {"device": self.options.prm_device} if self.options.prm_device else {}
            self._prm = load_prm(self.options.prm, **kwargs)
        return self._prm

    def apply_filters(self):
        """Score every completion once (answers, equivalence classes, correctness, PRM); no other filters."""
        prm = self._load_prm()
        if prm is None:
            message = (f"{self.config.task}: no PRM configured (task option prm, e.g. --metadata "
                       f"'{{\"prm\": \"default\"}}'): bon@k and weighted_bon@k are not reported")
            log.warning(message)
        style = self.options.answer_style
        jobs = [(inst.doc["answer"], list(inst.resps), style) for inst in self._instances]
        # math-verify grades on CPU worker processes while the PRM scores on the GPU here: the two overlap
        t_start = time.perf_counter()
        prm_before = dict(prm.timings) if prm is not None and hasattr(prm, "timings") else None
        with grading_in_background(jobs, desc=f"{self.config.task}: answers") as grading:
            steps = None
            if prm is not None:
                # several problems per call: the PRM sorts their completions by length into shared batches
                steps = prm_step_scores_grouped(prm, [inst.doc["problem"] for inst in self._instances],
                                                [list(inst.resps) for inst in self._instances],
                                                desc=f"{self.config.task}: PRM")
            t_prm_done = time.perf_counter()
            graded = list(grading)
        self._log_scoring_time(prm, prm_before, t_start, t_prm_done)
        for i, (instance, grades) in enumerate(zip(self._instances, graded)):
            doc = instance.doc
            instance.filtered_resps[self.FILTER] = score_completions(
                doc["problem"], doc["answer"], list(instance.resps), style, prm_aggregation=self.options.prm_aggregation,
                graded=grades, step_scores=steps[i] if steps is not None else None)
        return self._instances

    def _log_scoring_time(self, prm, prm_before, t_start, t_prm_done):
        """One line saying where scoring time went: the PRM (tokenization vs forwards) and the answer grading
        that runs beside it (the wait after the PRM is what grading adds to the evaluation)."""
        now = time.perf_counter()
        text = f"{self.config.task}: scoring {now - t_start:.1f}s"
        if prm_before is not None:
            spent = {k: prm.timings[k] - prm_before[k] for k in prm_before}
            text += (f"; PRM {t_prm_done - t_start:.1f}s (layout + tokenize {spent['encode_s']:.1f}s, forwards "
                     f"{spent['forward_s']:.1f}s; {spent['sequences']:,} sequences, {spent['tokens']:,} tokens)")
        text += f"; answer grading went on {now - t_prm_done:.1f}s after that"
        log.info(text)

    def process_results(self, doc: dict, results: list) -> dict[str, float]:
        (records,) = results
        return metrics_from_records(records)

    def aggregation(self) -> dict:
        return {name: mean for name in metric_names(self.options.n)}

    def higher_is_better(self) -> dict:
        return {name: True for name in metric_names(self.options.n)}
