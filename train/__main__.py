"""`python -m train [--config FILE] [key=value ...]`: one training run (exit codes in the README).

The preemption handler comes first, so a SIGTERM during the start-up is a preemption like any
other. The configuration, run.dir's lock and the checkpoint to resume from are read and checked
before torch and the training code are imported, so a mistake in any is reported at once instead
of after the seconds they take to load.
"""

from train import preemption

preemption.install()  # before the slow imports and start-up below

import gc  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from contextlib import nullcontext  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NoReturn  # noqa: E402

from train.storage import layout, run_lock  # noqa: E402
from train.config import Config, changed_settings, parse_args  # noqa: E402
from train.errors import EXIT_BAD_INPUT, EXIT_WRITE_FAILED, ConfigError, RunError, RunWriteError  # noqa: E402
from train.launch import EXIT_CODES_ENV, stop_with_parent  # noqa: E402
from train.networks import NetworkOptions  # noqa: E402
from train.storage.manifest import read_state, resume_point  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """The exit code; also left where `python -m train.launch` asked, as the launcher in between replaces it."""
    if os.environ.get(EXIT_CODES_ENV):  # started by `python -m train.launch`: stop (checkpoint) should it die
        stop_with_parent()
    code = run(argv)
    if os.environ.get(EXIT_CODES_ENV):
        Path(os.environ[EXIT_CODES_ENV], f"rank_{os.environ.get('RANK', '0')}").write_text(str(code))
    return code


def run(argv: list[str] | None) -> int:
    try:
        cfg = parse_args(argv)
        first_rank = os.environ.get("RANK", "0") == "0"  # set by `accelerate launch`; no process group yet
        report = print if first_rank else lambda _: None
        with run_lock.exclusive(Path(cfg.run.dir), report) if first_rank else nullcontext():
            return start(cfg, report)
    except RunError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunWriteError as error:  # a full disk or quota: the checkpoints written so far are intact
        print(f"error: {error}", file=sys.stderr)
        return EXIT_WRITE_FAILED


def start(cfg: Config, report) -> int:
    """Train from the resume point, unless its checkpoint already reached train.steps."""
    layout.check(Path(cfg.run.dir))
    resume_from = resume_point(cfg.resume, Path(cfg.run.dir), report)
    if resume_from is not None:
        state = read_state(resume_from)
        if state["progress"]["step"] >= cfg.train.steps:
            # A finished run started again (a requeued job, `make train` twice): leave its files as they are.
            report(f"nothing to train: {resume_from} is at step {state['progress']['step']} and "
                   f"train.steps={cfg.train.steps}; to train on, raise train.steps")
            return 0
        if (met := quality_target_met(state["progress"], cfg)) is not None:
            report(f"nothing to train: {resume_from} {met}")
            return 0
        state["config"]["model"].setdefault("conditional", False)  # made before the key existed
        state["config"]["model"] |= vars(NetworkOptions.of(state["config"]["model"]))
        report_changed_settings(changed_settings(state["config"], cfg), report)
    from train.loop import train  # loaded only for a run that can start

    return train(cfg, resume_from)


def quality_target_met(progress: dict, cfg: Config) -> str | None:
    """What a checkpoint's progress already met of train.stop_at_fd and train.patience (with the fix), or None."""
    best, target, patience = progress.get("best_fd"), cfg.train.stop_at_fd, cfg.train.patience
    if target is not None and best is not None and best <= target:
        return (f"has an FD of {best:.4g}, at or below train.stop_at_fd={target:g}; to train on, lower "
                "train.stop_at_fd or set it to null")
    waited = progress.get("evaluations_since_best", 0)
    if patience is not None and waited >= patience:
        return (f"ended {waited} evaluations without a lower FD (train.patience={patience}); to train on, raise "
                "train.patience or set it to null")
    return None


# Settings the checkpoint's tensors were made for: another value cannot resume from them.
FIXED_ON_RESUME = {"optim.amsgrad": "the checkpoint's Adam state was made with",
                   "model.conditional": "the checkpoint's networks were made with", **NetworkOptions.fixed_on_resume()}


def report_changed_settings(changed: dict[str, tuple], report) -> None:
    """A resumed run uses its own config (config.yaml records it), and says what differs from the checkpoint's."""
    for key, made_with in FIXED_ON_RESUME.items():
        if key in changed:
            saved, now = (str(value).lower() for value in changed[key])
            raise ConfigError(f"{key} is {now}, {made_with} {saved}: set {key}={saved} to resume, or start a new "
                              "run.dir")
    if changed:
        report("resuming with changed settings (the new values apply): "
               + ", ".join(f"{key} {saved!r} -> {now!r}" for key, (saved, now) in changed.items()))


def exit_with(code: int) -> NoReturn:
    """Exit with `code` without Python's final garbage collection: it walks every object torch and its compiler
    stack made, none of which needs finalising once the run has closed its files and logs, and took 1.3 s of the
    6 s a six-step run takes from start to exit."""
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    exit_with(main())
