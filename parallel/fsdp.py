"""ZeRO-2 and ZeRO-3: parameters and gradients sharded over data parallelism by torch's FSDP2.

`fully_shard` is applied to every transformer block and then to each model chunk (the
chunk keeps the embedding, the final norm and the head), over the gradient group's mesh
(dp, or dp x cp flattened under context parallelism); under expert parallelism each expert
first, over the ranks holding it (`grid.expert_mesh`). Each parameter becomes a DTensor
whose rows are split over those ranks (torch.chunk's split of dim 0, padded inside FSDP).
plait's tensor-parallel layers hold plain per-tp-rank tensors, so FSDP2 shards each tp
shard over dp: tp x dp composes without a 2-D mesh.

What moves when:
- zero=3 (`reshard_after_forward=True` on blocks): a block's full weights are all-gathered
  right before its forward and freed after it, gathered again before its backward; FSDP2
  issues the next block's gather while the current one computes (implicit prefetch,
  forward and backward). The chunk's own weights (embedding, final norm, head) stay whole
  from a micro-batch's forward to its backward (the head's backward comes first). Between
  steps a rank holds 1/dp of the weights.
- zero=2 (`reshard_after_forward=False`): weights are gathered once a step, at the first
  micro-batch's forward, and kept whole until the last micro-batch's backward of the chunk
  (`start_overlap`), then resharded before the optimizer step.
- Both: after every micro-batch's backward of a block, its gradients are reduce-scattered
  (averaged) into this rank's shard and accumulated there; no whole gradient is kept.
- Zero-bubble schedules: a block's post-backward hook fires at I (its input's grad), before W
  adds the weight grads, so it finds none to reduce. After each W the pipeline calls
  `after_weights`, which runs FSDP2's post-backward by hand (`compat.fsdp_reduce_pending`):
  that micro-batch's weight grads are reduce-scattered into the shards then, as a fused
  backward's would be at its end, and no whole grad outlives its W. Under zero=3 the blocks
  were resharded at I: W reads saved activations and grads, never the weights.
- `train.precision=bf16`: gathers in bf16 (MixedPrecisionPolicy), master shards stay fp32,
  reduce-scatters in fp32 (`parallel.reduce_in_fp32`, the default) and chunk outputs in fp32
  (the pipeline's messages keep their dtype).

`ShardedGrads` offers the data-parallel reducer's interface (`start_overlap`, `finish`,
`zero_grad`, `named_grads`) so the step is the same code under every zero level.
"""

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from plait.common.compat import flat_mesh, fsdp_reduce_pending
from plait.common.precision import half_dtype
from plait.parallel.grid import Grid

FSDP_LEVELS = (2, 3)


def grad_mesh(grid: Grid):
    """The 1-D mesh over this rank's gradient group: dp, times cp under context parallelism."""
    return flat_mesh(grid.mesh, ("dp",) if grid.cp == 1 else ("dp", "cp"))


