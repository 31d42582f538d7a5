"""What fusion buys: throughput and memory of the fused pre-activation units
and models against eager PyTorch (NCHW and channels_last) and torch.compile.

    python -m fused_preact.bench                       # CPU, small, <= 3 min on 2 cores
    python -m fused_preact.bench --device cuda --suite units,cifar,imagenet --dtype bfloat16

Suites:
  units     every distinct pre-activation unit (BN -> ReLU -> conv [+ residual])
            of CIFAR ResNet-164 and ResNet-v2-50: forward and backward time,
            FLOPs, minimum bytes, the floor max(FLOPs/peak, bytes/bandwidth)
            with the device's copy bandwidth and matmul rate measured at start
  cifar     training step and inference of the paper's CIFAR ResNet-164
  imagenet  the same for ResNet-v2-50
Providers: eager (NCHW), eager_cl (channels_last), compile (torch.compile of
eager_cl), native, triton (fused, channels_last). Timing: CUDA events (GPU)
or perf_counter (CPU), warm-up first, median and interquartile range over
repeats, inputs rotated among several sets so small units do not run from
cache. Memory: autograd-saved bytes (counted with saved_tensors_hooks) and,
on GPU, the allocator's peak during a training step.

Writes OUT/results.json (raw numbers, device, versions, git commit),
OUT/report.md and PNG plots; prints a compact table. Never passes or fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from .memory import saved_tensor_bytes
from .modules import FusedBNReLUConv2d, convert
from .reference import preact_resnet_cifar, preact_resnet_imagenet

PROVIDERS = ("eager", "eager_cl", "compile", "native", "triton")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class UnitShape:
    model: str
    name: str
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int        # input height = width
    residual: bool   # the unit that closes a block adds the shortcut

    def out_size(self) -> int:
        return (self.size + 2 * (self.kernel // 2) - self.kernel) // self.stride + 1

    def flops(self, batch: int) -> int:
        """Multiply-adds x 2 of the forward conv; backward is twice this."""
        return 2 * batch * self.out_size() ** 2 * self.cout * self.cin * self.kernel ** 2

    def min_bytes(self, batch: int, elem: int) -> tuple[int, int]:
        """Fewest bytes a forward / backward must move: forward reads x (and
        the residual) and writes y; backward reads x and gy, writes gx."""
        x = batch * self.cin * self.size ** 2 * elem
        y = batch * self.cout * self.out_size() ** 2 * elem
        w = self.cout * self.cin * self.kernel ** 2 * elem
        return x + y + w + (y if self.residual else 0), 2 * x + y + 2 * w

    def floor_ms(self, batch: int, elem: int, ceilings: dict) -> tuple[float, float]:
        """(forward, backward) floor in ms: max(FLOPs / matmul rate, bytes /
        copy bandwidth) each, from ``device_ceilings``."""
        flops = self.flops(batch)
        fwd_b, bwd_b = self.min_bytes(batch, elem)
        return (max(flops / ceilings["bf16_flops_per_s"], fwd_b / ceilings["copy_bytes_per_s"]) * 1e3,
                max(2 * flops / ceilings["bf16_flops_per_s"], bwd_b / ceilings["copy_bytes_per_s"]) * 1e3)


def resnet164_units() -> list[UnitShape]:
    """Distinct units of the paper's CIFAR ResNet-164 (bottleneck, widths
    16/32/64, expansion 4; stride on the 3x3 as in fused_preact.reference)."""
    units = []
    for stage, (width, size) in enumerate(((16, 32), (32, 16), (64, 8))):
        cin = width * 4
        if stage > 0:  # first block of the stage: 1x1 at the previous resolution, then the strided 3x3
            units.append(UnitShape("resnet164", f"s{stage + 1}.first.3x3/2", width, width, 3, 2, size * 2, False))
        units += [UnitShape("resnet164", f"s{stage + 1}.1x1a", cin, width, 1, 1, size, False),
                  UnitShape("resnet164", f"s{stage + 1}.3x3", width, width, 3, 1, size, False),
                  UnitShape("resnet164", f"s{stage + 1}.1x1b+res", width, cin, 1, 1, size, True)]
    return units


def resnetv2_50_units() -> list[UnitShape]:
    units = []
    for stage, (width, size) in enumerate(((64, 56), (128, 28), (256, 14), (512, 7))):
        cin = width * 4
        if stage > 0:
            units.append(UnitShape("resnetv2_50", f"s{stage + 1}.first.3x3/2", width, width, 3, 2, size * 2, False))
        units += [UnitShape("resnetv2_50", f"s{stage + 1}.1x1a", cin, width, 1, 1, size, False),
                  UnitShape("resnetv2_50", f"s{stage + 1}.3x3", width, width, 3, 1, size, False),
                  UnitShape("resnetv2_50", f"s{stage + 1}.1x1b+res", width, cin, 1, 1, size, True)]
    return units


UNIT_SETS = {"resnet164": resnet164_units, "resnetv2_50": resnetv2_50_units}


def unit_named(model: str, name: str) -> UnitShape:
    """The unit ``name`` ("s1.3x3") of a UNIT_SETS model."""
    units = UNIT_SETS[model]()
    for unit in units:
        if unit.name == name:
            return unit
    raise ValueError(f"no unit {name!r} in {model}: {[u.name for u in units]}")


# ------------------------------------------------------------------ timing


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn: Callable[[int], object], device: str, warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls fn(i) after ``warmup`` calls;
    i rotates the input set. CUDA: events around each call."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    for i in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_bytes(fn: Callable[[], object]) -> int:
    """CUDA allocator peak during fn() above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def summary(times: list[float]) -> dict:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "q1_ms": q[0], "q3_ms": q[2], "n": len(times)}


