"""Generation engine on CPU with tiny random Llamba / MambaInLlama models (fp32, no CUDA graphs).

    .venv/bin/python -m pytest -q tests/test_engine.py
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from harness_ext.generation.engine import Engine, SamplingParams, batch_buckets
from harness_ext.generation.sampling import filtered_probs_ref, greedy_next, sample_next, sample_next_ref
from harness_ext.models.llamba import LlambaConfig, LlambaForCausalLM
from harness_ext.models.mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

VOCAB = 49152  # the teacher tokenizer's, so text tests decode real tokens
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CI box has 2 cores shared by several processes: tiny matmuls on many threads run ~30x slower
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def tiny_mil(**kw):
    torch.manual_seed(0)
    config = MambaInLlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_layers=[0],
                                max_position_embeddings=kw.pop("max_position_embeddings", 256), ssm_chunk_size=16,
                                eos_token_id=2, bos_token_id=1, **kw)
    return MambaInLlamaForCausalLM(config).eval()


def tiny_llamba():
    torch.manual_seed(0)
    config = LlambaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, n_qk_heads=2,
                          n_v_heads=2, d_state=16, d_inner=32, ssm_chunk_size=16, eos_token_id=2, bos_token_id=1)
    return LlambaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def mil():
    return tiny_mil()


@pytest.fixture(scope="module")
def llamba():
    return tiny_llamba()


@pytest.fixture(scope="module")
def tokenizer(teacher_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher_dir)


def random_prompts(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_by_full_forward(model, prompt, steps):
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


GREEDY8 = SamplingParams(max_new_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["mil", "llamba"])
def test_variable_length_batch_equals_single_runs_and_full_forward(arch, request):
    model = request.getfixturevalue(arch)
    prompts = random_prompts([3, 29, 50, 8, 1])
    batched = Engine(model, max_batch_size=8, sync_every=3).generate(prompts, GREEDY8)
    for prompt, outs in zip(prompts, batched):
        alone = Engine(model, max_batch_size=1).generate([prompt], GREEDY8)[0][0]
        assert outs[0].token_ids == alone.token_ids
        assert outs[0].token_ids == greedy_by_full_forward(model, prompt, 8)
        assert outs[0].finish_reason == "length" and outs[0].num_tokens == 8


def test_prefill_chunks_and_tail_buckets_keep_outputs(mil):
    prompts = random_prompts([5, 9, 14, 3, 7])
    reference = Engine(mil, max_batch_size=8).generate(prompts, GREEDY8)
    # 3 slots (bucket list 1, 2, 3), prefill of at most 10 tokens per call, a look every 2 steps
    engine = Engine(mil, max_batch_size=3, sync_every=2, prefill_tokens=10)
    assert batch_buckets(3) == [1, 2, 3]
    assert engine.generate(prompts, GREEDY8) == reference
    assert engine.stats["prefill_calls"] >= 3


def test_prefill_out_of_memory_splits_the_call_and_keeps_outputs(mil, monkeypatch):
    prompts = random_prompts([5, 9, 14, 3, 7])
    reference = Engine(mil, max_batch_size=8).generate(prompts, GREEDY8)
    engine = Engine(mil, max_batch_size=8)
    real_prefill, calls = mil.prefill, []

    def prefill_with_a_memory_limit(prompt_list, state, slots):
        calls.append(len(prompt_list))
        if sum(p.numel() for p in prompt_list) > 16:          # a call over 16 tokens "runs out of memory"
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_prefill(prompt_list, state, slots)

    monkeypatch.setattr(mil, "prefill", prefill_with_a_memory_limit)
    with pytest.warns(UserWarning, match="ran out of GPU memory"):
        assert engine.generate(prompts, GREEDY8) == reference
    assert calls[0] == 5 and engine.stats["prefilled_prompts"] == 5 and engine.prefill_tokens <= 19
    monkeypatch.setattr(mil, "prefill", lambda *a: (_ for _ in ()).throw(torch.OutOfMemoryError("one prompt")))
    with pytest.raises(torch.OutOfMemoryError, match="one prompt"):
        Engine(mil, max_batch_size=1).generate(prompts[:1], GREEDY8)


def test_seeded_sampling_reproduces_and_seeds_differ(mil):
    prompts = random_prompts([4, 11])
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=50, top_p=0.9, ignore_eos=True)
    a = Engine(mil, max_batch_size=8).generate(prompts, params, n=3, seed=7)
    b = Engine(mil, max_batch_size=8).generate(prompts, params, n=3, seed=7)
    c = Engine(mil, max_batch_size=8).generate(prompts, params, n=3, seed=8)
    assert a == b
    assert [[s.token_ids for s in o] for o in a] != [[s.token_ids for s in o] for o in c]
    # a sample's noise depends on (seed, prompt, sample) only, not on its slot: refill gives the same samples
    d = Engine(mil, max_batch_size=2, sync_every=3).generate(prompts, params, n=3, seed=7)
    assert d == a


def test_batched_refill_keeps_samples_and_saves_prefill_calls(mil):
    """Prefill calls batched (refill only with >= 3 free slots, prompts prefilled ahead into 4 template slots)
    give the same samples as eager one-prompt refills and as one big batch; samples end at different steps
    (budget = max_seqlen - prompt length) so slots free up unevenly."""
    lengths = [5, 9, 14, 3, 20, 7, 11]
    prompts = random_prompts(lengths)
    params = SamplingParams(max_new_tokens=16, temperature=1.0, ignore_eos=True)
    kw = dict(max_batch_size=4, sync_every=2, max_seqlen=24)
    eager = Engine(mil, refill_min_free=1, template_slots=1, **kw)
    batched = Engine(mil, refill_min_free=3, template_slots=4, **kw)
    outs_eager = eager.generate(prompts, params, n=3, seed=5)
    outs_batched = batched.generate(prompts, params, n=3, seed=5)
    one_batch = Engine(mil, max_batch_size=32, max_seqlen=24).generate(prompts, params, n=3, seed=5)
    assert outs_batched == outs_eager == one_batch
    assert [[c.num_tokens for c in o] for o in outs_batched] == [[min(16, 24 - n)] * 3 for n in lengths]
    assert batched.stats["prefilled_prompts"] == eager.stats["prefilled_prompts"] == len(prompts)
    assert batched.stats["prefill_calls"] < eager.stats["prefill_calls"]
    with pytest.raises(ValueError, match="refill_min_free"):
        Engine(mil, refill_min_free=0)


def test_forked_samples_are_independent_and_equal_separate_prefills(mil):
    prompt = random_prompts([12])[0]
    params = SamplingParams(max_new_tokens=10, temperature=1.0, ignore_eos=True)
    # one prefill forked into 6 slots (and, with 4 slots, via the template slot in two rounds) ...
    forked = Engine(mil, max_batch_size=8).generate([prompt], params, n=6, seed=3)[0]
    via_template = Engine(mil, max_batch_size=4, sync_every=4).generate([prompt], params, n=6, seed=3)[0]
    # ... equals 6 separate prefills of the same prompt (sample keys are seed + global sample index)
    separate = [o[0] for o in Engine(mil, max_batch_size=8).generate([prompt] * 6, params, n=1, seed=3)]
    assert forked == separate == via_template
    assert len({tuple(s.token_ids) for s in forked}) == 6  # independent noise per sample
    engine = Engine(mil, max_batch_size=8)
    engine.generate([prompt], params, n=6)
    assert engine.stats["prefilled_prompts"] == 1
    # greedy forks all equal the single greedy run
    greedy = Engine(mil, max_batch_size=8).generate([prompt], GREEDY8, n=4)[0]
    assert all(s.token_ids == greedy_by_full_forward(mil, prompt, 8) for s in greedy)


def test_sampler_matches_reference_and_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 40, generator=g) * 2
    keys = torch.arange(64) * 7919 + 11
    steps = torch.arange(64) % 5
    for top_k, top_p in ((0, 1.0), (5, 1.0), (0, 0.7), (8, 0.5)):
        fast = sample_next(logits, keys, steps, 0.8, top_k, top_p if top_p < 1 else None)
        ref = sample_next_ref(logits, keys, steps, 0.8, top_k, top_p)   # noise from Python ints, row by row
        assert torch.equal(fast, ref), (top_k, top_p)
    # a 0-d temperature tensor (what the engine's graph reads) draws the same tokens
    assert torch.equal(sample_next(logits, keys, steps, torch.tensor(0.8)), sample_next(logits, keys, steps, 0.8))
    # empirical frequencies of one row over 4000 keys match the filtered softmax
    row = logits[:1].expand(4000, 40)
    for top_k, top_p in ((0, 1.0), (6, 1.0), (0, 0.8)):
        draws = sample_next(row, torch.arange(4000), torch.zeros(4000, dtype=torch.long), 1.3, top_k,
                            top_p if top_p < 1 else None)
        freq = torch.bincount(draws, minlength=40).double() / 4000
        probs = filtered_probs_ref(logits[0], 1.3, top_k, top_p)
        assert (freq[probs == 0] == 0).all()
        assert 0.5 * (freq - probs).abs().sum() < 0.05
    # the noise of a sample's successive tokens is independent: token index 0 vs 1 of the same keys
    a = sample_next(row, torch.arange(4000), torch.zeros(4000, dtype=torch.long), 1.3)
    b = sample_next(row, torch.arange(4000), torch.ones(4000, dtype=torch.long), 1.3)
    p = filtered_probs_ref(logits[0], 1.3)
    assert abs((a == b).double().mean() - (p * p).sum()) < 0.03
    # ties at the top-k boundary are all kept (the allowed set depends on the logits only); greedy takes the first
    tied = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.5, 2.0]])
    assert set(filtered_probs_ref(tied[0], 1.0, top_k=2).nonzero().flatten().tolist()) == {1, 2, 3, 5}
    picks = {int(sample_next(tied, torch.tensor([k]), torch.zeros(1, dtype=torch.long), 5.0, top_k=2)) for k in range(200)}
    assert picks == {1, 2, 3, 5}
    assert int(greedy_next(torch.tensor([[0.0, 2.0, 1.0, 2.0]]))) == 1


def test_stop_strings_and_refill_keep_text_intact(mil, tokenizer):
    prompts = random_prompts([6, 20, 3])
    free = SamplingParams(max_new_tokens=24, temperature=1.0, ignore_eos=True)
    unstopped = Engine(mil, tokenizer, max_batch_size=16).generate(prompts, free, n=3, seed=5)
    text = unstopped[0][0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]  # occurs mid-way through sample (0, 0)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, stop_strings=(stop, "\n\n"), ignore_eos=True)
    # 2 slots for 9 samples: finished slots are refilled; compare with a run that holds them all at once
    small = Engine(mil, tokenizer, max_batch_size=2, sync_every=4).generate(prompts, params, n=3, seed=5)
    large = Engine(mil, tokenizer, max_batch_size=16, sync_every=4).generate(prompts, params, n=3, seed=5)
    assert small == large
    assert small[0][0].finish_reason == "stop" and small[0][0].text == text[: text.index(stop)]
    for o, u in zip(small, unstopped):
        for s, s_free in zip(o, u):
            assert s.num_tokens == len(s.token_ids)
            assert s.token_ids == s_free.token_ids[: s.num_tokens]  # same sample, cut
            full = tokenizer.decode(s.token_ids, skip_special_tokens=True)
            if s.finish_reason == "stop":  # tokens end with the one that completed the stop string
                first = min(full.find(x) for x in (stop, "\n\n") if x in full)
                assert s.text == full[:first] and stop not in s.text and "\n\n" not in s.text
                assert all(x not in tokenizer.decode(s.token_ids[:-1], skip_special_tokens=True) for x in (stop, "\n\n"))
            else:
                assert s.num_tokens == 24 and s.text == full == s_free.text


def test_stop_token_ids_and_eos(mil, tokenizer):
    prompt = random_prompts([7])[0]
    free = Engine(mil, tokenizer, max_batch_size=4).generate([prompt], GREEDY8)[0][0].token_ids
    stop = free[3]
    first = free.index(stop)
    out = Engine(mil, tokenizer, max_batch_size=4).generate(
        [prompt], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=(stop,)))[0][0]
    assert out.finish_reason == "stop" and out.token_ids == free[: first + 1]
    assert out.text == tokenizer.decode(free[:first], skip_special_tokens=True)
    engine = Engine(mil, tokenizer)
    assert 2 in engine.eos_token_ids  # the tokenizer's / generation config's eos


def test_special_token_stop_string_is_a_stop_id_not_a_text_scan(mil, tokenizer, monkeypatch):
    """lm-eval adds the eos text to every request's stop strings; decoded text skips special tokens, so scanning for
    it cannot match: such a string becomes a stop token id and the per-look decode of every slot is skipped."""
    eos_text = tokenizer.convert_ids_to_tokens(2)
    engine = Engine(mil, tokenizer, max_batch_size=8, sync_every=2)
    folded = engine._special_stop_strings(SamplingParams(stop_strings=(eos_text, "\n\n"), stop_token_ids=(5,)))
    assert folded.stop_strings == ("\n\n",) and folded.stop_token_ids == (5, 2)
    prompts = random_prompts([5, 9])
    plain = SamplingParams(max_new_tokens=12, temperature=1.0, ignore_eos=True)
    by_id = engine.generate(prompts, dataclasses.replace(plain, stop_token_ids=(2,)), n=3, seed=7)
    monkeypatch.setattr(Engine, "_scan_stop_strings", lambda *a: pytest.fail("scanned text for a special token"))
    by_string = engine.generate(prompts, dataclasses.replace(plain, stop_strings=(eos_text,)), n=3, seed=7)
    assert by_string == by_id
    with_eos = SamplingParams(max_new_tokens=12, temperature=1.0)
    assert engine.generate(prompts, dataclasses.replace(with_eos, stop_strings=(eos_text,)), n=3, seed=7) == \
        engine.generate(prompts, with_eos, n=3, seed=7)


def test_string_and_chat_prompts(mil, tokenizer):
    engine = Engine(mil, tokenizer, max_batch_size=4)
    chat = [{"role": "user", "content": "What is 7 * 8?"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert engine.encode_prompt(chat) == tokenizer(text, add_special_tokens=False)["input_ids"]
    outs = engine.generate(["The capital of France is", chat], GREEDY8, n=2)
    assert [len(o) for o in outs] == [2, 2] and all(isinstance(s.text, str) for o in outs for s in o)
    ids = engine.encode_prompt(chat)
    assert outs[1][0].token_ids == greedy_by_full_forward(mil, ids, 8)


def test_bad_input_raises_before_any_work(tokenizer):
    model = tiny_mil(max_position_embeddings=32)
    engine = Engine(model, tokenizer, max_batch_size=4)
    cases = [
        (dict(prompts=[list(range(3, 40))]), "max length"),
        (dict(prompts=[[1, 2]], n=0), "n "),
        (dict(prompts=[]), "prompts"),
        (dict(prompts=[[]]), "empty"),
        (dict(prompts=[[VOCAB + 5]]), "token ids"),
        (dict(prompts=[[1.5]]), "prompt"),
    ]
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            engine.generate(**kwargs)
    for field, value in (("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
                         ("top_k", -1), ("max_new_tokens", 0)):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    assert engine._state is None  # nothing was allocated
    # pure SSM: the engine's max_seqlen is the limit
    with pytest.raises(ValueError, match="max_seqlen"):
        Engine(tiny_llamba(), max_seqlen=16).generate([list(range(3, 30))])
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).generate(["text"])
    with pytest.raises(ValueError, match="prefill_tokens"):
        Engine(model, prefill_tokens=0)


def test_prefill_calls_shrink_with_model_width():
    from types import SimpleNamespace

    from harness_ext.generation.engine import default_prefill_tokens

    def width(hidden):
        return SimpleNamespace(config=SimpleNamespace(hidden_size=hidden))

    # 65,536 tokens at SmolLM2-135M's 576 (and below), fewer for Llama-3.2-1B / 3B, never under 4,096
    assert default_prefill_tokens(width(576)) == default_prefill_tokens(width(64)) == 65536
    assert default_prefill_tokens(width(2048)) == 18432 and default_prefill_tokens(width(3072)) == 12288
    assert default_prefill_tokens(width(1 << 16)) == 4096
    assert Engine(tiny_mil()).prefill_tokens == 65536 and Engine(tiny_mil(), prefill_tokens=10).prefill_tokens == 10


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, teacher_dir):
    """A tiny random Llama teacher and a Llamba student, each with the real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("engine_ckpts")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(root / "teacher")
    tiny_llamba().save_pretrained(root / "llamba")
    for name in ("teacher", "llamba"):
        for f in TOKENIZER_FILES:
            if (teacher_dir / f).exists():
                shutil.copy(teacher_dir / f, root / name / f)
    return root


