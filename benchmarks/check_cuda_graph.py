"""GPU check: `train.cuda_graph=true` trains the same weights as the eager loop.

For each config (seed fp32; seed_r1.yaml with deterministic kernels; fast.yaml bf16 without and
with the lazy R1 penalty, which alternates two graphs; seed fp32 with torch.compile, whose graph
replays the compiled kernels; and default.yaml, the class-conditional recipe of `make train`, whose
label embeddings' backward must have deterministic kernels), three short runs of `python -m
train` from the same seed, side by side: eager twice (how far apart the GPU's own non-determinism
puts two eager runs) and once as a replayed CUDA graph (the first steps run eagerly, the rest
replay the graph). Prints the largest weight difference of each pair; the graph run passes when it
is bitwise equal to the eager one, or no further from it than ten times the eager runs' own spread.
With `train.deterministic=true` both pairs must be bitwise equal. Throughput is the benchmark's
(`benchmarks.bench --custom`).
Usage: python benchmarks/check_cuda_graph.py [steps]
"""

import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from train.storage import manifest  # noqa: E402
from benchmarks.bench import QUIET, run_checked  # noqa: E402

SEED = ["--config", "configs/seed.yaml", "train.mixed_precision=fp32"]
# With lazy R1 on every 3rd step, steps 3, 6, 9 warm the R1 step's graph up, 12 captures it, 15 and 18 replay it.
CONFIGS = {"seed fp32": SEED,
           "seed_r1, lazy R1 every 3rd step, deterministic": [
               "--config", "configs/seed_r1.yaml", "loss.r1_every=3", "train.deterministic=true"],
           "fast (dcgan bf16)": ["--config", "configs/fast.yaml"],
           "fast with lazy R1 (two graphs, one with a double backward)": [
               "--config", "configs/fast.yaml", "loss.r1_gamma=1", "loss.r1_every=3"],
           "seed fp32 compiled": [*SEED, "train.compile=true"],
           "default (make train's: conditional dcgan bf16), lazy R1 every 3rd step, deterministic": [
               "--config", "configs/default.yaml", "loss.r1_every=3", "train.deterministic=true"]}
RUN_TIMEOUT_S = 180  # a capture that hangs fails its config; the others are still checked


def final_weights(args: list[str], steps: int, run_dir: Path, graph: bool) -> dict:
    command = [sys.executable, "-m", "train", *args, *QUIET, f"train.steps={steps}", f"run.dir={run_dir}",
               f"train.cuda_graph={str(graph).lower()}"]
    run_checked(command, RUN_TIMEOUT_S)
    folder = manifest.resolve(run_dir)
    return {f"{name}.{key}": value for name in ("generator", "discriminator", "generator_ema")
            for key, value in load_file(folder / f"{name}.safetensors").items()}


def largest_difference(a: dict, b: dict) -> float:
    return max((a[key].double() - b[key].double()).abs().max().item() for key in a)


def main() -> int:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, {steps} steps per run")
    failed = False
    with tempfile.TemporaryDirectory() as root:
        for number, (name, args) in enumerate(CONFIGS.items()):
            # The three runs side by side: the GPU has room for them, and the host's cores for their compiles.
            with ThreadPoolExecutor(max_workers=3) as pool:
                runs = [pool.submit(final_weights, args, steps, Path(root) / f"{number}-{kind}", graph=kind == "graph")
                        for kind in ("eager", "again", "graph")]
            try:
                eager, again, graph = (run.result() for run in runs)
            except RuntimeError as error:  # the next config is still checked
                print(f"{name}: FAILED to run: {error}", flush=True)
                failed = True
                continue
            spread, gap = largest_difference(eager, again), largest_difference(eager, graph)
            exact = "train.deterministic=true" in args
            ok = gap == spread == 0.0 if exact else gap == 0.0 or gap <= 10 * spread
            failed |= not ok
            print(f"{name}: eager vs eager max |dw| {spread:.3g}; eager vs graph {gap:.3g}: "
                  f"{'ok' if ok else 'FAILED'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
