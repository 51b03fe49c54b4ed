"""Build an untrained student from a Llama teacher, reusing the teacher's weights.

    thinkfast init --arch mambainllama --teacher ckpt/teacher --out ckpt/mil50 --attn-fraction 0.5
    thinkfast init --arch mambainllama --teacher ckpt/teacher --out ckpt/mil50 --attn-layers 0,2,4
    thinkfast init --arch llamba --teacher ckpt/teacher --out ckpt/llamba

Copied verbatim: embeddings, every norm, every MLP, lm_head, and (MambaInLlama) the attention layers kept.
Each Mamba layer comes from the same layer's attention: C <- W_q, B <- W_k, x <- W_v, out_proj <- W_o
(Llamba repeats the GQA K/V heads to the query heads, as GQA does at run time; MambaInLlama repeats them
inside the mixer). The other parts start where they do no harm:
  * conv1d = identity (last tap 1, bias 0): x, B, C reach the scan as the projections give them;
  * MambaInLlama: z rows keep the random init (the gated RMSNorm rescales), dt_bias/A_log Mamba-2's init, D = 1;
  * Llamba: z rows 0 with z_bias = silu^-1(1) (gate = 1), dt rows 0 (dt = ln 2), per-head decays
    exp(A * ln 2) spread evenly over [0.9, 0.999], D = 1.
Default kept attention layers for a fraction f of n layers: k = round(f * n) layers at floor(i * n / k),
i = 0..k-1, i.e. evenly spaced from layer 0 (f = 0.5 -> 0, 2, 4, ...). The tokenizer and generation config are copied.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch

from . import read_state_dict, register

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def default_attn_layers(num_layers: int, fraction: float) -> list[int]:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--attn-fraction must be in [0, 1], got {fraction}")
    count = int(math.floor(fraction * num_layers + 0.5))
    return [int(i * num_layers / count) for i in range(count)] if count else []


def _teacher(teacher_dir):
    from transformers import AutoConfig

    path = Path(teacher_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no teacher checkpoint at {teacher_dir!r} (expected config.json)")
    config = AutoConfig.from_pretrained(str(path))
    if config.model_type != "llama":
        raise ValueError(f"unknown teacher architecture model_type={config.model_type!r}: init needs a Llama teacher")
    state = read_state_dict(path)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    expected = {"q_proj": (config.num_attention_heads * head_dim, "num_attention_heads * head_dim"),
                "k_proj": (config.num_key_value_heads * head_dim, "num_key_value_heads * head_dim"),
                "v_proj": (config.num_key_value_heads * head_dim, "num_key_value_heads * head_dim")}
    for i in range(config.num_hidden_layers):
        for name, (rows, what) in expected.items():
            key = f"model.layers.{i}.self_attn.{name}.weight"
            if key not in state:
                raise ValueError(f"teacher checkpoint lacks {key}")
            if tuple(state[key].shape) != (rows, config.hidden_size):
                raise ValueError(f"teacher {key} has shape {tuple(state[key].shape)}, but the config gives "
                                 f"[{what} = {rows}, hidden_size = {config.hidden_size}]: head/width mismatch")
    return config, state, head_dim


def _repeat_heads(weight, n_heads, n_rep):
    """[n_heads * d, hidden] -> [n_heads * n_rep * d, hidden], each head repeated n_rep times in place (like GQA)."""
    return weight.view(n_heads, -1, weight.shape[-1]).repeat_interleave(n_rep, dim=0).reshape(-1, weight.shape[-1])


def _identity_conv(conv):
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0
        if conv.bias is not None:
            conv.bias.zero_()


def init_student(teacher_dir, arch: str, out_dir=None, attn_layers=None, attn_fraction=None, seed: int = 0):
    """Returns the student model (saved to `out_dir` with tokenizer and generation config when given)."""
    register()
    from .llamba import SILU_INVERSE_OF_ONE, LlambaConfig, LlambaForCausalLM
    from .mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

    if arch not in ("llamba", "mambainllama"):
        raise ValueError(f"unknown architecture {arch!r}; choose llamba or mambainllama")
    config, teacher, head_dim = _teacher(teacher_dir)
    n_layers, n_heads, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    torch.manual_seed(seed)
    fields = config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)

    if arch == "mambainllama":
        if attn_layers is None:
            attn_layers = default_attn_layers(n_layers, 0.5 if attn_fraction is None else attn_fraction)
        elif attn_fraction is not None:
            raise ValueError("give either attn_layers or attn_fraction, not both")
        bad = [i for i in attn_layers if not 0 <= int(i) < n_layers]
        if bad:
            raise ValueError(f"attention layer index {bad} out of range: the teacher has {n_layers} layers (0..{n_layers - 1})")
        if getattr(config, "attention_bias", False) and len(set(attn_layers)) < n_layers:
            raise ValueError("teacher has attention_bias=True; MambaInLlama's in_proj has no bias to take it")
        student_config = MambaInLlamaConfig(attn_layers=sorted(set(int(i) for i in attn_layers)), **fields)
        student = MambaInLlamaForCausalLM(student_config)
    else:
        if attn_layers or attn_fraction:
            raise ValueError("llamba has no attention layers: --attn-layers / --attn-fraction apply to mambainllama")
        student_config = LlambaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=n_layers, rms_norm_eps=config.rms_norm_eps, hidden_act=config.hidden_act,
            mlp_bias=getattr(config, "mlp_bias", False), tie_word_embeddings=config.tie_word_embeddings,
            n_qk_heads=n_heads, n_v_heads=n_heads, d_state=head_dim, d_inner=n_heads * head_dim,
            ssm_bias=getattr(config, "attention_bias", False), bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
            max_position_embeddings=config.max_position_embeddings)
        student = LlambaForCausalLM(student_config)

    own = student.state_dict()
    new_state = {}
    for key, value in teacher.items():
        if key in own:                  # embeddings, norms, MLPs, lm_head, kept attention layers
            new_state[key] = value
    rep = n_heads // n_kv
    for i in student.mamba_layers:
        attn = {name: teacher[f"model.layers.{i}.self_attn.{name}_proj.weight"] for name in "qkvo"}
        if arch == "mambainllama":
            mixer = student.model.layers[i].mamba
            w = own[f"model.layers.{i}.mamba.in_proj.weight"].clone()
            d_inner, d_xb = student_config.d_inner, student_config.d_xb
            w[d_inner:d_inner + d_xb] = attn["v"]
            w[d_inner + d_xb:d_inner + 2 * d_xb] = attn["k"]
            w[d_inner + 2 * d_xb:2 * d_inner + 2 * d_xb] = attn["q"]
            prefix = f"model.layers.{i}.mamba."
        else:
            mixer = student.model.layers[i].mixer
            d_inner, qk = student_config.d_inner, n_heads * head_dim
            w = torch.zeros_like(own[f"model.layers.{i}.mixer.in_proj.weight"])
            w[:d_inner] = _repeat_heads(attn["v"], n_kv, rep)
            w[d_inner:d_inner + qk] = _repeat_heads(attn["k"], n_kv, rep)
            w[d_inner + qk:d_inner + 2 * qk] = attn["q"]
            prefix = f"model.layers.{i}.mixer."
            if student_config.ssm_bias:
                b = torch.zeros(w.shape[0])
                b[:d_inner] = _repeat_heads(teacher[f"model.layers.{i}.self_attn.v_proj.bias"][:, None], n_kv, rep)[:, 0]
                b[d_inner:d_inner + qk] = _repeat_heads(teacher[f"model.layers.{i}.self_attn.k_proj.bias"][:, None], n_kv, rep)[:, 0]
                b[d_inner + qk:d_inner + 2 * qk] = teacher[f"model.layers.{i}.self_attn.q_proj.bias"]
                new_state[prefix + "in_proj.bias"] = b
                new_state[prefix + "out_proj.bias"] = teacher[f"model.layers.{i}.self_attn.o_proj.bias"]
            decay = torch.linspace(0.9, 0.999, n_heads)
            new_state[prefix + "A_log"] = torch.log(-torch.log(decay) / math.log(2.0))
            new_state[prefix + "z_bias"] = torch.full((d_inner,), SILU_INVERSE_OF_ONE)
        new_state[prefix + "in_proj.weight"] = w
        new_state[prefix + "out_proj.weight"] = attn["o"]
        _identity_conv(mixer.conv1d)
        new_state[prefix + "conv1d.weight"] = mixer.conv1d.weight.detach().clone()
        if mixer.conv1d.bias is not None:
            new_state[prefix + "conv1d.bias"] = mixer.conv1d.bias.detach().clone()
    for key, value in new_state.items():
        with torch.no_grad():
            own[key].copy_(value.to(own[key].dtype))
    if student_config.tie_word_embeddings:
        student.tie_weights()
    student.eval()

    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        student.save_pretrained(str(out))
        for f in Path(teacher_dir).iterdir():
            if f.is_file() and f.name not in ("config.json",) and not f.name.endswith(WEIGHT_SUFFIXES) \
                    and not f.name.endswith(".index.json"):
                shutil.copy2(f, out / f.name)
    return student


def add_arguments(parser) -> None:
    parser.add_argument("--arch", required=True, choices=["llamba", "mambainllama"])
    parser.add_argument("--teacher", required=True, help="HF Llama checkpoint directory (thinkfast teacher --out ...)")
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--attn-layers", default=None, help="comma-separated layer indices kept as attention (mambainllama)")
    group.add_argument("--attn-fraction", type=float, default=None,
                       help="fraction of layers kept as attention, evenly spaced from layer 0 (mambainllama; default 0.5)")
    parser.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    attn_layers = None
    if args.attn_layers is not None:
        try:
            attn_layers = [int(x) for x in args.attn_layers.split(",") if x.strip()]
        except ValueError:
            raise SystemExit(f"--attn-layers must be comma-separated integers, got {args.attn_layers!r}")
    student = init_student(args.teacher, args.arch, args.out, attn_layers=attn_layers,
                           attn_fraction=args.attn_fraction, seed=args.seed)
    kept = student.attention_layers
    print(f"{args.arch} student written to {args.out}: {len(student.model.layers)} layers, attention at {kept}")
    return 0
