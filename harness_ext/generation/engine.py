"""Batched sampling engine for Llamba, MambaInLlama and the Llama teacher (gpt-fast style).

    from harness_ext.generation.engine import Engine, SamplingParams
    engine = Engine.from_pretrained("ckpt/llamba", max_batch_size=256)
    outs = engine.generate([[{"role": "user", "content": "What is 7*8?"}]],
                           SamplingParams(max_new_tokens=400, temperature=0.8), n=64, seed=0)
    outs[0][3].text, outs[0][3].finish_reason       # prompt 0, sample 3

How it runs (see DESIGN.md "Model runtime API" for the model side):

* One static decode state (`model.allocate_decode_state`) with `B + T` slots: `B` decode slots
  (B = the batch bucket) and `T` "template" slots that hold prefilled prompts whose samples did not
  all fit into free slots yet. Decoding runs on a *view* of the first `b` slots, so templates are
  never advanced, and the batch can shrink to a smaller bucket at the end of a run.
* The one-token step (`model.decode_step` + sampling + stop checks + writing the token) touches only
  static tensors; on CUDA it is captured as one CUDA graph per batch bucket (1, 2, 4, ..., B).
  Prefill is not captured: prompts have arbitrary lengths.
* The host looks at the batch only every `sync_every` steps: it collects finished samples (a slot
  that stopped keeps decoding garbage until then; those tokens are never recorded), checks stop
  strings on newly decoded text, and refills free slots with pending samples. The finished samples' text is
  made after the next steps are launched, while the GPU runs them (`finish_s`).
* Each distinct prompt is prefilled once; `state.copy_slots` forks it into its `n` samples
  (directly from the first sample's slot, or from a template slot when they arrive over time).
* A prefill call is not captured and costs tens of ms of launches whatever its size, so calls are
  batched: forks from template slots happen at every look (cheap copies), but new prompts are
  prefilled only once `refill_min_free` slots are free (default B/8) or nothing else would decode,
  and a call that runs also prefills prompts ahead into every free template slot (n > 1).
  Scheduling never changes a sample: its noise depends on (seed, prompt, sample index) only.
* Sampling (temperature, top-k, top-p) runs on the device from counter-based hashed noise
  (`sampling.py`: Gumbel-max, one fused pass over the bf16 logits for plain temperature and greedy):
  sample j of prompt i draws the same tokens for a given seed whatever the batch.

Outputs (`Completion`):
  token_ids    generated tokens. A stop *token* (eos or `stop_token_ids`) is the last token and is
               kept; for a stop *string*, the tokens end with the token that completed the string.
  text         the decoded tokens (special tokens skipped), without the stop token and cut just
               before the first stop string.
  finish_reason "stop" (stop token or string) or "length" (max_new_tokens or the model's max length).
  num_tokens   len(token_ids).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from harness_ext.generation.sampling import greedy_next, sample_key, sample_next

_MAX_STOP_IDS = 16  # the graph's stop-id table is this wide (padded with -1)


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0         # 0 = greedy
    top_p: float = 1.0               # in (0, 1]; 1 = off
    top_k: int = 0                   # 0 = off
    stop_token_ids: tuple[int, ...] = ()   # stop on these in addition to the eos ids
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False         # True: only max_new_tokens, stop_token_ids and stop_strings stop

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if isinstance(self.stop_strings, str):
            object.__setattr__(self, "stop_strings", (self.stop_strings,))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        self.validate()

    def validate(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):  # also rejects NaN
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be >= 0, got {self.stop_token_ids!r}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    num_tokens: int


def batch_buckets(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... below max_batch_size, then max_batch_size itself."""
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch_size]


