"""`python -m benchmarks.bench` (or `make bench`): throughput against the blog's loop, on the device found.

  (a) blog     the blog's loop as written, in this project's code: torchvision MNIST with ToTensor
               through a DataLoader (workers 0), native bilinear upsampling, Sigmoid + BCELoss, an
               `.item()` per step, batch 64
  (b) project  `python -m train` on configs/seed.yaml: same networks, batch and maths
  (c) default  `python -m train` on configs/default.yaml (`make train`)
  (d) fastest  `python -m train` on configs/fast.yaml
  (e) dcgan    `python -m train` on configs/dcgan.yaml

Prints images/s, steps/s and the ratio to (a), and writes them as JSON (--out). With (c) it also
reports how close the step comes to the machine's limit: its floating-point operations (counted on
the real step with torch's own formulas, `CountedFlops`) per second, as a share of what a large
matrix product reaches in the same precision, measured in the same run. `--processes 1,2` adds the scaling table
of (b) under `accelerate launch`; `--time-to-quality` trains default.yaml and fast.yaml, and each
`--ttq-custom` another recipe, with evaluation, and reports the training seconds until the Fréchet
distance falls below 10x and 3x the training-set floor (3x: FD 12). No W&B, no network: data comes
from the repository.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from train import models
from train.networks import NetworkOptions
from train.config import REPO_ROOT, SHIPPED_MNIST, EvalConfig
from train.errors import EXIT_PREEMPTED
from train.launch import free_port
from train.plots import read_metrics
from train.quality.evaluator import Evaluator
from train.storage.files import write_atomically

BUILT_IN_VARIANTS = ("blog", "project", "default", "fastest", "dcgan")  # (a)-(e)
DEFAULT_CONFIG = "configs/default.yaml"
MATMUL_SIZE = 2048  # the square matrix product whose speed is the machine's limit here
STOP_GRACE_S = 60  # a quality run stopped by its time limit gets this long to checkpoint and exit
# What a timed run does besides its steps, turned off; its one checkpoint, after the timed steps, measures the
# generator average's BatchNorm statistics on 64 images: the default 2,048 took 7 s of a 13 s seed.yaml run.
QUIET = ["logging.wandb=disabled", "eval.num_samples=0", "checkpoint.every=0", "logging.samples_every=0",
         "resume=none", "ema.statistics_images=64"]


def blog_loop(device: torch.device, steps: int, warmup: int) -> dict:
    """The blog's training loop, step for step, timed after `warmup` steps."""
    import torchvision
    from torch.utils.data import DataLoader

    with tempfile.TemporaryDirectory() as root:
        raw = Path(root) / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for path in SHIPPED_MNIST.glob("*.gz"):
            (raw / path.stem).write_bytes(gzip.decompress(path.read_bytes()))
        dataset = torchvision.datasets.MNIST(root, train=True, download=False,
                                             transform=torchvision.transforms.ToTensor())
        loader = DataLoader(dataset, batch_size=64, shuffle=True, num_workers=0)
        torch.manual_seed(0)
        blog_networks = models.build("seed", 100, options=NetworkOptions(upsample="native"))
        generator, discriminator = (m.to(device) for m in blog_networks)
        gen_optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3, amsgrad=True)
        disc_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3, amsgrad=True)
        loss_fn = nn.BCELoss()

        def disc(x):  # the blog's discriminator ends in a Sigmoid
            return torch.sigmoid(discriminator(x)).unsqueeze(1)

        done, started = 0, None
        while done < warmup + steps:
            for real_data, _ in loader:
                if done == warmup:
                    started = time.perf_counter()
                if done == warmup + steps:
                    break
                z = torch.randn((64, 100)).to(device)
                generated_data = generator(z)
                real_data = real_data.to(device)
                disc_real_data = disc(real_data)
                disc_fake_data = disc(generated_data.detach())
                disc_loss = loss_fn(disc_fake_data, torch.ones_like(disc_fake_data)) + \
                    loss_fn(disc_real_data, torch.zeros_like(disc_real_data))
                disc_optimizer.zero_grad()
                disc_loss.backward(retain_graph=True)
                disc_optimizer.step()
                disc_fake_data = disc(generated_data)
                gen_loss = loss_fn(disc_fake_data, torch.zeros_like(disc_fake_data))
                gen_optimizer.zero_grad()
                gen_loss.backward()
                gen_optimizer.step()
                gen_loss.item(), disc_loss.item()
                done += 1
        seconds = time.perf_counter() - started
    return {"images_per_second": steps * 64 / seconds, "steps_per_second": steps / seconds, "global_batch": 64}


