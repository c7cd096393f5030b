"""How much memory a new allocation can have: on the host (to refuse work that would not fit before it starts) and on
a device (the training data is kept there whole)."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def available_memory() -> int:
    """Bytes of host memory available to a new allocation without swapping (Linux's MemAvailable), else all of it."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def free_on(device: torch.device) -> int:
    """Bytes free on `device`: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()


def gib(size: int) -> str:
    return f"{size / 2 ** 30:.3g} GiB"
