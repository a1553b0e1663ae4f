"""A LLaMA-style decoder, plain: no process group, no parallel degree, no layout in it.

RMSNorm, rotary positions, SwiGLU MLP (or a mixture of SwiGLU experts, train/moe.py), causal attention through
`scaled_dot_product_attention`, optional grouped-query attention, tied or untied
embeddings. One `Transformer` may be a whole model or one pipeline chunk: it may hold the
embedding, a range of global layer indices, and the final norm and head. Parameter names
are global (`layers.7.attn.wqkv.weight`) whatever the split, so checkpoints and muP tables
are keyed the same under any layout.

Parallelism is applied to this model from outside (`plait.parallel.plans`, with the
plan in `plait.train.build`): linears become column- or row-parallel, the embedding and
head vocab-parallel, and the model's three seams are rebound: `loss_fn` (vocab-parallel
cross-entropy), `tied_input` (what the tied head's input passes through) and each residual
dropout's `sharded` flag. The code here reads its sizes from its own weights (the number of
attention heads a rank holds is its query width over the head size), so the same forward
runs on a whole model and on any shard of it.
"""

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from plait.train.attention_mask import AttentionMask
from plait.train.rope import rotary_tables
from plait.train.chunked_loss import chunked_head_loss
from plait.train.config import ModelConfig, ffn_dim, kv_heads, rotary_dim
from plait.train.moe import MoE
from plait.train.mtp import MTPLayer, MultiTokenPrediction

log = logging.getLogger("plait")

VOCAB_MULTIPLE = 64  # the embedding and head rows are padded to a multiple of this (aligned GEMMs)


