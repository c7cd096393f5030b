"""The training loop: sample a batch, update D, update G, log, evaluate, check, checkpoint.

One process or many (`accelerate launch -m train`, entry point train/__main__.py). The step's device
work is train/step.py; each other part of a step is a component here that knows when it is due.
A preemption and a non-finite stop are exceptions, handled in `train`, which closes the logs on
every way out.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import broadcast
from tqdm import tqdm

from train import batches, config, losses, models, regularisation, setup, tracking
from train.config import Config
from train.cuda_graph import ReplayableStep
from train.data import sources
from train.data.images import ImageSpec
from train.data.sharding import ShardedBatches, derived_seed
from train.distributed import check_ranks_agree, share_buffers
from train.ema import GeneratorEMA
from train.errors import EXIT_NONFINITE, EXIT_PREEMPTED, RunWriteError
from train.faults import FaultMonitor, NonFiniteError, Preempted
from train.networks import NetworkOptions
from train.profiling import StepProfiler
from train.quality.evaluator import Evaluator, generate_sharded
from train.sharing import artifacts
from train.step import GANStep, Players
from train.storage import checkpoint, layout, manifest
from train.storage.checkpoint import Progress, Snapshot

SAMPLE_GRID_SIZE = 64


def train(cfg: Config, resume_from: Path | None) -> int:
    """Train until `train.steps` from a fresh start or the checkpoint `resume_from`
    (manifest.resume_point); returns the process exit code."""
    accelerator, cfg = setup.set_up(cfg, resume_from)
    training = Training(cfg, accelerator, resume_from)
    try:
        training.run()
        check_ranks_agree(training.snapshot.networks, accelerator.process_index)  # after the final save's sync
        return 0
    except Preempted as preempted:
        best = training.unsaved_best_fd is not None  # an evaluation of this step set a new best: keep it
        path = training.save_checkpoint()
        preempted.flag.report_saved(path.name)
        if best:
            artifacts.log_best(training.log)  # its W&B artifact, as a best written when due has
        training.log.message(f"preempted: checkpoint {path.name}{f' (now {layout.BEST})' if best else ''} written; "
                             f"exiting with {EXIT_PREEMPTED} so the job can be requeued (the run resumes from it)")
        return EXIT_PREEMPTED
    except NonFiniteError as stop:
        newest = manifest.newest_valid(training.run_dir, accelerator.print)
        kept = (f"{newest} is intact and resumable" if newest else
                f"no valid checkpoint to resume from yet (checkpoint.every={cfg.checkpoint.every})")
        training.log.message(f"error: {stop}; stopping (train.on_nonfinite={cfg.train.on_nonfinite}): {kept}")
        return EXIT_NONFINITE
    finally:
        training.bar.close()
        stopped_by = sys.exc_info()[1]  # what stops the run, if anything: the error to report
        try:
            training.log.close()
        except RunWriteError:
            if stopped_by is None:
                raise  # W&B could not flush a run that ended well: that is the failure


def due(every: int, step: int, last: bool) -> bool:
    """Whether something done every `every` steps (0: only at the end) is due at `step`."""
    return last or (every > 0 and step % every == 0)


class Training:
    """A run's components, built (and restored from `resume_from`) in order; `run` is the algorithm."""

    def __init__(self, cfg: Config, accelerator, resume_from: Path | None):
        self.cfg, self.accelerator, self.run_dir = cfg, accelerator, Path(cfg.run.dir)
        self.progress = Progress()
        # The lowest FD so far, measured but not yet saved: it enters the progress with the checkpoint that becomes
        # checkpoints/best, whichever way that checkpoint is written (when due, or on a preemption).
        self.unsaved_best_fd: float | None = None
        self.stop_reason: str | None = None  # the quality target is met (train.stop_at_fd, train.patience)
        with accelerator.main_process_first():  # pictures are decoded (and cached) by one process
            dataset = sources.load(cfg.data, labelled=cfg.model.conditional)
        self.images = dataset.spec  # what the networks, the metrics and every checkpoint are made for
        with torch.device("meta"):  # networks that cannot be made for these images are refused before any more work
            build_models(cfg, self.images)
        if resume_from is not None:
            checkpoint.check_images(resume_from, self.images)
        self.plan = batches.batch_plan(cfg, accelerator.num_processes)  # checked in setup.set_up
        self.batches = ShardedBatches(dataset.images, self.plan.share, accelerator.process_index,
                                      accelerator.num_processes, cfg.run.seed, accelerator.device,
                                      position=self.progress.data, channels_last=cfg.train.channels_last,
                                      labels=dataset.labels)
        # The quality metrics, on the main process; built first so that a bad feature network stops the run early.
        self.evaluator = (Evaluator.for_data(cfg.data, self.images, Path(cfg.eval.cache_dir), accelerator.device,
                                             cfg.eval.features, cfg.eval.inception_weights)
                          if cfg.eval.num_samples and accelerator.is_main_process else None)
        if self.evaluator is not None:
            accuracy = self.evaluator.test_accuracy()
            print(f"quality metrics against {self.evaluator.against}, in the features of "
                  f"{self.evaluator.feature_network}" + (f" (it labels {accuracy:.2%} of them correctly)"
                                                         if accuracy is not None else ""), flush=True)
        generator, discriminator, g_optimizer, d_optimizer = accelerator.prepare(*build_networks(cfg, self.images))
        # The plain modules (no DDP, no torch.compile wrapper): what is saved, averaged and sampled from.
        plain_generator, plain_discriminator = (accelerator.unwrap_model(m, keep_torch_compile=False)
                                                for m in (generator, discriminator))
        average = models.build_generator(cfg.model.arch, cfg.model.z_dim, cfg.model.conditional, self.images,
                                         NetworkOptions.of(cfg.model)).to(accelerator.device)
        self.ema = GeneratorEMA(average, plain_generator, cfg.ema.half_life_images, cfg.ema.rampup,
                                cfg.ema.statistics_images, seed=derived_seed(cfg.run.seed, *b"ema statistics"))
        self.snapshot = Snapshot(
            networks={"generator": plain_generator, "discriminator": plain_discriminator,
                      "generator_ema": self.ema.network},
            optimizers={"generator": g_optimizer, "discriminator": d_optimizer},
            noise=torch.Generator(accelerator.device), progress=self.progress, config=config.to_dict(cfg),
            scaler=accelerator.scaler,
            extra_json={"global_batch": self.batches.global_batch, "images": self.images.as_dict(),
                        "hardware": setup.hardware(accelerator), "noise": checkpoint.GLOBAL_NOISE},
        )
        if resume_from is None:
            self.reseed_noise()
        else:
            self.restore(resume_from, rollback=False)
        self.log = tracking.RunLog(accelerator, cfg, self.run_dir, self.progress.step, self.progress.wandb_run_id)
        self.progress.wandb_run_id = self.log.wandb_run_id  # kept in the checkpoints: a resumed run continues it
        if resume_from is not None:
            artifacts.log_best(self.log)  # where the run before this one stopped before W&B had it
        self.faults = FaultMonitor(cfg.train.on_nonfinite, accelerator.device,
                                   check_gradients=accelerator.scaler is None, check_every=cfg.train.check_every,
                                   timeout_s=cfg.train.timeout_s)
        loss = losses.load(cfg.loss.kind)
        self.window = tracking.TrainingWindow(accelerator.device, loss, r1_penalty=cfg.loss.r1_gamma > 0)
        self.gan = GANStep(accelerator, Players(generator, discriminator, g_optimizer, d_optimizer), loss, self.ema,
                           self.batches, faults=self.faults, window=self.window, z_dim=cfg.model.z_dim,
                           num_classes=plain_generator.num_classes, accumulation=self.plan.accumulation)
        # One graph per distinct argument: with lazy R1 (loss.r1_every > 1), a step with the penalty and one without.
        self.update = ReplayableStep(self.gan, enabled=cfg.train.cuda_graph)
        self.fixed_z = torch.randn(SAMPLE_GRID_SIZE, cfg.model.z_dim,
                                   generator=torch.Generator().manual_seed(cfg.run.seed))
        self.fixed_labels = models.balanced_labels(SAMPLE_GRID_SIZE, plain_generator.num_classes, accelerator.device)
        self.bar = tqdm(total=cfg.train.steps, initial=self.progress.step, disable=not accelerator.is_main_process,
                        desc="train", mininterval=0.1 if sys.stderr.isatty() else 30)  # a batch job: a line per 30 s
        self.profiler = StepProfiler(cfg.profile, self.run_dir, accelerator.device,
                                     enabled=accelerator.is_main_process)

    def run(self) -> None:
        """The algorithm. Raises Preempted or NonFiniteError (train/faults.py) where the run must stop."""
        cfg, progress, global_batch = self.cfg, self.progress, self.batches.global_batch
        while progress.step < cfg.train.steps:
            step = progress.step + 1
            last = step == cfg.train.steps
            self.gan.sample(self.batches, self.snapshot.noise)  # sample a batch and the latents
            self.ema.set_weight(progress.images_seen + global_batch, global_batch)
            r1_weight = regularisation.r1_weight(cfg.loss.r1_gamma, cfg.loss.r1_every, step)
            self.update(r1_weight)  # update D, update G, average G: one replay of a CUDA graph with train.cuda_graph
            self.faults.end_step(step)
            self.window.count_step(regularised=r1_weight > 0)
            progress.step, progress.images_seen = step, progress.images_seen + global_batch
            self.bar.update()
            self.profiler.step()
            self.log_if_due(step, last)  # the training statistics, with an evaluation where one is due
            stopping = self.stop_reason is not None  # this step's evaluation met the quality target
            if due(cfg.logging.samples_every, step, last or stopping):
                with self.window.paused():
                    self.log.samples(step, self.render_samples())
            new_best = self.unsaved_best_fd is not None
            checkpoint_due = due(cfg.checkpoint.every, step, last) or new_best or stopping
            if (checkpoint_due or step % cfg.train.check_every == 0) and self.check_faults():
                continue  # a non-finite step with train.on_nonfinite=rollback: the newest valid checkpoint is back
            if checkpoint_due:
                with self.window.paused():
                    path = self.save_checkpoint()
                if new_best:
                    self.log.message(f"step {step}: the lowest FD so far; checkpoints/{layout.BEST} is now "
                                     f"{path.name}")
                if new_best or (last and not cfg.eval.num_samples):  # to W&B, where it logs
                    with self.window.paused():
                        artifacts.log_generator(self.log, path, step)
            if stopping:
                self.log.message(f"step {step}: {self.stop_reason}: stopping; checkpoints/{layout.LATEST} is "
                                 f"{path.name}, checkpoints/{layout.BEST} the lowest FD")
                return

    def log_if_due(self, step: int, last: bool) -> None:
        """Every `logging.every` steps and with every evaluation: the means over the window, the learning rates.
        An evaluation that finds the lowest FD of the run so far (on every rank) sets `unsaved_best_fd`."""
        cfg = self.cfg
        evaluation_due = cfg.eval.num_samples and due(cfg.eval.every, step, last)
        if not (evaluation_due or due(cfg.logging.every, step, last)):
            return
        g_optimizer, d_optimizer = self.gan.g_optimizer, self.gan.d_optimizer
        record = self.window.read(self.accelerator, self.batches.global_batch) | {
            "lr/g": g_optimizer.param_groups[0]["lr"], "lr/d": d_optimizer.param_groups[0]["lr"],
            "global_batch": self.batches.global_batch, "epoch": self.progress.data.epoch}
        self.bar.set_postfix({"D": f"{record['loss/d']:.3f}", "G": f"{record['loss/g']:.3f}",
                              "img/s": f"{record['images_per_second']:.0f}"})
        quality = {}
        if evaluation_due:
            with self.window.paused():
                quality = self.evaluate()
            record |= quality
            if quality:  # the summary; the per-digit numbers go to the logs only
                self.log.message(f"step {step}: " + ", ".join(f"{key.removeprefix('eval/')} {value:.4g}"
                                                              for key, value in quality.items()
                                                              if key.startswith("eval/")))
        self.log.metrics(step, record)
        if evaluation_due:
            self.note_evaluation(quality)

    def note_evaluation(self, quality: dict[str, float]) -> None:
        """Keep the FD just measured (on the main process, shared with every rank) as `unsaved_best_fd` where it
        is the lowest of the run so far, and set `stop_reason` where it meets the quality target."""
        fd = torch.tensor(quality.get("eval/fd", math.nan), dtype=torch.float64, device=self.accelerator.device)
        fd = broadcast(fd).item()
        progress, target, patience = self.progress, self.cfg.train.stop_at_fd, self.cfg.train.patience
        if math.isfinite(fd) and (progress.best_fd is None or fd < progress.best_fd):
            self.unsaved_best_fd, progress.evaluations_since_best = fd, 0
        else:
            progress.evaluations_since_best += 1
        if target is not None and fd <= target:
            self.stop_reason = f"FD {fd:.4g} reached train.stop_at_fd={target:g}"
        elif patience is not None and progress.evaluations_since_best >= patience:
            self.stop_reason = (f"{progress.evaluations_since_best} evaluations without a lower FD "
                                f"(train.patience={patience})")

    def check_faults(self) -> bool:
        """The collective check; True where it rolled back (`train.on_nonfinite=rollback` with a valid checkpoint)."""
        try:
            self.faults.check()
        except NonFiniteError as error:
            newest = manifest.newest_valid(self.run_dir, self.accelerator.print)
            if self.cfg.train.on_nonfinite != "rollback" or newest is None:
                raise
            offset = self.progress.seed_offset + 1
            self.restore(newest, rollback=True)
            self.log.rewind(self.progress.step)  # the undone steps' lines: redone, they are logged again
            self.log.message(f"{error}; rolled back to {newest.name} (train.on_nonfinite=rollback, seed offset "
                             f"{offset})")
            return True
        return False

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The quality of `eval.num_samples` generated images (every rank generates its share), `eval/*`; per
        digit, `digits/*`, and for a conditional generator per asked digit, `asked/*`; a collective: the metrics
        on the main process, {} elsewhere."""
        started = time.perf_counter()
        share_buffers(self.snapshot.networks, self.ema)
        network = self.ema.network if self.cfg.eval.use_ema else self.snapshot.networks["generator"]
        count = self.cfg.eval.num_samples
        images = generate_sharded(network, count, self.cfg.eval.seed, self.accelerator)
        if self.evaluator is None:
            return {}
        report = self.evaluator.report(images.cpu(), models.balanced_labels(count, network.num_classes),
                                       bootstrap=self.cfg.eval.fd_resamples, seed=self.cfg.eval.seed,
                                       copy_rate=self.cfg.eval.copy_rate)
        seconds = time.perf_counter() - started
        groups = {"per_digit": "digits", "per_asked_digit": "asked"}
        interval = ({"eval/fd_low": report["fd_interval"]["low"], "eval/fd_high": report["fd_interval"]["high"]}
                    if "fd_interval" in report else {})
        return ({f"eval/{key}": value for key, value in report["metrics"].items()} | interval
                | {"eval/seconds": seconds, "feature_network": report["feature_network"]}
                | {f"{prefix}/{key}_{digit}": value for group, prefix in groups.items()
                   for digit, values in report.get(group, {}).items() for key, value in values.items()})

    @torch.no_grad()
    def render_samples(self) -> dict[str, torch.Tensor]:
        """G(fixed_z) and EMA(fixed_z) in eval mode, side by side; a collective: call on all ranks."""
        share_buffers(self.snapshot.networks, self.ema)
        generator, fixed_z = self.snapshot.networks["generator"], self.fixed_z.to(self.accelerator.device)
        generator.eval()
        panels = {"generator": generator(fixed_z, self.fixed_labels).float(),
                  "ema": self.ema.network(fixed_z, self.fixed_labels).float()}
        generator.train()
        return panels

    def save_checkpoint(self) -> Path:
        """A collective: rank 0's BatchNorm statistics everywhere, then every rank writes its part. After an
        evaluation with a new lowest FD, this checkpoint records it and becomes checkpoints/best: the best FD a
        resumed run compares with is always the FD of its `best` link."""
        share_buffers(self.snapshot.networks, self.ema)
        best = self.unsaved_best_fd is not None
        if best:
            self.progress.best_fd, self.unsaved_best_fd = self.unsaved_best_fd, None
        return checkpoint.save(self.accelerator, self.run_dir, self.snapshot, self.cfg.checkpoint.keep_last, best)

    def restore(self, path: Path, rollback: bool) -> None:
        """Continue from the checkpoint `path`: at the start (resume), or going back after a non-finite step
        (rollback: the steps are redone with fresh noise, a seed offset saved in the checkpoints)."""
        offset = self.progress.seed_offset + 1
        noise_continues = checkpoint.restore(path, self.snapshot, self.accelerator.process_index,
                                             self.accelerator.num_processes)
        self.batches.seek(self.progress.data)
        if rollback:
            self.unsaved_best_fd = self.stop_reason = None  # measured on the steps being undone
            self.progress.seed_offset = offset
            self.reseed_noise(salt=f"rollback{offset}")
            self.update.reset()  # the restored optimizer states are new tensors
            self.bar.n = self.progress.step
            return
        written_by = manifest.read_state(path)["world_size"]
        if not noise_continues:
            self.accelerator.print(f"{path.name} was written by {written_by} processes before the noise stream was one "
                                   "for the global batch: the data order and global batch continue exactly; the noise "
                                   "stream restarts")
            self.reseed_noise(salt=f"resumed@{self.progress.step}")
        elif written_by != self.accelerator.num_processes:
            self.accelerator.print(f"{path.name} was written by {written_by} process{'es' * (written_by != 1)}, this "
                                   f"launch has {self.accelerator.num_processes}: the global batch of "
                                   f"{self.batches.global_batch}, the data order and the noise continue, each "
                                   "process taking its share "
                                   f"({self.plan.accumulation} micro-batch(es) of "
                                   f"{self.plan.share // self.plan.accumulation})")
        self.accelerator.print(f"resumed from {path} at step {self.progress.step}")

    def reseed_noise(self, salt: str = "") -> None:
        """A reproducible noise stream per (run seed, salt), the same on every rank: each takes its slice."""
        self.snapshot.noise.manual_seed(derived_seed(self.cfg.run.seed, 0, *f"noise{salt}".encode()))


def build_networks(cfg: Config, images: ImageSpec) -> tuple[torch.nn.Module, torch.nn.Module, torch.optim.Optimizer,
                                                            torch.optim.Optimizer]:
    """G, D for `images` and their Adam optimizers, with identical initial weights on every rank (the same seed
    everywhere)."""
    torch.manual_seed(cfg.run.seed)
    generator, discriminator = build_models(cfg, images)
    for network in (generator, discriminator):
        models.set_batchnorm_group(network, cfg.model.bn_group)
    if cfg.train.channels_last:
        generator, discriminator = (m.to(memory_format=torch.channels_last) for m in (generator, discriminator))
    settings = {"betas": (cfg.optim.beta1, cfg.optim.beta2), "amsgrad": cfg.optim.amsgrad, "fused": cfg.optim.fused,
                "capturable": cfg.train.cuda_graph}
    return (generator, discriminator, torch.optim.Adam(generator.parameters(), lr=cfg.optim.g_lr, **settings),
            torch.optim.Adam(discriminator.parameters(), lr=cfg.optim.d_lr, **settings))


def build_models(cfg: Config, images: ImageSpec) -> tuple[torch.nn.Module, torch.nn.Module]:
    """G and D as `model.*` describes them, for `images`: for the run, and on the meta device for the early check."""
    return models.build(cfg.model.arch, cfg.model.z_dim, cfg.model.conditional, images, NetworkOptions.of(cfg.model))
