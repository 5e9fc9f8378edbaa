"""Lazy package exports (PEP 562): a package's public names are imported on first use, so that
``mira --help`` and the CLI's start-up do not import torch."""
from __future__ import annotations

import importlib
import sys
from typing import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """Return a module ``__getattr__`` serving ``exports`` (name -> submodule of ``package``)."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{exports[name]}")
        namespace = sys.modules[package].__dict__
        for export, where in exports.items():  # also replaces same-named submodule attributes
            if where == exports[name]:
                namespace[export] = getattr(module, export)
        return namespace[name]

    return __getattr__
