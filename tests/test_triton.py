"""The Triton backend against the PyTorch reference (F.batch_norm + F.relu +
F.conv2d): forward, every input gradient, running statistics, the emitted
statistics, traps from DESIGN.md, gradcheck, opcheck and bad input.

Without a GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set
by conftest.py before Triton is imported), on small shapes; with a GPU the
same tests run compiled on CUDA, plus the fp16/bf16 ones."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fused_preact
from fused_preact import functional
from conftest import assert_close, forward_backward, randomize_bn

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fused_preact import triton_kernels, triton_launch, triton_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_launch.INTERPRET,
                                reason="no GPU and TRITON_INTERPRET is not set")
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# The interpreter computes fp64 cheaply, so the checks there are at fp64
# precision; on a GPU fp64 kernels take ~45 s each to compile, so the same
# checks run in fp32 (TF32 off) there.
REF_DTYPE = torch.float64 if DEVICE == "cpu" else torch.float32
GEOMETRIES = [(1, 1), (1, 2), (3, 1), (3, 2)]  # (kernel size, stride); padding = kernel // 2


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 comparisons at fp32 precision: no TF32 in the reference or the kernels."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _inputs(n, c, h, w, k_out, ksize, stride, dtype, layout, residual, beta_offset=1.0, mean=3.0):
    pad = ksize // 2
    oh, ow = (h + 2 * pad - ksize) // stride + 1, (w + 2 * pad - ksize) // stride + 1
    x = (torch.randn(n, c, h, w, dtype=dtype, device=DEVICE) * 2 + mean).to(memory_format=LAYOUTS[layout])
    return dict(
        x=x,
        weight=torch.randn(k_out, c, ksize, ksize, dtype=dtype, device=DEVICE) / (c * ksize * ksize) ** 0.5,
        gamma=torch.rand(c, dtype=dtype, device=DEVICE) + 0.5,
        beta=torch.randn(c, dtype=dtype, device=DEVICE) + beta_offset,
        residual=(torch.randn(n, k_out, oh, ow, dtype=dtype, device=DEVICE).to(memory_format=LAYOUTS[layout])
                  if residual else None),
        running_mean=torch.randn(c, dtype=dtype, device=DEVICE),
        running_var=torch.rand(c, dtype=dtype, device=DEVICE) + 0.5,
    ), pad


def _run(backend, inp, training, stride, pad, grad_y=None):
    """Forward + backward of one unit on fresh leaf copies: (y, grads, running_mean, running_var)."""
    leaves = {k: inp[k].detach().clone().requires_grad_() for k in ("x", "weight", "gamma", "beta", "residual")
              if inp[k] is not None}
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    y = functional.bn_relu_conv2d(leaves["x"], leaves["weight"], leaves["gamma"], leaves["beta"], rm, rv,
                                  training=training, stride=stride, padding=pad,
                                  residual=leaves.get("residual"), backend=backend)
    if grad_y is None:
        grad_y = torch.randn_like(y)
    grads = dict(zip(leaves, torch.autograd.grad(y, list(leaves.values()), grad_y)))
    return y, grads, rm, rv, grad_y


def _compare(inp, training, stride, pad, dtype):
    y_ref, g_ref, rm_ref, rv_ref, grad_y = _run("torch", inp, training, stride, pad)
    y, g, rm, rv, _ = _run("triton", inp, training, stride, pad, grad_y)
    assert y.shape == y_ref.shape
    assert y.is_contiguous(memory_format=torch.channels_last) == inp["x"].is_contiguous(
        memory_format=torch.channels_last), "output keeps the input's memory format"
    assert_close(y, y_ref, dtype, "output")
    for name in g_ref:
        assert_close(g[name], g_ref[name], dtype, f"grad {name}")
    assert_close(rm, rm_ref, dtype, "running_mean")
    assert_close(rv, rv_ref, dtype, "running_var")


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ksize, stride", GEOMETRIES)
def test_unit_matches_reference_at_reference_precision(ksize, stride, layout, training, residual):
    inp, pad = _inputs(2, 5, 7, 6, 6, ksize, stride, REF_DTYPE, layout, residual)
    _compare(inp, training, stride, pad, REF_DTYPE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("ksize, stride", GEOMETRIES)
def test_unit_matches_reference_float32(ksize, stride, layout):
    inp, pad = _inputs(2, 6, 6, 7, 5, ksize, stride, torch.float32, layout, True)
    _compare(inp, True, stride, pad, torch.float32)


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "unrolled"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 7, 6, 6), (1, 40, 5, 5, 36)], ids=["one-chunk", "chunks"])
def test_both_reduction_loops_match_reference(monkeypatch, shape, stride, flat):
    """The forward/dgrad kernels' two loop forms for 3x3 (taps unrolled, or
    one flat loop over taps x channel chunks; the autotuner picks on a GPU),
    each forced, with channels in one chunk and in several (40 and 36 > the
    interpreter's BLOCK_K of 16)."""
    monkeypatch.setattr(triton_launch, "FLAT_LOOP", flat)
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, 3, stride, REF_DTYPE, "channels_last", True)
    _compare(inp, True, stride, pad, REF_DTYPE)


@pytest.mark.parametrize("parity", [True, False], ids=["parity-classes", "all-taps"])
@pytest.mark.parametrize("ksize", [3, 1])
@pytest.mark.parametrize("shape", [(2, 6, 7, 7, 5), (3, 40, 9, 8, 36), (1, 5, 1, 6, 4), (2, 4, 6, 1, 3)],
                         ids=["odd", "chunks", "one-row", "one-column"])
def test_stride_2_dgrad_in_parity_classes(monkeypatch, shape, ksize, parity):
    """The stride-2 dgrad taking input pixels in four (h, w) parity classes,
    each visiting only its own taps, and the all-taps form it replaces, each
    forced: odd and even sizes, channels in several chunks, one row or one
    column of pixels (two of the classes empty)."""
    monkeypatch.setattr(triton_launch, "DGRAD_PARITY", parity)
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, ksize, 2, REF_DTYPE, "channels_last", True)
    _compare(inp, True, 2, pad, REF_DTYPE)


@pytest.mark.parametrize("pack", [True, False], ids=["packed", "as-is"])
@pytest.mark.parametrize("weight_format", LAYOUTS)
def test_3x3_weight_packed_or_read_as_is(monkeypatch, weight_format, pack):
    """The forward and dgrad read a small 3x3 weight as it is (in nn.Conv2d's
    layout or channels_last; under autocast the fp32 weight, cast as loaded:
    test_integration's autocast test) and pack a large one
    (triton_launch.SMALL_WEIGHT_READS): each forced, against the reference.
    The dgrad wants C innermost, which a channels_last weight has: that one
    is not copied when packing (only cast, where its dtype differs:
    test_3x3_channels_last_weight_only_cast_for_the_dgrad)."""
    monkeypatch.setattr(triton_launch, "SMALL_WEIGHT_READS", 0 if pack else 1 << 40)
    seen = []
    original = triton_launch._gemm_weight

    def recording(weight, order, *args):
        w_gemm = original(weight, order, *args)
        seen.append((w_gemm is weight, "dgrad" if order[-1] == 1 else "forward"))
        return w_gemm

    monkeypatch.setattr(triton_launch, "_gemm_weight", recording)
    inp, pad = _inputs(2, 6, 7, 7, 5, 3, 1, REF_DTYPE, "channels_last", True)
    inp["weight"] = inp["weight"].contiguous(memory_format=LAYOUTS[weight_format])
    _compare(inp, True, 1, pad, REF_DTYPE)
    kept = {"forward": not pack, "dgrad": not pack or weight_format == "channels_last"}
    assert {kernel for _, kernel in seen} == {"forward", "dgrad"}
    assert all(as_is == kept[kernel] for as_is, kernel in seen), seen


def test_3x3_channels_last_weight_only_cast_for_the_dgrad(monkeypatch):
    """A large channels_last 3x3 weight in another dtype (fp32 under
    autocast; fp64 against fp32 activations here): the dgrad gets it cast
    with its strides kept (C innermost, as the dgrad reads it: no
    transposing copy), the forward a packed copy with K innermost; both
    gradients and the output against autograd on the same math."""
    monkeypatch.setattr(triton_launch, "SMALL_WEIGHT_READS", 0)
    seen = {}
    original = triton_launch._gemm_weight

    def recording(weight, order, *args):
        w_gemm = original(weight, order, *args)
        seen["dgrad" if order[-1] == 1 else "forward"] = (w_gemm.dtype, w_gemm.stride())
        return w_gemm

    monkeypatch.setattr(triton_launch, "_gemm_weight", recording)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 6, 5, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(20, 24, 3, 3, generator=gen, dtype=torch.float64) / 15).to(DEVICE)
    weight = weight.contiguous(memory_format=torch.channels_last)
    _fp64_weight_against_autograd(x, weight, 1, gen)
    assert seen["dgrad"] == (torch.float32, weight.stride())  # cast, channels_last strides kept
    assert seen["forward"][0] == torch.float32 and seen["forward"][1][0] == 1  # packed, K innermost


def _fp64_weight_against_autograd(x, weight, padding, gen):
    """The fused unit's forward and backward (inference BN from x's batch
    statistics) with fp32 activations and an fp64 weight, standing in for
    bf16 and autocast's fp32: output, input and weight gradients against
    autograd on the same math with the weight rounded to fp32, the weight
    gradient in the weight's dtype."""
    c = x.shape[1]
    gamma, beta = torch.rand(c, device=DEVICE) + 0.5, torch.randn(c, device=DEVICE)
    bn = triton_launch.bn_prepare(x, None, gamma, beta, None, None, True, 0.1, 1e-5)
    y, _ = triton_launch.conv_forward(x, weight, bn, 1, padding, None, False)
    grad_y = torch.randn(y.shape, generator=gen).to(DEVICE)
    grad_x, grad_w, _ = triton_launch.conv_backward(grad_y, x, weight, bn, False, 1, padding, True, True)
    xr, wr = x.detach().clone().requires_grad_(), weight.float().requires_grad_()
    yr = F.conv2d(torch.relu(xr * bn[2].view(1, -1, 1, 1) + bn[3].view(1, -1, 1, 1)), wr, padding=padding)
    yr.backward(grad_y)
    assert grad_w.dtype == torch.float64
    for got, want, name in ((y, yr, "output"), (grad_x, xr.grad, "grad x"), (grad_w, wr.grad, "grad weight")):
        assert_close(got.float(), want.detach(), torch.float32, name)


@pytest.mark.parametrize("first", [True, False], ids=["epilogue-first", "epilogue-last"])
@pytest.mark.parametrize("ksize, stride", [(1, 1), (1, 2), (3, 2)])
def test_epilogue_tile_loaded_before_or_after_the_loop(monkeypatch, ksize, stride, first):
    """The forward's residual tile and the dgrad's x tile, loaded before the
    reduction loop (EPILOGUE_FIRST: an autotuning candidate for short
    reductions) or after it, each forced; channels in several tiles."""
    monkeypatch.setattr(triton_launch, "EPILOGUE_FIRST_LOAD", first)
    inp, pad = _inputs(2, 40, 7, 6, 36, ksize, stride, REF_DTYPE, "channels_last", True)
    _compare(inp, True, stride, pad, REF_DTYPE)


@pytest.mark.parametrize("ksize, stride, k_out, heavy", [(1, 1, 36, True), (3, 2, 36, True), (3, 1, 36, False),
                                                         (1, 1, 520, False)])
