"""The tensor collectives under whichever name this torch has (torch 2.13 renamed them), chosen once; and the
three a tensor-parallel region uses along any dimension, started now and finished later (`Pending.wait`), so a
caller can compute while the bytes move."""

from typing import Callable

import torch
import torch.distributed as dist

all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class Pending:
    """A collective in flight: `wait()` blocks until it lands (on CUDA: orders the current stream after it) and
    returns its result, rearranged by `finish`."""

    __slots__ = ("work", "out", "finish")

    def __init__(self, work, out: torch.Tensor, finish: Callable[[torch.Tensor], torch.Tensor]):
        self.work, self.out, self.finish = work, out, finish

    def wait(self) -> torch.Tensor:
        self.work.wait()
        return self.finish(self.out)


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


def start_all_gather(x: torch.Tensor, dim: int, group) -> Pending:
    """Every rank's `x` concatenated along `dim` in rank order (gathered along dim 0, then moved to `dim`)."""
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = all_gather_tensor(out, x.contiguous(), group=group, async_op=True)
    if dim == 0:
        return Pending(work, out, _same)
    return Pending(work, out, lambda gathered: torch.cat(gathered.chunk(world, dim=0), dim=dim))


def start_reduce_scatter(x: torch.Tensor, dim: int, group) -> Pending:
    """The sum over ranks of `x`, of which this rank keeps its slice along `dim`."""
    world = dist.get_world_size(group)
    stacked = torch.cat(x.chunk(world, dim=dim), dim=0) if dim != 0 else x.contiguous()
    out = torch.empty((stacked.shape[0] // world,) + tuple(stacked.shape[1:]), dtype=x.dtype, device=x.device)
    return Pending(reduce_scatter_tensor(out, stacked, group=group, async_op=True), out, _same)


def start_all_reduce(x: torch.Tensor, group) -> Pending:
    """The sum over ranks of `x`, written into `x` (made contiguous first)."""
    x = x.contiguous()
    return Pending(dist.all_reduce(x, group=group, async_op=True), x, _same)
