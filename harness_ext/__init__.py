"""thinkfast: sub-quadratic students of a Llama teacher, as lm-eval and vLLM backends.

Importing the package registers the `llamba` and `mambainllama` architectures with transformers' Auto classes.
"""
from .models import register as _register_models

_register_models()
