"""Distillation trainer throughput: tokens/s, MFU and peak memory per configuration, for both students.

    # one H100 (< 4 min): random-weight SmolLM2-135M-shaped teacher, init students, random packed tokens
    python scripts/bench_distill.py --out runs/bench_distill
    # choose configurations / micro-batches (names below), e.g. only the compiled chunked loss at 16 and 32 rows
    python scripts/bench_distill.py --out runs/bench_distill --configs chunked-compile --micro-batches 16,32
    # CPU smoke (tiny shapes, seconds)
    python scripts/bench_distill.py --out /tmp/bench_distill --device cpu --tiny
    # A/B of the Triton conv and varlen training attention against the reference paths, one GPU call (< 4 min)
    python scripts/bench_distill.py --out runs/bench_distill_ab --micro-batches 16 \
        --configs chunked-compile,chunked-compile-conv,chunked-compile-fast
    # where a step's time goes: 2 more steps under torch.profiler, ops table in runs/bench_distill_prof/profile_*.txt
    python scripts/bench_distill.py --out runs/bench_distill_prof --configs chunked-compile --micro-batches 16 --profile 2
    # the same with any environment: one run of the chosen configs per --env (an empty one = as is)
    python scripts/bench_distill.py --out runs/bench_distill_ab --configs chunked-compile --micro-batches 16 \
        --env "" --env THINKFAST_CONV=triton,THINKFAST_TRAIN_ATTN=varlen
    # the fused Triton KD chunk (opt-in) against the compiled reference chunk, order-balanced
    python scripts/bench_distill.py --out runs/bench_distill_kd --configs layers-flex-graph --micro-batches 16 \
        --env THINKFAST_KD_KERNEL=triton --env "" --env THINKFAST_KD_KERNEL=triton

Each configuration runs the real `distill.trainer.Trainer` step (`Trainer.train_step`: teacher forward, student
forward + backward, clip, fused AdamW) for `--warmup` untimed and `--steps` timed optimizer steps on one device,
with the MFU accounting of `distill.trainer.training_flops_per_token` (student 6N + teacher 2N + attention / SSD
scan FLOPs; peak = the device's dense bf16 peak, or --peak-tflops).

Configurations (micro-batches: --micro-batches if given, else the default in brackets; 16 where none is given):
  ref-eager          full-logit reference loss (kd_loss_ref), no compile [8]  (last session's setup)
  chunked-eager      chunked KD loss from hidden states, no compile
  chunked-compile    chunked KD loss, compile_mode=regional (norms, MLPs, attention layers, loss chunk) [16, 32]
  chunked-layers     chunked KD loss, compile_mode=layers (whole layers; SSD kernels behind compiler.disable)
  chunked-flex       chunked-compile with the teacher on FlexAttention (document-causal block mask)
  chunked-flex-all   chunked-flex with the students' attention layers on FlexAttention too (THINKFAST_TRAIN_ATTN=flex)
  layers-flex-all    chunked-layers with the teacher's and the students' attention on FlexAttention
  chunked-graph      chunked-compile with THINKFAST_TRAIN_SCAN=graph (each mixer's SSD scan forward and backward
                     replayed from CUDA graphs: no per-call host work in mamba-ssm's Python)
  layers-flex-graph  layers-flex-all with THINKFAST_TRAIN_SCAN=graph (the recipes' settings)
  chunked-ckpt       chunked KD loss, regional compile, gradient checkpointing (for micro-batches that OOM without)
  chunked-compile-conv   chunked-compile with THINKFAST_CONV=triton (Triton depthwise conv in the Mamba mixers)
  chunked-compile-varlen chunked-compile with THINKFAST_TRAIN_ATTN=varlen (students' attention: one flash call
                         over the packed documents instead of SDPA with a dense block-diagonal mask)
  chunked-compile-fast   chunked-compile with both
A config's environment (and --env's) is set for its run only; the table's `env` column says which was used. Each
config starts with torch._dynamo.reset(), so no config runs code compiled under another's switches.
A failing configuration (OOM, compile error) is recorded with its error and the run goes on; configurations that
would start after --deadline seconds are recorded as skipped. Output: a table on stdout and OUT/bench_distill.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

CONFIGS = {
    "ref-eager": dict(chunked_loss=False, compile=False, micro=(8,)),
    "chunked-eager": dict(chunked_loss=True, compile=False),
    "chunked-compile": dict(chunked_loss=True, compile=True, compile_mode="regional", micro=(16, 32)),
    "chunked-layers": dict(chunked_loss=True, compile=True, compile_mode="layers"),
    "chunked-flex": dict(chunked_loss=True, compile=True, compile_mode="regional", teacher_attn="flex_attention"),
    "chunked-flex-all": dict(chunked_loss=True, compile=True, compile_mode="regional", teacher_attn="flex_attention",
                             env={"THINKFAST_TRAIN_ATTN": "flex"}),
    "layers-flex-all": dict(chunked_loss=True, compile=True, compile_mode="layers", teacher_attn="flex_attention",
                            env={"THINKFAST_TRAIN_ATTN": "flex"}),
    "chunked-graph": dict(chunked_loss=True, compile=True, compile_mode="regional",
                          env={"THINKFAST_TRAIN_SCAN": "graph"}),
    "layers-flex-graph": dict(chunked_loss=True, compile=True, compile_mode="layers", teacher_attn="flex_attention",
                              env={"THINKFAST_TRAIN_ATTN": "flex", "THINKFAST_TRAIN_SCAN": "graph"}),
    "chunked-ckpt": dict(chunked_loss=True, compile=True, compile_mode="regional", grad_checkpointing=True),
    "chunked-compile-conv": dict(chunked_loss=True, compile=True, compile_mode="regional",
                                 env={"THINKFAST_CONV": "triton"}),
    "chunked-compile-varlen": dict(chunked_loss=True, compile=True, compile_mode="regional",
                                   env={"THINKFAST_TRAIN_ATTN": "varlen"}),
    "chunked-compile-fast": dict(chunked_loss=True, compile=True, compile_mode="regional",
                                 env={"THINKFAST_CONV": "triton", "THINKFAST_TRAIN_ATTN": "varlen"}),
}
DEFAULT_CONFIGS = "ref-eager,chunked-eager,chunked-compile,chunked-flex,chunked-layers"


def teacher_config(tiny: bool):
    from transformers import LlamaConfig
    if tiny:
        return LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                           max_position_embeddings=2048, rms_norm_eps=1e-5)
    # SmolLM2-135M(-Instruct): 30 layers, hidden 576, 9 q / 3 kv heads of 64, MLP 1536, vocab 49152, tied head
    return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                       num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5, initializer_range=0.02,
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_stream(vocab: int, seq_len: int, rows: int, seed: int = 0):
    """Packed rows of random documents (lengths like chat solutions: 64..1536 tokens), all tokens targets."""
    from distill.data import Document, PackedStream
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < (rows + 1) * seq_len:
        n = int(rng.integers(64, 1536))
        docs.append(Document(rng.integers(3, vocab, n).astype("int32"), np.ones(n, dtype=bool)))
        total += n
    return PackedStream(docs, seq_len, seed=seed)


def parse_env(text: str) -> dict:
    """'A=1,B=x' -> {'A': '1', 'B': 'x'}; '' -> {}."""
    env = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise ValueError(f"--env items must be NAME=VALUE, got {item!r}")
        name, value = item.split("=", 1)
        env[name.strip()] = value.strip()
    return env


class scoped_env:
    """Set environment variables for one configuration's run, then restore them."""

    def __init__(self, env: dict):
        self.env, self.saved = env, {}

    def __enter__(self):
        for name, value in self.env.items():
            self.saved[name] = os.environ.get(name)
            os.environ[name] = value

    def __exit__(self, *exc):
        for name, value in self.saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_config(name, spec, arch, micro, args, teacher, teacher_dir, device, stage_root, env=None) -> dict:
    env = {**spec.get("env", {}), **(env or {})}
    row = {"arch": arch, "config": name, "micro_batch": micro, "seq_len": args.seq_len,
           "env": ",".join(f"{k}={v}" for k, v in env.items())}
    with scoped_env(env):
        return _run_config(row, name, spec, arch, micro, args, teacher, teacher_dir, device, stage_root)


