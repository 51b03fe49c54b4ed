"""Distillation data: math solutions rendered with the teacher's chat template, decontaminated, packed.

    from distill.data import load_records, decontaminate, render_documents, PackedStream
    records = load_records(["gsm8k_train", "math_train"])                   # harness_ext.data.load_problems
    records += load_records(["hf:openai/gsm8k"], fields="problem=question,solution=answer", hf_config="main")
    records += load_records(["jsonl:/path/to/file.jsonl"], fields="problem=question,solution=answer")
    kept, report = decontaminate(records, drop=False)                       # raises ContaminationError on a hit
    docs = render_documents(kept, tokenizer, assistant_only=False)
    stream = PackedStream(docs, seq_len=2048, seed=0)
    batch = stream.rows(range(0, 8))   # input_ids, position_ids, seq_idx, labels (LongTensor / int32)

A document is one chat: the problem as the user turn, the solution as the assistant turn. Documents are
concatenated in a seeded order (one permutation per epoch) and cut into rows of `seq_len` tokens; a document
that crosses a row end continues at the start of the next row as a new segment. `seq_idx` numbers the segments
of a row (0, 0, 1, 1, 1, ...) and positions restart at 0 in every segment, so attention and SSM layers never
mix documents. Row `g` of the stream is a pure function of (seed, g): resuming at a row cursor replays the
same data exactly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

DECONTAMINATION_NGRAM = 13
# Test problems shorter than this (in words) are matched only as whole normalised texts: a 5-word problem such
# as "compute dbinom 8 4" also occurs inside honest training solutions.
MIN_WORDS_FOR_NGRAM_MATCH = 8
DECONTAMINATION_MIN_OVERLAP = 0.5


@dataclasses.dataclass(frozen=True)
class Record:
    id: str
    problem: str
    solution: str
    source: str
    answer: str = ""


# ----------------------------------------------------------------------------- loading

def _as_record(obj, source: str | None = None) -> Record:
    get = (lambda k, d="": obj.get(k, d)) if isinstance(obj, dict) else (lambda k, d="": getattr(obj, k, d))
    return Record(id=str(get("id")), problem=str(get("problem")), solution=str(get("solution")),
                  source=source or str(get("source")), answer=str(get("answer") or ""))


def parse_fields(fields: str | dict | None) -> dict[str, str]:
    """'problem=question,solution=answer' -> {'problem': 'question', 'solution': 'answer'} (ours=theirs)."""
    if fields is None:
        return {"problem": "problem", "solution": "solution"}
    if isinstance(fields, dict):
        mapping = dict(fields)
    else:
        mapping = {}
        for part in str(fields).split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise ValueError(f"bad field mapping {part!r} in {fields!r}: expected ours=theirs, e.g. problem=question")
            ours, theirs = (s.strip() for s in part.split("=", 1))
            mapping[ours] = theirs
    unknown = set(mapping) - {"problem", "solution", "answer", "id"}
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in mapping {fields!r}; map problem=, solution= (and optionally answer=, id=)")
    for need in ("problem", "solution"):
        mapping.setdefault(need, need)
    return mapping


def _rows_to_records(rows: Iterable[dict], mapping: dict[str, str], source: str) -> list[Record]:
    out = []
    for i, row in enumerate(rows):
        missing = [theirs for ours, theirs in mapping.items() if theirs not in row]
        if missing:
            raise KeyError(f"{source}: row {i} has no field(s) {missing}; it has {sorted(row)}. "
                           f"Pass --fields problem=<col>,solution=<col>")
        out.append(Record(id=str(row[mapping["id"]]) if "id" in mapping else f"{source}/{i}",
                          problem=str(row[mapping["problem"]]), solution=str(row[mapping["solution"]]),
                          source=source, answer=str(row[mapping["answer"]]) if "answer" in mapping else ""))
    return out


def load_records(sources: Sequence[str], fields: str | dict | None = None, hf_config: str | None = None,
                 hf_split: str = "train", data_dir: str | None = None, limit: int | None = None) -> list[Record]:
    """Load training records. A source is a `harness_ext.data` name (`gsm8k_train`, `math_train`),
    `hf:<dataset id>` (any hub dataset; `fields` maps its columns) or `jsonl:<path>` (same mapping)."""
    records: list[Record] = []
    for spec in sources:
        if spec.startswith("hf:"):
            import datasets
            ds_id = spec[3:]
            ds = datasets.load_dataset(ds_id, hf_config, split=hf_split)
            recs = _rows_to_records(ds, parse_fields(fields), ds_id)
        elif spec.startswith("jsonl:"):
            path = Path(spec[6:])
            if not path.is_file():
                raise FileNotFoundError(f"JSONL source {path} does not exist")
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            recs = _rows_to_records(rows, parse_fields(fields), path.stem)
        else:
            if spec in ("math500", "gsm8k500"):
                raise ValueError(f"{spec} is a test set; it can never be distillation data")
            from harness_ext.data import load_problems
            recs = [_as_record(p) for p in load_problems(spec, data_dir=data_dir)]
        records.extend(recs[:limit] if limit else recs)
    empty = [r.id for r in records if not r.problem.strip() or not r.solution.strip()]
    if empty:
        raise ValueError(f"{len(empty)} record(s) with an empty problem or solution, e.g. {empty[:3]}")
    return records


def heldout_split(records: Sequence[Record], n_heldout: int, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Split off `n_heldout` TRAIN problems for evaluation, chosen by a seeded hash of the problem text
    (stable under reordering; all records of one problem land on the same side)."""
    key = lambda r: hashlib.sha256(f"{seed}:{normalize_text(r.problem)}".encode()).hexdigest()
    problems = sorted({key(r) for r in records})
    held = set(problems[:n_heldout])
    train = [r for r in records if key(r) not in held]
    heldout = [r for r in records if key(r) in held]
    return train, heldout


