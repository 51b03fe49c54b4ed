"""Kernel time per `decode_step` of each student (torch.profiler, CUDA graph off), SmolLM2-135M width, random weights.

    python scripts/profile_decode.py --out runs/profile_decode --batch 1024 --layers 4
    python scripts/profile_decode.py --out /tmp/profile_decode --device cpu --batch 2 --layers 2   # CPU smoke test

Prints, per model, the top kernels by total device time over --steps steps, and the kernel launches per step;
writes profile_decode.json to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness_ext.generation.bench import SMOLLM2_135M  # noqa: E402
from harness_ext.models.llamba import LlambaConfig, LlambaForCausalLM  # noqa: E402
from harness_ext.models.mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM  # noqa: E402


def build(name, layers):
    cfg = dict(SMOLLM2_135M, num_hidden_layers=layers)
    if name == "llamba":
        return LlambaForCausalLM(LlambaConfig(vocab_size=cfg["vocab_size"], hidden_size=576, intermediate_size=1536,
                                              num_hidden_layers=layers, n_qk_heads=9, n_v_heads=9, d_state=64))
    attn = list(range(layers)) if name == "teacher" else list(range(0, layers, 2))
    return MambaInLlamaForCausalLM(MambaInLlamaConfig(attn_layers=attn, **cfg))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=768, help="max_seqlen of the state; slots sit at context/2")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    activity = torch.profiler.ProfilerActivity.CUDA if device.type == "cuda" else torch.profiler.ProfilerActivity.CPU
    report = {}
    for name in ("teacher", "mil50", "llamba"):
        model = build(name, args.layers).to(device=device, dtype=dtype).eval()
        state = model.allocate_decode_state(args.batch, args.context, device=device)
        tokens = torch.zeros(args.batch, dtype=torch.long, device=device)
        with torch.inference_mode():
            for _ in range(3):
                state.seqlens.fill_(args.context // 2)
                model.decode_step(tokens, state)
            with torch.profiler.profile(activities=[activity]) as prof:
                for _ in range(args.steps):
                    state.seqlens.fill_(args.context // 2)
                    model.decode_step(tokens, state)
                if device.type == "cuda":
                    torch.cuda.synchronize()
        events = prof.key_averages()
        key = "device_time_total" if device.type == "cuda" else "cpu_time_total"
        rows = sorted(({"kernel": e.key[:90], "calls_per_step": e.count / args.steps,
                        "us_per_step": getattr(e, key) / args.steps} for e in events if getattr(e, key) > 0),
                      key=lambda r: -r["us_per_step"])
        if device.type == "cuda":
            rows = [r for r in rows if not r["kernel"].startswith(("aten::", "cuda", "Memcpy", "Memset"))] or rows
        total = sum(r["us_per_step"] for r in rows)
        launches = sum(r["calls_per_step"] for r in rows)
        print(f"\n{name}: batch {args.batch}, {args.layers} layers: {total / 1e3:.3f} ms/step of kernels, "
              f"{launches:.0f} launches/step ({launches / args.layers:.1f} per layer)")
        for r in rows[:14]:
            print(f"  {r['us_per_step']:9.1f} us  x{r['calls_per_step']:5.1f}  {r['kernel']}")
        report[name] = {"ms_per_step": total / 1e3, "launches_per_step": launches, "top": rows[:30]}
        del model, state
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "batch": args.batch,
            "layers": args.layers, "context": args.context}
    (out / "profile_decode.json").write_text(json.dumps(dict(meta, models=report), indent=2))


if __name__ == "__main__":
    main()