def test_epilogue_heavy_dgrads_get_more_candidates(monkeypatch, ksize, stride, k_out, heavy):
    """The dgrads whose epilogue outweighs their reduction (1x1, or stride 2
    in parity classes, up to 512 output channels) are autotuned with the x
    tile loaded first and half-width tiles too (triton_launch._gemm_configs'
    epilogue_heavy); the others not with the early load (3x3 stride 1, the
    long 1x1 reductions). Checked on the launcher's config key and the
    candidates it names with autotuning on."""
    keys = []
    original = triton_launch._launch_gemm

    def recording(name, grid, config_key, *args, **kwargs):
        if name == "conv_dgrad_kernel":
            keys.append(config_key)
        return original(name, grid, config_key, *args, **kwargs)

    monkeypatch.setattr(triton_launch, "_launch_gemm", recording)
    inp, pad = _inputs(2, 40, 5, 6, k_out, ksize, stride, REF_DTYPE, "channels_last", False)
    x = inp["x"]
    bn = triton_launch.bn_prepare(x, None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    y, _ = triton_launch.conv_forward(x, inp["weight"], bn, stride, pad, None, False)
    triton_launch.conv_backward(torch.ones_like(y), x, inp["weight"], bn, True, stride, pad, True, False)
    assert len(keys) == 1 and keys[0][12] is heavy  # (_gemm_configs' epilogue_heavy)
    monkeypatch.setattr(triton_launch, "AUTOTUNE", True)
    rows, cols, red, _fp64, *rest = keys[0][1:]
    configs = triton_launch._gemm_configs(rows, cols, red, False, *rest)  # the 16-bit candidates
    widths = {cfg.kwargs["BLOCK_N"] for cfg in configs}
    assert any(cfg.kwargs["EPILOGUE_FIRST"] for cfg in configs) is heavy
    if heavy:
        assert {64, 32} <= widths  # full (40 channels -> 64) and half width
    # The half tile with the early load, in eight warps, is held to 128 registers
    # (two programs per SM); nothing else is limited.
    limited = {(cfg.kwargs["BLOCK_N"], cfg.kwargs["EPILOGUE_FIRST"], cfg.num_warps) for cfg in configs if cfg.maxnreg}
    assert all(cfg.maxnreg in (None, 128) for cfg in configs)
    assert limited == set() if not heavy else limited <= {(32, True, 8)}
    if heavy and ksize == 1:  # 1x1 over 36 channels: BLOCK_K 64, so the half tile takes eight warps
        assert limited == {(32, True, 8)}


@pytest.mark.parametrize("small_grid", [True, False], ids=["small-grid", "full-grid"])
def test_small_grids_get_narrow_two_per_sm_candidates(monkeypatch, small_grid):
    """Where full-width tiles leave SMs without two programs (_small_grid),
    the candidates include half-width tiles with 32-wide steps, 8 warps and
    4 stages (few enough registers for two programs per SM), in both loop
    forms for 3x3; elsewhere not."""
    monkeypatch.setattr(triton_launch, "AUTOTUNE", True)
    configs = triton_launch._gemm_configs(triton_launch.ROWS_GPU, 512, 512, taps=9, small_grid=small_grid)
    narrow = {(c.kwargs["FLAT"], c.num_warps, c.num_stages) for c in configs
              if c.kwargs["BLOCK_N"] == 64 and c.kwargs["BLOCK_K"] == 32}
    assert narrow == ({(False, 8, 4), (True, 8, 4)} if small_grid else set())
    assert triton_launch._small_grid(25, 512) and not triton_launch._small_grid(392, 128)  # ResNet-v2-50 s4, s2


@pytest.mark.parametrize("max_stages", [3, 4], ids=["forward", "dgrad"])
def test_two_per_sm_twins_of_the_flat_half_tiles(monkeypatch, max_stages):
    """_gemm_configs' two_per_sm: the flat 3x3 loop's 128x64x64 8-warp
    configs (up to ``max_stages`` stages: the forward's 3, the dgrad's 4)
    come again, held to 128 registers, after every other candidate, which
    are those without two_per_sm (so FUSED_PREACT_TRITON_AUTOTUNE=0 keeps
    the same first config); 64 channels (full width) and 512 (the half
    tiles of small grids); none for 1x1, nor for 16-channel tiles;
    two_per_sm_only keeps only the twins."""
    monkeypatch.setattr(triton_launch, "AUTOTUNE", True)
    rows = triton_launch.ROWS_GPU
    for cols, stages in ((64, {3, 4}), (512, {3})):
        plain = triton_launch._gemm_configs(rows, cols, cols, taps=9, small_grid=True)
        both = triton_launch._gemm_configs(rows, cols, cols, taps=9, small_grid=True, two_per_sm=max_stages)
        twins = both[len(plain):]
        assert [str(c) for c in both[:len(plain)]] == [str(c) for c in plain]
        assert {c.num_stages for c in twins} == {s for s in stages if s <= max_stages}
        for twin in twins:
            assert twin.maxnreg == 128 and twin.num_warps == 8 and twin.kwargs["FLAT"]
            assert (twin.kwargs["BLOCK_M"], twin.kwargs["BLOCK_N"], twin.kwargs["BLOCK_K"]) == (128, 64, 64)
            assert any(str(c).replace("maxnreg: None", "maxnreg: 128") == str(twin) for c in plain)  # a twin
        only = triton_launch._gemm_configs(rows, cols, cols, taps=9, small_grid=True, two_per_sm=max_stages,
                                           two_per_sm_only=True)
        assert [str(c) for c in only] == [str(c) for c in twins]
    assert not [c for c in triton_launch._gemm_configs(rows, 64, 64, taps=1, two_per_sm=4) if c.maxnreg]
    assert not [c for c in triton_launch._gemm_configs(rows, 16, 16, taps=9, two_per_sm=4) if c.maxnreg]
    monkeypatch.setattr(triton_launch, "AUTOTUNE", False)
    first = triton_launch._gemm_configs(rows, 64, 64, taps=9, two_per_sm=max_stages)
    assert len(first) == 1 and first[0].maxnreg is None


def test_two_per_sm_offered_where_the_twins_compile_without_spills(monkeypatch):
    """The launchers offer the twins (_two_per_sm) for 16-bit data with the
    weight packed (in the data's dtype, the GEMM's output axis innermost)
    and 32-bit offsets: not for fp32 data, a small 3x3 weight read as it is
    (fp32, or another layout) or 64-bit offsets, where they may spill
    (triton_launch._two_per_sm_configs); TWO_PER_SM False withdraws them,
    True keeps only them. Then the launchers' config keys: a fp32 unit asks
    for none."""
    bf16 = torch.empty(2, 8, 4, 4, dtype=torch.bfloat16, device="meta")
    fwd_packed = torch.empty(3, 3, 8, 8, dtype=torch.bfloat16, device="meta").permute(3, 2, 0, 1)  # K innermost
    dgrad_packed = torch.empty(3, 3, 8, 8, dtype=torch.bfloat16, device="meta").permute(2, 3, 0, 1)  # C innermost
    assert triton_launch._two_per_sm(3, bf16, fwd_packed, 0, False) == (3, False)
    assert triton_launch._two_per_sm(4, bf16, dgrad_packed, 1, False) == (4, False)
    assert triton_launch._two_per_sm(4, bf16.half(), dgrad_packed.half(), 1, False) == (4, False)
    assert triton_launch._two_per_sm(3, bf16, fwd_packed.float(), 0, False) == (0, False)  # fp32, as it is
    assert triton_launch._two_per_sm(3, bf16, dgrad_packed, 0, False) == (0, False)  # another layout
    assert triton_launch._two_per_sm(4, bf16, dgrad_packed, 1, True) == (0, False)  # 64-bit offsets
    assert triton_launch._two_per_sm(4, bf16.float(), dgrad_packed.float(), 1, False) == (0, False)
    monkeypatch.setattr(triton_launch, "TWO_PER_SM", True)
    assert triton_launch._two_per_sm(4, bf16, dgrad_packed, 1, False) == (4, True)
    monkeypatch.setattr(triton_launch, "TWO_PER_SM", False)
    assert triton_launch._two_per_sm(4, bf16, dgrad_packed, 1, False) == (0, False)
    monkeypatch.setattr(triton_launch, "TWO_PER_SM", None)
    keys, original = [], triton_launch._launch_gemm

    def recording(name, grid, config_key, *args, **kwargs):
        if name != "conv_wgrad_kernel":  # (its configs are _wgrad_configs)
            keys.append((name, config_key))
        return original(name, grid, config_key, *args, **kwargs)

    monkeypatch.setattr(triton_launch, "_launch_gemm", recording)
    inp, pad = _inputs(1, 8, 4, 4, 8, 3, 1, torch.float32, "channels_last", False)
    _run("triton", inp, True, 1, pad)
    assert {name for name, _ in keys} == {"conv_fwd_kernel", "conv_dgrad_kernel"}
    assert all(key[-2:] == (0, False) for _, key in keys)


@pytest.mark.skipif(DEVICE != "cuda", reason="the register limit is the GPU compiler's (16-bit data only)")
@pytest.mark.parametrize("shape", [(2, 64, 9, 7, 64), (1, 64, 5, 6, 40)], ids=["64-channels", "channel-tail"])
def test_gemms_held_to_two_programs_an_sm(monkeypatch, shape):
    """The forward and dgrad in their two-per-SM twins only (TWO_PER_SM
    forced: the 128x64x64 flat tiles held to 128 registers), bf16, output
    and every gradient by the ratio rule of DESIGN.md §5, residual
    included, odd sizes and a channel tail; and a check that both GEMMs
    asked for the twins only."""
    monkeypatch.setattr(triton_launch, "TWO_PER_SM", True)
    monkeypatch.setattr(triton_launch, "SMALL_WEIGHT_READS", 0)  # (the weight packed, as where they are offered)
    seen = {kernel: _record_constexprs(monkeypatch, kernel) for kernel in ("conv_fwd_kernel", "conv_dgrad_kernel")}
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, 3, 1, torch.bfloat16, "channels_last", True)
    _check_ratio_rule(inp, 1, pad)
    for kernel, launches in seen.items():
        assert launches and all(key[-2:] == ({"conv_fwd_kernel": 3}.get(kernel, 4), True)
                                for _, key in launches), kernel


@pytest.mark.parametrize("channel_rows", [True, False], ids=["a^T.gy", "gy^T.a"])
@pytest.mark.parametrize("weight_format", LAYOUTS)
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2), (1, 1)])
def test_weight_gradient_in_both_product_orders(monkeypatch, ksize, stride, weight_format, channel_rows):
    """The weight gradient as [C, K] tiles of a^T gy (CHANNEL_ROWS: the
    activation as the MMA's register operand; an autotuning candidate for
    C tiles of 64) or [K, C] tiles of gy^T a, each forced, in three splits,
    stored through the weight's strides (both layouts); C = 40 and K = 36
    span two tiles of the interpreter's 32, so both masks of the transposed
    store are exercised."""
    monkeypatch.setattr(triton_launch, "WGRAD_CHANNEL_ROWS", channel_rows)
    monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", 3)
    inp, pad = _inputs(2, 40, 7, 6, 36, ksize, stride, REF_DTYPE, "channels_last", False)
    inp["weight"] = inp["weight"].contiguous(memory_format=LAYOUTS[weight_format])
    _compare(inp, True, stride, pad, REF_DTYPE)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("shape, beta_offset", [((2, 40, 7, 6, 36), 1.0), ((1, 8, 1, 5, 8), 1.0),
                                                ((2, 8, 4, 4, 8), 30.0), ((3, 16, 5, 3, 24), 1.0)],
                         ids=["odd", "one-row", "large-beta", "narrow"])
def test_weight_gradient_one_kernel_row_a_program(monkeypatch, shape, beta_offset, split, layout):
    """The weight gradient of a stride-1 3x3 conv with the three taps of a
    kernel row in one program over input pixels (TAP_ROWS, forced: each
    activation once for three MMAs, gy read at the three shifted output
    pixels): output, every gradient and the running statistics against the
    reference, residual included; odd sizes, channels spanning two tiles
    (C = 40, K = 36 over the interpreter's 32), one image row (every tap
    with kh != 1 off the image), beta + 30 (a pixel leaking across the
    border or a padding tap counted would show), one and three splits (a
    split boundary inside the rows), both layouts of x and of the weight;
    and a check that the weight gradient ran in that form."""
    monkeypatch.setattr(triton_launch, "WGRAD_TAP_ROWS", True)
    monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", split)
    seen = _record_constexprs(monkeypatch, "conv_wgrad_kernel")
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, 3, 1, REF_DTYPE, layout, True, beta_offset=beta_offset)
    if layout == "nchw":
        inp["weight"] = inp["weight"].contiguous(memory_format=torch.channels_last)
    _compare(inp, True, 1, pad, REF_DTYPE)
    assert seen and all(kwargs["TAP_ROWS"] and kwargs["CHANNEL_ROWS"] for kwargs, _ in seen)
    if DEVICE == "cuda":  # and in bf16, the dtype it is offered for
        inp, pad = _inputs(n, c, h, w, k, 3, 1, torch.bfloat16, "channels_last", True, beta_offset=beta_offset)
        _check_ratio_rule(inp, 1, pad)


