"""Fused models in real training code: user-registered block classes,
autocast + GradScaler, train/eval switching, no_grad inference,
torch.compile, and failed calls that leave no trace."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_preact
from conftest import forward_backward, randomize_bn, triton_device

pytestmark = pytest.mark.skipif(not fused_preact.backends()["native"]["available"],
                                reason="fused_preact._C is not built")


# The widely copied CIFAR pre-activation blocks (bn1/conv1/.../shortcut.0,
# functional ReLU, in-place add), as users have them in their scripts.
class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class PreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, stride, bias=False)  # stride on the first 1x1 (Torch code)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        if stride != 1 or in_planes != planes * 4:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes * 4, 1, stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + shortcut


def _script_model(block, dtype=torch.float64):
    torch.manual_seed(0)
    layers, in_planes = [nn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
    for planes, stride in ((8, 1), (8, 1), (16, 2)):
        layers.append(block(in_planes, planes, stride))
        in_planes = planes * block.expansion
    layers += [nn.BatchNorm2d(in_planes), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, 5)]
    model = nn.Sequential(*layers).to(dtype)
    randomize_bn(model)
    return model


@pytest.fixture
def registered():
    fused_preact.register_block(PreActBlock, units=[("bn1", "conv1"), ("bn2", "conv2")], projection="shortcut.0")
    fused_preact.register_block(PreActBottleneck, units=[("bn1", "conv1"), ("bn2", "conv2"), ("bn3", "conv3")],
                                projection="shortcut.0")
    yield
    fused_preact.unregister_block(PreActBlock)
    fused_preact.unregister_block(PreActBottleneck)


def _max_rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("block", [PreActBlock, PreActBottleneck])
def test_user_registered_blocks_convert_and_train_alike(registered, block):
    ref = _script_model(block)
    fused = copy.deepcopy(ref)
    report = fused_preact.ConversionReport()
    fused_preact.convert(fused, backend="native", report=report)
    assert len(report.converted) == 3 and not report.declined, report
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fused)]
    for _ in range(2):
        x = torch.randn(4, 3, 12, 12, dtype=torch.float64)
        outs = forward_backward((ref, fused), x)
        for opt in opts:
            opt.step()
        assert _max_rel(outs[1], outs[0]) < 1e-10
    for a, b in zip(ref.parameters(), fused.parameters()):
        assert _max_rel(b, a) < 1e-10
    for a, b in zip(ref.buffers(), fused.buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else _max_rel(b, a) < 1e-10
    fused_preact.unconvert(fused)
    assert all(type(m) in (block, nn.Sequential, nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.AdaptiveAvgPool2d,
                           nn.Flatten, nn.Linear) for m in fused.modules())


def test_unregistered_blocks_are_left_alone():
    model = _script_model(PreActBlock)
    report = fused_preact.ConversionReport()
    fused_preact.convert(model, report=report)
    assert not report.converted and not report.declined


# Bottleneck blocks too on CUDA: their 1x1 convs hand the Triton kernels the
# fp32 weight itself (cast as it is loaded), and so do these small 3x3 ones
# (a large 3x3 weight gets a packed bf16 copy: triton_launch.SMALL_WEIGHT_READS).
AUTOCAST_CASES = [("cpu", torch.bfloat16, "native", "basic")] + (
    [("cuda", dt, be, block) for dt in (torch.float16, torch.bfloat16) for be in ("native", "triton")
     for block in ("basic", "bottleneck")]
    if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device, dtype, backend, block", AUTOCAST_CASES)
def test_autocast_and_grad_scaler(device, dtype, backend, block):
    ref = fused_preact.preact_resnet_cifar(20, block=block).to(device)
    fused = fused_preact.convert(copy.deepcopy(ref), backend=backend)
    ref64 = copy.deepcopy(ref).double()
    x = torch.randn(8, 3, 16, 16, device=device)
    grads = {}
    for label, model in (("ref", ref), ("fused", fused)):
        scaler = torch.amp.GradScaler(device, init_scale=2.0**8)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        with torch.autocast(device, dtype=dtype):
            out = model(x)
        assert out.dtype == dtype
        scaler.scale(out.float().square().mean()).backward()
        scaler.unscale_(opt)
        grads[label] = [p.grad.clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
    ref64(x.double()).square().mean().backward()
    # Ratio rule (DESIGN.md): the fused bf16 gradients are no further from the
    # fp64 reference than twice eager bf16's, plus a small floor.
    for g_ref, g_fused, p64 in zip(grads["ref"], grads["fused"], ref64.parameters()):
        err_fused = ((g_fused.double() - p64.grad).norm() / p64.grad.norm()).item()
        err_eager = ((g_ref.double() - p64.grad).norm() / p64.grad.norm()).item()
        assert err_fused <= 2 * err_eager + 2e-2, (err_fused, err_eager)


def test_train_eval_switching_and_no_grad_inference():
    ref = fused_preact.preact_resnet_cifar(11).double()
    fused = fused_preact.convert(copy.deepcopy(ref), backend="native")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for mode in ("train", "eval", "train", "eval"):
        for m in (ref, fused):
            getattr(m, mode)()
        with torch.no_grad():
            a, b = ref(x), fused(x)
        assert _max_rel(b, a) < 1e-10, mode
    for a, b in zip(ref.buffers(), fused.buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else _max_rel(b, a) < 1e-10


def test_torch_compile_of_a_converted_block_has_no_graph_break():
    torch._dynamo.reset()
    block = fused_preact.FusedPreActBottleneck(16, 8, stride=2, backend="native").double()
    ref = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    x = torch.randn(2, 16, 8, 8, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    y_ref = ref._forward_torch(x.detach().clone().requires_grad_())
    assert _max_rel(y.detach(), y_ref.detach()) < 1e-10


def test_a_failed_call_leaves_running_statistics_and_parameters_untouched():
    model = fused_preact.convert(fused_preact.preact_resnet_cifar(11), backend="native")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    block = next(m for m in model.modules() if isinstance(m, fused_preact.FusedPreActBottleneck))
    with pytest.raises(ValueError, match="FusedPreActBottleneck.*channels"):
        block(torch.randn(2, 5, 8, 8))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        block(torch.randn(1, block.bn1.num_features, 1, 1))
    with pytest.raises(ValueError, match="expected a 4-D input"):
        block(torch.randn(2, block.bn1.num_features, 8))
    with pytest.raises(RuntimeError, match="dtype"):
        block(torch.randn(2, block.bn1.num_features, 8, 8, dtype=torch.float64))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_torch_compile_of_a_converted_model():
    torch._dynamo.reset()
    ref = fused_preact.preact_resnet_cifar(11).double()
    randomize_bn(ref)
    fused = fused_preact.convert(copy.deepcopy(ref), backend="native")
    compiled = torch.compile(fused, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out = compiled(x)
    out.square().mean().backward()
    ref(x).square().mean().backward()
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert _max_rel(b.grad, a.grad) < 1e-9, name


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_torch_compile_with_inductor_of_a_converted_model(backend):
    # The default compiler (inductor: generated C++/Triton around our ops,
    # which stay opaque nodes) on a whole converted network, one graph.
    device = "cpu" if backend == "native" else triton_device()
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = fused_preact.preact_resnet_cifar(11).to(device)
    randomize_bn(ref)
    fused = fused_preact.convert(copy.deepcopy(ref), backend=backend)
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(4, 3, 16, 16, device=device)
    # A fresh inductor cache: its key does not cover our ops' fake
    # implementations, so graphs compiled by an older version of this package
    # would be reused with stale output shapes.
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        out = compiled(x)
        out.square().mean().backward()
    expected = ref(x)
    expected.square().mean().backward()
    assert _max_rel(out.detach(), expected.detach()) < 1e-4
    for (name, a), b in zip(ref.named_parameters(), fused.parameters()):
        assert _max_rel(b.grad, a.grad) < 1e-3, name
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        assert torch.equal(a, b) if not a.is_floating_point() else _max_rel(b, a) < 1e-4, name


def test_torch_compile_of_a_triton_block_has_no_graph_break():
    device = triton_device()
    dtype = torch.float64 if device == "cpu" else torch.float32
    torch._dynamo.reset()
    block = fused_preact.FusedPreActBottleneck(16, 8, stride=2, backend="triton").to(device, dtype)
    ref = copy.deepcopy(block)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 16, 8, 8, dtype=dtype, device=device)
    y = compiled(x)
    y.square().sum().backward()
    y_ref = ref._forward_torch(x)
    assert _max_rel(y.detach(), y_ref.detach()) < (1e-10 if dtype == torch.float64 else 1e-4)
