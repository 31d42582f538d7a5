"""The C++ ops (torch.ops.fused_preact.*) and the composed native unit
against nn.BatchNorm2d + nn.ReLU + nn.Conv2d: values, every gradient,
running statistics, traps from DESIGN.md, opcheck and bad input.

Each check is a private _check_x(device) run on CPU here and on CUDA when a
GPU is present (extension-cpp style)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_preact
from conftest import assert_close

pytestmark = pytest.mark.skipif(not fused_preact.backends()["native"]["available"],
                                reason="fused_preact._C is not built")
ops = torch.ops.fused_preact

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}

# Edge shapes (N, C, H, W), each with why it is here.
SHAPES = [
    (2, 3, 5, 7),    # C = 3 (RGB-like), H*W prime-ish and not a vector multiple
    (1, 6, 4, 4),    # N = 1 with H*W > 1
    (3, 17, 3, 5),   # C not a power of two, wider than one AVX vector
    (4, 32, 8, 8),   # a "nice" shape: full vectors everywhere
    (2, 83, 3, 3),   # channels-last: whole 4-vector channel blocks (AVX-512 and AVX2), single vectors, scalar tail
]


def _x(shape, device, dtype, layout, mean=0.0, std=1.0):
    x = torch.randn(shape, dtype=dtype, device=device) * std + mean
    return x.to(memory_format=LAYOUTS[layout])


# ------------------------------------------------------------------ bn_stats

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_stats_matches_float64_reference(device, layout, shape):
    x = _x(shape, device, torch.float32, layout)
    mean, var = ops.bn_stats(x)
    x64 = x.double()
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    torch.testing.assert_close(mean.double(), x64.mean((0, 2, 3)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), x64.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offset", [1e3, 1e4])
def test_bn_stats_variance_survives_a_large_mean(device, layout, offset):
    """Sum(x^2) - M*mean^2 in fp32 would lose every digit here (DESIGN.md)."""
    x = _x((8, 5, 16, 16), device, torch.float32, layout, mean=offset, std=1.0)
    _, var = ops.bn_stats(x)
    expected = x.double().var((0, 2, 3), unbiased=False)
    torch.testing.assert_close(var.double(), expected, rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_bn_stats_bfloat16_accumulates_in_float32(device):
    x = _x((4, 7, 9, 9), device, torch.bfloat16, "channels_last", mean=3.0)
    mean, var = ops.bn_stats(x)
    assert mean.dtype == torch.float32
    torch.testing.assert_close(mean, x.float().mean((0, 2, 3)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, x.float().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


def test_bn_stats_of_a_non_contiguous_input():
    base = torch.randn(4, 10, 8, 8)
    x = base[:, ::2, 1:, :7]  # strided view: neither layout
    mean, var = ops.bn_stats(x)
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ bn_relu and add_stats

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("channels", [11, 83])  # 83: vector channel blocks and tails in channels-last
def test_bn_relu_apply(device, layout, dtype, with_residual, channels):
    x = _x((2, channels, 5, 6), device, dtype, layout)
    stats = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.randn(channels, dtype=stats, device=device)
    shift = torch.randn(channels, dtype=stats, device=device)
    residual = torch.randn_like(x) if with_residual else None
    out = ops.bn_relu(x, scale, shift, residual)
    expected = torch.relu(x.to(stats) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    if with_residual:
        expected = expected + residual.to(stats)
    assert out.dtype == dtype and out.is_contiguous(memory_format=LAYOUTS[layout])
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out.to(stats), expected.to(dtype).to(stats), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_stats_adds_and_reduces_in_one_pass(device, layout):
    a = _x((3, 9, 7, 5), device, torch.float32, layout, mean=100.0)
    b = _x((3, 9, 7, 5), device, torch.float32, layout)
    out, mean, var = ops.add_stats(a, b)
    torch.testing.assert_close(out, a + b, rtol=0, atol=0)
    torch.testing.assert_close(mean.double(), (a + b).double().mean((0, 2, 3)), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(var.double(), (a + b).double().var((0, 2, 3), unbiased=False), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- bn_relu_backward

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_relu_backward_matches_autograd(device, layout, training, shape):
    x = _x(shape, device, torch.float64, layout).requires_grad_()
    C = shape[1]
    gamma = torch.rand(C, dtype=torch.float64, device=device, requires_grad=True)
    beta = torch.randn(C, dtype=torch.float64, device=device, requires_grad=True)
    rm = torch.randn(C, dtype=torch.float64, device=device)
    rv = torch.rand(C, dtype=torch.float64, device=device) + 0.5
    a = torch.relu(F.batch_norm(x, rm.clone(), rv.clone(), gamma, beta, training, 0.1, 1e-5))
    g = torch.randn_like(a)
    expected = torch.autograd.grad(a, (x, gamma, beta), g)
    if training:
        mean, var = ops.bn_stats(x.detach())
    else:
        mean, var = rm, rv
    got = ops.bn_relu_backward(g, x.detach(), mean, torch.rsqrt(var + 1e-5), gamma.detach(), beta.detach(), training)
    for name, e, r in zip(("grad_x", "grad_weight", "grad_bias"), expected, got):
        assert_close(r, e, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_backward_one_sweep_matches_the_two_passes(dtype, affine, training):
    # On CPU, NCHW inputs with >= 2 channels per thread take the one-sweep
    # kernel (reduce and apply per channel); the reduce + apply ops are the
    # two-pass path every other case takes. H*W = 99 covers the unrolled
    # loop, single vectors and the scalar tail.
    torch.manual_seed(0)
    C = max(8, 2 * torch.get_num_threads())
    x = torch.randn(2, C, 9, 11).mul(2).add(0.5).to(dtype)
    g = torch.randn(2, C, 9, 11).to(dtype)
    mean, var = ops.bn_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    gamma = torch.rand(C) + 0.5 if affine else None
    beta = torch.randn(C) if affine else None
    got = ops.bn_relu_backward(g, x, mean, invstd, gamma, beta, training)
    scale = invstd * (gamma if affine else 1)
    shift = (beta if affine else 0) - mean * scale
    sum_gz, sum_gz_xc = ops.bn_relu_backward_reduce(g, x, mean, scale, shift)
    count = x.numel() // C
    k1 = -scale * invstd * (sum_gz_xc * invstd) / count if training else torch.zeros(C)
    k0 = -scale * sum_gz / count - k1 * mean if training else torch.zeros(C)
    expected = (ops.bn_relu_backward_apply(g, x, scale, shift, k1, k0), sum_gz_xc * invstd, sum_gz)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, r, e in zip(("grad_x", "grad_weight", "grad_bias"), got, expected):
        torch.testing.assert_close(r.float(), e.float(), rtol=tol, atol=tol, msg=name)
    # and both against autograd in float64
    xd = x.double().requires_grad_()
    gd = None if gamma is None else gamma.double().requires_grad_()
    bd = None if beta is None else beta.double().requires_grad_()
    rm, rv = mean.double(), var.double()
    a = torch.relu(F.batch_norm(xd, rm.clone(), rv.clone(), gd, bd, training, 0.1, 1e-5))
    ref = torch.autograd.grad(a, [t for t in (xd, gd, bd) if t is not None], g.double())
    torch.testing.assert_close(got[0].double(), ref[0], rtol=5 * tol, atol=5 * tol)
    if affine:
        torch.testing.assert_close(got[1].double(), ref[1], rtol=5 * tol, atol=5 * tol * count ** 0.5)
        torch.testing.assert_close(got[2].double(), ref[2], rtol=5 * tol, atol=5 * tol * count ** 0.5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("grad_layout", ["same", "other"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_bn_relu_backward_in_place_writes_grad_x_over_grad_out(device, layout, grad_layout, dtype, training):
    # grad_out in x's layout is overwritten in place (CPU kernel); in the
    # other layout it still ends up holding grad_x (two passes + copy).
    x = _x((3, 83, 5, 4), device, dtype, layout, mean=0.3)
    other = "nchw" if layout == "channels_last" else "channels_last"
    g = _x((3, 83, 5, 4), device, dtype, layout if grad_layout == "same" else other)
    mean, var = ops.bn_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    stats = mean.dtype
    gamma, beta = torch.rand(83, device=device, dtype=stats) + 0.5, torch.randn(83, device=device, dtype=stats)
    expected = ops.bn_relu_backward(g, x, mean, invstd, gamma, beta, training)
    data_ptr = g.data_ptr()
    grad_gamma, grad_beta = ops.bn_relu_backward_(g, x, mean, invstd, gamma, beta, training)
    assert g.data_ptr() == data_ptr
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    for name, got, e in (("grad_x", g, expected[0]), ("grad_weight", grad_gamma, expected[1]),
                         ("grad_bias", grad_beta, expected[2])):
        torch.testing.assert_close(got.double(), e.double(), rtol=tol, atol=tol, msg=name)


# --------------------------------------------------------- running statistics


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_update_running_stats_in_the_buffers_dtype(device, buffer_dtype):
    # fp32 batch statistics (fp64 for fp64), buffers of any float dtype:
    # computed in the statistics' precision, stored in the buffers' dtype.
    stats = torch.float64 if buffer_dtype == torch.float64 else torch.float32
    rm = torch.randn(37, device=device).to(buffer_dtype)
    rv = (torch.rand(37, device=device) + 0.5).to(buffer_dtype)
    mean, var = torch.randn(37, device=device, dtype=stats), torch.rand(37, device=device, dtype=stats)
    expected_m = (rm.to(stats) * 0.9 + mean * 0.1).to(buffer_dtype)
    expected_v = (rv.to(stats) * 0.9 + var * (0.1 * 50 / 49)).to(buffer_dtype)
    ops.update_running_stats(rm, rv, mean, var, 0.1, 50)
    tol = 1e-2 if buffer_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(rm, expected_m, rtol=tol, atol=tol)
    torch.testing.assert_close(rv, expected_v, rtol=tol, atol=tol)

def test_update_running_stats_of_strided_buffers_and_mixed_devices():
    # Strided buffers take the tensor-op path and are updated in place;
    # statistics on another device than the buffers are refused by name.
    storage = torch.zeros(2, 6)
    rm, rv = storage[0, ::2], storage[1, ::2] + 1  # rv: a fresh tensor, rm: a view into storage
    mean, var = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([4.0, 5.0, 6.0])
    ops.update_running_stats(rm, rv, mean, var, 0.5, 3)
    torch.testing.assert_close(storage[0], torch.tensor([0.5, 0, 1.0, 0, 1.5, 0]))
    torch.testing.assert_close(rv, 0.5 + var * 0.5 * 3 / 2)
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="one device"):
            ops.update_running_stats(rm, rv, mean.cuda(), var.cuda(), 0.5, 3)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_update_running_stats_follows_batchnorm2d(momentum):
    bn = nn.BatchNorm2d(5, momentum=momentum)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for step in range(1, 4):
        x = torch.randn(3, 5, 4, 4) * step + step
        bn(x)
        mean, var = ops.bn_stats(x)
        m = 1.0 / step if momentum is None else momentum
        ops.update_running_stats(rm, rv, mean, var, m, x.numel() // 5)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ opcheck

@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op(device):
    x = torch.randn(2, 4, 3, 3, device=device)
    vec = lambda: torch.rand(4, device=device) + 0.5  # noqa: E731
    mean, var = ops.bn_stats(x)
    cases = [
        (ops.bn_stats.default, (x.clone().requires_grad_(),)),
        (ops.bn_relu.default, (x.clone().requires_grad_(), vec().requires_grad_(), vec(), None)),
        (ops.bn_relu.default, (x, vec(), vec().requires_grad_(), torch.randn_like(x).requires_grad_())),
        (ops.bn_relu_backward.default, (torch.randn_like(x), x, mean, torch.rsqrt(var + 1e-5), vec(), vec(), True)),
        (ops.bn_relu_backward_.default, (torch.randn_like(x), x, mean, torch.rsqrt(var + 1e-5), vec(), None, True)),
        (ops.bn_relu_backward_reduce.default, (torch.randn_like(x), x, mean, vec(), vec())),
        (ops.bn_relu_backward_apply.default, (torch.randn_like(x), x, vec(), vec(), vec(), vec())),
        (ops.add_stats.default, (x.clone().requires_grad_(), torch.randn_like(x))),
        (ops.update_running_stats.default, (vec(), vec(), mean, var, 0.1, 18)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ------------------------------------------------------------- the unit

def _reference_unit(x, bn, conv, residual=None):
    y = conv(torch.relu(bn(x)))
    return y if residual is None else y + residual


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kernel, stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_native_unit_matches_the_reference(device, layout, dtype, kernel, stride, training):
    N, C, H, W, K = 2, 6, 7, 5, 5  # odd H and W with stride 2
    bn = nn.BatchNorm2d(C).to(device, dtype)
    conv = nn.Conv2d(C, K, kernel, stride, kernel // 2, bias=False).to(device, dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(0.5, 3.0)  # large positive beta: padding must stay 0 after activation
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    bn.train(training)
    x = _x((N, C, H, W), device, dtype, layout).requires_grad_()
    running = (bn.running_mean.clone(), bn.running_var.clone())
    y_ref = _reference_unit(x, bn, conv)
    residual = torch.randn_like(y_ref, requires_grad=True)
    y_ref = y_ref + residual
    g = torch.randn_like(y_ref)
    params = (x, conv.weight, bn.weight, bn.bias, residual)
    expected = torch.autograd.grad(y_ref, params, g)
    y = fused_preact.bn_relu_conv2d(x, conv.weight, bn.weight, bn.bias, *running, training=training,
                                    stride=stride, padding=kernel // 2, residual=residual, backend="native")
    got = torch.autograd.grad(y, params, g)
    assert_close(y, y_ref, msg="output")
    for name, e, r in zip(("x", "weight", "gamma", "beta", "residual"), expected, got):
        assert_close(r, e, msg=f"grad {name}")
    assert_close(running[0], bn.running_mean, msg="running_mean")
    assert_close(running[1], bn.running_var, msg="running_var")
    assert y.is_contiguous(memory_format=LAYOUTS[layout])


@pytest.mark.parametrize("training", [True, False])
def test_native_unit_gradcheck_float64(training):
    C = 3
    x = torch.randn(2, C, 4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, C, 3, 3, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(C, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(C, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)

    def unit(x, w, gamma, beta, r):
        return fused_preact.bn_relu_conv2d(x, w, gamma, beta, rm.clone(), rv.clone(), training=training, stride=2,
                                           padding=1, residual=r, backend="native")

    assert torch.autograd.gradcheck(unit, (x, w, gamma, beta, r))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck_of_the_native_unit_op(device, training):
    # fused_preact::bn_relu_conv2d as torch.compile sees it: schema, fake
    # kernel, autograd registration, AOT dispatch (mixed requires_grad).
    from fused_preact import native

    C, K = 4, 5
    x = torch.randn(2, C, 5, 4, device=device, dtype=torch.float64)
    mean, var = ops.bn_stats(x)
    invstd = torch.rsqrt(var + 1e-5)
    w = torch.randn(K, C, 3, 3, device=device, dtype=torch.float64)
    gamma = torch.rand(C, device=device, dtype=torch.float64) + 0.5
    beta = torch.randn(C, device=device, dtype=torch.float64)
    residual = torch.randn(2, K, 3, 2, device=device, dtype=torch.float64)
    cases = [
        (x.clone().requires_grad_(), w.clone().requires_grad_(), mean, invstd, gamma.clone().requires_grad_(),
         beta.clone().requires_grad_(), training, 2, 1, residual.clone().requires_grad_(), 0),
        (x, w.clone().requires_grad_(), mean, invstd, gamma, None, training, 1, 1, None, 0),
    ]
    for args in cases:
        torch.library.opcheck(native.bn_relu_conv2d, args)


def test_saved_bytes_of_the_native_unit_are_at_most_55_percent_of_eager():
    from fused_preact.memory import saved_tensor_bytes

    bn, conv = nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(16, 64, 32, 32, requires_grad=True)  # CIFAR-sized activations, batch 16
    eager = saved_tensor_bytes(lambda: _reference_unit(x, bn, conv))
    fused = saved_tensor_bytes(lambda: fused_preact.bn_relu_conv2d(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, training=True, padding=1,
        backend="native"))
    assert fused <= 0.55 * eager, (fused, eager)


# ---------------------------------------------------------------- bad input

def test_bad_input_gives_clear_errors():
    x = torch.randn(2, 4, 3, 3)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.bn_stats(torch.randn(2, 4, 3))
    with pytest.raises(RuntimeError, match="floating-point"):
        ops.bn_stats(torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match=r"scale must have shape \(C,\)"):
        ops.bn_relu(x, torch.ones(5), torch.zeros(4))
    with pytest.raises(RuntimeError, match="scale must be Float"):
        ops.bn_relu(x, torch.ones(4, dtype=torch.float64), torch.zeros(4))
    with pytest.raises(RuntimeError, match="residual has dtype"):
        ops.bn_relu(x, torch.ones(4), torch.zeros(4), x.double())
    with pytest.raises(RuntimeError, match="more than one value per channel"):
        ops.update_running_stats(torch.zeros(4), torch.ones(4), torch.zeros(4), torch.ones(4), 0.1, 1)
    w = torch.randn(5, 4, 3, 3)
    args = (torch.ones(4), torch.zeros(4), torch.zeros(4), torch.ones(4))
    with pytest.raises(ValueError, match="4-D input"):
        fused_preact.bn_relu_conv2d(torch.randn(4, 3, 3), w, *args, training=True, backend="native")
    with pytest.raises(ValueError, match="input has 3 channels but the convolution expects 4"):
        fused_preact.bn_relu_conv2d(torch.randn(2, 3, 3, 3), w, *args, training=True, backend="native")
    with pytest.raises(RuntimeError, match="does not match the convolution weight dtype"):
        fused_preact.bn_relu_conv2d(x.double(), w, *args, training=True, backend="native")
    with pytest.raises(ValueError, match="floating-point input"):
        fused_preact.bn_relu_conv2d(x.long(), w, *args, training=True, backend="native")
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        fused_preact.bn_relu_conv2d(torch.randn(1, 4, 1, 1), w, torch.ones(4), torch.zeros(4), rm, rv,
                                    training=True, padding=1, backend="native")
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))  # untouched by the failed call
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_preact.bn_relu_conv2d(x, w, *args, training=True, backend="fast")


@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_zero_size_batch_behaves_like_pytorch(backend, training):
    """N = 0, which PyTorch allows: an empty output, zero gradients, running
    statistics untouched."""
    if backend == "triton":
        from fused_preact import triton_launch  # noqa: F401  (needs triton)

        if not fused_preact.backends()["triton"]["available"] or (
                not torch.cuda.is_available() and not triton_launch.INTERPRET):
            pytest.skip("Triton cannot run here")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = torch.randn(0, 4, 5, 5, device=device, requires_grad=True)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    gamma = torch.ones(4, device=device, requires_grad=True)
    rm, rv = torch.zeros(4, device=device), torch.ones(4, device=device)
    y = fused_preact.bn_relu_conv2d(x, w, gamma, None, rm, rv, training=training, padding=1, backend=backend)
    assert y.shape == (0, 6, 5, 5)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and x.grad.shape == x.shape
    assert torch.equal(rm, torch.zeros(4, device=device)) and torch.equal(rv, torch.ones(4, device=device))
