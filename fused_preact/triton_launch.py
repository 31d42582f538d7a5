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

import collections
import functools
import itertools
import os
import warnings
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_kernels as K
from .functional import memory_format_of as _format_of
from .functional import stats_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# FUSED_PREACT_TRITON_AUTOTUNE=0: the first config of each set, no tuning
# (fewer compiles: the GPU tests use it).
AUTOTUNE = os.environ.get("FUSED_PREACT_TRITON_AUTOTUNE", "1") != "0"

# Kernel launches by kernel name (benchmarks/count_launches.py reads it).
LAUNCHES: "collections.Counter[str]" = collections.Counter()

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


def _strides(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _like_layout(shape: tuple[int, ...], x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An empty tensor of ``shape`` in x's memory format (channels_last or
    contiguous), allocated in it: ``.contiguous(memory_format=...)`` on a fresh
    tensor would copy it, a kernel launch and a pass over the output."""
    return torch.empty(shape, device=x.device, dtype=dtype or x.dtype, memory_format=_format_of(x))


def _cdiv(a: int, b: int) -> int:
    # Plain integer math: triton.cdiv/next_power_of_2 are ConstexprFunctions
    # in triton 3.8, several microseconds per call from Python.
    return -(-a // b)


def fast_divisor(d: int) -> tuple[int, int]:
    """(mul, shr) with x // d == (x * mul) >> shr for every 0 <= x < 2**31
    (mul = ceil(2**(31 + l) / d), l = ceil(log2 d); the error of mul is under
    d <= 2**l, so x * error stays under 2**(31 + l)): the kernels' _fast_div.
    mul < 2**32 is returned as its int32 bit pattern, so that Triton types it
    as an i32 whatever d is."""
    if d < 1:
        raise ValueError(f"fast_divisor needs a positive divisor, got {d}")
    shr = 31 + (d - 1).bit_length()
    mul = -(-(1 << shr) // d)
    return (mul - (1 << 32) if mul >= 1 << 31 else mul), shr


# The GEMM kernels' offsets (WIDE_INDEX): int64 where a tensor's largest
# offset may reach 2**30, else int32. Half of int32's range is kept as
# margin: a tile's masked rows past the end (and padding taps) form offsets
# beyond the tensor that are never read but must not overflow. The largest
# offset is bounded by the tensor's storage (its extent through the strides
# for a tensor that owns its storage; more for a view of a larger one): one
# call per tensor, a third of the host time of summing over the strides.
# None = decided per launch; True/False forces one form (tests); env
# FUSED_PREACT_WIDE_INDEX=1 forces int64 (the form before session 7, for a
# side-by-side measurement).
WIDE_INDEX: Optional[bool] = True if os.environ.get("FUSED_PREACT_WIDE_INDEX") == "1" else None


def _wide_index(*tensors: Tensor) -> bool:
    if WIDE_INDEX is not None:
        return WIDE_INDEX
    return any(_storage_reaches_2_30(t) for t in tensors)


def _storage_reaches_2_30(t: Tensor) -> bool:
    """Whether an offset into ``t`` may reach 2**30 elements (its storage's
    size bounds them): where int32 offsets, with half their range as
    margin, no longer do (the GEMMs' WIDE_INDEX; the pack and split-sum
    kernels, int32 only, then leave the work to torch)."""
    return t.untyped_storage().nbytes() > t.element_size() << 30


def _dense_rows(t: Tensor) -> bool:
    """Whether pixel (n, h, w) of a 4-D tensor sits at ((n*H + h)*W + w) *
    stride(w): its pixels are rows at one stride, as in a dense channels_last
    tensor (size-1 dimensions' strides do not matter)."""
    n, _, h, w = t.shape
    sn, _, sh, sw = t.stride()
    return (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << (max(int(n), 1) - 1).bit_length()))


# ------------------------------------------------------------------ configs
# Small sets: each config is a compile (seconds) and an autotuning trial per
# shape. Tile widths follow the channel counts (16 for ResNet-164's narrow
# units, up to 128/64 for ResNet-v2-50's).


def _forms(offered: bool, forced: Optional[bool]) -> tuple[bool, ...]:
    """The values an on/off kernel form (EPILOGUE_FIRST, CHANNEL_ROWS) takes
    among the autotuning candidates: both where it is offered, off first (so
    FUSED_PREACT_TRITON_AUTOTUNE=0 keeps it off), else off; ``forced``
    True/False: only that one."""
    if forced is not None:
        return (forced,)
    return (False, True) if offered else (False,)


def _gemm_configs(rows_block: int, n_cols: int, n_red: int, fp64: bool = False, taps: int = 1,
                  flat: Optional[bool] = None, small_grid: bool = False, epilogue_tile: bool = False,
                  epilogue_first: Optional[bool] = None, wide: bool = False,
                  wide_only: bool = False, epilogue_heavy: bool = False, tma: str = "",
                  tma_only: bool = False, act_pass: int = 0, two_per_sm: int = 0,
                  two_per_sm_only: bool = False) -> list[triton.Config]:
    """Forward/dgrad: the tile spans the output channels (up to 128); eight
    warps for wide tiles, where the transformed A tile and the accumulator
    would otherwise exceed the register file (measured with triton_aot).
    With several taps each config also comes with the flat reduction loop
    (FLAT, see conv_fwd_kernel), after the unrolled one, so the autotuner
    measures both and FUSED_PREACT_TRITON_AUTOTUNE=0 keeps the unrolled one;
    a reduction of 512+ (taps x channels, 64+ channels) also gets 64-wide
    steps with a 4-stage pipeline;
    ``flat`` True/False keeps only that loop form (FLAT_LOOP). ``small_grid``
    (the full-width tiles would not give every SM two programs, as in the
    deep stages: ResNet-164's third stage at batch 128 makes 64 programs of
    128 x 64) adds half-width tiles (BLOCK_N / 2: twice the programs, each
    activation tile loaded by two of them) as candidates, also with
    32-wide steps and 4 stages (few enough registers for two programs per
    SM); so does a
    reduction of at most 64 (the 1x1 units' dgrad/forward with 16-64 input
    channels: one or two MMA steps, then an epilogue that moves the whole
    tile, which smaller programs, more of them per SM, may overlap better --
    the ResNet-164 64->16 dgrad ran at 4x its memory floor on the H200).
    ``epilogue_tile`` (a 1x1 kernel whose epilogue loads a tile: x in
    dgrad, the residual in the forward) with such a short reduction adds
    each config with that load issued first (EPILOGUE_FIRST), after the others;
    ``epilogue_first`` True/False keeps only that form (EPILOGUE_FIRST_LOAD).
    ``wide`` (forward, 256+ output channels) adds a 256-column tile (flat
    loop for 3x3): each step's activation (BN, ReLU, padding, bf16 packing:
    ~2/3 of the loop's instructions) then serves twice the MMA work. The
    flat 3x3 forward's loop issues 429 instructions per 128x128x64 step
    against 453 per 128x256x64 one (sm_90 SASS, triton 3.6), where the
    tensor cores need ~512 and ~1024 cycles: eight warps, two per scheduler,
    so by the SASS the narrow tile would be bound by instruction issue (on
    the H200 it picked the wide tile for every stage-3 forward, 1.4x faster;
    Nsight Compute then found the large forwards latency-bound: session 8).
    ``wide_only`` keeps only that tile (FWD_WIDE_TILE).
    ``tma`` ("forward" or "dgrad": one the tensor-memory accelerator can
    read, ``_tma_forward``, ``_tma_dgrad``) adds a few configs with the data
    and the weight read through tensor descriptors (the kernels' TMA);
    ``tma_only`` keeps only those (FWD_TMA, DGRAD_TMA).
    ``two_per_sm`` (16-bit data; ``_two_per_sm``) adds, after the others,
    the flat 3x3 loop's 128x64x64 8-warp tiles with up to that many stages
    again with ``maxnreg=128``, so that two programs share an SM
    (``_two_per_sm_configs``);
    ``two_per_sm_only`` keeps only those, where there are any (TWO_PER_SM).
    ``act_pass`` (forward: 1 offered, 2 only; ``_act_pass_buffer``) adds
    configs reading an activation pass's output (ACT_PASS, run by the
    config's pre_hook, so its trials include the pass: ``_act_pass_configs``).
    ``epilogue_heavy`` (a dgrad whose epilogue -- x's tile in, gz's out,
    two column sums -- is long beside its reduction: 1x1 or stride 2 in
    parity classes, at most 512 output channels) adds the half-width tile
    and the x tile loaded first: on the H200 these dgrads ran at 2-5x their
    memory floor (session 8), and with 128x128 tiles (223-255 registers a
    thread) one program fills an SM, so nothing overlaps its epilogue; the
    128x64 ones take 128-136 registers (sm_90, triton 3.6), two programs
    an SM where that is 128 (the x tile loaded first).
    fp64 (no tensor cores; for checks) gets narrow tiles that fit shared memory."""
    if fp64:
        return [triton.Config({"BLOCK_M": rows_block, "BLOCK_N": _pow2(n_cols, 16, 32), "BLOCK_K": 16,
                               "GROUP_M": 8, "FLAT": False, "EPILOGUE_FIRST": bool(epilogue_first)},
                              num_warps=4, num_stages=2)]
    bn = _pow2(n_cols, 16, 128)
    configs = []
    for bk, stages in ((_pow2(n_red, 16, 64), 3), (_pow2(n_red, 16, 32), 4)):
        # Per thread: the fp32 accumulator (BLOCK_M*BN) and the transformed
        # A tile (BLOCK_M*BK). From 80 columns together four warps spill on
        # sm_90 or come within a register of it (255 of 255 for 3x3 16x64;
        # triton_aot); eight do not.
        warps = 8 if bn + bk >= 80 else 4
        if bk not in [c.kwargs["BLOCK_K"] for c in configs]:
            configs.append(triton.Config({"BLOCK_M": rows_block, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8,
                                          "FLAT": False}, num_warps=warps, num_stages=stages))
    if n_red >= 64 and n_red * taps >= 512:
        # A long reduction: steps of 64 with 3 in flight (the 32-wide, 4-stage
        # config won most of ResNet-v2-50's 3x3 forwards on the H200, so the
        # pipeline depth rather than the step width may be what counts).
        configs.append(triton.Config({**configs[0].kwargs}, num_warps=configs[0].num_warps, num_stages=4))
    if (small_grid or n_red * taps <= 64 or epilogue_heavy) and bn >= 32:
        half, bk = bn // 2, configs[0].kwargs["BLOCK_K"]
        warps = 8 if half + bk >= 80 else 4
        # The epilogue-heavy dgrads' half tile with x's tile loaded first is
        # there to put two 8-warp programs on an SM: at most 128 registers a
        # thread, said to ptxas (maxnreg; set on the EPILOGUE_FIRST form
        # below), which otherwise gave the stride-2 form 142 once the
        # finalize tail was added (sm_90, triton 3.6: 128 without spills
        # when asked; the other order spills 8-16 bytes at 128).
        configs.append(triton.Config({**configs[0].kwargs, "BLOCK_N": half}, num_warps=warps,
                                     num_stages=configs[0].num_stages,
                                     maxnreg=128 if epilogue_heavy and warps == 8 else None))
        narrow_bk = _pow2(n_red, 16, 32)
        if small_grid and narrow_bk != bk:
            # Two programs per SM: the half-width forward with 32-wide steps
            # takes 85-122 registers with eight warps (128x64x32, 4 stages,
            # 98 flat; sm_90, triton 3.6), where the 64-wide one takes 136-138
            # and one program fills an SM. On the H200 the large forwards
            # were latency-bound at one program per SM (Nsight Compute: 24%
            # of issue slots busy), and stage 4's 128x128 tiles make 100
            # programs for 132 SMs (session 8).
            configs.append(triton.Config({**configs[0].kwargs, "BLOCK_N": half, "BLOCK_K": narrow_bk},
                                         num_warps=8, num_stages=4))
    if taps > 1:
        configs += [triton.Config({**c.kwargs, "FLAT": True}, num_warps=c.num_warps, num_stages=c.num_stages,
                                  maxnreg=c.maxnreg) for c in configs]
        if flat is not None:
            configs = [c for c in configs if c.kwargs["FLAT"] == flat]
    configs = [triton.Config({**c.kwargs, "EPILOGUE_FIRST": first}, num_warps=c.num_warps, num_stages=c.num_stages,
                             maxnreg=c.maxnreg if first else None)
               for first in _forms(epilogue_tile and n_red * taps <= 64 or epilogue_heavy, epilogue_first)
               for c in configs]
    if two_per_sm and taps > 1:
        twins = _two_per_sm_configs(configs, two_per_sm)
        if two_per_sm_only and twins:
            return twins[:1] if not AUTOTUNE else twins
        configs += twins
    if wide and n_cols >= 256 and (taps == 1 or flat is not False) and not epilogue_first:
        # (the unrolled 3x3 loop spills with it, and so would an epilogue tile loaded first)
        configs.append(triton.Config({"BLOCK_M": rows_block, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8,
                                      "FLAT": taps > 1, "EPILOGUE_FIRST": False}, num_warps=8, num_stages=3))
        if wide_only:
            return configs[-1:]
    if act_pass:
        act_configs = _act_pass_configs(configs[0], n_red * taps >= 512 and n_red >= 64, taps > 1,
                                        wide and n_cols >= 256 and flat is not False)
        if act_pass == 2:
            return act_configs[:1] if not AUTOTUNE else act_configs
        configs += act_configs
    if tma:
        # A few candidates, not a copy of every config: each costs a compile
        # on a fresh machine's first step (~1-2 s). Without per-element
        # address arithmetic the TMA form takes fewer registers (sm_90,
        # triton 3.6, 3x3 with residual and statistics): 128x128x64 152-162
        # (1x1 or 3x3), 128 without spills when asked (maxnreg), so two
        # 8-warp programs share an SM (99 KB of shared memory each at 3
        # stages); 128x128x32 at 4 stages 126 (66 KB); the half-width
        # 128x64x64 122 (75 KB), for grids too small to fill the GPU (ResNet-
        # v2-50's fourth stage: 100 programs of 128x128 for 132 SMs); and the
        # 256-column tile, 254 (one program an SM). The pointer forms' 3x3
        # 128x128x64 takes 162-246 (the unrolled loop the most): one program
        # an SM, which Nsight Compute found latency-bound (session 8). The
        # dgrad's 128x128 tiles take 226-239 registers either way (its
        # epilogue: x's tile, gz, two column sums; 400+ bytes spilled at 128,
        # so no limit), its half-width ones 123-136.
        first = configs[0]
        bn, bk, warps = first.kwargs["BLOCK_N"], first.kwargs["BLOCK_K"], first.num_warps
        # (maxnreg only for the 3x3 forward: the 1x1 one spills 16 bytes at 128 with triton 3.8)
        limit = 128 if tma == "forward" and warps == 8 and bn >= 128 and taps > 1 else None
        tma_shapes = [(bn, bk, warps, 3, limit)]
        if bk == 64:
            tma_shapes.append((bn, 32, warps, 4, None))
        if small_grid and bn >= 32:
            tma_shapes.append((bn // 2, bk, 8 if bn // 2 + bk >= 80 else 4, 3, None))
        tma_shapes += [(256, 64, 8, 3, None) for c in configs if c.kwargs["BLOCK_N"] == 256]
        tma_configs = [triton.Config({**first.kwargs, "BLOCK_N": n, "BLOCK_K": k, "FLAT": False,
                                      "EPILOGUE_FIRST": False, "TMA": True},
                                     num_warps=w, num_stages=s, maxnreg=r) for n, k, w, s, r in tma_shapes]
        if tma_only:
            return tma_configs[:1] if not AUTOTUNE else tma_configs
        configs += tma_configs
    return configs[:1] if not AUTOTUNE else configs


def _two_per_sm_configs(configs: list[triton.Config], max_stages: int) -> list[triton.Config]:
    """The flat 3x3 loop's 128x64x64 8-warp configs of ``configs`` with at
    most ``max_stages`` stages again, told to take at most 128 registers a
    thread (``maxnreg``), so that two programs share an SM: 2 x 128 x 256
    registers fill its 64K, and 2 x 72-96 KB of shared memory (the dgrad's 3
    or 4 stages, the forward's 3: 74 KB with triton 3.6, 89 KB with 3.8)
    fit its 228 KB.

    Why: Nsight Compute found the large forwards latency-bound at one
    program per SM (session 8: 24% of issue slots busy, no eligible warp 68%
    of cycles), and at this tile the flat loops take a few registers more
    than 128 (sm_90, triton 3.6, the GPU machines' version: the forward
    138, the dgrad 136; 3.8: 152 and 128), so one program fills an SM and
    nothing overlaps its pipeline's fill and its epilogue: ResNet-v2-50's
    first 3x3 layer (64 channels), whose forward and dgrad took 103 and 111
    us on the H200 for a 19 us floor (session 11), and the half-width
    candidates of the smaller grids.
    Held to 128, ptxas compiles them without spills (bf16, sm_90, triton
    3.6 and 3.8, every variant: ``triton_aot``), 5-30 more instructions a
    step, except where ``_two_per_sm`` does not offer them: with a small
    3x3 weight read as it is, in fp32 (ResNet-164's; 3.6: the forward
    spills 32-56 bytes, the dgrad 8) and with 64-bit offsets (3.6: the
    dgrad 8). Not the forward's 4 stages (3.6 spills 8-16 bytes in some
    variants, and with 3.8's 114 KB two would not fit), nor 128x128x64
    tiles (at 128 registers the dgrad's spill 472 bytes, the forward's 8-24;
    the forward's 32-wide 4-stage 128x128 tile already takes 128 registers
    and 66 KB: two an SM).
    After the other candidates (FUSED_PREACT_TRITON_AUTOTUNE=0 keeps the
    first config); the autotuner's trials decide."""
    return [triton.Config(dict(c.kwargs), num_warps=8, num_stages=c.num_stages, maxnreg=128) for c in configs
            if c.kwargs.get("FLAT") and not c.kwargs.get("TMA") and not c.kwargs.get("ACT_PASS")
            and c.num_warps == 8 and c.maxnreg is None and c.kwargs["BLOCK_N"] == 64 and c.kwargs["BLOCK_K"] == 64
            and c.num_stages <= max_stages]


def _two_per_sm(max_stages: int, x: Tensor, weight: Tensor, dense_axis: int, wide_index: bool) -> tuple[int, bool]:
    """_gemm_configs' (two_per_sm, two_per_sm_only) for a forward (3
    stages) or dgrad (4) of ``x`` with the GEMM's ``weight``: offered for
    16-bit data (TWO_PER_SM), with the weight packed (in x's dtype, its
    ``dense_axis`` innermost: the forward's K, the dgrad's C; not a small
    3x3 one read as it is, in fp32) and 32-bit offsets: the specializations
    that ``triton_aot`` checks compile without spills, which the others may
    not (``_two_per_sm_configs``)."""
    if (TWO_PER_SM is False or x.element_size() != 2 or weight.dtype != x.dtype
            or weight.stride(dense_axis) != 1 or wide_index):
        return 0, False
    return max_stages, bool(TWO_PER_SM)


# Programs that keep a GPU busy: two per SM of an H100/H200.
GPU_SMS = 132
FILL_PROGRAMS = 2 * GPU_SMS


def _small_grid(row_tiles: int, cols: int) -> bool:
    """Whether full-width tiles (up to 128 columns) leave the GPU short of programs."""
    return row_tiles * _cdiv(cols, _pow2(cols, 16, 128)) < FILL_PROGRAMS


def _act_pass_configs(first: triton.Config, long_reduction: bool, taps: bool,
                      wide: bool) -> list[triton.Config]:
    """The forward's ACT_PASS candidates: ``first``'s tile in the unrolled
    and (with several ``taps``) the flat loop, and with 4 stages for a long
    reduction (the forms the dgrad, the same loop without the activation,
    picked for ResNet-v2-50's 3x3 layers on the H200: session 11); ``wide``:
    also the 256-column tile (flat for 3x3: 251 registers, no spills, where
    the unrolled loop spills; sm_90, triton 3.6)."""
    forms = [(False, first.num_stages)] + ([(True, first.num_stages)] if taps else [])
    forms += [(taps, 4)] if long_reduction else []
    configs = [triton.Config({**first.kwargs, "FLAT": flat, "EPILOGUE_FIRST": False, "ACT_PASS": True},
                             num_warps=first.num_warps, num_stages=stages, pre_hook=_act_pass_hook)
               for flat, stages in forms]
    if wide:
        configs.append(triton.Config({**first.kwargs, "BLOCK_N": 256, "BLOCK_K": 64, "FLAT": taps,
                                      "EPILOGUE_FIRST": False, "ACT_PASS": True},
                                     num_warps=8, num_stages=3, pre_hook=_act_pass_hook))
    return configs


def _wgrad_configs(k: int, c: int, fp64: bool = False, channel_rows: Optional[bool] = None, tma: bool = False,
                   tma_only: bool = False, act_pass: int = 0, tap_rows: int = 0) -> list[triton.Config]:
    """Weight-gradient tiles: K up to 128 by C up to 64, 64 or 128 rows a
    step. Where the C tile is 64 (wgmma's rows) each also comes transposed
    (CHANNEL_ROWS, see conv_wgrad_kernel: the activation as the register
    operand, so Triton keeps wgmmas in flight), and from 128 channels a
    transposed one with 128-channel tiles (gy read once per 128 channels
    instead of 64; half the programs), after the plain ones, so
    FUSED_PREACT_TRITON_AUTOTUNE=0 keeps the plain order; ``channel_rows``
    True/False keeps only that order (WGRAD_CHANNEL_ROWS). ``tma`` (x and
    gy readable through TMA descriptors: ``_tma_wgrad``) adds the configs of
    the preferred order (transposed where offered) with the TMA form;
    ``tma_only`` keeps only those (WGRAD_TMA). ``act_pass`` (1 offered, 2
    only; ``_act_pass_buffer``) adds the 64-row tile in each order reading an
    activation pass's output (ACT_PASS; the pass is the config's pre_hook,
    so the trials time it too). ``tap_rows`` (1 offered, 2 only;
    ``_wgrad_tap_rows_mode``) adds the kernel-row form (TAP_ROWS: a
    program's three taps at once, each activation serving three MMAs),
    transposed, 64x64 tiles, 64 pixels a step in four warps (sm_90, triton
    3.6: 198 registers, 94 KB, 607 instructions a step for three MMAs,
    where the one-tap form takes 419 for one) and 128 in eight (166
    registers, 188 KB, 693 for three 128-row MMAs)."""
    if tap_rows == 2:  # only that form: its first config
        return _wgrad_tap_rows_configs(k, c, fp64)[:1]
    if fp64:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": _pow2(k, 16, 32), "BLOCK_K": _pow2(c, 16, 32),
                               "CHANNEL_ROWS": bool(channel_rows)}, num_warps=4, num_stages=2)]
    bn, bk = _pow2(k, 16, 128), _pow2(c, 16, 64)
    orders = _forms(bk >= 64, channel_rows)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "CHANNEL_ROWS": rows},
                             num_warps=warps, num_stages=3)
               for rows in orders for bm, warps in ((64, 4), (128, 8))]
    if True in orders and c >= 128:  # transposed, 128 channels a tile: wgmma's 64 rows twice over
        configs.append(triton.Config({"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": 128, "CHANNEL_ROWS": True},
                                     num_warps=8, num_stages=3))
    if tma:
        preferred = orders[-1]
        tma_configs = [triton.Config({**cfg.kwargs, "TMA": True}, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages)
                       for cfg in configs if cfg.kwargs["CHANNEL_ROWS"] == preferred]
        if tma_only:
            return tma_configs[:1] if not AUTOTUNE else tma_configs
        configs += tma_configs
    if act_pass:
        act_configs = [triton.Config({**cfg.kwargs, "ACT_PASS": True}, num_warps=cfg.num_warps,
                                     num_stages=cfg.num_stages, pre_hook=_act_pass_hook)
                       for cfg in configs if cfg.kwargs["BLOCK_M"] == 64 and cfg.kwargs["BLOCK_K"] == bk
                       and not cfg.kwargs.get("TMA")]
        if act_pass == 2:
            return act_configs[:1] if not AUTOTUNE else act_configs
        configs += act_configs
    if tap_rows:
        configs += _wgrad_tap_rows_configs(k, c, fp64)
    return configs[:1] if not AUTOTUNE else configs


