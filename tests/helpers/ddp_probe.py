"""Run by test_distributed under `accelerate launch --cpu --num_processes 2`.

Drives the loop's own step phases (train/step.py) while a DDP communication hook counts the all-reduces of
each network in each phase, then writes this rank's weights, buffers, shard and counts to OUT.
Usage: ddp_probe.py OUT key=value ...
"""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from train import config, loop, losses, models, regularisation, setup
from train.data import sharding, sources
from train.distributed import share_buffers
from train.ema import GeneratorEMA
from train.faults import FaultMonitor
from train.step import GANStep, Players
from train.tracking import TrainingWindow

out, overrides = Path(sys.argv[1]), sys.argv[2:]
cfg = config.load(None, overrides)
accelerator, cfg = setup.set_up(cfg, resume_from=None)
dataset = sources.load(cfg.data)
batches = sharding.ShardedBatches(dataset.images, cfg.data.batch_size, accelerator.process_index,
                              accelerator.num_processes, cfg.run.seed, accelerator.device)
faults = FaultMonitor("stop", accelerator.device, check_gradients=True, check_every=cfg.train.steps,
                      timeout_s=cfg.train.timeout_s)
generator, discriminator, g_optimizer, d_optimizer = accelerator.prepare(*loop.build_networks(cfg, dataset.spec))

phase = "setup"
allreduces = {f"{network}/{p}": 0 for network in ("generator", "discriminator") for p in ("d_step", "g_step")}


def counting(network):
    def hook(state, bucket):
        allreduces[f"{network}/{phase}"] += 1
        return allreduce_hook(state, bucket)
    return hook


ema = GeneratorEMA(models.build_generator(cfg.model.arch, cfg.model.z_dim), accelerator.unwrap_model(generator), 500,
                   0.05, cfg.ema.statistics_images)
loss = losses.load(cfg.loss.kind)
gan = GANStep(accelerator, Players(generator, discriminator, g_optimizer, d_optimizer), loss, ema, batches,
              faults=faults, window=TrainingWindow(accelerator.device, loss), z_dim=cfg.model.z_dim, num_classes=0)
generator.register_comm_hook(None, counting("generator"))
discriminator.register_comm_hook(None, counting("discriminator"))
shard = batches.epoch_indices.clone()
noise = torch.Generator().manual_seed(1000 + accelerator.process_index)
for step in range(cfg.train.steps):
    real, _ = batches.next()
    z = torch.randn(real.shape[0], cfg.model.z_dim, generator=noise)
    phase = "d_step"
    fake = generator(z)
    r1_weight = regularisation.r1_weight(cfg.loss.r1_gamma, cfg.loss.r1_every, step + 1)
    gan.real.copy_(real)
    gan.update_discriminator(fake, r1_weight)
    phase = "g_step"
    gan.update_generator(fake)
    ema.set_weight((step + 1) * batches.global_batch, batches.global_batch)
    ema.update(generator)
    faults.end_step(step + 1)

rank = accelerator.process_index
networks = {"generator": accelerator.unwrap_model(generator), "discriminator": accelerator.unwrap_model(discriminator),
            "generator_ema": ema.network}
state = {f"{name}.{key}": value.detach().clone() for name, model in networks.items()
         for key, value in model.state_dict().items()}
share_buffers(networks, ema)
synced = {f"{name}.{key}": value.detach().clone() for name, model in networks.items()
          for key, value in model.state_dict().items()}
save_file(state, out / f"rank{rank}_local.safetensors")
save_file(synced, out / f"rank{rank}_synced.safetensors")
save_file({"shard": shard}, out / f"rank{rank}_shard.safetensors")
(out / f"rank{rank}_allreduces.json").write_text(json.dumps(allreduces))
accelerator.wait_for_everyone()