def device_ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and bf16/fp32 matmul
    rate, measured once, for the floors."""
    if device != "cuda":
        return {}
    src = torch.empty(1 << 29, dtype=torch.uint8, device=device).random_()  # 512 MiB
    dst = torch.empty_like(src)
    copy_ms = statistics.median(time_ms(lambda i: dst.copy_(src), device, 3, 10))
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm_ms = statistics.median(time_ms(lambda i: a @ b, device, 3, 10))
    del src, dst, a, b
    return {"copy_bytes_per_s": 2 * (1 << 29) / (copy_ms * 1e-3), "bf16_flops_per_s": 2 * 8192 ** 3 / (mm_ms * 1e-3)}


# ------------------------------------------------------------------- units


class _EagerUnit(nn.Module):
    """The reference unit: BatchNorm2d -> ReLU -> Conv2d (+ residual)."""

    def __init__(self, shape: UnitShape):
        super().__init__()
        self.bn = nn.BatchNorm2d(shape.cin)
        self.conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, shape.stride, shape.kernel // 2, bias=False)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        y = self.conv(torch.relu(self.bn(x)))
        return y if residual is None else y + residual


def _unit_module(provider: str, shape: UnitShape, eager: _EagerUnit) -> nn.Module:
    if provider in ("eager", "eager_cl"):
        return eager
    if provider == "compile":
        return torch.compile(eager)
    fused = FusedBNReLUConv2d(shape.cin, shape.cout, shape.kernel, shape.stride, backend=provider)
    fused.bn, fused.conv = eager.bn, eager.conv  # the very same parameters
    return fused


def _autocast(device: str, dtype: torch.dtype):
    # cache_enabled=False: CUDA-graph capture requires it (PyTorch's CUDA
    # graphs notes), and the cache lives only inside one autocast region
    # anyway, so the eager timings do not change.
    return torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)


# Once a capture fails, the CUDA generator can stay in capture state
# (randn then raises "Offset increment outside graph capture"): no further
# captures in this process, so the host-timed numbers survive.
_GRAPH_FAILED: list[str] = []


def _randn(shape, device: str, dtype: torch.dtype, fmt: torch.memory_format) -> Tensor:
    """Random inputs drawn on the CPU: a failed CUDA-graph capture can leave
    the CUDA generator unusable (seen on the H200: every later randn raised
    "Offset increment outside graph capture"), the CPU one is untouched."""
    return torch.randn(shape, dtype=torch.float32).to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def _capture(fn: Callable[[], object], warmup: int = 3) -> "torch.cuda.CUDAGraph":
    """fn() as a CUDA graph: warm-up and capture on the same side stream, as
    PyTorch's whole-network capture recipe does (autograd's AccumulateGrad
    nodes remember the stream they first ran on)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # Capture failed on the H200 in PyTorch's default "global" mode, even for
    # eager PyTorch; in "thread_local" mode (calls of other threads that are
    # unsafe during a capture do not invalidate it) every capture succeeded,
    # eager's and the fused units', on an H100 and an H200 (benchmarks/
    # RESULTS.md, session 5). FUSED_PREACT_CAPTURE_MODE picks another.
    mode = os.environ.get("FUSED_PREACT_CAPTURE_MODE", "thread_local")
    with torch.cuda.graph(graph, stream=stream, capture_error_mode=mode):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


