#!/usr/bin/env bash
# Every GPU measurement in docs/performance.md, in parts that measure nothing twice; `owed` (the
# default) holds what is still owed and fits one device call (10 minutes at most; a session's device time is about 15 minutes,
# machine start included, so plan on one call):
#   owed     the two open targets: (a) the blog's loop, (b) the seed loop as a CUDA graph (since
#            its one-copy upsampling), and (b) with torch.compile inside the graph (with and
#            without TF32): can fused kernels take the seed step from 2.09 ms to the 0.88 ms that
#            20x needs? Then time to quality of configs/seed_r1.yaml (the blog's networks, Adam
#            2e-3, R1 on every 4th step, a long generator average: FD 11.4 after 14,000 steps and
#            9.7 after 20,000 on the CPU, where fast.yaml's DCGAN on an H200 flattens near 48) and
#            of the same at batch 128: what do R1 and the larger batch cost per step, and is FD 12
#            within 60 s? (Also the first captures of R1's double backward and of two alternating
#            graphs: a failure is recorded in the JSON, and seed_r1 then runs eagerly in the time left.)
#   graph    the CUDA graph (on by default where it can run) against the eager loop, compiled or
#            not, and bit for bit with train.deterministic (benchmarks/check_cuda_graph.py; its three
#            runs per config side by side); then the throughput benchmark: (a)-(d), then the
#            seed loop with channels_last, bf16, TF32 matrix products, eager, and fast.yaml with
#            torch.compile inside the graph (the JSON keeps what a time limit cut short)
#   quality  time to quality of configs/seed.yaml and configs/fast.yaml as they ship, of fast.yaml
#            with a generator average of half-life 100k images (its own BatchNorm statistics), and
#            of fast.yaml with seed_r1's lazy R1, Adam 2e-3 and long average
#   rest     the host and device profile of the real loop (graphed), the kernel profile of an eager
#            seed step, the BatchNorm/DDP hazard, the fp16 path (and its refusal of R1), torch.compile's
#            reduce-overhead mode
# Needs torch, torchvision, accelerate, safetensors, omegaconf, scipy and matplotlib; no network, no W&B.
# Usage: bash benchmarks/gpu_suite.sh [OUTPUT_DIR [PART ...]]   (default: owed; one part per device call)
set -uo pipefail
out=${1:-gpu_results}
shift || true
parts=${*:-owed}
mkdir -p "$out"
python=${PYTHON:-python3}

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)"
}

owed() {
  environment > "$out/owed_environment.txt" 2>&1
  local seed="configs/seed.yaml:train.mixed_precision=fp32"
  # at most 15 + 25 + 2 x 130 s: a cold compile that takes longer counts as failed, and the JSON keeps the rest
  timeout 300 "$python" -m benchmarks.bench --steps 500 --warmup 100 --variant-timeout 130 --variants blog,project \
    --custom "seed_compile=$seed,train.compile=true,train.cuda_graph=true" \
    --custom "seed_compile_tf32=$seed,train.compile=true,train.cuda_graph=true,train.tf32=true" \
    --out "$out/bench_owed.json" 2>&1 | tee "$out/bench_owed.log"
  # 20,000 steps each, about 50-70 s of training if R1 costs little; the evaluations add about 20 s.
  # Batch 128 with an average as long in steps (100,000 images): on the CPU FD 17.9 at step 4,000
  # against 26.3 at batch 64; on a GPU a step of the blog's networks should cost far less than
  # twice as much as at 64 (kernel-bound), so it may reach FD 12 sooner.
  timeout 250 "$python" -m benchmarks.bench --variants "" --ttq-seconds 105 \
    --ttq-custom "seed_r1=configs/seed_r1.yaml:eval.every=1000" \
    --ttq-custom "seed_r1_b128=configs/seed_r1.yaml:data.batch_size=128,ema.half_life_images=100000,eval.every=1000" \
    --runs-dir "$out/runs" --out "$out/bench_owed_quality.json" 2>&1 | tee "$out/bench_owed_quality.log"
  # A capture that fails fails fast: then the same recipe eagerly, in what is left of the call's 10 minutes.
  local left=$((560 - SECONDS))
  if failed_in "$out/bench_owed_quality.json" seed_r1 && [ "$left" -ge 60 ]; then
    timeout "$left" "$python" -m benchmarks.bench --variants "" --ttq-seconds $((left - 30)) \
      --ttq-custom "seed_r1_eager=configs/seed_r1.yaml:eval.every=1000,train.cuda_graph=false" \
      --runs-dir "$out/runs" --out "$out/bench_owed_eager.json" 2>&1 | tee "$out/bench_owed_eager.log"
  fi
  keep_runs owed_runs.tar seed_r1 seed_r1_b128 seed_r1_eager
}

failed_in() {  # JSON NAME: did the quality run NAME of this benchmark JSON fail?
  "$python" -c 'import json, sys; runs = json.load(open(sys.argv[1])).get("time_to_quality", {})
sys.exit(0 if "failed" in runs.get(sys.argv[2], {}) else 1)' "$1" "$2" 2>/dev/null
}

