"""`thinkfast reproduce`: the whole --smoke path on CPU, resume, --stages, --force, and a failing stage.

    .venv/bin/python -m pytest -x -q tests/test_reproduce.py             # fast checks only
    .venv/bin/python -m pytest -x -q -m slow tests/test_reproduce.py     # + the end-to-end smoke run (minutes)

The slow tests share one smoke reproduction (real teacher, real `thinkfast init / distill / prm train / bench /
leaderboard`, the real `lm_eval` CLI) in a temporary workdir; later tests re-invoke the command on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness_ext import reproduce as R

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 2400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness_ext.cli", "reproduce", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def stamps(root: Path) -> dict[str, str]:
    return {s: (root / s / R.STAMP).read_text() for s in R.STAGES if (root / s / R.STAMP).is_file()}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    R.add_arguments(parser)
    return parser.parse_args(list(argv))


# ----------------------------------------------------------------------------- fast checks


def test_commands_follow_the_budget(tmp_path):
    smoke = R.Reproduction(tmp_path, R.DEFAULT_TEACHER, R.SMOKE, smoke=True, device="cpu", prm="train")
    cmd = smoke.lm_eval_cmd("llamba", Path("/ckpt/llamba"), "gsm8k500_bon", "/prm", tmp_path / "out")
    shown = R.display(cmd)
    assert shown.startswith("lm_eval --model llamba --model_args pretrained=/ckpt/llamba --tasks gsm8k500_bon")
    assert "--limit 2" in shown and "temperature=0.8,max_gen_toks=24" in shown and "--log_samples" in shown
    metadata = json.loads(cmd[cmd.index("--metadata") + 1])
    assert metadata == {"n": 4, "prm": "/prm", "prm_device": "cpu"}

    full = R.Reproduction(tmp_path, R.DEFAULT_TEACHER, R.FULL, smoke=False, device="cuda", prm="train")
    cmd = full.lm_eval_cmd("thinkfast", Path("/t"), "math500_bon", None, tmp_path / "out")
    assert "--limit" not in cmd and "max_gen_toks" not in " ".join(cmd)
    assert json.loads(cmd[cmd.index("--metadata") + 1]) == {"n": 64}
    assert cmd[cmd.index("--gen_kwargs") + 1] == "temperature=0.8"

    # smoke: every active distillation stage of both recipes gets the tiny budget; full: the recipe's own
    llamba = smoke.distill_args(R.STUDENTS["llamba"], Path("OUT"))
    assert "--smoke" in llamba
    assert {a.split(".")[1] for a in llamba if a.startswith("stages.")} == {"matrix", "hidden", "kd"}
    assert all(a.endswith("=256") for a in llamba if a.startswith("stages."))
    assert not [a for a in full.distill_args(R.STUDENTS["mil"], Path("OUT")) if a.startswith("stages.")]
    # init reads the recipe's init section, so distill starts from exactly that student
    assert smoke.init_args(R.STUDENTS["mil"]) == ["--attn-fraction", "0.5"]


def test_bad_arguments_are_named():
    for argv, message in ((["--stages", "teacher,distil"], "unknown stage(s) ['distil']"),
                          (["--stages", "bench", "--force", "leaderboard"], "not among --stages"),
                          (["--smoke", "--n", "0"], "--n must be positive")):
        with pytest.raises(SystemExit) as info:
            R.run(parse(*argv))
        assert message in str(info.value)


def test_missing_dependency_stops_with_the_stage_named(tmp_path):
    result = cli("--smoke", "--workdir", str(tmp_path), "--stages", "init", timeout=300)
    assert result.returncode == 1
    assert "stage 'init' failed: it needs stage 'teacher'" in result.stderr
    assert "--stages teacher,init" in result.stderr
    assert not (tmp_path / "init" / R.STAMP).exists()


# ----------------------------------------------------------------------------- the scheduler, with fake stages


def fake_stage(tmp_path: Path, name: str, script: str) -> R.Launch:
    """A stage that runs a shell script in tmp_path; $DONE is its stamp (what makes it 'finished' on resume)."""
    log = tmp_path / f"{name}.log"
    cmd = ["sh", "-c", f"cd {tmp_path} && {{ {script} ; }} > {log} 2>&1 && touch {name}.done"]
    return R.Launch(cmd, log)


def fake_scheduler(tmp_path, scripts: dict, deps: dict, devices=2, priority=None, tolerate=None, out=None):
    import io

    def prepare(name):
        if (tmp_path / f"{name}.done").exists():
            return f"{name}.done"
        return fake_stage(tmp_path, name, scripts[name])

    def finish(name, rc, tail):
        if rc == 0:
            return None
        return f"exited with status {rc}; see {tmp_path / (name + '.log')}"

    out, err = out or io.StringIO(), io.StringIO()
    sched = R.Scheduler(list(scripts), deps, priority or {n: 1.0 for n in scripts}, R.devices_for(devices, cuda=True),
                        prepare, finish, tolerate, heartbeat_s=0.3, poll_s=0.02, out=out, err=err)
    return sched, out, err


def test_scheduler_respects_dependencies_and_runs_stages_concurrently(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # a and b can only both finish if they overlap: each waits (up to 20 s) for the other's start file
    wait_for = "i=0; until [ -f {0} ]; do sleep 0.05; i=$((i+1)); [ $i -gt 400 ] && exit 3; done"
    scripts = {
        "root": "echo $CUDA_VISIBLE_DEVICES > root.dev",
        "a": "touch a.started; " + wait_for.format("b.started") + "; test -f root.done; echo $CUDA_VISIBLE_DEVICES > a.dev",
        "b": "touch b.started; " + wait_for.format("a.started") + "; test -f root.done; echo $CUDA_VISIBLE_DEVICES > b.dev",
        "join": "test -f a.done && test -f b.done",
    }
    deps = {"root": (), "a": ("root",), "b": ("root",), "join": ("a", "b")}
    sched, out, err = fake_scheduler(tmp_path, scripts, deps)
    assert sched.run() == 0, err.getvalue() + out.getvalue()
    assert sched.status == {"root": "ran", "a": "ran", "b": "ran", "join": "ran"}
    # each stage saw exactly one GPU, and the two concurrent ones saw different GPUs
    devs = {n: (tmp_path / f"{n}.dev").read_text().strip() for n in ("root", "a", "b")}
    assert {devs["a"], devs["b"]} == {"0", "1"} and devs["root"] in ("0", "1")
    text = out.getvalue()
    assert "a started on cuda:" in text and "b started on cuda:" in text and "join finished on cuda:" in text
    # resume: everything is finished now, so nothing starts and nothing takes a device
    sched, out, _ = fake_scheduler(tmp_path, scripts, deps)
    assert sched.run() == 0
    assert set(sched.status.values()) == {"skipped"} and "started" not in out.getvalue()
    assert "[reproduce] join: up to date (join.done), skipped" in out.getvalue()


def test_scheduler_failure_stops_new_stages_and_names_the_log(tmp_path):
    scripts = {
        "slow": "sleep 1.5; touch slow.ok",               # running when `bad` fails: allowed to finish
        "bad": "echo boom; exit 7",
        "after-bad": "touch after-bad.ran",                 # depends on bad: never starts
        "later": "touch later.ran",                         # independent but lower priority: no new starts
    }
    deps = {"slow": (), "bad": (), "after-bad": ("bad",), "later": ("slow",)}
    priority = {"slow": 3.0, "bad": 2.0, "after-bad": 1.0, "later": 1.0}
    sched, out, err = fake_scheduler(tmp_path, scripts, deps, priority=priority)
    assert sched.run() == 1
    assert sched.status == {"slow": "ran", "bad": "FAILED", "after-bad": "not run", "later": "not run"}
    assert (tmp_path / "slow.ok").exists() and not (tmp_path / "later.ran").exists()
    assert not (tmp_path / "after-bad.ran").exists()
    message = err.getvalue()
    assert "error: stage 'bad' failed: exited with status 7" in message
    assert f"the log is {tmp_path / 'bad.log'}" in message
    assert (tmp_path / "bad.log").read_text().strip() == "boom"
    # resume after fixing the stage: finished ones are skipped, the rest run
    scripts["bad"] = "echo fixed"
    sched, out, err = fake_scheduler(tmp_path, scripts, deps, priority=priority)
    assert sched.run() == 0, err.getvalue()
    assert sched.status == {"slow": "skipped", "bad": "ran", "after-bad": "ran", "later": "ran"}


def test_scheduler_priority_and_tolerated_failure(tmp_path):
    # one device: the longest chain goes first whatever the listed order; a tolerated failure lets dependants run
    scripts = {"short": "echo short >> order.txt", "long": "echo long >> order.txt",
               "optional": "exit 1", "uses-optional": "echo uses >> order.txt"}
    deps = {"short": (), "long": (), "optional": (), "uses-optional": ("optional",)}
    durations = {"short": 1.0, "long": 5.0, "optional": 0.5, "uses-optional": 0.5}
    priority = R.critical_paths(durations, deps)
    sched, _, _ = fake_scheduler(tmp_path, scripts, deps, devices=1, priority=priority,
                                 tolerate=lambda name: name == "optional")
    assert sched.run() == 0
    assert (tmp_path / "order.txt").read_text().split() == ["long", "short", "uses"]
    assert sched.status["optional"].startswith("tolerated")


def test_scheduler_interrupt_kills_the_stage_processes(tmp_path):
    import signal

    # A shell starts background jobs (`pytest ... &`) with SIGINT ignored, and then interrupt_main() does nothing.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_scheduler_and_check(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_scheduler_and_check(tmp_path):
    import threading

    scripts = {"forever": "echo $$ > forever.pid; sleep 60"}
    sched, _, err = fake_scheduler(tmp_path, scripts, {"forever": ()})
    pid_file = tmp_path / "forever.pid"

    def interrupt():
        for _ in range(400):
            if pid_file.exists() and pid_file.read_text().strip():
                break
            time.sleep(0.05)
        import _thread
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    t0 = time.time()
    assert sched.run() == 130
    assert time.time() - t0 < 30 and sched.status["forever"] == "interrupted"
    pid = int(pid_file.read_text())
    time.sleep(0.2)
    with pytest.raises(ProcessLookupError):  # the stage's shell (and its sleep) are gone
        os.kill(pid, 0)
    assert "interrupted: stopped forever" in err.getvalue()


def test_simulated_schedule_is_greedy_by_critical_path():
    durations = {"a": 1.0, "long": 10.0, "b": 2.0, "after": 3.0}
    deps = {"a": (), "long": ("a",), "b": ("a",), "after": ("long", "b")}
    placed = R.simulate(durations, deps, 2)
    assert placed["a"] == (0, 0.0, 1.0)
    assert placed["long"][1] == 1.0 and placed["b"][1] == 1.0 and placed["long"][0] != placed["b"][0]
    assert placed["after"][1:] == (11.0, 14.0)
    assert R.simulate(durations, deps, 1)["after"][2] == 16.0  # serial: the sum


def test_plan_prints_dag_schedule_on_four_gpus(tmp_path, capsys):
    assert R.run(parse("--plan", "--gpus", "4", "--budget", "fast", "--workdir", str(tmp_path))) == 0
    text = capsys.readouterr().out
    assert "eval-llamba     -> distill-llamba, prm*" in text
    assert "leaderboard     -> eval-teacher, eval-mil, eval-llamba, bench*" in text
    for stage in R.STAGES:
        assert re.search(rf"\n  {stage} +cuda:", text), stage
    # several GPUs: each evaluation's two tasks run at once on GPUs of their own, then the stage collects them
    for stage in ("eval-teacher", "eval-mil", "eval-llamba"):
        starts = [re.search(rf"\n  {stage}:{task} +cuda:\d +(\d+:\d\d)", text).group(1) for task in R.TASKS]
        assert starts[0] == starts[1], (stage, starts)
    total = re.search(r"expected wall-clock: (\d+):(\d\d).*serial: (\d+):(\d\d)", text)
    wall, serial = (int(total.group(1)) * 60 + int(total.group(2)), int(total.group(3)) * 60 + int(total.group(4)))
    assert wall < serial / 2  # four GPUs: the critical path, not the sum of the stages
    assert re.search(r"critical path teacher -> init -> distill-(mil|llamba) -> eval-\w+:math500_bon -> eval-\w+ "
                     r"-> leaderboard", text)
    assert R.run(parse("--plan", "--gpus", "4", "--budget", "fast", "--no-split-eval", "--workdir", str(tmp_path))) == 0
    unsplit = capsys.readouterr().out
    assert ":math500_bon" not in unsplit and re.search(r"critical path teacher -> init -> distill-(mil|llamba) -> "
                                                       r"eval-(mil|llamba) -> leaderboard", unsplit)
    assert "budget fast differs from the paper's protocol (full): math500_bon max_gen_toks 512 (full 1024)\n" in text
    assert not any(tmp_path.iterdir())  # nothing ran

    # the full protocol: same DAG, longer; one GPU: the serial sum
    assert R.run(parse("--plan", "--gpus", "4", "--workdir", str(tmp_path))) == 0
    full = capsys.readouterr().out
    assert "budget full" in full and "differs from the paper" not in full
    seconds = lambda t: (lambda m: int(m.group(1)) * 60 + int(m.group(2)))(re.search(r"expected wall-clock: (\d+):(\d\d)", t))  # noqa: E731
    assert seconds(full) > seconds(text)
    assert R.run(parse("--plan", "--gpus", "1", "--workdir", str(tmp_path))) == 0
    serial = capsys.readouterr().out
    assert re.search(r"expected wall-clock: (\d+:\d\d) .*serial: \1\)", serial)


def test_default_prm_is_recorded_not_trained(tmp_path):
    repro = R.Reproduction(tmp_path, R.DEFAULT_TEACHER, R.FULL, smoke=False, device="cuda", prm="default")
    assert repro.dependencies("prm") == ()  # nothing to wait for
    inputs = repro.inputs("prm")
    from harness_ext.scoring.prm import ASSETS_DIR, MANIFEST
    manifest = json.loads((ASSETS_DIR / MANIFEST).read_text())
    assert inputs["identity"]["weights_sha256"] == manifest["weights_sha256"]
    assert inputs["identity"]["prm_manifest.json_sha256"] == R.file_sha256(ASSETS_DIR / MANIFEST)
    outputs, commands, extra = repro.stage_prm(tmp_path)
    assert outputs["prm"] == "default" and extra["prm_metrics"] == manifest["metrics"]
    assert commands == ["load_prm('default')"]
    # the stage process itself, with no teacher stage anywhere (the scheduler starts it beside the teacher)
    repro.run_stage("prm", force=False)
    assert repro.valid_stamp("prm")["outputs"]["prm"] == "default"
    # recorded again (a new run id): the PRM is the same files, so the evaluations keyed by it stay valid
    spec = repro.prm_spec()
    repro.run_stage("prm", force=True)
    assert repro.prm_spec() == spec and "run" not in spec[1]["prm"]
    trained = R.Reproduction(tmp_path, R.DEFAULT_TEACHER, R.FULL, smoke=False, device="cuda", prm="train")
    assert trained.dependencies("prm") == ("teacher",)
    # the fast budget changes only what it says
    fast = R.Reproduction(tmp_path, R.DEFAULT_TEACHER, R.FAST, smoke=False, device="cuda", prm="default")
    cmd = fast.lm_eval_cmd("llamba", Path("/c"), "math500_bon", "default", tmp_path)
    assert cmd[cmd.index("--gen_kwargs") + 1] == "temperature=0.8,max_gen_toks=512"
    cmd = fast.lm_eval_cmd("llamba", Path("/c"), "gsm8k500_bon", "default", tmp_path)
    assert cmd[cmd.index("--gen_kwargs") + 1] == "temperature=0.8"
    for student in R.STUDENTS.values():   # both distil with their recipes' budgets
        assert not [a for a in fast.distill_args(student, Path("OUT")) if a.startswith("stages.")]
    # Llamba's recipe: stage 1 off (stage 0 calibrates), so reproduce plans only the stages that train
    assert list(fast.distill_stage_budgets(R.STUDENTS["llamba"])) == ["hidden", "kd"]
    assert R.Budget.from_json(json.loads(json.dumps(R.FAST.to_json()))) == R.FAST
    # --ssm-state-dtype bfloat16: the students generate with bf16 state, through lm-eval's model_args
    bf16 = dataclasses.replace(R.FAST, ssm_state_dtype="bfloat16")
    assert R.Budget.from_json(json.loads(json.dumps(bf16.to_json()))) == bf16
    state = R.Reproduction(tmp_path, R.DEFAULT_TEACHER, bf16, smoke=False, device="cuda", prm="default")
    cmd = state.lm_eval_cmd("llamba", Path("/c"), "gsm8k500_bon", "default", tmp_path, ssm_state_dtype="bfloat16")
    assert cmd[cmd.index("--model_args") + 1] == "pretrained=/c,ssm_state_dtype=bfloat16"
    assert cmd[cmd.index("--model") + 1] == "llamba"
    # ... and the bench measures the bf16-state rows those evaluations' leaderboard rows read
    assert state.bench_args() == ["--rows", "hf-generate,teacher,mil50,llamba,mil50-bf16-state,llamba-bf16-state"]
    assert fast.bench_args() == []


# ----------------------------------------------------------------------------- the smoke reproduction


@pytest.fixture(scope="module")
def smoke_run():
    import shutil
    import tempfile

    import torch

    # not under pytest's basetemp: another pytest session on the machine prunes old basetemps, which deleted a
    # workdir in the middle of this (many-minute) run once
    workdir = Path(tempfile.mkdtemp(prefix="thinkfast-reproduce-smoke-"))
    yield from _smoke_run(workdir, torch.cuda.is_available())
    shutil.rmtree(workdir, ignore_errors=True)


def _smoke_run(workdir: Path, cuda: bool):
    # no GPU here: leaving out --smoke checks that it is implied; with a GPU, ask for it explicitly
    args = ["--workdir", str(workdir)] + (["--smoke"] if cuda else [])
    t0 = time.time()
    result = cli(*args)
    print(f"smoke reproduction: {time.time() - t0:.0f}s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    yield workdir, result


@pytest.mark.slow
def test_smoke_reproduction_end_to_end(smoke_run):
    import torch

    workdir, result = smoke_run
    if not torch.cuda.is_available():
        assert "no CUDA device: running the --smoke reproduction" in result.stdout
    # every stage printed the commands it ran
    for shown in ("thinkfast init --arch mambainllama", "thinkfast distill --recipe llamba",
                  "lm_eval --model thinkfast", "lm_eval --model mambainllama", "lm_eval --model llamba",
                  "thinkfast bench", "thinkfast leaderboard"):
        assert f"$ {shown}" in result.stdout, shown
    prm_ok = (workdir / "prm" / R.STAMP).is_file()
    for stage in R.STAGES:
        if stage == "prm" and not prm_ok:  # allowed to fail in smoke: evaluation then runs without a PRM
            assert "evaluating without a PRM" in result.stdout
            continue
        stamp = json.loads((workdir / stage / R.STAMP).read_text())
        assert stamp["stage"] == stage and stamp["smoke"] is True and stamp["commands"]
        assert stamp["key"] == R.digest(stamp["inputs"])
        assert all(Path(p).exists() for p in R.Reproduction._paths(stamp["outputs"])), stamp["outputs"]

    for student in R.STUDENTS.values():
        config = json.loads((workdir / student.stage / "out" / "config.json").read_text())
        assert config["model_type"] == student.recipe
        assert json.loads((workdir / student.stage / R.STAMP).read_text())["distillation_tokens"] > 0

    names = {"eval-teacher": "smollm2-135m-instruct", "eval-mil": "mambainllama-50-135m", "eval-llamba": "llamba-135m"}
    for stage, name in names.items():
        (meta_path,) = (workdir / stage / "lm_eval").rglob(R.META_FILE)
        meta = json.loads(meta_path.read_text())
        assert meta["model"] == name and meta["schema"] == R.META_SCHEMA and meta["card"] == "cpu"
        assert meta["parameters"] > 100_000_000  # the real 135M teacher's width and depth
        assert (meta["distillation_tokens"] is None) == (stage == "eval-teacher")
        for task in R.TASKS:
            gen = meta["generation"][task]
            assert gen["num_samples"] == 2 * 4  # --limit 2 problems x N = 4
            assert gen["wall_clock_seconds"] > 0 and gen["generated_tokens"] > 0
            assert list(meta_path.parent.glob(f"samples_{task}_*.jsonl"))
        results = [json.loads(p.read_text()) for p in meta_path.parent.glob("results_*.json")]
        assert sorted(t for r in results for t in r["results"]) == sorted(R.TASKS)

    assert json.loads((workdir / "bench" / "out" / "bench.json").read_text())["results"]
    board = (workdir / "leaderboard" / "out" / "leaderboard.md").read_text()
    for name in names.values():
        assert name in board
    if not prm_ok:
        assert "n/a" in board


class _Captured(Exception):
    pass


def test_bf16_state_reaches_the_student_evaluations_only(smoke_run, monkeypatch):
    """--ssm-state-dtype bfloat16 re-keys the students' evaluations (not the teacher's) and puts the dtype in
    their lm-eval model_args."""
    workdir, _ = smoke_run
    plain = R.Reproduction(workdir, R.DEFAULT_TEACHER, R.SMOKE, smoke=True, device="cpu", prm="default")
    state = R.Reproduction(workdir, R.DEFAULT_TEACHER, dataclasses.replace(R.SMOKE, ssm_state_dtype="bfloat16"),
                           smoke=True, device="cpu", prm="default")
    assert state.key("eval-teacher") == plain.key("eval-teacher")
    for stage in ("eval-mil", "eval-llamba"):
        assert state.key(stage) != plain.key(stage) and state.inputs(stage)["ssm_state_dtype"] == "bfloat16"
    commands = {}

    def capture(stage, cmd):
        commands[stage] = cmd
        raise _Captured()
    monkeypatch.setattr(state, "task_done", lambda stage, task: False)
    monkeypatch.setattr(state, "execute", capture)
    for stage in ("eval-teacher", "eval-llamba"):
        with pytest.raises(_Captured):
            state._eval_task(stage, workdir / "unused", "gsm8k500_bon")
    model_args = {stage: cmd[cmd.index("--model_args") + 1] for stage, cmd in commands.items()}
    assert "ssm_state_dtype" not in model_args["eval-teacher"]
    assert model_args["eval-llamba"].endswith(",ssm_state_dtype=bfloat16")


def test_editing_a_recipe_rekeys_its_distill_stage(smoke_run, monkeypatch):
    """A recipe's defaults are part of its distill stage's key (no budget override passes them as arguments): a
    changed default re-runs that stage and what depends on it, not the other student's."""
    workdir, _ = smoke_run
    repro = R.Reproduction(workdir, R.DEFAULT_TEACHER, R.SMOKE, smoke=True, device="cpu", prm="default")
    before = {stage: repro.key(stage) for stage in ("distill-mil", "distill-llamba")}
    assert repro.valid_stamp("distill-mil") is not None
    import distill.cli

    real = distill.cli.load_recipe

    def edited(name):
        recipe = real(name)
        if name == "mambainllama":
            recipe["stages"]["kd"]["temperature"] = 2.0      # a default the smoke section leaves alone
        return recipe
    monkeypatch.setattr(distill.cli, "load_recipe", edited)
    assert repro.key("distill-mil") != before["distill-mil"] and repro.valid_stamp("distill-mil") is None
    assert repro.key("distill-llamba") == before["distill-llamba"]


