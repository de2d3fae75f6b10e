"""Collectives that let the MSN loss see the global batch of all ranks.

MSN [0] computes two statistics over the whole batch rather than per sample: the
Sinkhorn normalisation of the target probabilities and the mean prediction used by
the ME-MAX regulariser. With data parallel training each rank only holds a slice of
the batch, so both statistics need a collective. The helpers here are used by
``lightly_msn.loss``; they are no-ops when ``gather_distributed`` is False or when
``torch.distributed`` is not initialised, so the same code runs in one process.

- [0]: Masked Siamese Networks, 2022, https://arxiv.org/abs/2204.07141
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from lightly.utils import dist as lightly_dist
from torch import Tensor


def world_size(gather_distributed: bool) -> int:
    """Number of ranks the loss statistics are computed over.

    Args:
        gather_distributed:
            Whether statistics should be computed over all ranks.

    Returns:
        The world size of the default process group if ``gather_distributed`` is
        True and ``torch.distributed`` is initialised, otherwise 1.
    """
    if not gather_distributed:
        return 1
    return lightly_dist.world_size()


@torch.no_grad()
def all_reduce_mean(tensor: Tensor, gather_distributed: bool) -> Tensor:
    """Averages a tensor over all ranks (out of place, no gradient).

    Used for the ME-MAX mean prediction. The loss treats the averaged value as if
    its backward pass were the identity, as the official implementation does
    (``AllReduce`` in its ``src/utils.py``). That is exact under data parallel
    training: every rank computes the same regulariser ``R(mean_prediction)``, so
    the gradient arriving at the all-reduce, ``g = dR/d mean_prediction``, is the
    same on all ranks. The true gradient of the global objective with respect to a
    rank's local mean is ``g / world_size``; the identity backward returns ``g``
    and DDP then divides the summed parameter gradients by ``world_size``, which
    yields exactly the gradient of the single-process loss on the global batch.
    A backward collective would therefore add communication without changing the
    result.

    Args:
        tensor:
            Any tensor, identical in shape on all ranks.
        gather_distributed:
            Whether to average over all ranks; if False the tensor is returned
            unchanged.

    Returns:
        The mean of ``tensor`` over all ranks.
    """
    size = world_size(gather_distributed)
    if size == 1:
        return tensor
    averaged = tensor / size
    dist.all_reduce(averaged)
    return averaged


@torch.no_grad()
def logsumexp_over_ranks(tensor: Tensor, dim: int, gather_distributed: bool) -> Tensor:
    """Log-sum-exp along ``dim`` over the rows of all ranks, with ``keepdim=True``.

    Each rank reduces its own rows first, then the per-rank results (one value per
    remaining entry) are gathered and combined with a second log-sum-exp, so the
    result is exact and finite even when every ``exp`` would underflow. Only one
    collective is needed. Slices that are entirely ``-inf`` give ``-inf``.

    Args:
        tensor:
            Tensor of finite values or ``-inf``, whose dimension ``dim`` is split
            across ranks.
        dim:
            Dimension to reduce; it is the batch dimension in the loss.
        gather_distributed:
            Whether to reduce over all ranks or only locally.

    Returns:
        The log-sum-exp with ``dim`` kept as size 1.
    """
    local = _logsumexp(tensor, dim)
    size = world_size(gather_distributed)
    if size == 1:
        return local
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local.contiguous())
    return _logsumexp(torch.cat(gathered, dim=dim), dim)


def _logsumexp(tensor: Tensor, dim: int) -> Tensor:
    # Same result as torch.logsumexp for finite or -inf entries, in fewer kernels
    # (it runs every Sinkhorn step, and small kernels dominate on busy CPUs).
    shift = tensor.amax(dim=dim, keepdim=True).nan_to_num_(neginf=0.0)
    summed = (tensor - shift).exp_().sum(dim=dim, keepdim=True)
    return summed.log_().add_(shift)
