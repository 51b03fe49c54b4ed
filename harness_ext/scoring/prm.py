"""Process reward models (PRMs): one score in [0, 1] per reasoning step, for best-of-N selection.

    from harness_ext.scoring.prm import load_prm, split_steps, aggregate
    prm = load_prm("default")                               # SmolLM2 teacher + trained part in harness_ext/assets/prm
    prm = load_prm("RLHFlow/Llama3.1-8B-PRM-Deepseek-Data")  # or a local directory in any format below
    step_scores = prm.score(problem, completions)           # list[list[float]], one score per step
    best = max(range(len(completions)), key=lambda i: aggregate(step_scores[i], how="min"))

Formats (`load_prm(..., format=...)`, else detected from the checkpoint's name, config and tokenizer):

| format          | checkpoint                                   | input                                                    | step score |
| --------------- | -------------------------------------------- | -------------------------------------------------------- | ---------- |
| `rlhflow`       | causal LM with a chat template (`RLHFlow/Llama3.1-8B-PRM-{Deepseek,Mistral}-Data`) | chat: user = problem + " " + step 1, assistant "+", user = step 2, assistant "+", ... | P("+") / (P("+") + P("-")) predicted where each assistant "+" stands |
| `math_shepherd` | causal LM, step tag "ки" (`peiyi9979/math-shepherd-mistral-7b-prm`) | problem + " " + "Step 1: ... ки\\nStep 2: ... ки" | softmax over the "+" / "-" logits at each tag |
| `qwen_prm`      | `Qwen2ForProcessRewardModel` (`Qwen/Qwen2.5-Math-PRM-7B`): base model + `score` MLP head (Linear, ReLU, Linear -> 2 labels) | chat: system, user = problem, assistant = steps each followed by `<extra_0>` | softmax(head)[1] at each `<extra_0>` |
| `thinkfast`     | `prm_manifest.json` + `prm_trained.safetensors` (LoRA + head) on a frozen Llama backbone (`load_prm("default")`) | chat prompt (user = problem) + steps joined by blank lines | sigmoid(head(last hidden state at each step's last token)) |

Every format is scored with one forward per completion: the input holds all steps, and the logits (or head) are
read only at the step positions (`score`: length-sorted, right-padded batches, bf16 on CUDA). `score_ref` is the
plain twin (one unpadded fp32 forward per completion through the full model, full-vocabulary logits) used by tests.

Training the default (`thinkfast prm train`, see `prm_cli.py`): the teacher samples solutions to GSM8K / MATH *train*
problems, each step prefix is labelled by Monte-Carlo rollouts (Math-Shepherd soft label: the fraction of K
continuations that reach the reference answer), and a small LoRA + head is fitted with BCE on those soft labels.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- config

FORMATS = ("rlhflow", "math_shepherd", "qwen_prm", "thinkfast")
AGGREGATIONS = ("last", "min", "prod", "mean")
STEP_MODES = ("auto", "blank_lines", "step_markers")

ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets" / "prm"
MANIFEST = "prm_manifest.json"
TRAINED_WEIGHTS = "prm_trained.safetensors"
MANIFEST_VERSION = 1
MAX_TRAINED_BYTES = 8 * 1024 * 1024
DEFAULT_TEACHER = "smollm2-135m-instruct"

# Hub ids whose format is known up front (their configs alone don't say which PRM recipe they follow).
KNOWN_HUB_IDS = {
    "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data": "rlhflow",
    "RLHFlow/Llama3.1-8B-PRM-Mistral-Data": "rlhflow",
    "peiyi9979/math-shepherd-mistral-7b-prm": "math_shepherd",
    "Qwen/Qwen2.5-Math-PRM-7B": "qwen_prm",
    "Qwen/Qwen2.5-Math-PRM-72B": "qwen_prm",
}

MATH_SHEPHERD_TAG = "ки"
QWEN_STEP_SEP = "<extra_0>"
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
GOOD_TOKEN, BAD_TOKEN = "+", "-"
_SENTINEL = "\x00PRM_STEP_SCORE\x00"  # stands where the assistant "+" goes, to find it in the rendered chat

# Prompt the generator answers when sampling solutions for training labels and for the report.
SOLVE_PROMPT = ("Solve the following math problem step by step. Separate the steps with a blank line "
                "and put the final answer in \\boxed{{}}.\n\n{problem}")


class PRMError(ValueError):
    pass


# ----------------------------------------------------------------------------- steps and aggregation

_STEP_MARKER = re.compile(r"(?im)^[ \t]*(?:#+[ \t]*)?\**[ \t]*step[ \t]*\d+[ \t]*\**[ \t]*[:.)]")
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def split_steps(text: str, mode: str = "auto") -> list[str]:
    """Split a solution into steps (stripped, empty ones dropped).

    `blank_lines`: steps are separated by one or more blank lines; text without blank lines is one step.
    `step_markers`: a step starts at each line beginning "Step k:" (also "## Step k." / "**Step k:**"); text before
    the first marker is a step of its own, text after the last marker stays in the last step; no marker -> one step.
    `auto`: `step_markers` when the text has a "Step k:" line, else `blank_lines`.
    """
    if not isinstance(text, str):
        raise TypeError(f"split_steps needs a str, got {type(text).__name__}")
    if mode not in STEP_MODES:
        raise ValueError(f"unknown step mode {mode!r}; choose from {', '.join(STEP_MODES)}")
    if mode == "auto":
        mode = "step_markers" if _STEP_MARKER.search(text) else "blank_lines"
    if mode == "blank_lines":
        pieces = _BLANK_LINES.split(text)
    else:
        starts = [m.start() for m in _STEP_MARKER.finditer(text)]
        bounds = [0, *starts, len(text)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    return [p.strip() for p in pieces if p.strip()]


def aggregate(scores: Sequence[float], how: str = "min") -> float:
    """One score per completion from its step scores. A completion without steps scores 0 (never the best)."""
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; choose from {', '.join(AGGREGATIONS)}")
    scores = [float(s) for s in scores]
    if not scores:
        return 0.0
    if how == "last":
        return scores[-1]
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    return sum(scores) / len(scores)


# ----------------------------------------------------------------------------- shared machinery

@dataclass
class Encoded:
    """One completion ready for the model: token ids and the positions whose output scores each step."""
    input_ids: list[int]
    positions: list[int]


@dataclass
class Prepared:
    """Completions of several problems, encoded: `owners[i]` is the problem of `encoded[i]`."""
    encoded: list[Encoded]
    owners: list[int]
    n_problems: int


def _char_to_token(offsets: Sequence[tuple[int, int]], char: int) -> int:
    """Index of the token whose character span holds `char` (offsets sorted, as fast tokenizers return them)."""
    lo, hi = 0, len(offsets) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        start, end = offsets[mid]
        if end <= char:
            lo = mid + 1
        elif start > char:
            hi = mid - 1
        else:
            return mid
    raise PRMError(f"no token covers character {char}")


def _single_token(tokenizer, text: str, fmt: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise PRMError(f"format {fmt!r} needs {text!r} to be one token, but this tokenizer splits it into {ids}; "
                       f"pick the right format ({', '.join(FORMATS)}) or add the token to the tokenizer")
    return ids[0]


def _pick_device(device) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def _pick_dtype(device: torch.device, dtype) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


class PRM:
    """A process reward model. Subclasses say how to lay out the input (`encode`) and read a step score (`readout`)."""

    format: str = ""

    def __init__(self, base: nn.Module, tokenizer, device: torch.device, dtype: torch.dtype,
                 step_mode: str = "auto", max_batch_tokens: int | None = None, max_batch_size: int = 256):
        if not getattr(tokenizer, "is_fast", False):
            raise PRMError("PRM scoring needs a fast (Rust) tokenizer for character offsets; "
                           f"got {type(tokenizer).__name__}")
        self.base, self.tokenizer, self.device, self.dtype = base, tokenizer, device, dtype
        self.step_mode = step_mode
        self.max_batch_tokens = max_batch_tokens or (131072 if device.type == "cuda" else 8192)
        self.max_batch_size = max_batch_size
        self.max_length = getattr(base.config, "max_position_embeddings", None)
        # where scoring time goes (host-side layout + tokenization vs batched forwards), summed over calls
        self.timings = {"encode_s": 0.0, "forward_s": 0.0, "sequences": 0, "tokens": 0}

    # --- per format
    def layout(self, problem: str, steps: list[str]) -> tuple[str, list[int]]:
        """The text the model reads and, per step, a character of the token whose output scores the step."""
        raise NotImplementedError

    def token_position(self, token_index: int) -> int:
        """Position whose output scores a step, from the index of the token found by `layout`'s character."""
        return token_index

    def check_token(self, token_id: int) -> None:
        """Raise if the token found at a scoring character is not the one the format expects."""

    def readout(self, hidden: torch.Tensor) -> torch.Tensor:
        """Step probabilities [N] from final hidden states [N, H] at the scoring positions."""
        raise NotImplementedError

    def full_outputs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Reference: step probability at *every* position [L] from a plain full forward (no gathering)."""
        raise NotImplementedError

    # --- shared
    def steps(self, completion: str) -> list[str]:
        return split_steps(completion, self.step_mode)

    def encode(self, problem: str, steps: list[str]) -> Encoded:
        return self.encode_many([problem], [steps])[0]

    def encode_many(self, problems: Sequence[str], steps_lists: Sequence[list[str]]) -> list[Encoded]:
        """Lay out and tokenize many completions at once (one batched call into the Rust tokenizer)."""
        out = [Encoded([], []) for _ in problems]
        todo = [i for i, steps in enumerate(steps_lists) if steps]
        layouts = [self.layout(problems[i], steps_lists[i]) for i in todo]
        if not layouts:
            return out
        enc = self.tokenizer([text for text, _ in layouts], add_special_tokens=False, return_offsets_mapping=True)
        for i, (_, chars), ids, offsets in zip(todo, layouts, enc["input_ids"], enc["offset_mapping"]):
            if self.max_length is not None and len(ids) > self.max_length:
                raise PRMError(f"PRM input of {len(ids)} tokens exceeds the model's {self.max_length} positions")
            positions = []
            for char in chars:
                index = _char_to_token(offsets, char)
                self.check_token(ids[index])
                positions.append(self.token_position(index))
            out[i] = Encoded(list(ids), positions)
        return out

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @torch.no_grad()
    def score_encoded(self, encoded: list[Encoded], progress: bool = False) -> list[list[float]]:
        """Batched scoring: sort by length, right-pad, one forward per batch, read only the step positions."""
        out: list[list[float]] = [[] for _ in encoded]
        order = sorted((i for i, e in enumerate(encoded) if e.positions), key=lambda i: -len(encoded[i].input_ids))
        batches, batch = [], []
        for i in order:
            longest = len(encoded[batch[0]].input_ids) if batch else len(encoded[i].input_ids)
            if batch and ((len(batch) + 1) * longest > self.max_batch_tokens or len(batch) >= self.max_batch_size):
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
        t0 = time.perf_counter()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        iterator = batches
        if progress:
            from tqdm.auto import tqdm
            iterator = tqdm(batches, desc=f"PRM scoring ({self.format})", unit="batch")
        for batch in iterator:
            width = len(encoded[batch[0]].input_ids)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            rows, cols = [], []
            for r, i in enumerate(batch):
                ids = encoded[i].input_ids
                input_ids[r, :len(ids)] = torch.tensor(ids)
                mask[r, :len(ids)] = 1
                rows += [r] * len(encoded[i].positions)
                cols += encoded[i].positions
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
                hidden = self.hidden_states(input_ids.to(self.device), mask.to(self.device))
                probs = self.readout(hidden[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)])
            probs = probs.float().cpu().tolist()
            start = 0
            for i in batch:
                n = len(encoded[i].positions)
                out[i] = probs[start:start + n]
                start += n
        self.timings["forward_s"] += time.perf_counter() - t0   # .cpu() above waited for every batch
        self.timings["sequences"] += len(order)
        self.timings["tokens"] += sum(len(encoded[i].input_ids) for i in order)
        return out

    def prepare(self, problems: Sequence[str], completions: Sequence[Sequence[str]]) -> Prepared:
        """The host-side half of `score_many` (steps, layout, tokenization): callers may run it for the next
        group in a thread while the GPU scores this one (the Rust tokenizer lets go of the GIL)."""
        if len(problems) != len(completions):
            raise PRMError(f"{len(problems)} problems but {len(completions)} completion lists")
        flat_problems, flat_steps, owners = [], [], []
        for p, (problem, comps) in enumerate(zip(problems, completions)):
            if isinstance(comps, str):
                raise PRMError("completions must be a list of strings per problem, not one string")
            for c in comps:
                flat_problems.append(problem)
                flat_steps.append(self.steps(c))
                owners.append(p)
        t0 = time.perf_counter()
        encoded = self.encode_many(flat_problems, flat_steps)
        self.timings["encode_s"] += time.perf_counter() - t0
        return Prepared(encoded, owners, len(problems))

    def score_prepared(self, prepared: Prepared, progress: bool = False) -> list[list[list[float]]]:
        scores = self.score_encoded(prepared.encoded, progress=progress)
        result: list[list[list[float]]] = [[] for _ in range(prepared.n_problems)]
        for p, s in zip(prepared.owners, scores):
            result[p].append(s)
        return result

    def score_many(self, problems: Sequence[str], completions: Sequence[Sequence[str]],
                   progress: bool = False) -> list[list[list[float]]]:
        """Score completions of many problems in shared batches: result[p][c] is the step-score list."""
        return self.score_prepared(self.prepare(problems, completions), progress=progress)

    def score(self, problem: str, completions: Sequence[str], progress: bool = False) -> list[list[float]]:
        """One score in [0, 1] per step of each completion (steps from `split_steps(completion, self.step_mode)`)."""
        if isinstance(completions, str):
            raise PRMError("score() takes a list of completions, not one string")
        return self.score_many([problem], [completions], progress=progress)[0]

    @torch.no_grad()
    def score_ref(self, problem: str, completions: Sequence[str]) -> list[list[float]]:
        """Reference twin of `score`: per completion one unpadded fp32 forward of the whole model on CPU."""
        out = []
        for completion in completions:
            enc = self.encode(problem, self.steps(completion))
            if not enc.positions:
                out.append([])
                continue
            per_position = self.full_outputs(torch.tensor([enc.input_ids], device=self.device))
            out.append([float(per_position[p]) for p in enc.positions])
        return out


# ----------------------------------------------------------------------------- causal-LM formats

class _CausalLMPRM(PRM):
    """PRMs that are plain causal LMs: a step's probability is softmax over the good/bad token logits."""

    def __init__(self, model: nn.Module, tokenizer, device, dtype, good_id: int, bad_id: int, **kw):
        super().__init__(model.get_decoder() if hasattr(model, "get_decoder") else model.model, tokenizer,
                         device, dtype, **kw)
        self.model = model
        self.good_id, self.bad_id = good_id, bad_id
        head = model.get_output_embeddings()
        self.candidate_weight = head.weight[[good_id, bad_id]].detach()
        self.candidate_bias = head.bias[[good_id, bad_id]].detach() if getattr(head, "bias", None) is not None else None

    def readout(self, hidden):
        logits = F.linear(hidden.to(self.candidate_weight.dtype), self.candidate_weight, self.candidate_bias)
        return logits.float().softmax(-1)[:, 0]

    def full_outputs(self, input_ids):
        logits = self.model(input_ids=input_ids).logits[0].float()
        return logits[:, [self.good_id, self.bad_id]].softmax(-1)[:, 0]


