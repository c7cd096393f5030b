"""The sbatch templates, submitted as they ship to a real Slurm cluster on this host (tests/helpers/slurm_cluster.py).

Slurm needs root and Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs
them where it can). Without them these tests are skipped, unless GAN_REQUIRE_SYSTEM_TOOLS=1 (CI sets it)
makes that a failure.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import (PROCESS_COUNT_TOLERANCE, REPO, all_state, final_weights, largest_relative_difference,
                      latest_checkpoint, run_env, weights)
from helpers.slurm_cluster import HOSTS_FILE, LocalSlurm, missing_programs, resolves
from train.distributed import weights_digest
from train.plots import read_metrics
from train.storage import manifest

pytestmark = [pytest.mark.slow, pytest.mark.slurm]
# The smoke config shortened through GAN_ARGS, as a user would: 80 steps, checkpoints at 40 and 80,
# a metrics line every 10 steps (what the preemption test waits for). Only the single-node run
# evaluates; only the preempted one logs to W&B (offline), whose continuity it checks.
STEPS = 80
SHORT = f"train.steps={STEPS} checkpoint.every=40 logging.every=10"
SMOKE = {"GAN_CONFIG": "configs/smoke.yaml", "GAN_ARGS": SHORT}
NO_EVAL = SMOKE | {"GAN_ARGS": f"{SHORT} eval.num_samples=0"}
JOB_TIMEOUT_S = 240
FAILED_STATES = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def skip_without_slurm() -> None:
    problem = (f"Slurm is not installed ({', '.join(missing_programs())} missing; `make test` installs it as root)"
               if missing_programs() else "a Slurm cluster needs root" if os.geteuid() != 0 else None)
    if problem and os.environ.get("GAN_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(f"{problem}, and GAN_REQUIRE_SYSTEM_TOOLS=1")
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    skip_without_slurm()
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def test_two_clusters_at_once_keep_their_node_names_until_each_stops(tmp_path):
    """First in this file, before the session's cluster: the node names resolve only through these two. Before,
    the second found the first's /etc/hosts line, added none, and lost its names when the first stopped."""
    skip_without_slurm()
    before = HOSTS_FILE.read_text()
    first, second = LocalSlurm(tmp_path / "first"), LocalSlurm(tmp_path / "second")
    try:
        first._make_node_names_resolve()
        second._make_node_names_resolve()
        first.stop()
        assert all(resolves(name) for name in second.nodes)
    finally:
        first.stop()
        second.stop()
    assert HOSTS_FILE.read_text() == before


class Job:
    """One submitted template: its id, its Slurm output file, its run directory."""

    def __init__(self, cluster: LocalSlurm, template: str, folder: Path, sbatch_options: list[str],
                 variables: dict[str, str]):
        self.cluster, self.run_dir, self.output = cluster, folder / "run", folder / "slurm.out"
        env = run_env(**{"SLURM_CONF": str(cluster.conf), "GAN_RUN_DIR": str(self.run_dir), **variables})
        submitted = subprocess.run(["sbatch", "--parsable", f"--output={self.output}", *sbatch_options, template],
                                   cwd=REPO, env=env, capture_output=True, text=True, check=True)
        self.id = submitted.stdout.strip().split(";")[0]

    def state(self) -> dict[str, str]:
        return self.cluster.job(self.id)

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def wait_until(self, condition, what: str, timeout: float = JOB_TIMEOUT_S) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if condition(state):
                return state
            if state["JobState"] in FAILED_STATES or time.monotonic() > deadline:
                pytest.fail(f"job {self.id} is {state['JobState']} while waiting for {what}\n"
                            f"{self.log()[-6000:]}\n{self.cluster.logs()}")
            time.sleep(0.5)

    def wait_completed(self) -> dict[str, str]:
        state = self.wait_until(lambda s: s["JobState"] == "COMPLETED", "completion")
        assert state["ExitCode"] == "0:0", self.log()[-4000:]
        return state

    def metrics(self) -> list[dict]:
        path = self.run_dir / "metrics.jsonl"
        return read_metrics(path)[0] if path.exists() else []  # polled while the job appends to it

    def logged_steps(self) -> list[int]:
        return [line["step"] for line in self.metrics()]

    def preempt_after_step(self, step: int, restarts: int) -> str:
        """USR1 to the batch script, as Slurm sends before a time limit; returns the checkpoint it left."""
        self.wait_until(lambda s: any(logged > step for logged in self.logged_steps()),
                        f"a metrics line after step {step}")
        subprocess.run(["scancel", "--signal=USR1", "--batch", self.id], env=self.cluster.env, check=True)
        self.wait_until(lambda s: int(s["Restarts"]) == restarts, f"requeue number {restarts}")
        return latest_checkpoint(self.run_dir).name


