"""Triton kernels of the fused pre-activation unit (implicit GEMM, any strides).

Layers (STYLE.md): these ``@triton.jit`` kernels → the launchers in
``triton_launch.py`` → the ops in ``triton_ops.py`` → ``functional`` → modules.

Tensors are addressed through their four strides (n, c, h, w), so NCHW and
channels_last inputs are both read in place; channels_last is the fast one
(the channel axis, which the GEMMs tile, is contiguous there). Rows of every
GEMM are pixels m = (n, h, w) of the output (forward, wgrad) or of the input
(dgrad); offsets are int32, or int64 where a tensor reaches 2**30 elements
(WIDE_INDEX, decided per launch).

Kernels:
  channel_stats_partial   per (row tile, channel): mean and M2 of x; with
                          FINALIZE its last program per channel block also
                          does bn_finalize's work for those channels
  merge_stats             Chan's merge of those partials -> mean, biased var
  bn_finalize             merge (or read) the statistics, update the running
                          statistics (and num_batches_tracked), emit
                          mean/invstd/scale/shift: one launch
  bn_backward_finalize    gamma/beta gradients and the folded BN-backward
                          constants k1, k0 from the dgrad partials
  conv_fwd                y = conv(relu(x*scale + shift)) [+ residual],
                          optional per-tile mean/M2 partials of the written y
  conv_dgrad              ga = conv_transpose(gy, W); epilogue recomputes the
                          ReLU mask from x, writes gz, and per-tile partial
                          sums of gz and gz*xhat; with FINALIZE its last
                          program per column block also does
                          bn_backward_finalize's work for those channels
  bn_grad_input           gx = gz*scale + x*k1 + k0   (BN backward, one pass)
  relu_backward_partials  conv_dgrad's epilogue alone, over a gradient of the
                          activation from PyTorch's convolution (the library
                          GEMM route, triton_launch.LIBRARY_GEMM)
  conv_wgrad              split-K partials of gW = a^T gy, a recomputed from x
  split_sum               the sum of those partials, in the weight's dtype
  pack_weight             a 3x3 weight's taps as dense [C, K] (or [K, C]) blocks, cast

"Last program" tails (FINALIZE): each program stores its partials, then
bumps an arrival counter per column block (``_arrived_last``); the one that
arrives last reads every program's partials and finishes the reduction, so
the small finalize kernel is not launched. The tail runs the finalize
kernel's loop over the partials in chunks of BLOCK_T tiles (the kernel's
are larger), so the two agree to rounding, and bit for bit where the tiles
fit one chunk of each.

Padding taps read zero from the *activated* tensor: the prologue masks the
activated tile, so relu(shift) never leaks into the border (DESIGN.md §2).

Every ``tl.dot`` names its accumulator's dtype (``out_dtype=acc.dtype``):
triton 3.6 (the GPU machines') defaults it to fp32 and rejects the fp64
accumulator of fp64 inputs; 3.8 takes the accumulator's. Same code otherwise.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows_to_nhw(offs_m, HW, W):
    n = offs_m // HW
    rem = offs_m - n * HW
    h = rem // W
    return n, h, rem - h * W


@triton.jit
def _pixel_offsets(offs_m, offs_c, HW, W, sxn, sxc, sxh, sxw):
    """int64 element offsets of the [pixels, channels] tile (rows = flat
    N*H*W pixel indices) of a 4-d tensor with strides sx*, any layout: the
    per-channel kernels' addressing (statistics, activation pass, gx)."""
    n, h, w = _rows_to_nhw(offs_m, HW, W)
    rows = n.to(tl.int64) * sxn + h.to(tl.int64) * sxh + w.to(tl.int64) * sxw
    return rows[:, None] + offs_c.to(tl.int64)[None, :] * sxc


@triton.jit
def _idx(v, WIDE_INDEX: tl.constexpr):
    """An offset term in the GEMM kernels' address arithmetic: int64 where
    a tensor's storage spans 2**30 elements (the launchers' WIDE_INDEX), else
    int32, which takes half the instructions: 64-bit offsets were ~15% of the
    weight gradient's loop (sm_90 SASS, triton 3.6)."""
    if WIDE_INDEX:
        v = v.to(tl.int64)
    return v


