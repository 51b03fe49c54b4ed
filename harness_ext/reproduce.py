"""`thinkfast reproduce`: the paper's experiment at 135M scale, in stages that run separately and resume.

    thinkfast reproduce                                   # GPU: full budgets (~45 min of H100), runs/reproduce
    thinkfast reproduce --smoke                           # CPU, minutes: tiny budgets, runs/reproduce-smoke
    thinkfast reproduce --stages eval-teacher,eval-mil    # a subset (their inputs must be finished already)
    thinkfast reproduce --force distill-mil               # re-run one stage from scratch (and what depends on it)
    thinkfast reproduce --workdir runs/r2 --publish leaderboards/

Without a CUDA device `--smoke` is implied (and said so): the same path with tiny budgets (a few distillation
steps, 2 problems, N = 4 samples, short completions, a 2-layer throughput benchmark).

Stages, in order (each one a folder under --workdir, finished when its DONE.json stamp matches its inputs):

  teacher         convert the teacher (default: embedded SmolLM2-135M-Instruct) -> thinkfast's cache
  init            `thinkfast init` the two untrained students (MambaInLlama keeps every 2nd attention layer)
  distill-mil     `thinkfast distill --recipe mambainllama` (reverse KL), starting from init's student
  distill-llamba  `thinkfast distill --recipe llamba` (MOHAWK, 3 stages), starting from init's student
  prm             `thinkfast prm train` (the default process reward model on the teacher)
  eval-teacher    `lm_eval` gsm8k500_bon and math500_bon, N = 64, T = 0.8, with the PRM (teacher backend)
  eval-mil        the same for the distilled MambaInLlama (mambainllama backend)
  eval-llamba     the same for the distilled Llamba (llamba backend)
  bench           `thinkfast bench` (decode throughput vs batch size)
  leaderboard     `thinkfast leaderboard` over the three evals and the bench -> <workdir>/leaderboard/out

Every stage prints the exact commands it runs (run them by hand to reproduce one step) and logs them, with their
output, to <stage>/log.txt. A stage's inputs are its settings plus the identity of the stages it reads, so the
teacher's evaluation depends only on the teacher, the task settings and the PRM, never on a student: it is reused
when only student settings change. A stage folder holding the same inputs but no stamp (an interrupted run) keeps
its partial outputs: distillation resumes from its last checkpoint, evaluation from its last finished task.
The eval stages write `thinkfast_meta.json` (see harness_ext/leaderboard.py) next to lm-eval's results: the model,
architecture, parameters, distillation tokens, card, commit, and per task the generation wall-clock seconds,
generated tokens and number of samples. When the PRM stage is skipped, or fails in --smoke, evaluation runs
without a PRM and the leaderboard shows bon / weighted_bon as n/a.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

STAGES = ("teacher", "init", "distill-mil", "distill-llamba", "prm", "eval-teacher", "eval-mil", "eval-llamba",
          "bench", "leaderboard")
# hard dependencies: a stage runs only once these have a valid stamp
DEPENDS = {
    "teacher": (),
    "init": ("teacher",),
    "distill-mil": ("teacher", "init"),
    "distill-llamba": ("teacher", "init"),
    "prm": ("teacher",),
    "eval-teacher": ("teacher",),
    "eval-mil": ("distill-mil",),
    "eval-llamba": ("distill-llamba",),
    "bench": ("teacher",),
    "leaderboard": ("eval-teacher", "eval-mil", "eval-llamba"),
}
# soft dependencies: used when finished, left out (with a note) when not: eval without PRM, leaderboard without bench
SOFT_DEPENDS = {"eval-teacher": ("prm",), "eval-mil": ("prm",), "eval-llamba": ("prm",), "leaderboard": ("bench",)}

TASKS = ("gsm8k500_bon", "math500_bon")
STAMP = "DONE.json"
INPUTS = "INPUTS.json"
META_FILE = "thinkfast_meta.json"  # harness_ext.leaderboard.META_FILE
META_SCHEMA = "thinkfast_meta/1"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_TEACHER = "smollm2-135m-instruct"


@dataclasses.dataclass(frozen=True)
class Student:
    stage: str        # distill stage
    eval_stage: str
    recipe: str       # distill recipe name, also the `thinkfast init --arch`
    backend: str      # lm-eval --model
    name: str         # leaderboard display name
    bench_model: str  # its rows in bench.json


STUDENTS = {
    "mil": Student("distill-mil", "eval-mil", "mambainllama", "mambainllama", "mambainllama-50-135m", "mil50"),
    "llamba": Student("distill-llamba", "eval-llamba", "llamba", "llamba", "llamba-135m", "llamba"),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """What --smoke shrinks. Full: the paper's protocol at 135M; smoke: CPU in minutes."""
    n: int = 64                          # samples per problem
    temperature: float = 0.8
    limit: int | None = None             # problems per task (None: all 500)
    max_gen_toks: int | None = None      # None: the task YAML's (GSM8K 400, MATH 1024)
    distill_tokens: int | None = None    # per active distillation stage; None: the recipe's
    bench_args: tuple[str, ...] = ()
    leaderboard_args: tuple[str, ...] = ()


