#!/usr/bin/env bash
# Every GPU measurement in docs/performance.md, in three parts, the most owed first:
#   graph    train.cuda_graph against the eager loop (launch/check_cuda_graph.py), then the
#            throughput benchmark: (a)-(d) beside the seed and fast configs as CUDA graphs, with
#            and without torch.compile, and the seed's with TF32 matrix products
#   quality  time to quality of the recipe the CPU found (DCGAN, Adam 1e-3) at batch 256 and 512,
#            as a CUDA graph when the graph check passed
#   rest     the BatchNorm/DDP hazard, the fp16 path, the kernel profile of a seed step, the host and
#            device profile of the real loop, the shipped configs' time to quality, channels_last and
#            torch.compile's reduce-overhead mode
# Needs torch, torchvision, accelerate, safetensors, omegaconf, scipy and matplotlib; no network, no W&B.
# Usage: bash launch/gpu_suite.sh [OUTPUT_DIR [PART ...]]   (default: all three; a device call is
# limited to 10 minutes: run each part in a call of its own)
set -uo pipefail
out=${1:-gpu_results}
shift || true
parts=${*:-graph quality rest}
mkdir -p "$out"
python=${PYTHON:-python3}
recipe="optim.g_lr=1e-3,optim.d_lr=1e-3"

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)"
}

graph() {
  environment > "$out/graph_check.txt" 2>&1
  timeout 240 "$python" launch/check_cuda_graph.py >> "$out/graph_check.txt" 2>&1
  # The quality part times the graph too only where it trains fast.yaml's eager weights.
  grep -q "^fast (dcgan bf16): .*: ok$" "$out/graph_check.txt" && touch "$out/graph_ok"
  local seed="configs/seed.yaml:train.mixed_precision=fp32"
  timeout 330 "$python" -m train.bench --steps 500 --warmup 100 --variant-timeout 120 \
    --custom "seed_cuda_graph=$seed,train.cuda_graph=true" \
    --custom "fast_cuda_graph=configs/fast.yaml:train.cuda_graph=true" \
    --custom "seed_compile_graph=$seed,train.compile=true,train.cuda_graph=true" \
    --custom "seed_compile_graph_tf32=$seed,train.compile=true,train.cuda_graph=true,train.tf32=true" \
    --custom "seed_cuda_graph_tf32=$seed,train.cuda_graph=true,train.tf32=true" \
    --custom "fast_compile_graph=configs/fast.yaml:train.compile=true,train.cuda_graph=true" \
    --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
}

quality() {  # the CPU's recipe at batch 256, and at 512 (on a host-bound GPU a larger batch is almost free)
  local graph="" recipes=()
  [ -e "$out/graph_ok" ] && graph=",train.cuda_graph=true"
  for batch in 256 512; do
    recipes+=(--ttq-custom "fast_lr1e-3_b$batch=configs/fast.yaml:$recipe,data.batch_size=$batch,eval.every=500$graph")
  done
  timeout 270 "$python" -m train.bench --variants "" --ttq-seconds 100 "${recipes[@]}" --runs-dir "$out/runs" \
    --out "$out/bench_quality.json" 2>&1 | tee "$out/bench_quality.log"
  keep_run fast_lr1e-3_b256
}

rest() {
  {
    environment
    echo "=== BatchNorm discriminator under DDP, two ranks on one GPU (gloo)"
    for setting in true false; do
      timeout 90 "$python" launch/check_bn_ddp.py "$setting" 2>&1 | grep -E "^broadcast_buffers|Error" | head -4
    done
    echo "=== fp16 training through GradScaler (configs/smoke.yaml)"
    timeout 120 "$python" -m train --config configs/smoke.yaml train.mixed_precision=fp16 run.dir="$out/runs/fp16" \
      resume=none 2>&1 | tr '\r' '\n' | grep -v "it/s" | tail -3
    tail -n 1 "$out/runs/fp16/metrics.jsonl"
    echo "=== kernel profile of one seed step (batch 64, fp32)"
    timeout 120 "$python" launch/profile_step.py 30 2>&1 | grep -v "^ *$"
    echo "=== host and device profile of the real loop (configs/seed.yaml, batch 64): 20 steps after 50"
    timeout 180 "$python" -m train --config configs/seed.yaml train.steps=80 profile.steps=20 profile.after=50 \
      logging.wandb=disabled eval.num_samples=0 logging.samples_every=0 resume=none run.dir="$out/runs/profile" \
      2>&1 | grep "profile of"
    cat "$out/runs/profile/profile/ops.txt"
  } > "$out/checks.txt" 2>&1
  timeout 300 "$python" -m train.bench --variants "" --steps 600 --warmup 100 --time-to-quality --ttq-seconds 110 \
    --custom "seed_channels_last=configs/seed.yaml:train.mixed_precision=fp32,train.channels_last=true" \
    --runs-dir "$out/runs" --out "$out/bench_rest.json" 2>&1 | tee "$out/bench_rest.log"
  # torch.compile with inductor's CUDA graphs (Accelerate reads the mode from ACCELERATE_DYNAMO_MODE):
  # does capturing the networks' kernels remove the host time per step that the default mode kept?
  ACCELERATE_DYNAMO_MODE=reduce-overhead timeout 150 "$python" -m train.bench --steps 600 --warmup 100 --variants "" \
    --custom "seed_compile_reduce_overhead=configs/seed.yaml:train.mixed_precision=fp32,train.compile=true" \
    --custom "fast_compile_reduce_overhead=configs/fast.yaml:train.compile=true" \
    --out "$out/bench_reduce_overhead.json" 2>&1 | tee "$out/bench_reduce_overhead.log"
  keep_run seed
  keep_run fast
}

keep_run() {  # a quality run's metrics and its last sample grid, beside the JSON
  cp "$out/runs/$1/metrics.jsonl" "$out/$1_metrics.jsonl" 2>/dev/null
  local last
  last=$(find "$out/runs/$1/samples/" -name "*.png" 2>/dev/null | sort | tail -n 1)
  [ -n "$last" ] && cp "$last" "$out/$1_samples.png"
}

for part in $parts; do
  case $part in
    graph | quality | rest) "$part" ;;
    *) echo "unknown part '$part': use graph, quality or rest" >&2; exit 2 ;;
  esac
done
rm -rf "$out/runs"
