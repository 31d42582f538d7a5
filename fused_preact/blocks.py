"""Block specifications: which attributes of a pre-activation block are its
(BatchNorm, conv) units, what its shortcut is, and the one fused forward
that runs any block so described.

A full pre-activation block computes

    a1 = relu(norm1(x));  out = conv1(a1)
    out = conv_i(relu(norm_i(out)))           for the next units
    shortcut = x, or proj(pool(a1))           (projection on the pre-activation)
    y = post(out) + shortcut                  (post: DropPath or identity)

``BlockSpec`` names those pieces by attribute path. The fused forward runs
each unit as one fused op (``functional.fused_unit``), shares unit 1's
statistics and pre-activation with the projection, lets each conv's epilogue
emit the next BatchNorm's statistics (Triton), and adds the shortcut in the
last conv's epilogue unless a DropPath must act in between.

Built-in specs: ``fused_preact.reference`` blocks, timm's ``PreActBottleneck``
and ``PreActBasic`` (``resnetv2_*`` with BatchNorm). Users describe their own
block class with ``register_block`` (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import functional
from .functional import resolve_backend


@dataclass(frozen=True)
class BlockSpec:
    """How a block class is built (attribute paths, "" for absent).

    units:       (norm, conv) attribute paths in order; the block applies ReLU
                 after each norm (or the norm is a norm+act module whose ``act``
                 is ReLU, like timm's BatchNormAct2d)
    projection:  conv applied to unit 1's pre-activation for the shortcut;
                 "" or a missing attribute: identity shortcut
    projection_pool: an average pool applied before the projection conv
                 (timm's "d" models); it commutes with a 1x1 conv, so the fused
                 path pools after the conv
    projection_norm: a module after the projection conv that must be Identity
    post:        a module applied to the residual branch before the addition
                 (DropPath); Identity, or applied unfused while training
    """

    units: tuple[tuple[str, str], ...]
    projection: str = ""
    projection_pool: str = ""
    projection_norm: str = ""
    post: str = ""
    extra_check: Optional[Callable[[nn.Module], Optional[str]]] = field(default=None, compare=False)


def _get(module: nn.Module, path: str) -> Optional[nn.Module]:
    if not path:
        return None
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module


def _is_identity(m: Optional[nn.Module]) -> bool:
    return m is None or isinstance(m, nn.Identity)


def unit_decline_reason(norm: nn.Module, conv: nn.Module) -> Optional[str]:
    """Why a (norm, conv) pair cannot run fused, or None."""
    if not isinstance(norm, nn.BatchNorm2d):
        return f"norm is {type(norm).__name__}, not BatchNorm2d"
    act = getattr(norm, "act", None)
    if act is not None and not isinstance(act, nn.ReLU):
        return f"norm's activation is {type(act).__name__}, not ReLU"
    if not _is_identity(getattr(norm, "drop", None)):
        return f"norm has a {type(norm.drop).__name__} before its activation"
    if type(conv) is not nn.Conv2d:
        return f"conv is {type(conv).__name__}, not a plain Conv2d (e.g. weight standardisation)"
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


def decline_reason(block: nn.Module, spec: BlockSpec) -> Optional[str]:
    """Why ``block`` cannot run fused under ``spec``, or None."""
    if spec.extra_check is not None:
        reason = spec.extra_check(block)
        if reason:
            return reason
    units = [(_get(block, n), _get(block, c)) for n, c in spec.units]
    for (norm_path, conv_path), (norm, conv) in zip(spec.units, units):
        if norm is None or conv is None:
            return f"missing {norm_path if norm is None else conv_path}"
        reason = unit_decline_reason(norm, conv)
        if reason:
            return f"{conv_path}: {reason}"
    proj = _get(block, spec.projection)
    if proj is not None:
        reason = unit_decline_reason(units[0][0], proj)
        if reason:
            return f"{spec.projection}: {reason}"
        if proj.kernel_size != (1, 1):
            return f"{spec.projection} is not a 1x1 conv"
        pool = _get(block, spec.projection_pool)
        if not _is_identity(pool):
            if not isinstance(pool, nn.AvgPool2d) or pool.padding not in (0, (0, 0)):
                return f"{spec.projection_pool} is {pool!r} (average pooling without padding only)"
        if not _is_identity(_get(block, spec.projection_norm)):
            return f"{spec.projection_norm} is not Identity (a norm after the projection)"
    return None


# A block's output carries the batch statistics its last epilogue computed
# (Triton), as (per-tile moments [2, T, C], the tensor's version counter):
# the next block uses them instead of a statistics pass over its input,
# unless the tensor was modified in place since (the version counter moved)
# or we are being traced by torch.compile (tensor attributes do not trace).
_MOMENTS_ATTR = "_fused_preact_moments"


def _incoming_moments(x: Tensor, backend: str) -> Optional[Tensor]:
    if backend != "triton" or torch.compiler.is_compiling():
        return None
    carried = getattr(x, _MOMENTS_ATTR, None)
    if carried is None:
        return None
    stats, version = carried
    if version != x._version or stats.device != x.device or x.dim() != 4:
        return None
    from .triton_launch import moments_shape

    return stats if tuple(stats.shape) == moments_shape(x) else None  # else not x's tiles (set by hand?)


def fused_block_forward(block: nn.Module, spec: BlockSpec, backend: str, x: Tensor) -> Tensor:
    """``block``'s forward, fused (backend already resolved, not "torch")."""
    from .modules import _bn_momentum, _running, _unit  # the per-unit checks, momentum rule, statistics

    name = type(block).__name__
    sync = bool(getattr(block, "sync_bn", False))
    units = [(_get(block, n), _get(block, c)) for n, c in spec.units]
    proj = _get(block, spec.projection)
    post = _get(block, spec.post)
    post_unfused = not _is_identity(post) and post.training
    # Statistics flow: on Triton each conv's epilogue emits the batch
    # statistics of its output, so the next BN needs no pass of its own;
    # the last one's travel with the block's output to the next block.
    batch_mode = any(n.training or not n.track_running_stats for n, _ in units)
    emit = backend == "triton" and batch_mode and not sync  # sync_bn: statistics are global, recomputed
    emit_out = emit and not post_unfused and not torch.compiler.is_compiling()
    incoming = _incoming_moments(x, backend) if not sync else None
    if proj is None:
        out, stats = _unit(name, *units[0], x, backend, batch=incoming, emit_stats=emit and len(units) > 1,
                           sync=sync)
        shortcut = x
    else:
        # Unit 1 and the projection read the same pre-activation relu(norm1(x)):
        # one statistics pass and one running-stat update feed both convs.
        norm1, conv1 = units[0]
        running_mean, running_var = _running(norm1)
        batch_stats = norm1.training or running_mean is None
        for conv in (conv1, proj):
            functional.check_unit_inputs(name, x, conv.weight, norm1.weight, norm1.bias, running_mean, running_var,
                                         None, batch_stats)
        (x,) = functional.autocast_inputs(x)
        momentum, batches_tracked = _bn_momentum(norm1, defer_count=True)
        with functional.autocast_off(x.device.type):
            state, batch_stats = functional.prepare_bn(x, norm1.weight, norm1.bias, running_mean, running_var,
                                                       training=norm1.training, momentum=momentum, eps=norm1.eps,
                                                       backend=backend, batch=incoming, sync=sync,
                                                       batches_tracked=batches_tracked)
            out, stats = functional.fused_unit(x, functional.unit_weight(conv1.weight, x, backend), state,
                                               norm1.weight, norm1.bias, batch_stats, conv1.stride[0],
                                               conv1.padding[0], None, backend, emit and len(units) > 1)
            shortcut, _ = functional.fused_unit(x, functional.unit_weight(proj.weight, x, backend), state,
                                                norm1.weight, norm1.bias, batch_stats, proj.stride[0], 0, None,
                                                backend)
        pool = _get(block, spec.projection_pool)
        if not _is_identity(pool):
            shortcut = pool(shortcut)  # avg pool and a 1x1 conv commute: pooling after the conv is exact
    if len(units) == 1:  # a one-unit block: the residual add is not fused here
        return (post(out) if post_unfused else out) + shortcut
    for norm, conv in units[1:-1]:
        out, stats = _unit(name, norm, conv, out, backend, batch=stats, emit_stats=emit, sync=sync)
    norm, conv = units[-1]
    if post_unfused:
        out, _ = _unit(name, norm, conv, out, backend, batch=stats, sync=sync)
        return post(out) + shortcut
    y, y_stats = _unit(name, norm, conv, out, backend, residual=shortcut, batch=stats, emit_stats=emit_out,
                       sync=sync)
    if y_stats is not None:
        setattr(y, _MOMENTS_ATTR, (y_stats, y._version))
    return y


# ------------------------------------------------------------------ registry

_SPECS: dict[type, BlockSpec] = {}
_SPECS_BY_NAME: dict[tuple[str, str], BlockSpec] = {}


def register_block(cls: type, units, projection: str = "", projection_pool: str = "", projection_norm: str = "",
                   post: str = "", extra_check: Optional[Callable[[nn.Module], Optional[str]]] = None) -> BlockSpec:
    """Tells ``convert`` how to fuse blocks of class ``cls`` (exact class).

    ``units``: the (norm, conv) attribute paths in order; the block must
    compute ``conv_i(relu(norm_i(...)))`` for each, feeding the next unit.
    ``projection``: the 1x1 conv of a projection shortcut, applied to unit
    1's pre-activation ``relu(norm_1(x))``; when the attribute is absent on a
    block (identity blocks), the shortcut is x. The block adds the branch and
    the shortcut last. ``post``: a module on the branch before the addition
    (DropPath). By registering you assert that the block's forward is this
    computation; ``convert`` then checks every unit's norm and conv and
    declines (with the reason) what it cannot fuse. Example, the widely copied
    CIFAR ``PreActBlock`` (``bn1/conv1/bn2/conv2/shortcut``)::

        fused_preact.register_block(PreActBlock, units=[("bn1", "conv1"), ("bn2", "conv2")],
                                    projection="shortcut.0")

    and the paper's Torch CIFAR bottleneck with the stride on its first 1x1
    conv needs nothing special: the stride is read from each conv.
    """
    spec = BlockSpec(tuple(tuple(u) for u in units), projection, projection_pool, projection_norm, post,
                     extra_check)
    _SPECS[cls] = spec
    return spec


def unregister_block(cls: type) -> None:
    _SPECS.pop(cls, None)


def spec_for(cls: type) -> Optional[BlockSpec]:
    """The registered spec of ``cls``, including the built-in ones known by
    module and class name (timm is not imported to register them)."""
    if cls in _SPECS:
        return _SPECS[cls]
    return _SPECS_BY_NAME.get((cls.__module__, cls.__qualname__))


_TIMM_BOTTLENECK = BlockSpec((("norm1", "conv1"), ("norm2", "conv2"), ("norm3", "conv3")),
                             projection="downsample.conv", projection_pool="downsample.pool",
                             projection_norm="downsample.norm", post="drop_path")
_TIMM_BASIC = BlockSpec((("norm1", "conv1"), ("norm2", "conv2")), projection="downsample.conv",
                        projection_pool="downsample.pool", projection_norm="downsample.norm", post="drop_path")
_SPECS_BY_NAME[("timm.models.resnetv2", "PreActBottleneck")] = _TIMM_BOTTLENECK
_SPECS_BY_NAME[("timm.models.resnetv2", "PreActBasic")] = _TIMM_BASIC


# ------------------------------------------------------------- conversion

_FUSED_CLASSES: dict[type, type] = {}


def _forward(self, x: Tensor) -> Tensor:
    backend = resolve_backend(self._fused_backend, x)
    if backend == "torch":
        return self._fused_original_cls.forward(self, x)
    return fused_block_forward(self, self._fused_spec, backend, x)


def fused_class(cls: type) -> type:
    """A subclass of ``cls`` whose forward is the fused one (cached)."""
    if cls not in _FUSED_CLASSES:
        _FUSED_CLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": _forward, "_fused_original_cls": cls,
            "__doc__": f"{cls.__name__} running fused (fused_preact.convert); same submodules and state_dict keys.",
            "__module__": __name__,
        })
    return _FUSED_CLASSES[cls]