def test_from_pretrained_and_generate_cli(tiny_checkpoints, capsys):
    from harness_ext.cli import main

    engine = Engine.from_pretrained(tiny_checkpoints / "teacher", max_batch_size=4)
    assert engine.tokenizer is not None and 2 in engine.eos_token_ids
    outs = engine.generate(["Hello"], GREEDY8)
    assert outs[0][0].num_tokens == 8
    assert main(["generate", "--model", str(tiny_checkpoints / "llamba"), "--prompt", "Hi", "--chat", "--n", "2",
                 "--max-new-tokens", "4", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [(r["prompt"], r["sample"]) for r in lines] == [(0, 0), (0, 1)]


def test_floor_bytes_per_slot_count_ssm_state_twice_conv_ring_once():
    """A decode step reads and writes back the SSM state; the ring-ordered conv state has d_conv - 1 taps read
    and one written (once in all); an attention layer's K/V is read up to the context."""
    from harness_ext.generation.bench import _slot_bytes
    from test_models import tiny_mil
    model = tiny_mil()
    state = model.allocate_decode_state(1, 20, device="cpu")
    expected = 0
    for layer in state.layers:
        if "ssm_state" in layer:
            expected += 2 * layer["ssm_state"].nbytes + layer["conv_state"].numel() * layer["conv_state"].element_size()
        else:
            expected += (layer["k_cache"].nbytes + layer["v_cache"].nbytes) // 20 * 12
    assert any("k_cache" in layer for layer in state.layers) and any("ssm_state" in layer for layer in state.layers)
    assert _slot_bytes(model, 12) == expected


def test_bench_smoke_writes_json_markdown_png(tiny_checkpoints, tmp_path, monkeypatch):
    from harness_ext.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--device", "cpu", "--teacher", str(tiny_checkpoints / "teacher"), "--batches", "1,2",
                 "--prompt-len", "8", "--gen-len", "4", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["device"] and report["date"] and report["copy_bandwidth_GBps"] > 0 and report["complete"] is True
    rows = [(r["row"], r["batch"]) for r in report["results"]]
    assert rows == [(row, b) for row in ("hf-generate", "teacher", "mil50", "llamba") for b in (1, 2)]
    for r in report["results"]:
        assert r["status"] == "ok" and r["tokens_per_s"] > 0 and r["generated_tokens"] == 4 * r["batch"]
        assert r["floor_ms"] > 0 and r["ms_per_step"] > 0
    table = (out / "bench.md").read_text()
    assert report["device"] in table and "| llamba | 2 |" in table
    assert (out / "bench.png").stat().st_size > 1000

    # the students with bfloat16 SSM state: the same run, half the state bytes in the floor
    state_out = tmp_path / "bench-state"
    assert main(["bench", "--device", "cpu", "--teacher", str(tiny_checkpoints / "teacher"), "--batches", "2",
                 "--prompt-len", "8", "--gen-len", "4", "--rows", "llamba,llamba-bf16-state", "--out",
                 str(state_out)]) == 0
    fp32_row, bf16_row = json.loads((state_out / "bench.json").read_text())["results"]
    assert (fp32_row["row"], bf16_row["row"]) == ("llamba", "llamba-bf16-state")
    assert bf16_row["status"] == "ok" and bf16_row["generated_tokens"] == 8
    assert bf16_row["floor_ms"] < fp32_row["floor_ms"]
    with pytest.raises(SystemExit, match="teacher-bf16-state"):
        main(["bench", "--device", "cpu", "--rows", "teacher-bf16-state", "--out", str(state_out)])

    # a run stopped part-way (a time limit, a kill) keeps every point it measured, marked partial
    import harness_ext.generation.bench as bench_module

    real_time_engine = bench_module._time_engine

    def stop_at_llamba(model, *args):
        if not hasattr(model, "attention_layers") or not model.attention_layers:
            raise KeyboardInterrupt
        return real_time_engine(model, *args)

    cut_out = tmp_path / "bench-cut"
    shutil.copytree(out, cut_out)  # a finished run's files in the folder: the partial run replaces them all
    monkeypatch.setattr(bench_module, "_time_engine", stop_at_llamba)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "--device", "cpu", "--teacher", str(tiny_checkpoints / "teacher"), "--batches", "1,2",
              "--prompt-len", "8", "--gen-len", "4", "--rows", "teacher,llamba", "--out", str(cut_out)])
    partial = json.loads((cut_out / "bench.json").read_text())
    assert partial["complete"] is False
    assert [(r["row"], r["batch"], r["status"]) for r in partial["results"]] == [("teacher", 1, "ok"), ("teacher", 2, "ok")]
    assert "Partial" in (cut_out / "bench.md").read_text() and not list(cut_out.glob("*.tmp"))
    assert not (cut_out / "bench.png").exists()
    monkeypatch.undo()

    assert main(["bench", "--gsm8k-sampling", "--model", str(tiny_checkpoints / "llamba"), "--device", "cpu",
                 "--limit", "2", "--n", "2", "--max-new-tokens", "4", "--out", str(out)]) == 0
    gsm = json.loads((out / "gsm8k_sampling.json").read_text())
    assert gsm["problems"] == 2 and gsm["n"] == 2 and 0 < gsm["generated_tokens"] <= 16 and gsm["total_s"] > 0


