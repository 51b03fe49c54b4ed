"""The lm-eval backends and best-of-N tasks, through the real `lm_eval` console script.

    .venv/bin/python -m pytest -q tests/test_lm_eval.py            # fast part (one CLI run, tiny student)
    .venv/bin/python -m pytest -q -m slow tests/test_lm_eval.py    # + the real teacher, CLI errors, the wheel

No `--include_path` for our tasks and no plugin flags: the start-up hook (thinkfast_lm_eval.pth) must make
`--model thinkfast|llamba|mambainllama` and `math500_bon` / `gsm8k500_bon` visible to the stock CLI.
The multiple-choice and perplexity tasks are tiny local ones (hubs are unreachable), given with --include_path.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LM_EVAL = BIN / "lm_eval"
N = 4
LIMIT = 2
DIGITS = ("1", "3", "8", " ")  # the tiny student mostly writes these, so GSM8K answers parse and sometimes match


def run_lm_eval(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([str(LM_EVAL), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def task_utils():
    """harness_ext.tasks.utils (loaded from the task directory when the install predates tasks/__init__.py)."""
    try:
        import harness_ext.tasks.utils as module
    except ImportError:
        import importlib.util

        from harness_ext.lm_eval_ext import tasks_dir

        spec = importlib.util.spec_from_file_location("thinkfast_task_utils", Path(tasks_dir()) / "utils.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def read_outputs(out_dir: Path) -> tuple[dict, dict[str, list[dict]]]:
    (results_file,) = sorted(out_dir.rglob("results_*.json"))
    samples = {}
    for path in out_dir.rglob("samples_*.jsonl"):
        task = path.name[len("samples_"):].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return json.loads(results_file.read_text()), samples


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_student(teacher_dir, tmp_path_factory) -> Path:
    """A random 2-layer MambaInLlama (one Mamba, one attention layer) with the teacher's tokenizer.

    A constant component in every embedding, read strongly by the digit / space rows of the (untied) head, makes it
    write mostly "1", "3", "8" and spaces, while the random layers still shape every logit."""
    from transformers import AutoTokenizer

    from harness_ext.models.mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    config = MambaInLlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, attn_layers=[1],
                                ssm_chunk_size=8, tie_word_embeddings=False, max_position_embeddings=2048,
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = MambaInLlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0
        for text in DIGITS:
            (token,) = tokenizer.encode(text, add_special_tokens=False)
            model.lm_head.weight[token, 0] = 2.0
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1.6
    out = tmp_path_factory.mktemp("tiny-mil")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny_prm(teacher_dir, tmp_path_factory) -> Path:
    """A random tiny Llama with the teacher's chat tokenizer: an RLHFlow-format PRM for harness_ext.scoring.prm."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # spread P("+") well away from 0.5 so the PRM ranks completions
        for text in ("+", "-"):
            model.lm_head.weight[tokenizer.encode(text, add_special_tokens=False)[0]] *= 40
    out = tmp_path_factory.mktemp("tiny-rlhflow-prm")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory, tiny_prm) -> Path:
    from harness_ext.lm_eval_ext import tasks_dir

    root = tmp_path_factory.mktemp("local-tasks")
    mc = [{"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "label": 0},
          {"question": "How many legs does a cat have?", "choices": ["two", "four", "six"], "label": 1},
          {"question": "What is 2 + 2?", "choices": ["3", "4", "5"], "label": 1}]
    (root / "mc.json").write_text(json.dumps(mc))
    texts = [{"text": "The quick brown fox jumps over the lazy dog."},
             {"text": "Mathematics is the study of numbers, shapes and patterns. It is old."}]
    (root / "ppl.json").write_text(json.dumps(texts))
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'mc.json'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'ppl.json'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    # the shipped GSM8K task with a PRM configured in its YAML metadata (the run's --metadata adds n)
    (root / "gsm8k500_bon_prm.yaml").write_text(
        f"include: {Path(tasks_dir()) / 'gsm8k500_bon.yaml'}\ntask: gsm8k500_bon_prm\ntag: []\n"
        f"metadata:\n  version: 1.0\n  answer_style: gsm8k\n  prm: {tiny_prm}\n  prm_aggregation: min\n")
    return root


@pytest.fixture(scope="module")
def cli_run(tiny_student, local_tasks, tmp_path_factory):
    """One real `lm_eval` run: both BoN flavours (without / with PRM), multiple choice and perplexity."""
    out = tmp_path_factory.mktemp("lm-eval-out")
    proc = run_lm_eval(["--model", "thinkfast", "--model_args", f"pretrained={tiny_student}", "--device", "cpu",
                        "--tasks", "gsm8k500_bon,gsm8k500_bon_prm,math500_bon,tiny_mc,tiny_ppl",
                        "--include_path", str(local_tasks), "--limit", str(LIMIT), "--apply_chat_template",
                        "--gen_kwargs", "max_gen_toks=24", "--metadata", json.dumps({"n": N}),
                        "--batch_size", "8", "--log_samples", "--output_path", str(out), "--seed", "0"],
                       cwd=out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results, samples = read_outputs(out)
    return proc, results, samples


# ----------------------------------------------------------------------------- the fast CLI run


def _reported(results: dict, task: str) -> dict[str, float]:
    return {k.split(",")[0]: v for k, v in results["results"][task].items()
            if "@" in k and "_stderr" not in k}


def test_bon_metrics_recomputed_from_samples(cli_run):
    metrics_from_records, metric_names = task_utils().metrics_from_records, task_utils().metric_names
    _, results, samples = cli_run
    for task, with_prm in (("gsm8k500_bon", False), ("gsm8k500_bon_prm", True), ("math500_bon", False)):
        reported = _reported(results, task)
        assert set(reported) == set(metric_names(N, with_prm=with_prm)), task  # no PRM: bon metrics left out
        docs = samples[task]
        assert len(docs) == LIMIT
        per_doc = [metrics_from_records(doc["filtered_resps"][0]) for doc in docs]
        for name, value in reported.items():
            assert value == pytest.approx(sum(m[name] for m in per_doc) / len(per_doc), abs=1e-12), (task, name)
            assert all(doc[name] == pytest.approx(m[name], abs=1e-12) for doc, m in zip(docs, per_doc))


def test_data_parallel_processes_split_the_documents(tiny_student, tmp_path):
    """Two processes under torchrun (the launcher `accelerate launch --multi_gpu` uses): each rank generates for every
    second document and rank 0 reports all of them. ACCELERATE_USE_CPU makes accelerate set up gloo on CPU; HFLM
    itself enables data parallelism only with several GPUs, so the backend adopts the accelerator's rank."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    limit = 4
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               ACCELERATE_USE_CPU="1")
    proc = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
         "-m", "lm_eval", "--model", "thinkfast", "--model_args", f"pretrained={tiny_student}", "--device", "cpu",
         "--tasks", "gsm8k500_bon", "--limit", str(limit), "--gen_kwargs", "max_gen_toks=16",
         "--metadata", json.dumps({"n": N}), "--batch_size", "8", "--log_samples", "--output_path", str(tmp_path),
         "--seed", "0"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert "gsm8k500_bon on rank 0" in log and "gsm8k500_bon on rank 1" in log, log[-3000:]
    # rank 0 (the only one with a progress bar) generated for its half: N samples for each of limit / 2 documents
    assert f"Running generate_until requests: 100%|██████████| {limit // 2 * N}/{limit // 2 * N}" in log
    results, samples = read_outputs(tmp_path)
    docs = samples["gsm8k500_bon"]
    assert sorted(doc["doc_id"] for doc in docs) == list(range(limit))
    metrics_from_records = task_utils().metrics_from_records
    per_doc = [metrics_from_records(doc["filtered_resps"][0]) for doc in docs]
    for name, value in _reported(results, "gsm8k500_bon").items():
        assert value == pytest.approx(sum(m[name] for m in per_doc) / limit, abs=1e-12), name


def test_samples_carry_answers_correctness_and_prm_scores(cli_run):
    from harness_ext.scoring.answers import extract_answer, is_equiv
    from harness_ext.scoring.prm import split_steps

    _, results, samples = cli_run
    parsed = 0
    for task in ("gsm8k500_bon", "gsm8k500_bon_prm", "math500_bon"):
        style = "math" if task.startswith("math") else "gsm8k"
        for doc in samples[task]:
            (texts,) = doc["resps"]
            records = [json.loads(r) for r in doc["filtered_resps"][0]]
            assert len(texts) == len(records) == N
            for text, record in zip(texts, records):
                assert record["answer"] == extract_answer(text, style)
                assert record["correct"] == (record["answer"] is not None and is_equiv(record["answer"], doc["target"]))
                assert (record["answer"] is None) == (record["class"] is None)
                parsed += record["answer"] is not None
                if task.endswith("_prm"):
                    assert all(0.0 <= s <= 1.0 for s in record["prm_steps"])
                    # one score per step; a completion without steps (e.g. EOS first) scores 0, never the best
                    assert len(record["prm_steps"]) == len(split_steps(text))
                    assert record["prm_score"] == pytest.approx(min(record["prm_steps"], default=0.0))
                else:
                    assert record["prm_steps"] is None and record["prm_score"] is None
    assert parsed > 0  # the digit-writing student gives GSM8K answers to parse
    # each task says where its scoring time went; the PRM counts every completion that has a step
    log_text = cli_run[0].stdout + cli_run[0].stderr
    line = re.search(r"gsm8k500_bon_prm: scoring [\d.]+s; PRM [\d.]+s \(layout \+ tokenize [\d.]+s, forwards "
                     r"[\d.]+s; ([\d,]+) sequences, ([\d,]+) tokens\); answer grading went on [\d.]+s", log_text)
    assert line, log_text[-3000:]
    with_steps = sum(bool(split_steps(t)) for doc in samples["gsm8k500_bon_prm"] for t in doc["resps"][0])
    assert int(line.group(1).replace(",", "")) == with_steps > 0 and int(line.group(2).replace(",", "")) > with_steps
    assert re.search(r"gsm8k500_bon: scoring [\d.]+s; answer grading went on", log_text)
    # N comes from --metadata, and the chat template was applied to the prompts
    config = results["configs"]["gsm8k500_bon"]
    assert config["repeats"] == N and config["metadata"]["n"] == N
    prompt = samples["gsm8k500_bon"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    assert "\\boxed{}" in prompt


def _forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_multiple_choice_loglikelihoods_match_the_forward(cli_run, tiny_student):
    from transformers import AutoTokenizer

    from harness_ext.models import load_model

    _, results, samples = cli_run
    model = load_model(str(tiny_student))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_student))
    assert 0.0 <= results["results"]["tiny_mc"]["acc,none"] <= 1.0
    for doc in samples["tiny_mc"]:
        for request, response in zip(doc["arguments"].values(), doc["resps"]):
            context, continuation = request["arg_0"], request["arg_1"]
            spaces = len(context) - len(context.rstrip())  # lm-eval moves trailing whitespace to the continuation
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = tokenizer.encode(context + continuation)
            n_context = len(tokenizer.encode(context))
            logprobs = _forward_logprobs(model, whole)
            expected = sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))
            got = float(response[0][0])
            assert got == pytest.approx(expected, abs=1e-3), (context, continuation)


def test_perplexity_matches_the_forward(cli_run, tiny_student):
    from transformers import AutoTokenizer

    from harness_ext.models import load_model

    _, results, samples = cli_run
    model = load_model(str(tiny_student))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_student))
    total_logprob, total_bytes = 0.0, 0
    for doc in samples["tiny_ppl"]:
        text = doc["doc"]["text"]
        ids = tokenizer.encode(text, add_special_tokens=False)
        logprobs = _forward_logprobs(model, [tokenizer.bos_token_id, *ids])  # lm-eval's rolling window, one here
        expected = sum(logprobs[i, ids[i]].item() for i in range(len(ids)))
        assert float(doc["resps"][0][0]) == pytest.approx(expected, abs=1e-3)
        total_logprob += expected
        total_bytes += len(text.encode())
    bits_per_byte = -total_logprob / total_bytes / math.log(2)
    assert results["results"]["tiny_ppl"]["bits_per_byte,none"] == pytest.approx(bits_per_byte, rel=1e-4)


def test_registration_is_lazy():
    # the hook must not import torch / lm_eval / harness_ext at every Python start
    code = ("import sys; assert '_thinkfast_lm_eval_hook' in sys.modules, 'hook not installed'; "
            "print(sorted(m for m in ('torch', 'lm_eval', 'harness_ext', 'transformers') if m in sys.modules)); "
            "from lm_eval.api.registry import model_registry, get_model; "
            "print(all(n in model_registry for n in ('thinkfast', 'llamba', 'mambainllama', 'hf'))); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["[]", "True", "False"]


# ----------------------------------------------------------------------------- in-process: generation, errors


@pytest.fixture(scope="module")
def lm(tiny_student):
    from harness_ext.lm_eval_ext.backend import ThinkfastLM

    return ThinkfastLM(pretrained=str(tiny_student), device="cpu", batch_size=8)


def test_repeats_collapse_into_one_prompt_times_n(lm, monkeypatch):
    from lm_eval.api.instance import Instance

    from harness_ext.generation.engine import Engine

    calls = []
    original = Engine.generate

    def spy(self, prompts, params=None, n=1, seed=0, progress=False):
        calls.append((len(prompts), n, params.temperature, params.stop_strings))
        return original(self, prompts, params, n=n, seed=seed, progress=progress)

    monkeypatch.setattr(Engine, "generate", spy)

    greedy = {"until": ["8"], "do_sample": False, "max_gen_toks": 12}
    sampled = {"until": [], "do_sample": True, "temperature": 1.0, "max_gen_toks": 12}
    requests = ([Instance("generate_until", {}, ("Question one", sampled), 0, ("t", 0, 4))] * 4
                + [Instance("generate_until", {}, ("Question two", sampled), 0, ("t", 1, 4))] * 4
                + [Instance("generate_until", {}, ("Question one", greedy), 0, ("t", 2, 3))] * 3)
    out = lm.generate_until(requests, disable_tqdm=True)
    assert len(out) == 11
    # one engine call per (gen_kwargs, samples per prompt); each prompt prefilled once
    assert [c[:3] for c in calls] == [(2, 4, 1.0), (1, 3, 0.0)] and "8" in calls[1][3]
    assert next(iter(lm._engines.values())).stats["prefilled_prompts"] == 1
    # the engine's time split, summed over both calls, travels with the results (config.thinkfast_generation)
    engine = lm.get_model_info()["thinkfast_generation"]["engine"]
    assert engine["prefilled_prompts"] >= 3 and engine["decode_steps"] > 0 and engine["batch_slots"] >= 8
    assert 0 < engine["decode_s"] + engine["prefill_s"] <= lm.get_model_info()["thinkfast_generation"]["wall_clock_seconds"] + 1e-3
    assert len(set(out[8:])) == 1 and "8" not in out[8]  # greedy samples agree; cut before the stop string
    assert len(set(out[:4])) > 1  # sampled ones differ


def test_warmup_is_untimed_and_changes_no_sample(tiny_student):
    from lm_eval.api.instance import Instance

    from harness_ext.lm_eval_ext.backend import ThinkfastLM

    sampled = {"until": [], "do_sample": True, "temperature": 1.0, "max_gen_toks": 12}
    requests = [Instance("generate_until", {}, ("Question one", sampled), 0, ("t", 0, 3))] * 3
    outs = {}
    for warmup in ("false", "true"):
        lm = ThinkfastLM(pretrained=str(tiny_student), device="cpu", batch_size=8, warmup=warmup)
        outs[warmup] = lm.generate_until(requests, disable_tqdm=True)
        lm.generate_until(requests, disable_tqdm=True)  # a second call: already warm
        info = lm.get_model_info()["thinkfast_generation"]
        assert (info["warmup_seconds"] > 0) == (warmup == "true") and len(lm._warm) == (warmup == "true")
        assert info["num_samples"] == 6  # the warm-up's samples are not counted
    assert outs["true"] == outs["false"]  # the same seeds give the same samples after a warm-up


def test_bad_model_arguments(tiny_student, tmp_path):
    from harness_ext.lm_eval_ext.backend import LlambaLM, ThinkfastLM

    with pytest.raises(ValueError, match="unknown model argument.*'pretraind'"):
        ThinkfastLM(pretraind=str(tiny_student))
    with pytest.raises(ValueError, match="not supported"):
        ThinkfastLM(pretrained=str(tiny_student), parallelize=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ThinkfastLM(pretrained=str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ValueError, match="'mambainllama' checkpoint.*llamba"):
        LlambaLM(pretrained=str(tiny_student), device="cpu")
    with pytest.raises(ValueError, match="ssm_state_dtype must be one of .*got 'fp8'"):
        ThinkfastLM(pretrained=str(tiny_student), device="cpu", ssm_state_dtype="fp8")
    lm = ThinkfastLM(pretrained=str(tiny_student), device="cpu", ssm_state_dtype="bfloat16")
    assert lm.get_model_info()["ssm_state_dtype"] == "bfloat16"
    states = [layer["ssm_state"] for layer in lm.model.allocate_decode_state(1, 8, device="cpu").layers
              if "ssm_state" in layer]
    assert states and all(s.dtype == torch.bfloat16 for s in states)


def test_bad_task_options():
    from lm_eval.tasks import TaskManager

    from harness_ext.lm_eval_ext import tasks_dir

    manager = TaskManager(include_path=tasks_dir(), include_defaults=False, metadata={"num_samples": 8})
    with pytest.raises(ValueError, match="unknown task option 'num_samples'.*'n'"):
        manager.load(["gsm8k500_bon"])
    for metadata, message in (({"n": 0}, "positive integer"), ({"prm_aggregation": "max"}, "prm_aggregation")):
        with pytest.raises(ValueError, match=message):
            TaskManager(include_path=tasks_dir(), include_defaults=False, metadata=metadata).load(["gsm8k500_bon"])


# ----------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_cli_reports_a_missing_checkpoint(tmp_path):
    proc = run_lm_eval(["--model", "thinkfast", "--model_args", f"pretrained={tmp_path / 'nope'}",
                        "--tasks", "gsm8k500_bon", "--device", "cpu"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "checkpoint directory" in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.slow
def test_teacher_gsm8k_best_of_n(teacher_dir, tmp_path):
    """The real teacher, 3 GSM8K problems x 4 samples, chat template, through the CLI (64 new tokens: CPU time)."""
    metrics_from_records = task_utils().metrics_from_records
    proc = run_lm_eval(["--model", "thinkfast", "--model_args", f"pretrained={teacher_dir}", "--device", "cpu",
                        "--tasks", "gsm8k500_bon", "--limit", "3", "--apply_chat_template", "--batch_size", "12",
                        "--gen_kwargs", "max_gen_toks=64", "--metadata", json.dumps({"n": 4}),
                        "--log_samples", "--output_path", str(tmp_path)], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    results, samples = read_outputs(tmp_path)
    docs = samples["gsm8k500_bon"]
    assert len(docs) == 3
    reported = _reported(results, "gsm8k500_bon")
    per_doc = [metrics_from_records(doc["filtered_resps"][0]) for doc in docs]
    for name, value in reported.items():
        assert value == pytest.approx(sum(m[name] for m in per_doc) / 3, abs=1e-12)
    records = [json.loads(r) for doc in docs for r in doc["filtered_resps"][0]]
    # the instruct teacher does arithmetic: most completions hold a number to parse
    assert sum(r["answer"] is not None for r in records) >= len(records) // 2
    assert all(len(doc["resps"][0]) == 4 and all(doc["resps"][0]) for doc in docs)
    assert reported["pass@4"] >= reported["pass@1"]


@pytest.mark.slow
def test_wheel_ships_the_startup_hook_and_tasks(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("thinkfast-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "thinkfast_lm_eval.pth" in names  # at the root: installed straight into site-packages
    assert {"harness_ext/lm_eval_ext/_hook.py", "harness_ext/tasks/utils.py", "harness_ext/tasks/math500_bon.yaml",
            "harness_ext/tasks/gsm8k500_bon.yaml"} <= names


def test_prm_groups_tokenized_ahead_score_as_one_call(tiny_prm):
    """The task scores 16 problems a call and tokenizes the next group in a thread meanwhile: the same scores as
    one call over everything, and the PRM's timings count every completion with a step."""
    from harness_ext.scoring.prm import load_prm, split_steps

    utils = task_utils()
    problems = [f"What is {a} + {a}?" for a in range(5)]
    completions = [[f"{a} + {a} = {2 * a}.\n\nSo the answer is $\\boxed{{{2 * a}}}$.", "", f"It is {a}."]
                   for a in range(5)]
    prm = load_prm(str(tiny_prm), device="cpu")
    grouped = utils.prm_step_scores_grouped(prm, problems, completions, per_call=2)
    assert prm.timings["sequences"] == sum(bool(split_steps(c)) for cs in completions for c in cs) == 10
    assert prm.timings["tokens"] > prm.timings["sequences"] and prm.timings["encode_s"] > 0
    whole = utils.prm_step_scores(load_prm(str(tiny_prm), device="cpu"), problems, completions)
    assert len(grouped) == len(whole) == 5
    for g, w in zip(grouped, whole):
        assert [len(s) for s in g] == [len(s) for s in w] and [len(s) for s in g][1] == 0
        assert g == [pytest.approx(s, abs=1e-5) for s in w]
