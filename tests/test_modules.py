"""Fused blocks and convert(): a converted model equals the reference one
(outputs, every parameter gradient, running statistics, eval outputs) and
keeps the very same parameters and buffers."""

import copy

import pytest
import torch
from torch import nn

import fused_preact
from conftest import forward_backward, randomize_bn
from fused_preact import reference
from fused_preact.memory import saved_tensor_bytes

pytestmark = pytest.mark.skipif(not fused_preact.backends()["native"]["available"],
                                reason="fused_preact._C is not built")


@pytest.mark.parametrize("build, size", [
    (lambda: reference.preact_resnet_cifar(29), 12),                 # bottleneck, projections at stride 1 and 2
    (lambda: reference.preact_resnet_cifar(14, block="basic"), 12),  # basic blocks
    (lambda: reference.preact_resnet_imagenet(18, num_classes=7), 40),
])
@pytest.mark.parametrize("channels_last", [False, True])
def test_converted_model_trains_like_the_reference(build, size, channels_last):
    torch.manual_seed(0)
    ref_model = build().double()
    randomize_bn(ref_model)
    fused = copy.deepcopy(ref_model)
    report = fused_preact.ConversionReport()
    fused_preact.convert(fused, backend="native", report=report)
    assert report.converted and not report.declined
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    opt_ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    opt_fused = torch.optim.SGD(fused.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x = torch.randn(4, 3, size, size, dtype=torch.float64).to(memory_format=fmt)
        outs = forward_backward((ref_model, fused), x)
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-9, atol=1e-10)
        for (name, a), b in zip(ref_model.named_parameters(), fused.parameters()):
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{name}: {m}")
        opt_ref.step()
        opt_fused.step()
    for (name, a), b in zip(ref_model.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    ref_model.eval()
    fused.eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ref_model(x), rtol=1e-9, atol=1e-10)


def test_convert_keeps_the_same_parameter_objects_and_keys():
    model = reference.preact_resnet_cifar(20)
    params_before = [id(p) for p in model.parameters()]
    buffers_before = [id(b) for b in model.buffers()]
    keys_before = list(model.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    fused_preact.convert(model)
    assert isinstance(model.stages[0][0], fused_preact.FusedPreActBottleneck)
    assert [id(p) for p in model.parameters()] == params_before
    assert [id(b) for b in model.buffers()] == buffers_before
    assert list(model.state_dict()) == keys_before
    before = model.stages[0][0].conv1.weight.detach().clone()
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    optimizer.step()  # the optimizer made before conversion trains the converted model
    assert not torch.equal(before, model.stages[0][0].conv1.weight)
    fused_preact.unconvert(model)
    assert type(model.stages[0][0]) is reference.PreActBottleneck
    assert [id(p) for p in model.parameters()] == params_before


def test_convert_declines_what_it_cannot_fuse():
    model = nn.Sequential(reference.PreActBottleneck(16, 4), reference.PreActBottleneck(16, 4, placement="original"),
                          reference.PreActBasicBlock(16, 16, shortcut_type="exclusive_gating"))
    report = fused_preact.ConversionReport()
    fused_preact.convert(model, report=report)
    assert report.converted == ["0"]
    assert "placement 'original'" in report.declined["1"]
    assert "exclusive_gating" in report.declined["2"]
    assert "converted 1 block(s), declined 2" in str(report)


def test_converted_resnet164_saves_at_most_55_percent_of_the_reference_activation_bytes():
    torch.manual_seed(0)
    ref_model = reference.preact_resnet_cifar(164)
    fused = fused_preact.convert(copy.deepcopy(ref_model), backend="native")
    x = torch.randn(4, 3, 32, 32)
    eager = saved_tensor_bytes(lambda: ref_model(x))
    ours = saved_tensor_bytes(lambda: fused(x))
    assert ours <= 0.55 * eager, (ours, eager)


def test_fused_block_constructor_matches_reference_keys():
    assert (list(fused_preact.FusedPreActBottleneck(16, 8, 2).state_dict())
            == list(reference.PreActBottleneck(16, 8, 2).state_dict()))
    block = fused_preact.FusedPreActBasicBlock(8, 8, backend="torch")
    assert block(torch.randn(2, 8, 5, 5)).shape == (2, 8, 5, 5)


def test_fused_unit_module_and_bad_input():
    unit = fused_preact.FusedBNReLUConv2d(4, 6, 3, backend="native")
    ref_seq = nn.Sequential(unit.bn, nn.ReLU(), unit.conv)
    x = torch.randn(2, 4, 5, 5)
    torch.testing.assert_close(unit(x), ref_seq(x), rtol=1e-5, atol=1e-5)
    before = unit.bn.running_mean.clone(), unit.bn.num_batches_tracked.clone()
    with pytest.raises(ValueError, match="FusedBNReLUConv2d: input has 3 channels"):
        unit(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="FusedBNReLUConv2d: expected more than 1 value per channel"):
        unit(torch.randn(1, 4, 1, 1))
    assert torch.equal(unit.bn.running_mean, before[0]) and torch.equal(unit.bn.num_batches_tracked, before[1])