INTERPRETER_SCRIPT = r"""
import os, sys, time, torch
sys.path.insert(0, sys.argv[1])
from harness_ext.models.llamba import LlambaConfig, LlambaForCausalLM
from harness_ext.generation import sampling as S
from harness_ext.generation.engine import Engine, SamplingParams
from harness_ext.models import decode_kernels as dk

assert dk.interpreting() and S._fused_enabled(torch.zeros(1))
torch.manual_seed(0)
# fused Gumbel-max vs its PyTorch twin and the Python-int reference, token for token: one tile and a masked
# tail, several tiles per split, several splits (merge kernel), float and tensor temperature, top-k/top-p
logits = torch.randn(12, 300) * 2
keys, steps = torch.arange(12) * 7919 + 11, torch.arange(12) % 5
ref = S.sample_next_ref(logits, keys, steps, 0.8)
topk_ref = S.sample_next_ref(logits, keys, steps, 0.8, top_k=7, top_p=0.9)
thr = S.filter_threshold(logits, 0.8, top_k=7, top_p=0.9)
for splits, block, temp in ((1, 512, 0.8), (3, 64, torch.tensor(0.8)), (None, 128, 0.8)):
    got = S.gumbel_argmax(logits, keys, steps, temp, num_splits=splits, block=block)
    assert torch.equal(got, ref), (splits, block, got, ref)
    assert torch.equal(S.gumbel_argmax(logits, keys, steps, 0.8, thr, num_splits=splits, block=block), topk_ref)
    # greedy: exact, first index on ties (bf16-like coarse logits tie often)
    coarse = (logits * 2).round() / 2
    assert torch.equal(S.gumbel_argmax(coarse, None, None, None, num_splits=splits, block=block), coarse.argmax(-1))
assert torch.equal(S.sample_next(logits, keys, steps, 0.8), ref)

# conv + SSM in one kernel vs the reference: Llamba-like (B/C groups of 3 heads, discrete, z gate), MambaInLlama-
# like (x/B at KV width), and a layout that falls back to two kernels; strided column views like in_proj's
b, h, hd, n, K = 3, 6, 6, 5, 4
for xh, bg, cg, disc in ((6, 2, 2, True), (2, 2, 6, False), (3, 2, 6, False)):
    conv_dim = xh * hd + (bg + cg) * n
    wide = torch.randn(b, conv_dim + 50)
    xBC, dt = wide[:, 7:7 + conv_dim], wide[:, :h]
    cs, st = torch.randn(b, conv_dim, K), torch.randn(b, h, hd, n)
    w, bias, A = torch.randn(conv_dim, K), torch.randn(conv_dim), torch.randn(h)
    kw = dict(D=torch.randn(h), z=torch.randn(b, h * hd) if disc else None, dt_bias=None if disc else torch.randn(h),
              z_bias=torch.randn(h * hd) if disc else None, discrete=disc)
    for positions in (None, torch.tensor([0, 5, 6], dtype=torch.int32)):       # linear order; ring at 3 offsets
        c1, c2, s1, s2 = cs.clone(), cs.clone(), st.clone(), st.clone()
        y1 = dk.conv_ssm_step(c1, xBC, w, bias, True, s1, xh, bg, dt, A, positions=positions, **kw)
        y2 = dk.conv_ssm_step_ref(c2, xBC, w, bias, True, s2, xh, bg, dt, A, positions=positions, **kw)
        assert (y1 - y2).abs().max() < 1e-4 and (s1 - s2).abs().max() < 1e-4 and torch.equal(c1, c2), (xh, bg, cg)

# the engine end to end on the fused decode step: fused sampler == PyTorch sampler, token for token
def prefill_on_ref_kernels(prefill):
    # the SSD scan's Triton path needs CUDA; prefill is not what this checks
    def run(*args):
        os.environ["THINKFAST_KERNELS"] = "ref"
        try:
            return prefill(*args)
        finally:
            os.environ["THINKFAST_KERNELS"] = "triton"
    return run

# (a small vocabulary: the interpreter runs numpy per tile)
model = LlambaForCausalLM(LlambaConfig(vocab_size=600, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       n_qk_heads=2, n_v_heads=2, d_state=16, d_inner=32)).eval()
model.prefill = prefill_on_ref_kernels(model.prefill)
prompts = [[5, 17, 300, 2], [9, 8, 7]]
runs = {}
for sampler in ("fused", "torch"):
    os.environ["THINKFAST_SAMPLER"] = sampler
    params = SamplingParams(max_new_tokens=4, temperature=0.9, ignore_eos=True)
    runs[sampler] = Engine(model, max_batch_size=4, sync_every=2).generate(prompts, params, n=2, seed=3)
    greedy = SamplingParams(max_new_tokens=3, temperature=0, ignore_eos=True)
    runs[sampler + "_greedy"] = Engine(model, max_batch_size=2).generate(prompts, greedy)
assert runs["fused"] == runs["torch"] and runs["fused_greedy"] == runs["torch_greedy"]
assert len({tuple(c.token_ids) for o in runs["fused"] for c in o}) > 1
print("fused sampling OK")
"""


