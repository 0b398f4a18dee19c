"""Putting a sharded evaluation back together under DDP.

Evaluation loaders shard a dataset across ranks without padding (``ZooDataModule.eval_loader``: rank ``r``
takes items ``r, r + w, ...``), so the ranks hold different numbers of outputs. ``gather_by_index`` pads every
rank's share to the longest with index −1, all-gathers, drops the padding and sorts by dataset index: every rank
then holds every item exactly once, in dataset order, and computes the same metric as a single process would.
"""

from __future__ import annotations

import lightning as L
import torch

__all__ = ["gather_by_index", "all_reduce_mean"]


def gather_by_index(module: L.LightningModule, index: torch.Tensor, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """All ranks' ``(index, *tensors)`` rows in ascending ``index`` order; ``tensors`` share ``index``'s first
    dimension. Returns ``{"index": ..., **tensors}``. A single process (or no trainer) only sorts."""
    world = module.trainer.world_size if module._trainer is not None else 1
    if world > 1:
        longest = int(module.all_gather(torch.tensor(len(index), device=index.device)).max())
        pad = longest - len(index)
        index = module.all_gather(torch.cat([index, index.new_full((pad,), -1)])).flatten(0, 1)
        tensors = {k: module.all_gather(torch.cat([v, v.new_zeros(pad, *v.shape[1:])])).flatten(0, 1)
                   for k, v in tensors.items()}
        keep = index >= 0
        index, tensors = index[keep], {k: v[keep] for k, v in tensors.items()}
    order = index.argsort()
    return {"index": index[order], **{k: v[order] for k, v in tensors.items()}}


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over processes (itself without DDP): the papers normalise detection losses by the
    number of positives averaged over GPUs, so every process divides by the same count."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        return value / torch.distributed.get_world_size()
    return value.detach()
