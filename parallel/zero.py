"""ZeRO-1: each data-parallel rank keeps and updates only its shard of the optimizer state.

The gradient buffers of `DataParallelGrads(shard=True)` are reduce-scattered, so dp rank
r holds the averaged gradient of the r-th slice of every bucket (an expert's buckets, under expert
parallelism, are sliced over the ranks holding that expert instead). Parameters are moved
into flat buffers with the same layout, so the r-th slice of a bucket is also a range of
weights. For each parameter, its intersection with this rank's slices is a 1-D piece:
a view of the (fp32) weights, with a view of the reduced gradient as its `.grad`. Any
optimizer of `plait.optim` (AdamW, Lion) steps those pieces, so state exists only for
1/dp of the model, then every bucket's weights are all-gathered back over dp.

Pieces keep their parameter's group (learning-rate multiplier, weight decay), and every
update is elementwise, so a ZeRO-1 step equals the unsharded step.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from plait.common import collectives
from plait.common.optimizer_state import load_param_state
from plait.parallel.data_parallel import ChunkGrads, DataParallelGrads
from plait.parallel.grid import Grid
from plait.parallel.sharded_state import ShardedState



class _Piece:
    """This rank's part of one parameter: `tensor` views the weights, `tensor.grad` the reduced grad."""

    def __init__(self, name: str, chunk: ChunkGrads, bucket, lo: int, hi: int, param_offset: int):
        self.name, self.chunk, self.bucket, self.lo, self.hi = name, chunk, bucket, lo, hi
        self.param_offset = param_offset  # where the piece starts inside its parameter (flattened)
        self.tensor = chunk.param_buffer[lo:hi]
        self.tensor.grad = chunk.buffer[lo:hi]


def _move_params_into_buffer(chunk: ChunkGrads) -> None:
    """Give the chunk a flat weight buffer laid out like its gradient buffer; params become views."""
    chunk.param_buffer = torch.zeros_like(chunk.buffer)
    for name, param in chunk.params:
        offset = chunk.offsets[name]
        view = chunk.param_buffer[offset:offset + param.numel()]
        view.copy_(param.detach().reshape(-1))
        param.data = view.view_as(param)


def _pieces_of(chunk: ChunkGrads) -> List[_Piece]:
    pieces, params = [], dict(chunk.params)
    for bucket in chunk.buckets:
        lo, hi = bucket.shard_range(chunk.dp_rank, chunk.dp)
        for name in bucket.names:
            param = params[name]
            start, end = chunk.offsets[name], chunk.offsets[name] + param.numel()
            if max(start, lo) < min(end, hi):
                pieces.append(_Piece(name, chunk, bucket, max(start, lo), min(end, hi), max(start, lo) - start))
    return pieces