def test_fused_sampler_and_conv_ssm_under_triton_interpreter():
    """The Triton sampler and the fused conv + SSM step (what runs on CUDA) against their PyTorch twins, run on
    CPU by Triton's interpreter; then whole engine runs with the fused sampler equal the PyTorch sampler's."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    # both fused paths are opt-in until checked on a GPU: switch them on here
    env = dict(os.environ, TRITON_INTERPRET="1", THINKFAST_KERNELS="triton", THINKFAST_SAMPLER="fused",
               THINKFAST_DECODE_CONV="fused", PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(Path(__file__).parent)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "fused sampling OK" in proc.stdout


def test_decode_step_native_logits_equal_float_logits(llamba):
    """float_logits=False (what the engine asks for) returns lm_head's dtype, same values; the engine uses it."""
    prompts = [torch.tensor(p) for p in random_prompts([4, 7])]
    states = [llamba.allocate_decode_state(2, 32) for _ in range(2)]
    for state in states:
        llamba.prefill(prompts, state, torch.arange(2))
    tokens = torch.tensor([5, 6])
    a = llamba.decode_step(tokens, states[0])
    b = llamba.decode_step(tokens, states[1], float_logits=False)
    assert a.dtype == torch.float32 and b.dtype == llamba.lm_head.weight.dtype and torch.equal(a, b.float())
    assert Engine(llamba)._decode_kwargs == {"float_logits": False}


