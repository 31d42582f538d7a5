"""Functional entry point of the fused pre-activation unit:
``bn_relu_conv2d`` = BatchNorm2d → ReLU → Conv2d (+ residual), with
``nn.BatchNorm2d`` semantics for batch/running statistics.

``backend`` picks the implementation:
    "torch"   plain composition of F.batch_norm, F.relu, F.conv2d (the reference)
    "native"  the C++/CUDA ops of fused_preact._C with ATen's convolution:
              saves only x and per-channel vectors, recomputes the activation
    "triton"  the Triton implicit-GEMM kernels (BN+ReLU prologue, residual and
              statistics epilogue): CUDA tensors, or CPU tensors under
              TRITON_INTERPRET=1
    "auto"    CPU: "native" when the extension is built, else "torch";
              CUDA: "triton" when Triton is installed, else "native", else "torch"
User errors are checked here, once, before any state changes.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _extension

BACKENDS = ("auto", "native", "triton", "torch")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, x: Tensor) -> str:
    """The concrete backend for ``x``'s device ("native", "triton" or "torch")."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if x.device.type == "cuda" and triton_available():
            return "triton"
        if _extension.load() and (x.device.type == "cpu" or
                                  (x.device.type == "cuda" and _extension.has_cuda_kernels())):
            return "native"
        return "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        from . import triton_launch

        triton_launch.check_device(x)
        return backend
    if backend == "native":
        _extension.require()
        if x.device.type == "cuda" and not _extension.has_cuda_kernels():
            raise RuntimeError("backend='native' on a CUDA tensor, but fused_preact._C was built without its CUDA "
                               "kernels; rebuild with nvcc available (or FORCE_CUDA=1)")
        if x.device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='native' supports CPU and CUDA tensors, got device {x.device}")
    return backend


def check_unit_inputs(name: str, x: Tensor, conv_weight: Tensor, bn_weight: Optional[Tensor],
                      bn_bias: Optional[Tensor], running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      residual: Optional[Tensor], batch_stats: bool) -> None:
    """Raises ValueError/RuntimeError naming ``name`` (the module or function)
    and the offending argument."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"{name}: expected a 4-D input (N, C, H, W), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point input, got {x.dtype}")
    channels = x.shape[1]
    if channels == 0 or conv_weight.shape[0] == 0:
        raise ValueError(f"{name}: a unit needs at least one input and one output channel, got {channels} -> "
                         f"{conv_weight.shape[0]}")
    if conv_weight.shape[1] != channels:
        raise ValueError(f"{name}: input has {channels} channels but the convolution expects {conv_weight.shape[1]}")
    for label, t in (("BN weight", bn_weight), ("BN bias", bn_bias), ("running_mean", running_mean),
                     ("running_var", running_var)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"{name}: input has {channels} channels but {label} has shape {tuple(t.shape)}")
    for label, t in (("convolution weight", conv_weight), ("BN weight", bn_weight), ("BN bias", bn_bias),
                     ("running_mean", running_mean), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise RuntimeError(f"{name}: input is on {x.device} but {label} is on {t.device}")
    if conv_weight.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type):
        raise RuntimeError(f"{name}: input dtype {x.dtype} does not match the convolution weight dtype "
                           f"{conv_weight.dtype}")
    if batch_stats and x.numel() // max(channels, 1) <= 1 and x.numel() > 0:
        raise ValueError(f"{name}: expected more than 1 value per channel when training, got input size "
                         f"{list(x.shape)}")


def stats_dtype(x: Tensor) -> torch.dtype:
    """dtype of per-channel statistics and vectors: fp64 for fp64 x, else fp32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a (non-trivially) channels_last tensor, else
    contiguous: the format every fused op gives its output."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def conv_output_shape(x: Tensor, conv_weight: Tensor, stride: int, padding: int) -> tuple[int, int, int, int]:
    k = conv_weight.shape[-1]
    return (x.shape[0], conv_weight.shape[0], (x.shape[2] + 2 * padding - k) // stride + 1,
            (x.shape[3] + 2 * padding - k) // stride + 1)


def scale_shift(mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor]):
    """Per-channel fp32 scale = gamma*invstd and shift = beta - mean*scale."""
    scale = invstd if bn_weight is None else bn_weight.to(invstd.dtype) * invstd
    shift = -mean * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(invstd.dtype)
    return scale, shift


