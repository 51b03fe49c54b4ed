"""`thinkfast generate`: sample completions from a checkpoint with the generation engine.

    thinkfast generate --model ckpt/llamba --prompt "What is 7*8?" --chat --n 4 --temperature 0.8
    thinkfast generate --model ckpt/teacher --prompt "The capital of France is" --max-new-tokens 16 --temperature 0
"""
from __future__ import annotations

import argparse
import json

import torch


def add_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--model", required=True, help="checkpoint directory (Llamba, MambaInLlama or Llama)")
    parser.add_argument("--prompt", required=True, action="append", help="prompt text (repeat for several)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    parser.add_argument("--n", type=int, default=1, help="samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="print the completions as JSON lines")


def run(args) -> int:
    from harness_ext.generation.engine import Engine, SamplingParams

    # bad sampling arguments fail here, before the model loads
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop_strings=tuple(args.stop))
    if args.n < 1:
        raise SystemExit(f"--n must be >= 1, got {args.n}")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    engine = Engine.from_pretrained(args.model, device=args.device, dtype=dtype, max_batch_size=args.max_batch_size)
    prompts = [[{"role": "user", "content": p}] if args.chat else p for p in args.prompt]
    outs = engine.generate(prompts, params, n=args.n, seed=args.seed)
    for i, samples in enumerate(outs):
        for j, c in enumerate(samples):
            if args.json:
                print(json.dumps(dict(prompt=i, sample=j, text=c.text, finish_reason=c.finish_reason,
                                      num_tokens=c.num_tokens)))
            else:
                print(f"=== prompt {i} sample {j} ({c.num_tokens} tokens, {c.finish_reason}) ===")
                print(c.text)
    return 0