class ZeroOptimizer(ShardedState):
    """Steps this rank's shard with an inner optimizer and all-gathers the weights back.

    `groups` are the whole model's param groups, each parameter swapped for this rank's
    piece of it (`ShardedState`); `make_optimizer(groups)` builds the inner optimizer.
    Exposes `step()`, `grad_entries()` (name, grad piece) for norms and clipping, `param_entries()`, and
    name-keyed state (`named_state` / `load_named_state`) for checkpoints that do not
    depend on dp.
    """

    def __init__(self, grads: DataParallelGrads, grid: Grid, make_optimizer: Callable[[List[Dict]], torch.optim.Optimizer],
                 groups: List[Dict]):
        if not grads.shard:
            raise ValueError("ZeroOptimizer needs DataParallelGrads(shard=True).")
        self.grads, self.grid = grads, grid
        self.pieces: List[_Piece] = []
        full_params: Dict[str, nn.Parameter] = {}
        for chunk in grads.all:  # the whole chunks' buffers, and under expert parallelism the experts'
            _move_params_into_buffer(chunk)
            self.pieces += _pieces_of(chunk)
            full_params.update(dict(chunk.params))
        self.full_params = full_params
        self.pieces_of_bucket: Dict[int, List[_Piece]] = {}  # id(bucket) -> this rank's pieces in it
        for piece in self.pieces:
            self.pieces_of_bucket.setdefault(id(piece.bucket), []).append(piece)
        self.hooks: List[object] = []  # the forward pre-hooks that wait for the weights (overlapped gathers)
        self.group, self.device = grid.grad_group, grid.device
        self._build(make_optimizer, groups, {piece.name: piece.tensor for piece in self.pieces},
                    {piece.name: piece.param_offset for piece in self.pieces})

    def grad_entries(self) -> List[Tuple[str, torch.Tensor]]:
        """(parameter name, this rank's reduced gradient piece) for norms and clipping."""
        return [(piece.name, piece.tensor.grad) for piece in self.pieces]

    def param_entries(self) -> List[Tuple[str, torch.Tensor]]:
        """(parameter name, this rank's piece of the weights, updated by the last step) for the weights' norm."""
        return [(piece.name, piece.tensor) for piece in self.pieces]

    @torch.no_grad()
    def step(self) -> None:
        """Step this rank's pieces, then all-gather every bucket's weights: waited for here, or (after
        `overlap_gathers_with_forward`) by the next forward, module by module."""
        self.grads.wait_params()  # a gather still in flight (no forward since the last step) lands first
        self.optimizer.step()
        for chunk in self.grads.all:
            chunk.launch_param_gathers()
        if not self.hooks:
            self.grads.wait_params()

    def overlap_gathers_with_forward(self) -> None:
        """Leave each step's weight all-gathers in flight: the next forward waits for each bucket right before
        the first module that reads it (forward pre-hooks), and a checkpoint's read of the weights waits for
        all. Not under torch.compile (a compiled forward cannot wait on a collective module by module)."""
        if not self.hooks:
            self.hooks = self.grads.wait_params_in_forward()

    # name-keyed state (checkpoints) --------------------------------------------------
    @torch.no_grad()
    def named_state(self, dest: Optional[Dict[str, int]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
        """{param name: {key: full tensor}} (collective), bucket by bucket: each bucket's slices, one per dp rank,
        are gathered whole where its parameters are written (`dest`: {name: global rank}; every rank without it),
        and each rank keeps the state of its own parameters; it holds at most one bucket of one state tensor
        beyond those."""
        keys_of = self._keys_by_name()
        out: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in self.full_params
                                                   if dest is None or dest[name] == self.grid.rank}
        step = self._step_count()
        for chunk in self.grads.all:
            params = dict(chunk.params)
            for bucket in chunk.buckets:
                for key in sorted(set().union(*(keys_of.get(name, set()) for name in bucket.names)) - {"step"}):
                    whole = self._gather_bucket(chunk, bucket, key, dest)
                    if whole is None:
                        continue
                    for name in bucket.names:
                        if name in out and key in keys_of.get(name, ()):
                            offset = chunk.offsets[name] - bucket.start
                            param = params[name]
                            out[name][key] = whole[offset:offset + param.numel()].view_as(param).to(param.dtype).clone()
        for name in out:  # AdamW counts steps (the same max on every dp rank); Lion and Muon do not
            if "step" in keys_of.get(name, ()):
                out[name]["step"] = torch.tensor(step)
        return {name: state for name, state in out.items() if state}

    def _slice_of(self, chunk: ChunkGrads, bucket, key: str) -> torch.Tensor:
        """This rank's slice of `bucket` for state `key` (fp32; zeros where no parameter lies: the padding)."""
        lo, hi = bucket.shard_range(chunk.dp_rank, chunk.dp)
        mine = torch.zeros(hi - lo, dtype=torch.float32, device=chunk.buffer.device)
        for piece in self.pieces_of_bucket.get(id(bucket), ()):
            value = self.optimizer.state.get(piece.tensor, {}).get(key)
            if value is not None:  # (Muon: its matrices hold momentum_buffer, the rest AdamW's moments)
                mine[piece.lo - lo:piece.hi - lo] = value.float()
        return mine

    def _gather_bucket(self, chunk: ChunkGrads, bucket, key: str,
                       dest: Optional[Dict[str, int]]) -> Optional[torch.Tensor]:
        """State `key` over the whole bucket, on the rank that writes all of its parameters (one gather; None on
        the others), or on every rank (one all-gather) where the bucket has several writers or `dest` is None."""
        mine = self._slice_of(chunk, bucket, key)
        if chunk.group is None:
            return mine
        writers = {dest[name] for name in bucket.names} if dest is not None else set()
        if len(writers) != 1:
            whole = mine.new_empty(bucket.size)
            collectives.all_gather_tensor(whole, mine, group=chunk.group)
            return whole
        writer = writers.pop()
        pieces = [torch.empty_like(mine) for _ in range(chunk.dp)] if writer == self.grid.rank else None
        dist.gather(mine, pieces, dst=writer, group=chunk.group)
        return torch.cat(pieces) if pieces is not None else None

    @torch.no_grad()
    def load_named_state(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Take this rank's pieces out of full, name-keyed state (placed as the inner optimizer places it)."""
        by_piece = {}
        for piece in self.pieces:
            if piece.name not in state:
                continue
            length = piece.hi - piece.lo
            by_piece[piece.tensor] = {
                key: value if key == "step" else value.reshape(-1)[piece.param_offset:piece.param_offset + length]
                for key, value in state[piece.name].items()}
        load_param_state(self.optimizer, by_piece)