def batch_norm_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], *, training: bool,
                     momentum: float, eps: float) -> tuple[Tensor, Tensor, bool]:
    """Native path: (mean, invstd, uses_batch_stats) for the BN in front of a
    unit, updating the running statistics in place when training. One pass
    over x; the result can feed several units that share the pre-activation
    (a projection shortcut and the first conv)."""
    ops = torch.ops.fused_preact
    batch_stats = training or running_mean is None
    if batch_stats:
        mean, var = ops.bn_stats(x.detach())
        # An empty batch leaves the running statistics as they are (as F.batch_norm does).
        if training and running_mean is not None and x.numel() > 0:
            ops.update_running_stats(running_mean, running_var, mean, var, momentum, x.numel() // x.shape[1])
    else:
        mean, var = running_mean.to(stats_dtype(x)), running_var.to(stats_dtype(x))
    return mean, torch.rsqrt(var + eps), batch_stats


def prepare_bn(x: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
               running_var: Optional[Tensor], *, training: bool, momentum: float, eps: float, backend: str,
               batch: Optional[Tensor] = None, sync: bool = False,
               batches_tracked: Optional[Tensor] = None) -> tuple[object, bool]:
    """The BatchNorm in front of a unit on a fused backend: (state for
    ``fused_unit``, uses batch statistics). Running statistics are updated
    here, once, even when the state feeds two convs (unit 1 and a projection
    shortcut share the pre-activation). ``batch``: x's per-tile moments from
    the producer's epilogue (Triton, ``fused_unit``), so x is not read again.
    ``sync``: synchronized BatchNorm over the default process group (see
    fused_preact.distributed). ``batches_tracked``: the BatchNorm's
    num_batches_tracked, counted here (on Triton by the finalize launch,
    which saves a launch of its own per unit)."""
    batch_stats = training or running_mean is None
    if batches_tracked is not None and backend != "triton":
        batches_tracked.add_(1)
        batches_tracked = None
    from . import distributed

    if sync and batch_stats and distributed.active():
        local_count = x.numel() // x.shape[1]
        if backend == "triton":
            from . import triton_ops

            mean, var = triton_ops.bn_stats(x.detach())
            mean, var, count = distributed.global_moments(mean, var, local_count)
            bn = triton_ops.prepare(x.detach(), torch.stack((mean, var)),
                                    None if bn_weight is None else bn_weight.detach(),
                                    None if bn_bias is None else bn_bias.detach(), running_mean, running_var,
                                    training, momentum, eps, count, batches_tracked)
            return (bn, count), batch_stats
        ops = torch.ops.fused_preact
        mean, var = ops.bn_stats(x.detach())
        mean, var, count = distributed.global_moments(mean, var, local_count)
        if training and running_mean is not None:
            ops.update_running_stats(running_mean, running_var, mean, var, momentum, count)
        return (mean, torch.rsqrt(var + eps), count), batch_stats
    if backend == "triton":
        from . import triton_ops

        bn = triton_ops.prepare(x.detach(), batch, None if bn_weight is None else bn_weight.detach(),
                                None if bn_bias is None else bn_bias.detach(), running_mean, running_var,
                                training, momentum, eps, 0, batches_tracked)
        return (bn, 0), batch_stats
    mean, invstd, batch_stats = batch_norm_stats(x, running_mean, running_var, training=training,
                                                 momentum=momentum, eps=eps)
    return (mean, invstd, 0), batch_stats


def eager_function(name: str, forward, setup_context, backward, materialize_grads: bool = True) -> type:
    """An autograd.Function that runs a custom op's forward and autograd
    formula (``register_autograd``'s setup_context/backward) without the
    custom-op layer: what the fused units use in eager mode, where that layer's
    Python cost about 100 us per training step. Under torch.compile they call
    the op itself, one opaque node for the compiler. ``materialize_grads``
    off: outputs that get no gradient (emitted statistics) reach ``backward``
    as None instead of as zero tensors, one launch less per backward;
    ``backward`` must then take None for every gradient."""

    def forward_(ctx, *inputs):
        ctx.set_materialize_grads(materialize_grads)
        output = forward(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward_),
                                                   "backward": staticmethod(backward)})


