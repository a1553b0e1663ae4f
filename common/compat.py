"""Every private torch name plait touches, in one place; tests/test_compat.py fails loudly when a torch
upgrade moves one.

- `run_backward`: the autograd engine's entry. The pipeline runtime backwards from an output whose
  data it already freed (Megatron's deallocate_output_tensor); `torch.autograd.backward` checks the
  grad's shape against the output's data and fails, the engine checks against the graph.
- `fma`: inductor's fused multiply-add prim, so a compiled kernel rounds as eager's `add_(x, alpha=)`.
- `group_timeout_s`: a process group's own timeout (a pipeline receive waits no longer than a
  collective would); `set_group_timeout` changes it once a run is under way (`parallel.train_timeout_s`), on
  each of `process_groups` (every group this process made, FSDP2's flattened meshes' too).
- `cpu_flash_attention`: the CPU flash-attention kernel and its backward, which return and take the
  log-sum-exp that ring attention merges blocks by (SDPA's public call drops it).
- `is_param_cast`: whether a saved tensor is autocast's copy of a parameter (an autograd node whose
  only input is a parameter's gradient accumulator), by the nodes' names.
- `scaled_mm`: the float8 GEMM (`torch._scaled_mm`) with one scale per operand, which
  `train.precision=fp8`'s linear layers run (parallel/float8.py).
- `fsdp_reduce_pending`: FSDP2's post-backward of every parameter group under a root module, then
  its end-of-backward callback, run by hand after a split backward (torch.distributed.pipelining's
  `perform_reduce_grad` does the same): the weight grads W accumulated after the last hook fired.
"""

import functools
from typing import Callable, Optional

import torch

_engine_run_backward = torch.autograd.Variable._execution_engine.run_backward  # looked up once


def run_backward(output, grad: torch.Tensor, *, inputs: tuple = (), keep_graph: bool = False) -> None:
    """Backward from `output` (a tensor or a GradientEdge) with `grad` through the engine (no shape check
    against freed data), accumulating into `.grad` of `inputs` only when given (tensors or GradientEdges)."""
    _engine_run_backward((output,), (grad,), keep_graph, False, inputs, True, True)


def run_backward_edges(edges: tuple, grads: tuple, inputs: tuple, keep_graph: bool = False) -> None:
    """Backward from several GradientEdges at once, accumulating into `.grad` of `inputs` only."""
    _engine_run_backward(edges, grads, keep_graph, False, inputs, True, True)


def inductor_fma() -> Optional[Callable]:
    """inductor's `fma(x, y, z)` prim, or None on a torch without it."""
    try:
        from torch._inductor import inductor_prims

        return inductor_prims.fma
    except (ImportError, AttributeError):
        return None


def group_timeout_s(group, default: float = 1800.0) -> float:
    """The process group's own timeout in seconds (`default` where torch does not say)."""
    try:
        return float(group._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    except (AttributeError, RuntimeError):
        return default


def process_groups() -> list:
    """Every process group this process belongs to: the default one, the grid's, and those torch made itself."""
    from torch.distributed import distributed_c10d

    return list(distributed_c10d._world.pg_map)


def set_group_timeout(group, seconds: float) -> None:
    """Collectives on `group` (None: the default group) fail after `seconds` from now on."""
    import datetime

    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(datetime.timedelta(seconds=seconds), group)


def is_param_cast(tensor: torch.Tensor) -> bool:
    """An autocast copy of a parameter: a ToCopy node whose one input is a gradient accumulator."""
    fn = tensor.grad_fn
    return (fn is not None and fn.name().startswith("ToCopyBackward") and len(fn.next_functions) == 1
            and fn.next_functions[0][0] is not None
            and fn.next_functions[0][0].name().endswith("AccumulateGrad"))


@functools.lru_cache(maxsize=None)
def cpu_flash_attention() -> Optional[tuple]:
    """(forward, backward) of aten's CPU flash attention, or None on a torch without them.

    forward(q, k, v, causal, scale) -> (out, logsumexp [b, h, s]); backward(out_grad, q, k, v, out,
    logsumexp, causal, scale) -> (dq, dk, dv). The backward recomputes the probabilities from the
    log-sum-exp and the output it is given, so with a merged output and log-sum-exp it returns one
    block's share of the grads.
    """
    ops = torch.ops.aten
    if not (hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward")):
        return None
    forward_op = ops._scaled_dot_product_flash_attention_for_cpu
    backward_op = ops._scaled_dot_product_flash_attention_for_cpu_backward

    def forward(q, k, v, causal: bool, scale: float):
        return forward_op(q, k, v, 0.0, causal, scale=scale)

    def backward(out_grad, q, k, v, out, lse, causal: bool, scale: float):
        return backward_op(out_grad, q, k, v, out, lse, 0.0, causal, scale=scale)
    return forward, backward


def flat_mesh(mesh, names: tuple):
    """The 1-D DeviceMesh over the ranks of `mesh`'s dimensions `names` together (dp x cp for FSDP2, as
    torchtitan shards over dp_shard x cp): DeviceMesh's `_flatten`; a single name is the mesh's own slice."""
    if len(names) == 1:
        return mesh[names[0]]
    return mesh[names]._flatten("".join(names))


def fsdp_reduce_pending(root) -> None:
    """Reduce-scatter every gradient FSDP2 still holds whole under `root` (a fully_shard-ed module, the root of
    its blocks) into the shards, and wait for it, as the end of an autograd backward would: each parameter
    group's `post_backward` (a no-op for a group with no whole grad) and the root's final callback."""
    from torch.distributed.fsdp import fully_shard

    state = fully_shard.state(root)
    for member in state._state_ctx.all_states:
        groups = getattr(member, "_fsdp_param_groups", None)  # torch >= 2.10: a list; before: one or None
        if groups is None:
            groups = [member._fsdp_param_group] if member._fsdp_param_group is not None else []
        for group in groups:
            group.post_backward()
    state._root_post_backward_final_callback()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(a * scale_a) @ (b * scale_b) in `out_dtype`: a, b float8 (a row-major, b column-major), the scales fp32
    scalars (each the inverse of the factor its operand was multiplied by before the cast)."""
    return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, use_fast_accum=fast_accum)