@pytest.mark.slow
def test_second_invocation_skips_every_stage_and_changes_nothing(smoke_run):
    workdir, _ = smoke_run
    before = snapshot(workdir)
    t0 = time.time()
    result = cli("--smoke", "--workdir", str(workdir))
    assert result.returncode == 0, result.stderr[-4000:]
    assert time.time() - t0 < 120
    expected = [s for s in R.STAGES if s != "prm" or (workdir / "prm" / R.STAMP).is_file()]
    for stage in expected:
        assert f"[reproduce] {stage}: up to date" in result.stdout, stage
    assert "$ " not in result.stdout  # nothing ran
    assert snapshot(workdir) == before


@pytest.mark.slow
def test_stage_subset_and_force(smoke_run):
    workdir, _ = smoke_run
    before = stamps(workdir)
    result = cli("--smoke", "--workdir", str(workdir), "--stages", "bench,leaderboard", "--force", "leaderboard")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[reproduce] bench: up to date" in result.stdout
    assert "$ thinkfast leaderboard" in result.stdout and "$ thinkfast bench" not in result.stdout
    assert "summary" in result.stdout and "leaderboard=ran" in result.stdout
    after = stamps(workdir)
    assert after["leaderboard"] != before["leaderboard"]
    assert {s: v for s, v in after.items() if s != "leaderboard"} == {s: v for s, v in before.items()
                                                                      if s != "leaderboard"}
    # the re-run leaderboard is itself up to date now
    result = cli("--smoke", "--workdir", str(workdir), "--stages", "leaderboard")
    assert result.returncode == 0 and "[reproduce] leaderboard: up to date" in result.stdout


