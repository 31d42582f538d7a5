"""Host time of one training step (forward + backward) of a fused unit (BN
-> ReLU -> 3x3 conv) and of a converted ResNet-164 bottleneck block, with
the kernels themselves taken out, tiny tensors, one CPU thread: what is
left is Python, autograd and launching -- the part that made every fused
unit host-bound on the H200 (benchmarks/RESULTS.md). A CPU measurement; it
needs no GPU.

    python benchmarks/host_overhead.py [--repeats 300] [--no-null-driver]
    python benchmarks/host_overhead.py --cuda [--cprofile FILE]    # on a GPU machine

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

With --cuda (a GPU machine): the same steps on CUDA tensors of the same tiny
size, real kernels (a few us each, so the GPU keeps up and the step's time is
the host's), rows torch, native (if built with CUDA) and triton; --cprofile
FILE adds cProfile's heaviest functions of the Triton unit and block steps.
On the H100/H200 the Triton units' wall time was 1.1-2.5x eager's while this
CPU measurement put their host time at about eager's: this says where the
difference goes on the real machine.
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

if _NULL_DRIVER_CHILD not in sys.argv and "--cuda" not in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(HERE))
import fused_preact  # noqa: E402


def model(backend: str, what: str, size: int = 4, device: str = "cpu"):
    """(module, channels_last input that requires grad) for ``what``: "3x3"
    or "1x1", one unit (BN -> ReLU -> conv, 16 -> 16 channels); "block", a
    CIFAR ResNet-164 bottleneck block (64 -> 16 -> 16 -> 64 channels,
    residual; converted unless backend is "torch"). Either keeps its input's
    shape. Also used by count_launches.py."""
    torch.manual_seed(0)
    if what == "block":
        module = fused_preact.reference.PreActBottleneck(64, 16)
        if backend != "torch":
            module = fused_preact.convert(module, backend=backend)
        channels = 64
    else:
        module, channels = fused_preact.FusedBNReLUConv2d(16, 16, int(what[0]), backend=backend), 16
    x = torch.randn(2, channels, size, size).contiguous(memory_format=torch.channels_last)
    return module.to(device), x.to(device).requires_grad_()


def step_us(backend: str, repeats: int, what: str = "3x3", device: str = "cpu", profiler=None) -> float:
    """Median host time of one training step (forward + backward) in us
    (``profiler``: a cProfile.Profile enabled around the timed steps)."""
    module, x = model(backend, what, device=device)
    g = torch.randn_like(x).detach()  # the output has the input's shape

    def step():
        module(x).backward(g)

    for _ in range(20):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    if profiler is not None:
        profiler.enable()
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    if profiler is not None:
        profiler.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def _cuda_main(repeats: int, cprofile_path) -> None:
    """The --cuda rows (see the module docstring)."""
    import cProfile
    import io
    import pstats

    backends = ["torch"] + (["native"] if fused_preact.backends()["native"]["available"] else []) + ["triton"]
    results = {b: [step_us(b, repeats, what, "cuda") for what in WHAT] for b in backends}
    print(f"host time per training step on {torch.cuda.get_device_name()}, us (median of {repeats}, tiny CUDA "
          "tensors); unit: BN -> ReLU -> 3x3 conv 16 -> 16; block: ResNet-164 bottleneck 64 -> 16 -> 16 -> 64")
    print(f"{'':26s} {'unit':>8s} {'block':>8s}")
    for name, (unit, block) in results.items():
        print(f"{name:26s} {unit:8.1f} {block:8.1f}")
    if cprofile_path:
        with open(cprofile_path, "w") as f:
            for what in WHAT:
                prof = cProfile.Profile()
                step_us("triton", repeats, what, "cuda", profiler=prof)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
                f.write(f"# triton {what}: {repeats} training steps, heaviest functions by own time\n")
                f.write(text.getvalue() + "\n")


WHAT = ("3x3", "block")


def _skip_interpreted_launches():
    from triton.runtime.interpreter import InterpretedFunction

    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)


def _null_driver_run(repeats: int) -> list[float]:
    """The Triton backend's step times (unit, block) in a child process on the null driver."""
    from fused_preact import null_driver

    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), _NULL_DRIVER_CHILD, "--repeats",
                              str(repeats)], env=null_driver.build(tmp), check=True, capture_output=True, text=True)
        return [float(v) for v in out.stdout.strip().splitlines()[-1].split()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--no-null-driver", action="store_true", help="skip the null-driver row (no C compiler)")
    parser.add_argument("--cuda", action="store_true", help="on a GPU machine: real kernels on tiny CUDA tensors")
    parser.add_argument("--cprofile", metavar="FILE", help="with --cuda: cProfile's heaviest functions of the "
                        "Triton steps, written here")
    parser.add_argument(_NULL_DRIVER_CHILD, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cuda:
        if not torch.cuda.is_available():
            sys.exit("--cuda needs a GPU (torch.cuda.is_available() is False)")
        _cuda_main(args.repeats, args.cprofile)
        return
    if args.null_driver_child:
        from fused_preact import null_driver

        null_driver.install()
        print(*(step_us("triton", args.repeats, what) for what in WHAT))
        return
    results = {b: [step_us(b, args.repeats, what) for what in WHAT] for b in ("torch", "native")}
    if not args.no_null_driver:
        results["triton (null driver)"] = _null_driver_run(args.repeats)
    _skip_interpreted_launches()
    results["triton (kernels skipped)"] = [step_us("triton", args.repeats, what) for what in WHAT]
    print(f"host time per training step, us (median of {args.repeats}); unit: BN -> ReLU -> 3x3 conv 16 -> 16; "
          "block: ResNet-164 bottleneck 64 -> 16 -> 16 -> 64")
    print(f"{'':26s} {'unit':>8s} {'block':>8s}")
    for name, (unit, block) in results.items():
        print(f"{name:26s} {unit:8.1f} {block:8.1f}")


if __name__ == "__main__":
    main()
