"""Which global layers each pipeline chunk holds, and which chunks hold the embedding and head.

The model's `n_layers` blocks are cut into p x v equal, contiguous chunks in model order:
virtual stage k holds layers [k L / (p v), (k + 1) L / (p v)); stage 0 also holds the
embedding, the last stage the final norm and head. Stage k runs on pp rank k mod p, or, under
the V placement of ZB-V and DualPipeV, rank r holds stages r and 2p - 1 - r.
"""

from dataclasses import dataclass
from typing import List

from plait.parallel.pipeline.schedule import ScheduleError, local_stages


@dataclass(frozen=True)
class ChunkPlan:
    """One chunk: its virtual stage, its global layer indices and its ends."""

    stage: int
    layers: List[int]
    has_embedding: bool
    has_head: bool


def check_partition(n_layers: int, pp: int, vpp: int) -> None:
    if n_layers % (pp * vpp):
        raise ScheduleError(
            f"model.n_layers={n_layers} is not divisible by parallel.pp x parallel.vpp = {pp} x {vpp}; "
            f"pick pp and vpp whose product divides the layer count.")


def chunk_plan(stage: int, n_layers: int, pp: int, vpp: int) -> ChunkPlan:
    """The plan of virtual stage `stage` out of pp x vpp."""
    check_partition(n_layers, pp, vpp)
    per_chunk = n_layers // (pp * vpp)
    return ChunkPlan(stage, list(range(stage * per_chunk, (stage + 1) * per_chunk)),
                     stage == 0, stage == pp * vpp - 1)


def rank_chunk_plans(pp_rank: int, n_layers: int, pp: int, vpp: int, placement: str = "loop") -> List[ChunkPlan]:
    """The chunks of one pp rank, in model order (its stages pp_rank, pp_rank + p, ...; or the V's two)."""
    return [chunk_plan(stage, n_layers, pp, vpp) for stage in local_stages(pp_rank, pp, vpp, placement)]
