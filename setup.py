"""Builds ``fused_preact._C``: the C++ CPU ops always, the CUDA ops whenever
CUDA code can be compiled (nvcc found and a CUDA build of torch), GPU or not.

Install (torch first, then without build isolation so the build sees it):

    pip install torch
    pip install --no-build-isolation -e .

Build variables (flash-attention / xformers style):

    FORCE_CUDA=1                  build the CUDA ops or fail (no silent CPU-only build)
    FUSED_PREACT_SKIP_CUDA=1      build the CPU ops only, even where CUDA is available
    TORCH_CUDA_ARCH_LIST="8.0;9.0"  GPU architectures (default "8.0;9.0")
    MAX_JOBS=N                    parallel compile jobs (ninja)
    NVCC_THREADS=N                nvcc --threads per job (default 2)
    FUSED_PREACT_DEBUG=1          -O0 -g, no fast math
    FUSED_PREACT_NO_NATIVE_ARCH=1 no AVX-512/AVX2 for the CPU code even where the building machine has them
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup


def _find_cuda_home() -> None:
    """Points CUDA_HOME at the real toolkit when it is unset.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when nvcc is a
    wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc calling
    /usr/local/cuda-13.0/bin/nvcc): the link then misses libcudart.
    """
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for home in candidates:
        if os.path.exists(os.path.join(home, "bin", "nvcc")) and os.path.exists(
                os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


_find_cuda_home()

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - what a newcomer sees without torch
    sys.exit(
        "fused_preact builds against the installed PyTorch: install torch first "
        "(`pip install torch`), then `pip install --no-build-isolation -e .`"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_decision() -> tuple[bool, str]:
    """Whether to compile the CUDA sources, and why (printed during the build)."""
    if _flag("FUSED_PREACT_SKIP_CUDA"):
        return False, "FUSED_PREACT_SKIP_CUDA is set"
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build (it lacks the CUDA headers)")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc was not found (set CUDA_HOME or put nvcc on the PATH)")
    if problems:
        if _flag("FORCE_CUDA"):
            sys.exit("FORCE_CUDA=1 but CUDA cannot be compiled: " + "; ".join(problems))
        return False, "; ".join(problems)
    return True, f"nvcc at {nvcc}, torch CUDA {torch.version.cuda}"


def _pip_cuda_include_dirs() -> list[str]:
    """CUDA headers shipped in pip wheels (nvidia/cu13/include, nvidia/*/include).

    A pip CUDA build of torch includes cuBLAS/cuSPARSE/cuDNN headers through
    ATen, and those live in site-packages, not in the toolkit that provides
    nvcc: without these folders the CUDA build fails on `cusparse.h`.
    """
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            dirs += sorted(glob.glob(os.path.join(site, pattern)))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _openmp() -> bool:
    """Whether torch parallelises with OpenMP (then our code must too)."""
    return "OpenMP" in torch.__config__.parallel_info() and not sys.platform.startswith("darwin")


# The CPU vector instructions the build targets, recorded for the package in
# fused_preact/_build_info.py: a build used on a CPU without them (a shared
# environment across machines) is refused at import with a message instead of
# dying on an illegal instruction.
_BUILD_INFO = os.path.join(ROOT, "fused_preact", "_build_info.py")


def _capability_flags() -> dict:
    """The CPU flags each vector capability needs: fused_preact/_extension.py's
    table (the one the import-time check uses), read without importing the
    package, which would need the extension built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_fused_preact_extension",
                                                  os.path.join(ROOT, "fused_preact", "_extension.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._CAPABILITY_FLAGS


def _write_build_info(cpu_capability: str) -> None:
    text = ('"""Written by setup.py at build time; not in git."""\n\n'
            f"CPU_CAPABILITY = {cpu_capability!r}  # vector instructions the C++ CPU kernels were compiled for\n")
    if not os.path.exists(_BUILD_INFO) or open(_BUILD_INFO).read() != text:
        with open(_BUILD_INFO, "w") as f:
            f.write(text)


def _cpu_flags() -> list[str]:
    flags = ["-O0", "-g"] if _flag("FUSED_PREACT_DEBUG") else ["-O3"]
    capability = "DEFAULT"
    flags.append("-Wno-unknown-pragmas")  # ATen's vec headers carry CUDA-style #pragma unroll
    # at::parallel_for is a header template that, in torch's OpenMP builds,
    # parallelises with `#pragma omp parallel`: without -fopenmp the pragma is
    # silently dropped and every "parallel" loop of ours runs on one thread
    # (measured: our ops took the same time with 1 and 2 threads, torch's own
    # ops 1.5-2x less with 2). Compile-only: the GOMP_* calls resolve against
    # the libgomp torch itself loads (through libtorch_cpu), so the process
    # keeps one OpenMP runtime and one thread pool.
    if _openmp():
        flags.append("-fopenmp")
    # No -std flag: torch.utils.cpp_extension picks the standard the installed
    # torch needs (C++17 up to 2.9, C++20 from 2.10).
    # ATen's Vectorized<T> picks its AVX-512 / AVX2 implementation only when
    # CPU_CAPABILITY_AVX512 / _AVX2 is defined; otherwise it falls back to
    # plain loops.
    # The package is built from source on the machine that runs it, so tune
    # for that machine unless asked not to.
    if sys.platform.startswith("linux") and not _flag("FUSED_PREACT_NO_NATIVE_ARCH"):
        try:
            cpuinfo = open("/proc/cpuinfo").read()
        except OSError:
            cpuinfo = ""
        has, needs = set(cpuinfo.split()), _capability_flags()
        if needs["AVX512"] <= has:
            # torch picks its AVX-512 kernels on such CPUs; so do we
            # (16 floats per vector instead of 8).
            # (-Wno-maybe-uninitialized: GCC 12 false positives inside avx512fintrin.h.)
            flags += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
                      "-Wno-maybe-uninitialized",
                      "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"]
            capability = "AVX512"
        elif needs["AVX2"] <= has:
            flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"]
            capability = "AVX2"
    _write_build_info(capability)
    return flags


def _extension():
    with_cuda, reason = _cuda_decision()
    print(f"fused_preact: CUDA ops {'ON' if with_cuda else 'OFF'} ({reason})", flush=True)
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = _cpu_flags()
    if not with_cuda:
        return CppExtension("fused_preact._C", sources, extra_compile_args={"cxx": cxx})
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = ["-O3" if not _flag("FUSED_PREACT_DEBUG") else "-O0", "-lineinfo",
            f"--threads={os.environ.get('NVCC_THREADS', '2')}"]
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return CUDAExtension(
        "fused_preact._C",
        sources,
        include_dirs=_pip_cuda_include_dirs(),
        define_macros=[("FUSED_PREACT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
    )


setup(
    packages=find_packages(include=["fused_preact", "fused_preact.*"]),
    package_data={"fused_preact": ["null_cuda.c"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