FULL = Budget()
SMOKE = Budget(n=4, limit=2, max_gen_toks=24, distill_tokens=256,
               bench_args=("--batches", "1,2", "--prompt-len", "16", "--gen-len", "8", "--layers", "2"),
               leaderboard_args=("--ks", "1", "2", "4", "--vote-k", "4", "--batches", "1", "2"))


class StageError(RuntimeError):
    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage!r} failed: {message}")
        self.stage = stage


# ----------------------------------------------------------------------------- small helpers

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def card_name(device: str) -> str:
    """The GPU's name, read without creating a CUDA context in this (long-lived) parent process."""
    if device != "cuda":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import torch
    return torch.cuda.get_device_name(0)


def display(cmd: list[str]) -> str:
    """The command as a user types it: `thinkfast ...` / `lm_eval ...` instead of this interpreter's path."""
    if cmd[:3] == [sys.executable, "-m", "harness_ext.cli"]:
        cmd = ["thinkfast", *cmd[3:]]
    elif cmd[:3] == [sys.executable, "-m", "lm_eval"]:
        cmd = ["lm_eval", *cmd[3:]]
    return shlex.join(cmd)


def thinkfast_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness_ext.cli", *args]


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link a checkpoint's files (no copy of the weights), copying where links are not possible."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file():
            target = dst / f.name
            if target.exists():
                target.unlink()
            try:
                os.link(f, target)
            except OSError:
                shutil.copy2(f, target)


# ----------------------------------------------------------------------------- the pipeline

