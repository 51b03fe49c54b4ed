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
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from distill.kd import agreement_stats, model_forward

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
    compile: bool = False
    seed: int = 0


def peak_flops(device: torch.device) -> float | None:
    if os.environ.get("THINKFAST_PEAK_FLOPS"):
        return float(os.environ["THINKFAST_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def matmul_params(model) -> int:
    """Parameters that cost 2 FLOPs per token in the forward: everything but the input embedding lookup, with the
    output projection counted once whether or not it is tied to the embedding."""
    n = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is not None and out.weight is emb:
        return n
    return n - emb.numel()


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
        module = self.objective
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                         find_unused_parameters=cfg.trainable != "all" or cfg.objective.startswith("mohawk"))
        if cfg.compile:
            module = torch.compile(module)
        self.module = module
        self.peak = peak_flops(self.device)
        n_teacher = matmul_params(self.teacher) if self.teacher is not None else 0
        self.flops_per_token = 6 * matmul_params(self.student) + 2 * n_teacher

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
    def train(self) -> dict:
        cfg = self.cfg
        self._build()
        start_step = self._resume()
        metrics_path = self.stage_dir / "metrics.jsonl"
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        log_every = max(1, cfg.log_every)
        save_every = max(log_every, math.ceil(cfg.save_every / log_every) * log_every) if cfg.save_every else 0
        dev = self.device
        loss_sum = torch.zeros((), device=dev)
        stat_sums: dict[str, torch.Tensor] = {}
        first_bad = torch.full((), -1, dtype=torch.long, device=dev)
        bar = tqdm(total=self.total_steps, initial=start_step, desc=f"distill {cfg.name}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t_last, steps_since, step = time.perf_counter(), 0, start_step
        last_log: dict = {}
        for step in range(start_step, self.total_steps):
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
                loss_sum += loss.detach() / cfg.grad_accum
                for k, v in stats.items():
                    stat_sums[k] = stat_sums.get(k, torch.zeros((), device=dev)) + v.float() / cfg.grad_accum
                bad = ~torch.isfinite(loss.detach())
                first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, step), first_bad)
            if cfg.grad_clip and cfg.grad_clip > 0:
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in self.student.parameters() if p.requires_grad], cfg.grad_clip, foreach=True)
                stat_sums["grad_norm"] = stat_sums.get("grad_norm", torch.zeros((), device=dev)) + grad_norm.float()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            steps_since += 1
            done_steps = step + 1
            is_last = done_steps == self.total_steps
            if done_steps % log_every == 0 or is_last:
                # The one host sync between logging points.
                bad_step = int(first_bad.item())
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
                    keys = sorted(stat_sums)
                    packed = torch.stack([loss_sum] + [stat_sums[k] for k in keys])
                    dist.all_reduce(packed)
                    packed /= self.world
                    loss_sum = packed[0].clone()
                    stat_sums = {k: packed[j + 1].clone() for j, k in enumerate(keys)}
                now = time.perf_counter()
                tok_s = steps_since * self.tokens_per_step / max(now - t_last, 1e-9)
                record = {"stage": cfg.name, "step": done_steps, "tokens": done_steps * self.tokens_per_step,
                          "loss": loss_sum.item() / steps_since, "lr": self.scheduler.get_last_lr()[0],
                          "tokens_per_s": tok_s}
                record.update({k: v.item() / steps_since for k, v in stat_sums.items()})
                record["mfu"] = (tok_s * self.flops_per_token / (self.peak * self.world)) if self.peak else None
                if self.rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{tok_s:,.0f}")
                last_log = record
                loss_sum.zero_()
                stat_sums.clear()
                t_last, steps_since = time.perf_counter(), 0
                if save_every and done_steps % save_every == 0 and not is_last:
                    self.save_checkpoint(done_steps)
            bar.update(1)
        bar.close()
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
