"""Preemption: SIGTERM or SIGUSR1 (Slurm's warning before a time limit, a preempting job, `scancel
--signal`), or SIGINT (Ctrl-C), sets a flag that the training loop acts on at its next check
(train/faults.py): a checkpoint, then exit 75, and the same command resumes. Later signals are ignored,
so that a save is never cut short: launchers pass a Ctrl-C on to processes that had it from the terminal
already. SIGQUIT (Ctrl-\\) still stops at once, the newest checkpoint intact.

`python -m train` installs the handler before anything slow (imports, the process group, the data),
so a signal during the start-up is a preemption like any other and not the default death by
SIGTERM (exit 143). Without torch.
"""

from __future__ import annotations

import os
import signal
import time

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class PreemptionFlag:
    """Remembers the first SIGTERM/SIGUSR1/SIGINT; later ones are ignored so a save is never cut short."""

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None

    def handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self.received_at = name, time.monotonic()
            at_once = " (Ctrl-\\ stops at once, without it)" if signum == signal.SIGINT else ""
            _say(f"{name} received: checkpointing at the next step boundary{at_once}")
        else:
            _say(f"{name} received while already stopping: ignored")

    def report_saved(self, checkpoint_name: str) -> None:
        """On the rank(s) that got the signal: how long the way to a finished checkpoint took."""
        if self.signal_name is not None:
            seconds = time.monotonic() - self.received_at
            _say(f"{checkpoint_name} finished {seconds:.2f} s after the signal")


def _say(line: str) -> None:
    """Straight to file descriptor 2. A handler runs wherever the main thread was; inside a write to sys.stderr
    (the progress bar), a print of its own can raise (reentrant call) or lose its line (python/cpython#119506)."""
    os.write(2, f"\n{line}\n".encode())


_FLAG = PreemptionFlag()


def install() -> PreemptionFlag:
    """The process's flag, with its handler (re)installed: again after a library that may have set its own."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, _FLAG.handle)
    return _FLAG