def test_weight_gradient_kernel_rows_only_where_they_apply(monkeypatch):
    """TAP_ROWS is asked of stride-1 3x3 convs with "same" padding only (the
    form shifts gy by the taps of a kernel row over input pixels): not 1x1,
    not stride 2; offered (not forced) only on a GPU, for 16-bit data from
    64 input channels, where the splits then fill the GPU with its grid of
    one program per kernel row and 64x64 tile."""
    monkeypatch.setattr(triton_launch, "WGRAD_TAP_ROWS", True)
    seen = _record_constexprs(monkeypatch, "conv_wgrad_kernel")
    for ksize, stride, expected in ((1, 1, False), (3, 2, False), (3, 1, True)):
        seen.clear()
        inp, pad = _inputs(1, 8, 4, 4, 8, ksize, stride, REF_DTYPE, "channels_last", False)
        _run("triton", inp, True, stride, pad)
        assert [kwargs["TAP_ROWS"] for kwargs, _ in seen] == [expected]
    x = torch.empty(2, 64, 4, 4, dtype=torch.bfloat16, device="meta")
    assert triton_launch._wgrad_tap_rows_mode(x, 64, 3, 3, 1, 1) == 2
    monkeypatch.setattr(triton_launch, "WGRAD_TAP_ROWS", None)
    assert triton_launch._wgrad_tap_rows_mode(x, 64, 3, 3, 1, 1) == 0  # (not a CUDA tensor)
    monkeypatch.setattr(triton_launch, "WGRAD_TAP_ROWS", False)
    assert triton_launch._wgrad_tap_rows_mode(x, 64, 3, 3, 1, 1) == 0
    # ResNet-v2-50's first 3x3 layer: 9 programs a split in the one-tap form,
    # 3 with kernel rows, so about three times the splits where it may run.
    m, fill = 64 * 56 * 56, triton_launch.FILL_PROGRAMS
    assert triton_launch._wgrad_split(m, 64, 64, 9) == triton_launch._cdiv(fill, 9)
    assert triton_launch._wgrad_split(m, 64, 64, 9, 3) == triton_launch._cdiv(fill, 3)
    assert triton_launch._wgrad_split(3136, 512, 512, 9, 3) == 2  # (s4.3x3: 288 programs one way, 192 the other)
    monkeypatch.setattr(triton_launch, "AUTOTUNE", True)
    configs = triton_launch._wgrad_configs(64, 64, tap_rows=1)
    rows = [cfg for cfg in configs if cfg.kwargs.get("TAP_ROWS")]
    assert rows == configs[-2:] and all(cfg.kwargs["CHANNEL_ROWS"] for cfg in rows)
    assert {(cfg.kwargs["BLOCK_M"], cfg.num_warps) for cfg in rows} == {(64, 4), (128, 8)}
    assert [cfg.kwargs.get("TAP_ROWS") for cfg in triton_launch._wgrad_configs(64, 64, tap_rows=2)] == [True]


def test_fast_division_is_exact():
    """x // d as the weight gradient computes its rows' (n, oh, ow): x * mul
    >> shr with triton_launch.fast_divisor(d), in uint64 as the kernel does,
    for every d up to 4096, powers of two and their neighbours, and random
    ones, against numpy's division, at random x and at the edges (0, d - 1,
    d, multiples of d, 2**31 - 1)."""
    import numpy as np

    rng = np.random.default_rng(0)
    divisors = {*range(1, 4097), *rng.integers(1, 2**31, 500).tolist()}
    divisors |= {v for k in range(1, 31) for v in (2**k - 1, 2**k, 2**k + 1)}
    for d in sorted(divisors):
        mul, shr = triton_launch.fast_divisor(d)
        assert -2**31 <= mul < 2**31 and shr < 64
        top = (2**31 - 1) // d * d
        x = np.concatenate([rng.integers(0, 2**31, 256), [0, 1, d - 1, d, d + 1, top - 1, top, 2**31 - 1]])
        x = x[(x >= 0) & (x < 2**31)].astype(np.uint64)
        got = (x * np.uint64(mul & 0xFFFFFFFF)) >> np.uint64(shr)
        np.testing.assert_array_equal(got, x // np.uint64(d), err_msg=f"d = {d}")
    with pytest.raises(ValueError, match="positive"):
        triton_launch.fast_divisor(0)


def test_small_division_in_fp32_is_exact():
    """The stride-2 dgrad's step counter a // b as floor((a + 0.5) * (1/b))
    in fp32 (triton_kernels._small_div), against numpy's integer division:
    every a < 9b (its range is 4 taps x b chunks; 9 for any 3x3 loop) for every b up to
    4096, and b up to 2**16 (the channel cap) at the edges (multiples of b
    and their neighbours) up to 2**20; with 1/b correctly rounded and off by
    1 or 2 ulp either way (the GPU's fast division)."""
    import numpy as np

    def check(a, b):
        inv = np.float32(1.0) / np.float32(b)
        for ulps in (-2, -1, 0, 1, 2):
            b_inv = inv
            for _ in range(abs(ulps)):
                b_inv = np.nextafter(b_inv, np.float32(np.inf if ulps > 0 else 0), dtype=np.float32)
            got = ((a.astype(np.float32) + np.float32(0.5)) * b_inv).astype(np.int64)
            np.testing.assert_array_equal(got, a // b, err_msg=f"b = {b}, {ulps} ulp")

    for b in range(1, 4097):
        check(np.arange(9 * b, dtype=np.int64), b)
    rng = np.random.default_rng(0)
    for b in [*rng.integers(4097, 2**16 + 1, 300).tolist(), 2**16, 2**16 - 1, 2**15 + 1]:
        q = np.arange(0, (2**20 - 1) // b + 1, dtype=np.int64)
        a = np.concatenate([q * b, q * b + b - 1, q * b + 1])
        check(a[(a >= 0) & (a < 2**20)], b)


@pytest.mark.parametrize("order", [(2, 3, 1, 0), (2, 3, 0, 1)], ids=["K-innermost", "C-innermost"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_weight_pack_is_the_permuted_copy(layout, order):
    """triton_launch._pack_weight (pack_weight_kernel, a tiled transpose
    cast to the data dtype) against torch's permuted copy, exactly: 3x3
    weights in nn.Conv2d's layout, channels_last and a sliced view, channel
    counts that leave tails in both tile axes; the result is a [K, C, KH,
    KW] view of a tensor dense in ``order``."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(70, 150, 3, 3, generator=gen, dtype=torch.float64).to(DEVICE)
    if layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        weight = weight[3:70:2, 5:140]  # 34 x 135, strides of the full tensor
    packed = triton_launch._pack_weight(weight, order, torch.float32)
    assert packed.shape == weight.shape and packed.dtype == torch.float32
    assert packed.permute(order).is_contiguous()
    assert torch.equal(packed, weight.float())


@pytest.mark.parametrize("split, shape", [(2, (36, 20, 3, 3)), (3, (36, 20, 3, 3)), (16, (36, 20, 3, 3)),
                                          (70, (36, 20, 3, 3)), (140, (36, 20, 3, 3)), (70, (16, 64, 1, 1)), (300, (16, 64, 1, 1)),
                                          (3, (64, 61, 7, 7))])
def test_split_sum_matches_torch(split, shape):
    """triton_launch._split_sum (split_sum_kernel) against torch.sum over the
    splits: partials laid out as a channels_last gradient, fp64 partials
    into an fp32 gradient (the sum in fp64, then cast, as the kernel does
    with fp32 partials and a bf16 weight) and fp32 into fp32; split counts
    below, at and above one block of splits (128 for 6480 elements in
    32-column blocks; 256 for 1024 in 8-column blocks; 191296 elements in
    256-column blocks), element counts with a tail."""
    assert triton_launch._split_sum_blocks(6480, 70) == (32, 128)
    assert triton_launch._split_sum_blocks(1024, 300) == (8, 256)
    assert triton_launch._split_sum_blocks(191296, 3) == (256, 4)
    assert triton_launch._split_sum_blocks(256 * 256 * 9, 4) == (1024, 4)
    gen = torch.Generator().manual_seed(split)
    for part_dtype, out_dtype in ((torch.float64, torch.float32), (torch.float32, torch.float32)):
        out = torch.empty(*shape, dtype=out_dtype, device=DEVICE, memory_format=torch.channels_last)
        part = torch.empty_strided((split, *out.shape), (out.numel(), *out.stride()), dtype=part_dtype,
                                   device=DEVICE)
        part.copy_(torch.randn(part.shape, generator=gen, dtype=part_dtype))
        triton_launch._split_sum(part, out)
        want = part.double().sum(0)
        # fp32 partials: summed in another order than torch's, so within the
        # bound of an fp32 sum's rounding (split ulps of the largest sum of
        # magnitudes); fp64 ones: the fp64 sum, rounded once to fp32.
        atol = split * torch.finfo(part_dtype).eps * part.abs().sum(0).max().item()
        torch.testing.assert_close(out.double(), want, rtol=1e-7, atol=atol)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU (the interpreter has no autotuning trials)")
def test_graph_trial_times_each_launch():
    """The autotuner's trial on a GPU (triton_launch._trial): a CUDA graph of
    TRIAL_LAUNCHES launches replayed TRIAL_REPLAYS times (plus a warm-up
    replay and one launch before the capture), every launch run, times per
    launch at the three quantiles, in order; no fallback to single launches."""
    counter = torch.zeros(1, device=DEVICE)
    times = triton_launch._trial(lambda: counter.add_(1), (0.5, 0.2, 0.8))
    runs = 1 + triton_launch.TRIAL_LAUNCHES * (1 + triton_launch.TRIAL_REPLAYS)
    assert counter.item() == runs
    assert len(times) == 3 and 0 < times[1] <= times[0] <= times[2] < 1.0, times
    assert not triton_launch._graph_trials_failed


@triton.jit
def _small_div_probe(a_ptr, b_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask, other=0)
    b = tl.load(b_ptr + offs, mask=mask, other=1)
    tl.store(out_ptr + offs, triton_kernels._small_div(a, 1.0 / tl.cast(b, tl.float32)), mask=mask)


def test_small_division_on_the_device():
    """_small_div itself (compiled on a GPU, where 1.0 / b is the fast fp32
    division; the interpreter's numpy otherwise) at the range's edges."""
    gen = torch.Generator().manual_seed(0)
    b = torch.cat([torch.arange(1, 513), torch.randint(513, 2**16 + 1, (1536,), generator=gen)])
    q = torch.randint(0, 2**20, (b.numel(),), generator=gen) // b
    a = torch.cat([q * b, q * b + b - 1, torch.randint(0, 9, (b.numel(),), generator=gen) * b - 1]).clamp(0, 2**20 - 1)
    b = torch.cat([b, b, b])
    a, b = a.to(torch.int32).to(DEVICE), b.to(torch.int32).to(DEVICE)
    out = torch.empty_like(a)
    _small_div_probe[(triton.cdiv(a.numel(), 1024),)](a, b, out, a.numel(), BLOCK=1024)
    torch.testing.assert_close(out.cpu(), (a // b).cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("wide", [True, False], ids=["int64-offsets", "int32-offsets"])
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2), (1, 2)])
def test_offsets_in_both_widths(monkeypatch, ksize, stride, wide):
    """The GEMM kernels' address arithmetic in int64 (WIDE_INDEX: tensors
    of 2**30+ elements) or int32 (all others), each forced; NCHW input, so
    the channel stride is not 1; the weight gradient in two splits."""
    monkeypatch.setattr(triton_launch, "WIDE_INDEX", wide)
    monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", 2)
    inp, pad = _inputs(2, 20, 7, 6, 12, ksize, stride, REF_DTYPE, "nchw", True)
    _compare(inp, True, stride, pad, REF_DTYPE)


def _launch_flags(monkeypatch, kernel_name, flag):
    """The values of constexpr ``flag`` in the launches of ``kernel_name``
    from now on (a list filled as they happen)."""
    seen = []
    original = triton_launch._launch

    def recording(name, grid, args, kwargs, config_key=None):
        if name == kernel_name:
            seen.append(kwargs[flag])
        return original(name, grid, args, kwargs, config_key)

    monkeypatch.setattr(triton_launch, "_launch", recording)
    return seen


@pytest.mark.parametrize("c, k_out", [(32, 48), (40, 36)], ids=["even", "tails"])
@pytest.mark.parametrize("ksize, stride", [(3, 1), (1, 1)])
def test_channels_a_multiple_of_the_block_or_not(monkeypatch, ksize, stride, c, k_out):
    """Channel counts that are multiples of the reduction block (EVEN_C in
    the forward, EVEN_K in the dgrad: loads without channel masks; two
    blocks each under the interpreter) and counts with tails (masked); the
    constexprs the launcher chose are checked too."""
    even_c = _launch_flags(monkeypatch, "conv_fwd_kernel", "EVEN_C")
    even_k = _launch_flags(monkeypatch, "conv_dgrad_kernel", "EVEN_K")
    inp, pad = _inputs(2, c, 6, 5, k_out, ksize, stride, REF_DTYPE, "channels_last", True)
    _compare(inp, True, stride, pad, REF_DTYPE)
    if DEVICE == "cpu":  # the interpreter's block: 16 channels
        seen = {"EVEN_C": even_c[-1], "EVEN_K": even_k[-1]}
        assert seen == {"EVEN_C": c % 16 == 0, "EVEN_K": k_out % 16 == 0}


@pytest.mark.parametrize("form", ["channels_last", "one-image", "nchw", "x-view", "gy-view"])
@pytest.mark.parametrize("ksize, stride", [(1, 1), (3, 1), (1, 2)])
def test_weight_gradient_with_and_without_dense_rows(monkeypatch, ksize, stride, form):
    """The weight gradient's DENSE_ROWS (pixel m is row m of x and gy: dense
    channels_last, size-1 dimensions with any stride) against the general
    row arithmetic (NCHW; x or gy a cropped channels_last view, rows 7
    pixels apart of which 6 are used): the launcher's choice is checked and
    the weight gradient compared with autograd's, in two splits."""
    seen = _launch_flags(monkeypatch, "conv_wgrad_kernel", "DENSE_ROWS")
    monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", 2)
    gen = torch.Generator().manual_seed(1)
    fmt = torch.contiguous_format if form == "nchw" else torch.channels_last
    n, pad = (1 if form == "one-image" else 2), ksize // 2
    x = torch.randn(n, 20, 5, 7, generator=gen, dtype=REF_DTYPE).to(DEVICE).contiguous(memory_format=fmt)
    x = x[..., :6] if form == "x-view" else x[..., :6].contiguous(memory_format=fmt)
    weight = torch.randn(12, 20, ksize, ksize, generator=gen, dtype=REF_DTYPE).to(DEVICE) / 6
    gamma, beta = torch.rand(20, dtype=REF_DTYPE, device=DEVICE) + 0.5, torch.randn(20, dtype=REF_DTYPE, device=DEVICE)
    bn = triton_launch.bn_prepare(x, None, gamma, beta, None, None, True, 0.1, 1e-5)
    oh, ow = (5 + 2 * pad - ksize) // stride + 1, (6 + 2 * pad - ksize) // stride + 1
    grad_y = torch.randn(n, 12, oh, ow + 1, generator=gen, dtype=REF_DTYPE).to(DEVICE).contiguous(memory_format=fmt)
    grad_y = grad_y[..., :ow] if form == "gy-view" else grad_y[..., :ow].contiguous(memory_format=fmt)
    _, grad_w, _ = triton_launch.conv_backward(grad_y, x, weight, bn, True, stride, pad, False, True)
    wr = weight.clone().requires_grad_()
    a = torch.relu(x * bn[2].view(1, -1, 1, 1) + bn[3].view(1, -1, 1, 1))
    F.conv2d(a, wr, stride=stride, padding=pad).backward(grad_y)
    assert_close(grad_w, wr.grad, REF_DTYPE, "grad weight")
    assert seen == [form in ("channels_last", "one-image")]


def test_offset_width_follows_the_largest_offset():
    """int64 offsets from a tensor whose largest offset may reach 2**30
    (bounded by its storage, which for the tensors here is their extent
    through the strides), int32 below; shapes only (meta tensors, no memory)."""
    small = torch.empty(64, 256, 56, 56, device="meta").to(memory_format=torch.channels_last)
    assert not triton_launch._wide_index(small)
    assert not triton_launch._wide_index(torch.empty(1024, 64, 128, 128, device="meta"))  # offsets < 2**30
    assert triton_launch._wide_index(small, torch.empty(1025, 64, 128, 128, device="meta"))
    strided = torch.empty_strided((3, 4, 5, 6), (1 << 29, 1, 24, 4), device="meta")  # 2 * 2**29 + ...
    assert triton_launch._wide_index(strided)
    assert not triton_launch._wide_index(torch.empty_strided((3, 4, 5, 6), (1 << 28, 1, 24, 4), device="meta"))


def _record_constexprs(monkeypatch, kernel: str) -> list:
    """The constexprs and config key of every launch of ``kernel`` from here on."""
    seen, launch = [], triton_launch._launch

    def spy(kernel_name, grid, args, kwargs, config_key=None):
        if kernel_name == kernel:
            seen.append((dict(kwargs), config_key))
        return launch(kernel_name, grid, args, kwargs, config_key)

    monkeypatch.setattr(triton_launch, "_launch", spy)
    return seen


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("ksize", [3, 1])
@pytest.mark.parametrize("shape, beta_offset", [((2, 8, 5, 7, 16), 1.0), ((1, 40, 6, 5, 40), 1.0),
                                                ((3, 8, 1, 6, 8), 1.0), ((2, 8, 4, 4, 8), 30.0)],
                         ids=["odd", "chunks", "one-row", "large-beta"])
@pytest.mark.parametrize("kernel", ["conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel"],
                         ids=["forward", "dgrad", "wgrad"])
def test_gemms_through_tma_descriptors(monkeypatch, kernel, shape, beta_offset, ksize, residual):
    """The forward reading x, the dgrad reading grad_y, with the weight, and
    the weight gradient reading x and grad_y, through tensor descriptors (the
    kernels' TMA; FWD_TMA/DGRAD_TMA/WGRAD_TMA force it, also under the
    interpreter): a tap's rows are the pixel rows shifted by a constant, and
    the rows that cross an image's border, or leave the tensor, must count as
    zero (after the activation: with beta + 30 a leaked relu(shift) or
    neighbour pixel would be large). Odd
    sizes, several channel chunks with channels not a multiple of the
    block, N = 1 with one row, residual and all gradients against the
    reference; the 3x3 weight packed (TMA reads [KH*KW*C, K] in the forward,
    [KH*KW*K, C] in the dgrad), the 1x1 one as nn.Conv2d's [K, C] (the
    forward's W_KC). Channel counts that make 16-byte rows in bf16 too: on a
    GPU also in bf16, by the ratio rule of DESIGN.md §5."""
    switch = {"conv_fwd_kernel": "FWD_TMA", "conv_dgrad_kernel": "DGRAD_TMA", "conv_wgrad_kernel": "WGRAD_TMA"}
    monkeypatch.setattr(triton_launch, switch[kernel], True)
    if kernel == "conv_wgrad_kernel":
        monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", 2)  # (a split boundary inside the rows)
    monkeypatch.setattr(triton_launch, "SMALL_WEIGHT_READS", 0)
    seen = _record_constexprs(monkeypatch, kernel)
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("no TMA before compute capability 9")
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, ksize, 1, REF_DTYPE, "channels_last", residual, beta_offset=beta_offset)
    _compare(inp, True, 1, pad, REF_DTYPE)
    if DEVICE == "cuda":  # and in bf16, the dtype it is for (wgmma from the descriptors' shared memory)
        inp, pad = _inputs(n, c, h, w, k, ksize, 1, torch.bfloat16, "channels_last", residual,
                           beta_offset=beta_offset)
        _check_ratio_rule(inp, 1, pad)
    assert seen, "the forward ran"
    for kwargs, config_key in seen:
        if kernel == "conv_fwd_kernel":
            assert kwargs["W_KC"] == (ksize == 1)
        if triton_launch.INTERPRET:
            assert kwargs["TMA"]
        else:
            assert config_key[-5] and config_key[-4], "TMA candidates only"  # (keys: ..., tma, only, act, two_per_sm, only)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
@pytest.mark.parametrize("shape, beta_offset", [((2, 8, 5, 7, 16), 1.0), ((1, 40, 6, 5, 24), 1.0),
                                                ((2, 8, 4, 4, 8), 30.0)],
                         ids=["odd", "chunks", "large-beta"])
def test_gemms_reading_an_activation_pass(monkeypatch, shape, beta_offset, ksize, stride, layout):
    """The forward and weight gradient reading the activation written by
    activation_pass_kernel (ACT_PASS, forced) instead of activating x in
    their loops: output, every gradient and the running statistics against
    the reference, residual included; padding taps must read zero, not
    relu(shift) (beta + 30) nor a neighbour; odd sizes, several channel
    chunks with channels not a multiple of the block, stride 2 with odd
    H/W, 1x1 and 3x3, both layouts; and a check that both GEMMs ran in
    that form."""
    monkeypatch.setattr(triton_launch, "ACT_PASS", True)
    seen = {kernel: _record_constexprs(monkeypatch, kernel) for kernel in ("conv_fwd_kernel", "conv_wgrad_kernel")}
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, ksize, stride, REF_DTYPE, layout, True, beta_offset=beta_offset)
    _compare(inp, True, stride, pad, REF_DTYPE)
    for kernel, launches in seen.items():
        assert launches, kernel
        for kwargs, config_key in launches:
            if triton_launch.INTERPRET:
                assert kwargs["ACT_PASS"], kernel
            else:
                assert config_key[-3] == 2, "ACT_PASS candidates only"
    if DEVICE == "cuda":  # and in bf16, the dtype it is offered for
        inp, pad = _inputs(n, c, h, w, k, ksize, stride, torch.bfloat16, layout, True, beta_offset=beta_offset)
        _check_ratio_rule(inp, stride, pad)


@pytest.mark.parametrize("flat", [False, True], ids=["unrolled", "flat"])
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2)])
@pytest.mark.parametrize("shape, beta_offset", [((2, 8, 5, 7, 16), 1.0), ((1, 40, 6, 5, 24), 1.0),
                                                ((2, 8, 4, 4, 8), 30.0)],
                         ids=["odd", "chunks", "large-beta"])
