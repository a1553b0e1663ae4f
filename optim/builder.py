"""Build the optimizer named by the config over parameter groups: AdamW, Lion, or Muon with AdamW beside it."""

import logging
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from plait.optim.config import OptimConfig
from plait.optim.groups import GroupKey, param_groups
from plait.optim.muon import MatrixLayout

log = logging.getLogger("plait")


def _adamw(groups, cfg: OptimConfig, device: torch.device,
           matrices: Optional[MatrixLayout] = None) -> torch.optim.Optimizer:
    """torch's fused AdamW where the device has it (CPU and CUDA in torch >= 2.4), else foreach.

    AdamW's only kernels are torch's: `optim.impl=deepspeed` or `triton` (Lion's kernels)
    says so in one log line and takes the fused one (as fast as DeepSpeed's FusedAdam).
    """
    impl = cfg.impl if cfg.impl in ("fused", "foreach") else "fused"
    if cfg.impl in ("deepspeed", "triton", "compiled"):
        log.info("optimizer: optim.impl=%s has no AdamW kernel in plait; using torch's fused AdamW", cfg.impl)
    try:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                      fused=impl == "fused", foreach=None if impl == "fused" else True)
    except RuntimeError:
        impl = "foreach"
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=True)
    log.info("optimizer: AdamW (%s) on %s", impl, device.type)
    return optimizer


def _lion(groups, cfg: OptimConfig, device: torch.device,
          matrices: Optional[MatrixLayout] = None) -> torch.optim.Optimizer:
    from plait.optim.lion import Lion

    return Lion(groups, lr=cfg.lr, betas=tuple(cfg.betas), impl=cfg.impl, device=device)


def _muon(groups, cfg: OptimConfig, device: torch.device,
          matrices: Optional[MatrixLayout] = None) -> torch.optim.Optimizer:
    """Muon over the groups marked `muon` (`plait.optim.muon.muon_group_of` marks them), AdamW over the rest;
    `matrices` is the layout its pieces come from (None: whole matrices, one process)."""
    from plait.optim.muon import Muon

    if cfg.impl not in ("auto", "fused"):
        log.info("optimizer: optim.impl=%s names Lion's kernels; Muon runs matmuls and torch's fused AdamW", cfg.impl)
    optimizer = Muon(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, momentum=cfg.muon_momentum,
                     nesterov=cfg.muon_nesterov, ns_steps=cfg.muon_ns_steps, ns_dtype=cfg.muon_ns_dtype,
                     adjust_lr=cfg.muon_adjust_lr, matrices=matrices)
    log.info("optimizer: Muon (%d Newton-Schulz steps in %s, lr scaled %s) for %d hidden matrices, AdamW for the "
             "rest, on %s", cfg.muon_ns_steps, cfg.muon_ns_dtype, cfg.muon_adjust_lr,
             sum(len(g["params"]) for g in optimizer.param_groups if g["muon"]), device.type)
    return optimizer


# optim.name -> builder: the keys are the choices validation accepts and lists
OPTIMIZERS: Dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": _adamw,
    "lion": _lion,
    "muon": _muon,
}


def build_optimizer(named_params: Dict[str, nn.Parameter], cfg: OptimConfig,
                    group_of: Optional[GroupKey] = None,
                    device: torch.device = torch.device("cpu"),
                    matrices: Optional[MatrixLayout] = None) -> torch.optim.Optimizer:
    """The configured optimizer over `named_params`, grouped by `group_of` (muP passes its table)."""
    return make_optimizer(param_groups(named_params, cfg.weight_decay, group_of), cfg, device, matrices)


def make_optimizer(groups: List[Dict], cfg: OptimConfig,
                   device: torch.device = torch.device("cpu"),
                   matrices: Optional[MatrixLayout] = None) -> torch.optim.Optimizer:
    """The configured optimizer over ready-made param groups (ZeRO-1 passes its shard pieces); `matrices`: where
    Muon finds whole matrices (`plait.parallel.matrices.ShardedMatrices`), the others ignore it."""
    if cfg.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.name} is not one of {', '.join(OPTIMIZERS)}.")
    return OPTIMIZERS[cfg.name](groups, cfg, device, matrices)
