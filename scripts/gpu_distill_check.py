"""Distil both students from the real teacher and report speed and quality (the issue-5 targets).

    # one H100: both recipes at their full budgets (~8 min each), then table + JSON
    python scripts/gpu_distill_check.py --out runs/distill_check
    # 2-GPU scaling: the same short KD run on 1 GPU and through torchrun on every visible GPU
    python scripts/gpu_distill_check.py --out runs/distill_scaling --recipes mambainllama --scaling-tokens 8e6
    # the same, both runs at once on disjoint GPUs (1 GPU | the other visible GPUs; 3 GPUs -> 1 vs 2)
    CUDA_VISIBLE_DEVICES=1,2,3 python scripts/gpu_distill_check.py --out runs/distill_scaling \
        --recipes mambainllama --scaling-tokens 6e6 --parallel
    # CPU smoke (tiny budgets, seconds per stage)
    python scripts/gpu_distill_check.py --out /tmp/distill_check --smoke
    # time and MFU only, in one device call: the teacher's config and tokenizer (no weights need to travel:
    # `thinkfast teacher --gguf ...` output minus its *.safetensors) with random weights; agreement is meaningless
    python scripts/gpu_distill_check.py --out runs/timing --teacher teacher_config_only/ --random-weights --recipes llamba

Targets: >= 35% MFU; held-out top-1 agreement with the teacher >= 0.80 (MambaInLlama-50%) and >= 0.70 (Llamba),
far above the init student; 2 GPUs: same loss curve within noise, >= 1.7x tokens/s.
Writes OUT/summary.json and, per recipe, the distillation output under OUT/<recipe>/.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def metrics(stage_dir: Path) -> list[dict]:
    path = stage_dir / "metrics.jsonl"
    return [json.loads(line) for line in open(path)] if path.is_file() else []


def speed(rows: list[dict]) -> dict:
    steady = rows[2:] or rows  # the first logs include compilation / allocator warm-up
    tok = [r["tokens_per_s"] for r in steady]
    mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
    return {"tokens_per_s": statistics.median(tok) if tok else None, "mfu": statistics.median(mfu) if mfu else None}


def random_weight_teacher(src: str, dst: Path, seed: int = 0) -> str:
    """A Llama with `src`'s config and tokenizer and random weights, saved in `dst` (fp32, as `thinkfast teacher`
    saves). Its data, tokens and shapes are the real teacher's, so a distillation from it should take the real
    run's time and MFU; its held-out agreement says nothing. `src` needs config.json and the tokenizer files only."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(src)
    if config.model_type != "llama":
        raise SystemExit(f"--random-weights: {src} holds a {config.model_type!r} config; expected a Llama teacher")
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return str(dst)


def run_recipe(recipe_name: str, teacher: str, out: Path, smoke: bool, max_tokens, compile_: bool) -> dict:
    from distill.cli import apply_override, distill, load_recipe, merge
    recipe = load_recipe(recipe_name)
    if smoke:
        recipe = merge(recipe, recipe.get("smoke", {}))
    if compile_:
        apply_override(recipe, "defaults.compile=true")
    t0 = time.time()
    result = distill(recipe, teacher, str(out / recipe_name), max_tokens=max_tokens)
    wall = time.time() - t0
    stages = {}
    for sd in sorted((out / recipe_name / "stages").iterdir()):
        rows = metrics(sd)
        stages[sd.name] = {**speed(rows), "tokens": rows[-1]["tokens"] if rows else 0,
                           "first_loss": rows[0]["loss"] if rows else None, "last_loss": rows[-1]["loss"] if rows else None}
    ev = result["eval"]
    init = ev.get("init") or json.loads((out / recipe_name / "init" / "eval.json").read_text())
    final = ev[list(ev)[-1]] if ev else {}
    return {"recipe": recipe_name, "wall_s": wall, "stages": stages, "init_eval": init, "final_eval": final}


