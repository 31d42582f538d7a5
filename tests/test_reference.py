"""The pure-PyTorch reference (fused_preact.reference): shapes, parameter
counts from the paper, the identity-mapping analysis, placements and keys."""

import pytest
import torch
from torch import nn

from fused_preact import reference as ref
from fused_preact.reference import PLACEMENTS, SHORTCUT_TYPES, PreActBasicBlock, PreActBottleneck


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "build, expected_millions",
    [
        (lambda: ref.preact_resnet_cifar(164), 1.70),   # paper, Table 2: ResNet-164, 1.7M
        (lambda: ref.preact_resnet_cifar(1001), 10.3),  # paper, Table 2: ResNet-1001, 10.2M (+ the final BN/FC)
        (lambda: ref.preact_resnet_imagenet(50), 25.5),  # ResNet-v2-50 (timm resnetv2_50: 25.55M)
        (lambda: ref.preact_resnet_imagenet(18), 11.7),
    ],
)
def test_parameter_counts_match_the_paper(build, expected_millions):
    assert n_params(build()) / 1e6 == pytest.approx(expected_millions, rel=0.005)


def test_cifar_depths_and_stage_layout():
    model = ref.preact_resnet_cifar(164)
    assert [len(stage) for stage in model.stages] == [18, 18, 18]
    assert [stage[-1].conv3.out_channels for stage in model.stages] == [64, 128, 256]
    assert isinstance(model.stem, nn.Conv2d) and model.stem.in_channels == 3 and model.stem.out_channels == 16
    basic = ref.preact_resnet_cifar(110, block="basic")
    assert [len(stage) for stage in basic.stages] == [18, 18, 18]
    with pytest.raises(ValueError, match="9n\\+2"):
        ref.preact_resnet_cifar(100)
    with pytest.raises(ValueError, match="depth must be one of"):
        ref.preact_resnet_imagenet(42)


@pytest.mark.parametrize("block_cls", [PreActBasicBlock, PreActBottleneck])
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("shortcut_type", SHORTCUT_TYPES)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_block_runs_forward_and_backward(block_cls, placement, shortcut_type, stride):
    torch.manual_seed(0)
    planes = 4
    in_planes = planes * block_cls.expansion  # identity-sized, so the variants apply at stride 1
    block = block_cls(in_planes, planes, stride, placement=placement, shortcut_type=shortcut_type).double()
    x = torch.randn(2, in_planes, 7, 7, dtype=torch.float64, requires_grad=True)
    y = block(x)
    assert y.shape == (2, planes * block_cls.expansion, 4 if stride == 2 else 7, 4 if stride == 2 else 7)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
    if shortcut_type != "dropout":  # dropout's Bernoulli mask is not differentiable input
        block.eval()
        assert torch.autograd.gradcheck(block, (x.detach()[:1, :, :3, :3].clone().requires_grad_(),))


def test_projection_reads_the_pre_activated_input():
    torch.manual_seed(0)
    block = PreActBottleneck(8, 4, stride=2).double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    pre = torch.relu(block.bn1(x))
    branch = block.conv3(torch.relu(block.bn3(block.conv2(torch.relu(block.bn2(block.conv1(pre)))))))
    torch.testing.assert_close(block(x), block.shortcut(pre) + branch, rtol=0, atol=1e-12)


def _stack_with_zeroed_branches(k, shortcut_type, block_cls=PreActBasicBlock, channels=8):
    blocks = []
    for _ in range(k):
        planes = channels // block_cls.expansion
        b = block_cls(channels, planes, shortcut_type=shortcut_type)
        last = b.conv3 if hasattr(b, "conv3") else b.conv2
        nn.init.zeros_(last.weight)  # F(x) = 0: only the shortcut carries signal
        blocks.append(b)
    return nn.Sequential(*blocks).double()


@pytest.mark.parametrize("block_cls", [PreActBasicBlock, PreActBottleneck])
def test_identity_mapping_passes_signal_and_gradient_unchanged(block_cls):
    """Paper Eq. 4-5: with identity shortcuts x_L = x_l + sum F, so with every
    F = 0 the stack returns its input and dL/dx_l = dL/dx_L exactly."""
    torch.manual_seed(0)
    k = 6
    stack = _stack_with_zeroed_branches(k, "identity", block_cls)
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    y = stack(x)
    assert torch.equal(y, x)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    assert torch.equal(grad_x, grad_y)


def test_constant_scaling_multiplies_signal_and_gradient_by_lambda_to_the_k():
    """Paper Eq. 6-7: with h(x) = λx the signal and the gradient through k
    units are scaled by λ^k (vanishing for λ < 1)."""
    torch.manual_seed(0)
    k = 6
    stack = _stack_with_zeroed_branches(k, "scaling")
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    y = stack(x)
    factor = ref.SCALING_LAMBDA**k
    torch.testing.assert_close(y, factor * x, rtol=1e-15, atol=0)
    grad_y = torch.randn_like(y)
    (grad_x,) = torch.autograd.grad(y, x, grad_y)
    torch.testing.assert_close(grad_x, factor * grad_y, rtol=1e-15, atol=0)


def test_the_five_placements_are_distinct_functions():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 6, 6, dtype=torch.float64)
    outputs = {}
    for placement in PLACEMENTS:
        torch.manual_seed(1)  # same conv weights for every placement
        block = PreActBottleneck(16, 4, placement=placement).double()
        for m in block.modules():  # non-trivial affine BN so (b)-(e) differ by more than a ReLU
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
        outputs[placement] = block(x)
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert (outputs[a] - outputs[b]).abs().max() > 1e-3, (a, b)
    assert (outputs["original"] >= 0).all() and (outputs["bn_after_add"] >= 0).all()
    assert (outputs["full_preact"] < 0).any()  # nothing clamps the sum


def test_state_dict_keys_are_as_documented():
    block = PreActBottleneck(16, 8, stride=2)
    keys = set(block.state_dict())
    for i in (1, 2, 3):
        assert f"conv{i}.weight" in keys and f"conv{i}.bias" not in keys
        for suffix in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            assert f"bn{i}.{suffix}" in keys
    assert "shortcut.weight" in keys
    assert block.bn1.num_features == 16 and block.bn2.num_features == 8 and block.bn3.num_features == 8
    assert "shortcut.weight" not in PreActBasicBlock(8, 8).state_dict()
    assert "gate.weight" in PreActBasicBlock(8, 8, shortcut_type="exclusive_gating").state_dict()


def test_stride_position_option_of_the_paper_code():
    a = PreActBottleneck(16, 8, stride=2)
    b = PreActBottleneck(16, 8, stride=2, stride_in_1x1=True)
    assert a.conv2.stride == (2, 2) and a.conv1.stride == (1, 1)
    assert b.conv1.stride == (2, 2) and b.conv2.stride == (1, 1)
    assert b(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="placement"):
        PreActBasicBlock(4, 4, placement="post")
    with pytest.raises(ValueError, match="shortcut_type"):
        PreActBasicBlock(4, 4, shortcut_type="gated")


def test_networks_accept_a_block_factory():
    built = []

    def factory(in_planes, planes, stride=1):
        built.append((in_planes, planes, stride))
        return PreActBottleneck(in_planes, planes, stride)

    factory.expansion = 4
    model = ref.preact_resnet_cifar(20, block_cls=factory)
    assert built[0] == (16, 16, 1) and len(built) == 6
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 10)
