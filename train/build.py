"""Building the decoder for a layout: the plain model, then the parallel plan, then layout-free init.

`build_model` (the whole model) and `build_chunks` (this pp rank's pipeline chunks) both:
1. build the plain `Transformer` (train/model.py) on the device it will run on;
2. apply `LLAMA_PLAN` with `plait.parallel.plans`: which linears are column- or
   row-parallel, which embedding and head vocab-parallel, where sequence parallelism splits
   norms and dropout, and the vocab-parallel loss (at tp=1 every mapping is the identity);
3. initialize every weight from (seed, name) alone: the full tensor is drawn on the CPU and
   this rank keeps its shard, so the weights do not depend on the layout.

Which layers go to which chunk is `plait.parallel.pipeline.partition`'s arithmetic. Parameter
names are global and every weight is drawn from (seed, name), so each chunk's weights equal
the same-named weights of the whole model, under any tp x pp x vpp.
"""

import dataclasses
import math
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from plait.parallel.float8 import use_float8
from plait.parallel.grid import Grid
from plait.parallel.plans import (Colwise, ColumnInput, ContextAttention, ExpertRegion, HeadNorm, Rowwise,
                                  SequenceDropout, SequenceNorm, SequenceShares, Style, VocabEmbedding, VocabHead,
                                  VocabParallelOutput, param_specs, parallelize)
from plait.parallel.pipeline.partition import rank_chunk_plans
from plait.parallel.random import ParallelRNG
from plait.parallel.sharding import ShardSpec
from plait.train.config import ModelConfig
from plait.train.model import Scales, Transformer

StdOf = Callable[[str, ShardSpec], Optional[float]]

# the tensor- and sequence-parallel plan of train/model.py's decoder (Megatron's, as torchtitan writes it)
LLAMA_PLAN: Dict[str, Style] = {
    "embed": VocabEmbedding(),
    "layers.*.attn_norm": SequenceNorm(),
    "layers.*.attn": ContextAttention("ring"),
    "layers.*.attn.wqkv": Colwise(),
    "layers.*.attn.wo": Rowwise(),
    "layers.*.attn.q_norm": HeadNorm(),
    "layers.*.attn.k_norm": HeadNorm(),
    # multi-head latent attention (train/mla.py): heads split, the latents' down projections and norms whole
    "layers.*.attn.wq": Colwise(),
    "layers.*.attn.wq_a": SequenceNorm(),
    "layers.*.attn.q_a_norm": SequenceNorm(),
    "layers.*.attn.wq_b": Colwise(),
    "layers.*.attn.wkv_a": SequenceNorm(),
    "layers.*.attn.kv_a_norm": SequenceNorm(),
    "layers.*.attn.wkv_b": Colwise(),
    "layers.*.attn.shared_key": ColumnInput(),
    "layers.*.mlp_norm": SequenceNorm(),
    "layers.*.mlp.w13": Colwise(),
    "layers.*.mlp.w2": Rowwise(),
    "layers.*.mlp": ExpertRegion(),  # a mixture of experts, its experts' tp and ep (nothing for a dense MLP)
    "layers.*.dropout": SequenceDropout(),
    "norm": SequenceNorm(),
    "head": VocabHead(),
    "": VocabParallelOutput(),
}
# multi-token prediction (train/mtp.py): each depth's block as a layer's, its norms and projection whole
LLAMA_PLAN.update({"mtp.layers.*.block." + name[len("layers.*."):]: style for name, style in LLAMA_PLAN.items()
                   if name.startswith("layers.*.")})
LLAMA_PLAN.update({"mtp": SequenceShares(), "mtp.embed": VocabEmbedding(), "mtp.layers.*.hnorm": SequenceNorm(),
                   "mtp.layers.*.enorm": SequenceNorm(), "mtp.layers.*.proj": SequenceNorm(),
                   "mtp.layers.*.norm": SequenceNorm()})