class RLHFlowPRM(_CausalLMPRM):
    """RLHFlow: steps as user turns, each answered by an assistant "+"; the score is read one position before it."""

    format = "rlhflow"

    def __init__(self, model, tokenizer, device, dtype, **kw):
        if not getattr(tokenizer, "chat_template", None):
            raise PRMError("format 'rlhflow' needs a tokenizer with a chat template; "
                           f"choose another format ({', '.join(FORMATS)})")
        good = _single_token(tokenizer, GOOD_TOKEN, self.format)
        bad = _single_token(tokenizer, BAD_TOKEN, self.format)
        super().__init__(model, tokenizer, device, dtype, good, bad, **kw)

    def layout(self, problem, steps):
        conversation = []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": f"{problem} {step}" if k == 0 else step})
            conversation.append({"role": "assistant", "content": _SENTINEL})
        rendered = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        pieces = rendered.split(_SENTINEL)
        if len(pieces) != len(steps) + 1:
            raise PRMError("the chat template dropped or repeated assistant turns; it cannot be used as 'rlhflow'")
        text, chars = pieces[0], []
        for piece in pieces[1:]:
            chars.append(len(text))
            text += GOOD_TOKEN + piece
        return text, chars

    def check_token(self, token_id):
        if token_id != self.good_id:
            raise PRMError("the tokenizer merges the assistant '+' with the chat template's text, so 'rlhflow' "
                           "cannot find where it is predicted")

    def token_position(self, token_index):
        return token_index - 1  # the position that predicts the assistant's "+"


