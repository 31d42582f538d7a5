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