# The kernel-row weight gradient's K and C tile (TAP_ROWS: three
# accumulators of TAP_ROWS_TILE^2 fp32 in four warps).
TAP_ROWS_TILE = 64


def _wgrad_tap_rows_configs(k: int, c: int, fp64: bool) -> list[triton.Config]:
    """The TAP_ROWS form's configs (transposed): 64 pixels a step in four
    warps, then 128 in eight; fp64 (checks) one with narrow tiles, 2 stages."""
    if fp64:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": _pow2(k, 16, 32), "BLOCK_K": _pow2(c, 16, 32),
                               "CHANNEL_ROWS": True, "TAP_ROWS": True}, num_warps=4, num_stages=2)]
    tile = {"BLOCK_N": _pow2(k, 16, TAP_ROWS_TILE), "BLOCK_K": _pow2(c, 16, TAP_ROWS_TILE)}
    return [triton.Config({"BLOCK_M": bm, **tile, "CHANNEL_ROWS": True, "TAP_ROWS": True}, num_warps=warps,
                          num_stages=3)
            for bm, warps in ((64, 4), (128, 8))]


def _wgrad_split(m: int, k: int, c: int, taps: int, kernel_rows: int = 0) -> int:
    """Splits of the weight gradient's M rows, at least 512 rows each: enough
    programs to fill a GPU, three times that for 3x3 layers narrower than 64
    channels, whose programs do little work per row tile (ResNet-164's first
    3x3 wgrad: 88 splits instead of 30; see benchmarks/RESULTS.md, session 5).
    ``kernel_rows``: the TAP_ROWS form may run (one program per kernel row
    and 64x64 tile, fewer than one per tap and 128x64 tile), so enough for
    its grid, the larger of the two."""
    tiles = taps * _cdiv(k, _pow2(k, 16, 128)) * _cdiv(c, _pow2(c, 16, 64))
    if kernel_rows:
        tiles = min(tiles, kernel_rows * _cdiv(k, _pow2(k, 16, TAP_ROWS_TILE)) * _cdiv(c, _pow2(c, 16, TAP_ROWS_TILE)))
    fill = FILL_PROGRAMS * (3 if taps > 1 and c < 64 else 1)
    return max(1, min(_cdiv(m, 512), _cdiv(fill, tiles)))