def default_prefill_tokens(model) -> int:
    """Tokens per prefill call: 65,536 at SmolLM2-135M's width (576), fewer for wider models so a call's activations
    stay ~1-2 GB. Prefill is un-graphed Python per layer (~2 ms per Mamba layer on an H100 host): at 16,384 tokens
    that outweighed the kernels (Llamba, 256 prompts of 512 tokens: 0.94 s in calls of 16,384, 0.25 s in 65,536)."""
    hidden = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 576)
    return int(min(65536, max(4096, 65536 * 576 // hidden)))


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


# ---------------------------------------------------------------------------------------------
# Decode-state views. The contract gives the state's tensors (per layer conv/ssm state or K/V
# cache, and `seqlens`), all with the slot as their first dimension; a view of the first `b`
# slots shares their storage, so a step on the view updates the full state in place.

def _map_state(obj: Any, fn, capacity: int, seen: dict):
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.dim() > 0 and obj.shape[0] == capacity else obj
    if isinstance(obj, torch.nn.Module) or obj is None or isinstance(obj, (int, float, str, bool, torch.dtype, torch.device)):
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, list):
        out = [_map_state(v, fn, capacity, seen) for v in obj]
    elif isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        out = tuple(_map_state(v, fn, capacity, seen) for v in obj)
    elif isinstance(obj, dict):
        out = {k: _map_state(v, fn, capacity, seen) for k, v in obj.items()}
    elif hasattr(obj, "__dict__"):
        out = copy.copy(obj)
        seen[id(obj)] = out
        for name, value in vars(obj).items():
            setattr(out, name, _map_state(value, fn, capacity, seen))
        return out
    else:
        return obj
    seen[id(obj)] = out
    return out


def narrow_state(state, capacity: int, batch: int):
    """A view of slots [0, batch) of a decode state allocated with `capacity` slots."""
    if hasattr(state, "narrow"):
        return state.narrow(batch)
    view = _map_state(state, lambda t: t[:batch], capacity, {})
    for attr in ("batch_size", "max_batch_size"):  # plain int attributes only (a property follows the tensors)
        if isinstance(getattr(view, "__dict__", {}).get(attr), int):
            setattr(view, attr, batch)
    return view


def state_nbytes(state, exclude=("seqlens",)) -> int:
    """Bytes held by a decode state's tensors (the bench uses it for the bandwidth floor)."""
    total, seen = 0, set()

    def visit(obj, name=""):
        nonlocal total
        if isinstance(obj, torch.Tensor):
            if name not in exclude and obj.data_ptr() not in seen:
                seen.add(obj.data_ptr())
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, name)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, str(k))
        elif hasattr(obj, "__dict__") and not isinstance(obj, torch.nn.Module) and id(obj) not in seen:
            seen.add(id(obj))
            for k, v in vars(obj).items():
                visit(v, k)

    visit(state)
    return total


# ---------------------------------------------------------------------------------------------

class _Buffers:
    """Static per-slot tensors read and written by the decode step (shared by every bucket)."""

    def __init__(self, slots: int, width: int, device):
        self.slots, self.width = slots, width
        self.tokens = torch.zeros(slots, dtype=torch.long, device=device)      # next decode input
        self.gen_count = torch.zeros(slots, dtype=torch.int32, device=device)  # tokens recorded
        self.budget = torch.ones(slots, dtype=torch.int32, device=device)      # max tokens per slot
        self.done = torch.ones(slots, dtype=torch.bool, device=device)         # idle slots are "done"
        self.keys = torch.zeros(slots, dtype=torch.long, device=device)        # per-sample noise key
        self.out = torch.zeros(slots, width + 1, dtype=torch.int32, device=device)  # +1: idle writes
        self.stop_ids = torch.full((_MAX_STOP_IDS,), -1, dtype=torch.long, device=device)
        self.temperature = torch.ones((), dtype=torch.float32, device=device)
        self.top_p = torch.ones((), dtype=torch.float32, device=device)

    def move_rows(self, src: list[int], dst: list[int]):
        s = torch.tensor(src, device=self.tokens.device)
        d = torch.tensor(dst, device=self.tokens.device)
        for t in (self.tokens, self.gen_count, self.budget, self.done, self.keys, self.out):
            t[d] = t[s]
        self.done[s] = True


@dataclass
class _Template:
    """A prompt prefilled into a template slot, its samples forked from there as slots free up."""
    prompt: int
    slot: int
    next_sample: int
    logits: torch.Tensor | None = None   # last-token logits row (set once its prefill ran)


@dataclass
class _Schedule:
    pending: deque                 # prompt indices not prefilled yet
    free_templates: list           # template slots not holding a prompt
    refill_min: int                # free slots that justify a prefill call
    queue: deque = dataclasses.field(default_factory=deque)   # _Template entries, oldest first


