"""Plan before you spend: shard shapes, memory, bubble and traffic for any world size, on no cluster.

`plait plan model=70b parallel.tp=8 parallel.pp=8 launch.world_size=1024` (and
`plait-train ... train.dry_run=true`) builds the grid arithmetic (`Layout`, no process
groups) and each pipeline stage's model chunk on the meta device (real shard shapes, no
memory), then prints per rank:

- parameters, and bytes for weights, gradients and optimizer state (fp32 master weights
  and grads; AdamW keeps 2 fp32 states, Lion 1) at the configured `parallel.zero`, and a
  second table with each zero level's total and dp traffic (`StagePlan.held`, `dp_sent`:
  ZeRO-1 divides the state by dp x cp, ZeRO-2 the grads too and gathers the weights for
  the step, ZeRO-3 keeps a weight shard and gathers two blocks at a time);
- activations saved for backward, counted tensor by tensor from this model's own forward
  (`block_activation_elements`: checked against a real CPU forward in tests/test_plan.py),
  times the micro-batches in flight under the schedule, with and without offload;
- the pipeline bubble from the schedule simulator, and bytes each rank sends per step over
  tp (ring all-reduce / all-gather / reduce-scatter), dp (grad all-reduce), pp (p2p), cp (the ring's or
  Ulysses' exchanges) and ep (the experts' all-to-alls, for an even routing).

All ranks of one pp stage hold the same shapes (tp splits evenly, dp replicates), so the
table has one row per pp stage.
"""

import sys
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from plait.common.precision import float8_gemms, half_dtype
from plait.parallel.grid import Grid
from plait.parallel.layout import Layout

GiB = 1024 ** 3


