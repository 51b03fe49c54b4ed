"""Token-budget trainer for one distillation stage: one GPU, several through torchrun (DDP), or CPU.

    trainer = Trainer(objective, teacher, stream, cfg, stage_dir, eval_batches=heldout)
    result = trainer.train()          # resumes from stage_dir's latest checkpoint if there is one

    torchrun --nproc_per_node 2 -m harness_ext.cli distill --recipe mambainllama --teacher T --out O

bf16 autocast on CUDA (fp32 master weights; fp32 on CPU), AdamW (fused on CUDA), linear warmup then cosine to
`min_lr_ratio * lr`, gradient clipping and accumulation. Step s reads global rows [s*G, (s+1)*G) of the packed
stream (G = micro_batch_size * grad_accum * world_size), rank r the r-th slice, so the data order depends only on
the seed and the step: a resumed run replays exactly what the killed run would have seen.

Checkpoints are HF directories (`save_pretrained`) written atomically: into a temporary directory in the same
parent, fsynced, then renamed to `checkpoint-<step>`; `latest` (a file naming it) is replaced atomically after.
Each holds `trainer_state.json` (step, tokens, data cursor, RNG states) and `optimizer.pt` (optimizer + scheduler).

Throughput (issue #5): the KD loss is chunked from hidden states (`distill.kd.chunked_kd_loss`), the teacher runs
under no_grad without its lm_head, `compile` (default: on for CUDA) torch.compiles regions of the student and the
teacher (`compile_regions`; a failing compile falls back to eager with a warning after a probe step), and
`grad_checkpointing` recomputes decoder layers in the backward when memory, not compute, bounds the micro-batch.
MFU accounting is `training_flops_per_token` (documented there); each JSONL record carries `mfu`, `tflops`,
`flops_per_token`, `peak_flops` and `max_mem_gb`; on packed data also `doc_attention_frac` (the share of causal
attention pairs inside documents, `within_document_attention`) and `mfu_within_docs` (MFU with the attention term cut
to those pairs).

The loop does not sync with the host between logging points: the loss and a "first non-finite step" marker
accumulate on the device and are read every `log_every` steps (and before every save). A NaN/inf loss stops the
run with NonFiniteLossError naming the step; no checkpoint is written after it, so the last one is good.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from distill.kd import DEFAULT_CHUNK_TOKENS, agreement_stats, model_forward

# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, matched against torch.cuda.get_device_name().
# Override with THINKFAST_PEAK_FLOPS. Most specific names first.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("B100", 1750e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12),
    ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12),
]


class NonFiniteLossError(RuntimeError):
    pass


@dataclasses.dataclass
class StageConfig:
    name: str
    objective: str = "kd"  # kd | sft | mohawk_matrix | mohawk_hidden
    max_tokens: int = 1_000_000
    seq_len: int = 2048
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_frac: float = 0.05
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    divergence: str = "reverse_kl"
    temperature: float = 1.0
    ce_weight: float = 0.0
    trainable: str = "all"  # all | mixers | no_mlp
    log_every: int = 10
    save_every: int = 200  # steps; rounded up to a multiple of log_every
    keep_checkpoints: int = 2
    compile: bool | None = None  # None: on for CUDA (falls back to eager with a warning if it fails)
    compile_mode: str = "regional"  # regional | layers (see compile_regions)
    grad_checkpointing: bool = False
    teacher_attn: str | None = None  # KD stages: the HF teacher's attn_implementation, e.g. flex_attention
    student_attn: str | None = None  # sdpa | varlen | flex: the students' packed attention (None: $THINKFAST_TRAIN_ATTN)
    train_scan: str | None = None    # eager | graph: the SSD scan in training (None: $THINKFAST_TRAIN_SCAN)
    chunked_loss: bool = True  # False: the full-logit reference loss (kd_loss_ref)
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    seed: int = 0


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("THINKFAST_PEAK_FLOPS"):
        return float(os.environ["THINKFAST_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def matmul_params(model) -> int:
    """Weights that cost 2 FLOPs per token each in the forward: every nn.Linear (the lm_head included, counted once
    whether or not it is tied to the input embedding; the embedding lookup itself is free)."""
    seen, n = set(), 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            n += module.weight.numel()
    return n


def _decoder_layers(model):
    return getattr(getattr(model, "model", None), "layers", None) or []


def sequence_mixing_flops(model, seq_len: int, attention_only: bool = False) -> int:
    """Forward FLOPs per token that parameters do not count: attention scores and values, and the SSD scan.

    Attention layer (H query heads of d): QK^T and PV are 2 * H * d FLOPs per key each; a causal token sees on
    average (L + 1) / 2 keys, so 2 * H * d * (L + 1) per token: causal attention over the whole context, whatever
    the packing. That is half of what the PaLM / Megatron convention counts (every key of the context). It is not
    the work the kernels do on packed documents: SDPA with a dense block-diagonal mask does the full L x L, and
    FlexAttention's document block mask skips the blocks between documents, so with documents much shorter than L
    it does well under this count.
    SSD layer (H heads, head dim P, state N, chunk Q), as mamba-ssm's chunked kernels run it: intra-chunk C B^T and
    its product with x, causal within the chunk, 2 * H * (N + P) * (Q + 1) / 2; chunk states and their read-out
    2 * H * P * N each."""
    flops = 0
    config = getattr(model, "config", None)
    for layer in _decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        mixer = next((getattr(layer, n) for n in ("mamba", "mixer") if hasattr(layer, n)), None)
        if attn is not None:
            heads = getattr(attn, "num_heads", None) or config.num_attention_heads
            head_dim = getattr(attn, "head_dim", None) or config.hidden_size // config.num_attention_heads
            flops += 2 * heads * head_dim * (seq_len + 1)
        elif mixer is not None and hasattr(mixer, "nheads") and not attention_only:
            h, p, n = mixer.nheads, mixer.headdim, mixer.d_state
            q = min(getattr(mixer, "chunk_size", 256), seq_len)
            flops += h * (n + p) * (q + 1) + 4 * h * p * n
    return flops


def training_flops_per_token(student, teacher, seq_len: int) -> dict:
    """Model FLOPs per trained token (the MFU numerator, PaLM-style "model" FLOPs: recomputation from gradient
    checkpointing is not counted):
        student: 3 x (2 x matmul params + sequence mixing)   forward, and backward = 2 x forward
        teacher: 1 x (2 x matmul params + sequence mixing)   forward only (no_grad)
    The lm_heads are counted in full (the chunked loss still applies both to every token). Stages that freeze
    parts of the student (MOHAWK 1-2) skip some weight gradients; their MFU is an upper estimate."""
    s_fwd = 2 * matmul_params(student) + sequence_mixing_flops(student, seq_len)
    t_fwd = 2 * matmul_params(teacher) + sequence_mixing_flops(teacher, seq_len) if teacher is not None else 0
    attention = 3 * sequence_mixing_flops(student, seq_len, attention_only=True) + (
        sequence_mixing_flops(teacher, seq_len, attention_only=True) if teacher is not None else 0)
    return {"student": 3 * s_fwd, "teacher": t_fwd, "total": 3 * s_fwd + t_fwd, "attention": attention}


def within_document_attention(seq_idx: torch.Tensor) -> torch.Tensor:
    """Of the causal (query, key <= query) pairs of packed rows [B, L] (segment ids 0, 1, ... per row, as
    `PackedStream` numbers them), the fraction inside one document: sum of l (l + 1) / 2 over the documents, over
    B L (L + 1) / 2. The attention count above assumes 1; with FlexAttention's document mask the kernels do about
    this fraction of it. A 0-d float tensor on seq_idx's device (no host sync)."""
    rows, length = seq_idx.shape
    counts = torch.zeros(rows, length, dtype=torch.float32, device=seq_idx.device)
    counts.scatter_add_(1, seq_idx.long(), torch.ones_like(counts))
    return (counts * (counts + 1)).sum() / (rows * length * (length + 1))