def check_finished_run(job: Job, steps: int) -> None:
    final = latest_checkpoint(job.run_dir)
    manifest.verify(final)
    assert manifest.read_state(final)["progress"]["step"] == steps
    assert job.logged_steps()[-1] == steps
    assert sorted(p.name for p in (job.run_dir / "samples").iterdir())
    assert "accelerate.commands.launch --config_file" in job.log()


@pytest.fixture(scope="session")
def single_node_run(cluster, tmp_path_factory, eval_cache) -> Job:
    job = Job(cluster, "slurm/train.sbatch", tmp_path_factory.mktemp("single"), ["--cpus-per-task=2"],
              SMOKE | {"GAN_ARGS": f"{SHORT} eval.cache_dir={eval_cache}", "GAN_PROCESSES_PER_NODE": "2"})
    job.wait_completed()
    return job


def rank_digests(log: str) -> dict[str, str]:
    return dict(line.split(": final weights sha256 ") for line in log.splitlines() if "final weights sha256" in line)


def test_single_node_template_trains_two_cpu_processes(single_node_run):
    check_finished_run(single_node_run, steps=STEPS)
    assert sorted(p.name for p in (single_node_run.run_dir / "checkpoints").glob("step_*")) == \
        ["step_00000040", "step_00000080"]
    lines = single_node_run.metrics()
    assert [line["step"] for line in lines] == list(range(10, STEPS + 1, 10))
    assert all(line["global_batch"] == 32 for line in lines)  # 2 processes x data.batch_size 16
    # The final evaluation: both ranks generated their halves of the 1,000 samples, rank 0 scored them.
    assert lines[-1]["eval/classes_present"] >= 1 and lines[-1]["eval/fd"] > 0 and "eval/fd" not in lines[0]
    assert "cpu_2.yaml --num_processes 2 --num_machines 1" in single_node_run.log()
    assert set(rank_digests(single_node_run.log())) == {"rank 0", "rank 1"}


def test_multinode_template_trains_on_two_nodes_through_a_preemption(cluster, tmp_path, single_node_run):
    job = Job(cluster, "slurm/train_multinode.sbatch", tmp_path, ["--nodes=2", "--cpus-per-task=1"], NO_EVAL)
    # srun ends a step on SIGTERM; the template must reach the training on both nodes another way.
    preempted_at = job.preempt_after_step(0, restarts=1)
    job.wait_completed()
    assert f"resumed from {job.run_dir / 'checkpoints' / preempted_at}" in job.log()
    check_finished_run(job, steps=STEPS)
    log = job.log()
    assert "--machine_rank 0 --main_process_ip gantest-node1" in log
    assert "--machine_rank 1 --main_process_ip gantest-node1" in log
    digests = rank_digests(log)
    assert set(digests) == {"rank 0", "rank 1"} and len(set(digests.values())) == 1, digests
    # What the ranks reported is what was saved, and the same global batch on one node gives the same weights.
    folder = job.run_dir / "checkpoints" / manifest.checkpoint_name(STEPS)
    saved = {name: load_file(folder / f"{name}.safetensors") for name in ("generator", "discriminator", "generator_ema")}
    assert weights_digest(saved) == digests["rank 0"]
    assert digests == rank_digests(single_node_run.log())


