"""`thinkfast leaderboard` on the fixture results in tests/fixtures/leaderboard (CPU, ~20 s).

    .venv/bin/python -m pytest -q tests/test_leaderboard.py
"""
import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from harness_ext import leaderboard as lb

FIXTURES = Path(__file__).parent / "fixtures" / "leaderboard"
RESULTS = FIXTURES / "results"
BENCH = FIXTURES / "bench"  # thinkfast bench --out folder: bench.json (+ gsm8k_sampling.json, skipped)
KS, VOTE_K, BATCHES = (1, 4, 8), 8, (1, 64, 256)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def build_into(out):
    return lb.build([RESULTS], out, BENCH, ks=KS, vote_k=VOTE_K, batches=BATCHES)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("leaderboard")
    written = build_into(out)
    return out, written


def fixture_runs():
    """{model name: (meta, {task: metrics of the newest results file})}, read straight from the fixture files."""
    runs = {}
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()):
        meta = json.loads((folder / "thinkfast_meta.json").read_text())
        tasks = {}
        for path in sorted(folder.glob("results_*.json")):  # ISO timestamps: sorted = oldest first
            for task, values in json.loads(path.read_text())["results"].items():
                tasks[task] = values
        runs[meta["model"]] = (meta, tasks)
    return runs


def expected_cell(value):
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def read_csv(out):
    with open(out / "leaderboard.csv", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], {row[0]: dict(zip(rows[0], row)) for row in rows[1:]}


def test_table_has_the_fixture_numbers(built):
    out, _ = built
    header, rows = read_csv(out)
    runs = fixture_runs()
    assert set(rows) == set(runs)
    for name, (meta, tasks) in runs.items():
        row = rows[name]
        assert row["Architecture"] == meta["architecture"]
        assert row["Card"] == meta["card"]
        for task, display in lb.TASKS.items():
            metrics = tasks[task]
            for k in KS:
                assert row[f"{display} pass@{k}"] == expected_cell(metrics.get(f"pass@{k},none"))
            assert row[f"{display} maj@{VOTE_K}"] == expected_cell(metrics.get(f"maj@{VOTE_K},none"))
            assert row[f"{display} weighted_bon@{VOTE_K}"] == expected_cell(metrics.get(f"weighted_bon@{VOTE_K},none"))
    # the markdown table carries the same cells as the CSV
    md = (out / "leaderboard.md").read_text()
    assert "| " + " | ".join(header) + " |" in md
    for row in rows.values():
        assert "| " + " | ".join(row[h] for h in header) + " |" in md


def test_newest_results_file_wins():
    folder = RESULTS / "ckpt__mil50"
    old, new = sorted(folder.glob("results_*.json"))
    old_value = json.loads(old.read_text())["results"]["math500_bon"]["pass@1,none"]
    new_value = json.loads(new.read_text())["results"]["math500_bon"]["pass@1,none"]
    assert old_value != new_value
    models = {m.name: m for m in lb.load_models([RESULTS])}
    assert models["mil50-135m"].tasks["math500_bon"].get("pass", 1) == new_value
    assert models["mil50-135m"].date == "2025-03-02"


def test_throughput_columns_are_the_best_engine_from_bench(built):
    out, _ = built
    _, rows = read_csv(out)
    bench_rows = json.loads((BENCH / "bench.json").read_text())["results"]
    # the sidecar's bench_model, else the architecture's bench row; hf-generate is the teacher too
    row_names = {"llama": ("teacher", "hf-generate"), "llamba": ("llamba",), "mambainllama": ("mil50",)}
    for name, (meta, _) in fixture_runs().items():
        names = (meta["bench_model"],) if "bench_model" in meta else row_names[meta["architecture"]]
        for b in BATCHES:
            rates = [r["tokens_per_s"] for r in bench_rows if r["row"] in names and r["batch"] == b and r["status"] == "ok"]
            assert rates, "fixture must cover every model and batch size"
            assert rows[name][f"tok/s @ batch {b}"] == lb.fmt_throughput(max(rates))
    # the OOM row is reported as OOM in the benchmark table
    assert "| hf-generate | 256 | OOM |" in (out / "leaderboard.md").read_text()


def test_all_oom_is_shown_as_oom(tmp_path):
    bench = json.loads((BENCH / "bench.json").read_text())
    bench["results"] = [r for r in bench["results"] if r["row"] == "hf-generate"]
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    rows = lb.read_bench(tmp_path / "bench.json")
    assert lb.best_throughput(rows, "teacher", 256) == (None, True)
    assert lb.fmt_throughput(*lb.best_throughput(rows, "teacher", 256)) == "OOM"
    assert lb.best_throughput(rows, "teacher", 64) == (3000.0, False)


