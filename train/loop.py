"""The training loop: sample a batch, update D, update G, log, check for faults, checkpoint.

One process or many (`accelerate launch -m train`, entry point train/__main__.py): Accelerate
wraps G and D in DDP as two separate models with their own optimizers. Each phase turns on
gradients for its own network only, and during the G step D's gradients are neither computed
nor all-reduced. The updates read the batch and the latents from fixed buffers, so that with
`train.cuda_graph` they run as one replayed CUDA graph (train/cuda_graph.py).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs, TorchDynamoPlugin
from tqdm import tqdm

from train import checkpoint, config, data, files, losses, manifest, metrics, models, tracking
from train.checkpoint import Progress, Snapshot
from train.config import Config, ConfigError
from train.cuda_graph import ReplayableStep
from train.data import ShardedBatches, derived_seed, to_uint8
from train.distributed import check_ranks_agree, ddp_without_forward_buffer_sync, sync_buffers_from_main
from train.ema import GeneratorEMA
from train.faults import EXIT_NONFINITE, FaultMonitor
from train.preemption import EXIT_PREEMPTED
from train.profiling import StepProfiler

SAMPLE_GRID_SIZE = 64


def train(cfg: Config, resume_from: Path | None) -> int:
    """Train until `train.steps` from a fresh start or the checkpoint `resume_from`
    (manifest.resume_point); returns the process exit code."""
    accelerator, run_dir = set_up(cfg, resume_from)
    progress = Progress()
    batches = ShardedBatches(data.load_images(cfg.data), cfg.data.batch_size, accelerator.process_index,
                             accelerator.num_processes, cfg.run.seed, accelerator.device, position=progress.data,
                             channels_last=cfg.train.channels_last)
    evaluator = build_evaluator(cfg, accelerator)
    generator, discriminator = build_models(cfg)
    g_optimizer, d_optimizer = build_optimizers(cfg, generator, discriminator)
    generator, discriminator, g_optimizer, d_optimizer = accelerator.prepare(
        generator, discriminator, g_optimizer, d_optimizer
    )
    # The plain modules (no DDP, no torch.compile wrapper): what is saved, averaged and sampled from.
    plain_generator, plain_discriminator = (accelerator.unwrap_model(m, keep_torch_compile=False)
                                            for m in (generator, discriminator))
    ema = GeneratorEMA(models.build(cfg.model.arch, cfg.model.z_dim, cfg.model.upsample)[0].to(accelerator.device),
                       plain_generator, cfg.ema.half_life_images, cfg.ema.rampup, cfg.ema.statistics_images,
                       seed=derived_seed(cfg.run.seed, *b"ema statistics"))
    snapshot = Snapshot(
        networks={"generator": plain_generator, "discriminator": plain_discriminator, "generator_ema": ema.network},
        optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
        noise=torch.Generator(accelerator.device), progress=progress, config=config.to_dict(cfg),
        scaler=accelerator.scaler, extra_json={"global_batch": batches.global_batch},
    )
    if resume_from is None:
        reseed_noise(snapshot, cfg.run.seed, accelerator.process_index)
    else:
        resume(accelerator, resume_from, snapshot, batches, cfg.run.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
    log = tracking.RunLog(accelerator, cfg, run_dir, progress)
    if accelerator.is_main_process:
        with manifest.stop_on_write_failure(f"writing {run_dir / 'config.yaml'}", run_dir):
            files.write_atomically(run_dir / "config.yaml", config.to_yaml(cfg))
    faults = FaultMonitor(cfg.train.on_nonfinite, accelerator.device, check_gradients=accelerator.scaler is None,
                          check_every=cfg.train.check_every)
    window = tracking.TrainingWindow(accelerator.device, r1_penalty=cfg.loss.r1_gamma > 0)
    fixed_z = torch.randn(SAMPLE_GRID_SIZE, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.run.seed))
    bar = tqdm(total=cfg.train.steps, initial=progress.step, disable=not accelerator.is_main_process, desc="train",
               mininterval=0.1 if sys.stderr.isatty() else 30)  # a batch job's log gets a line every 30 s
    profiler = StepProfiler(cfg.profile, run_dir, accelerator.device, enabled=accelerator.is_main_process)
    real = batches.empty_batch()  # the step's inputs, refilled in place every step
    z = torch.empty(cfg.data.batch_size, cfg.model.z_dim, device=accelerator.device)

    def update_networks(r1_weight: float) -> None:
        """Update D, update G through the new D, average G: everything a step computes on the device."""
        fake = generator(z)
        d_loss, real_logits, fake_logits, r1_penalty = discriminator_step(
            accelerator, cfg.loss.kind, r1_weight, discriminator, d_optimizer, real, fake, faults)
        g_loss = generator_step(accelerator, cfg.loss.kind, discriminator, g_optimizer, fake, faults)
        ema.update(generator)
        window.add(d_loss, g_loss, real_logits, fake_logits, r1_penalty)

    # One graph per distinct argument: with lazy R1 (loss.r1_every > 1), a step with the penalty and one without.
    update = ReplayableStep(update_networks, enabled=cfg.train.cuda_graph)

    while progress.step < cfg.train.steps:
        step, images_seen = progress.step + 1, progress.images_seen + batches.global_batch
        real.copy_(batches.next())  # sample a batch
        torch.randn(z.shape, device=z.device, generator=snapshot.noise, out=z)  # and the latents
        ema.set_weight(images_seen, batches.global_batch)
        r1_weight = losses.r1_weight(cfg.loss.r1_gamma, cfg.loss.r1_every, step)
        update(r1_weight)  # update D, update G, average G: one replay of a CUDA graph with train.cuda_graph
        faults.end_step(step)
        window.count_step(regularised=r1_weight > 0)
        progress.step, progress.images_seen = step, images_seen
        bar.update()
        profiler.step()

        last = step == cfg.train.steps
        evaluation_due = cfg.eval.num_samples and (last or (cfg.eval.every and step % cfg.eval.every == 0))
        record = {}
        if step % cfg.logging.every == 0 or last or evaluation_due:  # an evaluation comes with its training time
            record |= window.read(accelerator, batches.global_batch) | {
                "lr/g": g_optimizer.param_groups[0]["lr"], "lr/d": d_optimizer.param_groups[0]["lr"],
                "global_batch": batches.global_batch, "epoch": progress.data.epoch}
            bar.set_postfix({"D": f"{record['loss/d']:.3f}", "G": f"{record['loss/g']:.3f}",
                             "img/s": f"{record['images_per_second']:.0f}"})
        if evaluation_due:
            with window.paused():
                quality = evaluate(accelerator, cfg, snapshot, ema, evaluator)
            record |= quality
            if quality:
                log.message(f"step {step}: " + ", ".join(f"{key.removeprefix('eval/')} {value:.4g}"
                                                         for key, value in quality.items()))
        if record:
            log.metrics(step, record)
        if last or (cfg.logging.samples_every and step % cfg.logging.samples_every == 0):
            with window.paused():
                log.samples(step, render_samples(accelerator, snapshot, ema, fixed_z))

        checkpoint_due = last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0)
        if checkpoint_due or step % cfg.train.check_every == 0:
            nonfinite, preempted = faults.check()
            if nonfinite is not None:
                newest = manifest.newest_valid(run_dir, accelerator.print)
                if cfg.train.on_nonfinite == "rollback" and newest is not None:
                    rollback(accelerator, newest, snapshot, batches, cfg.run.seed, nonfinite, log)
                    update.reset()  # the restored optimizer states are new tensors
                    bar.n = progress.step
                    continue
                kept = (f"{newest} is intact and resumable" if newest else
                        f"no valid checkpoint to resume from yet (checkpoint.every={cfg.checkpoint.every})")
                log.message(f"error: {nonfinite}; stopping (train.on_nonfinite={cfg.train.on_nonfinite}): {kept}")
                log.close()
                return EXIT_NONFINITE
            if preempted:
                path = save_checkpoint(accelerator, cfg, run_dir, snapshot, ema)
                faults.preemption.report_saved(path.name)
                log.message(f"preempted: checkpoint {path.name} written; exiting with {EXIT_PREEMPTED} "
                            "so the job can be requeued (the run resumes from it)")
                log.close()
                return EXIT_PREEMPTED
        if checkpoint_due:
            with window.paused():
                save_checkpoint(accelerator, cfg, run_dir, snapshot, ema)

    bar.close()
    check_ranks_agree(snapshot.networks, accelerator.process_index)  # after the final save shared the buffers
    log.close()
    return 0


def set_up(cfg: Config, resume_from: Path | None) -> tuple[Accelerator, Path]:
    """Everything that can reject the run does so here, before anything is written; resolves train.cuda_graph=null."""
    tracking.check_available(cfg)
    run_dir = Path(cfg.run.dir)
    # Without an accelerator, say so to Accelerate: processes started by `accelerate launch
    # --multi_gpu` (torchrun) then form one gloo group instead of each believing it is alone.
    cpu = cfg.train.cpu or not torch.accelerator.is_available()
    if cfg.train.mixed_precision == "fp16" and cpu:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
    # cuDNN's float32 convolutions use TF32 by default; this extends it to the matrix products (the
    # seed generator's fused upsampling, Linear layers).
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    if cfg.train.deterministic:  # before the first kernel: cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # also cuDNN's algorithm choice and inductor's autotuning
    if cfg.train.cuda_graph and (cpu or not torch.cuda.is_available()):
        raise ConfigError("train.cuda_graph=true needs a CUDA GPU; set train.cuda_graph=false on this machine")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision={"fp32": "no"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if cfg.train.compile else "no"),
        log_with="wandb" if cfg.logging.wandb != "disabled" else None,
        kwargs_handlers=[ddp_without_forward_buffer_sync(),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
                         # Autocast's cache of casts would be freed behind a CUDA graph's back; it saves
                         # nothing here anyway (Accelerate enters autocast per forward, which uses each weight once).
                         AutocastKwargs(cache_enabled=False)],
    )
    if cfg.train.cuda_graph is None:  # wherever it can run: measured 4.8-5.6x the steps/s on an H200
        cfg.train.cuda_graph = (accelerator.device.type == "cuda" and accelerator.num_processes == 1
                                and accelerator.mixed_precision != "fp16" and cfg.train.on_nonfinite != "skip"
                                and not cfg.train.compile)  # with torch.compile: when asked for, until measured
    if cfg.loss.r1_gamma and accelerator.mixed_precision == "fp16":  # known only here: null means the launcher's
        raise ConfigError("loss.r1_gamma > 0 needs bf16 or fp32: the R1 penalty's inner gradient is taken without "
                          "fp16 loss scaling and could underflow; set train.mixed_precision=bf16")
    if cfg.train.cuda_graph and (accelerator.num_processes > 1 or accelerator.mixed_precision == "fp16"):
        raise ConfigError("train.cuda_graph=true runs one process without fp16 loss scaling; this launch has "
                          f"{accelerator.num_processes} processes and mixed precision {accelerator.mixed_precision}: "
                          "launch one process with bf16 or fp32, or set train.cuda_graph=false")
    if resume_from is not None:
        check_global_batch(resume_from, cfg.data.batch_size, accelerator.num_processes)
    return accelerator, run_dir


def check_global_batch(path: Path, batch_size: int, processes: int) -> None:
    """Resuming on another number of processes keeps the global batch, or stops and says how."""
    saved = manifest.read_state(path)["global_batch"]
    if saved != batch_size * processes:
        fix = (f"set data.batch_size={saved // processes}" if saved % processes == 0
               else f"use a number of processes that divides {saved}")
        raise ConfigError(f"checkpoint {path} was trained with a global batch of {saved}; this launch has "
                          f"data.batch_size={batch_size} x {processes} processes = {batch_size * processes}: {fix}")


def build_models(cfg: Config) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Identical initial weights on every rank: the same seed everywhere."""
    torch.manual_seed(cfg.run.seed)
    generator, discriminator = models.build(cfg.model.arch, cfg.model.z_dim, cfg.model.upsample)
    if cfg.train.channels_last:
        generator, discriminator = (m.to(memory_format=torch.channels_last) for m in (generator, discriminator))
    return generator, discriminator


