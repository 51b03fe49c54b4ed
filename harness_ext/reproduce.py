"""`thinkfast reproduce`: the paper's experiment at 135M scale, in stages that run in parallel and resume.

    thinkfast reproduce --budget fast                     # 4 H100s: ~21 min (see FAST), runs/reproduce-fast
    thinkfast reproduce                                   # the full protocol: ~34 min on 4 H100s, ~67 on one
    thinkfast reproduce --plan --gpus 4 --budget fast     # the DAG, the device schedule, the expected wall-clock
    thinkfast reproduce --smoke                           # CPU, minutes: tiny budgets, runs/reproduce-smoke
    thinkfast reproduce --stages eval-teacher,eval-mil    # a subset (their inputs must be finished already)
    thinkfast reproduce --force distill-mil               # re-run one stage from scratch (and what depends on it)
    thinkfast reproduce --workdir runs/r2 --publish leaderboards/

Without a CUDA device `--smoke` is implied (and said so): the same path with tiny budgets (a few distillation
steps, 2 problems, N = 4 samples, short completions, a 2-layer throughput benchmark).

Stages (each one a folder under --workdir, finished when its DONE.json stamp matches its inputs):

  teacher         convert the teacher (default: embedded SmolLM2-135M-Instruct) -> thinkfast's cache
  init            `thinkfast init` the two untrained students (MambaInLlama keeps every 2nd attention layer)
  distill-mil     `thinkfast distill --recipe mambainllama` (reverse KL), starting from init's student
  distill-llamba  `thinkfast distill --recipe llamba` (MOHAWK, 3 stages), starting from init's student
  prm             records the committed default PRM (harness_ext/assets/prm: manifest sha256, metrics), or the
                  one --prm names; `--train-prm` trains one instead (`thinkfast prm train`, ~6 min of H100)
  eval-teacher    `lm_eval` gsm8k500_bon and math500_bon, N = 64, T = 0.8, with the PRM (teacher backend)
  eval-mil        the same for the distilled MambaInLlama (mambainllama backend)
  eval-llamba     the same for the distilled Llamba (llamba backend)
  bench           `thinkfast bench` (decode throughput vs batch size)
  leaderboard     `thinkfast leaderboard` over the three evals and the bench -> <workdir>/leaderboard/out

Scheduling: `--gpus N` devices (default: every visible CUDA device; 1 on CPU). A stage starts as soon as the
stages it reads have finished (evaluations also wait for the prm stage, the leaderboard for the bench) and a
device is free, longest remaining chain first (estimated from H100_ESTIMATES: distill-llamba -> eval-llamba,
then distill-mil -> eval-mil, eval-teacher, bench). Each stage runs in its own process (`python -m
harness_ext.reproduce --worker ...`), pinned to one GPU with CUDA_VISIBLE_DEVICES. With several devices an
evaluation's two tasks are jobs of their own ("eval-mil:math500_bon", logged to eval-mil/log.math500_bon.txt),
run at the same time on different GPUs, and the stage then only collects them (--no-split-eval: one job).
With one device the stages' output streams to the console as a serial run's would; with several, the console
shows one line per start and finish and a status line every --heartbeat seconds, and each stage's output goes to
its <stage>/log.txt only.
A failing stage stops new starts; running stages finish (and stamp); the failure is reported with its log. Ctrl-C
or SIGTERM stops every stage process (their process groups); finished stages keep their stamps.

Every stage prints the exact commands it runs (run them by hand to reproduce one step) and logs them, with their
output, to <stage>/log.txt. A stage's inputs are its settings plus the identity of the stages it reads, so the
teacher's evaluation depends only on the teacher, the task settings and the PRM, never on a student: it is reused
when only student settings change. A stage folder holding the same inputs but no stamp (an interrupted run) keeps
its partial outputs: distillation resumes from its last checkpoint, evaluation from its last finished task.
The eval stages write `thinkfast_meta.json` (see harness_ext/leaderboard.py) next to lm-eval's results: the model,
architecture, parameters, distillation tokens, card, commit, the budget's settings, and per task the generation
wall-clock seconds, generated tokens and number of samples. With `--prm none` (or a --train-prm stage that
failed in --smoke) evaluation runs without a PRM and the leaderboard shows bon / weighted_bon as n/a.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
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
    """What a preset changes. full: the paper's protocol at 135M; fast: fits one 30-minute lease on 4 GPUs
    (see FAST); smoke: CPU in minutes."""
    name: str = "full"
    n: int = 64                          # samples per problem
    temperature: float = 0.8
    limit: int | None = None             # problems per task (None: all 500)
    max_gen_toks: int | None = None      # every task; None: task_max_gen_toks, else the task YAML's (GSM8K 400, MATH 1024)
    task_max_gen_toks: tuple[tuple[str, int], ...] = ()   # (task, max new tokens) overrides
    distill_tokens: int | None = None    # per active distillation stage of both recipes; None: the recipe's
    bench_args: tuple[str, ...] = ()
    leaderboard_args: tuple[str, ...] = ()
    ssm_state_dtype: str | None = None   # "bfloat16": the students' SSM state while generating; None: the checkpoint's

    def gen_toks(self, task: str) -> int | None:
        return self.max_gen_toks or dict(self.task_max_gen_toks).get(task)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Budget":
        tuples = lambda v: tuple(tuple(x) if isinstance(x, list) else x for x in v)  # noqa: E731
        return cls(**{k: tuples(v) if isinstance(v, list) else v for k, v in data.items()})


FULL = Budget()
# fast: the paper's protocol except one budget, chosen with `thinkfast reproduce --plan --gpus 4 --budget fast` so
# that the whole run fits one 30-minute H100 lease (< 25 min) on 4 GPUs: MATH-500 completions are capped at 512 new
# tokens instead of the task's 1024 (GSM8K keeps 400), recorded in every stamp and in thinkfast_meta.json. N stays
# 64, every problem is evaluated, and both students distil with their recipes' budgets.
FAST = Budget(name="fast", task_max_gen_toks=(("math500_bon", 512),))
SMOKE = Budget(name="smoke", n=4, limit=2, max_gen_toks=24, distill_tokens=256,
               bench_args=("--batches", "1,2", "--prompt-len", "16", "--gen-len", "8", "--layers", "2"),
               leaderboard_args=("--ks", "1", "2", "4", "--vote-k", "4", "--batches", "1", "2"))
BUDGETS = {"full": FULL, "fast": FAST}


class StageError(RuntimeError):
    def __init__(self, stage: str, message: str):
        super().__init__(f"stage {stage!r} failed: {message}")
        self.stage = stage


# ----------------------------------------------------------------------------- small helpers

def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temporary file in the same folder and a rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def git_commit() -> str | None:
    if os.environ.get("THINKFAST_COMMIT"):     # a copy of the tree without .git (a remote machine) names its commit
        return os.environ["THINKFAST_COMMIT"]
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
    # nvidia-smi ignores CUDA_VISIBLE_DEVICES: ask for the card this stage is pinned to
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    select = ["-i", pinned] if pinned.isdigit() else []
    try:
        out = subprocess.run(["nvidia-smi", *select, "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
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
        self.prm_choice = prm  # "train" (the prm stage trains one), "none", or a PRM for load_prm ("default", ...)
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

    def dependencies(self, stage: str) -> tuple[str, ...]:
        """Hard dependencies; a PRM that is only recorded (not trained) needs no teacher."""
        if stage == "prm" and self.prm_choice != "train":
            return ()
        return DEPENDS[stage]

    def soft_dependencies(self, stage: str) -> tuple[str, ...]:
        return tuple(s for s in SOFT_DEPENDS.get(stage, ()) if s != "prm" or self.prm_choice != "none")

    def prm_spec(self) -> tuple[str | None, dict]:
        """(--metadata prm value or None, its identity for the eval stages' keys): always the prm stage's PRM."""
        if self.prm_choice == "none":
            return None, {"prm": None}
        stamp = self.valid_stamp("prm")
        if stamp is None:
            return None, {"prm": None}
        identity = self.identity(stamp)
        if self.prm_choice != "train":
            # a recorded PRM is its files (the stamp's key hashes them), not a run: the teacher's evaluation
            # stays valid across runs and machines (a workdir carried to a fresh machine keeps its results)
            identity.pop("run")
        return stamp["outputs"]["prm"], {"prm": identity}

    def key(self, stage: str) -> str:
        return digest(self.inputs(stage))

    def inputs(self, stage: str) -> dict:
        b = self.budget
        base = {"stage": stage, "smoke": self.smoke}
        if stage == "teacher":
            return {**base, "teacher": self.teacher_spec}
        if stage == "prm" and self.prm_choice != "train":
            return {**base, "prm": self.prm_choice, "identity": prm_identity(self.prm_choice)}
        teacher = self.upstream(stage, "teacher")
        teacher_id = {"teacher": teacher["teacher_source"]}
        if stage == "init":
            return {**base, **teacher_id, "init": {s.recipe: self.init_args(s) for s in STUDENTS.values()}}
        if stage == "prm":
            return {**base, **teacher_id, "args": self.prm_args(Path("OUT"))}
        if stage in ("distill-mil", "distill-llamba"):
            student = self.student(stage)
            # the recipe's content too: editing a recipe's defaults must re-run the stage, as changing its args does
            return {**base, **teacher_id, "init": self.identity(self.upstream(stage, "init")),
                    "args": self.distill_args(student, Path("OUT")), "recipe": self.distill_recipe(student)}

        if stage.startswith("eval-"):
            tasks = {"tasks": list(TASKS), "n": b.n, "temperature": b.temperature, "limit": b.limit,
                     "max_gen_toks": {t: b.gen_toks(t) for t in TASKS}, "seed": self.seed, "device": self.device,
                     "prm": self.prm_spec()[1]}
            if stage == "eval-teacher":  # keyed by teacher + task settings only: reused whatever the students
                return {**base, **teacher_id, **tasks}
            student = self.student(stage)
            state = {"ssm_state_dtype": b.ssm_state_dtype} if b.ssm_state_dtype else {}
            return {**base, "student": self.identity(self.upstream(stage, student.stage)), **tasks, **state}
        if stage == "bench":
            return {**base, **teacher_id, "args": self.bench_args(), "device": self.device}
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
            elif k == "calibrate_rows":
                continue  # MOHAWK stage 0 needs the teacher and data: `thinkfast distill` applies it to the copied init
            else:
                raise ValueError(f"recipe {student.recipe}: init option {k!r} has no `thinkfast init` flag")
        return args

    def distill_args(self, student: Student, out: Path) -> list[str]:
        args = ["distill", "--recipe", student.recipe, "--teacher", str(self.teacher_dir_or_placeholder()),
                "--out", str(out)]
        if self.smoke:
            args.append("--smoke")
        for name, (_, tokens) in self.distill_stage_budgets(student).items():
            if tokens is not None:
                args.append(f"stages.{name}.max_tokens={tokens}")
        return args

    def distill_recipe(self, student: Student) -> dict:
        """The student's recipe as this run's `thinkfast distill` reads it (with its smoke section under --smoke)."""
        from distill.cli import load_recipe, merge

        recipe = load_recipe(student.recipe)
        return merge(recipe, recipe.get("smoke", {})) if self.smoke else recipe

    def distill_stage_budgets(self, student: Student) -> dict[str, tuple[int, int | None]]:
        """Active distillation stages of the student's recipe -> (the recipe's tokens, the budget's override)."""
        recipe = self.distill_recipe(student)
        return {name: (int(float(cfg["max_tokens"])), self.budget.distill_tokens)
                for name, cfg in recipe["stages"].items() if float((cfg or {}).get("max_tokens", 0)) > 0}

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

    def require_upstream(self, stage: str) -> None:
        """Every stage this one reads has a valid stamp (the scheduler's view: a recorded PRM starts beside the
        teacher); else a StageError naming the missing one."""
        for dep in self.dependencies(stage):
            self.upstream(stage, dep)

    def open_stage_folder(self, stage: str, force: bool) -> tuple[dict, str]:
        """Before a stage (or the first of its tasks) runs: its dependencies are there, its folder holds its
        current inputs (other inputs or --force: emptied first), and its old stamp is gone."""
        folder = self.stage_dir(stage)
        self.require_upstream(stage)
        inputs = self.inputs(stage)
        key = digest(inputs)
        previous = read_json(folder / INPUTS)
        if force or not previous or previous.get("key") != key:
            shutil.rmtree(folder, ignore_errors=True)  # other inputs (or --force): start clean
        folder.mkdir(parents=True, exist_ok=True)
        (folder / STAMP).unlink(missing_ok=True)  # outputs are about to change: the old stamp would lie
        atomic_write_json(folder / INPUTS, {"key": key, "inputs": inputs})
        return inputs, key

    def task_done(self, stage: str, task: str) -> bool:
        """Whether an eval stage's task has its record and results (from this run or an interrupted one)."""
        record = read_json(self.stage_dir(stage) / "tasks" / f"{task}.json")
        return bool(record) and Path(record["results"]).is_file()

    def run_eval_task(self, stage: str, task: str) -> None:
        """One task of an eval stage, in a process of its own (the scheduler has opened the stage's folder); the
        stage itself collects the tasks afterwards. Logs to <stage>/log.<task>.txt."""
        folder = self.stage_dir(stage)
        self.require_upstream(stage)
        if (read_json(folder / INPUTS) or {}).get("key") != self.key(stage):
            raise StageError(stage, f"{folder / INPUTS} does not hold the current inputs: the stage's folder was "
                                    f"not opened for this run")
        job = f"{stage}:{task}"
        with self._logged(job, folder / f"log.{task}.txt", ""):
            self._eval_task(stage, folder, task)
            self.write_eval_meta(stage, folder)
            self.log(f"stage {job}: done")
        self.ran[job] = "ran"

    @contextlib.contextmanager
    def _logged(self, name: str, log_path: Path, note: str):
        """Log to log_path while the body runs; any error becomes a StageError naming `name`, logged there too."""
        self.log_file = open(log_path, "a")
        try:
            self.log(f"stage {name} ({datetime.datetime.now().isoformat(timespec='seconds')}){note}")
            try:
                yield
            except StageError:
                raise
            except Exception as exc:  # a component's own error: name the stage, keep the message
                raise StageError(name, f"{type(exc).__name__}: {exc}") from exc
        except StageError as exc:
            self.log_file.write(f"[reproduce] error: {exc}\n")
            raise
        finally:
            self.log_file.close()
            self.log_file = None

    def run_stage(self, stage: str, force: bool) -> None:
        folder = self.stage_dir(stage)
        if not force and self.valid_stamp(stage):
            self.ran[stage] = "skipped"
            return
        inputs, key = self.open_stage_folder(stage, force)
        t0 = time.time()
        with self._logged(stage, folder / "log.txt", f", inputs {key}"):
            outputs, commands, extra = getattr(self, "stage_" + stage.replace("-", "_"))(folder)
            seconds = time.time() - t0
            stamp = {"stage": stage, "key": key, "inputs": inputs, "outputs": outputs, "commands": commands,
                     "timings": {"seconds": round(seconds, 1), **extra.pop("timings", {})}, **extra,
                     "commit": self.commit, "smoke": self.smoke, "output_id": uuid.uuid4().hex,
                     "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
            atomic_write_json(folder / STAMP, stamp)  # last: the stage counts as done only now
            self.log(f"stage {stage}: done in {seconds:.1f}s -> {folder}")
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
        if self.prm_choice != "train":  # a given PRM (the committed default unless --prm): record what it is
            identity = prm_identity(self.prm_choice)
            command = f"load_prm({self.prm_choice!r})"
            self.log(f"PRM {self.prm_choice!r} (not trained here; --train-prm trains one): {json.dumps(identity)}")
            outputs, extra = {"prm": self.prm_choice}, {"prm_identity": identity}
            if self.prm_choice == "default":
                from harness_ext.scoring.prm import ASSETS_DIR, MANIFEST

                manifest = read_json(ASSETS_DIR / MANIFEST) or {}
                weights = ASSETS_DIR / manifest.get("weights", "")
                if not weights.is_file() or file_sha256(weights) != manifest.get("weights_sha256"):
                    raise StageError("prm", f"{weights} is missing or does not match the sha256 in "
                                            f"{ASSETS_DIR / MANIFEST}; restore it (git checkout) or use --train-prm")
                outputs.update(manifest=str((ASSETS_DIR / MANIFEST).resolve()), weights=str(weights.resolve()))
                extra["prm_metrics"] = manifest.get("metrics")
                heldout = (manifest.get("metrics") or {}).get("heldout") or {}
                self.log(f"default PRM: trained {manifest.get('created')} on {manifest.get('device')}, held-out "
                         f"AUC {json.dumps(heldout.get('auc'))}, weighted_bon@16 {json.dumps(heldout.get('weighted_bon@16'))}")
            return outputs, [command], extra
        out = (folder / "out").resolve()
        cmd = thinkfast_cmd(*self.prm_args(out))
        self.execute("prm", cmd)
        return {"prm": str(out)}, [display(cmd)], {}

    def _eval_model(self, stage: str) -> tuple:
        """(backend, name, architecture, role, bench_model, distillation tokens, checkpoint) of an eval stage."""
        if stage == "eval-teacher":
            checkpoint = Path(self.upstream(stage, "teacher")["outputs"]["checkpoint"])
            return "thinkfast", teacher_name(self.teacher_spec), "llama", "teacher", "teacher", None, checkpoint
        student = self.student(stage)
        up = self.upstream(stage, student.stage)
        return (student.backend, student.name, student.recipe, "student", student.bench_model,
                up.get("distillation_tokens"), Path(up["outputs"]["checkpoint"]))

    def write_eval_meta(self, stage: str, folder: Path, card: str | None = None) -> Path | None:
        """The leaderboard's sidecar (META_FILE) beside lm-eval's results, for the tasks finished so far: written
        after every task, so an interrupted evaluation still publishes what it measured. None: no task yet.
        The card is the one each task record names (`card`: for records that name none, e.g. from another
        machine, else this machine's)."""
        _, name, arch, role, bench_model, tokens, checkpoint = self._eval_model(stage)
        state = self.eval_state_dtype(role)
        if state:
            # another configuration of the same checkpoint: its own leaderboard row, and the bench row to match
            name, bench_model = f"{name}-bf16-state", f"{bench_model}-bf16-state"
        records = {task: read_json(folder / "tasks" / f"{task}.json") for task in TASKS}
        records = {task: r for task, r in records.items() if r}
        if not records:
            return None
        results_dirs = {self.local_path(r["results"]).parent for r in records.values()}
        if len(results_dirs) != 1:
            raise StageError(stage, f"lm-eval wrote the tasks' results into several folders {sorted(results_dirs)}")
        model_dir = results_dirs.pop()
        parameters = next((r["parameters"] for r in records.values() if r.get("parameters")), None)
        prm, _ = self.prm_spec()
        meta = {"schema": META_SCHEMA, "model": name, "architecture": arch, "role": role,
                "parameters": parameters or count_parameters(checkpoint), "distillation_tokens": tokens,
                "card": next((r["card"] for r in records.values() if r.get("card")), None) or card
                or card_name(self.device),
                "commit": next((r["commit"] for r in records.values() if r.get("commit")), None) or self.commit,
                "bench_model": bench_model,
                "generation": {task: r["generation"] for task, r in records.items()}, "checkpoint": str(checkpoint),
                "smoke": self.smoke,
                "settings": {"budget": self.budget.name, "n": self.budget.n, "temperature": self.budget.temperature,
                             "limit": self.budget.limit, "max_gen_toks": {t: self.budget.gen_toks(t) for t in TASKS},
                             "prm": prm,
                             **({"ssm_state_dtype": state} if state else {})},
                "tasks_missing": [t for t in TASKS if t not in records]}
        atomic_write_json(model_dir / META_FILE, meta)
        return model_dir / META_FILE

    def local_path(self, recorded: str) -> Path:
        """A path a stage recorded; when it no longer exists (the workdir was copied from another machine), the
        same path below this workdir's stage folder."""
        path = Path(recorded)
        if path.exists():
            return path
        stage_at = [i for i, part in enumerate(path.parts) if part in STAGES]
        return self.workdir / Path(*path.parts[stage_at[-1]:]) if stage_at else path

    def _eval_task(self, stage: str, folder: Path, task: str) -> dict:
        """Run one lm_eval task of an eval stage, unless an earlier run finished it; its record."""
        done_file = folder / "tasks" / f"{task}.json"
        if self.task_done(stage, task):
            record = read_json(done_file)
            self.log(f"{task}: finished earlier ({record['results']})")
            return record
        backend, _, _, role, *_, checkpoint = self._eval_model(stage)
        prm, _ = self.prm_spec()
        cmd = self.lm_eval_cmd(backend, checkpoint, task, prm, folder / "lm_eval",
                               ssm_state_dtype=self.eval_state_dtype(role))
        started = time.time()
        seconds = self.execute(stage, cmd)
        record = summarize_eval(stage, task, folder / "lm_eval", started, checkpoint, seconds, self.budget.n)
        record.update(command=display(cmd), card=card_name(self.device), commit=self.commit)
        atomic_write_json(done_file, record)
        return record

    def _eval(self, stage: str, folder: Path):
        name = self._eval_model(stage)[1]
        prm, _ = self.prm_spec()
        if prm is None:
            self.log("no PRM (the prm stage has not finished, or --prm none): bon@k / weighted_bon@k will be n/a")
        results_root = folder / "lm_eval"
        generation, commands = {}, []
        for task in TASKS:
            record = self._eval_task(stage, folder, task)
            commands.append(record["command"])
            generation[task] = record["generation"]
            meta = self.write_eval_meta(stage, folder)
        self.log(f"{name}: " + ", ".join(f"{t} {g['num_samples']} samples, {g['generated_tokens']:,} tokens in "
                                          f"{g['wall_clock_seconds']:.1f}s" for t, g in generation.items()))
        return {"results": str(results_root.resolve()), "meta": str(meta.resolve())}, commands, {}

    def eval_state_dtype(self, role: str) -> str | None:
        """The SSM state dtype an evaluation passes to lm-eval: the budget's, for students only."""
        return self.budget.ssm_state_dtype if role == "student" else None

    def lm_eval_cmd(self, backend: str, checkpoint: Path, task: str, prm: str | None, out: Path,
                    ssm_state_dtype: str | None = None) -> list[str]:
        b = self.budget
        model_args = f"pretrained={checkpoint}" + (f",ssm_state_dtype={ssm_state_dtype}" if ssm_state_dtype else "")
        metadata = {"n": b.n, **({"prm": str(prm)} if prm else {})}
        if prm and self.device == "cpu":
            metadata["prm_device"] = "cpu"
        gen = f"temperature={b.temperature}" + (f",max_gen_toks={b.gen_toks(task)}" if b.gen_toks(task) else "")
        cmd = [sys.executable, "-m", "lm_eval", "--model", backend, "--model_args", model_args,
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

    def bench_args(self) -> list[str]:
        """The budget's bench arguments; when the students evaluate with a bf16 SSM state, their `-bf16-state` rows
        too, so that the leaderboard rows of those evaluations (named `<model>-bf16-state`) have throughput."""
        args = list(self.budget.bench_args)
        if self.budget.ssm_state_dtype:
            from harness_ext.generation.bench import EXTRA_ROWS, ROWS
            args += ["--rows", ",".join(ROWS + EXTRA_ROWS)]
        return args

    def stage_bench(self, folder: Path):
        out = (folder / "out").resolve()
        args = self.bench_args()
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

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prm_identity(choice: str) -> dict:
    """What identifies a given (not trained here) PRM: for the committed default, its manifest's sha256 and the
    weights' sha256 it names; for a directory, its path and manifest / config sha256; for a hub id, the id."""
    from harness_ext.scoring.prm import ASSETS_DIR, MANIFEST

    folder = ASSETS_DIR if choice == "default" else Path(choice).expanduser()
    if choice == "default" and not (folder / MANIFEST).is_file():
        raise StageError("prm", f"no committed default PRM ({folder / MANIFEST} is missing); "
                                f"train one with --train-prm or pass --prm none")
    if not folder.is_dir():
        return {"name": choice}
    identity = {"name": choice} if choice == "default" else {"path": str(folder.resolve())}
    for name in (MANIFEST, "config.json"):
        if (folder / name).is_file():
            identity[f"{name}_sha256"] = file_sha256(folder / name)
            manifest = read_json(folder / name) or {}
            if manifest.get("weights_sha256"):
                identity["weights_sha256"] = manifest["weights_sha256"]
            break
    return identity


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
    if reported.get("engine"):
        generation["engine"] = reported["engine"]  # where the time went: prefill, decode, forks, host
    if reported.get("warmup_seconds"):
        generation["warmup_seconds"] = reported["warmup_seconds"]  # compilation + graph capture, untimed
    return {"task": task, "results": str(results_file.resolve()), "samples": str(samples_file.resolve()),
            "problems": problems, "parameters": (data.get("config") or {}).get("model_num_parameters"),
            "generation": generation}


# ----------------------------------------------------------------------------- time estimates and the plan

# Per-stage H100 estimates (seconds): the input of `--plan` and of the scheduler's critical-path priority.
# Sources: leaderboards/README.md (one H100 80GB, 2026-11-27) and the lead's measurements of the same day;
# "guess" marks what nobody has measured yet: correct it from a run's stamps (DONE.json timings.seconds).
H100_ESTIMATES = {
    # measured: one H100 80GB HBM3, 2026-11-27, `thinkfast reproduce --budget fast` (leaderboards/README.md);
    # the second run (4 x H100, commit 14ac7b7) re-measured the stages it reached, the third (4 x H100, 6a5cae3,
    # every stage) the Llamba rates, sampling with the untimed warm-up and whole eval tasks (3:27-6:00); the fourth
    # (4 x H100, 4e57ccb: teacher and calibrated Llamba) and a one-GPU Llamba distillation (57465fe) the rest;
    # the fifth (4 x H100, 5f4e6cd, every stage, bf16-state students) the MambaInLlama rate, sampling and bench
    "worker_start_s": 12,          # measured: a stage's subprocess importing torch / transformers (11-14 s)
    "teacher_s": 32,               # measured: GGUF -> HF conversion, once per machine (26 s, 32 s)
    "init_s": 30,                  # measured: two `thinkfast init` runs (41 s, 30 s)
    "prm_record_s": 1,             # measured: hashing the committed default PRM
    "prm_train_s": 360,            # README, Default PRM: `thinkfast prm train` took 352 s in all
    "distill_setup_s": 55,         # measured (MIL): data, tokenization, decontamination, held-out eval before/after
    "distill_stage_s": 80,         # measured (MIL): regional torch.compile 94 s / 63 s incl. the probe step
    "tokens_per_s": {              # distillation trainer throughput by (recipe, stage)
        ("mambainllama", "kd"): 120_100,  # measured (5f4e6cd): 36M tokens, median rate (103.7k before 57465fe)
        ("llamba", "kd"): 103_500,        # measured (5f4e6cd: fp32 scan inputs): 16M tokens (107.5k at 57465fe)
        ("llamba", "hidden"): 97_900,     # measured (5f4e6cd): 6M tokens (87.5k at 57465fe)
        ("llamba", "matrix"): 35_300,     # measured: 2M tokens (eager attention, L x L mixing matrices at seq 512)
    },
    "gsm8k_sampling_s": 40,        # measured, 500 x 64 completions (5f4e6cd): teacher 34.5 s, MambaInLlama 34.0 s,
                                   # Llamba 32.0 s (bf16 state); fp32-state Llamba 50 s (4e57ccb)
    "math_sampling_s": 90,         # measured at 512 new tokens (5f4e6cd): teacher 40.6 s, MIL 36.1 s, Llamba 31.8 s;
                                   # ~x2 for 1024 (this value is for 1024)
    "prm_scoring_s": 62,           # measured (4e57ccb): the default PRM on 500 x 64 completions, 50-62 s per task
    "math_grading_s": 170,         # measured: math-verify over 500 x 64 MATH answers after the PRM: 165 s (teacher), 45 s
    "eval_task_s": 60,             # measured: lm_eval start, model load, warm-up (10-40 s), GSM8K answer grading
    "bench_s": 420,                # measured: `thinkfast bench` 6:29, 7:11 with the bf16-state rows (HF generate: most)
    "leaderboard_s": 30,           # guess: tables and plots
}
TASK_GEN_TOKS = {"gsm8k500_bon": 400, "math500_bon": 1024}  # the task YAMLs' max_gen_toks


def estimate_seconds(repro: "Reproduction", stage: str) -> float:
    """The stage's expected H100 seconds under the run's budget (see H100_ESTIMATES)."""
    e, b = H100_ESTIMATES, repro.budget
    if stage in ("teacher", "init", "bench", "leaderboard"):
        seconds = e[f"{stage}_s"]
    elif stage == "prm":
        seconds = e["prm_train_s"] if repro.prm_choice == "train" else e["prm_record_s"]
    elif stage.startswith("distill-"):
        student = repro.student(stage)
        stages = repro.distill_stage_budgets(student)
        seconds = e["distill_setup_s"] + sum(
            e["distill_stage_s"] + (override if override is not None else tokens)
            / e["tokens_per_s"].get((student.recipe, name), 58_000)
            for name, (tokens, override) in stages.items())
    elif ":" in stage:  # one task of an eval stage, run on a GPU of its own (see split_eval_tasks)
        seconds = estimate_task_seconds(repro, stage.split(":", 1)[1])
    elif stage.startswith("eval-"):
        seconds = sum(estimate_task_seconds(repro, task) for task in TASKS)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return float(seconds + e["worker_start_s"])


def estimate_task_seconds(repro: "Reproduction", task: str) -> float:
    """One lm_eval task of an eval stage: start-up, sampling, then answer grading (CPU processes) and PRM scoring
    (GPU) at the same time."""
    e, b = H100_ESTIMATES, repro.budget
    scale = b.n / 64 * (b.limit or 500) / 500
    length = (b.gen_toks(task) or TASK_GEN_TOKS[task]) / TASK_GEN_TOKS[task]
    sampling = e["gsm8k_sampling_s"] if task.startswith("gsm8k") else e["math_sampling_s"]
    scoring = e["prm_scoring_s"] * (b.gen_toks(task) or TASK_GEN_TOKS[task]) / 400
    grading = e["math_grading_s"] if task.startswith("math") else 0.0
    return e["eval_task_s"] + scale * (sampling * length + max(grading, scoring if repro.prm_choice != "none" else 0))


def job_estimates(repro: "Reproduction", jobs: list[str]) -> dict[str, float]:
    """Expected seconds per scheduler job; an eval stage whose tasks run as jobs of their own only collects them."""
    return {j: (H100_ESTIMATES["worker_start_s"] + 5.0 if f"{j}:{TASKS[0]}" in jobs else estimate_seconds(repro, j))
            for j in jobs}


def split_eval_tasks(order: list[str], deps: dict[str, tuple[str, ...]]) -> tuple[list[str], dict]:
    """With several GPUs, each eval stage's tasks become jobs of their own ("eval-mil:math500_bon"), run at the
    same time on different GPUs; the stage itself then only collects them (its sidecar and stamp)."""
    jobs, new_deps = [], {}
    for stage in order:
        if stage.startswith("eval-"):
            parts = [f"{stage}:{task}" for task in TASKS]
            for part in parts:
                jobs.append(part)
                new_deps[part] = deps[stage]
            new_deps[stage] = tuple(parts)
        else:
            new_deps[stage] = deps[stage]
        jobs.append(stage)
    return jobs, new_deps


def critical_paths(durations: dict[str, float], deps: dict[str, tuple[str, ...]]) -> dict[str, float]:
    """Each job's own duration plus the longest chain of jobs that wait for it: the list scheduler's priority."""
    waiting = {j: [k for k in durations if j in deps[k]] for j in durations}
    memo: dict[str, float] = {}

    def longest(job: str) -> float:
        if job not in memo:
            memo[job] = durations[job] + max((longest(k) for k in waiting[job]), default=0.0)
        return memo[job]

    return {j: longest(j) for j in durations}


def by_priority(jobs, priority: dict[str, float]) -> list[str]:
    """Longest remaining chain first; ties in pipeline order."""
    rank = {s: i for i, s in enumerate(STAGES)}
    return sorted(jobs, key=lambda j: (-priority[j], rank.get(j.split(":")[0], len(rank)), j))


def simulate(durations: dict[str, float], deps: dict[str, tuple[str, ...]], n_devices: int,
             done: frozenset = frozenset()) -> dict[str, tuple[int | None, float, float]]:
    """Greedy list scheduling as Scheduler does it: job -> (device, start, end); `done` jobs take no device."""
    priority = critical_paths(durations, deps)
    placed = {j: (None, 0.0, 0.0) for j in done}
    free, running, now = list(range(n_devices)), [], 0.0
    pending = [j for j in durations if j not in done]
    while pending or running:
        for job in by_priority([j for j in pending if all(d in placed and placed[d][2] <= now for d in deps[j])],
                               priority):
            if not free:
                break
            device = free.pop(0)
            placed[job] = (device, now, now + durations[job])
            running.append(job)
            pending.remove(job)
        if not running:  # what is left waits on a job outside the plan
            break
        job = min(running, key=lambda j: placed[j][2])
        running.remove(job)
        now = placed[job][2]
        free = sorted(free + [placed[job][0]])
    return placed


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def plan_report(repro: "Reproduction", order: list[str], deps: dict[str, tuple[str, ...]], n_devices: int,
                done: frozenset = frozenset(), cuda_label: bool = True) -> str:
    durations = {s: 0.0 if s in done else t for s, t in job_estimates(repro, order).items()}
    placed = simulate(durations, deps, n_devices, done)
    lines = ["stage DAG (-> waits for; * soft: used when finished):"]
    for stage in (s for s in order if ":" not in s):
        hard = [d for d in repro.dependencies(stage)]
        soft = [f"{d}*" for d in repro.soft_dependencies(stage) if d in order]
        lines.append(f"  {stage:<15} -> {', '.join(hard + soft) or '-'}")
    b = repro.budget
    lines.append(f"greedy list schedule on {n_devices} device(s), budget {b.name}, H100 estimates "
                 f"(H100_ESTIMATES in harness_ext/reproduce.py):")
    if any(":" in s for s in order):
        lines.append("each evaluation's tasks run at the same time on GPUs of their own (stage:task), then the "
                     "stage collects them")
    width = max(15, *(len(s) for s in order))
    lines.append(f"  {'stage':<{width}} {'device':<7} {'start':>6} {'end':>6} {'takes':>6}")
    for stage in sorted(order, key=lambda s: (placed.get(s, (0, 1e9, 0))[1], STAGES.index(s.split(":")[0]), s)):
        if stage in done:
            lines.append(f"  {stage:<{width}} {'-':<7} {'':>6} {'':>6} {'done':>6}")
        elif stage not in placed:
            lines.append(f"  {stage:<{width}} {'-':<7} waits for a stage outside --stages")
        else:
            device, start, end = placed[stage]
            label = f"cuda:{device}" if cuda_label else f"cpu:{device}"
            lines.append(f"  {stage:<{width}} {label:<7} {clock(start):>6} {clock(end):>6} {clock(end - start):>6}")
    total = max((end for _, _, end in placed.values()), default=0.0)
    # the chain that sets the wall-clock: walk back from the last job through the dependency that ends last
    chain, job = [], max(placed, key=lambda j: placed[j][2], default=None)
    while job is not None and job not in done:
        chain.append(job)
        job = max((d for d in deps[job] if d in placed and d not in done), key=lambda d: placed[d][2], default=None)
    lines.append(f"expected wall-clock: {clock(total)} (m:ss; critical path {' -> '.join(reversed(chain)) or '-'}; "
                 f"serial: {clock(sum(durations.values()))})")
    if b.name != "full":
        lines.append(f"budget {b.name} differs from the paper's protocol (full): " + budget_differences(repro))
    return "\n".join(lines)


def budget_differences(repro: "Reproduction") -> str:
    b, parts = repro.budget, []
    for task in TASKS:
        if b.gen_toks(task):
            parts.append(f"{task} max_gen_toks {b.gen_toks(task)} (full {TASK_GEN_TOKS[task]})")
    if b.n != FULL.n or b.limit != FULL.limit:
        parts.append(f"N = {b.n}, {b.limit or 500} problems per task (full 64, 500)")
    for student in STUDENTS.values():
        for name, (tokens, override) in repro.distill_stage_budgets(student).items():
            if override is not None:
                parts.append(f"{student.recipe} {name} {override:,} tokens (recipe {tokens:,})")
    return "; ".join(parts) or "nothing"


# ----------------------------------------------------------------------------- the scheduler

@dataclasses.dataclass
class Launch:
    """How to run one job: its command (in its own process group) and the log to name when it fails."""
    cmd: list[str]
    log: Path
    env: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Device:
    label: str    # what the console shows: cuda:1, cpu:0
    visible: str  # CUDA_VISIBLE_DEVICES for the job ("" hides every GPU)


def devices_for(n: int, cuda: bool) -> list[Device]:
    """n job slots. CUDA: the i-th visible GPU each (respecting a CUDA_VISIBLE_DEVICES the parent was given)."""
    if not cuda:
        return [Device(f"cpu:{i}", "") for i in range(n)]
    given = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    ids = given if given else [str(i) for i in range(n)]
    if len(ids) < n:
        raise SystemExit(f"thinkfast reproduce: --gpus {n}, but CUDA_VISIBLE_DEVICES names only {len(ids)}")
    return [Device(f"cuda:{i}", ids[i]) for i in range(n)]


@dataclasses.dataclass
class _Running:
    name: str
    device: Device
    proc: subprocess.Popen
    reader: threading.Thread | None
    started: float
    log: Path
    tail: bytearray = dataclasses.field(default_factory=bytearray)
    last_line: str = ""


class Scheduler:
    """Runs jobs whose dependencies have finished as soon as a device is free, longest chain first, each in its
    own subprocess (own process group) pinned to one device through CUDA_VISIBLE_DEVICES.

    prepare(job) is called when the job becomes ready and returns a Launch, or a string: the job is up to date
    (the string says why) and takes no device. It may raise StageError: the job fails without starting.
    finish(job, returncode, output_tail) returns None when the job succeeded, else the error to report.
    tolerate(job) -> True: a failure of this job does not stop the run (its dependants start anyway).
    A failure stops new launches; running jobs finish; then run() returns 1. Ctrl-C (or SIGTERM) kills every
    job's process group and returns 130. echo=True streams job output to the console (one device: it reads like
    a serial run); otherwise the console gets a start / finish line per job and a status line every heartbeat_s.
    """

    def __init__(self, jobs: list[str], deps: dict[str, tuple[str, ...]], priority: dict[str, float],
                 devices: list[Device], prepare, finish=None, tolerate=None, estimates: dict[str, float] | None = None,
                 echo: bool = False, heartbeat_s: float = 60.0, poll_s: float = 0.1, out=None, err=None):
        self.jobs, self.deps, self.priority, self.devices = list(jobs), deps, priority, list(devices)
        self.prepare, self.finish = prepare, finish or self.default_finish
        self.tolerate = tolerate or (lambda job: False)
        self.estimates = estimates or {}
        self.echo, self.heartbeat_s, self.poll_s = echo, heartbeat_s, poll_s
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.status: dict[str, str] = {}
        self.where: dict[str, str] = {}       # job -> device label it ran on
        self.errors: dict[str, str] = {}      # job -> error message
        self.logs: dict[str, Path] = {}
        self._prepared: dict[str, Launch] = {}  # ready jobs waiting for a device
        self._t0 = time.time()

    @staticmethod
    def default_finish(job: str, returncode: int, tail: str) -> str | None:
        if returncode == 0:
            return None
        last = [ln for ln in tail.replace("\r", "\n").splitlines() if ln.strip()][-6:]
        return f"exited with status {returncode}; last output:\n    " + "\n    ".join(last)

    def say(self, message: str, err: bool = False) -> None:
        stream = self.err if err else self.out
        print(f"[reproduce +{clock(time.time() - self._t0)}] {message}", file=stream, flush=True)

    def _settled(self, job: str) -> bool:
        return self.status.get(job, "").split(" ")[0] in ("ran", "skipped", "tolerated")

    def run(self) -> int:
        running: list[_Running] = []
        free = list(self.devices)
        failed = False
        next_beat = time.time() + self.heartbeat_s
        try:
            while True:
                if not failed:
                    failed = self._launch_ready(running, free)
                if not running:
                    break
                time.sleep(self.poll_s)
                for job in [r for r in running if r.proc.poll() is not None]:
                    running.remove(job)
                    free.append(job.device)
                    free.sort(key=lambda d: self.devices.index(d))
                    failed = self._finished(job, running) or failed
                if running and not self.echo and time.time() >= next_beat:
                    next_beat = time.time() + self.heartbeat_s
                    self.say("running: " + "; ".join(
                        f"{r.name}@{r.device.label} {clock(time.time() - r.started)}"
                        + (f"/{clock(self.estimates[r.name])}" if r.name in self.estimates else "")
                        + (f" | {r.last_line[:70]}" if r.last_line else "") for r in running))
        except KeyboardInterrupt:
            self._kill(running)
            for r in running:
                self.status[r.name] = "interrupted"
            for job in self.jobs:
                self.status.setdefault(job, "not run")
            self.say("interrupted: stopped " + (", ".join(r.name for r in running) or "nothing") +
                     "; finished stages keep their stamps, the same command resumes", err=True)
            return 130
        for job in self.jobs:
            self.status.setdefault(job, "not run")
        if failed:
            for job, message in self.errors.items():
                if self.status[job] == "FAILED":
                    self.say(f"error: stage {job!r} failed: {message}" if not message.startswith("stage ")
                             else f"error: {message}", err=True)
                    where = f"the log is {self.logs[job]}" if job in self.logs else "it did not start"
                    self.say(f"{where}; finished stages keep their stamps, so re-running the same command "
                             f"resumes at {job}", err=True)
            return 1
        return 0

    def _launch_ready(self, running: list[_Running], free: list[Device]) -> bool:
        """Prepare every ready job, then start them, longest chain first, on the free devices; True on a failure."""
        changed = True
        while changed:  # a skipped (up-to-date) job can make its dependants ready at once
            changed = False
            ready = by_priority([j for j in self.jobs if j not in self.status
                                 and all(self._settled(d) for d in self.deps.get(j, ()))], self.priority)
            for job in ready:
                if job in self._prepared:
                    continue
                try:
                    launch = self.prepare(job)
                except StageError as exc:
                    launch = exc
                except Exception as exc:  # noqa: BLE001 - a bug in prepare must not leave children behind
                    launch = StageError(job, f"{type(exc).__name__}: {exc}")
                if isinstance(launch, StageError):
                    if self._fail(job, str(launch), None):
                        return True
                    changed = True
                    break
                if isinstance(launch, str):
                    self.status[job] = "skipped"
                    print(f"[reproduce] {job}: up to date ({launch}), skipped", file=self.out, flush=True)
                    changed = True
                    break
                self._prepared[job] = launch
        for job in ready:
            if free and job in self._prepared:
                self._start(job, self._prepared.pop(job), free.pop(0), running)
        return False

    def _start(self, job: str, launch: Launch, device: Device, running: list[_Running]) -> None:
        self.logs[job] = launch.log
        self.where[job] = device.label
        self.status[job] = "running"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **launch.env, "CUDA_VISIBLE_DEVICES": device.visible}
        proc = subprocess.Popen(launch.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # its own process group: Ctrl-C reaches it through us
        entry = _Running(job, device, proc, None, time.time(), launch.log)

        def pump():
            while True:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                if self.echo:
                    stream = getattr(self.out, "buffer", None)
                    if stream is not None:
                        self.out.flush()
                        stream.write(chunk)
                        stream.flush()
                    else:
                        self.out.write(chunk.decode(errors="replace"))
                entry.tail.extend(chunk)
                del entry.tail[:-8000]
                lines = [ln for ln in chunk.decode(errors="replace").replace("\r", "\n").splitlines() if ln.strip()]
                if lines:
                    entry.last_line = lines[-1].strip()

        entry.reader = threading.Thread(target=pump, name=f"reproduce-{job}", daemon=True)
        entry.reader.start()
        running.append(entry)
        estimate = f" (estimate {clock(self.estimates[job])})" if job in self.estimates else ""
        self.say(f"{job} started on {device.label}{estimate}; log {launch.log}")

    def _finished(self, entry: _Running, running: list[_Running]) -> bool:
        entry.reader.join(timeout=10)
        seconds = time.time() - entry.started
        try:
            error = self.finish(entry.name, entry.proc.returncode, entry.tail.decode(errors="replace"))
        except Exception as exc:  # noqa: BLE001
            error = f"{type(exc).__name__} while reading its result: {exc}"
        others = ", ".join(f"{r.name}@{r.device.label}" for r in running) or "none"
        if error is None:
            self.status[entry.name] = "ran"
            self.say(f"{entry.name} finished on {entry.device.label} in {clock(seconds)} "
                     f"({sum(self._settled(j) for j in self.jobs)}/{len(self.jobs)} done; running: {others})")
            return False
        return self._fail(entry.name, error, seconds)

    def _fail(self, job: str, message: str, seconds: float | None) -> bool:
        self.errors[job] = message
        if self.tolerate(job):
            self.status[job] = "tolerated (failed)"
            self.say(f"warning: {job} failed, continuing without it: {message.splitlines()[0]}")
            return False
        self.status[job] = "FAILED"
        took = f" after {clock(seconds)}" if seconds is not None else ""
        self.say(f"{job} FAILED{took}: no new stages start; waiting for the running ones", err=True)
        return True

    def _kill(self, running: list[_Running]) -> None:
        for r in running:
            try:
                os.killpg(r.proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + 10
        for r in running:
            try:
                r.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(r.proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                r.proc.wait()


# ----------------------------------------------------------------------------- one stage in its own process

WORKERS = ".workers"  # <workdir>/.workers/<stage>.json: a stage process's result, read by the scheduler


def worker_command(repro: Reproduction, stage: str, force: bool, task: str | None = None) -> list[str]:
    config = {"workdir": str(repro.workdir), "teacher": repro.teacher_spec, "budget": repro.budget.to_json(),
              "smoke": repro.smoke, "device": repro.device, "prm": repro.prm_choice,
              "publish": str(repro.publish) if repro.publish else None, "seed": repro.seed}
    return [sys.executable, "-m", "harness_ext.reproduce", "--worker", json.dumps(config), stage,
            *(["--force"] if force else []), *(["--task", task] if task else [])]


def worker_main(argv: list[str]) -> int:
    """`python -m harness_ext.reproduce --worker CONFIG STAGE [--force]`: run one stage (what the scheduler starts)."""
    if len(argv) < 3 or argv[0] != "--worker":
        print("usage: python -m harness_ext.reproduce --worker CONFIG_JSON STAGE [--force] "
              "(started by `thinkfast reproduce`; run that instead)", file=sys.stderr)
        return 2
    config, stage, force = json.loads(argv[1]), argv[2], "--force" in argv[3:]
    task = argv[argv.index("--task") + 1] if "--task" in argv[3:-1] else None
    repro = Reproduction(Path(config["workdir"]), config["teacher"], Budget.from_json(config["budget"]),
                         config["smoke"], config["device"], config["prm"],
                         Path(config["publish"]) if config["publish"] else None, config["seed"])
    job = f"{stage}:{task}" if task else stage
    result = repro.workdir / WORKERS / f"{job}.json"
    try:
        if task:
            repro.run_eval_task(stage, task)
        else:
            repro.run_stage(stage, force=force)
    except StageError as exc:
        atomic_write_json(result, {"stage": job, "status": "failed", "error": str(exc)})
        print(f"[reproduce] error: {exc}", file=sys.stderr, flush=True)
        return 1
    atomic_write_json(result, {"stage": job, "status": repro.ran[job]})
    return 0


class StageRunner:
    """The Scheduler's callbacks for a Reproduction: up-to-date checks, worker commands, reading results."""

    def __init__(self, repro: Reproduction, forced: list[str]):
        self.repro, self.forced = repro, set(forced)
        self.opened: set[str] = set()  # eval stages whose folder this run has opened for their task jobs

    def prepare(self, job: str) -> Launch | str:
        repro = self.repro
        stage, _, task = job.partition(":")
        if stage not in self.forced and repro.valid_stamp(stage):
            return str(repro.stage_dir(stage) / STAMP)
        repro.require_upstream(stage)  # a missing upstream stage fails here, named, before a process starts
        repro.inputs(stage)
        (repro.workdir / WORKERS / f"{job}.json").unlink(missing_ok=True)
        if task:
            # once, here in the scheduler (the task jobs start together): empty the folder if its inputs changed
            # or --force, so that the task processes only add to it
            if stage not in self.opened:
                repro.open_stage_folder(stage, force=stage in self.forced)
                self.opened.add(stage)
            if repro.task_done(stage, task):
                return str(repro.stage_dir(stage) / "tasks" / f"{task}.json")
            return Launch(worker_command(repro, stage, False, task=task), repro.stage_dir(stage) / f"log.{task}.txt")
        # an eval stage whose tasks ran as jobs of their own only collects them: no --force (it would empty them)
        force = stage in self.forced and stage not in self.opened
        return Launch(worker_command(repro, stage, force), repro.stage_dir(stage) / "log.txt")

    def finish(self, stage: str, returncode: int, tail: str) -> str | None:
        result = read_json(self.repro.workdir / WORKERS / f"{stage}.json") or {}
        if returncode == 0 and result.get("status") in ("ran", "skipped"):
            return None
        if result.get("error"):
            return result["error"]
        return Scheduler.default_finish(stage, returncode or 1, tail) + (
            "\n    (the stage process wrote no result)" if not result else "")

    def tolerate(self, stage: str) -> bool:
        # a trained PRM is optional in --smoke: evaluation then runs without one (bon / weighted_bon as n/a)
        if stage == "prm" and self.repro.smoke and self.repro.prm_choice == "train":
            print("[reproduce] smoke run: evaluating without a PRM (bon / weighted_bon shown as n/a)", flush=True)
            return True
        return False


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
                        help="one folder per stage (default: runs/reproduce, runs/reproduce-fast with --budget fast, "
                             "runs/reproduce-smoke with --smoke)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny budgets on CPU, minutes (implied when there is no CUDA device)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full",
                        help="full: the paper's protocol (default); fast: fits one 30-minute lease on 4 GPUs "
                             "(MATH-500 at 512 instead of 1024 new tokens)")
    parser.add_argument("--gpus", type=int, default=None,
                        help="devices to spread stages over, one stage per device (default: every visible CUDA "
                             "device; 1 on CPU)")
    parser.add_argument("--split-eval", action=argparse.BooleanOptionalAction, default=True,
                        help="with several devices, run each evaluation's tasks (GSM8K-500, MATH-500) at the same "
                             "time on devices of their own (default: on)")
    parser.add_argument("--plan", action="store_true",
                        help="print the stage DAG, the device schedule and the expected wall-clock from H100 "
                             "estimates; run nothing")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset to run (default: all: {','.join(STAGES)})")
    parser.add_argument("--force", action="append", default=[], metavar="STAGE",
                        help="re-run these stages from scratch even if finished (repeat or comma-separate)")
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help="embedded teacher name, HF Llama id or checkpoint directory (default: %(default)s)")
    parser.add_argument("--prm", default="default",
                        help="the PRM the evaluations use: 'default' (the committed one, harness_ext/assets/prm), "
                             "a directory or hub id for load_prm, or 'none'; the prm stage records which")
    parser.add_argument("--train-prm", action="store_true",
                        help="train the PRM in the prm stage (`thinkfast prm train`, ~6 min of H100) instead")
    parser.add_argument("--publish", default=None, help="also copy the leaderboard files into this folder")
    parser.add_argument("--n", type=int, default=None, help="samples per problem (default 64; smoke 4)")
    parser.add_argument("--limit", type=int, default=None, help="problems per task (default all 500; smoke 2)")
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="max new tokens per completion, every task (default: the budget's, else the task's: "
                             "GSM8K 400 / MATH 1024; smoke 24)")
    parser.add_argument("--ssm-state-dtype", choices=("bfloat16",), default=None,
                        help="the students' SSM state while they generate in the eval stages (lm-eval model_args "
                             "ssm_state_dtype); default: the checkpoint's, float32")
    parser.add_argument("--heartbeat", type=float, default=60.0, help="seconds between status lines (default 60)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = torch.cuda.is_available()
    smoke = bool(args.smoke)
    if args.smoke and args.budget != "full":
        raise SystemExit(f"thinkfast reproduce: --smoke and --budget {args.budget}: choose one")
    if not smoke and not cuda and not args.plan:  # a plan is H100 arithmetic: it needs no GPU
        smoke = True
        print("[reproduce] no CUDA device: running the --smoke reproduction (CPU, tiny budgets: a few "
              "distillation steps, 2 problems per task, N = 4). The full run needs a GPU.", flush=True)
    device = "cuda" if (cuda or args.plan) and not smoke else "cpu"
    budget = SMOKE if smoke else BUDGETS[args.budget]
    overrides = {k: v for k, v in (("n", args.n), ("limit", args.limit), ("max_gen_toks", args.max_gen_toks))
                 if v is not None}
    for k, v in overrides.items():
        if v < 1:
            raise SystemExit(f"thinkfast reproduce: --{k.replace('_', '-')} must be positive, got {v}")
    budget = dataclasses.replace(budget, **overrides)
    if args.ssm_state_dtype:
        budget = dataclasses.replace(budget, ssm_state_dtype=args.ssm_state_dtype)
    visible = torch.cuda.device_count() if cuda and not smoke else 0
    gpus = args.gpus if args.gpus is not None else (visible or 1)
    if gpus < 1:
        raise SystemExit(f"thinkfast reproduce: --gpus must be positive, got {gpus}")
    if device == "cuda" and not args.plan and gpus > visible:
        raise SystemExit(f"thinkfast reproduce: --gpus {gpus}, but only {visible} CUDA device(s) are visible")
    prm = "train" if args.train_prm or args.prm == "train" else args.prm
    if args.train_prm and args.prm not in ("default", "train"):
        raise SystemExit(f"thinkfast reproduce: --train-prm and --prm {args.prm}: choose one")
    selected = parse_stage_list(args.stages, "--stages")
    forced = [s for item in args.force for s in parse_stage_list(item, "--force")]
    not_selected = [s for s in forced if s not in selected]
    if not_selected:
        raise SystemExit(f"thinkfast reproduce: --force {','.join(not_selected)}: not among --stages {args.stages}")
    default_dir = "runs/reproduce-smoke" if smoke else ("runs/reproduce" if budget.name == "full"
                                                        else f"runs/reproduce-{budget.name}")
    workdir = Path(args.workdir or default_dir).resolve()
    repro = Reproduction(workdir, args.teacher, budget, smoke, device, prm,
                         Path(args.publish).resolve() if args.publish else None, args.seed)
    order = [s for s in STAGES if s in selected and not (s == "prm" and prm == "none")]
    # soft dependencies order stages too: an evaluation waits for the PRM, the leaderboard for the bench
    deps = {s: tuple(d for d in (*repro.dependencies(s), *repro.soft_dependencies(s)) if d in order) for s in order}
    split = gpus > 1 and args.split_eval
    jobs, job_deps = split_eval_tasks(order, deps) if split else (order, deps)
    estimates = job_estimates(repro, jobs)

    done: set[str] = set()  # up to date now and reading only up-to-date stages (jobs are in topological order)
    for j in jobs:
        stage = j.split(":")[0]
        if stage not in forced and all(d in done for d in job_deps[j]) and repro.valid_stamp(stage):
            done.add(j)
    if args.plan:
        print(f"[reproduce] plan for {workdir} (nothing runs):")
        print(plan_report(repro, jobs, job_deps, gpus, frozenset(done), cuda_label=device == "cuda"))
        return 0

    slots = devices_for(gpus, device == "cuda")
    print(f"[reproduce] {budget.name} run on {gpus} {'GPU' if device == 'cuda' else 'CPU slot'}(s) "
          f"({', '.join(d.label for d in slots)}) in {workdir}: stages {','.join(order)}"
          f"{' (forced: ' + ','.join(forced) + ')' if forced else ''}; PRM: "
          f"{'trained here' if prm == 'train' else prm}", flush=True)
    if not smoke:
        todo = {s: 0.0 if s in done else t for s, t in estimates.items()}
        total = max((end for _, _, end in simulate(todo, job_deps, gpus, frozenset(done)).values()), default=0)
        print(f"[reproduce] expected wall-clock on H100s: {clock(total)} (m:ss; `--plan` shows the schedule)",
              flush=True)
    runner = StageRunner(repro, forced)
    scheduler = Scheduler(jobs, job_deps, critical_paths(estimates, job_deps), slots, runner.prepare, runner.finish,
                          runner.tolerate, estimates=None if smoke else estimates, echo=gpus == 1,
                          heartbeat_s=args.heartbeat)
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # a lease ending sends SIGTERM: stop the children as Ctrl-C would
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers: main thread only
    if main_thread:
        signal.signal(signal.SIGTERM, on_sigterm)
    t0 = time.time()
    try:
        code = scheduler.run()
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    summary(scheduler, jobs, t0)
    board = repro.valid_stamp("leaderboard") if "leaderboard" in order and code == 0 else None
    if board:
        print(f"[reproduce] leaderboard: {board['outputs']['markdown']}", flush=True)
    return code


def summary(scheduler: Scheduler, order: list[str], t0: float) -> None:
    parts = [f"{s}={scheduler.status.get(s, 'not run')}" + (f"@{scheduler.where[s]}" if s in scheduler.where else "")
             for s in order]
    print(f"[reproduce] summary ({time.time() - t0:.1f}s): " + ", ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
