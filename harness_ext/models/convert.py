"""Convert published Llamba / MambaInLlama checkpoints (already on disk) to thinkfast's layout.

    thinkfast convert --layout cartesia-llamba --src /path/to/Llamba-1B --out ckpt/llamba-1b
    thinkfast convert --layout mambainllama --src /path/to/Llama3.2-Mamba2-3B-distill --out ckpt/mil-3b

cartesia-llamba: Cartesia's `LlambaLMHeadModel` (github.com/cartesia-ai/edge, cartesia_pytorch/Llamba):
  config.json {d_model, n_layer, vocab_size, tie_embeddings, norm_epsilon, mlp_cfg{intermediate_size, bias, act_fn},
  ssm_cfg{d_state, n_v_heads, n_qk_heads, expand, chunk_size, activation, bias}}; tensors
  backbone.embedding.weight -> model.embed_tokens.weight, backbone.final_layernorm.weight -> model.norm.weight,
  backbone.layers.{i}.{input_layernorm, post_attention_layernorm, mlp, mixer}.* -> model.layers.{i}.* (same names;
  mixer in_proj rows x, B, C, z, dt as ours), A_log added as 0 (Cartesia's A = -1). Vocab size = the embedding rows
  (Cartesia pads to a multiple of 8). Cartesia hard-codes eps 1e-5 in the block norms; we use norm_epsilon everywhere.
mambainllama: the MambaInLlama release (github.com/jxiw/MambaInLlama, mamba2/): a Llama config.json plus
  mamba_config.json {d_model, d_inner, d_xb, attn_layers, ssm_cfg{d_state, ngroups, ...}, ...}; tensor names are
  already ours (model.layers.{i}.mamba.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}); its gated RMSNorm
  normalises per group of d_inner / ngroups channels, recorded as ssm_norm_group_size.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import load_state_dict_strict, read_state_dict, register

LAYOUTS = ("cartesia-llamba", "mambainllama")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
SKIP_FILES = {"config.json", "mamba_config.json"}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return json.loads(path.read_text())


def convert_cartesia_llamba(src):
    from .llamba import LlambaConfig, LlambaForCausalLM

    src = Path(src)
    cfg = _read_json(src / "config.json")
    for field in ("d_model", "n_layer", "ssm_cfg"):
        if field not in cfg:
            raise ValueError(f"{src / 'config.json'} lacks {field!r}: not Cartesia's Llamba layout")
    ssm, mlp = cfg["ssm_cfg"], cfg.get("mlp_cfg") or {}
    state = read_state_dict(src)
    if "backbone.embedding.weight" not in state:
        raise ValueError(f"{src} has no backbone.embedding.weight: not Cartesia's Llamba layout")
    vocab = state["backbone.embedding.weight"].shape[0]
    ssm_bias = bool(ssm.get("bias", False))
    config = LlambaConfig(
        vocab_size=vocab, hidden_size=cfg["d_model"], intermediate_size=mlp.get("intermediate_size", 14336),
        num_hidden_layers=cfg["n_layer"], rms_norm_eps=cfg.get("norm_epsilon", 1e-5),
        hidden_act=mlp.get("act_fn", "silu"), mlp_bias=bool(mlp.get("bias", False)),
        tie_word_embeddings=bool(cfg.get("tie_embeddings", False)), n_qk_heads=ssm.get("n_qk_heads", 32),
        n_v_heads=ssm.get("n_v_heads", 32), d_state=ssm.get("d_state", 64),
        d_inner=int(ssm.get("expand", 1) * cfg["d_model"]), d_conv=ssm.get("d_conv", 4),
        conv_bias=bool(ssm.get("conv_bias", True)), conv_activation=ssm.get("activation", "identity"),
        ssm_bias=ssm_bias, ssm_chunk_size=ssm.get("chunk_size", 128))
    out = {}
    for key, value in state.items():
        if key == "backbone.embedding.weight":
            out["model.embed_tokens.weight"] = value
        elif key == "backbone.final_layernorm.weight":
            out["model.norm.weight"] = value
        elif key.startswith("backbone.layers."):
            out["model.layers." + key[len("backbone.layers."):]] = value
        else:
            out[key] = value
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}.mixer."
        out.setdefault(prefix + "A_log", torch.zeros(config.n_v_heads))
        if ssm_bias:                      # Cartesia's z_bias is the constant 0 when the projections have biases
            out.setdefault(prefix + "z_bias", torch.zeros(config.d_inner))
    model = LlambaForCausalLM(config)
    load_state_dict_strict(model, out)
    return model


def convert_mambainllama(src):
    from transformers import AutoConfig

    from .mambainllama import MambaInLlamaConfig, MambaInLlamaForCausalLM

    src = Path(src)
    mamba_cfg = _read_json(src / "mamba_config.json")
    llama = AutoConfig.from_pretrained(str(src))
    if llama.model_type != "llama":
        raise ValueError(f"{src / 'config.json'}: model_type {llama.model_type!r}, expected the Llama config of a MambaInLlama release")
    ssm = mamba_cfg.get("ssm_cfg") or {}
    for flag, want in (("repeat_kv_before_conv", False), ("D_has_hdim", False), ("rmsnorm", True),
                       ("norm_before_gate", False)):
        if flag in ssm and bool(ssm[flag]) != want:
            raise ValueError(f"mamba_config.json ssm_cfg.{flag}={ssm[flag]} is not supported (thinkfast needs {want})")
    head_dim = getattr(llama, "head_dim", None) or llama.hidden_size // llama.num_attention_heads
    d_inner = mamba_cfg.get("d_inner") or llama.num_attention_heads * head_dim
    ngroups = ssm.get("ngroups", d_inner // ssm.get("d_state", head_dim))
    fields = llama.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    config = MambaInLlamaConfig(attn_layers=mamba_cfg.get("attn_layers", []), d_inner=d_inner,
                                d_xb=mamba_cfg.get("d_xb"), ssm_d_state=ssm.get("d_state"),
                                ssm_norm_group_size=d_inner // ngroups, ssm_chunk_size=ssm.get("chunk_size", 256),
                                d_conv=ssm.get("d_conv", 4), **fields)
    model = MambaInLlamaForCausalLM(config)
    load_state_dict_strict(model, read_state_dict(src))
    return model


def convert(layout: str, src, out_dir=None, dtype=None):
    register()
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if not Path(src).is_dir():
        raise FileNotFoundError(f"no checkpoint directory at {src!r}")
    model = convert_cartesia_llamba(src) if layout == "cartesia-llamba" else convert_mambainllama(src)
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out))
        for f in Path(src).iterdir():       # tokenizer, generation config, chat template
            if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith(WEIGHT_SUFFIXES) \
                    and not f.name.endswith(".index.json"):
                shutil.copy2(f, out / f.name)
    return model


def add_arguments(parser) -> None:
    parser.add_argument("--layout", required=True, choices=LAYOUTS)
    parser.add_argument("--src", required=True, help="checkpoint directory in the published layout")
    parser.add_argument("--out", required=True, help="output directory (thinkfast layout)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])


def run(args) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    model = convert(args.layout, args.src, args.out, dtype=dtype)
    print(f"converted {args.layout} checkpoint {args.src} -> {args.out} ({model.config.model_type}, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return 0
