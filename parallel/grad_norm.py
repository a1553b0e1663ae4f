"""The gradient norm over every group of the grid (clipping by it is `plait.optim.clip_by_norm`).

Each parameter is counted once, as in one process: a tp-sharded parameter contributes
its shard on every tp rank; a replicated one (norm gains) only on tp rank 0; pipeline
stages hold different layers, so the squares are summed over tp x pp (the
model-parallel group); expert-parallel ranks hold different experts, so theirs are summed
over ep. When gradients are sharded over dp too (ZeRO-1), pass `dp_sharded=True` to sum
over dp as well.
"""

from typing import Iterable, Tuple

import torch
import torch.distributed as dist

from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec


def local_sum_of_squares(entries: Iterable[Tuple[torch.Tensor, ShardSpec]], grid: Grid,
                         experts: bool = False) -> torch.Tensor:
    """Sum of squared grads this rank owns (replicated ones only on tp rank 0): of the experts' own weights
    with `experts`, else of the rest."""
    total = torch.zeros((), dtype=torch.float32, device=grid.device)
    for grad, spec in entries:
        if grad is not None and spec.expert == experts and (spec.is_sharded or grid.tp_rank == 0):
            total = total + grad.detach().float().pow(2).sum().to(total.device)
    return total


def global_grad_norm(entries: Iterable[Tuple[torch.Tensor, ShardSpec]], grid: Grid,
                     dp_sharded: bool = False) -> torch.Tensor:
    """The L2 norm of the whole model's gradient (or of any per-parameter tensors laid out as the parameters
    are: the trainer's weights norm passes the weights), the same number on every rank. Under expert
    parallelism each ep rank holds other experts: their squares are summed over ep first."""
    entries = list(entries)
    squares, expert_squares = local_sum_of_squares(entries, grid), local_sum_of_squares(entries, grid, experts=True)
    if grid.ep_group is not None and not dp_sharded:  # (ZeRO's pieces: the sum over dp below reaches every ep rank)
        dist.all_reduce(expert_squares, group=grid.ep_group)
    squares = squares + expert_squares
    if grid.mp_group is not None:
        dist.all_reduce(squares, group=grid.mp_group)
    if dp_sharded and grid.grad_group is not None:  # ZeRO pieces: over dp (times cp)
        dist.all_reduce(squares, group=grid.grad_group)
    return squares.sqrt()
