"""Wire muP (plait.optim.mup) into the model: shapes in, init stds, groups and scales out.

`plait.optim.mup` takes plain shapes; this module gets them from the model config. The
base and delta shapes come from the same decoder built on the meta device (no memory)
at `model.base_dim` and twice that, so each parameter's role is decided by its global,
unsharded shape and does not change under tp or pp. With `optim.mup=false` the same
path gives the standard parametrization (every multiplier 1).
"""

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from plait.optim.config import OptimConfig
from plait.optim.mup import ForwardScales, MupRole, forward_scales, group_key, mup_table
from plait.optim.muon import muon_group_of
from plait.parallel.grid import Grid
from plait.parallel.plans import param_specs
from plait.parallel.sharding import ShardSpec
from plait.train.config import ConfigError, ModelConfig, kv_heads, latent_dims
from plait.train.build import default_init_std, init_parameters, shape_chunks
from plait.train.model import Scales, Transformer

log = logging.getLogger("plait")


def as_model_config(cfg) -> ModelConfig:
    """A plain ModelConfig from a dataclass or Hydra's DictConfig of one."""
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig)})


def base_widths(cfg: ModelConfig) -> Tuple[int, int]:
    """(base_dim, base_head_dim): the configured ones, else the model's own (width_mult 1)."""
    head_dim = cfg.dim // cfg.n_heads
    base_dim = int(cfg.base_dim or cfg.dim)
    base_head_dim = int(cfg.base_head_dim or (head_dim if base_dim == cfg.dim else base_dim // cfg.n_heads))
    if base_dim % base_head_dim or base_head_dim % 2:
        raise ConfigError(f"model.base_head_dim={base_head_dim} must be even and divide model.base_dim={base_dim}; "
                          "set model.base_head_dim to an even divisor of the base width.")
    return base_dim, base_head_dim


def config_at_width(cfg: ModelConfig, dim: int, head_dim: int) -> ModelConfig:
    """The same decoder at width `dim` with heads of `head_dim` (kv groups and MLP ratios kept, a shared expert's
    too: its matrices grow with width, so they are hidden). Latent attention's per-head sizes grow with the head
    size and its latents' ranks with the width, so every one of its matrices is hidden."""
    n_heads = dim // head_dim
    group = cfg.n_heads // kv_heads(cfg)
    ffn = None if not cfg.ffn_dim else max(1, round(cfg.ffn_dim * dim / cfg.dim))
    shared = max(1, round(cfg.moe_shared_ffn_dim * dim / cfg.dim)) if cfg.moe_shared_ffn_dim else 0
    latent = latent_at_width(cfg, dim / cfg.dim, head_dim / (cfg.dim // cfg.n_heads)) if cfg.attention == "mla" else {}
    return dataclasses.replace(cfg, dim=dim, n_heads=n_heads, n_kv_heads=max(1, n_heads // group), ffn_dim=ffn,
                               moe_shared_ffn_dim=shared, **latent)


def latent_at_width(cfg: ModelConfig, width_ratio: float, head_ratio: float) -> Dict[str, int]:
    """Latent attention's sizes, the ranks times `width_ratio` and the per-head sizes times `head_ratio` (the
    rotary part kept even)."""
    dims = latent_dims(cfg)

    def grown(size: int, ratio: float, multiple: int = 1) -> int:
        return max(multiple, multiple * round(size * ratio / multiple))

    return {"q_lora_rank": grown(dims.q_rank, width_ratio) if dims.q_rank else 0,
            "kv_lora_rank": grown(dims.kv_rank, width_ratio), "qk_nope_head_dim": grown(dims.nope, head_ratio),
            "qk_rope_head_dim": grown(dims.rope, head_ratio, 2), "v_head_dim": grown(dims.v, head_ratio)}


def attention_head_size(cfg: ModelConfig) -> int:
    """The head size the attention logits' scale reads: dim / n_heads, or latent attention's query-key size."""
    return latent_dims(cfg).qk if cfg.attention == "mla" else cfg.dim // cfg.n_heads


def full_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every global parameter name's full shape, from a whole model on the meta device (shapes do not
    depend on dropout, which would want a random stream the meta model has no use for)."""
    (model,) = shape_chunks(cfg, Grid.single())
    specs = param_specs(model)
    return {name: tuple(specs[name].full_shape if name in specs else param.shape)
            for name, param in model.named_parameters()}


def readout_name(cfg: ModelConfig) -> str:
    return "embed.weight" if cfg.tie_embeddings else "head.weight"


def router_names(names) -> List[str]:
    """The mixtures of experts' readouts among parameter `names`: each router, each shared-expert gate."""
    return [name for name in names if name.endswith(("mlp.router.weight", "mlp.shared_gate.weight"))]


@dataclass
class Parametrization:
    """What muP (or the standard parametrization) sets: the table, init, groups, forward scales."""

    table: Dict[str, MupRole]
    scales: Scales
    std_of: Callable[[str, ShardSpec], Optional[float]]
    group_of: Callable
    zero_query: bool


def build_parametrization(model_cfg: ModelConfig, optim_cfg: OptimConfig) -> Parametrization:
    """The parametrization `optim.mup` asks for, from the model config alone (any layout)."""
    model_cfg = as_model_config(model_cfg)
    base_dim, base_head_dim = base_widths(model_cfg)
    head_dim = model_cfg.dim // model_cfg.n_heads
    delta_head_dim = base_head_dim if head_dim == base_head_dim else 2 * base_head_dim  # grow what the target grows
    base_cfg = config_at_width(model_cfg, base_dim, base_head_dim)
    base = full_shapes(base_cfg)
    delta = full_shapes(config_at_width(model_cfg, 2 * base_dim, delta_head_dim))
    readout, full = readout_name(model_cfg), full_shapes(model_cfg)
    routers = router_names(full)
    table = mup_table(full, base, delta, [readout, *routers], enabled=optim_cfg.mup)
    numbers: ForwardScales = forward_scales(table[readout].width_mult, attention_head_size(model_cfg),
                                            attention_head_size(base_cfg),
                                            optim_cfg.mup_input_mult, optim_cfg.mup_output_mult,
                                            optim_cfg.mup_attn_mult, enabled=optim_cfg.mup,
                                            router_width_mult=table[routers[0]].width_mult if routers else 1.0)
    zero_readout = optim_cfg.mup and optim_cfg.mup_zero_readout and not model_cfg.tie_embeddings

    def std_of(name: str, spec: ShardSpec) -> Optional[float]:
        if zero_readout and name == readout:
            return 0.0
        return default_init_std(name, spec, model_cfg) * table[name].init_mult

    if optim_cfg.mup:
        log.info("muP: width %d over base %d (head dim %d over %d), readout scale %.4g, attention scale %.4g%s",
                 model_cfg.dim, base_dim, head_dim, base_head_dim, numbers.logits, numbers.attention,
                 f", router scale {numbers.router:.4g}" if routers else "")
    group_of = group_key(table)
    if optim_cfg.name == "muon":  # Muon steps the hidden matrices (both dimensions grow with width), AdamW the rest
        muon_lr = optim_cfg.muon_lr if optim_cfg.muon_lr is not None else optim_cfg.lr
        group_of = muon_group_of(group_of, lambda name: table[name].role == "hidden", muon_lr / optim_cfg.lr)
    return Parametrization(table, Scales(numbers.embedding, numbers.logits, numbers.attention, numbers.router), std_of,
                           group_of, optim_cfg.mup and optim_cfg.mup_zero_query)


@torch.no_grad()
def zero_queries(model: Transformer) -> None:
    """Zero the query rows of every fused Q|K|V weight (this rank's shard of each segment), and latent attention's
    query projection whole."""
    specs = param_specs(model)
    for name, param in model.named_parameters():
        if name.endswith("attn.wqkv.weight"):  # this shard's query rows: its share of the query segment
            spec = specs[name]
            param[: spec.segments[0] * param.shape[0] // spec.full_shape[0]].zero_()
        elif name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
            param.zero_()


def init_model(model: Transformer, seed: int, parametrization: Parametrization) -> None:
    """Initialize `model` (layout-independent) with the parametrization's stds."""
    init_parameters(model, seed, parametrization.std_of)
    if parametrization.zero_query:
        zero_queries(model)
