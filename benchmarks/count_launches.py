"""Counts what one training step of a fused unit (BN -> ReLU -> 3x3 conv,
and -> 1x1 conv) and of a converted ResNet-164 bottleneck block dispatches:
ATen ops that run a kernel (views and metadata ops excluded) and Triton
kernel launches, per backend. A host-overhead proxy that needs no GPU
(Triton runs under TRITON_INTERPRET=1 on CPU tensors).

    TRITON_INTERPRET=1 python benchmarks/count_launches.py
"""

import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import host_overhead  # noqa: E402  (benchmarks/: the models both scripts time)

_NO_KERNEL = {"view", "_unsafe_view", "as_strided", "permute", "t", "transpose", "expand", "select", "slice",
              "unsqueeze", "squeeze", "detach", "alias", "empty", "empty_like", "new_empty", "empty_strided",
              "split", "unbind", "reshape", "_reshape_alias", "lift_fresh", "set_", "is_same_size", "contiguous", "clone_view",
              "to", "_to_copy_noop", "zero_", "fill_", "zeros_like_view", "resolve_conj", "resolve_neg",
              "result_type", "item", "_local_scalar_dense", "is_nonzero", "size", "stride", "numel", "dim"}


def _kernel_ops(prof) -> "collections.Counter[str]":
    """ATen ops that run a kernel of their own: leaves of the profiler's
    call tree (an op whose children include a computing op is a wrapper),
    minus views and allocations."""
    counts = collections.Counter()

    def computes(e):
        name = e.name.split("::")[-1]
        return e.name.startswith(("aten::", "fused_preact::")) and name not in _NO_KERNEL

    def inside_interpreter(e):
        while e is not None:
            if e.name == "triton_interpreted_kernel":
                return True
            e = e.cpu_parent
        return False

    for e in prof.events():
        if computes(e) and not any(computes(c) for c in e.cpu_children) and not inside_interpreter(e):
            counts[e.name.split("::")[-1]] += 1
    return counts


def count(backend: str, what: str = "3x3"):
    from fused_preact import triton_launch

    model, x = host_overhead.model(backend, what, size=6)
    model(x).sum().backward()  # warm-up (autotuning, lazy imports)
    before = triton_launch.LAUNCHES.copy()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y = model(x)
        y.backward(torch.ones_like(y))
    launches = triton_launch.LAUNCHES - before
    return _kernel_ops(prof), launches


if __name__ == "__main__":
    for backend in sys.argv[1:] or ["torch", "native", "triton"]:
        for what in ("3x3", "1x1", "block"):
            ops, launches = count(backend, what)
            print(f"{backend:7} {what:5} aten kernel ops {sum(ops.values()):3}  triton launches "
                  f"{sum(launches.values()):2}  total {sum(ops.values()) + sum(launches.values()):3}")
            print("        aten:", dict(ops.most_common()))
            if launches:
                print("        triton:", dict(launches))
