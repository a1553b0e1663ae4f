"""Choosing a store from `offload.backend` (once, at construction; the choice is logged once)."""

import logging

import torch

from plait.offload.config import OffloadConfig, OffloadError
from plait.offload.store import Store

log = logging.getLogger("plait")


def resolve_backend(cfg: OffloadConfig, device: torch.device) -> str:
    """`auto`: GPUDirect Storage when on CUDA with cuFile and a path, files when a path is set, else host."""
    if cfg.backend != "auto":
        return cfg.backend
    if cfg.path:
        from plait.offload.gds import gds_available

        return "gds" if device.type == "cuda" and gds_available() else "file"
    return "host"


def make_store(cfg: OffloadConfig, device: torch.device, rank: int = 0) -> Store:
    backend = resolve_backend(cfg, device)
    if backend == "host":
        from plait.offload.host import HostStore

        store = HostStore(device, threads=1)
    elif backend == "file":
        from plait.offload.files import FileStore

        store = FileStore(cfg.path, device, threads=cfg.threads, rank=rank)
    elif backend == "aio":
        from plait.offload.aio import AioStore

        store = AioStore(cfg, device, rank=rank)
    elif backend == "gds":
        from plait.offload.gds import GdsStore

        store = GdsStore(cfg, device, rank=rank)
    else:
        raise OffloadError(f"offload.backend={cfg.backend} does not offload; use host|file|aio|gds|auto.")
    if rank == 0:
        log.info("activation offload: %s backend%s (policy %s, keep_last %s, min_bytes %d)", backend,
                 f" in {cfg.path}" if backend in ("file", "aio", "gds") else "", cfg.policy, cfg.keep_last,
                 cfg.min_bytes)
    return store