# ----------------------------------------------------------------------------- decontamination

class ContaminationError(RuntimeError):
    pass


def normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


def load_test_problems(data_dir: str | None = None) -> list[tuple[str, str]]:
    """(id, problem text) of every test problem distillation must not see: MATH-500 and the full GSM8K test split."""
    from harness_ext.data import load_problems
    return [(p.id, p.problem) for name in ("math500", "gsm8k_test") for p in load_problems(name, data_dir=data_dir)]


@dataclasses.dataclass
class Match:
    record_id: str
    record_source: str
    test_id: str
    how: str  # "exact" | "13-gram" | "whole short problem"
    overlap: float  # fraction of the test problem's n-grams found in the record


class Decontaminator:
    """Finds training records that contain a test problem: the same normalised problem text, or a long word n-gram
    overlap (default 13-grams) with the record's problem or solution. One shared 13-gram is not enough (MATH shares
    boilerplate such as Asymptote label code and answer-format instructions across problems): a record matches a
    test problem when it holds at least `min_overlap` of that problem's distinct n-grams. Test problems shorter
    than n words match when their whole text occurs in the record (if at least 8 words), else only exactly."""

    def __init__(self, test_problems: Sequence[tuple[str, str]], ngram: int = DECONTAMINATION_NGRAM,
                 min_overlap: float = DECONTAMINATION_MIN_OVERLAP):
        self.ngram, self.min_overlap = ngram, min_overlap
        self.test_ids = [tid for tid, _ in test_problems]
        self.exact: dict[str, int] = {}
        self.grams: dict[int, list[int]] = {}  # hash of an n-gram -> indices of test problems holding it
        self.n_grams: list[int] = []
        self.short: list[tuple[str, int]] = []  # (" normalised short test problem ", index)
        for k, (_, text) in enumerate(test_problems):
            norm = normalize_text(text)
            self.exact.setdefault(norm, k)
            words = norm.split()
            grams = self._ngrams(words, ngram)
            self.n_grams.append(len(grams))
            for g in grams:
                self.grams.setdefault(g, []).append(k)
            if len(words) < ngram and len(words) >= MIN_WORDS_FOR_NGRAM_MATCH:
                self.short.append((f" {norm} ", k))

    @staticmethod
    def _ngrams(words: list[str], n: int) -> set[int]:
        return {hash(tuple(words[i:i + n])) for i in range(len(words) - n + 1)}

    def match(self, record: Record) -> Match | None:
        norm_problem = normalize_text(record.problem)
        if norm_problem in self.exact:
            return Match(record.id, record.source, self.test_ids[self.exact[norm_problem]], "exact", 1.0)
        words = norm_problem.split() + ["<sep>"] + normalize_text(record.solution).split()
        hits: dict[int, int] = {}
        for g in self._ngrams(words, self.ngram):
            for k in self.grams.get(g, ()):
                hits[k] = hits.get(k, 0) + 1
        if hits:
            k, frac = max(((k, c / self.n_grams[k]) for k, c in hits.items()), key=lambda kv: kv[1])
            if frac >= self.min_overlap:
                return Match(record.id, record.source, self.test_ids[k], f"{self.ngram}-gram", round(frac, 3))
        if self.short:
            text = f" {' '.join(words)} "
            for needle, k in self.short:
                if needle in text:
                    return Match(record.id, record.source, self.test_ids[k], "whole short problem", 1.0)
        return None


