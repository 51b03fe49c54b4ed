"""Issue 2: the embedded teacher's conversion and the data loaders."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from harness_ext import data, teacher
from harness_ext.data import DataError
from harness_ext.teacher import TeacherError, convert_teacher, embedded_gguf_path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checkpoint_digests(directory: Path) -> dict[str, str]:
    return {p.name: _digest(p) for p in sorted(directory.iterdir()) if p.is_file()}


# --- teacher -----------------------------------------------------------------------------------

def test_converted_teacher_is_a_plain_llama_checkpoint(teacher_dir):
    names = {p.name for p in teacher_dir.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", teacher.STAMP} <= names
    config = json.loads((teacher_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"]) == (30, 576)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert not list(teacher_dir.parent.glob(f".{teacher_dir.name}.tmp-*")), "temporary directory left behind"


def test_teacher_answers_gsm8k_through_its_chat_template(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert "<|im_start|>" in tokenizer.chat_template
    problem = data.load_problems("gsm8k500", limit=1)[0]
    messages = [{"role": "user", "content": problem.problem + "\nGive the final answer as a number."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=200, do_sample=False)
    completion = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    numbers = [float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*\.?\d*", completion)]
    assert numbers, f"no parsable final answer in: {completion!r}"
    assert out[0, -1].item() in (tokenizer.eos_token_id, tokenizer.pad_token_id) or len(out[0]) - prompt["input_ids"].shape[1] == 200


def test_conversion_is_idempotent_deterministic_and_matches_the_gguf(teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "teacher"
    assert convert_teacher("smollm2-135m-instruct", out) == out
    first = _checkpoint_digests(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert_teacher("smollm2-135m-instruct", out) == out  # cached: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    assert first == _checkpoint_digests(teacher_dir), "two fresh conversions differ"

    gguf = embedded_gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([[1, 9690, 198, 2683, 314, 253, 5356, 17, 2, 198, 1, 4093, 198, 2683, 28, 216, 33, 30, 33, 47]])
    with torch.no_grad():
        diff = (direct(ids).logits - converted(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_unknown_teacher_name_lists_valid_names():
    with pytest.raises(TeacherError, match="smollm2-135m-instruct"):
        convert_teacher("smollm-9000")


def test_non_llama_teacher_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(src)
    with pytest.raises(TeacherError, match="must be Llama"):
        convert_teacher(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_corrupt_and_truncated_gguf_are_refused(tmp_path):
    real = embedded_gguf_path()
    truncated = tmp_path / "truncated.gguf"
    with open(real, "rb") as src, open(truncated, "wb") as dst:
        dst.write(src.read(real.stat().st_size // 2))
    with pytest.raises(TeacherError, match="truncated"):
        convert_teacher(gguf_file=truncated, out_dir=tmp_path / "a")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + os.urandom(4096))
    with pytest.raises(TeacherError, match="corrupt or truncated"):
        convert_teacher(gguf_file=garbage, out_dir=tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_half_written_directory_never_passes_as_complete(tmp_path):
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "config.json").write_text("{}")  # what a killed non-atomic writer would leave
    with pytest.raises(TeacherError, match="not a finished conversion"):
        convert_teacher("smollm2-135m-instruct", out)


def test_teacher_cli_reports_errors():
    from harness_ext.cli import main

    with pytest.raises(SystemExit, match="unknown teacher name"):
        main(["teacher", "--name", "nope"])


# --- data --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["math500", "gsm8k500"])
def test_eval_sets_have_500_rows_with_parsed_answers(name):
    problems = data.load_problems(name)
    assert len(problems) == 500
    assert len({p.id for p in problems}) == 500
    assert all(p.problem and p.answer and p.solution and p.source == name for p in problems)
    if name == "gsm8k500":
        assert [p.id for p in problems] == [f"gsm8k-test-{i:04d}" for i in range(500)]
        assert all(float(p.answer) == float(p.answer) for p in problems)
        assert all("<<" not in p.solution and p.solution.endswith(f"\\boxed{{{p.answer}}}$.") for p in problems)
    else:
        assert all(p.id.startswith("test/") for p in problems)


def test_gsm8k500_is_the_documented_subset_of_the_local_files(data_dir):
    full_test = data.read_jsonl(data_dir / "gsm8k_test.jsonl")
    subset = data.load_problems("gsm8k500", data_dir)
    assert [p.problem for p in subset] == [row["question"] for row in full_test[:500]]
    assert data.fingerprint(subset) == data.GSM8K500_SHA256
    assert [p.answer for p in subset] == [data.gsm8k_final_answer(r["answer"]) for r in full_test[:500]]


def test_train_sets_load_and_do_not_overlap_the_test_sets():
    gsm_train, math_train = data.load_problems("gsm8k_train"), data.load_problems("math_train")
    assert len(gsm_train) == 7473 and len(math_train) == 3682
    test_texts = {p.problem.strip() for name in ("math500", "gsm8k_test") for p in data.load_problems(name)}
    assert not test_texts & {p.problem.strip() for p in gsm_train + math_train}


def test_missing_data_directory_and_file_name_the_environment_variable(tmp_path):
    with pytest.raises(DataError, match="THINKFAST_DATA_DIR"):
        data.load_problems("math500", tmp_path / "nowhere")
    with pytest.raises(DataError, match=r"THINKFAST_DATA_DIR.*math500_test.jsonl"):
        data.load_problems("math500", tmp_path)


def test_malformed_row_names_file_and_line(tmp_path, data_dir):
    shutil.copy(data_dir / "math500_test.jsonl", tmp_path / "math500_test.jsonl")
    with open(tmp_path / "math500_test.jsonl", "a") as handle:
        handle.write('{"problem": "1+1?", "solution": "2"\n')
    with pytest.raises(DataError, match=r"math500_test.jsonl:501: malformed JSON"):
        data.load_problems("math500", tmp_path)
    lines = (data_dir / "gsm8k_train.jsonl").read_text().splitlines()[:3]
    lines[1] = json.dumps({"question": "q", "answer": "no final line"})
    (tmp_path / "gsm8k_train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"gsm8k_train.jsonl:2: .*####"):
        data.load_problems("gsm8k_train", tmp_path)


def test_unknown_dataset_lists_the_names():
    with pytest.raises(DataError, match="gsm8k500"):
        data.load_problems("gsm8k1000")
