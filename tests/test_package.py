"""Packaging: import without the extension, backends(), CUDA build in CI."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_preact


def test_backends_report_every_backend_with_a_reason():
    report = fused_preact.backends()
    assert set(report) == {"torch", "native", "triton"}
    for name, info in report.items():
        assert isinstance(info["available"], bool) and info["reason"], name


def test_package_imports_without_the_compiled_extension():
    code = textwrap.dedent("""
        import sys
        sys.modules["fused_preact._C"] = None  # what a missing build looks like to import
        import torch, fused_preact
        info = fused_preact.backends()["native"]
        assert not info["available"] and "pip install --no-build-isolation" in info["reason"], info
        model = fused_preact.convert(fused_preact.preact_resnet_cifar(11))  # auto falls back to torch
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        try:
            fused_preact.FusedBNReLUConv2d(3, 4, backend="native")(torch.randn(2, 3, 4, 4))
        except RuntimeError as exc:
            assert "not importable" in str(exc)
        else:
            raise AssertionError("native backend without the extension did not raise")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.skipif(os.environ.get("FUSED_PREACT_EXPECT_CUDA") != "1",
                    reason="set FUSED_PREACT_EXPECT_CUDA=1 where the CUDA kernels must have been compiled (CI)")
def test_cuda_kernels_were_compiled():
    from fused_preact import _extension

    assert _extension.has_cuda_kernels()


def test_cpu_ops_were_compiled_with_openmp():
    # torch's OpenMP builds parallelise at::parallel_for with `#pragma omp`;
    # compiled without -fopenmp our CPU ops would silently run on one thread.
    from fused_preact import _extension

    if not _extension.load():
        pytest.skip(_extension.error())
    if "OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("this torch does not parallelise with OpenMP")
    import fused_preact._C as compiled

    assert compiled.openmp == 1


def test_a_build_for_another_cpu_is_refused_with_a_message():
    # A build tuned for AVX-512 imported on an AVX2-only CPU (a shared
    # environment across machines) must say so instead of dying on an
    # illegal instruction.
    from fused_preact import _extension

    message = _extension.capability_mismatch("AVX512", {"sse2", "avx", "avx2", "fma"})
    assert "AVX512" in message and "avx512f" in message and "FUSED_PREACT_NO_NATIVE_ARCH=1" in message
    assert _extension.capability_mismatch("AVX2", {"avx2", "fma", "avx512f"}) == ""
    assert _extension.capability_mismatch("AVX512", None) == ""  # flags unknown: not refused
    assert _extension.capability_mismatch("DEFAULT", set()) == ""
    # and the build here matches this CPU
    assert _extension.capability_mismatch(_extension._build_capability(), _extension._cpu_flags()) == ""
