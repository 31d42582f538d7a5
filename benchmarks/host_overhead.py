"""Host time of one fused unit's training step (BN -> ReLU -> 3x3 conv,
forward + backward) with the kernels themselves taken out, tiny tensors, one
CPU thread: what is left is Python, autograd and launching -- the part that
made every fused unit host-bound on the H200 (benchmarks/RESULTS.md). A CPU
measurement; it needs no GPU.

    python benchmarks/host_overhead.py [--repeats 300] [--no-null-driver]

Rows:
  torch, native                 eager PyTorch and the C++ ops on CPU tensors
                                (each small op runs a tiny CPU kernel where a
                                GPU would pay a launch)
  triton (kernels skipped)      the Triton backend with every launch a no-op
                                (Triton's interpreter, launches replaced)
  triton (null driver)          the Triton backend through Triton's real CUDA
                                launch path -- JIT binding and specialisation,
                                kernel and autotuner caches, the compiled C
                                launcher -- against fused_preact/null_cuda.c, a
                                libcuda.so.1 whose calls all succeed at once
                                (fused_preact/null_driver.py).
                                Kernels are compiled for sm_90 (first run ~30 s)
                                and never executed. What it leaves out is the
                                driver's own cuLaunchKernelEx (a few us per
                                launch on a real GPU machine).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
_NULL_DRIVER_CHILD = "--null-driver-child"

if _NULL_DRIVER_CHILD not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
import fused_preact  # noqa: E402


def step_us(backend: str, repeats: int) -> float:
    torch.manual_seed(0)
    unit = fused_preact.FusedBNReLUConv2d(16, 16, 3, backend=backend)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)

    def step():
        unit(x).backward(g)

    for _ in range(20):
        step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _skip_interpreted_launches():
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)


def _null_driver_run(repeats: int) -> float:
    """The Triton backend's step time in a child process on the null driver."""
    from fused_preact import null_driver

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), _NULL_DRIVER_CHILD, "--repeats",
                              str(repeats)], env=null_driver.build(tmp), check=True, capture_output=True, text=True)
        return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--no-null-driver", action="store_true", help="skip the null-driver row (no C compiler)")
    parser.add_argument(_NULL_DRIVER_CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.null_driver_child:
        from fused_preact import null_driver

        null_driver.install()
        print(step_us("triton", args.repeats))
        return
    results = {b: step_us(b, args.repeats) for b in ("torch", "native")}
    if not args.no_null_driver:
        results["triton (null driver)"] = _null_driver_run(args.repeats)
    _skip_interpreted_launches()
    results["triton (kernels skipped)"] = step_us("triton", args.repeats)
    for name, us in results.items():
        print(f"{name:26s} {us:8.1f} us per training step (median of {args.repeats})")


if __name__ == "__main__":
    main()
