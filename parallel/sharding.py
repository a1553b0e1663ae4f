"""How a full (unsharded) parameter maps to the shard a tensor-parallel rank keeps.

A `ShardSpec` says which dimension is split over tp and, for fused weights such as
Q|K|V or gate|up, the sizes of the segments that are each split separately (so rank r
holds the r-th slice of every segment, concatenated). Replicated parameters have
`dim=None`. Initialization, checkpoint resharding, export and muP all read these specs,
so none of them needs attributes stuck on tensors.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class ShardSpec:
    """The full shape of a parameter and how tp splits it."""

    full_shape: Tuple[int, ...]
    dim: Optional[int] = None
    segments: Optional[Tuple[int, ...]] = None
    tp_partial_grad: bool = False  # replicated, but each tp rank sees part of the input (sequence parallelism)
    valid_rows: Optional[int] = None  # rows past this are vocabulary padding (zero, never trained on)
    expert: bool = False  # held by one rank of each expert-parallel group (ep > 1): an expert's own weights

    @property
    def is_sharded(self) -> bool:
        return self.dim is not None

    def _segments(self) -> Sequence[int]:
        return self.segments or (self.full_shape[self.dim],)

    def local_shape(self, tp: int) -> Tuple[int, ...]:
        if self.dim is None:
            return tuple(self.full_shape)
        shape = list(self.full_shape)
        shape[self.dim] = sum(size // tp for size in self._segments())
        return tuple(shape)

    def shard(self, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
        """The slice of `full` that tp rank `rank` of `tp` keeps."""
        if self.dim is None:
            return full
        pieces, start = [], 0
        for size in self._segments():
            step = size // tp
            pieces.append(full.narrow(self.dim, start + rank * step, step))
            start += size
        return torch.cat(pieces, dim=self.dim) if len(pieces) > 1 else pieces[0]

    def unshard(self, shards: List[torch.Tensor]) -> torch.Tensor:
        """The full tensor from every tp rank's shard, in rank order."""
        if self.dim is None:
            return shards[0]
        tp = len(shards)
        segment_parts = [shard.split([size // tp for size in self._segments()], dim=self.dim) for shard in shards]
        return torch.cat([part for seg in range(len(self._segments())) for part in
                          (segment_parts[r][seg] for r in range(tp))], dim=self.dim)
