"""`thinkfast distill`: distil a Llamba (MOHAWK) or MambaInLlama (reverse KL) student from a Llama teacher.

    thinkfast distill --recipe mambainllama --teacher ckpt/teacher --out ckpt/mil50
    thinkfast distill --recipe llamba --teacher ckpt/teacher --out ckpt/llamba                 # all 3 stages
    thinkfast distill --recipe llamba --teacher ckpt/teacher --out ckpt/llamba --stage hidden  # one stage
    thinkfast distill --recipe mambainllama --teacher T --out O --max-tokens 20e6 defaults.lr=5e-4 init.attn_fraction=0.25
    thinkfast distill --recipe mambainllama --teacher T --out O --smoke                        # CPU, seconds
    thinkfast distill --recipe mambainllama --teacher T --out O --hf-dataset openai/gsm8k --hf-config main \
        --fields problem=question,solution=answer
    torchrun --nproc_per_node 2 -m harness_ext.cli distill --recipe mambainllama --teacher T --out O

Layout of OUT: `init/` (the untrained student from `thinkfast init`'s code), `stages/<k>-<name>/` (checkpoints,
`metrics.jsonl`, `final/`, `eval.json`), `eval.jsonl` (held-out KL / top-1 agreement of the init student and after
every stage), `decontamination.json`, and the final student itself (HF files at the top of OUT).
Re-running the same command resumes: finished stages are skipped, an interrupted one continues from its latest
checkpoint. The teacher runs in the same process (no precomputed logits).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


# ----------------------------------------------------------------------------- recipes

def load_recipe(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.is_file():
        path = RECIPES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe {name_or_path!r}; known recipes: {known} (or pass a YAML path)")
    recipe = yaml.safe_load(path.read_text())
    for key in ("arch", "data", "defaults", "stages"):
        if key not in recipe:
            raise ValueError(f"recipe {path} has no {key!r} section")
    return recipe


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def apply_override(recipe: dict, item: str):
    """'stages.kd.max_tokens=2e6' -> recipe['stages']['kd']['max_tokens'] = 2000000 (values parsed as YAML)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} is not key=value (e.g. defaults.lr=5e-4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            pass
    node, parts = recipe, key.strip().split(".")
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise KeyError(f"override {item!r}: no section {p!r} (sections: {sorted(k for k, v in node.items() if isinstance(v, dict))})")
        node = node[p]
    node[parts[-1]] = value


def stage_configs(recipe: dict, only: str | None = None, max_tokens: float | None = None):
    from distill.trainer import StageConfig
    fields = {f for f in StageConfig.__dataclass_fields__}
    stages = []
    for name, over in recipe["stages"].items():
        cfg = merge(recipe["defaults"], over or {})
        cfg.setdefault("seq_len", recipe["data"].get("seq_len", 2048))
        unknown = set(cfg) - fields
        if unknown:
            raise ValueError(f"stage {name!r}: unknown setting(s) {sorted(unknown)}; known: {sorted(fields - {'name'})}")
        cfg["max_tokens"] = int(float(cfg.get("max_tokens", 0)))
        stages.append(StageConfig(name=name, **cfg))
    active = [s for s in stages if s.max_tokens > 0]
    if max_tokens:
        total = sum(s.max_tokens for s in active)
        for s in active:
            s.max_tokens = max(1, int(s.max_tokens * float(max_tokens) / total))
    if only is not None:
        names = [s.name for s in stages]
        if only not in names:
            raise ValueError(f"recipe has no stage {only!r}; stages: {names}")
    return stages


# ----------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", required=True, help="llamba | mambainllama | path to a recipe YAML")
    parser.add_argument("--teacher", required=True, help="teacher checkpoint directory (thinkfast teacher --out ...)")
    parser.add_argument("--out", required=True, help="output directory (re-run to resume)")
    parser.add_argument("--stage", default=None, help="run only this stage (the previous stage must be finished)")
    parser.add_argument("--max-tokens", type=float, default=None, help="total token budget, split over stages as in the recipe")
    parser.add_argument("--smoke", action="store_true", help="tiny data and budget (CPU, seconds): the recipe's smoke section")
    parser.add_argument("--hf-dataset", action="append", default=[], help="extra hub dataset id (needs --fields)")
    parser.add_argument("--hf-config", default=None)
    parser.add_argument("--hf-split", default="train")
    parser.add_argument("--jsonl", action="append", default=[], help="extra local JSONL file (needs --fields)")
    parser.add_argument("--fields", default=None, help="column mapping for --hf-dataset/--jsonl: problem=question,solution=answer")
    parser.add_argument("--drop-contaminated", action="store_true", default=None,
                        help="drop records that contain a MATH-500 / GSM8K test problem (default: refuse to train)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile regions of the student and teacher (default: the recipe's `compile`, "
                             "else on for CUDA; falls back to eager with a warning if compilation fails)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak per GPU for the MFU column (default: looked up from the device name; "
                             "same as env THINKFAST_PEAK_FLOPS in FLOP/s)")
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value, e.g. defaults.lr=5e-4 stages.kd.max_tokens=1e6")


def build_recipe(args) -> dict:
    recipe = load_recipe(args.recipe)
    if args.smoke:
        recipe = merge(recipe, recipe.get("smoke", {}))
    for item in args.overrides:
        apply_override(recipe, item)
    data = recipe["data"]
    data["sources"] = list(data.get("sources", [])) + [f"hf:{d}" for d in args.hf_dataset] + [f"jsonl:{p}" for p in args.jsonl]
    if (args.hf_dataset or args.jsonl) and not args.fields:
        raise SystemExit("--hf-dataset / --jsonl need --fields (e.g. problem=question,solution=answer)")
    if args.fields:
        data["fields"] = args.fields
    if args.hf_config:
        data["hf_config"] = args.hf_config
    data["hf_split"] = args.hf_split
    if args.drop_contaminated is not None:
        data["drop_contaminated"] = True
    if args.compile is not None:
        recipe["defaults"]["compile"] = bool(args.compile)
    if getattr(args, "peak_tflops", None):
        os.environ["THINKFAST_PEAK_FLOPS"] = str(float(args.peak_tflops) * 1e12)
    return recipe


def run(args: argparse.Namespace) -> int:
    recipe = build_recipe(args)
    result = distill(recipe, teacher_dir=args.teacher, out_dir=args.out, only_stage=args.stage,
                     max_tokens=args.max_tokens)
    from distill.trainer import dist_info
    if dist_info()[0] == 0:
        print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------- pipeline

def _log(msg: str):
    from distill.trainer import dist_info
    if dist_info()[0] == 0:
        print(f"[distill] {msg}", flush=True)


def prepare_data(recipe: dict, tokenizer, teacher_dir: str, out_dir: Path):
    """Records -> decontaminated -> held-out split -> (+ teacher samples) -> rendered documents."""
    from distill import data as D
    from distill.trainer import barrier, dist_info
    cfg = recipe["data"]
    records = []
    plain = [s for s in cfg["sources"] if not s.startswith(("hf:", "jsonl:"))]
    mapped = [s for s in cfg["sources"] if s.startswith(("hf:", "jsonl:"))]
    if plain:
        records += D.load_records(plain, limit=cfg.get("limit"))
    if mapped:
        records += D.load_records(mapped, fields=cfg.get("fields"), hf_config=cfg.get("hf_config"),
                                  hf_split=cfg.get("hf_split", "train"), limit=cfg.get("limit"))
    kept, report = D.decontaminate(records, drop=bool(cfg.get("drop_contaminated", False)))
    if dist_info()[0] == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "decontamination.json").write_text(json.dumps(report, indent=1))
    if report["matched"]:
        _log(f"decontamination: dropped {report['dropped']} of {report['checked']} records that contain a test "
             f"problem (details in {out_dir / 'decontamination.json'})")
    train, heldout = D.heldout_split(kept, int(cfg.get("heldout_problems", 256)), seed=int(cfg.get("seed", 0)))
    n_samples = int(cfg.get("teacher_samples", 0))
    if n_samples > 0:
        cache = out_dir / "teacher_samples.jsonl"
        if dist_info()[0] == 0:
            D.teacher_solutions(teacher_dir, train, n_samples, cache, seed=int(cfg.get("seed", 0)),
                                max_new_tokens=int(cfg.get("teacher_max_new_tokens", 512)))
        barrier()
        extra = D.teacher_solutions(teacher_dir, train, n_samples, cache)
        extra, _ = D.decontaminate(extra, drop=True)
        train = train + extra
    assistant_only = bool(cfg.get("assistant_only", False))
    docs = D.render_documents(train, tokenizer, assistant_only)
    held_docs = D.render_documents(heldout, tokenizer, assistant_only)
    _log(f"data: {len(train)} train records ({sum(len(d.ids) for d in docs):,} tokens), "
         f"{len(heldout)} held-out train problems")
    return docs, held_docs


