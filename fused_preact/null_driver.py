"""Triton's CUDA launch path on a machine without a GPU.

``null_cuda.c`` is a libcuda.so.1 whose every call succeeds at once (it
answers for one H100). A process that loads it instead of the real driver
and calls :func:`install` launches the Triton backend's kernels on CPU
tensors through everything Triton does on the host -- ``JITFunction.run``,
argument binding and specialisation, the kernel and autotuner caches, the
compiled C launcher marshalling every argument -- up to ``cuLaunchKernelEx``,
which does nothing. Kernels are compiled for sm_90 (Triton's own ptxas) and
never executed, so outputs are garbage: this measures host time
(``benchmarks/host_overhead.py``) and checks what reaches the launcher
(``tests/test_triton_launch_path.py``), nothing else.

    env = null_driver.build(tmpdir)      # compiles the library, returns the child's environment
    subprocess.run([sys.executable, script], env=env)
    # in the child, first thing:
    null_driver.install()
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "null_cuda.c")
# True while the autotuner times a config through the null driver (tests tell
# those trial launches from a step's own).
BENCHMARKING = False


def compiler() -> Optional[str]:
    """The C compiler that builds the library (CC, cc or gcc), or None."""
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def build(directory: str) -> dict:
    """Compiles null_cuda.c into ``directory``/libcuda.so.1 and returns an
    environment for a child process that loads it (TRITON_INTERPRET unset).

    The child uses Triton's usual cache: what it compiles there is what a
    compile for an sm_90 GPU gives (the same compiler, target and keys), and
    the launcher modules Triton builds link libcuda.so.1 by name, found through
    LD_LIBRARY_PATH when loaded (no path to the null library is recorded in
    them). So a second run finds its kernels compiled (the launch-path tests'
    ~100 s of compiles on CI's CPU) and nothing there differs from a real
    machine's entries."""
    cc = compiler()
    if cc is None:
        raise RuntimeError("no C compiler (CC, cc or gcc) to build fused_preact/null_cuda.c")
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", os.path.join(directory, "libcuda.so.1"), _SOURCE],
                   check=True)
    env = dict(os.environ, TRITON_LIBCUDA_PATH=directory,
               LD_LIBRARY_PATH=os.pathsep.join(p for p in (directory, os.environ.get("LD_LIBRARY_PATH")) if p))
    env.pop("TRITON_INTERPRET", None)
    return env


def install() -> None:
    """Makes Triton's CUDA driver the active one in this process (loaded
    against the null library: run in an environment from :func:`build`) and
    lets the Triton backend take CPU tensors as if they were on device 0."""
    import triton
    from triton.backends.nvidia.driver import CudaDriver

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("null_driver.install() needs TRITON_INTERPRET unset (JIT kernels)")

    class NullDriver(CudaDriver):
        def __init__(self):
            super().__init__()  # builds Triton's launcher module against the null library
            # torch.cuda would look for a real device: answer for device 0, an H100.
            self.get_current_device = lambda: 0
            self.get_current_stream = lambda device=None: 0
            self.get_device_capability = lambda device=None: (9, 0)
            self.set_current_device = lambda device: None

        def get_benchmarker(self):
            # The autotuner's trial of a config: one launch through the null
            # library, with the autotuner's hooks around it (restore_value,
            # reset_to_zero); every config ties and the first is kept.
            def benchmark(fn, **kwargs):
                global BENCHMARKING
                BENCHMARKING = True
                try:
                    fn()
                finally:
                    BENCHMARKING = False
                return 1.0
            return benchmark

    triton.runtime.driver.set_active(NullDriver())
    from . import triton_launch

    triton_launch.check_device = lambda x: None  # CPU tensors stand in for CUDA ones
