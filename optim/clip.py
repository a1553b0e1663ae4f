"""Clipping by a given gradient norm (the norm over a parallel layout is `plait.parallel.global_grad_norm`)."""

from typing import Iterable

import torch


@torch.no_grad()
def clip_by_norm(grads: Iterable[torch.Tensor], max_norm: float, norm: torch.Tensor, loss_scale: float = 1.0) -> None:
    """Scale grads by max_norm / norm when the norm exceeds max_norm (0 disables).

    `loss_scale`: the grads are fp16's scaled ones and `norm` is the unscaled norm; they are
    divided by the scale in the same pass (one multiply by (1 / scale) x the clip factor).
    """
    grads = [g for g in grads if g is not None]
    if not grads:
        return
    coef = 1.0
    if max_norm > 0:
        coef = min(1.0, max_norm / (float(norm) + 1e-6))
    coef /= loss_scale
    if coef != 1.0:
        torch._foreach_mul_(grads, coef)
