"""Per-rank random streams for dropout under tensor parallelism.

Where activations are replicated over tp (after a row-parallel reduction) every tp rank
must drop the same elements; where they are sharded (attention heads, sequence shards)
ranks must draw different masks. Two generators, seeded from the run seed, give both:
`replicated` is the same on all tp ranks, `sharded` differs by tp rank (Megatron's
seed + 2718 + tp_rank). Data-parallel and pipeline ranks get distinct streams too.
"""

import torch

from plait.parallel.grid import Grid


class ParallelRNG:
    """Dropout masks from explicit generators, so no global RNG state is shared or swapped."""

    def __init__(self, seed: int, grid: Grid, device: torch.device = torch.device("cpu")):
        base = seed + 100003 * grid.dp_rank + 1009 * grid.pp_rank
        self.replicated = torch.Generator(device=device).manual_seed(base)
        self.sharded = torch.Generator(device=device).manual_seed(base + 2718 + grid.tp_rank)

    def dropout(self, x: torch.Tensor, p: float, sharded: bool) -> torch.Tensor:
        """Inverted dropout with this rank's replicated or sharded stream."""
        generator = self.sharded if sharded else self.replicated
        keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32) >= p
        return x * keep.to(x.dtype) / (1.0 - p)

    def state(self) -> dict:
        return {"replicated": self.replicated.get_state(), "sharded": self.sharded.get_state()}

    def load_state(self, state: dict) -> None:
        self.replicated.set_state(state["replicated"])
        self.sharded.set_state(state["sharded"])