class CountedFlops(TorchDispatchMode):
    """The floating-point operations of what runs inside it, by torch's own formulas (matrix products and
    convolutions, forward and backward: `torch.utils.flop_counter.flop_registry`). Not FlopCounterMode itself:
    its module tracking hooks refuse the R1 penalty's `autograd.grad`."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def step_flops(config_path: str, overrides: list[str]) -> tuple[float, str]:
    """Floating-point operations of one training step of the config (D's and G's updates; with lazy R1, the mean
    over its period), counted on the real step (`CountedFlops`: element-wise work is not counted), and the
    step's precision."""
    from train import config, loop, regularisation, setup
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = config.load(config_path, [*overrides, *QUIET, f"run.dir={run_dir}", "logging.curves=false"])
        accelerator, cfg = setup.set_up(cfg, None)
        training = loop.Training(cfg, accelerator, None)
        period = cfg.loss.r1_every if cfg.loss.r1_gamma else 1
        total = 0
        for step in range(1, period + 1):
            training.gan.sample(training.batches, training.snapshot.noise)
            with CountedFlops() as counter:
                training.update(regularisation.r1_weight(cfg.loss.r1_gamma, cfg.loss.r1_every, step))
            total += counter.total
        training.bar.close()
        training.log.close()
    return total / period, {"no": "fp32"}.get(accelerator.mixed_precision, accelerator.mixed_precision)


def matmul_flops_per_second(device: torch.device, precision: str, repeats: int = 20) -> float:
    """What this device reaches on a large square matrix product in `precision` (fp32 or bf16), on all its threads."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a, b = (torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=dtype) for _ in range(2))
    a @ b  # the first product picks and warms the kernel
    if device.type != "cpu":
        torch.accelerator.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type != "cpu":
        torch.accelerator.synchronize()
    return 2 * MATMUL_SIZE ** 3 * repeats / (time.perf_counter() - started)


def utilisation(device: torch.device, throughput: dict) -> dict:
    """The default config's step: FLOP per step, FLOP/s at the measured steps/s, and their share of the matrix
    product's FLOP/s in the same precision."""
    flops, precision = step_flops(DEFAULT_CONFIG, [])
    achieved = flops * throughput["steps_per_second"]
    peak = matmul_flops_per_second(device, precision)
    return {"config": DEFAULT_CONFIG, "precision": precision, "flop_per_step": flops,
            "achieved_flop_per_second": achieved, "matmul_flop_per_second": peak, "matmul_size": MATMUL_SIZE,
            "share_of_matmul": achieved / peak}


def run_checked(command: list[str], timeout: float | None = None) -> None:
    """Run `command` in the repository; RuntimeError (with the end of its stderr) if it fails or outlasts `timeout`."""
    try:
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        raise RuntimeError(f"{' '.join(command)} took over {timeout:.0f} s") from expired
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")


def project_loop(config: str, steps: int, warmup: int, overrides: list[str], processes: int = 0,
                 timeout: float | None = None) -> dict:
    """`python -m train` (or `accelerate launch` with `processes`), timed from its own metrics log."""
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--config", config, f"train.steps={warmup + steps}", f"logging.every={warmup}",
                f"run.dir={run_dir}", *QUIET, *overrides]
        command = [sys.executable, "-m", "train", *args]
        if processes:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                       str(processes), "--num_machines", "1", "--main_process_port", str(free_port()),
                       "--dynamo_backend", "no", "-m", "train", *args]  # not 29500: another job may hold it
        run_checked(command, timeout)
        lines = read_metrics(Path(run_dir) / "metrics.jsonl")[0][1:]
    timed_steps = sum(warmup for _ in lines)
    global_batch = lines[0]["global_batch"]
    seconds = sum(warmup * global_batch / line["images_per_second"] for line in lines)
    return {"images_per_second": timed_steps * global_batch / seconds, "steps_per_second": timed_steps / seconds,
            "global_batch": global_batch}


