"""Host time of one fused unit's training step with the kernels themselves
taken out: Triton launches become no-ops and the tensors are tiny, so what is
left is Python, autograd, custom-op dispatch and small ATen ops — the part
that made every fused unit host-bound on the H200 (benchmarks/RESULTS.md).
A CPU measurement; on a GPU each remaining small op also pays a launch.

    python benchmarks/host_overhead.py [--repeats 300]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import fused_preact  # noqa: E402


def _null_launches():
    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {b: step_us(b, args.repeats) for b in ("torch", "native")}
    _null_launches()
    results["triton (kernels skipped)"] = step_us("triton", args.repeats)
    for name, us in results.items():
        print(f"{name:26s} {us:8.1f} us per training step (median of {args.repeats})")


if __name__ == "__main__":
    main()
