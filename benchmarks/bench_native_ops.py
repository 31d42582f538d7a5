"""Side-by-side timing of the native ops against eager PyTorch (never asserts).

    python benchmarks/bench_native_ops.py [--device cpu|cuda] [--repeats 20] [--json out.json]

Providers, measured in the same run on the same inputs, in interleaved rounds;
the speed-up is the median of the per-round ratios eager/native:
  bn_relu   BN(training) + ReLU forward + backward: eager nn.BatchNorm2d + nn.ReLU
            vs the native ops (bn_stats, bn_relu, bn_relu_backward)
  unit      BN -> ReLU -> 3x3 conv training step: eager vs backend="native",
            plus autograd-saved bytes of each
for NCHW and channels_last. Prints a table of medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn

import fused_preact
from fused_preact.memory import saved_tensor_bytes

ops = torch.ops.fused_preact


def _time_once(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(fns: dict, repeats: int, device: str) -> dict:
    """Times the functions in interleaved rounds (A B A B ..., the order
    alternating between rounds) so that a slow spell of a shared machine hits
    every provider alike. Returns each one's median seconds and, for every
    provider after the first, the median of its per-round ratio first/it."""
    names = list(fns)
    for name in names:  # warm-up
        for _ in range(3):
            fns[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(_time_once(fns[name], device))
    base = names[0]
    out = {name: statistics.median(t) for name, t in times.items()}
    for name in names[1:]:
        out[f"{base}/{name}"] = statistics.median(b / t for b, t in zip(times[base], times[name]))
    return out


def bench(shape, fmt_name, device, repeats):
    fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
    N, C, H, W = shape
    x = torch.randn(shape, device=device).to(memory_format=fmt).requires_grad_()
    g = torch.randn(shape, device=device).to(memory_format=fmt)
    bn = nn.BatchNorm2d(C).to(device)
    gamma, beta = bn.weight, bn.bias

    def eager_bn_relu():
        y = torch.relu(bn(x))
        torch.autograd.grad(y, (x, gamma, beta), g)

    def native_bn_relu():
        mean, var = ops.bn_stats(x.detach())
        ops.update_running_stats(bn.running_mean, bn.running_var, mean, var, 0.1, N * H * W)
        invstd = torch.rsqrt(var + 1e-5)
        scale, shift = fused_preact.native.scale_shift(mean, invstd, gamma.detach(), beta.detach())
        ops.bn_relu(x.detach(), scale, shift)
        ops.bn_relu_backward(g, x.detach(), mean, invstd, gamma.detach(), beta.detach(), True)

    # One copy of x into an existing buffer: the memory-traffic yardstick
    # (a fresh tensor would also pay the page faults of a new allocation).
    buffer = torch.empty_like(x)
    copy_s = compare({"copy": lambda: buffer.copy_(x.detach())}, repeats, device)["copy"]
    rows = []
    t = compare({"eager": eager_bn_relu, "native": native_bn_relu}, repeats, device)
    rows.append(dict(case="bn_relu fwd+bwd", shape=shape, layout=fmt_name, eager_ms=t["eager"] * 1e3,
                     native_ms=t["native"] * 1e3, speedup=t["eager/native"], eager_over_copy=t["eager"] / copy_s))

    conv = nn.Conv2d(C, C, 3, padding=1, bias=False).to(device).to(memory_format=fmt)

    def eager_unit():
        conv(torch.relu(bn(x))).backward(g)

    def native_unit():
        fused_preact.bn_relu_conv2d(x, conv.weight, gamma, beta, bn.running_mean, bn.running_var, training=True,
                                    padding=1, backend="native").backward(g)

    t = compare({"eager": eager_unit, "native": native_unit}, repeats, device)
    saved_e = saved_tensor_bytes(lambda: conv(torch.relu(bn(x))))
    saved_n = saved_tensor_bytes(lambda: fused_preact.bn_relu_conv2d(
        x, conv.weight, gamma, beta, bn.running_mean, bn.running_var, training=True, padding=1, backend="native"))
    rows.append(dict(case="unit 3x3 train step", shape=shape, layout=fmt_name, eager_ms=t["eager"] * 1e3,
                     native_ms=t["native"] * 1e3, speedup=t["eager/native"], saved_ratio=saved_n / saved_e))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    shapes = [(32, 64, 32, 32), (32, 64, 64, 64)]
    rows = []
    for shape in shapes:
        for fmt in ("nchw", "channels_last"):
            rows += bench(shape, fmt, args.device, args.repeats)
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'case':22s} {'shape':18s} {'layout':14s} {'eager ms':>9s} {'native ms':>10s} {'speed-up':>9s}  extra")
    for r in rows:
        extra = (f"saved bytes {100 * r['saved_ratio']:.0f}% of eager" if "saved_ratio" in r
                 else f"eager = {r['eager_over_copy']:.0f} copies of x into a buffer")
        print(f"{r['case']:22s} {str(r['shape']):18s} {r['layout']:14s} {r['eager_ms']:9.2f} {r['native_ms']:10.2f} "
              f"{r['speedup']:8.2f}x  {extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
