"""Whole matrices from this rank's pieces, for Muon's Newton-Schulz step under tp x dp x ZeRO.

Muon (`plait.optim.muon`) updates its momentum elementwise on whatever tensors it steps, but
orthogonalizes whole matrices. `ShardedMatrices.orthogonalize(pieces, fn)` puts them together:

1. dp: each rank writes its pieces (ZeRO-1's range of the flattened tp-local weight, ZeRO-2/3's
   rows, which are a range too; without ZeRO, the whole tp-local weight) into a zero buffer that
   holds every matrix of its chunks; with ZeRO the buffer is summed over the grad group (one
   all-reduce; pieces do not overlap, so each value arrives exactly);
2. tp: the buffers are all-gathered over tp (one all-gather) and each weight put together as
   `ShardSpec.unshard` does, segment by segment;
3. `fn` runs on each logical matrix: a fused weight's segments (Q|K|V, gate|up) each on its own,
   as a model with separate projections has them;
4. each rank keeps its piece of each result (`ShardSpec.shard`, then its range).

Every rank of a stage repeats the work for all the stage's matrices (tp x dp times, as
Moonlight's "distributed Muon" does); the buffer costs one fp32 copy of the stage's matrices.
Each call is a collective over tp and (with ZeRO) the grad group: every rank calls it every step.
"""

from typing import Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from plait.common import collectives
from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec

Pieces = Dict[str, Tuple[torch.Tensor, int]]  # name -> (this rank's piece, its start in the flattened local weight)


class ShardedMatrices:
    """The matrices `specs` names (this rank's chunks', by global name) as tp and ZeRO lay them out."""

    def __init__(self, specs: Dict[str, ShardSpec], grid: Grid, sharded_over_dp: bool,
                 dtype: torch.dtype = torch.float32):
        self.specs = dict(sorted(specs.items()))  # one order on every rank of the stage
        self.tp, self.tp_rank = grid.tp, grid.tp_rank
        self.tp_group = grid.tp_group if grid.tp > 1 else None
        self.dp_group = grid.grad_group if sharded_over_dp and grid.grad_size > 1 else None
        self.device, self.dtype = grid.device, dtype
        self.shapes = {name: spec.local_shape(grid.tp) for name, spec in self.specs.items()}
        self.offsets, total = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = total
            total += int(torch.Size(shape).numel())
        self.total = total

    def orthogonalize(self, pieces: Pieces, fn: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, torch.Tensor]:
        """{name: this rank's piece of fn(whole matrix)} for each name in `pieces` (collective)."""
        wholes = self._whole(self._tp_local(pieces))
        result = {}
        for name, whole in wholes.items():
            spec = self.specs[name]
            segments = whole.split(list(spec.segments)) if spec.segments else (whole,)
            done = torch.cat([fn(segment) for segment in segments]) if len(segments) > 1 else fn(whole)
            if name in pieces:
                piece, start = pieces[name]
                mine = spec.shard(done, self.tp_rank, self.tp).reshape(-1)
                result[name] = mine[start:start + piece.numel()].view_as(piece)
        return result

    def _tp_local(self, pieces: Pieces) -> torch.Tensor:
        """One flat buffer of every tp-local matrix: this rank's pieces, summed over the grad group under ZeRO."""
        buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for name, (piece, start) in pieces.items():
            at = self.offsets[name] + start
            buffer[at:at + piece.numel()] = piece.reshape(-1)
        if self.dp_group is not None:
            dist.all_reduce(buffer, group=self.dp_group)
        return buffer

    def _whole(self, buffer: torch.Tensor) -> Dict[str, torch.Tensor]:
        """{name: the whole matrix} from every tp rank's buffer."""
        buffers: List[torch.Tensor] = [buffer]
        if self.tp_group is not None:
            gathered = buffer.new_empty(self.tp * self.total)
            collectives.all_gather_tensor(gathered, buffer, group=self.tp_group)
            buffers = list(gathered.chunk(self.tp))
        wholes = {}
        for name, shape in self.shapes.items():
            at, size = self.offsets[name], int(torch.Size(shape).numel())
            wholes[name] = self.specs[name].unshard([b[at:at + size].view(shape) for b in buffers])
        return wholes
