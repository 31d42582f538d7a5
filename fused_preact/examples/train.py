"""Train a small pre-activation ResNet on real data twice from the same
initialisation, reference blocks vs fused blocks, and compare the loss
curves, time and memory.

    python -m fused_preact.examples.train [--epochs 3] [--depth 20] [--size 16] [--backend auto] [--out DIR]

Data: scikit-learn's bundled 8x8 handwritten digits (1797 images, installed
with the package, nothing is downloaded), upsampled to --size and repeated
to 3 channels; 80% train, 20% test, a fixed shuffle. Needs scikit-learn
(``pip install scikit-learn``) and, for the plot, matplotlib.

The two runs see the same batches in the same order with the same SGD
settings. They are the same function up to floating-point summation order
(with --dtype float64 the per-step losses agree to ~1e-15), so their loss
curves must overlap: the epoch-mean losses may differ by at most
--tolerance (relative); the exit status is 1 when they do not.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
import torch.nn.functional as F

import fused_preact
from fused_preact.memory import saved_tensor_bytes


def load_digits(size: int, limit: int | None = None):
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        sys.exit("this example needs scikit-learn for its bundled digits data: pip install scikit-learn")
    data = sk_load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8 in [0, 1]
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=g)
    x, y = x[order], y[order]
    if limit:
        x, y = x[:limit], y[:limit]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = ((x - x.mean()) / x.std()).repeat(1, 3, 1, 1)
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def train(model, train_set, test_set, epochs: int, batch: int, lr: float, channels_last: bool, label: str):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    x_train, y_train = train_set
    losses, epoch_times = [], []
    g = torch.Generator().manual_seed(1)
    orders = [torch.randperm(len(x_train), generator=g) for _ in range(epochs)]
    for epoch in range(epochs):
        model.train()
        start = time.perf_counter()
        for i in range(0, len(x_train), batch):
            idx = orders[epoch][i:i + batch]
            if len(idx) < 2:  # BatchNorm needs more than one value per channel
                continue
            xb = x_train[idx].contiguous(memory_format=fmt)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), y_train[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
        epoch_times.append(time.perf_counter() - start)
        print(f"  {label:10} epoch {epoch + 1}: last loss {losses[-1]:.4f}, {epoch_times[-1]:.1f} s", flush=True)
    model.eval()
    with torch.no_grad():
        x_test, y_test = test_set
        accuracy = (model(x_test.contiguous(memory_format=fmt)).argmax(1) == y_test).float().mean().item()
    xb = x_train[:batch].contiguous(memory_format=fmt)
    model.train()
    saved = saved_tensor_bytes(lambda: model(xb))
    return {"losses": losses, "epoch_seconds": epoch_times, "test_accuracy": accuracy, "saved_bytes": saved}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--depth", type=int, default=20, help="CIFAR-style depth: 6n+2 (basic) or 9n+2 (bottleneck)")
    parser.add_argument("--block", default="basic", choices=["basic", "bottleneck"])
    parser.add_argument("--size", type=int, default=16, help="image side after upsampling the 8x8 digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "triton", "torch"])
    parser.add_argument("--limit", type=int, default=None, help="use only this many images (quick runs)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float64 separates formula differences from rounding (the curves then agree to ~1e-10)")
    parser.add_argument("--tolerance", type=float, default=0.15,
                        help="largest relative difference of the epoch-mean losses that counts as overlapping")
    parser.add_argument("--out", default="train_out", help="folder for the loss plot")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    train_set, test_set = load_digits(args.size, args.limit)
    train_set, test_set = (train_set[0].to(dtype), train_set[1]), (test_set[0].to(dtype), test_set[1])
    reference = fused_preact.preact_resnet_cifar(args.depth, num_classes=10, block=args.block).to(dtype)
    fused = copy.deepcopy(reference)
    report = fused_preact.ConversionReport()
    fused_preact.convert(fused, backend=args.backend, report=report)
    print(f"digits: {len(train_set[0])} train / {len(test_set[0])} test images at {args.size}x{args.size}; "
          f"ResNet-{args.depth} ({args.block}); {report}".splitlines()[0])
    results = {}
    for label, model in (("reference", reference), ("fused", fused)):
        results[label] = train(model, train_set, test_set, args.epochs, args.batch, args.lr, True, label)

    ref, fus = results["reference"], results["fused"]
    # Per-step losses drift apart in float32: SGD amplifies summation-order
    # differences (in float64 the two runs agree to ~1e-15). The curves are
    # compared epoch by epoch: the mean loss of each epoch, relative.
    steps = len(ref["losses"]) // args.epochs
    diff = max(abs(sum(ref["losses"][e * steps:(e + 1) * steps]) - sum(fus["losses"][e * steps:(e + 1) * steps]))
               / max(sum(ref["losses"][e * steps:(e + 1) * steps]), 1e-12) for e in range(args.epochs))
    step_diff = max(abs(a - b) for a, b in zip(ref["losses"], fus["losses"]))
    print(f"\n{'':10} {'final loss':>10} {'test acc':>9} {'s/epoch':>8} {'saved MiB':>10}")
    for label, r in results.items():
        print(f"{label:10} {r['losses'][-1]:10.4f} {r['test_accuracy']:9.3f} "
              f"{sum(r['epoch_seconds']) / len(r['epoch_seconds']):8.2f} {r['saved_bytes'] / 2**20:10.2f}")
    print(f"fused / reference: time {sum(fus['epoch_seconds']) / sum(ref['epoch_seconds']):.2f}x, "
          f"autograd-saved memory {fus['saved_bytes'] / ref['saved_bytes']:.0%}")
    overlap = diff <= args.tolerance
    print(f"epoch-mean losses differ by at most {diff:.1%} ({'within' if overlap else 'OUTSIDE'} the tolerance "
          f"{args.tolerance:.0%}); largest per-step difference {step_diff:.2e}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(args.out, exist_ok=True)
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(ref["losses"], label="reference blocks")
        ax.plot(fus["losses"], "--", label=f"fused blocks ({args.backend})")
        ax.set_xlabel("training step")
        ax.set_ylabel("cross-entropy loss")
        ax.set_title(f"ResNet-{args.depth} on upsampled digits: same initialisation, same batches")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(args.out, "loss_curves.png")
        fig.savefig(path, dpi=100)
        print(f"wrote {path}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    return 0 if overlap else 1


if __name__ == "__main__":
    sys.exit(main())
