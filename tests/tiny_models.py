"""The tiny random models of the built-in families, now shipped with the adapter kit
(:mod:`tokenprune.testing.tiny`); the tests import them from here by their old names."""

from tokenprune.testing.tiny import *  # noqa: F403
from tokenprune.testing.tiny import _clip, _qwen_patch, _text  # noqa: F401
