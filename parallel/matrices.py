"""Whole matrices from this rank's pieces, for Muon's Newton-Schulz step under tp x dp x ZeRO.

Muon (`plait.optim.muon`) updates its momentum elementwise on whatever tensors it steps, but
orthogonalizes whole matrices. `ShardedMatrices.orthogonalize(pieces, fn, scale)`:

1. dp: each rank writes its pieces (ZeRO-1's range of the flattened tp-local weight, ZeRO-2/3's
   rows, which are a range too; without ZeRO, the whole tp-local weight) into a zero buffer that
   holds every matrix of its chunks; with ZeRO the buffer is summed over the grad group (one
   all-reduce; pieces do not overlap, so each value arrives exactly);
2. tp: the buffers are all-gathered over tp (one all-gather) and each weight put together as
   `ShardSpec.unshard` does;
3. the work is spread: the stage's logical matrices (a fused weight's segments, Q|K|V and
   gate|up, each on its own, as a model with separate projections has them) are dealt to the
   tp x grad-group ranks of the stage, largest first to the least loaded, so each is
   orthogonalized by `fn` exactly once; the results travel back in two all-gathers (over the
   grad group, then over tp) in `fn`'s dtype (bf16 by default);
4. each rank keeps its piece of each result, as parts (one a segment), each with `scale` of its
   segment's shape.

Under expert parallelism an expert's matrices are held by fewer ranks (`grid.expert_grad_group`): they
get a `ShardedMatrices` of their own over those, beside the rest's (`ExpertSplitMatrices`).

So each rank does about 1/(tp x dp x cp) of the stage's Newton-Schulz work, and every rank
receives every result (2 bytes a parameter of the stage's matrices in bf16). One process with whole
weights skips all of it: its pieces are the matrices. Each call is a collective over tp and the
grad group: every rank of the stage calls it every step.
"""

import heapq
from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

from plait.common import collectives
from plait.common.matrix_parts import Orthogonalize, Part, Pieces, Scale
from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec


def deal(costs: List[float], slots: int) -> List[int]:
    """The slot each task goes to: largest first, each to the slot with the least work so far (ties: the lowest)."""
    load = [(0.0, slot) for slot in range(slots)]
    owner = [0] * len(costs)
    for task in sorted(range(len(costs)), key=lambda t: (-costs[t], t)):
        work, slot = heapq.heappop(load)
        owner[task] = slot
        heapq.heappush(load, (work + costs[task], slot))
    return owner


