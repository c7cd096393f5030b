"""`python -m train.launch [options] -- TRAIN_ARGS`: the right `accelerate launch` line for this machine.

It reads the topology (Slurm's variables, the GPUs this process can see, or a plain CPU machine),
picks the matching file in launch/accelerate/, fills in what only the environment knows (machine
rank, main address and port, process counts), prints the line and runs it.

While it runs it stays the parent of everything it started: SIGTERM, SIGUSR1 (Slurm's warning) or
SIGINT (Ctrl-C) is passed on as SIGTERM to every training process (not to the launcher, which would kill them
before their checkpoint is written), and this
helper returns only when all of them have exited, so a caller that waits for it knows the checkpoint
is written. (torchrun itself dies on SIGUSR1, and Accelerate's one-process launcher does not pass
signals on at all.) Should this helper itself be killed (SIGKILL, the OOM killer), the launcher and the
training processes get SIGTERM from the kernel (a parent-death signal), checkpoint and exit, instead of
training on unattended.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from train.config import REPO_ROOT
from train.errors import EXIT_BAD_INPUT

ACCELERATE_CONFIGS = REPO_ROOT / "launch" / "accelerate"
# A folder where each training process leaves its exit code (`rank_<r>`): torchrun and Accelerate's
# one-process launcher exit with 1 whatever their processes' codes were.
EXIT_CODES_ENV = "GAN_EXIT_CODES_DIR"
PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent exits
PR_SET_CHILD_SUBREAPER = 36  # prctl option: orphaned descendants are re-parented to this process


class LaunchError(Exception):
    """A topology this helper cannot launch; the message says what to change."""


@dataclass(frozen=True)
class Topology:
    machines: int
    machine_rank: int
    processes_per_machine: int
    gpu: bool
    main_address: str
    main_port: int

    @property
    def processes(self) -> int:
        return self.machines * self.processes_per_machine

    @property
    def config_file(self) -> Path:
        if self.machines > 1:
            name = "multinode"
        elif self.gpu:
            name = "gpu_node" if self.processes_per_machine > 1 else "gpu_1"
        else:
            name = "cpu_2" if self.processes_per_machine > 1 else "cpu_1"
        return ACCELERATE_CONFIGS / f"{name}.yaml"


def detect(environ: dict[str, str], gpus: int, processes_per_machine: int | None) -> Topology:
    """Slurm job (one launcher per node), or one machine; GPUs when this process sees any."""
    per_machine = processes_per_machine or max(gpus, 1)
    if gpus and per_machine > gpus:
        raise LaunchError(f"{per_machine} processes per node but only {gpus} GPUs are visible; "
                          f"use at most {gpus} (one process per GPU)")
    if "SLURM_JOB_ID" not in environ:
        return Topology(1, 0, per_machine, gpus > 0, "127.0.0.1", free_port())
    machines = _whole_number(environ, "SLURM_JOB_NUM_NODES" if "SLURM_JOB_NUM_NODES" in environ else "SLURM_NNODES")
    if machines > 1 and "SLURM_STEP_ID" not in environ:
        raise LaunchError(f"this job has {machines} nodes: start one launcher per node with "
                          "`srun --ntasks-per-node=1 python -m train.launch ...` (see slurm/train_multinode.sbatch)")
    # A port of this job's own, so two jobs sharing a node do not collide.
    port = 20000 + _whole_number(environ, "SLURM_JOB_ID") % 20000
    return Topology(machines, _whole_number(environ, "SLURM_NODEID", default=0), per_machine, gpus > 0,
                    first_host(environ["SLURM_JOB_NODELIST"]) if machines > 1 else "127.0.0.1", port)


def _whole_number(environ: dict[str, str], name: str, default: int = 1) -> int:
    """A count Slurm sets in the environment; anything else there is named."""
    value = environ.get(name, str(default))
    if not value.isdigit():
        raise LaunchError(f"{name}={value!r} is not a whole number; Slurm sets it inside a job: run this helper from "
                          f"the job's script, or unset {name} outside one")
    return int(value)


def first_host(nodelist: str) -> str:
    hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                           capture_output=True, text=True).stdout.split()
    return hosts[0]


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def command(topology: Topology, train_args: list[str]) -> list[str]:
    line = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(topology.config_file),
            "--num_processes", str(topology.processes), "--num_machines", str(topology.machines)]
    if topology.processes > 1:
        line += ["--machine_rank", str(topology.machine_rank), "--main_process_ip", topology.main_address,
                 "--main_process_port", str(topology.main_port)]
    if not topology.gpu:
        line += ["--mixed_precision", "no"]  # the GPU configs ask for bf16
    return [*line, "-m", "train", *train_args]


def run(line: list[str], environment: dict[str, str]) -> int:
    """Run the launcher in its own process group; pass on preemption; wait for every descendant.

    Returns the training's exit code where the launcher failed and its processes agree on one (75
    after a preemption, 74 on a full disk, ...), else the launcher's."""
    with tempfile.TemporaryDirectory(prefix="gan-exit-codes-") as codes:
        code = _run_and_wait(line, dict(environment, **{EXIT_CODES_ENV: codes}))
        agreed = {path.read_text() for path in Path(codes).iterdir()}
    return int(agreed.pop()) if code != 0 and len(agreed) == 1 else code


