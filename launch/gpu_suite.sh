#!/usr/bin/env bash
# Every GPU measurement in docs/performance.md, in one command (a few minutes on one H100/H200):
# the environment, train.cuda_graph against the eager loop, the BatchNorm/DDP check, a kernel
# profile, a host+device profile of the real loop, the fp16 path, the benchmark (with the CUDA
# graph variants) and its time-to-quality runs, and torch.compile with CUDA graphs. Needs torch, torchvision, accelerate, safetensors, omegaconf, scipy and matplotlib; no
# network, no W&B.  Usage: bash launch/gpu_suite.sh [OUTPUT_DIR]
set -uo pipefail
out=${1:-gpu_results}
mkdir -p "$out"
python=${PYTHON:-python3}
checks="$out/checks.txt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  "$python" -c "import torch, torchvision, accelerate; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'accelerate', accelerate.__version__)"
  echo "=== train.cuda_graph: the same weights as the eager loop"
  timeout 120 "$python" launch/check_cuda_graph.py 2>&1 | tail -n 12
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
} > "$checks" 2>&1
timeout 420 "$python" -m train.bench --steps 600 --warmup 100 --time-to-quality --ttq-seconds 110 \
  --custom "seed_cuda_graph=configs/seed.yaml:train.mixed_precision=fp32,train.cuda_graph=true" \
  --custom "fast_cuda_graph=configs/fast.yaml:train.cuda_graph=true" \
  --custom "seed_channels_last=configs/seed.yaml:train.mixed_precision=fp32,train.channels_last=true" \
  --runs-dir "$out/runs" --out "$out/bench.json" 2>&1 | tee "$out/bench.log"
# torch.compile with inductor's CUDA graphs (Accelerate reads the mode from ACCELERATE_DYNAMO_MODE):
# does capturing the networks' kernels remove the host time per step that the default mode kept?
ACCELERATE_DYNAMO_MODE=reduce-overhead timeout 150 "$python" -m train.bench --steps 600 --warmup 100 --variants "" \
  --custom "seed_compile_reduce_overhead=configs/seed.yaml:train.mixed_precision=fp32,train.compile=true" \
  --custom "fast_compile_reduce_overhead=configs/fast.yaml:train.compile=true" \
  --out "$out/bench_reduce_overhead.json" 2>&1 | tee "$out/bench_reduce_overhead.log"
for run in seed fast; do
  cp "$out/runs/$run/metrics.jsonl" "$out/${run}_metrics.jsonl" 2>/dev/null
  last=$(find "$out/runs/$run/samples/" -name "*.png" 2>/dev/null | sort | tail -n 1)
  [ -n "$last" ] && cp "$last" "$out/${run}_samples.png"
done
rm -rf "$out/runs"
