"""Drop-in fused modules and ``convert()``.

``FusedBNReLUConv2d`` replaces ``nn.Sequential(BatchNorm2d, ReLU, Conv2d)``;
``FusedPreActBasicBlock`` / ``FusedPreActBottleneck`` replace the reference
blocks of ``fused_preact.reference`` (full pre-activation, identity or
projection shortcut) with the same constructor arguments and the same
``state_dict`` keys. Each unit runs through ``functional.bn_relu_conv2d``;
a projection shortcut shares unit 1's batch statistics (one statistics pass,
one running-stat update) and the last unit adds the shortcut in its epilogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from . import functional, reference
from .functional import bn_relu_conv2d, resolve_backend


def _bn_momentum(bn: nn.BatchNorm2d) -> float:
    """nn.BatchNorm2d's momentum rule; counts the batch (call after validation)."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked)
    return 0.0 if bn.momentum is None else bn.momentum


def _running(bn: nn.BatchNorm2d) -> tuple[Optional[Tensor], Optional[Tensor]]:
    # track_running_stats=False, or buffers removed: batch statistics always.
    if not bn.track_running_stats:
        return None, None
    return bn.running_mean, bn.running_var


def _unit(name: str, bn: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor, backend: str,
          residual: Optional[Tensor] = None, batch: Optional[tuple[Tensor, Tensor]] = None,
          emit_stats: bool = False) -> tuple[Tensor, Optional[tuple[Tensor, Tensor]]]:
    """One unit on a concrete backend: (y, (mean, biased var) of y or None).
    ``batch``: x's batch statistics from the producer's epilogue, if any."""
    running_mean, running_var = _running(bn)
    # Every check that can fail runs before _bn_momentum counts the batch.
    functional.check_unit_inputs(name, x, conv.weight, bn.weight, bn.bias, running_mean, running_var, residual,
                                 bn.training or running_mean is None)
    if residual is not None and tuple(residual.shape) != functional.conv_output_shape(
            x, conv.weight, conv.stride[0], conv.padding[0]):
        raise ValueError(f"{name}: residual has shape {tuple(residual.shape)}, the convolution output has shape "
                         f"{functional.conv_output_shape(x, conv.weight, conv.stride[0], conv.padding[0])}")
    if backend == "torch":
        return bn_relu_conv2d(x, conv.weight, bn.weight, bn.bias, running_mean, running_var,
                              training=bn.training, momentum=_bn_momentum(bn), eps=bn.eps, stride=conv.stride[0],
                              padding=conv.padding[0], residual=residual, backend="torch", name=name), None
    x, residual = functional.autocast_inputs(x, residual)
    with torch.autocast(x.device.type, enabled=False):
        state, batch_stats = functional.prepare_bn(x, bn.weight, bn.bias, running_mean, running_var,
                                                   training=bn.training, momentum=_bn_momentum(bn), eps=bn.eps,
                                                   backend=backend, batch=batch)
        return functional.fused_unit(x, functional.unit_weight(conv.weight, x, backend), state, bn.weight, bn.bias,
                                     batch_stats, conv.stride[0], conv.padding[0], residual, backend, emit_stats)


