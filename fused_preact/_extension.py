"""Loads the compiled extension ``fused_preact._C`` if it was built.

Importing it registers the ``torch.ops.fused_preact.*`` C++ ops. The package
imports without it; ``fused_preact.backends()`` says why it is missing.
"""

from __future__ import annotations

import importlib

import torch

_loaded: bool | None = None
_error: str = ""


# CPU flags each build capability needs: setup.py picks the capability from
# this table and records it in _build_info.py; load() checks it here.
_CAPABILITY_FLAGS = {"AVX512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"}, "AVX2": {"avx2", "fma"}}


def _cpu_flags() -> set[str] | None:
    """This CPU's flags (Linux), or None where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def capability_mismatch(capability: str, cpu_flags: set[str] | None) -> str:
    """Why a build for ``capability`` cannot run on a CPU with ``cpu_flags``
    ('' when it can, or when the flags are unknown)."""
    needed = _CAPABILITY_FLAGS.get(capability, set())
    missing = needed - cpu_flags if cpu_flags is not None else set()
    if not missing:
        return ""
    return (f"the compiled extension fused_preact._C was built for {capability} CPUs, but this CPU lacks "
            f"{', '.join(sorted(missing))}; rebuild it on this machine (`pip install --no-build-isolation -e .`), "
            "or with FUSED_PREACT_NO_NATIVE_ARCH=1 for any x86-64 CPU")


def _build_capability() -> str:
    try:
        from ._build_info import CPU_CAPABILITY
    except ImportError:  # built before the record existed, or not by setup.py
        return "DEFAULT"
    return CPU_CAPABILITY


def load() -> bool:
    """Imports ``_C`` once; True when its ops are registered."""
    global _loaded, _error
    if _loaded is None:
        # Checked before importing _C, which would die on an illegal instruction.
        _error = capability_mismatch(_build_capability(), _cpu_flags())
        if _error:
            _loaded = False
            return _loaded
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