def stop_with_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent exits (Linux; elsewhere nothing): for the
    processes this helper starts, which must not outlive it. One whose parent is gone already stops now."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent exited before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def children(pid: int) -> list[int]:
    """The processes `pid` started (each of its threads' children, from /proc): the training processes of a launcher."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):  # gone meanwhile
            found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _run_and_wait(line: list[str], environment: dict[str, str]) -> int:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    launcher = subprocess.Popen(line, env=environment, start_new_session=True, preexec_fn=stop_with_parent)

    def forward(signum, frame) -> None:
        """Each of them means "checkpoint and stop": the SIGTERM every training process handles. Only they get it:
        the launcher, signalled, kills them a few seconds later (Accelerate's one-process launcher: SIGKILL after
        5 s) and would cut a checkpoint short. Before they exist, the launcher's whole group gets it."""
        targets = children(launcher.pid)
        for pid in targets:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        if not targets:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(launcher.pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(signum, forward)
    code = None
    while True:  # the launcher, then any training process it left behind (re-parented to us)
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == launcher.pid:
            code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def refused_before_launch(train_args: list[str], processes: int) -> str | None:
    """What `python -m train TRAIN_ARGS` on `processes` processes would refuse of its config and batch (read here,
    before any process starts: a refusal from inside a launcher ends in the launcher's traceback), or None."""
    from train.batches import resolve_batches
    from train.config import parse_args
    from train.errors import RunError
    from train.storage.manifest import resume_point
    try:
        cfg = parse_args(train_args)
        resolve_batches(cfg, resume_point(cfg.resume, Path(cfg.run.dir), lambda _: None), processes)
    except RunError as error:
        return str(error)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.launch", description=__doc__.split("\n\n")[0],
        epilog="Example: python -m train.launch -- --config configs/smoke.yaml train.steps=50")
    parser.add_argument("--processes-per-node", type=int, default=None,
                        help="default: one per visible GPU, or 1 on a CPU machine")
    parser.add_argument("--dry-run", action="store_true", help="print the command line, do not run it")
    parser.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: arguments of `python -m train`")
    args = parser.parse_args(argv)
    train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
    if args.processes_per_node is not None and args.processes_per_node < 1:
        parser.error("--processes-per-node must be 1 or more")
    import torch
    gpus = torch.cuda.device_count()
    try:
        topology = detect(dict(os.environ), gpus, args.processes_per_node)
    except LaunchError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    line = command(topology, train_args)
    if not args.dry_run and (refusal := refused_before_launch(train_args, topology.processes)) is not None:
        print(f"error: {refusal}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(shlex.join(line), flush=True)
    if args.dry_run:
        return 0
    # Accelerate's torchrun path does not pass the config's `use_cpu` on; Accelerate reads this.
    environment = dict(os.environ, **({} if topology.gpu else {"ACCELERATE_USE_CPU": "true"}))
    return run(line, environment)


if __name__ == "__main__":
    sys.exit(main())