def mixed_precision(precision: str, reduce_in_fp32: bool):
    """FSDP2's policy: bf16 (fp16) gathers under train.precision=bf16 (fp16); the fp32 shards stay the master
    copy. Under fp16 the weight grads come out of backward in fp16 too, scaled: an overflow there is an inf in
    the shard, and the step is skipped."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    half = half_dtype(precision)
    if half is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=half,
                                reduce_dtype=torch.float32 if reduce_in_fp32 else half,
                                output_dtype=torch.float32)


def shard_chunk(chunk: nn.Module, mesh, zero: int, policy, experts=None) -> List[nn.Module]:
    """fully_shard each block of `chunk` (and each multi-token prediction depth), then the chunk, over `mesh`; the
    sharded modules, blocks first. With `experts` (expert parallelism: the expert_grad mesh), each expert of a
    mixture is sharded first, over the ranks holding it."""
    from torch.distributed.fsdp import fully_shard

    reshard = zero == 3
    modules = []
    units = [(block, block.mlp) for block in chunk.layers.values()]  # and each multi-token prediction depth
    units += [(layer, layer.block.mlp) for layer in (chunk.mtp.layers if getattr(chunk, "mtp", None) else ())]
    for unit, mlp in units:
        for expert in (getattr(mlp, "experts", {}).values() if experts is not None else ()):
            fully_shard(expert, mesh=experts, reshard_after_forward=reshard, mp_policy=policy)
            modules.append(expert)
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
        modules.append(unit)
    # the chunk's own weights (embedding, final norm, head) stay whole from forward to backward: the head's
    # backward comes first, right after the loss, so a reshard would only gather them again (FSDP2's root rule)
    fully_shard(chunk, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    modules.append(chunk)
    return modules


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded tensor (a view sharing its storage); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def gather_rows(rows: torch.Tensor, full_shape, group, dst: int, me: int) -> Optional[torch.Tensor]:
    """The whole tensor from each group rank's `rows` (dim 0 split as torch.chunk, in group-rank order) on global
    rank `dst` only, None on the others: one gather to the rank that needs it, not an all-gather to every rank."""
    import torch.distributed as dist

    size = dist.get_world_size(group)
    per_rank = -(-full_shape[0] // size)
    padded = rows.new_zeros((per_rank, *full_shape[1:]))  # torch.chunk's pieces, the last ones short or empty
    padded[:rows.shape[0]].copy_(rows)
    if me != dst:
        dist.gather(padded, None, dst=dst, group=group)
        return None
    pieces = [torch.empty_like(padded) for _ in range(size)]
    dist.gather(padded, pieces, dst=dst, group=group)
    return torch.cat(pieces)[:full_shape[0]]


def place(param: torch.Tensor) -> Tuple[int, int]:
    """(this rank's place, ranks) in the mesh a sharded parameter's rows are split over ((0, 1): whole)."""
    mesh = getattr(param, "device_mesh", None)
    return (mesh.get_local_rank(), mesh.size()) if mesh is not None else (0, 1)


def rows_of(full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s rows of `full` as FSDP2 splits dim 0 (torch.chunk; ranks past the last chunk: none)."""
    pieces = torch.chunk(full, size, dim=0)
    return pieces[rank] if rank < len(pieces) else full[:0]


def row_offset(shape: torch.Size, rank: int, size: int) -> int:
    """Where rank `rank`'s rows (`rows_of`) start in the flattened tensor of `shape`."""
    rows = shape[0]
    return min(rank * -(-rows // size), rows) * (torch.Size(shape).numel() // max(rows, 1))


class ShardedGrads:
    """FSDP2 over this rank's chunks; the reducer's interface (see DataParallelGrads) on top of it."""

    shard = True  # every gradient is a shard over the grad group

    def __init__(self, chunks: Sequence[nn.Module], grid: Grid, zero: int, precision: str = "fp32",
                 reduce_in_fp32: bool = True):
        if zero not in FSDP_LEVELS:
            raise ValueError(f"ShardedGrads serves zero in {FSDP_LEVELS}, not {zero}.")
        self.grid, self.zero, self.chunks = grid, zero, list(chunks)
        policy = mixed_precision(precision, reduce_in_fp32)
        self.mesh = grad_mesh(grid)
        self.rank, self.size = self.mesh.get_local_rank(), self.mesh.size()
        experts = grid.expert_mesh if grid.ep > 1 else None
        self.modules = [shard_chunk(chunk, self.mesh, zero, policy, experts) for chunk in self.chunks]
        # FSDP2 averages an expert's grads over the ranks holding it; every replica's loss counts in the mean, so
        # they are scaled by that group over dp x cp once reduced (gloo has no PreMulSum for a divide factor)
        self.expert_params = [p for chunk in self.chunks for p in chunk.parameters()
                              if experts is not None and getattr(p, "device_mesh", None) is experts]
        self.expert_scale = experts.size() / grid.grad_size if experts is not None else 1.0
        self._keep_weights_for_the_step()

    def _keep_weights_for_the_step(self) -> None:
        """ZeRO-2: weights gathered at a step's first forward stay whole through its micro-batches."""
        if self.zero == 2:
            for modules in self.modules:
                for module in modules:
                    module.set_reshard_after_backward(False)

    def start_overlap(self, chunk_index: int = 0) -> None:
        """Before chunk `chunk_index`'s last micro-batch backward: reshard each block once its grads are out."""
        if self.zero == 2:
            for module in self.modules[chunk_index]:
                module.set_reshard_after_backward(True)

    def after_weights(self, chunk_index: int) -> None:
        """After a W of chunk `chunk_index` (split backward): reduce-scatter the weight grads it added, now."""
        fsdp_reduce_pending(self.chunks[chunk_index])

    def finish(self) -> None:
        """Every reduce-scatter has been waited by FSDP2's end-of-backward callback; no weight stays whole
        past this point (the optimizer updates the shards, a whole copy would go stale). An expert's grads become
        the mean over dp x cp."""
        self.reshard()
        with torch.no_grad():
            for param in self.expert_params:
                if param.grad is not None:
                    local(param.grad).mul_(self.expert_scale)

    def reshard(self) -> None:
        """Let go of every weight gathered whole (after an evaluation's forwards too: no backward reshards them)."""
        for modules in self.modules:
            for module in modules:
                module.reshard()

    def wait_params(self) -> None:
        """Nothing in flight between steps: FSDP2 gathers each block's weights in its own forward."""

    def zero_grad(self) -> None:
        for chunk in self.chunks:
            for param in chunk.parameters():
                param.grad = None
        self._keep_weights_for_the_step()

    def named_params(self) -> Iterator[Tuple[str, nn.Parameter]]:
        for chunk in self.chunks:
            yield from chunk.named_parameters()

    def grad_bytes(self) -> int:
        """Bytes of the gradient shards this rank holds now (none between steps)."""
        return sum(grad.numel() * grad.element_size() for _, grad in self.named_grads())

    def named_grads(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, this rank's averaged grad rows) of every parameter that has a grad."""
        return [(name, local(param.grad)) for name, param in self.named_params() if param.grad is not None]

    # whole tensors (checkpoints) --------------------------------------------------------
    @torch.no_grad()
    def full_params(self, dest: Optional[Dict[str, int]] = None) -> Dict[str, torch.Tensor]:
        """{name: whole parameter (this tp shard)} gathered over the grad group (collective): on every rank, or,
        with `dest` ({name: global rank}), each on its rank only (a checkpoint writer's share)."""
        self.reshard()  # the module's parameters are the sharded ones again
        if dest is None:
            return {name: param.full_tensor() for name, param in self.named_params()}
        whole = {}
        for name, param in self.named_params():
            tensor = self.gather_to(param, local(param), dest[name])
            if tensor is not None:
                whole[name] = tensor
        return whole

    def gather_to(self, param: torch.Tensor, rows: torch.Tensor, dst: int) -> Optional[torch.Tensor]:
        """`rows` (this rank's rows of a tensor shaped like sharded `param`) gathered whole on global rank `dst`."""
        return gather_rows(rows, param.shape, param.device_mesh.get_group(), dst, self.grid.rank)

    @torch.no_grad()
    def copy_whole(self, param: nn.Parameter, whole: torch.Tensor) -> None:
        """Copy this rank's rows of `whole` (the parameter's whole tp shard) into its sharded parameter."""
        local(param).copy_(rows_of(whole, *place(param)))

    @contextmanager
    def whole_for_writing(self) -> Iterator[Dict[str, torch.Tensor]]:
        """{name: an empty whole tensor (host)} to write whole values into (a checkpoint load); on leaving, this
        rank's rows of each are copied into its shard."""
        params = dict(self.named_params())
        whole = {name: torch.empty(param.shape, dtype=param.dtype) for name, param in params.items()}
        yield whole
        for name, tensor in whole.items():
            self.copy_whole(params[name], tensor)
