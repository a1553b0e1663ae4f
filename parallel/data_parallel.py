"""Data-parallel gradient reduction: contiguous buckets, each reduced the moment it is ready.

Each model chunk's parameters get one flat gradient buffer laid out in reverse order of
use (last layer first, embedding last) and cut into buckets of about `bucket_mb`. Every
parameter's `.grad` is a view into that buffer, so autograd accumulates micro-batches
in place. Only during the LAST micro-batch's backward (`start_overlap`), a
post-accumulate-grad hook counts each bucket's ready parameters and launches the
bucket's all-reduce (under ZeRO-1: reduce-scatter) asynchronously as soon as the bucket
is complete, so the reduction of late layers overlaps the backward of early ones.
`finish()` launches whatever is left, waits, and leaves averaged gradients (or, under
ZeRO-1, this rank's averaged slice of every bucket).

Buckets are padded to a multiple of dp so that every dp rank owns an equal, contiguous
slice of each bucket (the ZeRO-1 shard). With dp=1 nothing is registered or sent.
"""

import time
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn

from plait.common import collectives
from plait.parallel.config import ParallelConfig
from plait.parallel.grid import Grid
from plait.parallel.plans import param_specs



@dataclass
class Bucket:
    """A contiguous [start, end) range of the flat buffer and the parameters inside it."""

    start: int
    end: int
    names: List[str]
    pending: int = 0
    work: Optional[object] = None
    comm: Optional[torch.Tensor] = None  # what is sent (a cast copy when reducing in another dtype)
    out: Optional[torch.Tensor] = None  # this rank's reduce-scattered slice (ZeRO-1)

    @property
    def size(self) -> int:
        return self.end - self.start

    def shard_range(self, dp_rank: int, dp: int) -> Tuple[int, int]:
        """[start, end) of this rank's slice of the bucket in the flat buffer."""
        length = self.size // dp
        return self.start + dp_rank * length, self.start + (dp_rank + 1) * length


@dataclass
class ReductionTimes:
    """Wall-clock stamps of one step's reduction, for the overlap measurement."""

    backward_end: float = 0.0
    finished: float = 0.0


