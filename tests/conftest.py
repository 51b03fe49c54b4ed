"""Shared fixtures: the real teacher (converted once per machine into the thinkfast cache) and the local data."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCAL_DATA = REPO.parent / "shared" / "data"

# Hubs are unreachable here: fail fast instead of waiting on retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "THINKFAST_DATA_DIR" not in os.environ and LOCAL_DATA.is_dir():
    os.environ["THINKFAST_DATA_DIR"] = str(LOCAL_DATA)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ["THINKFAST_DATA_DIR"])
    assert path.is_dir(), f"THINKFAST_DATA_DIR={path} is not a directory"
    return path


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct teacher as a plain HF checkpoint (fp32)."""
    from harness_ext.teacher import convert_teacher

    return convert_teacher("smollm2-135m-instruct")
