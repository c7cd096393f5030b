"""Where a run's config, numbers and pictures go: config.yaml, JSON lines and PNG files in the run
directory, always, and Weights & Biases through Accelerate's tracker when `logging.wandb` is online
or offline.

Only the main process writes; every method is safe to call on every rank.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import secrets
import sys
import time
import contextlib
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import Accelerator
from torchvision.utils import make_grid, save_image

from train.config import Config, to_dict, to_yaml
from train.errors import ConfigError, RunWriteError
from train.losses._base import GANLoss
from train.storage.files import open_in_place, write_atomically
from train.storage.layout import (
    BEST, CHECKPOINTS, CONFIG_FILE, CURVES_FILE, METRICS_FILE, SAMPLES_DIR, WANDB_DIR, WANDB_SENT
)
from train.models import to_uint8
from train.plots import plot_curves, read_metrics
from train.storage.manifest import stop_on_write_failure


class TrainingWindow:
    """Means of the step statistics since the last read, accumulated on the device (no sync per step),
    and the training time: wall time less what was spent in `paused()` (evaluation, grids, checkpoints).
    The R1 penalty's mean is over the steps that computed it (every `loss.r1_every`-th)."""

    EVERY_STEP = ("loss/d", "loss/g", "d/real", "d/fake")  # averaged over all steps of the window

    def __init__(self, device: torch.device, loss: GANLoss, r1_penalty: bool = False):
        self.device, self.loss = device, loss
        self.names = self.EVERY_STEP + (("d/r1_penalty",) if r1_penalty else ())
        self.sums = torch.zeros(len(self.names), device=device)
        self.steps, self.regularised_steps = 0, 0
        self.started, self.paused_seconds, self.train_seconds = time.perf_counter(), 0.0, 0.0

    def add(self, d_loss, g_loss, real_logits, fake_logits, r1_penalty=None) -> None:
        """Device work only (it runs inside the training step, which may be a CUDA graph)."""
        values = [d_loss, g_loss, *self.loss.summary(real_logits, fake_logits)]  # d/real, d/fake as the loss says
        values += [r1_penalty] if r1_penalty is not None else []
        self.sums[:len(values)].add_(torch.stack(values))

    def count_step(self, regularised: bool = False) -> None:
        """After each step; `regularised`: it computed the R1 penalty."""
        self.steps += 1
        self.regularised_steps += regularised

    @contextmanager
    def paused(self):
        if self.device.type != "cpu":
            torch.accelerator.synchronize()  # the queued training steps finish on the training clock
        started = time.perf_counter()
        yield
        self.paused_seconds += time.perf_counter() - started

    def read(self, accelerator: Accelerator, global_batch: int) -> dict[str, float]:
        """Means over the window and all ranks, images/s and training seconds; a collective."""
        every_step = len(self.EVERY_STEP)
        counts = [self.steps] * every_step + [self.regularised_steps] * (len(self.names) - every_step)
        sums = accelerator.reduce(self.sums, reduction="mean").tolist()
        seconds = time.perf_counter() - self.started - self.paused_seconds
        self.train_seconds += seconds
        values = {name: total / count for name, total, count in zip(self.names, sums, counts) if count} | {
            "images_per_second": self.steps * global_batch / seconds, "train_seconds": self.train_seconds}
        self.sums.zero_()
        self.steps, self.regularised_steps, self.started, self.paused_seconds = 0, 0, time.perf_counter(), 0.0
        return values


def check_available(cfg: Config) -> None:
    """Fail before any work when W&B is asked for but not installed."""
    if cfg.logging.wandb != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            f"logging.wandb={cfg.logging.wandb} needs the wandb package: `pip install wandb`, "
            "or set logging.wandb=disabled to log to the run directory only"
        )