def time_to_quality(config: str, overrides: list[str], limit_seconds: float, eval_every: int, floor_fd: float,
                    run_dir: Path, eval_cache_dir: Path) -> dict:
    """Training seconds until FD < 10x and < 3x the floor, training for at most `limit_seconds` of wall time.

    The run may finish, or stop on the limit's SIGTERM (it checkpoints and exits with EXIT_PREEMPTED);
    anything else (a refused config, a crash, no exit within STOP_GRACE_S of the signal) is
    recorded as `failed` with the end of its stderr, beside whatever it evaluated before.
    """
    args = ["--config", config, f"eval.every={eval_every}", f"logging.every={eval_every}", f"run.dir={run_dir}",
            f"eval.cache_dir={eval_cache_dir}", "logging.wandb=disabled", "checkpoint.every=0", "resume=none",
            *overrides]
    with tempfile.TemporaryFile(mode="w+") as stderr:  # a file, not a pipe: a chatty run never blocks on it
        process = subprocess.Popen([sys.executable, "-m", "train", *args], cwd=REPO_ROOT,
                                   stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        stopped = False
        try:
            process.wait(timeout=limit_seconds)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGTERM)  # checkpoints and exits: the log is complete
            stopped = True
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        stderr.seek(0)
        error = stderr.read()[-2000:]
    log = run_dir / "metrics.jsonl"
    lines = read_metrics(log)[0] if log.is_file() else []  # a killed run may leave its last line half-written
    evaluations = [{key: line[key] for key in ("step", "train_seconds", "eval/fd")}
                   for line in lines if "eval/fd" in line]
    result = {"floor_fd": floor_fd, "evaluations": evaluations, **milestones(evaluations, floor_fd)}
    if process.returncode != 0 and not (stopped and process.returncode == EXIT_PREEMPTED):
        result["failed"] = f"exit code {process.returncode}" + (" after SIGTERM" if stopped else "") + f":\n{error}"
    return result


def milestones(evaluations: list[dict], floor_fd: float) -> dict:
    """The training seconds of the first evaluation below 10x and below 3x the floor, and the last evaluation."""
    result = {}
    for factor in (10, 3):
        reached = next((line for line in evaluations if line["eval/fd"] < factor * floor_fd), None)
        result[f"seconds_to_{factor}x_floor"] = reached["train_seconds"] if reached else "not reached"
    if evaluations:
        result["final"] = evaluations[-1]
    return result


def custom_variant(spec: str) -> tuple[str, str, list[str]]:
    """NAME=CONFIG[:key=value,...] -> (name, config, overrides)."""
    name, _, rest = spec.partition("=")
    config, _, overrides = rest.partition(":")
    return name, config, overrides.split(",") if overrides else []


def check_arguments(parser: argparse.ArgumentParser, args, custom: list[tuple[str, str, list[str]]]) -> None:
    """Mistakes on the command line stop the bench before its first measurement, which can take minutes."""
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    unknown = sorted(set(filter(None, args.variants.split(","))) - set(BUILT_IN_VARIANTS))
    if unknown:
        parser.error(f"--variants: no variant {', '.join(unknown)}; choose from {', '.join(BUILT_IN_VARIANTS)}, "
                     "or time another config with --custom")
    for name, config, _ in custom:
        if not name or not (REPO_ROOT / config).is_file():
            parser.error(f"--custom/--ttq-custom {name}={config}: give NAME=CONFIG[:key=value,...] with a config "
                         "file that exists")
    if args.processes and not all(count.isdigit() and int(count) >= 1 for count in args.processes.split(",")):
        parser.error(f"--processes {args.processes}: give process counts of 1 or more, e.g. 1,2")


