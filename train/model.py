"""A LLaMA-style decoder built from plait.parallel layers.

RMSNorm, rotary positions, SwiGLU MLP, causal attention through
`scaled_dot_product_attention`, optional grouped-query attention, tied or untied
embeddings. One `Transformer` is one pipeline chunk: it may hold the embedding, a range
of global layer indices, and the final norm and head. Parameter names are global
(`layers.7.attn.wqkv.weight`) whatever the split, so checkpoints and muP tables are
keyed the same under any tp x pp.

Initialization does not depend on the layout: every weight is drawn in full from
(seed, name) and the rank keeps its shard (`init_parameters`).
"""

import logging
import math
import zlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from plait.parallel.grid import Grid
from plait.parallel.random import ParallelRNG
from plait.parallel.sharding import ShardSpec
from plait.parallel.tensor import (ColumnParallelLinear, CopyToRegion, GatherFromSequence, RowParallelLinear,
                                   VocabParallelEmbedding, mapping, vocab_parallel_cross_entropy)
from plait.train.config import ModelConfig, ffn_dim, kv_heads

log = logging.getLogger("plait")


@dataclass(frozen=True)
class Scales:
    """Forward multipliers (muP sets them; the standard parametrization leaves them at 1).

    `attention` is the softmax scale (None: 1/sqrt(head_dim); muP: mult/head_dim).
    """

    embedding: float = 1.0
    logits: float = 1.0
    attention: Optional[float] = None