@pytest.mark.slow
def test_eval_tasks_run_as_jobs_of_their_own_on_two_devices(smoke_run):
    workdir, _ = smoke_run
    before = stamps(workdir)
    result = cli("--smoke", "--workdir", str(workdir), "--gpus", "2", "--stages", "eval-teacher",
                 "--force", "eval-teacher", "--heartbeat", "600")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    lines = result.stdout.splitlines()
    at = lambda text: next(i for i, line in enumerate(lines) if text in line)  # noqa: E731
    started = [at(f"eval-teacher:{task} started on cpu:") for task in R.TASKS]
    finished = [at(f"eval-teacher:{task} finished on cpu:") for task in R.TASKS]
    assert max(started) < min(finished)  # both tasks ran at the same time
    assert at("eval-teacher started on cpu:") > max(finished)  # then the stage collected them
    folder = workdir / "eval-teacher"
    assert all((folder / f"log.{task}.txt").is_file() for task in R.TASKS)
    collected = (folder / "log.txt").read_text()
    assert all(f"{task}: finished earlier" in collected for task in R.TASKS) and "$ lm_eval" not in collected
    stamp = json.loads((folder / R.STAMP).read_text())
    meta = json.loads(Path(stamp["outputs"]["meta"]).read_text())
    assert set(meta["generation"]) == set(R.TASKS) and meta["tasks_missing"] == []
    after = stamps(workdir)
    assert after["eval-teacher"] != before["eval-teacher"]
    assert {s: v for s, v in after.items() if s not in ("eval-teacher", "leaderboard")} == {
        s: v for s, v in before.items() if s not in ("eval-teacher", "leaderboard")}


@pytest.mark.slow
def test_failing_stage_names_itself_and_keeps_earlier_stamps(smoke_run):
    workdir, _ = smoke_run
    config = workdir / "distill-mil" / "out" / "config.json"
    good = config.read_text()
    before = stamps(workdir)
    config.write_text("{ not json")
    try:
        # both forced, one device, equal priority: eval-mil starts first (pipeline order), and its failure keeps
        # eval-llamba from starting (an up-to-date, unforced stage would be reported as skipped instead)
        result = cli("--smoke", "--workdir", str(workdir), "--stages", "eval-mil,eval-llamba",
                     "--force", "eval-mil,eval-llamba")
    finally:
        config.write_text(good)
    assert result.returncode == 1
    assert "stage 'eval-mil' failed" in result.stderr and "lm_eval --model mambainllama" in result.stderr
    assert "eval-mil=FAILED" in result.stdout and "eval-llamba=not run" in result.stdout
    assert (workdir / "eval-mil" / "log.txt").is_file()
    after = stamps(workdir)
    assert "eval-mil" not in after  # its outputs were being replaced: no stale stamp
    assert after == {s: v for s, v in before.items() if s != "eval-mil"}
