"""lm-eval backends `llamba`, `mambainllama` and `thinkfast` (any checkpoint thinkfast loads, the Llama teacher too).

    lm_eval --model thinkfast --model_args pretrained=ckpt/teacher,dtype=bfloat16 \
        --tasks math500_bon --apply_chat_template --batch_size auto --log_samples --output_path runs/
    lm_eval --model llamba --model_args pretrained=ckpt/llamba --tasks my_mc_task --device cpu --limit 20

Several GPUs, data parallel (each process takes every world_size-th document, as with lm-eval's `hf` model):
    accelerate launch --multi_gpu --num_processes 8 -m lm_eval --model thinkfast \
        --model_args pretrained=ckpt/mil50 --tasks math500_bon --apply_chat_template --batch_size auto
Several CPU processes (what the tests run): ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m lm_eval ...

Thin subclasses of lm-eval's HFLM, in the style of lm-eval's `mamba_ssm` backend: HFLM keeps tokenisation, chat
templates (`--apply_chat_template`, `tokenizer_name`, `chat_template`), the accelerate rank / world-size set-up and
batched loglikelihood / loglikelihood_rolling on the model's forward (fp32 on CPU by default). What changes:
  * the model is loaded by `harness_ext.models.load_model` (Llamba, MambaInLlama, or a Llama teacher run as
    MambaInLlama with every layer attention), so all three decode on the same engine;
  * `generate_until` runs on `harness_ext.generation.engine.Engine`: requests with the same context and
    gen_kwargs (lm-eval's `repeats` makes N identical ones) become one prompt x N samples, so the prompt is
    prefilled once and its state forked into N decode slots.
`--batch_size` is the engine's number of concurrent sequences for generation and the forward batch for
loglikelihood; `auto` sizes the engine from free GPU memory and the decode state of one sequence (64 on CPU),
and uses HFLM's search for loglikelihood. Generation is timed for the leaderboards' time-budget plots
(`config.thinkfast_generation` in the results: seconds, tokens, samples, the engine's time split); on CUDA an untimed
warm-up first compiles the kernels and captures the CUDA graphs (`warmup=false|true` overrides).
"""
from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import time
from collections import OrderedDict

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

import harness_ext  # noqa: F401  (registers the thinkfast configs/models with transformers' Auto classes)

log = logging.getLogger(__name__)

# HFLM arguments that make no sense here (thinkfast loads its own checkpoints on one device per process)
_UNSUPPORTED = ("parallelize", "tp_plan", "peft", "delta", "autogptq", "gptqmodel", "gguf_file",
                "max_memory_per_gpu", "max_cpu_memory", "offload_folder", "backend")
_ACCEPTED = ("pretrained", "device", "dtype", "batch_size", "max_batch_size", "seed", "use_cuda_graphs", "warmup",
             "ssm_state_dtype",
             "max_length", "tokenizer", "add_bos_token", "prefix_token_id", "truncation", "logits_cache",
             "softmax_dtype", "mixed_precision_dtype", "use_fast_tokenizer", "revision", "subfolder",
             "think_end_token", "enable_thinking", "chat_template_args",
             "trust_remote_code")  # trust_remote_code: accepted (lm-eval's --trust_remote_code sets it), never needed
_AUTO_BATCH_CPU = 64
_AUTO_BATCH_MAX = 1024


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]