def _unit_closures(shape: UnitShape, provider: str, batch: int, device: str, dtype: torch.dtype, rotate: int):
    """(forward(i), step(i)) of a fresh unit on fresh inputs (set i % rotate)."""
    torch.manual_seed(0)
    fmt = torch.contiguous_format if provider == "eager" else torch.channels_last
    eager = _EagerUnit(shape).to(device).to(memory_format=fmt)
    module = _unit_module(provider, shape, eager)
    xs = [_randn((batch, shape.cin, shape.size, shape.size), device, dtype, fmt).requires_grad_()
          for _ in range(rotate)]
    o = shape.out_size()
    res = [_randn((batch, shape.cout, o, o), device, dtype, fmt) if shape.residual else None for _ in range(rotate)]
    gys = [_randn((batch, shape.cout, o, o), device, dtype, fmt) for _ in range(rotate)]

    def forward(i):
        with _autocast(device, dtype):
            return module(xs[i % rotate], res[i % rotate])

    def step(i):
        y = forward(i)
        y.backward(gys[i % rotate])
        xs[i % rotate].grad = None
        for p in eager.parameters():
            p.grad = None

    return forward, step


def bench_unit(shape: UnitShape, provider: str, batch: int, device: str, dtype: torch.dtype, warmup: int,
               repeats: int, rotate: int, cuda_graph: bool = False) -> dict:
    forward, step = _unit_closures(shape, provider, batch, device, dtype, rotate)
    fwd = time_ms(forward, device, warmup, repeats)
    train = time_ms(step, device, warmup, repeats)
    saved = saved_tensor_bytes(lambda: forward(0))
    out = {"forward": summary(fwd), "train_step": summary(train), "saved_bytes": saved}
    out["backward_ms"] = max(out["train_step"]["median_ms"] - out["forward"]["median_ms"], 0.0)
    if device == "cuda" and cuda_graph and _GRAPH_FAILED:
        out["graph_error"] = "skipped after an earlier capture failed: " + _GRAPH_FAILED[0]
    elif device == "cuda" and cuda_graph and provider != "compile":
        # Device time without the host: CUDA graphs of a fresh unit on fresh
        # inputs (autograd nodes that ran on the default stream above would
        # pull it into the capture and invalidate it), one per input set,
        # replayed in turn. The Triton autotuning is done (cached by shape).
        try:
            for label, which in (("forward_graph", 0), ("train_step_graph", 1)):
                fn = _unit_closures(shape, provider, batch, device, dtype, rotate)[which]
                graphs = [_capture(lambda i=i: fn(i)) for i in range(rotate)]
                out[label] = summary(time_ms(lambda i: graphs[i % rotate].replay(), device, warmup, repeats))
                del graphs
            out["backward_graph_ms"] = max(out["train_step_graph"]["median_ms"]
                                           - out["forward_graph"]["median_ms"], 0.0)
        except Exception as exc:  # noqa: BLE001  (reported beside the host-timed numbers)
            out["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
            _GRAPH_FAILED.append(out["graph_error"])
    if device == "cuda":
        out["peak_bytes"] = _peak_bytes(lambda: step(0))
    return out


# ------------------------------------------------------------------ models


def _build_model(suite: str, small: bool) -> tuple[nn.Module, tuple[int, ...], int]:
    if suite == "cifar":
        depth = 56 if small else 164
        return preact_resnet_cifar(depth, num_classes=10), (3, 32, 32), depth
    size = 64 if small else 224
    return preact_resnet_imagenet(50, num_classes=1000), (3, size, size), 50


def bench_model(suite: str, provider: str, batch: int, device: str, dtype: torch.dtype, warmup: int,
                repeats: int, small: bool, base_model: nn.Module, input_shape, cuda_graph: bool = False) -> dict:
    model = copy.deepcopy(base_model).to(device)
    fmt = torch.contiguous_format if provider == "eager" else torch.channels_last
    model = model.to(memory_format=fmt)
    if provider in ("native", "triton"):
        convert(model, backend=provider)
    run = torch.compile(model) if provider == "compile" else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    rotate = 2
    xs = [_randn((batch, *input_shape), device, torch.float32, fmt) for _ in range(rotate)]
    ys = [torch.randint(0, 10, (batch,)).to(device) for _ in range(rotate)]
    loss_fn = nn.CrossEntropyLoss()

    def train(i):
        opt.zero_grad(set_to_none=True)
        with _autocast(device, dtype):
            loss = loss_fn(run(xs[i % rotate]), ys[i % rotate])
        loss.backward()
        opt.step()

    def infer(i):
        with torch.no_grad(), _autocast(device, dtype):
            run(xs[i % rotate])

    model.train()
    t_train = time_ms(train, device, warmup, repeats)

    def forward_only():
        with _autocast(device, dtype):
            return run(xs[0])

    saved = saved_tensor_bytes(forward_only)
    out = {"train_step": summary(t_train), "saved_bytes": saved}
    if device == "cuda":
        out["peak_bytes"] = _peak_bytes(lambda: train(0))
    if device == "cuda" and cuda_graph and provider != "compile":
        # The whole training step (forward, loss, backward, SGD) as one CUDA
        # graph: device time without the host, on one fixed batch.
        if _GRAPH_FAILED:
            out["graph_error"] = "skipped after an earlier capture failed: " + _GRAPH_FAILED[0]
        else:
            try:
                # A fresh model and optimizer: autograd nodes that ran on the
                # default stream above would invalidate the capture.
                g_model = copy.deepcopy(base_model).to(device).to(memory_format=fmt)
                if provider in ("native", "triton"):
                    convert(g_model, backend=provider)
                g_opt = torch.optim.SGD(g_model.parameters(), lr=0.01, momentum=0.9)

                def g_train():
                    g_opt.zero_grad(set_to_none=True)
                    with _autocast(device, dtype):
                        loss = loss_fn(g_model(xs[0]), ys[0])
                    loss.backward()
                    g_opt.step()

                graph = _capture(g_train)
                out["train_step_graph"] = summary(time_ms(lambda i: graph.replay(), device, warmup, repeats))
                out["train_images_per_s_graph"] = batch / (out["train_step_graph"]["median_ms"] * 1e-3)
                del graph, g_model, g_opt
            except Exception as exc:  # noqa: BLE001  (reported beside the host-timed numbers)
                out["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
                _GRAPH_FAILED.append(out["graph_error"])
    model.eval()
    out["inference"] = summary(time_ms(infer, device, warmup, repeats))
    out["train_images_per_s"] = batch / (out["train_step"]["median_ms"] * 1e-3)
    out["inference_images_per_s"] = batch / (out["inference"]["median_ms"] * 1e-3)
    return out


# ------------------------------------------------------------------- report


def environment(device: str) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["device_name"] = platform.processor() or "cpu"
    env["git_commit"] = os.environ.get("FUSED_PREACT_COMMIT")  # where the tree travelled without .git
    if env["git_commit"]:
        return env
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                                           text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def write_report(results: dict, out_dir: str) -> str:
    lines = ["# fused_preact benchmark", "",
             f"{results['env']['device_name']}, torch {results['env']['torch']}, triton {results['env']['triton']}, "
             f"dtype {results['args']['dtype']}, {results['env']['date']}, commit {results['env']['git_commit']}",
             "", f"Command: `{results['command']}`", ""]
    ceil = results.get("ceilings") or {}
    if ceil:
        lines += [f"Measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write), "
                  f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.", ""]
    for suite in ("cifar", "imagenet"):
        rows = results.get("models", {}).get(suite)
        if not rows:
            continue
        eager = rows.get("eager", {})
        graph = any("train_images_per_s_graph" in r for r in rows.values())
        lines += [f"## {suite} model (batch {results['args']['batch_' + suite]})", "",
                  "| provider | train img/s | vs eager | inference img/s | vs eager | saved | "
                  + ("peak | " if results["args"]["device"] == "cuda" else "")
                  + ("train img/s, CUDA graph | vs eager |" if graph else ""),
                  "|---|---:|---:|---:|---:|---:|" + ("---:|" if results["args"]["device"] == "cuda" else "")
                  + ("---:|---:|" if graph else "")]
        for prov, r in rows.items():
            if "error" in r:
                lines.append(f"| {prov} | error: {r['error']} |")
                continue
            vs_t = r["train_images_per_s"] / eager["train_images_per_s"] if "train_images_per_s" in eager else math.nan
            vs_i = (r["inference_images_per_s"] / eager["inference_images_per_s"]
                    if "inference_images_per_s" in eager else math.nan)
            graph_cols = ""
            if graph:
                g, g_eager = r.get("train_images_per_s_graph"), eager.get("train_images_per_s_graph")
                graph_cols = (f" {g:.1f} | {g / g_eager:.2f}x |" if g and g_eager else
                              f" {g:.1f} | - |" if g else " - | - |")
            lines.append(f"| {prov} | {r['train_images_per_s']:.1f} | {vs_t:.2f}x | {r['inference_images_per_s']:.1f} "
                         f"| {vs_i:.2f}x | {_fmt_bytes(r['saved_bytes'])} | "
                         + (f"{_fmt_bytes(r['peak_bytes'])} |" if "peak_bytes" in r else "") + graph_cols)
        lines.append("")
    units = results.get("units")
    if units:
        provs = [p for p in results["args"]["providers"] if any(p in u["providers"] for u in units)]
        graph = any("train_step_graph" in r for u in units for r in u["providers"].values())
        key = "train_step_graph" if graph else "train_step"
        # Ratios against eager NCHW, and the fused providers also against eager
        # channels_last: the same layout, so the fusion's own effect (issue 4's
        # targets are stated for channels_last).
        fused_provs = [p for p in ("native", "triton") if p in provs] if "eager_cl" in provs else []
        ratio_heads = [f"eager/{p}" for p in provs if p != "eager"] + [f"eager_cl/{p}" for p in fused_provs]
        lines += ["## Units (training step = forward + backward; ms, median"
                  + (", CUDA-graph replay: device time without host overhead)" if graph else ")"), "",
                  "| unit | " + " | ".join(provs) + " | " + " | ".join(ratio_heads)
                  + " | floor fwd+bwd | saved (fused/eager) |",
                  "|---|" + "---:|" * (len(provs) + len(ratio_heads) + 2)]
        for u in units:
            t = {p: u["providers"][p][key]["median_ms"] for p in provs
                 if p in u["providers"] and key in u["providers"][p]}
            ratios = [f"{t['eager'] / t[p]:.2f}x" if "eager" in t and p in t else "-" for p in provs if p != "eager"]
            ratios += [f"{t['eager_cl'] / t[p]:.2f}x" if "eager_cl" in t and p in t else "-" for p in fused_provs]
            floor = u.get("floor_ms")
            fused = next((p for p in ("triton", "native") if p in t), None)
            saved = (f"{u['providers'][fused]['saved_bytes'] / u['providers']['eager']['saved_bytes']:.0%}"
                     if fused and "eager" in t else "-")
            floor_s = f"{floor:.3f}" if floor is not None else "-"
            lines.append(f"| {u['shape']['model']} {u['shape']['name']} {u['shape']['cin']}->{u['shape']['cout']} "
                         f"@{u['shape']['size']} | " + " | ".join(f"{t[p]:.3f}" if p in t else "-" for p in provs)
                         + " | " + " | ".join(ratios) + f" | {floor_s} | {saved} |")
        lines.append("")
        if graph:
            lines += ["### The same units timed from Python (host launch overhead included; ms, median)", "",
                      "| unit | " + " | ".join(provs) + " |", "|---|" + "---:|" * len(provs)]
            for u in units:
                lines.append(f"| {u['shape']['model']} {u['shape']['name']} | " + " | ".join(
                    f"{u['providers'][p]['train_step']['median_ms']:.3f}" if p in u["providers"] else "-"
                    for p in provs) + " |")
            lines.append("")
    if "peak_rss_bytes" in results:
        lines += [f"Process peak RSS (all providers together): {_fmt_bytes(results['peak_rss_bytes'])}; "
                  f"run time {results.get('seconds', 0):.0f} s.", ""]
    errors = results.get("errors", [])
    if errors:
        lines += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    return text


def write_plots(results: dict, out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    paths = []
    for suite, rows in results.get("models", {}).items():
        rows = {p: r for p, r in rows.items() if "error" not in r}
        if not rows:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = list(rows)
        axes[0].bar(names, [rows[p]["train_images_per_s"] for p in names], label="train")
        axes[0].bar(names, [rows[p]["inference_images_per_s"] for p in names], alpha=0.4, label="inference")
        axes[0].set_ylabel("images / s")
        axes[0].legend()
        axes[1].bar(names, [rows[p]["saved_bytes"] / 2**20 for p in names], label="autograd-saved")
        if all("peak_bytes" in rows[p] for p in names):
            axes[1].bar(names, [rows[p]["peak_bytes"] / 2**20 for p in names], alpha=0.4, label="peak allocated")
        axes[1].set_ylabel("MiB")
        axes[1].legend()
        fig.suptitle(f"{suite}: throughput and memory ({results['env']['device_name']})")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{suite}_throughput_memory.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    units = results.get("units")
    if units:
        provs = [p for p in results["args"]["providers"] if any(p in u["providers"] for u in units)]
        fig, ax = plt.subplots(figsize=(max(8, len(units) * 0.5), 4.5))
        xs = range(len(units))
        width = 0.8 / (len(provs) + 1)
        for k, p in enumerate(provs):
            ax.bar([x + k * width for x in xs],
                   [u["providers"].get(p, {}).get("train_step_graph", u["providers"].get(p, {}).get(
                       "train_step", {})).get("median_ms", 0) for u in units], width,
                   label=p)
        if all(u.get("floor_ms") is not None for u in units):
            ax.bar([x + len(provs) * width for x in xs], [u["floor_ms"] for u in units], width, label="floor",
                   color="black")
        ax.set_xticks([x + 0.4 for x in xs])
        ax.set_xticklabels([f"{u['shape']['model'][:9]} {u['shape']['name']}" for u in units], rotation=70,
                           fontsize=7)
        ax.set_ylabel("ms per training step of the unit")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, "units_time_vs_floor.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------- warm cache
# Triton compiles each kernel variant x config on first use (seconds each,
# one process at a time). Running every Triton measurement once in a pool of
# processes first fills Triton's on-disk cache in parallel; the timed run
# then loads the compiled kernels from it.


def _warm_one(job: tuple) -> Optional[str]:
    kind, what, provider, device, dtype, batch, small = job
    try:
        if kind == "unit":
            bench_unit(what, provider, batch, device, dtype, 1, 1, rotate=1)
        else:
            torch.manual_seed(0)
            model, input_shape, _ = _build_model(what, small)
            bench_model(what, provider, batch, device, dtype, 1, 1, small, model, input_shape)
    except Exception as exc:  # noqa: BLE001  (the timed run reports it)
        return f"{type(exc).__name__}: {exc}"[:200]
    return None


def warm_triton_cache(jobs: list[tuple], workers: int, progress: bool) -> None:
    import concurrent.futures as cf
    import multiprocessing

    from tqdm import tqdm

    with cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(tqdm(pool.map(_warm_one, jobs), total=len(jobs), desc=f"compile ({workers} processes)",
                  disable=not progress, file=sys.stderr))


# --------------------------------------------------------------------- main


def _available(provider: str, device: str, explicit: bool) -> Optional[str]:
    """None if ``provider`` can run here, else why not."""
    from . import backends

    info = backends()
    if provider in ("native", "triton"):
        if not info[provider]["available"]:
            return info[provider]["reason"]
        if provider == "triton" and device == "cpu" and not explicit:
            return "Triton on CPU runs only under the interpreter (ask for it with --providers)"
        if provider == "triton" and device == "cpu":
            from . import triton_launch
            if not triton_launch.INTERPRET:
                return "set TRITON_INTERPRET=1 to run Triton on CPU"
        if device not in info[provider]["devices"] and not (provider == "triton" and device == "cpu"):
            return f"{provider} has no {device} kernels here"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_preact.bench",
                                     description="Throughput and memory of fused vs eager pre-activation units")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--suite", default=None,
                        help="comma-separated: units,cifar,imagenet (default: units,cifar on CPU; all on CUDA)")
    parser.add_argument("--dtype", default=None, choices=list(DTYPES),
                        help="autocast dtype (default: float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--providers", default=None, help=f"comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--batch", type=int, default=None, help="batch of every suite (default per suite/device)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--units", default="resnet164,resnetv2_50", help="unit sets: resnet164,resnetv2_50")
    parser.add_argument("--full-size", action="store_true", help="on CPU: the GPU sizes (slow)")
    parser.add_argument("--warm-workers", type=int, default=None,
                        help="processes that compile the Triton kernels before timing (default: 8 on CUDA)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="on CUDA: also time CUDA-graph replays (device time without host overhead; "
                             "captured in thread_local mode, see benchmarks/RESULTS.md)")
    parser.add_argument("--warm-only", action="store_true",
                        help="only compile the Triton kernels into Triton's cache (e.g. while tests run), no timing")
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    from tqdm import tqdm

    started = time.time()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible")
    small = device == "cpu" and not args.full_size
    suites = (args.suite or ("units,cifar" if device == "cpu" else "units,cifar,imagenet")).split(",")
    dtype = DTYPES[args.dtype or ("float32" if device == "cpu" else "bfloat16")]
    explicit = args.providers is not None
    providers = args.providers or ",".join(PROVIDERS)
    providers = [p.strip() for p in providers.split(",") if p.strip()]
    for p in providers:
        if p not in PROVIDERS:
            parser.error(f"unknown provider {p!r}; choose from {PROVIDERS}")
    skipped = {p: why for p in providers if (why := _available(p, device, explicit))}
    providers = [p for p in providers if p not in skipped]
    repeats = args.repeats or (5 if device == "cpu" else 30)
    warmup = args.warmup or (2 if device == "cpu" else 5)
    batch_units = args.batch or (8 if small else None)
    batch_cifar = args.batch or (16 if small else 128)
    batch_imagenet = args.batch or (2 if small else 64)
    os.makedirs(args.out, exist_ok=True)
    results = {"command": "python -m fused_preact.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "env": environment(device), "errors": [f"{p} skipped: {why}" for p, why in skipped.items()],
               "args": {"device": device, "suites": suites, "dtype": str(dtype).replace("torch.", ""),
                        "providers": providers, "repeats": repeats, "warmup": warmup, "batch_cifar": batch_cifar,
                        "batch_imagenet": batch_imagenet, "small": small}}
    torch.backends.cudnn.benchmark = True

    work: list[tuple] = []
    if "units" in suites:
        shapes = []
        if "resnet164" in args.units:
            shapes += resnet164_units()
        if "resnetv2_50" in args.units:
            shapes += [s for s in resnetv2_50_units() if not small or s.size <= 28]
        for s in shapes:
            for p in providers:
                # torch.compile of each unit costs 10-20 s of compilation:
                # only when asked for by name.
                if p != "compile" or explicit:
                    work.append(("unit", s, p))
    for suite in ("cifar", "imagenet"):
        if suite in suites:
            for p in providers:
                work.append(("model", suite, p))

    def batch_of(kind, what):
        if kind == "unit":
            return batch_units or (128 if what.model == "resnet164" else 64)
        return batch_cifar if what == "cifar" else batch_imagenet

    workers = args.warm_workers if args.warm_workers is not None else (min(8, os.cpu_count() or 1)
                                                                       if device == "cuda" else 0)
    triton_jobs = [(k, w, p, device, dtype, batch_of(k, w), small) for k, w, p in work if p == "triton"]
    if workers > 0 and triton_jobs:
        t0 = time.time()
        warm_triton_cache(triton_jobs, workers, not args.no_progress)
        results["warm_seconds"] = time.time() - t0
        print(f"compiled the Triton kernels of {len(triton_jobs)} measurements in {results['warm_seconds']:.0f} s "
              f"with {workers} processes", file=sys.stderr)
    if args.warm_only:
        return 0
    results["ceilings"] = device_ceilings(device)

    unit_rows: dict[UnitShape, dict] = {}
    models: dict[str, dict] = {}
    base_models = {}
    bar = tqdm(work, desc="bench", disable=args.no_progress, file=sys.stderr)
    for kind, what, provider in bar:
        bar.set_postfix_str(f"{what if kind == 'model' else what.model + ' ' + what.name} {provider}")
        try:
            if kind == "unit":
                batch = batch_of(kind, what)
                r = bench_unit(what, provider, batch, device, dtype, warmup, repeats, rotate=4,
                               cuda_graph=args.cuda_graph)
                row = unit_rows.setdefault(what, {"shape": asdict(what), "batch": batch, "providers": {}})
                row["providers"][provider] = r
            else:
                if what not in base_models:
                    torch.manual_seed(0)
                    base_models[what] = _build_model(what, small)
                model, input_shape, _ = base_models[what]
                batch = batch_of(kind, what)
                models.setdefault(what, {})[provider] = bench_model(what, provider, batch, device, dtype, warmup,
                                                                    repeats, small, model, input_shape,
                                                                    cuda_graph=args.cuda_graph)
            # Raw numbers so far, in case the run is cut short.
            with open(os.path.join(args.out, "results.json"), "w") as f:
                json.dump({**results, "partial": True, "models": models,
                           "units": list(unit_rows.values())}, f, indent=1, default=str)
        except Exception as exc:  # noqa: BLE001  (a benchmark reports, it does not stop)
            msg = f"{kind} {what if kind == 'model' else what.model + ' ' + what.name} {provider}: " \
                  f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:400]
            results["errors"].append(msg)
            if kind == "model":
                models.setdefault(what, {})[provider] = {"error": msg}
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    bar.close()

    ceil = results["ceilings"]
    elem = torch.finfo(dtype).bits // 8
    units_out = []
    for shape, row in unit_rows.items():
        flops = shape.flops(row["batch"])
        fwd_b, bwd_b = shape.min_bytes(row["batch"], elem)
        row.update({"flops_forward": flops, "flops_backward": 2 * flops, "min_bytes_forward": fwd_b,
                    "min_bytes_backward": bwd_b, "floor_ms": None})
        if ceil:
            floor_f, floor_b = shape.floor_ms(row["batch"], elem, ceil)
            row.update({"floor_forward_ms": floor_f, "floor_backward_ms": floor_b, "floor_ms": floor_f + floor_b})
            for r in row["providers"].values():
                t = r.get("train_step_graph", r["train_step"])["median_ms"]
                r["fraction_of_floor"] = row["floor_ms"] / t
        units_out.append(row)
    results["units"] = units_out
    results["models"] = models
    for where, r in ([(f"{u['shape']['model']} {u['shape']['name']} {p}", r) for u in units_out
                      for p, r in u["providers"].items()]
                     + [(f"{suite} {p}", r) for suite, rows in models.items() for p, r in rows.items()]):
        if "graph_error" in r:
            results["errors"].append(f"CUDA graph, {where}: {r['graph_error']}")
    try:
        import resource
        # Process-wide (all providers together), in bytes.
        results["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except ImportError:  # not on every OS
        pass
    results["seconds"] = time.time() - started
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    report = write_report(results, args.out)
    plots = write_plots(results, args.out)
    print(report)
    print(f"wrote {args.out}/results.json, {args.out}/report.md" + "".join(f", {p}" for p in plots))
    return 0


if __name__ == "__main__":
    sys.exit(main())