def _wgrad_tap_rows_mode(x: Tensor, c: int, kh: int, kw: int, stride: int, padding: int) -> int:
    """_wgrad_configs' ``tap_rows`` for a weight gradient (WGRAD_TAP_ROWS):
    0 not offered, 1 offered beside the other configs, 2 only. The form
    takes a stride-1 conv with "same" padding and three taps a kernel row;
    offered on a GPU for 16-bit data from 64 input channels (its activation
    tile is the transposed MMA's register operand, 64 channels = wgmma's
    rows); forced (True) for any dtype and channel count."""
    if WGRAD_TAP_ROWS is False or not (stride == 1 and kh == kw == 3 and padding == 1):
        return 0
    if WGRAD_TAP_ROWS:
        return 2
    return int(AUTOTUNE and not INTERPRET and x.is_cuda and x.element_size() == 2 and c >= 64)


def _act_pass_buffer(x: Tensor, taps: int, k_out: int) -> tuple[int, Tensor]:
    """(mode, buffer) of a GEMM's ACT_PASS form (see ACT_PASS) for a conv of
    ``taps`` taps and ``k_out`` output channels: 0 not offered (the buffer
    argument is then x, never read), 1 offered beside the other configs, 2
    the only form (forced: any conv); the buffer, where offered, a
    temporary laid out as x (taken from the caching allocator at every
    launch, whichever form the autotuner picked: host work, no device work;
    the launch's config is not known here)."""
    mode = 0
    if ACT_PASS:
        mode = 2
    elif (ACT_PASS is None and AUTOTUNE and not INTERPRET and x.is_cuda and x.element_size() == 2
          and x.shape[1] >= ACT_PASS_CHANNELS and taps * _cdiv(k_out, 128) >= ACT_PASS_READS):
        mode = 1  # (without autotuning the first config runs, never an ACT_PASS one)
    if mode == 0:
        return 0, x
    act = torch.empty_like(x)  # (preserve_format: a dense x's strides)
    return (mode, act) if act.stride() == x.stride() else (0, x)


def activation_pass(x: Tensor, scale: Tensor, shift: Tensor, out: Tensor) -> None:
    """out = relu(x*scale + shift) in out's dtype, ``out`` laid out as x:
    the input of the GEMMs' ACT_PASS form."""
    n, c, h, w = x.shape
    m = n * h * w
    block_m, block_c = (32, 16) if INTERPRET else (128, _pow2(c, 16, 64))
    _run("activation_pass_kernel", (_cdiv(m, block_m), _cdiv(c, block_c)), x, scale, shift, out, m, c, h * w, w,
         *_strides(x), BLOCK_M=block_m, BLOCK_C=block_c, IS_FP64=x.dtype == torch.float64)


def _act_pass_hook(nargs: dict) -> None:
    """The ACT_PASS configs' pre_hook: the activation pass before the GEMM,
    at every launch of the config (the autotuner's trials included, so they
    time the pass with the GEMM)."""
    activation_pass(nargs["x_ptr"], nargs["scale_ptr"], nargs["shift_ptr"], nargs["act_ptr"])


# The forward/dgrad row block is fixed (not tuned) because the per-tile
# statistics partials are laid out by it: a forward's emitted moments hold
# one (mean, M2) per STATS_ROWS rows of its output.
ROWS_GPU, ROWS_INTERPRET = 128, 32
STATS_ROWS = ROWS_INTERPRET if INTERPRET else ROWS_GPU
# The reduction loop form of the forward/dgrad kernels with several taps:
# None = autotuned (GPU; the unrolled form without autotuning and under the
# interpreter), True/False = only the flat/unrolled one (the tests run both).
FLAT_LOOP: Optional[bool] = None
# The dgrad of a stride-2 conv in four parity classes of input pixels, each
# visiting only its taps (conv_dgrad_kernel's PARITY); False (env
# FUSED_PREACT_DGRAD_PARITY=0, or tests) visits all taps with masked rows.
DGRAD_PARITY = os.environ.get("FUSED_PREACT_DGRAD_PARITY", "1") != "0"
# Per-channel reductions over per-tile partials (merge_stats, bn_finalize,
# bn_backward_finalize): one program per MERGE_C channels walks the tiles
# MERGE_T at a time, a chain of dependent loads, so few and wide steps:
# ResNet-164's first stage at batch 128 has 1024 tiles of 128 rows, 4 steps
# of 256 (16 of 64 before) and 4 programs for its 64 channels (1 before).
MERGE_T, MERGE_C = (32, 64) if INTERPRET else (256, 16)
# The forward/dgrad epilogue's tile load (residual, x) issued before the
# reduction loop (EPILOGUE_FIRST in the kernels): None = both autotuned for
# short reductions (GPU; after the loop under the interpreter), True/False =
# only that form (the tests run both).
EPILOGUE_FIRST_LOAD: Optional[bool] = None
# The forward's 256-column tile (_gemm_configs' ``wide``): None = an
# autotuning candidate from 256 output channels with 16-bit inputs (GPU),
# True = only that tile where it is offered (and under the interpreter, any
# dtype), False = never (tests).
FWD_WIDE_TILE: Optional[bool] = None
# The weight gradient of a stride-1 3x3 conv one kernel row a program
# (conv_wgrad_kernel's TAP_ROWS: the row's three taps at once over input
# pixels, each activation computed once for three MMAs instead of once per
# tap). New code: OFF by default until a GPU run has passed its tests (env
# FUSED_PREACT_WGRAD_TAP_ROWS=1: autotuning candidates where
# _wgrad_tap_rows_mode offers them); True = only that form (tests), False =
# never.
WGRAD_TAP_ROWS: Optional[bool] = None if os.environ.get("FUSED_PREACT_WGRAD_TAP_ROWS", "0") == "1" else False
# The flat 3x3 forward's and dgrad's tiles held to 128 registers, two
# programs an SM (_two_per_sm_configs): None = autotuning candidates (GPU,
# 16-bit data; the same kernels, only a register limit for ptxas, which
# compiles them without spills: triton_aot), True = only those where they
# are offered (the GPU tests), False = never (env FUSED_PREACT_TWO_PER_SM=0).
TWO_PER_SM: Optional[bool] = None if os.environ.get("FUSED_PREACT_TWO_PER_SM", "1") != "0" else False
# The GEMMs reading their operands through TMA descriptors (the kernels'
# TMA) are OFF by default: on an H200 (session 11) most of the tests that
# force them failed (tests/test_triton.py::test_gemms_through_tma_descriptors;
# which check failed was lost to the run's time limit), so until a GPU run
# passes them they are offered only on request. Env
# FUSED_PREACT_{FWD,DGRAD,WGRAD}_TMA=1: offered as autotuning candidates
# (None: compute capability 9+, 16-bit inputs, where ``_tma_forward`` /
# ``_tma_dgrad`` / ``_tma_wgrad`` allow); True = only that form where it is
# allowed (also under the interpreter, any dtype: the tests); False = never.
def _tma_switch(name: str) -> Optional[bool]:
    return None if os.environ.get(f"FUSED_PREACT_{name}_TMA", "0") == "1" else False


