"""Tensor parallelism after Megatron-LM: region mappings, parallel layers, vocab-parallel loss.

Activations are laid out [batch, sequence, hidden]; sequence parallelism splits dim 1.
Each mapping is a tiny autograd function whose docstring says what moves. Layers pick
their mappings once, at construction: at tp=1 they are identities and nothing is sent.
"""

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from plait.common import collectives
from plait.parallel.column_overlap import OverlappedColumn
from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec

SEQ_DIM = 1



# collectives on a dimension ---------------------------------------------------
def _world(group) -> int:
    return dist.get_world_size(group)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = _world(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot split size {x.shape[dim]} (dim {dim}) over {world} tensor-parallel ranks; "
                         f"make it a multiple of parallel.tp (train.seq_len under sequence parallelism).")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return collectives.start_all_gather(x, dim, group).wait()


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return collectives.start_reduce_scatter(x, dim, group).wait()


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    return collectives.start_all_reduce(x, group).wait()


# region mappings ----------------------------------------------------------------
class CopyToRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce the gradient over tp (the paper's f).

    The gradient is copied before the in-place all-reduce: autograd may hand the same
    tensor to another branch (a residual add does), which must not see the sum.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class ReduceFromRegion(torch.autograd.Function):
    """Forward: all-reduce over tp. Backward: identity (the paper's g)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ScatterToRegion(torch.autograd.Function):
    """Forward: keep this rank's slice of the last dim. Backward: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class GatherFromRegion(torch.autograd.Function):
    """Forward: all-gather the last dim. Backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group), None


class ScatterToSequence(torch.autograd.Function):
    """Forward: keep this rank's slice of the sequence. Backward: all-gather the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


class GatherFromSequence(torch.autograd.Function):
    """Forward: all-gather the sequence. Backward: reduce-scatter the gradient over the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, SEQ_DIM, ctx.group), None


class ReduceScatterToSequence(torch.autograd.Function):
    """Forward: reduce-scatter over the sequence. Backward: all-gather the gradient's sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, SEQ_DIM, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, SEQ_DIM, ctx.group), None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class RegionMap:
    """A mapping bound to its tp group: `map(x)` is `function.apply(x, group)`.

    A plain object rather than a closure, so tools (the communication benchmark) can see
    which mapping a layer uses and on which group.
    """

    def __init__(self, function, group):
        self.function, self.group = function, group

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x, self.group)

    def __repr__(self) -> str:
        return f"RegionMap({self.function.__name__})"


Mapping = Callable[[torch.Tensor], torch.Tensor]


def mapping(function, group) -> Mapping:
    """`function` bound to `group`, or the identity when the group has one rank (no communication)."""
    if group is None or _world(group) == 1:
        return _identity
    return RegionMap(function, group)