def padded_vocab(vocab_size: int, tp: int, multiple: int = 64) -> int:
    """The vocabulary rounded up so every tp rank holds an equal, aligned slice."""
    step = multiple * tp
    return step * ((vocab_size + step - 1) // step)


def _choose_rms_norm() -> Callable:
    """apex's fused RMSNorm on CUDA when importable, else torch's; chosen once, logged once."""
    if torch.cuda.is_available():
        try:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine

            log.info("rms norm: apex fused kernel")
            return lambda x, w, eps: fused_rms_norm_affine(x, w, w.shape, eps)
        except ImportError:
            pass
    log.info("rms norm: torch F.rms_norm (apex not used)")
    return lambda x, w, eps: F.rms_norm(x, w.shape, w, eps)


_RMS_NORM: Optional[Callable] = None


def rms_norm_function() -> Callable:
    global _RMS_NORM  # a cached hardware choice, not process-group state
    if _RMS_NORM is None:
        _RMS_NORM = _choose_rms_norm()
    return _RMS_NORM


class RMSNorm(nn.Module):
    """Root-mean-square norm with a gain; under sequence parallelism it sees a sequence shard."""

    def __init__(self, dim: int, eps: float, sequence_parallel: bool = False, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.spec = ShardSpec((dim,), None, tp_partial_grad=sequence_parallel)
        self.norm = rms_norm_function()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x, self.weight, self.eps)


def _sdpa_native(q, k, v, scale: float, enable_gqa: bool) -> torch.Tensor:
    """Causal SDPA in the inputs' dtype (the fused bf16 kernels on CUDA)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)


def _sdpa_fp32(q, k, v, scale: float, enable_gqa: bool) -> torch.Tensor:
    """Causal SDPA computed in fp32 whatever the autocast dtype, returned in q's dtype.

    On CPU, torch's bf16 flash-attention kernel is slower than its fp32 one (forward and
    backward for LLaMA head sizes: 40 ms against 31 ms a layer at b8 h8 s256 d32, one
    thread), so bf16 training on CPU attends in fp32; it is also the more exact choice.
    """
    with torch.autocast("cpu", enabled=False):
        out = _sdpa_native(q.float(), k.float(), v.float(), scale, enable_gqa)
    return out.to(q.dtype)


def choose_attention(device: torch.device) -> Callable:
    """The causal attention kernel for a device type, chosen once when a layer is built."""
    return _sdpa_fp32 if torch.device(device).type == "cpu" else _sdpa_native


def rotary_tables(head_dim: int, max_seq_len: int, theta: float, device=None):
    """cos and sin of the rotary angles, [max_seq_len, head_dim / 2]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim: x is [b, heads, s, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Causal self-attention with heads split over tp (fused Q|K|V column-parallel, output row-parallel)."""

    def __init__(self, cfg: ModelConfig, grid: Grid, sequence_parallel: bool, scales: Scales, device=None):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        n_kv = kv_heads(cfg)
        for key, count in (("model.n_heads", cfg.n_heads), ("model.n_kv_heads", n_kv)):
            if count % grid.tp:
                raise ValueError(f"parallel.tp={grid.tp} does not divide {key}={count}; "
                                 f"use a tp that divides the head counts.")
        self.local_heads = cfg.n_heads // grid.tp
        self.local_kv = n_kv // grid.tp
        q_size, kv_size = cfg.n_heads * self.head_dim, n_kv * self.head_dim
        self.wqkv = ColumnParallelLinear(cfg.dim, q_size + 2 * kv_size, grid, segments=(q_size, kv_size, kv_size),
                                         sequence_parallel=sequence_parallel, device=device)
        self.wo = RowParallelLinear(q_size, cfg.dim, grid, sequence_parallel=sequence_parallel, device=device)
        self.scale = scales.attention if scales.attention is not None else 1.0 / math.sqrt(self.head_dim)
        self.attend = choose_attention(device if device is not None else grid.device)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.wqkv.forward_segments(x)
        b, s, _ = q.shape
        q = q.view(b, s, self.local_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.local_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.local_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos[:s], sin[:s]), apply_rotary(k, cos[:s], sin[:s])
        out = self.attend(q, k, v, self.scale, self.local_heads != self.local_kv)
        return self.wo(out.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: fused gate|up column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, grid: Grid, sequence_parallel: bool, device=None):
        super().__init__()
        hidden = ffn_dim(cfg)
        self.w13 = ColumnParallelLinear(cfg.dim, 2 * hidden, grid, segments=(hidden, hidden),
                                        sequence_parallel=sequence_parallel, device=device)
        self.w2 = RowParallelLinear(hidden, cfg.dim, grid, sequence_parallel=sequence_parallel, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13.forward_segments(x)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, grid: Grid, sequence_parallel: bool, scales: Scales,
                 rng: Optional[ParallelRNG], device=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, sequence_parallel, device)
        self.attn = Attention(cfg, grid, sequence_parallel, scales, device)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, sequence_parallel, device)
        self.mlp = MLP(cfg, grid, sequence_parallel, device)
        self.dropout = ResidualDropout(cfg.dropout, rng, sharded=sequence_parallel and grid.tp > 1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class ResidualDropout(nn.Module):
    """Dropout on a residual branch from the tp-aware RNG, active in training mode only.

    The branch output is replicated over tp (after an all-reduce) unless sequence
    parallelism shards it, so `sharded` picks the stream: the same mask on every tp rank
    for replicated activations, a different one per rank for sequence shards.
    """

    def __init__(self, p: float, rng: Optional[ParallelRNG], sharded: bool):
        super().__init__()
        if p > 0.0 and rng is None:
            raise ValueError("model.dropout > 0 needs a ParallelRNG (build_model makes one).")
        self.p, self.rng, self.sharded = p, rng, sharded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0.0 or not self.training:
            return x
        return self.rng.dropout(x, self.p, self.sharded)


class Transformer(nn.Module):
    """One pipeline chunk of the decoder (the whole model when there is one chunk).

    forward(x): token ids [b, s] if this chunk holds the embedding, else hidden states;
    returns vocab-sharded logits [b, s, V/tp] if it holds the head, else hidden states
    (sequence-sharded [b, s/tp, dim] under sequence parallelism).
    """

    def __init__(self, cfg: ModelConfig, grid: Optional[Grid] = None, layers: Optional[Sequence[int]] = None, *,
                 has_embedding: bool = True, has_head: bool = True, sequence_parallel: bool = False,
                 scales: Scales = Scales(), rng: Optional[ParallelRNG] = None, device: Optional[torch.device] = None):
        super().__init__()
        grid = grid or Grid.single()
        self.cfg, self.grid, self.scales = cfg, grid, scales
        self.sequence_parallel = sequence_parallel and grid.tp > 1
        self.vocab = padded_vocab(cfg.vocab_size, grid.tp)
        layers = range(cfg.n_layers) if layers is None else layers
        self.embed = (VocabParallelEmbedding(cfg.vocab_size, self.vocab, cfg.dim, grid,
                                             sequence_parallel=self.sequence_parallel, device=device)
                      if has_embedding else None)
        self.layers = nn.ModuleDict({str(i): Block(cfg, grid, self.sequence_parallel, scales, rng, device)
                                     for i in layers})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, self.sequence_parallel, device) if has_head else None
        self.head = None
        if has_head and not (cfg.tie_embeddings and has_embedding):
            self.head = ColumnParallelLinear(cfg.dim, self.vocab, grid, sequence_parallel=self.sequence_parallel,
                                             valid_rows=cfg.vocab_size, device=device)
        cos, sin = rotary_tables(cfg.dim // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rng = rng
        self._tied_input_map = None
        if has_head and self.head is None:  # tied: the head reuses the embedding's rows
            self._tied_input_map = mapping(GatherFromSequence if self.sequence_parallel else CopyToRegion,
                                           grid.tp_group)

    @property
    def has_embedding(self) -> bool:
        return self.embed is not None

    @property
    def has_head(self) -> bool:
        return self.norm is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
            if self.scales.embedding != 1.0:
                x = x * self.scales.embedding
        for block in self.layers.values():
            x = block(x, self.rope_cos, self.rope_sin)
        if self.norm is None:
            return x
        x = self.norm(x)
        if self.head is not None:
            logits = self.head(x)
        else:
            logits = F.linear(self._tied_input_map(x), self.embed.weight)
        return logits * self.scales.logits if self.scales.logits != 1.0 else logits

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats (vocab-parallel at tp > 1: logits are never gathered)."""
        if self.grid.tp == 1:  # one rank holds every column: torch's fused kernel, padding sliced off
            logits = logits if self.vocab == self.cfg.vocab_size else logits[..., :self.cfg.vocab_size]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        return vocab_parallel_cross_entropy(logits, targets, self.grid, self.cfg.vocab_size).mean()

    def param_specs(self) -> Dict[str, ShardSpec]:
        """Each parameter's full shape and tp split, keyed by its global name."""
        specs = {}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            if getattr(module, "spec", None) is not None and isinstance(getattr(module, "weight", None), nn.Parameter):
                specs[prefix + "weight"] = module.spec
            if getattr(module, "bias_spec", None) is not None:
                specs[prefix + "bias"] = module.bias_spec
        return specs


def seed_for(seed: int, name: str) -> int:
    """A stable per-parameter seed, so a weight's values depend only on (seed, name)."""
    return zlib.crc32(f"{seed}:{name}".encode()) & 0x7FFFFFFF


def default_init_std(name: str, spec: ShardSpec, cfg: ModelConfig) -> float:
    """Standard init: N(0, init_std) for matrices, scaled 1/sqrt(2 n_layers) on residual outputs."""
    if name.endswith(("attn.wo.weight", "mlp.w2.weight")):
        return cfg.init_std / math.sqrt(2 * cfg.n_layers)
    return cfg.init_std


@torch.no_grad()
def init_parameters(model: Transformer, seed: int,
                    std_of: Optional[Callable[[str, ShardSpec], Optional[float]]] = None) -> None:
    """Draw each weight in full from (seed, name) on the CPU, keep this rank's tp shard.

    `std_of(name, spec)` gives the init std (None or a negative value: keep ones, for
    norm gains; 0: zeros). Vocabulary padding rows are zero.
    """
    std_of = std_of or (lambda name, spec: default_init_std(name, spec, model.cfg))
    grid, specs = model.grid, model.param_specs()
    for name, param in model.named_parameters():
        spec = specs.get(name, ShardSpec(tuple(param.shape)))
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
        param.copy_(spec.shard(full, grid.tp_rank, grid.tp))


def build_model(cfg: ModelConfig, grid: Optional[Grid] = None, seed: int = 0, *, sequence_parallel: bool = False,
                scales: Scales = Scales(), device: Optional[torch.device] = None,
                std_of: Optional[Callable[[str, ShardSpec], Optional[float]]] = None,
                rng: Optional[ParallelRNG] = None) -> Transformer:
    """The whole decoder as one chunk (no pipeline), initialized from `seed`.

    With `model.dropout > 0` and no `rng` given, dropout draws from a `ParallelRNG`
    seeded by `seed` (kept as `model.rng`, whose state a checkpoint can save).
    """
    grid = grid or Grid.single()
    if rng is None and cfg.dropout > 0:
        rng = ParallelRNG(seed, grid, torch.device(device) if device is not None else grid.device)
    model = Transformer(cfg, grid, sequence_parallel=sequence_parallel, scales=scales, rng=rng, device=device)
    init_parameters(model, seed, std_of)
    return model