@dataclass
class StagePlan:
    """One pp stage's figures (bytes unless named otherwise)."""

    pp_rank: int
    layers: int
    params: int  # on each rank of this stage
    full_params: int  # of the stage's whole chunk (tp shards summed, replicated norms once)
    weights: int  # fp32 master weights, whole (zero 0-1)
    grads: int  # fp32 grads, whole (zero 0-1)
    optimizer: int  # optimizer state, whole (zero 0)
    activations: int
    activations_offload: int
    inflight: int
    tp_bytes: int
    dp_bytes: int  # sent over dp (x cp) per step at zero 0 and 1: the grads' all-reduce
    pp_bytes: int
    cp_bytes: int = 0
    ep_bytes: int = 0  # sent in the experts' all-to-alls per step, when the routing is even
    shards: int = 1  # ranks of the grad group (dp x cp) that ZeRO shards over
    block_weights: int = 0  # one block's weights on this rank, fp32 (ZeRO-3 gathers them whole)
    gather_size: int = 4  # bytes per element of a ZeRO-2/3 gather (2 under bf16)
    microbatches: int = 1

    def held(self, zero: int) -> Tuple[int, int, int]:
        """(weights, grads, optimizer state) this rank holds at its peak under `parallel.zero`.

        1: state / n; 2: grads / n too, and the weights gathered whole for the step (in the gather dtype)
        beside the fp32 shard; 3: the shard plus two blocks gathered (the one computing, the one
        prefetched) and one block's grads before their reduce-scatter."""
        n, w, g, o = self.shards, self.weights, self.grads, self.optimizer
        if zero == 0:
            return w, g, o
        if zero == 1:
            return w, g, -(-o // n)
        gathered = w * self.gather_size // 4 if zero == 2 else 2 * self.block_weights * self.gather_size // 4
        grads = -(-g // n) + (self.block_weights if zero == 3 else 0)
        return -(-w // n) + gathered, grads, -(-o // n)

    def dp_sent(self, zero: int) -> int:
        """Bytes this rank sends over dp (x cp) per step: zero 0/1 all-reduce (ZeRO-1: reduce-scatter + all-gather,
        the same bytes); 2: a reduce-scatter per micro-batch and one all-gather; 3: gathers before each
        micro-batch's forward and backward."""
        if zero <= 1 or self.shards == 1:
            return self.dp_bytes if zero <= 1 else 0
        share = (self.shards - 1) / self.shards
        gather = share * self.weights * self.gather_size // 4
        return int(self.microbatches * share * self.grads + gather * (1 if zero == 2 else 2 * self.microbatches))

    def total(self, zero: int, offload: bool) -> int:
        return sum(self.held(zero)) + (self.activations_offload if offload else self.activations)


@dataclass
class Plan:
    """What every rank of a layout holds (per stage) and the step's bubble: `plait plan`'s result."""

    layout: Layout
    micro_batch: int
    microbatches: int
    vpp: int
    schedule: str
    bubble: float
    stages: List[StagePlan]
    total_params: int


def _element_size(precision: str) -> int:
    return 2 if half_dtype(precision) is not None else 4


def block_activation_elements(model_cfg, tokens: int, tp: int, sequence_parallel: bool,
                              regather: bool = False) -> int:
    """Elements one block saves for backward per micro-batch of `tokens` (b x s) tokens.

    Counted from this model's forward (see train/model.py), per token:
    each RMSNorm saves its input, 1/rms and the normalized input ((2d + 1) on the sequence
    shard under SP) and the linear after it saves its (gathered, full-d) input, or with `regather` (SP under
    `parallel.tp_overlap`) only its sequence shard, gathered again in backward; attention
    saves the fused Q|K|V output, rotated q and k, the SDPA output and its logsumexp (one
    per head) and the output projection's (reshaped) input; the MLP saves the gate|up
    output, silu(gate) and the product that feeds the down projection; under QK-norm each head's
    q and k norm saves its input, its output and 1/rms. Latent attention: `latent_attention_elements`.
    """
    from plait.train.config import ffn_dim, kv_heads

    d = model_cfg.dim
    head_dim = d // model_cfg.n_heads
    q = model_cfg.n_heads * head_dim // tp
    kv = kv_heads(model_cfg) * head_dim // tp
    f = ffn_dim(model_cfg) // tp
    shard = tp if sequence_parallel and tp > 1 else 1
    norm_and_input = (2 * d + 1) / shard + (d / shard if regather else d)
    if model_cfg.attention == "mla":
        attention = latent_attention_elements(model_cfg, tp, shard, regather)
    else:
        attention = norm_and_input + (q + 2 * kv) + q + kv + model_cfg.n_heads // tp + 2 * q
    if model_cfg.qk_norm:  # each head's q and k norm: its input, normed output and 1/rms
        attention += 2 * (q + kv) + (model_cfg.n_heads + kv_heads(model_cfg)) // tp
    mlp = norm_and_input + 2 * f + f + f
    return int(tokens * (attention + mlp))


def latent_attention_elements(model_cfg, tp: int, shard: int, regather: bool) -> float:
    """Elements a latent attention layer (train/mla.py) and its norm save per token.

    The norm as above, its output once (the down projections' input, on the sequence shard under SP; a
    column-parallel query projection's gathered copy beside it under SP); each latent's norm its input, 1/rms and
    normalized input, and the column-parallel layer after it that norm's output (gathered under SP unless
    `regather`); per head q and k (the query-key size), v (padded to the query-key size; unpadded, a view of the
    keys-and-values projection's whole output), the attention output and its logsumexp, and the output projection's
    input (the value size)."""
    from plait.train.config import latent_dims

    d, dims, heads = model_cfg.dim, latent_dims(model_cfg), model_cfg.n_heads // tp
    gathered = 1 if shard > 1 and not regather else 1 / shard  # a column-parallel layer's input, per element

    def latent(rank: int) -> float:
        return (2 * rank + 1) / shard + rank * gathered

    queries = latent(dims.q_rank) if dims.q_rank else (d if shard > 1 and not regather else 0)
    attention = (2 * d + 1) / shard + d / shard + queries + latent(dims.kv_rank)
    if dims.qk > dims.v:  # v padded: q, k, v and the output at the query-key size
        return attention + heads * (4 * dims.qk + 1 + dims.v)
    return attention + heads * (2 * dims.qk + (dims.nope + dims.v) + 2 * dims.v + 1)


def expert_rows(model_cfg, tokens: int) -> Tuple[int, int]:
    """(the (token, choice) pairs of `tokens` tokens, the rows the experts run on: every pair, or under a capacity
    at most E x the capacity)."""
    from plait.train.moe import capacity

    experts, factor = int(model_cfg.moe_experts), model_cfg.moe_capacity_factor
    pairs = tokens * int(model_cfg.moe_top_k)
    return pairs, pairs if factor is None else min(pairs, experts * capacity(factor, pairs, experts))


def moe_extra_bytes(model_cfg, tokens: int, tp: int, size: int, sequences: int = 1) -> int:
    """Bytes a mixture of experts (train/moe.py) saves beyond the dense MLP it replaces, per micro-batch of `tokens`
    tokens (all of them on every tp rank: the block gathers them once); 0 for a dense model.

    Per row an expert runs (every (token, choice) pair; under a capacity at most E x the capacity): its gathered
    row, the expert's gate|up output, silu(gate) and product (each tp rank's share), the expert's output (whole
    width: partial sums), in `size` bytes, and its token's int64 index. Per pair: its weight in `size` bytes and
    two int64 indices (its expert, its row in the experts' output); under a capacity also its one-byte mask. Per
    token, in fp32: the router's probabilities, and under `moe_norm_topk` the top-k values and their sum (with
    sigmoid scores and the balancing loss, their sum too). With the balancing loss, one fp32 number per expert
    (per expert and sequence, of the `sequences` in the micro-batch, under seq_aux_loss); with the z-loss, the
    router's logits and their logsumexp. A shared expert keeps what a dense MLP does (its share of gate|up,
    silu(gate), product) plus, when gated, its output (whole width) and its gate's sigmoid. Under a capacity this
    is an upper bound, exact when no pair is dropped.
    """
    from plait.train.config import ffn_dim

    experts, k = int(model_cfg.moe_experts), int(model_cfg.moe_top_k)
    if not experts:
        return 0
    d, f = model_cfg.dim, ffn_dim(model_cfg) // tp
    pairs, rows = expert_rows(model_cfg, tokens)
    router = experts + (k + 1 if model_cfg.moe_norm_topk else 0) + (experts + 1 if model_cfg.moe_z_loss else 0)
    router += 1 if model_cfg.moe_score_function == "sigmoid" and model_cfg.moe_aux_loss else 0  # scores' sum
    moe = rows * ((2 * d + 4 * f) * size + 8) + pairs * (size + 2 * 8) + tokens * router * 4
    moe += pairs if model_cfg.moe_capacity_factor is not None else 0
    per_sequence = model_cfg.moe_aux_loss_type == "seq_aux_loss"
    moe += experts * 4 * (sequences if per_sequence else 1) if model_cfg.moe_aux_loss else 0
    shared = int(model_cfg.moe_shared_ffn_dim) // tp
    gate = d + 1 if model_cfg.moe_shared_gate else 0  # (ungated, its output is added: nothing more kept)
    moe += tokens * (4 * shared + gate) * size if shared else 0
    return int(moe - tokens * 4 * f * size)


def head_activation_elements(model_cfg, tokens: int, tp: int, sequence_parallel: bool, vocab_local: int,
                             loss_chunks: int = 0, regather: bool = False) -> int:
    """Final norm + head input (with `regather`, an untied head's sequence shard only), and the vocab-sharded
    logits the cross-entropy keeps (per micro-batch); with `train.loss_chunks` only one slice's logits at a time
    (recomputed in backward)."""
    shard = tp if sequence_parallel and tp > 1 else 1
    logits = vocab_local / loss_chunks if loss_chunks else vocab_local
    head_input = model_cfg.dim / shard if regather else model_cfg.dim
    return int(tokens * ((2 * model_cfg.dim + 1) / shard + head_input + logits))


def kernel_widths(model_cfg) -> Tuple[int, int, int]:
    """Per token, summed over all heads, the widths of the q, k and v the attention kernel takes (latent attention:
    every head's key, and the values padded to the query-key size when narrower); the output's is v's."""
    from plait.train.config import kv_heads, latent_dims

    if model_cfg.attention == "mla":
        dims = latent_dims(model_cfg)
        return (model_cfg.n_heads * dims.qk,) * 2 + (model_cfg.n_heads * max(dims.qk, dims.v),)
    head_dim = model_cfg.dim // model_cfg.n_heads
    return model_cfg.n_heads * head_dim, kv_heads(model_cfg) * head_dim, kv_heads(model_cfg) * head_dim


def context_bytes(model_cfg, tokens: int, tp: int, cp: int, mode: str, size: int) -> float:
    """Bytes one cp rank sends per block per micro-batch of its `tokens`, forward and backward.

    ring: K and V (this rank's kv heads) to the next rank cp - 1 times forward and again backward, and
    their fp32 grads cp times; ulysses: four all-to-alls each way (q, k, v, out), each sending
    (cp - 1) / cp of the tensor.
    """
    if cp == 1:
        return 0.0
    q, k, v = (tokens * width // tp for width in kernel_widths(model_cfg))
    if mode == "ring":
        return (cp - 1) * (k + v) * size * 2 + cp * (k + v) * 4
    return 2 * (cp - 1) / cp * (q + k + 2 * v) * size


def tp_elements(model_cfg) -> Tuple[int, int]:
    """Per token, (the elements one block moves through tp collectives forward and backward, counted as
    all-reduces; the elements of its column-parallel layers' inputs, which `parallel.tp_overlap` under SP gathers
    again in backward). Multi-head attention: its output's all-reduce forward and the fused projection's input
    grad's backward, d each; latent attention: the output's (d), and backward the input grads of the query
    projection (d, or the query latent's rank), of the key-value latent and of the shared rotary key. The MLP:
    2 d, and its gate|up input d."""
    from plait.train.config import latent_dims

    d = model_cfg.dim
    if model_cfg.attention != "mla":
        return 4 * d, 2 * d
    dims = latent_dims(model_cfg)
    columns = (dims.q_rank or d) + dims.kv_rank + d
    return d + (dims.q_rank or d) + dims.kv_rank + dims.rope + 2 * d, columns


def expert_exchange_bytes(model_cfg, tokens: int, ep: int, size: int) -> float:
    """Bytes one ep rank sends in one block's expert all-to-alls per micro-batch of `tokens` tokens (all of them
    on every tp rank), forward and backward, when the routing is even (each expert as busy as the next): of its
    (token, choice) rows (under a capacity, at most E x the capacity) (ep - 1)/ep go to other ranks, the token
    rows in the block input's dtype (fp32: the residual stream, under autocast too) and the experts' outputs
    back in `size` bytes; backward sends their grads the same ways; and the forward's all-to-all of E/ep
    int64 row counts to each other rank. 0 without experts or at ep 1."""
    experts = int(model_cfg.moe_experts)
    if ep == 1 or not experts:
        return 0.0
    _, rows = expert_rows(model_cfg, tokens)
    remote = (ep - 1) / ep
    return 2 * rows * remote * model_cfg.dim * (4 + size) + experts * remote * 8


def stand_in_grid(layout: Layout, rank: int) -> Grid:
    """A Grid with this rank's coordinates and no process groups: enough to build shard shapes."""
    return Grid(layout, rank, "none", torch.device("meta"))


def _ring(nbytes: float, n: int, factor: float) -> float:
    """Bytes one rank sends in a ring collective over `n` ranks (all-reduce: factor 2, gather/scatter: 1)."""
    return factor * (n - 1) / n * nbytes if n > 1 else 0.0


def _stage_plan(cfg, layout: Layout, pp_rank: int, micro_batch: int, inflight: int,
                group_of: Optional[Callable] = None) -> StagePlan:
    """One pp stage's figures; `group_of` (optim=muon: the parametrization's) says which parameters Muon steps."""
    from plait.offload.config import keep_count
    from plait.parallel.pipeline.partition import rank_chunk_plans
    from plait.parallel.column_overlap import overlap_wanted
    from plait.parallel.pipeline.schedule import placement, splits_backward, stage_ranks
    from plait.parallel.plans import param_specs
    from plait.train.build import shape_chunks

    model_cfg, parallel, train = cfg.model, cfg.parallel, cfg.train
    tp, dp, pp, vpp, m = layout.tp, layout.dp, layout.pp, parallel.vpp, parallel.microbatches
    grid = stand_in_grid(layout, layout.rank_of(pp=pp_rank))
    sp = bool(parallel.sequence_parallel and tp > 1)
    style = placement(_schedule_name(parallel))
    overlap, _ = overlap_wanted(parallel.tp_overlap, tp, splits_backward(parallel), float8_gemms(train.precision))
    regather = overlap and sp  # column-parallel layers keep their input's sequence shard and gather it in backward
    chunks = rank_chunk_plans(pp_rank, model_cfg.n_layers, pp, vpp, style)
    params, full_params, vocab_local, block, matrices, partial = 0, 0, 0, 0, 0, 0
    for model in shape_chunks(model_cfg, grid, vpp, sequence_parallel=sp, pp_rank=pp_rank, placement=style):
        params += sum(p.numel() for p in model.parameters())
        block = max([block] + [sum(p.numel() for p in layer.parameters()) for layer in model.layers.values()])
        specs = param_specs(model)
        copies = model.tied_copies()  # a tied head's copy of the embedding: held here, counted once in the model
        if group_of is not None:  # the trainer's own rule (a tied copy is grouped as its source)
            matrices += sum(p.numel() for name, p in model.named_parameters()
                            if group_of(copies.get(name, name), p).get("muon"))
        full_params += sum(p.numel() * (tp if specs[name].is_sharded else 1) * (layout.ep if specs[name].expert else 1)
                           for name, p in model.named_parameters() if name not in copies)  # (ep: E/ep experts here)
        # replicated weights each tp rank sees part of (norms under SP, MLA's down projections, routers): their
        # fp32 grads are summed over tp once a step
        partial += sum(p.numel() for name, p in model.named_parameters() if specs[name].tp_partial_grad)
        vocab_local = model.vocab // tp
    layers = sum(len(chunk.layers) for chunk in chunks)
    has_head = any(chunk.has_head for chunk in chunks)
    has_embedding = any(chunk.has_embedding for chunk in chunks)
    cp = layout.cp
    tokens = micro_batch * train.seq_len // cp  # this cp rank's share of each sequence
    size = _element_size(train.precision)
    block_saved = block_activation_elements(model_cfg, tokens, tp, sp, regather) * size \
        + moe_extra_bytes(model_cfg, tokens, tp, size, micro_batch)
    untied_regather = regather and not model_cfg.tie_embeddings  # a tied head's input passes a mapping
    head = head_activation_elements(model_cfg, tokens, tp, sp, vocab_local, int(train.loss_chunks),
                                    untied_regather) * size if has_head else 0
    per_chunk_layers = max(1, layers // len(chunks))
    # multi-token prediction (the head's stage): per depth a block, a pass through the head, and three hidden states
    # its norms and projection keep (measured)
    depths = int(model_cfg.mtp_layers) if has_head else 0
    depth_saved = block_saved + head + 3 * tokens * model_cfg.dim * size // (tp if sp else 1)
    # in flight: `inflight` (micro-batch, chunk) forwards whose backward has not run yet
    activations = inflight * (per_chunk_layers * block_saved + depths * depth_saved) + head
    keep = keep_count(cfg.offload.keep_last)  # auto is decided at run time from the link: planned as 1
    resident_blocks = min(layers, (1 if keep is None else keep) + cfg.offload.prefetch)
    activations_offload = min(activations, resident_blocks * block_saved + head + inflight * depths * depth_saved)
    # fp32 state: AdamW's two moments, Lion's one; Muon's one momentum for its matrices, AdamW's for the rest
    optimizer_bytes = {"adamw": 8 * params, "lion": 4 * params, "muon": 4 * matrices + 8 * (params - matrices)}
    hidden_bytes = tokens * model_cfg.dim * size
    # tp: per block per micro-batch 4 all-reduces of [b, s, d] (2 forward, 2 backward; under SP the same bytes as
    # all-gathers + reduce-scatters; latent attention's: `tp_elements`), the embedding's forward all-reduce, the
    # head's backward all-reduce, and the cross-entropy's three [b, s] all-reduces; re-gathering the
    # column-parallel inputs in backward adds an all-gather (half an all-reduce) for each of them
    block_moved, column_inputs = tp_elements(model_cfg)
    blocks = layers + depths
    tp_ops = blocks * block_moved / model_cfg.dim + int(has_embedding) + int(has_head) + 2 * depths  # a depth: its
    # block, its embedding lookup and its pass through the head
    if regather:
        tp_ops += blocks * 0.5 * column_inputs / model_cfg.dim + 0.5 * int(has_head and untied_regather)
    cross_entropy = _ring(3 * tokens * 4, tp, 2) * (1 + depths) if has_head else 0  # per pass through the head
    tp_bytes = m * (_ring(hidden_bytes, tp, 2) * tp_ops + cross_entropy) + _ring(partial * 4, tp, 2)
    dp_bytes = _ring(params * 4, dp * cp, 2)  # fp32 grads over dp x cp (ZeRO-1: reduce-scatter + all-gather, same)
    cp_bytes = m * (layers + depths) * context_bytes(model_cfg, tokens, tp, cp, parallel.cp_mode, size)
    ep_bytes = m * (layers + depths) * expert_exchange_bytes(model_cfg, tokens, layout.ep, size)
    boundary = hidden_bytes / (tp if sp else 1)
    ranks = stage_ranks(pp, vpp, style)  # a hop between two stages of one rank (the V's turn) sends nothing
    sends = sum(int(c.stage < pp * vpp - 1 and ranks[c.stage + 1] != pp_rank) + int(c.stage > 0 and ranks[c.stage - 1] != pp_rank)
                for c in chunks)
    pp_bytes = m * sends * boundary if pp > 1 else 0
    return StagePlan(pp_rank, layers, params, full_params, params * 4, params * 4, optimizer_bytes[cfg.optim.name],
                     int(activations), int(activations_offload), inflight, int(tp_bytes), int(dp_bytes),
                     int(pp_bytes), int(cp_bytes), int(ep_bytes), shards=dp * cp, block_weights=block * 4,
                     gather_size=size, microbatches=m)


def _schedule_figures(parallel, pp: int) -> Tuple[float, List[int]]:
    """(bubble fraction, in-flight chunk forwards per pp rank) from the schedule simulator."""
    from plait.parallel.pipeline.schedule import build_schedule, compute_order
    from plait.parallel.pipeline.simulate import peak_live_microbatches, simulate

    if pp == 1:
        return 0.0, [1]
    actions = build_schedule(parallel.schedule, pp, parallel.vpp, parallel.microbatches)
    order = compute_order(_schedule_name(parallel), pp, parallel.vpp, parallel.microbatches)
    return simulate(actions).bubble_fraction, [peak_live_microbatches(rank) for rank in order]


def _schedule_name(parallel) -> str:
    from plait.parallel.pipeline.schedule import schedule_name

    return schedule_name(parallel.schedule, parallel.vpp)


def plan(cfg: Any, world_size: int) -> Plan:
    """Every pp stage's figures for `world_size` ranks (validates the config for it first)."""
    from plait.train.config import micro_batch_size, validate
    from plait.train.parametrization import build_parametrization

    validate(cfg, world_size)
    parallel = cfg.parallel
    layout = Layout.infer(world_size, parallel.tp, parallel.pp, parallel.dp, parallel.cp, parallel.ep)
    micro_batch = micro_batch_size(cfg, layout.dp)
    bubble, inflight = _schedule_figures(parallel, layout.pp)
    if layout.pp == 1:
        inflight = [1]  # forward_backward frees each micro-batch's activations before the next
    group_of = build_parametrization(cfg.model, cfg.optim).group_of if cfg.optim.name == "muon" else None
    stages = [_stage_plan(cfg, layout, r, micro_batch, inflight[r], group_of) for r in range(layout.pp)]
    total = sum(s.full_params for s in stages)
    return Plan(layout, micro_batch, parallel.microbatches, parallel.vpp, _schedule_name(parallel), bubble,
                stages, total)


def _gib(nbytes: float) -> str:
    return f"{nbytes / GiB:.2f}"


def format_plan(result: Plan, cfg) -> str:
    layout, zero = result.layout, int(cfg.parallel.zero)
    lines = [
        f"plan: model {cfg.model.name} ({result.total_params / 1e9:.3f}B parameters with vocab padding), "
        f"{layout.describe()}",
        f"      micro-batch {result.micro_batch} x seq {cfg.train.seq_len}, {result.microbatches} micro-batches, "
        f"schedule {result.schedule if layout.pp > 1 else 'none'} (vpp {result.vpp}), "
        f"bubble {result.bubble:.1%} of ideal step time, precision {cfg.train.precision}, optimizer {cfg.optim.name}, "
        f"parallel.zero={zero}",
        f"per rank (GiB; every tp/dp rank of a stage is alike; weights, grads and optim at parallel.zero={zero}):",
        f"{'stage':>5} {'layers':>6} {'params':>12} {'weights':>8} {'grads':>8} {'optim':>8} "
        f"{'act':>8} {'act off':>8} {'inflight':>8} {'total':>8} {'+off':>8} {'tp sent':>9} {'dp sent':>9} "
        f"{'pp sent':>9} {'cp sent':>9} {'ep sent':>9}",
    ]
    for s in result.stages:
        weights, grads, optimizer = s.held(zero)
        lines.append(
            f"{s.pp_rank:>5} {s.layers:>6} {s.params:>12,} {_gib(weights):>8} {_gib(grads):>8} "
            f"{_gib(optimizer):>8} {_gib(s.activations):>8} "
            f"{_gib(s.activations_offload):>8} {s.inflight:>8} {_gib(s.total(zero, False)):>8} "
            f"{_gib(s.total(zero, True)):>8} {_gib(s.tp_bytes):>9} {_gib(s.dp_sent(zero)):>9} {_gib(s.pp_bytes):>9} "
            f"{_gib(s.cp_bytes):>9} {_gib(s.ep_bytes):>9}")
    lines.append("(sent: GiB each rank sends per step; act off / +off: with activation offload, "
                 "offload.keep_last + offload.prefetch blocks stay resident)")
    lines.append("by parallel.zero (GiB per rank, weights + grads + optim; dp sent per step):")
    lines.append(f"{'stage':>5} " + " ".join(f"{f'zero={z}':>9} {'dp sent':>9}" for z in range(4)))
    for s in result.stages:
        lines.append(f"{s.pp_rank:>5} " + " ".join(f"{_gib(sum(s.held(z))):>9} {_gib(s.dp_sent(z)):>9}"
                                                    for z in range(4)))
    return "\n".join(lines)


def world_size_for(cfg) -> int:
    """launch.world_size, else launch.nodes x launch.procs_per_node."""
    return int(cfg.launch.world_size or cfg.launch.nodes * cfg.launch.procs_per_node)


def dry_run(cfg) -> dict:
    """`plait-train ... train.dry_run=true`: print the plan for this launch's world size and stop.

    Under torchrun or Slurm the launched world size is used; alone, launch.world_size (or
    nodes x procs_per_node). Only rank 0 prints. A bad setting exits with one line (status 2).
    """
    from plait.launch.env import detect
    from plait.parallel.pipeline.schedule import ScheduleError
    from plait.train.cli import USER_ERRORS, fail

    env = detect()
    world_size = env.world_size if env.distributed else world_size_for(cfg)
    try:
        result = plan(cfg, world_size)
    except USER_ERRORS + (ScheduleError,) as error:
        fail(str(error))
    if env.rank == 0:
        print(format_plan(result, cfg), flush=True)
    return {"params": float(sum(s.params for s in result.stages)), "bubble": result.bubble}


def main(argv: Optional[List[str]] = None) -> int:
    """`plait plan <overrides>`: print the plan for launch.world_size (or nodes x procs_per_node)."""
    from plait.parallel.pipeline.schedule import ScheduleError
    from plait.train.cli import USER_ERRORS, compose

    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = compose(argv, "plait plan")  # a bad override: one line, exit 2
    try:
        print(format_plan(plan(cfg, world_size_for(cfg)), cfg))
    except USER_ERRORS + (ScheduleError,) as error:
        print(f"plait plan: error: {error}", file=sys.stderr)
        return 2
    return 0
