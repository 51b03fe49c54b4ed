"""distill: packing, decontamination, every stage of both recipes, exact resume, the NaN guard, torchrun (gloo).

    .venv/bin/python -m pytest -x -q tests/test_distill.py

A tiny random Llama teacher (4 layers, GQA) with a small BPE tokenizer trained on GSM8K/MATH train text (ChatML
template) keeps every step in milliseconds; the students come from `thinkfast init`'s code.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill import data as D
from distill.cli import apply_override, distill, load_recipe, merge, stage_configs
from distill.kd import KDObjective, model_forward
from distill.trainer import NonFiniteLossError, StageConfig, Trainer, latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, data_dir) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r.problem + "\n" + r.solution for r in D.load_records(["gsm8k_train", "math_train"], limit=200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=384, special_tokens=special,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>",
                                     pad_token="<|endoftext|>")
    hf_tok.chat_template = CHATML
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      max_position_embeddings=2048, initializer_range=0.1, rms_norm_eps=1e-5,
                      bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                      pad_token_id=hf_tok.pad_token_id)
    out = tmp_path_factory.mktemp("teacher")
    LlamaForCausalLM(cfg).save_pretrained(out)
    hf_tok.save_pretrained(out)
    return out


def tiny_recipe(name: str, *overrides: str) -> dict:
    recipe = load_recipe(name)
    recipe = merge(recipe, recipe["smoke"])
    for item in ("data.limit=24", "data.seq_len=64", "data.heldout_problems=6", "data.eval_rows=4",
                 "defaults.log_every=1", "defaults.save_every=0", "defaults.lr=3e-3",
                 "stages.kd.max_tokens=1024") + overrides:
        apply_override(recipe, item)
    return recipe


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(stage_dir / "metrics.jsonl")]


# ----------------------------------------------------------------------------- data

def test_pack_rows_boundaries_and_labels():
    docs = [D.Document(torch.arange(10, 15).numpy().astype("int32"), torch.tensor([0, 0, 1, 1, 1]).bool().numpy()),
            D.Document(torch.arange(20, 27).numpy().astype("int32"), torch.ones(7).bool().numpy())]
    stream = D.PackedStream(docs, seq_len=6, shuffle=False)
    b = stream.rows([0, 1])
    assert b["input_ids"].tolist() == [[10, 11, 12, 13, 14, 20], [21, 22, 23, 24, 25, 26]]
    assert b["seq_idx"].tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 3, 4, 5]]
    # token 12 is the first target; 14 -> 20 crosses a document; row ends have no next token
    assert b["labels"].tolist() == [[-100, 12, 13, 14, -100, -100], [22, 23, 24, 25, 26, -100]]
    # same seed, same rows; another epoch, another order
    s1, s2 = D.PackedStream(docs * 5, 6, seed=3), D.PackedStream(docs * 5, 6, seed=3)
    assert torch.equal(s1.rows(range(7))["input_ids"], s2.rows(range(7))["input_ids"])


def test_render_assistant_only(tiny_teacher):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    rec = D.Record("x", "What is 2+2?", "It is 4.", "t")
    doc, = D.render_documents([rec], tok, assistant_only=True)
    assert tok.decode(doc.ids[doc.target]).strip().startswith("It is 4.")
    assert "What is" in tok.decode(doc.ids[~doc.target])


def test_packed_forward_equals_separate_forwards(tiny_teacher, tmp_path):
    """No cross-document leakage: a packed row gives each document the logits it gets alone (teacher + both students)."""
    from transformers import AutoModelForCausalLM
    from harness_ext.models.init_from_teacher import init_student
    models = {"teacher": AutoModelForCausalLM.from_pretrained(tiny_teacher),
              "mambainllama": init_student(tiny_teacher, "mambainllama"),
              "llamba": init_student(tiny_teacher, "llamba")}
    g = torch.Generator().manual_seed(0)
    lens = [7, 12, 5]
    docs = [D.Document(torch.randint(3, 300, (n,), generator=g).numpy().astype("int32"), torch.ones(n).bool().numpy())
            for n in lens]
    batch = D.PackedStream(docs, sum(lens), shuffle=False).rows([0])
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            packed = model_forward(model, batch).logits[0]
            start = 0
            for d in docs:
                alone = model(input_ids=torch.from_numpy(d.ids).long()[None], use_cache=False).logits[0]
                torch.testing.assert_close(packed[start:start + len(d.ids)], alone, atol=2e-4, rtol=1e-4,
                                           msg=lambda m: f"{name}: {m}")
                start += len(d.ids)


def test_decontamination_catches_planted_test_problems(data_dir):
    records = D.load_records(["gsm8k_train"], limit=50)
    tests = D.load_test_problems()
    math500 = dict(tests)["test/precalculus/807.json"] if "test/precalculus/807.json" in dict(tests) else tests[0][1]
    gsm_test = next(text for tid, text in tests if tid.startswith("gsm8k"))
    planted = [D.Record("planted-exact", "  " + math500.upper() + " ", "whatever", "planted"),
               D.Record("planted-inside", "Solve this.", "Consider: " + gsm_test + " The answer is 3.", "planted")]
    with pytest.raises(D.ContaminationError) as err:
        D.decontaminate(records + planted, test_problems=tests)
    assert "planted-exact" in str(err.value) and "planted-inside" in str(err.value)
    kept, report = D.decontaminate(records + planted, drop=True, test_problems=tests)
    assert [r.id for r in kept] == [r.id for r in records]
    assert report["dropped"] == 2 and {m["record_id"] for m in report["matches"]} == {"planted-exact", "planted-inside"}
    with pytest.raises(ValueError, match="test set"):
        D.load_records(["math500"])


def test_recipe_overrides_and_budget_split():
    recipe = load_recipe("llamba")
    apply_override(recipe, "stages.kd.max_tokens=2e6")
    apply_override(recipe, "defaults.lr=5e-4")
    stages = stage_configs(recipe, max_tokens=1e6)
    assert [s.name for s in stages] == ["matrix", "hidden", "kd"]
    assert abs(sum(s.max_tokens for s in stages) - 1e6) < 10 and stages[2].lr == 5e-4
    with pytest.raises(KeyError, match="no section"):
        apply_override(recipe, "nosuch.lr=1")


def test_calibration_fits_llamba_mixers_to_the_teachers_attention(tiny_teacher):
    """MOHAWK stage 0: every head's fitted output is closer to the teacher attention's than the init's, the fold of
    the layer's scale into the input norm keeps that fit through the real block (the hidden-state objective drops),
    the held-out KL drops, and a student whose x heads share B/C heads is refused by name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from distill.mohawk import HiddenObjective, calibrate_mixers
    from distill.trainer import evaluate
    from harness_ext.models.init_from_teacher import init_student
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    docs = D.render_documents(D.load_records(["gsm8k_train"], limit=40), tok)
    calib, held = D.PackedStream(docs[:30], 64, seed=1).rows(range(4)), D.PackedStream(docs[30:], 64).rows(range(4))
    student = init_student(tiny_teacher, "llamba").eval()
    hidden = HiddenObjective(student)
    with torch.no_grad():
        hidden_before = float(hidden(calib, hidden.teacher_forward(teacher, calib))[0])
    kl_before = evaluate(student, teacher, [held])["kl_forward"]
    rows = calibrate_mixers(student, teacher, calib)
    assert len(rows) == 4 * 4 and all(r["residual_after"] < r["residual_before"] for r in rows), rows
    assert all(1 / 16 <= abs(r["c_scale"]) <= 16 for r in rows)
    with torch.no_grad():
        hidden_after = float(hidden(calib, hidden.teacher_forward(teacher, calib))[0])
    assert hidden_after < 0.5 * hidden_before, (hidden_before, hidden_after)
    assert evaluate(student, teacher, [held])["kl_forward"] < kl_before
    grouped = init_student(tiny_teacher, "llamba")
    grouped.model.layers[0].mixer.n_qk_heads = 2
    with pytest.raises(ValueError, match="n_qk_heads == n_v_heads"):
        grouped.model.layers[0].mixer.set_head_fit(torch.ones(4), -torch.ones(4), torch.ones(4))


