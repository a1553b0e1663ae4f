"""Learning-rate schedules: linear warm-up, then a decay to `min_lr_ratio` of the peak.

- cosine, linear: the decay spans every step after warm-up;
- constant: no decay;
- wsd (warmup-stable-decay; Hu et al. 2024, MiniCPM; Hägele et al. 2024): the peak holds
  after warm-up, and only the last `decay_fraction` of the run decays, in `decay_shape`
  (linear, cosine, or sqrt: 1 - sqrt(progress), which Hägele et al. find matches cosine
  with a 20% cool-down). A run can be extended from a checkpoint taken before the decay.
"""

import math
from typing import Any, Callable, Dict

from plait.optim.config import OptimConfig

# the decay from 1 to 0 over progress in [0, 1]: the shapes a schedule decays in
DECAYS: Dict[str, Callable[[float], float]] = {
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1.0 - progress,
    "sqrt": lambda progress: 1.0 - math.sqrt(progress),
}
# optim.schedule -> its decay shape after warm-up (None: read optim.decay_shape); the keys are the choices
SCHEDULES: Dict[str, Any] = {"cosine": DECAYS["cosine"], "linear": DECAYS["linear"], "constant": None, "wsd": None}


def decay_start(total_steps: int, cfg: OptimConfig) -> int:
    """The first step that decays: after warm-up (cosine, linear), or the last `decay_fraction` of the run (wsd)."""
    if cfg.schedule == "wsd":
        return max(cfg.warmup_steps, total_steps - max(1, round(cfg.decay_fraction * total_steps)))
    return cfg.warmup_steps


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    start = decay_start(total_steps, cfg)
    if cfg.schedule == "constant" or step < start:  # exactly 1 (the decay's formula could round to just below)
        return 1.0
    decay = DECAYS[cfg.decay_shape] if cfg.schedule == "wsd" else SCHEDULES[cfg.schedule]
    progress = min(1.0, (step - start) / max(1, total_steps - start))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay(progress)


def apply_lr(optimizer: Any, step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Set each group's lr to peak x factor x its own multiplier; returns the base lr.

    `optimizer` is anything with `param_groups` (a torch optimizer or a `ZeroOptimizer`).
    """
    lr = cfg.lr * lr_factor(step, total_steps, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
    return lr
