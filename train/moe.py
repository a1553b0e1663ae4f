"""A mixture-of-experts MLP (Mixtral's, as Megatron-core runs it dropless): a router picks k of E SwiGLU experts
for each token, and the token's output is their outputs weighted by the router's renormalized top-k softmax.

Dispatch moves tokens, not weights: each (token, choice) pair is sorted by expert, the experts run one after
another on their own rows (an expert chosen by no token runs on zero rows, so every expert's weights have a grad
every step and the data-parallel buckets fill), and the rows are gathered back to token order, weighted and summed
over each token's k choices. No token is dropped by default. Backward keeps, per choice, its row, the expert's
own activations, its output and its weight, and three int64 indices (`plait plan` counts them).

With `model.moe_capacity_factor=c` (Switch's, GShard's, Megatron's moe_expert_capacity_factor) each expert takes
at most ceil(c x T x k / E) of a micro-batch's T tokens' choices in training, the rest dropped: their weight is
zero, so the token keeps only its other choices (and the residual). Which it keeps is `model.moe_drop_policy`:
`probs`, the choices with the highest router weights, or `position`, the earliest tokens. Evaluation and
generation stay dropless, as the exported model (Mixtral's, Qwen's) runs.

DeepSeek-V3's router (not an export family): `model.moe_score_function=sigmoid` scores each expert with its own
sigmoid instead of a softmax over them (the balancing loss takes the scores normalized over the experts), and
`model.moe_topk_scaling_factor` multiplies the chosen weights (after renormalizing; DeepSeek-V3 used 2.5);
`model.moe_router_groups=G` with `model.moe_router_group_topk=M` lets each token route only within the M of G
expert groups whose best experts score highest (its node-limited routing: with the groups an ep rank's experts,
a token's rows go to at most M ranks); `model.moe_shared_gate=false` adds the shared expert's output ungated
(DeepSeek's shared experts: several of width f are one of width n f).

Options of the families plait exports: `model.moe_norm_topk=false` keeps the top-k probabilities as they are
(Qwen's `norm_topk_prob=false`) instead of renormalizing them to sum to 1 (Mixtral's); `model.moe_shared_ffn_dim`
adds a shared expert every token passes through, a SwiGLU of that width whose output is weighted by a sigmoid
gate (a linear dim -> 1) and added to the routed sum (Qwen2-MoE's `shared_expert` and `shared_expert_gate`).

Load balancing: the Switch Transformer's auxiliary loss, E x sum_e f_e P_e over the micro-batch's tokens
(f_e: the share of the T x k choices that went to expert e; P_e: the router's mean probability of e), which is 1
when the load is even and at most E/k. It is not added to the loss the step reports: its gradient joins backward
at the layer's output (`AuxLossGrad`, as Megatron's MoEAuxLossAutoScaler does), so a pipeline carries no extra
tensor between stages. Its weight there is `aux_loss x aux_share x aux_grad_scale`; the trainer sets
`aux_grad_scale` to the main loss's own backward scale (1/micro-batches, times fp16's loss scale) before each step.
`model.moe_aux_loss_type` (Megatron's moe_router_load_balancing_type) says over which tokens f and P are taken:
aux_loss, this rank's micro-batch; seq_aux_loss, each sequence on its own, the loss the mean over the sequences
(DeepSeek-V3's sequence-wise balance loss); global_aux_loss, f over the micro-batch of every rank of the grad
group (dp x cp, one all-reduce of E integers per block and micro-batch) and P over this rank's tokens, so the
grads' average over those ranks is the loss's over all their tokens (Qwen's global-batch balance, which leaves
each rank's batch free to specialize).
The router z-loss of ST-MoE (`model.moe_z_loss`: the mean over tokens of logsumexp(router logits)^2, which keeps
the logits small; Megatron's moe_z_loss_coeff) joins backward the same way.

Aux-loss-free balancing (`model.moe_bias_update_rate=r`, DeepSeek-V3's; Megatron's moe_router_enable_expert_bias):
each block keeps a bias per expert that is added to the router's probabilities when the top k are chosen, and only
then (the weights stay the router's own). After each update, `update_expert_bias` moves every bias r toward the
experts the step under-used: bias += r x sign(mean load - load), the loads (pairs the router asked of each expert,
over the step's micro-batches) summed over the ranks that saw other tokens, so every replica moves alike. The
biases are persistent buffers: checkpoints hold them (by the block's global name, `layers.i.mlp.expert_bias`).

Seams a parallel plan sets (`plait.parallel.plans.ExpertRegion`): `enter` and `exit` (what the block's input
and output pass through: under tensor parallelism the experts' linears are column- and row-parallel without
communication of their own, so the block gathers its input once and reduces the weighted sum once; so is the
shared expert, whose gate, like the router, weighs partial sums), `aux_share`
(1/tp: every tp rank computes the same router output, so each adds its share of the auxiliary gradient),
`balance_group` (the grad group, whose loads global_aux_loss counts), and
`run_experts` (under expert parallelism this rank holds some of the experts, `experts` keyed by global id, and the
rows travel to theirs: `plait.parallel.experts.ExpertExchange`).
"""