def eval_batches(held_docs, seq_len: int, n_rows: int, batch_size: int):
    from distill.data import PackedStream
    stream = PackedStream(held_docs, seq_len, shuffle=False)
    n_rows = min(n_rows, stream.rows_per_epoch)
    return [stream.rows(range(i, min(i + batch_size, n_rows))) for i in range(0, n_rows, batch_size)]


def build_student(arch: str, teacher_dir: str, init_cfg: dict, out: Path, teacher=None, docs=None, seq_len=2048):
    """The untrained student, built by `thinkfast init`'s code and saved once under OUT/init; with
    `calibrate_rows: N` in the recipe's init section, MOHAWK's closed-form stage 0 (`distill.mohawk.calibrate_mixers`)
    fits its mixers to the teacher's attention on N packed training rows first (report in OUT/init/calibration.json)."""
    from distill.trainer import atomic_save_dir, barrier, dist_info
    init_cfg = dict(init_cfg)
    calibrate_rows = int(init_cfg.pop("calibrate_rows", 0) or 0)
    if dist_info()[0] == 0 and not (out / "config.json").is_file():
        from harness_ext.models.init_from_teacher import init_student
        atomic_save_dir(out, lambda tmp: init_student(teacher_dir, arch, out_dir=tmp, **init_cfg))
    # Also for an init copied in from elsewhere (`thinkfast reproduce` shares one init stage): calibrated once.
    if dist_info()[0] == 0 and calibrate_rows > 0 and not (out / "calibration.json").is_file():
        def write(tmp):
            shutil.copytree(out, tmp, dirs_exist_ok=True)
            (Path(tmp) / "eval.json").unlink(missing_ok=True)       # it described the uncalibrated student
            student = load_student(out, "cpu")
            report = calibrate_student(student, teacher, docs, calibrate_rows, seq_len)
            student.save_pretrained(str(tmp))
            (Path(tmp) / "calibration.json").write_text(json.dumps(report, indent=1))
        atomic_save_dir(out, write)
    # Unconditional: a rank that checked the file after rank 0 wrote it would otherwise skip this barrier and
    # pair with the next one, deadlocking the run.
    barrier()