class Reproduction:
    def __init__(self, workdir: Path, teacher: str, budget: Budget, smoke: bool, device: str, prm: str,
                 publish: Path | None = None, seed: int = 0):
        self.workdir = workdir
        self.teacher_spec = teacher
        self.budget = budget
        self.smoke = smoke
        self.device = device
        self.prm_choice = prm  # "train" (the prm stage), "none", or a PRM name / path for load_prm
        self.publish = publish
        self.seed = seed
        self.commit = git_commit()
        self.ran: dict[str, str] = {}  # stage -> "ran" | "skipped" | "failed (soft)"
        self.log_file = None

    # -- stamps

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage

    def stamp(self, stage: str) -> dict | None:
        return read_json(self.stage_dir(stage) / STAMP)

    def valid_stamp(self, stage: str) -> dict | None:
        """The stage's stamp if it is finished for its current inputs and every output it names still exists."""
        stamp = self.stamp(stage)
        if not stamp or stamp.get("stage") != stage:
            return None
        try:
            key = self.key(stage)
        except StageError:
            return None
        if stamp.get("key") != key:
            return None
        if not all(Path(p).exists() for p in self._paths(stamp.get("outputs", {}))):
            return None
        return stamp

    @staticmethod
    def _paths(outputs) -> list[str]:
        """Absolute paths named anywhere in a stage's outputs (nested dicts and lists)."""
        if isinstance(outputs, dict):
            return [p for v in outputs.values() for p in Reproduction._paths(v)]
        if isinstance(outputs, list):
            return [p for v in outputs for p in Reproduction._paths(v)]
        return [outputs] if isinstance(outputs, str) and outputs.startswith("/") else []

    def upstream(self, stage: str, dep: str) -> dict:
        stamp = self.valid_stamp(dep)
        if stamp is None:
            raise StageError(stage, f"it needs stage {dep!r}, which has not finished for the current settings "
                                    f"(no valid {self.stage_dir(dep) / STAMP}); run it first, e.g. "
                                    f"thinkfast reproduce --workdir {self.workdir} --stages {dep},{stage}")
        return stamp

    def identity(self, stamp: dict) -> dict:
        # the run id changes whenever a stage re-runs, so whatever read its outputs re-runs too
        return {"stage": stamp["stage"], "key": stamp["key"], "run": stamp.get("output_id")}

    def prm_spec(self) -> tuple[str | None, dict]:
        """(--metadata prm value or None, its identity for the eval stages' keys)."""
        if self.prm_choice == "none":
            return None, {"prm": None}
        if self.prm_choice != "train":
            return self.prm_choice, {"prm": self.prm_choice}
        stamp = self.valid_stamp("prm")
        if stamp is None:
            return None, {"prm": None}
        return stamp["outputs"]["prm"], {"prm": self.identity(stamp)}

    def key(self, stage: str) -> str:
        return digest(self.inputs(stage))

    def inputs(self, stage: str) -> dict:
        b = self.budget
        base = {"stage": stage, "smoke": self.smoke}
        if stage == "teacher":
            return {**base, "teacher": self.teacher_spec}
        teacher = self.upstream(stage, "teacher")
        teacher_id = {"teacher": teacher["teacher_source"]}
        if stage == "init":
            return {**base, **teacher_id, "init": {s.recipe: self.init_args(s) for s in STUDENTS.values()}}
        if stage in ("distill-mil", "distill-llamba"):
            student = self.student(stage)
            return {**base, **teacher_id, "init": self.identity(self.upstream(stage, "init")),
                    "args": self.distill_args(student, Path("OUT"))}
        if stage == "prm":
            return {**base, **teacher_id, "args": self.prm_args(Path("OUT"))}
        if stage.startswith("eval-"):
            tasks = {"tasks": list(TASKS), "n": b.n, "temperature": b.temperature, "limit": b.limit,
                     "max_gen_toks": b.max_gen_toks, "seed": self.seed, "device": self.device,
                     "prm": self.prm_spec()[1]}
            if stage == "eval-teacher":  # keyed by teacher + task settings only: reused whatever the students
                return {**base, **teacher_id, **tasks}
            student = self.student(stage)
            return {**base, "student": self.identity(self.upstream(stage, student.stage)), **tasks}
        if stage == "bench":
            return {**base, **teacher_id, "args": list(b.bench_args), "device": self.device}
        if stage == "leaderboard":
            bench = self.valid_stamp("bench")
            return {**base, "evals": [self.identity(self.upstream(stage, s)) for s in DEPENDS["leaderboard"]],
                    "bench": self.identity(bench) if bench else None, "args": list(b.leaderboard_args),
                    "publish": str(self.publish) if self.publish else None}
        raise ValueError(f"unknown stage {stage!r}")

    def student(self, stage: str) -> Student:
        return next(s for s in STUDENTS.values() if stage in (s.stage, s.eval_stage))

    # -- settings of each command

    def init_args(self, student: Student) -> list[str]:
        """`thinkfast init` flags from the recipe's `init:` section, so distill starts from exactly this student."""
        from distill.cli import load_recipe

        args = []
        for k, v in sorted((load_recipe(student.recipe).get("init") or {}).items()):
            if k == "attn_fraction":
                args += ["--attn-fraction", str(v)]
            elif k == "attn_layers":
                args += ["--attn-layers", ",".join(str(i) for i in v)]
            elif k == "seed":
                args += ["--seed", str(v)]
            else:
                raise ValueError(f"recipe {student.recipe}: init option {k!r} has no `thinkfast init` flag")
        return args

    def distill_args(self, student: Student, out: Path) -> list[str]:
        args = ["distill", "--recipe", student.recipe, "--teacher", str(self.teacher_dir_or_placeholder()),
                "--out", str(out)]
        if self.smoke:
            args.append("--smoke")
        if self.budget.distill_tokens is not None:
            from distill.cli import load_recipe, merge

            recipe = load_recipe(student.recipe)
            if self.smoke:
                recipe = merge(recipe, recipe.get("smoke", {}))
            for name, cfg in recipe["stages"].items():
                if float((cfg or {}).get("max_tokens", 0)) > 0:
                    args.append(f"stages.{name}.max_tokens={self.budget.distill_tokens}")
        return args

    def prm_args(self, out: Path) -> list[str]:
        args = ["prm", "train", "--out", str(out), "--device", self.device]
        if self.smoke:
            args.append("--smoke")
        if self.teacher_spec != DEFAULT_TEACHER:  # the default backbone is the embedded teacher already
            args += ["--backbone", str(self.teacher_dir_or_placeholder())]
        return args

    def teacher_dir_or_placeholder(self) -> Path | str:
        stamp = self.valid_stamp("teacher")
        return stamp["outputs"]["checkpoint"] if stamp else "TEACHER"

    # -- running

    def log(self, message: str) -> None:
        print(f"[reproduce] {message}", flush=True)
        if self.log_file is not None:
            self.log_file.write(f"[reproduce] {message}\n")
            self.log_file.flush()

    def execute(self, stage: str, cmd: list[str], env: dict | None = None) -> float:
        """Run one command, echoing it and its output to the console and the stage's log; returns seconds."""
        self.log(f"$ {display(cmd)}")
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd(),
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        tail = b""
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            if self.log_file is not None:
                self.log_file.buffer.write(chunk)
            tail = (tail + chunk)[-4000:]
        rc = proc.wait()
        seconds = time.time() - t0
        if rc != 0:
            last = [ln for ln in tail.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()][-6:]
            raise StageError(stage, f"`{display(cmd)}` exited with status {rc} after {seconds:.0f}s; last output:\n    "
                             + "\n    ".join(last))
        return seconds

    def run_stage(self, stage: str, force: bool) -> None:
        folder = self.stage_dir(stage)
        if not force and self.valid_stamp(stage):
            self.ran[stage] = "skipped"
            return
        for dep in DEPENDS[stage]:
            self.upstream(stage, dep)
        inputs = self.inputs(stage)
        key = digest(inputs)
        previous = read_json(folder / INPUTS)
        if force or not previous or previous.get("key") != key:
            shutil.rmtree(folder, ignore_errors=True)  # other inputs (or --force): start clean
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAMP).unlink(missing_ok=True)  # outputs are about to change: the old stamp would lie
        atomic_write_json(folder / INPUTS, {"key": key, "inputs": inputs})
        t0 = time.time()
        self.log_file = open(folder / "log.txt", "a")
        try:
            self.log(f"stage {stage} ({datetime.datetime.now().isoformat(timespec='seconds')}), inputs {key}")
            try:
                outputs, commands, extra = getattr(self, "stage_" + stage.replace("-", "_"))(folder)
            except StageError:
                raise
            except Exception as exc:  # a component's own error: name the stage, keep the message
                raise StageError(stage, f"{type(exc).__name__}: {exc}") from exc
            seconds = time.time() - t0
            stamp = {"stage": stage, "key": key, "inputs": inputs, "outputs": outputs, "commands": commands,
                     "timings": {"seconds": round(seconds, 1), **extra.pop("timings", {})}, **extra,
                     "commit": self.commit, "smoke": self.smoke, "output_id": uuid.uuid4().hex,
                     "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            atomic_write_json(folder / STAMP, stamp)  # last: the stage counts as done only now
            self.log(f"stage {stage}: done in {seconds:.1f}s -> {folder}")
        except StageError as exc:
            self.log_file.write(f"[reproduce] error: {exc}\n")
            raise
        finally:
            self.log_file.close()
            self.log_file = None
        self.ran[stage] = "ran"

    # -- the stages: each returns (outputs, commands, extra stamp fields)

    def stage_teacher(self, folder: Path):
        from harness_ext.teacher import STAMP as TEACHER_STAMP, convert_teacher

        command = shlex.join(["thinkfast", "teacher", "--name", self.teacher_spec])
        self.log(f"$ {command}   (in process: harness_ext.teacher.convert_teacher)")
        checkpoint = Path(convert_teacher(self.teacher_spec)).resolve()
        source = read_json(checkpoint / TEACHER_STAMP) or {"source": self.teacher_spec}
        self.log(f"teacher checkpoint: {checkpoint}")
        return {"checkpoint": str(checkpoint)}, [command], {"teacher_source": source}

    def stage_init(self, folder: Path):
        teacher = self.teacher_dir_or_placeholder()
        outputs, commands = {}, []
        for student in STUDENTS.values():
            out = folder / student.recipe
            cmd = thinkfast_cmd("init", "--arch", student.recipe, "--teacher", str(teacher), "--out", str(out),
                                *self.init_args(student))
            self.execute("init", cmd)
            commands.append(display(cmd))
            outputs[student.recipe] = str(out.resolve())
        return outputs, commands, {}

    def _distill(self, stage: str, folder: Path):
        student = self.student(stage)
        out = (folder / "out").resolve()
        init = Path(self.upstream(stage, "init")["outputs"][student.recipe])
        # distill builds its student under OUT/init unless one is there: start from the init stage's student
        if not (out / "init" / "config.json").is_file():
            self.log(f"$ mkdir -p {shlex.quote(str(out))} && cp -r {shlex.quote(str(init))} "
                     f"{shlex.quote(str(out / 'init'))}")
            link_or_copy_tree(init, out / "init")
        cmd = thinkfast_cmd(*self.distill_args(student, out))
        seconds = self.execute(stage, cmd)
        if not (out / "config.json").is_file():
            raise StageError(stage, f"distill finished but wrote no final student to {out} (no config.json)")
        tokens = distillation_tokens(out)
        self.log(f"{student.name}: {tokens:,} distillation tokens")
        return ({"checkpoint": str(out)}, [display(cmd)],
                {"distillation_tokens": tokens, "timings": {"distill_seconds": round(seconds, 1)}})

    def stage_distill_mil(self, folder: Path):
        return self._distill("distill-mil", folder)

    def stage_distill_llamba(self, folder: Path):
        return self._distill("distill-llamba", folder)

    def stage_prm(self, folder: Path):
        out = (folder / "out").resolve()
        cmd = thinkfast_cmd(*self.prm_args(out))
        self.execute("prm", cmd)
        return {"prm": str(out)}, [display(cmd)], {}

    def _eval(self, stage: str, folder: Path):
        if stage == "eval-teacher":
            checkpoint = Path(self.upstream(stage, "teacher")["outputs"]["checkpoint"])
            backend, name, arch, role, bench_model, tokens = "thinkfast", teacher_name(self.teacher_spec), \
                "llama", "teacher", "teacher", None
        else:
            student = self.student(stage)
            up = self.upstream(stage, student.stage)
            checkpoint = Path(up["outputs"]["checkpoint"])
            backend, name, arch, role, bench_model = (student.backend, student.name, student.recipe, "student",
                                                      student.bench_model)
            tokens = up.get("distillation_tokens")
        prm, _ = self.prm_spec()
        if prm is None:
            self.log("no PRM (the prm stage has not finished, or --prm none): bon@k / weighted_bon@k will be n/a")
        results_root = folder / "lm_eval"
        generation, commands, results_dirs = {}, [], set()
        for task in TASKS:
            done_file = folder / "tasks" / f"{task}.json"
            record = read_json(done_file)
            if record and Path(record["results"]).is_file():
                self.log(f"{task}: finished in an earlier, interrupted run ({record['results']})")
            else:
                cmd = self.lm_eval_cmd(backend, checkpoint, task, prm, results_root)
                started = time.time()
                seconds = self.execute(stage, cmd)
                record = summarize_eval(stage, task, results_root, started, checkpoint, seconds, self.budget.n)
                record["command"] = display(cmd)
                atomic_write_json(done_file, record)
            commands.append(record["command"])
            results_dirs.add(str(Path(record["results"]).parent))
            generation[task] = record["generation"]
            parameters = record.get("parameters")
        if len(results_dirs) != 1:
            raise StageError(stage, f"lm-eval wrote the tasks' results into several folders {sorted(results_dirs)}")
        model_dir = Path(results_dirs.pop())
        meta = {"schema": META_SCHEMA, "model": name, "architecture": arch, "role": role,
                "parameters": parameters or count_parameters(checkpoint), "distillation_tokens": tokens,
                "card": card_name(self.device), "commit": self.commit, "bench_model": bench_model,
                "generation": generation, "checkpoint": str(checkpoint), "smoke": self.smoke,
                "settings": {"n": self.budget.n, "temperature": self.budget.temperature, "limit": self.budget.limit,
                             "max_gen_toks": self.budget.max_gen_toks, "prm": prm}}
        atomic_write_json(model_dir / META_FILE, meta)
        self.log(f"{name}: " + ", ".join(f"{t} {g['num_samples']} samples, {g['generated_tokens']:,} tokens in "
                                          f"{g['wall_clock_seconds']:.1f}s" for t, g in generation.items()))
        return {"results": str(results_root.resolve()), "meta": str((model_dir / META_FILE).resolve())}, commands, {}

    def lm_eval_cmd(self, backend: str, checkpoint: Path, task: str, prm: str | None, out: Path) -> list[str]:
        b = self.budget
        metadata = {"n": b.n, **({"prm": str(prm)} if prm else {})}
        if prm and self.device == "cpu":
            metadata["prm_device"] = "cpu"
        gen = f"temperature={b.temperature}" + (f",max_gen_toks={b.max_gen_toks}" if b.max_gen_toks else "")
        cmd = [sys.executable, "-m", "lm_eval", "--model", backend, "--model_args", f"pretrained={checkpoint}",
               "--tasks", task, "--apply_chat_template", "--batch_size", "auto", "--device", self.device,
               "--gen_kwargs", gen, "--metadata", json.dumps(metadata, separators=(",", ":")),
               "--seed", str(self.seed), "--log_samples", "--output_path", str(out.resolve())]
        if b.limit is not None:
            cmd += ["--limit", str(b.limit)]
        return cmd

    def stage_eval_teacher(self, folder: Path):
        return self._eval("eval-teacher", folder)

    def stage_eval_mil(self, folder: Path):
        return self._eval("eval-mil", folder)

    def stage_eval_llamba(self, folder: Path):
        return self._eval("eval-llamba", folder)

    def stage_bench(self, folder: Path):
        out = (folder / "out").resolve()
        args = list(self.budget.bench_args)
        if self.teacher_spec != DEFAULT_TEACHER:  # the default: SmolLM2-135M's built-in config (speed needs no weights)
            if "--layers" in args:  # --layers only shrinks the built-in config
                del args[args.index("--layers"):args.index("--layers") + 2]
            args = ["--teacher", str(self.teacher_dir_or_placeholder()), *args]
        cmd = thinkfast_cmd("bench", "--device", self.device, *args, "--out", str(out))
        self.execute("bench", cmd)
        if not (out / "bench.json").is_file():
            raise StageError("bench", f"thinkfast bench wrote no {out / 'bench.json'}")
        return {"bench": str(out / "bench.json")}, [display(cmd)], {}

    def stage_leaderboard(self, folder: Path):
        out = (folder / "out").resolve()
        results = [self.upstream("leaderboard", s)["outputs"]["results"] for s in DEPENDS["leaderboard"]]
        bench = self.valid_stamp("bench")
        if bench is None:
            self.log("no finished bench stage: the leaderboard has no throughput columns")
        cmd = thinkfast_cmd("leaderboard", "--results", *results,
                            *(["--bench", bench["outputs"]["bench"]] if bench else []),
                            *self.budget.leaderboard_args, "--out", str(out))
        self.execute("leaderboard", cmd)
        commands = [display(cmd)]
        outputs = {"markdown": str(out / "leaderboard.md")}
        if self.publish is not None:
            self.log(f"$ cp -r {shlex.quote(str(out))}/. {shlex.quote(str(self.publish))}/")
            shutil.copytree(out, self.publish, dirs_exist_ok=True)
            commands.append(f"cp -r {shlex.quote(str(out))}/. {shlex.quote(str(self.publish))}/")
            outputs["published"] = str(self.publish.resolve() / "leaderboard.md")
        return outputs, commands, {}


# ----------------------------------------------------------------------------- eval bookkeeping

def teacher_name(spec: str) -> str:
    return Path(spec.rstrip("/")).name.lower() if spec != DEFAULT_TEACHER else DEFAULT_TEACHER


def distillation_tokens(out: Path) -> int:
    """Tokens the student was trained on, summed over the recipe's stages (their final trainer states)."""
    total = 0
    for state_file in sorted(out.glob("stages/*/final/trainer_state.json")):
        state = read_json(state_file) or {}
        total += int(state.get("tokens_seen") or (state.get("train_result") or {}).get("tokens") or 0)
    return total


def count_parameters(checkpoint: Path) -> int:
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():
                n = 1
                for d in handle.get_slice(name).get_shape():
                    n *= d
                total += n
    return total


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _strings(item)


def summarize_eval(stage: str, task: str, results_root: Path, started: float, checkpoint: Path, seconds: float, n: int) -> dict:
    """Read back one lm-eval run: its results file, sample count, generated tokens and generation time."""
    candidates = [p for p in results_root.rglob("results_*.json") if p.stat().st_mtime >= started - 1]
    candidates = [p for p in candidates if task in ((read_json(p) or {}).get("results") or {})]
    if not candidates:
        raise StageError(stage, f"lm_eval exited cleanly but wrote no results_*.json for {task} "
                                           f"under {results_root}")
    results_file = max(candidates, key=lambda p: p.stat().st_mtime)
    data = read_json(results_file)
    stamp = results_file.stem[len("results_"):]
    samples_file = results_file.parent / f"samples_{task}_{stamp}.jsonl"
    problems = (data.get("n-samples") or {}).get(task, {}).get("effective")
    texts = []
    if samples_file.is_file():
        with open(samples_file) as f:
            for line in f:
                if line.strip():
                    texts += list(_strings(json.loads(line).get("resps", [])))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint))
    # completions re-tokenized: the engine's own token counts are not in lm-eval's output
    generated = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
    reported = (data.get("config") or {}).get("thinkfast_generation") or {}
    generation = {
        # the backend's own generation time when it reports one, else the lm_eval process's wall-clock
        # (model load, generation and answer / PRM scoring: an upper bound on generation alone)
        "wall_clock_seconds": round(float(reported.get("wall_clock_seconds") or seconds), 3),
        "timing": "backend" if reported.get("wall_clock_seconds") else "lm_eval process",
        "generated_tokens": int(reported.get("generated_tokens") or generated) or None,
        "num_samples": int(reported.get("num_samples") or len(texts) or (problems or 0) * n) or None,
    }
    return {"task": task, "results": str(results_file.resolve()), "samples": str(samples_file.resolve()),
            "problems": problems, "parameters": (data.get("config") or {}).get("model_num_parameters"),
            "generation": generation}


