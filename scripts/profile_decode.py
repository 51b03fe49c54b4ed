"""Decode-step A/B on one GPU: the old attention path (masked SDPA over the whole cache) vs flash-decoding, per
model at one batch size, SmolLM2-135M width, random weights; plus the pieces around it (sampling, prefill, forks).

    # H100, the lead's run (< 3 min): all three models at batch 256, correctness checks first
    python scripts/profile_decode.py --out runs/profile_decode --batch 256 --check
    # the same at batch 1024 (bench's hardest point), with the SSM-step tile sweep and a kernel table
    python scripts/profile_decode.py --out runs/profile_decode_1024 --batch 1024 --sweep-ssm --kernels
    # CPU smoke test (reference kernels, no graphs; minutes of nothing useful, just that it runs)
    python scripts/profile_decode.py --out /tmp/profile_decode --device cpu --batch 2 --layers 2 --context 48 --check

Per model (teacher = all 30 layers attention, mil50 = every other layer attention, llamba = 30 Mamba-2 layers):
  * ms per `decode_step` (CUDA graph replay, slots at `--context` of a `--max-seqlen` cache: the bench's mean
    context 768 of 1024) for the old path (THINKFAST_DECODE_ATTN=sdpa) and the new one, and each one's fraction
    of the bench's bandwidth floor (weights + per slot K/V up to the context, or SSM/conv state read + write);
  * ms of `sample_next` on the step's logits (temperature 1, no top-k/top-p: the bench's sampler);
  * ms of one prefill of `--prefill-prompts` prompts of GSM8K-like lengths (varlen attention vs the per-prompt
    loop), and of forking one slot into all others (`copy_slots`, what a refill does for n samples);
  * with --kernels: kernel launches per step and the top kernels (torch.profiler, new path, graphs off).
--check first compares on the device, in bf16: flash-decoding vs the reference at mixed lengths (incl. 1 and the
cache end), whole decode steps old vs new, and varlen vs looped prefill; failures are printed (and in the JSON).
--sweep-ssm times the fused SSM step alone for tile sizes and prints GB/s (state read + write).
Writes profile_decode.json under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness_ext.generation.bench import SMOLLM2_135M, _slot_bytes, _weight_bytes, measure_copy_bandwidth  # noqa: E402
from harness_ext.generation.sampling import sample_next  # noqa: E402
from harness_ext.models import decode_kernels as dk  # noqa: E402
from harness_ext.models.llamba import LlambaConfig, LlambaForCausalLM  # noqa: E402
from harness_ext.models.mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM  # noqa: E402

MODELS = ("teacher", "mil50", "llamba")


def build(name, layers, device, dtype):
    cfg = dict(SMOLLM2_135M, num_hidden_layers=layers)
    torch.manual_seed(0)
    with torch.device(device):
        if name == "llamba":
            model = LlambaForCausalLM(LlambaConfig(vocab_size=cfg["vocab_size"], hidden_size=576, intermediate_size=1536,
                                                   num_hidden_layers=layers, n_qk_heads=9, n_v_heads=9, d_state=64,
                                                   tie_word_embeddings=True))
        else:
            attn = list(range(layers)) if name == "teacher" else list(range(0, layers, 2))
            model = MambaInLlamaForCausalLM(MambaInLlamaConfig(attn_layers=attn, **cfg))
    return model.to(dtype=dtype).eval()


@contextlib.contextmanager
def env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, reset=None, iters=20, graph=True):
    """Mean ms of fn(); on CUDA as a captured graph (what the engine runs), `reset` (host side, outside the
    graph) before the warm-up and the timed replays."""
    if reset:
        reset()
    if device.type != "cuda" or not graph:
        fn()
        sync(device)
        iters = min(iters, 3) if device.type != "cuda" else iters
        if reset:
            reset()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        return (time.perf_counter() - t0) / iters * 1e3
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph_ = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph_):
        fn()
    if reset:
        reset()
    graph_.replay()
    sync(device)
    if reset:
        reset()
    t0 = time.perf_counter()
    for _ in range(iters):
        graph_.replay()
    sync(device)
    ms = (time.perf_counter() - t0) / iters * 1e3
    del graph_
    return ms


def rel_err(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-6))


# ----- checks ----------------------------------------------------------------------------------

def check_attention(device, dtype, max_seqlen):
    """Flash-decoding vs the reference at the teacher's head layout, mixed lengths."""
    torch.manual_seed(1)
    batch, n_q, n_kv, d = 37, 9, 3, 64
    q = torch.randn(batch, n_q, d, device=device, dtype=dtype)
    kc = torch.randn(batch, n_kv, max_seqlen, d, device=device, dtype=dtype)
    vc = torch.randn_like(kc)
    lens = torch.randint(0, max_seqlen, (batch,), device=device, dtype=torch.int32)
    lens[:4] = torch.tensor([0, 1, max_seqlen - 1, max_seqlen], dtype=torch.int32)
    ref = dk.attention_decode_ref(q.float(), kc.float(), vc.float(), lens, d ** -0.5)
    errs = {}
    for splits in (1, 3, None):
        errs[str(splits)] = rel_err(dk.attention_decode(q, kc, vc, lens, d ** -0.5, num_splits=splits), ref)
    return errs


