"""The "triton" backend as torch ops, each with a fake implementation so
``torch.compile`` treats it as one opaque op:

  fused_preact::triton_bn_stats(x) -> [2, C] mean, biased variance
  fused_preact::triton_bn_prepare(x, batch_moments?, gamma?, beta?,
      running_mean?, running_var?, training, momentum, eps, global_count,
      batches_tracked?) -> [4, C] mean, invstd, scale, shift; updates the
      running statistics (and adds 1 to batches_tracked) in place
  fused_preact::triton_bn_relu_conv2d(x, weight, bn, gamma?, beta?, training,
      stride, padding, residual?, emit_stats) -> (y, [2, T, K] or empty):
      with emit_stats, y's per-tile moments (triton_launch.merge_moments),
      which the next unit's triton_bn_prepare takes as batch_moments
  fused_preact::triton_bn_relu_conv2d_backward(...) -> (gx, gw, [2, C] grads)

The unit saves only x, the weight and the [4, C] vectors; backward
recomputes the activation (dgrad epilogue for the ReLU mask and the
BN-backward sums, wgrad prologue for the activation itself). In training,
``bn`` must hold x's own batch statistics (the backward differentiates
through them with the fused BN formula). gamma and beta are inputs of the
unit only so that autograd routes their gradients; their values are already
folded into ``bn``. The optional emitted statistics (of y, from the conv
epilogue) are not differentiable: they feed the next unit's BatchNorm, whose
own backward accounts for its statistics. The weight may be fp32 under
autocast: the kernels cast it while packing it, and its gradient comes back
in its own dtype.

Importing this module imports Triton (see ``triton_launch`` for when the
kernels run on CPU tensors).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from . import triton_launch as L
from .functional import conv_output_shape, eager_function, memory_format_of, stats_dtype


def _bn_shape(x: Tensor) -> tuple[int, ...]:
    return (4, x.shape[1])


@torch.library.custom_op("fused_preact::triton_bn_stats", mutates_args=())
def bn_stats(x: Tensor) -> Tensor:
    """[2, C]: per-channel mean and biased variance of x, fp32 (fp64 for fp64 x)."""
    return L.channel_stats(x)


@bn_stats.register_fake
def _bn_stats_fake(x):
    return x.new_empty((2, x.shape[1]), dtype=stats_dtype(x))


# No defaults in the op's schema: with a mutated argument left to its
# default, torch 2.11's in-place bookkeeping (custom_ops' ADInplaceOrView
# kernel) indexes the positional arguments by schema position and fails with
# an IndexError (seen with torch 2.11.0, the GPU machines' version; fixed by
# 2.14). ``prepare`` below keeps the defaults and passes every argument.
@torch.library.custom_op("fused_preact::triton_bn_prepare",
                         mutates_args=("running_mean", "running_var", "batches_tracked"))
def bn_prepare(x: Tensor, batch_moments: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float,
               eps: float, global_count: int, batches_tracked: Optional[Tensor]) -> Tensor:
    return L.bn_prepare(x, batch_moments, gamma, beta, running_mean, running_var, training, momentum, eps,
                        global_count, batches_tracked)


@bn_prepare.register_fake
def _bn_prepare_fake(x, batch_moments, gamma, beta, running_mean, running_var, training, momentum, eps,
                     global_count, batches_tracked):
    return x.new_empty(_bn_shape(x), dtype=stats_dtype(x))


def _unit_forward(x, weight, bn, bn_weight, bn_bias, training, stride, padding, residual, emit_stats,
                  global_count=0):
    y, stats = L.conv_forward(x, weight, bn, stride, padding, residual, emit_stats)
    return y, (stats if stats is not None else bn.new_empty((0,)))


@torch.library.custom_op("fused_preact::triton_bn_relu_conv2d", mutates_args=())
def bn_relu_conv2d(x: Tensor, weight: Tensor, bn: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                   training: bool, stride: int, padding: int, residual: Optional[Tensor],
                   emit_stats: bool, global_count: int = 0) -> tuple[Tensor, Tensor]:
    """(y, y's per-tile moments [2, T, K], or an empty tensor unless emit_stats)."""
    return _unit_forward(x, weight, bn, bn_weight, bn_bias, training, stride, padding, residual, emit_stats,
                         global_count)


@bn_relu_conv2d.register_fake
def _bn_relu_conv2d_fake(x, weight, bn, bn_weight, bn_bias, training, stride, padding, residual, emit_stats,
                         global_count=0):
    y = x.new_empty(conv_output_shape(x, weight, stride, padding)).contiguous(memory_format=memory_format_of(x))
    return y, bn.new_empty(L.moments_shape(y) if emit_stats else (0,))


def _unit_backward(grad_y, x, weight, bn, training, stride, padding, need_input_grads, need_weight_grad,
                   global_count=0):
    gx, gw, bn_grads = L.conv_backward(grad_y, x, weight, bn, training, stride, padding, need_input_grads,
                                       need_weight_grad, global_count)
    return (gx if gx is not None else x.new_empty((0,)), gw if gw is not None else weight.new_empty((0,)),
            bn_grads if bn_grads is not None else bn.new_empty((0,)))


@torch.library.custom_op("fused_preact::triton_bn_relu_conv2d_backward", mutates_args=())
def bn_relu_conv2d_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bn: Tensor, training: bool, stride: int,
                            padding: int, need_input_grads: bool, need_weight_grad: bool,
                            global_count: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_weight, [2, C] grad_gamma and grad_beta); empty where not asked."""
    return _unit_backward(grad_y, x, weight, bn, training, stride, padding, need_input_grads, need_weight_grad,
                          global_count)


@bn_relu_conv2d_backward.register_fake
def _bn_relu_conv2d_backward_fake(grad_y, x, weight, bn, training, stride, padding, need_input_grads,
                                  need_weight_grad, global_count=0):
    return (torch.empty_like(x) if need_input_grads else x.new_empty((0,)),
            torch.empty_like(weight) if need_weight_grad else weight.new_empty((0,)),
            bn.new_empty((2, x.shape[1]) if need_input_grads else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bn, bn_weight, bn_bias, training, stride, padding, residual, emit_stats, global_count = inputs
    ctx.save_for_backward(x, weight, bn)
    ctx.training, ctx.stride, ctx.padding, ctx.global_count = training, stride, padding, global_count
    ctx.has_residual = residual is not None
    ctx.gamma_dtype = bn_weight.dtype if bn_weight is not None else None
    ctx.beta_dtype = bn_bias.dtype if bn_bias is not None else None
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_y, _grad_stats, backward=bn_relu_conv2d_backward):
    """The unit's autograd formula; ``backward`` computes it: the backward op
    (what the compiler and opcheck trace), or its plain function in eager mode."""
    if grad_y is None:  # no gradient reached y (eager path: gradients are not materialised)
        return (None,) * 11
    x, weight, bn = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_gamma = ctx.gamma_dtype is not None and ctx.needs_input_grad[3]
    need_beta = ctx.beta_dtype is not None and ctx.needs_input_grad[4]
    need_bn = need_x or need_gamma or need_beta
    gx, gw, bn_grads = backward(grad_y, x, weight, bn, ctx.training, ctx.stride, ctx.padding, need_bn, need_w,
                                ctx.global_count)
    return (gx if need_x else None, gw if need_w else None, None,
            bn_grads[0].to(ctx.gamma_dtype) if need_gamma else None,
            bn_grads[1].to(ctx.beta_dtype) if need_beta else None,
            None, None, None, grad_y if ctx.has_residual else None, None, None)


bn_relu_conv2d.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------- eager entries
# Under torch.compile the ops above (one opaque node each for the compiler);
# in eager mode the same Python functions without the custom-op layer
# (functional.eager_function): the fused units were host-bound on the H200.

_EagerUnit = eager_function("_EagerUnit", _unit_forward, _setup_context,
                            functools.partial(_backward, backward=_unit_backward), materialize_grads=False)


def unit(x: Tensor, weight: Tensor, bn: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
         training: bool, stride: int, padding: int, residual: Optional[Tensor], emit_stats: bool,
         global_count: int = 0) -> tuple[Tensor, Tensor]:
    """``fused_preact::triton_bn_relu_conv2d`` with its autograd."""
    args = (x, weight, bn, bn_weight, bn_bias, training, stride, padding, residual, emit_stats, global_count)
    if torch.compiler.is_compiling():
        return bn_relu_conv2d(*args)
    return _EagerUnit.apply(*args)


def prepare(x: Tensor, batch_moments: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float,
            eps: float, global_count: int = 0, batches_tracked: Optional[Tensor] = None) -> Tensor:
    """``fused_preact::triton_bn_prepare``."""
    args = (x, batch_moments, gamma, beta, running_mean, running_var, training, momentum, eps, global_count,
            batches_tracked)
    if torch.compiler.is_compiling():
        return bn_prepare(*args)
    return L.bn_prepare(*args)
