"""Learning-rate schedules: linear warm-up, then cosine (or linear, or constant) decay."""

import math
from typing import Any, Callable, Dict

from plait.optim.config import OptimConfig

# optim.schedule -> the decay from 1 to 0 over progress in [0, 1] (after warm-up); its keys are the choices
SCHEDULES: Dict[str, Callable[[float], float]] = {
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "constant": lambda progress: 1.0,
}


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":  # exactly 1 (the table's formula could round 1 - r + r to just below)
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * SCHEDULES[cfg.schedule](progress)


def apply_lr(optimizer: Any, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set each group's lr to peak x factor x its own multiplier; returns the base lr.

    `optimizer` is anything with `param_groups` (a torch optimizer or a `ZeroOptimizer`).
    """
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr
