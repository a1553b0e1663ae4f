"""Clipping by a given gradient norm (the norm over a parallel layout is `plait.parallel.global_grad_norm`)."""

from typing import Iterable

import torch


@torch.no_grad()
def clip_by_norm(grads: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor) -> None:
    """Scale grads by max_norm / norm when the norm exceeds max_norm (0 disables)."""
    grads = [g for g in grads if g is not None]
    if max_norm <= 0 or not grads:
        return
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
