"""Pure-PyTorch reference of the pre-activation residual networks.

He et al. 2016, *Identity Mappings in Deep Residual Networks* (ResNet v2).
Everything fused in this package is judged against these modules, so they are
written for clarity, not speed: plain ``nn.BatchNorm2d``, ``nn.ReLU`` and
``nn.Conv2d`` composed exactly as the paper draws them.

Blocks
    ``PreActBasicBlock`` (two 3x3 convs) and ``PreActBottleneck`` (1x1, 3x3, 1x1
    with expansion 4). Attributes ``bn1..bn3``, ``conv1..conv3`` and
    ``shortcut`` (a bias-free 1x1 projection conv, present when the stride is not
    1 or the channel count changes, or when ``shortcut_type="conv1x1"``).

``placement=`` selects one of the five activation placements of the paper's
Fig. 4 (``bn_i`` is always the i-th batch norm in the order of computation):

    ================== ==================================================
    "original"          (a) conv-BN-ReLU ... conv-BN, add, ReLU
    "bn_after_add"      (b) conv-BN-ReLU ... conv, add, BN, ReLU
    "relu_before_add"   (c) conv-BN-ReLU ... conv-BN-ReLU, add
    "relu_only_preact"  (d) ReLU-conv-BN ... ReLU-conv-BN, add
    "full_preact"       (e) BN-ReLU-conv ... BN-ReLU-conv, add   (default)
    ================== ==================================================

``shortcut_type=`` selects the shortcut of the paper's Fig. 2 / Table 1. The
variants apply to blocks whose shortcut would otherwise be the identity; blocks
that change shape always project (as in the paper, which only varies the
identity shortcuts):

    ================== ==================================================
    "identity"          h(x) = x                                (default)
    "scaling"           x_{l+1} = λ·h + (1-λ)·F, λ = 0.5   (constant scaling)
    "exclusive_gating"  x_{l+1} = g·F + (1-g)·x,  g = σ(1x1 conv(x))
    "shortcut_gating"   x_{l+1} = F + (1-g)·x    (shortcut-only gating)
    "conv1x1"           h(x) = 1x1 conv (on every block)
    "dropout"           h(x) = x·Bernoulli(0.5) in training, 0.5·x in eval
    ================== ==================================================

In the pre-activation placements (d) and (e) the projection reads the
*pre-activated* input (relu(bn1(x)) for (e), relu(x) for (d)), which it shares
with the first conv; in the post-activation placements it reads x.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PLACEMENTS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
SHORTCUT_TYPES = ("identity", "scaling", "exclusive_gating", "shortcut_gating", "conv1x1", "dropout")
SCALING_LAMBDA = 0.5
DROPOUT_KEEP = 0.5
# The paper initialises the gate bias negative so that gates start mostly open
# towards the shortcut (1 - g close to 1); -6 is the value it reports for its
# best exclusive-gating result.
GATE_BIAS_INIT = -6.0


def _conv(in_planes: int, out_planes: int, kernel_size: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


class _PreActBlockBase(nn.Module):
    """Shared forward of the basic and bottleneck blocks.

    Subclasses set ``self.convs`` (in order) and the matching batch norms via
    ``_build_norms``; the forward walks them according to ``placement``.
    """

    expansion = 1

    def _validate(self, placement: str, shortcut_type: str, stride: int) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if shortcut_type not in SHORTCUT_TYPES:
            raise ValueError(f"shortcut_type must be one of {SHORTCUT_TYPES}, got {shortcut_type!r}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")

    def _build_shortcut(self, in_planes: int, out_planes: int, stride: int) -> None:
        self.needs_projection = stride != 1 or in_planes != out_planes
        if self.needs_projection or self.shortcut_type == "conv1x1":
            self.shortcut = _conv(in_planes, out_planes, 1, stride)
        # Gating and the other variants only replace identity shortcuts.
        self.variant = "identity" if self.needs_projection else self.shortcut_type
        if self.variant in ("exclusive_gating", "shortcut_gating"):
            self.gate = nn.Conv2d(in_planes, out_planes, 1, bias=True)
            nn.init.constant_(self.gate.bias, GATE_BIAS_INIT)

    def _norms(self) -> list[nn.BatchNorm2d]:
        return [getattr(self, f"bn{i + 1}") for i in range(len(self._convs()))]

    def _convs(self) -> list[nn.Conv2d]:
        raise NotImplementedError

    def _norm_channels(self, placement: str, in_planes: int, widths: Sequence[int]) -> list[int]:
        """Channel count of bn1..bnk: the input of each conv under full
        pre-activation, else each conv's output (for (b) the last BN follows
        the addition, which has the last conv's width too)."""
        if placement == "full_preact":
            return [in_planes, *widths[:-1]]
        return list(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        convs, norms = self._convs(), self._norms()
        p = self.placement
        shortcut_input = x
        out = x
        for i, (conv, bn) in enumerate(zip(convs, norms)):
            last = i == len(convs) - 1
            if p == "full_preact":
                out = F.relu(bn(out))
                if i == 0:
                    shortcut_input = out
                out = conv(out)
            elif p == "relu_only_preact":
                out = F.relu(out)
                if i == 0:
                    shortcut_input = out
                out = bn(conv(out))
            else:  # post-activation placements: conv first
                out = conv(out)
                if p == "bn_after_add" and last:
                    break  # its BN comes after the addition
                out = bn(out)
                if not last or p == "relu_before_add":
                    out = F.relu(out)
        if not hasattr(self, "shortcut"):
            shortcut_input = x  # the identity carries the raw input in every placement
        out = self._combine(out, x, shortcut_input)
        if p == "original":
            out = F.relu(out)
        elif p == "bn_after_add":
            out = F.relu(norms[-1](out))
        return out

    def _combine(self, branch: torch.Tensor, x: torch.Tensor, shortcut_input: torch.Tensor) -> torch.Tensor:
        v = self.variant
        h = self.shortcut(shortcut_input) if hasattr(self, "shortcut") else x
        if v in ("identity", "conv1x1"):
            return h + branch
        if v == "scaling":
            return SCALING_LAMBDA * h + (1.0 - SCALING_LAMBDA) * branch
        if v == "dropout":
            if self.training:
                keep = torch.bernoulli(torch.full_like(h, DROPOUT_KEEP))
                return h * keep + branch
            return DROPOUT_KEEP * h + branch
        g = torch.sigmoid(self.gate(x))
        if v == "exclusive_gating":
            return g * branch + (1.0 - g) * h
        return branch + (1.0 - g) * h  # shortcut_gating

    def extra_repr(self) -> str:
        return f"placement={self.placement!r}, shortcut_type={self.shortcut_type!r}"


class PreActBasicBlock(_PreActBlockBase):
    """Two 3x3 convolutions; output channels = ``planes``."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, placement: str = "full_preact",
                 shortcut_type: str = "identity"):
        super().__init__()
        self._validate(placement, shortcut_type, stride)
        self.placement, self.shortcut_type = placement, shortcut_type
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        out_planes = planes * self.expansion
        for i, c in enumerate(self._norm_channels(placement, in_planes, [planes, out_planes])):
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(c))
        self.conv1 = _conv(in_planes, planes, 3, stride)
        self.conv2 = _conv(planes, out_planes, 3)
        self._build_shortcut(in_planes, out_planes, stride)

    def _convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2]


class PreActBottleneck(_PreActBlockBase):
    """1x1 (reduce) → 3x3 → 1x1 (expand ×4); output channels = 4·``planes``.

    The stride sits on the 3x3 conv (as in timm and torchvision);
    ``stride_in_1x1=True`` puts it on the first 1x1 conv as the paper's Torch
    CIFAR code does.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, placement: str = "full_preact",
                 shortcut_type: str = "identity", stride_in_1x1: bool = False):
        super().__init__()
        self._validate(placement, shortcut_type, stride)
        self.placement, self.shortcut_type = placement, shortcut_type
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.stride_in_1x1 = stride_in_1x1
        out_planes = planes * self.expansion
        for i, c in enumerate(self._norm_channels(placement, in_planes, [planes, planes, out_planes])):
            setattr(self, f"bn{i + 1}", nn.BatchNorm2d(c))
        self.conv1 = _conv(in_planes, planes, 1, stride if stride_in_1x1 else 1)
        self.conv2 = _conv(planes, planes, 3, 1 if stride_in_1x1 else stride)
        self.conv3 = _conv(planes, out_planes, 1)
        self._build_shortcut(in_planes, out_planes, stride)

    def _convs(self) -> list[nn.Conv2d]:
        return [self.conv1, self.conv2, self.conv3]


