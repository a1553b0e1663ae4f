"""A column-parallel linear as one autograd node, whose backward overlaps its tp collectives with its GEMMs.

Megatron-LM's `LinearWithGradAccumulationAndAsyncCommunication`, written for plait's [batch, sequence, hidden]
layout. Built from region mappings and `F.linear` (parallel/tensor.py's other path), a column-parallel layer's
backward runs in turn: the weight grad and the input grad, then the input grad's all-reduce (under sequence
parallelism, its reduce-scatter) while nothing computes, and under SP the forward's all-gathered input stays in
memory until the backward. Here the backward:

1. under SP, starts re-gathering the input from each rank's sequence shard (the forward keeps only this rank's
   shard: 1/tp of the gathered input's memory, as Megatron keeps);
2. computes the input grad, the sum over segments (Q, K, V or gate, up) of grad_i @ W_i;
3. starts the input grad's all-reduce (under SP: waits for the gather, then starts the reduce-scatter);
4. computes the weight and bias grads while those bytes move;
5. waits and returns.

On CUDA the collective runs on the communicator's stream beside the GEMM (Megatron sets
CUDA_DEVICE_MAX_CONNECTIONS=1 so the collective's kernel is queued ahead of it); on CPU gloo moves the bytes on
its own threads. Under autocast the forward casts input, weight and bias to the autocast dtype before anything
moves (F.linear would cast them the same way after the gather), so it gathers and keeps half-width inputs; the
backward computes in that dtype and hands each grad back in its tensor's own dtype.

One node computes both grads, so zero-bubble schedules (which run the input grad and the weight grads at
different times) take the mappings path instead: `parallel.tp_overlap` chooses when the plan is built.
"""

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from plait.common.collectives import start_all_gather, start_all_reduce, start_reduce_scatter
from plait.common.precision import autocast_dtype

SEQ_DIM = 1
OVERLAP_CHOICES = ("auto", "true", "false")


def overlap_wanted(choice: object, tp: int, split_backward: bool, float8: bool = False) -> Tuple[bool, str]:
    """(overlap?, why) for `parallel.tp_overlap`: auto overlaps at tp > 1 unless a zero-bubble schedule splits
    each backward in input and weight grads, or the GEMMs are float8 ones (`true` there is refused by the config's
    checks)."""
    choice = str(choice).lower()
    if tp == 1:
        return False, "tp 1: nothing to overlap"
    if choice != "auto":
        return choice == "true", f"parallel.tp_overlap={choice}"
    if split_backward:
        return False, "auto: off under a zero-bubble schedule (its backward runs input and weight grads apart)"
    if float8:
        return False, "auto: off under train.precision=fp8 (its float8 GEMMs run through autograd)"
    return True, f"auto: on at tp {tp}"


class ColumnLinear(torch.autograd.Function):
    """y_i = x W_i^T + b_i for each segment i of this rank's weight shard, x entering the tp region (copied, or
    all-gathered over the sequence under SP). Returns one output, or with `segments` a tuple of them."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel: bool, segments: Optional[Sequence[int]]):
        dtype = autocast_dtype(x.device.type)
        local_weight, local_bias = weight, bias
        if dtype is not None:
            x, local_weight = x.to(dtype), weight.to(dtype)
            local_bias = bias.to(dtype) if bias is not None else None
        total = start_all_gather(x, SEQ_DIM, group).wait() if sequence_parallel else x
        ctx.save_for_backward(x, weight)  # x: this rank's sequence shard under SP; the weight uncast (a parameter)
        ctx.group, ctx.sequence_parallel, ctx.segments = group, sequence_parallel, segments
        ctx.compute_dtype, ctx.bias_dtype = local_weight.dtype, bias.dtype if bias is not None else None
        if segments is None:
            return F.linear(total, local_weight, local_bias)
        biases = local_bias.split(segments) if local_bias is not None else (None,) * len(segments)
        return tuple(F.linear(total, w, b) for w, b in zip(local_weight.split(segments), biases))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        gathering = start_all_gather(x, SEQ_DIM, ctx.group) if ctx.sequence_parallel else None
        weight_dtype, weight = weight.dtype, weight.to(ctx.compute_dtype)
        sizes = ctx.segments or (weight.shape[0],)
        flat = [grad.reshape(-1, size) for grad, size in zip(grads, sizes)]
        grad_x, moving = None, None
        if ctx.needs_input_grad[0]:
            grad_x = _input_grad(flat, weight.split(sizes)).view(*grads[0].shape[:-1], weight.shape[1])
        total = gathering.wait() if gathering is not None else x
        if grad_x is not None:
            moving = (start_reduce_scatter(grad_x, SEQ_DIM, ctx.group) if ctx.sequence_parallel
                      else start_all_reduce(grad_x, ctx.group))
        grad_weight = _weight_grad(flat, total.reshape(-1, weight.shape[1]), weight).to(weight_dtype) \
            if ctx.needs_input_grad[1] else None
        grad_bias = torch.cat([grad.sum(0) for grad in flat]).to(ctx.bias_dtype) \
            if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        grad_x = moving.wait() if moving is not None else None
        return grad_x, grad_weight, grad_bias, None, None, None


def _input_grad(grads: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i grad_i @ W_i over the segments, accumulated in place ([tokens, in])."""
    total = torch.mm(grads[0], weights[0])
    for grad, weight in zip(grads[1:], weights[1:]):
        total.addmm_(grad, weight)
    return total


def _weight_grad(grads: Sequence[torch.Tensor], inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each segment's grad_i^T @ x into its rows of one weight-shaped grad (in the compute dtype)."""
    out = torch.empty(weight.shape, dtype=inputs.dtype, device=inputs.device)
    start = 0
    for grad in grads:
        torch.mm(grad.t(), inputs, out=out[start:start + grad.shape[1]])
        start += grad.shape[1]
    return out


class OverlappedColumn:
    """How a `ColumnParallelLinear` with `parallel.tp_overlap` runs: `ColumnLinear` on its tp group (the
    mappings path's twin is `tensor.MappedColumn`). `function` is an attribute so tools can wrap it."""

    function = ColumnLinear

    def __init__(self, group, sequence_parallel: bool):
        self.group, self.sequence_parallel = group, sequence_parallel

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 segments: Optional[Sequence[int]]):
        return self.function.apply(x, weight, bias, self.group, self.sequence_parallel, segments)