# ----------------------------------------------------------------------------- stages

@pytest.mark.parametrize("recipe_name", ["mambainllama", "llamba"])
def test_every_stage_trains(recipe_name, tiny_teacher, tmp_path):
    extra = ("stages.sft.max_tokens=768", "stages.sft.lr=3e-3") if recipe_name == "mambainllama" else ()
    recipe = tiny_recipe(recipe_name, *extra)
    result = distill(recipe, str(tiny_teacher), str(tmp_path), progress=False)
    stage_dirs = sorted((tmp_path / "stages").iterdir())
    assert len(stage_dirs) == (2 if recipe_name == "mambainllama" else 3)
    for sd in stage_dirs:
        curve = losses(sd)
        assert len(curve) >= 4 and all(map(lambda x: x == x, curve))
        k = max(1, len(curve) // 3)
        assert sum(curve[-k:]) / k < sum(curve[:k]) / k, f"{sd.name}: loss did not go down: {curve}"
        assert (sd / "final" / "config.json").is_file()
        assert not list(sd.glob("checkpoint-*")), "a finished stage keeps no optimizer checkpoints"
    ev = result["eval"]
    kd = ev["kd"]
    assert kd["kl_forward"] < ev["init"]["kl_forward"], ev
    assert (tmp_path / "config.json").is_file() and (tmp_path / "decontamination.json").is_file()
    # a second run finds every stage finished and trains nothing
    again = distill(recipe, str(tiny_teacher), str(tmp_path), progress=False)
    assert again["final"] == result["final"]


# ----------------------------------------------------------------------------- resume, NaN guard

def _kd_trainer(tiny_teacher, stage_dir, steps=6, fault_hook=None, seed=0, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from harness_ext.models.init_from_teacher import init_student
    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    docs = D.render_documents(D.load_records(["gsm8k_train"], limit=30), tok)
    cfg = StageConfig(name="kd", objective="kd", max_tokens=steps * 2 * 64, seq_len=64, micro_batch_size=2,
                      lr=3e-3, log_every=1, save_every=2, seed=seed, **overrides)
    torch.manual_seed(0)
    student = init_student(tiny_teacher, "mambainllama")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    return Trainer(KDObjective(student), teacher, D.PackedStream(docs, 64, seed=seed), cfg, stage_dir,
                   tokenizer=tok, device=torch.device("cpu"), fault_hook=fault_hook, progress=False)


def test_compiled_regions_released_after_training(tiny_teacher, tmp_path, capsys):
    """A compiled stage hands back eager models when it ends: the held-out evaluation (no_grad, other shapes) and the
    next stage would otherwise recompile every region for a few forward passes. Compiling also turns dynamo's
    DDPOptimizer off (regions are single layers; under DDP it recompiled them all at the first step)."""
    import torch._dynamo.config as dynamo_config
    trainer = _kd_trainer(tiny_teacher, tmp_path / "kd", steps=2, compile=True, compile_mode="layers")
    trainer.train()
    assert "kd: compiled 10 regions" in capsys.readouterr().out        # it did train compiled
    assert trainer.compiled == [] and dynamo_config.optimize_ddp is False
    modules = list(trainer.student.modules()) + list(trainer.teacher.modules())
    assert not any(getattr(m, "_compiled_call_impl", None) is not None for m in modules)
    assert len(losses(tmp_path / "kd")) == 2
    torch._dynamo.reset()


def test_mfu_within_documents(tiny_teacher, tmp_path, monkeypatch):
    """The share of causal attention pairs inside documents, and the MFU with the attention term cut to it."""
    from distill.trainer import within_document_attention
    seq = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0]])
    # documents of 3, 2, 1 tokens: 6 + 3 + 1 pairs of 21; one document of 6: 21 of 21
    assert within_document_attention(seq).item() == pytest.approx((10 + 21) / 42)
    monkeypatch.setenv("THINKFAST_PEAK_FLOPS", "1e12")
    from transformers import AutoModelForCausalLM
    from harness_ext.models.init_from_teacher import init_student
    g = torch.Generator().manual_seed(0)
    docs = [D.Document(torch.randint(3, 300, (n,), generator=g).numpy().astype("int32"), torch.ones(n).bool().numpy())
            for n in (9, 20, 13, 22) * 8]                   # short documents: several per 64-token row
    cfg = StageConfig(name="kd", objective="kd", max_tokens=2 * 2 * 64, seq_len=64, micro_batch_size=2, lr=1e-3,
                      log_every=1, save_every=0)
    trainer = Trainer(KDObjective(init_student(tiny_teacher, "mambainllama")),
                      AutoModelForCausalLM.from_pretrained(tiny_teacher), D.PackedStream(docs, 64, seed=0), cfg,
                      tmp_path / "kd", device=torch.device("cpu"), progress=False)
    trainer.train()
    rows = [json.loads(line) for line in open(tmp_path / "kd" / "metrics.jsonl")]
    attention = trainer.flops["attention"]
    assert len(rows) == 2 and 0 < attention < trainer.flops["total"]
    for row in rows:
        assert 0 < row["doc_attention_frac"] < 0.5
        useful = row["flops_per_token"] - attention * (1 - row["doc_attention_frac"])
        assert row["mfu_within_docs"] == pytest.approx(row["tokens_per_s"] * useful / 1e12)
        assert row["mfu_within_docs"] < row["mfu"]