BlockFactory = Callable[..., nn.Module]
_BLOCKS = {"basic": PreActBasicBlock, "bottleneck": PreActBottleneck}


def _resolve_block(block: str | type, block_cls: BlockFactory | None) -> tuple[BlockFactory, int]:
    """Returns the factory that builds each block and the block's expansion."""
    if isinstance(block, str):
        if block not in _BLOCKS:
            raise ValueError(f"block must be one of {tuple(_BLOCKS)}, got {block!r}")
        base = _BLOCKS[block]
    else:
        base = block
    factory = block_cls if block_cls is not None else base
    expansion = getattr(factory, "expansion", base.expansion)
    return factory, expansion


class PreActResNet(nn.Module):
    """Stem → stages of pre-activation blocks → final BN-ReLU → pool → linear.

    Under the full pre-activation placement the final BN-ReLU is required: the
    last block's output is an un-normalised sum (the paper's Sec. 4.1).
    """

    def __init__(self, stem: nn.Module, stem_channels: int, block: BlockFactory, expansion: int,
                 widths: Sequence[int], depths: Sequence[int], strides: Sequence[int], num_classes: int,
                 **block_kwargs):
        super().__init__()
        self.stem = stem
        in_planes = stem_channels
        stages = []
        for width, depth, stride in zip(widths, depths, strides):
            blocks = []
            for i in range(depth):
                blocks.append(block(in_planes, width, stride if i == 0 else 1, **block_kwargs))
                in_planes = width * expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        self.num_features = in_planes
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.bias is None:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.final_bn(self.stages(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def preact_resnet_cifar(depth: int, num_classes: int = 10, block: str = "bottleneck",
                        block_cls: BlockFactory | None = None, **block_kwargs) -> PreActResNet:
    """The paper's CIFAR network: ResNet-164 / ResNet-1001 (bottleneck) or
    ResNet-20/56/110 style (basic).

    3x3 stem 3→16 without BN; three stages of widths 16/32/64 at strides 1/2/2
    (bottleneck outputs 64/128/256); (depth-2)/9 bottleneck or (depth-2)/6
    basic blocks per stage. ``block_cls`` builds each block instead of the
    reference class (same signature), e.g. a fused block.
    """
    factory, expansion = _resolve_block(block, block_cls)
    per_block = 9 if expansion == 4 else 6
    if depth < per_block + 2 or (depth - 2) % per_block:
        raise ValueError(f"depth must be {per_block}n+2 for {block!r} blocks, got {depth}")
    n = (depth - 2) // per_block
    stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
    return PreActResNet(stem, 16, factory, expansion, (16, 32, 64), (n, n, n), (1, 2, 2), num_classes,
                        **block_kwargs)


_IMAGENET_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


def preact_resnet_imagenet(depth: int, num_classes: int = 1000, block_cls: BlockFactory | None = None,
                           **block_kwargs) -> PreActResNet:
    """ResNet-v2 for ImageNet: 7x7/2 stem conv (no BN: the first block
    pre-activates) and 3x3/2 max pool, four stages of widths 64/128/256/512."""
    if depth not in _IMAGENET_DEPTHS:
        raise ValueError(f"depth must be one of {sorted(_IMAGENET_DEPTHS)}, got {depth}")
    block, depths = _IMAGENET_DEPTHS[depth]
    factory, expansion = _resolve_block(block, block_cls)
    stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
                         nn.MaxPool2d(3, stride=2, padding=1))
    return PreActResNet(stem, 64, factory, expansion, (64, 128, 256, 512), depths, (1, 2, 2, 2), num_classes,
                        **block_kwargs)