def check_model(model, batch, context, max_seqlen, device):
    """Decode steps old vs new path on the same state; varlen vs looped prefill."""
    out = {}
    gen = torch.Generator().manual_seed(2)
    hi = min(200, max_seqlen - 1)
    lengths = torch.randint(min(20, hi - 1), hi, (min(batch, 16),), generator=gen).tolist()
    prompts = [torch.randint(3, 49152, (n,), generator=gen).to(device) for n in lengths]
    slots = torch.arange(len(prompts), device=device)
    with env("THINKFAST_PREFILL_ATTN", "loop"):
        s_loop = model.allocate_decode_state(len(prompts), max_seqlen)
        l_loop = model.prefill(prompts, s_loop, slots)
    s_var = model.allocate_decode_state(len(prompts), max_seqlen)
    l_var = model.prefill(prompts, s_var, slots)
    out["prefill_varlen_vs_loop_logits"] = rel_err(l_var, l_loop)
    tokens = l_loop.argmax(-1)
    s_old = model.allocate_decode_state(len(prompts), max_seqlen)
    for t_new, t_old in zip(s_var.tensors(), s_old.tensors()):
        t_old.copy_(t_new)
    worst = 0.0
    for _ in range(4):
        new = model.decode_step(tokens, s_var)
        with env("THINKFAST_DECODE_ATTN", "sdpa"):
            old = model.decode_step(tokens, s_old)
        worst = max(worst, rel_err(new, old))
        tokens = old.argmax(-1)
    out["decode_new_vs_old_logits"] = worst
    return out


# ----- timing ----------------------------------------------------------------------------------

def time_decode(model, batch, context, max_seqlen, device):
    state = model.allocate_decode_state(batch, max_seqlen)
    tokens = torch.randint(3, 49152, (batch,), device=device)

    def reset():
        state.seqlens.fill_(context)

    res = {}
    with torch.inference_mode():
        for path in ("sdpa", "flash"):
            with env("THINKFAST_DECODE_ATTN", path):
                res[path] = time_fn(lambda: model.decode_step(tokens, state), device, reset)
        logits = model.decode_step(tokens, state)
        keys = torch.arange(batch, device=device)
        steps = torch.zeros(batch, dtype=torch.int32, device=device)
        temperature = torch.ones((), device=device)
        res["sample_next"] = time_fn(lambda: sample_next(logits, keys, steps, temperature, 0, None), device)
    del state
    return res


def time_prefill_and_fork(model, batch, max_seqlen, n_prompts, device):
    gen = torch.Generator().manual_seed(3)
    hi = min(250, max_seqlen - 1)                                               # GSM8K chat prompts: ~100-250 tokens
    lengths = torch.randint(min(90, hi - 1), hi, (n_prompts,), generator=gen).tolist()
    prompts = [torch.randint(3, 49152, (n,), generator=gen).to(device) for n in lengths]
    slots = max(batch, n_prompts)
    state = model.allocate_decode_state(slots, max_seqlen)
    idx = torch.arange(n_prompts, device=device)
    res = {"prefill_prompts": n_prompts, "prefill_tokens": sum(lengths)}
    with torch.inference_mode():
        for mode in ("loop", "varlen"):
            with env("THINKFAST_PREFILL_ATTN", mode):
                res[f"prefill_{mode}_ms"] = time_fn(lambda: model.prefill(prompts, state, idx), device, iters=3,
                                                    graph=False)
        one = torch.tensor([0] * (slots - 1), device=device)
        rest = torch.arange(1, slots, device=device)
        res["fork_ms"] = time_fn(lambda: state.copy_slots(one, rest), device, iters=3, graph=False)
        res["fork_slots"] = slots - 1
    del state
    return res


