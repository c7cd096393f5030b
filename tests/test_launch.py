"""launch/ and train/launch.py: the Accelerate config files, the topology helper, and the shell scripts' lint."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from conftest import REPO, TINY, run_env
from train.errors import EXIT_PREEMPTED
from train.launch import ACCELERATE_CONFIGS, LaunchError, Topology, children, command, detect
from train.storage import manifest

SHELL_SCRIPTS = sorted(str(p.relative_to(REPO))
                       for pattern in ("slurm/*.sbatch", "slurm/*.sh", "benchmarks/*.sh", "tests/helpers/*.sh")
                       for p in REPO.glob(pattern))


@pytest.mark.parametrize("name, distributed, cpu, precision", [
    ("cpu_1", "NO", True, "no"), ("cpu_2", "MULTI_GPU", True, "no"), ("gpu_1", "NO", False, "bf16"),
    ("gpu_node", "MULTI_GPU", False, "bf16"), ("multinode", "MULTI_GPU", False, "bf16")])
def test_accelerate_config_files_load(name, distributed, cpu, precision):
    loaded = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert (loaded.distributed_type, loaded.use_cpu, loaded.mixed_precision) == (distributed, cpu, precision)


def test_topology_of_a_plain_machine():
    assert detect({}, gpus=0, processes_per_machine=None).config_file.name == "cpu_1.yaml"
    two_cpu = detect({}, gpus=0, processes_per_machine=2)
    assert (two_cpu.processes, two_cpu.config_file.name) == (2, "cpu_2.yaml")
    assert detect({}, gpus=1, processes_per_machine=None).config_file.name == "gpu_1.yaml"
    node = detect({"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, gpus=4, processes_per_machine=None)
    assert (node.processes, node.gpu, node.config_file.name) == (4, True, "gpu_node.yaml")


def test_topology_of_a_one_node_slurm_job_uses_a_port_of_its_own():
    job = {"SLURM_JOB_ID": "123456", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu07"}
    topology = detect(job, gpus=8, processes_per_machine=None)
    assert (topology.processes, topology.machine_rank, topology.main_port) == (8, 0, 20000 + 123456 % 20000)


def test_command_fills_in_what_the_environment_knows():
    topology = Topology(machines=2, machine_rank=1, processes_per_machine=4, gpu=True, main_address="node01",
                        main_port=23456)
    line = command(topology, ["--config", "configs/seed.yaml"])
    assert line[line.index("--config_file") + 1].endswith("launch/accelerate/multinode.yaml")
    flags = " ".join(line)
    assert "--num_processes 8 --num_machines 2 --machine_rank 1 --main_process_ip node01 --main_process_port 23456" in flags
    assert "--mixed_precision" not in flags  # bf16 from the config file
    assert line[-4:] == ["-m", "train", "--config", "configs/seed.yaml"]


@pytest.mark.parametrize("environment, gpus, per_machine, message", [
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "n[1-2]"}, 0, None, "srun"),
    ({}, 2, 4, "only 2 GPUs"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "abc"}, 0, None,
     "SLURM_JOB_NUM_NODES='abc' is not a whole number; Slurm sets it inside a job"),
])
def test_topologies_it_cannot_launch_are_refused_with_the_fix(environment, gpus, per_machine, message):
    with pytest.raises(LaunchError, match=message):
        detect(environment, gpus, per_machine)


@pytest.mark.slow
def test_helper_passes_usr1_on_and_returns_after_the_checkpoint(tmp_path, tiny_mnist):
    """One process goes through Accelerate's simple launcher, which does not forward signals itself."""
    run_dir = tmp_path / "run"
    output = (tmp_path / "out.txt").open("w")
    helper = subprocess.Popen(
        [sys.executable, "-m", "train.launch", "--", *TINY, "train.steps=100000", "logging.every=2",
         f"data.path={tiny_mnist}", f"run.dir={run_dir}"],
        cwd=REPO, env=run_env(), stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and helper.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    helper.send_signal(signal.SIGUSR1)
    helper.wait(timeout=120)
    log = (tmp_path / "out.txt").read_text()
    assert "cpu_1.yaml --num_processes 1" in log
    # The helper returned only after the training process had finished its checkpoint.
    assert "SIGTERM received: checkpointing" in log and "exiting with 75" in log, log[-3000:]
    manifest.verify(manifest.newest_valid(run_dir, print))


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (children of each thread)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(child) for child in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            found += children
            queue += children
    return found


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_during_the_start_up_is_a_preemption_and_the_helper_returns_its_exit_code(tmp_path, tiny_mnist,
                                                                                         processes):
    """Before: ranks signalled in their first seconds (imports, the process group) died of it (exit 143) instead
    of checkpointing, and the helper returned torchrun's 1 where the ranks had exited with 75. With one process,
    Accelerate's launcher, signalled too, killed the training (SIGKILL) 5 s later, before its checkpoint."""
    run_dir = tmp_path / "run"
    output = (tmp_path / "out.txt").open("w")
    helper = subprocess.Popen(
        [sys.executable, "-m", "train.launch", "--processes-per-node", str(processes), "--", *TINY,
         "train.steps=100000", "train.check_every=1", f"data.path={tiny_mnist}", f"run.dir={run_dir}"],
        cwd=REPO, env=run_env(), stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while len(launched(helper.pid)) < processes:
        assert helper.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
        time.sleep(0.05)
    time.sleep(1.5)  # past the interpreter's own start, seconds before torch is imported
    assert not (run_dir / "metrics.jsonl").exists()
    helper.send_signal(signal.SIGTERM)
    code = helper.wait(timeout=120)
    log = (tmp_path / "out.txt").read_text()
    assert code == EXIT_PREEMPTED, log[-3000:]
    assert log.count("SIGTERM received: checkpointing at the next step boundary") >= processes, log[-3000:]
    manifest.verify(manifest.newest_valid(run_dir, print))


def launched(helper: int) -> list[int]:
    """The training processes below the helper: the children of the launcher it started (one process's simple
    launcher sets no RANK)."""
    return [pid for launcher in children(helper) for pid in children(launcher)]


@pytest.mark.skipif(shutil.which("shellcheck") is None and os.environ.get("GAN_REQUIRE_SYSTEM_TOOLS") != "1",
                    reason="shellcheck is not installed (`make test` installs it as root)")
def test_shell_scripts_pass_shellcheck():
    assert "slurm/train.sbatch" in SHELL_SCRIPTS and "slurm/train_multinode.sbatch" in SHELL_SCRIPTS
    result = subprocess.run(["shellcheck", "-x", *SHELL_SCRIPTS], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, exited but not yet reaped by its new parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_helper_leaves_no_training_behind_and_its_ranks_checkpoint(tmp_path, tiny_mnist, processes):
    """SIGKILL of `python -m train.launch`: the kernel's parent-death signal reaches the launcher (torchrun, or
    Accelerate's one-process launcher, which dies of it) and, through it, the training. Before: they trained on
    unattended."""
    run_dir = tmp_path / "run"
    output = (tmp_path / "out.txt").open("w")
    helper = subprocess.Popen(
        [sys.executable, "-m", "train.launch", "--processes-per-node", str(processes), "--", *TINY,
         "train.steps=100000", "logging.every=2", f"data.path={tiny_mnist}", f"run.dir={run_dir}"],
        cwd=REPO, env=run_env(), stdout=output, stderr=subprocess.STDOUT)
    started = []
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.jsonl").exists():
            assert helper.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.2)
        started = descendants(helper.pid)  # the launcher and the training processes
        assert len(started) >= 1 + processes
        helper.kill()
        helper.wait()
        deadline = time.monotonic() + 90
        while any(alive(pid) for pid in started):
            assert time.monotonic() < deadline, (tmp_path / "out.txt").read_text()[-3000:]
            time.sleep(0.2)
    finally:  # a failed test leaves nothing running
        for pid in [helper.pid, *started, *descendants(helper.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        helper.wait()
    log = (tmp_path / "out.txt").read_text()
    assert log.count("SIGTERM received: checkpointing at the next step boundary") >= processes, log[-3000:]
    manifest.verify(manifest.newest_valid(run_dir, print))


@pytest.mark.parametrize("processes, batch, message", [
    (2, "data.global_batch=97", "a global batch of 97 (data.global_batch) cannot be shared by 2 processes: each would "
                                "take 48.5 samples; process counts that work: 1, 97; or, on 2 processes, "
                                "data.global_batch=96 or 98"),
    (5, "data.global_batch=32", "cannot be shared by 5 processes: each would take 6.4 samples, not a whole number of "
                                "groups; process counts that work: 1, 2, 4; or, on 5 processes, data.global_batch=40"),
])
def test_a_batch_the_process_count_cannot_share_is_refused_before_anything_is_launched(tmp_path, processes, batch,
                                                                                      message):
    """Before: "process counts that work: []", and under torchrun its ChildFailedError traceback after the refusal."""
    result = subprocess.run([sys.executable, "-m", "train.launch", "--processes-per-node", str(processes), "--", *TINY,
                             "model.bn_group=8" if processes == 5 else "data.batch_size=8", batch,
                             f"run.dir={tmp_path / 'run'}"], cwd=REPO, env=run_env(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "accelerate.commands.launch" not in result.stdout
    assert not (tmp_path / "run").exists()