class MathShepherdPRM(_CausalLMPRM):
    """Math-Shepherd: "Step k: ... ки" lines; the "+" / "-" logits are read at each tag."""

    format = "math_shepherd"

    def __init__(self, model, tokenizer, device, dtype, **kw):
        candidates = tokenizer.encode(f"{GOOD_TOKEN} {BAD_TOKEN}", add_special_tokens=False)
        if len(candidates) != 2:
            raise PRMError(f"format 'math_shepherd' needs '{GOOD_TOKEN} {BAD_TOKEN}' to be two tokens, got "
                           f"{candidates}; choose another format ({', '.join(FORMATS)})")
        self.tag_id = _single_token(tokenizer, MATH_SHEPHERD_TAG, self.format)
        probe = tokenizer.encode(f"1 {MATH_SHEPHERD_TAG}\n2 {MATH_SHEPHERD_TAG}", add_special_tokens=False)
        if probe.count(self.tag_id) != 2:
            raise PRMError(f"format 'math_shepherd': this tokenizer does not keep the step tag "
                           f"{MATH_SHEPHERD_TAG!r} as one token inside text; choose another format ({', '.join(FORMATS)})")
        super().__init__(model, tokenizer, device, dtype, candidates[0], candidates[1], **kw)

    def layout(self, problem, steps):
        text = f"{problem.replace(MATH_SHEPHERD_TAG, '')} "
        chars = []
        for k, step in enumerate(steps):
            step = step.replace(MATH_SHEPHERD_TAG, "").strip()
            if not _STEP_MARKER.match(step):
                step = f"Step {k + 1}: {step}"
            text += f"{step} "
            chars.append(len(text))
            text += MATH_SHEPHERD_TAG + ("\n" if k + 1 < len(steps) else "")
        return text, chars

    def check_token(self, token_id):
        if token_id != self.tag_id:
            raise PRMError(f"the tokenizer merged the step tag {MATH_SHEPHERD_TAG!r} with its neighbours")