def decontaminate(records: Sequence[Record], drop: bool = False, test_problems=None, data_dir: str | None = None,
                  ngram: int = DECONTAMINATION_NGRAM, min_overlap: float = DECONTAMINATION_MIN_OVERLAP
                  ) -> tuple[list[Record], dict]:
    """Check every record against the test sets. A hit raises ContaminationError (naming the matches) unless
    `drop`, which removes the hits and reports them."""
    if test_problems is None:
        test_problems = load_test_problems(data_dir)
    deco = Decontaminator(test_problems, ngram=ngram, min_overlap=min_overlap)
    kept, matches = [], []
    for r in records:
        m = deco.match(r)
        (matches.append(m) if m else kept.append(r))
    report = {"checked": len(records), "test_problems": len(test_problems), "ngram": ngram, "min_overlap": min_overlap,
              "matched": len(matches), "dropped": len(matches) if drop else 0,
              "matches": [dataclasses.asdict(m) for m in matches]}
    if matches and not drop:
        shown = "; ".join(f"{m.record_id} ({m.record_source}) ~ {m.test_id} [{m.how}, {m.overlap:.0%}]" for m in matches[:10])
        raise ContaminationError(f"refusing to train: {len(matches)} training record(s) contain a test problem: {shown}"
                                 f"{' ...' if len(matches) > 10 else ''}. Remove them or pass --drop-contaminated.")
    return kept, report


# ----------------------------------------------------------------------------- teacher-generated solutions

def teacher_solutions(teacher_dir: str, records: Sequence[Record], n_per_problem: int, cache_path: str | Path,
                      max_new_tokens: int = 512, temperature: float = 0.8, seed: int = 0,
                      batch_problems: int = 512) -> list[Record]:
    """Sample the teacher on training problems (chat template, as at evaluation) and keep finished solutions
    as extra records. Cached in `cache_path` (JSONL) so a resumed run does not sample again."""
    cache_path = Path(cache_path)
    if cache_path.is_file():
        with open(cache_path) as f:
            return [Record(**json.loads(line)) for line in f if line.strip()]
    from harness_ext.generation.engine import Engine, SamplingParams
    engine = Engine.from_pretrained(teacher_dir)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    out: list[Record] = []
    for start in range(0, len(records), batch_problems):
        chunk = records[start:start + batch_problems]
        outs = engine.generate([[{"role": "user", "content": r.problem}] for r in chunk], params,
                               n=n_per_problem, seed=seed + start, progress=True)
        for r, completions in zip(chunk, outs):
            for j, c in enumerate(completions):
                if c.finish_reason == "stop" and c.text.strip():
                    out.append(Record(id=f"{r.id}/teacher{j}", problem=r.problem, solution=c.text.strip(),
                                      source=f"{r.source}+teacher", answer=r.answer))
    tmp = cache_path.with_suffix(".tmp")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        for r in out:
            f.write(json.dumps(dataclasses.asdict(r)) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, cache_path)
    return out


# ----------------------------------------------------------------------------- rendering

@dataclasses.dataclass
class Document:
    ids: np.ndarray  # int32 [n]
    target: np.ndarray  # bool [n]: token counts as a training target