# ----------------------------------------------------------------------------- CLI

def parse_stage_list(text: str, what: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise SystemExit(f"thinkfast reproduce: {what}: unknown stage(s) {unknown or [text]}; stages are "
                         f"{','.join(STAGES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default=None,
                        help="one folder per stage (default: runs/reproduce, or runs/reproduce-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budgets on CPU, minutes (implied when there is no CUDA device)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset to run, in pipeline order (default: all: {','.join(STAGES)})")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run these stages from scratch even if finished (repeat or comma-separate)")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help="embedded teacher name, HF Llama id or checkpoint directory (default: %(default)s)")
    parser.add_argument("--prm", default="train",
                        help="'train': the prm stage's PRM (default); 'none': no PRM; or a PRM for load_prm "
                             "('default', a hub id or a directory)")
    parser.add_argument("--publish", default=None, help="also copy the leaderboard files into this folder")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default 64; smoke 4)")
    parser.add_argument("--limit", type=int, default=None, help="problems per task (default all 500; smoke 2)")
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="max new tokens per completion (default: the task's, GSM8K 400 / MATH 1024; smoke 24)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    smoke = bool(args.smoke)
    if not smoke and not torch.cuda.is_available():
        smoke = True
        print("[reproduce] no CUDA device: running the --smoke reproduction (CPU, tiny budgets: a few "
              "distillation steps, 2 problems per task, N = 4). The full run needs a GPU.", flush=True)
    device = "cuda" if (torch.cuda.is_available() and not smoke) else "cpu"
    budget = SMOKE if smoke else FULL
    overrides = {k: v for k, v in (("n", args.n), ("limit", args.limit), ("max_gen_toks", args.max_gen_toks))
                 if v is not None}
    for k, v in overrides.items():
        if v < 1:
            raise SystemExit(f"thinkfast reproduce: --{k.replace('_', '-')} must be positive, got {v}")
    budget = dataclasses.replace(budget, **overrides)
    selected = parse_stage_list(args.stages, "--stages")
    forced = [s for item in args.force for s in parse_stage_list(item, "--force")]
    not_selected = [s for s in forced if s not in selected]
    if not_selected:
        raise SystemExit(f"thinkfast reproduce: --force {','.join(not_selected)}: not among --stages {args.stages}")
    workdir = Path(args.workdir or ("runs/reproduce-smoke" if smoke else "runs/reproduce")).resolve()
    repro = Reproduction(workdir, args.teacher, budget, smoke, device, args.prm,
                         Path(args.publish).resolve() if args.publish else None, args.seed)
    order = [s for s in STAGES if s in selected]
    if args.prm != "train" and "prm" in order:
        order.remove("prm")  # a given PRM (or none) replaces the trained one
    print(f"[reproduce] {'smoke' if smoke else 'full'} run on {device} in {workdir}: stages {','.join(order)}"
          f"{' (forced: ' + ','.join(forced) + ')' if forced else ''}", flush=True)
    t0 = time.time()
    for i, stage in enumerate(order, 1):
        print(f"[reproduce {i}/{len(order)}] {stage}", flush=True)
        try:
            repro.run_stage(stage, force=stage in forced)
        except StageError as exc:
            if stage == "prm" and smoke:
                repro.ran[stage] = "failed (continuing without a PRM)"
                print(f"[reproduce] warning: {exc}\n[reproduce] smoke run: evaluating without a PRM "
                      f"(bon / weighted_bon shown as n/a)", flush=True)
                continue
            repro.ran[stage] = "FAILED"
            print(f"[reproduce] error: {exc}", file=sys.stderr, flush=True)
            print(f"[reproduce] the log is {repro.stage_dir(stage) / 'log.txt'}; finished stages keep their stamps, "
                  f"so re-running the same command resumes at {stage}", file=sys.stderr, flush=True)
            summary(repro, order, t0)
            return 1
        if repro.ran[stage] == "skipped":
            print(f"[reproduce] {stage}: up to date ({repro.stage_dir(stage) / STAMP}), skipped", flush=True)
    summary(repro, order, t0)
    board = repro.valid_stamp("leaderboard") if "leaderboard" in order else None
    if board:
        print(f"[reproduce] leaderboard: {board['outputs']['markdown']}", flush=True)
    return 0


def summary(repro: Reproduction, order: list[str], t0: float) -> None:
    parts = [f"{s}={repro.ran.get(s, 'not run')}" for s in order]
    print(f"[reproduce] summary ({time.time() - t0:.1f}s): " + ", ".join(parts), flush=True)