def unit_decline_reason(bn: nn.Module, conv: nn.Module) -> Optional[str]:
    """Why a (BatchNorm2d, Conv2d) pair cannot run fused, or None."""
    if not isinstance(bn, nn.BatchNorm2d):
        return f"norm is {type(bn).__name__}, not BatchNorm2d"
    if not isinstance(conv, nn.Conv2d):
        return f"conv is {type(conv).__name__}, not Conv2d"
    if conv.groups != 1:
        return f"conv has groups={conv.groups}"
    if conv.dilation != (1, 1):
        return f"conv has dilation={conv.dilation}"
    if conv.bias is not None:
        return "conv has a bias"
    if conv.kernel_size not in ((1, 1), (3, 3)) or conv.padding != (conv.kernel_size[0] // 2,) * 2:
        return f"conv is {conv.kernel_size} with padding {conv.padding} (1x1/pad 0 and 3x3/pad 1 only)"
    if conv.stride[0] != conv.stride[1] or conv.padding_mode != "zeros":
        return "conv has an unsupported stride or padding mode"
    return None


class FusedBNReLUConv2d(nn.Module):
    """BatchNorm2d → ReLU → Conv2d as one fused unit; state_dict keys
    ``bn.*`` and ``conv.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride,
                              kernel_size // 2 if padding is None else padding, bias=False)
        self.backend = backend
        reason = unit_decline_reason(self.bn, self.conv)
        if reason:
            raise ValueError(f"FusedBNReLUConv2d: {reason}")

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _unit(type(self).__name__, self.bn, self.conv, x, resolve_backend(self.backend, x), residual)[0]


def _retype(module: nn.Module, cls: type, **attributes) -> nn.Module:
    """A new module of class ``cls`` holding ``module``'s very submodules,
    parameters and buffers (the same objects) and its other attributes."""
    new = cls.__new__(cls)
    new.__dict__.update(module.__dict__)
    for registry in ("_modules", "_parameters", "_buffers"):
        new.__dict__[registry] = module.__dict__[registry].copy()
    new.__dict__.update(attributes)
    return new


class _FusedPreActBlock(nn.Module):
    """Forward shared by the fused basic and bottleneck blocks."""

    reference_cls: type = reference.PreActBasicBlock
    backend: str = "auto"

    def _pairs(self) -> list[tuple[nn.BatchNorm2d, nn.Conv2d]]:
        n = 3 if hasattr(self, "conv3") else 2
        return [(getattr(self, f"bn{i}"), getattr(self, f"conv{i}")) for i in range(1, n + 1)]

    def forward(self, x: Tensor) -> Tensor:
        name = type(self).__name__
        backend = resolve_backend(self.backend, x)
        if backend == "torch":
            return self._forward_torch(x)
        # Statistics flow: on Triton each conv's epilogue emits the batch
        # statistics of its output, so the next BN needs no pass of its own.
        pairs = self._pairs()
        emit = backend == "triton" and any(bn.training or not bn.track_running_stats for bn, _ in pairs[1:])
        if hasattr(self, "shortcut"):
            out, stats, shortcut = self._first_unit_and_projection(name, x, backend, emit)
        else:
            (out, stats), shortcut = _unit(name, *pairs[0], x, backend, emit_stats=emit), x
        for bn, conv in pairs[1:-1]:
            out, stats = _unit(name, bn, conv, out, backend, batch=stats, emit_stats=emit)
        bn, conv = pairs[-1]
        return _unit(name, bn, conv, out, backend, residual=shortcut, batch=stats)[0]

    def _first_unit_and_projection(self, name: str, x: Tensor, backend: str, emit: bool):
        """Unit 1 and the projection read the same pre-activation relu(bn1(x)):
        one statistics pass and one running-stat update feed both convs."""
        bn1, conv1 = self._pairs()[0]
        running_mean, running_var = _running(bn1)
        batch_stats = bn1.training or running_mean is None
        for conv in (conv1, self.shortcut):
            functional.check_unit_inputs(name, x, conv.weight, bn1.weight, bn1.bias, running_mean, running_var,
                                         None, batch_stats)
        (x,) = functional.autocast_inputs(x)
        w1 = functional.unit_weight(conv1.weight, x, backend)
        ws = functional.unit_weight(self.shortcut.weight, x, backend)
        with torch.autocast(x.device.type, enabled=False):
            state, batch_stats = functional.prepare_bn(x, bn1.weight, bn1.bias, running_mean, running_var,
                                                       training=bn1.training, momentum=_bn_momentum(bn1),
                                                       eps=bn1.eps, backend=backend)
            out, stats = functional.fused_unit(x, w1, state, bn1.weight, bn1.bias, batch_stats, conv1.stride[0],
                                               conv1.padding[0], None, backend, emit)
            shortcut, _ = functional.fused_unit(x, ws, state, bn1.weight, bn1.bias, batch_stats,
                                                self.shortcut.stride[0], 0, None, backend)
        return out, stats, shortcut

    def _forward_torch(self, x: Tensor) -> Tensor:
        return reference._PreActBlockBase.forward(self, x)  # type: ignore[arg-type]

    @classmethod
    def decline_reason(cls, block: nn.Module) -> Optional[str]:
        """Why a reference block cannot be converted, or None."""
        if getattr(block, "placement", None) != "full_preact":
            return f"placement {getattr(block, 'placement', None)!r} (only 'full_preact' is fused)"
        if getattr(block, "variant", None) != "identity":
            return f"shortcut_type {block.shortcut_type!r} (identity and projection shortcuts only)"
        for bn, conv in cls._pairs(block):  # type: ignore[arg-type]
            reason = unit_decline_reason(bn, conv)
            if reason:
                return reason
        if hasattr(block, "shortcut"):
            reason = unit_decline_reason(block.bn1, block.shortcut)
            if reason:
                return "shortcut " + reason
        return None

    @classmethod
    def from_reference(cls, block: nn.Module, backend: str = "auto") -> "_FusedPreActBlock":
        """A fused block that reuses ``block``'s very submodules (so the same
        Parameter and buffer objects, and the same state_dict keys)."""
        return _retype(block, cls, backend=backend)

    def to_reference(self) -> nn.Module:
        """The reference block, sharing this block's submodules."""
        ref = _retype(self, self.reference_cls)
        del ref.backend
        return ref


