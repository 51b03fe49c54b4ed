"""Batched generation for Llamba, MambaInLlama and the Llama teacher (`engine.py`), its benchmark (`bench.py`)
and the `thinkfast generate` command (`cli.py`)."""
from harness_ext.generation.engine import Completion, Engine, SamplingParams

__all__ = ["Completion", "Engine", "SamplingParams"]
