"""Where am I running: torchrun, Slurm, or a single process; and the process group for it."""

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

log = logging.getLogger("plait")


@dataclass(frozen=True)
class ProcessEnv:
    """This process's rank, local rank and world size, and who launched it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launcher: str = "single"  # single | torchrun | slurm

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.launcher != "single"


def detect(environ: Optional[dict] = None) -> ProcessEnv:
    """Read the launcher's variables: torchrun's RANK/WORLD_SIZE first, then Slurm's, else one process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"]), "slurm")
    return ProcessEnv()


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cuda:<local_rank> when CUDA is there (or asked for), else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("train.device=cuda but CUDA is not available; use train.device=cpu or auto.")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(env: ProcessEnv, device: torch.device, backend: str = "auto",
                       timeout_s: int = 600) -> None:
    """Initialize torch.distributed once for a multi-process run (NCCL on CUDA, gloo on CPU)."""
    if not env.distributed or dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if env.launcher == "slurm":
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    log.info("process group: %s, world %d", backend, env.world_size)
