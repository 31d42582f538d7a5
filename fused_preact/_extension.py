"""Loads the compiled extension ``fused_preact._C`` if it was built.

Importing it registers the ``torch.ops.fused_preact.*`` C++ ops. The package
imports without it; ``fused_preact.backends()`` says why it is missing.
"""

from __future__ import annotations

import importlib

import torch

_loaded: bool | None = None
_error: str = ""


def load() -> bool:
    """Imports ``_C`` once; True when its ops are registered."""
    global _loaded, _error
    if _loaded is None:
        try:
            importlib.import_module("fused_preact._C")
            _loaded = True
        except ImportError as exc:  # not built, or built against another torch
            _loaded = False
            _error = (
                f"the compiled extension fused_preact._C is not importable ({exc}); build it with "
                "`pip install --no-build-isolation -e .` against the installed torch"
            )
    return _loaded


def error() -> str:
    """Why ``load()`` failed ('' when it did not)."""
    load()
    return _error


def has_cuda_kernels() -> bool:
    """Whether ``_C`` was compiled with its CUDA kernels."""
    if not load():
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_preact::bn_stats", "CUDA")


def require() -> None:
    if not load():
        raise RuntimeError(_error)
