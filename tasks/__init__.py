"""lm-eval task YAMLs shipped with thinkfast (installed as `harness_ext.tasks`; see tasks/utils.py)."""
