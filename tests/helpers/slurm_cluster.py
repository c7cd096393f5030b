"""A real Slurm 22.05 cluster on this host for the template tests: munged, slurmctld and two slurmd.

Everything lives in one folder (config, key, sockets, state, logs). The daemons run in the
foreground (`-D`) in their own sessions and are stopped by the PIDs kept here, never by name.
The two emulated nodes are two `slurmd -N NAME` on 127.0.0.1 with a port each; their names must
resolve (they become the main address of multi-node jobs), so a line for them is added to
/etc/hosts while the cluster runs (this needs root, as the daemons do). No cgroups, no
accounting. Requeued jobs may start again after `cred_expire` + 1 s, so the credential lifetime
is 10 s instead of 120 s.

`python tests/helpers/slurm_cluster.py FOLDER` starts one by hand and prints how to use it; Ctrl-C stops it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from train.launch import free_port

PROGRAMS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "sinfo", "scancel")
NODES = ("gantest-node1", "gantest-node2")
CPUS_PER_NODE = 2
PARTITION = "debug"
HOSTS_FILE = Path("/etc/hosts")


@contextmanager
def _hosts_file_locked():
    """/etc/hosts open for reading and writing, under a lock that other clusters' edits wait for."""
    with HOSTS_FILE.open("r+") as hosts:
        fcntl.lockf(hosts, fcntl.LOCK_EX)
        yield hosts


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if shutil.which(name) is None]


def resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


class LocalSlurm:
    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.conf = self.folder / "slurm.conf"
        self.munge_socket = self.folder / "munge" / "munge.socket.2"
        self.nodes = NODES
        # Its own line, named by its folder: a second cluster running at once adds and removes only its own.
        self.hosts_line = f"127.0.0.1 {' '.join(NODES)}  # tests/helpers/slurm_cluster.py {self.folder}\n"
        self.added_hosts_line = False
        self.processes: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, squeue, the jobs themselves) needs to reach this cluster."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> None:
        self._make_node_names_resolve()
        self._write_files()
        munge_dir = self.munge_socket.parent
        self._daemon("munged", ["munged", "--foreground", "--force", f"--socket={self.munge_socket}",
                                f"--key-file={munge_dir / 'munge.key'}", f"--pid-file={munge_dir / 'munged.pid'}",
                                f"--seed-file={munge_dir / 'munged.seed'}", f"--log-file={munge_dir / 'munged.log'}"])
        self._wait_for(lambda: self.munge_socket.exists(), timeout, "munged to open its socket")
        self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        for name in self.nodes:
            self._daemon(f"slurmd-{name}", ["slurmd", "-D", "-N", name, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, timeout, "both nodes to be idle")

    def stop(self) -> None:
        """Cancel what is still queued, then end the daemons this object started, newest first."""
        if self.processes and self.processes[-1].poll() is None:
            subprocess.run(["scancel", "--full", f"--partition={PARTITION}"], env=self.env, capture_output=True)
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()
        if self.added_hosts_line:
            with _hosts_file_locked() as hosts:
                text = hosts.read().replace(self.hosts_line, "")
                hosts.seek(0)
                hosts.truncate()
                hosts.write(text)
            self.added_hosts_line = False

    def _make_node_names_resolve(self) -> None:
        """Multi-node jobs use the first node's name as the main address, as on a real cluster. The line is
        added even where another cluster's line resolves the names now: that one goes when its cluster stops."""
        with _hosts_file_locked() as hosts:
            text = hosts.read()
            hosts.write(("" if text.endswith("\n") or not text else "\n") + self.hosts_line)
        self.added_hosts_line = True

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict: JobState, Restarts, ExitCode, ..."""
        text = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, check=True,
                              capture_output=True, text=True).stdout
        return dict(field.split("=", 1) for field in text.split() if "=" in field)

    def logs(self) -> str:
        return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')[-4000:]}"
                         for path in sorted(self.folder.glob("*.log")))

    def _daemon(self, name: str, command: list[str]) -> None:
        log = open(self.folder / f"{name}.out", "wb")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
        log.close()

    def _nodes_idle(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}\n{self.logs()}")
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], env=self.env, capture_output=True, text=True)
        return states.returncode == 0 and states.stdout.split() == ["idle"] * len(self.nodes)

    def _wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for {what}\n{self.logs()}")
            time.sleep(0.2)

    def _write_files(self) -> None:
        munge_dir = self.munge_socket.parent
        munge_dir.mkdir(parents=True, exist_ok=True)
        munge_dir.chmod(0o755)  # munged wants the socket's folder searchable by all
        key = munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for name in self.nodes:
            (self.folder / "spool" / name).mkdir(parents=True, exist_ok=True)
        (self.folder / "state").mkdir(exist_ok=True)
        nodes = "\n".join(f"NodeName={name} NodeHostname={name} NodeAddr=127.0.0.1 Port={free_port()} CPUs={CPUS_PER_NODE} "
                          "RealMemory=2000 State=UNKNOWN" for name in self.nodes)
        self.conf.write_text(f"""\
ClusterName=gantest
SlurmctldHost=localhost
SlurmctldPort={free_port()}
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=10
StateSaveLocation={self.folder}/state
SlurmdSpoolDir={self.folder}/spool/%n
SlurmctldPidFile={self.folder}/slurmctld.pid
SlurmdPidFile={self.folder}/slurmd-%n.pid
SlurmctldLogFile={self.folder}/slurmctld.log
SlurmdLogFile={self.folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=1,bf_interval=1
KillWait=5
MinJobAge=600
{nodes}
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")


if __name__ == "__main__":
    if missing := missing_programs():
        sys.exit(f"missing: {' '.join(missing)}; install Debian's slurmctld slurmd slurm-client munge")
    with LocalSlurm(Path(sys.argv[1])) as cluster:
        print(f"Slurm is up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
        signal.sigwait(stop_signals)
