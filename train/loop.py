"""The training loop: sample a batch, update D, update G, log, checkpoint.

One process or many (`accelerate launch -m train`): Accelerate wraps G and D in DDP as two
separate models with their own optimizers. Each phase turns on gradients for its own network
only, and during the G step D's gradients are neither computed nor all-reduced.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from tqdm import tqdm

from train import checkpoint, config, data, losses, models, tracking
from train.config import Config, ConfigError
from train.data import DataError, ShardedBatches
from train.distributed import ddp_without_forward_buffer_sync, sync_buffers_from_main

SAMPLE_GRID_SIZE = 64
METRIC_NAMES = ("loss/d", "loss/g", "d/real", "d/fake")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.parse_args(argv)
        train(cfg)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def train(cfg: Config) -> None:
    accelerator, batches, run_dir = set_up(cfg)
    generator, discriminator = build_models(cfg)
    g_optimizer, d_optimizer = build_optimizers(cfg, generator, discriminator)
    generator, discriminator, g_optimizer, d_optimizer = accelerator.prepare(
        generator, discriminator, g_optimizer, d_optimizer
    )
    noise = torch.Generator(accelerator.device).manual_seed(seed_for(cfg.run.seed, "noise", accelerator.process_index))
    fixed_z = torch.randn(SAMPLE_GRID_SIZE, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.run.seed))
    log = tracking.RunLog(accelerator, cfg, run_dir)
    running = torch.zeros(len(METRIC_NAMES), device=accelerator.device)
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(range(1, cfg.train.steps + 1), disable=not accelerator.is_main_process, desc="train")

    for step in progress:
        real = batches.next()
        z = torch.randn(real.shape[0], cfg.model.z_dim, device=accelerator.device, generator=noise)
        fake = generator(z)
        d_loss, real_logits, fake_logits = discriminator_step(accelerator, cfg.loss, discriminator, d_optimizer, real, fake)
        g_loss = generator_step(accelerator, cfg.loss, discriminator, g_optimizer, fake)
        running += torch.stack([d_loss, g_loss, real_logits.sigmoid().mean(), fake_logits.sigmoid().mean()])
        window_steps += 1

        if step % cfg.logging.every == 0 or step == cfg.train.steps:
            means = (accelerator.reduce(running, reduction="mean") / window_steps).tolist()
            seconds = time.perf_counter() - window_start
            values = dict(zip(METRIC_NAMES, means)) | {
                "lr/g": g_optimizer.param_groups[0]["lr"],
                "lr/d": d_optimizer.param_groups[0]["lr"],
                "images_per_second": window_steps * batches.global_batch / seconds,
                "global_batch": batches.global_batch,
                "epoch": batches.position.epoch,
            }
            log.metrics(step, values)
            progress.set_postfix({"D": f"{means[0]:.3f}", "G": f"{means[1]:.3f}",
                                  "img/s": f"{values['images_per_second']:.0f}"})
            running.zero_()
            window_start, window_steps = time.perf_counter(), 0

        last = step == cfg.train.steps
        if last or (cfg.logging.samples_every and step % cfg.logging.samples_every == 0):
            log.samples(step, render_samples(accelerator, generator, fixed_z))
        if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
            save_checkpoint(accelerator, run_dir, step, generator, discriminator)

    log.close()


def set_up(cfg: Config) -> tuple[Accelerator, ShardedBatches, Path]:
    """Everything that can reject the run does so here, before the run directory is written."""
    tracking.check_available(cfg)
    run_dir = Path(cfg.run.dir)
    if checkpoint.existing_checkpoints(run_dir):
        raise ConfigError(f"run.dir {str(run_dir)!r} already holds checkpoints; choose another run.dir")
    # Without an accelerator, say so to Accelerate: processes started by `accelerate launch
    # --multi_gpu` (torchrun) then form one gloo group instead of each believing it is alone.
    cpu = cfg.train.cpu or not torch.accelerator.is_available()
    if cfg.train.mixed_precision == "fp16" and cpu:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision={"fp32": "no"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision),
        log_with="wandb" if cfg.logging.wandb != "disabled" else None,
        kwargs_handlers=[ddp_without_forward_buffer_sync()],
    )
    images = data.load_images(cfg.data)
    batches = ShardedBatches(images, cfg.data.batch_size, accelerator.process_index, accelerator.num_processes,
                             cfg.run.seed, accelerator.device)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(config.to_yaml(cfg))
    accelerator.wait_for_everyone()
    return accelerator, batches, run_dir


def build_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Identical initial weights on every rank: the same seed everywhere."""
    torch.manual_seed(cfg.run.seed)
    return models.build(cfg.model.arch, cfg.model.z_dim)


def build_optimizers(cfg: Config, generator, discriminator) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    betas, amsgrad = (cfg.optim.beta1, cfg.optim.beta2), cfg.optim.amsgrad
    return (
        torch.optim.Adam(generator.parameters(), lr=cfg.optim.g_lr, betas=betas, amsgrad=amsgrad),
        torch.optim.Adam(discriminator.parameters(), lr=cfg.optim.d_lr, betas=betas, amsgrad=amsgrad),
    )


def discriminator_step(accelerator, loss, discriminator, d_optimizer, real, fake):
    """Update D on real and (detached) fake images; G's graph is not touched."""
    discriminator.requires_grad_(True)
    real_logits = discriminator(real)
    fake_logits = discriminator(fake.detach())
    d_loss = losses.discriminator_loss(loss, real_logits, fake_logits)
    d_optimizer.zero_grad(set_to_none=True)
    accelerator.backward(d_loss)
    d_optimizer.step()
    return d_loss.detach(), real_logits.detach(), fake_logits.detach()


def generator_step(accelerator, loss, discriminator, g_optimizer, fake):
    """Update G through the just-updated D; D gets no gradients and DDP syncs none of its."""
    discriminator.requires_grad_(False)
    with accelerator.no_sync(discriminator):
        fake_logits = discriminator(fake)
    g_loss = losses.generator_loss(loss, fake_logits)
    g_optimizer.zero_grad(set_to_none=True)
    accelerator.backward(g_loss)
    g_optimizer.step()
    return g_loss.detach()


@torch.no_grad()
def render_samples(accelerator, generator, fixed_z: torch.Tensor) -> torch.Tensor:
    """G(fixed_z) in eval mode, with rank 0's BatchNorm statistics; a collective: call on all ranks."""
    sync_buffers_from_main(generator)
    network = accelerator.unwrap_model(generator)
    network.eval()
    images = network(fixed_z.to(accelerator.device)).float()
    network.train()
    return images


def save_checkpoint(accelerator, run_dir: Path, step: int, generator, discriminator) -> None:
    """A collective: all ranks agree on the buffers, the main process writes, everyone waits."""
    sync_buffers_from_main(generator)
    sync_buffers_from_main(discriminator)
    if accelerator.is_main_process:
        checkpoint.save(run_dir, step, {
            "generator": accelerator.unwrap_model(generator),
            "discriminator": accelerator.unwrap_model(discriminator),
        })
    accelerator.wait_for_everyone()


def seed_for(seed: int, purpose: str, rank: int) -> int:
    """A distinct, reproducible seed per (run seed, purpose, rank)."""
    entropy = [seed, rank, *purpose.encode()]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] >> 1)
