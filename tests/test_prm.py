"""Process reward models: step splitting, aggregation, each public format on a tiny random model in that format
(scores checked against the model-card recipe computed by hand from raw model outputs), the default's train path
in --smoke mode, and the errors.

    .venv/bin/python -m pytest -x -q tests/test_prm.py
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness_ext.scoring import prm as prm_lib
from harness_ext.scoring.prm import PRMError, aggregate, load_prm, split_steps

PROBLEM = "Tom has 2 apples and buys 3 more. How many apples does he have?"
COMPLETIONS = [
    "Tom starts with 2 apples.\n\nHe buys 3 more, so 2 + 3 = 5.\n\nThe answer is $\\boxed{5}$.",
    "Step 1: Tom has 2 apples.\nStep 2: He buys 3, so he has 2 - 3 = -1.\nStep 3: The answer is -1.",
    "The answer is 5.",
    "",
]
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)


# ----------------------------------------------------------------------------- steps and aggregation

def test_split_blank_lines_edge_cases():
    assert split_steps("a\n\nb\n\n\n  \nc") == ["a", "b", "c"]
    assert split_steps("one line\nanother line") == ["one line\nanother line"]  # no blank line: one step
    assert split_steps("  first\n\n second  \n\n") == ["first", "second"]      # trailing blank lines dropped
    assert split_steps("x\n \t\ny", mode="blank_lines") == ["x", "y"]           # whitespace-only line is blank
    assert split_steps("") == [] and split_steps("\n\n  \n") == []
    assert split_steps("Step 1: a\n\nb", mode="blank_lines") == ["Step 1: a", "b"]


def test_split_step_markers_edge_cases():
    text = "Let me think.\nStep 1: add.\nmore of step 1\n\nStep 2: done. The answer is 5.\nTrailing words"
    assert split_steps(text) == ["Let me think.", "Step 1: add.\nmore of step 1",
                                 "Step 2: done. The answer is 5.\nTrailing words"]
    assert split_steps("## Step 1. a\n**Step 2:** b", mode="step_markers") == ["## Step 1. a", "**Step 2:** b"]
    assert split_steps("no markers\n\nat all", mode="step_markers") == ["no markers\n\nat all"]
    # "step 3" inside a sentence is not a marker
    assert split_steps("We use step 3: x\n\ny") == ["We use step 3: x", "y"]
    with pytest.raises(ValueError, match="blank_lines"):
        split_steps("a", mode="sentences")
    with pytest.raises(TypeError):
        split_steps(None)


def test_aggregate():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert math.isclose(aggregate(s, "prod"), 0.36)
    assert math.isclose(aggregate(s, "mean"), 2.2 / 3)
    assert all(aggregate([], how) == 0.0 for how in prm_lib.AGGREGATIONS)
    with pytest.raises(ValueError, match="last, min, prod, mean"):
        aggregate(s, "max")


def test_roc_auc():
    assert prm_lib.roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert prm_lib.roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert prm_lib.roc_auc([0.1, 0.2], [True, True]) is None


# ----------------------------------------------------------------------------- tiny checkpoints in each format

def _tokenizer(teacher_dir, added=(), special=(), chat_template=True):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    if added:
        tok.add_tokens(list(added))
    if special:
        tok.add_special_tokens({"additional_special_tokens": list(special)})
    if not chat_template:
        tok.chat_template = None
    return tok


def _tiny_causal_lm(tok, out: Path, sharpen_ids=()):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **TINY)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # bigger logits on the candidate tokens, so step scores spread well away from 0.5
        for i in sharpen_ids:
            model.lm_head.weight[i] *= 40
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rlhflow_dir(teacher_dir, tmp_path_factory):
    tok = _tokenizer(teacher_dir)
    ids = [tok.encode(t, add_special_tokens=False)[0] for t in ("+", "-")]
    return _tiny_causal_lm(tok, tmp_path_factory.mktemp("tiny-rlhflow-prm"), ids)


@pytest.fixture(scope="module")
def shepherd_dir(teacher_dir, tmp_path_factory):
    tok = _tokenizer(teacher_dir, added=["ки"], chat_template=False)
    ids = tok.encode("+ -", add_special_tokens=False)
    return _tiny_causal_lm(tok, tmp_path_factory.mktemp("tiny-shepherd-prm"), ids)


@pytest.fixture(scope="module")
def qwen_dir(teacher_dir, tmp_path_factory):
    from transformers import Qwen2Config, Qwen2Model
    out = tmp_path_factory.mktemp("tiny-qwen-prm")
    tok = _tokenizer(teacher_dir, special=["<extra_0>"])
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=len(tok), architectures=["Qwen2ForProcessRewardModel"], num_labels=2,
                         tie_word_embeddings=False, **TINY)
    base = Qwen2Model(config)
    state = {f"model.{k}": v.contiguous() for k, v in base.state_dict().items()}
    h = config.hidden_size
    state["score.0.weight"] = torch.randn(h, h) / math.sqrt(h)
    state["score.0.bias"] = torch.randn(h) * 0.1
    state["score.2.weight"] = torch.randn(2, h) * 3
    state["score.2.bias"] = torch.zeros(2)
    config.save_pretrained(out)
    save_file(state, str(out / "model.safetensors"))
    tok.save_pretrained(out)
    return out


def _softmax_first(logits_pair):
    return torch.softmax(logits_pair.float(), -1)[0].item()


# ----------------------------------------------------------------------------- RLHFlow

def test_rlhflow_matches_model_card_recipe(rlhflow_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prm = load_prm(str(rlhflow_dir), device="cpu")
    assert prm.format == "rlhflow"
    got = prm.score(PROBLEM, COMPLETIONS)
    assert [len(s) for s in got] == [3, 3, 1, 0]

    # model card: for each step, the conversation up to that step's assistant "+", one forward, P(+) vs P(-)
    # where "+" is predicted (Llama 3 template: position -3; ChatML adds "<|im_end|>\n": position -4)
    tok = AutoTokenizer.from_pretrained(str(rlhflow_dir))
    model = AutoModelForCausalLM.from_pretrained(str(rlhflow_dir)).eval()
    plus, minus = tok.encode("+", add_special_tokens=False)[-1], tok.encode("-", add_special_tokens=False)[-1]
    for completion, scores in zip(COMPLETIONS, got):
        steps = [s.strip() for s in split_steps(completion)]
        conversation, expected = [], []
        for k, step in enumerate(steps):
            conversation.append({"role": "user", "content": PROBLEM + " " + step if k == 0 else step})
            conversation.append({"role": "assistant", "content": "+"})
            ids = tok.apply_chat_template(conversation, tokenize=True, return_dict=True)["input_ids"]
            assert ids[-3] == plus
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0]
            expected.append(_softmax_first(logits[-4, [plus, minus]]))
        assert scores == pytest.approx(expected, abs=1e-5)
    assert prm.score_ref(PROBLEM, COMPLETIONS) == [pytest.approx(s, abs=1e-5) for s in got]
    flat = [x for s in got for x in s]
    assert all(0.0 <= x <= 1.0 for x in flat) and max(flat) - min(flat) > 0.05  # the check can tell steps apart


def test_batched_scoring_independent_of_batching(rlhflow_dir):
    prm = load_prm(str(rlhflow_dir), device="cpu", max_batch_tokens=64, max_batch_size=2)
    small_batches = prm.score_many([PROBLEM, "What is 1+1?"], [COMPLETIONS, ["1+1 = 2.\n\n$\\boxed{2}$"]])
    prm_big = load_prm(str(rlhflow_dir), device="cpu")
    one_batch = prm_big.score_many([PROBLEM, "What is 1+1?"], [COMPLETIONS, ["1+1 = 2.\n\n$\\boxed{2}$"]])
    for a, b in zip(small_batches, one_batch):
        assert a == [pytest.approx(x, abs=1e-5) for x in b]


# ----------------------------------------------------------------------------- Math-Shepherd

def test_math_shepherd_matches_model_card_recipe(shepherd_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    prm = load_prm(str(shepherd_dir), device="cpu")
    assert prm.format == "math_shepherd"
    got = prm.score(PROBLEM, COMPLETIONS[:3])

    # model card: question + " " + "Step 1: ... ки\nStep 2: ... ки", softmax over ("+", "-") logits at every tag
    tok = AutoTokenizer.from_pretrained(str(shepherd_dir))
    model = AutoModelForCausalLM.from_pretrained(str(shepherd_dir)).eval()
    candidates = tok.encode("+ -", add_special_tokens=False)
    tag = tok.encode("ки", add_special_tokens=False)[-1]
    outputs = [
        "Step 1: Tom starts with 2 apples. ки\nStep 2: He buys 3 more, so 2 + 3 = 5. ки\n"
        "Step 3: The answer is $\\boxed{5}$. ки",
        "Step 1: Tom has 2 apples. ки\nStep 2: He buys 3, so he has 2 - 3 = -1. ки\nStep 3: The answer is -1. ки",
        "Step 1: The answer is 5. ки",
    ]
    for output, scores in zip(outputs, got):
        ids = torch.tensor([tok.encode(f"{PROBLEM} {output}", add_special_tokens=False)])
        with torch.no_grad():
            logits = model(ids).logits[:, :, candidates]
        expected = logits.softmax(-1)[:, :, 0][ids == tag].tolist()
        assert len(expected) == len(scores)
        assert scores == pytest.approx(expected, abs=1e-5)
    assert prm.score_ref(PROBLEM, COMPLETIONS[:3]) == [pytest.approx(s, abs=1e-5) for s in got]


# ----------------------------------------------------------------------------- Qwen2.5-Math-PRM

def test_qwen_prm_matches_model_card_recipe(qwen_dir):
    from transformers import AutoConfig, AutoTokenizer, Qwen2Model
    prm = load_prm(str(qwen_dir), device="cpu")
    assert prm.format == "qwen_prm"
    got = prm.score(PROBLEM, COMPLETIONS)
    assert [len(s) for s in got] == [3, 3, 1, 0]

    # model card: system + user + assistant "<extra_0>".join(steps) + "<extra_0>"; P(label 1) at the separators.
    # The head is rebuilt here by hand from the checkpoint tensors.
    tok = AutoTokenizer.from_pretrained(str(qwen_dir))
    state = load_file(str(qwen_dir / "model.safetensors"))
    base = Qwen2Model(AutoConfig.from_pretrained(str(qwen_dir))).eval()
    base.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")})
    sep = tok.encode("<extra_0>", add_special_tokens=False)[0]

    def head(h):
        h = torch.relu(h @ state["score.0.weight"].T + state["score.0.bias"])
        return h @ state["score.2.weight"].T + state["score.2.bias"]

    for completion, scores in zip(COMPLETIONS[:3], got):
        messages = [{"role": "system", "content": prm_lib.QWEN_SYSTEM}, {"role": "user", "content": PROBLEM},
                    {"role": "assistant", "content": "<extra_0>".join(split_steps(completion)) + "<extra_0>"}]
        ids = torch.tensor([tok.encode(tok.apply_chat_template(messages, tokenize=False))])
        with torch.no_grad():
            probs = head(base(input_ids=ids).last_hidden_state).softmax(-1)
        expected = probs[0][ids[0] == sep][:, 1].tolist()
        assert scores == pytest.approx(expected, abs=1e-5)
    assert prm.score_ref(PROBLEM, COMPLETIONS) == [pytest.approx(s, abs=1e-5) for s in got]


# ----------------------------------------------------------------------------- errors and detection

def test_format_errors(rlhflow_dir, shepherd_dir, tmp_path, monkeypatch):
    with pytest.raises(PRMError, match="rlhflow, math_shepherd, qwen_prm, thinkfast"):
        load_prm(str(rlhflow_dir), device="cpu", format="orm")
    # the teacher's tokenizer splits "ки": explicit math_shepherd on it must say so and name the formats
    with pytest.raises(PRMError, match="math_shepherd.*one token.*rlhflow"):
        load_prm(str(rlhflow_dir), device="cpu", format="math_shepherd")
    with pytest.raises(PRMError, match="chat template"):
        load_prm(str(shepherd_dir), device="cpu", format="rlhflow")
    with pytest.raises(PRMError, match="<extra_0>"):
        load_prm(str(rlhflow_dir), device="cpu", format="qwen_prm")
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(PRMError, match="pass format= one of rlhflow"):
        load_prm(str(tmp_path / "weird"), device="cpu")
    with pytest.raises(PRMError, match="no config.json"):
        load_prm(str(tmp_path), device="cpu")
    with pytest.raises(PRMError, match="neither 'default', a local directory, nor a hub id"):
        load_prm("no_such_prm_here", device="cpu")
    monkeypatch.setattr(prm_lib, "ASSETS_DIR", tmp_path / "assets")
    with pytest.raises(PRMError, match="thinkfast prm train --out"):
        load_prm("default", device="cpu")
    prm = load_prm(str(rlhflow_dir), device="cpu")
    with pytest.raises(PRMError, match="list of completions"):
        prm.score(PROBLEM, "just one string")


def test_known_hub_ids_map_to_formats():
    assert prm_lib.KNOWN_HUB_IDS["RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"] == "rlhflow"
    assert prm_lib.KNOWN_HUB_IDS["peiyi9979/math-shepherd-mistral-7b-prm"] == "math_shepherd"
    assert prm_lib.KNOWN_HUB_IDS["Qwen/Qwen2.5-Math-PRM-7B"] == "qwen_prm"


# ----------------------------------------------------------------------------- the default: labelling and training

class ScriptedSampler:
    """A generator with fixed outputs, so the Monte-Carlo labels can be checked exactly."""

    def __init__(self, tokenizer, solutions, rollouts):
        self.tokenizer, self.solutions, self.rollouts, self.calls = tokenizer, solutions, rollouts, []

    def generate(self, prompts, n, max_new_tokens, temperature, seed, desc=""):
        self.calls.append((desc, len(prompts), n))
        source = self.solutions if desc == "solutions" else self.rollouts
        return [source[i % len(source)][:n] for i in range(len(prompts))]


def test_label_steps_soft_labels_from_rollouts(teacher_dir):
    from harness_ext.data import Problem
    tok = _tokenizer(teacher_dir)
    problem = Problem(id="p", problem=PROBLEM, answer="5", solution="", source="gsm8k_train")
    solutions = [["2 apples.\n\n2 + 3 = 5.\n\nThe answer is 5.", "2 apples.\n\nThe answer is 7."]]
    # rollouts come in prompt order: solution 1 prefixes (1 step, 2 steps), then solution 2's (1 step)
    rollouts = [["so 5", "so 6", "so 5", "so 5"], ["so 5", "so 5", "so 5", "so 5"], ["so 1", "so 2", "so 5", "x"]]
    sampler = ScriptedSampler(tok, solutions, [rollouts[0]])
    recipe = prm_lib.TrainRecipe(solutions=2, rollouts=4)
    calls = {"n": 0}

    def generate(prompts, n, max_new_tokens, temperature, seed, desc=""):
        if desc == "solutions":
            return solutions
        assert len(prompts) == 3 and n == 4
        text = tok.decode(prompts[0])
        assert text.endswith("2 apples.\n\n") and "Tom has 2 apples" in text
        assert tok.decode(prompts[1]).endswith("2 apples.\n\n2 + 3 = 5.\n\n")
        return rollouts

    sampler.generate = generate
    examples, counts = prm_lib.label_steps(sampler, [problem], recipe)
    assert [ex["labels"] for ex in examples] == [[0.75, 1.0, 1.0], [0.25, 0.0]]
    assert [ex["correct"] for ex in examples] == [True, False]
    assert counts["labelled_steps"] == 5 and counts["rollouts"] == 12 and counts["solutions"] == 2


def test_default_train_smoke_and_load(teacher_dir, tmp_path):
    """`thinkfast prm train --smoke` on a tiny random backbone: a loadable trained part, scored as sigmoid(head(h))."""
    from transformers import AutoModel
    from harness_ext.scoring import prm_cli
    backbone = _tiny_causal_lm(_tokenizer(teacher_dir), tmp_path / "backbone")
    out = tmp_path / "prm"
    parser = argparse.ArgumentParser()
    prm_cli.add_arguments(parser)
    args = parser.parse_args(["train", "--smoke", "--backbone", str(backbone), "--out", str(out), "--device", "cpu",
                              "--max-new-tokens", "16"])
    assert prm_cli.run(args) == 0

    manifest = json.loads((out / prm_lib.MANIFEST).read_text())
    assert manifest["format"] == "thinkfast" and manifest["backbone"]["path"] == str(backbone.resolve())
    assert manifest["data"]["train_problems"] == 4 and manifest["data"]["solutions"] == 8
    assert manifest["data"]["splits"] == ["gsm8k_train", "math_train"]
    assert manifest["metrics"]["train"]["optimizer_steps"] >= 2
    heldout = manifest["metrics"]["heldout"]
    assert heldout["eval_problems"] == 2 and "weighted_bon@4" in heldout and "maj@4" in heldout
    weights = out / prm_lib.TRAINED_WEIGHTS
    assert weights.stat().st_size == manifest["weights_bytes"] <= prm_lib.MAX_TRAINED_BYTES
    assert not list(out.glob(".*.tmp"))

    prm = load_prm(str(out), device="cpu")
    assert prm.format == "thinkfast"
    got = prm.score(PROBLEM, COMPLETIONS)
    assert [len(s) for s in got] == [3, 3, 1, 0]
    assert prm.score_ref(PROBLEM, COMPLETIONS) == [pytest.approx(s, abs=1e-5) for s in got]

    # by hand: backbone with the LoRA deltas merged into its weights, head on the hidden state at each step's end
    state = load_file(str(weights))
    base = AutoModel.from_pretrained(str(backbone)).eval()
    cfg = manifest["trained_part"]
    for i in cfg["lora_layers"]:
        for name in cfg["lora_targets"]:
            lin = getattr(base.layers[i].self_attn, name)
            delta = state[f"lora.{i}_{name}.lora_b"] @ state[f"lora.{i}_{name}.lora_a"]
            lin.weight.data += delta * cfg["lora_alpha"] / cfg["lora_rank"]
    tok = prm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": PROBLEM}], tokenize=False, add_generation_prompt=True)
    steps = split_steps(COMPLETIONS[0])
    ids = tok.encode(prompt + "\n\n".join(steps), add_special_tokens=False)
    ends = [len(tok.encode(prompt + "\n\n".join(steps[:k + 1]), add_special_tokens=False)) - 1
            for k in range(len(steps))]
    with torch.no_grad():
        hidden = base(input_ids=torch.tensor([ids])).last_hidden_state[0, ends]
        h = torch.nn.functional.gelu(hidden @ state["head.0.weight"].T + state["head.0.bias"])
        expected = torch.sigmoid(h @ state["head.2.weight"].T + state["head.2.bias"]).squeeze(-1).tolist()
    assert got[0] == pytest.approx(expected, abs=1e-5)


def test_committed_default_loads_if_present():
    if not (prm_lib.ASSETS_DIR / prm_lib.MANIFEST).is_file():
        pytest.skip("no trained default PRM committed yet (thinkfast prm train --out harness_ext/assets/prm)")
    prm = load_prm("default", device="cpu")
    scores = prm.score(PROBLEM, COMPLETIONS)
    assert [len(s) for s in scores] == [3, 3, 1, 0]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)
    assert (prm_lib.ASSETS_DIR / prm_lib.TRAINED_WEIGHTS).stat().st_size <= prm_lib.MAX_TRAINED_BYTES