def hardware() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} threads"
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=50, help="untimed steps first (also the log window)")
    parser.add_argument("--variants", default=",".join(BUILT_IN_VARIANTS), help="which of (a)-(e) to time")
    parser.add_argument("--custom", action="append", default=[], metavar="NAME=CONFIG[:key=value,...]",
                        help="also time `python -m train` on CONFIG with these overrides (repeatable)")
    parser.add_argument("--variant-timeout", type=float, help="seconds after which a variant counts as failed")
    parser.add_argument("--processes", default="", help="comma-separated process counts for the scaling table")
    parser.add_argument("--time-to-quality", action="store_true", help="quality runs of default.yaml and fast.yaml")
    parser.add_argument("--ttq-seconds", type=float, default=300.0, help="wall-time limit of each quality run")
    parser.add_argument("--ttq-custom", action="append", default=[], metavar="NAME=CONFIG[:key=value,...]",
                        help="also time a quality run of CONFIG with these overrides, evaluated every 250 steps")
    parser.add_argument("--runs-dir", help="keep the quality runs here (default: a temporary folder)")
    parser.add_argument("--eval-cache-dir", default=EvalConfig.cache_dir,
                        help="cached features of the MNIST test set, for the floor and the quality runs")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    custom, ttq_custom = ([custom_variant(spec) for spec in specs] for specs in (args.custom, args.ttq_custom))
    check_arguments(parser, args, custom + ttq_custom)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = {"hardware": hardware(), "command": " ".join(["python -m benchmarks.bench", *(argv or sys.argv[1:])]),
              "throughput": {}}
    steps = max(args.steps // args.warmup, 1) * args.warmup

    def timed(config: str, overrides: list[str]) -> dict:
        return project_loop(config, steps, args.warmup, overrides, timeout=args.variant_timeout)

    variants = {
        "blog": lambda: blog_loop(device, steps, args.warmup),
        "project": lambda: timed("configs/seed.yaml", ["train.mixed_precision=fp32"]),
        "default": lambda: timed(DEFAULT_CONFIG, []),
        "fastest": lambda: timed("configs/fast.yaml", []),
        "dcgan": lambda: timed("configs/dcgan.yaml", []),
    }
    for name, config, overrides in custom:
        variants[name] = (lambda c=config, o=overrides: timed(c, o))
    out = Path(args.out)

    def write_report() -> None:  # after each measurement, so that a time limit (even inside the write) keeps them
        write_atomically(out, json.dumps(report, indent=1))

    failed = []
    for name in [*filter(None, args.variants.split(",")), *(name for name, _, _ in custom)]:
        try:
            measured = variants[name]()
        except RuntimeError as error:  # a variant that cannot run here (e.g. an option this device refuses)
            measured = {"failed": str(error)[-2000:]}
            failed.append(name)
        blog = report["throughput"].get("blog", {}).get("images_per_second")
        if blog and "images_per_second" in measured:
            measured["ratio_to_blog"] = measured["images_per_second"] / blog
        report["throughput"][name] = measured
        write_report()
        if "failed" in measured:
            print(f"{name:8s} FAILED: {measured['failed'][-500:]}", flush=True)
            continue
        print(f"{name:8s} {measured['images_per_second']:10.0f} images/s {measured['steps_per_second']:8.1f} "
              "steps/s" + (f" x{measured['ratio_to_blog']:.2f} vs blog" if blog else ""), flush=True)
        if name == "default":
            report["utilisation"] = used = utilisation(device, measured)
            write_report()
            print(f"default  {used['achieved_flop_per_second'] / 1e9:.1f} GFLOP/s of {used['precision']} "
                  f"({used['flop_per_step'] / 1e9:.2f} GFLOP a step), {100 * used['share_of_matmul']:.1f}% of a "
                  f"{MATMUL_SIZE}x{MATMUL_SIZE} matrix product's {used['matmul_flop_per_second'] / 1e9:.0f} GFLOP/s",
                  flush=True)
    if args.processes:
        report["scaling"] = {}
        for count in (int(n) for n in args.processes.split(",")):
            try:  # one process: plain python -m train
                measured = project_loop("configs/seed.yaml", steps, args.warmup, ["train.mixed_precision=fp32"],
                                        processes=count if count > 1 else 0, timeout=args.variant_timeout)
            except RuntimeError as error:  # e.g. more processes than this machine has GPUs
                report["scaling"][count] = {"failed": str(error)[-2000:]}
                failed.append(f"{count} processes")
                print(f"{count} processes FAILED: {str(error)[-500:]}", flush=True)
                continue
            measured["per_process_images_per_second"] = measured["images_per_second"] / count
            report["scaling"][count] = measured
            write_report()
            print(f"{count} processes: {measured['images_per_second']:.0f} images/s in total, "
                  f"{measured['per_process_images_per_second']:.0f} per process", flush=True)
    shipped = [(DEFAULT_CONFIG, DEFAULT_CONFIG, [], 250),
               ("configs/fast.yaml", "configs/fast.yaml", [], 1000)]
    recipes = [*(shipped if args.time_to_quality else []),
               *((name, config, overrides, 250) for name, config, overrides in ttq_custom)]
    if recipes:
        cache_dir = REPO_ROOT / args.eval_cache_dir  # the runs' own eval.cache_dir, from the same folder
        evaluator = Evaluator.mnist(SHIPPED_MNIST, cache_dir, device)
        floors = evaluator.training_set_floor(10000)
        floor = floors["fd"]
        report["time_to_quality"] = {"training_set_floor": floors}
        runs = Path(args.runs_dir or tempfile.mkdtemp(prefix="bench_runs_"))
        for name, config, overrides, every in recipes:
            measured = time_to_quality(config, overrides, args.ttq_seconds, every, floor, runs / Path(name).stem,
                                       cache_dir)
            report["time_to_quality"][name] = measured
            write_report()
            if "failed" in measured:
                failed.append(name)
                print(f"{name} FAILED: {measured['failed'][-500:]}", flush=True)
            after = [measured[f"seconds_to_{factor}x_floor"] for factor in (10, 3)]
            after = [value if value == "not reached" else f"after {value:.1f} s" for value in after]
            print(f"{name}: FD < 10x floor {after[0]}, < 3x floor {after[1]} (floor {floor:.3f})", flush=True)
    write_report()
    print(f"wrote {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