def calibrate_student(student, teacher, docs, rows: int, seq_len: int) -> dict:
    import torch
    from distill.data import PackedStream
    from distill.mohawk import calibrate_mixers
    if teacher is None or not docs:
        raise ValueError("calibrate_rows needs the teacher and training documents")
    device = next(teacher.parameters()).device
    stream = PackedStream(docs, seq_len, seed=1)         # not the stages' order (seed 0), nor held-out data
    batch = {k: v.to(device) for k, v in stream.rows(range(min(rows, stream.rows_per_epoch))).items()}
    student.to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        heads = calibrate_mixers(student, teacher, batch)
    student.to("cpu")
    # the median: a few uncalibrated heads' outputs are ~1e9 times their targets, and a mean of 8.7e8 says nothing
    median = lambda key: statistics.median(h[key] for h in heads)  # noqa: E731
    _log(f"calibration (MOHAWK stage 0) on {batch['input_ids'].numel():,} tokens: median relative residual of the "
         f"mixer outputs {median('residual_before'):.3g} -> {median('residual_after'):.3g} over {len(heads)} heads")
    return {"tokens": int(batch["input_ids"].numel()), "heads": heads}


def load_student(path: Path, device):
    import torch
    from transformers import AutoModelForCausalLM
    import harness_ext.models as models
    models.register()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)


def make_objective(cfg, student):
    from distill.kd import KDObjective, SFTObjective
    from distill.mohawk import HiddenObjective, MatrixObjective
    if cfg.objective == "kd":
        return KDObjective(student, cfg.divergence, cfg.temperature, cfg.ce_weight, chunked=cfg.chunked_loss,
                           chunk_tokens=cfg.loss_chunk_tokens)
    if cfg.objective == "sft":
        return SFTObjective(student, chunked=cfg.chunked_loss, chunk_tokens=cfg.loss_chunk_tokens)
    if cfg.objective == "mohawk_matrix":
        return MatrixObjective(student)
    if cfg.objective == "mohawk_hidden":
        return HiddenObjective(student)
    raise ValueError(f"unknown objective {cfg.objective!r}; choose kd, sft, mohawk_matrix, mohawk_hidden")


def drop_checkpoints(stage_dir: Path):
    for ckpt in stage_dir.glob("checkpoint-*"):
        shutil.rmtree(ckpt, ignore_errors=True)
    (stage_dir / "latest").unlink(missing_ok=True)