def render_documents(records: Sequence[Record], tokenizer, assistant_only: bool = False) -> list[Document]:
    """Render each record as a chat (problem = user turn, solution = assistant turn) with the tokenizer's chat
    template. With `assistant_only`, only the assistant turn's tokens are targets."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the teacher tokenizer has no chat template; distillation renders problems as chats")
    convs = [[{"role": "user", "content": r.problem}, {"role": "assistant", "content": r.solution}] for r in records]
    full = tokenizer.apply_chat_template(convs, tokenize=False)
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if assistant_only:
        prompts = tokenizer.apply_chat_template([c[:1] for c in convs], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    docs = []
    for i, ids in enumerate(full_ids):
        target = np.ones(len(ids), dtype=bool)
        if assistant_only:
            n = len(prompt_ids[i])
            if ids[:n] != prompt_ids[i]:
                raise ValueError(f"record {records[i].id}: the chat template is not prefix-consistent "
                                 "(prompt tokens differ from the start of the full chat); cannot mask the prompt")
            target[:n] = False
        docs.append(Document(np.asarray(ids, dtype=np.int32), target))
    return docs


# ----------------------------------------------------------------------------- packing

class PackedStream:
    """Endless stream of packed rows. Epoch e concatenates the documents in the order of a permutation
    seeded by (seed, e) and cuts `rows_per_epoch` rows of `seq_len` tokens (the tail is dropped)."""

    def __init__(self, docs: Sequence[Document], seq_len: int, seed: int = 0, shuffle: bool = True):
        if not docs:
            raise ValueError("no documents to pack")
        self.docs, self.seq_len, self.seed, self.shuffle = list(docs), seq_len, seed, shuffle
        self.total_tokens = sum(len(d.ids) for d in self.docs)
        self.rows_per_epoch = self.total_tokens // seq_len
        if self.rows_per_epoch == 0:
            raise ValueError(f"{len(self.docs)} documents hold {self.total_tokens} tokens, fewer than one row of {seq_len}")
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def _epoch(self, epoch: int):
        if epoch not in self._cache:
            order = (np.random.default_rng([self.seed, epoch]).permutation(len(self.docs)) if self.shuffle
                     else np.arange(len(self.docs)))
            ids = np.concatenate([self.docs[i].ids for i in order])
            target = np.concatenate([self.docs[i].target for i in order])
            doc = np.repeat(np.arange(len(order), dtype=np.int64), [len(self.docs[i].ids) for i in order])
            n = self.rows_per_epoch * self.seq_len
            self._cache = {epoch: tuple(a[:n].reshape(self.rows_per_epoch, self.seq_len) for a in (ids, target, doc))}
        return self._cache[epoch]

    def rows(self, indices: Iterable[int]) -> dict[str, torch.Tensor]:
        indices = list(indices)
        ids, target, doc = (np.stack(parts) for parts in zip(*(self._row(g) for g in indices)))
        return pack_rows(ids, target, doc)

    def _row(self, g: int):
        ids, target, doc = self._epoch(g // self.rows_per_epoch)
        r = g % self.rows_per_epoch
        return ids[r], target[r], doc[r]


def pack_rows(ids: np.ndarray, target: np.ndarray, doc: np.ndarray) -> dict[str, torch.Tensor]:
    """Rows of tokens with their per-token document number -> model inputs.
    labels[t] = ids[t+1] when token t+1 is a target of the same document, else -100."""
    B, L = ids.shape
    seq_idx = doc - doc[:, :1]
    starts = np.ones_like(seq_idx, dtype=bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    t = np.broadcast_to(np.arange(L), (B, L))
    position_ids = t - np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    labels = np.full((B, L), -100, dtype=np.int64)
    keep = (~starts[:, 1:]) & target[:, 1:]
    labels[:, :-1] = np.where(keep, ids[:, 1:], -100)
    return {"input_ids": torch.from_numpy(ids.astype(np.int64)),
            "position_ids": torch.from_numpy(np.ascontiguousarray(position_ids, dtype=np.int64)),
            "seq_idx": torch.from_numpy(seq_idx.astype(np.int32)),
            "labels": torch.from_numpy(labels)}
