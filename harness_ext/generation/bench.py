"""`thinkfast bench`: decode throughput of the teacher (HF generate and this engine) vs the students.

The paper's protocol (arXiv 2502.20339, Fig. 1): 512-token prompts, 512 generated tokens with no early
stop, batch 1..1024, bf16. Speed does not depend on the weights, so by default every model is built
with random weights from the teacher's config (SmolLM2-135M's, built in) and no checkpoint is needed.

    thinkfast bench --out leaderboards/bench                                   # H100: all rows, all batches
    thinkfast bench --teacher ckpt/teacher --out leaderboards/bench            # a real teacher's config/weights
    thinkfast bench --device cpu --batches 1,2 --prompt-len 16 --gen-len 8 --layers 2 --out /tmp/bench  # smoke
    thinkfast bench --gsm8k-sampling --model ckpt/llamba --out leaderboards/bench   # 500 x 64 GSM8K samples
    thinkfast bench --gsm8k-sampling --model ckpt/llamba --device cpu --limit 2 --n 2 --max-new-tokens 8 --out /tmp/bench

Rows:
  hf-generate   the teacher as a transformers LlamaForCausalLM under plain `generate` (sampling, min_new_tokens
                = max_new_tokens), as a user would run it
  teacher       the same teacher under this engine (MambaInLlama with every layer attention)
  mil50         MambaInLlama with attention in every other layer (50%)
  llamba        Llamba at the teacher's width
  mil50-bf16-state, llamba-bf16-state
                the same students keeping their SSM state in bfloat16 instead of float32 (not in the default
                rows: `--rows teacher,llamba,llamba-bf16-state`); at 512 + 512 tokens their state is most of the
                bytes a decode step moves

Per row and batch: generated tokens/s (end to end, prefill included), ms per decode step, prefill time,
peak GPU memory, and the bandwidth floor of a decode step: the bytes a step must move (weights read once, plus per sequence
the K/V cache read at the mean context prompt + gen/2, or the SSM/conv state read and written) divided by
the device's memory bandwidth, measured at start with a large device-to-device copy (read + write).
"fraction" = floor / measured ms per step. Out-of-memory points are recorded as "OOM".
Outputs in --out: bench.json, bench.md, bench.png (tokens/s vs batch, log-log); the card and date are named in each.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import time
from pathlib import Path

import torch

from harness_ext.generation.engine import Engine, SamplingParams

ROWS = ("hf-generate", "teacher", "mil50", "llamba")
BF16_STATE = "-bf16-state"
EXTRA_ROWS = tuple(r + BF16_STATE for r in ("mil50", "llamba"))
DEFAULT_BATCHES = "1,16,64,256,512,1024"

# SmolLM2-135M-Instruct's architecture (the default teacher)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                    bos_token_id=1, eos_token_id=2)



def _gsm8k_prompt() -> str:
    """The best-of-N tasks' wording (tasks/utils.py PROMPT == harness_ext.scoring.prm.SOLVE_PROMPT)."""
    from harness_ext.scoring.prm import SOLVE_PROMPT

    return SOLVE_PROMPT


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--out", default="leaderboards/bench", help="output directory (default leaderboards/bench)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--teacher", default=None, help="teacher checkpoint directory (default: SmolLM2-135M's config, random weights)")
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help=f"comma-separated batch sizes (default {DEFAULT_BATCHES})")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows out of {','.join(ROWS + EXTRA_ROWS)} (default {','.join(ROWS)})")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--gen-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (smoke tests)")
    parser.add_argument("--sync-every", type=int, default=16, help="engine: decode steps between host checks")
    parser.add_argument("--seed", type=int, default=0)
    g = parser.add_argument_group("--gsm8k-sampling: wall time to sample N completions for each GSM8K-500 problem")
    g.add_argument("--gsm8k-sampling", action="store_true")
    g.add_argument("--model", default=None, help="checkpoint to sample from (Llamba, MambaInLlama or Llama)")
    g.add_argument("--n", type=int, default=64, help="samples per problem (default 64)")
    g.add_argument("--max-new-tokens", type=int, default=400)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--max-batch-size", type=int, default=1024)
    g.add_argument("--limit", type=int, default=None, help="only the first N problems (smoke tests)")


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.gsm8k_sampling:
        return run_gsm8k_sampling(args, device, dtype, out)
    batches = _int_list(args.batches, "--batches")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS + EXTRA_ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {', '.join(ROWS + EXTRA_ROWS)}")
    if args.prompt_len < 1 or args.gen_len < 1:
        raise SystemExit("--prompt-len and --gen-len must be >= 1")
    teacher_config = _teacher_config(args)
    if args.prompt_len + args.gen_len > teacher_config.max_position_embeddings:
        raise SystemExit(f"--prompt-len + --gen-len exceed the teacher's max_position_embeddings "
                         f"({teacher_config.max_position_embeddings})")

    bandwidth = measure_copy_bandwidth(device)
    meta = dict(device=_device_name(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
                torch=torch.__version__, dtype=args.dtype, prompt_len=args.prompt_len, gen_len=args.gen_len,
                teacher=args.teacher or "SmolLM2-135M config, random weights",
                num_hidden_layers=teacher_config.num_hidden_layers, copy_bandwidth_GBps=bandwidth / 1e9,
                sync_every=args.sync_every)
    print(f"device: {meta['device']}   copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    # the plot is drawn when the run ends: one from an earlier run here would not match a partial run's files
    (out / "bench.png").unlink(missing_ok=True)
    results = []
    import tempfile

    workdir = tempfile.TemporaryDirectory(prefix="thinkfast-bench-")
    teacher_dir = _teacher_dir(args, teacher_config, Path(workdir.name))
    for row in rows:
        model = _build(row, teacher_dir, device, dtype)
        weight_bytes = _weight_bytes(model)
        context = args.prompt_len + args.gen_len // 2  # mean context over the decode steps
        if row == "hf-generate":
            slot_bytes = _kv_bytes_per_slot(teacher_config, context, dtype)
        else:
            slot_bytes = _slot_bytes(model, context)
        for batch in batches:
            result = dict(row=row, batch=batch)
            try:
                _reset_peak(device)
                if row == "hf-generate":
                    timing = _time_hf(model, batch, args, teacher_config, device)
                else:
                    timing = _time_engine(model, batch, args, teacher_config, device)
                floor_ms = (weight_bytes + batch * slot_bytes) / bandwidth * 1e3
                result.update(timing, status="ok", peak_mem_GB=None if _peak(device) is None else _peak(device) / 1e9, floor_ms=floor_ms,
                              floor_fraction=floor_ms / timing["ms_per_step"])
            except torch.OutOfMemoryError:
                result.update(status="OOM")
            finally:
                if hasattr(model, "_bench_engine"):
                    model._bench_engine.release()
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.append(result)
            print(_format_row(result), flush=True)
            # written after every point, so a run stopped by a time limit keeps what it measured
            _write_reports(dict(meta, results=results, complete=False), out, plot=False)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    workdir.cleanup()
    _write_reports(dict(meta, results=results, complete=True), out, plot=True)
    print((out / "bench.md").read_text())
    print(f"wrote {out / 'bench.json'}, {out / 'bench.md'}, {out / 'bench.png'}")
    return 0


# ----- models ----------------------------------------------------------------------------------

def _teacher_config(args):
    from transformers import AutoConfig, LlamaConfig

    if args.teacher:
        if args.layers:
            raise SystemExit("--layers applies to the built-in random teacher, not to --teacher")
        config = AutoConfig.from_pretrained(args.teacher)
        if config.model_type != "llama":
            raise SystemExit(f"--teacher {args.teacher}: expected a Llama checkpoint, got model_type {config.model_type!r}")
    else:
        config = LlamaConfig(**SMOLLM2_135M)
        if args.layers:
            config.num_hidden_layers = args.layers
    return config


def _teacher_dir(args, teacher_config, workdir: Path) -> str:
    """--teacher, or a random-weight Llama with the teacher's config saved once in `workdir`: students are
    then built from it exactly as `thinkfast init` builds them from a real teacher."""
    if args.teacher:
        return args.teacher
    path = workdir / "random-teacher"
    if not (path / "config.json").is_file():
        from transformers import LlamaForCausalLM

        torch.manual_seed(args.seed)
        LlamaForCausalLM(teacher_config).save_pretrained(path)
    return str(path)


def _build(row, teacher_dir, device, dtype):
    from harness_ext.models import set_ssm_state_dtype

    if row.endswith(BF16_STATE):
        return set_ssm_state_dtype(_build(row[:-len(BF16_STATE)], teacher_dir, device, dtype), "bfloat16")
    from transformers import LlamaForCausalLM

    from harness_ext.models import load_model
    from harness_ext.models.init_from_teacher import init_student

    if row == "hf-generate":
        return LlamaForCausalLM.from_pretrained(teacher_dir, dtype=dtype).to(device).eval()
    if row == "teacher":
        return load_model(teacher_dir, device=device, dtype=dtype)
    if row == "mil50":
        return init_student(teacher_dir, "mambainllama", attn_fraction=0.5).to(device=device, dtype=dtype).eval()
    return init_student(teacher_dir, "llamba").to(device=device, dtype=dtype).eval()


def _weight_bytes(model) -> int:
    """Weights a decode step reads: all parameters, except an untied input embedding (only B rows read)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if emb is not None and (head is None or head.weight.data_ptr() != emb.weight.data_ptr()):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


def _slot_bytes(model, context: int) -> int:
    """Bytes one sequence's decode step must move: its K/V cache up to `context` is read (the new token's K/V
    write is negligible); its SSM state is read and written back, so it counts twice; its conv state (a ring,
    `decode_kernels.conv_step`) has d_conv - 1 taps read and one written, so it counts once."""
    state = model.allocate_decode_state(1, context, device="cpu")
    total = 0
    for layer in state.layers:
        for name, tensor in layer.items():
            moved = 2 if name == "ssm_state" else 1
            total += moved * tensor.numel() * tensor.element_size()
    return total


def _kv_bytes_per_slot(config, context: int, dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * context * itemsize


# ----- timing ----------------------------------------------------------------------------------

def _prompts(batch, args, config, device):
    g = torch.Generator().manual_seed(args.seed + batch)
    return torch.randint(3, config.vocab_size, (batch, args.prompt_len), generator=g)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def _time_hf(model, batch, args, config, device):
    ids = _prompts(batch, args, config, device).to(device)
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0)
    model.generate(ids[:1, :8], attention_mask=mask[:1, :8], max_new_tokens=2, min_new_tokens=2, **{k: v for k, v in kw.items() if k != "attention_mask"})
    _sync(device)
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=args.gen_len, min_new_tokens=args.gen_len, **kw)
    _sync(device)
    wall = time.perf_counter() - t0
    new_tokens = (out.shape[1] - ids.shape[1]) * batch
    steps = max(1, args.gen_len - 1)
    return dict(tokens_per_s=new_tokens / wall, ms_per_step=max(wall - prefill_s, 1e-9) / steps * 1e3,
                prefill_s=prefill_s, wall_s=wall, generated_tokens=new_tokens)


@torch.inference_mode()
def _time_engine(model, batch, args, config, device):
    engine = Engine(model, None, max_batch_size=batch, sync_every=args.sync_every)
    model._bench_engine = engine
    params = SamplingParams(max_new_tokens=args.gen_len, temperature=1.0, ignore_eos=True)
    prompts = _prompts(batch, args, config, device).tolist()
    engine.prepare(batch, args.prompt_len, params)  # state allocation and CUDA-graph capture, untimed
    # warm-up at the timed run's shapes: Triton specialises kernels (the first-token sampler, prefill's) on sizes,
    # and a 2-prompt warm-up left ~0.4 s of compiling to whichever row first ran each batch size (the teacher)
    engine.generate(prompts, SamplingParams(max_new_tokens=2, temperature=1.0, ignore_eos=True))
    outs = engine.generate(prompts, params, seed=args.seed)
    stats = engine.stats
    generated = sum(c.num_tokens for o in outs for c in o)
    return dict(tokens_per_s=generated / stats["wall_s"], ms_per_step=stats["decode_s"] / stats["decode_steps"] * 1e3,
                prefill_s=stats["prefill_s"], wall_s=stats["wall_s"], generated_tokens=generated,
                capture_s=engine.capture_s)


def measure_copy_bandwidth(device, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Bytes per second moved by a large device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        nbytes, iters = 64 << 20, 3
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    seconds = time.perf_counter() - t0
    del src, dst
    return 2 * nbytes * iters / seconds


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def _reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float:
    return float(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


# ----- reports ---------------------------------------------------------------------------------

def _write_reports(report, out: Path, plot: bool):
    """bench.json and bench.md (atomically: a reader never sees half a file), and with `plot` bench.png."""
    from harness_ext.reproduce import atomic_write_text

    atomic_write_text(out / "bench.json", json.dumps(report, indent=2))
    atomic_write_text(out / "bench.md", _markdown(report))
    if plot:
        _plot(report, out / "bench.png")


def _format_row(r) -> str:
    if r["status"] != "ok":
        return f"{r['row']:>12} batch {r['batch']:>5}: {r['status']}"
    return (f"{r['row']:>12} batch {r['batch']:>5}: {r['tokens_per_s']:>10.0f} tok/s  {r['ms_per_step']:8.2f} ms/step  "
            f"prefill {r['prefill_s']:.3f}s  peak {_gb(r)}  floor {r['floor_ms']:.3f} ms "
            f"({100 * r['floor_fraction']:.0f}%)")


def _gb(r) -> str:
    return "n/a" if r.get("peak_mem_GB") is None else f"{r['peak_mem_GB']:.2f}"


def _markdown(report) -> str:
    lines = [f"# Decode throughput: {report['device']}, {report['date']}", "",
             f"{report['prompt_len']}-token prompts, {report['gen_len']} generated tokens (no early stop), "
             f"{report['dtype']}, teacher: {report['teacher']} ({report['num_hidden_layers']} layers); "
             f"copy bandwidth {report['copy_bandwidth_GBps']:.0f} GB/s; torch {report['torch']}.", "",
             *([] if report.get("complete", True) else
               ["**Partial:** the run had not finished when this was written; the rows below are all it measured.", ""]),
             "| row | batch | tokens/s | ms/step | prefill s | peak GB | floor ms | % of floor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["results"]:
        if r["status"] != "ok":
            lines.append(f"| {r['row']} | {r['batch']} | {r['status']} | | | | | |")
        else:
            lines.append(f"| {r['row']} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['ms_per_step']:.2f} | "
                         f"{r['prefill_s']:.3f} | {_gb(r)} | {r['floor_ms']:.3f} | "
                         f"{100 * r['floor_fraction']:.0f}% |")
    return "\n".join(lines) + "\n"


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in dict.fromkeys(r["row"] for r in report["results"]):
        points = [(r["batch"], r["tokens_per_s"]) for r in report["results"] if r["row"] == row and r["status"] == "ok"]
        if points:
            ax.plot(*zip(*points), marker="o", label=row)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{report['device']}, {report['date'][:10]}\n"
                 f"prompt {report['prompt_len']}, generate {report['gen_len']}, {report['dtype']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----- GSM8K sampling wall time ----------------------------------------------------------------

def run_gsm8k_sampling(args, device, dtype, out: Path) -> int:
    if not args.model:
        raise SystemExit("--gsm8k-sampling needs --model DIR")
    from harness_ext.data import load_problems

    problems = load_problems("gsm8k500")
    if args.limit:
        problems = problems[: args.limit]
    t_load = time.perf_counter()
    engine = Engine.from_pretrained(args.model, device=device, dtype=dtype, max_batch_size=args.max_batch_size,
                                    sync_every=args.sync_every)
    load_s = time.perf_counter() - t_load
    template = _gsm8k_prompt()
    prompts = [[{"role": "user", "content": template.format(problem=p.problem)}] for p in problems]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    longest = max(len(engine.encode_prompt(p)) for p in prompts)
    engine.prepare(min(args.max_batch_size, len(prompts) * args.n), longest, params)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params, n=args.n, seed=args.seed, progress=True)
    wall = time.perf_counter() - t0
    tokens = sum(c.num_tokens for o in outs for c in o)
    report = dict(device=_device_name(device), date=datetime.datetime.now().isoformat(timespec="seconds"),
                  model=str(args.model), problems=len(problems), n=args.n, max_new_tokens=args.max_new_tokens,
                  temperature=args.temperature, max_batch_size=args.max_batch_size, dtype=args.dtype,
                  total_s=wall, load_s=load_s, capture_s=engine.capture_s, generated_tokens=tokens,
                  tokens_per_s=tokens / wall, mean_tokens_per_sample=tokens / (len(problems) * args.n),
                  finished_by_stop=sum(c.finish_reason == "stop" for o in outs for c in o),
                  prefill_s=engine.stats["prefill_s"], decode_s=engine.stats["decode_s"],
                  decode_steps=engine.stats["decode_steps"])
    (out / "gsm8k_sampling.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {out / 'gsm8k_sampling.json'}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise SystemExit(f"{flag}: expected positive integers, got {text!r}")
    return values