def test_a_job_requeued_on_one_node_instead_of_two_continues_the_run(cluster, tmp_path, single_node_run):
    """Preempted on two nodes (two processes), requeued on one (`scontrol update NumNodes=1 NumTasks=1` while it
    waits to start again, as a scheduler may give it back smaller): one process takes the whole global batch in two micro-batches,
    with the same latents and BatchNorm groups, and ends where the two-process run does."""
    job = Job(cluster, "slurm/train_multinode.sbatch", tmp_path, ["--nodes=2", "--cpus-per-task=1"], NO_EVAL)
    preempted_at = job.preempt_after_step(0, restarts=1)
    job.wait_until(lambda s: s["JobState"] == "PENDING", "the requeued job waiting to start again")
    subprocess.run(["scontrol", "update", f"JobId={job.id}", "NumNodes=1", "NumTasks=1"], env=cluster.env,
                   check=True)
    job.wait_completed()
    log = job.log()
    assert (f"{preempted_at} was written by 2 processes, this launch has 1: the global batch of 32, the data order "
            "and the noise continue, each process taking its share (2 micro-batch(es) of 16)") in log
    check_finished_run(job, steps=STEPS)
    expected = weights(all_state(single_node_run.run_dir))
    difference = largest_relative_difference(expected, weights(all_state(job.run_dir)))
    assert difference < PROCESS_COUNT_TOLERANCE, difference


@pytest.fixture(scope="session")
def preempted_twice(cluster, tmp_path_factory) -> tuple[Job, list[str]]:
    job = Job(cluster, "slurm/train.sbatch", tmp_path_factory.mktemp("preempted"), ["--cpus-per-task=2"],
              NO_EVAL | {"GAN_PROCESSES_PER_NODE": "2", "GAN_WANDB": "offline"})
    first = job.preempt_after_step(0, restarts=1)
    second = job.preempt_after_step(int(first.removeprefix("step_")), restarts=2)
    job.wait_completed()
    return job, [first, second]


def test_preempted_job_requeues_and_resumes_exactly(preempted_twice, single_node_run):
    job, (first, _) = preempted_twice
    step = int(first.removeprefix("step_"))
    assert 0 < step < STEPS
    log = job.log()
    assert "USR1 received: asking the training to checkpoint and stop" in log
    assert "restart 1" in log  # SLURM_RESTART_COUNT, as Slurm set it for the requeued job
    assert f"resumed from {job.run_dir / 'checkpoints' / first} at step {step}" in log
    check_finished_run(job, steps=STEPS)
    expected = final_weights(single_node_run.run_dir)
    for network, tensors in final_weights(job.run_dir).items():
        for name, tensor in tensors.items():
            assert tensor.equal(expected[network][name]), f"{network}.{name} differs from the uninterrupted run"


def test_second_preemption_also_survives(preempted_twice):
    job, (first, second) = preempted_twice
    assert int(first.removeprefix("step_")) < int(second.removeprefix("step_")) < STEPS
    log = job.log()
    assert "restart 2" in log
    assert f"resumed from {job.run_dir / 'checkpoints' / second}" in log
    assert job.state()["Restarts"] == "2"
    # Three starts of the job, one W&B run: each start wrote an offline folder for the same run id.
    run_ids = {folder.name.rsplit("-", 1)[1] for folder in (job.run_dir / "wandb").glob("offline-run-*")}
    assert len(list((job.run_dir / "wandb").glob("offline-run-*"))) == 3 and len(run_ids) == 1


@pytest.mark.parametrize("variable, value", [("GAN_ARGS", f"{SHORT}\neval.num_samples=0"),
                                             ("GAN_RUN_DIR", "runs/a\ntrain.steps=1")])
def test_a_variable_holding_a_newline_fails_the_job_before_any_work(cluster, tmp_path, variable, value):
    """Before: GAN_ARGS was read up to its first newline, silently dropping the overrides after it; a newline in
    GAN_RUN_DIR made an override of what followed it."""
    job = Job(cluster, "slurm/train.sbatch", tmp_path, ["--cpus-per-task=1"], NO_EVAL | {variable: value})
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (state := job.state())["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, job.log()
        time.sleep(0.5)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", (state, job.log())
    assert (f"error: {variable} holds a newline; give it on one line (GAN_ARGS: key=value overrides separated by "
            "spaces)") in job.log()
    assert "accelerate.commands.launch" not in job.log() and not job.run_dir.exists()