class RunLog:
    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path, step: int, wandb_run_id: str | None):
        """Open the run's logs; a resumed run continues them from `step`, without duplicates, and the W&B run
        `wandb_run_id` (a new one where None: `self.wandb_run_id`). W&B comes first: a login it refuses stops
        the run before the logs are touched."""
        self.accelerator = accelerator
        self.run_dir = run_dir
        self.use_wandb = cfg.logging.wandb != "disabled"
        self.draw_curves = cfg.logging.curves
        self.wandb_run_id = wandb_run_id
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
        if self.use_wandb:
            # W&B's debug log lives in its run folder: once that folder is full, each of its lines would print a
            # "--- Logging error ---" traceback. The run reports the failure itself, once, and stops (exit 74).
            logging.raiseExceptions = False
            self.wandb_run_id = wandb_run_id or secrets.token_hex(4)
            with stop_on_write_failure(f"starting W&B in {run_dir / WANDB_DIR}", run_dir):
                _start_wandb(accelerator, cfg, run_dir, self.wandb_run_id)
        self.metrics_descriptor = None
        self.sent = self._read_sent()  # what W&B has: {"history_step": ..., "artifacts": [...]}
        if self.use_wandb and accelerator.is_main_process and not (run_dir / WANDB_SENT).exists():
            if step:  # a run begun before WANDB_SENT: W&B had what it logged up to its checkpoint, and its best
                best = run_dir / CHECKPOINTS / BEST
                self.sent = {"history_step": step, "artifacts": [best.resolve().name] if best.is_dir() else []}
            self._write_sent()  # from the start: a run killed before it closes is known to have sent nothing
        if accelerator.is_main_process:
            with stop_on_write_failure(f"rewriting {run_dir / METRICS_FILE}", run_dir):
                self.metrics_descriptor = self._open_metrics()  # refuses a link before anything is read
                self.rewind(step)
            if self.use_wandb:
                self._send_history_not_sent(step)
            with stop_on_write_failure(f"making {run_dir / SAMPLES_DIR}", run_dir):
                (run_dir / SAMPLES_DIR).mkdir(exist_ok=True)
            with stop_on_write_failure(f"writing {run_dir / CONFIG_FILE}", run_dir):
                write_atomically(run_dir / CONFIG_FILE, to_yaml(cfg))  # what this run uses, resolved

    def rewind(self, step: int) -> None:
        """Forget the metric lines after `step`: a resumed run's (written after its checkpoint), a rolled-back
        run's (the steps undone), so that no step has two lines."""
        if self.metrics_descriptor is not None and _drop_lines_after(self.run_dir / METRICS_FILE, step,
                                                                     self.accelerator.print):
            os.close(self.metrics_descriptor)
            self.metrics_descriptor = self._open_metrics()  # the file that replaced it

    def _read_sent(self) -> dict:
        """WANDB_SENT's record; an unreadable one is taken as nothing known to be sent (sent again: no loss)."""
        try:
            sent = json.loads((self.run_dir / WANDB_SENT).read_text())
            return {"history_step": int(sent["history_step"]), "artifacts": [str(a) for a in sent["artifacts"]]}
        except (OSError, ValueError, KeyError, TypeError):
            return {"history_step": 0, "artifacts": []}

    def _write_sent(self) -> None:
        if self.accelerator.is_main_process and self.use_wandb:
            with stop_on_write_failure(f"writing {self.run_dir / WANDB_SENT}", self.run_dir):
                write_atomically(self.run_dir / WANDB_SENT, json.dumps(self.sent))

    def _send_history_not_sent(self, step: int) -> None:
        """Send W&B the metric lines up to `step` that no closed attempt sent: those of a run that was killed
        (SIGKILL, a lost node) before W&B had them."""
        lines = [line for line in read_metrics(self.run_dir / METRICS_FILE)[0]
                 if self.sent["history_step"] < line["step"] <= step]
        with stop_on_write_failure(f"logging the history of a killed run to W&B in {self.run_dir / WANDB_DIR}",
                                   self.run_dir):
            for line in lines:
                self._to_wandb(line["step"], {key: value for key, value in line.items() if key != "step"})
        if lines:
            self.message(f"sent W&B the {len(lines)} metric line(s) of steps {lines[0]['step']}-{lines[-1]['step']} "
                         "that the run before this one had not sent (it was killed)")

    def _open_metrics(self) -> int:
        """Opened once for the run, never through a link: appends cannot land outside run.dir."""
        return open_in_place(self.run_dir / METRICS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)

    def message(self, text: str) -> None:
        """A line for the person watching (main process, stderr, flushed)."""
        if self.accelerator.is_main_process:
            print(f"\n{text}", file=sys.stderr, flush=True)

    def metrics(self, step: int, values: dict[str, float | str]) -> None:
        """A line of metrics.jsonl and of W&B's history; text (the feature network an evaluation's numbers come
        from) goes to the W&B run's config instead, as W&B's history charts numbers."""
        if not self.accelerator.is_main_process:
            return
        # A line cut short by a full disk is dropped when the run resumes (_drop_lines_after).
        with stop_on_write_failure(f"appending to {self.run_dir / METRICS_FILE}", self.run_dir):
            line = (json.dumps({"step": step, **values}) + "\n").encode()
            while line:  # unbuffered: a write that fails leaves nothing behind to be retried at exit
                line = line[os.write(self.metrics_descriptor, line):]
        if self.use_wandb:
            with stop_on_write_failure(f"logging step {step} to W&B in {self.run_dir / WANDB_DIR}", self.run_dir):
                self._to_wandb(step, values)
            self.logged_step = step

    def _to_wandb(self, step: int, values: dict[str, float | str]) -> None:
        text = {key: value for key, value in values.items() if isinstance(value, str)}
        if text:
            self.accelerator.get_tracker("wandb", unwrap=True).config.update(text, allow_val_change=True)
        self.accelerator.log({key: value for key, value in values.items() if key not in text}, step=step)

    def samples(self, step: int, panels: dict[str, torch.Tensor]) -> Path | None:
        """Save grids of each panel's images (in [0, 1]) side by side as one PNG, and send it to W&B."""
        if not self.accelerator.is_main_process:
            return None
        grids = [make_grid(images.float().cpu(), nrow=8, padding=2, pad_value=1.0) for images in panels.values()]
        gap = torch.ones(3, grids[0].shape[1], 8)
        picture = torch.cat([part for grid in grids for part in (grid, gap)][:-1], dim=2)
        path = self.run_dir / SAMPLES_DIR / f"step_{step:08d}.png"
        encoded = io.BytesIO()
        save_image(picture, encoded, format="png")
        with stop_on_write_failure(f"writing {path}", self.run_dir):
            write_atomically(path, encoded.getvalue())
        if self.use_wandb:  # W&B copies the picture into its run folder, in this process
            pixels = to_uint8(picture).permute(1, 2, 0).numpy()
            with stop_on_write_failure(f"logging {path.name} to W&B in {self.run_dir / WANDB_DIR}", self.run_dir):
                self.accelerator.get_tracker("wandb").log_images({"samples": [pixels]}, step=step)
        return path

    def wants_model(self, checkpoint: str) -> bool:
        """Whether W&B should be sent the model of the checkpoint named `checkpoint`: it logs, this is the main
        process, and neither this process nor one that closed (WANDB_SENT) sent it already."""
        return self.use_wandb and self.accelerator.is_main_process and checkpoint not in self.sent["artifacts"]

    def model(self, folder: Path, name: str, checkpoint: str, metadata: dict, aliases: list[str]) -> None:
        """Log `folder` as the W&B model artifact `name` (a new version), made from the checkpoint `checkpoint`,
        unless W&B has it (`wants_model`)."""
        if not self.wants_model(checkpoint):
            return
        import wandb  # installed: check_available said so

        artifact = wandb.Artifact(name, type="model", metadata=metadata,
                                  description=f"The generator of {checkpoint}, exported by train.export")
        with stop_on_write_failure(f"logging {checkpoint}'s generator to W&B in {self.run_dir / WANDB_DIR}",
                                   self.run_dir):
            artifact.add_dir(str(folder))
            self.accelerator.get_tracker("wandb", unwrap=True).log_artifact(artifact, aliases=aliases)
        self.sent["artifacts"].append(checkpoint)  # recorded in WANDB_SENT once W&B has flushed it (close)

    def close(self) -> None:
        """Draw the curves of the whole run so far (main process, `logging.curves`), flush W&B and end
        the process group. Every rank calls this on the same exit, so ending the group cannot hang; a
        process that exits with a gloo group alive can abort in its threads' teardown (SIGABRT after
        a finished run: pytorch/pytorch#190489). Curves that cannot be written are only reported: they are
        drawn again from metrics.jsonl by `python -m train.plots`."""
        if self.metrics_descriptor is not None:
            os.close(self.metrics_descriptor)
            self.metrics_descriptor = None
        if self.draw_curves and self.accelerator.is_main_process and (self.run_dir / METRICS_FILE).is_file():
            try:
                plot_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE)
            except OSError as error:
                self.message(f"warning: drawing {self.run_dir / CURVES_FILE} failed ({error}); "
                             f"`python -m train.plots --run {self.run_dir}` draws it once there is room")
        with stop_on_write_failure(f"finishing the W&B run in {self.run_dir / WANDB_DIR}", self.run_dir):
            self.accelerator.end_training()
        if self.use_wandb and self.accelerator.is_main_process:  # W&B has flushed what it was sent: now it has it
            self.sent["history_step"] = max(self.sent["history_step"], self.logged_step)
            with contextlib.suppress(RunWriteError):  # not knowing costs only a resend
                self._write_sent()


