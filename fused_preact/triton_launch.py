"""Launchers of the Triton kernels: grids, block configurations, autotuning,
buffers. Plain functions on tensors; no autograd here (see ``triton_ops``).

On CUDA each GEMM kernel is autotuned over a small configuration set keyed by
its shape. On CPU tensors the kernels run only under ``TRITON_INTERPRET=1``
(set before Triton is imported), with one small fixed configuration.

fp32 precision: the GEMMs follow ``torch.backends.cudnn.allow_tf32`` (True by
default in PyTorch, so eager fp32 convolutions on GPU use TF32 too): TF32 when
it is set, exact fp32 ("ieee") when it is not. fp16/bf16 operands accumulate
in fp32; fp64 runs in fp64. Statistics and scale/shift are fp32 (fp64 for
fp64 inputs); values are cast to the output dtype only on store.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_kernels as K

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# FUSED_PREACT_TRITON_AUTOTUNE=0: the first config of each set, no tuning
# (fewer compiles: the GPU tests use it).
AUTOTUNE = os.environ.get("FUSED_PREACT_TRITON_AUTOTUNE", "1") != "0"

_DOT_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def check_device(x: Tensor) -> None:
    """Raises unless the kernels can run on x (its device, and its dtype)."""
    if x.dtype not in _DOT_DTYPE:
        raise RuntimeError(f"the Triton backend supports float16, bfloat16, float32 and float64, got {x.dtype}")
    if x.device.type == "cuda":
        return
    if x.device.type == "cpu":
        if INTERPRET:
            return
        raise RuntimeError("the Triton backend runs on CUDA tensors; on CPU tensors only under the Triton "
                           "interpreter: set TRITON_INTERPRET=1 before importing triton (slow, for tests), or use "
                           "backend='native'")
    raise RuntimeError(f"the Triton backend supports CUDA tensors, got a tensor on {x.device}")


def _dot(dtype: torch.dtype) -> tuple[object, str, bool]:
    """(operand dtype, input_precision, fp64?) for tl.dot."""
    if dtype not in _DOT_DTYPE:
        raise RuntimeError(f"the Triton backend supports float16, bfloat16, float32 and float64, got {dtype}")
    precision = "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"
    return _DOT_DTYPE[dtype], precision, dtype == torch.float64


def stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _like_layout(shape: tuple[int, ...], x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty tensor of ``shape`` in x's memory format (channels_last or contiguous)."""
    fmt = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
           else torch.contiguous_format)
    return torch.empty(shape, device=x.device, dtype=dtype or x.dtype).contiguous(memory_format=fmt)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


# ------------------------------------------------------------------ configs
# Small sets: each config is a compile (seconds) and an autotuning trial per
# shape. Tile widths follow the channel counts (16 for ResNet-164's narrow
# units, up to 128/64 for ResNet-v2-50's).


def _gemm_configs(rows_block: int, n_cols: int, n_red: int, fp64: bool = False) -> list[triton.Config]:
    """Forward/dgrad: the tile spans the output channels (up to 128); eight
    warps for wide tiles, where the transformed A tile and the accumulator
    would otherwise exceed the register file (measured with triton_aot).
    fp64 (no tensor cores; for checks) gets narrow tiles that fit shared memory."""
    if fp64:
        return [triton.Config({"BLOCK_M": rows_block, "BLOCK_N": _pow2(n_cols, 16, 32), "BLOCK_K": 16,
                               "GROUP_M": 8}, num_warps=4, num_stages=2)]
    bn = _pow2(n_cols, 16, 128)
    configs = []
    for bk, stages in ((_pow2(n_red, 16, 64), 3), (_pow2(n_red, 16, 32), 4)):
        # Per thread: the fp32 accumulator (BLOCK_M*BN) and the transformed
        # A tile (BLOCK_M*BK). Past 96 columns together four warps spilled
        # on sm_90 (triton_aot); eight do not.
        warps = 8 if bn + bk >= 96 else 4
        if bk not in [c.kwargs["BLOCK_K"] for c in configs]:
            configs.append(triton.Config({"BLOCK_M": rows_block, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                                         num_warps=warps, num_stages=stages))
    return configs[:1] if not AUTOTUNE else configs


def _wgrad_configs(k: int, c: int, fp64: bool = False) -> list[triton.Config]:
    if fp64:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": _pow2(k, 16, 32), "BLOCK_K": _pow2(c, 16, 32)},
                              num_warps=4, num_stages=2)]
    bn, bk = _pow2(k, 16, 128), _pow2(c, 16, 64)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=3)
               for bm, warps in ((64, 4), (128, 8))]
    return configs[:1] if not AUTOTUNE else configs


