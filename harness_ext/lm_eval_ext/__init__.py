"""thinkfast inside lm-evaluation-harness: backends (`backend.py`) and their registration (`_hook.py`).

After `pip install thinkfast` the stock `lm_eval` command knows `--model llamba|mambainllama|thinkfast` and the
tasks in `harness_ext.tasks` (math500_bon, gsm8k500_bon) with no extra flags: `thinkfast_lm_eval.pth` runs
`_hook.py` at start-up (see its docstring). From Python, `register()` does the same explicitly:

    from harness_ext.lm_eval_ext import register
    register()
    lm_eval.simple_evaluate(model="thinkfast", model_args="pretrained=ckpt/teacher", tasks=["gsm8k500_bon"])
"""
from __future__ import annotations

import importlib.util
import os
import sys

_HOOK_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hook.py")


def _hook_module():
    module = sys.modules.get("_thinkfast_lm_eval_hook")
    if module is None:  # the .pth did not run (e.g. python -S, or not installed from a wheel / pip install -e)
        spec = importlib.util.spec_from_file_location("_thinkfast_lm_eval_hook", _HOOK_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["_thinkfast_lm_eval_hook"] = module
        spec.loader.exec_module(module)
    return module


def register() -> None:
    """Register the backends with lm-eval's model registry and our tasks with every TaskManager."""
    hook = _hook_module()
    hook.install()
    hook.register_models()
    hook.patch_task_manager()


def tasks_dir() -> str | None:
    """Directory of thinkfast's task YAMLs (for `--include_path` on setups without the start-up hook)."""
    return _hook_module().tasks_dir()