def _start_wandb(accelerator: Accelerator, cfg: Config, run_dir: Path, run_id: str) -> None:
    import wandb  # installed: check_available said so

    try:
        accelerator.init_trackers(
            cfg.logging.project,
            config=to_dict(cfg),
            init_kwargs={"wandb": {"mode": cfg.logging.wandb, "dir": str(run_dir), "name": run_dir.name,
                                   "id": run_id, "resume": "allow"}},
        )
    except (wandb.errors.UsageError, wandb.errors.CommError) as error:  # logging.wandb=online: no login, no server
        fix = ("log in with `wandb login` (or set WANDB_API_KEY) on this machine, or"
               if isinstance(error, wandb.errors.UsageError) else
               f"its server cannot be reached from here (its log of the attempt is in {run_dir / 'wandb'}):")
        raise ConfigError(f"W&B refused logging.wandb={cfg.logging.wandb} ({str(error).splitlines()[0]}): {fix} use "
                          "logging.wandb=offline and `wandb sync` the run later (GAN_WANDB=offline in the sbatch "
                          "templates)") from None


def _drop_lines_after(path: Path, step: int, report) -> bool:
    """Forget metric lines a previous attempt wrote after the checkpoint this run resumes from, and any it
    left half-written (killed in the middle of a line, a full disk); the file is replaced atomically.
    Returns whether it was replaced."""
    lines, unreadable = read_metrics(path)
    kept = [line for line in lines if line["step"] <= step]
    if unreadable:
        report(f"dropped {unreadable} unreadable line(s) of {path}, left by a run that was killed while writing it")
    if unreadable or len(kept) != len(lines):
        write_atomically(path, "".join(json.dumps(line) + "\n" for line in kept))  # as RunLog.metrics wrote them
        return True
    return False
