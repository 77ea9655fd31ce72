"""Process setup that runs the same script under ``python`` (one process, CPU or GPU) and
under ``torchrun`` (one process per GPU with NCCL, or per CPU worker with gloo)."""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ewa.engine.config import ConfigError
from ewa.engine.distributed import start_process_group


@dataclass(frozen=True)
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # autocast dtype; float32 means no autocast
    store: dist.Store | None = None  # the process group's store (this attempt's namespace)
    cpu_group: dist.ProcessGroup | None = None  # gloo, for the background checkpoint writes

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.type

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank: one small collective of a host
        tensor (gloo), so the GPU's queue is not waited for."""
        if not self.distributed:
            return flag
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class StopSignal:
    """SIGTERM and SIGUSR1 (e.g. Slurm's ``--signal=USR1@120``) as a flag the training loop
    reads every step: the run then stops cleanly, with a resume checkpoint."""

    def __init__(self) -> None:
        self.received: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.received = signum

    def seen(self, rt: Runtime) -> bool:
        """Whether any rank received one: the same answer on every rank."""
        return rt.any(self.received is not None)


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the GPU when there is one, else the CPU; ``cuda`` -> this process's GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device} asked for, but no CUDA GPU is visible; use --device=cpu")
    return torch.device(device)


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]


def init_runtime(device: str = "auto", dtype: str = "auto", group: bool = False) -> Runtime:
    """Read torchrun's environment (if any), pick the device, and start the process group:
    under torchrun (any number of processes), or with ``group`` (FSDP) in a lone process."""
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ or world_size > 1
    store = cpu_group = None
    if (torchrun or group) and not dist.is_initialized():
        # collectives of CPU tensors (background checkpoint writes, signals) go through gloo
        backend = "cpu:gloo,cuda:nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=int(os.environ.get("EWA_DIST_TIMEOUT_MIN", 30)))
        device_id = dev if dev.type == "cuda" else None
        store, cpu_group = start_process_group(backend, timeout, device_id, lone=not torchrun)
    return Runtime(rank, local_rank, world_size, dev, _resolve_dtype(dtype, dev), store, cpu_group)


def check_shared_dir(path: str | os.PathLike, rt: Runtime, wait_s: float = 5.0) -> None:
    """Every rank writes into ``path``: check that all see the same folder. Rank 0 writes a
    token there; a rank that cannot read it within ``wait_s`` is on other storage."""
    if not rt.distributed:
        return
    token = torch.randint(1, 2**62, (1,)) if rt.master else torch.zeros(1, dtype=torch.int64)
    if rt.master:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / f".shared-{token.item()}").touch()
    dist.broadcast(token, src=0)
    file, deadline = Path(path) / f".shared-{token.item()}", time.monotonic() + wait_s
    while not file.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # another node's view of a shared file system may lag a moment
    unseen = rt.any(not file.exists())
    if rt.master:
        file.unlink()
    if unseen:
        raise ConfigError(f"out_dir={path} is not the same folder on every rank (a rank cannot read what rank 0 "
                          "wrote there): put it on storage that every node mounts")


def shutdown(runtime: Runtime | None) -> None:
    """The end of a run that did not fail (a failing rank leaves at once: ``exit_after_error``)."""
    if runtime is not None and dist.is_initialized():
        dist.destroy_process_group()


# bf16 dense peak FLOP/s of the GPUs MFU knows, by the exact model (torch.cuda.get_device_name)
PEAK_FLOPS = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989e12),
    ("A100", 312e12),
]


def peak_flops(device: torch.device) -> float | None:
    """The device's bf16 dense peak, or None for a CPU or an unknown GPU (no MFU then)."""
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    return next((flops for model, flops in PEAK_FLOPS if model in name), None)


def seed_everything(seed: int, *offsets: int) -> None:
    """Seed torch's CPU and CUDA generators from ``seed`` and e.g. (step, rank): randomness
    is then a function of where the run is, so a resumed run draws what the original drew."""
    torch.manual_seed(hash((seed, *offsets)) & 0x7FFF_FFFF_FFFF_FFFF)
