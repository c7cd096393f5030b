"""What the loop needs from torch.distributed beyond what Accelerate does for it."""

from __future__ import annotations

import hashlib
import sys
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


def share_buffers(networks: dict[str, nn.Module], ema) -> None:
    """Rank 0's BatchNorm statistics on every rank, before sampling or saving; the EMA generator's are measured
    from its own weights (train/ema.py), the same on every rank, and rank 0's kept should a kernel differ.
    A collective."""
    sync_buffers_from_main(networks["generator"])
    sync_buffers_from_main(networks["discriminator"])
    ema.measure_statistics()
    sync_buffers_from_main(ema.network)


def weights_digest(state_dicts: dict[str, dict[str, torch.Tensor]]) -> str:
    """SHA-256 over every tensor's bytes, in sorted order: equal digests mean bitwise-equal weights."""
    digest = hashlib.sha256()
    for network in sorted(state_dicts):
        for key in sorted(state_dicts[network]):
            tensor = state_dicts[network][key].detach().cpu().contiguous().reshape(-1)
            digest.update(f"{network}.{key}:{tensor.dtype}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_ranks_agree(networks: dict[str, nn.Module], rank: int) -> str:
    """Every rank's weights digest, printed by the main process; raises if they differ (DDP keeps them equal).

    The ranks' digests are gathered and written in one write by rank 0: ranks printing their own
    lines to a shared stdout (one Slurm log) can interleave them mid-line.
    """
    digest = weights_digest({name: network.state_dict() for name, network in networks.items()})
    digests = [digest]
    if is_distributed():
        digests = [None] * dist.get_world_size()
        dist.all_gather_object(digests, digest)
    if rank == 0:
        sys.stdout.write("".join(f"rank {r}: final weights sha256 {d}\n" for r, d in enumerate(digests)))
        sys.stdout.flush()
    if len(set(digests)) > 1:
        raise RuntimeError(f"the ranks ended with different weights: {digests}; please report this as a bug")
    return digest
