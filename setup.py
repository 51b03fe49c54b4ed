"""Build step for the one file pyproject.toml cannot express: `thinkfast_lm_eval.pth` at the root of site-packages.

The .pth runs `harness_ext/lm_eval_ext/_hook.py` at Python start-up so the stock `lm_eval` command (0.4.13 has no
model entry points) finds thinkfast's backends and tasks. Everything else is configured in pyproject.toml.

    pip wheel --no-deps -w dist .      # the wheel holds thinkfast_lm_eval.pth at its root
    pip install -e .                   # the editable wheel holds it too
"""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = Path(__file__).resolve().parent / "harness_ext" / "lm_eval_ext" / "thinkfast_lm_eval.pth"


class build_py_with_pth(build_py):
    """Regular wheels: copy the .pth to the root of build_lib (= the root of the wheel = site-packages)."""

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(str(PTH), str(Path(self.build_lib, PTH.name)), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, str(Path(self.build_lib, PTH.name))]


class editable_wheel_with_pth(editable_wheel):
    """Editable installs (PEP 660): build_lib is not part of the editable wheel, so write the .pth straight into
    the unpacked wheel, beside setuptools' own `__editable__.*.pth` (which sorts first, so harness_ext is
    importable by the time ours runs)."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(str(PTH), str(Path(unpacked_wheel, PTH.name)), preserve_mode=False)
        return result


# tasks/ is the package harness_ext.tasks (pyproject's package-dir); packages.find cannot see it under that name
PACKAGES = [*find_packages(include=["harness_ext*", "distill*"]), "harness_ext.tasks"]

setup(packages=PACKAGES, cmdclass={"build_py": build_py_with_pth, "editable_wheel": editable_wheel_with_pth})
