"""A short demo: a reference pre-activation ResNet and its converted (fused)
twin from the same weights; prints their agreement, training-step speed and
autograd-saved memory.

    python -m fused_preact.demo [--depth 56] [--batch 16] [--size 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fused_preact
from fused_preact.memory import saved_tensor_bytes


def _train_step_seconds(model: torch.nn.Module, x: torch.Tensor, steps: int) -> float:
    times = []
    for _ in range(steps + 1):  # the first is warm-up
        start = time.perf_counter()
        model(x).sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=56, help="CIFAR bottleneck depth (9n+2)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=32, help="image height and width")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "triton", "torch"])
    args = parser.parse_args(argv)

    print("backends:")
    for name, info in fused_preact.backends().items():
        print(f"  {name:7s} {'yes' if info['available'] else 'no ':3s} {info['reason']}")
    torch.manual_seed(0)
    reference = fused_preact.preact_resnet_cifar(args.depth)
    fused = copy.deepcopy(reference)
    report = fused_preact.ConversionReport()
    fused_preact.convert(fused, backend=args.backend, report=report)
    print(f"ResNet-{args.depth} (CIFAR, bottleneck): {report}")
    x = torch.randn(args.batch, 3, args.size, args.size)

    out_ref, out_fused = reference(x), fused(x)
    out_ref.square().mean().backward()
    out_fused.square().mean().backward()
    grad_diff = sum((a.grad - b.grad).square().sum() for a, b in zip(reference.parameters(), fused.parameters()))
    grad_norm = sum(a.grad.square().sum() for a in reference.parameters())
    print(f"agreement: max |output diff| {(out_ref - out_fused).abs().max().item():.2e}, "
          f"relative gradient diff |g_fused - g_ref| / |g_ref| {(grad_diff / grad_norm).sqrt().item():.2e}")

    t_ref = _train_step_seconds(reference, x, args.steps)
    t_fused = _train_step_seconds(fused, x, args.steps)
    m_ref = saved_tensor_bytes(lambda: reference(x))
    m_fused = saved_tensor_bytes(lambda: fused(x))
    print(f"training step (median of {args.steps}, {torch.get_num_threads()} threads): reference "
          f"{t_ref * 1e3:.1f} ms, fused {t_fused * 1e3:.1f} ms, speed-up {t_ref / t_fused:.2f}x")
    print(f"autograd-saved memory: reference {m_ref / 2**20:.1f} MiB, fused {m_fused / 2**20:.1f} MiB "
          f"({100 * m_fused / m_ref:.0f}% of reference)")


if __name__ == "__main__":
    main()