def build_optimizers(cfg: Config, generator, discriminator) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    settings = {"betas": (cfg.optim.beta1, cfg.optim.beta2), "amsgrad": cfg.optim.amsgrad, "fused": cfg.optim.fused,
                "capturable": cfg.train.cuda_graph}
    return (
        torch.optim.Adam(generator.parameters(), lr=cfg.optim.g_lr, **settings),
        torch.optim.Adam(discriminator.parameters(), lr=cfg.optim.d_lr, **settings),
    )


def discriminator_step(accelerator, loss_kind: str, r1_weight: float, discriminator, d_optimizer, real, fake, faults):
    """Update D on real and (detached) fake images; G's graph is not touched. Returns D's loss, its
    logits and, where `r1_weight` > 0, the R1 penalty before weighting (else None)."""
    discriminator.requires_grad_(True)
    if r1_weight:
        real = real.detach().requires_grad_(True)  # a view: the batch buffer itself stays a plain tensor
    real_logits = discriminator(real)
    fake_logits = discriminator(fake.detach())
    d_loss = losses.discriminator_loss(loss_kind, real_logits, fake_logits)
    r1_penalty = None
    if r1_weight:
        r1_penalty = losses.r1_penalty(real_logits, real)
        d_loss = d_loss + r1_weight / 2 * r1_penalty
        r1_penalty = r1_penalty.detach()
    d_optimizer.zero_grad(set_to_none=True)
    accelerator.backward(d_loss)
    if faults.allows_update("discriminator", d_loss, d_optimizer):
        d_optimizer.step()
    return d_loss.detach(), real_logits.detach(), fake_logits.detach(), r1_penalty


