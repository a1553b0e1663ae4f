"""Helpers shared by the offload tests: a tiny decoder, its gradients with and without offload."""

import contextlib
import os
from typing import Dict, Optional

import torch

from plait.offload import ActivationOffload, OffloadConfig
from plait.train.config import ModelConfig

TINY = ModelConfig(name="offload-tiny", vocab_size=256, dim=64, n_layers=4, n_heads=4, max_seq_len=64)


def batch(micro: int = 2, rows: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (micro, rows, seq + 1), generator=torch.Generator().manual_seed(seed))


def offload_config(backend: str, path: Optional[str], **overrides) -> OffloadConfig:
    """CPU tensors offloaded too (device_filter=all), small threshold so the tiny model offloads."""
    settings = dict(backend=backend, path=path, device_filter="all", min_bytes=4096, keep_last=1, prefetch=1)
    settings.update(overrides)
    return OffloadConfig(**settings)


def forward_backward(model, tokens: torch.Tensor, precision: str = "fp32", offload=None) -> Dict[str, float]:
    """One step's micro-batches forward and backward (loss / m), inside the offload step scope."""
    scope = offload.step() if offload is not None else contextlib.nullcontext()
    with scope:
        for micro in tokens:
            autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                        else contextlib.nullcontext())
            with autocast:
                logits = model(micro[:, :-1])
            (model.loss(logits, micro[:, 1:]) / tokens.shape[0]).backward()
    return dict(offload.last_metrics) if offload is not None else {}


def grads(model) -> Dict[str, torch.Tensor]:
    return {name: param.grad.detach().clone() for name, param in model.named_parameters()}


def scratch_files(path: str):
    """Every file under `path` (the scratch folders and what they hold)."""
    found = []
    for root, dirs, files in os.walk(path):
        found += [os.path.join(root, name) for name in files]
    return found


def attach(model, cfg: OffloadConfig, grid=None) -> ActivationOffload:
    offload = ActivationOffload(cfg, grid)
    offload.attach(model)
    return offload
