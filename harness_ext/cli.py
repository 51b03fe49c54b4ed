"""The `thinkfast` command.

Each subcommand lives in its own module, imported only when that subcommand runs,
so `thinkfast teacher` does not pay for vLLM or lm-eval imports. A subcommand module
exposes `add_arguments(parser)` and `run(args) -> int | None`.

    thinkfast teacher --out ckpt/teacher
    thinkfast init --arch mambainllama --teacher ckpt/teacher --out ckpt/mil50
    thinkfast distill --recipe mambainllama --teacher ckpt/teacher --out ckpt/mil50-distilled
    thinkfast bench --out leaderboards/bench
    thinkfast prm train --out ckpt/prm
    thinkfast leaderboard --results runs/ --out leaderboards/
    thinkfast reproduce --smoke
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "teacher": ("harness_ext.teacher", "Convert the embedded SmolLM2 teacher (or any HF Llama) to a plain HF checkpoint"),
    "data": ("harness_ext.data", "Show or export the math datasets (math500, gsm8k500, gsm8k_train, math_train)"),
    "init": ("harness_ext.models.init_from_teacher", "Build an untrained Llamba / MambaInLlama student from a Llama teacher"),
    "convert": ("harness_ext.models.convert", "Convert a published Llamba / MambaInLlama checkpoint to thinkfast's layout"),
    "distill": ("distill.cli", "Distil a student from a teacher (MOHAWK for Llamba, reverse KL for MambaInLlama)"),
    "generate": ("harness_ext.generation.cli", "Sample completions with the generation engine"),
    "bench": ("harness_ext.generation.bench", "Throughput benchmark: teacher (HF generate and engine) vs students"),
    "prm": ("harness_ext.scoring.prm_cli", "Train or score with process reward models"),
    "leaderboard": ("harness_ext.leaderboard", "Build leaderboards/ tables and plots from lm-eval results and benchmark JSON"),
    "reproduce": ("harness_ext.reproduce", "Reproduce the paper at 135M scale, in resumable stages"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thinkfast", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        parser = build_parser()
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0
    name, rest = argv[0], argv[1:]
    module_name, help_text = SUBCOMMANDS[name]
    module = importlib.import_module(module_name)
    sub_parser = argparse.ArgumentParser(prog=f"thinkfast {name}", description=help_text)
    module.add_arguments(sub_parser)
    args = sub_parser.parse_args(rest)
    result = module.run(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