def test_gemms_copying_taps_through_l1(monkeypatch, shape, beta_offset, ksize, stride, flat):
    """The forward and dgrad with their taps' tiles copied through L1
    (L1_TAPS, forced: the rows that are not loaded get offsets shifted by 8
    bytes, triton_kernels._rows_through_l1): output, every gradient and the
    running statistics against the reference, residual included; padding
    taps must still read zero (beta + 30), odd sizes, channel tails, both
    loop forms, stride 2 (the dgrad outside its parity classes: those
    loops have no L1_TAPS), channels_last and NCHW; and a check that both
    GEMMs ran in that form. (That the copies then go through L1 is a
    compile property: tests/test_triton_aot.py.)"""
    monkeypatch.setattr(triton_launch, "L1_TAPS", True)
    monkeypatch.setattr(triton_launch, "FLAT_LOOP", flat)
    monkeypatch.setattr(triton_launch, "DGRAD_PARITY", False)
    seen = {kernel: _record_constexprs(monkeypatch, kernel) for kernel in ("conv_fwd_kernel", "conv_dgrad_kernel")}
    n, c, h, w, k = shape
    for layout in ("channels_last", "nchw"):
        inp, pad = _inputs(n, c, h, w, k, ksize, stride, REF_DTYPE, layout, True, beta_offset=beta_offset)
        _compare(inp, True, stride, pad, REF_DTYPE)
    for kernel, launches in seen.items():
        assert launches and all(kwargs["L1_TAPS"] for kwargs, _ in launches), kernel
    if DEVICE == "cuda":  # and in bf16, where the copies are 8 bytes instead of 16
        inp, pad = _inputs(n, c, h, w, k, ksize, stride, torch.bfloat16, "channels_last", True,
                           beta_offset=beta_offset)
        _check_ratio_rule(inp, stride, pad)


GEMM_KERNELS = ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2), (1, 1), (1, 2)])
@pytest.mark.parametrize("shape, beta_offset", [((2, 8, 5, 7, 16), 1.0), ((1, 40, 6, 5, 24), 1.0),
                                                ((2, 8, 4, 4, 8), 30.0)],
                         ids=["odd", "chunks", "large-beta"])
def test_gemms_through_the_library_route(monkeypatch, shape, beta_offset, ksize, stride, layout, training):
    """The three GEMMs through PyTorch's convolution with the unit's other
    work in Triton passes (LIBRARY_GEMM, forced: activation pass, residual
    add, ReLU-backward partials): output, every gradient and the running
    statistics against the reference, residual included, in training and
    eval; padding must read zero, not relu(shift) (beta + 30); odd sizes,
    channel tails, stride 2 with odd H/W, 1x1 and 3x3, both layouts; and
    a check that no Triton GEMM kernel ran."""
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", True)
    before = dict(triton_launch.LAUNCHES)
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, ksize, stride, REF_DTYPE, layout, True, beta_offset=beta_offset)
    _compare(inp, training, stride, pad, REF_DTYPE)
    ran = {name: count - before.get(name, 0) for name, count in triton_launch.LAUNCHES.items()}
    assert not any(ran.get(kernel) for kernel in GEMM_KERNELS), ran
    assert ran.get("relu_backward_partials_kernel") == 1 and ran.get("activation_pass_kernel") == 2, ran
    if DEVICE == "cuda" and training:  # and in bf16 (cuDNN's kernels), the dtype it would be timed for
        inp, pad = _inputs(n, c, h, w, k, ksize, stride, torch.bfloat16, layout, True, beta_offset=beta_offset)
        _check_ratio_rule(inp, stride, pad)