def scaling(recipe_name: str, teacher: str, out: Path, tokens: float, smoke: bool, parallel: bool = False) -> dict:
    import torch
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if not visible and torch.cuda.is_available():
        visible = [str(i) for i in range(torch.cuda.device_count())]
    # --parallel: the 1-process run takes the first GPU and the n-process run the others, both at once
    groups = {1: visible[:1], max(1, len(visible) - 1): visible[1:]} if parallel else None
    n = (len(visible) - 1 if parallel else len(visible)) or 2
    if parallel and (len(visible) < 3):
        raise SystemExit(f"--parallel needs at least 3 visible GPUs (1 | 2+), found {len(visible)}")
    base = [sys.executable, "-m", "harness_ext.cli", "distill", "--recipe", recipe_name, "--teacher", teacher,
            "--max-tokens", str(tokens)] + (["--smoke"] if smoke else [])
    procs_running = {}
    for procs in (1, n):
        o = out / f"scaling_{procs}"
        cmd = base + ["--out", str(o)]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   "-m", "harness_ext.cli"] + base[3:] + ["--out", str(o)]
        # Same global batch per step: 1 process accumulates what n processes do in parallel; log often enough
        # for a loss curve of a short run.
        extra = ["defaults.log_every=5"] + (["defaults.grad_accum=2"] if procs > 1 else [f"defaults.grad_accum={2 * n}"])
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if groups:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(groups[procs])
        proc = subprocess.Popen(cmd + extra, env=env)
        if not parallel:
            proc.wait()
        procs_running[procs] = proc
    for procs, proc in procs_running.items():
        if proc.wait() != 0:
            raise SystemExit(f"scaling run with {procs} process(es) failed with status {proc.returncode}")
    res = {}
    for procs in (1, n):
        rows = metrics(sorted((out / f"scaling_{procs}" / "stages").iterdir())[0])
        res[procs] = {**speed(rows), "losses": [r["loss"] for r in rows]}
    one, many = res[1], res[n]
    diffs = [abs(a - b) for a, b in zip(one["losses"], many["losses"])]
    return {"recipe": recipe_name, "gpus": n, "concurrent": parallel, "one": one, "many": many,
            "speedup": (many["tokens_per_s"] / one["tokens_per_s"]) if one["tokens_per_s"] else None,
            "max_loss_diff": max(diffs) if diffs else None}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--teacher", default=None, help="teacher dir (default: convert the embedded SmolLM2-135M)")
    ap.add_argument("--recipes", default="mambainllama,llamba")
    ap.add_argument("--max-tokens", type=float, default=None, help="override each recipe's total budget")
    ap.add_argument("--scaling-tokens", type=float, default=None, help="run the 1-GPU vs N-GPU comparison instead")
    ap.add_argument("--parallel", action="store_true",
                    help="scaling: run the 1-GPU and the N-GPU run at once on disjoint GPUs (needs N+1 visible)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--random-weights", action="store_true",
                    help="time and MFU only: the teacher's config and tokenizer with random weights (see the docstring)")
    args = ap.parse_args()
    os.environ.setdefault("THINKFAST_DATA_DIR", str(REPO.parent / "shared" / "data"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = args.teacher
    if teacher is None:
        from harness_ext.teacher import convert_teacher
        teacher = str(convert_teacher("smollm2-135m-instruct"))
    if args.random_weights:
        if args.teacher is None:
            raise SystemExit("--random-weights needs --teacher (a directory with the teacher's config and tokenizer)")
        teacher = random_weight_teacher(teacher, out / "random-weight-teacher")
    summary = {"teacher": teacher, "random_weights": args.random_weights, "recipes": [], "scaling": []}
    for name in args.recipes.split(","):
        if args.scaling_tokens:
            summary["scaling"].append(scaling(name, teacher, out, args.scaling_tokens, args.smoke, args.parallel))
        else:
            summary["recipes"].append(run_recipe(name, teacher, out, args.smoke, args.max_tokens, args.compile))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    fmt = lambda v, f: "-" if v is None else format(v, f)
    if summary["recipes"]:
        print(f"\n{'recipe':<14}{'stage':<12}{'tokens':>12}{'tok/s':>10}{'MFU':>7}{'loss first->last':>22}")
        for r in summary["recipes"]:
            for st, s in r["stages"].items():
                print(f"{r['recipe']:<14}{st:<12}{s['tokens']:>12,}{fmt(s['tokens_per_s'], ',.0f'):>10}"
                      f"{fmt(s['mfu'] and 100 * s['mfu'], '.1f'):>7}{fmt(s['first_loss'], '.4f'):>11}->{fmt(s['last_loss'], '.4f')}")
        print(f"\n{'recipe':<14}{'wall s':>8}{'top1 init':>11}{'top1 final':>11}{'KL init':>9}{'KL final':>9}")
        for r in summary["recipes"]:
            i, f = r["init_eval"], r["final_eval"]
            print(f"{r['recipe']:<14}{r['wall_s']:>8.0f}{fmt(i.get('top1_agreement'), '.3f'):>11}"
                  f"{fmt(f.get('top1_agreement'), '.3f'):>11}{fmt(i.get('kl_forward'), '.3f'):>9}{fmt(f.get('kl_forward'), '.3f'):>9}")
    if args.random_weights:
        print("(random-weight teacher: the agreement and KL columns say nothing; "
              "time, tokens/s and MFU stand for the real run's)")
    for s in summary["scaling"]:
        print(f"\nscaling {s['recipe']}: 1 proc {fmt(s['one']['tokens_per_s'], ',.0f')} tok/s, {s['gpus']} procs "
              f"{fmt(s['many']['tokens_per_s'], ',.0f')} tok/s, speedup {fmt(s['speedup'], '.2f')}x, "
              f"max |loss diff| {fmt(s['max_loss_diff'], '.4f')}")
    print(f"\nwrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