@dataclass(frozen=True)
class Scales:
    """Forward multipliers (muP sets them; the standard parametrization leaves them at 1).

    `attention` is the softmax scale (None: 1/sqrt(head_dim); muP: mult/head_dim). `router` multiplies each
    mixture of experts' router logits and shared-expert gate (muP: 1/width_mult, for they read the width out into
    a fixed number of experts, as the head reads it into the vocabulary).
    """

    embedding: float = 1.0
    logits: float = 1.0
    attention: Optional[float] = None
    router: float = 1.0


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


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Linear(nn.Module):
    """y = x W^T (+ b). `segments` are the output sizes of a fused weight (Q|K|V, gate|up): `forward_segments`
    runs one GEMM per segment, and a parallel plan splits each segment on its own. `output_scale` multiplies the
    output (muP's multiplier on a readout of fixed width: an MoE router, a shared-expert gate).

    `forward_segments` gives the same values as splitting `forward(x)`, but the backward adds the
    segments' grads into one weight grad instead of concatenating the activation grads (a copy of
    the whole fused output per layer, 17 ms a step in the eager step benchmark). `valid_rows`: rows
    past it are padding (a padded vocabulary), zero and never trained on.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 segments: Optional[Sequence[int]] = None, valid_rows: Optional[int] = None,
                 output_scale: float = 1.0, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.in_features, self.out_features, self.output_scale = in_features, out_features, float(output_scale)
        self.segments = tuple(segments) if segments else (out_features,)
        self.valid_rows = valid_rows
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor, segmented: bool = False):
        """The output, or with `segmented` each segment's (`forward_segments`): through the module's call, so
        its hooks (ZeRO-1's wait for the weights, offload's) see both."""
        if segmented:
            return self.forward_segments(x)
        out = F.linear(x, self.weight, self.bias)
        return out * self.output_scale if self.output_scale != 1.0 else out

    def forward_segments(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        weights = self.weight.split(self.segments)
        biases = self.bias.split(self.segments) if self.bias is not None else (None,) * len(weights)
        return tuple(F.linear(x, weight, bias) for weight, bias in zip(weights, biases))


class Embedding(nn.Module):
    """Token embedding with `rows` >= `valid_rows` (the vocabulary, padded)."""

    def __init__(self, valid_rows: int, rows: int, dim: int, device=None, dtype=None):
        super().__init__()
        self.valid_rows = valid_rows
        self.weight = nn.Parameter(torch.empty(rows, dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a gain."""

    def __init__(self, dim: int, eps: float, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device))
        self.norm = rms_norm_function()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mixed dtypes miss the fused kernel. A half input under autocast (a norm after a linear: latent attention's,
        # QK-norm's) is normed in fp32, the gain's width, and returned in its own dtype, as Hugging Face's norms do;
        # an fp32 gain is never narrowed. Under ZeRO-2/3 with bf16 gathers the gain arrives in bf16 while the
        # residual stream is fp32: the gain is widened.
        if self.weight.element_size() > x.element_size():
            return self.norm(x.float(), self.weight, self.eps).to(x.dtype)
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return self.norm(x, weight, self.eps)


def _sdpa_native(q, k, v, scale: float, enable_gqa: bool, mask: Optional[AttentionMask] = None) -> torch.Tensor:
    """Causal SDPA in the inputs' dtype (the fused bf16 kernels on CUDA); with `mask` (documents, a sliding
    window), attention where its booleans allow instead."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense(q.shape[2], q.device), scale=scale,
                                          enable_gqa=enable_gqa)


def _sdpa_fp32(q, k, v, scale: float, enable_gqa: bool, mask: Optional[AttentionMask] = None) -> torch.Tensor:
    """Causal SDPA computed in fp32 whatever the autocast dtype, returned in q's dtype.

    On CPU, torch's bf16 flash-attention kernel is slower than its fp32 one (forward and
    backward for LLaMA head sizes: 40 ms against 31 ms a layer at b8 h8 s256 d32, one
    thread), so bf16 training on CPU attends in fp32; it is also the more exact choice.
    """
    with torch.autocast("cpu", enabled=False):
        out = _sdpa_native(q.float(), k.float(), v.float(), scale, enable_gqa, mask)
    return out.to(q.dtype)


def choose_attention(device: torch.device) -> Callable:
    """The causal attention kernel for a device type, chosen once when a layer is built."""
    return _sdpa_fp32 if torch.device(device).type == "cpu" else _sdpa_native


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim: x is [b, heads, s, head_dim]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def first_rows(s: int, device) -> slice:
    """The rotary rows of s tokens at the start of the sequence (context parallelism gives each rank others)."""
    return slice(0, s)


class Attention(nn.Module):
    """Causal self-attention: fused Q|K|V projection (with biases under qkv_bias), (QK-norm,) rotary positions, SDPA,
    output projection.

    Seams a parallel plan may set: `attend(q, k, v, scale, enable_gqa, mask=None)` (the attention kernel;
    `mask` an `AttentionMask` over the whole sequence, None: causal) and
    `rope_rows(s, device)` (the places in the sequence of the s tokens this module sees).
    """

    def __init__(self, cfg: ModelConfig, scales: Scales, device=None):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        q_size, kv_size = cfg.n_heads * self.head_dim, kv_heads(cfg) * self.head_dim
        self.wqkv = Linear(cfg.dim, q_size + 2 * kv_size, bias=cfg.qkv_bias, segments=(q_size, kv_size, kv_size),
                           device=device)
        self.wo = Linear(q_size, cfg.dim, device=device)
        # QK-norm (OLMo 2, Qwen3): each head's query and key RMS-normed over its features, one gain shared by heads
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps, device) if cfg.qk_norm else identity
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps, device) if cfg.qk_norm else identity
        self.scale = scales.attention if scales.attention is not None else 1.0 / math.sqrt(self.head_dim)
        self.attend = choose_attention(device if device is not None else "cpu")  # build on the device it runs on
        self.rope_rows: Callable = first_rows

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[AttentionMask] = None) -> torch.Tensor:
        q, k, v = self.wqkv(x, segmented=True)
        b, s, _ = q.shape
        q = self.q_norm(q.view(b, s, -1, self.head_dim)).transpose(1, 2)  # the heads this weight holds (all, or a
        k = self.k_norm(k.view(b, s, -1, self.head_dim)).transpose(1, 2)  # shard's), each normed under qk_norm
        v = v.view(b, s, -1, self.head_dim).transpose(1, 2)
        rows = self.rope_rows(s, cos.device)
        q, k = apply_rotary(q, cos[rows], sin[rows]), apply_rotary(k, cos[rows], sin[rows])
        out = self.attend(q, k, v, self.scale, q.shape[1] != k.shape[1], mask)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


def attention(cfg: ModelConfig, scales: Scales, device=None) -> nn.Module:
    """The block's attention: multi-head (grouped-query under `model.n_kv_heads`), or with `model.attention=mla`
    DeepSeek's multi-head latent attention (train/mla.py)."""
    if cfg.attention == "mla":
        from plait.train.mla import LatentAttention  # (it builds on this module's layers)

        return LatentAttention(cfg, scales, device)
    return Attention(cfg, scales, device)