@pytest.mark.parametrize("weight_format", LAYOUTS)
def test_library_route_with_a_weight_of_another_dtype_and_layout(monkeypatch, weight_format):
    """The library route with the weight in another dtype than x (fp64 for
    fp32 activations, standing in for autocast's fp32 weight and bf16
    activations: cast to x's dtype for the convolution, its gradient back
    in the weight's dtype) and either layout, an NCHW x meeting a
    channels_last weight (PyTorch's convolution then answers in
    channels_last; the unit's output and gradients keep x's format)."""
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 5, 6, generator=gen).to(DEVICE)
    weight = (torch.randn(10, 12, 3, 3, generator=gen, dtype=torch.float64) / 6).to(DEVICE)
    weight = weight.contiguous(memory_format=LAYOUTS[weight_format])
    _fp64_weight_against_autograd(x, weight, 1, gen)
    bn = triton_launch.bn_prepare(x, None, None, None, None, None, True, 0.1, 1e-5)
    y, _ = triton_launch.conv_forward(x, weight, bn, 1, 1, None, False)
    grad_x, grad_w, _ = triton_launch.conv_backward(torch.randn_like(y), x, weight, bn, True, 1, 1, True, True)
    assert y.is_contiguous() and grad_x.stride() == x.stride() and grad_w.stride() == weight.stride()


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_relu_backward_partials_against_torch(layout):
    """relu_backward_partials_kernel alone: gz = ga where x*scale + shift >
    0, written with x's strides from a ga in the other layout, and the
    per-tile sums of gz and gz*xhat (xhat = (x - mean)*invstd) against torch
    on the same tiles, pixels and channels past the blocks included."""
    x = (torch.randn(3, 21, 5, 7, dtype=REF_DTYPE, device=DEVICE) * 2).to(memory_format=LAYOUTS[layout])
    other = "nchw" if layout == "channels_last" else "channels_last"
    ga = torch.randn(3, 21, 5, 7, dtype=REF_DTYPE, device=DEVICE).to(memory_format=LAYOUTS[other])
    sdt = functional.stats_dtype(x)
    scale, shift, mean = (torch.randn(21, dtype=sdt, device=DEVICE) for _ in range(3))
    invstd = torch.rand(21, dtype=sdt, device=DEVICE) + 0.5
    gz = torch.empty_like(x)
    block_m, block_c = 32, 16
    tiles = triton_launch._cdiv(105, block_m)
    part_gz, part_gz_xhat = (torch.empty(tiles, 21, dtype=sdt, device=DEVICE) for _ in range(2))
    triton_launch._run("relu_backward_partials_kernel", (tiles, 2), ga, x, scale, shift, mean, invstd, gz, part_gz,
                       part_gz_xhat, 105, 21, 35, 7, *ga.stride(), *x.stride(), BLOCK_M=block_m, BLOCK_C=block_c,
                       IS_FP64=x.dtype == torch.float64)
    per_channel = lambda v: v[:, None, None]  # noqa: E731
    ref = torch.where(x * per_channel(scale) + per_channel(shift) > 0, ga, 0.0)
    assert gz.stride() == x.stride()
    torch.testing.assert_close(gz, ref, rtol=0, atol=0)
    rows = ref.permute(0, 2, 3, 1).reshape(105, 21)
    xhat = ((x - per_channel(mean)) * per_channel(invstd)).permute(0, 2, 3, 1).reshape(105, 21)
    pad = tiles * block_m - 105
    torch.testing.assert_close(part_gz, F.pad(rows, (0, 0, 0, pad)).reshape(tiles, block_m, 21).sum(1))
    torch.testing.assert_close(part_gz_xhat, F.pad(rows * xhat, (0, 0, 0, pad)).reshape(tiles, block_m, 21).sum(1))


def test_library_route_timed_once_a_shape(monkeypatch):
    """_gemm_route: forced either way by LIBRARY_GEMM; left to the timing
    (None) only where _routes_timed (a GPU with autotuning on: never under
    the interpreter), there the faster route of the two trials, kept per
    GEMM and key (a second call runs no trial), recorded in AUTOTUNED; a
    library route that raises in its trial is not taken (with a warning)."""
    calls, trials = [], []
    times = {"triton": 2.0, "library": 1.0}

    def route(name):
        return lambda: calls.append(name) or name

    def fake_trial(fn, quantiles):
        name = fn()
        trials.append(name)
        return times[name]

    x = torch.empty(1, 4, 2, 2, device=DEVICE)
    monkeypatch.setattr(triton_launch, "ROUTES", {})
    monkeypatch.setattr(triton_launch, "_trial", fake_trial)
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", True)
    assert triton_launch._gemm_route("forward", (1,), x, route("triton"), route("library")) == "library"
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", False)
    assert triton_launch._gemm_route("forward", (1,), x, route("triton"), route("library")) == "triton"
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", None)
    if triton_launch.INTERPRET:
        assert not triton_launch._routes_timed(x)
    monkeypatch.setattr(triton_launch, "_routes_timed", lambda x: False)
    assert triton_launch._gemm_route("forward", (1,), x, route("triton"), route("library")) == "triton"
    assert not trials
    monkeypatch.setattr(triton_launch, "_routes_timed", lambda x: True)
    tuned = len(triton_launch.AUTOTUNED)
    assert triton_launch._gemm_route("forward", (1,), x, route("triton"), route("library")) == "library"
    assert trials == ["triton", "library"] and triton_launch.AUTOTUNED[tuned]["best"] == "library"
    assert triton_launch._gemm_route("forward", (1,), x, route("triton"), route("library")) == "library"
    times["library"] = 3.0  # another GEMM, another key: timed anew
    assert triton_launch._gemm_route("dgrad", (1,), x, route("triton"), route("library")) == "triton"
    assert triton_launch._gemm_route("forward", (2,), x, route("triton"), route("library")) == "triton"
    assert len(trials) == 6 and len(triton_launch.AUTOTUNED) == tuned + 3

    def failing():
        raise RuntimeError("no algorithm for this convolution")

    times["library"] = 0.5
    with pytest.warns(UserWarning, match="keeping the Triton GEMM"):
        assert triton_launch._gemm_route("wgrad", (1,), x, route("triton"), failing) == "triton"
    assert triton_launch._gemm_route("wgrad", (1,), x, route("triton"), failing) == "triton"
    del triton_launch.AUTOTUNED[tuned:]


def test_l1_taps_only_where_there_are_taps(monkeypatch):
    """L1_TAPS is asked of the 3x3 GEMMs only: a 1x1 conv has one tap (no
    re-read for L1 to serve), and the dgrad's parity classes (stride 2) have
    their own loop."""
    monkeypatch.setattr(triton_launch, "L1_TAPS", True)
    seen = {kernel: _record_constexprs(monkeypatch, kernel) for kernel in ("conv_fwd_kernel", "conv_dgrad_kernel")}
    for ksize, stride, expected in ((1, 1, False), (3, 2, False)):
        for launches in seen.values():
            launches.clear()
        inp, pad = _inputs(1, 8, 4, 4, 8, ksize, stride, REF_DTYPE, "channels_last", False)
        _run("triton", inp, True, stride, pad)
        assert [kw["L1_TAPS"] for kw, _ in seen["conv_fwd_kernel"]] == [ksize > 1]
        assert [kw["L1_TAPS"] for kw, _ in seen["conv_dgrad_kernel"]] == [expected]


def test_activation_pass_against_the_reference():
    """activation_pass_kernel: relu(x*scale + shift) rounded once to x's
    dtype, laid out as x (channels_last and NCHW), with negative scales,
    a tail of channels past the block and a tail of pixels."""
    for layout, dtype in (("channels_last", REF_DTYPE), ("nchw", REF_DTYPE), ("channels_last", torch.float32)):
        x = (torch.randn(3, 21, 5, 7, dtype=dtype, device=DEVICE) * 3).to(memory_format=LAYOUTS[layout])
        scale = torch.randn(21, dtype=functional.stats_dtype(x), device=DEVICE)
        shift = torch.randn(21, dtype=functional.stats_dtype(x), device=DEVICE)
        out = torch.empty_like(x)
        triton_launch.activation_pass(x, scale, shift, out)
        assert out.stride() == x.stride()
        ref = torch.relu(x.to(scale.dtype) * scale[:, None, None] + shift[:, None, None]).to(dtype)
        torch.testing.assert_close(out, ref, rtol=0, atol=0) if dtype == torch.float64 else \
            torch.testing.assert_close(out, ref)


def test_activation_pass_offered_where_it_may_pay():
    """_act_pass_buffer: forced (ACT_PASS = True) for any conv, dtype and
    layout with a dense x, the buffer laid out as x; never where switched
    off, nor for a non-dense x (its buffer could not share x's strides);
    left to the autotuner (mode 1) only on a GPU with 16-bit data, at least
    ACT_PASS_CHANNELS input channels and ACT_PASS_READS computations of each
    activation (taps x tiles of 128 output channels): a 3x3 conv, a 1x1 one
    with 512 output channels, not a 1x1 one with 384."""
    x = torch.empty(2, 8, 4, 4, device=DEVICE).to(memory_format=torch.channels_last)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_launch, "ACT_PASS", True)
        mode, act = triton_launch._act_pass_buffer(x, 9, 8)
        assert mode == 2 and act is not x and act.stride() == x.stride()
        assert triton_launch._act_pass_buffer(x, 1, 8)[0] == 2
        sliced = torch.empty(2, 16, 4, 4, device=DEVICE)[:, ::2]
        assert triton_launch._act_pass_buffer(sliced, 9, 8)[0] == 0, "not dense"
        patch.setattr(triton_launch, "ACT_PASS", False)
        assert triton_launch._act_pass_buffer(x, 9, 8) == (0, x)
        patch.setattr(triton_launch, "ACT_PASS", None)
        assert triton_launch._act_pass_buffer(x, 9, 8)[0] == 0, "fp32, 8 channels"
        wide = torch.empty(1, triton_launch.ACT_PASS_CHANNELS, 2, 2, device=DEVICE, dtype=torch.bfloat16)
        gpu = DEVICE == "cuda" and not triton_launch.INTERPRET and triton_launch.AUTOTUNE
        assert triton_launch._act_pass_buffer(wide, 9, 64)[0] == (1 if gpu else 0)
        assert triton_launch._act_pass_buffer(wide, 1, 512)[0] == (1 if gpu else 0)
        assert triton_launch._act_pass_buffer(wide, 1, 384) == (0, wide)


def test_act_pass_configs_run_the_pass_first():
    """Each ACT_PASS candidate carries the pass as its pre_hook (so the
    autotuner's trials time it), in both loop forms for the forward and
    both product orders for the weight gradient; mode 2 keeps only them."""
    fwd = triton_launch._gemm_configs(128, 256, 256, taps=9, act_pass=1)
    act = [cfg for cfg in fwd if cfg.kwargs.get("ACT_PASS")]
    assert {cfg.kwargs["FLAT"] for cfg in act} == {False, True} and len(act) < len(fwd)
    assert all(cfg.pre_hook is triton_launch._act_pass_hook for cfg in act)
    assert not any(cfg.pre_hook for cfg in fwd if not cfg.kwargs.get("ACT_PASS"))
    only = triton_launch._gemm_configs(128, 256, 256, taps=9, act_pass=2)
    assert only and all(cfg.kwargs.get("ACT_PASS") for cfg in only)
    one_tap = [cfg for cfg in triton_launch._gemm_configs(128, 512, 256, taps=1, act_pass=1)
               if cfg.kwargs.get("ACT_PASS")]
    assert one_tap and not any(cfg.kwargs["FLAT"] for cfg in one_tap), "no flat loop for a 1x1 conv"
    wgrad = triton_launch._wgrad_configs(256, 256, act_pass=1)
    act = [cfg for cfg in wgrad if cfg.kwargs.get("ACT_PASS")]
    assert {cfg.kwargs["CHANNEL_ROWS"] for cfg in act} == {False, True}
    assert all(cfg.pre_hook is triton_launch._act_pass_hook for cfg in act)
    assert all(cfg.kwargs.get("ACT_PASS") for cfg in triton_launch._wgrad_configs(256, 256, act_pass=2))