@triton.jit
def _rows_through_l1(row_base, row_ok, ptr, L1_TAPS: tl.constexpr):
    """A tap's row offsets, shifted by 8 bytes in the rows that are not
    loaded (``row_ok`` false: padding taps, rows past M) when L1_TAPS.

    Why: Triton copies a GEMM operand tile into shared memory with
    cp.async, and for 16-byte copies it always picks ``cp.async.cg``, which
    bypasses L1 (sm_90 PTX; 8- and 4-byte copies are ``cp.async.ca``). An
    implicit GEMM's taps re-read the same input rows shifted by a pixel or
    an image row: a 128-row tile of a stride-1 3x3 conv reads 242 distinct
    rows nine times each step of channels, all from L2 (ResNet-v2-50's
    first 3x3 layer: ~231 MB of x per launch for 26 MB of data). With the
    offsets no longer known to be multiples of 16 bytes, the compiler
    copies 8 bytes at a time through L1, where the other taps' copies can
    hit. The shifted offsets are never dereferenced (those rows are
    masked), so the values loaded are the same; twice the copy
    instructions for the tile."""
    if L1_TAPS:
        row_base = row_base + (row_ok == 0).to(tl.int32) * (8 // (ptr.dtype.element_ty.primitive_bitwidth // 8))
    return row_base


@triton.jit
def _fast_div(x, mul, shr):
    """x // d for 0 <= x < 2**31, with (mul, shr) = triton_launch.fast_divisor(d):
    a 32x32->64-bit multiply and a shift (Granlund & Montgomery's division by
    an invariant integer; CUTLASS's FastDivmod) instead of the ~20
    instructions of a division by a runtime value. ``mul`` arrives as the
    int32 bit pattern of an unsigned 32-bit multiplier."""
    product = x.to(tl.uint32, bitcast=True).to(tl.uint64) * mul.to(tl.uint32, bitcast=True).to(tl.uint64)
    return (product >> shr).to(tl.int32)


@triton.jit
def _grouped_pid(rows, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program in grouped order: GROUP_M
    neighbouring row tiles sweep the columns together, so the weight columns
    they share stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(rows, BLOCK_M)
    num_pid_n = tl.cdiv(cols, BLOCK_N)
    first_m = (pid // (GROUP_M * num_pid_n)) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    return first_m + (pid % group_size), (pid % (GROUP_M * num_pid_n)) // group_size


@triton.jit
def channel_stats_partial_kernel(x_ptr, mean_ptr, m2_ptr, counter_ptr, gamma_ptr, beta_ptr, running_mean_ptr,
                                 running_var_ptr, out_ptr, count_ptr, M, C, HW, W, sxn, sxc, sxh, sxw, momentum,
                                 eps, unbias, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr,
                                 FINALIZE: tl.constexpr = False, UPDATE_RUNNING: tl.constexpr = False,
                                 HAS_GAMMA: tl.constexpr = False, HAS_BETA: tl.constexpr = False,
                                 COUNT_BATCH: tl.constexpr = False, BLOCK_T: tl.constexpr = 16):
    """Tile (BLOCK_M pixels x BLOCK_C channels): its per-channel mean and sum of
    squared deviations, written at row pid_m of the [tiles, C] partials.
    FINALIZE: the last program of each channel block to finish merges the
    partials of its channels and does bn_finalize_kernel's work for them
    with batch statistics (gamma_ptr .. count_ptr, momentum, eps, unbias and
    the flags after FINALIZE: bn_finalize_kernel's); without it those
    arguments are not read."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    ptrs = x_ptr + _pixel_offsets(offs_m, offs_c, HW, W, sxn, sxc, sxh, sxw)
    mask = mask_m[:, None] & mask_c[None, :]
    if IS_FP64:
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float64)
    else:
        v = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
    mean = tl.sum(v, axis=0) / count
    d = tl.where(mask, v - mean[None, :], 0.0)
    m2 = tl.sum(d * d, axis=0)
    tl.store(mean_ptr + pid_m * C + offs_c, mean, mask=mask_c)
    tl.store(m2_ptr + pid_m * C + offs_c, m2, mask=mask_c)
    if FINALIZE:
        tiles = tl.num_programs(0)
        if _arrived_last(counter_ptr + pid_c, tiles):
            _bn_finalize_channels(mean_ptr, m2_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, out_ptr,
                                  count_ptr, pid_c == 0, offs_c, mask_c, M, C, tiles, BLOCK_M, momentum, eps,
                                  unbias, True, True, UPDATE_RUNNING, HAS_GAMMA, HAS_BETA, COUNT_BATCH, BLOCK_T,
                                  BLOCK_C, IS_FP64, ".cg", 1)
            tl.store(counter_ptr + pid_c, 0)  # ready for the next launch


@triton.jit
def _arrived_last(counter_ptr, programs):
    """Whether this program is the last of ``programs`` to reach this
    point, counted at ``counter_ptr`` (zero before the launch; the last
    program stores zero again when done). The pattern of CUDA's
    threadFenceReduction sample and CUTLASS's split-K semaphore: the
    barrier orders every thread's stores of this program before the
    counter's release (Triton lowers the scalar atomic to one thread's
    ``atom.acq_rel.gpu``, its result broadcast through shared memory), and
    the acquire orders the last program's loads after everyone's stores;
    those loads go to L2 (``.cg``), where the other SMs' stores are."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    return arrived == programs - 1


@triton.jit
def merge_stats_kernel(mean_part_ptr, m2_part_ptr, mean_ptr, var_ptr, M, C, TILES, ROWS_PER_TILE,
                       BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr):
    """Per-channel (mean, biased variance) from per-tile partials."""
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mean, var = _chan_merge(mean_part_ptr, m2_part_ptr, offs_c, mask_c, M, C, TILES, ROWS_PER_TILE, BLOCK_T,
                            BLOCK_C, IS_FP64, "", 3)
    tl.store(mean_ptr + offs_c, mean, mask=mask_c)
    tl.store(var_ptr + offs_c, var, mask=mask_c)


@triton.jit
def _chan_merge(mean_part_ptr, m2_part_ptr, offs_c, mask_c, M, C, TILES, ROWS_PER_TILE,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr, CACHE: tl.constexpr,
                STAGES: tl.constexpr):
    """Chan et al.'s parallel merge of per-tile (count, mean, M2) [TILES, C]
    partials (a tile holds ROWS_PER_TILE rows, the last one the rest of M):
    a chunk of BLOCK_T tiles is merged around its own mean, then into the
    running total. Never forms sum(x^2) - M*mean^2, so |mean| >> std loses
    nothing. Returns (mean, biased variance)."""
    if IS_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    total = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    mean = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    m2 = tl.zeros((BLOCK_C,), dtype=acc_dtype)
    # STAGES: Triton pipelines a loop without a dot only when asked;
    # otherwise each step waits for its own loads (1024 tiles: 4 steps).
    # The finalize tails take 1: their few steps would not repay the
    # registers the pipeline's buffers hold (a dgrad's tail must not lift
    # the kernel's register count above its GEMM's).
    for t0 in tl.range(0, TILES, BLOCK_T, num_stages=STAGES):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < TILES
        cnt = tl.where(mask_t, tl.minimum(M - offs_t * ROWS_PER_TILE, ROWS_PER_TILE).to(acc_dtype), 0.0)
        mask = mask_t[:, None] & mask_c[None, :]
        idx = offs_t[:, None] * C + offs_c[None, :]
        mu = tl.load(mean_part_ptr + idx, mask=mask, other=0.0, cache_modifier=CACHE)
        q = tl.load(m2_part_ptr + idx, mask=mask, other=0.0, cache_modifier=CACHE)
        chunk_n = tl.sum(cnt, axis=0)
        chunk_mean = tl.sum(mu * cnt[:, None], axis=0) / chunk_n
        dev = tl.where(mask, mu - chunk_mean[None, :], 0.0)
        chunk_m2 = tl.sum(q + dev * dev * cnt[:, None], axis=0)
        new_total = total + chunk_n
        delta = chunk_mean - mean
        mean = mean + delta * (chunk_n / new_total)
        m2 = m2 + chunk_m2 + delta * delta * (total * chunk_n / new_total)
        total = new_total
    return mean, m2 / total


@triton.jit
def bn_finalize_kernel(mean_part_ptr, m2_part_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,
                       out_ptr, count_ptr, M, C, TILES, ROWS_PER_TILE, momentum, eps, unbias,
                       FROM_PARTIALS: tl.constexpr, BATCH_STATS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr, COUNT_BATCH: tl.constexpr = False):
    """Everything a BatchNorm needs before its unit runs, in one launch:
    batch statistics (merged from per-tile partials, or read as mean/var
    when FROM_PARTIALS is off), or the running statistics in eval; the
    running-statistics update (momentum, unbiased variance), and with
    COUNT_BATCH num_batches_tracked + 1 (at count_ptr, int64: no launch of
    its own); and the rows out[0..3] = mean, invstd, scale = gamma*invstd,
    shift = beta - mean*scale."""
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    _bn_finalize_channels(mean_part_ptr, m2_part_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr, out_ptr,
                          count_ptr, pid_c == 0, offs_c, offs_c < C, M, C, TILES, ROWS_PER_TILE, momentum, eps, unbias,
                          FROM_PARTIALS, BATCH_STATS, UPDATE_RUNNING, HAS_GAMMA, HAS_BETA, COUNT_BATCH, BLOCK_T,
                          BLOCK_C, IS_FP64, "", 3)


@triton.jit
def _bn_finalize_channels(mean_part_ptr, m2_part_ptr, gamma_ptr, beta_ptr, running_mean_ptr, running_var_ptr,
                          out_ptr, count_ptr, counts_batch, offs_c, mask_c, M, C, TILES, ROWS_PER_TILE, momentum,
                          eps, unbias, FROM_PARTIALS: tl.constexpr, BATCH_STATS: tl.constexpr,
                          UPDATE_RUNNING: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr,
                          COUNT_BATCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                          IS_FP64: tl.constexpr, CACHE: tl.constexpr, STAGES: tl.constexpr):
    """bn_finalize_kernel's work for the channels offs_c; the program with
    ``counts_batch`` also adds the batch to num_batches_tracked (COUNT_BATCH)."""
    if COUNT_BATCH:
        if counts_batch:
            tl.store(count_ptr, tl.load(count_ptr) + 1)
    if IS_FP64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    if BATCH_STATS:
        if FROM_PARTIALS:
            mean, var = _chan_merge(mean_part_ptr, m2_part_ptr, offs_c, mask_c, M, C, TILES, ROWS_PER_TILE,
                                    BLOCK_T, BLOCK_C, IS_FP64, CACHE, STAGES)
        else:  # mean/var given (rows 0 and 1 of the parts buffer)
            mean = tl.load(mean_part_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
            var = tl.load(m2_part_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        if UPDATE_RUNNING:
            rm = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0)
            rv = tl.load(running_var_ptr + offs_c, mask=mask_c, other=0.0)
            new_rm = rm.to(acc_dtype) * (1 - momentum) + mean * momentum
            new_rv = rv.to(acc_dtype) * (1 - momentum) + var * unbias * momentum
            tl.store(running_mean_ptr + offs_c, new_rm.to(rm.dtype), mask=mask_c)
            tl.store(running_var_ptr + offs_c, new_rv.to(rv.dtype), mask=mask_c)
    else:
        mean = tl.load(running_mean_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
        var = tl.load(running_var_ptr + offs_c, mask=mask_c, other=1.0).to(acc_dtype)
    if IS_FP64:
        invstd = 1.0 / tl.sqrt(var + eps)
    else:
        invstd = 1.0 / tl.sqrt_rn(var + eps)  # IEEE-rounded, like torch.rsqrt's reference
    scale = invstd
    if HAS_GAMMA:
        scale = scale * tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
    shift = -mean * scale
    if HAS_BETA:
        shift = shift + tl.load(beta_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
    tl.store(out_ptr + offs_c, mean, mask=mask_c)
    tl.store(out_ptr + C + offs_c, invstd, mask=mask_c)
    tl.store(out_ptr + 2 * C + offs_c, scale, mask=mask_c)
    tl.store(out_ptr + 3 * C + offs_c, shift, mask=mask_c)


@triton.jit
def bn_backward_finalize_kernel(sum_gz_ptr, sum_gz_xhat_ptr, bn_ptr, out_ptr, M, C, TILES,
                                TRAINING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums the dgrad epilogue's per-tile partials and folds the BatchNorm
    backward into per-channel constants: out rows = grad_gamma (sum gz*xhat),
    grad_beta (sum gz), k1, k0 with gx = gz*scale + x*k1 + k0 (training; zero
    in eval). bn rows: mean, invstd, scale, shift."""
    pid_c = tl.program_id(0)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    _bn_backward_channels(sum_gz_ptr, sum_gz_xhat_ptr, bn_ptr, bn_ptr + C, bn_ptr + 2 * C, out_ptr, offs_c,
                          offs_c < C, M, C, TILES, TRAINING, BLOCK_T, BLOCK_C, "", 3)


@triton.jit
def _bn_backward_channels(sum_gz_ptr, sum_gz_xhat_ptr, mean_ptr, invstd_ptr, scale_ptr, out_ptr, offs_c, mask_c, M,
                          C, TILES, TRAINING: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                          CACHE: tl.constexpr, STAGES: tl.constexpr):
    """bn_backward_finalize_kernel's work for the channels offs_c."""
    g_beta = tl.zeros((BLOCK_C,), dtype=out_ptr.dtype.element_ty)
    g_gamma = tl.zeros((BLOCK_C,), dtype=out_ptr.dtype.element_ty)
    for t0 in tl.range(0, TILES, BLOCK_T, num_stages=STAGES):  # loads pipelined, as in _chan_merge
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask = (offs_t < TILES)[:, None] & mask_c[None, :]
        idx = offs_t[:, None] * C + offs_c[None, :]
        g_beta += tl.sum(tl.load(sum_gz_ptr + idx, mask=mask, other=0.0, cache_modifier=CACHE), axis=0)
        g_gamma += tl.sum(tl.load(sum_gz_xhat_ptr + idx, mask=mask, other=0.0, cache_modifier=CACHE), axis=0)
    tl.store(out_ptr + offs_c, g_gamma, mask=mask_c)
    tl.store(out_ptr + C + offs_c, g_beta, mask=mask_c)
    if TRAINING:
        # gx = scale*(gz - g_beta/M - xhat*g_gamma/M), xhat = (x - mean)*invstd
        mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
        invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
        scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
        k1 = -scale * g_gamma * invstd / M
        k0 = -scale * g_beta / M - k1 * mean
    else:
        k1 = tl.zeros((BLOCK_C,), dtype=out_ptr.dtype.element_ty)
        k0 = tl.zeros((BLOCK_C,), dtype=out_ptr.dtype.element_ty)
    tl.store(out_ptr + 2 * C + offs_c, k1, mask=mask_c)
    tl.store(out_ptr + 3 * C + offs_c, k0, mask=mask_c)


@triton.jit
def _activated_tile(x_ptr, scale_ptr, shift_ptr, row_base, row_ok, offs_c, C, sxc,
                    DOT_DTYPE: tl.constexpr, IS_FP64: tl.constexpr, WIDE_INDEX: tl.constexpr,
                    EVEN_C: tl.constexpr, ACT_PASS: tl.constexpr):
    """[rows, channels] tile of a = relu(x*scale + shift), zero where the row
    is a padding tap or out of range (zero *after* the activation). EVEN_C:
    the tile is inside C (C a multiple of the block), no channel masks.
    ACT_PASS: ``x_ptr`` holds the activation already (activation_pass_kernel's
    output, laid out as x), read as it is; its masked rows load zero."""
    mask_c = (offs_c < C) | EVEN_C
    mask = row_ok[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + row_base[:, None] + _idx(offs_c, WIDE_INDEX)[None, :] * sxc, mask=mask, other=0.0)
    if ACT_PASS:
        return x.to(DOT_DTYPE)
    return _activate(x, scale_ptr, shift_ptr, row_ok, offs_c, C, DOT_DTYPE, IS_FP64, EVEN_C)


@triton.jit
def _activate(x, scale_ptr, shift_ptr, row_ok, offs_c, C, DOT_DTYPE: tl.constexpr, IS_FP64: tl.constexpr,
              EVEN_C: tl.constexpr):
    """relu(x*scale + shift) of a loaded [rows, channels] tile, zero in the
    rows where ``row_ok`` is false (padding taps, rows past M), cast to DOT_DTYPE."""
    mask_c = (offs_c < C) | EVEN_C
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    if IS_FP64:
        z = x.to(tl.float64) * scale[None, :] + shift[None, :]
    else:
        z = x.to(tl.float32) * scale[None, :] + shift[None, :]
    # ReLU, then the padding rows' zero as a per-row upper limit (0 or inf):
    # two min/max per element in fp32. The same as a select on (mask & z > 0)
    # (NaN included: fmax/fmin return the other operand), which the compiler
    # applied to each 16-bit half after packing the tile to bf16 (unpack,
    # select, repack): 560 -> 494 instructions per step of the flat 3x3
    # forward's loop (sm_90 SASS, triton 3.6). Channels past C load x = 0
    # with scale = shift = 0, so they are 0 too.
    limit = tl.where(row_ok, float("inf"), 0.0)
    a = tl.minimum(tl.maximum(z, 0.0), limit[:, None])
    return a.to(DOT_DTYPE)


@triton.jit
def _small_div(a, b_inv):
    """a // b for 0 <= a < 2**20 and b >= 1, given b_inv = 1.0 / b in fp32:
    floor((a + 0.5) * b_inv). (a + 0.5)/b lies at least 0.5/b from an
    integer; b_inv's error (up to 2 ulp: the GPU's fast fp32 division) and
    the product's rounding move it by under (a + 0.5)/b * 2**-21.6, less
    than that while a < 2**20. Four instructions where an integer division
    by a runtime value takes ~25: the parity dgrad's step counter, where a <
    4 * chunks of 16+ channels (triton_launch caps channels at 2**20).
    test_triton checks it exhaustively over that range with b_inv off by
    0-2 ulp either way, and through this function on the device."""
    return tl.cast((tl.cast(a, tl.float32) + 0.5) * b_inv, tl.int32)


@triton.jit
def _flat_tap(it, chunks, KW: tl.constexpr, BLOCK_K: tl.constexpr, TAPS: tl.constexpr, TAPS_INNER: tl.constexpr):
    """Iteration ``it`` of a flat reduction loop over taps x chunks of
    BLOCK_K channels: (kh, kw, the chunk's channel offsets). Taps outer
    (each tap's chunks in turn), or with TAPS_INNER chunks outer (a chunk's
    ``TAPS`` taps in turn: L1_TAPS, whose taps re-read the rows of a chunk
    while the chunk is still in L1, one step apart instead of ``chunks``). (Counters
    carried by the loop, or _small_div's fp32 division, save ~10-15 of ~430
    instructions a step, but made ptxas serialize the 3x3 forward's wgmmas:
    sm_90, triton 3.6. In the stride-1 dgrad _small_div saved 12 of 195 and
    the 16-channel flat dgrad then measured 2.2x slower in the autotuner's
    trials on the H200, session 8, cause not found: both keep the division.)"""
    if TAPS_INNER:
        chunk = it // TAPS  # (a division by a constant)
        tap = it - chunk * TAPS
        kh = tap // KW
        return kh, tap - kh * KW, chunk * BLOCK_K + tl.arange(0, BLOCK_K)
    kh, kw, c0 = _flat_step(it, chunks, KW, BLOCK_K)
    return kh, kw, c0 + tl.arange(0, BLOCK_K)


@triton.jit
def _flat_step(it, chunks, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """(kh, kw, first channel of the chunk) of iteration ``it`` of a flat
    loop over taps x chunks of BLOCK_K channels."""
    tap = it // chunks
    kh = tap // KW
    return kh, tap - kh * KW, (it - tap * chunks) * BLOCK_K


@triton.jit
def _fwd_mma(acc, x_ptr, scale_ptr, shift_ptr, row_base, row_ok, w_tap, offs_c, offs_n, mask_n, C, sxc, swc, swk,
             DOT_DTYPE: tl.constexpr, IS_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
             WIDE_INDEX: tl.constexpr, EVEN_C: tl.constexpr, ACT_PASS: tl.constexpr):
    """acc += relu(x*scale + shift)[rows, offs_c] @ W[tap][offs_c, offs_n]
    (ACT_PASS: ``x_ptr`` holds relu(x*scale + shift) already)."""
    a = _activated_tile(x_ptr, scale_ptr, shift_ptr, row_base, row_ok, offs_c, C, sxc, DOT_DTYPE, IS_FP64, WIDE_INDEX,
                        EVEN_C, ACT_PASS)
    b = tl.load(w_tap + offs_c[:, None] * swc + offs_n[None, :] * swk,
                mask=((offs_c < C) | EVEN_C)[:, None] & mask_n[None, :], other=0.0)
    return tl.dot(a, b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _fwd_tma_mma(acc, x_desc, w_desc, scale_ptr, shift_ptr, mask_m, oh, ow, kh, kw, c0, m0, n0, C, H, W,
                 PAD: tl.constexpr, KW: tl.constexpr, BLOCK_K: tl.constexpr, W_KC: tl.constexpr,
                 DOT_DTYPE: tl.constexpr, IS_FP64: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 EVEN_C: tl.constexpr):
    """acc += relu(x*scale + shift)[tap rows, c0:c0+BLOCK_K] @ W[tap][c0:c0+BLOCK_K, n0:]
    through TMA descriptors (conv_fwd_kernel's TMA): the tap's input rows
    are the output rows m0... shifted by (kh - PAD) * W + (kw - PAD)."""
    ih = oh - PAD + kh
    iw = ow - PAD + kw
    row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    x = x_desc.load([m0 + (kh - PAD) * W + (kw - PAD), c0])
    a = _activate(x, scale_ptr, shift_ptr, row_ok, c0 + tl.arange(0, BLOCK_K), C, DOT_DTYPE, IS_FP64, EVEN_C)
    if W_KC:
        b = w_desc.load([n0, c0]).T
    else:
        b = w_desc.load([(kh * KW + kw) * C + c0, n0])
    # Channels past C: x's tile is zero there (beyond the descriptor), so
    # is the activation (scale = shift = 0), whatever weight rows (the next
    # tap's) the block meets.
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def conv_fwd_kernel(x_ptr, act_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, y_ptr, mean_part_ptr, m2_part_ptr,
                    M, C, K, H, W, OH, OW,
                    sxn, sxc, sxh, sxw, syn, syc, syh, syw, srn, src, srh, srw, swk, swc, swh, sww,
                    STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                    HAS_RESIDUAL: tl.constexpr, EMIT_STATS: tl.constexpr, IS_FP64: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                    FLAT: tl.constexpr, EPILOGUE_FIRST: tl.constexpr = False, WIDE_INDEX: tl.constexpr = False,
                    EVEN_C: tl.constexpr = False, TMA: tl.constexpr = False, W_KC: tl.constexpr = False,
                    ACT_PASS: tl.constexpr = False, L1_TAPS: tl.constexpr = False):
    """Implicit-GEMM forward: rows = output pixels (M = N*OH*OW), columns =
    output channels (K), reduction = KH*KW taps x C input channels. The
    weight [K, C, KH, KW] is read through its strides (sw*): nn.Conv2d's own
    for 1x1, packed [KH, KW, C, K] by the launcher for larger kernels; in any
    float dtype, cast to DOT_DTYPE as it is loaded (autocast's cast).

    The reduction loop: taps unrolled, a loop over channel chunks in each
    (FLAT off); or one loop over (tap, chunk) (FLAT on), which Triton's
    pipeliner can prefetch across taps (num_stages). With C in one chunk
    (ResNet-164's 16-64 channels) the unrolled form waits for each tap's
    loads in turn; the flat one recomputes the tap's row offsets per chunk.
    Both are autotuning candidates for KH*KW > 1.

    EPILOGUE_FIRST (with a residual): the residual tile is loaded before the
    reduction loop, so that its latency overlaps the loop's instead of
    following it: for short reductions (one or two steps, as in ResNet-164's
    1x1 units), where the epilogue's loads are a good part of the kernel.

    EVEN_C: C is a multiple of BLOCK_K (as in every ResNet layer), so the
    reduction's loads need no channel masks: 4-8% of the loop's
    instructions (sm_90 SASS, triton 3.6; EVEN_K in the dgrad: ~25%).

    TMA (stride 1, "same" padding, x with dense rows; the launcher checks):
    x and the weight are read by the Hopper tensor-memory accelerator
    through tensor descriptors, x as the [M, C] matrix of its pixels. For
    tap (kh, kw) the input pixel of output row m is row m + (kh - PAD) * W +
    (kw - PAD): the tile of a tap is a block of rows shifted by a constant,
    one descriptor load. Rows that shift across an image's border (or off
    the tensor, which the TMA fills with zeros) are padding taps, zeroed
    after the activation by the same row mask as the pointer loads. No
    per-element address arithmetic or masks, and the copies run
    asynchronously in the pipeline's stages: on sm_90 the 3x3 128x128x64
    tile takes 128 registers with triton 3.6 (maxnreg, no spills: two
    programs an SM) where the pointer forms take 164 (flat) to 246
    (unrolled; triton_aot). The weight: packed [KH*KW*C, K]
    (K contiguous), or a 1x1 one as [K, C] (W_KC, C contiguous, nn.Conv2d's
    layout), in x's dtype.

    ACT_PASS (pointer forms): the activation relu(x*scale + shift) was
    written to ``act_ptr`` (laid out as x, in x's dtype: the value the
    prologue would cast to DOT_DTYPE) by activation_pass_kernel just before,
    and the loop reads it as a plain convolution reads its input (masked
    rows load zero: the padding). The prologue computes each activation once
    per tap that reads it (9 times in a 3x3 conv) and per tile of output
    channels, in the loop that feeds the tensor cores, and carries the
    activated tile through registers; the pass computes it
    once, and the loop is the dgrad's (which ran 1.2-1.8x faster than this
    forward on the same shapes with long reductions: benchmarks/RESULTS.md,
    session 12). An autotuning candidate whose trials include the pass
    (triton_launch: the config's pre_hook); x itself is what the op saves.

    L1_TAPS (pointer forms, several taps): the taps' input tiles copied
    through L1 (``_rows_through_l1``), where the taps that re-read a row
    may find it, instead of all from L2 (the sooner, the likelier: with
    one chunk of channels, ResNet-v2-50's first 3x3 layer, a tap's rows
    were read one to three steps before)."""
    pid_m, pid_n = _grouped_pid(M, K, BLOCK_M, BLOCK_N, GROUP_M)
    src_ptr = act_ptr if ACT_PASS else x_ptr  # what the pointer forms' reduction loop reads

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < K
    n, oh, ow = _rows_to_nhw(offs_m, OH * OW, OW)
    n = _idx(n, WIDE_INDEX)
    mask = mask_m[:, None] & mask_n[None, :]
    col = _idx(offs_n, WIDE_INDEX)[None, :]
    res_ptrs = res_ptr + (n * srn + _idx(oh * srh + ow * srw, WIDE_INDEX))[:, None] + col * src
    if HAS_RESIDUAL and EPILOGUE_FIRST:
        res = tl.load(res_ptrs, mask=mask, other=0.0)
    if IS_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # The reduction loop runs at least once (the launchers check C > 0).
    # Told so, the compiler drops the path that skips it, on which the
    # accumulator reaching the epilogue is set by a plain move instead of a
    # wgmma: with that path ptxas serializes every wgmma of the loop (its
    # note C7515; triton_aot reports it as ``serialized``). Not told for the
    # unrolled 3x3 loops, where it makes ptxas serialize them instead
    # (registers of a wgmma's A operand redefined in flight; sm_90, triton 3.6).
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, C], [sxw, 1], [BLOCK_M, BLOCK_K])
        if W_KC:
            w_desc = tl.make_tensor_descriptor(w_ptr, [K, C], [swk, 1], [BLOCK_N, BLOCK_K])
        else:
            w_desc = tl.make_tensor_descriptor(w_ptr, [KH * KW * C, K], [swc, 1], [BLOCK_K, BLOCK_N])
        if KH * KW == 1:
            # (this loop form, not the flat one: with the flat one triton 3.8
            # has ptxas serialize the 1x1 wgmmas, sm_90)
            tl.assume(C > 0)
            for c0 in range(0, C, BLOCK_K):
                acc = _fwd_tma_mma(acc, x_desc, w_desc, scale_ptr, shift_ptr, mask_m, oh, ow, 0, 0, c0,
                                   pid_m * BLOCK_M, pid_n * BLOCK_N, C, H, W, PAD, KW, BLOCK_K, W_KC, DOT_DTYPE,
                                   IS_FP64, INPUT_PRECISION, EVEN_C)
        else:
            chunks = tl.cdiv(C, BLOCK_K)
            tl.assume(KH * KW * chunks > 0)
            for it in range(0, KH * KW * chunks):
                kh, kw, c0 = _flat_step(it, chunks, KW, BLOCK_K)
                acc = _fwd_tma_mma(acc, x_desc, w_desc, scale_ptr, shift_ptr, mask_m, oh, ow, kh, kw, c0,
                                   pid_m * BLOCK_M, pid_n * BLOCK_N, C, H, W, PAD, KW, BLOCK_K, W_KC, DOT_DTYPE,
                                   IS_FP64, INPUT_PRECISION, EVEN_C)
    elif FLAT:
        chunks = tl.cdiv(C, BLOCK_K)
        tl.assume(KH * KW * chunks > 0)
        for it in range(0, KH * KW * chunks):
            # (taps outer even with L1_TAPS: with a chunk's taps in turn ptxas
            # serializes this loop's wgmmas, its note C7515; sm_90, triton 3.6)
            kh, kw, offs_c = _flat_tap(it, chunks, KW, BLOCK_K, KH * KW, False)
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + kw
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row_base = _rows_through_l1(n * sxn + _idx(ih * sxh + iw * sxw, WIDE_INDEX), row_ok, src_ptr, L1_TAPS)
            acc = _fwd_mma(acc, src_ptr, scale_ptr, shift_ptr, row_base, row_ok, w_ptr + kh * swh + kw * sww,
                           offs_c, offs_n, mask_n, C, sxc, swc, swk, DOT_DTYPE, IS_FP64, INPUT_PRECISION, WIDE_INDEX,
                           EVEN_C, ACT_PASS)
    else:
        if KH * KW == 1:
            tl.assume(C > 0)
        for kh in tl.static_range(KH):
            ih = oh * STRIDE - PAD + kh
            for kw in tl.static_range(KW):
                iw = ow * STRIDE - PAD + kw
                row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                row_base = _rows_through_l1(n * sxn + _idx(ih * sxh + iw * sxw, WIDE_INDEX), row_ok, src_ptr,
                                            L1_TAPS)
                w_tap = w_ptr + kh * swh + kw * sww
                for c0 in range(0, C, BLOCK_K):
                    acc = _fwd_mma(acc, src_ptr, scale_ptr, shift_ptr, row_base, row_ok, w_tap,
                                   c0 + tl.arange(0, BLOCK_K), offs_n, mask_n, C, sxc, swc, swk, DOT_DTYPE, IS_FP64,
                                   INPUT_PRECISION, WIDE_INDEX, EVEN_C, ACT_PASS)

    if HAS_RESIDUAL:
        if not EPILOGUE_FIRST:
            res = tl.load(res_ptrs, mask=mask, other=0.0)
        acc += res.to(acc.dtype)
    out = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + (n * syn + _idx(oh * syh + ow * syw, WIDE_INDEX))[:, None] + col * syc, out, mask=mask)
    if EMIT_STATS:
        # Statistics of the value as stored (rounded to y's dtype), which is
        # what the next BatchNorm would see.
        v = tl.where(mask, out.to(acc.dtype), 0.0)
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M)
        mean = tl.sum(v, axis=0) / count
        d = tl.where(mask, v - mean[None, :], 0.0)
        tl.store(mean_part_ptr + pid_m * K + offs_n, mean, mask=mask_n)
        tl.store(m2_part_ptr + pid_m * K + offs_n, tl.sum(d * d, axis=0), mask=mask_n)


@triton.jit
def _dgrad_mma(acc, gy_ptr, row_base, row_ok, w_tap, offs_k, offs_n, mask_n, K, sgc, swk, swc,
               DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr,
               EVEN_K: tl.constexpr):
    """acc += gy[rows, offs_k] @ W[tap][offs_k, offs_n] (EVEN_K: no K masks)."""
    mask_k = (offs_k < K) | EVEN_K
    g = tl.load(gy_ptr + row_base[:, None] + _idx(offs_k, WIDE_INDEX)[None, :] * sgc,
                mask=row_ok[:, None] & mask_k[None, :], other=0.0)
    b = tl.load(w_tap + offs_k[:, None] * swk + offs_n[None, :] * swc, mask=mask_k[:, None] & mask_n[None, :],
                other=0.0)
    return tl.dot(g.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def conv_dgrad_kernel(gy_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, gz_ptr,
                      sum_gz_ptr, sum_gz_xhat_ptr, counter_ptr, out_ptr,
                      M, C, K, H, W, OH, OW, TILES,
                      sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw, swk, swc, swh, sww,
                      STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      IS_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                      FLAT: tl.constexpr, PARITY: tl.constexpr = False, EPILOGUE_FIRST: tl.constexpr = False,
                      WIDE_INDEX: tl.constexpr = False, EVEN_K: tl.constexpr = False,
                      FINALIZE: tl.constexpr = False, TRAINING: tl.constexpr = True, BLOCK_T: tl.constexpr = 16,
                      TMA: tl.constexpr = False, L1_TAPS: tl.constexpr = False):
    """ga[n, h, w, c] = sum over taps and output channels of gy * W: rows =
    input pixels (M = N*H*W), columns = input channels C, reduction = taps x
    K. A tap reaches output pixel ((h + PAD - kh)/STRIDE, ...) when that is an
    integer in range. The weight [K, C, KH, KW] is read through its strides
    (nn.Conv2d's own for 1x1, packed [KH, KW, K, C] otherwise) and cast to
    DOT_DTYPE as it is loaded. FLAT: one loop over (tap, chunk of K), as in
    conv_fwd_kernel.
    PARITY (STRIDE 2): a stride-2 conv reaches input pixel (h, w) only
    through the taps with h + PAD - kh and w + PAD - kw even, 1 to 4 of a
    3x3's 9. So the input pixels are taken in four classes by the parity of
    (h, w) (program axis 1), each class's rows in raster order, and each
    class loops over its own taps only: a quarter of the MMA work of
    visiting all 9 taps with masked rows.
    Epilogue: gz = ga * [x*scale + shift > 0] stored in x's layout, and
    per-tile sums of gz and gz*xhat for the gamma/beta gradients (tile rows
    [class * row tiles + row tile] with PARITY). EPILOGUE_FIRST: x's tile is
    loaded before the reduction loop (as in conv_fwd_kernel): the 1x1a
    units' dgrads reduce over 16-64 channels in one or two steps, then read
    and write tiles of 64-256 channels. EVEN_K: K is a multiple of BLOCK_K
    (no K masks on the loads, as conv_fwd_kernel's EVEN_C).
    FINALIZE: the last of the TILES programs of each column block (TILES:
    rows of the partial sums) to finish sums their partials and does
    bn_backward_finalize_kernel's work for its channels (into out, [4, C]);
    without it counter_ptr and out_ptr are not read.
    TMA (stride 1, "same" padding, gy with dense rows): gy and the weight
    read through tensor descriptors, as conv_fwd_kernel's TMA: input pixel
    m's output pixel through tap (kh, kw) is row m + (PAD - kh) * W + (PAD
    - kw) of gy's [M, K] matrix, rows crossing a border zeroed in registers
    (none for 1x1: its tiles go from shared memory to the MMA as loaded);
    the weight packed [KH*KW*K, C] (C contiguous; a 1x1 one as nn.Conv2d's
    [K, C]), in gy's dtype.
    L1_TAPS (the pointer forms' loops without PARITY, several taps): gy's
    tap tiles copied through L1, as conv_fwd_kernel's L1_TAPS; the flat
    loop then takes a chunk's taps in turn (``_flat_tap``'s TAPS_INNER:
    a row re-read one step after it was read, where with taps outer and
    8 chunks of 64 channels, ResNet-v2-50's last stage, 8 steps after)."""
    tl.assume(K > 0)  # the reduction runs (see conv_fwd_kernel)
    if PARITY:
        cls = tl.program_id(1)
        ph = cls // 2
        pw = cls - ph * 2
        images = M // (H * W)
        hc = (H - ph + 1) // 2  # rows and columns of this class
        wc = (W - pw + 1) // 2
        rows_max = images * ((H + 1) // 2) * ((W + 1) // 2)  # the largest class, (0, 0)
        pid_m, pid_n = _grouped_pid(rows_max, C, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < images * hc * wc
        n, i, j = _rows_to_nhw(offs_m, tl.maximum(hc * wc, 1), tl.maximum(wc, 1))  # (an empty class: H or W 1)
        h = 2 * i + ph
        w = 2 * j + pw
        tile = cls * tl.cdiv(rows_max, BLOCK_M) + pid_m
    else:
        pid_m, pid_n = _grouped_pid(M, C, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        n, h, w = _rows_to_nhw(offs_m, H * W, W)
        tile = pid_m
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    mask = mask_m[:, None] & mask_n[None, :]
    n = _idx(n, WIDE_INDEX)
    x_offs = (n * sxn + _idx(h * sxh + w * sxw, WIDE_INDEX))[:, None] + _idx(offs_n, WIDE_INDEX)[None, :] * sxc
    if EPILOGUE_FIRST:
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    if IS_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PARITY:
        # Taps of this class: kh = kh0, kh0 + 2, ... with kh0 = (ph + PAD)
        # mod 2, likewise kw; one flat loop over (tap, chunk of K), which
        # Triton software-pipelines. With h = 2i + ph, h + PAD - kh is even,
        # so the output row is oh = i + dh with dh = (ph + PAD - kh) / 2 the
        # same for every row of the class: per step only a scalar offset and
        # four comparisons per row (no divisions: 240 -> 185 instructions a
        # 128x128x64 step, sm_90 SASS, triton 3.6).
        tl.static_assert(KW <= 4)  # (at most 2 taps of a class per row of the kernel: the shift below)
        kh0 = (ph + PAD) % 2
        kw0 = (pw + PAD) % 2
        taps_w = (KW - kw0 + 1) // 2
        chunks = tl.cdiv(K, BLOCK_K)
        chunks_inv = 1.0 / tl.cast(chunks, tl.float32)
        pixel_base = n * sgn + _idx(i * sgh + j * sgw, WIDE_INDEX)
        if KH > 1 and KW > 1:  # every class has a tap (a 1x1's odd classes have none)
            tl.assume((KH - kh0 + 1) // 2 * taps_w * chunks > 0)
        for it in range(0, (KH - kh0 + 1) // 2 * taps_w * chunks):
            tap = _small_div(it, chunks_inv)
            tap_h = tap >> (taps_w // 2)  # tap // taps_w, taps_w being 1 or 2
            kh = kh0 + 2 * tap_h
            kw = kw0 + 2 * (tap - tap_h * taps_w)
            dh = (ph + PAD - kh) // 2  # (exact: even)
            dw = (pw + PAD - kw) // 2
            row_ok = mask_m & (i >= -dh) & (i < OH - dh) & (j >= -dw) & (j < OW - dw)
            row_base = pixel_base + _idx(dh * sgh + dw * sgw, WIDE_INDEX)
            acc = _dgrad_mma(acc, gy_ptr, row_base, row_ok, w_ptr + kh * swh + kw * sww,
                             (it - tap * chunks) * BLOCK_K + tl.arange(0, BLOCK_K), offs_n, mask_n, K, sgc, swk, swc,
                             DOT_DTYPE, INPUT_PRECISION, WIDE_INDEX, EVEN_K)
    elif TMA:
        gy_desc = tl.make_tensor_descriptor(gy_ptr, [M, K], [sgw, 1], [BLOCK_M, BLOCK_K])
        w_desc = tl.make_tensor_descriptor(w_ptr, [KH * KW * K, C], [swk, 1], [BLOCK_K, BLOCK_N])
        if KH * KW == 1:  # (the loop form that keeps ptxas's wgmmas pipelined: conv_fwd_kernel)
            for k0 in range(0, K, BLOCK_K):
                acc = tl.dot(gy_desc.load([pid_m * BLOCK_M, k0]), w_desc.load([k0, pid_n * BLOCK_N]), acc,
                             input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        else:
            chunks = tl.cdiv(K, BLOCK_K)
            tl.assume(KH * KW * chunks > 0)
            for it in range(0, KH * KW * chunks):
                kh, kw, k0 = _flat_step(it, chunks, KW, BLOCK_K)
                th = h + PAD - kh
                tw = w + PAD - kw
                row_ok = mask_m & (th >= 0) & (th < OH) & (tw >= 0) & (tw < OW)
                g = gy_desc.load([pid_m * BLOCK_M + (PAD - kh) * W + (PAD - kw), k0])
                g = tl.where(row_ok[:, None], g, 0.0)
                # (channels past K: gy's tile is zero there, beyond the descriptor)
                b = w_desc.load([(kh * KW + kw) * K + k0, pid_n * BLOCK_N])
                acc = tl.dot(g, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    elif FLAT:
        chunks = tl.cdiv(K, BLOCK_K)
        tl.assume(KH * KW * chunks > 0)
        for it in range(0, KH * KW * chunks):
            kh, kw, offs_k = _flat_tap(it, chunks, KW, BLOCK_K, KH * KW, L1_TAPS)
            th = h + PAD - kh
            oh = th // STRIDE
            tw = w + PAD - kw
            ow = tw // STRIDE
            row_ok = (mask_m & (th >= 0) & (th == oh * STRIDE) & (oh < OH) & (tw >= 0) & (tw == ow * STRIDE)
                      & (ow < OW))
            row_base = _rows_through_l1(n * sgn + _idx(oh * sgh + ow * sgw, WIDE_INDEX), row_ok, gy_ptr, L1_TAPS)
            acc = _dgrad_mma(acc, gy_ptr, row_base, row_ok, w_ptr + kh * swh + kw * sww, offs_k, offs_n, mask_n, K,
                             sgc, swk, swc, DOT_DTYPE, INPUT_PRECISION, WIDE_INDEX, EVEN_K)
    else:
        for kh in tl.static_range(KH):
            th = h + PAD - kh
            oh = th // STRIDE
            h_ok = (th >= 0) & (th == oh * STRIDE) & (oh < OH)
            for kw in tl.static_range(KW):
                tw = w + PAD - kw
                ow = tw // STRIDE
                row_ok = mask_m & h_ok & (tw >= 0) & (tw == ow * STRIDE) & (ow < OW)
                row_base = _rows_through_l1(n * sgn + _idx(oh * sgh + ow * sgw, WIDE_INDEX), row_ok, gy_ptr,
                                            L1_TAPS)
                w_tap = w_ptr + kh * swh + kw * sww
                for k0 in range(0, K, BLOCK_K):
                    acc = _dgrad_mma(acc, gy_ptr, row_base, row_ok, w_tap, k0 + tl.arange(0, BLOCK_K), offs_n,
                                     mask_n, K, sgc, swk, swc, DOT_DTYPE, INPUT_PRECISION, WIDE_INDEX, EVEN_K)

    if not EPILOGUE_FIRST:
        x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    _relu_backward_tile(acc, x.to(acc.dtype), mask, x_offs, offs_n, mask_n, tile, C, scale_ptr, shift_ptr, mean_ptr,
                        invstd_ptr, gz_ptr, sum_gz_ptr, sum_gz_xhat_ptr)
    if FINALIZE:
        if _arrived_last(counter_ptr + pid_n, TILES):
            _bn_backward_channels(sum_gz_ptr, sum_gz_xhat_ptr, mean_ptr, invstd_ptr, scale_ptr, out_ptr, offs_n,
                                  mask_n, M, C, TILES, TRAINING, BLOCK_T, BLOCK_N, ".cg", 1)
            tl.store(counter_ptr + pid_n, 0)  # ready for the next launch


@triton.jit
def activation_pass_kernel(x_ptr, scale_ptr, shift_ptr, act_ptr, M, C, HW, W, sxn, sxc, sxh, sxw,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr):
    """act = relu(x*scale + shift) in x's dtype, laid out as x (same
    strides): the input of the GEMM kernels' ACT_PASS form, rounded once,
    as their prologue rounds it to the MMA's dtype. One [pixels, channels]
    tile a program."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_m = offs_m < M
    mask_c = offs_c < C
    offs = _pixel_offsets(offs_m, offs_c, HW, W, sxn, sxc, sxh, sxw)
    mask = mask_m[:, None] & mask_c[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    a = _activate(x, scale_ptr, shift_ptr, mask_m, offs_c, C, act_ptr.dtype.element_ty, IS_FP64, False)
    tl.store(act_ptr + offs, a, mask=mask)


@triton.jit
def bn_grad_input_kernel(gz_ptr, x_ptr, gx_ptr, scale_ptr, k1_ptr, k0_ptr, M, C, HW, W,
                         sxn, sxc, sxh, sxw, TRAINING: tl.constexpr, IS_FP64: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """gx = gz*scale + x*k1 + k0 (training: the batch-statistics terms folded
    into per-channel k1, k0) or gz*scale (eval). gz, x, gx share x's strides,
    so gx may overwrite gz in place."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    offs = _pixel_offsets(offs_m, offs_c, HW, W, sxn, sxc, sxh, sxw)
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    if IS_FP64:
        g = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float64) * scale[None, :]
    else:
        g = tl.load(gz_ptr + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :]
    if TRAINING:
        k1 = tl.load(k1_ptr + offs_c, mask=mask_c, other=0.0)
        k0 = tl.load(k0_ptr + offs_c, mask=mask_c, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        g = g + x * k1[None, :] + k0[None, :]
    tl.store(gx_ptr + offs, g.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def relu_backward_partials_kernel(ga_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, gz_ptr, sum_gz_ptr,
                                  sum_gz_xhat_ptr, M, C, HW, W, sgn, sgc, sgh, sgw, sxn, sxc, sxh, sxw,
                                  BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, IS_FP64: tl.constexpr):
    """conv_dgrad_kernel's epilogue over a gradient of the activation computed
    elsewhere (ga: the library GEMM route's, PyTorch's convolution backward):
    gz = ga where x*scale + shift > 0, else 0, stored with x's strides (over
    ga in place where it has them), and the tile's per-channel sums of gz and
    gz*xhat at row pid_m of the [tiles, C] partials, which
    bn_backward_finalize_kernel sums. One [pixels, channels] tile a program."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    mask = (offs_m < M)[:, None] & mask_c[None, :]
    x_offs = _pixel_offsets(offs_m, offs_c, HW, W, sxn, sxc, sxh, sxw)
    ga = tl.load(ga_ptr + _pixel_offsets(offs_m, offs_c, HW, W, sgn, sgc, sgh, sgw), mask=mask, other=0.0)
    if IS_FP64:
        ga = ga.to(tl.float64)
    else:
        ga = ga.to(tl.float32)
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(ga.dtype)
    _relu_backward_tile(ga, x, mask, x_offs, offs_c, mask_c, pid_m, C, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                        gz_ptr, sum_gz_ptr, sum_gz_xhat_ptr)


@triton.jit
def _relu_backward_tile(ga, x, mask, x_offs, offs_c, mask_c, row, C, scale_ptr, shift_ptr, mean_ptr, invstd_ptr,
                        gz_ptr, sum_gz_ptr, sum_gz_xhat_ptr):
    """The BN+ReLU backward of a [pixels, channels] tile from the
    activation's gradient ``ga`` and x (both in the accumulation dtype):
    gz = ga where x*scale + shift > 0, else 0, stored at x's offsets, and the
    tile's per-channel sums of gz and gz*xhat (xhat = (x - mean)*invstd) at
    row ``row`` of the [tiles, C] partials. conv_dgrad_kernel's epilogue
    and relu_backward_partials_kernel."""
    scale = tl.load(scale_ptr + offs_c, mask=mask_c, other=0.0)
    shift = tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0)
    mean = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0)
    invstd = tl.load(invstd_ptr + offs_c, mask=mask_c, other=0.0)
    z = x * scale[None, :] + shift[None, :]
    gz = tl.where(mask & (z > 0), ga, 0.0)
    tl.store(gz_ptr + x_offs, gz.to(gz_ptr.dtype.element_ty), mask=mask)
    xhat = (x - mean[None, :]) * invstd[None, :]
    tl.store(sum_gz_ptr + row * C + offs_c, tl.sum(gz, axis=0), mask=mask_c)
    tl.store(sum_gz_xhat_ptr + row * C + offs_c, tl.sum(gz * xhat, axis=0), mask=mask_c)


@triton.jit
def _wgrad_program(M, C, K, SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A weight-gradient program's (split, K tile, C tile, K offsets, C
    offsets, K mask, row tiles per split) from program axes 1 (K tile x C
    tile) and 2 (split); axis 0 is the tap (or, with TAP_ROWS, the kernel
    row)."""
    pid_kc = tl.program_id(1)
    num_pid_c = tl.cdiv(C, BLOCK_K)
    pid_k = pid_kc // num_pid_c
    pid_c = pid_kc % num_pid_c
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = pid_c * BLOCK_K + tl.arange(0, BLOCK_K)
    return tl.program_id(2), pid_k, pid_c, offs_k, offs_c, offs_k < K, tl.cdiv(tl.cdiv(M, BLOCK_M), SPLIT)


@triton.jit
def _wgrad_tap_mma(acc, a_t, gy_ptr, g_rows, h_ok, w, kw: tl.constexpr, PAD: tl.constexpr, OW, sgw, sgc, offs_k,
                   mask_k, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """acc[C, K] += a^T[C, pixels] @ gy[pixels shifted by tap (kh, kw), K]
    (TAP_ROWS): ``g_rows`` are gy's row offsets of output pixels (n, h + PAD
    - kh, w) and ``h_ok`` whether that row is on the image; the tap moves
    them by PAD - kw columns, and the pixels whose output column is off the
    image load zero."""
    ow = w + (PAD - kw)
    ok = h_ok & (ow >= 0) & (ow < OW)
    g = tl.load(gy_ptr + (g_rows + _idx((PAD - kw) * sgw, WIDE_INDEX))[:, None]
                + _idx(offs_k, WIDE_INDEX)[None, :] * sgc, mask=ok[:, None] & mask_k[None, :], other=0.0)
    return tl.dot(a_t, g.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _wgrad_tap_rows(x_ptr, gy_ptr, scale_ptr, shift_ptr, part_ptr, M, C, K, H, W, OH, OW, SPLIT,
                    ohw_mul, ohw_shr, ow_mul, ow_shr, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sps, spk, spc, sph, spw,
                    STRIDE: tl.constexpr, PAD: tl.constexpr, KW: tl.constexpr, IS_FP64: tl.constexpr,
                    DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHANNEL_ROWS: tl.constexpr,
                    WIDE_INDEX: tl.constexpr, DENSE_ROWS: tl.constexpr):
    """conv_wgrad_kernel's TAP_ROWS: the three taps of kernel row kh
    (program axis 0) over this program's share of the input pixels, one
    accumulator each; M = N*H*W = N*OH*OW (stride 1, "same" padding: the
    launcher's reciprocals of OH*OW and OW divide the input pixels too)."""
    tl.static_assert(KW == 3 and STRIDE == 1 and CHANNEL_ROWS)
    kh = tl.program_id(0)
    pid_s, _, _, offs_k, offs_c, mask_k, per_split = _wgrad_program(M, C, K, SPLIT, BLOCK_M, BLOCK_N, BLOCK_K)
    tl.assume(per_split > 0)  # (wgmma pipelining, see conv_fwd_kernel)
    acc0 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    acc1 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    acc2 = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float64 if IS_FP64 else tl.float32)
    for i in range(0, per_split):
        offs_p = (pid_s * per_split + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_p = offs_p < M
        n = _fast_div(offs_p, ohw_mul, ohw_shr)
        rem = offs_p - n * (OH * OW)
        h = _fast_div(rem, ow_mul, ow_shr)
        w = rem - h * OW
        oh = h + (PAD - kh)  # the output row of this kernel row's taps
        h_ok = mask_p & (oh >= 0) & (oh < OH)
        if DENSE_ROWS:  # pixel p is row p of x, and output pixel (n, oh, w) row p + (PAD - kh) * OW of gy
            rows = _idx(offs_p, WIDE_INDEX)
            x_rows = rows * sxw
            g_rows = (rows + _idx((PAD - kh) * OW, WIDE_INDEX)) * sgw
        else:
            n = _idx(n, WIDE_INDEX)
            x_rows = n * sxn + _idx(h * sxh + w * sxw, WIDE_INDEX)
            g_rows = n * sgn + _idx(oh * sgh + w * sgw, WIDE_INDEX)
        a_t = tl.trans(_activated_tile(x_ptr, scale_ptr, shift_ptr, x_rows, mask_p, offs_c, C, sxc, DOT_DTYPE,
                                       IS_FP64, WIDE_INDEX, False, False))
        acc0 = _wgrad_tap_mma(acc0, a_t, gy_ptr, g_rows, h_ok, w, 0, PAD, OW, sgw, sgc, offs_k, mask_k, DOT_DTYPE,
                              INPUT_PRECISION, WIDE_INDEX)
        acc1 = _wgrad_tap_mma(acc1, a_t, gy_ptr, g_rows, h_ok, w, 1, PAD, OW, sgw, sgc, offs_k, mask_k, DOT_DTYPE,
                              INPUT_PRECISION, WIDE_INDEX)
        acc2 = _wgrad_tap_mma(acc2, a_t, gy_ptr, g_rows, h_ok, w, 2, PAD, OW, sgw, sgc, offs_k, mask_k, DOT_DTYPE,
                              INPUT_PRECISION, WIDE_INDEX)
    out = part_ptr + pid_s * sps + kh * sph
    offs = offs_c[:, None] * spc + offs_k[None, :] * spk
    mask = (offs_c < C)[:, None] & mask_k[None, :]
    tl.store(out + offs, acc0.to(part_ptr.dtype.element_ty), mask=mask)
    tl.store(out + spw + offs, acc1.to(part_ptr.dtype.element_ty), mask=mask)
    tl.store(out + 2 * spw + offs, acc2.to(part_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["ohw_mul", "ohw_shr", "ow_mul", "ow_shr"])
def conv_wgrad_kernel(x_ptr, act_ptr, gy_ptr, scale_ptr, shift_ptr, part_ptr,
                      M, C, K, H, W, OH, OW, SPLIT, ohw_mul, ohw_shr, ow_mul, ow_shr,
                      sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sps, spk, spc, sph, spw,
                      STRIDE: tl.constexpr, PAD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                      IS_FP64: tl.constexpr, DOT_DTYPE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      CHANNEL_ROWS: tl.constexpr = False, WIDE_INDEX: tl.constexpr = False,
                      DENSE_ROWS: tl.constexpr = False, TMA: tl.constexpr = False,
                      ACT_PASS: tl.constexpr = False, TAP_ROWS: tl.constexpr = False):
    """Split-K weight gradient: program (tap, K tile, C tile, split) computes
    gy[rows, K]^T a[rows, C] over its share of the M = N*OH*OW output pixels,
    with a = relu(x*scale + shift) recomputed from x (zero at padding taps),
    and writes it to partials [SPLIT, K, C, KH, KW] through their strides
    (sp*: each split in the weight's own layout, contiguous or channels_last,
    so the gradient needs no layout copy; with one split, the gradient itself
    in the weight's dtype); the launcher sums splits.
    Here BLOCK_M is the reduction step, BLOCK_N tiles K, BLOCK_K tiles C.
    Each step finds its rows' (n, oh, ow) by multiplying with the launcher's
    reciprocals of OH*OW and OW (``_fast_div``): with integer divisions that
    took about half of the loop's instructions (sm_90 SASS, triton 3.6).
    DENSE_ROWS (x and gy dense channels_last, the launcher checks): gy's
    pixel m is row m at its pixel stride, and for a 1x1 stride-1 conv x's
    too, so those rows need no (n, oh, ow): a further 20% (3x3) and 30%
    (1x1) of the loop.

    CHANNEL_ROWS: the product taken transposed, a^T gy = [C, K] tiles, so
    that the activation, computed in registers, is the MMA's left operand,
    which Hopper's wgmma reads from registers, and gy streams through shared
    memory. In the other order the activation must be stored to shared
    memory for every step, and Triton 3.6 then waits for each wgmma before
    the next step (no MMA overlaps the next tile's loads and activation);
    transposed, it keeps up to 3-7 of them in flight (triton_aot's
    ``wgmma_pending``). An autotuning candidate where the C tile is at least
    64 (wgmma's rows).

    TMA (stride 1, "same" padding, x and gy with dense rows): both read
    through tensor descriptors as the [M, channels] matrices of their pixels,
    x's rows for tap (kh, kw) shifted by (kh - PAD) * W + (kw - PAD) (as in
    conv_fwd_kernel's TMA), the padding taps' rows zeroed after the
    activation (a 1x1 has none; its rows past M meet gy's zero-filled ones).

    ACT_PASS (pointer forms): the activation read from ``act_ptr`` (laid out
    as x), written by activation_pass_kernel just before, as in
    conv_fwd_kernel: the programs (one per tap and K tile) otherwise compute
    each activation once per tap and K tile.

    TAP_ROWS (stride 1, "same" padding, 3 taps a kernel row, CHANNEL_ROWS):
    program (kernel row kh, K tile, C tile, split) computes the gradients of
    the row's three taps at once (``_wgrad_tap_rows``): its rows are input
    pixels p, each activated once, and tap (kh, kw) pairs a[p] with gy at
    the output pixel p + (PAD - kh, PAD - kw) (the same products as the
    output-pixel order's, which pairs gy[o] with a[o - ...]: a term whose
    pixel is off the image is zero either way), so the activation, the
    wgmma's register operand, serves three MMAs instead of one."""
    if TAP_ROWS:
        _wgrad_tap_rows(x_ptr, gy_ptr, scale_ptr, shift_ptr, part_ptr, M, C, K, H, W, OH, OW, SPLIT,
                        ohw_mul, ohw_shr, ow_mul, ow_shr, sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw, sps, spk, spc,
                        sph, spw, STRIDE, PAD, KW, IS_FP64, DOT_DTYPE, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                        CHANNEL_ROWS, WIDE_INDEX, DENSE_ROWS)
        return
    pid_tap = tl.program_id(0)
    kh = pid_tap // KW
    kw = pid_tap % KW
    pid_s, pid_k, pid_c, offs_k, offs_c, mask_k, per_split = _wgrad_program(M, C, K, SPLIT, BLOCK_M, BLOCK_N,
                                                                            BLOCK_K)
    if CHANNEL_ROWS:
        tl.assume(per_split > 0)  # (wgmma pipelining, see conv_fwd_kernel; the other order waits for each anyway)
        acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if IS_FP64:
        acc = acc.to(tl.float64)
    if TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, [M, C], [sxw, 1], [BLOCK_M, BLOCK_K])
        g_desc = tl.make_tensor_descriptor(gy_ptr, [M, K], [sgw, 1], [BLOCK_M, BLOCK_N])
    for i in range(0, per_split):
        offs_m = (pid_s * per_split + i) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        rows = _idx(offs_m, WIDE_INDEX)
        # (TMA implies DENSE_ROWS; its loads use only row_ok of what follows)
        if DENSE_ROWS and KH * KW == 1 and STRIDE == 1:
            # pixel m is row m of both x and gy: no (n, oh, ow) at all
            g_rows = rows * sgw
            row_ok = mask_m
            row_base = rows * sxw
        else:
            n = _fast_div(offs_m, ohw_mul, ohw_shr)
            rem = offs_m - n * (OH * OW)
            oh = _fast_div(rem, ow_mul, ow_shr)
            ow = rem - oh * OW
            n = _idx(n, WIDE_INDEX)
            if DENSE_ROWS:
                g_rows = rows * sgw
            else:
                g_rows = n * sgn + _idx(oh * sgh + ow * sgw, WIDE_INDEX)
            ih = oh * STRIDE - PAD + kh
            iw = ow * STRIDE - PAD + kw
            row_ok = mask_m & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            row_base = n * sxn + _idx(ih * sxh + iw * sxw, WIDE_INDEX)
        if TMA:
            m0 = (pid_s * per_split + i) * BLOCK_M
            g = g_desc.load([m0, pid_k * BLOCK_N])
            a = _activate(x_desc.load([m0 + (kh - PAD) * W + (kw - PAD), pid_c * BLOCK_K]), scale_ptr, shift_ptr,
                          row_ok, offs_c, C, DOT_DTYPE, IS_FP64, False)
        else:
            g = tl.load(gy_ptr + g_rows[:, None] + _idx(offs_k, WIDE_INDEX)[None, :] * sgc,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            a = _activated_tile(act_ptr if ACT_PASS else x_ptr, scale_ptr, shift_ptr, row_base, row_ok, offs_c, C,
                                sxc, DOT_DTYPE, IS_FP64, WIDE_INDEX, False, ACT_PASS)
        if CHANNEL_ROWS:
            acc = tl.dot(tl.trans(a), g.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
        else:
            acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), a, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    out = part_ptr + pid_s * sps + kh * sph + kw * spw
    mask_c = offs_c < C
    if CHANNEL_ROWS:
        tl.store(out + offs_c[:, None] * spc + offs_k[None, :] * spk, acc.to(part_ptr.dtype.element_ty),
                 mask=mask_c[:, None] & mask_k[None, :])
    else:
        tl.store(out + offs_k[:, None] * spk + offs_c[None, :] * spc, acc.to(part_ptr.dtype.element_ty),
                 mask=mask_k[:, None] & mask_c[None, :])


@triton.jit
def split_sum_kernel(part_ptr, out_ptr, N, SPLIT, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[i] = sum over s < SPLIT of part[s*N + i], for i < N: the weight
    gradient's split partials (each laid out as the gradient, in storage
    order) summed in their dtype, in order, and stored in out's. BLOCK_S
    splits are loaded at once (independent loads), so a program waits for
    memory SPLIT / BLOCK_S times, not SPLIT times."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=part_ptr.dtype.element_ty)
    for s0 in range(0, SPLIT, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        tile = tl.load(part_ptr + offs_s[:, None] * N + offs_n[None, :],
                       mask=(offs_s < SPLIT)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(tile, axis=0)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def pack_weight_kernel(src_ptr, dst_ptr, A, B, KW, ssa, ssb, ssh, ssw, BLOCK_A: tl.constexpr,
                       BLOCK_B: tl.constexpr):
    """dst[tap, a, b] = src[a, b at tap (kh, kw)] with tap = kh*KW + kw:
    each tap's [A, B] block of a [K, C, KH, KW] weight, read through its
    strides (ssa, ssb, ssh, ssw), written dense with b innermost and cast to
    dst's dtype. The forward's packed weight (A = C, B = K, from a
    channels_last weight whose C is innermost): a tiled transpose, each tile
    read along one axis and written along the other (Triton moves it
    between the two layouts through shared memory), where a strided copy
    reads or writes with a stride on one side (18.5 us against ~3 us of
    memory for ResNet-v2-50's 512-channel 3x3 weight on the H200)."""
    tap = tl.program_id(0)
    kh = tap // KW
    kw = tap - kh * KW
    offs_a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    offs_b = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = (offs_a < A)[:, None] & (offs_b < B)[None, :]
    w = tl.load(src_ptr + kh * ssh + kw * ssw + offs_a[:, None] * ssa + offs_b[None, :] * ssb, mask=mask)
    tl.store(dst_ptr + tap * A * B + offs_a[:, None] * B + offs_b[None, :], w.to(dst_ptr.dtype.element_ty),
             mask=mask)