def generator_step(accelerator, loss_kind: str, discriminator, g_optimizer, fake, faults):
    """Update G through the just-updated D; D gets no gradients and DDP syncs none of its."""
    discriminator.requires_grad_(False)
    with accelerator.no_sync(discriminator):
        fake_logits = discriminator(fake)
    g_loss = losses.generator_loss(loss_kind, fake_logits)
    g_optimizer.zero_grad(set_to_none=True)
    accelerator.backward(g_loss)
    if faults.allows_update("generator", g_loss, g_optimizer):
        g_optimizer.step()
    return g_loss.detach()


def build_evaluator(cfg: Config, accelerator) -> metrics.Evaluator | None:
    """The quality metrics, on the main process; built first so a bad feature network stops the run early."""
    if cfg.eval.num_samples and accelerator.is_main_process:
        return metrics.Evaluator(config.SHIPPED_MNIST, Path(cfg.eval.cache_dir), accelerator.device)
    return None


def share_buffers(snapshot: Snapshot, ema: GeneratorEMA) -> None:
    """Rank 0's BatchNorm statistics on every rank; the EMA generator's measured from its own weights; a collective."""
    sync_buffers_from_main(snapshot.networks["generator"])
    sync_buffers_from_main(snapshot.networks["discriminator"])
    ema.measure_statistics()
    sync_buffers_from_main(ema.network)  # every rank measured the same; rank 0's, should a kernel differ