# The forward/dgrad row block is fixed (not tuned) because the per-tile
# statistics partials are laid out by it.
ROWS_GPU, ROWS_INTERPRET = 128, 32


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, config_key: tuple) -> object:
    kind, *args = config_key
    configs = _wgrad_configs(*args) if kind == "wgrad" else _gemm_configs(*args)
    return triton.autotune(configs=configs, key=["M", "C", "K", "H", "W", "OH", "OW"])(getattr(K, kernel_name))


def _launch_gemm(kernel_name: str, grid, config_key: tuple, interpret_meta: dict, *args, **constexprs) -> None:
    if INTERPRET:
        getattr(K, kernel_name)[grid](*args, **constexprs, **interpret_meta)
        return
    kind, *shape = config_key
    configs = _wgrad_configs(*shape) if kind == "wgrad" else _gemm_configs(*shape)
    if len(configs) == 1:
        cfg = configs[0]
        getattr(K, kernel_name)[grid](*args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps,
                                      num_stages=cfg.num_stages)
    else:
        _tuned(kernel_name, config_key)[grid](*args, **constexprs)


# ------------------------------------------------------------- statistics


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (mean, biased variance) of a 4-D x, stable for |mean| >> std."""
    check_device(x)
    n, c, h, w = x.shape
    m = n * h * w
    sdt = stats_dtype(x)
    mean = torch.empty(c, device=x.device, dtype=sdt)
    var = torch.empty_like(mean)
    if m == 0:
        return mean.fill_(float("nan")), var.fill_(float("nan"))
    block_m = 64 if INTERPRET else 256
    block_c = _pow2(c, 16, 64 if INTERPRET else 32)
    tiles = triton.cdiv(m, block_m)
    mean_part = torch.empty((tiles, c), device=x.device, dtype=sdt)
    m2_part = torch.empty_like(mean_part)
    K.channel_stats_partial_kernel[(tiles, triton.cdiv(c, block_c))](
        x, mean_part, m2_part, m, c, h * w, w, *_strides(x), BLOCK_M=block_m, BLOCK_C=block_c,
        IS_FP64=sdt == torch.float64)
    merge_stats(mean_part, m2_part, m, block_m, mean, var)
    return mean, var


def merge_stats(mean_part: Tensor, m2_part: Tensor, count: int, rows_per_tile: int, mean: Tensor,
                var: Tensor) -> None:
    tiles, c = mean_part.shape
    block_c = _pow2(c, 16, 64)
    K.merge_stats_kernel[(triton.cdiv(c, block_c),)](
        mean_part, m2_part, mean, var, count, c, tiles, rows_per_tile, BLOCK_T=32 if INTERPRET else 64,
        BLOCK_C=block_c, IS_FP64=mean.dtype == torch.float64)


# ---------------------------------------------------------------- forward


def conv_forward(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, stride: int, padding: int,
                 residual: Optional[Tensor], emit_stats: bool) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """y = conv2d(relu(x*scale + shift), weight) [+ residual] in x's memory
    format; with ``emit_stats`` also the (mean, biased var) of y per channel."""
    check_device(x)
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    m = n * oh * ow
    y = _like_layout((n, k_out, oh, ow), x)
    dot_dtype, precision, is_fp64 = _dot(x.dtype)
    w_packed = weight.permute(2, 3, 1, 0).contiguous()  # [KH, KW, C, K]
    rows = ROWS_INTERPRET if INTERPRET else ROWS_GPU
    tiles = triton.cdiv(m, rows)
    sdt = stats_dtype(x)
    mean_part = m2_part = mean = var = None
    if emit_stats:
        mean_part = torch.empty((tiles, k_out), device=x.device, dtype=sdt)
        m2_part = torch.empty_like(mean_part)
    if m > 0:
        res = residual if residual is not None else y
        grid = lambda meta: (tiles * triton.cdiv(k_out, meta["BLOCK_N"]),)  # noqa: E731
        _launch_gemm("conv_fwd_kernel", grid, ("gemm", rows, k_out, c, is_fp64),
                     {"BLOCK_M": rows, "BLOCK_N": _pow2(k_out, 16, 32), "BLOCK_K": _pow2(c, 16, 16),
                      "GROUP_M": 4},
                     x, w_packed, scale, shift, res, y, mean_part if emit_stats else y,
                     m2_part if emit_stats else y, m, c, k_out, h, w, oh, ow, *_strides(x), *_strides(y),
                     *_strides(res), STRIDE=stride, PAD=padding, KH=kh, KW=kw,
                     HAS_RESIDUAL=residual is not None, EMIT_STATS=emit_stats, IS_FP64=is_fp64,
                     DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision)
    if emit_stats:
        mean = torch.empty(k_out, device=x.device, dtype=sdt)
        var = torch.empty_like(mean)
        if m > 0:
            merge_stats(mean_part, m2_part, m, rows, mean, var)
        else:
            mean.fill_(float("nan")), var.fill_(float("nan"))
    return y, mean, var


# --------------------------------------------------------------- backward


def conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor,
                  shift: Tensor, training: bool, stride: int, padding: int, need_input_grads: bool,
                  need_weight_grad: bool) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor],
                                                   Optional[Tensor]]:
    """(grad_x, grad_weight, sum gz*xhat = grad_gamma, sum gz = grad_beta) of
    y = conv(relu(x*scale + shift)); the activation is recomputed from x."""
    check_device(x)
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    dot_dtype, precision, is_fp64 = _dot(x.dtype)
    grad_y = grad_y.to(x.dtype)
    grad_x = grad_w = sum_gz_xhat = sum_gz = None
    sdt = stats_dtype(x)
    if need_input_grads:
        m = n * h * w
        rows = ROWS_INTERPRET if INTERPRET else ROWS_GPU
        tiles = triton.cdiv(m, rows)
        gz = torch.empty_like(x)  # keeps x's dense layout (channels_last or contiguous)
        if not (gz.stride() == x.stride()):
            x = x.contiguous(memory_format=_format_of(gz))
        part_gz = torch.zeros((tiles, c), device=x.device, dtype=sdt)
        part_gz_xhat = torch.zeros_like(part_gz)
        if m > 0:
            w_packed = weight.permute(2, 3, 0, 1).contiguous()  # [KH, KW, K, C]
            grid = lambda meta: (tiles * triton.cdiv(c, meta["BLOCK_N"]),)  # noqa: E731
            _launch_gemm("conv_dgrad_kernel", grid, ("gemm", rows, c, k_out, is_fp64),
                         {"BLOCK_M": rows, "BLOCK_N": _pow2(c, 16, 32), "BLOCK_K": _pow2(k_out, 16, 16),
                          "GROUP_M": 4},
                         grad_y, w_packed, x, scale, shift, mean, invstd, gz, part_gz, part_gz_xhat,
                         m, c, k_out, h, w, oh, ow, *_strides(grad_y), *_strides(x),
                         STRIDE=stride, PAD=padding, KH=kh, KW=kw, IS_FP64=is_fp64, DOT_DTYPE=dot_dtype,
                         INPUT_PRECISION=precision)
        sum_gz = part_gz.sum(0)
        sum_gz_xhat = part_gz_xhat.sum(0)
        if training:
            # gx = scale*(gz - sum_gz/M - xhat*sum_gz_xhat/M) = gz*scale + x*k1 + k0
            k1 = -scale * sum_gz_xhat * invstd / max(m, 1)
            k0 = -scale * sum_gz / max(m, 1) - k1 * mean
        else:
            k1 = k0 = scale
        block_m, block_c = (64, _pow2(c, 16, 64)) if INTERPRET else (128, _pow2(c, 16, 64))
        if m > 0:
            K.bn_grad_input_kernel[(triton.cdiv(m, block_m), triton.cdiv(c, block_c))](
                gz, x, gz, scale, k1, k0, m, c, h * w, w, *_strides(x), TRAINING=training, IS_FP64=is_fp64,
                BLOCK_M=block_m, BLOCK_C=block_c)
        grad_x = gz
    if need_weight_grad:
        m = n * oh * ow
        tiles = kh * kw * triton.cdiv(k_out, _pow2(k_out, 16, 128)) * triton.cdiv(c, _pow2(c, 16, 64))
        # Enough programs to fill a GPU (~132 SMs x 2) without tiny splits.
        split = 1 if INTERPRET else max(1, min(triton.cdiv(m, 512), triton.cdiv(264, max(tiles, 1))))
        part = torch.empty((split, kh * kw, k_out, c), device=x.device, dtype=sdt)
        if m > 0:
            grid = lambda meta: (kh * kw, triton.cdiv(k_out, meta["BLOCK_N"]) * triton.cdiv(c, meta["BLOCK_K"]),  # noqa: E731
                                 split)
            _launch_gemm("conv_wgrad_kernel", grid, ("wgrad", k_out, c, is_fp64),
                         {"BLOCK_M": 32, "BLOCK_N": _pow2(k_out, 16, 32), "BLOCK_K": _pow2(c, 16, 32)},
                         x, grad_y, scale, shift, part, m, c, k_out, h, w, oh, ow, split,
                         *_strides(x), *_strides(grad_y), STRIDE=stride, PAD=padding, KH=kh, KW=kw,
                         IS_FP64=is_fp64, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision)
        else:
            part.zero_()
        grad_w = part.sum(0).view(kh, kw, k_out, c).permute(2, 3, 0, 1).to(weight.dtype)
        grad_w = grad_w.contiguous(memory_format=_format_of(weight))
    return grad_x, grad_w, sum_gz_xhat, sum_gz


def _format_of(t: Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