def test_graphed_scan_refuses_gradient_checkpointing(tiny_teacher, tmp_path, monkeypatch):
    """Checkpointing replays each layer's forward inside the backward; the captured scans cannot serve that, whether
    the environment or the stage asks for them."""
    with pytest.raises(ValueError, match="grad_checkpointing .* train_scan=graph"):
        _kd_trainer(tiny_teacher, tmp_path / "a", grad_checkpointing=True, train_scan="graph")
    monkeypatch.setenv("THINKFAST_TRAIN_SCAN", "graph")
    with pytest.raises(ValueError, match="grad_checkpointing .* train_scan=graph"):
        _kd_trainer(tiny_teacher, tmp_path / "b", grad_checkpointing=True)


def test_stage_runtime_modes_apply_while_training_only(tiny_teacher, tmp_path, monkeypatch):
    """A stage's student_attn / train_scan override the environment while it trains, and the process gets its
    previous modes back after (the next stage may differ); misspelt values are refused by name."""
    from harness_ext.models import runtime, ssd
    monkeypatch.setenv("THINKFAST_TRAIN_ATTN", "sdpa")
    monkeypatch.delenv("THINKFAST_TRAIN_SCAN", raising=False)
    seen = []

    def record_modes(step, loss):
        seen.append((runtime.train_attn_mode(), ssd.train_scan_mode()))
        return loss
    trainer = _kd_trainer(tiny_teacher, tmp_path / "run", steps=3, fault_hook=record_modes,
                          student_attn="flex", train_scan="graph")
    result = trainer.train()
    assert seen and set(seen) == {("flex", "graph")}
    assert (runtime.train_attn_mode(), ssd.train_scan_mode()) == ("sdpa", "eager")
    assert result["last_log"]["loss"] == result["last_log"]["loss"]      # CPU: both fall back and train finitely
    with pytest.raises(ValueError, match="student_attn must be one of sdpa, varlen, flex, got 'flash'"):
        _kd_trainer(tiny_teacher, tmp_path / "bad", student_attn="flash")
    with pytest.raises(ValueError, match="train_scan must be one of eager, graph, got 'graphs'"):
        _kd_trainer(tiny_teacher, tmp_path / "bad2", train_scan="graphs")
    with pytest.raises(ValueError, match="compile_mode must be one of regional, layers, got 'layer'"):
        _kd_trainer(tiny_teacher, tmp_path / "bad3", compile_mode="layer")   # not a silent eager run


