"""The "triton" backend as torch ops: ``fused_preact::triton_bn_stats``,
``fused_preact::triton_bn_relu_conv2d`` and its backward op, each with a fake
implementation so ``torch.compile`` treats it as one opaque op, and autograd
registered on the unit.

The unit saves only x, the weight and per-channel vectors; backward recomputes
the activation (dgrad epilogue for the ReLU mask and the BN-backward sums,
wgrad prologue for the activation itself). In training, mean/invstd must be
x's own batch statistics (the backward differentiates through them with the
fused BN formula); they receive no gradient of their own. The optional
``emit_stats`` outputs (mean and biased variance of y, from the epilogue) are
not differentiable: they feed the next unit's BatchNorm, whose own backward
accounts for its statistics.

Importing this module imports Triton (see ``triton_launch`` for when the
kernels run on CPU tensors).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton_launch as L
from .functional import scale_shift


@torch.library.custom_op("fused_preact::triton_bn_stats", mutates_args=())
def bn_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of x, fp32 (fp64 for fp64 x)."""
    return L.channel_stats(x)


@bn_stats.register_fake
def _bn_stats_fake(x):
    v = x.new_empty((x.shape[1],), dtype=L.stats_dtype(x))
    return v, torch.empty_like(v)


@torch.library.custom_op("fused_preact::triton_bn_relu_conv2d", mutates_args=())
def bn_relu_conv2d(x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, bn_weight: Optional[Tensor],
                   bn_bias: Optional[Tensor], training: bool, stride: int, padding: int,
                   residual: Optional[Tensor], emit_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean of y, biased var of y); the last two are empty unless emit_stats."""
    scale, shift = scale_shift(mean, invstd, bn_weight, bn_bias)
    y, y_mean, y_var = L.conv_forward(x, weight, scale, shift, stride, padding, residual, emit_stats)
    if not emit_stats:
        y_mean, y_var = mean.new_empty((0,)), mean.new_empty((0,))  # distinct: outputs may not alias
    return y, y_mean, y_var


def _output_shape(x, weight, stride, padding):
    n, _, h, w = x.shape
    k = weight.shape[-1]
    return n, weight.shape[0], (h + 2 * padding - k) // stride + 1, (w + 2 * padding - k) // stride + 1


@bn_relu_conv2d.register_fake
def _bn_relu_conv2d_fake(x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding, residual,
                         emit_stats):
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
           else torch.contiguous_format)
    y = x.new_empty(_output_shape(x, weight, stride, padding)).contiguous(memory_format=fmt)
    stats = mean.new_empty((weight.shape[0] if emit_stats else 0,))
    return y, stats, torch.empty_like(stats)


@torch.library.custom_op("fused_preact::triton_bn_relu_conv2d_backward", mutates_args=())
def bn_relu_conv2d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor,
                            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], training: bool, stride: int,
                            padding: int, need_input_grads: bool,
                            need_weight_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, grad_gamma, grad_beta); empty where not asked."""
    scale, shift = scale_shift(mean, invstd, bn_weight, bn_bias)
    gx, gw, g_gamma, g_beta = L.conv_backward(grad_y, x, weight, mean, invstd, scale, shift, training, stride,
                                              padding, need_input_grads, need_weight_grad)
    return (gx if gx is not None else x.new_empty((0,)), gw if gw is not None else weight.new_empty((0,)),
            g_gamma if g_gamma is not None else mean.new_empty((0,)),
            g_beta if g_beta is not None else mean.new_empty((0,)))


@bn_relu_conv2d_backward.register_fake
def _bn_relu_conv2d_backward_fake(grad_y, x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding,
                                  need_input_grads, need_weight_grad):
    c = x.shape[1]
    return (torch.empty_like(x) if need_input_grads else x.new_empty((0,)),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty((0,)),
            mean.new_empty((c if need_input_grads else 0,)), mean.new_empty((c if need_input_grads else 0,)))


def _setup_context(ctx, inputs, output):
    x, weight, mean, invstd, bn_weight, bn_bias, training, stride, padding, residual, emit_stats = inputs
    ctx.save_for_backward(x, weight, mean, invstd, bn_weight, bn_bias)
    ctx.training, ctx.stride, ctx.padding = training, stride, padding
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(output[1], output[2])


def _backward(ctx, grad_y, _grad_mean, _grad_var):
    x, weight, mean, invstd, bn_weight, bn_bias = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_gamma = bn_weight is not None and ctx.needs_input_grad[4]
    need_beta = bn_bias is not None and ctx.needs_input_grad[5]
    need_bn = need_x or need_gamma or need_beta
    gx, gw, g_gamma, g_beta = bn_relu_conv2d_backward(grad_y, x, weight, mean, invstd, bn_weight, bn_bias,
                                                      ctx.training, ctx.stride, ctx.padding, need_bn, need_w)
    return (gx if need_x else None, gw if need_w else None, None, None,
            g_gamma.to(bn_weight.dtype) if need_gamma else None,
            g_beta.to(bn_bias.dtype) if need_beta else None,
            None, None, None, grad_y if ctx.has_residual else None, None)


bn_relu_conv2d.register_autograd(_backward, setup_context=_setup_context)