class ChunkGrads:
    """One model chunk's flat gradient buffer, its buckets and its reduction hooks."""

    def __init__(self, named_params: Sequence[Tuple[str, nn.Parameter]], grid: Grid, cfg: ParallelConfig,
                 shard: bool = False, alone: Sequence[str] = (), experts: bool = False):
        """`experts`: these are experts' own weights under expert parallelism, averaged over the ranks holding
        them (`grid.expert_grad_group`) but divided, as every grad is, by the whole dp x cp."""
        self.grid, self.shard = grid, shard
        self.group = grid.expert_grad_group if experts else grid.grad_group  # dp, times cp under cp
        self.dp, self.dp_rank = (grid.expert_grad_size, grid.expert_grad_rank) if experts else \
            (grid.grad_size, grid.grad_rank)
        self.mean_over = grid.grad_size  # every replica's loss counts once in the mean
        self.params = [(name, p) for name, p in named_params if p.requires_grad]
        self.comm_dtype = torch.float32 if cfg.reduce_in_fp32 else torch.bfloat16
        self.average_in_collective = cfg.average_in_collective
        self.overlap = cfg.overlap_grad_reduce
        self.use_avg_op = cfg.average_in_collective and grid.backend == "nccl" and self.mean_over == self.dp
        self.offsets: Dict[str, int] = {}
        self.buckets = self._layout(cfg.bucket_mb, set(alone))
        first = self.params[0][1]
        self.buffer = torch.zeros(self.buckets[-1].end if self.buckets else 0, dtype=first.dtype, device=first.device)
        self.bucket_of: Dict[str, int] = {}
        for index, bucket in enumerate(self.buckets):
            for name in bucket.names:
                self.bucket_of[name] = index
        for name, param in self.params:
            param.grad = self.grad_view(name, param)
        self.last_microbatch = False
        self.times = ReductionTimes()
        self.param_buffer: Optional[torch.Tensor] = None  # ZeRO-1's flat weights, laid out like `buffer`
        self.param_gathers: Dict[int, object] = {}  # bucket index -> its weights' all-gather, in flight
        self.hooks = []
        if self.group is not None:
            self.hooks = [param.register_post_accumulate_grad_hook(self._hook(name)) for name, param in self.params]

    # layout -----------------------------------------------------------------
    def _layout(self, bucket_mb: float, alone: set) -> List[Bucket]:
        """Buckets over the parameters in reverse order of use, each padded to a multiple of dp; a parameter
        named in `alone` gets a bucket of its own (its dp slices then depend on its own size only)."""
        element = self.params[0][1].element_size() if self.params else 4
        limit = int(bucket_mb * 2**20 / element) if bucket_mb > 0 else None
        buckets, names, start, cursor = [], [], 0, 0
        for name, param in reversed(self.params):
            if name in alone and names:  # close the bucket before it
                cursor = self._close(buckets, names, start, cursor)
                names, start = [], cursor
            self.offsets[name] = cursor
            cursor += param.numel()
            names.append(name)
            if name in alone or limit is not None and cursor - start >= limit:
                cursor = self._close(buckets, names, start, cursor)
                names, start = [], cursor
        if names:
            self._close(buckets, names, start, cursor)
        return buckets

    def _close(self, buckets: List[Bucket], names: List[str], start: int, cursor: int) -> int:
        end = start + -(-(cursor - start) // self.dp) * self.dp
        buckets.append(Bucket(start, end, list(names)))
        return end

    def grad_view(self, name: str, param: nn.Parameter) -> torch.Tensor:
        offset = self.offsets[name]
        return self.buffer[offset:offset + param.numel()].view_as(param)

    # reduction --------------------------------------------------------------
    def _hook(self, name: str):
        def on_grad_ready(param: torch.Tensor) -> None:
            if not (self.last_microbatch and self.overlap):
                return
            bucket = self.buckets[self.bucket_of[name]]
            bucket.pending -= 1
            if bucket.pending == 0:
                self._launch(bucket)
        return on_grad_ready

    def start_overlap(self) -> None:
        """Called right before the last micro-batch's backward: buckets now reduce as they fill."""
        self.last_microbatch = True
        for bucket in self.buckets:
            bucket.pending = len(bucket.names)

    def _launch(self, bucket: Bucket) -> None:
        if bucket.work is not None or self.group is None:
            return
        view = self.buffer[bucket.start:bucket.end]
        bucket.comm = view if view.dtype == self.comm_dtype else view.to(self.comm_dtype)
        if self.average_in_collective and not self.use_avg_op:
            bucket.comm.div_(self.mean_over)  # gloo has no AVG (nor has a mean over more ranks than the group)
        op = dist.ReduceOp.AVG if self.use_avg_op else dist.ReduceOp.SUM
        if self.shard:
            bucket.out = torch.empty(bucket.size // self.dp, dtype=bucket.comm.dtype, device=view.device)
            bucket.work = collectives.reduce_scatter_tensor(bucket.out, bucket.comm, op=op, group=self.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(bucket.comm, op=op, group=self.group, async_op=True)

    def finish(self) -> None:
        """Launch the buckets not yet launched, wait for all, and write averaged grads back."""
        self.times.backward_end = time.perf_counter()
        if self.group is None:
            if self.mean_over != 1:  # an expert that one rank alone holds: its grad is all there, to average
                self.buffer.div_(self.mean_over)
            self.last_microbatch = False
            return
        for bucket in self.buckets:
            self._launch(bucket)
        divide = 1 if self.average_in_collective else self.mean_over
        for bucket in self.buckets:
            bucket.work.wait()
            if self.shard:
                lo, hi = bucket.shard_range(self.dp_rank, self.dp)
                target, result = self.buffer[lo:hi], bucket.out
            else:
                target, result = self.buffer[bucket.start:bucket.end], bucket.comm
            if result is not target:
                target.copy_(result)
            if divide != 1:
                target.div_(divide)
            bucket.work, bucket.comm, bucket.out = None, None, None
        self.times.finished = time.perf_counter()
        self.last_microbatch = False

    def zero_grad(self) -> None:
        self.buffer.zero_()

    # ZeRO-1's weights -----------------------------------------------------------
    def launch_param_gathers(self) -> None:
        """All-gather every bucket's weights from the dp ranks' slices (asynchronously), the bucket the forward
        uses first first: buckets lie in reverse order of use, and a group runs its collectives in order."""
        if self.group is None:
            return
        for index in reversed(range(len(self.buckets))):
            bucket = self.buckets[index]
            lo, hi = bucket.shard_range(self.dp_rank, self.dp)
            mine = self.param_buffer[lo:hi].clone()
            self.param_gathers[index] = collectives.all_gather_tensor(
                self.param_buffer[bucket.start:bucket.end], mine, group=self.group, async_op=True)

    def wait_params(self, indices: Optional[Sequence[int]] = None) -> None:
        """Wait for the weights of the buckets `indices` (all when None) to be whole."""
        for index in (list(self.param_gathers) if indices is None else indices):
            work = self.param_gathers.pop(index, None)
            if work is not None:
                work.wait()

    def bucket_indices_of(self, module: nn.Module, prefix: str) -> List[int]:
        """The buckets holding `module`'s own parameters (named `prefix` + their name within it)."""
        return sorted({self.bucket_of[prefix + name] for name, param in module.named_parameters(recurse=False)
                       if prefix + name in self.bucket_of})


class DataParallelGrads:
    """Gradient buffers and bucketed reduction for every model chunk of this rank."""

    def __init__(self, chunks: Sequence[nn.Module], grid: Grid, cfg: ParallelConfig, shard: bool = False,
                 alone: Sequence[str] = ()):
        """`alone`: parameters that get a bucket of their own (tied embeddings, `plait.parallel.tied`)."""
        self.grid, self.shard, self.modules = grid, shard, list(chunks)
        self.chunks = []
        self.experts: List[Optional[ChunkGrads]] = []  # per chunk, its experts' own grads under expert parallelism
        for chunk in chunks:
            specs = param_specs(chunk)
            named = list(chunk.named_parameters())
            self.chunks.append(ChunkGrads([(n, p) for n, p in named if not specs[n].expert], grid, cfg, shard, alone))
            experts = [(n, p) for n, p in named if specs[n].expert]
            self.experts.append(ChunkGrads(experts, grid, cfg, shard, experts=True) if experts else None)
        self.all = self.chunks + [grads for grads in self.experts if grads is not None]

    def start_overlap(self, chunk_index: int = 0) -> None:
        """Before chunk `chunk_index`'s last micro-batch backward: its buckets reduce as they fill."""
        self.chunks[chunk_index].start_overlap()
        if self.experts[chunk_index] is not None:
            self.experts[chunk_index].start_overlap()

    def after_weights(self, chunk_index: int) -> None:
        """After a split backward's W: nothing to do, each bucket's hooks fired as W accumulated into it."""

    def finish(self) -> None:
        for chunk in self.all:
            chunk.finish()

    def zero_grad(self) -> None:
        for chunk in self.all:
            chunk.zero_grad()

    def reshard(self) -> None:
        """Nothing to let go: weights are whole at every zero level this reducer serves (ZeRO-2/3's does)."""

    def grad_bytes(self) -> int:
        """Bytes of the gradient buffers this rank keeps (whole grads, padding included)."""
        return sum(chunk.buffer.numel() * chunk.buffer.element_size() for chunk in self.all)

    def named_grads(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, full averaged grad) of every parameter (not meaningful under ZeRO-1: use the optimizer's)."""
        return [(name, chunk.grad_view(name, param)) for chunk in self.all for name, param in chunk.params]

    # ZeRO-1's weight all-gathers -------------------------------------------------------------
    def wait_params(self) -> None:
        """Wait for every weight all-gather in flight (ZeRO-1 with overlapped gathers; nothing otherwise)."""
        for chunk in self.all:
            chunk.wait_params()

    def wait_params_in_forward(self) -> List[object]:
        """Forward pre-hooks on every module with parameters of its own: each waits for its buckets' gathers
        only, so the gathers of later layers overlap the forward of earlier ones (Megatron's
        --overlap-param-gather). Returns the hook handles."""
        handles = []
        for module, dense, experts in zip(self.modules, self.chunks, self.experts):
            for chunk in (dense, experts) if experts is not None else (dense,):
                for prefix, sub in module.named_modules():
                    indices = chunk.bucket_indices_of(sub, f"{prefix}." if prefix else "")
                    if indices:
                        handles.append(sub.register_forward_pre_hook(
                            lambda _module, _args, chunk=chunk, indices=indices: chunk.wait_params(indices)))
        return handles

    # whole parameters (checkpoints): every rank holds them whole already ------------------------
    def full_params(self, dest: Optional[Dict[str, int]] = None) -> Dict[str, torch.Tensor]:
        """{name: the live parameter}: whole on every rank (once any weight gather in flight has landed), so
        `dest` (where each is needed) costs nothing."""
        self.wait_params()
        return {name: param for module in self.modules for name, param in module.named_parameters()}

    @contextmanager
    def whole_for_writing(self) -> Iterator[Dict[str, torch.Tensor]]:
        """{name: the live parameter} to write whole values into (a checkpoint load): they are whole."""
        yield self.full_params()

    @torch.no_grad()
    def copy_whole(self, param: nn.Parameter, whole: torch.Tensor) -> None:
        """Write `whole` (the parameter's whole tp shard) into `param`."""
        param.copy_(whole)
