"""Synchronized batch statistics for the fused units (``convert(...,
sync_bn=True)``), over the default ``torch.distributed`` process group, with
``nn.SyncBatchNorm``'s semantics: the forward normalises with the statistics
of the whole global batch, the backward reduces the two per-channel sums
(sum gz, sum gz*(x - mean)) over all processes and divides by the global
count. Parameter gradients stay local (DistributedDataParallel averages
them), so N processes with 1/N of the batch each reproduce one process with
the whole batch.

The statistics are exchanged as (count, mean, M2) and merged with Chan's
formula, like the kernels' own partials: no sum(x^2) - M*mean^2.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def active() -> bool:
    """True when there is more than one process to synchronise with."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_moments(mean: Tensor, var: Tensor, count: int) -> tuple[Tensor, Tensor, int]:
    """(mean, biased var, count) of the global batch from each process's own."""
    world = dist.get_world_size()
    mine = torch.stack((torch.full_like(mean, float(count)), mean, var * count))  # count, mean, M2
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine.contiguous())
    counts, means, m2s = torch.stack(gathered).unbind(1)
    total = counts.sum(0)
    g_mean = (counts * means).sum(0) / total
    g_m2 = m2s.sum(0) + (counts * (means - g_mean) ** 2).sum(0)
    return g_mean, g_m2 / total, int(total[0].item()) if total.numel() else 0


def all_reduce_sum(*tensors: Tensor) -> list[Tensor]:
    flat = torch.stack(tensors)
    dist.all_reduce(flat)
    return list(flat.unbind(0))


def backward_constants(grad_gamma: Tensor, grad_beta: Tensor, mean: Tensor, invstd: Tensor, scale: Tensor,
                       global_count: int) -> tuple[Tensor, Tensor]:
    """(k1, k0) of gx = gz*scale + x*k1 + k0 from the all-reduced gamma/beta
    gradients (sum gz*xhat, sum gz) and the global count: the BatchNorm
    backward's constants over the global batch (both backends)."""
    k1 = -scale * grad_gamma * invstd / global_count
    return k1, -scale * grad_beta / global_count - k1 * mean
