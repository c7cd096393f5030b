"""Faults a run must survive, agreed on by all ranks at the same step boundary.

Preemption: SIGTERM or SIGUSR1 on any rank sets a flag; at the next check all ranks learn of it
together, write a checkpoint and exit with EXIT_PREEMPTED, so no rank waits in a collective for a
rank that has left. Non-finite numbers: each step records on the device whether a loss (or, without
fp16 loss scaling, a gradient norm) is non-finite, with no host synchronisation; the check gathers
the first bad step of every rank. In `skip` mode the decision is taken before every optimizer step.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from train.distributed import is_distributed

EXIT_NONFINITE = 3  # stopped on a non-finite loss or gradient; the last checkpoint is intact
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was written on a signal; requeue and the run resumes
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
NETWORK_INDEX = {"discriminator": 0, "generator": 1}


class PreemptionFlag:
    """Remembers the first SIGTERM/SIGUSR1; later ones are ignored so a save is never cut short."""

    def __init__(self):
        self.signal_name: str | None = None
        self.received_at: float | None = None
        for signum in PREEMPTION_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is None:
            self.signal_name, self.received_at = name, time.monotonic()
            print(f"\n{name} received: checkpointing at the next step boundary", file=sys.stderr, flush=True)
        else:
            print(f"\n{name} received while already stopping: ignored", file=sys.stderr, flush=True)

    def report_saved(self, checkpoint_name: str) -> None:
        """On the rank(s) that got the signal: how long the way to a finished checkpoint took."""
        if self.signal_name is not None:
            seconds = time.monotonic() - self.received_at
            print(f"\n{checkpoint_name} finished {seconds:.2f} s after the signal", file=sys.stderr, flush=True)


@dataclass
class NonFinite:
    step: int
    network: str
    loss: float
    rank: int

    def __str__(self) -> str:
        return (f"non-finite {self.network} loss or gradient at step {self.step} on rank {self.rank} "
                f"(loss {self.loss})")


class FaultMonitor:
    """Per-step recording on the device, and the collective check every `train.check_every` steps."""

    def __init__(self, action: str, device: torch.device, check_gradients: bool):
        self.action = action
        self.check_gradients = check_gradients
        self.preemption = PreemptionFlag()
        # A CPU group for control messages, so a check never waits on the accelerator's stream.
        self.group = dist.new_group(backend="gloo") if is_distributed() else None
        self.first_bad_step = torch.full((2,), -1, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros(2, dtype=torch.float64, device=device)

    def allows_update(self, step: int, network: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Record whether this network's loss and gradients are finite; `skip` decides here, collectively."""
        finite = torch.isfinite(loss.detach())
        if self.check_gradients:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if self.action == "skip":
            return self._everyone_agrees(bool(finite))
        index = NETWORK_INDEX[network]
        newly_bad = ~finite & (self.first_bad_step[index] < 0)
        self.first_bad_step[index] = torch.where(newly_bad, step, self.first_bad_step[index])
        self.bad_loss[index] = torch.where(newly_bad, loss.detach().double(), self.bad_loss[index])
        return True

    def check(self) -> tuple[NonFinite | None, bool]:
        """(the earliest non-finite event on any rank, whether any rank was signalled). Collective."""
        local = torch.cat([self.first_bad_step.double(), self.bad_loss,
                           torch.tensor([self.preemption.signal_name is not None], dtype=torch.float64,
                                        device=self.first_bad_step.device)]).cpu()
        rows = [local]
        if self.group is not None:
            rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, local, group=self.group)
        events = [NonFinite(int(row[i]), network, float(row[2 + i]), rank)
                  for rank, row in enumerate(rows) for network, i in NETWORK_INDEX.items() if row[i] >= 0]
        preempted = any(bool(row[4]) for row in rows)
        # Gradients are all-reduced, so a NaN on one rank reaches every rank's gradients: name the
        # earliest step, D before G, and the rank whose loss itself went non-finite.
        earliest = min(events, key=lambda e: (e.step, NETWORK_INDEX[e.network], math.isfinite(e.loss), e.rank),
                       default=None)
        return earliest, preempted

    def reset(self) -> None:
        self.first_bad_step.fill_(-1)
        self.bad_loss.zero_()

    def _everyone_agrees(self, local_ok: bool) -> bool:
        if self.group is None:
            return local_ok
        flag = torch.tensor([0 if local_ok else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag.item() == 0