def test_missing_prm_metrics_are_na_never_zero(built):
    out, _ = built
    _, rows = read_csv(out)
    no_prm = [name for name, (_, tasks) in fixture_runs().items()
              if math.isnan(tasks["math500_bon"][f"weighted_bon@{VOTE_K},none"])]
    assert no_prm, "the fixture must hold a model without PRM metrics"
    payload = json.loads((out / "leaderboard.json").read_text())
    records = {r["model"]: r for r in payload["models"]}
    for name in no_prm:
        for display in lb.TASKS.values():
            assert rows[name][f"{display} weighted_bon@{VOTE_K}"] == "n/a"
        assert records[name][f"math500_bon/weighted_bon@{VOTE_K}"] is None
        assert payload["curves"][name]["math500_bon"]["metrics"]["bon@1"] is None
    # k beyond a model's N is n/a too (the teacher has N = 8, the table asks nothing larger; by-k table does)
    assert "n/a" in (out / "leaderboard.md").read_text()


def test_plots_are_written_and_non_empty(built):
    out, written = built
    expected = ["throughput_vs_batch"] + [f"{kind}_{task}" for task in lb.TASKS
                                          for kind in ("pass_at_k", "voting_vs_k", "budget")]
    for stem in expected:
        path = out / "plots" / f"{stem}.png"
        assert path.exists(), stem
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, stem
        assert f"plots/{stem}.png" in (out / "leaderboard.md").read_text()


