"""GPU check: DDP's per-forward buffer broadcast vs a BatchNorm discriminator run twice before backward.

Two processes share one GPU over gloo (so rank 1 really receives rank 0's buffers). For each
setting of `broadcast_buffers`, every rank runs D(real), D(fake), then one backward, as the
training loop does, and prints what each rank saw. Usage: python benchmarks/check_bn_ddp.py true|false
"""

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train.networks.seed import SeedDiscriminator  # noqa: E402


def worker(rank: int, port: int, broadcast_buffers: bool, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(SeedDiscriminator().cuda(), device_ids=[0],
                                                      broadcast_buffers=broadcast_buffers)
    try:
        for _ in range(3):
            real, fake = torch.rand(64, 1, 28, 28, device="cuda"), torch.rand(64, 1, 28, 28, device="cuda")
            loss = torch.nn.functional.softplus(-model(real)).mean() + torch.nn.functional.softplus(model(fake)).mean()
            loss.backward()
        torch.cuda.synchronize()
        results[rank] = "ok"
    except Exception as error:  # noqa: BLE001 - report whatever the backward raised
        results[rank] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    dist.destroy_process_group()


if __name__ == "__main__":
    broadcast_buffers = sys.argv[1] == "true"
    with mp.Manager() as manager:
        results = manager.dict()
        try:
            mp.spawn(worker, args=(29600 + broadcast_buffers, broadcast_buffers, results), nprocs=2)
        finally:
            print(f"broadcast_buffers={broadcast_buffers}: "
                  + "; ".join(f"rank {r}: {results[r]}" for r in sorted(results)), flush=True)
