"""`python -m train`, with one fault injected at a chosen step, for the fault-tolerance tests.

Run as `python tests/helpers/interrupt.py FAULT STEP RANK [train args...]` (also under `accelerate launch`).
The training code is the real one; only the moment of the fault is pinned down, by wrapping the
data stream, which every step reads once at its start (STEP counts draws, so a fault fires once,
also when a rollback redoes steps):

  signal:TERM / signal:USR1   the rank sends itself that signal at the start of STEP
  double-signal               as signal:TERM, and a second SIGTERM while the checkpoint is written
  kill-in-save                the rank is SIGKILLed halfway through writing the next checkpoint
  die                         the rank is SIGKILLed at the start of STEP
  stop-in-check               the rank stops itself (SIGSTOP) in STEP's collective fault check, before its part
  nan                         the rank's real batch at STEP is all NaN
"""

import os
import signal
import sys

import torch

from train import faults
from train.__main__ import exit_with, main
from train.data import sharding
from train.storage import checkpoint

fault, fault_step, fault_rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rank = int(os.environ.get("RANK", "0"))
draw = sharding.ShardedBatches.next
write_tensors = checkpoint._write_tensors
check = faults.FaultMonitor.check
state = {"step": 0, "armed": False}


def next_batch(self):
    state["step"] += 1
    batch = draw(self)
    if rank != fault_rank or state["step"] != fault_step:
        return batch
    if fault.startswith("signal:"):
        os.kill(os.getpid(), getattr(signal, "SIG" + fault.split(":")[1]))
    elif fault == "double-signal":
        os.kill(os.getpid(), signal.SIGTERM)
        state["armed"] = True
    elif fault == "kill-in-save":
        state["armed"] = True
    elif fault == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == "nan":
        images, labels = batch
        batch = torch.full_like(images, float("nan")), labels
    return batch


def write_tensors_then_fault(path, tensors):
    write_tensors(path, tensors)
    if state["armed"]:
        state["armed"] = False
        os.kill(os.getpid(), signal.SIGTERM if fault == "double-signal" else signal.SIGKILL)


def check_or_stop(self):
    if fault == "stop-in-check" and rank == fault_rank and state["step"] == fault_step:
        os.kill(os.getpid(), signal.SIGSTOP)
    check(self)


sharding.ShardedBatches.next = next_batch
faults.FaultMonitor.check = check_or_stop
checkpoint._write_tensors = write_tensors_then_fault
exit_with(main(sys.argv[4:]))
