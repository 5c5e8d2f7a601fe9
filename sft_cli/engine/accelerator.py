"""Where training runs: the Accelerator for a recipe's device/precision, and the FLOP numbers MFU uses."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator

from sft_cli.config.schema import DistributedConfig, EngineConfig
from sft_cli.errors import SftError
from sft_cli.model.backbone import unwrap

PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_dtype(precision: str) -> Optional[torch.dtype]:
    """The reduced compute dtype of a precision name (bf16, fp16), or None for full precision."""
    return PRECISION_DTYPES.get(precision) if precision in ("bf16", "fp16") else None


def launcher_world_size() -> int:
    """Processes the launcher (torchrun, accelerate launch, MPI) says this run has; 1 when not launched."""
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 1


def runs_on_cpu(device: str, world_size: int) -> bool:
    """Whether the run takes Accelerate's CPU path (gloo when several processes).

    `auto` and `mps` without CUDA must take it when launched as several processes: otherwise Accelerate
    finds no accelerator backend, every process believes it is alone, and N uncoordinated copies train.
    MPS has no process group, so several processes on a Mac run on its CPU.
    """
    if device == "cpu":
        return True
    return device in ("auto", "mps") and world_size > 1 and not torch.cuda.is_available()


def make_accelerator(config: EngineConfig, training: bool = True) -> Accelerator:
    """An Accelerator for the requested device and precision (auto: CUDA, then MPS, then CPU).

    Sharding (engine.distributed.strategy) is for training; eval, predict and chat load the model whole on
    every process, as a ZeRO-3 plugin would otherwise have transformers build it partitioned.
    """
    if not training:
        config = replace(config, distributed=DistributedConfig())
    if config.device == "cuda" and not torch.cuda.is_available():
        raise SftError("engine.device: cuda was asked for but no CUDA device is visible — use auto or cpu")
    if config.device == "mps" and not torch.backends.mps.is_available():
        raise SftError("engine.device: mps was asked for but is not available — use auto or cpu")
    world = launcher_world_size()
    cpu = runs_on_cpu(config.device, world)
    on_gpu = not cpu and torch.cuda.is_available()
    precision = resolve_precision(config.precision, on_gpu)
    if precision == "fp16" and not on_gpu:
        raise SftError("engine.precision: fp16 needs a CUDA GPU — use bf16 or fp32 on this device")
    kwargs = sharding_plugins(config, on_gpu)
    if config.distributed.strategy == "deepspeed":  # Accelerate forms DeepSpeed's group only off its CPU path
        cpu = False
    else:
        from sft_cli.engine.parallel.deepspeed import forget_earlier_runs

        forget_earlier_runs()
    if world == 1:  # one process may run several recipes (sft check, sweeps, tests): start from a clean state
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=cpu, mixed_precision={"fp32": "no"}.get(precision, precision), **kwargs)
    check_process_group(accelerator.num_processes, world, config.device)
    return accelerator


def sharding_plugins(config: EngineConfig, on_gpu: bool) -> dict[str, Any]:
    """Accelerate's FSDP2 or DeepSpeed plugin for engine.distributed.strategy (nothing for ddp).

    Off CUDA, Accelerate's CPU path (gloo) ignores an FSDP plugin and would wrap the model in DDP, so there the
    engine shards with PyTorch's FSDP2 itself (engine/parallel/fsdp.py); DeepSpeed runs on CUDA or its CPU
    accelerator.
    """
    distributed = config.distributed
    if distributed.strategy == "deepspeed":
        from sft_cli.engine.parallel.deepspeed import accelerator_kwargs

        return accelerator_kwargs(distributed, config.device)
    if distributed.strategy == "ddp" or not on_gpu:
        return {}
    from accelerate import FullyShardedDataParallelPlugin

    settings = {"fsdp_version": 2, "reshard_after_forward": True, **distributed.fsdp}
    return {"fsdp_plugin": FullyShardedDataParallelPlugin(**settings)}


def check_process_group(num_processes: int, world_size: int, device: str) -> None:
    """Never train N uncoordinated copies into one directory: the engine must see the launcher's world."""
    if world_size > 1 and num_processes != world_size:
        raise SftError(
            f"engine.device: {device}: the launcher started {world_size} processes but the engine joined "
            f"{num_processes} — no process group was formed; set engine.device: cpu (gloo) or cuda (nccl)"
        )


def resolve_precision(precision: str, on_gpu: bool) -> str:
    """`auto` is bf16 where the hardware computes it natively, else fp16 on older GPUs, else fp32."""
    if precision != "auto":
        return precision
    if on_gpu:
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX, where bf16 matmuls beat fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def estimate_flops_per_token(model: torch.nn.Module) -> float:
    """~6 FLOPs per non-embedding parameter per trained token (2 forward + 4 backward)."""
    from sft_cli.model.backbone import embedding_parameter_names

    embeddings = embedding_parameter_names(unwrap(model))
    params = sum(p.numel() for n, p in unwrap(model).named_parameters() if n not in embeddings)
    return 6.0 * params


def measure_peak_flops(device: torch.device, dtype: Optional[torch.dtype]) -> float:
    """Achieved FLOP/s of a large matmul in the training dtype: the roof MFU is measured against."""
    size = 2048 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    b = torch.randn(size, size, device=device, dtype=dtype or torch.float32)
    for _ in range(2):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    repeats = 20 if device.type == "cuda" else 6
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)
