"""fused_preact: fused BN + ReLU + convolution for pre-activation ResNets.

``import fused_preact`` works with no GPU, no Triton and no compiled
extension; ``fused_preact.backends()`` reports what is available and why not.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import _extension, reference
from .blocks import BlockSpec, register_block, unregister_block
from .functional import bn_relu_conv2d
from .modules import (
    ConversionReport,
    FusedBNReLUConv2d,
    FusedPreActBasicBlock,
    FusedPreActBottleneck,
    convert,
    unconvert,
)
from .reference import PreActBasicBlock, PreActBottleneck, preact_resnet_cifar, preact_resnet_imagenet

__version__ = "0.1.0"

if _extension.load():
    from . import native  # noqa: F401  (registers fake kernels and autograd of the C++ ops)

__all__ = [
    "BlockSpec",
    "ConversionReport",
    "FusedBNReLUConv2d",
    "FusedPreActBasicBlock",
    "FusedPreActBottleneck",
    "PreActBasicBlock",
    "PreActBottleneck",
    "backends",
    "bn_relu_conv2d",
    "convert",
    "preact_resnet_cifar",
    "preact_resnet_imagenet",
    "reference",
    "register_block",
    "unconvert",
    "unregister_block",
]


def backends() -> dict[str, dict[str, object]]:
    """What each backend can run here: {name: {"available": bool, "devices": [...], "reason": str}}."""
    report: dict[str, dict[str, object]] = {
        "torch": {"available": True, "devices": ["cpu", "cuda"], "reason": "plain PyTorch composition"},
    }
    if _extension.load():
        devices = ["cpu"] + (["cuda"] if _extension.has_cuda_kernels() else [])
        why = "fused_preact._C built" + ("" if "cuda" in devices else " without CUDA kernels (CPU only)")
        if "cuda" in devices and not torch.cuda.is_available():
            why += "; no CUDA device visible here"
        report["native"] = {"available": True, "devices": devices, "reason": why}
    else:
        report["native"] = {"available": False, "devices": [], "reason": _extension.error()}
    if importlib.util.find_spec("triton") is None:
        report["triton"] = {"available": False, "devices": [], "reason": "triton is not installed"}
    else:
        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        devices = ["cuda"] + (["cpu"] if interpret else [])
        why = "Triton kernels (implicit-GEMM conv with BN+ReLU prologue and residual/statistics epilogue)"
        why += "; CPU tensors under TRITON_INTERPRET=1" if interpret else "; CPU tensors only under TRITON_INTERPRET=1"
        if not torch.cuda.is_available():
            why += "; no CUDA device visible here"
        report["triton"] = {"available": True, "devices": devices, "reason": why}
    return report
