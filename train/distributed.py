"""What the loop needs from torch.distributed beyond what Accelerate does for it."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn


def ddp_without_forward_buffer_sync() -> DistributedDataParallelKwargs:
    """DDP without the buffer broadcast that DDP does before every forward by default.

    A GAN step runs the BatchNorm discriminator twice (real, then fake) before one backward. The
    default broadcast copies rank 0's running statistics in place between the two forwards, which
    cuDNN's BatchNorm backward rejects on CUDA (pytorch/pytorch#110363). Turning it off removes
    the hazard by construction; `sync_buffers_from_main` restores rank 0's statistics wherever
    they are used. torch 2.14 deprecates `broadcast_buffers` for `forward_sync_buffers`, but
    Accelerate passes only the former, and `broadcast_buffers=False` is the one spelling that
    every supported torch reads the same way (no sync at init, none before forwards).
    """
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    return DistributedDataParallelKwargs(broadcast_buffers=False)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sync_buffers_from_main(module: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), as DDP's default would.

    Training-mode BatchNorm normalises with batch statistics, so running statistics never change
    what is trained; they matter for eval-mode sampling and for what is saved. Each rank tracks
    them from its own shard; rank 0's values are the ones DDP's default broadcast would have left.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
