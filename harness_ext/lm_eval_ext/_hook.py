"""Start-up hook that makes thinkfast's backends and tasks visible to the stock `lm_eval` command.

lm-eval 0.4.13 discovers models only through its own registry (no entry points) and tasks only under its own
`lm_eval/tasks` plus `--include_path`. `thinkfast_lm_eval.pth` (installed at the root of site-packages) runs this
file at every Python start. It must stay cheap: it imports nothing beyond `sys`/`importlib` and only puts a
finder on `sys.meta_path`. When (and only when) a process imports

  * `lm_eval.api.registry` (what `lm_eval.api.registry.get_model` resolves `--model` against): the names
    `llamba`, `mambainllama`, `thinkfast` are added as lazy "module:Class" placeholders, so torch and the
    backend load only when one of them is asked for. `lm_eval.models` is imported first, because
    `get_model` only fills the registry with lm-eval's own models when it finds it empty;
  * `lm_eval.tasks.manager` (home of `TaskManager`): `TaskManager.__init__` gets thinkfast's task directory
    prepended to `include_path` (after lm-eval's defaults, before the user's own paths, so a user YAML of the
    same name still wins).

The file is executed by path (not imported as `harness_ext.lm_eval_ext._hook`) so that `harness_ext/__init__`,
which imports transformers, does not run at start-up. `harness_ext.lm_eval_ext.register()` does the same
registration explicitly for Python callers.
"""
import importlib.abc
import importlib.util
import os
import sys

MODELS = {
    "llamba": "harness_ext.lm_eval_ext.backend:LlambaLM",
    "mambainllama": "harness_ext.lm_eval_ext.backend:MambaInLlamaLM",
    "thinkfast": "harness_ext.lm_eval_ext.backend:ThinkfastLM",
}
TASK_MARKER = "math500_bon.yaml"


def register_models(registry_module=None) -> None:
    """Add our backends to lm-eval's model registry as lazy placeholders (idempotent)."""
    if registry_module is None:
        import lm_eval.api.registry as registry_module
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)

    model_registry = registry_module.model_registry
    for name, target in MODELS.items():
        if name not in model_registry:  # a later lm-eval may have loaded our entry points already
            model_registry.register(name, target=target)


def tasks_dir():
    """Directory holding thinkfast's task YAMLs (`harness_ext.tasks`), found without importing harness_ext."""
    package = importlib.util.find_spec("harness_ext")
    if package is None or not package.submodule_search_locations:
        return None
    locations = list(package.submodule_search_locations)
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None or isinstance(finder, _PostImportFinder):
            continue
        try:
            spec = find_spec("harness_ext.tasks", locations)
        except Exception:
            continue
        if spec is not None and spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                if os.path.isfile(os.path.join(location, TASK_MARKER)):
                    return location
    # editable install made before tasks/ had an __init__.py: tasks/ sits beside harness_ext/ in the checkout
    for location in locations:
        candidate = os.path.join(os.path.dirname(location), "tasks")
        if os.path.isfile(os.path.join(candidate, TASK_MARKER)):
            return candidate
    return None


def patch_task_manager(manager_module=None) -> None:
    """Make every TaskManager (with lm-eval's defaults on) also index thinkfast's tasks (idempotent)."""
    if manager_module is None:
        import lm_eval.tasks.manager as manager_module
    cls = manager_module.TaskManager
    if getattr(cls.__init__, "_thinkfast_patched", False):
        return
    original = cls.__init__
    import inspect

    signature = inspect.signature(original)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        ours = tasks_dir()
        if ours is not None and bound.arguments.get("include_defaults", True):
            paths = bound.arguments.get("include_path")
            paths = [] if paths is None else list(paths) if isinstance(paths, (list, tuple)) else [paths]
            if all(os.path.abspath(str(p)) != os.path.abspath(ours) for p in paths):
                bound.arguments["include_path"] = [ours, *paths]
        original(*bound.args, **bound.kwargs)

    __init__._thinkfast_patched = True
    __init__.__wrapped__ = original
    __init__.__doc__ = original.__doc__
    cls.__init__ = __init__


AFTER_IMPORT = {
    "lm_eval.api.registry": register_models,
    "lm_eval.tasks.manager": patch_task_manager,
}


class _RunAfterExec(importlib.abc.Loader):
    def __init__(self, loader, callback):
        self.loader, self.callback = loader, callback

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            self.callback(module)
        except Exception as exc:  # never break lm-eval itself
            print(f"thinkfast: could not register with lm-eval ({type(exc).__name__}: {exc})", file=sys.stderr)

    def __getattr__(self, name):  # get_code, get_source, is_package... for tools that inspect loaders
        return getattr(self.loader, name)


class _PostImportFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of the modules in AFTER_IMPORT to run a callback after them."""

    def find_spec(self, fullname, path=None, target=None):
        callback = AFTER_IMPORT.get(fullname)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RunAfterExec(spec.loader, callback)
                return spec
        return None


def install() -> None:
    if getattr(sys, "_thinkfast_lm_eval_hook", False):
        return
    sys._thinkfast_lm_eval_hook = True
    sys.meta_path.insert(0, _PostImportFinder())
    for name, callback in AFTER_IMPORT.items():  # imported before the hook (e.g. installed at runtime)
        if name in sys.modules:
            callback(sys.modules[name])


if os.environ.get("THINKFAST_NO_LM_EVAL_HOOK") != "1":
    try:
        install()
    except Exception as exc:  # a broken hook must never break Python start-up
        print(f"thinkfast: lm-eval hook disabled ({type(exc).__name__}: {exc})", file=sys.stderr)
