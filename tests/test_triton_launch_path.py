"""The Triton backend's launches through Triton's real CUDA launch path, on a
machine without a GPU (fused_preact/null_driver.py: a libcuda.so.1 whose
calls all succeed, kernels compiled for sm_90 and never run).

What this checks: ``triton_launch``'s fast launches (a cached CompiledKernel
called directly, every argument in parameter order) hand Triton's C launcher
exactly what ``JITFunction.run`` and the autotuner hand it -- same compiled
kernel, grid and arguments, launch by launch -- for units in training and
eval, with residual and emitted statistics, 1x1 stride 2, channel counts off
the 16-multiples, fp32 and bf16; and that the second step does use them (no
call into Triton's JIT). The C launcher parses every argument against the
kernel's signature, so a missing or extra argument fails here. Whether the
kernels compute the right thing is the other tests' job (interpreter, GPU).
"""

import json
import subprocess
import sys

import pytest

pytest.importorskip("triton")

CHILD = r'''
import json, sys
import torch
from fused_preact import null_driver
null_driver.install()

import triton
from triton.backends.nvidia.driver import CudaLauncher
from triton.runtime.jit import JITFunction
import fused_preact
from fused_preact import reference, triton_launch as L

calls, jit_runs = [], [0]

def describe(a):
    if isinstance(a, torch.Tensor):
        return ["tensor", str(a.dtype), list(a.shape), list(a.stride()), a.data_ptr() % 16]
    return repr(a)

launch = CudaLauncher.__call__
def recording_launch(self, gx, gy, gz, stream, function, kernel_meta, launch_meta, enter, exit_, *args):
    if not null_driver.BENCHMARKING:  # the autotuner's trials are not the step's launches
        calls.append([id(self), [gx, gy, gz], [describe(a) for a in args]])
    return launch(self, gx, gy, gz, stream, function, kernel_meta, launch_meta, enter, exit_, *args)
CudaLauncher.__call__ = recording_launch

jit_run = JITFunction.run
def counting_run(self, *args, **kwargs):
    jit_runs[0] += 1
    return jit_run(self, *args, **kwargs)
JITFunction.run = counting_run

torch.manual_seed(0)
def unit_case(c_in, c_out, k, stride, dtype, training, size=9):
    m = fused_preact.FusedBNReLUConv2d(c_in, c_out, k, stride=stride, backend="triton").to(dtype).train(training)
    x = torch.randn(2, c_in, size, size, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    return m, x

def block_case(dtype):
    block = reference.PreActBottleneck(32, 8, stride=2).to(dtype)  # projection shortcut, residual, emitted statistics
    m = fused_preact.convert(block, backend="triton")
    x = torch.randn(2, 32, 8, 8, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    return m, x

cases = {
    "3x3 16->16 fp32 train": unit_case(16, 16, 3, 1, torch.float32, True),
    "3x3 20->24 bf16 train": unit_case(20, 24, 3, 1, torch.bfloat16, True),
    "1x1/2 32->16 bf16 train": unit_case(32, 16, 1, 2, torch.bfloat16, True),
    "3x3 16->16 fp32 eval": unit_case(16, 16, 3, 1, torch.float32, False),
    # 2048 output pixels: the weight gradient in 4 splits and a sum.
    "3x3 16->16 fp32 train, wgrad splits": unit_case(16, 16, 3, 1, torch.float32, True, size=32),
    "bottleneck/2 bf16 train": block_case(torch.bfloat16),
}

def step(m, x):
    calls.clear()
    jit_runs[0] = 0
    m(x).float().square().sum().backward()
    return list(calls), jit_runs[0]

report = {}
for name, (m, x) in cases.items():
    L.FAST_LAUNCH = False
    through_triton, _ = step(m, x)
    L.FAST_LAUNCH = True
    first, _ = step(m, x)
    second, second_jit_runs = step(m, x)
    report[name] = {"launches": len(through_triton), "first_equal": first == through_triton,
                    "second_equal": second == through_triton, "second_jit_runs": second_jit_runs,
                    "diff": next(([a, b] for a, b in zip(second, through_triton) if a != b), None)}
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def launch_report(tmp_path_factory):
    from fused_preact import null_driver

    if null_driver.compiler() is None:
        pytest.skip("no C compiler to build the null CUDA driver")
    env = null_driver.build(str(tmp_path_factory.mktemp("null_driver")))
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


CASES = ["3x3 16->16 fp32 train", "3x3 20->24 bf16 train", "1x1/2 32->16 bf16 train", "3x3 16->16 fp32 eval",
         "3x3 16->16 fp32 train, wgrad splits", "bottleneck/2 bf16 train"]


@pytest.mark.parametrize("case", CASES)
def test_fast_launches_hand_the_launcher_what_triton_does(launch_report, case):
    r = launch_report[case]
    assert r["launches"] >= 5, r  # the unit's kernels reached the launcher
    assert r["first_equal"], r["diff"]
    assert r["second_equal"], r["diff"]


@pytest.mark.parametrize("case", CASES)
def test_second_step_launches_without_the_jit(launch_report, case):
    assert launch_report[case]["second_jit_runs"] == 0