class FusedPreActBasicBlock(_FusedPreActBlock, reference.PreActBasicBlock):
    """Fused ``reference.PreActBasicBlock`` (full pre-activation)."""

    reference_cls = reference.PreActBasicBlock

    def __init__(self, in_planes: int, planes: int, stride: int = 1, backend: str = "auto"):
        reference.PreActBasicBlock.__init__(self, in_planes, planes, stride)
        self.backend = backend


class FusedPreActBottleneck(_FusedPreActBlock, reference.PreActBottleneck):
    """Fused ``reference.PreActBottleneck`` (full pre-activation)."""

    reference_cls = reference.PreActBottleneck

    def __init__(self, in_planes: int, planes: int, stride: int = 1, backend: str = "auto",
                 stride_in_1x1: bool = False):
        reference.PreActBottleneck.__init__(self, in_planes, planes, stride, stride_in_1x1=stride_in_1x1)
        self.backend = backend


_FUSED_FOR = {reference.PreActBasicBlock: FusedPreActBasicBlock, reference.PreActBottleneck: FusedPreActBottleneck}


@dataclass
class ConversionReport:
    """What ``convert`` did: converted block paths and declined ones with why."""

    converted: list[str] = field(default_factory=list)
    declined: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"converted {len(self.converted)} block(s), declined {len(self.declined)}"]
        lines += [f"  {path}: {why}" for path, why in self.declined.items()]
        return "\n".join(lines)


def _replace(model: nn.Module, mapping: dict, backend: Optional[str], report: ConversionReport,
             inverse: bool) -> nn.Module:
    for path, module in list(model.named_modules()):
        cls = type(module)
        if cls not in mapping:
            continue
        if inverse:
            new = module.to_reference()
        else:
            reason = mapping[cls].decline_reason(module)
            if reason:
                report.declined[path or "."] = reason
                continue
            new = mapping[cls].from_reference(module, backend)
        report.converted.append(path or ".")
        if not path:
            return new
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    return model


def convert(model: nn.Module, backend: str = "auto", report: Optional[ConversionReport] = None) -> nn.Module:
    """Replaces, in place, every supported pre-activation block of ``model``
    by its fused twin, reusing the same parameters and buffers (optimizers
    and checkpoints keep working). Returns the model (a new object only when
    ``model`` itself is a block). Pass a ``ConversionReport`` to learn what was
    converted and what was declined and why."""
    if backend not in functional.BACKENDS:
        raise ValueError(f"backend must be one of {functional.BACKENDS}, got {backend!r}")
    return _replace(model, _FUSED_FOR, backend, report if report is not None else ConversionReport(), False)


def unconvert(model: nn.Module) -> nn.Module:
    """The inverse of ``convert``: fused blocks back to reference blocks."""
    inverse = {fused: fused for fused in _FUSED_FOR.values()}
    return _replace(model, inverse, None, ConversionReport(), True)
