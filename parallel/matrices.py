"""Whole matrices from this rank's pieces, for Muon's Newton-Schulz step under tp x dp x ZeRO.

Muon (`plait.optim.muon`) updates its momentum elementwise on whatever tensors it steps, but
orthogonalizes whole matrices. `ShardedMatrices.orthogonalize(pieces, fn)` puts them together:

1. dp: each rank writes its pieces (ZeRO-1's range of the flattened tp-local weight, ZeRO-2/3's
   rows, which are a range too; without ZeRO, the whole tp-local weight) into a zero buffer that
   holds every matrix of its chunks; with ZeRO the buffer is summed over the grad group (one
   all-reduce; pieces do not overlap, so each value arrives exactly);
2. tp: the buffers are all-gathered over tp (one all-gather) and each weight put together as
   `ShardSpec.unshard` does, segment by segment;
3. `fn` runs on each logical matrix this rank holds a piece of: a fused weight's segments
   (Q|K|V, gate|up) each on its own, as a model with separate projections has them;
4. each rank keeps its piece of each result, as parts (one a segment), each with the scale `fn`
   gave its segment; results stay in `fn`'s dtype (bf16 by default) until Muon adds them.

At tp 1 without ZeRO the pieces are the matrices: no buffer, no copy. Under ZeRO-1 a rank holds
pieces of about 1/dp of the matrices, so the Newton-Schulz work spreads over dp; under tp and
ZeRO-2/3 (every rank holds a part of every matrix) each rank repeats it for its whole stage, as
Moonlight's "distributed Muon" does. The buffer costs one copy of the stage's matrices. Each call
is a collective over tp and (with ZeRO) the grad group: every rank calls it every step.
"""

from typing import Dict, List

import torch
import torch.distributed as dist

from plait.common import collectives
from plait.common.matrix_parts import Orthogonalize, Part, Pieces
from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec



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

    def orthogonalize(self, pieces: Pieces, fn: Orthogonalize) -> Dict[str, List[Part]]:
        """{name: the parts of this rank's piece, each (offset in the piece, fn's matrix there, fn's scale)} for each
        name in `pieces` (collective). Only the segments this rank holds a piece of are orthogonalized: under
        ZeRO-1 about 1/dp of the stage's."""
        wholes = self._whole(pieces)
        return {name: self._parts(self.specs[name], wholes[name], piece, start, fn)
                for name, (piece, start) in pieces.items()}

    def _parts(self, spec: ShardSpec, whole: torch.Tensor, piece: torch.Tensor, start: int,
               fn: Orthogonalize) -> List[Part]:
        """fn over each segment of `whole` whose tp share meets the piece [start, start + numel) of the flattened
        tp-local weight (a column-parallel weight holds each segment's share of rows in turn, a row-parallel one
        its share of the columns), cut to that piece."""
        parts, local_at, end = [], 0, start + piece.numel()
        for segment in whole.split(list(spec.segments)) if spec.segments else (whole,):
            size = segment.numel() // (self.tp if spec.is_sharded else 1)
            lo, hi = max(start, local_at), min(end, local_at + size)
            if lo < hi:
                matrix, scale = fn(segment)
                if spec.is_sharded:
                    share = matrix.shape[spec.dim] // self.tp
                    matrix = matrix.narrow(spec.dim, self.tp_rank * share, share)
                whole_share = hi - lo == matrix.numel()  # (a transposed result is cut only when it must be)
                parts.append((lo - start, matrix if whole_share else matrix.reshape(-1)[lo - local_at:hi - local_at],
                              scale))
            local_at += size
        return parts

    def _whole(self, pieces: Pieces) -> Dict[str, torch.Tensor]:
        """{name: the whole matrix}: the pieces themselves where no rank holds another part (tp 1, no ZeRO), else
        from every rank's buffer."""
        if self.tp_group is None and self.dp_group is None:
            return {name: piece.view(self.shapes[name]) for name, (piece, _) in pieces.items()}
        buffer = self._tp_local(pieces)
        buffers: List[torch.Tensor] = [buffer]
        if self.tp_group is not None:
            gathered = buffer.new_empty(self.tp * self.total)
            collectives.all_gather_tensor(gathered, buffer, group=self.tp_group)
            buffers = list(gathered.chunk(self.tp))
        wholes = {}
        for name in pieces:
            shape = self.shapes[name]
            at, size = self.offsets[name], int(torch.Size(shape).numel())
            wholes[name] = self.specs[name].unshard([b[at:at + size].view(shape) for b in buffers])
        return wholes

    def _tp_local(self, pieces: Pieces) -> torch.Tensor:
        """One flat buffer of every tp-local matrix: this rank's pieces, summed over the grad group under ZeRO."""
        buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for name, (piece, start) in pieces.items():
            at = self.offsets[name] + start
            buffer[at:at + piece.numel()] = piece.reshape(-1)
        if self.dp_group is not None:
            dist.all_reduce(buffer, group=self.dp_group)
        return buffer
