"""Locating weight files that ship inside PyPI packages, without importing those packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(import_name: str, missing: str) -> Path:
    """The folder of the installed package ``import_name``, found without importing it (weight
    packages may import heavy or absent dependencies in their ``__init__``).

    Raises ``ModuleNotFoundError(missing)`` when it is not installed; ``missing`` says how to fix it.
    """
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(missing)
    return Path(list(spec.submodule_search_locations)[0])
