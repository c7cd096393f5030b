"""An optional torch.profiler window over a few training steps: where the host and the device spend a step.

`profile.steps=N` records N steps after `profile.after` steps of this process, on the main process,
and writes into `<run.dir>/profile/`: `trace.json` (open in https://ui.perfetto.dev or
chrome://tracing) and `ops.txt`, the operators ranked by self host time and, on a GPU, by self
device time, headed by the operators per step: each top-level operator is one dispatch from
Python or the autograd engine, and on a GPU at least one kernel launch, so their number is what a
host-bound loop pays for. A loop that is host-bound shows a host time per step well above its
device time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

from train.config import ProfileConfig
from train.storage.layout import PROFILE_DIR


class StepProfiler:
    def __init__(self, cfg: ProfileConfig, run_dir: Path, device: torch.device, enabled: bool):
        self.folder = run_dir / PROFILE_DIR
        self.steps = cfg.steps
        self.profiler = None
        if cfg.steps and enabled:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self.profiler = profile(activities=activities, on_trace_ready=self._write,
                                    schedule=schedule(wait=cfg.after - 1, warmup=1, active=cfg.steps, repeat=1))
            self.profiler.start()
            self.last_step = cfg.after + cfg.steps

    def step(self) -> None:
        """Call once per training step; the profiler stops itself after its window."""
        if self.profiler is None:
            return
        self.profiler.step()
        if self.profiler.step_num >= self.last_step:
            self.profiler.stop()
            self.profiler = None

    def _write(self, finished: profile) -> None:
        """A profile that cannot be written (a full disk) is reported, and the training goes on without it."""
        trace = self.folder / "trace.json"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            trace.unlink(missing_ok=True)  # a resumed run's profile replaces the earlier attempt's
            finished.export_chrome_trace(str(trace))  # written by kineto, which only logs a failure
            if not trace.is_file():
                raise OSError(f"kineto could not write {trace}")
            self._write_tables(finished)
        except OSError as error:
            for partial in (trace.with_name("trace.json.tmp"), trace, self.folder / "ops.txt"):
                partial.unlink(missing_ok=True)
            print(f"warning: writing the profile into {self.folder} failed ({error}); training goes on without it",
                  file=sys.stderr, flush=True)

    def _write_tables(self, finished: profile) -> None:
        averages = finished.key_averages()
        top_level, operators, kernels = operator_counts(finished.events())
        counts = (f"per step: {top_level / self.steps:.1f} top-level host operators "
                  f"({operators / self.steps:.1f} with the nested ones)"
                  + (f", {kernels / self.steps:.1f} device kernels and copies" if kernels else ""))
        tables = [f"{self.steps} training steps; times are totals over them", counts + "\n",
                  "=== by self host (CPU) time ===",
                  averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70)]
        if any(event.self_device_time_total for event in averages):
            tables += ["=== by self device time ===",
                       averages.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)]
        (self.folder / "ops.txt").write_text("\n".join(tables))
        print(f"profile of {self.steps} steps written to {self.folder}; {counts}", flush=True)


def operator_counts(events) -> tuple[int, int, int]:
    """(top-level host operators, all host operators, device kernels and copies). record_function
    ranges such as ProfilerStep# and Optimizer.step are not operators and do not nest them."""
    host = [event for event in events if event.device_type == DeviceType.CPU and not event.is_user_annotation]

    def nested(event) -> bool:
        parent = event.cpu_parent
        while parent is not None and parent.is_user_annotation:
            parent = parent.cpu_parent
        return parent is not None

    kernels = sum(event.device_type != DeviceType.CPU for event in events)
    return sum(not nested(event) for event in host), len(host), kernels