# ----------------------------------------------------------------------------- torch.compile

def _set_compile_limits():
    import torch._dynamo.config as dynamo_config
    # One compiled region per layer kind, but every layer instance passes through it; keep the recompile budget
    # above the number of distinct shapes we meet (last chunk of the loss, eval batches).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(64, getattr(dynamo_config, name)))
    # DDPOptimizer splits one whole-model graph at gradient-bucket boundaries so all-reduce overlaps the backward.
    # Our regions are single layers already, and a region first compiled under DDP would go through it, giving
    # different graphs from the ones the probe step compiled outside DDP (cold compiles, no cache hits): on 2 H200s
    # the first DDP step took 138 s with compile_mode=layers (leaderboards/distill/scaling_2gpu_defaults_h200).
    if hasattr(dynamo_config, "optimize_ddp"):
        dynamo_config.optimize_ddp = False


COMPILE_MODES = ("regional", "layers")


def compile_regions(model, mode: str = "regional") -> list:
    """torch.compile parts of a model in place (`nn.Module.compile`, so state_dict keys do not change); returns the
    compiled modules (give them to `uncompile`).

    regional: the RMSNorms and MLPs of every layer, and whole attention layers (HF Llama layers, and the students'
      attention layers). Mamba mixers stay eager: they call mamba-ssm's Triton kernels through autograd.Functions
      that dynamo should not trace.
    layers: every decoder layer whole, with the SSD scan and the gated-RMSNorm dispatchers wrapped in
      torch.compiler.disable (graph breaks around the kernels; fuses the conv and the projections' epilogues).
    (Inductor's CUDA graph trees over these regions, mode="reduce-overhead", were measured on an H200 and dropped:
    no faster for Llamba, 15x slower for MambaInLlama; leaderboards/README.md.)"""
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile_mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    _set_compile_limits()
    if mode == "layers":
        from harness_ext.models import ssd
        for name in ("ssd_scan", "ssd_scan_train", "gated_rmsnorm"):
            fn = getattr(ssd, name)
            if not getattr(fn, "_thinkfast_compiler_disabled", False):
                wrapped = torch.compiler.disable(fn)
                wrapped._thinkfast_compiler_disabled = True
                setattr(ssd, name, wrapped)
    compiled = []
    for layer in _decoder_layers(model):
        is_attention = getattr(layer, "is_attention", hasattr(layer, "self_attn"))
        if mode == "layers" or is_attention:
            parts = [layer]
        else:
            parts = [m for m in (getattr(layer, n, None) for n in ("input_layernorm", "post_attention_layernorm", "mlp"))
                     if m is not None]
        for part in parts:
            part.compile()
            compiled.append(part)
    norm = getattr(getattr(model, "model", None), "norm", None)
    if norm is not None:
        norm.compile()
        compiled.append(norm)
    return compiled