def test_forward_tma_only_where_descriptors_can_read():
    """_tma_forward: stride 1 with "same" padding over x with dense rows at
    16-byte aligned addresses and row strides, the weight in x's dtype,
    packed [KH, KW, C, K] or 1x1 [K, C]; anything else takes the pointer
    loads (None). On a GPU: bf16 on compute capability 9+ (the TMA)."""
    if DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("no TMA before compute capability 9")
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16

    def x_of(c=8, layout=torch.channels_last):
        return torch.zeros(2, c, 5, 6, dtype=dtype, device=DEVICE).to(memory_format=layout)

    packed = triton_launch._pack_weight(torch.zeros(12, 8, 3, 3, device=DEVICE), (2, 3, 1, 0), dtype)
    w1 = torch.zeros(12, 8, 1, 1, dtype=dtype, device=DEVICE)
    off_16 = torch.zeros(1 + 2 * 5 * 6 * 8, dtype=dtype, device=DEVICE)[1:].view(2, 5, 6, 8).permute(0, 3, 1, 2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_launch, "FWD_TMA", None)
        assert triton_launch._tma_forward(x_of(), packed, 1, 1) is False
        assert triton_launch._tma_forward(x_of(), w1, 1, 0) is True
        assert triton_launch._tma_forward(x_of(), w1.to(memory_format=torch.channels_last), 1, 0) is True
        assert triton_launch._tma_forward(x_of(), packed, 2, 1) is None, "stride 2"
        assert triton_launch._tma_forward(x_of(), packed, 1, 0) is None, "not same padding"
        assert triton_launch._tma_forward(x_of(layout=torch.contiguous_format), packed, 1, 1) is None, "NCHW"
        assert triton_launch._tma_forward(x_of(c=6), packed, 1, 1) is None, "24-byte rows"
        assert triton_launch._tma_forward(x_of(), torch.zeros_like(packed.contiguous()), 1, 1) is None, "unpacked"
        assert triton_launch._tma_forward(x_of(), w1.double(), 1, 0) is None, "weight dtype"
        assert triton_launch._tma_forward(off_16, packed, 1, 1) is None, "address off 16 bytes"
        assert triton_launch._tma_forward(x_of(c=16)[:, :8], packed, 1, 1) is False, "a channel slice: rows of 16"
        patch.setattr(triton_launch, "FWD_TMA", False)
        assert triton_launch._tma_forward(x_of(), packed, 1, 1) is None, "switched off"


@pytest.mark.parametrize("ksize, stride", [(3, 1), (1, 1)])
def test_forward_in_256_column_tiles(monkeypatch, ksize, stride):
    """The forward's 256-column tile (an autotuning candidate from 256
    output channels with 16-bit inputs; FWD_WIDE_TILE forces it, also under
    the interpreter, there in fp64): 264 output channels, so the second
    column tile is nearly all mask; residual and emitted statistics in the
    epilogue. On a GPU in bf16, against the ratio rule of DESIGN.md §5."""
    monkeypatch.setattr(triton_launch, "FWD_WIDE_TILE", True)
    dtype = REF_DTYPE if DEVICE == "cpu" else torch.bfloat16
    inp, pad = _inputs(2, 16, 5, 4, 264, ksize, stride, dtype, "channels_last", True)
    if DEVICE == "cpu":
        _compare(inp, True, stride, pad, REF_DTYPE)
    else:
        _check_ratio_rule(inp, stride, pad)
    x = inp["x"]
    bn = triton_launch.bn_prepare(x, None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    y, stats = triton_launch.conv_forward(x, inp["weight"], bn, stride, pad, inp["residual"], True)
    merged = triton_launch.merge_moments(stats, y.shape[0] * y.shape[2] * y.shape[3])
    y = y.to(merged.dtype)  # the statistics are those of the stored output
    assert_close(merged[0], y.mean((0, 2, 3)), merged.dtype, "emitted mean")
    assert_close(merged[1], y.var((0, 2, 3), unbiased=False), merged.dtype, "emitted variance")


@pytest.mark.parametrize("cast", [True, False], ids=["cast", "as-is"])
def test_1x1_weight_of_another_dtype_cast_or_read_as_is(monkeypatch, cast):
    """Under autocast an fp32 1x1 weight meets bf16 activations: cast once
    to their dtype where the GEMM reduces over CAST_WEIGHT_REDUCTION channels
    or more (then the MMA streams it from shared memory), else read as it is
    and cast as each tile is loaded; each forced. fp32 activations and an
    fp64 weight stand in for bf16 and fp32 (the interpreter runs fp32/fp64):
    output, input and weight gradients against autograd on the same math
    with the weight rounded to fp32; the weight gradient in the weight's
    dtype."""
    monkeypatch.setattr(triton_launch, "CAST_WEIGHT_REDUCTION", 1 if cast else 0)
    seen = []
    original = triton_launch._gemm_weight

    def recording(weight, *args):
        w_gemm = original(weight, *args)
        seen.append(w_gemm.dtype)
        return w_gemm

    monkeypatch.setattr(triton_launch, "_gemm_weight", recording)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 5, 6, generator=gen).to(DEVICE).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(36, 40, 1, 1, generator=gen, dtype=torch.float64).to(DEVICE) / 6
    _fp64_weight_against_autograd(x, weight, 0, gen)
    assert seen == [torch.float32 if cast else torch.float64] * 2


