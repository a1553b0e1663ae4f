"""Applying tensor and sequence parallelism to a plain model, by a plan (as torchtitan does).

A plan maps module names (`*` for one layer index) to styles; `parallelize(model, grid, plan)`
walks the model once and, for each matching module:

| style | what it does to the module |
| --- | --- |
| `Colwise()` | a `Linear` becomes a `ColumnParallelLinear` (each fused segment split on its own; `overlap=True`: one node whose backward overlaps its collectives) |
| `Rowwise()` | a `Linear` becomes a `RowParallelLinear` |
| `ExpertRegion()` | a mixture of experts enters and leaves the tp region once, its experts `Colwise(local=True)` and `Rowwise(local=True)` (no communication of their own); under ep it keeps this rank's experts and sends the tokens to theirs |
| `VocabEmbedding()` | an `Embedding` becomes a `VocabParallelEmbedding`, rows padded to 64 x tp |
| `VocabHead()` | the output `Linear` becomes column-parallel over the vocabulary, padded the same way (`overlap` as `Colwise`'s) |
| `SequenceNorm()` | a norm (or another weight whole over the tokens) stays whole; under SP its grad is partial |
| `HeadNorm()` | a per-head norm (QK-norm) stays whole; each tp rank norms its heads: its gain's grad is partial |
| `ColumnInput()` | a tensor entering the tp region beside a column-parallel layer's input (latent attention's shared rotary key) is mapped as that input is: copied (its grad summed over tp), or gathered over the sequence under SP |
| `SequenceShares()` | a module that divides by a count over the whole sequence learns cp, the ranks that share it |
| `SequenceDropout()` | a residual dropout draws a mask per rank under sequence parallelism |
| `ContextAttention(mode)` | under cp > 1 an attention attends over the whole sequence from its rank's zigzag share (ring or Ulysses) and takes its tokens' rotary rows |
| `VocabParallelOutput()` | on the model itself: the loss becomes vocab-parallel cross-entropy, a tied head's input passes through copy-to-region (or a sequence gather), `model.vocab` is the padded size |

Parameter names do not change, so checkpoints, muP tables and optimizers see the same names
under any layout. Every parallel module records its `ShardSpec`, which `param_specs(model)`
collects. A model built on the meta device stays there (plans and init need only shapes); a
model with weights keeps this rank's shard of each. Styles are chosen once, here; the
layers' forwards hold no branch on the layout (at tp=1 every mapping is the identity).
"""

import dataclasses
import fnmatch
from typing import Dict, Optional

import torch
from torch import nn

from plait.parallel.context import ContextAttend, ZigzagRows
from plait.parallel.experts import ExpertExchange, local_experts
from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec
from plait.parallel.tensor import (ColumnParallelLinear, CopyToRegion, GatherFromSequence, ReduceFromRegion,
                                   ReduceScatterToSequence, RowParallelLinear, VocabParallelEmbedding, mapping,
                                   vocab_parallel_cross_entropy)

VOCAB_MULTIPLE = 64