COLUMN_LAYERS = ("attn.wqkv", "attn.wq", "attn.wq_b", "attn.wkv_b", "mlp.w13")  # a block's column-parallel layers


def seed_for(seed: int, name: str) -> int:
    """A stable per-parameter seed, so a weight's values depend only on (seed, name)."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def default_init_std(name: str, spec: ShardSpec, cfg: ModelConfig) -> float:
    """Standard init: N(0, init_std) for matrices, scaled 1/sqrt(2 n_layers) on residual outputs; biases zero."""
    if name.endswith("bias"):
        return 0.0
    if name.endswith((".wo.weight", ".w2.weight")):  # attention's and each MLP's (or expert's) output
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


@torch.no_grad()
def init_parameters(model: Transformer, seed: int, std_of: Optional[StdOf] = None, grid: Optional[Grid] = None) -> None:
    """Draw each weight in full from (seed, name) on the CPU, keep this rank's tp shard.

    `std_of(name, spec)` gives the init std (None or a negative value: keep ones, for
    norm gains; 0: zeros). Vocabulary padding rows are zero. `grid`: whose tp shard to keep
    (None: the model holds whole weights). A tied copy (`Transformer.tied_copies`) is drawn as
    the weight it mirrors, so both start equal without a message.
    """
    std_of = std_of or (lambda name, spec: default_init_std(name, spec, model.cfg))
    rank, size = (grid.tp_rank, grid.tp) if grid is not None else (0, 1)
    specs = param_specs(model)
    mirrors = model.tied_copies()
    for own_name, param in model.named_parameters():
        spec, name = specs[own_name], mirrors.get(own_name, own_name)
        if param.device.type == "meta":
            continue
        if len(spec.full_shape) == 1 and not name.endswith("bias"):
            param.fill_(1.0)
            continue
        std = std_of(name, spec)
        generator = torch.Generator().manual_seed(seed_for(seed, name))
        full = torch.zeros(spec.full_shape)
        rows = spec.valid_rows or spec.full_shape[0]
        if std:
            full[:rows].normal_(0.0, std, generator=generator)
        param.copy_(spec.shard(full, rank, size))


def _rng(cfg: ModelConfig, grid: Grid, seed: int, device: Optional[torch.device], rng: Optional[ParallelRNG]):
    if rng is None and cfg.dropout > 0:
        rng = ParallelRNG(seed, grid, torch.device(device) if device is not None else grid.device)
    return rng


def llama_plan(cp_mode: str = "ring", tp_overlap: bool = False) -> Dict[str, Style]:
    """LLAMA_PLAN with context parallelism's attention by `cp_mode` (ring or ulysses), and with `tp_overlap` its
    column-parallel layers as single autograd nodes that overlap their backward collectives (parallel.tp_overlap)."""
    plan = dict(LLAMA_PLAN)
    for blocks in ("layers.*.", "mtp.layers.*.block."):
        if cp_mode != "ring":
            plan[blocks + "attn"] = ContextAttention(cp_mode)
        if tp_overlap:
            plan.update({blocks + name: Colwise(overlap=True) for name in COLUMN_LAYERS})
    if tp_overlap:
        plan["head"] = VocabHead(overlap=True)
    return plan


def build_model(cfg: ModelConfig, grid: Optional[Grid] = None, seed: int = 0, *, sequence_parallel: bool = False,
                scales: Scales = Scales(), device: Optional[torch.device] = None, std_of: Optional[StdOf] = None,
                rng: Optional[ParallelRNG] = None, cp_mode: str = "ring", tp_overlap: bool = False,
                float8: bool = False) -> Transformer:
    """The whole decoder as one chunk (no pipeline), parallelized for `grid`, initialized from `seed`.

    With `float8` its linear layers (attention's, the MLP's, the experts') run float8 GEMMs (train.precision=fp8,
    plait.parallel.float8).

    With `model.dropout > 0` and no `rng` given, dropout draws from a `ParallelRNG`
    seeded by `seed` (kept as `model.rng`, whose state a checkpoint can save).
    """
    grid = grid or Grid.single()
    model = Transformer(cfg, scales=scales, rng=_rng(cfg, grid, seed, device, rng), device=device)
    parallelize(model, grid, llama_plan(cp_mode, tp_overlap), sequence_parallel)
    if float8:
        use_float8(model, grid)
    init_parameters(model, seed, std_of, grid)
    return model


def build_chunks(cfg: ModelConfig, grid: Optional[Grid] = None, vpp: int = 1, seed: int = 0, *,
                 sequence_parallel: bool = False, scales: Scales = Scales(), device: Optional[torch.device] = None,
                 std_of: Optional[StdOf] = None, rng: Optional[ParallelRNG] = None, pp_rank: Optional[int] = None,
                 pp: Optional[int] = None, placement: str = "loop", cp_mode: str = "ring",
                 tp_overlap: bool = False, float8: bool = False) -> List[Transformer]:
    """The chunks of pp rank `pp_rank` (default: the grid's) in model order: stages r, r + p, ... (or, with
    placement "v", stages r and 2p - 1 - r); `float8` as `build_model`'s.

    Stage 0 holds the embedding, the last stage the final norm and head.
    """
    grid = grid or Grid.single()
    pp_rank = grid.pp_rank if pp_rank is None else pp_rank
    pp = grid.pp if pp is None else pp
    rng = _rng(cfg, grid, seed, device, rng)
    chunks = []
    for plan in rank_chunk_plans(pp_rank, cfg.n_layers, pp, vpp, placement):
        chunk = Transformer(cfg, plan.layers, has_embedding=plan.has_embedding, has_head=plan.has_head,
                            scales=scales, rng=rng, device=device)
        parallelize(chunk, grid, llama_plan(cp_mode, tp_overlap), sequence_parallel)
        if float8:
            use_float8(chunk, grid)
        init_parameters(chunk, seed, std_of, grid)
        chunks.append(chunk)
    return chunks


def shape_chunks(cfg: ModelConfig, grid: Grid, vpp: int = 1, *, sequence_parallel: bool = False,
                 pp_rank: int = 0, placement: str = "loop") -> List[Transformer]:
    """The chunks of pp rank `pp_rank` on the meta device: real shard shapes, no memory, no init, no
    dropout stream (shapes do not depend on it): what plans and muP's shape tables read."""
    settings = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)  # or Hydra's DictConfig
    cfg = ModelConfig(**{**settings, "dropout": 0.0})
    return [parallelize(Transformer(cfg, plan.layers, has_embedding=plan.has_embedding, has_head=plan.has_head,
                                    device="meta"), grid, LLAMA_PLAN, sequence_parallel)
            for plan in rank_chunk_plans(pp_rank, cfg.n_layers, grid.pp, vpp, placement)]


def named_parameters_of(chunks: Sequence[nn.Module]) -> Iterator[Tuple[str, nn.Parameter]]:
    """Every (global name, parameter) of this rank's chunks; names never collide across chunks."""
    for chunk in chunks:
        yield from chunk.named_parameters()


def param_specs_of(chunks: Sequence[nn.Module]) -> Dict[str, ShardSpec]:
    """Each parameter's `ShardSpec` by global name, over all of this rank's chunks."""
    specs: Dict[str, ShardSpec] = {}
    for chunk in chunks:
        specs.update(param_specs(chunk))
    return specs


def hidden_shape(micro_batch: int, seq_len: int, dim: int, tp: int, sequence_parallel: bool,
                 cp: int = 1) -> Tuple[int, int, int]:
    """The hidden states passed between stages: [micro_batch, seq (/cp, /tp under SP), dim]."""
    seq_len //= cp
    return (micro_batch, seq_len // tp if sequence_parallel and tp > 1 else seq_len, dim)
