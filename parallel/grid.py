"""The process grid: each rank's (pp, dp, tp) coordinates and the groups that join them.

Ranks are laid out tp innermost, then dp, then pp outermost (Megatron's order), so
`rank = tp_rank + tp * (dp_rank + dp * pp_rank)`: tensor-parallel groups, the chattiest,
stay inside a node, and cheap point-to-point pipeline traffic crosses nodes.

One `Grid` object is built per process and passed to whatever needs a group; there is
no module-level state. `Layout` is the same arithmetic without process groups, so plans
and error checks work for any world size before anything is initialized.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist


class LayoutError(ValueError):
    """A tp x pp x dp split the world size does not allow."""


@dataclass(frozen=True)
class Layout:
    """Degrees of a tp x pp x dp split of `world_size` ranks (no process groups)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    dp: int = 1

    @classmethod
    def infer(cls, world_size: int, tp: int = 1, pp: int = 1, dp: Optional[int] = None) -> "Layout":
        """Infer dp from the world size (or check the given one)."""
        for name, value in (("world size", world_size), ("parallel.tp", tp), ("parallel.pp", pp),
                            ("parallel.dp", 1 if dp is None else dp)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name}={value} must be a positive integer.")
        if world_size % (tp * pp):
            raise LayoutError(
                f"world size {world_size} is not a multiple of parallel.tp x parallel.pp = {tp * pp}; "
                f"launch a multiple of {tp * pp} processes or change tp/pp.")
        inferred = world_size // (tp * pp)
        if dp is not None and dp != inferred:
            raise LayoutError(
                f"parallel.dp={dp} but world size {world_size} / (tp {tp} x pp {pp}) = {inferred}; "
                f"drop parallel.dp or launch {dp * tp * pp} processes.")
        return cls(world_size, tp, pp, inferred)

    def coords(self, rank: int) -> Tuple[int, int, int]:
        """(pp_rank, dp_rank, tp_rank) of a global rank."""
        return rank // (self.tp * self.dp), (rank // self.tp) % self.dp, rank % self.tp

    def rank_of(self, pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def tp_groups(self) -> List[List[int]]:
        return [[self.rank_of(p, d, t) for t in range(self.tp)] for p in range(self.pp) for d in range(self.dp)]

    def dp_groups(self) -> List[List[int]]:
        return [[self.rank_of(p, d, t) for d in range(self.dp)] for p in range(self.pp) for t in range(self.tp)]

    def pp_groups(self) -> List[List[int]]:
        return [[self.rank_of(p, d, t) for p in range(self.pp)] for d in range(self.dp) for t in range(self.tp)]

    def mp_groups(self) -> List[List[int]]:
        """Model-parallel groups (tp x pp): the ranks that together hold one model replica."""
        return [[self.rank_of(p, d, t) for p in range(self.pp) for t in range(self.tp)] for d in range(self.dp)]

    def groups(self) -> Dict[str, List[List[int]]]:
        """Every group kind by name, each a list of rank lists (the order `Grid.build` creates them)."""
        return {"tp": self.tp_groups(), "dp": self.dp_groups(), "pp": self.pp_groups(), "mp": self.mp_groups()}

    def describe(self) -> str:
        return f"world {self.world_size} = tp {self.tp} x dp {self.dp} x pp {self.pp}"


@dataclass
class Grid:
    """This rank's place in the tp x pp x dp grid, with its process groups.

    Groups are None when their size is 1 (no communication is needed), and the
    whole grid is trivial in a single process without `torch.distributed`.
    """

    layout: Layout
    rank: int = 0
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: Optional[dist.ProcessGroup] = None
    dp_group: Optional[dist.ProcessGroup] = None
    pp_group: Optional[dist.ProcessGroup] = None
    mp_group: Optional[dist.ProcessGroup] = None
    group_ranks: Dict[str, List[int]] = field(default_factory=dict)

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "Grid":
        """The grid of one process: every degree 1, no groups."""
        return cls(Layout(1), 0, "none", device or torch.device("cpu"), group_ranks={
            "tp": [0], "dp": [0], "pp": [0], "mp": [0]})

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: Optional[int] = None,
              device: Optional[torch.device] = None) -> "Grid":
        """Build the groups of the current default process group (or a single-process grid).

        Every rank must call this with the same degrees: `new_group` is collective, so
        every rank creates every group (of size > 1) in the same order. The backend is the
        default group's, chosen once when it was initialized (NCCL on CUDA, gloo on CPU).
        """
        if not dist.is_available() or not dist.is_initialized():
            Layout.infer(1, tp, pp, dp)
            return cls.single(device)
        layout = Layout.infer(dist.get_world_size(), tp, pp, dp)
        rank = dist.get_rank()
        grid = cls(layout, rank, dist.get_backend(), device or torch.device("cpu"))
        for name, groups in layout.groups().items():
            for ranks in groups:
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    setattr(grid, f"{name}_group", group)
                    grid.group_ranks[name] = ranks
        return grid

    # coordinates -----------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def pp_rank(self) -> int:
        return self.layout.coords(self.rank)[0]

    @property
    def dp_rank(self) -> int:
        return self.layout.coords(self.rank)[1]

    @property
    def tp_rank(self) -> int:
        return self.layout.coords(self.rank)[2]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def pp_peer(self, offset: int) -> int:
        """Global rank of the pipeline stage `offset` steps away (wrapping around)."""
        return self.layout.rank_of((self.pp_rank + offset) % self.pp, self.dp_rank, self.tp_rank)

    def describe(self) -> str:
        return (f"rank {self.rank}: pp {self.pp_rank}/{self.pp} dp {self.dp_rank}/{self.dp} "
                f"tp {self.tp_rank}/{self.tp} ({self.backend})")