class Engine:
    def __init__(self, model, tokenizer=None, max_batch_size: int = 256, use_cuda_graphs: bool | None = None,
                 sync_every: int = 16, max_seqlen: int | None = None, prefill_tokens: int | None = None,
                 refill_min_free: int | None = None, template_slots: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        if prefill_tokens is not None and prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be >= 1 (or None: by model width), got {prefill_tokens}")
        for method in ("allocate_decode_state", "prefill", "decode_step"):
            if not hasattr(model, method):
                raise TypeError(f"{type(model).__name__} has no {method}(); the engine needs the decode API "
                                "of DESIGN.md (Llamba, MambaInLlama, or a Llama teacher loaded with load_model)")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        if use_cuda_graphs is None:
            use_cuda_graphs = self.device.type == "cuda"
        if use_cuda_graphs and self.device.type != "cuda":
            raise ValueError("use_cuda_graphs=True needs the model on a CUDA device")
        self.use_cuda_graphs = use_cuda_graphs
        self.max_batch_size = max_batch_size
        self.buckets = batch_buckets(max_batch_size)
        self.sync_every = sync_every
        self.prefill_tokens = prefill_tokens or default_prefill_tokens(model)
        for name, value in (("refill_min_free", refill_min_free), ("template_slots", template_slots)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 or None (default), got {value!r}")
        self.refill_min_free = refill_min_free      # None: max(1, slots // 8)
        self.template_slots = template_slots        # None: max(1, min(64, slots // 16))
        config = getattr(model, "config", None)
        if max_seqlen is not None:
            self.max_len, self.max_len_source = int(max_seqlen), "the engine's max_seqlen"
        elif getattr(config, "max_position_embeddings", None):
            self.max_len, self.max_len_source = int(config.max_position_embeddings), "config.max_position_embeddings"
        else:
            self.max_len, self.max_len_source = 4096, "the engine's default max_seqlen"
        self.vocab_size = int(getattr(config, "vocab_size", 0) or model.get_output_embeddings().weight.shape[0])
        self.eos_token_ids = self._eos_ids()
        # the samplers read bf16 logits as they are: skip decode_step's fp32 copy where the model offers that
        self._decode_kwargs = {"float_logits": False} if _accepts(model.decode_step, "float_logits") else {}
        self._state = None
        self._state_key = None  # (decode slots, max_seqlen, out width, template slots)
        self._views: dict[int, Any] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._graph_pool = None
        self._buf = None
        self.capture_s = 0.0
        self.stats: dict[str, float] = {}

    # ----- construction helpers -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path_or_id, device=None, dtype=None, tokenizer=None, **kwargs) -> "Engine":
        """Load Llamba / MambaInLlama / a Llama teacher with `harness_ext.models.load_model`
        (default: CUDA in bf16 when available, else CPU in fp32)."""
        from harness_ext.models import load_model

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = load_model(path_or_id, device=device, dtype=dtype)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path_or_id)
        return cls(model, tokenizer, **kwargs)

    def _eos_ids(self) -> tuple[int, ...]:
        ids = []
        for source in (getattr(self.model, "generation_config", None), getattr(self.model, "config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            for t in eos if isinstance(eos, (list, tuple)) else [eos]:
                if t is not None and int(t) not in ids:
                    ids.append(int(t))
        return tuple(ids)

    # ----- input handling -------------------------------------------------------------------

    def encode_prompt(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            self._need_tokenizer("string prompts")
            return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            self._need_tokenizer("chat prompts")
            text = self.tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ValueError("each prompt must be a list of token ids, a string, or a list of chat messages "
                         f"(dicts with 'role' and 'content'); got {type(prompt).__name__}: {str(prompt)[:80]}")

    def _need_tokenizer(self, what):
        if self.tokenizer is None:
            raise ValueError(f"{what} need a tokenizer: Engine(model, tokenizer)")

    def _validate(self, prompts, params: SamplingParams, n: int) -> list[list[int]]:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.validate()
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence) or len(prompts) == 0:
            raise ValueError("prompts must be a non-empty list (of token-id lists, strings or chat-message lists)")
        if params.stop_strings and self.tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: Engine(model, tokenizer)")
        stop_ids = self._stop_ids(params)
        if len(stop_ids) > _MAX_STOP_IDS:
            raise ValueError(f"at most {_MAX_STOP_IDS} stop token ids (eos included), got {len(stop_ids)}")
        if any(t >= self.vocab_size for t in stop_ids):
            raise ValueError(f"stop_token_ids {stop_ids} outside the vocabulary (size {self.vocab_size})")
        ids = [self.encode_prompt(p) for p in prompts]
        for i, p in enumerate(ids):
            if not p:
                raise ValueError(f"prompt {i} is empty")
            if min(p) < 0 or max(p) >= self.vocab_size:
                raise ValueError(f"prompt {i} has token ids outside [0, {self.vocab_size})")
            if len(p) >= self.max_len:
                raise ValueError(f"prompt {i} has {len(p)} tokens; the model's max length is {self.max_len} "
                                 f"({self.max_len_source}), which must leave room for at least one new token")
        return ids

    def _special_stop_strings(self, params: SamplingParams) -> SamplingParams:
        """A stop string that is one special token (lm-eval adds the eos text, "<|im_end|>", to every request) can
        never appear in the decoded text, which skips special tokens: it becomes a stop token id. Without this, the
        host decoded every live slot's new tokens at every look for nothing: 21-36 s of 52-86 s generations on
        GSM8K-500 / MATH-500 (`host_s`, 4 x H100 run at 6a5cae3)."""
        if not params.stop_strings or self.tokenizer is None or not isinstance(params, SamplingParams):
            return params
        special = set(getattr(self.tokenizer, "all_special_ids", None) or [])
        special |= {i for i, t in getattr(self.tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        strings, ids = [], list(params.stop_token_ids)
        for text in params.stop_strings:
            enc = self.tokenizer.encode(text, add_special_tokens=False)
            if len(enc) == 1 and enc[0] in special:
                ids += [] if enc[0] in ids else [enc[0]]
            else:
                strings.append(text)
        if len(strings) == len(params.stop_strings):
            return params
        return dataclasses.replace(params, stop_strings=tuple(strings), stop_token_ids=tuple(ids))

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        ids = [] if params.ignore_eos else list(self.eos_token_ids)
        return ids + [t for t in params.stop_token_ids if t not in ids]

    # ----- static state, buffers and graphs -------------------------------------------------

    def release(self):
        """Free the decode state, buffers and graphs (the next generate() allocates them again)."""
        self._state = self._state_key = self._buf = None
        self._views, self._graphs, self._graph_pool = {}, {}, None
        self.capture_s = 0.0  # seconds spent capturing CUDA graphs for the current state
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ensure_state(self, slots: int, seqlen: int, width: int):
        key = self._state_key
        if key is not None and key[0] >= slots and key[1] >= seqlen and key[2] >= width:
            return
        if key is not None:  # grow to cover both the old and the new need, so alternating calls don't thrash
            slots, seqlen, width = max(slots, key[0]), max(seqlen, key[1]), max(width, key[2])
        self.release()
        # the extra slots (indices slots .. slots + templates - 1) hold prefilled prompts for later forks
        templates = self.template_slots or max(1, min(64, slots // 16))
        self._state = self.model.allocate_decode_state(slots + templates, seqlen, device=self.device)
        self._buf = _Buffers(slots, width, self.device)
        self._views = {b: narrow_state(self._state, slots + templates, b) for b in self.buckets if b <= slots}
        self._state_key = (slots, seqlen, width, templates)

    def _step(self, b: int, greedy: bool, top_k: int, use_top_p: bool):
        """One token for slots [0, b): static shapes, no host sync (the body of the CUDA graph)."""
        buf, view = self._buf, self._views[b]
        done = buf.done[:b]
        view.seqlens.masked_fill_(done, 0)  # idle slots restart at position 0 so they never run off the cache
        logits = self.model.decode_step(buf.tokens[:b], view, **self._decode_kwargs)
        if greedy:
            nxt = greedy_next(logits)
        else:
            nxt = sample_next(logits, buf.keys[:b], buf.gen_count[:b], buf.temperature, top_k,
                              buf.top_p if use_top_p else None)
        gen_count = buf.gen_count[:b]
        buf.out[:b].scatter_(1, gen_count.long().unsqueeze(1), nxt.to(torch.int32).unsqueeze(1))
        active = ~done
        gen_count.add_(active.to(torch.int32))
        hit_stop = (nxt.unsqueeze(1) == buf.stop_ids.unsqueeze(0)).any(1) & active
        done.logical_or_(hit_stop | (gen_count >= buf.budget[:b]))
        buf.tokens[:b].copy_(nxt)

    def _capture(self, key):
        """Capture the step for every bucket. Only called while every slot is idle (between runs):
        warm-up and capture advance idle slots only, whose state is never read."""
        t0 = time.perf_counter()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in self._views:
                for _ in range(2):
                    self._step(b, *key)
        torch.cuda.current_stream().wait_stream(stream)
        for b in sorted(self._views, reverse=True):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self._step(b, *key)
            self._graphs[(b,) + key] = graph
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - t0

    def _run_steps(self, b: int, key, steps: int):
        graph = self._graphs.get((b,) + key) if self.use_cuda_graphs else None
        for _ in range(steps):
            if graph is not None:
                graph.replay()
            else:
                self._step(b, *key)

    # ----- generation -----------------------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, num_samples: int, max_prompt_len: int, params: SamplingParams) -> tuple:
        """Allocate the state for a run of this shape and capture its CUDA graphs (generate() calls it;
        call it yourself to keep allocation and capture out of a timed run). Returns the step's key."""
        slots = next(b for b in self.buckets if b >= min(self.max_batch_size, num_samples))
        seqlen = min(self.max_len, _round_up(max_prompt_len + params.max_new_tokens, 64))
        self._ensure_state(slots, seqlen, _round_up(params.max_new_tokens, 64))
        buf = self._buf
        buf.done.fill_(True)  # every slot idle (a run interrupted by an error may have left some active)
        stop_ids = self._stop_ids(params)
        buf.stop_ids.fill_(-1)
        if stop_ids:
            buf.stop_ids[: len(stop_ids)] = torch.tensor(stop_ids, device=self.device)
        greedy = params.temperature == 0
        if not greedy:
            buf.temperature.fill_(params.temperature)
            buf.top_p.fill_(params.top_p)
        key = (greedy, 0 if greedy else params.top_k, (not greedy) and params.top_p < 1.0)
        if self.use_cuda_graphs and (max(self._views),) + key not in self._graphs:
            self._capture(key)
        return key

    @torch.inference_mode()
    def generate(self, prompts, params: SamplingParams | None = None, n: int = 1, seed: int = 0,
                 progress: bool = False) -> list[list[Completion]]:
        """`n` samples for each prompt; returns outs[prompt][sample] (see the module docstring)."""
        if self.device.type != "cuda":
            return self._generate(prompts, params, n, seed, progress)
        # streams, graph capture and replay act on the *current* device: make it the model's (cuda:1 in a
        # data-parallel process whose current device is still cuda:0)
        with torch.cuda.device(self.device):
            return self._generate(prompts, params, n, seed, progress)

    def _generate(self, prompts, params, n, seed, progress) -> list[list[Completion]]:
        params = self._special_stop_strings(params or SamplingParams())
        prompt_ids = self._validate(prompts, params, n)
        t_start = time.perf_counter()
        self.stats = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "host_s": 0.0, "finish_s": 0.0,
                      "prefill_calls": 0, "prefilled_prompts": 0, "prefill_tokens": 0,
                      "fork_s": 0.0, "fork_calls": 0, "forked_slots": 0}
        num_samples = len(prompt_ids) * n
        key = self.prepare(num_samples, max(len(p) for p in prompt_ids), params)
        slots, seqlen, _, templates = self._state_key
        greedy = key[0]
        sched = _Schedule(pending=deque(range(len(prompt_ids))), free_templates=list(range(slots, slots + templates)),
                          refill_min=self.refill_min_free or max(1, slots // 8))
        buf = self._buf
        stop_ids = self._stop_ids(params)
        stop_id_set = set(stop_ids)

        outs: list[list[Completion | None]] = [[None] * n for _ in prompt_ids]
        slot_sample: list[tuple[int, int] | None] = [None] * slots
        checked = [0] * slots  # tokens of the slot already scanned for stop strings
        slot_count = [0] * slots   # tokens generated per slot, as of the last look
        slot_budget = [0] * slots  # max tokens of the slot's sample
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=num_samples, desc="generate", unit="sample")
        generated = 0
        b_cur = 0
        unfinished: list[tuple[int, int, list[int]]] = []  # (prompt, sample, tokens) collected, text not made yet

        while True:
            t_host = time.perf_counter()
            # 1. collect finished samples
            if b_cur:
                status = (buf.gen_count[:b_cur] * 2 + buf.done[:b_cur]).cpu().tolist()
                counts = [s >> 1 for s in status]
                done = [bool(s & 1) for s in status]
                slot_count[:b_cur] = counts
                if params.stop_strings:
                    self._scan_stop_strings(params, slot_sample, counts, done, checked, b_cur)
                finished = [s for s in range(b_cur) if slot_sample[s] is not None and done[s]]
                if finished:
                    rows = buf.out[torch.tensor(finished, device=self.device)].cpu().tolist()
                    for s, row in zip(finished, rows):
                        i, j = slot_sample[s]
                        unfinished.append((i, j, row[: counts[s]]))
                        slot_sample[s] = None
            # 2. refill free slots with pending samples
            free = [s for s in range(slots) if slot_sample[s] is None]
            if free and (sched.pending or sched.queue):
                self._refill(free, sched, prompt_ids, n, seed, params, seqlen,
                             slot_sample, checked, slot_count, slot_budget, greedy, key)
            active = [s for s in range(slots) if slot_sample[s] is not None]
            if not active:
                generated += self._finish_all(unfinished, outs, stop_id_set, params, bar)
                break
            # 3. shrink to a smaller bucket when the tail of a run no longer fills this one
            b_need = next(b for b in self.buckets if b >= len(active))
            if not sched.pending and not sched.queue and b_need < max(active) + 1:
                movers = [s for s in active if s >= b_need]
                holes = [s for s in range(b_need) if slot_sample[s] is None][: len(movers)]
                self._state.copy_slots(torch.tensor(movers, device=self.device), torch.tensor(holes, device=self.device))
                buf.move_rows(movers, holes)
                for src, dst in zip(movers, holes):
                    slot_sample[dst], slot_sample[src] = slot_sample[src], None
                    checked[dst], slot_count[dst], slot_budget[dst] = checked[src], slot_count[src], slot_budget[src]
                active = sorted(holes + [s for s in active if s < b_need])
            b_cur = next(b for b in self.buckets if b >= max(active) + 1)
            self.stats["host_s"] += time.perf_counter() - t_host
            # 4. decode sync_every tokens without looking (fewer if every sample ends sooner)
            steps = max(1, min(self.sync_every, max(slot_budget[s] - slot_count[s] for s in active)))
            t0 = time.perf_counter()
            self._run_steps(b_cur, key, steps)
            t_launched = time.perf_counter()
            # the steps run on the GPU (graph replays return at once) while the host turns the samples finished at
            # this look into text: ~70 tokenizer decodes per look at 1024 slots, serialised with the GPU before
            generated += self._finish_all(unfinished, outs, stop_id_set, params, bar)
            t_finished = time.perf_counter()
            self.stats["finish_s"] += t_finished - t_launched
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                self.stats["decode_s"] += time.perf_counter() - t0       # the decode window, text-making inside it
            else:
                self.stats["decode_s"] += t_launched - t0                 # CPU: the steps ran before the text
            self.stats["decode_steps"] += steps
        if bar is not None:
            bar.close()
        self.stats["wall_s"] = time.perf_counter() - t_start
        self.stats["generated_tokens"] = generated
        self.stats["batch_slots"] = slots
        return outs

    def _refill(self, free, sched: "_Schedule", prompt_ids, n, seed, params, seqlen,
                slot_sample, checked, slot_count, slot_budget, greedy, key):
        """Assign pending samples to free slots: fork prompts waiting in template slots, prefill new prompts
        (in token-bounded chunks) when a call is worth it, and draw each new sample's first token from its
        prompt's last-token logits."""
        buf, dev = self._buf, self.device
        assigned: list[tuple[int, int, int, int | None]] = []  # (slot, prompt, sample, logits source)
        sources: list[torch.Tensor] = []  # logits rows, indexed by "logits source"
        fork_src, fork_dst = [], []
        free = list(free)
        # 1. prompts already prefilled into template slots, oldest first: only copies, no model call
        while free and sched.queue and sched.queue[0].logits is not None:
            entry = sched.queue[0]
            sources.append(entry.logits)
            k = min(n - entry.next_sample, len(free))
            for j in range(entry.next_sample, entry.next_sample + k):
                slot = free.pop(0)
                fork_src.append(entry.slot)
                fork_dst.append(slot)
                assigned.append((slot, entry.prompt, j, len(sources) - 1))
            entry.next_sample += k
            if entry.next_sample == n:
                sched.queue.popleft()
                sched.free_templates.append(entry.slot)
        if fork_src:
            # before any prefill below: a template slot freed here may receive a new prompt in this same call
            self._fork(fork_src, fork_dst)
            fork_src, fork_dst = [], []
        # 2. new prompts, only when a (costly, un-graphed) prefill call serves enough samples: `refill_min`
        # free slots, or the last pending samples all fit, or nothing else would decode
        busy = any(s is not None for s in slot_sample) or assigned
        worth = (len(free) >= sched.refill_min or len(sched.pending) * n <= len(free) or not busy)
        to_prefill: list[tuple[int, int]] = []  # (prompt, slot)
        if free and sched.pending and worth:
            # all n samples fit -> prefill into the first sample's slot and fork from there;
            # otherwise prefill into a template slot and fork what fits now
            while free and sched.pending:
                i = sched.pending[0]
                if n <= len(free):
                    sched.pending.popleft()
                    first = free.pop(0)
                    to_prefill.append((i, first))
                    assigned.append((first, i, 0, None))  # None: this prompt's prefill row, filled in below
                    for j in range(1, n):
                        slot = free.pop(0)
                        fork_src.append(first)
                        fork_dst.append(slot)
                        assigned.append((slot, i, j, None))
                elif sched.free_templates:
                    sched.pending.popleft()
                    entry = _Template(i, sched.free_templates.pop(0), next_sample=len(free))
                    sched.queue.append(entry)
                    to_prefill.append((i, entry.slot))
                    for j in range(len(free)):
                        slot = free.pop(0)
                        fork_src.append(entry.slot)
                        fork_dst.append(slot)
                        assigned.append((slot, i, j, None))
                else:
                    break
            # prefill ahead into the remaining template slots: their samples then start without a call
            while n > 1 and sched.pending and sched.free_templates:
                entry = _Template(sched.pending.popleft(), sched.free_templates.pop(0), next_sample=0)
                sched.queue.append(entry)
                to_prefill.append((entry.prompt, entry.slot))
        if to_prefill:
            prompt_source = {}
            for chunk in self._chunks(to_prefill, prompt_ids):
                logits = self._prefill_call(chunk, prompt_ids)
                for r, (i, _) in enumerate(chunk):
                    sources.append(logits[r])
                    prompt_source[i] = len(sources) - 1
            for entry in sched.queue:
                if entry.logits is None:
                    entry.logits = sources[prompt_source[entry.prompt]].clone()
            assigned = [(slot, i, j, src if src is not None else prompt_source[i])
                        for slot, i, j, src in assigned]
            if fork_src:
                self._fork(fork_src, fork_dst)
        if not assigned:
            return
        slots_t = torch.tensor([a[0] for a in assigned], device=dev)
        logits = torch.stack(sources)[torch.tensor([a[3] for a in assigned], device=dev)]
        keys = torch.tensor([sample_key(seed, i * n + j) for _, i, j, _ in assigned], dtype=torch.long, device=dev)
        budgets = torch.tensor([min(params.max_new_tokens, seqlen - len(prompt_ids[i])) for _, i, _, _ in assigned],
                               dtype=torch.int32, device=dev)
        if greedy:
            first = greedy_next(logits)
        else:
            first = sample_next(logits, keys, torch.zeros_like(keys), buf.temperature, key[1],
                                buf.top_p if key[2] else None)
        stop = (first.unsqueeze(1) == buf.stop_ids.unsqueeze(0)).any(1)
        buf.tokens[slots_t] = first
        buf.out[slots_t, 0] = first.to(torch.int32)
        buf.gen_count[slots_t] = 1
        buf.budget[slots_t] = budgets
        buf.keys[slots_t] = keys
        buf.done[slots_t] = stop | (budgets <= 1)
        for (slot, i, j, _), budget in zip(assigned, budgets.tolist()):
            slot_sample[slot] = (i, j)
            checked[slot] = 0
            slot_count[slot] = 1
            slot_budget[slot] = budget

    def _prefill_call(self, chunk, prompt_ids) -> torch.Tensor:
        """Prefill `chunk` [(prompt, slot)] in one model call; last-token logits [len(chunk), vocab]. Out of GPU
        memory with more than one prompt, the call is split in two and `prefill_tokens` halved for the rest of the
        engine's life (a prefill stores states only after its last layer, so a failed call left none behind)."""
        dev = self.device
        t0 = time.perf_counter()
        try:
            logits = self.model.prefill(
                [torch.tensor(prompt_ids[i], dtype=torch.long, device=dev) for i, _ in chunk],
                self._state, torch.tensor([s for _, s in chunk], device=dev))
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            logits = None        # retried below, once the traceback (and the failed call's tensors) is gone
        if logits is None:
            tokens = sum(len(prompt_ids[i]) for i, _ in chunk)
            self.prefill_tokens = max(1, min(self.prefill_tokens, tokens) // 2)
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            import warnings

            warnings.warn(f"prefill of {len(chunk)} prompts ({tokens} tokens) ran out of GPU memory; splitting it, "
                          f"prefill_tokens={self.prefill_tokens} from now on")
            half = len(chunk) // 2
            return torch.cat([self._prefill_call(chunk[:half], prompt_ids), self._prefill_call(chunk[half:], prompt_ids)])
        if dev.type == "cuda":
            torch.cuda.synchronize()
        self.stats["prefill_s"] += time.perf_counter() - t0
        self.stats["prefill_calls"] += 1
        self.stats["prefilled_prompts"] += len(chunk)
        self.stats["prefill_tokens"] += sum(len(prompt_ids[i]) for i, _ in chunk)
        return logits

    def _fork(self, src: list[int], dst: list[int]):
        """Copy the states of slots `src` into slots `dst`: one batched `copy_slots` for every fork of a refill
        step (an index_select + index_copy per state tensor, whatever the number of slots)."""
        t0 = time.perf_counter()
        self._state.copy_slots(torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stats["fork_s"] += time.perf_counter() - t0
        self.stats["fork_calls"] += 1
        self.stats["forked_slots"] += len(dst)

    def _chunks(self, to_prefill, prompt_ids):
        chunk, tokens = [], 0
        for item in to_prefill:
            length = len(prompt_ids[item[0]])
            if chunk and tokens + length > self.prefill_tokens:
                yield chunk
                chunk, tokens = [], 0
            chunk.append(item)
            tokens += length
        if chunk:
            yield chunk

    # ----- stop strings and outputs ---------------------------------------------------------

    def _scan_stop_strings(self, params, slot_sample, counts, done, checked, b_cur):
        """Stop slots whose newly decoded text contains a stop string (decodes only the new tokens
        plus a few before them, so a string split across the boundary is still seen)."""
        live = [s for s in range(b_cur) if slot_sample[s] is not None and not done[s] and counts[s] > checked[s]]
        if not live:
            return
        width = max(counts[s] for s in live)
        rows = self._buf.out[torch.tensor(live, device=self.device), :width].cpu().tolist()
        overlap = max(len(s) for s in params.stop_strings) + 4
        windows = [row[max(0, checked[s] - overlap): counts[s]] for s, row in zip(live, rows)]
        texts = self.tokenizer.batch_decode(windows, skip_special_tokens=True)
        hits = []
        for s, text in zip(live, texts):
            checked[s] = counts[s]
            if any(stop in text for stop in params.stop_strings):
                hits.append(s)
                done[s] = True
        if hits:
            self._buf.done[torch.tensor(hits, device=self.device)] = True

    def _finish_all(self, unfinished, outs, stop_ids: set, params: SamplingParams, bar) -> int:
        """Make the Completions of the collected samples (emptying `unfinished`); returns their token count."""
        tokens = 0
        for i, j, row in unfinished:
            outs[i][j] = self._finish(row, stop_ids, params)
            tokens += outs[i][j].num_tokens
        if bar is not None and unfinished:
            bar.update(len(unfinished))
        unfinished.clear()
        return tokens

    def _finish(self, tokens: list[int], stop_ids: set, params: SamplingParams) -> Completion:
        reason = "length"
        body = tokens
        if tokens and tokens[-1] in stop_ids:
            reason, body = "stop", tokens[:-1]
        if self.tokenizer is None:
            return Completion("", tokens, reason, len(tokens))
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        if params.stop_strings:
            cut = min((p for p in (text.find(s) for s in params.stop_strings) if p >= 0), default=-1)
            if cut >= 0:
                # fewest tokens whose text contains a stop string
                lo, hi = 1, len(body)
                while lo < hi:
                    mid = (lo + hi) // 2
                    prefix = self.tokenizer.decode(body[:mid], skip_special_tokens=True)
                    if any(s in prefix for s in params.stop_strings):
                        hi = mid
                    else:
                        lo = mid + 1
                tokens, text, reason = body[:lo], text[:cut], "stop"
        return Completion(text, list(tokens), reason, len(tokens))
