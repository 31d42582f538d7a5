"""convert() on timm's resnetv2 models: the converted model equals the
original (outputs, every gradient, running statistics after SGD steps, eval
outputs), keeps the same parameters and state_dict keys, goes back with
unconvert(), and declines what it cannot fuse with a reason."""

import copy

import pytest
import torch
from torch import nn

import fused_preact
from conftest import forward_backward, randomize_bn, triton_device

timm = pytest.importorskip("timm")
pytestmark = pytest.mark.skipif(not fused_preact.backends()["native"]["available"],
                                reason="fused_preact._C is not built")


def _model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).double()
    randomize_bn(model)
    return model


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__ in ("PreActBottleneck", "PreActBasic")]


def _train_and_compare(ref, fused, size, steps=2, channels_last=True, seed_each_step=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ref, fused = ref.to(memory_format=fmt), fused.to(memory_format=fmt)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fused)]
    for step in range(steps):
        x = torch.randn(2, 3, size, size, dtype=torch.float64).to(memory_format=fmt)
        outs = forward_backward((ref, fused), x, seed=100 + step if seed_each_step else None)
        assert (outs[1] - outs[0]).abs().max() / outs[0].abs().max() < 1e-7, f"outputs, step {step}"
        for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
            # fp64 rounding through 16+ blocks of BatchNorm backward: relative
            # to the largest entry of each gradient.
            err = (b.grad - a.grad).abs().max() / a.grad.abs().max().clamp_min(1e-30)
            assert err < 1e-7, f"{name}: relative error {err:.2e}"
        for opt in opts:
            opt.step()
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        if not a.is_floating_point():
            assert torch.equal(a, b), name  # num_batches_tracked
            continue
        err = (b - a).abs().max() / a.abs().max().clamp_min(1e-30)
        assert err < 1e-8, f"{name}: relative error {err:.2e}"
    ref.eval()
    fused.eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        a, b = ref(x), fused(x)
    assert (b - a).abs().max() / a.abs().max() < 1e-7, "eval outputs"


@pytest.mark.parametrize("name", ["resnetv2_18", "resnetv2_50", "resnetv2_50d"])
def test_converted_timm_model_trains_like_the_original(name):
    ref = _model(name)
    fused = copy.deepcopy(ref)
    report = fused_preact.ConversionReport()
    fused_preact.convert(fused, backend="native", report=report)
    assert len(report.converted) == len(_blocks(ref)) and not report.declined, report
    assert all(type(b).__name__.startswith("Fused") for b in _blocks(fused))
    _train_and_compare(ref, fused, size=48)


def test_drop_path_keeps_working():
    ref = _model("resnetv2_18", drop_path_rate=0.2)
    fused = fused_preact.convert(copy.deepcopy(ref), backend="native")
    _train_and_compare(ref, fused, size=32, seed_each_step=True)


def test_same_parameters_state_dict_and_inverse():
    model = _model("resnetv2_50")
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # created before conversion
    fused_preact.convert(model, backend="native")
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before = model.stages[0].blocks[0].conv2.weight.clone()
    model(x).sum().backward()
    opt.step()  # the optimizer made before conversion trains the converted model
    assert not torch.equal(before, model.stages[0].blocks[0].conv2.weight)
    restored = _model("resnetv2_50")
    restored.load_state_dict(model.state_dict())  # checkpoint from the fused model into the original class
    fused_preact.unconvert(model)
    assert [type(b).__name__ for b in _blocks(model)] == [type(b).__name__ for b in _blocks(restored)]
    assert all(p is params[n] for n, p in model.named_parameters())


def test_bit_models_with_group_norm_are_declined_with_a_reason():
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=5)
    report = fused_preact.ConversionReport()
    fused_preact.convert(model, report=report)
    assert not report.converted and len(report.declined) == len(_blocks(model))
    assert all("GroupNorm" in why or "StdConv2d" in why for why in report.declined.values()), report


def test_a_non_relu_activation_is_declined():
    model = _model("resnetv2_18", act_layer=nn.SiLU)
    report = fused_preact.ConversionReport()
    fused_preact.convert(model, report=report)
    assert not report.converted and all("not ReLU" in why for why in report.declined.values()), report


def _tiny_resnetv2(basic: bool, avg_down: bool):
    """timm's ResNetV2 with resnetv2_18/50d's blocks and layers, narrow enough
    for the Triton interpreter."""
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2

    torch.manual_seed(0)
    return ResNetV2(layers=[1, 1], channels=(16, 32), stem_chs=8, num_classes=5, basic=basic,
                    bottle_ratio=1.0 if basic else 0.25, avg_down=avg_down, conv_layer=create_conv2d,
                    norm_layer=BatchNormAct2d).double()


@pytest.mark.parametrize("basic, avg_down", [(True, False), (False, True)], ids=["basic", "bottleneck-d"])
def test_timm_blocks_on_the_triton_backend(basic, avg_down):
    device = triton_device()
    # The interpreter checks in fp64; on a GPU fp32 without TF32 (fp64 Triton
    # kernels take ~45 s each to compile there).
    dtype, tol = (torch.float64, 1e-8) if device == "cpu" else (torch.float32, 1e-4)
    ref = _tiny_resnetv2(basic, avg_down).to(device, dtype)
    fused = copy.deepcopy(ref)
    report = fused_preact.ConversionReport()
    fused_preact.convert(fused, backend="triton", report=report)
    assert len(report.converted) == 2 and not report.declined, report
    x = torch.randn(2, 3, 16, 16, dtype=dtype, device=device)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a, b = ref(x), fused(x)
        a.square().mean().backward()
        b.square().mean().backward()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert ((b - a).abs().max() / a.abs().max()).item() < tol
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        err = ((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
        assert err < tol, f"{name}: relative error {err:.2e}"