def test_rerun_is_byte_identical(built, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    build_into(again)
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    second = sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert first == second and first
    for rel in first:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_without_bench_throughput_is_na_and_stale_plots_go(tmp_path):
    stale = tmp_path / "plots" / "throughput_vs_batch.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(PNG_MAGIC)
    lb.build([RESULTS / "ckpt__teacher"], tmp_path, None, ks=KS, vote_k=VOTE_K, batches=BATCHES)
    _, rows = read_csv(tmp_path)
    assert [rows["smollm2-135m-teacher"][f"tok/s @ batch {b}"] for b in BATCHES] == ["n/a"] * len(BATCHES)
    assert not stale.exists()


def test_lm_eval_writer_layout_is_read(tmp_path):
    """Files written by lm-eval 0.4.13's own EvaluationTracker (not hand-made) load, NaN included."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(tmp_path))
    tracker.general_config_tracker.log_experiment_args(
        model_source="thinkfast", model_args="pretrained=ckpt/some-student,dtype=bfloat16",
        system_instruction=None, chat_template=None, fewshot_as_multiturn=False)
    metrics = {"pass@1,none": 0.25, "pass@2,none": 0.5, "maj@2,none": 0.3, "weighted_bon@2,none": float("nan"),
               "pass@1_stderr,none": "N/A", "alias": "math500_bon"}
    tracker.save_results_aggregated(results={
        "results": {"math500_bon": dict(metrics), "some_other_task": {"acc,none": 0.9}},
        "n-samples": {"math500_bon": {"original": 500, "effective": 10}},
        "config": {"model_args": "pretrained=ckpt/some-student,dtype=bfloat16", "model_num_parameters": 1234},
        "date": 1740909600.0, "git_hash": "abcdef123456"}, samples=None)
    [model] = lb.load_models([tmp_path])
    assert model.name == "ckpt/some-student" and model.parameters == 1234
    assert model.commit == "abcdef1" and model.date == "2025-03-02"
    task = model.tasks["math500_bon"]
    assert task.get("pass", 2) == 0.5 and task.get("weighted_bon", 2) is None and task.num_problems == 10
    assert set(model.tasks) == {"math500_bon"}


# ----------------------------------------------------------------------------- headline on constructed cases

def make_model(name, role, secs_per_sample, n, coverage, accuracy, task="math500_bon"):
    """A model whose pass@k / weighted_bon@k come from the given functions of k, generated at a known speed."""
    ks = [2 ** i for i in range(int(math.log2(n)) + 1)]
    metrics = {}
    for k in ks:
        metrics[("pass", k)] = coverage(k)
        metrics[("weighted_bon", k)] = accuracy(k)
        metrics[("maj", k)] = accuracy(k)
    m = lb.ModelEntry(name=name, architecture="llama" if role == "teacher" else "llamba", role=role,
                      parameters=1, distillation_tokens=None, card=None, date=None, commit=None, bench_model=name)
    m.tasks[task] = lb.TaskResult(task, metrics, num_problems=10, source="constructed")
    m.generation[task] = {"wall_clock_seconds": secs_per_sample * 10 * n, "num_samples": 10 * n}
    return m


def test_headline_student_wins_at_equal_budget():
    # teacher: 1 s / sample, N = 8 -> reaches 8 s; fast student: 0.25 s / sample, N = 64 -> reaches 16 s.
    # Equal budget = min(8, 16) = 8 s: teacher at k = 8, student at k = 32.
    teacher = make_model("teacher", "teacher", 1.0, 8, lambda k: 0.40 + 0.02 * k, lambda k: 0.35 + 0.01 * k)
    student = make_model("student", "student", 0.25, 64, lambda k: 0.20 + 0.01 * k, lambda k: 0.30 + 0.005 * k)
    h = lb.headline([teacher, student], "math500_bon")
    assert h.budget_seconds == pytest.approx(8.0)
    t_row, s_row = h.rows
    assert (t_row.k, s_row.k) == (8, 32)
    assert t_row.coverage == pytest.approx(0.56) and s_row.coverage == pytest.approx(0.52)
    assert s_row.beats_coverage is False and s_row.beats_accuracy is True and h.answer is False
    # better coverage per sample: the student wins on both
    student = make_model("student", "student", 0.25, 64, lambda k: 0.30 + 0.01 * k, lambda k: 0.30 + 0.005 * k)
    h = lb.headline([teacher, student], "math500_bon")
    assert h.answer is True and "student" in h.reason and "**yes**" in h.sentence()


def test_headline_budget_is_capped_by_the_slower_side():
    # the student stops at 2 s (0.25 s x 8) while the teacher goes to 8 s: the budget is 2 s, teacher at k = 2
    teacher = make_model("teacher", "teacher", 1.0, 8, lambda k: 0.1 * k, lambda k: 0.1 * k)
    student = make_model("student", "student", 0.25, 8, lambda k: 0.05 * k, lambda k: 0.05 * k)
    h = lb.headline([teacher, student], "math500_bon")
    assert h.budget_seconds == pytest.approx(2.0)
    assert [r.k for r in h.rows] == [2, 8]
    assert h.rows[0].coverage == pytest.approx(0.2) and h.rows[1].coverage == pytest.approx(0.4)
    assert h.answer is True


def test_headline_na_and_missing_teacher():
    teacher = make_model("teacher", "teacher", 1.0, 8, lambda k: 0.05 * k, lambda k: 0.05 * k)
    no_prm = make_model("student", "student", 0.25, 32, lambda k: 0.1 + 0.02 * k, lambda k: None)
    h = lb.headline([teacher, no_prm], "math500_bon")
    assert h.rows[1].beats_coverage is True and h.rows[1].beats_accuracy is None and h.answer is None
    assert "n/a" in h.reason
    loser = make_model("student", "student", 0.25, 32, lambda k: 0.0, lambda k: None)
    assert lb.headline([teacher, loser], "math500_bon").answer is False  # loses coverage: decided
    h = lb.headline([no_prm], "math500_bon")
    assert h.answer is None and h.budget_seconds is None and "no teacher" in h.reason


# ----------------------------------------------------------------------------- errors

def test_error_on_folder_without_results(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(lb.LeaderboardError, match="no lm-eval results"):
        lb.load_models([tmp_path / "empty"])
    with pytest.raises(lb.LeaderboardError, match="does not exist"):
        lb.load_models([tmp_path / "missing"])


def test_error_on_unknown_task_metrics(tmp_path):
    folder = tmp_path / "run" / "ckpt__x"
    folder.mkdir(parents=True)
    (folder / "results_2025-01-01T00-00-00.json").write_text(json.dumps(
        {"results": {"math500_bon": {"alias": "math500_bon", "exact_match,none": 0.5}}}))
    with pytest.raises(lb.LeaderboardError, match="unknown metrics for task math500_bon.*exact_match"):
        lb.load_models([tmp_path / "run"])
    (folder / "results_2025-01-01T00-00-00.json").write_text(json.dumps(
        {"results": {"arc_easy": {"acc,none": 0.5}}}))
    with pytest.raises(lb.LeaderboardError, match="arc_easy"):
        lb.load_models([tmp_path / "run"])


def bench_json(**row_changes):
    row = {"row": "llamba", "batch": 1, "status": "ok", "tokens_per_s": 100.0, "ms_per_step": 10.0}
    row.update(row_changes)
    return json.dumps({"device": "card", "date": "2025-03-02T00:00:00", "results": [{k: v for k, v in row.items() if v is not None}]})


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"device": "card", "results": []}), "non-empty 'results' list"),
    (json.dumps([{"row": "llamba", "batch": 1}]), "non-empty 'results' list"),
    (bench_json(tokens_per_s=None), r"lacks required field\(s\) \['tokens_per_s'\]"),
    (bench_json(batch=0), "batch must be a positive integer"),
    (bench_json(status="crashed"), 'status must be "ok" or "OOM"'),
    (bench_json(tokens_per_s="fast"), "tokens_per_s is not a number"),
])
def test_error_on_malformed_bench(tmp_path, content, message):
    path = tmp_path / "bench.json"
    path.write_text(content)
    with pytest.raises(lb.LeaderboardError, match=message):
        lb.read_bench(path)


def test_error_on_bad_meta_and_cli_exit_code(tmp_path, capsys):
    run = tmp_path / "results"
    shutil.copytree(RESULTS / "ckpt__teacher", run / "ckpt__teacher")
    meta = json.loads((run / "ckpt__teacher" / "thinkfast_meta.json").read_text())
    del meta["parameters"]
    (run / "ckpt__teacher" / "thinkfast_meta.json").write_text(json.dumps(meta))
    with pytest.raises(lb.LeaderboardError, match=r"lacks required field\(s\) \['parameters'\]"):
        lb.load_models([run])

    from harness_ext.cli import main
    assert main(["leaderboard", "--results", str(tmp_path / "nothing-here"), "--out", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_reduced_protocol_is_named_next_to_the_model(tmp_path):
    """A run of `thinkfast reproduce --budget fast` never reads as the paper's protocol in the tables."""
    run = tmp_path / "results"
    shutil.copytree(RESULTS, run)
    meta_path = run / "ckpt__teacher" / "thinkfast_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["settings"] = {**meta.get("settings", {}), "budget": "fast"}
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "out"
    lb.build([run], out, BENCH, ks=KS, vote_k=VOTE_K, batches=BATCHES)
    _, rows = read_csv(out)
    assert f"{meta['model']} (budget fast)" in rows
    others = [name for name in rows if name != f"{meta['model']} (budget fast)"]
    assert others and all("budget" not in name for name in others)
    records = json.loads((out / "leaderboard.json").read_text())["models"]
    protocols = {r["model"]: r["protocol"] for r in records}
    assert protocols[meta["model"]] == "fast" and {protocols[n] for n in protocols if n != meta["model"]} == {"full"}


def test_headline_reads_a_curve_that_goes_past_the_budget_between_its_measured_k():
    # The teacher is 2% slower than the student; both drew N = 64. The budget is the student's 64 samples, which
    # buys the teacher 62.7: scored between its k = 32 and k = 64 (linear in log k), not dropped to k = 32.
    coverage = lambda k: 0.1 * math.log2(k)                                  # noqa: E731
    teacher = make_model("teacher", "teacher", 1.02, 64, coverage, lambda k: 0.01 * k)
    student = make_model("student", "student", 1.00, 64, lambda k: coverage(k) - 0.001, lambda k: 0.02 * k)
    h = lb.headline([teacher, student], "math500_bon")
    t_row, s_row = h.rows
    assert h.budget_seconds == pytest.approx(64.0)
    assert t_row.interpolated and not s_row.interpolated and s_row.k == 64
    assert t_row.k == pytest.approx(64 / 1.02) and t_row.seconds == pytest.approx(64.0)
    assert t_row.coverage == pytest.approx(coverage(64 / 1.02))           # exact for a curve linear in log k
    assert t_row.accuracy == pytest.approx(0.32 + (0.64 - 0.32) * math.log2(2 / 1.02))
    # the student is 0.001 below the teacher at equal k, and 0.1 * log2(1.02) = 0.0029 above it at equal time
    assert s_row.beats_coverage is True and s_row.beats_accuracy is True and h.answer is True
    slower = make_model("student", "student", 1.00, 64, lambda k: coverage(k) - 0.004, lambda k: 0.02 * k)
    assert lb.headline([teacher, slower], "math500_bon").answer is False
    headers, rows = lb.headline_table(h)
    assert rows[0][2] == "62.7 (log-k interpolated)" and rows[1][2] == "64"