def uncompile(modules):
    for module in modules:
        module._compiled_call_impl = None


# ----------------------------------------------------------------------------- distributed

def dist_info() -> tuple[int, int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def init_distributed() -> torch.device:
    rank, world, local = dist_info()
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- checkpoints

def _fsync_tree(path: Path):
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save_dir(final: Path, write) -> Path:
    """write(tmp_dir) fills a temporary sibling directory; it then replaces `final` by rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".tmp-{path.name}-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy())


def rng_state() -> dict:
    py = random.getstate()
    state = {"python": [py[0], list(py[1]), py[2]], "torch": _b64(torch.get_rng_state()),
             "numpy": base64.b64encode(pickle.dumps(np.random.get_state())).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict):
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    torch.set_rng_state(_unb64(state["torch"]))
    np.random.set_state(pickle.loads(base64.b64decode(state["numpy"])))
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def latest_checkpoint(stage_dir: Path) -> Path | None:
    pointer = Path(stage_dir) / "latest"
    if pointer.is_file():
        path = Path(stage_dir) / pointer.read_text().strip()
        if (path / "trainer_state.json").is_file():
            return path
    # A kill between the rename and the pointer update leaves a complete newer checkpoint: prefer it.
    ckpts = sorted(Path(stage_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    ckpts = [p for p in ckpts if (p / "trainer_state.json").is_file()]
    return ckpts[-1] if ckpts else None


def save_model_dir(path: Path, model, tokenizer=None, state: dict | None = None, optimizer_state: dict | None = None):
    def write(tmp: Path):
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if optimizer_state is not None:
            torch.save(optimizer_state, tmp / "optimizer.pt")
        if state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    return atomic_save_dir(path, write)


# ----------------------------------------------------------------------------- trainer

def set_trainable(student, mode: str):
    """all: every parameter; mixers: only sequence mixers (MOHAWK stage 1); no_mlp: everything in the decoder
    layers but the MLPs (MOHAWK stage 2: mixers and norms)."""
    if mode not in ("all", "mixers", "no_mlp"):
        raise ValueError(f"unknown trainable mode {mode!r}; choose all, mixers, no_mlp")
    for name, p in student.named_parameters():
        if mode == "all":
            p.requires_grad_(True)
        elif mode == "mixers":
            p.requires_grad_(any(f".{k}." in name for k in ("mixer", "mamba")))
        else:
            p.requires_grad_(".layers." in name and ".mlp." not in name)
    n = sum(p.numel() for p in student.parameters() if p.requires_grad)
    if n == 0:
        raise ValueError(f"trainable={mode!r} selects no parameter of {type(student).__name__}")
    return n


def lr_lambda_factory(total_steps: int, warmup_steps: int, min_ratio: float):
    def f(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


class Trainer:
    def __init__(self, objective, teacher, stream, cfg: StageConfig, stage_dir, eval_batches=None, tokenizer=None,
                 device=None, fault_hook=None, progress: bool = True):
        self.objective, self.teacher, self.stream, self.cfg = objective, teacher, stream, cfg
        self.stage_dir = Path(stage_dir)
        self.eval_batches, self.tokenizer = eval_batches or [], tokenizer
        self.rank, self.world, _ = dist_info()
        self.device = device or init_distributed()
        self.fault_hook = fault_hook  # tests: fault_hook(step, loss) -> loss, e.g. to inject a NaN
        self.progress = progress and self.rank == 0
        self.student = objective.student
        self.tokens_per_step = cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum * self.world
        self.total_steps = max(1, math.ceil(cfg.max_tokens / self.tokens_per_step))
        if stream.seq_len != cfg.seq_len:
            raise ValueError(f"stream packs rows of {stream.seq_len} tokens but the stage wants {cfg.seq_len}")
        from harness_ext.models import runtime, ssd
        for key, allowed in (("student_attn", runtime.TRAIN_ATTN_MODES), ("train_scan", ssd.TRAIN_SCAN_MODES),
                             ("compile_mode", COMPILE_MODES)):
            if getattr(cfg, key) is not None and getattr(cfg, key) not in allowed:
                raise ValueError(f"stage {cfg.name!r}: {key} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(cfg, key)!r}")
        if cfg.grad_checkpointing and (cfg.train_scan or ssd.train_scan_mode()) == "graph":
            raise ValueError("grad_checkpointing recomputes each layer's forward inside the backward, which the "
                             "captured scans of train_scan=graph cannot serve; use one or the other")

    @contextmanager
    def _runtime_modes(self):
        """The stage's student_attn / train_scan, in force while it trains (they override the environment, and the
        previous values come back after: stages of one process may differ)."""
        from harness_ext.models import runtime, ssd
        before = runtime.TRAIN_ATTN, ssd.TRAIN_SCAN
        if self.cfg.student_attn is not None:
            runtime.TRAIN_ATTN = self.cfg.student_attn
        if self.cfg.train_scan is not None:
            ssd.TRAIN_SCAN = self.cfg.train_scan
        try:
            yield
        finally:
            runtime.TRAIN_ATTN, ssd.TRAIN_SCAN = before

    # -- setup
    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def _build(self):
        cfg = self.cfg
        self.student.to(self.device)
        self.student.train()
        if self.teacher is not None:
            self.teacher.to(self.device)
            self.teacher.eval().requires_grad_(False)
        self.n_trainable = set_trainable(self.student, cfg.trainable)
        params = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in params if p.ndim < 2], "weight_decay": 0.0}]
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=fused or None,
                                           foreach=None if fused else True)
        warmup = max(1, int(cfg.warmup_frac * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda_factory(self.total_steps, warmup, cfg.min_lr_ratio))
        if cfg.grad_checkpointing:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.compiled: list = []
        use_compile = cfg.compile if cfg.compile is not None else self.device.type == "cuda"
        if use_compile:
            try:
                self.compiled = compile_regions(self.student, cfg.compile_mode)
                # Only the KD objectives run the teacher plainly; MOHAWK hooks into its layers (and switches its
                # attention implementation), which compiled regions would trace or recompile.
                if self.teacher is not None and hasattr(self.objective, "compile_chunk"):
                    self.compiled += compile_regions(self.teacher, "regional")
                if hasattr(self.objective, "compile_chunk"):
                    self.objective.compile_chunk = True
            except Exception as error:  # noqa: BLE001 - compile is an optimisation: never fatal
                self._disable_compile(error)
        self._teacher_attn_before = None
        if cfg.teacher_attn and self.teacher is not None and hasattr(self.objective, "compile_chunk"):
            # FlexAttention skips the blocks a packed (block-diagonal causal) mask removes; SDPA with a dense mask
            # computes them all.
            try:
                before = self.teacher.config._attn_implementation
                self.teacher.set_attn_implementation(cfg.teacher_attn)
                self._teacher_attn_before = before
            except Exception as error:  # noqa: BLE001
                warnings.warn(f"[distill] teacher attn_implementation={cfg.teacher_attn!r} unavailable "
                              f"({type(error).__name__}: {error}); keeping {self.teacher.config._attn_implementation}")
        module = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         find_unused_parameters=cfg.trainable != "all" or cfg.objective.startswith("mohawk"))
        self.module = module
        self.peak = peak_flops(self.device)
        self.flops = training_flops_per_token(self.student, self.teacher, cfg.seq_len)
        self.flops_per_token = self.flops["total"]

    def _disable_compile(self, error):
        warnings.warn(f"[distill] torch.compile failed ({type(error).__name__}: {str(error)[:500]}); "
                      "continuing eager")
        uncompile(self.compiled)
        self.compiled = []
        if hasattr(self.objective, "compile_chunk"):
            self.objective.compile_chunk = False
        torch._dynamo.reset()

    def restore_teacher_attn(self):
        """Give the (shared) teacher back its attention implementation."""
        if self._teacher_attn_before is not None:
            self.teacher.set_attn_implementation(self._teacher_attn_before)
            self._teacher_attn_before = None

    def _probe_compile(self, step: int):
        """Compilation happens at the first call (forward and backward), so a failure would surface inside the
        training loop. Run one micro-batch forward + backward on the objective itself (outside DDP: no collective
        to hang if only one rank fails), drop its gradients, and fall back to eager if anything raised. The model
        is deterministic and the data a pure function of the step, so this changes nothing the run computes."""
        if not self.compiled and self._teacher_attn_before is None:
            return
        t0 = time.perf_counter()
        try:
            batch = self._batch(step, 0)
            with self._autocast():
                teacher_out = self.objective.teacher_forward(self.teacher, batch)
                loss, _ = self.objective(batch, teacher_out)
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except Exception as error:  # noqa: BLE001
            self._disable_compile(error)
            self.restore_teacher_attn()
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        if self.rank == 0 and self.compiled:
            print(f"[distill] {self.cfg.name}: compiled {len(self.compiled)} regions "
                  f"({time.perf_counter() - t0:.1f}s incl. the probe step)", flush=True)

    def _batch(self, step: int, micro: int) -> dict:
        cfg = self.cfg
        start = step * cfg.micro_batch_size * cfg.grad_accum * self.world \
            + (self.rank * cfg.grad_accum + micro) * cfg.micro_batch_size
        batch = self.stream.rows(range(start, start + cfg.micro_batch_size))
        pin = self.device.type == "cuda"
        return {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=True) for k, v in batch.items()}

    # -- checkpoints
    def _state(self, step: int) -> dict:
        return {"stage": self.cfg.name, "step": step, "total_steps": self.total_steps,
                "tokens_seen": step * self.tokens_per_step,
                "data_cursor": step * self.cfg.micro_batch_size * self.cfg.grad_accum * self.world,
                "world_size": self.world, "config": dataclasses.asdict(self.cfg), "rng": rng_state(),
                "done": step >= self.total_steps}

    def save_checkpoint(self, step: int):
        if self.rank == 0:
            name = f"checkpoint-{step}"
            save_model_dir(self.stage_dir / name, self.student, self.tokenizer, self._state(step),
                           {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()})
            atomic_write_text(self.stage_dir / "latest", name)
            ckpts = sorted(self.stage_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
            for old in ckpts[:-max(1, self.cfg.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def _resume(self) -> int:
        ckpt = latest_checkpoint(self.stage_dir)
        if ckpt is None:
            return 0
        state = json.loads((ckpt / "trainer_state.json").read_text())
        if state.get("world_size", 1) != self.world:
            raise RuntimeError(f"{ckpt} was written with {state['world_size']} processes; resume with the same "
                               f"number (now {self.world}) to replay the same data order")
        from safetensors.torch import load_file
        weights = {}
        for f in sorted(ckpt.glob("*.safetensors")):
            weights.update(load_file(f, device=str(self.device)))
        missing, unexpected = self.student.load_state_dict(weights, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied weights are saved once
        if missing or unexpected:
            raise RuntimeError(f"{ckpt} does not match the student: missing {missing[:5]}, unexpected {unexpected[:5]}")
        opt = torch.load(ckpt / "optimizer.pt", map_location=self.device, weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        set_rng_state(state["rng"])
        if self.rank == 0:
            print(f"[distill] {self.cfg.name}: resumed from {ckpt} at step {state['step']} "
                  f"({state['tokens_seen']:,} tokens)", flush=True)
        return int(state["step"])

    # -- main loop
    def _reset_accumulators(self, keep_first_bad: bool = False):
        dev = self.device
        self._loss_sum = torch.zeros((), device=dev)
        self._stat_sums: dict[str, torch.Tensor] = {}
        if not keep_first_bad:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=dev)

    def train_step(self, step: int):
        """One optimizer step (all micro-batches); metrics accumulate on the device, nothing syncs with the host."""
        cfg, dev = self.cfg, self.device
        for micro in range(cfg.grad_accum):
            batch = self._batch(step, micro)
            sync = micro == cfg.grad_accum - 1 or self.world == 1
            ctx = self.module.no_sync() if (not sync and hasattr(self.module, "no_sync")) else nullcontext()
            with ctx:
                with self._autocast():
                    teacher_out = self.objective.teacher_forward(self.teacher, batch)
                    loss, stats = self.module(batch, teacher_out)
                if self.fault_hook is not None:
                    loss = self.fault_hook(step, loss)
                (loss / cfg.grad_accum).backward()
            self._loss_sum += loss.detach() / cfg.grad_accum
            if "seq_idx" in batch:
                stats = {**stats, "doc_attention_frac": within_document_attention(batch["seq_idx"])}
            for k, v in stats.items():
                self._stat_sums[k] = self._stat_sums.get(k, torch.zeros((), device=dev)) + v.float() / cfg.grad_accum
            bad = ~torch.isfinite(loss.detach())
            self._first_bad = torch.where(bad & (self._first_bad < 0), torch.full_like(self._first_bad, step),
                                          self._first_bad)
        if cfg.grad_clip and cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in self.student.parameters() if p.requires_grad], cfg.grad_clip, foreach=True)
            self._stat_sums["grad_norm"] = self._stat_sums.get("grad_norm", torch.zeros((), device=dev)) + grad_norm.float()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def train(self) -> dict:
        with self._runtime_modes():
            return self._train()

    def _train(self) -> dict:
        cfg = self.cfg
        self._build()
        start_step = self._resume()
        if start_step < self.total_steps:
            self._probe_compile(start_step)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        metrics_path = self.stage_dir / "metrics.jsonl"
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        log_every = max(1, cfg.log_every)
        save_every = max(log_every, math.ceil(cfg.save_every / log_every) * log_every) if cfg.save_every else 0
        dev = self.device
        self._reset_accumulators()
        bar = tqdm(total=self.total_steps, initial=start_step, desc=f"distill {cfg.name}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t_last, steps_since, step = time.perf_counter(), 0, start_step
        last_log: dict = {}
        for step in range(start_step, self.total_steps):
            self.train_step(step)
            steps_since += 1
            done_steps = step + 1
            is_last = done_steps == self.total_steps
            if done_steps % log_every == 0 or is_last:
                # The one host sync between logging points.
                bad_step = int(self._first_bad.item())
                if self.world > 1:
                    t = torch.tensor([bad_step if bad_step >= 0 else 1 << 62], device=dev)
                    dist.all_reduce(t, op=dist.ReduceOp.MIN)
                    bad_step = int(t.item()) if int(t.item()) < (1 << 62) else -1
                if bad_step >= 0:
                    bar.close()
                    last = latest_checkpoint(self.stage_dir)
                    raise NonFiniteLossError(
                        f"stage {cfg.name}: non-finite loss (NaN/inf) at step {bad_step}; stopping. "
                        f"Last good checkpoint: {last or 'none (no checkpoint was written before the failure)'}")
                if self.world > 1:  # log the global mean, as one process with accumulation would
                    keys = sorted(self._stat_sums)
                    packed = torch.stack([self._loss_sum] + [self._stat_sums[k] for k in keys])
                    dist.all_reduce(packed)
                    packed /= self.world
                    self._loss_sum = packed[0].clone()
                    self._stat_sums = {k: packed[j + 1].clone() for j, k in enumerate(keys)}
                now = time.perf_counter()
                tok_s = steps_since * self.tokens_per_step / max(now - t_last, 1e-9)
                record = {"stage": cfg.name, "step": done_steps, "tokens": done_steps * self.tokens_per_step,
                          "loss": self._loss_sum.item() / steps_since, "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": tok_s}
                record.update({k: v.item() / steps_since for k, v in self._stat_sums.items()})
                # MFU: model FLOPs (training_flops_per_token) over the dense bf16 peak of every GPU in the job.
                record["tflops"] = tok_s * self.flops_per_token / self.world / 1e12   # per GPU
                record["mfu"] = (tok_s * self.flops_per_token / (self.peak * self.world)) if self.peak else None
                if self.peak and "doc_attention_frac" in record:
                    # the same with the attention term cut to the pairs inside documents (the work FlexAttention
                    # does on packed rows; `mfu` counts causal attention over the whole context)
                    useful = self.flops_per_token - self.flops["attention"] * (1.0 - record["doc_attention_frac"])
                    record["mfu_within_docs"] = tok_s * useful / (self.peak * self.world)
                record["flops_per_token"] = self.flops_per_token
                record["peak_flops"] = self.peak
                if dev.type == "cuda":
                    record["max_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                last_log = record
                self._reset_accumulators(keep_first_bad=True)
                t_last, steps_since = time.perf_counter(), 0
                if save_every and done_steps % save_every == 0 and not is_last:
                    self.save_checkpoint(done_steps)
            bar.update(1)
        bar.close()
        self.restore_teacher_attn()
        # The held-out evaluation and the next stage run after this: compiled regions would recompile for no_grad
        # and the eval shapes (a second full compile for a few forward passes). Eager is fine there.
        uncompile(self.compiled)
        self.compiled = []
        from harness_ext.models import ssd
        ssd.release_scan_graphs()       # THINKFAST_TRAIN_SCAN=graph: the next stage's shapes or trainable set differ
        if start_step < self.total_steps:
            self.save_checkpoint(self.total_steps)
        return {"steps": self.total_steps, "tokens": self.total_steps * self.tokens_per_step, "last_log": last_log}


@torch.no_grad()
def evaluate(student, teacher, batches, device=None) -> dict:
    """Held-out KL to the teacher (both directions), top-1 agreement and CE, averaged over target tokens."""
    if not batches:
        return {}
    device = device or next(student.parameters()).device
    was_training = student.training
    student.eval()
    totals: dict[str, float] = {}
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with ctx:
            s = model_forward(student, batch).logits
            t = model_forward(teacher, batch).logits
        for k, v in agreement_stats(s, t, batch["labels"]).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    student.train(was_training)
    n = max(totals.pop("tokens"), 1.0)
    out = {k: v / n for k, v in totals.items()}
    out["tokens"] = int(n)
    out["top1_agreement"] = out.pop("top1_agree")
    return out
