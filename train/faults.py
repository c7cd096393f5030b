"""Faults a run must survive, agreed on by all ranks at the same step boundary.

Preemption: SIGTERM or SIGUSR1 on any rank sets a flag (train/preemption.py); at the next check all
ranks learn of it together, write a checkpoint and exit with EXIT_PREEMPTED, so no rank waits in a
collective for a rank that has left. Non-finite numbers: each step writes each network's loss and
(without fp16 loss scaling) its largest gradient norm into a small buffer on the device, a handful
of operations and no host synchronisation; the check reads the steps since the last check on every
rank and names the first bad one. In `skip` mode the decision is taken before every optimizer step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from train import preemption
from train.distributed import is_distributed

NETWORK_INDEX = {"discriminator": 0, "generator": 1}


class Preempted(Exception):
    """Some rank got SIGTERM or SIGUSR1: every rank writes a checkpoint and exits with EXIT_PREEMPTED."""

    def __init__(self, flag: preemption.PreemptionFlag):
        super().__init__(flag.signal_name)
        self.flag = flag


class NonFiniteError(Exception):
    """A non-finite loss or gradient on some rank: every rank rolls back or stops (`train.on_nonfinite`)."""

    def __init__(self, event: NonFinite):
        super().__init__(str(event))
        self.event = event


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
    """Per-step recording on the device, and the collective check at least every `check_every` steps."""

    def __init__(self, action: str, device: torch.device, check_gradients: bool, check_every: int, timeout_s: int):
        self.action = action
        self.check_gradients = check_gradients
        self.skipped = False  # in skip mode: whether an update of the current step was skipped
        self.preemption = preemption.install()
        # A CPU group for control messages, so a check never waits on the accelerator's stream. A group takes
        # torch's 30-minute default, not the default group's, unless told: a stopped rank must fail the check
        # after train.timeout_s like any other collective.
        self.group = (dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)) if is_distributed()
                      else None)
        # This step's [network, (loss, largest gradient norm)], written inside the step at a fixed
        # address (a CUDA graph replays the same writes), then filed by `end_step` into the steps
        # since the last check. NaN or inf marks a bad step.
        self.current = torch.zeros(len(NETWORK_INDEX), 2, device=device)
        self.recent = torch.zeros(check_every, len(NETWORK_INDEX), 2, device=device)
        self.recent_steps: list[int] = []

    @torch.no_grad()
    def allows_update(self, network: str, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> bool:
        """Record this network's loss and gradient norm for the next check; `skip` decides here, collectively."""
        # Under fp16 loss scaling, inf gradients are GradScaler's to handle: only the loss is checked.
        health = torch.stack([loss, self._largest_gradient_norm(optimizer) if self.check_gradients else loss])
        if self.action == "skip":
            allowed = self._everyone_agrees(bool(health.isfinite().all()))
            self.skipped = self.skipped or not allowed
            return allowed
        self.current[NETWORK_INDEX[network]].copy_(health)
        return True

    @contextmanager
    def statistics_kept_if_skipped(self, *networks: torch.nn.Module):
        """In `skip` mode: the networks' buffers (BatchNorm's running statistics) put back as they were where an
        update inside was skipped; elsewhere nothing (no copies, and nothing a CUDA graph cannot replay)."""
        if self.action != "skip":
            yield
            return
        saved = [[buffer.clone() for buffer in network.buffers()] for network in networks]
        self.skipped = False
        yield
        if self.skipped:
            with torch.no_grad():
                for network, buffers in zip(networks, saved):
                    for buffer, before in zip(network.buffers(), buffers):
                        buffer.copy_(before)

    def end_step(self, step: int) -> None:
        """File this step's record for the next check (outside the step: the slot changes every step)."""
        if self.action != "skip":  # skip mode acted on the numbers inside the step already
            self.recent[len(self.recent_steps)].copy_(self.current)
            self.recent_steps.append(step)

    def check(self) -> None:
        """Raise NonFiniteError for the earliest non-finite event on any rank, else Preempted where any rank was
        signalled; every rank raises the same. Collective."""
        local = torch.cat([self.recent[:len(self.recent_steps)].flatten().double().cpu(),
                           torch.tensor([self.preemption.signal_name is not None], dtype=torch.float64)])
        rows = [local]
        if self.group is not None:
            rows = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(rows, local, group=self.group)
        events = []
        for rank, row in enumerate(rows):
            health = row[:-1].view(len(self.recent_steps), len(NETWORK_INDEX), 2)
            for network, i in NETWORK_INDEX.items():
                bad = (~health[:, i].isfinite().all(dim=1)).nonzero()
                if len(bad):
                    step_index = int(bad[0])
                    events.append(NonFinite(self.recent_steps[step_index], network, float(health[step_index, i, 0]),
                                            rank))
        preempted = any(bool(row[-1]) for row in rows)
        self.recent_steps.clear()
        # Gradients are all-reduced, so a NaN on one rank reaches every rank's gradients: name the
        # earliest step, D before G, and the rank whose loss itself went non-finite.
        earliest = min(events, key=lambda e: (e.step, NETWORK_INDEX[e.network], math.isfinite(e.loss), e.rank),
                       default=None)
        if earliest is not None:
            raise NonFiniteError(earliest)
        if preempted:
            raise Preempted(self.preemption)

    @staticmethod
    def _largest_gradient_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """NaN or inf when any gradient has one; three operations, whatever the number of tensors."""
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        return torch.stack(torch._foreach_norm(grads)).amax()

    def _everyone_agrees(self, local_ok: bool) -> bool:
        if self.group is None:
            return local_ok
        flag = torch.tensor([0 if local_ok else 1])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return flag.item() == 0