def export_final(src: Path, out: Path):
    """Copy the final student's HF files to the top of OUT, each file replaced atomically."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-export-", dir=out))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in ("optimizer.pt", "trainer_state.json"):
                shutil.copy2(f, tmp / f.name)
                with open(tmp / f.name, "rb") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp / f.name, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def distill(recipe: dict, teacher_dir: str, out_dir: str, only_stage: str | None = None,
            max_tokens: float | None = None, fault_hook=None, progress: bool = True) -> dict:
    import torch.distributed as dist

    # a process group left alive at exit can abort a gloo rank during interpreter shutdown (SIGABRT after the
    # work is done); one that a caller set up is the caller's to end
    owns_group = not dist.is_initialized()
    try:
        return _distill(recipe, teacher_dir, out_dir, only_stage, max_tokens, fault_hook, progress)
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _distill(recipe: dict, teacher_dir: str, out_dir: str, only_stage: str | None, max_tokens: float | None,
             fault_hook, progress: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.data import PackedStream
    from distill.trainer import Trainer, barrier, dist_info, evaluate, init_distributed, save_model_dir

    out = Path(out_dir)
    rank = dist_info()[0]
    device = init_distributed()
    stages = stage_configs(recipe, only_stage, max_tokens)
    seed = int(recipe["data"].get("seed", 0))
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(
        teacher_dir, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    docs, held_docs = prepare_data(recipe, tokenizer, teacher_dir, out)
    n_eval = int(recipe["data"].get("eval_rows", 32))
    eval_seq = int(recipe["data"].get("seq_len", 2048))

    def record_eval(name: str, student) -> dict:
        # The held-out metrics use full [rows, seq, vocab] fp32 logits: few rows per batch keeps them small.
        batches = eval_batches(held_docs, eval_seq, n_eval, max(1, min(4, stages[0].micro_batch_size)))
        result = {"stage": name, **evaluate(student, teacher, batches, device)} if rank == 0 else {}
        if rank == 0:
            with open(out / "eval.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            _log(f"eval after {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.items() if isinstance(v, float)))
        barrier()
        return result

    init_dir = out / "init"
    build_student(recipe["arch"], teacher_dir, dict(recipe.get("init", {})), init_dir, teacher=teacher, docs=docs,
                  seq_len=eval_seq)
    evals = {}
    if not (init_dir / "eval.json").is_file():
        evals["init"] = record_eval("init", load_student(init_dir, device))
        if rank == 0:
            (init_dir / "eval.json").write_text(json.dumps(evals["init"], indent=1))
    prev = init_dir
    for k, cfg in enumerate(stages):
        stage_dir = out / "stages" / f"{k}-{cfg.name}"
        final = stage_dir / "final"
        if cfg.max_tokens <= 0 or (only_stage and cfg.name != only_stage):
            if (final / "config.json").is_file():
                prev = final
            elif cfg.max_tokens > 0 and only_stage and [s.name for s in stages].index(only_stage) > k:
                raise RuntimeError(f"--stage {only_stage}: the earlier stage {cfg.name!r} has not finished "
                                   f"(no {final}); run it first")
            continue
        if (final / "trainer_state.json").is_file():
            _log(f"stage {cfg.name}: already finished ({final}), skipping")
            prev = final
            continue
        _log(f"stage {cfg.name} ({cfg.objective}): {cfg.max_tokens:,} tokens from {prev}")
        torch.manual_seed(cfg.seed)
        student = load_student(prev, device)
        objective = make_objective(cfg, student)
        stream = PackedStream(docs, cfg.seq_len, seed=cfg.seed + seed)
        trainer = Trainer(objective, teacher, stream, cfg, stage_dir, tokenizer=tokenizer, device=device,
                          fault_hook=fault_hook, progress=progress)
        train_result = trainer.train()
        ev = record_eval(cfg.name, student)
        if rank == 0:
            (stage_dir / "eval.json").write_text(json.dumps(ev, indent=1))
            state = trainer._state(trainer.total_steps)
            state.pop("rng")
            state.update(train_result=train_result, eval=ev)
            save_model_dir(final, student, tokenizer, state)
            # a stage with a final is never resumed mid-way: its checkpoints (with ~2x the weights in optimizer
            # state) would only fill the disk
            drop_checkpoints(stage_dir)
        barrier()
        evals[cfg.name] = ev
        prev = final
        del trainer, objective, student
    if rank == 0 and prev != init_dir:
        export_final(prev, out)
    barrier()
    return {"out": str(out), "final": str(prev), "eval": evals}