def _destroy_process_group() -> None:
    """lm-eval leaves the process group that accelerate set up alive at exit. Gloo's worker threads then die during
    interpreter finalisation, which aborts a rank now and then (SIGABRT, "terminate called without an active
    exception") after its results were sent; tearing the group down while Python is still whole avoids that."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class ThinkfastLM(HFLM):
    """Any checkpoint `harness_ext.models.load_model` loads: Llamba, MambaInLlama, or a Llama teacher."""

    MODEL_NAME = "thinkfast"
    MODEL_TYPES: tuple[str, ...] | None = None  # config.model_type values accepted; None: any

    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = "auto",
                 batch_size: int | str | None = 1, max_batch_size: int | None = None, seed: int = 0,
                 use_cuda_graphs: bool | None = None, warmup: bool | str | None = None,
                 ssm_state_dtype: str | None = None, **kwargs) -> None:
        unknown = sorted(k for k in kwargs if k not in _ACCEPTED)
        if unknown:
            bad = ", ".join(repr(k) for k in unknown)
            hint = " (not supported by thinkfast backends)" if set(unknown) & set(_UNSUPPORTED) else ""
            raise ValueError(f"--model {self.MODEL_NAME}: unknown model argument(s) {bad}{hint}; "
                             f"accepted: {', '.join(_ACCEPTED)}")
        if not pretrained or not isinstance(pretrained, str):
            raise ValueError(f"--model {self.MODEL_NAME} needs --model_args pretrained=<checkpoint directory or hub id>")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                log.warning("device %s requested but CUDA is not available: using cpu", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._seed = int(seed)
        self._use_cuda_graphs = use_cuda_graphs
        if ssm_state_dtype is not None:  # checked before any loading
            from harness_ext.models.runtime import state_dtype
            try:
                state_dtype(ssm_state_dtype)
            except ValueError as exc:
                raise ValueError(f"--model {self.MODEL_NAME}: {exc}") from None
        self._ssm_state_dtype = ssm_state_dtype
        # warm-up (default on CUDA): kernel compilation / autotuning and CUDA-graph capture happen once per
        # process, before the timed generation, so the reported generation time is the steady state's
        self._warmup = None if warmup is None else str(warmup).lower() in ("1", "true", "yes", "on")
        self._warm: set = set()
        self._engines: OrderedDict = OrderedDict()
        self._generate_calls = 0
        # generation alone, for the time-budget plots (lm-eval's own timing includes loading and scoring)
        self._generation = {"wall_clock_seconds": 0.0, "generated_tokens": 0, "num_samples": 0,
                            "warmup_seconds": 0.0}
        self._user_max_batch_size = max_batch_size
        super().__init__(pretrained=pretrained, backend="causal", device=device, dtype=dtype,
                         batch_size=batch_size if batch_size is not None else 1,
                         max_batch_size=max_batch_size or 64, **kwargs)
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self.world_size == 1:
            # HFLM turns on data parallelism only when it sees several GPUs; processes on CPU (torchrun, or
            # accelerate with MULTI_CPU) would otherwise each evaluate every document
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            atexit.unregister(_destroy_process_group)  # one hook however many backends a process builds
            atexit.register(_destroy_process_group)

    # ------------------------------------------------------------------ loading

    def _get_config(self, pretrained: str, **kwargs) -> None:
        local = os.path.expanduser(pretrained)
        looks_local = pretrained.startswith((".", "/", "~")) or os.path.isdir(local) or pretrained.count("/") > 1
        if looks_local and not os.path.isdir(local):
            raise FileNotFoundError(f"--model {self.MODEL_NAME}: checkpoint directory {pretrained!r} does not exist")
        if os.path.isdir(local) and not os.path.isfile(os.path.join(local, "config.json")):
            raise FileNotFoundError(f"--model {self.MODEL_NAME}: {pretrained!r} has no config.json "
                                    f"(expected a save_pretrained checkpoint)")
        try:
            super()._get_config(local if os.path.isdir(local) else pretrained, **kwargs)
        except (OSError, ValueError) as exc:
            raise OSError(f"--model {self.MODEL_NAME}: cannot load the config of {pretrained!r}: neither a local "
                          f"checkpoint nor reachable on the hub ({exc})") from exc
        model_type = getattr(self._config, "model_type", None)
        if self.MODEL_TYPES is not None and model_type not in self.MODEL_TYPES:
            raise ValueError(f"--model {self.MODEL_NAME}: {pretrained!r} is a {model_type!r} checkpoint, not "
                             f"{' / '.join(self.MODEL_TYPES)}; use --model thinkfast for any thinkfast checkpoint")

    def _create_model(self, pretrained: str, dtype="auto", **kwargs) -> None:
        from harness_ext.models import load_model

        # kwargs: HFLM's own loading options (parallelize, peft, ...), left at their defaults by __init__'s check
        self._model = load_model(os.path.expanduser(pretrained), device=self.device,
                                 dtype=_resolve_dtype(dtype, self.device), ssm_state_dtype=self._ssm_state_dtype)
        self._model.eval()

    def get_model_info(self) -> dict:
        return {"model_num_parameters": sum(p.numel() for p in self._model.parameters()),
                "model_dtype": str(next(self._model.parameters()).dtype),
                "model_type": getattr(self._model.config, "model_type", None),
                "ssm_state_dtype": getattr(self._model.config, "ssm_state_dtype", None),
                "model_revision": self.revision, "model_sha": "",
                "thinkfast_generation": {**self._generation,
                                         "wall_clock_seconds": round(self._generation["wall_clock_seconds"], 3)}}

    # ------------------------------------------------------------------ generation

    def _engine_batch_size(self, max_seqlen: int) -> int:
        if self.batch_size != "auto":
            return max(1, int(self.batch_size))
        if self.device.type != "cuda":
            size = _AUTO_BATCH_CPU
        else:
            from harness_ext.generation.engine import state_nbytes

            state = self.model.allocate_decode_state(1, max_seqlen, device=self.device)
            per_sequence = state_nbytes(state)
            del state
            free, _ = torch.cuda.mem_get_info(self.device)
            size = int(0.8 * free // max(per_sequence, 1))
            size = 1 << max(0, min(size, _AUTO_BATCH_MAX).bit_length() - 1)  # a power of two for CUDA graphs
        if self._user_max_batch_size:
            size = min(size, int(self._user_max_batch_size))
        return max(1, size)

    def _warm_up(self, engine, token_prompts, params, n: int) -> None:
        """Untimed: allocate the run's state and capture its graphs (`Engine.prepare`), then generate two tokens
        for one short prompt, which compiles (and autotunes) the prefill and fork kernels. Once per engine and
        sampling mode (greedy, top-k, top-p: what its graphs are keyed by); its seconds are reported apart (thinkfast_generation.warmup_seconds)."""
        enabled = self._warmup if self._warmup is not None else self.device.type == "cuda"
        key = (params.temperature == 0, params.top_k, params.top_p < 1.0)  # the engine's CUDA-graph key
        if not enabled or key in self._warm:
            return
        t0 = time.perf_counter()
        engine.prepare(n * len(token_prompts), max(len(p) for p in token_prompts), params)
        engine.generate([token_prompts[0][-16:]], dataclasses.replace(params, max_new_tokens=2, stop_strings=()),
                        n=min(n, 2), seed=0)
        self._warm.add(key)
        self._generation["warmup_seconds"] = round(self._generation["warmup_seconds"] + time.perf_counter() - t0, 3)

    def _add_engine_stats(self, stats: dict) -> None:
        """Sum the engine's time split (prefill / decode / fork / host seconds, steps, calls) over generate calls:
        where generation time goes, reported with the results (config.thinkfast_generation.engine)."""
        total = self._generation.setdefault("engine", {})
        for name, value in stats.items():
            if name == "batch_slots":
                total[name] = max(total.get(name, 0), int(value))
            elif isinstance(value, (int, float)):
                total[name] = round(total.get(name, 0) + value, 3)
        log.info("engine: %s", ", ".join(f"{k}={v}" for k, v in sorted(stats.items())))

    def _engine(self, batch_size: int):
        from harness_ext.generation.engine import Engine

        if batch_size not in self._engines:
            self._engines.clear()  # one engine (and its static state / CUDA graphs) at a time
            self._warm.clear()  # the new engine warms up afresh
            self._engines[batch_size] = Engine(self.model, self.tokenizer, max_batch_size=batch_size,
                                               use_cuda_graphs=self._use_cuda_graphs)
        return self._engines[batch_size]

    def _stop_token_ids(self) -> tuple[int, ...]:
        ids = {self.eot_token_id}
        generation_config = getattr(self.model, "generation_config", None)
        extra = getattr(generation_config, "eos_token_id", None)
        if isinstance(extra, int):
            ids.add(extra)
        elif isinstance(extra, (list, tuple)):
            ids.update(int(i) for i in extra)
        return tuple(sorted(i for i in ids if i is not None))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from harness_ext.generation.engine import SamplingParams

        # (context, gen_kwargs) -> indices of the requests asking for it; repeats give N identical requests
        groups: OrderedDict = OrderedDict()
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            key = (context, repr(sorted(gen_kwargs.items())))
            groups.setdefault(key, (gen_kwargs, []))[1].append(index)
        # one engine call per (gen_kwargs, samples per prompt)
        calls: OrderedDict = OrderedDict()
        for (context, kwargs_key), (gen_kwargs, indices) in groups.items():
            calls.setdefault((kwargs_key, len(indices)), (gen_kwargs, []))[1].append((context, indices))

        results: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode(self.eot_token_id, skip_special_tokens=False)
        pbar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="Running generate_until requests")
        for (_, n), (gen_kwargs, prompts) in calls.items():
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new_tokens = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            top_p = float(kwargs.pop("top_p", 1.0) or 1.0)
            top_k = int(kwargs.pop("top_k", 0) or 0)
            if kwargs:
                log.warning("generate_until: ignoring unsupported gen_kwargs %s", sorted(kwargs))
            max_context = self.max_length - max_new_tokens
            if max_context <= 0:
                raise ValueError(f"max_gen_toks={max_new_tokens} leaves no room for the prompt within "
                                 f"max_length={self.max_length}; pass --model_args max_length=...")
            token_prompts = [self.tok_encode(context, left_truncate_len=max_context) for context, _ in prompts]
            longest = max(len(p) for p in token_prompts) + max_new_tokens
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    top_k=top_k, stop_token_ids=self._stop_token_ids(),
                                    stop_strings=tuple(s for s in until if s))
            batch = self._engine_batch_size(longest)
            if batch == 1 and n * len(prompts) > 1:
                log.warning("generate_until: decoding %d sequences one at a time (--batch_size 1, lm-eval's default); "
                            "pass --batch_size auto or a number to decode them together", n * len(prompts))
            engine = self._engine(batch)
            # a different, reproducible seed per call and per data-parallel rank
            seed = self._seed + 1_000_003 * self._generate_calls + 7919 * self.rank
            self._generate_calls += 1
            self._warm_up(engine, token_prompts, params, n)
            started = time.perf_counter()
            outputs = engine.generate(token_prompts, params, n=n, seed=seed,
                                      progress=not disable_tqdm and self.rank == 0)
            self._generation["wall_clock_seconds"] += time.perf_counter() - started
            self._generation["generated_tokens"] += sum(c.num_tokens for group in outputs for c in group)
            self._generation["num_samples"] += sum(len(group) for group in outputs)
            self._add_engine_stats(engine.stats)
            for (context, indices), completions in zip(prompts, outputs, strict=True):
                for index, completion in zip(indices, completions, strict=True):
                    text = postprocess_generated_text(completion.text, stop=until, think_end_token=None)
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                pbar.update(len(indices))
        pbar.close()
        return results  # type: ignore[return-value]


class LlambaLM(ThinkfastLM):
    """Llamba checkpoints only (pure Mamba-2 students)."""

    MODEL_NAME = "llamba"
    MODEL_TYPES = ("llamba",)


class MambaInLlamaLM(ThinkfastLM):
    """MambaInLlama checkpoints only (hybrid attention / Mamba-2 students)."""

    MODEL_NAME = "mambainllama"
    MODEL_TYPES = ("mambainllama",)