def unit_weight(weight: Tensor, x: Tensor, backend: str) -> Tensor:
    """The conv weight as the backend takes it under autocast: Triton casts
    while packing (one copy, gradient in the parameter's dtype); the native
    path hands ATen's convolution a weight of x's dtype."""
    return weight if backend == "triton" or weight.dtype == x.dtype else weight.to(x.dtype)


def fused_unit(x: Tensor, conv_weight: Tensor, bn_state: object, bn_weight: Optional[Tensor],
               bn_bias: Optional[Tensor], batch_stats: bool, stride: int, padding: int, residual: Optional[Tensor],
               backend: str, emit_stats: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """One unit on a fused backend given its BN state from ``prepare_bn``:
    (y, y's batch statistics, or None). Only "triton" emits them: per-tile
    moments from the conv epilogue, [2, T, K], which the next unit's
    ``prepare_bn`` takes as ``batch`` (``triton_launch.merge_moments`` turns
    them into mean and variance); elsewhere the next unit computes them."""
    if backend == "triton":
        from . import triton_ops

        bn, global_count = bn_state
        y, stats = triton_ops.unit(x, conv_weight, bn, bn_weight, bn_bias, batch_stats, stride, padding, residual,
                                   emit_stats, global_count)
        return y, (stats if emit_stats else None)
    from . import native

    mean, invstd, global_count = bn_state
    return native.unit(x, conv_weight, mean, invstd, bn_weight, bn_bias, batch_stats, stride, padding, residual,
                       global_count), None


def autocast_off(device_type: str):
    """A context that turns autocast off inside the fused path (the ops pick
    their own precisions), or a no-op where it is off already: entering a
    torch.autocast context costs about 10 us of host time per unit."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_inputs(x: Tensor, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Under autocast the unit runs in the autocast dtype, as the convolution
    would; statistics stay fp32 inside the ops."""
    if not torch.is_autocast_enabled(x.device.type):
        return (x, *tensors)
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(None if t is None else t.to(dtype) for t in (x, *tensors))


def bn_relu_conv2d(x: Tensor, conv_weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   running_mean: Optional[Tensor], running_var: Optional[Tensor], *, training: bool,
                   momentum: float = 0.1, eps: float = 1e-5, stride: int = 1, padding: int = 0,
                   residual: Optional[Tensor] = None, backend: str = "auto", name: str = "bn_relu_conv2d") -> Tensor:
    """y = conv2d(relu(batch_norm(x)), conv_weight) [+ residual].

    Batch statistics are used when ``training`` or when there are no running
    statistics (``nn.BatchNorm2d``'s rule); running statistics are then
    updated in place with ``momentum`` (the caller turns momentum=None into
    1/num_batches_tracked, as ``nn.BatchNorm2d`` does).
    """
    batch_stats = training or running_mean is None
    check_unit_inputs(name, x, conv_weight, bn_weight, bn_bias, running_mean, running_var, residual, batch_stats)
    if residual is not None and tuple(residual.shape) != conv_output_shape(x, conv_weight, stride, padding):
        raise ValueError(f"{name}: residual has shape {tuple(residual.shape)} but the convolution output has shape "
                         f"{conv_output_shape(x, conv_weight, stride, padding)}")
    backend = resolve_backend(backend, x)
    if backend == "torch":
        a = F.relu(F.batch_norm(x, running_mean, running_var, bn_weight, bn_bias, batch_stats, momentum, eps))
        y = F.conv2d(a, conv_weight, None, stride, padding)
        return y if residual is None else y + residual

    x, residual = autocast_inputs(x, residual)
    with autocast_off(x.device.type):
        state, batch_stats = prepare_bn(x, bn_weight, bn_bias, running_mean, running_var, training=training,
                                        momentum=momentum, eps=eps, backend=backend)
        return fused_unit(x, unit_weight(conv_weight, x, backend), state, bn_weight, bn_bias, batch_stats, stride,
                          padding, residual, backend)[0]