def _run_config(row, name, spec, arch, micro, args, teacher, teacher_dir, device, stage_root) -> dict:
    from distill.cli import make_objective
    from distill.trainer import StageConfig, Trainer, uncompile
    from harness_ext.models.init_from_teacher import init_student

    trainer = student = None
    # Every configuration compiles from scratch: a mode switch read inside compiled code (THINKFAST_TRAIN_ATTN in
    # the attention layers, anything under compile_mode=layers) can otherwise keep the value of the configuration
    # that compiled first (seen on torch 2.11: a THINKFAST_TRAIN_SCAN=graph row that ran the eager scan). Costs each
    # configuration its compile (setup_s), not its timed steps.
    torch._dynamo.reset()
    try:
        torch.manual_seed(0)
        student = init_student(teacher_dir, arch).to(device=device, dtype=torch.float32)
        steps = args.warmup + args.steps
        cfg = StageConfig(name=f"bench-{arch}-{name}", objective="kd", seq_len=args.seq_len, micro_batch_size=micro,
                          grad_accum=1, max_tokens=steps * micro * args.seq_len, lr=1e-4, warmup_frac=0.0,
                          divergence="reverse_kl" if arch == "mambainllama" else "forward_kl",
                          chunked_loss=spec["chunked_loss"], compile=spec["compile"],
                          compile_mode=spec.get("compile_mode", "regional"),
                          grad_checkpointing=spec.get("grad_checkpointing", False),
                          teacher_attn=spec.get("teacher_attn"),
                          loss_chunk_tokens=args.loss_chunk_tokens, save_every=0)
        stream = random_stream(teacher.config.vocab_size, args.seq_len, steps * micro)
        trainer = Trainer(make_objective(cfg, student), teacher, stream, cfg, stage_root / cfg.name, device=device,
                          progress=False)
        t0 = time.perf_counter()
        trainer._build()
        trainer._probe_compile(0)
        row["compiled_regions"] = len(trainer.compiled)
        row["setup_s"] = time.perf_counter() - t0
        trainer._reset_accumulators()
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        first_loss = None
        for step in range(args.warmup):
            trainer.train_step(step)
            if step == 0:
                first_loss = float(trainer._loss_sum)  # a host sync, outside the timed window
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer._reset_accumulators()
        t0 = time.perf_counter()
        done = 0
        for step in range(args.warmup, steps):
            trainer.train_step(step)
            done += 1
            if args.max_seconds and time.perf_counter() - t0 > args.max_seconds:
                break  # time box (host time; the GPU may lag a little, the sync below accounts for it)
        sync()
        wall = time.perf_counter() - t0
        if args.profile:
            row["profile"] = profile_steps(trainer, args.warmup + done, args.profile, device,
                                           args.profile_dir / f"profile_{arch}_{name}_mb{micro}.txt")
        tok_s = done * micro * args.seq_len / wall
        loss = float(trainer._loss_sum) / max(done, 1)
        row.update(steps=done, step_ms=1000 * wall / done, tokens_per_s=tok_s, first_loss=first_loss, loss=loss,
                   loss_finite=bool(np.isfinite(loss)), flops_per_token=trainer.flops_per_token,
                   flops_breakdown=trainer.flops, tflops=tok_s * trainer.flops_per_token / 1e12,
                   mfu=tok_s * trainer.flops_per_token / trainer.peak if trainer.peak else None,
                   peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    except Exception as error:  # noqa: BLE001 - one failing configuration must not end the benchmark
        row["error"] = f"{type(error).__name__}: {str(error)[:400]}"
        row["traceback"] = traceback.format_exc()[-2000:]
    finally:
        if trainer is not None:
            row["teacher_attn"] = teacher.config._attn_implementation
            if hasattr(trainer, "_teacher_attn_before"):
                trainer.restore_teacher_attn()
            uncompile(getattr(trainer, "compiled", []))   # the teacher is shared: leave it eager for the next config
        del trainer, student
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def profile_steps(trainer, first_step, steps, device, path) -> str:
    """Run `steps` more optimizer steps under torch.profiler and write the ops table (by self device time) to `path`:
    where a step's time goes, which the tokens/s above cannot say."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(first_step, first_step + steps):
            trainer.train_step(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{steps} optimizer steps, sorted by {key}\n"
                    + prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))
    return str(path)


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and v is not None else "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke)")
    parser.add_argument("--archs", default="mambainllama,llamba")
    parser.add_argument("--configs", default=None, help=f"comma-separated, from {list(CONFIGS)} (default {DEFAULT_CONFIGS}; "
                                                         "CPU: ref-eager,chunked-eager)")
    parser.add_argument("--micro-batches", default=None,
                        help="comma-separated micro-batch sizes for every config (default: per config, see above; tiny: 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 2048 (tiny: 128)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per config (default 8; tiny: 2)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per config (after the compile probe)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="time box for the timed steps of one config")
    parser.add_argument("--deadline", type=float, default=180.0, help="skip configs that would start after this many s")
    parser.add_argument("--loss-chunk-tokens", type=int, default=4096)
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's dense bf16 peak")
    parser.add_argument("--env", action="append", default=None, metavar="NAME=VALUE,...",
                        help="repeatable: run every chosen config once per --env with these environment variables "
                             "(\"\" = unchanged), e.g. --env \"\" --env THINKFAST_CONV=triton,THINKFAST_TRAIN_ATTN=varlen")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after the timed steps, profile this many more (torch.profiler) and write "
                             "OUT/profile_<arch>_<config>_mb<m>.txt, the ops by self device time")
    args = parser.parse_args(argv)

    import harness_ext.models as models
    models.register()
    if args.peak_tflops:
        os.environ["THINKFAST_PEAK_FLOPS"] = str(args.peak_tflops * 1e12)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) else
                          ("cpu" if args.device == "auto" else args.device))
    on_gpu = device.type == "cuda"
    args.seq_len = args.seq_len or (128 if args.tiny else 2048)
    args.steps = args.steps or (2 if args.tiny or not on_gpu else 8)
    configs = (args.configs or (DEFAULT_CONFIGS if on_gpu else "ref-eager,chunked-eager")).split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.micro_batches:
        forced = [int(m) for m in args.micro_batches.split(",")]
    else:
        forced = [2] if args.tiny else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.profile_dir = out

    from transformers import LlamaForCausalLM
    t_start = time.perf_counter()
    torch.manual_seed(0)
    tcfg = teacher_config(args.tiny)
    teacher = LlamaForCausalLM(tcfg)
    tmp = Path(tempfile.mkdtemp(prefix="bench-teacher-", dir=out))
    teacher.save_pretrained(tmp)  # init_student reads the teacher from disk, as `thinkfast init` does
    teacher = teacher.to(device=device, dtype=torch.bfloat16 if on_gpu else torch.float32).eval()
    device_name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(f"[bench_distill] device {device_name}; teacher {tcfg.num_hidden_layers} layers x {tcfg.hidden_size}, "
          f"vocab {tcfg.vocab_size}; seq {args.seq_len}; configs {configs}", flush=True)

    try:
        variants = [parse_env(text) for text in (args.env or [""])]
    except ValueError as error:
        parser.error(str(error))
    # Config-major order, so that the time box, if it strikes, cuts the least important runs of both archs.
    plan = []
    for name in configs:
        for micro in forced or CONFIGS[name].get("micro", (16,)):
            for env in variants:
                for arch in args.archs.split(","):
                    plan.append((arch, name, micro, env))
    rows = []
    for arch, name, micro, env in plan:
        elapsed = time.perf_counter() - t_start
        if elapsed > args.deadline:
            rows.append({"arch": arch, "config": name, "micro_batch": micro,
                         "env": ",".join(f"{k}={v}" for k, v in {**CONFIGS[name].get("env", {}), **env}.items()),
                         "error": f"skipped: time box ({elapsed:.0f}s)"})
            continue
        row = run_config(name, CONFIGS[name], arch, micro, args, teacher, tmp, device, out / "stages", env)
        rows.append(row)
        status = row.get("error") or (f"{row['tokens_per_s']:,.0f} tok/s, MFU {fmt(row['mfu'], '.1%')}, "
                                      f"{fmt(row['peak_mem_gb'], '.1f')} GB, loss {row['loss']:.4f}")
        print(f"[bench_distill] {arch:12s} {name:16s} mb {micro:3d} {row['env'] or '-'}: {status}", flush=True)
        (out / "bench_distill.json").write_text(json.dumps({"device": device_name, "rows": rows}, indent=1))

    header = f"{'arch':12s} {'config':22s} {'mb':>3s} {'tok/s':>10s} {'MFU':>6s} {'TFLOP/s':>8s} {'step ms':>8s} " \
             f"{'mem GB':>7s} {'setup s':>7s} {'loss0':>8s}  env / error"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['arch']:12s} {r['config']:22s} {r['micro_batch']:3d} {fmt(r.get('tokens_per_s'), '10,.0f'):>10s} "
              f"{fmt(r.get('mfu'), '6.1%'):>6s} {fmt(r.get('tflops'), '8.1f'):>8s} {fmt(r.get('step_ms'), '8.1f'):>8s} "
              f"{fmt(r.get('peak_mem_gb'), '7.1f'):>7s} {fmt(r.get('setup_s'), '7.1f'):>7s} "
              f"{fmt(r.get('first_loss'), '8.4f'):>8s}  {r.get('env') or '-'} {r.get('error', '')[:80]}")
    summary = {"device": device_name, "seq_len": args.seq_len, "teacher": tcfg.to_dict(), "wall_s": time.perf_counter() - t_start,
               "rows": rows}
    (out / "bench_distill.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"\n[bench_distill] wrote {out / 'bench_distill.json'} ({summary['wall_s']:.0f}s)")
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out / "stages", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