def padded_vocab(vocab_size: int, tp: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """The vocabulary rounded up so every tp rank holds an equal, aligned slice."""
    step = multiple * tp
    return step * ((vocab_size + step - 1) // step)


class Style:
    """How one module is parallelized: `apply` returns its replacement, or None to keep it (changed in place)."""

    def apply(self, module: nn.Module, grid: Grid, sequence_parallel: bool) -> Optional[nn.Module]:
        raise NotImplementedError


def _fit_rows(full: torch.Tensor, rows: int) -> torch.Tensor:
    """Cut or zero-pad padding rows so `full` has `rows` rows."""
    if full.shape[0] >= rows:
        return full[:rows]
    return torch.cat([full, full.new_zeros((rows - full.shape[0],) + tuple(full.shape[1:]))])


@torch.no_grad()
def _keep_shard(new: nn.Module, old: nn.Module, grid: Grid) -> nn.Module:
    """Copy this rank's shard of the old module's weights (and bias) into the new one, unless on meta."""
    for name, spec_name in (("weight", "spec"), ("bias", "bias_spec")):
        source, target, spec = getattr(old, name, None), getattr(new, name, None), getattr(new, spec_name, None)
        if source is None or target is None or source.device.type == "meta":
            continue
        full = source.detach()
        if spec.valid_rows is not None:
            full = _fit_rows(full, spec.full_shape[0])
        target.copy_(spec.shard(full, grid.tp_rank, grid.tp))
    return new


def _device_dtype(module: nn.Module) -> dict:
    return {"device": module.weight.device, "dtype": module.weight.dtype}


class Colwise(Style):
    """`local`: no input mapping of its own (an expert, whose block gathers the input once). `overlap`: one
    autograd node whose backward overlaps its collectives with the weight grad (`parallel.tp_overlap`)."""

    def __init__(self, local: bool = False, overlap: bool = False):
        self.local, self.overlap = local, overlap

    def apply(self, module, grid, sequence_parallel):
        new = ColumnParallelLinear(module.in_features, module.out_features, grid, bias=module.bias is not None,
                                   sequence_parallel=sequence_parallel, segments=module.segments,
                                   valid_rows=module.valid_rows, local=self.local, overlap=self.overlap,
                                   **_device_dtype(module))
        return _keep_shard(new, module, grid)


class Rowwise(Style):
    """`local`: partial sums left unreduced (an expert, whose block reduces its weighted sum once)."""

    def __init__(self, local: bool = False):
        self.local = local

    def apply(self, module, grid, sequence_parallel):
        new = RowParallelLinear(module.in_features, module.out_features, grid, bias=module.bias is not None,
                                sequence_parallel=sequence_parallel, local=self.local, **_device_dtype(module))
        return _keep_shard(new, module, grid)


class ExpertRegion(Style):
    """A mixture of experts (nothing for a dense MLP) under tp and ep.

    tp: the block's input enters the tp region once (copy, or a sequence all-gather under SP), each expert's
    gate|up and down are column- and row-parallel without communication of their own, and the weighted sum of
    their partial outputs leaves once (all-reduce, or reduce-scatter under SP). The router sees every token on
    every tp rank, but its output weighs partial sums: its grad is partial over tp, and each rank adds 1/tp of the
    load-balancing gradient; under global_aux_loss its loads are summed over the grad group (dp x cp) before the loss
    weighs them. A shared expert is split as each expert is (it sees this rank's tokens under any ep);
    its gate, like the router, weighs partial sums. ep: this rank keeps its E/ep experts
    (`plait.parallel.experts`), marked `expert` in their specs, and its rows travel to theirs.
    """

    def apply(self, module, grid, sequence_parallel):
        if not hasattr(module, "experts"):
            return None
        module.enter = mapping(GatherFromSequence if sequence_parallel else CopyToRegion, grid.tp_group)
        module.exit = mapping(ReduceScatterToSequence if sequence_parallel else ReduceFromRegion, grid.tp_group)
        module.aux_share = 1.0 / grid.tp
        module.balance_group = grid.grad_group if grid.grad_size > 1 else None  # (global_aux_loss's loads)
        for weighing in (module.router, module.shared_gate):
            if weighing is not None:
                weighing.spec = ShardSpec(tuple(weighing.weight.shape), None, tp_partial_grad=grid.tp > 1)
        keep = local_experts(grid.ep_rank, grid.ep, module.n_experts)
        for key in list(module.experts.keys()):
            if int(key) not in keep:
                del module.experts[key]
        for expert in module.experts.values():
            expert.w13 = self._expert_linear(Colwise(local=True), expert.w13, grid, sequence_parallel)
            expert.w2 = self._expert_linear(Rowwise(local=True), expert.w2, grid, sequence_parallel)
        if module.shared is not None:
            module.shared.w13 = Colwise(local=True).apply(module.shared.w13, grid, sequence_parallel)
            module.shared.w2 = Rowwise(local=True).apply(module.shared.w2, grid, sequence_parallel)
        if grid.ep > 1:
            module.run_experts = ExpertExchange(grid.ep_group, grid.ep)
        return None

    @staticmethod
    def _expert_linear(style: Style, linear, grid, sequence_parallel):
        new = style.apply(linear, grid, sequence_parallel)
        new.spec = dataclasses.replace(new.spec, expert=grid.ep > 1)
        return new


class VocabEmbedding(Style):
    def apply(self, module, grid, sequence_parallel):
        rows, dim = padded_vocab(module.valid_rows, grid.tp), module.weight.shape[1]
        new = VocabParallelEmbedding(module.valid_rows, rows, dim, grid, sequence_parallel=sequence_parallel,
                                     **_device_dtype(module))
        return _keep_shard(new, module, grid)


class VocabHead(Style):
    """`overlap`: as `Colwise`'s."""

    def __init__(self, overlap: bool = False):
        self.overlap = overlap

    def apply(self, module, grid, sequence_parallel):
        rows = padded_vocab(module.valid_rows, grid.tp)
        new = ColumnParallelLinear(module.in_features, rows, grid, sequence_parallel=sequence_parallel,
                                   valid_rows=module.valid_rows, overlap=self.overlap, **_device_dtype(module))
        return _keep_shard(new, module, grid)


class SequenceNorm(Style):
    def apply(self, module, grid, sequence_parallel):
        module.spec = ShardSpec(tuple(module.weight.shape), None, tp_partial_grad=sequence_parallel)
        return None


class HeadNorm(Style):
    def apply(self, module, grid, sequence_parallel):
        module.spec = ShardSpec(tuple(module.weight.shape), None, tp_partial_grad=grid.tp > 1)
        return None


class ContextAttention(Style):
    """Context parallelism on an attention module (nothing at cp = 1): its kernel and its rotary rows."""

    def __init__(self, mode: str = "ring"):
        self.mode = mode

    def apply(self, module, grid, sequence_parallel):
        if grid.cp > 1:
            module.attend = ContextAttend(grid.cp_group, grid.cp_ranks, self.mode)
            module.rope_rows = ZigzagRows(grid.cp, grid.cp_rank)
        return None


class ColumnInput(Style):
    """A `RegionEntry`'s mapping: a column-parallel layer's input mapping, alone (nothing at tp = 1)."""

    def apply(self, module, grid, sequence_parallel):
        module.mapping = mapping(GatherFromSequence if sequence_parallel else CopyToRegion, grid.tp_group)
        return None


class SequenceShares(Style):
    """A module that counts positions over the whole sequence (multi-token prediction) learns how many cp ranks
    share each sequence."""

    def apply(self, module, grid, sequence_parallel):
        module.sequence_shares = grid.cp
        return None


class SequenceDropout(Style):
    def apply(self, module, grid, sequence_parallel):
        module.sharded = sequence_parallel  # sequence shards differ by rank: so must their masks
        return None


class VocabParallelOutput(Style):
    """The model's loss, tied head input and padded vocabulary for a vocab-parallel head."""

    def apply(self, model, grid, sequence_parallel):
        model.vocab = padded_vocab(model.vocab_size, grid.tp)
        if grid.tp > 1:
            model.loss_fn = VocabParallelLoss(grid, model.vocab_size)
        if model.has_head and model.head is None:  # tied: the head reuses the embedding's vocab-split rows
            model.tied_input = mapping(GatherFromSequence if sequence_parallel else CopyToRegion, grid.tp_group)
        return None


class VocabParallelLoss:
    """Mean cross-entropy of vocab-sharded logits (logits are never gathered)."""

    def __init__(self, grid: Grid, vocab_size: int):
        self.grid, self.vocab_size = grid, vocab_size

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0,
                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mean (with `weights`, one per target: of each token's loss times its weight)."""
        per_token = vocab_parallel_cross_entropy(logits, targets, self.grid, self.vocab_size, z_loss)
        return per_token.mean() if weights is None else (per_token * weights).mean()


def parallelize(model: nn.Module, grid: Grid, plan: Dict[str, Style], sequence_parallel: bool = False) -> nn.Module:
    """Apply `plan` ({module name pattern: style}; "" is the model itself) to `model` in place; returns it."""
    sequence_parallel = bool(sequence_parallel and grid.tp > 1)
    for name, module in list(model.named_modules()):
        if not name:
            continue
        style = next((style for pattern, style in plan.items() if pattern and fnmatch.fnmatchcase(name, pattern)),
                     None)
        if style is None:
            continue
        replacement = style.apply(module, grid, sequence_parallel)
        if replacement is not None:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, replacement)
    if "" in plan:
        plan[""].apply(model, grid, sequence_parallel)
    return model


def param_specs(model: nn.Module) -> Dict[str, ShardSpec]:
    """Each parameter's full shape and tp split, by global name (replicated where no plan split it)."""
    specs = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for param_name, param in module.named_parameters(recurse=False):
            spec = getattr(module, "spec" if param_name == "weight" else f"{param_name}_spec", None)
            if spec is None:  # not split by a plan: whole, with what the module says of its rows
                weight = param_name == "weight"
                segments = getattr(module, "segments", None) if weight else None
                spec = ShardSpec(tuple(param.shape), segments=segments if segments and len(segments) > 1 else None,
                                 valid_rows=getattr(module, "valid_rows", None) if weight else None)
            specs[prefix + param_name] = spec
    return specs

