"""Drop-in fused modules and ``convert()``.

``FusedBNReLUConv2d`` replaces ``nn.Sequential(BatchNorm2d, ReLU, Conv2d)``;
``FusedPreActBasicBlock`` / ``FusedPreActBottleneck`` replace the reference
blocks of ``fused_preact.reference`` (full pre-activation, identity or
projection shortcut) with the same constructor arguments and the same
``state_dict`` keys. Their forward, and that of every other block class
``convert`` knows (timm's resnetv2 blocks, ``register_block``), is the one in
``blocks.py``: each unit runs as one fused op, a projection shortcut shares
unit 1's batch statistics (one statistics pass, one running-stat update),
and the last unit adds the shortcut in its epilogue. ``convert``/``unconvert``
swap classes in place, keeping the very same submodules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from . import blocks, functional, reference
from .blocks import unit_decline_reason
from .functional import bn_relu_conv2d, resolve_backend


def _bn_momentum(bn: nn.BatchNorm2d, defer_count: bool = False) -> tuple[float, Optional[Tensor]]:
    """nn.BatchNorm2d's momentum rule, and the batch counted (call after
    validation): (momentum, None). With ``defer_count`` and a fixed momentum:
    (momentum, bn.num_batches_tracked), for ``functional.prepare_bn`` to
    count (on Triton the finalize launch adds the 1: no launch of its own);
    momentum=None (a cumulative average) needs the count here, on the host."""
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        if defer_count and bn.momentum is not None:
            return bn.momentum, bn.num_batches_tracked
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            return 1.0 / float(bn.num_batches_tracked), None
    return (0.0 if bn.momentum is None else bn.momentum), None


def _running(bn: nn.BatchNorm2d) -> tuple[Optional[Tensor], Optional[Tensor]]:
    # track_running_stats=False, or buffers removed: batch statistics always.
    if not bn.track_running_stats:
        return None, None
    return bn.running_mean, bn.running_var


def _unit(name: str, bn: nn.BatchNorm2d, conv: nn.Conv2d, x: Tensor, backend: str,
          residual: Optional[Tensor] = None, batch: Optional[Tensor] = None,
          emit_stats: bool = False, sync: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """One unit on a concrete backend: (y, y's emitted batch statistics or
    None; see ``functional.fused_unit``). ``batch``: x's, from the
    producer's epilogue, if any. ``sync``: synchronized BatchNorm."""
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
                              training=bn.training, momentum=_bn_momentum(bn)[0], eps=bn.eps, stride=conv.stride[0],
                              padding=conv.padding[0], residual=residual, backend="torch", name=name), None
    x, residual = functional.autocast_inputs(x, residual)
    momentum, batches_tracked = _bn_momentum(bn, defer_count=True)
    with functional.autocast_off(x.device.type):
        state, batch_stats = functional.prepare_bn(x, bn.weight, bn.bias, running_mean, running_var,
                                                   training=bn.training, momentum=momentum, eps=bn.eps,
                                                   backend=backend, batch=batch, sync=sync,
                                                   batches_tracked=batches_tracked)
        return functional.fused_unit(x, functional.unit_weight(conv.weight, x, backend), state, bn.weight, bn.bias,
                                     batch_stats, conv.stride[0], conv.padding[0], residual, backend, emit_stats)


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
        return _unit(type(self).__name__, self.bn, self.conv, x, resolve_backend(self.backend, x), residual,
                     sync=getattr(self, "sync_bn", False))[0]


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

    def _spec(self) -> blocks.BlockSpec:
        return _REFERENCE_SPECS[3 if hasattr(self, "conv3") else 2]

    def forward(self, x: Tensor) -> Tensor:
        backend = resolve_backend(self.backend, x)
        if backend == "torch":
            return self._forward_torch(x)
        return blocks.fused_block_forward(self, self._spec(), backend, x)

    def _forward_torch(self, x: Tensor) -> Tensor:
        return reference._PreActBlockBase.forward(self, x)  # type: ignore[arg-type]

    @classmethod
    def decline_reason(cls, block: nn.Module) -> Optional[str]:
        """Why a reference block cannot be converted, or None."""
        if getattr(block, "placement", None) != "full_preact":
            return f"placement {getattr(block, 'placement', None)!r} (only 'full_preact' is fused)"
        if getattr(block, "variant", None) != "identity":
            return f"shortcut_type {block.shortcut_type!r} (identity and projection shortcuts only)"
        spec = _REFERENCE_SPECS[3 if hasattr(block, "conv3") else 2]
        return blocks.decline_reason(block, spec)

    @classmethod
    def from_reference(cls, block: nn.Module, backend: str = "auto") -> "_FusedPreActBlock":
        """A fused block that reuses ``block``'s very submodules (so the same
        Parameter and buffer objects, and the same state_dict keys)."""
        return _retype(block, cls, backend=backend)

    def to_reference(self) -> nn.Module:
        """The reference block, sharing this block's submodules."""
        ref = _retype(self, self.reference_cls)
        del ref.backend
        ref.__dict__.pop("sync_bn", None)
        return ref