class ShardedMatrices:
    """The matrices `specs` names (this rank's chunks', by global name) as tp and ZeRO lay them out."""

    def __init__(self, specs: Dict[str, ShardSpec], grid: Grid, sharded_over_dp: bool,
                 dtype: torch.dtype = torch.float32, result_dtype: torch.dtype = torch.float32, experts: bool = False):
        """`experts`: these are experts' own matrices under expert parallelism, held (and ZeRO-split) by the ranks
        of `grid.expert_grad_group` rather than the whole grad group."""
        self.specs = dict(sorted(specs.items()))  # one order on every rank of the stage
        self.tp, self.tp_rank = grid.tp, grid.tp_rank
        self.tp_group = grid.tp_group if grid.tp > 1 else None
        group, self.grad_size, grad_rank = (grid.expert_grad_group, grid.expert_grad_size, grid.expert_grad_rank) \
            if experts else (grid.grad_group, grid.grad_size, grid.grad_rank)
        self.grad_group = group if self.grad_size > 1 else None
        self.sharded_over_dp = sharded_over_dp and self.grad_size > 1
        self.device, self.dtype, self.result_dtype = grid.device, dtype, result_dtype  # the weights', fn's
        self.shapes = {name: spec.local_shape(grid.tp) for name, spec in self.specs.items()}
        self.offsets, total = {}, 0
        for name, shape in self.shapes.items():
            self.offsets[name] = total
            total += int(torch.Size(shape).numel())
        self.total = total
        # the stage's logical matrices and who orthogonalizes each: slot = tp rank x grad size + grad rank
        self.tasks: List[Tuple[str, int, Tuple[int, int]]] = [
            (name, index, (rows, spec.full_shape[1])) for name, spec in self.specs.items()
            for index, rows in enumerate(spec.segments or (spec.full_shape[0],))]
        self.slots = grid.tp * self.grad_size
        self.owner = deal([min(r, c) ** 2 * max(r, c) for _, _, (r, c) in self.tasks], self.slots)
        self.slot = grid.tp_rank * self.grad_size + grad_rank
        self.width = max([sum(r * c for (_, _, (r, c)), o in zip(self.tasks, self.owner) if o == slot)
                          for slot in range(self.slots)] + [0])

    def orthogonalize(self, pieces: Pieces, fn: Orthogonalize, scale: Scale) -> Dict[str, List[Part]]:
        """{name: the parts of this rank's piece, each (offset in the piece, fn's result there, scale of its
        matrix's shape)} for each name in `pieces` (collective over the stage's tp and grad-group ranks)."""
        if self.slots == 1:  # one process: the pieces are the matrices
            results = {(name, index): fn(segment) for name, (piece, _) in pieces.items()
                       for index, segment in enumerate(self._segments(name, piece.view(self.shapes[name])))}
        else:
            results = self._spread(self._whole(pieces), fn)
        return {name: self._parts(name, results, piece, start, scale) for name, (piece, start) in pieces.items()}

    def _segments(self, name: str, whole: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        segments = self.specs[name].segments
        return whole.split(list(segments)) if segments else (whole,)

    def _spread(self, wholes: Dict[str, torch.Tensor], fn: Orthogonalize) -> Dict[Tuple[str, int], torch.Tensor]:
        """fn over this rank's share of the stage's matrices; every rank's results, gathered over the grad group and
        tp: {(name, segment index): result}."""
        send = torch.zeros(self.width, dtype=self.result_dtype, device=self.device)
        at = 0
        for (name, index, (rows, cols)), owner in zip(self.tasks, self.owner):
            if owner == self.slot:
                send[at:at + rows * cols] = fn(self._segments(name, wholes[name])[index]).reshape(-1)
                at += rows * cols
        gathered = send
        for group, size in ((self.grad_group, self.grad_size), (self.tp_group, self.tp)):
            if group is not None:  # slots in gather order: tp rank outside, grad rank inside
                into = gathered.new_empty(size * gathered.numel())
                collectives.all_gather_tensor(into, gathered, group=group)
                gathered = into
        results, filled = {}, [slot * self.width for slot in range(self.slots)]
        for (name, index, (rows, cols)), owner in zip(self.tasks, self.owner):
            results[(name, index)] = gathered[filled[owner]:filled[owner] + rows * cols].view(rows, cols)
            filled[owner] += rows * cols
        return results

    def _parts(self, name: str, results: Dict[Tuple[str, int], torch.Tensor], piece: torch.Tensor, start: int,
               scale: Scale) -> List[Part]:
        """The results of the segments whose tp share meets the piece [start, start + numel) of the flattened
        tp-local weight (a column-parallel weight holds each segment's share of rows in turn, a row-parallel one
        its share of the columns), cut to that piece."""
        spec = self.specs[name]
        parts, local_at, end = [], 0, start + piece.numel()
        for index, rows in enumerate(spec.segments or (spec.full_shape[0],)):
            size = rows * spec.full_shape[1] // (self.tp if spec.is_sharded else 1)
            lo, hi = max(start, local_at), min(end, local_at + size)
            if lo < hi:
                matrix = results[(name, index)]
                factor = scale(*matrix.shape)
                if spec.is_sharded:
                    share = matrix.shape[spec.dim] // self.tp
                    matrix = matrix.narrow(spec.dim, self.tp_rank * share, share)
                whole_share = hi - lo == matrix.numel()  # (a transposed result is cut only when it must be)
                parts.append((lo - start, matrix if whole_share else matrix.reshape(-1)[lo - local_at:hi - local_at],
                              factor))
            local_at += size
        return parts

    def _whole(self, pieces: Pieces) -> Dict[str, torch.Tensor]:
        """{name: the whole matrix} for every matrix of the stage, from every rank's buffer."""
        buffer = torch.zeros(self.total, dtype=self.dtype, device=self.device)
        for name, (piece, start) in pieces.items():
            at = self.offsets[name] + start
            buffer[at:at + piece.numel()] = piece.reshape(-1)
        if self.sharded_over_dp:  # ZeRO: each rank wrote its pieces; the sum is every matrix whole (tp-local)
            dist.all_reduce(buffer, group=self.grad_group)
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


class ExpertSplitMatrices:
    """Under expert parallelism: the experts' matrices (`experts`' names) from the ranks holding them, the rest from
    the whole grad group; each call runs both (collective, in that order on every rank)."""

    def __init__(self, dense: ShardedMatrices, experts: ShardedMatrices):
        self.dense, self.experts = dense, experts

    def orthogonalize(self, pieces: Pieces, fn: Orthogonalize, scale: Scale) -> Dict[str, List[Part]]:
        out = self.dense.orthogonalize({n: p for n, p in pieces.items() if n not in self.experts.specs}, fn, scale)
        out.update(self.experts.orthogonalize({n: p for n, p in pieces.items() if n in self.experts.specs}, fn,
                                              scale))
        return out