# layers -------------------------------------------------------------------------
class MappedColumn:
    """How a `ColumnParallelLinear` runs without `parallel.tp_overlap`: its input mapping (copy-to-region, a
    sequence all-gather, or none), then one `F.linear` per segment; autograd runs the backward op by op (what a
    zero-bubble schedule splits into input and weight grads)."""

    def __init__(self, input_map: Mapping, gemm: Callable = F.linear):
        self.input_map, self.gemm = input_map, gemm

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 segments: Optional[Sequence[int]]):
        x = self.input_map(x)
        if segments is None:
            return self.gemm(x, weight, bias)
        biases = bias.split(segments) if bias is not None else (None,) * len(segments)
        return tuple(self.gemm(x, w, b) for w, b in zip(weight.split(segments), biases))


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W split by output rows over tp: each rank computes its slice of y.

    The input enters through copy-to-region (or, under sequence parallelism, an
    all-gather of the sequence shards); with `local` it is already in the region (a mixture of
    experts gathers its block's input once for all its experts). `segments` splits fused weights (Q|K|V,
    gate|up) segment by segment so a rank's shard holds its part of each. With `overlap` (and tp > 1, not
    `local`) the layer is one autograd node whose backward overlaps its collectives with its weight-grad GEMM
    and, under SP, re-gathers its input rather than keeping it (parallel/column_overlap.py).
    """

    def __init__(self, in_features: int, out_features: int, grid: Grid, *, bias: bool = False,
                 gather_output: bool = False, sequence_parallel: bool = False,
                 segments: Optional[Sequence[int]] = None, valid_rows: Optional[int] = None, local: bool = False,
                 overlap: bool = False, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp, group = grid.tp, grid.tp_group
        segments = tuple(segments) if segments else (out_features,)
        if any(size % tp for size in segments):
            raise ValueError(f"parallel.tp={tp} does not divide output segments {segments}.")
        if gather_output and len(segments) > 1:
            raise ValueError("gather_output=True would interleave the segments of a fused weight; "
                             "split the output per segment and gather each instead.")
        self.spec = ShardSpec((out_features, in_features), 0, segments if len(segments) > 1 else None,
                              valid_rows=valid_rows)
        self.weight = nn.Parameter(torch.empty(self.spec.local_shape(tp), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features // tp, device=device, dtype=dtype)) if bias else None
        self.bias_spec = ShardSpec((out_features,), 0, self.spec.segments) if bias else None
        self.local_segments = tuple(size // tp for size in segments)
        if overlap and not local and group is not None and _world(group) > 1:
            self.run = OverlappedColumn(group, sequence_parallel)
        else:
            self.run = MappedColumn(_identity if local else mapping(GatherFromSequence if sequence_parallel
                                                                    else CopyToRegion, group))
        self.output_map = mapping(GatherFromRegion, group) if gather_output else _identity

    def use_gemm(self, gemm: Callable) -> None:
        """Run the layer's GEMMs with `gemm` (F.linear's signature; a float8 one, parallel/float8.py)."""
        if not isinstance(self.run, MappedColumn):
            raise ValueError("parallel.tp_overlap=true runs its own GEMMs in its backward, which have no float8 "
                             "form: set parallel.tp_overlap=false to use train.precision=fp8.")
        self.run.gemm = gemm

    def forward(self, x: torch.Tensor, segmented: bool = False):
        """This rank's output, or with `segmented` each segment's (`forward_segments`), through the call."""
        if segmented:
            return self.forward_segments(x)
        return self.output_map(self.run(x, self.weight, self.bias, None))

    def forward_segments(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """This rank's output of each segment (Q, K, V or gate, up), one GEMM per segment.

        The same values as splitting `forward(x)`, but the backward adds the segments' grads
        into one weight grad instead of concatenating the activation grads (a copy of the
        whole fused output per layer, 17 ms a step in the eager step benchmark).
        """
        return self.run(x, self.weight, self.bias, self.local_segments)


class RowParallelLinear(nn.Module):
    """y = x W^T with W split by input columns over tp: partial sums are all-reduced.

    The input is already split on its last dim (the output of a column-parallel layer).
    Under sequence parallelism the partial sums are reduce-scattered over the sequence
    instead; with `local` they are returned unreduced (a mixture of experts reduces its
    weighted sum once). The bias is added after the reduction.
    """

    def __init__(self, in_features: int, out_features: int, grid: Grid, *, bias: bool = False,
                 sequence_parallel: bool = False, local: bool = False, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp, group = grid.tp, grid.tp_group
        if in_features % tp:
            raise ValueError(f"parallel.tp={tp} does not divide input features {in_features}.")
        self.spec = ShardSpec((out_features, in_features), 1)
        self.weight = nn.Parameter(torch.empty(self.spec.local_shape(tp), device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.bias_spec = ShardSpec((out_features,), None, tp_partial_grad=sequence_parallel) if bias else None
        if local and bias:
            raise ValueError("a local RowParallelLinear leaves partial sums: its caller adds a bias after reducing.")
        self.output_map = _identity if local else mapping(ReduceScatterToSequence if sequence_parallel
                                                          else ReduceFromRegion, group)
        self.gemm = F.linear

    def use_gemm(self, gemm: Callable) -> None:
        """Run the layer's GEMM with `gemm` (F.linear's signature; a float8 one, parallel/float8.py)."""
        self.gemm = gemm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.output_map(self.gemm(x, self.weight))
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over tp: each rank looks up ids in its vocab range, zeros the rest,
    and the partial embeddings are all-reduced (reduce-scattered over the sequence under SP)."""

    def __init__(self, vocab_size: int, padded_vocab: int, dim: int, grid: Grid, *,
                 sequence_parallel: bool = False, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        tp = grid.tp
        self.spec = ShardSpec((padded_vocab, dim), 0, valid_rows=vocab_size)
        self.rows = padded_vocab // tp
        self.start = grid.tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, dim, device=device, dtype=dtype))
        self.sharded = tp > 1
        if sequence_parallel and tp > 1:
            self.output_map = mapping(ReduceScatterToSequence, grid.tp_group)
        else:
            self.output_map = mapping(ReduceFromRegion, grid.tp_group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.sharded:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.output_map(out.masked_fill(outside.unsqueeze(-1), 0.0))


# vocab-parallel cross-entropy -----------------------------------------------------
class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Forward: three all-reduces over tp (max, target logit, sum of exp) on fp32 logits.
    Backward: softmax minus one-hot on the local shard, no communication.

    With `z_loss` = z each token's loss also has z x lse^2 (PaLM's z-loss; lse = log of the sum of exp of the
    whole row), whose grad z x 2 lse x softmax joins the same backward."""

    @staticmethod
    def forward(ctx, logits, targets, vocab_start, valid_in_shard, group, z_loss=0.0):
        logits = logits.float()
        if valid_in_shard < logits.shape[-1]:
            logits = logits.clone()
            logits[..., valid_in_shard:] = float("-inf")
        row_max = logits.max(dim=-1).values
        if group is not None:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        local = targets - vocab_start
        outside = (local < 0) | (local >= logits.shape[-1])
        local = local.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        if group is not None:
            dist.all_reduce(target_logit, group=group)
            dist.all_reduce(sum_exp, group=group)
        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        if z_loss:
            lse = sum_exp.log() + row_max
            loss = loss + z_loss * lse.square()
            ctx.save_for_backward(softmax, local, outside, 2 * z_loss * lse)
        else:
            ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside, *z_scale = ctx.saved_tensors
        grad = softmax * (1 + z_scale[0]).unsqueeze(-1) if z_scale else softmax.clone()
        inside = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local.unsqueeze(-1), -inside.unsqueeze(-1))
        grad.mul_(grad_loss.unsqueeze(-1))
        return grad, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, grid: Grid,
                                 vocab_size: int, z_loss: float = 0.0) -> torch.Tensor:
    """Per-token cross-entropy of vocab-sharded logits [..., V/tp] without gathering them (plus z x lse^2
    with `z_loss`).

    Columns at or past `vocab_size` (the padding that makes V divisible by tp) are
    masked to -inf, so they take no probability mass and get no gradient.
    """
    rows = logits.shape[-1]
    start = grid.tp_rank * rows
    valid = max(0, min(rows, vocab_size - start))
    group = grid.tp_group if grid.tp > 1 else None
    return _VocabParallelCrossEntropy.apply(logits, targets, start, valid, group, float(z_loss))


def all_reduce_coalesced(tensors: Sequence[torch.Tensor], group: Optional[dist.ProcessGroup], divide_by: int = 1) -> None:
    """Sum `tensors` over `group` in one flat all-reduce (then divide), writing back in place."""
    tensors = [t for t in tensors if t is not None]
    if group is None or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def allreduce_partial_grads(params: Sequence[nn.Parameter], grid: Grid) -> None:
    """Sum over tp the grads of replicated weights that saw only a sequence shard (SP norms)."""
    all_reduce_coalesced([p.grad for p in params], grid.tp_group if grid.tp > 1 else None)