class Killed(BaseException):
    pass


def test_killed_and_resumed_run_equals_uninterrupted(tiny_teacher, tmp_path):
    full = _kd_trainer(tiny_teacher, tmp_path / "full")
    full.train()

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed()
        return loss
    with pytest.raises(Killed):
        _kd_trainer(tiny_teacher, tmp_path / "killed", fault_hook=kill_at_5).train()
    assert latest_checkpoint(tmp_path / "killed").name == "checkpoint-4"
    resumed = _kd_trainer(tiny_teacher, tmp_path / "killed")  # fresh student; weights come from the checkpoint
    resumed.train()
    a, b = full.student.state_dict(), resumed.student.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(tmp_path / "full")[-1] == losses(tmp_path / "killed")[-1]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_teacher, tmp_path):
    def nan_at_5(step, loss):
        return loss * float("nan") if step == 5 else loss
    with pytest.raises(NonFiniteLossError, match="step 5") as err:
        _kd_trainer(tiny_teacher, tmp_path, fault_hook=nan_at_5, steps=8).train()
    assert "checkpoint-4" in str(err.value)
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "checkpoint-4" and not (tmp_path / "checkpoint-6").exists()
    from harness_ext.models import load_model
    model = load_model(str(ckpt))
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_torchrun_two_processes_match_one(tiny_teacher, tmp_path):
    """2 gloo processes x micro-batch 2 see the same rows per step as 1 process x 2 accumulation steps."""
    script = tmp_path / "run.py"
    script.write_text(f"""
import sys, torch
sys.path.insert(0, {str(REPO)!r})
from tests.test_distill import tiny_recipe
from distill.cli import distill
accum = int(sys.argv[2])
recipe = tiny_recipe("mambainllama", "stages.kd.max_tokens=1024", f"defaults.grad_accum={{accum}}")
distill(recipe, {str(tiny_teacher)!r}, sys.argv[1], progress=False)
""")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port, so parallel runs on one machine cannot collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(port)]
    subprocess.run(torchrun + [str(script), str(tmp_path / "ddp"), "1"], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(script), str(tmp_path / "single"), "2"], check=True, env=env, timeout=300)
    ddp, single = losses(tmp_path / "ddp/stages/0-kd"), losses(tmp_path / "single/stages/0-kd")
    assert len(ddp) == len(single) == 4
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 1e-4, (ddp, single)