# ----------------------------------------------------------------------------- Qwen2.5-Math-PRM

class ProcessRewardHeadModel(nn.Module):
    """`*ForProcessRewardModel` layout: `model.*` (the base transformer) + `score` = Linear(H, H), ReLU, Linear(H, 2)."""

    def __init__(self, config):
        super().__init__()
        from transformers import AutoModel
        self.config = config
        self.model = AutoModel.from_config(config)
        num_labels = int(getattr(config, "num_labels", 2) or 2)
        self.score = nn.Sequential(nn.Linear(config.hidden_size, config.hidden_size), nn.ReLU(),
                                   nn.Linear(config.hidden_size, num_labels))


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    state = {}
    for name in files:
        if not (path / name).is_file():
            raise PRMError(f"{path} has no {name}: a 'qwen_prm' checkpoint needs its safetensors weights")
        state.update(load_file(str(path / name)))
    return state


class QwenPRM(PRM):
    """Qwen2.5-Math-PRM: steps end with `<extra_0>` in the assistant turn; P(label 1) of the head at each separator."""

    format = "qwen_prm"

    def __init__(self, model: ProcessRewardHeadModel, tokenizer, device, dtype, **kw):
        self.sep_id = _single_token(tokenizer, QWEN_STEP_SEP, self.format)
        if not getattr(tokenizer, "chat_template", None):
            raise PRMError("format 'qwen_prm' needs a tokenizer with a chat template")
        super().__init__(model.model, tokenizer, device, dtype, **kw)
        self.model = model

    def layout(self, problem, steps):
        steps = [s.replace(QWEN_STEP_SEP, "") for s in steps]
        messages = [{"role": "system", "content": QWEN_SYSTEM},
                    {"role": "user", "content": problem.replace(QWEN_STEP_SEP, "")},
                    {"role": "assistant", "content": _SENTINEL.join(steps) + _SENTINEL}]
        pieces = self.tokenizer.apply_chat_template(messages, tokenize=False).split(_SENTINEL)
        text, chars = pieces[0], []
        for piece in pieces[1:]:
            chars.append(len(text))
            text += QWEN_STEP_SEP + piece
        return text, chars

    def check_token(self, token_id):
        if token_id != self.sep_id:
            raise PRMError(f"the tokenizer merged the step separator {QWEN_STEP_SEP!r} with its neighbours")

    def readout(self, hidden):
        head_dtype = self.model.score[0].weight.dtype
        return self.model.score(hidden.to(head_dtype)).float().softmax(-1)[:, 1]

    def full_outputs(self, input_ids):
        hidden = self.model.model(input_ids=input_ids).last_hidden_state[0]
        return self.model.score(hidden).float().softmax(-1)[:, 1]


# ----------------------------------------------------------------------------- thinkfast default: backbone + LoRA + head

class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update (B starts at zero, so training starts from the backbone)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x):
        update = F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype))
        return self.base(x) + update * self.scale


@dataclass
class TrainedPartConfig:
    hidden_size: int
    lora_layers: list[int] = field(default_factory=list)  # absolute layer indices
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_rank: int = 16
    lora_alpha: float = 32.0
    head_hidden: int = 256


class TrainedPart(nn.Module):
    """What `thinkfast prm train` learns: LoRA on a few attention projections and a step-value head."""

    def __init__(self, cfg: TrainedPartConfig):
        super().__init__()
        self.cfg = cfg
        self.head = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.head_hidden), nn.GELU(), nn.Linear(cfg.head_hidden, 1))
        self.lora = nn.ModuleDict()

    def attach(self, backbone: nn.Module) -> None:
        """Wrap the backbone's target projections with LoRA (idempotent); the LoRA modules live in `self.lora`."""
        layers = backbone.layers
        for i in self.cfg.lora_layers:
            if not 0 <= i < len(layers):
                raise PRMError(f"LoRA layer {i} is outside the backbone's {len(layers)} layers")
            attn = layers[i].self_attn
            for name in self.cfg.lora_targets:
                key = f"{i}_{name}"
                current = getattr(attn, name)
                if isinstance(current, LoRALinear):
                    continue
                if key not in self.lora:
                    self.lora[key] = LoRALinear(current, self.cfg.lora_rank, self.cfg.lora_alpha)
                else:
                    self.lora[key].base = current
                setattr(attn, name, self.lora[key])

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"head.{k}": v for k, v in self.head.state_dict().items()}
        for key, module in self.lora.items():
            state[f"lora.{key}.lora_a"] = module.lora_a.detach()
            state[f"lora.{key}.lora_b"] = module.lora_b.detach()
        return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
        self.head.load_state_dict(head)
        expected = {f"lora.{key}.{p}" for key in self.lora for p in ("lora_a", "lora_b")}
        got = {k for k in state if k.startswith("lora.")}
        if expected != got:
            raise PRMError(f"trained part does not match its manifest: missing {sorted(expected - got)[:4]}, "
                           f"unexpected {sorted(got - expected)[:4]}")
        for key, module in self.lora.items():
            module.lora_a.data.copy_(state[f"lora.{key}.lora_a"])
            module.lora_b.data.copy_(state[f"lora.{key}.lora_b"])