class MLP(nn.Module):
    """SwiGLU: fused gate|up projection, then down (also each expert of a `MoE`)."""

    def __init__(self, cfg: ModelConfig, device=None, hidden: Optional[int] = None):
        super().__init__()
        hidden = hidden or ffn_dim(cfg)
        self.w13 = Linear(cfg.dim, 2 * hidden, segments=(hidden, hidden), device=device)
        self.w2 = Linear(hidden, cfg.dim, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x, segmented=True)
        return self.w2(F.silu(gate) * up)


def mlp(cfg: ModelConfig, scales: Scales = Scales(), device=None) -> nn.Module:
    """The block's MLP: dense SwiGLU, or with `model.moe_experts` a mixture of that many SwiGLU experts (and with
    `model.moe_shared_ffn_dim` a shared expert of that width, gated unless `model.moe_shared_gate=false`); the
    router and the gate multiply their outputs by `scales.router`."""
    if not cfg.moe_experts:
        return MLP(cfg, device)
    shared = cfg.moe_shared_ffn_dim
    gated = shared and cfg.moe_shared_gate
    return MoE(cfg, Linear(cfg.dim, cfg.moe_experts, output_scale=scales.router, device=device),
               [MLP(cfg, device) for _ in range(cfg.moe_experts)],
               shared=MLP(cfg, device, hidden=shared) if shared else None,
               shared_gate=Linear(cfg.dim, 1, output_scale=scales.router, device=device) if gated else None)


class DropoutStream(Protocol):
    """Where dropout masks come from: `dropout(x, p, sharded)` (plait.parallel.ParallelRNG is one)."""

    def dropout(self, x: torch.Tensor, p: float, sharded: bool) -> torch.Tensor: ...


class ResidualDropout(nn.Module):
    """Dropout on a residual branch, active in training mode only, drawing from `rng`.

    `rng` is any object with `dropout(x, p, sharded)` (plait.parallel.ParallelRNG: explicit
    generators, so checkpoints can save the streams). `sharded` says whether the branch output
    is split across ranks (then each rank draws its own mask); a parallel plan sets it.
    """

    def __init__(self, p: float, rng: Optional[DropoutStream]):
        super().__init__()
        if p > 0.0 and rng is None:
            raise ValueError("model.dropout > 0 needs a random stream (rng); build_model makes one.")
        self.p, self.rng, self.sharded = p, rng, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p <= 0.0 or not self.training:
            return x
        return self.rng.dropout(x, self.p, self.sharded)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.))."""

    def __init__(self, cfg: ModelConfig, scales: Scales, rng: Optional[DropoutStream], device=None):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.attn = attention(cfg, scales, device)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, device)
        self.mlp = mlp(cfg, scales, device)
        self.dropout = ResidualDropout(cfg.dropout, rng)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[AttentionMask] = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), cos, sin, mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, z_loss: float = 0.0,
                  weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over the real vocabulary (padding columns sliced off); with `z_loss`
    = z, plus z x the mean of lse^2 (PaLM's z-loss, lse = logsumexp of each row's logits). With `weights` (one per
    target) the mean of each token's loss (z-loss included) times its weight, as `VocabParallelLoss` weighs them."""
    logits = logits if logits.shape[-1] == vocab_size else logits[..., :vocab_size]
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if weights is not None:
        per_token = F.cross_entropy(flat, targets.reshape(-1), reduction="none")
        if z_loss:
            per_token = per_token + z_loss * torch.logsumexp(flat, dim=-1).square()
        return (per_token * weights.reshape(-1)).mean()
    loss = F.cross_entropy(flat, targets.reshape(-1))
    return loss + z_loss * torch.logsumexp(flat, dim=-1).square().mean() if z_loss else loss


