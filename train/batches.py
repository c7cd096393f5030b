"""How a run's global batch is shared among its processes and cut into micro-batches and BatchNorm groups. Without
torch, so that `python -m train.launch` refuses a batch its process count cannot share before it launches anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from train.config import Config
from train.errors import ConfigError
from train.storage.manifest import read_state


@dataclasses.dataclass(frozen=True)
class BatchPlan:
    """How the global batch is shared: each of `processes` takes `share` samples per step (its slice of the global
    batch, in rank order) and puts them through the networks in `accumulation` micro-batches; BatchNorm normalises
    over groups of `bn_group` samples, so no cut between processes or micro-batches splits a group."""

    global_batch: int
    processes: int
    share: int
    accumulation: int
    bn_group: int


def batch_plan(cfg: Config, processes: int) -> BatchPlan:
    """The plan for `data.global_batch` and `model.bn_group` (resolved: `resolve_batches`) on `processes`, with the
    fewest micro-batches of at most `data.batch_size`; or a ConfigError naming the process counts that work."""
    total, group, most = cfg.data.global_batch, cfg.model.bn_group, cfg.data.batch_size
    if total % processes or total // processes % group:
        raise ConfigError(f"a global batch of {total} (data.global_batch) in BatchNorm groups of {group} "
                          f"(model.bn_group) cannot be shared by {processes} processes: each would take "
                          f"{total / processes:g} samples, not a whole number of groups; "
                          + _ways_out(total, group, processes))
    share = total // processes
    if most < group:
        raise ConfigError(f"data.batch_size={most} is smaller than model.bn_group={group}, and a forward pass holds "
                          f"at least one BatchNorm group: raise data.batch_size to {group} or more")
    accumulation = next(a for a in range(-(-share // most), share + 1) if share % a == 0 and share // a % group == 0)
    return BatchPlan(total, processes, share, accumulation, group)


def resolve_batches(cfg: Config, resume_from: Path | None, processes: int) -> Config:
    """`data.global_batch` and `model.bn_group` as this run uses them: a resumed run keeps its checkpoint's (older
    checkpoints normalised over each process's share); a new run's are data.batch_size x processes and
    data.batch_size unless set. Refused where a set value differs from the checkpoint's, or the plan cannot be."""
    total, group = cfg.data.global_batch, cfg.model.bn_group
    if resume_from is not None:
        state = read_state(resume_from)
        saved_total = state["global_batch"]
        saved_group = state["config"]["model"].get("bn_group") or saved_total // state["world_size"]
        for key, value, saved in (("data.global_batch", total, saved_total), ("model.bn_group", group, saved_group)):
            if value is not None and value != saved:
                raise ConfigError(f"{key}={value}, and checkpoint {resume_from} was trained with {saved}: set "
                                  f"{key}={saved} (or leave it null) to resume, or start a new run.dir")
        total, group = saved_total, saved_group
    total = total or cfg.data.batch_size * processes
    if group is None and total % processes:  # each process's share, the default group, is no whole number
        raise ConfigError(f"a global batch of {total} (data.global_batch) cannot be shared by {processes} processes: "
                          f"each would take {total / processes:g} samples; " + _ways_out(total, 1, processes))
    group = group or total // processes
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, global_batch=total),
                              model=dataclasses.replace(cfg.model, bn_group=group))
    batch_plan(cfg, processes)
    return cfg


def _ways_out(total: int, group: int, processes: int) -> str:
    """The process counts that share `total` in whole groups of `group`, and the global batches nearest `total`
    that `processes` can share."""
    counts = [n for n in range(1, total + 1) if total % n == 0 and total // n % group == 0]
    step = processes * group
    nearest = [size for size in (total // step * step, (total // step + 1) * step) if size > 0]
    return (f"process counts that work: {', '.join(map(str, counts[:12]))}; or, on {processes} processes, "
            f"data.global_batch={' or '.join(map(str, nearest))}")
