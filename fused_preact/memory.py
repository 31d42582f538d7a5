"""Counting what autograd keeps for backward (the activation memory that
fusion saves), with ``torch.autograd.graph.saved_tensors_hooks``."""

from __future__ import annotations

from typing import Callable

import torch


def saved_tensor_bytes(step: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves while ``step()`` runs its
    forward. A storage saved by several ops (ReLU's output that the next conv
    also saves) is counted once; parameters count like any saved tensor."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        if t.device.type != "meta" and t.numel() > 0:
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())