import math
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from plait.parallel.experts import run_local
from plait.train.config import ModelConfig


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


class AuxLossGrad(torch.autograd.Function):
    """Forward: the output, unchanged. Backward: the output's grad passes through, and `aux` gets grad `weight`
    (d total / d aux), so the auxiliary loss's gradient reaches the router without being part of the loss."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux: torch.Tensor, weight: float):
        ctx.weight = weight
        ctx.aux_meta = (aux.dtype, aux.device)
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.full((), ctx.weight, dtype=dtype, device=device), None


def softmax_over_experts(logits: torch.Tensor) -> torch.Tensor:
    return logits.softmax(dim=-1)


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """E x sum_e f_e P_e: probs [..., T, E] (fp32), counts [..., E] (choices per expert), f_e = counts_e over all the
    choices counted (T k, or every rank's under global_aux_loss), P_e the mean of probs over T; with leading
    dimensions (one per sequence) the mean of each one's loss. 1 under an even load, at most E/k."""
    share = counts.to(probs.dtype) / counts.sum(dim=-1, keepdim=True).to(probs.dtype)
    return probs.shape[-1] * (share * probs.mean(dim=-2)).sum(dim=-1).mean()


def capacity(factor: float, pairs: int, experts: int) -> int:
    """Pairs each expert may take: ceil(factor x pairs / experts), at least 1."""
    return max(1, math.ceil(factor * pairs / experts))


def within_capacity(expert_of: torch.Tensor, priority: torch.Tensor, counts: torch.Tensor, limit: int) -> torch.Tensor:
    """[N] bool: the pairs their experts keep, each expert its first `limit` in `priority` (a permutation of the N
    pairs, most entitled first); `counts` [E] pairs per expert."""
    queued = priority[expert_of[priority].argsort(stable=True)]  # grouped by expert, in priority within each
    starts = counts.cumsum(0) - counts
    place = torch.arange(queued.numel(), device=queued.device) - starts[expert_of[queued]]
    keep = torch.zeros_like(expert_of, dtype=torch.bool)
    keep[queued] = place < limit
    return keep


def rows_of_pairs(order: torch.Tensor, pairs: int) -> torch.Tensor:
    """Each (token, choice) pair's row in the experts' output, which holds the pairs `order` lists in that order; a
    dropped pair points at row 0, which its zero weight cancels (so this gather keeps only its index)."""
    rows = torch.zeros(pairs, dtype=order.dtype, device=order.device)
    rows[order] = torch.arange(order.numel(), device=order.device)
    return rows


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean over tokens of logsumexp(logits)^2 (logits [T, E], fp32)."""
    return logits.logsumexp(dim=-1).square().mean()


class MoE(nn.Module):
    """Top-k routed experts: `router` a linear dim -> E without bias, `experts` E dense MLPs; with `shared`, a dense
    MLP every token passes through, weighted by sigmoid(`shared_gate`), a linear dim -> 1, where there is one (the
    model builds them)."""

    def __init__(self, cfg: ModelConfig, router: nn.Module, experts: Sequence[nn.Module],
                 shared: Optional[nn.Module] = None, shared_gate: Optional[nn.Module] = None):
        super().__init__()
        self.top_k, self.norm_topk = int(cfg.moe_top_k), bool(cfg.moe_norm_topk)
        self.sigmoid = cfg.moe_score_function == "sigmoid"
        self.score = torch.sigmoid if self.sigmoid else softmax_over_experts  # chosen once
        self.topk_scale = float(cfg.moe_topk_scaling_factor)
        self.groups, self.group_topk = int(cfg.moe_router_groups), int(cfg.moe_router_group_topk)
        self.per_group = max(1, self.top_k // self.group_topk)  # a group's score: the sum of its best this many
        self.aux_loss, self.z_loss = float(cfg.moe_aux_loss), float(cfg.moe_z_loss)
        self.balance_of = getattr(self, f"_{cfg.moe_aux_loss_type}")  # the balancing loss's scope, chosen once
        self.balance_group = None  # global_aux_loss: the ranks whose loads count too (the plan sets dp x cp's)
        self.capacity_factor = None if cfg.moe_capacity_factor is None else float(cfg.moe_capacity_factor)
        self.drop_by_probs = cfg.moe_drop_policy == "probs"
        self.n_experts = len(experts)
        self.router = router
        self.experts = nn.ModuleDict({str(e): expert for e, expert in enumerate(experts)})  # keyed by global id
        self.shared, self.shared_gate = shared, shared_gate
        self.enter: Callable = identity
        self.exit: Callable = identity
        self.run_experts: Callable = run_local  # every expert here: each on its own rows
        self.aux_share = 1.0
        self.aux_grad_scale = 1.0
        self.balance = torch.zeros(4)  # sums of (balancing loss, z-loss, share dropped, forwards) since `take_balance`
        self.bias_update_rate = float(cfg.moe_bias_update_rate)
        # pairs the router asked of each expert in training since `step_loads` (the balance metric, the bias update)
        self.register_buffer("load", torch.zeros(self.n_experts, dtype=torch.int64), persistent=False)
        if self.bias_update_rate:  # aux-loss-free balancing: a routing bias per expert
            self.register_buffer("expert_bias", torch.zeros(self.n_experts))
        else:
            self.expert_bias = None

    def route(self, flat: torch.Tensor):
        """(logits [T, E] fp32, probs [T, E]: the router's scores (softmax, or each expert's sigmoid), weights
        [T, k]: the top-k scores, renormalized to sum to 1 under `norm_topk`, times the top-k scaling factor,
        chosen [T, k] expert ids: the top k of the scores, or of scores + expert bias when it has one)."""
        logits = self.router(flat).float()
        probs = self.score(logits)
        if self.expert_bias is None and self.groups == 1:
            weights, chosen = probs.topk(self.top_k, dim=-1)
        else:  # the bias (and the groups) pick the experts; the weights are the router's own
            choice = probs.detach() if self.expert_bias is None else probs.detach() + self.expert_bias
            chosen = self.within_top_groups(choice).topk(self.top_k, dim=-1).indices
            weights = probs.gather(-1, chosen)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.topk_scale != 1.0:
            weights = weights * self.topk_scale
        return logits, probs, weights, chosen

    def describe(self) -> str:
        """How this block routes, for the startup log: 'top-2, softmax, aux_loss, shared expert', and so on."""
        parts = [f"top-{self.top_k}", "sigmoid" if self.sigmoid else "softmax"]
        if self.topk_scale != 1.0:
            parts.append(f"weights x{self.topk_scale:g}")
        if self.groups > 1:
            parts.append(f"within {self.group_topk} of {self.groups} groups")
        if self.capacity_factor is not None:
            parts.append(f"capacity factor {self.capacity_factor:g}, drops by "
                         f"{'weight' if self.drop_by_probs else 'position'}")
        parts.append(self.balance_of.__name__.lstrip("_"))
        if self.expert_bias is not None:
            parts.append(f"routing bias rate {self.bias_update_rate:g}")
        if self.shared is not None:
            parts.append("shared expert" if self.shared_gate is not None else "ungated shared expert")
        return ", ".join(parts)

    def within_top_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """`choice` [T, E] with -inf outside each token's best `group_topk` groups, a group scored by the sum of
        its best top_k / group_topk experts (DeepSeek-V3's, Megatron's group-limited routing); unchanged with one
        group."""
        if self.groups == 1:
            return choice
        grouped = choice.view(choice.shape[0], self.groups, -1)
        best = grouped.topk(self.per_group, dim=-1).values.sum(dim=-1).topk(self.group_topk, dim=-1).indices
        keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, best, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)
        flat = x.reshape(-1, x.shape[-1])
        logits, probs, weights, chosen = self.route(flat)
        expert_of = chosen.reshape(-1)  # each (token, choice) pair's expert
        wanted = torch.bincount(expert_of, minlength=self.n_experts)  # what the router asked for: balancing counts
        if self.training:
            self.load += wanted  # (a recomputed block counts twice, on every micro-batch: no ratio changes)
        order, counts = expert_of.argsort(stable=True), wanted  # the (token, choice) pairs, grouped by expert
        if self.capacity_factor is not None and self.training:
            keep = within_capacity(expert_of, self._priority(weights), wanted, capacity(self.capacity_factor,
                                                                                     expert_of.numel(), wanted.numel()))
            order = order[keep[order]]  # the kept pairs, still grouped by expert
            counts = torch.bincount(expert_of[order], minlength=self.n_experts)
            weights = weights * keep.view_as(weights)  # a dropped pair adds nothing
        outputs = self.run_experts(list(self.experts.values()), flat[order // self.top_k], counts)
        per_choice = outputs[rows_of_pairs(order, expert_of.numel())].view(flat.shape[0], self.top_k, -1)
        out = (per_choice * weights.unsqueeze(-1).to(per_choice.dtype)).sum(dim=1)
        if self.shared is not None:
            shared = self.shared(flat)
            out = out + (torch.sigmoid(self.shared_gate(flat)) * shared if self.shared_gate is not None else shared)
        if self.training:  # (sigmoid scores are normalized over the experts for the balancing loss, as DeepSeek-V3's)
            shares = probs / probs.sum(dim=-1, keepdim=True) if self.sigmoid else probs
            balance = self.balance_of(shares, chosen, wanted, x.shape[0])
            out = self._auxiliary(out, logits, balance, 1.0 - order.numel() / expert_of.numel())
        return self.exit(out.view(x.shape[:-1] + out.shape[-1:]))

    def _priority(self, weights: torch.Tensor) -> torch.Tensor:
        """The (token, choice) pairs, most entitled to a place first: by router weight, or in token order."""
        if self.drop_by_probs:
            return weights.detach().reshape(-1).argsort(descending=True, stable=True)  # (no index kept)
        return torch.arange(weights.numel(), device=weights.device)

    def _aux_loss(self, probs: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor, sequences: int):
        """The balancing loss over this rank's micro-batch (Megatron's aux_loss)."""
        return load_balancing_loss(probs, counts)

    def _seq_aux_loss(self, probs: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor, sequences: int):
        """Each sequence's balancing loss, from its own loads and mean probabilities, averaged over the sequences
        (DeepSeek-V3's sequence-wise balance loss; Megatron's seq_aux_loss)."""
        experts = probs.shape[-1]
        slot = chosen.reshape(sequences, -1) + experts * torch.arange(sequences, device=chosen.device).unsqueeze(1)
        per_sequence = torch.bincount(slot.reshape(-1), minlength=sequences * experts).view(sequences, experts)
        return load_balancing_loss(probs.view(sequences, -1, experts), per_sequence)

    def _global_aux_loss(self, probs: torch.Tensor, chosen: torch.Tensor, counts: torch.Tensor, sequences: int):
        """The balancing loss with the loads of the micro-batch on every rank of `balance_group` (dp x cp: every
        replica's tokens) and this rank's mean probabilities: the grads' average over those ranks is the loss's
        over all their tokens (Megatron's global_aux_loss, Qwen's global-batch balance; one all-reduce of E
        integers per block and micro-batch)."""
        if self.balance_group is not None:
            counts = counts.clone()
            dist.all_reduce(counts, group=self.balance_group)
        return load_balancing_loss(probs, counts)

    def _auxiliary(self, out: torch.Tensor, logits: torch.Tensor, balance: torch.Tensor, dropped: float):
        """Record the balancing loss (and the z-loss when weighted) and the share of pairs dropped for the metrics;
        attach the losses' weighted sum's gradient to `out`."""
        z = router_z_loss(logits) if self.z_loss else balance.new_zeros(())
        self.balance = self.balance.to(balance.device) + torch.stack([balance.detach(), z.detach(),
                                                                      balance.new_tensor(dropped),
                                                                      balance.new_ones(())])
        terms = [coef * loss for coef, loss in ((self.aux_loss, balance), (self.z_loss, z)) if coef]
        if not terms:
            return out
        return AuxLossGrad.apply(out, sum(terms), self.aux_share * self.aux_grad_scale)


@torch.no_grad()
def step_loads(layers: Sequence[MoE], group=None) -> torch.Tensor:
    """[layers, E] float: the pairs the router asked of each expert since the last call, summed over `group` (the
    ranks that route other tokens through the same layers: dp x cp; None in one process); the counts start again
    from zero."""
    loads = torch.stack([layer.load for layer in layers]).float()
    if group is not None:
        dist.all_reduce(loads, group=group)
    for layer in layers:
        layer.load.zero_()
    return loads


@torch.no_grad()
def update_expert_bias(layers: Sequence[MoE], loads: torch.Tensor) -> None:
    """After an update: each layer's expert bias += rate x sign(mean load - load) (`loads` from `step_loads`)."""
    for layer, load in zip(layers, loads):
        layer.expert_bias += layer.bias_update_rate * torch.sign(load.mean() - load)


def max_violation(loads: torch.Tensor) -> torch.Tensor:
    """[layers]: each layer's busiest expert's load over the mean load, less 1 (DeepSeek's MaxVio; 0: even)."""
    mean = loads.mean(dim=-1)
    return loads.max(dim=-1).values / mean.clamp_min(1e-9) - 1.0


def expert_biases(chunks) -> dict:
    """{global name: routing bias} of every MoE in `chunks` that balances by bias (what checkpoints hold beside
    the weights)."""
    return {f"{name}.expert_bias": module.expert_bias for chunk in chunks for name, module in chunk.named_modules()
            if isinstance(module, MoE) and module.expert_bias is not None}


def take_balance(layers) -> torch.Tensor:
    """Sums of (balancing loss, z-loss, share dropped, forwards) over `layers` since the last call; restart at 0."""
    total = sum(layer.balance.to(torch.float32) for layer in layers)
    for layer in layers:
        layer.balance = torch.zeros_like(layer.balance)
    return total


def moe_layers(chunks) -> list:
    """Every `MoE` in `chunks` (a model or its pipeline chunks), for the trainer to set their `aux_grad_scale`."""
    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, MoE)]
