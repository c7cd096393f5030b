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

import signal
import sys
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
            print(f"\n{name} received: checkpointing at the next step boundary{at_once}", file=sys.stderr, flush=True)
        else:
            print(f"\n{name} received while already stopping: ignored", file=sys.stderr, flush=True)

    def report_saved(self, checkpoint_name: str) -> None:
        """On the rank(s) that got the signal: how long the way to a finished checkpoint took."""
        if self.signal_name is not None:
            seconds = time.monotonic() - self.received_at
            print(f"\n{checkpoint_name} finished {seconds:.2f} s after the signal", file=sys.stderr, flush=True)


_FLAG = PreemptionFlag()


def install() -> PreemptionFlag:
    """The process's flag, with its handler (re)installed: again after a library that may have set its own."""
    for signum in PREEMPTION_SIGNALS:
        signal.signal(signum, _FLAG.handle)
    return _FLAG
