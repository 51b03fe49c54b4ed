"""Check mamba-ssm's Triton kernels against the PyTorch references, forward and backward, in bf16.

On an H100 (mamba-ssm 2.3.2.post1 installed, CUDA extension not needed):
    python scripts/gpu_check_kernels.py --out runs/gpu_check
CPU smoke test (reference against itself, small sizes):
    python scripts/gpu_check_kernels.py --out /tmp/gpu_check --device cpu --seqlen 96 --batch 2 --layers 2

Both architectures at SmolLM2-135M width (hidden 576, 9 query / 3 KV heads, head_dim 64), packed batches with
seq_idx boundaries. For each tensor (logits, loss, every parameter gradient; the scan's output and input grads;
ssd_step's output and state) prints max|a - b| / max|b| between the kernel path (THINKFAST_KERNELS=triton, or =ref
on CPU) and the reference (THINKFAST_KERNELS=ref), asserts <= --tol (1e-2), and writes the table as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness_ext.models import ssd  # noqa: E402
from harness_ext.models.llamba import LlambaConfig, LlambaForCausalLM  # noqa: E402
from harness_ext.models.mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM  # noqa: E402


def rel_err(a, b) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def with_kernels(mode, fn):
    old = os.environ.get("THINKFAST_KERNELS")
    os.environ["THINKFAST_KERNELS"] = mode
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("THINKFAST_KERNELS")
        else:
            os.environ["THINKFAST_KERNELS"] = old


def packed_batch(batch, seqlen, vocab, device, gen):
    ids = torch.randint(0, vocab, (batch, seqlen), generator=gen).to(device)
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for b in range(batch):
        cuts = sorted(torch.randint(1, seqlen, (3,), generator=gen).tolist())
        for c in cuts:
            seq_idx[b, c:] += 1
    return ids, seq_idx.to(device)


def build(arch, layers, vocab, chunk):
    common = dict(vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                  tie_word_embeddings=True)
    if arch == "mambainllama":
        config = MambaInLlamaConfig(num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                    attn_layers=[layers // 2], ssm_chunk_size=chunk, max_position_embeddings=8192,
                                    **common)
        return MambaInLlamaForCausalLM(config)
    config = LlambaConfig(n_qk_heads=9, n_v_heads=9, d_state=64, d_inner=576, ssm_chunk_size=chunk, **common)
    return LlambaForCausalLM(config)


def model_run(model, ids, seq_idx):
    model.zero_grad(set_to_none=True)
    out = model(ids, seq_idx=seq_idx, labels=ids)
    out.loss.backward()
    tensors = {"logits": out.logits.detach(), "loss": out.loss.detach()}
    for name, p in model.named_parameters():
        if p.grad is not None:
            tensors[f"grad:{name}"] = p.grad.detach().clone()
    return tensors


def scan_run(inputs, seq_idx, chunk):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, final = ssd.ssd_scan(leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], D=leaves["D"],
                            seq_idx=seq_idx, dt_bias=leaves["dt_bias"], dt_softplus=True, chunk_size=chunk,
                            return_final_states=True)
    (y.float().square().mean() + final.float().square().mean()).backward()
    out = {"scan:y": y.detach(), "scan:final_state": final.detach()}
    out.update({f"scan:grad_{k}": v.grad for k, v in leaves.items()})
    return out


def step_run(inputs):
    state = inputs["state"].clone()
    y = ssd.ssd_step(state, inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], D=inputs["D"],
                     dt_bias=inputs["dt_bias"], dt_softplus=True)
    return {"step:y": y, "step:state": state}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--tol", type=float, default=1e-2)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    kernel = "triton" if device.type == "cuda" else "ref"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if kernel == "triton" and not ssd.triton_available():
        raise SystemExit(f"mamba-ssm Triton kernels not importable: {ssd._MAMBA_TRITON_ERROR}")
    print(f"device={device} kernel path={kernel} vs ref, dtype={dtype}, batch={args.batch}, seqlen={args.seqlen}")
    gen = torch.Generator().manual_seed(0)
    rows = []

    def compare(group, fn):
        start = time.time()
        got = with_kernels(kernel, fn)
        ref = with_kernels("ref", fn)
        for name in ref:
            rows.append({"group": group, "tensor": name, "max_rel_err": rel_err(got[name], ref[name])})
        print(f"  {group}: {len(ref)} tensors in {time.time() - start:.1f}s")

    ids, seq_idx = packed_batch(args.batch, args.seqlen, args.vocab, device, gen)
    for arch in ("mambainllama", "llamba"):
        torch.manual_seed(0)
        model = build(arch, args.layers, args.vocab, args.chunk).to(device=device, dtype=dtype).train()
        compare(arch, lambda: model_run(model, ids, seq_idx))
        del model

    heads, headdim, dstate = 9, 64, 64
    b, l = args.batch, args.seqlen
    scan_inputs = {"x": torch.randn(b, l, heads, headdim, generator=gen), "dt": torch.randn(b, l, heads, generator=gen),
                   "A": -torch.rand(heads, generator=gen) * 4, "B": torch.randn(b, l, 3, dstate, generator=gen) / 8,
                   "C": torch.randn(b, l, 3, dstate, generator=gen) / 8, "D": torch.randn(heads, generator=gen),
                   "dt_bias": torch.randn(heads, generator=gen) - 2}
    scan_inputs = {k: (v.to(device, dtype) if k in ("x", "B", "C") else v.to(device)) for k, v in scan_inputs.items()}
    compare("ssd_scan", lambda: scan_run(scan_inputs, seq_idx, args.chunk))

    step_inputs = {"state": torch.randn(b * 8, heads, headdim, dstate, generator=gen),
                   "x": torch.randn(b * 8, heads, headdim, generator=gen), "dt": torch.randn(b * 8, heads, generator=gen),
                   "A": -torch.rand(heads, generator=gen) * 4, "B": torch.randn(b * 8, 3, dstate, generator=gen) / 8,
                   "C": torch.randn(b * 8, 3, dstate, generator=gen) / 8, "D": torch.randn(heads, generator=gen),
                   "dt_bias": torch.randn(heads, generator=gen) - 2}
    step_inputs = {k: (v.to(device, dtype) if k in ("x", "B", "C") else v.to(device)) for k, v in step_inputs.items()}
    compare("ssd_step", lambda: step_run(step_inputs))

    width = max(len(r["group"]) + len(r["tensor"]) for r in rows) + 3
    print(f"\n{'tensor':<{width}} max_rel_err")
    for r in rows:
        flag = "" if r["max_rel_err"] <= args.tol else "   <-- FAIL"
        print(f"{r['group'] + ': ' + r['tensor']:<{width}} {r['max_rel_err']:.3e}{flag}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"device": str(device), "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
              "kernel": kernel, "dtype": str(dtype), "batch": args.batch, "seqlen": args.seqlen, "layers": args.layers,
              "tol": args.tol, "rows": rows}
    (out / "gpu_check_kernels.json").write_text(json.dumps(result, indent=2))
    worst = max(rows, key=lambda r: r["max_rel_err"])
    print(f"\nworst: {worst['group']}: {worst['tensor']} {worst['max_rel_err']:.3e}; wrote {out / 'gpu_check_kernels.json'}")
    assert worst["max_rel_err"] <= args.tol, f"{worst} exceeds tol {args.tol}"


if __name__ == "__main__":
    main()