graph() {
  environment > "$out/graph_check.txt" 2>&1
  timeout 270 "$python" benchmarks/check_cuda_graph.py >> "$out/graph_check.txt" 2>&1
  local seed="configs/seed.yaml:train.mixed_precision=fp32"
  timeout 290 "$python" -m benchmarks.bench --steps 500 --warmup 100 --variant-timeout 150 \
    --custom "seed_channels_last=$seed,train.channels_last=true" \
    --custom "seed_bf16=configs/seed.yaml:train.mixed_precision=bf16" \
    --custom "seed_tf32=$seed,train.tf32=true" \
    --custom "seed_eager=$seed,train.cuda_graph=false" \
    --custom "fast_compile=configs/fast.yaml:train.compile=true,train.cuda_graph=true" \
    --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
}

quality() {
  # fast_r1: the blog-network recipe's lazy R1, Adam 2e-3 and an average as long in steps as
  # seed_r1's (50,000 images at batch 64: 781 steps at 512) on fast.yaml's DCGAN at batch 512
  timeout 540 "$python" -m benchmarks.bench --variants "" --time-to-quality --ttq-seconds 90 \
    --ttq-custom "fast_ema100k=configs/fast.yaml:ema.half_life_images=100000,eval.every=2000" \
    --ttq-custom "fast_r1=configs/fast.yaml:loss.r1_gamma=0.1,loss.r1_every=4,optim.g_lr=2e-3,optim.d_lr=2e-3,ema.half_life_images=400000,eval.every=2000" \
    --runs-dir "$out/runs" --out "$out/bench_quality.json" 2>&1 | tee "$out/bench_quality.log"
  keep_runs quality_runs.tar seed fast fast_ema100k fast_r1
}

rest() {
  {
    environment
    echo "=== host and device profile of the real loop (configs/seed.yaml, batch 64, graph): 20 steps after 50"
    timeout 180 "$python" -m train --config configs/seed.yaml train.steps=80 profile.steps=20 profile.after=50 \
      logging.wandb=disabled eval.num_samples=0 logging.samples_every=0 resume=none run.dir="$out/runs/profile" \
      2>&1 | grep "profile of"
    cat "$out/runs/profile/profile/ops.txt"
    echo "=== kernel profile of one eager seed step (batch 64, fp32)"
    timeout 120 "$python" benchmarks/profile_step.py 30 2>&1 | grep -v "^ *$"
    echo "=== BatchNorm discriminator under DDP, two ranks on one GPU (gloo)"
    for setting in true false; do
      timeout 90 "$python" benchmarks/check_bn_ddp.py "$setting" 2>&1 | grep -E "^broadcast_buffers|Error" | head -4
    done
    echo "=== fp16 training through GradScaler (configs/smoke.yaml)"
    timeout 120 "$python" -m train --config configs/smoke.yaml train.mixed_precision=fp16 run.dir="$out/runs/fp16" \
      resume=none 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -3
    tail -n 1 "$out/runs/fp16/metrics.jsonl"
    echo "=== fp16 with the R1 penalty is refused (exit 2, before anything is written)"
    timeout 60 "$python" -m train --config configs/smoke.yaml train.mixed_precision=fp16 loss.r1_gamma=1 \
      run.dir="$out/runs/fp16_r1" resume=none 2>&1 | tail -n 1
  } > "$out/checks.txt" 2>&1
  # torch.compile with inductor's CUDA graphs (Accelerate reads the mode from ACCELERATE_DYNAMO_MODE),
  # the alternative to train.cuda_graph with train.compile
  ACCELERATE_DYNAMO_MODE=reduce-overhead timeout 150 "$python" -m benchmarks.bench --steps 600 --warmup 100 --variants "" \
    --custom "seed_compile_reduce_overhead=configs/seed.yaml:train.mixed_precision=fp32,train.compile=true" \
    --custom "fast_compile_reduce_overhead=configs/fast.yaml:train.compile=true" \
    --out "$out/bench_reduce_overhead.json" 2>&1 | tee "$out/bench_reduce_overhead.log"
}

keep_runs() {  # ARCHIVE RUN...: each quality run's metrics and last sample grid, in one file (a device call returns 8)
  local archive=$1 name last
  shift
  local files=()
  for name in "$@"; do
    [ -f "$out/runs/$name/metrics.jsonl" ] && files+=("$name/metrics.jsonl")
    last=$(cd "$out/runs" && find "$name/samples/" -name "*.png" 2>/dev/null | sort | tail -n 1)
    [ -n "$last" ] && files+=("$last")
  done
  [ ${#files[@]} -gt 0 ] && tar -cf "$out/$archive" -C "$out/runs" "${files[@]}"
}

for part in $parts; do
  case $part in
    owed | graph | quality | rest) "$part" ;;
    *) echo "unknown part '$part': use owed, graph, quality or rest" >&2; exit 2 ;;
  esac
done
rm -rf "$out/runs"