EMBEDDING, HEAD_COPY, MTP_COPY = "embed.weight", "head.weight", "mtp.embed.weight"  # the matrix, a last stage's copies


def tied_names(cfg: ModelConfig) -> Tuple[str, ...]:
    """The embedding's name, then those of the copies a last pipeline stage holds of it: the tied head's weight
    (`model.tie_embeddings`), the multi-token prediction depths' embedding (`model.mtp_layers`)."""
    return (EMBEDDING, *((HEAD_COPY,) if cfg.tie_embeddings else ()), *((MTP_COPY,) if cfg.mtp_layers else ()))


class Transformer(nn.Module):
    """The decoder, or one pipeline chunk of it.

    forward(x, documents=None, future=None): token ids [b, s] if this chunk holds the embedding, else hidden
    states; returns logits [b, s, vocab] if it holds the head (the final norm's output with `loss_chunks`: `loss`
    then runs the head), else hidden states. `documents` [b, whole s]:
    each token's document number (`plait.data.document_ids`): attention stays inside documents; with
    `model.sliding_window` it also reaches back at most that many tokens (`AttentionMask`). `future` [b, D + 1, s]
    (`plait.train.mtp.future_tokens`): with `model.mtp_layers` = D, in training mode, the tokens ahead that the
    multi-token prediction depths embed and predict; their losses join backward beside the main loss (train/mtp.py).
    """

    def __init__(self, cfg: ModelConfig, layers: Optional[Sequence[int]] = None, *, has_embedding: bool = True,
                 has_head: bool = True, scales: Scales = Scales(), rng: Optional[DropoutStream] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.cfg, self.scales, self.rng = cfg, scales, rng
        self.vocab_size = cfg.vocab_size
        self.vocab = VOCAB_MULTIPLE * -(-cfg.vocab_size // VOCAB_MULTIPLE)  # padded rows (a plan may pad more)
        layers = range(cfg.n_layers) if layers is None else layers
        self.embed = Embedding(cfg.vocab_size, self.vocab, cfg.dim, device) if has_embedding else None
        self.layers = nn.ModuleDict({str(i): Block(cfg, scales, rng, device) for i in layers})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, device) if has_head else None
        self.head = None
        if has_head and not (cfg.tie_embeddings and has_embedding):
            self.head = Linear(cfg.dim, self.vocab, valid_rows=cfg.vocab_size, device=device)
        cos, sin = rotary_tables(cfg, device, rotary_dim(cfg))
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.mtp = self._multi_token_prediction(cfg, has_embedding, has_head, device)
        self.tied_input: Callable = identity  # what the tied head's input passes through (a plan's mapping)
        self.loss_fn: Callable = functools.partial(cross_entropy, vocab_size=cfg.vocab_size)
        self.loss_chunks = 0  # > 0: forward stops at the final norm; `loss` runs the head in this many slices
        self.z_loss = 0.0  # PaLM's z-loss coefficient, training mode only (`train.z_loss`)

    def _multi_token_prediction(self, cfg: ModelConfig, has_embedding: bool, has_head: bool,
                                device) -> Optional[MultiTokenPrediction]:
        """With `model.mtp_layers` and the head here, that many MTP depths (train/mtp.py), which read the embedding:
        a copy of it where it is not here (a last pipeline stage)."""
        if not (has_head and cfg.mtp_layers):
            return None
        def norm() -> RMSNorm:
            return RMSNorm(cfg.dim, cfg.norm_eps, device)

        layers = [MTPLayer(cfg, Block(cfg, self.scales, self.rng, device), norm, Linear, device)
                  for _ in range(cfg.mtp_layers)]
        embed = None if has_embedding else Embedding(cfg.vocab_size, self.vocab, cfg.dim, device)  # a last stage's copy
        return MultiTokenPrediction(layers, cfg.mtp_weight, embed)

    @property
    def has_embedding(self) -> bool:
        return self.embed is not None

    def tied_copies(self) -> Dict[str, str]:
        """{copy: the weight it mirrors}: a last pipeline stage without the embedding holds, under tied embeddings,
        its own head weight, and with multi-token prediction the depths' embedding, each kept equal to the
        embedding (initialized alike, grads summed with it every step: `plait.parallel.tied.TiedWeights`);
        elsewhere nothing."""
        held = {HEAD_COPY: self.cfg.tie_embeddings and self.head is not None,
                MTP_COPY: self.mtp is not None and self.mtp.embed is not None}
        return {copy: EMBEDDING for copy, here in held.items() if here}

    @property
    def has_head(self) -> bool:
        return self.norm is not None

    def forward(self, x: torch.Tensor, documents: Optional[torch.Tensor] = None,
                future: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask = AttentionMask.of(documents, self.cfg.sliding_window)
        x = self.trunk(x, mask)
        if self.mtp is not None and future is not None and self.training:  # its losses: kept for `loss`
            self.mtp(x, future, self.embedding, self.logits, self.loss_fn, self.rope_cos, self.rope_sin, mask,
                     self.loss_chunks)
        if self.norm is None:
            return x
        x = self.norm(x)
        if self.loss_chunks:
            return x  # the head runs inside `loss`, a slice of the sequence at a time
        return self.logits(x)

    def trunk(self, x: torch.Tensor, mask: Optional[AttentionMask] = None) -> torch.Tensor:
        """The embedding (if here) and the layers: the last layer's output, before the final norm."""
        if self.embed is not None:
            x = self.embedding(x)
        for block in self.layers.values():
            x = block(x, self.rope_cos, self.rope_sin, mask)
        return x

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding's rows of `ids` (on a last pipeline stage, its multi-token prediction copy's), times muP's
        embedding multiplier."""
        x = self.embed(ids) if self.embed is not None else self.mtp.embed(ids)
        return x * self.scales.embedding if self.scales.embedding != 1.0 else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The head on the final norm's output (the embedding's rows when tied), times muP's logits multiplier."""
        if self.head is not None:
            logits = self.head(x)
        else:
            logits = F.linear(self.tied_input(x), self.embed.weight)
        return logits * self.scales.logits if self.scales.logits != 1.0 else logits

    def loss(self, output: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy in nats (a parallel plan makes it vocab-parallel) of `forward`'s output:
        the logits, or with `loss_chunks` the final norm's output, through the head a slice at a time. In
        training mode `z_loss` adds z x mean(lse^2); evaluation is cross-entropy alone. After a forward that ran
        the multi-token prediction depths, the loss (its value unchanged) carries their losses' gradient too."""
        loss_fn = self.loss_fn
        if self.z_loss and self.training:
            loss_fn = functools.partial(loss_fn, z_loss=self.z_loss)
        if self.loss_chunks:
            loss = chunked_head_loss(self.logits, loss_fn, output, targets, self.loss_chunks)
        else:
            loss = loss_fn(output, targets)
        return self.mtp.beside(loss) if self.mtp is not None else loss
