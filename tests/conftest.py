"""Shared helpers: run the real command lines in fresh processes, read what they wrote."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from train.launch import free_port

REPO = Path(__file__).resolve().parent.parent
# No test may reach the network: Hugging Face libraries read these when first imported.
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
# Each xdist worker computes in its own share of the cores, as the training processes do (OMP_NUM_THREADS=1 in
# run_env): two workers of two threads each on two cores ran the self-supervised network's steps 2.1x slower than
# two of one thread each (0.87 against 0.42 s a step), their OpenMP threads waiting on each other.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // workers))
# A few cheap steps on the CPU: enough to exercise every phase of the loop.
TINY = ["model.arch=dcgan", "data.batch_size=8", "train.steps=6", "logging.every=3",
        "logging.samples_every=0", "checkpoint.every=0", "logging.wandb=disabled", "logging.curves=false",
        "train.cpu=true", "eval.num_samples=0", "ema.statistics_images=64"]


def run_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", WANDB_SILENT="true", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


def run_train(args: list[str], env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m train ARGS` in a new process, as a user types it."""
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=env or run_env(),
                          capture_output=True, text=True, timeout=timeout)


def accelerate_launch(num_processes: int, args: list[str], env: dict | None = None,
                      timeout: int = 300) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes N ARGS` on the CPU: real processes talking over gloo.

    (`--cpu --num_processes N` starts one process in Accelerate 1.x; `--multi_gpu` goes through torchrun.)
    """
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no", *args]
    return subprocess.run(command, cwd=REPO, env=env or run_env(), capture_output=True, text=True, timeout=timeout)


def logged_metrics(run_dir: Path) -> list[dict]:
    """The lines of a finished run's metrics.jsonl; each must parse (a torn line here is a failure)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def snapshot_files(folder: Path) -> dict[Path, bytes]:
    """Every file under `folder` with its bytes: compared before and after, it shows that nothing changed."""
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def latest_checkpoint(run_dir: Path) -> Path:
    """The checkpoint folder the run's `latest` pointer names, as written on disk."""
    return run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()


def final_weights(run_dir: Path) -> dict[str, dict]:
    folder = latest_checkpoint(run_dir)
    return {name: load_file(folder / f"{name}.safetensors") for name in ("generator", "discriminator")}


@pytest.fixture
def mnist_dir() -> Path:
    return REPO / "data" / "mnist"


def write_idx_images(folder: Path, split: str, images: torch.Tensor) -> None:
    """uint8 images [N, 28, 28] as the uncompressed IDX file of MNIST's `split` ("train" or "test")."""
    from train.data.readers.idx import IDX_FILES
    header = (2051).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (folder / IDX_FILES[split]).write_bytes(header + images.numpy().tobytes())


def write_idx_labels(folder: Path, split: str, labels: torch.Tensor) -> None:
    """uint8 labels [N] as the uncompressed IDX labels file of MNIST's `split`."""
    from train.data.readers.idx import IDX_FILES
    name = IDX_FILES[split].replace("images-idx3", "labels-idx1")
    (folder / name).write_bytes((2049).to_bytes(4, "big") + len(labels).to_bytes(4, "big") + labels.numpy().tobytes())


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory) -> Path:
    """The first 96 MNIST training images and their labels as an IDX folder: epochs of a few steps."""
    from train.data.readers.idx import read_idx_images, read_idx_labels
    folder = tmp_path_factory.mktemp("tiny_mnist")
    write_idx_images(folder, "train", read_idx_images(REPO / "data" / "mnist", "train")[:96])
    write_idx_labels(folder, "train", read_idx_labels(REPO / "data" / "mnist", "train")[:96])
    return folder


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    """One `eval.cache_dir` for every evaluating test of this pytest session, on all xdist workers.

    Extracting the features of the 10,000 MNIST test images costs about 6 s of one core; the cache
    is keyed by its content and written atomically, so sharing it is safe. Never the repository's
    `.cache/eval`: a test must not depend on what an earlier session left there.
    """
    root = tmp_path_factory.getbasetemp()  # under xdist, one folder per worker inside the session's
    return (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "eval_cache"


def run_with_fault(fault: str, step: int, rank: int, args: list[str], processes: int = 1,
                   env: dict | None = None) -> subprocess.CompletedProcess:
    """tests/helpers/interrupt.py: the real training with one fault pinned to a step (see its docstring)."""
    harness = [str(REPO / "tests" / "helpers" / "interrupt.py"), fault, str(step), str(rank)]
    if processes == 1:
        return subprocess.run([sys.executable, *harness, *args], cwd=REPO, env=env or run_env(),
                              capture_output=True, text=True, timeout=300)
    return accelerate_launch(processes, [*harness, *args], env=env)


def all_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the newest checkpoint: weights, buffers and optimizer states."""
    folder = latest_checkpoint(run_dir)
    tensors = {}
    for name in ("generator", "discriminator", "generator_ema", "optimizers"):
        tensors.update({f"{name}/{k}": v for k, v in load_file(folder / f"{name}.safetensors").items()})
    return tensors


# The largest relative difference (||a - b|| / ||a||, per tensor of G, D and the EMA generator, BatchNorm's running
# statistics aside) between a run that changed its number of processes and one that did not: 9.3e-4 measured after
# 1 -> 2 -> 1 processes in 30 steps (tests/test_process_count.py). The sums run in another order, and a GAN's
# updates amplify that.
PROCESS_COUNT_TOLERANCE = 0.01


def weights(state: dict) -> dict:
    """The networks' weights and buffers but BatchNorm's running statistics: those follow each process's own
    batches (rank 0's are saved) and serve only G's eval mode; samples and evaluations use the EMA generator,
    whose statistics are its own."""
    return {key: value for key, value in state.items() if not key.startswith("optimizers/")
            and not key.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def largest_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[key].double() - b[key].double()).norm() / a[key].double().norm().clamp_min(1e-12)).item()
               for key in a)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"


@pytest.fixture
def tool_here(capsys):
    """`python -m train.NAME ARGS` (a tool: export, sample, evaluate, plots) as its main(ARGS) in this process, for
    the checks a new process's seconds of start-up add nothing to: its exit code (argparse's too) and output."""
    def run(name: str, *args) -> subprocess.CompletedProcess:
        argv = [str(arg) for arg in args]
        try:
            code = importlib.import_module(f"train.{name}").main(argv)
        except SystemExit as exited:
            code = exited.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code or 0, out, err)
    return run
