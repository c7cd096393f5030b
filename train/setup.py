"""Everything that can refuse a run, before anything is written: torch's global settings, the
Accelerator for this launch, and the config resolved for it (`train.cuda_graph: null` becomes
true or false; the caller's config is not changed).
"""

from __future__ import annotations

import dataclasses
import os
import platform
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import AutocastKwargs, InitProcessGroupKwargs, TorchDynamoPlugin

from train import tracking
from train.batches import batch_plan, resolve_batches
from train.config import Config
from train.distributed import ddp_without_forward_buffer_sync
from train.errors import ConfigError


def set_up(cfg: Config, resume_from: Path | None) -> tuple[Accelerator, Config]:
    """The Accelerator and the resolved config, or a ConfigError naming what this launch cannot run."""
    tracking.check_available(cfg)
    # Without an accelerator, say so to Accelerate: processes started by `accelerate launch
    # --multi_gpu` (torchrun) then form one gloo group instead of each believing it is alone.
    cpu = cfg.train.cpu or not torch.accelerator.is_available()
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, mixed_precision=_precision(cfg, cpu)))
    if cfg.train.mixed_precision == "fp16" and cpu:
        raise ConfigError("train.mixed_precision=fp16 needs a GPU; on the CPU use bf16 or fp32")
    # cuDNN's float32 convolutions use TF32 by default; this extends it to the matrix products (the
    # seed generator's fused upsampling, Linear layers).
    torch.backends.cuda.matmul.allow_tf32 = cfg.train.tf32
    if cfg.train.deterministic:  # before the first kernel: cuBLAS is deterministic only with a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)  # also cuDNN's algorithm choice and inductor's autotuning
    if cfg.train.cuda_graph and (cpu or not torch.cuda.is_available()):
        raise ConfigError("train.cuda_graph=true needs a CUDA GPU; set train.cuda_graph=false on this machine")
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision={"fp32": "no"}.get(cfg.train.mixed_precision, cfg.train.mixed_precision),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if cfg.train.compile else "no"),
        log_with="wandb" if cfg.logging.wandb != "disabled" else None,
        kwargs_handlers=[ddp_without_forward_buffer_sync(),
                         InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.timeout_s)),
                         # Autocast's cache of casts would be freed behind a CUDA graph's back; it saves
                         # nothing here anyway (Accelerate enters autocast per forward, which uses each weight once).
                         AutocastKwargs(cache_enabled=False)],
    )
    cfg = resolve_batches(cfg, resume_from, accelerator.num_processes)
    accumulates = batch_plan(cfg, accelerator.num_processes).accumulation > 1
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                             cuda_graph=_cuda_graph(cfg, accelerator, accumulates)))
    if cfg.loss.r1_gamma and accelerator.mixed_precision == "fp16":  # known only here: null means the launcher's
        raise ConfigError("loss.r1_gamma > 0 needs bf16 or fp32: the R1 penalty's inner gradient is taken without "
                          "fp16 loss scaling and could underflow; set train.mixed_precision=bf16")
    if cfg.train.cuda_graph and (accelerator.num_processes > 1 or accelerator.mixed_precision == "fp16"):
        raise ConfigError("train.cuda_graph=true runs one process without fp16 loss scaling; this launch has "
                          f"{accelerator.num_processes} processes and mixed precision {accelerator.mixed_precision}: "
                          "launch one process with bf16 or fp32, or set train.cuda_graph=false")
    if cfg.train.cuda_graph and accumulates:
        raise ConfigError("train.cuda_graph=true replays one forward pass per network; this launch accumulates "
                          f"micro-batches of data.batch_size={cfg.data.batch_size}: raise data.batch_size to "
                          f"{cfg.data.global_batch // accelerator.num_processes}, or set train.cuda_graph=false")
    return accelerator, cfg


def hardware(accelerator: Accelerator) -> dict:
    """What trained: the device's name, the number of processes and the precision (state.json, the model card)."""
    if accelerator.device.type == "cuda":
        name = torch.cuda.get_device_name(accelerator.device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
        models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        name = f"{models[0] if models else platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return {"device": f"{accelerator.device.type}: {name}", "processes": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision}


def _precision(cfg: Config, cpu: bool) -> str | None:
    """`train.mixed_precision` as given, or where auto: bf16 where this device runs it natively, else fp32. A CPU
    without AVX512-BF16 or AMX emulates bf16 at a fraction of fp32's speed (docs/performance.md)."""
    if cfg.train.mixed_precision != "auto":
        return cfg.train.mixed_precision
    if not cpu:
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    native = (torch.backends.cpu.get_cpu_capability() == "AVX512"  # the kernels torch dispatches to here
              and any(getattr(torch.cpu, probe, lambda: False)()
                      for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")))
    return "bf16" if native else "fp32"


def _cuda_graph(cfg: Config, accelerator: Accelerator, accumulates: bool) -> bool:
    """`train.cuda_graph` as given, or where null: wherever a graph can run (docs/performance.md has the gain)."""
    if cfg.train.cuda_graph is not None:
        return cfg.train.cuda_graph
    return (accelerator.device.type == "cuda" and accelerator.num_processes == 1
            and accelerator.mixed_precision != "fp16" and cfg.train.on_nonfinite != "skip"
            and not cfg.train.compile  # with torch.compile: when asked for, until measured
            and not accumulates)