_REFERENCE_SPECS = {
    n: blocks.BlockSpec(tuple((f"bn{i}", f"conv{i}") for i in range(1, n + 1)), projection="shortcut")
    for n in (2, 3)
}


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


def _replace(model: nn.Module, backend: Optional[str], report: ConversionReport, inverse: bool) -> nn.Module:
    for path, module in list(model.named_modules()):
        cls = type(module)
        if inverse:
            if cls in _FUSED_FOR.values():
                new = module.to_reference()
            elif getattr(cls, "_fused_original_cls", None) is not None and cls is blocks.fused_class(
                    cls._fused_original_cls):
                new = _retype(module, cls._fused_original_cls)
                for attr in ("_fused_backend", "_fused_spec", "sync_bn"):
                    new.__dict__.pop(attr, None)
            else:
                continue
        elif cls in _FUSED_FOR:
            reason = _FUSED_FOR[cls].decline_reason(module)
            if reason:
                report.declined[path or "."] = reason
                continue
            new = _FUSED_FOR[cls].from_reference(module, backend)
        else:
            spec = blocks.spec_for(cls)
            if spec is None:
                continue
            reason = blocks.decline_reason(module, spec)
            if reason:
                report.declined[path or "."] = f"{cls.__name__}: {reason}"
                continue
            new = _retype(module, blocks.fused_class(cls), _fused_backend=backend, _fused_spec=spec)
        report.converted.append(path or ".")
        if not path:
            return new
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, new)
    return model


def convert(model: nn.Module, backend: str = "auto", report: Optional[ConversionReport] = None,
            sync_bn: bool = False) -> nn.Module:
    """Replaces, in place, every supported pre-activation block of ``model``
    by its fused twin, reusing the same parameters and buffers (optimizers
    and checkpoints keep working): the reference blocks, timm's resnetv2
    ``PreActBottleneck``/``PreActBasic`` with BatchNorm, and classes described
    with ``register_block``. Returns the model (a new object only when
    ``model`` itself is a block). Pass a ``ConversionReport`` to learn what
    was converted and what was declined and why; the summary is also logged
    (logger ``fused_preact``). ``sync_bn=True``: the converted blocks
    synchronise their batch statistics over the default torch.distributed
    process group, like ``nn.SyncBatchNorm`` (native and triton backends)."""
    if backend not in functional.BACKENDS:
        raise ValueError(f"backend must be one of {functional.BACKENDS}, got {backend!r}")
    report = report if report is not None else ConversionReport()
    model = _replace(model, backend, report, False)
    for path in report.converted:
        block = model if path == "." else model.get_submodule(path)
        block.sync_bn = sync_bn
    logging.getLogger("fused_preact").info("convert: %s", report)
    return model


def unconvert(model: nn.Module) -> nn.Module:
    """The inverse of ``convert``: fused blocks back to their original classes
    (the same submodules)."""
    return _replace(model, None, ConversionReport(), True)