# The forward reading x and the weight (conv_fwd_kernel's TMA).
FWD_TMA: Optional[bool] = _tma_switch("FWD")
# The dgrad reading grad_y and the weight (conv_dgrad_kernel's TMA).
DGRAD_TMA: Optional[bool] = _tma_switch("DGRAD")
# The weight gradient reading x and grad_y (conv_wgrad_kernel's TMA).
WGRAD_TMA: Optional[bool] = _tma_switch("WGRAD")
# Splits of the weight-gradient reduction over rows: None = enough programs
# to fill a GPU (one under the interpreter); a number forces it (tests).
WGRAD_SPLIT: Optional[int] = None
# The weight gradient's product order (conv_wgrad_kernel's CHANNEL_ROWS):
# None = both autotuned where the C tile is 64 (GPU; plain under the
# interpreter), True/False = only that one (the tests run both).
WGRAD_CHANNEL_ROWS: Optional[bool] = None
# The forward and weight gradient reading an activation pass's output (the
# kernels' ACT_PASS: activation_pass_kernel writes relu(x*scale + shift) to
# a temporary laid out as x, which the GEMM reads as a plain convolution
# reads its input, instead of computing each activation once per tap and
# per output-channel tile). OFF by default until a GPU run has passed its
# tests (session 12 wrote it without a GPU; the TMA forms, which passed
# under the interpreter too, failed theirs on the H200). Env
# FUSED_PREACT_ACT_PASS=1: autotuning candidates (None: GPU, 16-bit data, x
# dense, at least ACT_PASS_CHANNELS input channels and ACT_PASS_READS
# computations of each activation), timed with the pass (the configs'
# pre_hook); True = only that form (any conv and dtype, also under the
# interpreter: the tests); False = never.
# The temporary lives for the one launch (x is what the op saves).
ACT_PASS: Optional[bool] = None if os.environ.get("FUSED_PREACT_ACT_PASS", "0") == "1" else False
# The forward's and dgrad's tap tiles copied through L1 (the kernels'
# L1_TAPS, triton_kernels._rows_through_l1: 8-byte cp.async.ca instead of
# 16-byte cp.async.cg, which bypasses L1) where the conv has several taps
# (the forward's pointer forms, the dgrad's loops outside the parity
# classes). The nine taps of a stride-1 3x3 conv re-read each input row
# nine times, all from L2 with 16-byte copies; cuDNN's kernels for
# ResNet-v2-50's first 3x3 layer ran 3x faster than ours on the H200
# (fprop 36.7 us against 108), which at our tile sizes would take ~8 TB/s
# of L2 if nothing were reused on chip (benchmarks/RESULTS.md, session
# 13). OFF until timed on a GPU: env FUSED_PREACT_L1_TAPS=1 (every such
# launch; the autotuner then picks among configs with it), True in tests.
# (The kernels write the shift as a product: tl.multiple_of does not lower
# a known alignment, and tl.where(row_ok, 0, 4) gave 8-byte copies with
# triton 3.6 but 2-byte scalar loads with 3.8.)
L1_TAPS: bool = os.environ.get("FUSED_PREACT_L1_TAPS", "0") == "1"
# (64: ResNet-v2-50's first-stage 3x3 layer, whose weight gradient took
# 132 us on the H200 for a loop of 64x64 tiles that is mostly activation;
# ResNet-164's third stage, where the pass's launch should lose its trials.)
ACT_PASS_CHANNELS = 64
# ... and where the GEMM would compute each activation at least this many
# times: once per tap and per tile of (up to 128) output channels, as the
# forward's row tiles and the weight gradient's (tap, K tile) programs do.
# So every 3x3 layer, and the 1x1 ones with 512+ output channels
# (ResNet-v2-50's expanding 1x1b layers: 4-16 reads).
ACT_PASS_READS = 4


@functools.lru_cache(maxsize=None)
def _configs_for(config_key: tuple) -> tuple:
    kind, *args = config_key
    return tuple(_wgrad_configs(*args) if kind == "wgrad" else _gemm_configs(*args))


# Each autotuning trial runs a config for TUNE_WARMUP_MS, then TUNE_REP_MS
# of timed repeats (Triton's defaults: 25 and 100): the kernels here take
# 5-250 us, so 40 ms still times hundreds of runs, and a ResNet-v2-50's
# first step tunes ~50 kernel shapes over 2-8 configs each.
TUNE_WARMUP_MS, TUNE_REP_MS = 10, 40


# On a GPU each trial replays a CUDA graph of TRIAL_LAUNCHES launches of the
# config, TRIAL_REPLAYS times, timing each replay. Timed one launch at a time
# (Triton's benchmarker: events around each launch), a kernel shorter than
# its own launch through the autotuner (~35 us of host) is timed at the
# host's pace: session 8's two H200 runs timed every candidate of ResNet-164's
# third stage at 20-27 us (run 1) and 36-38 us (run 2) whatever the config,
# and the picks were noise (s3.first's forward: the flat loop at 13.8 us in
# run 1, the unrolled one at 20.6 us in run 2). A graph has no host between
# its launches. (No L2 flush between them either: the kernels see the warm
# L2 they see in a training step.) Where a capture fails, the trial falls
# back to Triton's benchmarker (with a warning, once); env
# FUSED_PREACT_GRAPH_TRIALS=0 always uses it.
GRAPH_TRIALS = os.environ.get("FUSED_PREACT_GRAPH_TRIALS", "1") != "0"
TRIAL_LAUNCHES, TRIAL_REPLAYS = 20, 10
_graph_trials_failed: list = []