@torch.no_grad()
def render_samples(accelerator, snapshot: Snapshot, ema: GeneratorEMA, fixed_z: torch.Tensor) -> dict:
    """G(fixed_z) and EMA(fixed_z) in eval mode, side by side; a collective: call on all ranks."""
    share_buffers(snapshot, ema)
    generator = snapshot.networks["generator"]
    generator.eval()
    panels = {"generator": generator(fixed_z.to(accelerator.device)).float(),
              "ema": ema.network(fixed_z.to(accelerator.device)).float()}
    generator.train()
    return panels


@torch.no_grad()
def evaluate(accelerator, cfg: Config, snapshot: Snapshot, ema: GeneratorEMA, evaluator) -> dict[str, float]:
    """Every rank generates its share of the evaluation samples; the main process scores them all.

    The latent vectors are drawn once from `eval.seed`, so the sample set does not depend on the
    number of processes. A collective; returns the metrics on the main process, {} elsewhere.
    """
    started = time.perf_counter()
    share_buffers(snapshot, ema)
    network = ema.network if cfg.eval.use_ema else snapshot.networks["generator"]
    was_training = network.training
    network.eval()
    count, ranks = cfg.eval.num_samples, accelerator.num_processes
    z = torch.randn(count, cfg.model.z_dim, generator=torch.Generator().manual_seed(cfg.eval.seed))
    share = -(-count // ranks)
    mine = torch.zeros(share, cfg.model.z_dim)
    own = z[accelerator.process_index * share:(accelerator.process_index + 1) * share]
    mine[: len(own)] = own  # the last rank's share is padded, and the padding dropped after the gather
    images = torch.cat([to_uint8(network(chunk.to(accelerator.device)).float()) for chunk in mine.split(1000)])
    network.train(was_training)
    gathered = accelerator.gather(images)[:count]
    if evaluator is None:
        return {}
    scores = {f"eval/{key}": value for key, value in evaluator.score(gathered.cpu()).items()}
    return scores | {"eval/seconds": time.perf_counter() - started}


def save_checkpoint(accelerator, cfg: Config, run_dir: Path, snapshot: Snapshot, ema: GeneratorEMA) -> Path:
    """A collective: rank 0's BatchNorm statistics everywhere, then every rank writes its part."""
    share_buffers(snapshot, ema)
    return checkpoint.save(accelerator, run_dir, snapshot, cfg.checkpoint.keep_last)


def resume(accelerator, path: Path, snapshot: Snapshot, batches: ShardedBatches, seed: int) -> None:
    rng_restored = checkpoint.restore(path, snapshot, accelerator.process_index, accelerator.num_processes)
    batches.seek(snapshot.progress.data)
    if not rng_restored:
        accelerator.print(f"{path.name} was written by another number of processes: the data order and global "
                          "batch continue exactly; each rank's noise stream starts afresh")
        reseed_noise(snapshot, seed, accelerator.process_index, salt=f"resumed@{snapshot.progress.step}")
    accelerator.print(f"resumed from {path} at step {snapshot.progress.step}")


def rollback(accelerator, path: Path, snapshot: Snapshot, batches: ShardedBatches, seed: int, event, log) -> None:
    """Go back to the checkpoint `path` (the newest valid one) and redo the steps with fresh noise."""
    offset = snapshot.progress.seed_offset + 1
    checkpoint.restore(path, snapshot, accelerator.process_index, accelerator.num_processes)
    snapshot.progress.seed_offset = offset
    batches.seek(snapshot.progress.data)
    reseed_noise(snapshot, seed, accelerator.process_index, salt=f"rollback{offset}")
    log.message(f"{event}; rolled back to {path.name} (train.on_nonfinite=rollback, seed offset {offset})")


def reseed_noise(snapshot: Snapshot, seed: int, rank: int, salt: str = "") -> None:
    """A distinct, reproducible noise stream per (run seed, rank, salt)."""
    snapshot.noise.manual_seed(derived_seed(seed, rank, *f"noise{salt}".encode()))