@pytest.mark.parametrize("make", [tiny_llamba, tiny_mil], ids=["llamba", "mambainllama"])
def test_bf16_ssm_state_is_allocated_and_tracks_the_fp32_state(make, tmp_path):
    """`ssm_state_dtype=bfloat16` (load_model / lm-eval model_args / bench rows): the engine's state is bf16, and
    the decode logits stay close to the float32 state's (the state is rounded once per step, not accumulated)."""
    from harness_ext.models import load_model, set_ssm_state_dtype

    make().save_pretrained(tmp_path / "ckpt")
    fp32 = load_model(tmp_path / "ckpt")
    bf16 = load_model(tmp_path / "ckpt", ssm_state_dtype="bfloat16")
    assert bf16.config.ssm_state_dtype == "bfloat16" and fp32.config.ssm_state_dtype == "float32"
    states = [layer["ssm_state"] for layer in bf16.allocate_decode_state(2, 32, device="cpu").layers if "ssm_state" in layer]
    assert states and all(s.dtype == torch.bfloat16 for s in states)
    prompt = torch.tensor(random_prompts([12])[0])[None]

    def decode_logits(model, steps=16):
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=0)
        return torch.cat(out.logits)
    a, b = decode_logits(fp32), decode_logits(bf16)
    assert not torch.equal(a, b)  # the state really was rounded
    assert (a - b).abs().max() <= 2e-2 * a.abs().max()
    with pytest.raises(ValueError, match="ssm_state_dtype"):
        set_ssm_state_dtype(fp32, "int8")
