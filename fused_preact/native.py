"""The "native" backend: the C++/CUDA ops of ``fused_preact._C`` made usable
from Python (fake kernels for ``torch.compile``, autograd), and the fused
pre-activation unit composed from them with ATen's convolution.

Layers (STYLE.md): C++ kernel (csrc/cpu, csrc/cuda) → op
``torch.ops.fused_preact.*`` (schemas in csrc/fused_preact.cpp) → this file's
fake/autograd registrations and the unit op ``fused_preact::bn_relu_conv2d``
→ ``fused_preact.functional`` → modules.

Importing this module requires the compiled extension.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _extension
from .functional import conv_output_shape, eager_function, memory_format_of, scale_shift, stats_dtype

_extension.require()
ops = torch.ops.fused_preact


# ----------------------------------------------------------------- fake kernels
# Shapes only, for FakeTensor / torch.compile tracing; they repeat the shape
# checks of the C++ entry points with torch._check.


@torch.library.register_fake("fused_preact::bn_stats")
def _bn_stats_fake(x):
    torch._check(x.dim() == 4, lambda: f"fused_preact::bn_stats: x must be 4-D, got {x.dim()}-D")
    v = x.new_empty((x.shape[1],), dtype=stats_dtype(x))
    return v, torch.empty_like(v)


@torch.library.register_fake("fused_preact::bn_relu")
def _bn_relu_fake(x, scale, shift, residual=None):
    torch._check(x.dim() == 4, lambda: f"fused_preact::bn_relu: x must be 4-D, got {x.dim()}-D")
    torch._check(scale.shape == (x.shape[1],), lambda: "fused_preact::bn_relu: scale must have shape (C,)")
    return torch.empty_like(x)


@torch.library.register_fake("fused_preact::bn_relu_backward_reduce")
def _bn_relu_backward_reduce_fake(grad_out, x, mean, scale, shift):
    torch._check(grad_out.shape == x.shape, lambda: "fused_preact::bn_relu_backward_reduce: grad_out shape")
    return torch.empty_like(mean), torch.empty_like(mean)


@torch.library.register_fake("fused_preact::bn_relu_backward_apply")
def _bn_relu_backward_apply_fake(grad_out, x, scale, shift, k1, k0):
    torch._check(grad_out.shape == x.shape, lambda: "fused_preact::bn_relu_backward_apply: grad_out shape")
    return torch.empty_like(x)


@torch.library.register_fake("fused_preact::add_stats")
def _add_stats_fake(a, b):
    torch._check(a.shape == b.shape, lambda: "fused_preact::add_stats: a and b must have the same shape")
    v = a.new_empty((a.shape[1],), dtype=stats_dtype(a))
    return torch.empty_like(a), v, torch.empty_like(v)


# --------------------------------------------------------------------- autograd
# bn_relu: a = relu(x*scale + shift) [+ residual]; gradients for every input.


def _bn_relu_setup_context(ctx, inputs, output):
    x, scale, shift, residual = inputs
    ctx.save_for_backward(x, scale, shift)
    ctx.has_residual = residual is not None


def _bn_relu_backward(ctx, grad):
    x, scale, shift = ctx.saved_tensors
    c = (1, -1, 1, 1)
    # Recompute the mask from x rather than saving it.
    z = x.to(scale.dtype) * scale.view(c) + shift.view(c)
    gz = torch.where(z > 0, grad.to(scale.dtype), 0)
    grad_x = (gz * scale.view(c)).to(x.dtype)
    grad_scale = (gz * x).sum((0, 2, 3))
    grad_shift = gz.sum((0, 2, 3))
    return grad_x, grad_scale, grad_shift, (grad if ctx.has_residual else None)


torch.library.register_autograd("fused_preact::bn_relu", _bn_relu_backward, setup_context=_bn_relu_setup_context)


# bn_stats: d mean/dx = 1/M, d var/dx = 2 (x - mean)/M.
def _bn_stats_setup_context(ctx, inputs, output):
    (x,) = inputs
    ctx.save_for_backward(x, output[0])


def _bn_stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    count = x.numel() // x.shape[1]
    c = (1, -1, 1, 1)
    g = x.new_zeros(x.shape, dtype=mean.dtype)
    if grad_mean is not None:
        g = g + (grad_mean / count).view(c)
    if grad_var is not None:
        g = g + (x.to(mean.dtype) - mean.view(c)) * (2.0 * grad_var / count).view(c)
    return g.to(x.dtype)


torch.library.register_autograd("fused_preact::bn_stats", _bn_stats_backward, setup_context=_bn_stats_setup_context)


# add_stats: out = a + b; the stats outputs are treated like bn_stats of out.
def _add_stats_setup_context(ctx, inputs, output):
    out, mean, _ = output
    ctx.save_for_backward(out, mean)


def _add_stats_backward(ctx, grad_out, grad_mean, grad_var):
    out, mean = ctx.saved_tensors
    g = torch.zeros_like(out) if grad_out is None else grad_out
    if grad_mean is not None or grad_var is not None:
        count = out.numel() // out.shape[1]
        c = (1, -1, 1, 1)
        extra = out.new_zeros(out.shape, dtype=mean.dtype)
        if grad_mean is not None:
            extra = extra + (grad_mean / count).view(c)
        if grad_var is not None:
            extra = extra + (out.to(mean.dtype) - mean.view(c)) * (2.0 * grad_var / count).view(c)
        g = g + extra.to(g.dtype)
    return g, g


torch.library.register_autograd("fused_preact::add_stats", _add_stats_backward, setup_context=_add_stats_setup_context)


# ------------------------------------------------------- the fused unit op
# y = conv(relu(x*scale + shift)) [+ residual], scale/shift from (mean, invstd,
# gamma, beta). Saves x and per-channel vectors only; the activation is
# recomputed in backward for the weight gradient. In training, mean/invstd
# must be x's own batch statistics (the backward differentiates through them
# with the fused BN formula); they receive no gradient of their own.


def _unit_forward(x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                  bn_bias: Optional[Tensor], training: bool, stride: int, padding: int,
                  residual: Optional[Tensor], global_count: int = 0) -> Tensor:
    scale, shift = scale_shift(mean, invstd, bn_weight, bn_bias)
    a = ops.bn_relu(x, scale, shift)
    y = torch.nn.functional.conv2d(a, weight, None, stride, padding)
    # The output keeps x's memory format (as the fake kernel says). cuDNN has
    # no channels_last fp64 kernels: on CUDA, fp64 convs come back NCHW
    # (seen on an H200, torch 2.11).
    fmt = memory_format_of(x)
    if not y.is_contiguous(memory_format=fmt):
        y = y.contiguous(memory_format=fmt)
    if residual is not None:
        y = y.add_(residual)
    return y


@torch.library.custom_op("fused_preact::bn_relu_conv2d", mutates_args=())
def bn_relu_conv2d(x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], training: bool, stride: int, padding: int,
                   residual: Optional[Tensor], global_count: int = 0) -> Tensor:
    """``global_count`` > 0: synchronized BatchNorm (mean/invstd are the
    global batch's; backward all-reduces its sums and divides by this count)."""
    return _unit_forward(x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding, residual,
                         global_count)


@bn_relu_conv2d.register_fake
def _bn_relu_conv2d_fake(x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding, residual,
                         global_count=0):
    return x.new_empty(conv_output_shape(x, weight, stride, padding)).contiguous(memory_format=memory_format_of(x))


def _unit_setup_context(ctx, inputs, output):
    x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding, residual, global_count = inputs
    ctx.save_for_backward(x, weight, mean, invstd, bn_weight, bn_bias)
    ctx.training, ctx.stride, ctx.padding, ctx.global_count = training, stride, padding, global_count
    ctx.has_residual = residual is not None


def _unit_backward(ctx, grad_y):
    x, weight, mean, invstd, bn_weight, bn_bias = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_gamma = bn_weight is not None and ctx.needs_input_grad[4]
    need_beta = bn_bias is not None and ctx.needs_input_grad[5]
    scale, shift = scale_shift(mean, invstd, bn_weight, bn_bias)
    a = ops.bn_relu(x, scale, shift)  # recompute: the activation was never stored
    need_bn = need_x or need_gamma or need_beta
    grad_a, grad_w, _ = torch.ops.aten.convolution_backward(
        grad_y, a, weight, None, [ctx.stride] * 2, [ctx.padding] * 2, [1, 1], False, [0, 0], 1,
        [need_bn, need_w, False])
    del a
    grad_x = grad_gamma = grad_beta = None
    if need_bn:
        if ctx.global_count and ctx.training:
            grad_x, grad_gamma, grad_beta = _synchronized_bn_relu_backward(grad_a, x, mean, invstd, scale, shift,
                                                                           ctx.global_count)
        elif grad_a.device.type == "cpu":
            # grad_a is ours: grad_x is written over it (one activation-sized
            # tensor less at this peak; on CPU a fresh one above 32 MiB is
            # also page-faulted in again). Elsewhere the in-place op would
            # only add a copy, until the CUDA apply kernel learns to alias.
            grad_gamma, grad_beta = ops.bn_relu_backward_(grad_a, x, mean, invstd, bn_weight, bn_bias, ctx.training)
            grad_x = grad_a
        else:
            grad_x, grad_gamma, grad_beta = ops.bn_relu_backward(grad_a, x, mean, invstd, bn_weight, bn_bias,
                                                                 ctx.training)
    return (grad_x if need_x else None, grad_w if need_w else None, None, None,
            grad_gamma.to(bn_weight.dtype) if need_gamma else None,
            grad_beta.to(bn_bias.dtype) if need_beta else None,
            None, None, None, grad_y if ctx.has_residual else None, None)


bn_relu_conv2d.register_autograd(_unit_backward, setup_context=_unit_setup_context)


_EagerUnit = eager_function("_EagerUnit", _unit_forward, _unit_setup_context, _unit_backward)


def unit(x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
         bn_bias: Optional[Tensor], training: bool, stride: int, padding: int, residual: Optional[Tensor],
         global_count: int = 0) -> Tensor:
    """The fused unit: ``fused_preact::bn_relu_conv2d`` with its autograd
    (see ``functional.eager_function`` for the eager path)."""
    args = (x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding, residual, global_count)
    if torch.compiler.is_compiling():
        return bn_relu_conv2d(*args)
    return _EagerUnit.apply(*args)


def _synchronized_bn_relu_backward(grad_a, x, mean, invstd, scale, shift, global_count):
    """bn_relu_backward with the two per-channel sums all-reduced and the
    global count: nn.SyncBatchNorm's backward, fused with the ReLU mask.
    The gamma/beta gradients returned are this process's own (DDP averages)."""
    from . import distributed

    sum_gz, sum_gz_xc = ops.bn_relu_backward_reduce(grad_a, x, mean, scale, shift)
    local_gamma, local_beta = sum_gz_xc * invstd, sum_gz
    g_gamma, g_beta = distributed.all_reduce_sum(local_gamma, local_beta)
    k1, k0 = distributed.backward_constants(g_gamma, g_beta, mean, invstd, scale, global_count)
    return ops.bn_relu_backward_apply(grad_a, x, scale, shift, k1, k0), local_gamma, local_beta
