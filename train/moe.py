"""A mixture-of-experts MLP (Mixtral's, as Megatron-core runs it dropless): a router picks k of E SwiGLU experts
for each token, and the token's output is their outputs weighted by the router's renormalized top-k softmax.

Dispatch moves tokens, not weights: each (token, choice) pair is sorted by expert, the experts run one after
another on their own rows (an expert chosen by no token runs on zero rows, so every expert's weights have a grad
every step and the data-parallel buckets fill), and the rows are gathered back to token order, weighted and summed
over each token's k choices. No token is dropped and no capacity is set. Backward keeps, per choice, its row,
the expert's own activations, its output and its weight, and three int64 indices (`plait plan` counts them).

Load balancing: the Switch Transformer's auxiliary loss, E x sum_e f_e P_e over the micro-batch's tokens
(f_e: the share of the T x k choices that went to expert e; P_e: the router's mean probability of e), which is 1
when the load is even and at most E/k. It is not added to the loss the step reports: its gradient joins backward
at the layer's output (`AuxLossGrad`, as Megatron's MoEAuxLossAutoScaler does), so a pipeline carries no extra
tensor between stages. Its weight there is `aux_loss x aux_share x aux_grad_scale`; the trainer sets
`aux_grad_scale` to the main loss's own backward scale (1/micro-batches, times fp16's loss scale) before each step.

Seams a parallel plan sets (`plait.parallel.plans.ExpertRegion`): `enter` and `exit` (what the block's input
and output pass through: under tensor parallelism the experts' linears are column- and row-parallel without
communication of their own, so the block gathers its input once and reduces the weighted sum once), `aux_share`
(1/tp: every tp rank computes the same router output, so each adds its share of the auxiliary gradient), and
`run_experts` (under expert parallelism this rank holds some of the experts, `experts` keyed by global id, and the
rows travel to theirs: `plait.parallel.experts.ExpertExchange`).
"""

from typing import Callable, Sequence

import torch
from torch import nn

from plait.parallel.experts import inverse, run_local
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


def load_balancing_loss(probs: torch.Tensor, counts: torch.Tensor, top_k: int) -> torch.Tensor:
    """E x sum_e f_e P_e (f_e = counts_e / (T k)): probs [T, E] (fp32), counts [E] (choices per expert); 1 under an
    even load, at most E/k (each f_e is at most 1/k)."""
    tokens, experts = probs.shape
    share = counts.to(probs.dtype) / (tokens * top_k)
    return experts * (share * probs.mean(dim=0)).sum()


class MoE(nn.Module):
    """Top-k routed experts: `router` a linear dim -> E without bias, `experts` E dense MLPs (the model builds both)."""

    def __init__(self, cfg: ModelConfig, router: nn.Module, experts: Sequence[nn.Module]):
        super().__init__()
        self.top_k, self.aux_loss = int(cfg.moe_top_k), float(cfg.moe_aux_loss)
        self.n_experts = len(experts)
        self.router = router
        self.experts = nn.ModuleDict({str(e): expert for e, expert in enumerate(experts)})  # keyed by global id
        self.enter: Callable = identity
        self.exit: Callable = identity
        self.run_experts: Callable = run_local  # every expert here: each on its own rows
        self.aux_share = 1.0
        self.aux_grad_scale = 1.0
        self.balance = torch.zeros(2)  # (sum of the balancing loss, forwards) since `take_balance`: a metric

    def route(self, flat: torch.Tensor):
        """(probs [T, E] fp32, weights [T, k] fp32 summing to 1, chosen [T, k] expert ids)."""
        probs = self.router(flat).float().softmax(dim=-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        return probs, weights / weights.sum(dim=-1, keepdim=True), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.enter(x)
        flat = x.reshape(-1, x.shape[-1])
        probs, weights, chosen = self.route(flat)
        counts = torch.bincount(chosen.reshape(-1), minlength=self.n_experts)
        order = chosen.reshape(-1).argsort(stable=True)  # the (token, choice) pairs, grouped by expert
        outputs = self.run_experts(list(self.experts.values()), flat[order // self.top_k], counts)
        per_choice = outputs[inverse(order)].view(flat.shape[0], self.top_k, -1)  # a gather: keeps only its index
        out = (per_choice * weights.unsqueeze(-1).to(per_choice.dtype)).sum(dim=1)
        if self.training:
            aux = load_balancing_loss(probs, counts, self.top_k)
            self.balance = self.balance.to(aux.device) + torch.stack([aux.detach(), aux.new_ones(())])
            if self.aux_loss:
                out = AuxLossGrad.apply(out, aux, self.aux_loss * self.aux_share * self.aux_grad_scale)
        return self.exit(out.view(x.shape[:-1] + out.shape[-1:]))


def take_balance(layers) -> torch.Tensor:
    """(sum of the balancing loss, forwards) over `layers` since the last call, and start again from zero."""
    total = sum(layer.balance.to(torch.float32) for layer in layers)
    for layer in layers:
        layer.balance = torch.zeros_like(layer.balance)
    return total


def moe_layers(chunks) -> list:
    """Every `MoE` in `chunks` (a model or its pipeline chunks), for the trainer to set their `aux_grad_scale`."""
    return [module for chunk in chunks for module in chunk.modules() if isinstance(module, MoE)]
