"""GPU check: the kernels one training step of the seed architecture spends its time in.

Runs the loop's D and G updates (batch 64, fp32) under torch.profiler, with the native bilinear
upsampling + convolution and with the fused matrix-product form, and prints the top kernels of each.
Usage: python benchmarks/profile_step.py [steps]
"""

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from train import losses, models  # noqa: E402
from train.networks import NetworkOptions  # noqa: E402


def step(generator, discriminator, g_optimizer, d_optimizer, real):
    fake = generator(torch.randn(64, 100, device="cuda"))
    discriminator.requires_grad_(True)
    d_loss = losses.load("bce").discriminator(discriminator(real), discriminator(fake.detach()))
    d_optimizer.zero_grad(set_to_none=True)
    d_loss.backward()
    d_optimizer.step()
    discriminator.requires_grad_(False)
    g_loss = losses.load("bce").generator(discriminator(fake))
    g_optimizer.zero_grad(set_to_none=True)
    g_loss.backward()
    g_optimizer.step()


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    for upsample in ("native", "fused"):
        torch.manual_seed(0)
        networks = models.build("seed", 100, options=NetworkOptions(upsample=upsample))
        generator, discriminator = (m.cuda() for m in networks)
        optimizers = [torch.optim.Adam(m.parameters(), lr=1e-3, amsgrad=True, fused=True)
                      for m in (generator, discriminator)]
        real = torch.rand(64, 1, 28, 28, device="cuda")
        for _ in range(10):
            step(generator, discriminator, *optimizers, real)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step(generator, discriminator, *optimizers, real)
            torch.cuda.synchronize()
        print(f"=== upsample={upsample}: top CUDA kernels over {steps} steps ===")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