def kernel_table(model, batch, context, max_seqlen, device, steps=3):
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    state = model.allocate_decode_state(batch, max_seqlen)
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    with torch.inference_mode():
        state.seqlens.fill_(context)
        model.decode_step(tokens, state)
        with torch.profiler.profile(activities=[activity]) as prof:
            for _ in range(steps):
                state.seqlens.fill_(context)
                model.decode_step(tokens, state)
            sync(device)
    key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    rows = sorted(({"kernel": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": getattr(e, key) / steps}
                   for e in prof.key_averages() if getattr(e, key) > 0), key=lambda r: -r["us_per_step"])
    if device.type == "cuda":
        rows = [r for r in rows if not r["kernel"].startswith(("aten::", "cuda", "Memcpy", "Memset"))] or rows
    del state
    return rows


def sweep_ssm(batch, device, dtype):
    """The fused SSM step alone at Llamba's shape: GB/s of state traffic per tile config."""
    nheads, headdim, dstate = 9, 64, 64
    state = torch.randn(batch, nheads, headdim, dstate, device=device)
    x = torch.randn(batch, nheads, headdim, device=device, dtype=dtype)
    dt = torch.randn(batch, nheads, device=device, dtype=dtype)
    A_log = torch.randn(nheads, device=device)
    B = torch.randn(batch, nheads, dstate, device=device, dtype=dtype)
    C = torch.randn_like(B)
    z = torch.randn(batch, nheads * headdim, device=device, dtype=dtype)
    moved = 2 * state.numel() * 4
    rows = []
    saved = dict(dk.SSM_STEP_CONFIG)
    try:
        for block_p in (8, 16, 32, 64):
            for warps in (2, 4, 8):
                dk.SSM_STEP_CONFIG.update(block_p=block_p, num_warps=warps)
                ms = time_fn(lambda: dk.ssm_step(state, x, dt, A_log, B, C, D=A_log, z=z, discrete=True), device,
                             iters=20)
                rows.append({"block_p": block_p, "num_warps": warps, "ms": ms, "GBps": moved / ms / 1e6})
    finally:
        dk.SSM_STEP_CONFIG.clear()
        dk.SSM_STEP_CONFIG.update(saved)
    return rows


# ----- main ------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--context", type=int, default=768, help="tokens held per slot (bench: 512 + 512/2)")
    parser.add_argument("--max-seqlen", type=int, default=1024, help="cache length (bench: 512 + 512)")
    parser.add_argument("--prefill-prompts", type=int, default=64)
    parser.add_argument("--check", action="store_true", help="bf16 correctness checks on the device first")
    parser.add_argument("--kernels", action="store_true", help="torch.profiler kernel table per model")
    parser.add_argument("--sweep-ssm", action="store_true", help="SSM-step tile sweep at --batch")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.context >= args.max_seqlen:
        raise SystemExit("--context must be below --max-seqlen (the step writes at position context)")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(m not in MODELS for m in models):
        raise SystemExit(f"--models: choose from {', '.join(MODELS)}")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    t_start = time.perf_counter()
    bandwidth = measure_copy_bandwidth(device)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "batch": args.batch,
              "layers": args.layers, "context": args.context, "max_seqlen": args.max_seqlen,
              "copy_bandwidth_GBps": bandwidth / 1e9, "torch": torch.__version__, "models": {}}
    print(f"{report['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s; batch {args.batch}, context "
          f"{args.context}/{args.max_seqlen}, {args.layers} layers")
    failures = []
    if args.check:
        errs = check_attention(device, dtype, min(args.max_seqlen, 300))
        report["check_attention_rel_err"] = errs
        bad = {k: v for k, v in errs.items() if not v < 2e-2}
        print(f"check flash-decoding vs reference (rel. max err per num_splits): {errs}" + ("  FAIL" if bad else "  ok"))
        if bad:
            failures.append(f"attention {bad}")
    for name in models:
        t0 = time.perf_counter()
        model = build(name, args.layers, device, dtype)
        entry = {}
        if args.check:
            try:
                entry["check"] = check_model(model, args.batch, args.context, args.max_seqlen, device)
                bad = {k: v for k, v in entry["check"].items() if not v < 5e-2}
                print(f"  {name} check: {entry['check']}" + ("  FAIL" if bad else "  ok"))
                if bad:
                    failures.append(f"{name} {bad}")
            except Exception as err:  # a failing check must not cost the timing run
                entry["check_error"] = repr(err)
                failures.append(f"{name} check raised {err!r}")
                print(f"  {name} check raised {err!r}")
        try:
            entry.update(time_decode(model, args.batch, args.context, args.max_seqlen, device))
        except torch.OutOfMemoryError:
            entry["decode"] = "OOM"
        floor_ms = (_weight_bytes(model) + args.batch * _slot_bytes(model, args.context)) / bandwidth * 1e3
        entry["floor_ms"] = floor_ms
        try:
            entry.update(time_prefill_and_fork(model, args.batch, args.max_seqlen, args.prefill_prompts, device))
        except Exception as err:  # keep the decode numbers whatever happens here
            entry["prefill_error"] = repr(err)
            print(f"  {name} prefill/fork timing raised {err!r}")
        if args.kernels:
            rows = kernel_table(model, args.batch, args.context, args.max_seqlen, device)
            entry["kernels_per_step"] = sum(r["calls_per_step"] for r in rows)
            entry["top_kernels"] = rows[:25]
        entry["seconds"] = time.perf_counter() - t0
        report["models"][name] = entry
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  {name}: done in {entry['seconds']:.1f}s", flush=True)
    if args.sweep_ssm:
        report["ssm_sweep"] = sweep_ssm(args.batch, device, dtype)

    print(f"\nbatch {args.batch}: ms per decode step (CUDA graph), % of bandwidth floor, and the pieces around it")
    print(f"{'model':>8} {'floor':>7} {'old sdpa':>14} {'new flash':>14} {'speedup':>7} {'sample':>7} "
          f"{'prefill loop':>12} {'varlen':>7} {'fork':>7}")
    for name, e in report["models"].items():
        if "sdpa" not in e:
            print(f"{name:>8}  {e.get('decode', 'n/a')}")
            continue
        f = e["floor_ms"]
        print(f"{name:>8} {f:7.3f} {e['sdpa']:7.3f} ({100 * f / e['sdpa']:3.0f}%) {e['flash']:7.3f} "
              f"({100 * f / e['flash']:3.0f}%) {e['sdpa'] / e['flash']:6.2f}x {e['sample_next']:7.3f} "
              f"{e.get('prefill_loop_ms', float('nan')):12.1f} {e.get('prefill_varlen_ms', float('nan')):7.1f} "
              f"{e.get('fork_ms', float('nan')):7.1f}")
    if args.kernels:
        for name, e in report["models"].items():
            print(f"\n{name}: {e['kernels_per_step']:.0f} kernels per step ({e['kernels_per_step'] / args.layers:.1f} "
                  f"per layer); top kernels (us per step, calls per step):")
            for r in e["top_kernels"][:12]:
                print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
    if args.sweep_ssm:
        print(f"\nSSM step alone at batch {args.batch} (Llamba shape, fp32 state read + write):")
        for r in report["ssm_sweep"]:
            print(f"  block_p {r['block_p']:3d} warps {r['num_warps']}: {r['ms']:.3f} ms  {r['GBps']:6.0f} GB/s")
    report["failures"] = failures
    report["total_s"] = time.perf_counter() - t_start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile_decode.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'CHECK FAILURES: ' + '; '.join(failures) if failures else 'checks: ' + ('ok' if args.check else 'skipped')}"
          f"; total {report['total_s']:.0f}s; wrote {out / 'profile_decode.json'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