# ----------------------------------------------------------------------------- chunked KD loss

@pytest.mark.parametrize("divergence,temperature,ce_weight", [
    ("reverse_kl", 1.0, 0.0), ("forward_kl", 1.0, 0.0), ("reverse_kl", 2.0, 0.3), ("forward_kl", 0.7, 0.5),
    (None, 1.0, 1.0)])  # None: SFT (plain CE, no teacher)
def test_chunked_kd_loss_matches_full_logit_reference(divergence, temperature, ce_weight):
    """Value and gradients (student hidden states, student lm_head) equal the full-logit loss, chunks uneven."""
    from distill.kd import chunked_kd_loss, kd_loss_ref
    g = torch.Generator().manual_seed(0)
    B, L, D, V = 3, 11, 16, 97
    h_s = torch.randn(B, L, D, generator=g, dtype=torch.float32)
    w_s = torch.randn(V, D, generator=g, dtype=torch.float32) * 0.5
    h_t = torch.randn(B, L, D, generator=g, dtype=torch.float32)
    w_t = torch.randn(V, D, generator=g, dtype=torch.float32) * 0.5
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[torch.rand(B, L, generator=g) < 0.3] = -100         # the loss mask
    teacher = divergence is not None
    results = []
    for chunked in (False, True):
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        if chunked:
            loss, stats = chunked_kd_loss(hs, ws, h_t if teacher else None, w_t if teacher else None, labels,
                                          divergence or "reverse_kl", temperature, ce_weight, chunk_tokens=7)
        else:
            loss, stats = kd_loss_ref(hs @ ws.T, (h_t @ w_t.T) if teacher else None, labels,
                                      divergence or "reverse_kl", temperature, ce_weight)
        (loss * 1.7).backward()                                 # a non-unit upstream gradient
        results.append((loss.detach(), {k: v.detach() for k, v in stats.items()}, hs.grad, ws.grad))
    (l_ref, s_ref, gh_ref, gw_ref), (l_c, s_c, gh_c, gw_c) = results
    torch.testing.assert_close(l_c, l_ref, rtol=1e-5, atol=1e-6)             # fp32 tolerances
    assert s_c.keys() == s_ref.keys()
    for k in s_ref:
        torch.testing.assert_close(s_c[k], s_ref[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gh_c, gh_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw_c, gw_ref, rtol=1e-4, atol=1e-6)
    assert gh_c[labels == -100].abs().max() == 0                # masked tokens get no gradient


KD_KERNEL_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from distill import kd, kd_kernels
kd_kernels.BLOCK_V = 64        # several vocabulary blocks (the online rescaling) and a ragged last one
g = torch.Generator().manual_seed(0)
T, V = 13, 300
cases = [(div, temp, with_ce, teacher) for div in ("reverse_kl", "forward_kl") for temp in (1.0, 2.0)
         for with_ce in (False, True) for teacher in (True, False) if teacher or with_ce]
for div, temp, with_ce, teacher in cases:
    zs = torch.randn(T, V, generator=g) * 3
    zt = torch.randn(T, V, generator=g) * 3 if teacher else None
    labels = torch.randint(0, V, (T,), generator=g)
    labels[[2, 7]] = -100
    kl_coef, ce_coef = torch.tensor(0.37), torch.tensor(0.21 if with_ce else 0.0)
    ref = kd.kd_chunk(zs, zt, labels, kl_coef, ce_coef, div, temp, with_ce, True)
    logits = zs.clone()
    out = kd_kernels.kd_chunk_triton(logits, zt, labels, kl_coef, ce_coef, div, temp, with_ce, True,
                                     overwrite_logits=True)
    assert out[2] is logits                                     # the gradient over the consumed logits
    for name, a, b in zip(("kl", "ce", "grad"), out, ref):
        err = float((a - b).abs().max()) / max(float(b.abs().max()), 1e-6)
        assert err < 1e-5, (div, temp, with_ce, teacher, name, err)
    assert out[2][[2, 7]].abs().max() == 0                      # masked tokens: no gradient
    no_grad = kd_kernels.kd_chunk_triton(zs, zt, labels, kl_coef, ce_coef, div, temp, with_ce, False)
    assert no_grad[2] is None and torch.allclose(no_grad[0], ref[0], rtol=1e-5)
# through chunked_kd_loss: THINKFAST_KD_KERNEL=triton (this process) against the reference, values and grads
B, L, Dm, V = 2, 19, 16, 150
h_s, h_t = torch.randn(B, L, Dm, generator=g), torch.randn(B, L, Dm, generator=g)
w_s, w_t = torch.randn(V, Dm, generator=g) * 0.5, torch.randn(V, Dm, generator=g) * 0.5
labels = torch.randint(0, V, (B, L), generator=g)
labels[0, :5] = -100
for div, temp, ce_w in (("reverse_kl", 1.0, 0.0), ("forward_kl", 2.0, 0.3)):
    results = []
    for mode in ("ref", "triton"):
        kd_kernels.KD_KERNEL_MODE = mode
        assert kd_kernels.use_triton_kd(h_s) == (mode == "triton")
        hs, ws = h_s.clone().requires_grad_(), w_s.clone().requires_grad_()
        loss, stats = kd.chunked_kd_loss(hs, ws, h_t, w_t, labels, div, temp, ce_w, chunk_tokens=16)
        (loss * 1.3).backward()
        results.append((loss.detach(), hs.grad, ws.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
print("kd kernel OK")
"""


def test_triton_kd_chunk_matches_reference_under_interpreter():
    """The fused KD chunk (distill.kd_kernels, THINKFAST_KD_KERNEL=triton on CUDA) against `kd.kd_chunk` on CPU via
    Triton's interpreter, fp32: reverse and forward KL, T = 1 and 2, with and without CE, SFT (no teacher), masked
    tokens, a vocabulary over several blocks with a ragged last one, the in-place gradient; then `chunked_kd_loss`
    end to end (loss, hidden-state and lm_head grads) with the kernel against the reference."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", THINKFAST_KERNELS="auto")
    env.pop("THINKFAST_KD_KERNEL", None)
    proc = subprocess.run([sys.executable, "-c", KD_KERNEL_SCRIPT, str(Path(__file__).resolve().parents[1])],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "kd kernel OK" in proc.stdout


def test_kd_kernel_dispatch_and_fallback(monkeypatch):
    """The reference by default; `triton` for CUDA logits only (or under the interpreter); a misspelt mode is
    named; a Triton chunk that raises warns and the reference gives the same loss (and runs from then on)."""
    from distill import kd, kd_kernels
    x = torch.randn(2, 3)
    monkeypatch.setattr(kd_kernels, "KD_KERNEL_MODE", None)
    monkeypatch.delenv("THINKFAST_KD_KERNEL", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kd_kernels.kd_kernel_mode() == "ref" and not kd_kernels.use_triton_kd(x)
    monkeypatch.setenv("THINKFAST_KD_KERNEL", "triton")
    assert not kd_kernels.use_triton_kd(x)                    # a CPU tensor, no interpreter: the reference
    monkeypatch.setenv("THINKFAST_KD_KERNEL", "fused")
    with pytest.raises(ValueError, match="THINKFAST_KD_KERNEL must be one of ref, triton, got 'fused'"):
        kd_kernels.kd_kernel_mode()
    monkeypatch.delenv("THINKFAST_KD_KERNEL")

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel here")
    g = torch.Generator().manual_seed(0)
    h_s, h_t, w = torch.randn(1, 6, 8, generator=g), torch.randn(1, 6, 8, generator=g), torch.randn(20, 8, generator=g)
    labels = torch.randint(0, 20, (1, 6), generator=g)
    expected, _ = kd.chunked_kd_loss(h_s, w, h_t, w, labels)
    monkeypatch.setattr(kd_kernels, "use_triton_kd", lambda t: True)
    monkeypatch.setattr(kd_kernels, "kd_chunk_triton", broken)
    monkeypatch.setattr(kd, "_TRITON_CHUNK_FAILED", [])
    with pytest.warns(UserWarning, match="Triton KD chunk .* failed .*no kernel here"):
        loss, _ = kd.chunked_kd_loss(h_s, w, h_t, w, labels)
    assert torch.equal(loss, expected) and len(kd._TRITON_CHUNK_FAILED) == 1


def test_kd_objective_chunked_equals_reference_on_students(tiny_teacher):
    """KDObjective end to end (teacher lm_head skipped; student hidden via the model) equals the full-logit path."""
    from transformers import AutoModelForCausalLM
    from harness_ext.models.init_from_teacher import init_student
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    g = torch.Generator().manual_seed(1)
    docs = [D.Document(torch.randint(3, 300, (n,), generator=g).numpy().astype("int32"), torch.ones(n).bool().numpy())
            for n in (9, 20, 13, 22)]
    batch = D.PackedStream(docs, 32, shuffle=False).rows([0, 1])
    for arch in ("mambainllama", "llamba"):
        grads = []
        for chunked in (False, True):
            torch.manual_seed(0)
            student = init_student(tiny_teacher, arch).train()
            objective = KDObjective(student, "reverse_kl", chunked=chunked, chunk_tokens=24)
            loss, _ = objective(batch, objective.teacher_forward(teacher, batch))
            loss.backward()
            grads.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}))
        (l_ref, g_ref), (l_c, g_c) = grads
        torch.testing.assert_close(l_c, l_ref, rtol=1e-5, atol=1e-6)
        assert g_ref.keys() == g_c.keys() and "model.embed_tokens.weight" in g_c   # tied lm_head: its grad lands here
        for name in g_ref:
            torch.testing.assert_close(g_c[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{arch} {name}: {m}")


def test_failing_compile_falls_back_to_eager(tiny_teacher, tmp_path, monkeypatch):
    """A compile error (here: a backend that raises) is caught by the probe step; the run trains eagerly and ends
    where a plain eager run ends."""
    import distill.trainer as T

    def broken_backend(gm, example_inputs):
        raise RuntimeError("backend exploded")

    def compile_broken(model, mode="regional"):
        parts = [layer.mlp for layer in T._decoder_layers(model)]
        for part in parts:
            part.compile(backend=broken_backend)
        return parts
    eager = _kd_trainer(tiny_teacher, tmp_path / "eager", steps=2)
    eager.train()
    monkeypatch.setattr(T, "compile_regions", compile_broken)
    broken = _kd_trainer(tiny_teacher, tmp_path / "broken", steps=2)
    broken.cfg.compile = True
    with pytest.warns(UserWarning, match="torch.compile failed"):
        broken.train()
    assert broken.compiled == [] and all(layer.mlp._compiled_call_impl is None for layer in T._decoder_layers(broken.student))
    assert losses(tmp_path / "broken") == losses(tmp_path / "eager")


def test_curves_plot_from_metrics_and_malformed_rows(tmp_path):
    from distill.curves import plot_curves, read_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps({"stage": "kd", "step": s, "tokens": 1000 * s, "loss": 5.0 / s,
                                             "tokens_per_s": 1e5, "mfu": 0.13}) for s in range(1, 6)) + "\n")
    png = plot_curves([metrics], tmp_path / "curves.png")
    assert png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    # two runs of the same stage (1 GPU vs 2): told apart by their files, on one shared MFU axis
    import matplotlib.pyplot as plt
    other = tmp_path / "metrics_2gpu.jsonl"
    other.write_text(metrics.read_text())
    figures = []
    original = plt.subplots
    plt.subplots = lambda *a, **k: figures.append(original(*a, **k)) or figures[-1]
    try:
        plot_curves([metrics, other], tmp_path / "two.png")
    finally:
        plt.subplots = original
    loss_ax, speed_ax = figures[0][1]
    assert [t.get_text() for t in loss_ax.get_legend().get_texts()] == ["kd (metrics)", "kd (metrics_2gpu)"]
    assert len(figures[0][0].axes) == 3  # loss, throughput, one MFU twin
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: a metrics row needs 'tokens'"):
        read_metrics(bad)


def test_random_weight_teacher_keeps_config_and_tokenizer(tiny_teacher, tmp_path):
    """scripts/gpu_distill_check.py --random-weights: a teacher directory without weights (config and tokenizer
    only) gives a teacher of the same shapes and tokens with fresh weights, which distils like the real one."""
    import importlib.util
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    spec = importlib.util.spec_from_file_location("gpu_distill_check", REPO / "scripts" / "gpu_distill_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config_only = tmp_path / "config_only"
    shutil.copytree(tiny_teacher, config_only, ignore=shutil.ignore_patterns("*.safetensors"))
    made = Path(module.random_weight_teacher(str(config_only), tmp_path / "random", seed=1))  # the fixture used 0
    config = {k: v for k, v in AutoConfig.from_pretrained(made).to_dict().items() if k != "_name_or_path"}
    assert config == {k: v for k, v in AutoConfig.from_pretrained(tiny_teacher).to_dict().items() if k != "_name_or_path"}
    text = "Natalia sold 48 clips in April."
    assert AutoTokenizer.from_pretrained(made)(text).input_ids == AutoTokenizer.from_pretrained(tiny_teacher)(text).input_ids
    real, fresh = load_file(tiny_teacher / "model.safetensors"), load_file(made / "model.safetensors")
    assert real.keys() == fresh.keys()
    assert all(real[k].shape == fresh[k].shape and fresh[k].dtype == torch.float32 for k in real)
    assert not torch.equal(real["model.layers.0.self_attn.q_proj.weight"], fresh["model.layers.0.self_attn.q_proj.weight"])
    result = distill(tiny_recipe("mambainllama", "stages.kd.max_tokens=256"), str(made), str(tmp_path / "student"))
    assert result["eval"]

    (tmp_path / "not_llama").mkdir()
    (tmp_path / "not_llama" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SystemExit, match="expected a Llama teacher"):
        module.random_weight_teacher(str(tmp_path / "not_llama"), tmp_path / "x")
