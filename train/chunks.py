"""This pp rank's pipeline chunks of the decoder (the pipeline twin of `build_model`).

Which layers go to which chunk is `plait.parallel.pipeline.partition`'s arithmetic; this
file only builds the `Transformer` chunks. Parameter names are global and every weight is
drawn from (seed, name), so each chunk's weights equal the same-named weights of the whole
model built by `build_model`, under any pp x vpp.
"""

from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from plait.parallel.grid import Grid
from plait.parallel.pipeline.partition import rank_chunk_plans
from plait.parallel.random import ParallelRNG
from plait.parallel.sharding import ShardSpec
from plait.train.config import ModelConfig
from plait.train.model import Scales, Transformer, init_parameters


def build_chunks(cfg: ModelConfig, grid: Optional[Grid] = None, vpp: int = 1, seed: int = 0, *,
                 sequence_parallel: bool = False, scales: Scales = Scales(), device: Optional[torch.device] = None,
                 std_of: Optional[Callable[[str, ShardSpec], Optional[float]]] = None,
                 rng: Optional[ParallelRNG] = None, pp_rank: Optional[int] = None,
                 pp: Optional[int] = None) -> List[Transformer]:
    """The chunks of pp rank `pp_rank` (default: the grid's) in model order: stages r, r + p, ...

    Stage 0 holds the embedding, the last stage the final norm and head.
    """
    grid = grid or Grid.single()
    pp_rank = grid.pp_rank if pp_rank is None else pp_rank
    pp = grid.pp if pp is None else pp
    if rng is None and cfg.dropout > 0:
        rng = ParallelRNG(seed, grid, torch.device(device) if device is not None else grid.device)
    chunks = []
    for plan in rank_chunk_plans(pp_rank, cfg.n_layers, pp, vpp):
        chunk = Transformer(cfg, grid, plan.layers, has_embedding=plan.has_embedding, has_head=plan.has_head,
                            sequence_parallel=sequence_parallel, scales=scales, rng=rng, device=device)
        init_parameters(chunk, seed, std_of)
        chunks.append(chunk)
    return chunks


def named_parameters_of(chunks: Sequence[nn.Module]) -> Iterator[Tuple[str, nn.Parameter]]:
    """Every (global name, parameter) of this rank's chunks; names never collide across chunks."""
    for chunk in chunks:
        yield from chunk.named_parameters()


def param_specs_of(chunks: Sequence[Transformer]) -> dict:
    """Each parameter's `ShardSpec` by global name, over all of this rank's chunks."""
    specs: dict = {}
    for chunk in chunks:
        specs.update(chunk.param_specs())
    return specs


def hidden_shape(micro_batch: int, seq_len: int, dim: int, tp: int, sequence_parallel: bool) -> Tuple[int, int, int]:
    """The hidden states passed between stages: [micro_batch, seq (/tp under SP), dim]."""
    return (micro_batch, seq_len // tp if sequence_parallel and tp > 1 else seq_len, dim)