@pytest.mark.skipif(DEVICE == "cuda", reason="the GPU runs these block sizes in every test")
@pytest.mark.parametrize("tail", [False, True], ids=["finalize-kernels", "tails"])
def test_gpu_merge_blocks_under_the_interpreter(monkeypatch, tail):
    """The per-channel merges (statistics, finalize, backward finalize) with
    the GPU's block sizes (MERGE_T x MERGE_C = 256 x 16) and more than 256
    tiles, so the walk over tiles takes several steps: 9248 rows are 290
    tiles of the interpreter's 32-row conv tiles; or (tails) the same sums
    done by the kernels' last programs, in 19 steps of 16 tiles (TAIL_STEPS
    raised: by default a tail takes one step)."""
    monkeypatch.setattr(triton_launch, "TAIL_STEPS", 64)
    monkeypatch.setattr(triton_launch, "MERGE_T", 256)
    monkeypatch.setattr(triton_launch, "MERGE_C", 16)
    monkeypatch.setattr(triton_launch, "FINALIZE_TAIL", tail)
    flags = _launch_flags(monkeypatch, "conv_dgrad_kernel", "FINALIZE")
    inp, pad = _inputs(2, 20, 68, 68, 18, 1, 1, REF_DTYPE, "channels_last", True)
    _compare(inp, True, 1, pad, REF_DTYPE)
    bn = triton_ops.prepare(inp["x"], None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    y, parts = triton_ops.bn_relu_conv2d(inp["x"], inp["weight"], bn, inp["gamma"], inp["beta"], True, 1, pad,
                                         inp["residual"], True)
    assert parts.shape[1] > 256 and flags and set(flags) == {tail}
    mean, var = triton_launch.merge_moments(parts, y.numel() // y.shape[1])
    torch.testing.assert_close(mean, y.mean((0, 2, 3)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(var, y.var((0, 2, 3), unbiased=False), rtol=1e-10, atol=1e-10)


def _counters_are_zero():
    return all(int(buf.abs().sum()) == 0 for buf in triton_launch._TAIL_COUNTERS.values())


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ksize, stride, c", [(3, 1, 20), (3, 2, 48), (1, 1, 40)])
def test_backward_finalize_in_the_dgrads_last_programs(monkeypatch, ksize, stride, c, training):
    """The dgrad's FINALIZE tail (the last program of each column block sums
    the partials and writes grad_gamma, grad_beta, k1, k0) against the
    separate bn_backward_finalize_kernel: under the interpreter bit for bit
    the same gradients (the same loop; these few tiles fit one chunk of
    either, so the sums group alike); on a GPU equal to fp32 rounding (the
    two kernels' tl.sum over partial rows reduce across different thread
    layouts: the H200 differed in the last bits where the parity classes
    give several partial rows, session 11), with several column blocks (48
    and 40 channels: 32-wide interpreter tiles, one with a tail) and the
    parity classes; the launcher took the tail (no finalize launch) and the
    arrival counters are zero again afterwards."""
    inp, pad = _inputs(2, c, 9, 7, 24, ksize, stride, REF_DTYPE, "channels_last", False)
    x, weight = inp["x"], inp["weight"]
    bn = triton_launch.bn_prepare(x, None, inp["gamma"], inp["beta"], inp["running_mean"].clone(),
                                  inp["running_var"].clone(), training, 0.1, 1e-5)
    oh, ow = (9 + 2 * pad - ksize) // stride + 1, (7 + 2 * pad - ksize) // stride + 1
    grad_y = torch.randn(2, 24, oh, ow, dtype=REF_DTYPE, device=DEVICE).to(memory_format=torch.channels_last)
    results = {}
    for tail in (True, False):
        monkeypatch.setattr(triton_launch, "FINALIZE_TAIL", tail)
        flags = _launch_flags(monkeypatch, "conv_dgrad_kernel", "FINALIZE")
        before = triton_launch.LAUNCHES["bn_backward_finalize_kernel"]
        results[tail] = triton_launch.conv_backward(grad_y, x, weight, bn, training, stride, pad, True, False)
        assert flags == [tail]
        assert triton_launch.LAUNCHES["bn_backward_finalize_kernel"] - before == (0 if tail else 1)
        assert _counters_are_zero()
    (gx, _, grads), (gx_ref, _, grads_ref) = results[True], results[False]
    if triton_launch.INTERPRET:
        assert torch.equal(grads, grads_ref) and torch.equal(gx, gx_ref)
    else:
        torch.testing.assert_close(grads, grads_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    # and the gradients themselves against autograd through the reference BN
    xr = x.detach().clone().requires_grad_()
    gamma, beta = inp["gamma"].clone().requires_grad_(), inp["beta"].clone().requires_grad_()
    rm, rv = inp["running_mean"].clone(), inp["running_var"].clone()
    a = F.relu(F.batch_norm(xr, rm, rv, gamma, beta, training, 0.1, 1e-5))
    F.conv2d(a, weight, None, stride, pad).backward(grad_y)
    assert_close(gx, xr.grad, REF_DTYPE, "grad x")
    assert_close(grads[0], gamma.grad, REF_DTYPE, "grad gamma")
    assert_close(grads[1], beta.grad, REF_DTYPE, "grad beta")


@pytest.mark.parametrize("dtype", [REF_DTYPE, torch.float32], ids=["ref", "fp32"])
@pytest.mark.parametrize("c, running", [(20, True), (48, True), (48, False)])
def test_statistics_finalized_in_their_last_programs(monkeypatch, c, running, dtype):
    """bn_prepare from x alone in one launch (the statistics kernel's last
    program per channel block merges and finalizes) against the two
    launches: bit for bit the same [4, C] rows (the same merge; these few
    tiles fit one chunk of either), running statistics and
    num_batches_tracked (one batch added by either), and the mean and
    variance of x; with several channel blocks and tiles (the
    interpreter's 64-row, up to 64-channel tiles)."""
    x = (torch.randn(3, c, 10, 9, dtype=dtype, device=DEVICE) * 2 + 5).to(memory_format=torch.channels_last)
    gamma = torch.rand(c, dtype=dtype, device=DEVICE) + 0.5
    beta = torch.randn(c, dtype=dtype, device=DEVICE)
    running_stats = (torch.randn(c, dtype=dtype, device=DEVICE), torch.rand(c, dtype=dtype, device=DEVICE) + 0.5)
    results = {}
    for tail in (True, False):
        monkeypatch.setattr(triton_launch, "FINALIZE_TAIL", tail)
        counted = torch.tensor(7, device=DEVICE)
        before = triton_launch.LAUNCHES["bn_finalize_kernel"]
        rs = [t.clone() for t in running_stats] if running else [None, None]
        out = triton_launch.bn_prepare(x, None, gamma, beta, *rs, True, 0.1, 1e-5, batches_tracked=counted)
        assert triton_launch.LAUNCHES["bn_finalize_kernel"] - before == (0 if tail else 1)
        assert int(counted) == 8 and _counters_are_zero()
        results[tail] = out, rs
    (out, rs), (out_ref, rs_ref) = results[True], results[False]
    assert torch.equal(out, out_ref)
    if running:
        assert torch.equal(rs[0], rs_ref[0]) and torch.equal(rs[1], rs_ref[1])
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[0], x.mean((0, 2, 3)), **tol)
    torch.testing.assert_close(out[1], torch.rsqrt(x.var((0, 2, 3), unbiased=False) + 1e-5), **tol)


@pytest.mark.skipif(DEVICE != "cuda", reason="races between programs need a GPU (the interpreter runs them in turn)")
def test_tails_agree_over_many_launches(monkeypatch):
    """On a GPU, where the programs run at once: 200 launches of each tail
    (the dgrad's at ResNet-164's third-stage shape, 64 programs per column
    block; the statistics') give bit for bit the first launch's results
    every time (a race would drop or misread partials), those agree with
    the separate finalize kernels' to rounding (their chunks of tiles
    differ: 128 or 64 against 256), and the counters end at zero."""
    inp, pad = _inputs(128, 64, 8, 8, 64, 3, 1, torch.float32, "channels_last", False)
    x, weight = inp["x"], inp["weight"]
    bn = triton_launch.bn_prepare(x, None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    grad_y = torch.randn_like(x)
    monkeypatch.setattr(triton_launch, "FINALIZE_TAIL", False)
    bn_ref = triton_launch.bn_prepare(x, None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    gx_ref, _, grads_ref = triton_launch.conv_backward(grad_y, x, weight, bn, True, 1, pad, True, False)
    gx_ref, grads_ref = gx_ref.clone(), grads_ref.clone()
    monkeypatch.setattr(triton_launch, "FINALIZE_TAIL", True)
    first = None
    for _ in range(200):
        gx, _, grads = triton_launch.conv_backward(grad_y, x, weight, bn, True, 1, pad, True, False)
        bn_tail = triton_launch.bn_prepare(x, None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
        if first is None:
            first = gx.clone(), grads.clone(), bn_tail.clone()
        assert torch.equal(gx, first[0]) and torch.equal(grads, first[1]) and torch.equal(bn_tail, first[2])
    # sums over 8192 rows (64 partials of ~10) in another grouping: rounding well under 1e-3; a
    # dropped or stale partial would move a sum by ~10
    torch.testing.assert_close(first[1], grads_ref, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(first[0], gx_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first[2], bn_ref, rtol=1e-5, atol=1e-6)
    assert _counters_are_zero()


def test_tails_decline_what_one_program_should_not_sum(monkeypatch):
    """No tail whose loop would take more than TAIL_STEPS steps (one by
    default: longer tails cost more than the finalize kernel, session 11),
    more column blocks than a counter slot holds, or with FINALIZE_TAIL off;
    slots rotate."""
    device = torch.device(DEVICE)
    assert triton_launch.TAIL_STEPS == 1
    assert triton_launch._tail_counters(device, 128, 128, 4) is not None
    assert triton_launch._tail_counters(device, 129, 128, 4) is None
    monkeypatch.setattr(triton_launch, "TAIL_STEPS", 3)
    assert triton_launch._tail_counters(device, 384, 128, 4) is not None
    assert triton_launch._tail_counters(device, 385, 128, 4) is None
    assert triton_launch._tail_counters(device, 1, 16, triton_launch.TAIL_SLOT_COUNTERS + 1) is None
    first, second = (triton_launch._tail_counters(device, 1, 16, 2) for _ in range(2))
    assert first.data_ptr() != second.data_ptr() and first.dtype == torch.int32
    monkeypatch.setattr(triton_launch, "FINALIZE_TAIL", False)
    assert triton_launch._tail_counters(device, 1, 16, 1) is None


def test_batch_counted_by_the_finalize(monkeypatch):
    """num_batches_tracked + 1 in the finalize launch (emitted moments,
    given mean/var, x's own statistics), nothing added in eval without it,
    and a module's count equal to nn.BatchNorm2d's after training steps
    (fixed momentum: counted in the kernel; momentum None: on the host)."""
    inp, pad = _inputs(2, 16, 6, 6, 16, 3, 1, REF_DTYPE, "channels_last", False)
    x = inp["x"]
    y, parts = triton_ops.bn_relu_conv2d(x, inp["weight"], triton_launch.bn_prepare(
        x, None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5), inp["gamma"], inp["beta"], True, 1, pad,
        None, True)
    count = torch.tensor(0, device=DEVICE)
    for moments in (parts, torch.stack((y.mean((0, 2, 3)), y.var((0, 2, 3), unbiased=False))), None):
        triton_launch.bn_prepare(y, moments, None, None, inp["running_mean"].clone(), inp["running_var"].clone(),
                                 True, 0.1, 1e-5, batches_tracked=count)
    assert int(count) == 3
    with pytest.raises(ValueError, match="batches_tracked"):
        triton_launch.bn_prepare(y, None, None, None, None, None, True, 0.1, 1e-5,
                                 batches_tracked=torch.zeros(1, dtype=torch.int32, device=DEVICE))
    for momentum in (0.1, None):
        fused = fused_preact.FusedBNReLUConv2d(16, 8, 3, backend="triton").to(DEVICE, REF_DTYPE)
        ref = torch.nn.BatchNorm2d(16, momentum=momentum).to(DEVICE, REF_DTYPE)
        fused.bn.momentum = momentum
        launches = triton_launch.LAUNCHES.copy()
        for _ in range(3):
            fused(x)
            ref(x)
        assert int(fused.bn.num_batches_tracked) == int(ref.num_batches_tracked) == 3
        # (fp64 under the interpreter; on a GPU fp32, where the H200 differed by 2.5e-7 relative)
        tight = REF_DTYPE == torch.float64
        torch.testing.assert_close(fused.bn.running_var, ref.running_var, rtol=1e-10 if tight else 1e-5,
                                   atol=1e-12 if tight else 1e-6)
        fused.eval()
        fused(x)
        assert int(fused.bn.num_batches_tracked) == 3
        assert sum((triton_launch.LAUNCHES - launches).values()) > 0


@pytest.mark.parametrize("ksize, stride", [(3, 1), (1, 2)])
def test_repeated_calls_agree(ksize, stride):
    """The same unit three times on the same inputs gives the same bits. On a
    GPU the first call goes through Triton's JIT (and autotuner), the later
    ones through triton_launch's cached compiled kernels (fast launches); the
    interpreter has no fast path (tests/test_triton_launch_path.py checks its
    arguments without a GPU)."""
    inp, pad = _inputs(2, 6, 6, 7, 5, ksize, stride, torch.float32, "channels_last", True)
    y0, g0, rm0, rv0, grad_y = _run("triton", inp, True, stride, pad)
    for _ in range(2):
        y, g, rm, rv, _ = _run("triton", inp, True, stride, pad, grad_y)
        assert torch.equal(y, y0) and torch.equal(rm, rm0) and torch.equal(rv, rv0)
        for name in g0:
            assert torch.equal(g[name], g0[name]), name


@pytest.mark.parametrize("shape", [
    (1, 17, 5, 9, 19),  # N = 1, C and K not powers of two or tile multiples, odd W
    (3, 3, 5, 5, 4),    # C = 3
    (2, 40, 3, 4, 36),  # channels spanning more than one tile of the interpreter config
])
@pytest.mark.parametrize("ksize, stride", [(3, 2), (3, 1), (1, 2)])
def test_edge_shapes(shape, ksize, stride):
    n, c, h, w, k = shape
    inp, pad = _inputs(n, c, h, w, k, ksize, stride, REF_DTYPE, "channels_last", True)
    _compare(inp, True, stride, pad, REF_DTYPE)


@pytest.mark.parametrize("split", [None, 3], ids=["auto-split", "split3"])
@pytest.mark.parametrize("weight_format", LAYOUTS)
@pytest.mark.parametrize("ksize", [3, 1])
def test_weight_gradient_in_the_weights_layout(monkeypatch, ksize, weight_format, split):
    """After model.to(memory_format=channels_last) the conv weights are
    channels_last: the weight gradient comes out in the weight's layout (the
    wgrad kernel writes each split through its strides; no copy) and matches
    the reference, with the rows reduced in one split or in three (summed by
    the launcher; on a GPU the split count follows the shape)."""
    monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", split)
    inp, pad = _inputs(2, 6, 7, 7, 5, ksize, 1, REF_DTYPE, "channels_last", False)
    inp["weight"] = inp["weight"].contiguous(memory_format=LAYOUTS[weight_format])
    _compare(inp, True, 1, pad, REF_DTYPE)
    _, g, *_ = _run("triton", inp, True, 1, pad)
    assert g["weight"].stride() == inp["weight"].stride()


def test_padding_reads_zero_after_activation():
    """beta >> 0 makes relu(shift) large: a kernel that activated the padded
    zeros would put it on every border pixel."""
    inp, pad = _inputs(2, 4, 5, 5, 3, 3, 1, REF_DTYPE, "channels_last", False, beta_offset=8.0)
    _compare(inp, True, 1, pad, REF_DTYPE)
    _compare(inp, False, 1, pad, REF_DTYPE)


@pytest.mark.parametrize("library", [False, True], ids=["triton-gemm", "library-route"])
def test_non_contiguous_input(monkeypatch, library):
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", library)
    base = torch.randn(3, 12, 9, 9, dtype=REF_DTYPE, device=DEVICE)
    inp, pad = _inputs(3, 6, 8, 7, 5, 3, 1, REF_DTYPE, "nchw", False)
    inp["x"] = base[:, ::2, 1:, :7]  # a strided view in neither layout
    _compare(inp, True, 1, pad, REF_DTYPE)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_batch_stats_survive_a_large_mean(layout, offset):
    x = (torch.randn(4, 5, 12, 12, device=DEVICE) + offset).to(memory_format=LAYOUTS[layout])
    mean, var = triton_ops.bn_stats(x)
    x64 = x.double()
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=0)


def test_batch_stats_of_a_non_contiguous_input():
    x = torch.randn(5, 10, 9, 9, device=DEVICE)[:, 1::2, :, 2:]
    mean, var = triton_ops.bn_stats(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("library", [False, True], ids=["triton-gemm", "library-route"])
@pytest.mark.parametrize("dtype", sorted({REF_DTYPE, torch.float32}, key=str))
@pytest.mark.parametrize("residual", [False, True])
def test_emitted_statistics_are_those_of_the_output(monkeypatch, dtype, residual, library):
    """The emitted per-tile moments merge to the mean and variance of the
    stored output, from the GEMM's epilogue or, on the library route, from
    the statistics kernel in the epilogue's tiles."""
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", library)
    inp, pad = _inputs(3, 5, 9, 7, 6, 3, 2, dtype, "channels_last", residual)
    bn = triton_ops.prepare(inp["x"], None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    y, parts = triton_ops.bn_relu_conv2d(inp["x"], inp["weight"], bn, inp["gamma"], inp["beta"], True, 2, pad,
                                         inp["residual"], True)
    y_mean, y_var = triton_launch.merge_moments(parts, y.numel() // y.shape[1])
    y64 = y.double()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(y_mean.double(), y64.mean((0, 2, 3)), rtol=tol, atol=tol)
    torch.testing.assert_close(y_var.double(), y64.var((0, 2, 3), unbiased=False), rtol=tol, atol=tol)


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("ksize, stride", [(3, 2), (1, 1)])
def test_gradcheck_float64(training, ksize, stride):
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 2, ksize, ksize, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = (torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    rm, rv = torch.zeros(2, dtype=torch.float64, device=DEVICE), torch.ones(2, dtype=torch.float64, device=DEVICE)

    def unit(x, w, g, b):
        # Training without running statistics: no state changes between the
        # gradcheck's evaluations.
        return functional.bn_relu_conv2d(x, w, g, b, None if training else rm, None if training else rv,
                                         training=training, stride=stride, padding=ksize // 2, backend="triton")

    assert torch.autograd.gradcheck(unit, (x, w, g, b), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
@pytest.mark.parametrize("ksize, stride", [(3, 2), (1, 1)])
def test_gradcheck_float64_alternative_forms(monkeypatch, ksize, stride):
    """gradcheck with the autotuning forms the GPU may pick instead of the
    interpreter's defaults: the epilogue's tile (x, the residual) loaded
    before the reduction loop and the weight gradient taken transposed, in
    two splits; residual gradient included."""
    monkeypatch.setattr(triton_launch, "EPILOGUE_FIRST_LOAD", True)
    monkeypatch.setattr(triton_launch, "WGRAD_CHANNEL_ROWS", True)
    monkeypatch.setattr(triton_launch, "WGRAD_SPLIT", 2)
    _gradcheck_small_unit(ksize, stride)


def _gradcheck_small_unit(ksize: int, stride: int) -> None:
    """fp64 gradcheck of a training unit with a residual on 2x2x3x3 inputs
    (small: each of gradcheck's ~100 perturbations runs the interpreted
    kernels), every input's gradient included."""
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=DEVICE, requires_grad=True)
    w = torch.randn(2, 2, ksize, ksize, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = (torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    oh = (3 + 2 * (ksize // 2) - ksize) // stride + 1
    r = torch.randn(2, 2, oh, oh, dtype=torch.float64, device=DEVICE, requires_grad=True)

    def unit(x, w, g, b, r):
        return functional.bn_relu_conv2d(x, w, g, b, None, None, training=True, stride=stride,
                                         padding=ksize // 2, residual=r, backend="triton")

    assert torch.autograd.gradcheck(unit, (x, w, g, b, r), eps=1e-6, atol=1e-7)


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2), (1, 1)])
def test_gradcheck_float64_through_an_activation_pass(monkeypatch, ksize, stride):
    """gradcheck with the forward and weight gradient reading an activation
    pass's output (ACT_PASS, forced), residual gradient included, and a
    check that both ran in that form."""
    monkeypatch.setattr(triton_launch, "ACT_PASS", True)
    seen = {kernel: _record_constexprs(monkeypatch, kernel) for kernel in ("conv_fwd_kernel", "conv_wgrad_kernel")}
    _gradcheck_small_unit(ksize, stride)
    for kernel, launches in seen.items():
        assert launches and all(kwargs["ACT_PASS"] for kwargs, _ in launches), kernel


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
@pytest.mark.parametrize("ksize, stride", [(3, 1), (3, 2), (1, 1)])
def test_gradcheck_float64_through_the_library_route(monkeypatch, ksize, stride):
    """gradcheck with the three GEMMs through PyTorch's convolution
    (LIBRARY_GEMM, forced), residual gradient included, and a check that no
    Triton GEMM kernel ran."""
    monkeypatch.setattr(triton_launch, "LIBRARY_GEMM", True)
    before = dict(triton_launch.LAUNCHES)
    _gradcheck_small_unit(ksize, stride)
    assert not any(triton_launch.LAUNCHES[kernel] - before.get(kernel, 0) for kernel in GEMM_KERNELS)
    assert triton_launch.LAUNCHES["relu_backward_partials_kernel"] > before.get("relu_backward_partials_kernel", 0)


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
def test_gradcheck_float64_copying_taps_through_l1(monkeypatch):
    """gradcheck with the 3x3 forward and dgrad copying their taps' tiles
    through L1 (L1_TAPS, forced; the dgrad's flat loop, a chunk's taps in
    turn), residual gradient included, and a check that both ran in that form."""
    monkeypatch.setattr(triton_launch, "L1_TAPS", True)
    monkeypatch.setattr(triton_launch, "FLAT_LOOP", True)
    seen = {kernel: _record_constexprs(monkeypatch, kernel) for kernel in ("conv_fwd_kernel", "conv_dgrad_kernel")}
    _gradcheck_small_unit(3, 1)
    for kernel, launches in seen.items():
        assert launches and all(kwargs["L1_TAPS"] for kwargs, _ in launches), kernel


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
def test_gradcheck_float64_one_kernel_row_a_program(monkeypatch):
    """gradcheck with the 3x3 weight gradient taking a kernel row's three
    taps a program (TAP_ROWS, forced), residual gradient included, and a
    check that it ran in that form."""
    monkeypatch.setattr(triton_launch, "WGRAD_TAP_ROWS", True)
    seen = _record_constexprs(monkeypatch, "conv_wgrad_kernel")
    _gradcheck_small_unit(3, 1)
    assert seen and all(kwargs["TAP_ROWS"] for kwargs, _ in seen)


@pytest.mark.skipif(DEVICE == "cuda", reason="fp64 kernels take ~45 s each to compile on GPU; "
                    "gradcheck runs under the interpreter (CI)")
@pytest.mark.parametrize("ksize", [3, 1])
def test_gradcheck_float64_through_tma_descriptors(monkeypatch, ksize):
    """gradcheck with the forward, dgrad and weight gradient reading through
    TMA descriptors (each forced; the 3x3 weight packed), residual gradient
    included, and a check that all three ran in that form."""
    for switch in ("FWD_TMA", "DGRAD_TMA", "WGRAD_TMA"):
        monkeypatch.setattr(triton_launch, switch, True)
    monkeypatch.setattr(triton_launch, "SMALL_WEIGHT_READS", 0)
    seen = {kernel: _record_constexprs(monkeypatch, kernel)
            for kernel in ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel")}
    cl = torch.channels_last
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=DEVICE).to(memory_format=cl).requires_grad_()
    w = torch.randn(2, 2, ksize, ksize, dtype=torch.float64, device=DEVICE, requires_grad=True)
    g = (torch.rand(2, dtype=torch.float64, device=DEVICE) + 0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, device=DEVICE, requires_grad=True)
    r = torch.randn(2, 2, 3, 3, dtype=torch.float64, device=DEVICE).to(memory_format=cl).requires_grad_()

    class ChannelsLastGrad(torch.autograd.Function):
        """Identity whose backward hands on the gradient channels_last
        (gradcheck's own are contiguous, which the TMA forms do not read)."""
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, grad):
            return grad.contiguous(memory_format=cl)

    def unit(x, w, g, b, r):
        return ChannelsLastGrad.apply(functional.bn_relu_conv2d(
            x, w, g, b, None, None, training=True, stride=1, padding=ksize // 2, residual=r, backend="triton"))

    assert torch.autograd.gradcheck(unit, (x, w, g, b, r), eps=1e-6, atol=1e-7)
    for kernel, launches in seen.items():
        assert launches and all(kwargs["TMA"] for kwargs, _ in launches), kernel


def test_opcheck():
    inp, pad = _inputs(2, 3, 4, 4, 4, 3, 1, REF_DTYPE, "channels_last", True)
    bn = triton_ops.prepare(inp["x"], None, inp["gamma"], inp["beta"], None, None, True, 0.1, 1e-5)
    args = (inp["x"].requires_grad_(), inp["weight"].requires_grad_(), bn, inp["gamma"].requires_grad_(),
            inp["beta"], True, 1, pad, inp["residual"], True)
    torch.library.opcheck(triton_ops.bn_relu_conv2d, args)
    torch.library.opcheck(triton_ops.bn_stats, (inp["x"].detach(),))
    for training in (True, False):
        torch.library.opcheck(triton_ops.bn_prepare, (inp["x"].detach(), None, inp["gamma"].detach(), inp["beta"],
                                                      inp["running_mean"], inp["running_var"], training, 0.1, 1e-5,
                                                      0, None))


def _model_tol():
    # Through 3-4 blocks of BatchNorm backward: fp64 agrees to rounding, fp32
    # (GPU) to summation-order noise amplified by the normalisations.
    return dict(rtol=1e-9, atol=1e-10) if REF_DTYPE == torch.float64 else dict(rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("build", [
    lambda: fused_preact.preact_resnet_cifar(11),                 # bottleneck; projections at stride 1 and 2
    lambda: fused_preact.preact_resnet_cifar(8, block="basic"),   # basic blocks
])
def test_converted_model_trains_like_the_reference(build):
    """Blocks on Triton: shared pre-activation for the projection, statistics
    flowing from each epilogue to the next BN, residual in the last epilogue."""
    import copy

    torch.manual_seed(0)
    ref = build().to(REF_DTYPE).to(DEVICE)
    randomize_bn(ref)
    fused = fused_preact.convert(copy.deepcopy(ref), backend="triton")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ref, fused)]
    for step in range(2):
        x = torch.randn(2, 3, 8, 8, dtype=REF_DTYPE, device=DEVICE).to(memory_format=torch.channels_last)
        outs = forward_backward((ref, fused), x)
        torch.testing.assert_close(outs[1], outs[0], **_model_tol())
        for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
            torch.testing.assert_close(b.grad, a.grad, **_model_tol(), msg=lambda m: f"{name}: {m}")
        for opt in opts:
            opt.step()
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, **_model_tol(), msg=lambda m: f"{name}: {m}")
    ref.eval()
    fused.eval()
    x = torch.randn(2, 3, 8, 8, dtype=REF_DTYPE, device=DEVICE)
    torch.testing.assert_close(fused(x), ref(x), **_model_tol())


@pytest.mark.skipif(DEVICE != "cuda", reason="fp16/bf16 need a GPU (the interpreter computes in numpy)")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ksize, stride", GEOMETRIES)
def test_low_precision_ratio_rule(dtype, ksize, stride):
    """|fused - ref64| <= 2 |torch_same_dtype - ref64| + atol (DESIGN.md §5)."""
    inp, pad = _inputs(8, 64, 16, 16, 48, ksize, stride, dtype, "channels_last", True)
    _check_ratio_rule(inp, stride, pad)


def _check_ratio_rule(inp, stride, pad):
    """The fused unit's relative error against fp64 at most twice eager
    PyTorch's in the same dtype, plus 1e-3, for the output and every gradient."""
    dtype = inp["x"].dtype
    inp64 = {k: (v.double() if v is not None else None) for k, v in inp.items()}
    y64, g64, *_ = _run("torch", inp64, True, stride, pad)
    grad_y = torch.randn_like(y64).to(dtype)
    y_t, g_t, *_ = _run("torch", inp, True, stride, pad, grad_y)
    y_f, g_f, *_ = _run("triton", inp, True, stride, pad, grad_y)
    y64, g64, *_ = _run("torch", inp64, True, stride, pad, grad_y.double())
    for name, ref64, same, fused in [("y", y64, y_t, y_f)] + [(k, g64[k], g_t[k], g_f[k]) for k in g64]:
        err_fused = (fused.double() - ref64).norm() / ref64.norm()
        err_torch = (same.double() - ref64).norm() / ref64.norm()
        assert err_fused <= 2 * err_torch + 1e-3, f"{name}: fused {err_fused:.2e} vs torch {err_torch:.2e}"


def test_cpu_tensor_without_interpreter_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, fused_preact\n"
            "x = torch.randn(2, 3, 4, 4); w = torch.randn(4, 3, 3, 3)\n"
            "try:\n"
            "    fused_preact.bn_relu_conv2d(x, w, None, None, None, None, training=True, padding=1,"
            " backend='triton')\n"
            "except RuntimeError as e:\n"
            "    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR" in out.stdout and "TRITON_INTERPRET=1" in out.stdout, out.stdout + out.stderr


def test_bad_input_names_the_problem():
    x = torch.randn(2, 3, 4, 4, device=DEVICE)
    with pytest.raises(ValueError, match="channels"):
        functional.bn_relu_conv2d(x, torch.randn(4, 5, 3, 3, device=DEVICE), None, None, None, None,
                                  training=True, padding=1, backend="triton")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        functional.bn_relu_conv2d(torch.randn(1, 3, 1, 1, device=DEVICE), torch.randn(4, 3, 1, 1, device=DEVICE),
                                  None, None, None, None, training=True, backend="triton")
    with pytest.raises(RuntimeError, match="supports float16, bfloat16, float32 and float64"):
        triton_ops.bn_stats(torch.ones(2, 3, 4, 4, dtype=torch.int32, device=DEVICE))
    # No channels on either side: refused before any kernel (the GEMM kernels
    # assume their reduction runs at least once), by the unit and the launcher.
    for c, k in ((0, 4), (3, 0)):
        x, w = torch.randn(2, c, 4, 4, device=DEVICE), torch.randn(k, c, 1, 1, device=DEVICE)
        with pytest.raises(ValueError, match="at least one input and one output channel"):
            functional.bn_relu_conv2d(x, w, None, None, None, None, training=False, backend="triton")
        with pytest.raises(ValueError, match="at least one input and one output channel"):
            triton_launch.conv_forward(x, w, torch.zeros(4, c, device=DEVICE), 1, 0, None, False)
    # More channels than the stride-2 dgrad's step counter counts exactly (triton_kernels._small_div):
    # refused by the check that both launchers make first.
    c = triton_launch.MAX_CHANNELS + 1
    with pytest.raises(ValueError, match=f"at most {triton_launch.MAX_CHANNELS} channels"):
        triton_launch._check_channels(c, 1)


def test_block_outputs_carry_their_statistics_to_the_next_block():
    """Statistics flow across blocks: in a converted network only the first
    block's BN reads its input for statistics; every later BN gets them from
    a conv epilogue (within a block, or the previous block's last one)."""
    model = fused_preact.convert(fused_preact.preact_resnet_cifar(20, block="basic").to(REF_DTYPE).to(DEVICE),
                                 backend="triton")
    x = torch.randn(2, 3, 8, 8, dtype=REF_DTYPE, device=DEVICE)
    before = triton_launch.LAUNCHES["channel_stats_partial_kernel"]
    model(x)
    assert triton_launch.LAUNCHES["channel_stats_partial_kernel"] - before == 1
    # An in-place change to a block's output invalidates what it carries.
    block = model.stages[0][0] if hasattr(model, "stages") else next(
        m for m in model.modules() if isinstance(m, fused_preact.FusedPreActBasicBlock))
    y = block(torch.randn(2, block.bn1.num_features, 8, 8, dtype=REF_DTYPE, device=DEVICE))
    carried = _carried_moments(y)
    assert carried is not None
    y.mul_(2)
    assert _carried_moments(y) is None


def _carried_moments(y):
    from fused_preact import blocks

    return blocks._incoming_moments(y, "triton")
