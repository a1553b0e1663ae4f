"""The process grid: this rank's coordinates in the layout and the process groups that join them.

One `Grid` object is built per process and passed to whatever needs a group; there is
no module-level state. It is backed by torch's `DeviceMesh` over the layout's named
dimensions (`init_device_mesh(..., mesh_dim_names=("pp", "dp", "cp", "tp"))`, gloo on
CPU, NCCL on CUDA), so torch's own tools (FSDP2, DTensor, DCP) can be handed `grid.mesh`
or a slice of it (`grid.mesh["dp"]`). Each dimension's group is the mesh's; groups over
several dimensions (`grid.group("pp", "tp")`, the ranks of one model replica) are made
once at build time. A group of one rank is None everywhere: nothing is sent.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from plait.parallel.layout import COMBOS, DIMS, Layout

@dataclass
class Grid:
    """This rank's place in the layout, with its process groups (None where a group has one rank)."""

    layout: Layout
    rank: int = 0
    backend: str = "gloo"
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mesh: Optional[object] = None  # torch.distributed.device_mesh.DeviceMesh over DIMS, when distributed
    expert_mesh: Optional[object] = None  # 1-D DeviceMesh over the expert_grad group (ep > 1): FSDP2 shards experts
    groups: Dict[Tuple[str, ...], Optional[dist.ProcessGroup]] = field(default_factory=dict)
    group_ranks: Dict[str, List[int]] = field(default_factory=dict)

    @classmethod
    def single(cls, device: Optional[torch.device] = None) -> "Grid":
        """The grid of one process: every degree 1, no groups."""
        layout = Layout(1)
        return cls(layout, 0, "none", device or torch.device("cpu"),
                   group_ranks={name: [0] for name in {**layout.groups(), **layout.expert_groups()}})

    @classmethod
    def build(cls, tp: int = 1, pp: int = 1, dp: Optional[int] = None,
              device: Optional[torch.device] = None, cp: int = 1, ep: int = 1) -> "Grid":
        """Build the groups of the current default process group (or a single-process grid).

        Every rank must call this with the same degrees: making groups is collective, so
        every rank creates every group in the same order. The backend is the default
        group's, chosen once when it was initialized (NCCL on CUDA, gloo on CPU).
        """
        device = device or torch.device("cpu")
        if not dist.is_available() or not dist.is_initialized():
            Layout.infer(1, tp, pp, dp, cp, ep)
            return cls.single(device)
        layout = Layout.infer(dist.get_world_size(), tp, pp, dp, cp, ep)
        rank = dist.get_rank()
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

        mesh = init_device_mesh(device.type, tuple(layout.sizes().values()), mesh_dim_names=DIMS)
        grid = cls(layout, rank, dist.get_backend(), device, mesh)
        for name in DIMS:
            grid.groups[(name,)] = mesh.get_group(name) if layout.size(name) > 1 else None
        for dims in COMBOS.values():
            key = tuple(name for name in DIMS if name in dims)
            for ranks in layout.groups_of(*key):
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    grid.groups[key] = group
        for name, groups in layout.expert_groups().items():  # ep's, inside dp (ep 1: groups of one and all dp)
            for ranks in groups:
                group = dist.new_group(ranks) if layout.ep > 1 else None  # (one rank too: FSDP2's expert mesh)
                if rank in ranks:
                    grid.groups[(name,)] = group if len(ranks) > 1 else None
                    if name == "expert_grad" and group is not None:
                        grid.expert_mesh = DeviceMesh.from_group(group, device.type, mesh=ranks)
        for name, groups in {**layout.groups(), **layout.expert_groups()}.items():
            grid.group_ranks[name] = next(ranks for ranks in groups if rank in ranks)
        return grid

    # expert parallelism (a factor of dp: `Layout.expert_groups`) --------------------------------
    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def ep_group(self) -> Optional[dist.ProcessGroup]:
        """The ep ranks that split each mixture of experts' experts and exchange tokens (None at ep 1)."""
        return self.groups.get(("ep",))

    @property
    def expert_grad_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks holding this rank's experts, whose grads are averaged: dp / ep of them, times cp (None at
        ep 1: an expert's grads are then averaged with the rest, over `grad_group`)."""
        return self.groups.get(("expert_grad",))

    @property
    def expert_grad_size(self) -> int:
        return self.grad_size // self.ep

    @property
    def expert_grad_rank(self) -> int:
        """This rank's place in its expert_grad group (ZeRO-1 shards an expert's grads over that group)."""
        return self.group_ranks["expert_grad"].index(self.rank) if self.ep > 1 else self.grad_rank

    def expert_grad_member(self, index: int) -> int:
        """The global rank of member `index` of this rank's expert_grad group (same tp, pp and ep rank)."""
        return self.group_ranks["expert_grad"][index] if self.ep > 1 else self.grad_member(index)

    def group(self, *names: str) -> Optional[dist.ProcessGroup]:
        """The group of the ranks that differ from this one only in the named dimensions (None: one rank)."""
        key = tuple(name for name in DIMS if name in names)
        if key in self.groups or self.mesh is None:  # no mesh: one process, or a stand-in grid for planning
            return self.groups.get(key)
        raise KeyError(f"no group over {names}; the grid makes one per dimension and {list(COMBOS.values())}")

    # coordinates -----------------------------------------------------------
    def size(self, name: str) -> int:
        return self.layout.size(name)

    def coord(self, name: str) -> int:
        return self.layout.coords(self.rank)[name]

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
    def cp(self) -> int:
        return self.layout.cp

    @property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @property
    def cp_rank(self) -> int:
        return self.coord("cp")

    @property
    def cp_group(self) -> Optional[dist.ProcessGroup]:
        return self.group("cp")

    @property
    def cp_ranks(self) -> List[int]:
        """The global ranks of this rank's cp group, in cp order (the ring)."""
        return next(ranks for ranks in self.layout.groups_of("cp") if self.rank in ranks)

    @property
    def grad_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks holding the same weights and averaging their grads: dp, times cp (each cp rank saw part of
        the same sequences). ZeRO shards over it too."""
        return self.dp_group if self.cp == 1 else self.group(*COMBOS["dpcp"])

    @property
    def grad_size(self) -> int:
        return self.dp * self.cp

    @property
    def grad_rank(self) -> int:
        return self.dp_rank * self.cp + self.cp_rank

    def grad_member(self, grad_rank: int) -> int:
        """The global rank of member `grad_rank` of this rank's grad group (same tp and pp coordinates)."""
        coords = self.layout.coords(self.rank)
        coords.update(dp=grad_rank // self.cp, cp=grad_rank % self.cp)
        return self.layout.rank_of(**coords)

    @property
    def dp_rank(self) -> int:
        return self.coord("dp")

    @property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @property
    def tp_group(self) -> Optional[dist.ProcessGroup]:
        return self.group("tp")

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        return self.group("dp")

    @property
    def pp_group(self) -> Optional[dist.ProcessGroup]:
        return self.group("pp")

    @property
    def mp_group(self) -> Optional[dist.ProcessGroup]:
        """The ranks of one model replica (tp x pp): grad norms sum over it."""
        return self.group(*COMBOS["mp"])

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def peer(self, **coords: int) -> int:
        """The global rank at this rank's coordinates with the named ones replaced."""
        return self.layout.rank_of(**{**self.layout.coords(self.rank), **coords})

    def pp_peer(self, offset: int) -> int:
        """Global rank of the pipeline stage `offset` steps away (wrapping around)."""
        return self.peer(pp=(self.pp_rank + offset) % self.pp)

    def describe(self) -> str:
        coords = self.layout.coords(self.rank)
        parts = " ".join(f"{name} {coords[name]}/{self.size(name)}" for name in ("pp", "dp", "cp", "tp")
                         if name != "cp" or self.size("cp") > 1)
        return f"rank {self.rank}: {parts} ({self.backend})"