class ThinkfastPRM(PRM):
    """The embedded default: a frozen Llama backbone (the teacher) + a trained part; score = sigmoid(head(h_step_end))."""

    format = "thinkfast"

    def __init__(self, backbone: nn.Module, tokenizer, trained: TrainedPart, device, dtype, **kw):
        super().__init__(backbone, tokenizer, device, dtype, **kw)
        self.trained = trained
        self._prompt_cache: dict[str, str] = {}
        trained.attach(backbone)

    def prompt_text(self, problem: str) -> str:
        if problem in self._prompt_cache:  # 64 completions per problem share one rendered prompt
            return self._prompt_cache[problem]
        if len(self._prompt_cache) > 4096:
            self._prompt_cache.clear()
        self._prompt_cache[problem] = self._render_prompt(problem)
        return self._prompt_cache[problem]

    def _render_prompt(self, problem: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template([{"role": "user", "content": problem}], tokenize=False,
                                                      add_generation_prompt=True)
        return f"Problem: {problem}\n\nSolution:\n"

    def layout(self, problem, steps):
        text, chars = self.prompt_text(problem), []
        for k, step in enumerate(steps):
            if k:
                text += "\n\n"
            text += step
            chars.append(len(text) - 1)  # the step's last character: the score sees the step and nothing after it
        return text, chars

    def step_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head_dtype = self.trained.head[0].weight.dtype
        return self.trained.head(hidden.to(head_dtype)).squeeze(-1).float()

    def readout(self, hidden):
        return torch.sigmoid(self.step_logits(hidden))

    def full_outputs(self, input_ids):
        return self.readout(self.base(input_ids=input_ids).last_hidden_state[0])


# ----------------------------------------------------------------------------- loading

def _resolve_local(name_or_path: str) -> Path:
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PRMError(f"PRM path {path} is not a directory")
        return path
    if name_or_path.count("/") != 1:
        raise PRMError(f"PRM {name_or_path!r} is neither 'default', a local directory, nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(name_or_path, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]))
    except Exception as exc:  # offline, gated, missing: say which PRM and why
        raise PRMError(f"cannot fetch PRM {name_or_path!r} from the hub ({type(exc).__name__}: {exc}); "
                       "pass a local checkpoint directory instead") from exc


def detect_format(name_or_path: str, path: Path | None = None) -> str:
    """Format of a PRM checkpoint: thinkfast manifest, known hub id, `*ForProcessRewardModel`, name, or tokenizer."""
    path = Path(path) if path is not None else Path(name_or_path)
    if (path / MANIFEST).is_file():
        return "thinkfast"
    if name_or_path in KNOWN_HUB_IDS:
        return KNOWN_HUB_IDS[name_or_path]
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PRMError(f"{path} has no config.json (nor {MANIFEST}); cannot detect its PRM format. "
                       f"Pass format= one of {', '.join(FORMATS)}")
    config = json.loads(config_file.read_text())
    if config.get("prm_format") in FORMATS:
        return config["prm_format"]
    architectures = config.get("architectures") or []
    if any(a.endswith("ForProcessRewardModel") for a in architectures):
        return "qwen_prm"
    lowered = name_or_path.lower()
    if "shepherd" in lowered:
        return "math_shepherd"
    if "rlhflow" in lowered:
        return "rlhflow"
    if any(a.endswith("ForCausalLM") for a in architectures):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if getattr(tokenizer, "chat_template", None):
            return "rlhflow"
        if len(tokenizer.encode(MATH_SHEPHERD_TAG, add_special_tokens=False)) == 1:
            return "math_shepherd"
    raise PRMError(f"cannot detect the PRM format of {name_or_path!r} (architectures {architectures}); "
                   f"pass format= one of {', '.join(FORMATS)}")


def load_prm(name_or_path: str | os.PathLike = "default", device=None, dtype=None, format: str | None = None,
             step_mode: str | None = None, backbone: str | os.PathLike | None = None, **kw) -> PRM:
    """Load a PRM: "default" (the committed trained part in harness_ext/assets/prm), a hub id, or a directory.

    `format`: one of FORMATS, else detected. `step_mode`: how completions split into steps (see `split_steps`;
    default "auto", the thinkfast format uses the mode it was trained with). `backbone`: override the backbone
    directory of a thinkfast PRM. Extra keywords go to the scorer (`max_batch_tokens`, `max_batch_size`).
    """
    name = str(name_or_path)
    if format is not None and format not in FORMATS:
        raise PRMError(f"unknown PRM format {format!r}; choose from {', '.join(FORMATS)}")
    device = _pick_device(device)
    dtype = _pick_dtype(device, dtype)
    if name == "default":
        if not (ASSETS_DIR / MANIFEST).is_file():
            raise PRMError(f"no trained default PRM in {ASSETS_DIR} (it needs {MANIFEST} and {TRAINED_WEIGHTS}). "
                           f"Train it on a GPU (about 10 minutes on an H100) with: "
                           f"thinkfast prm train --out {ASSETS_DIR}")
        path = ASSETS_DIR
    else:
        path = _resolve_local(name)
    format = format or detect_format(name, path)
    if format == "thinkfast":
        return _load_thinkfast(path, device, dtype, step_mode, backbone, **kw)
    step_mode = step_mode or "auto"
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if format == "qwen_prm":
        _single_token(tokenizer, QWEN_STEP_SEP, format)  # before reading gigabytes of weights
        config = AutoConfig.from_pretrained(str(path))
        with torch.device("meta"):
            model = ProcessRewardHeadModel(config)
        state = {k: v for k, v in _load_state_dict(path).items() if not k.startswith("lm_head.")}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if "rotary_emb" not in k]
        if missing or unexpected:
            raise PRMError(f"{path} does not have the 'qwen_prm' layout (model.* + score.0/score.2): "
                           f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        _materialize_buffers(model.model, config)
        _cast_parameters(model, dtype)
        model = model.to(device).eval()
        return QwenPRM(model, tokenizer, device, dtype, step_mode=step_mode, **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    cls = RLHFlowPRM if format == "rlhflow" else MathShepherdPRM
    return cls(model, tokenizer, device, dtype, step_mode=step_mode, **kw)


def _materialize_buffers(base: nn.Module, config) -> None:
    """Non-persistent buffers (rotary inverse frequencies) are not in checkpoints: rebuild those left on meta."""
    for module in base.modules():
        if any(buf.is_meta for buf in module.buffers(recurse=False)):
            try:
                fresh = type(module)(config=config)
            except Exception as exc:
                raise PRMError(f"cannot rebuild the buffers of {type(module).__name__}: {exc}") from exc
            for name, buf in fresh.named_buffers(recurse=False):
                module.register_buffer(name, buf, persistent=False)


def _cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast weights only: rotary frequencies stay fp32 (as `from_pretrained(dtype=...)` keeps them)."""
    for param in model.parameters():
        param.data = param.data.to(dtype)


def _backbone_dir(spec: dict, override) -> Path:
    if override is not None:
        return Path(override)
    if spec.get("path") and Path(spec["path"]).is_dir():
        return Path(spec["path"])
    if spec.get("teacher"):
        from harness_ext.teacher import convert_teacher
        return convert_teacher(spec["teacher"])
    raise PRMError(f"the PRM's backbone {spec} is not available here; pass backbone=<checkpoint directory>")


def _load_backbone(path: Path, device, dtype):
    from transformers import AutoModel, AutoTokenizer
    backbone = AutoModel.from_pretrained(str(path), dtype=dtype).to(device).eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    return backbone, AutoTokenizer.from_pretrained(str(path))


def _load_thinkfast(path: Path, device, dtype, step_mode, backbone, **kw) -> ThinkfastPRM:
    from safetensors.torch import load_file
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != "thinkfast":
        raise PRMError(f"{path / MANIFEST} is not a thinkfast PRM manifest")
    weights = path / manifest.get("weights", TRAINED_WEIGHTS)
    if not weights.is_file():
        raise PRMError(f"{path} has a manifest but no trained weights {weights.name}")
    model, tokenizer = _load_backbone(_backbone_dir(manifest["backbone"], backbone), device, dtype)
    cfg = TrainedPartConfig(**manifest["trained_part"])
    if model.config.hidden_size != cfg.hidden_size:
        raise PRMError(f"backbone hidden size {model.config.hidden_size} does not match the trained part's "
                       f"{cfg.hidden_size}; this PRM was trained on another backbone")
    trained = TrainedPart(cfg)
    trained.attach(model)
    trained.load_trainable(load_file(str(weights)))
    trained.to(device).eval()
    return ThinkfastPRM(model, tokenizer, trained, device, dtype,
                        step_mode=step_mode or manifest.get("step_mode", "auto"), **kw)


# ----------------------------------------------------------------------------- answers and metrics

def answer_style(source: str) -> str:
    return "gsm8k" if "gsm8k" in source else "math"


def check_answers(texts: Sequence[str], reference: str, source: str) -> tuple[list[str | None], list[bool]]:
    from harness_ext.scoring.answers import extract_answer, is_equiv
    answers = [extract_answer(t, style=answer_style(source)) for t in texts]
    return answers, [is_equiv(a, reference) for a in answers]


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties count half); None when only one class is present."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mean_rank = (i + j + 1) / 2  # 1-based average rank of the tie group
        rank_sum += mean_rank * sum(1 for _, y in ranked[i:j] if y)
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


# ----------------------------------------------------------------------------- sampling (engine, or HF generate)

class Sampler:
    """Samples continuations of token-id prompts with the generation engine (HF `generate` when it is missing)."""

    def __init__(self, model_dir: Path, device: torch.device, batch_size: int = 256):
        from transformers import AutoTokenizer
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.device, self.batch_size = device, batch_size
        self.engine = None
        try:
            from harness_ext.generation.engine import Engine
        except ImportError:
            Engine = None
        if Engine is not None:
            self.engine = Engine.from_pretrained(str(model_dir), device=device, max_batch_size=batch_size)
        else:
            from transformers import AutoModelForCausalLM
            print("[prm] harness_ext.generation.engine is not available: sampling with HF generate")
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()

    def generate(self, prompts: list[list[int]], n: int, max_new_tokens: int, temperature: float, seed: int,
                 desc: str = "sampling") -> list[list[str]]:
        eos = self.tokenizer.eos_token_id
        if self.engine is not None:
            from harness_ext.generation.engine import SamplingParams
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=1.0, top_k=0,
                                    stop_token_ids=(eos,) if eos is not None else ())
            outs = self.engine.generate(prompts, params, n=n, seed=seed, progress=True)
            return [[c.text for c in row] for row in outs]
        return self._generate_hf(prompts, n, max_new_tokens, temperature, seed, desc)

    @torch.no_grad()
    def _generate_hf(self, prompts, n, max_new_tokens, temperature, seed, desc):
        from tqdm.auto import tqdm
        torch.manual_seed(seed)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        per_batch = max(1, self.batch_size // n)
        out = []
        for start in tqdm(range(0, len(prompts), per_batch), desc=desc, unit="batch"):
            chunk = prompts[start:start + per_batch]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(chunk):  # left padding so every prompt ends at the same column
                ids[r, width - len(p):] = torch.tensor(p)
                mask[r, width - len(p):] = 1
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                      top_k=0, top_p=1.0,
                                      max_new_tokens=max_new_tokens, num_return_sequences=n, pad_token_id=pad,
                                      eos_token_id=self.tokenizer.eos_token_id)
            texts = self.tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
            out += [texts[r * n:(r + 1) * n] for r in range(len(chunk))]
        return out


def solve_prompt_ids(tokenizer, problem: str) -> list[int]:
    text = SOLVE_PROMPT.format(problem=problem)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
    else:
        rendered = f"{text}\n\nSolution:\n"
    return tokenizer.encode(rendered, add_special_tokens=False)


# ----------------------------------------------------------------------------- training the default

@dataclass
class TrainRecipe:
    problems: int = 400              # training problems, half GSM8K train, half MATH train
    eval_problems: int = 100         # held-out TRAIN-split problems for the report
    solutions: int = 4               # sampled solutions per training problem
    rollouts: int = 4                # K Monte-Carlo continuations per step prefix
    max_labelled_steps: int = 6      # step prefixes labelled per solution (the final step always is)
    max_new_tokens: int = 256
    temperature: float = 0.8
    eval_samples: int = 16           # samples per held-out problem for weighted_bon@N / maj@N
    epochs: int = 4
    batch_size: int = 16             # sequences per optimizer step
    lr: float = 5e-4
    lora_last_layers: int = 4
    lora_rank: int = 16
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    head_hidden: int = 256
    step_mode: str = "auto"
    gen_batch_size: int = 1024          # engine slots for labelling (the committed default was trained with 1024)
    seed: int = 0


SMOKE_RECIPE = dict(problems=4, eval_problems=2, solutions=2, rollouts=2, max_labelled_steps=3, max_new_tokens=32,
                    eval_samples=4, epochs=2, batch_size=4, lora_last_layers=1, lora_rank=4, head_hidden=32,
                    gen_batch_size=16)


def _load_train_problems(recipe: TrainRecipe):
    """Disjoint training / held-out problems from the TRAIN splits only (never a test split)."""
    from harness_ext.data import load_problems
    rng = random.Random(recipe.seed)
    pools = [load_problems("gsm8k_train"), load_problems("math_train")]
    for pool in pools:
        rng.shuffle(pool)
    n_eval = [recipe.eval_problems // 2, recipe.eval_problems - recipe.eval_problems // 2]
    n_train = [recipe.problems // 2, recipe.problems - recipe.problems // 2]
    evals, trains = [], []
    for pool, ne, nt in zip(pools, n_eval, n_train):
        if ne + nt > len(pool):
            raise PRMError(f"asked for {ne + nt} problems but the split has {len(pool)}")
        evals += pool[:ne]
        trains += pool[ne:ne + nt]
    return trains, evals


def label_steps(sampler: Sampler, problems, recipe: TrainRecipe) -> tuple[list[dict], dict]:
    """Sample solutions, then label each step prefix by the fraction of K rollouts that reach the reference answer."""
    tok = sampler.tokenizer
    prompts = [solve_prompt_ids(tok, p.problem) for p in problems]
    solutions = sampler.generate(prompts, recipe.solutions, recipe.max_new_tokens, recipe.temperature,
                                 recipe.seed, desc="solutions")
    examples, rollout_prompts, rollout_refs = [], [], []
    for p, prompt, sols in zip(problems, prompts, solutions):
        _, correct = check_answers(sols, p.answer, p.source)
        for text, ok in zip(sols, correct):
            steps = split_steps(text, recipe.step_mode)
            if not steps:
                continue
            labels: list[float] = [float("nan")] * len(steps)
            labels[-1] = float(ok)  # the full solution: its own correctness
            for k in range(1, min(len(steps), recipe.max_labelled_steps)):
                prefix = "\n\n".join(steps[:k]) + "\n\n"
                rollout_prompts.append(prompt + tok.encode(prefix, add_special_tokens=False))
                rollout_refs.append((len(examples), k - 1, prefix))
            examples.append({"problem": p.problem, "steps": steps, "labels": labels, "source": p.source,
                             "answer": p.answer, "correct": bool(ok)})
    if rollout_prompts:
        rollouts = sampler.generate(rollout_prompts, recipe.rollouts, recipe.max_new_tokens, recipe.temperature,
                                    recipe.seed + 1, desc="rollouts")
        for (e, step, prefix), conts in zip(rollout_refs, rollouts):
            ex = examples[e]
            _, ok = check_answers([prefix + c for c in conts], ex["answer"], ex["source"])
            ex["labels"][step] = sum(ok) / len(ok)
    labelled = [l for ex in examples for l in ex["labels"] if not math.isnan(l)]
    counts = {"train_problems": len(problems), "solutions": sum(len(s) for s in solutions),
              "solutions_with_steps": len(examples),
              "solution_accuracy": sum(ex["correct"] for ex in examples) / max(1, len(examples)),
              "mean_steps": sum(len(ex["steps"]) for ex in examples) / max(1, len(examples)),
              "labelled_steps": len(labelled), "rollouts": len(rollout_prompts) * recipe.rollouts,
              "mean_label": sum(labelled) / max(1, len(labelled))}
    return examples, counts


def fit_trained_part(prm: ThinkfastPRM, examples: list[dict], recipe: TrainRecipe) -> dict:
    """BCE on soft step labels; only the LoRA and head train, the backbone stays frozen."""
    from tqdm.auto import tqdm
    encoded = []
    for ex in examples:
        enc = prm.encode(ex["problem"], ex["steps"])
        keep = [(pos, lab) for pos, lab in zip(enc.positions, ex["labels"]) if not math.isnan(lab)]
        if keep:
            encoded.append((enc.input_ids, [k[0] for k in keep], [k[1] for k in keep]))
    if not encoded:
        raise PRMError("no labelled steps to train on")
    params = [p for p in prm.trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(encoded) / recipe.batch_size)
    total = steps_per_epoch * recipe.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10))
                                              * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    rng = random.Random(recipe.seed)
    device, dtype = prm.device, prm.dtype
    pad = prm.tokenizer.pad_token_id if prm.tokenizer.pad_token_id is not None else 0
    prm.trained.train()
    losses = []
    bar = tqdm(total=total, desc="training PRM", unit="step")
    for epoch in range(recipe.epochs):
        # batches of similar length, in random order
        order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i][0]), rng.random()))
        batches = [order[i:i + recipe.batch_size] for i in range(0, len(order), recipe.batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            width = max(len(encoded[i][0]) for i in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            rows, cols, targets = [], [], []
            for r, i in enumerate(batch):
                tokens, positions, labels = encoded[i]
                ids[r, :len(tokens)] = torch.tensor(tokens)
                mask[r, :len(tokens)] = 1
                rows += [r] * len(positions)
                cols += positions
                targets += labels
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                hidden = prm.hidden_states(ids.to(device), mask.to(device))
                logits = prm.step_logits(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)])
            loss = F.binary_cross_entropy_with_logits(logits, torch.tensor(targets, device=device, dtype=torch.float32))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.4f}")
    bar.close()
    prm.trained.eval()
    tail = losses[-max(1, steps_per_epoch):]
    return {"train_sequences": len(encoded), "optimizer_steps": len(losses),
            "first_epoch_loss": sum(losses[:steps_per_epoch]) / min(len(losses), steps_per_epoch),
            "last_epoch_loss": sum(tail) / len(tail)}


def evaluate_prm(prm: PRM, sampler: Sampler, problems, samples: int, max_new_tokens: int, temperature: float,
                 seed: int) -> dict:
    """On held-out train-split problems: AUC of each aggregation for final-answer correctness, and
    weighted_bon@N / maj@N / pass@1 (N = `samples`)."""
    from harness_ext.scoring.answers import group_answers
    from harness_ext.scoring.metrics import bon_metrics
    if not problems:
        return {}
    prompts = [solve_prompt_ids(sampler.tokenizer, p.problem) for p in problems]
    samples_per_problem = sampler.generate(prompts, samples, max_new_tokens, temperature, seed, desc="eval samples")
    step_scores = prm.score_many([p.problem for p in problems], samples_per_problem, progress=True)
    agg_scores = {how: [] for how in AGGREGATIONS}
    labels: list[bool] = []
    per_problem = {how: [] for how in AGGREGATIONS}
    for p, texts, scores in zip(problems, samples_per_problem, step_scores):
        answers, correct = check_answers(texts, p.answer, p.source)
        labels += correct
        class_ids = group_answers(answers)
        class_correct: dict[int, bool] = {}
        for cid, ok in zip(class_ids, correct):
            if cid is not None:
                class_correct[cid] = class_correct.get(cid, False) or ok
        for how in AGGREGATIONS:
            agg = [aggregate(s, how) for s in scores]
            agg_scores[how] += agg
            per_problem[how].append(bon_metrics(class_ids, class_correct, agg, ks=[1, samples]))
    n = samples
    report = {"eval_problems": len(problems), "samples_per_problem": n, "sample_accuracy": sum(labels) / len(labels),
              "auc": {how: roc_auc(agg_scores[how], labels) for how in AGGREGATIONS}}
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    first = per_problem["min"]
    report["pass@1"] = mean(first, "pass@1")
    report[f"maj@{n}"] = mean(first, f"maj@{n}")
    report[f"pass@{n}"] = mean(first, f"pass@{n}")
    report[f"weighted_bon@{n}"] = {how: mean(per_problem[how], f"weighted_bon@{n}") for how in AGGREGATIONS}
    report[f"bon@{n}"] = {how: mean(per_problem[how], f"bon@{n}") for how in AGGREGATIONS}
    return report


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
    except Exception:
        return "unknown"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shipped and shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_trained_part(out_dir: Path, trained: TrainedPart, manifest: dict) -> Path:
    """Weights first, manifest last (each replaced atomically), so a directory with a manifest is complete."""
    from safetensors.torch import save
    out_dir.mkdir(parents=True, exist_ok=True)
    blob = save(trained.trainable_state_dict(), metadata={"format": "thinkfast-prm"})
    if len(blob) > MAX_TRAINED_BYTES:
        raise PRMError(f"trained part is {len(blob) / 2**20:.1f} MiB, over the {MAX_TRAINED_BYTES / 2**20:.0f} MiB "
                       "budget; lower the LoRA rank / layers or the head size")
    if (out_dir / MANIFEST).exists():
        (out_dir / MANIFEST).unlink()  # an old manifest must not vouch for new weights mid-write
    _atomic_write_bytes(out_dir / TRAINED_WEIGHTS, blob)
    manifest = {**manifest, "weights": TRAINED_WEIGHTS, "weights_sha256": hashlib.sha256(blob).hexdigest(),
                "weights_bytes": len(blob)}
    _atomic_write_bytes(out_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return out_dir


def new_thinkfast_prm(backbone_dir: Path, recipe: TrainRecipe, device, dtype) -> ThinkfastPRM:
    model, tokenizer = _load_backbone(backbone_dir, device, dtype)
    n_layers = model.config.num_hidden_layers
    cfg = TrainedPartConfig(hidden_size=model.config.hidden_size,
                            lora_layers=list(range(max(0, n_layers - recipe.lora_last_layers), n_layers)),
                            lora_targets=list(recipe.lora_targets), lora_rank=recipe.lora_rank,
                            lora_alpha=recipe.lora_alpha, head_hidden=recipe.head_hidden)
    torch.manual_seed(recipe.seed)
    trained = TrainedPart(cfg)
    trained.attach(model)
    trained.to(device)
    return ThinkfastPRM(model, tokenizer, trained, device, dtype, step_mode=recipe.step_mode)


def train_default_prm(out_dir: str | os.PathLike, recipe: TrainRecipe, backbone: str | os.PathLike | None = None,
                      device=None) -> dict:
    """The whole `thinkfast prm train`: label, fit, evaluate on held-out train problems, write trained part + manifest."""
    t0 = time.time()
    device = _pick_device(device)
    dtype = _pick_dtype(device, None)
    if backbone is None:
        from harness_ext.teacher import convert_teacher
        backbone_spec, backbone_dir = {"teacher": DEFAULT_TEACHER}, convert_teacher(DEFAULT_TEACHER)
    else:
        backbone_dir = Path(backbone)
        backbone_spec = {"path": str(backbone_dir.resolve())}
    trains, evals = _load_train_problems(recipe)
    sampler = Sampler(backbone_dir, device, batch_size=recipe.gen_batch_size)
    examples, counts = label_steps(sampler, trains, recipe)
    t_label = time.time() - t0
    prm = new_thinkfast_prm(backbone_dir, recipe, device, dtype)
    train_metrics = fit_trained_part(prm, examples, recipe)
    t_train = time.time() - t0 - t_label
    eval_metrics = evaluate_prm(prm, sampler, evals, recipe.eval_samples, recipe.max_new_tokens, recipe.temperature,
                                recipe.seed + 2)
    manifest = {
        "format": "thinkfast", "version": MANIFEST_VERSION,
        "backbone": backbone_spec,
        "backbone_config": {k: getattr(prm.base.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")},
        "trained_part": asdict(prm.trained.cfg), "step_mode": recipe.step_mode,
        "recipe": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(recipe).items()},
        "data": {**counts, "eval_problems": len(evals), "splits": ["gsm8k_train", "math_train"]},
        "metrics": {"train": train_metrics, "heldout": eval_metrics},
        "timing_s": {"labelling": round(t_label, 1), "training": round(t_train, 1),
                     "total": round(time.time() - t0, 1)},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "git_commit": _git_commit(), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    save_trained_part(Path(out_dir), prm.trained, manifest)
    return manifest
