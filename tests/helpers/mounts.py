"""Small or read-only file systems for the write-failure tests: real tmpfs mounts (root only).

Under CI (GAN_REQUIRE_SYSTEM_TOOLS=1, as root) a mount that fails is a failure; elsewhere the test is skipped
with the reason.
"""

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(path: Path, options: str):
    """A fresh tmpfs mounted at `path` (made if missing) with mount's `options`, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        reason = f"cannot mount a tmpfs here ({mounted.stderr.strip()}); these tests need root"
        if os.environ.get("GAN_REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)