def _graph_trial(fn, quantiles):
    """Milliseconds per launch of ``fn`` at ``quantiles`` (or the median)
    over TRIAL_REPLAYS replays of a graph of TRIAL_LAUNCHES launches."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
        for _ in range(TRIAL_LAUNCHES):
            fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(TRIAL_REPLAYS)]
    with torch.cuda.stream(stream):
        graph.replay()  # warm-up
        for start, end in events:
            start.record(stream)
            graph.replay()
            end.record(stream)
    stream.synchronize()
    torch.cuda.current_stream().wait_stream(stream)
    ms = torch.tensor([start.elapsed_time(end) / TRIAL_LAUNCHES for start, end in events])
    if quantiles is None:
        return ms.median().item()
    return torch.quantile(ms, torch.tensor(quantiles, dtype=ms.dtype)).tolist()


def _trial(fn, quantiles):
    if GRAPH_TRIALS and not _graph_trials_failed and not INTERPRET and torch.cuda.is_available():
        fn()  # compiles and loads the config outside the capture (and raises here if it does not fit)
        try:
            return _graph_trial(fn, quantiles)
        except RuntimeError as error:
            _graph_trials_failed.append(repr(error))
            warnings.warn(f"autotuning trials in CUDA graphs failed ({error!r}); timing single launches instead")
            torch.cuda.synchronize()
    return triton.runtime.driver.active.get_benchmarker()(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS,
                                                          quantiles=quantiles)


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, config_key: tuple) -> object:
    return triton.autotune(configs=list(_configs_for(config_key)), key=["M", "C", "K", "H", "W", "OH", "OW"],
                           do_bench=_trial)(getattr(K, kernel_name))


# The GEMM through PyTorch's own convolution (cuDNN's kernels on a GPU)
# instead of this package's GEMM kernels, with the rest of the unit's work
# in Triton passes around it (the "library route"): forward = activation
# pass -> convolution -> residual added -> y's moments; dgrad = convolution
# backward (the activation's gradient) -> relu_backward_partials_kernel (the
# ReLU mask, gz, the BN-backward sums) -> the same finalize and gx; weight
# gradient = activation pass -> convolution backward (the weight's). The unit
# still saves only x: the activation is a temporary of one GEMM, as with
# ACT_PASS. Why: on the H200 (session 11) cuDNN's kernels for ResNet-v2-50's
# 3x3 layers took 26-44 us where ours took 48-132 (fprop, dgrad and wgrad
# alike), and those units ran at 0.57-0.93x eager, while ResNet-164's small
# layers run faster in the fused kernels (1.4-2.8x). So each GEMM of each
# shape is timed both ways at its first call, as the autotuner times its
# configs (_trial: graph replays, after one call that autotunes the Triton
# kernel), and the faster route is kept (ROUTES; reported in AUTOTUNED).
# OFF by default until a GPU run has passed its tests (session 15 wrote it
# without a GPU): env FUSED_PREACT_LIBRARY_GEMM=1 offers it (None: timed, on
# a GPU with autotuning on); True = always the library route (any device
# and dtype, also under the interpreter with torch's CPU convolution: the
# tests); False = never.
LIBRARY_GEMM: Optional[bool] = None if os.environ.get("FUSED_PREACT_LIBRARY_GEMM", "0") == "1" else False
ROUTES: dict = {}


def _routes_timed(x: Tensor) -> bool:
    """Whether LIBRARY_GEMM = None times the two routes for x: on a GPU, with autotuning on."""
    return AUTOTUNE and not INTERPRET and x.is_cuda


def _gemm_route(gemm: str, key: tuple, x: Tensor, triton_route, library_route):
    """The result of ``triton_route()`` or ``library_route()``, the GEMM
    ``gemm`` ("forward", "dgrad", "wgrad") of the shapes and layouts ``key``
    done either way into the caller's buffers (so either may run repeatedly):
    LIBRARY_GEMM forced either way, or (None) the faster as timed at the
    key's first call on a GPU (a library route whose trial raises is not
    taken). Inside a CUDA-graph capture an untimed key takes the Triton
    route (no trials there: the next call outside one times it)."""
    if LIBRARY_GEMM is not None:
        return library_route() if LIBRARY_GEMM else triton_route()
    if not _routes_timed(x):
        return triton_route()
    key = (gemm, x.device.index, *key)
    library = ROUTES.get(key)
    if library is None:
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            return triton_route()
        triton_ms = _trial(triton_route, None)
        try:
            library_ms = _trial(library_route, None)
        except RuntimeError as error:  # (a convolution PyTorch cannot run here: the Triton route, with a warning)
            warnings.warn(f"the library route of the {gemm} failed its trial ({error!r}); keeping the Triton GEMM")
            library_ms = float("inf")
        library = ROUTES[key] = library_ms < triton_ms
        AUTOTUNED.append({"kernel": f"{gemm} route", "shape": str(key[2:]), "best": "library" if library else "triton",
                          "timings_ms": {"triton": triton_ms, "library": library_ms}})
    return library_route() if library else triton_route()


# ---------------------------------------------------------------- launching
# At the batch sizes of the paper's CIFAR ResNets the fused units are
# host-bound (benchmarks/RESULTS.md), and a launch through Triton's
# JITFunction.run is the costly part: ~17 us for the conv kernels on this
# project's CPU (binding and specialising 40 arguments, the kernel cache),
# ~30 us more through the autotuner, against ~4 us for the compiled kernel's
# own launcher (benchmarks/host_overhead.py, null driver). So the first
# launch of each specialisation goes through Triton (compile, autotune) and
# keeps the CompiledKernel it returns; a later launch with the same key calls
# that kernel directly with every argument, constexprs included, in the
# kernel's parameter order: the launch form of Triton's fused-softmax
# tutorial. The key holds what Triton specialises on -- each tensor's dtype
# and address alignment, each scalar's value, the constexprs, the block
# config -- and the current device (compiled kernels are loaded per device).
# FUSED_PREACT_TRITON_FAST_LAUNCH=0 sends every launch through Triton.

FAST_LAUNCH = os.environ.get("FUSED_PREACT_TRITON_FAST_LAUNCH", "1") != "0"
# What the autotuner measured and chose, per kernel and shape (benchmarks/kernel_times.py reports it).
AUTOTUNED: list = []
_COMPILED: dict = {}
_COMPILED_MAX = 4096


@functools.lru_cache(maxsize=None)
def _pointer_count(kernel_name: str) -> int:
    """How many leading parameters of the kernel are pointers (every kernel
    here takes its tensors first, then scalars)."""
    names = getattr(K, kernel_name).arg_names
    count = next((i for i, name in enumerate(names) if not name.endswith("_ptr")), len(names))
    assert not any(name.endswith("_ptr") for name in names[count:]), kernel_name
    return count


def _spec_key(kernel_name: str, args: tuple) -> tuple:
    n = _pointer_count(kernel_name)
    return tuple([(a.dtype, a.data_ptr() & 15) for a in args[:n]]), args[n:]


def _launch(kernel_name: str, grid, args: tuple, kwargs: dict, config_key: Optional[tuple] = None) -> None:
    """Launches ``kernel_name`` on ``grid`` (a tuple, or a function of the
    launch's meta-parameters) with positional ``args`` and constexpr
    ``kwargs``; ``config_key`` names its block configs (``_configs_for``),
    autotuned when there are several. Counted in LAUNCHES; under the
    interpreter marked in the profiler, whose numpy copies are not GPU work."""
    LAUNCHES[kernel_name] += 1
    fn = getattr(K, kernel_name)
    if INTERPRET:
        if torch.autograd.profiler._is_profiler_enabled:
            with torch.profiler.record_function("triton_interpreted_kernel"):
                fn[grid](*args, **kwargs)
        else:
            fn[grid](*args, **kwargs)
        return
    key = None
    if FAST_LAUNCH:
        key = (kernel_name, config_key, triton.runtime.driver.active.get_current_device(), tuple(kwargs.items()),
               _spec_key(kernel_name, args))
        hit = _COMPILED.get(key)
        if hit is not None:
            compiled, grid3, tail, pre_hook = hit
            if pre_hook is not None:
                pre_hook(dict(zip(fn.arg_names, args)))
            compiled[grid3](*args, *tail)
            return
    configs = _configs_for(config_key) if config_key is not None else ()
    if len(configs) > 1:
        tuner = _tuned(kernel_name, config_key)
        timings_before = getattr(tuner, "configs_timings", None)
        compiled = tuner[grid](*args, **kwargs)
        best = getattr(tuner, "best_config", None)  # (the autotuner ran its pre_hook)
        meta = {**kwargs, **best.kwargs} if best is not None else None
        pre_hook = best.pre_hook if best is not None else None
        timings = getattr(tuner, "configs_timings", None)
        if best is not None and timings is not None and timings is not timings_before:
            shape = dict(zip(("M", "C", "K", "H", "W", "OH", "OW"), args[_pointer_count(kernel_name):]))
            AUTOTUNED.append({"kernel": kernel_name, "shape": shape, "best": str(best),
                              "timings_ms": {str(cfg): t for cfg, t in timings.items()}})
    elif configs:
        cfg = configs[0]
        meta = {**kwargs, **cfg.kwargs}
        limits = {"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}
        pre_hook = cfg.pre_hook
        if pre_hook is not None:
            pre_hook(dict(zip(fn.arg_names, args)))
        compiled = fn[grid](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **limits)
    else:
        meta, pre_hook = kwargs, None
        compiled = fn[grid](*args, **kwargs)
    if key is None or meta is None or not isinstance(compiled, triton.compiler.CompiledKernel):
        return
    # The constexprs after the positional arguments, those left at their
    # defaults (a config without TMA, say) included.
    meta = {**_defaults(kernel_name), **meta}
    names = fn.arg_names[len(args):]
    if any(name not in meta for name in names):
        return
    g = tuple(grid(meta) if callable(grid) else grid)
    if len(_COMPILED) >= _COMPILED_MAX:
        _COMPILED.clear()
    _COMPILED[key] = (compiled, g + (1,) * (3 - len(g)), tuple(meta[name] for name in names), pre_hook)


@functools.lru_cache(maxsize=None)
def _defaults(kernel_name: str) -> dict:
    """The kernel's parameters that have default values, with them."""
    return {p.name: p.default for p in getattr(K, kernel_name).params if p.has_default}


def _run(kernel_name: str, grid, *args, **constexprs) -> None:
    """Launches a kernel with its launch-site block sizes (no autotuning)."""
    _launch(kernel_name, grid, args, constexprs)


@functools.lru_cache(maxsize=None)
def _reduction_blocks(config_key: tuple) -> tuple[int, ...]:
    return tuple({cfg.kwargs["BLOCK_K"] for cfg in _configs_for(config_key)})


def _launch_gemm(kernel_name: str, grid, config_key: tuple, interpret_meta: dict, *args,
                 even: Optional[tuple[str, int]] = None, **constexprs) -> None:
    """Launches a GEMM kernel with its (autotuned) block config; under the
    interpreter with ``interpret_meta``'s small fixed one. ``even`` = (name,
    count): the constexpr ``name`` says whether ``count`` (the reduction's
    channels) is a multiple of the BLOCK_K of every config that may run, so
    that the kernel can drop the channel masks of its loads."""
    if even is not None:
        name, count = even
        blocks = (interpret_meta["BLOCK_K"],) if INTERPRET else _reduction_blocks(config_key)
        constexprs[name] = all(count % block == 0 for block in blocks)
    if INTERPRET:
        if interpret_meta.get("ACT_PASS"):  # (on a GPU the ACT_PASS config's pre_hook)
            _act_pass_hook(dict(zip(getattr(K, kernel_name).arg_names, args)))
        _launch(kernel_name, grid, args, {**constexprs, **interpret_meta})
    else:
        _launch(kernel_name, grid, args, constexprs, config_key)


# ------------------------------------------------------------- statistics


def _stats_blocks(x: Tensor) -> tuple[int, int]:
    """(rows, channels) of channel_stats_partial_kernel's tiles."""
    return (64 if INTERPRET else 256), _pow2(x.shape[1], 16, 64 if INTERPRET else 32)


def _channel_partials(x: Tensor, counters: Optional[Tensor] = None, finalize_args: tuple = (),
                      scalars: tuple = (0.0, 0.0, 1.0), rows: Optional[int] = None, part: Optional[Tensor] = None,
                      **flags) -> tuple[Tensor, Tensor, int]:
    """Per-tile (mean, M2) partials of x per channel, and the rows per tile
    (``rows``, or _stats_blocks'), into ``part`` [2, tiles, C] if given.
    With ``counters`` (``_tail_counters``) the kernel's last programs also
    finalize (FINALIZE): ``finalize_args`` are bn_finalize_kernel's gamma ..
    count pointers, ``scalars`` its momentum, eps, unbias, ``flags`` its
    UPDATE_RUNNING, HAS_GAMMA, HAS_BETA, COUNT_BATCH."""
    n, c, h, w = x.shape
    m = n * h * w
    sdt = stats_dtype(x)
    block_m, block_c = _stats_blocks(x)
    block_m = rows or block_m
    tiles = _cdiv(m, block_m)
    if part is None:
        part = torch.empty((2, tiles, c), device=x.device, dtype=sdt)
    assert part.shape == (2, tiles, c) and part.dtype == sdt and part.is_contiguous(), part.shape
    tail = {"FINALIZE": True, "BLOCK_T": TAIL_T_STATS, **flags} if counters is not None else {}
    _run("channel_stats_partial_kernel", (tiles, _cdiv(c, block_c)),
         x, part[0], part[1], counters if counters is not None else part, *(finalize_args or (part,) * 6),
         m, c, h * w, w, *_strides(x), *scalars, BLOCK_M=block_m, BLOCK_C=block_c, IS_FP64=sdt == torch.float64,
         **tail)
    return part[0], part[1], block_m


# ------------------------------------------------------- last-program tails
# A kernel with a FINALIZE tail (the dgrad, the channel statistics) counts
# its finished programs per column block in int32 arrival counters, zero
# between launches: its last program stores zero back (triton_kernels.
# _arrived_last). One buffer per device, allocated once, handed out in
# TAIL_SLOTS rotating slots: launches on one stream run one after another,
# and launches on several streams at once would have to be TAIL_SLOTS
# launches apart to share a slot (a CUDA graph keeps the slot it captured).
# The tail is taken where its loop over the partial rows takes at most
# TAIL_STEPS steps (one program does what the finalize kernel spreads over
# one program per 16 channels); elsewhere the finalize kernel runs. One
# step, as measured on the H200 (session 11, ResNet-164 side by side with
# FUSED_PREACT_FINALIZE_TAIL=0): a one-step tail cost what it saved (the
# third stage's units), each further step about 1-4 us more than the finalize
# kernel it replaces (the first stage's eight-step tails: +7 to +14 us a
# kernel, 5-21% more device time for those units). The tests raise it to run
# the multi-step loop.
# FUSED_PREACT_FINALIZE_TAIL=0 turns the tails off (side-by-side runs).
FINALIZE_TAIL = os.environ.get("FUSED_PREACT_FINALIZE_TAIL", "1") != "0"
TAIL_STEPS = 1
TAIL_SLOTS, TAIL_SLOT_COUNTERS = 64, 1024
# Partial rows per step of a tail's loop. Each step waits for its loads
# from L2 (the loop is not pipelined: see triton_kernels._chan_merge), so
# few wide steps: ResNet-164's third-stage tails take one. 128 rows
# cost the dgrads no registers (sm_90, triton 3.6 and 3.8: the GEMM sets
# the count); the statistics kernel holds more per row (Chan's merge), and
# at 64 stays under 100 registers with 32-channel blocks.
TAIL_T_DGRAD, TAIL_T_STATS = (16, 16) if INTERPRET else (128, 64)
_TAIL_COUNTERS: dict = {}
_TAIL_NEXT = itertools.count()  # (next() on it is atomic under the GIL: threads get distinct slots)


def _tail_counters(device: torch.device, partial_rows: int, step_rows: int, blocks: int) -> Optional[Tensor]:
    """``blocks`` arrival counters (zero) for a kernel whose last program per
    column block sums ``partial_rows`` rows of partials, ``step_rows`` a
    step, or None where the separate finalize kernel should run: tails off,
    a tail of more than TAIL_STEPS steps, more blocks than a slot holds, or
    no buffer yet on a device that is capturing a CUDA graph (its zeros
    would be written only when the graph replays)."""
    if not FINALIZE_TAIL or partial_rows > TAIL_STEPS * step_rows or blocks > TAIL_SLOT_COUNTERS:
        return None
    key = (device.type, device.index)
    buf = _TAIL_COUNTERS.get(key)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _TAIL_COUNTERS[key] = torch.zeros((TAIL_SLOTS, TAIL_SLOT_COUNTERS), device=device, dtype=torch.int32)
    return buf[next(_TAIL_NEXT) % TAIL_SLOTS, :blocks]


def channel_stats(x: Tensor) -> Tensor:
    """[2, C]: per-channel mean and biased variance of a 4-D x, stable for |mean| >> std."""
    check_device(x)
    n, c, h, w = x.shape
    stats = torch.empty((2, c), device=x.device, dtype=stats_dtype(x))
    if x.numel() == 0:
        return stats.fill_(float("nan"))
    mean_part, m2_part, rows = _channel_partials(x)
    merge_stats(mean_part, m2_part, n * h * w, rows, stats[0], stats[1])
    return stats


def merge_stats(mean_part: Tensor, m2_part: Tensor, count: int, rows_per_tile: int, mean: Tensor,
                var: Tensor) -> None:
    tiles, c = mean_part.shape
    block_c = _pow2(c, 16, MERGE_C)
    _run("merge_stats_kernel", (_cdiv(c, block_c),),
         mean_part, m2_part, mean, var, count, c, tiles, rows_per_tile, BLOCK_T=MERGE_T,
         BLOCK_C=block_c, IS_FP64=mean.dtype == torch.float64)


def moments_shape(x: Tensor) -> tuple[int, int, int]:
    """The shape of the per-tile moments a forward emits for an output like
    x (4-D, N*H*W rows): (2, tiles of STATS_ROWS rows, channels)."""
    return 2, _cdiv(x.shape[0] * x.shape[2] * x.shape[3], STATS_ROWS), x.shape[1]


def merge_moments(parts: Tensor, count: int) -> Tensor:
    """[2, C] mean and biased variance from a forward's emitted per-tile
    moments [2, T, C] (``count`` rows in all, STATS_ROWS per tile)."""
    stats = torch.empty((2, parts.shape[2]), device=parts.device, dtype=parts.dtype)
    if count == 0:
        return stats.fill_(float("nan"))
    merge_stats(parts[0], parts[1], count, STATS_ROWS, stats[0], stats[1])
    return stats


def bn_prepare(x: Tensor, batch_moments: Optional[Tensor], gamma: Optional[Tensor], beta: Optional[Tensor],
               running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, momentum: float,
               eps: float, global_count: int = 0, batches_tracked: Optional[Tensor] = None) -> Tensor:
    """[4, C] rows mean, invstd, scale, shift for the BatchNorm in front of a
    unit (nn.BatchNorm2d's rules: batch statistics when training or without
    running statistics, which are then updated in place). ``batch_moments``,
    when x's batch statistics are already known: the per-tile moments
    [2, T, C] its producer's conv epilogue emitted (``conv_forward``), merged
    here, or x's [2, C] mean and biased variance (the global batch's under
    sync_bn, whose ``global_count`` then gives the unbiased running
    variance); otherwise they are computed from x. ``batches_tracked``: the
    BatchNorm's num_batches_tracked (int64, one element), to which the
    finalize adds this batch. Two launches at most: the partial statistics
    of x and one finalize; one where the statistics kernel's last programs
    finalize (``_tail_counters``)."""
    check_device(x)
    if batches_tracked is not None and (batches_tracked.dtype != torch.int64 or batches_tracked.numel() != 1
                                        or batches_tracked.device != x.device):
        raise ValueError("bn_prepare: batches_tracked must be a one-element int64 tensor on x's device, got "
                         f"{batches_tracked.dtype} of {batches_tracked.numel()} elements on {batches_tracked.device}")
    n, c, h, w = x.shape
    m = n * h * w
    sdt = stats_dtype(x)
    out = torch.empty((4, c), device=x.device, dtype=sdt)
    batch_stats = training or running_mean is None
    update = training and running_mean is not None
    emitted = batch_stats and batch_moments is not None and batch_moments.dim() == 3
    if emitted and tuple(batch_moments.shape) != moments_shape(x):
        raise RuntimeError(f"bn_prepare: emitted moments of shape {tuple(batch_moments.shape)} do not describe an "
                           f"input of {m} rows and {c} channels (expected {moments_shape(x)})")
    from_partials = batch_stats and (batch_moments is None or emitted)
    count = global_count or m
    if batch_stats and count == 0:
        if batches_tracked is not None:
            batches_tracked.add_(1)
        return out.fill_(float("nan"))
    finalize_args = (gamma if gamma is not None else out, beta if beta is not None else out,
                     running_mean if running_mean is not None else out,
                     running_var if running_var is not None else out, out,
                     batches_tracked if batches_tracked is not None else out)
    flags = dict(UPDATE_RUNNING=update, HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None,
                 COUNT_BATCH=batches_tracked is not None)
    unbias = count / (count - 1) if count > 1 else 1.0
    if from_partials and not emitted and not global_count:
        block_m, block_c = _stats_blocks(x)
        counters = _tail_counters(x.device, _cdiv(m, block_m), TAIL_T_STATS, _cdiv(c, block_c))
        if counters is not None:  # one launch: the statistics' last programs finalize
            _channel_partials(x, counters, finalize_args, (float(momentum), float(eps), unbias), **flags)
            return out
    if emitted:
        mean_part, m2_part, rows = batch_moments[0], batch_moments[1], STATS_ROWS
    elif from_partials:
        mean_part, m2_part, rows = _channel_partials(x)
    elif batch_stats:
        mean_part, m2_part, rows = batch_moments[0], batch_moments[1], 1
    else:
        mean_part = m2_part = out
        rows = 1
    block_c = _pow2(c, 16, MERGE_C)
    _run("bn_finalize_kernel", (_cdiv(c, block_c),),
         mean_part, m2_part, *finalize_args, m, c, mean_part.shape[0] if from_partials else 1, rows,
         float(momentum), float(eps), unbias, FROM_PARTIALS=from_partials, BATCH_STATS=batch_stats,
         BLOCK_T=MERGE_T, BLOCK_C=block_c, IS_FP64=sdt == torch.float64, **flags)
    return out


# A 3x3 weight is read as it is (no packing copy) while the bytes that the
# row tiles read of it together stay under this: each of a GEMM's row tiles
# reads the whole weight, in its own dtype (fp32 under autocast) and with
# channel strides of 9 in nn.Conv2d's layout, from L2. ResNet-164's 3x3
# layers at batch 128: 9.4 MB; ResNet-v2-50's first 3x3 at batch 64: 231 MB.
SMALL_WEIGHT_READS = 32 << 20
# A 1x1 weight in another dtype than the activations (fp32 parameters under
# autocast) is cast to theirs once per GEMM where the GEMM reduces over at
# least this many channels (0: never). Read as it is, the weight tile is
# cast in registers and stored to shared memory at every step, and Triton
# 3.6 then waits for each wgmma before the next step; in the activations'
# dtype it streams into shared memory and the wgmmas overlap
# (triton_aot's wgmma_pending). From 256 channels (4+ steps of 64) the
# overlap should pay for the cast's launch.
CAST_WEIGHT_REDUCTION = int(os.environ.get("FUSED_PREACT_CAST_WEIGHT_REDUCTION", "256"))


def _gemm_weight(weight: Tensor, order: tuple[int, ...], dtype: torch.dtype, row_tiles: int,
                 reduction: int) -> Tensor:
    """The conv weight as a GEMM kernel reads it: a [K, C, KH, KW] view whose
    strides it follows. A 1x1 weight as it is (C contiguous in nn.Conv2d's
    layout, read in its own dtype and cast in the kernel: no launch), or
    cast to ``dtype`` where the GEMM's ``reduction`` (channels summed over)
    reaches CAST_WEIGHT_REDUCTION; a small 3x3 one as it is
    (SMALL_WEIGHT_READS); a larger one packed in ``dtype`` with its axes in
    memory in ``order`` (K or C innermost, so that each tap's [C, K] block
    is dense): one launch of _pack_weight, which also does autocast's cast.
    Where the weight already has that innermost axis (C: a channels_last
    weight, for the dgrad) it is only cast, strides kept: a vectorised cast
    instead of a transposing copy, and each tap's rows are still contiguous."""
    if weight.shape[2] == 1 and weight.shape[3] == 1:
        if weight.dtype != dtype and 0 < CAST_WEIGHT_REDUCTION <= reduction:
            return weight.to(dtype)  # keeps the weight's strides
        return weight
    if weight.numel() * weight.element_size() * row_tiles <= SMALL_WEIGHT_READS:
        return weight  # read as it is: cheaper than a copy kernel
    if weight.stride(order[-1]) == 1:
        return weight.to(dtype)  # (preserve_format: a dense weight keeps its strides)
    return _pack_weight(weight, order, dtype)


def _pack_weight(weight: Tensor, order: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The [K, C, KH, KW] view of a copy of ``weight`` in ``dtype`` whose
    axes lie in memory in ``order`` (KH, KW, then two channel axes): one
    pack_weight_kernel launch, a tiled transpose (int32 offsets, so a
    weight whose storage reaches 2**30 elements takes torch's copy)."""
    assert tuple(order[:2]) == (2, 3), order
    a_axis, b_axis = order[2], order[3]
    kh, kw = weight.shape[2], weight.shape[3]
    rows, cols = weight.shape[a_axis], weight.shape[b_axis]
    packed = torch.empty((kh, kw, rows, cols), device=weight.device, dtype=dtype)
    if _storage_reaches_2_30(weight) or _storage_reaches_2_30(packed):
        packed.copy_(weight.permute(order))
    elif packed.numel() > 0:
        _run("pack_weight_kernel", (kh * kw, _cdiv(rows, PACK_BLOCK), _cdiv(cols, PACK_BLOCK)),
             weight, packed, rows, cols, kw, weight.stride(a_axis), weight.stride(b_axis), weight.stride(2),
             weight.stride(3), BLOCK_A=PACK_BLOCK, BLOCK_B=PACK_BLOCK)
    return packed.permute([order.index(axis) for axis in range(4)])


PACK_BLOCK = 64


def _split_sum(part: Tensor, out: Tensor) -> None:
    """out = part.sum(0) for the weight gradient's split partials, each laid
    out as ``out`` (dense): one split_sum_kernel launch in place of torch's
    generic reduction (4-8 us for these 1-150 k element gradients on the
    H200, session 8). torch.sum where the offsets would need int64."""
    split, n = part.shape[0], out.numel()
    if _storage_reaches_2_30(part):
        torch.sum(part, 0, out=out)
        return
    block_n, block_s = _split_sum_blocks(n, split)
    _run("split_sum_kernel", (_cdiv(n, block_n),), part, out, n, split, BLOCK_S=block_s, BLOCK_N=block_n)


def _split_sum_blocks(n: int, split: int) -> tuple[int, int]:
    """(gradient elements, splits) a split_sum_kernel program loads a step.
    Columns narrowed (down to 8: one 32-byte sector of fp32) until the grid
    has a program per SM, since these sums are small and a program's loop
    waits on memory: ResNet-164's first-stage 1x1 gradients (1024 elements
    in 256 splits) ran 8 programs of 128 columns for 9.3 us on the H200
    (session 11). Columns widened (up to 1024) while the grid keeps 4
    programs per SM: ResNet-v2-50's 256-channel 3x3 gradients (590k
    elements in 4 splits) ran 4608 programs of 2 KB each for 14 us, ~4x
    their bytes' time. Splits a step: up to 8192 loads a program (64 a
    thread, as the 128 x 64 tile: 80-96 registers on sm_90), at most 256."""
    block_n = 128
    while block_n > 8 and _cdiv(n, block_n) < GPU_SMS:
        block_n //= 2
    while block_n < 1024 and _cdiv(n, 2 * block_n) >= 4 * GPU_SMS:
        block_n *= 2
    return block_n, _pow2(split, 2, min(256, 8192 // block_n))



# ---------------------------------------------------------------- forward


def _check_channels(c: int, k_out: int) -> None:
    # The GEMM kernels assume their reduction runs at least once (tl.assume,
    # for ptxas's wgmma pipelining): never launch them without channels.
    if c == 0 or k_out == 0:
        raise ValueError(f"the Triton conv kernels need at least one input and one output channel, got {c} -> {k_out}")
    # The stride-2 dgrad counts its steps in fp32 (triton_kernels._small_div:
    # exact below 2**20 steps, up to 4 taps x channels / 16).
    if max(c, k_out) > MAX_CHANNELS:
        raise ValueError(f"the Triton conv kernels take at most {MAX_CHANNELS} channels, got {c} -> {k_out}")


MAX_CHANNELS = 1 << 20


def _tma_forward(x: Tensor, w_gemm: Tensor, stride: int, padding: int) -> Optional[bool]:
    """Whether conv_fwd_kernel may read x and ``w_gemm`` through TMA
    descriptors (its TMA form) and, if so, W_KC (the weight read as [K, C]);
    None where it may not. The kernel treats x as the [N*H*W, C] matrix of
    its pixels, whose row shifted by a constant is a tap's input pixel: a
    stride-1 conv with "same" padding over x with dense rows. A descriptor
    wants 16-byte aligned addresses and row strides, rows of contiguous
    elements, and the weight in x's dtype, packed [KH, KW, C, K] (K
    innermost) or 1x1 as nn.Conv2d's [K, C] (C innermost). On a GPU: compute
    capability 9+ (the TMA) and 16-bit inputs, unless FWD_TMA forces it."""
    if FWD_TMA is False or not _tma_weight_ok(x, w_gemm) or not _tma_pixels(x, w_gemm.shape, stride, padding,
                                                                             FWD_TMA):
        return None
    k_out, c, kh, kw = w_gemm.shape
    sk, sc, sh, sw = w_gemm.stride()
    if sk == 1 and sc == k_out and sw == c * k_out and sh == kw * sw and (k_out * x.element_size()) % 16 == 0:
        return False  # packed: rows (kh, kw, c) of K weights
    if kh * kw == 1 and sc == 1 and sk >= c and (sk * x.element_size()) % 16 == 0:
        return True  # [K, C]
    return None


def _tma_dgrad(grad_y: Tensor, w_gemm: Tensor, stride: int, padding: int) -> bool:
    """Whether conv_dgrad_kernel may read grad_y and ``w_gemm`` through TMA
    descriptors (its TMA form): as ``_tma_forward``, with grad_y's pixel
    rows, and the weight packed [KH, KW, K, C] (C innermost; 1x1: nn.Conv2d's
    [K, C])."""
    if DGRAD_TMA is False or not _tma_weight_ok(grad_y, w_gemm) or not _tma_pixels(grad_y, w_gemm.shape, stride,
                                                                                    padding, DGRAD_TMA):
        return False
    k_out, c, kh, kw = w_gemm.shape
    sk, sc, sh, sw = w_gemm.stride()
    rows = sc == 1 and sk >= c and (sk * grad_y.element_size()) % 16 == 0
    return rows and (kh * kw == 1 or (sk == c and sw == k_out * c and sh == kw * sw))


def _tma_wgrad(x: Tensor, grad_y: Tensor, weight_shape: tuple, stride: int, padding: int) -> bool:
    """Whether conv_wgrad_kernel may read x and grad_y through TMA
    descriptors (its TMA form), as ``_tma_forward`` reads x."""
    return (WGRAD_TMA is not False and grad_y.dtype == x.dtype
            and _tma_pixels(x, weight_shape, stride, padding, WGRAD_TMA)
            and _tma_pixels(grad_y, weight_shape, stride, padding, WGRAD_TMA))


def _tma_weight_ok(a: Tensor, w_gemm: Tensor) -> bool:
    return w_gemm.data_ptr() % 16 == 0 and w_gemm.dtype == a.dtype


def _tma_pixels(a: Tensor, weight_shape: tuple, stride: int, padding: int, forced: Optional[bool]) -> bool:
    """Whether a GEMM may read ``a`` (x, or grad_y) through a TMA descriptor
    as the [N*H*W, channels] matrix of its pixels: a stride-1 conv with
    "same" padding, ``a`` with dense rows, 16-byte aligned address and row
    stride; on a GPU of compute capability 9+ with 16-bit data (``forced``:
    any dtype)."""
    kh, kw = weight_shape[2:]
    esize = a.element_size()
    if (stride != 1 or kh != kw or kh != 2 * padding + 1 or a.stride(1) != 1 or not _dense_rows(a)
            or a.stride(3) < a.shape[1] or (a.stride(3) * esize) % 16 or a.data_ptr() % 16):
        return False
    if INTERPRET:
        return True
    # (CPU tensors outside the interpreter: benchmarks/host_overhead.py's null driver)
    if not (a.is_cuda and (bool(forced) or esize == 2) and _has_tma(a.device.index)):
        return False
    # A TMA form may launch: the kernels build their descriptors on the
    # device, in scratch memory Triton asks for at each launch from the
    # allocator in a context variable, so set here, in the launching thread
    # (autograd's, for a recomputing checkpoint).
    triton.set_allocator(_tma_allocator)
    return True


@functools.lru_cache(maxsize=None)
def _has_tma(device_index: Optional[int]) -> bool:
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def _tma_allocator(size: int, alignment: int, stream) -> Tensor:
    """Device memory for the tensor descriptors a TMA kernel builds
    (Triton asks at each launch: 128 bytes a descriptor a program)."""
    return torch.empty(size, device="cuda", dtype=torch.int8)


def conv_forward(x: Tensor, weight: Tensor, bn: Tensor, stride: int, padding: int, residual: Optional[Tensor],
                 emit_stats: bool) -> tuple[Tensor, Optional[Tensor]]:
    """y = conv2d(relu(x*scale + shift), weight) [+ residual] in x's memory
    format (scale, shift = rows 2, 3 of ``bn``; weight cast to x's dtype);
    with ``emit_stats`` also y's per-tile moments [2, T, K] (mean and M2 of
    each STATS_ROWS-row tile of y, see ``merge_moments``), which the next
    unit's ``bn_prepare`` merges in its finalize launch. The GEMM in
    conv_fwd_kernel, or through PyTorch's convolution (``_gemm_route``)."""
    check_device(x)
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    _check_channels(c, k_out)
    oh, ow = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    y = _like_layout((n, k_out, oh, ow), x)
    stats = torch.empty(moments_shape(y), device=x.device, dtype=stats_dtype(x)) if emit_stats else None
    if n * oh * ow > 0:
        args = (x, weight, bn, stride, padding, residual, y, stats)
        key = (_layout_key(x), _layout_key(weight), _layout_key(residual), stride, padding, emit_stats)
        y = _gemm_route("forward", key, x, functools.partial(_forward_gemm, *args),
                        functools.partial(_forward_library, *args))
    return y, stats


def _forward_gemm(x: Tensor, weight: Tensor, bn: Tensor, stride: int, padding: int, residual: Optional[Tensor],
                  y: Tensor, stats: Optional[Tensor]) -> Tensor:
    """conv_forward's GEMM in conv_fwd_kernel, its epilogue adding the
    residual and emitting the moments: y."""
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh, ow = y.shape[2], y.shape[3]
    m = n * oh * ow
    dot_dtype, precision, is_fp64 = _dot(x.dtype)
    rows = STATS_ROWS
    tiles = _cdiv(m, rows)
    emit_stats = stats is not None
    mean_part, m2_part = (stats[0], stats[1]) if emit_stats else (y, y)
    w_gemm = _gemm_weight(weight, (2, 3, 1, 0), x.dtype, tiles, c)  # 3x3: packed [KH, KW, C, K]
    w_kc = _tma_forward(x, w_gemm, stride, padding)
    res = residual if residual is not None else y
    grid = lambda meta: (tiles * _cdiv(k_out, meta["BLOCK_N"]),)  # noqa: E731
    # 256-column tiles: with 16-bit inputs (three stages of fp32 tiles
    # would not fit shared memory), for 1x1, and for 3x3 with the packed
    # weight (read as it is, in fp32, it spills registers with triton 3.8).
    wide = (x.element_size() == 2 and (kh * kw == 1 or w_gemm.dtype == x.dtype)
            and FWD_WIDE_TILE is not False)
    tma = w_kc is not None
    act_mode, act = _act_pass_buffer(x, kh * kw, k_out) if not (tma and FWD_TMA) else (0, x)
    wide_index = _wide_index(x, w_gemm, res, y)
    _launch_gemm("conv_fwd_kernel", grid, ("gemm", rows, k_out, c, is_fp64, kh * kw, FLAT_LOOP,
                                           _small_grid(tiles, k_out), residual is not None and kh * kw == 1,
                                           EPILOGUE_FIRST_LOAD, wide, bool(FWD_WIDE_TILE), False,
                                           "forward" if tma else "", tma and bool(FWD_TMA), act_mode,
                                           *_two_per_sm(3, x, w_gemm, 0, wide_index)),
                 {"BLOCK_M": rows, "BLOCK_N": 256 if FWD_WIDE_TILE else _pow2(k_out, 16, 32),
                  "BLOCK_K": _pow2(c, 16, 16), "GROUP_M": 4, "FLAT": bool(FLAT_LOOP) and kh * kw > 1,
                  "EPILOGUE_FIRST": bool(EPILOGUE_FIRST_LOAD), "TMA": tma and bool(FWD_TMA),
                  "ACT_PASS": act_mode == 2},
                 x, act, w_gemm, bn[2], bn[3], res, y, mean_part, m2_part, m, c, k_out, h, w, oh, ow,
                 *_strides(x), *_strides(y), *_strides(res), *_strides(w_gemm), STRIDE=stride, PAD=padding,
                 KH=kh, KW=kw, HAS_RESIDUAL=residual is not None, EMIT_STATS=emit_stats, IS_FP64=is_fp64,
                 DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision, WIDE_INDEX=wide_index,
                 W_KC=bool(w_kc), L1_TAPS=L1_TAPS and kh * kw > 1, even=("EVEN_C", c))
    return y


def _forward_library(x: Tensor, weight: Tensor, bn: Tensor, stride: int, padding: int, residual: Optional[Tensor],
                     y: Tensor, stats: Optional[Tensor]) -> Tensor:
    """conv_forward's GEMM through PyTorch's convolution: the activation
    pass into a temporary, the convolution of it (cuDNN on a GPU), the
    residual added in place, the moments of y by channel_stats_partial_kernel
    in STATS_ROWS-row tiles (the forward epilogue's layout). Returns the
    convolution's own output where it has y's memory format, else y."""
    out = _convolution(_activation(x, bn), weight.to(x.dtype), stride, padding)
    # (With both a residual and the moments, the add and the moments are two
    # passes over y where one kernel could do both; a block's closing 1x1
    # unit has both, and there the fused epilogue is expected to win the
    # trial anyway: RESULTS.md, session 15.)
    if residual is not None:
        out.add_(residual)
    if out.stride() != y.stride():
        out = y.copy_(out)
    if stats is not None:
        _channel_partials(out, rows=STATS_ROWS, part=stats)
    return out


def _activation(x: Tensor, bn: Tensor) -> Tensor:
    """relu(x*scale + shift) in x's dtype and memory format, from
    activation_pass_kernel (a temporary of the library GEMM route)."""
    act = torch.empty_like(x, memory_format=_format_of(x))
    if act.stride() != x.stride():  # (x not dense: the pass writes with x's strides)
        x = x.contiguous(memory_format=_format_of(x))
    activation_pass(x, bn[2], bn[3], act)
    return act


def _convolution(a: Tensor, weight: Tensor, stride: int, padding: int) -> Tensor:
    """PyTorch's conv2d of ``a`` (groups 1, dilation 1, no bias): ATen's
    convolution, which picks cuDNN's kernels on a GPU."""
    return torch.ops.aten.convolution(a, weight, None, [stride, stride], [padding, padding], [1, 1], False,
                                      [0, 0], 1)


def _conv_backward(grad_y: Tensor, a: Tensor, weight: Tensor, stride: int, padding: int, input_grad: bool
                   ) -> Tensor:
    """PyTorch's convolution backward, in a's dtype: the input's gradient
    (``input_grad``; ``a`` then gives only its shape and layout) or the
    weight's (``weight`` then gives only its shape and layout)."""
    grads = torch.ops.aten.convolution_backward(grad_y, a, weight, None, [stride, stride], [padding, padding],
                                                [1, 1], False, [0, 0], 1, [input_grad, not input_grad, False])
    return grads[0] if input_grad else grads[1]


def _layout_key(t: Optional[Tensor]) -> tuple:
    return () if t is None else (tuple(t.shape), t.stride(), t.dtype)


# --------------------------------------------------------------- backward


def conv_backward(grad_y: Tensor, x: Tensor, weight: Tensor, bn: Tensor, training: bool, stride: int,
                  padding: int, need_input_grads: bool, need_weight_grad: bool,
                  global_count: int = 0) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_x, grad_weight, [2, C] grad_gamma and grad_beta) of
    y = conv(relu(x*scale + shift)) with ``bn`` = [4, C] mean, invstd, scale,
    shift; the activation is recomputed from x. Launches: weight pack, dgrad
    (epilogue: ReLU mask, gz, partial sums; its last programs finalize where
    the partials are few), finalize (elsewhere), gx; wgrad, split sum. Either
    GEMM may go through PyTorch's convolution instead (``_gemm_route``)."""
    check_device(x)
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    _check_channels(c, k_out)
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    is_fp64 = x.dtype == torch.float64
    grad_y = grad_y.to(x.dtype)
    grad_x = grad_w = bn_grads = None
    sdt = stats_dtype(x)
    if need_input_grads:
        m = n * h * w
        gz = torch.empty_like(x)  # keeps x's dense layout (channels_last or contiguous)
        if gz.stride() != x.stride():
            x = x.contiguous(memory_format=_format_of(gz))
        out = torch.empty((4, c), device=x.device, dtype=sdt)  # grad_gamma, grad_beta, k1, k0
        if m > 0:
            sync = bool(global_count) and training
            args = (grad_y, x, weight, bn, gz, out, training, stride, padding, sync)
            key = (_layout_key(grad_y), _layout_key(x), _layout_key(weight), stride, padding, training, sync)
            part_gz, part_gz_xhat, finalized = _gemm_route("dgrad", key, x, functools.partial(_dgrad_gemm, *args),
                                                           functools.partial(_dgrad_library, *args))
            if not finalized:
                merge_c = _pow2(c, 16, MERGE_C)
                _run("bn_backward_finalize_kernel", (_cdiv(c, merge_c),),
                     part_gz, part_gz_xhat, bn, out, m, c, part_gz.shape[0], TRAINING=training and not sync,
                     BLOCK_T=MERGE_T, BLOCK_C=merge_c)
            if sync:
                # sync_bn: the two sums over every process, the global count
                # (nn.SyncBatchNorm's backward); gamma/beta grads stay local.
                from . import distributed

                g_gamma, g_beta = distributed.all_reduce_sum(out[0], out[1])
                out[2], out[3] = distributed.backward_constants(g_gamma, g_beta, bn[0], bn[1], bn[2], global_count)
            block_m, block_c = 64 if INTERPRET else 128, _pow2(c, 16, 64)
            _run("bn_grad_input_kernel", (_cdiv(m, block_m), _cdiv(c, block_c)),
                 gz, x, gz, bn[2], out[2], out[3], m, c, h * w, w, *_strides(x), TRAINING=training,
                 IS_FP64=is_fp64, BLOCK_M=block_m, BLOCK_C=block_c)
        else:
            out.zero_()
        grad_x, bn_grads = gz, out[:2]
    if need_weight_grad:
        # The gradient in the weight's own layout (channels_last after
        # model.to(memory_format=channels_last)) and dtype.
        grad_w = torch.empty(weight.shape, device=x.device, dtype=weight.dtype, memory_format=_format_of(weight))
        if n * oh * ow > 0:
            args = (x, grad_y, weight, bn, stride, padding, grad_w)
            key = (_layout_key(x), _layout_key(grad_y), _layout_key(weight), stride, padding)
            _gemm_route("wgrad", key, x, functools.partial(_wgrad_gemm, *args),
                        functools.partial(_wgrad_library, *args))
        else:
            grad_w.zero_()
    return grad_x, grad_w, bn_grads


def _dgrad_gemm(grad_y: Tensor, x: Tensor, weight: Tensor, bn: Tensor, gz: Tensor, out: Tensor, training: bool,
                stride: int, padding: int, sync: bool) -> tuple[Tensor, Tensor, bool]:
    """conv_backward's dgrad in conv_dgrad_kernel, its epilogue writing gz
    (x's strides) and the per-tile partial sums of gz and gz*xhat: (the two
    [tiles, C] partials, whether its last programs already finalized them
    into ``out``)."""
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    dot_dtype, precision, is_fp64 = _dot(x.dtype)
    m = n * h * w
    rows = ROWS_INTERPRET if INTERPRET else ROWS_GPU
    # Stride 2: the input pixels in four parity classes, each visiting
    # only its own taps (conv_dgrad_kernel's PARITY); row tiles per class
    # counted for the largest one.
    parity = stride == 2 and DGRAD_PARITY
    row_tiles = _cdiv(n * _cdiv(h, 2) * _cdiv(w, 2), rows) if parity else _cdiv(m, rows)
    tiles = 4 * row_tiles if parity else row_tiles  # rows of partial sums: one per (class and) row tile
    part_gz = torch.empty((tiles, c), device=x.device, dtype=out.dtype)
    part_gz_xhat = torch.empty_like(part_gz)
    w_gemm = _gemm_weight(weight, (2, 3, 0, 1), x.dtype, tiles, k_out)  # 3x3: packed [KH, KW, K, C]
    tma = _tma_dgrad(grad_y, w_gemm, stride, padding)
    grid = lambda meta: (row_tiles * _cdiv(c, meta["BLOCK_N"]), 4 if parity else 1)  # noqa: E731
    # (The parity path has one loop form: no flat-loop candidates.)
    heavy = (kh * kw == 1 or parity) and k_out <= 512  # (see _gemm_configs)
    # The finalize in the dgrad's last programs, unless sync_bn
    # all-reduces the sums first (the widest column tile counted).
    counters = None if sync else _tail_counters(x.device, tiles, TAIL_T_DGRAD, _cdiv(c, 16))
    wide_index = _wide_index(grad_y, w_gemm, x, gz)
    _launch_gemm("conv_dgrad_kernel", grid, ("gemm", rows, c, k_out, is_fp64, 1 if parity else kh * kw,
                                             FLAT_LOOP, _small_grid(tiles, c), kh * kw == 1,
                                             EPILOGUE_FIRST_LOAD, False, False, heavy,
                                             "dgrad" if tma else "", tma and bool(DGRAD_TMA), 0,
                                             *_two_per_sm(4, x, w_gemm, 1, wide_index)),
                 {"BLOCK_M": rows, "BLOCK_N": _pow2(c, 16, 32), "BLOCK_K": _pow2(k_out, 16, 16),
                  "GROUP_M": 4, "FLAT": bool(FLAT_LOOP) and kh * kw > 1 and not parity,
                  "EPILOGUE_FIRST": bool(EPILOGUE_FIRST_LOAD), "TMA": tma and bool(DGRAD_TMA)},
                 grad_y, w_gemm, x, bn[2], bn[3], bn[0], bn[1], gz, part_gz, part_gz_xhat,
                 counters if counters is not None else out, out,
                 m, c, k_out, h, w, oh, ow, tiles, *_strides(grad_y), *_strides(x), *_strides(w_gemm),
                 STRIDE=stride, PAD=padding, KH=kh, KW=kw, IS_FP64=is_fp64, DOT_DTYPE=dot_dtype,
                 INPUT_PRECISION=precision, PARITY=parity, WIDE_INDEX=wide_index,
                 FINALIZE=counters is not None, TRAINING=training, BLOCK_T=TAIL_T_DGRAD,
                 L1_TAPS=L1_TAPS and kh * kw > 1 and not parity, even=("EVEN_K", k_out))
    return part_gz, part_gz_xhat, counters is not None


def _dgrad_library(grad_y: Tensor, x: Tensor, weight: Tensor, bn: Tensor, gz: Tensor, out: Tensor,
                   training: bool, stride: int, padding: int, sync: bool) -> tuple[Tensor, Tensor, bool]:
    """_dgrad_gemm through PyTorch's convolution backward (the activation's
    gradient, cuDNN on a GPU), then its epilogue's work in
    relu_backward_partials_kernel: the same gz and partial sums (one row of
    partials per RELU_BACKWARD_ROWS pixels), never finalized."""
    n, c, h, w = x.shape
    grad_a = _conv_backward(grad_y, x, weight.to(x.dtype), stride, padding, input_grad=True)
    m = n * h * w
    block_m, block_c = (32, 16) if INTERPRET else (RELU_BACKWARD_ROWS, _pow2(c, 16, 32))
    tiles = _cdiv(m, block_m)
    part_gz = torch.empty((tiles, c), device=x.device, dtype=out.dtype)
    part_gz_xhat = torch.empty_like(part_gz)
    _run("relu_backward_partials_kernel", (tiles, _cdiv(c, block_c)), grad_a, x, bn[2], bn[3], bn[0], bn[1], gz,
         part_gz, part_gz_xhat, m, c, h * w, w, *_strides(grad_a), *_strides(x), BLOCK_M=block_m,
         BLOCK_C=block_c, IS_FP64=x.dtype == torch.float64)
    return part_gz, part_gz_xhat, False


# Pixels a program of relu_backward_partials_kernel (rows of its partials):
# the dgrad's row tile. With up to 32 channels, 4 warps hold a tile of
# 16-bit data in 96 (triton 3.8) to 121 (3.6) registers on sm_90, no spills
# (64 channels took 168 with 3.8, and fp64 spilled).
RELU_BACKWARD_ROWS = 128


def _wgrad_gemm(x: Tensor, grad_y: Tensor, weight: Tensor, bn: Tensor, stride: int, padding: int,
                grad_w: Tensor) -> None:
    """conv_backward's weight gradient in conv_wgrad_kernel (split over rows
    where the grid would not fill the GPU, then summed) into ``grad_w``."""
    n, c, h, w = x.shape
    k_out, _, kh, kw = weight.shape
    oh, ow = grad_y.shape[2], grad_y.shape[3]
    dot_dtype, precision, is_fp64 = _dot(x.dtype)
    m = n * oh * ow
    tap_rows = _wgrad_tap_rows_mode(x, c, kh, kw, stride, padding)
    split = WGRAD_SPLIT or (1 if INTERPRET else _wgrad_split(m, k_out, c, kh * kw, kh if tap_rows else 0))
    # One split is stored in grad_w directly (fp32 sums rounded once on
    # store), several are summed into it (fp32 partials), so no layout copy
    # or cast follows.
    part = grad_w.unsqueeze(0) if split == 1 else torch.empty_strided(
        (split, *weight.shape), (weight.numel(), *grad_w.stride()), device=x.device, dtype=stats_dtype(x))
    grid = lambda meta: (kh if meta.get("TAP_ROWS") else kh * kw,  # noqa: E731
                         _cdiv(k_out, meta["BLOCK_N"]) * _cdiv(c, meta["BLOCK_K"]), split)
    tma = _tma_wgrad(x, grad_y, weight.shape, stride, padding)
    act_mode, act = _act_pass_buffer(x, kh * kw, k_out) if not (tma and WGRAD_TMA) else (0, x)
    _launch_gemm("conv_wgrad_kernel", grid, ("wgrad", k_out, c, is_fp64, WGRAD_CHANNEL_ROWS, tma,
                                             tma and bool(WGRAD_TMA), act_mode, tap_rows),
                 {"BLOCK_M": 32, "BLOCK_N": _pow2(k_out, 16, 32), "BLOCK_K": _pow2(c, 16, 32),
                  "CHANNEL_ROWS": bool(WGRAD_CHANNEL_ROWS) or tap_rows == 2, "TMA": tma and bool(WGRAD_TMA),
                  "ACT_PASS": act_mode == 2, "TAP_ROWS": tap_rows == 2},
                 x, act, grad_y, bn[2], bn[3], part, m, c, k_out, h, w, oh, ow, split,
                 *fast_divisor(oh * ow), *fast_divisor(ow),
                 *_strides(x), *_strides(grad_y), *part.stride(), STRIDE=stride, PAD=padding, KH=kh,
                 KW=kw, IS_FP64=is_fp64, DOT_DTYPE=dot_dtype, INPUT_PRECISION=precision,
                 WIDE_INDEX=_wide_index(x, grad_y, part), DENSE_ROWS=_dense_rows(x) and _dense_rows(grad_y))
    if split > 1:
        _split_sum(part, grad_w)


def _wgrad_library(x: Tensor, grad_y: Tensor, weight: Tensor, bn: Tensor, stride: int, padding: int,
                   grad_w: Tensor) -> None:
    """_wgrad_gemm through PyTorch's convolution backward (cuDNN on a GPU)
    of the activation pass's output, copied into ``grad_w`` (the weight's
    dtype and layout: under autocast, as eager autocast's fp32 weight
    gradient, rounded once to x's dtype by the convolution first)."""
    shape_only = torch.empty_like(weight, dtype=x.dtype)  # (the weight's shape and layout in x's dtype; not read)
    grad_w.copy_(_conv_backward(grad_y, _activation(x, bn), shape_only, stride, padding, input_grad=False))
