"""`thinkfast reproduce`: the whole --smoke path on CPU, resume, --stages, --force, and a failing stage.

    .venv/bin/python -m pytest -x -q tests/test_reproduce.py             # fast checks only
    .venv/bin/python -m pytest -x -q -m slow tests/test_reproduce.py     # + the end-to-end smoke run (minutes)

The slow tests share one smoke reproduction (real teacher, real `thinkfast init / distill / prm train / bench /
leaderboard`, the real `lm_eval` CLI) in a temporary workdir; later tests re-invoke the command on it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness_ext import reproduce as R

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
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


# ----------------------------------------------------------------------------- the smoke reproduction


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    import torch

    workdir = tmp_path_factory.mktemp("reproduce")
    # no GPU here: leaving out --smoke checks that it is implied; with a GPU, ask for it explicitly
    args = ["--workdir", str(workdir)] + (["--smoke"] if torch.cuda.is_available() else [])
    t0 = time.time()
    result = cli(*args)
    print(f"smoke reproduction: {time.time() - t0:.0f}s")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    return workdir, result


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
def test_failing_stage_names_itself_and_keeps_earlier_stamps(smoke_run):
    workdir, _ = smoke_run
    config = workdir / "distill-mil" / "out" / "config.json"
    good = config.read_text()
    before = stamps(workdir)
    config.write_text("{ not json")
    try:
        result = cli("--smoke", "--workdir", str(workdir), "--stages", "eval-mil,eval-llamba", "--force", "eval-mil")
    finally:
        config.write_text(good)
    assert result.returncode == 1
    assert "stage 'eval-mil' failed" in result.stderr and "lm_eval --model mambainllama" in result.stderr
    assert "eval-mil=FAILED" in result.stdout and "eval-llamba=not run" in result.stdout
    assert (workdir / "eval-mil" / "log.txt").is_file()
    after = stamps(workdir)
    assert "eval-mil" not in after  # its outputs were being replaced: no stale stamp
    assert after == {s: v for s, v in before.items() if s != "eval-mil"}
