"""Expert parallelism: each mixture of experts' E experts split over ep ranks, tokens sent to their experts.

ep is a factor of dp (`Layout.expert_groups`): ep consecutive dp ranks hold E/ep experts each (ep rank r the
experts r E/ep ... (r + 1) E/ep - 1, under their global names, so checkpoints and init do not see ep) and route
their own tokens. `ExpertExchange` is the block's `run_experts`: the (token, choice) rows, already sorted by
expert, go to the rank of their expert in one all-to-all (a first, small all-to-all tells every rank how many
rows of each of its experts come from each peer), run through the local experts grouped by expert, and come back
in a second all-to-all, in the order they left. Backward runs the same two exchanges reversed (`AllToAll`).

Each expert's grad then holds the contributions of every token routed to it from all ep peers; the ranks holding
the same expert (`expert_grad` group: dp / ep of them, times cp) average it, divided by the whole dp x cp as the
other weights are (`plait.parallel.data_parallel`), and its norm is summed over ep (`grad_norm`).
"""

from typing import List, Sequence

import torch
import torch.distributed as dist
from torch import nn


class AllToAll(torch.autograd.Function):
    """Forward: rows to every rank of `group`, `send[r]` of them (in order) to rank r, `receive[r]` from it.
    Backward: the grads go back the same way reversed."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, send: List[int], receive: List[int], group):
        ctx.send, ctx.receive, ctx.group = send, receive, group
        return exchange(rows, send, receive, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return exchange(grad, ctx.receive, ctx.send, ctx.group), None, None, None


def exchange(rows: torch.Tensor, send: List[int], receive: List[int], group) -> torch.Tensor:
    out = rows.new_empty((sum(receive),) + tuple(rows.shape[1:]))
    dist.all_to_all_single(out, rows.contiguous(), receive, send, group=group)
    return out


def inverse(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order` (rows[order][inverse(order)] == rows)."""
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return back


def run_local(experts: Sequence[nn.Module], rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each expert on its rows (`rows` grouped by expert, `counts` rows each, in `experts`' order), outputs in the
    same order (an expert with no rows runs on none, so its weights still get a zero grad)."""
    return torch.cat([expert(part) for expert, part in zip(experts, rows.split(counts.tolist()))])


class ExpertExchange:
    """`run_experts(experts, rows, counts)` under expert parallelism: `experts` this rank's E/ep, `rows` this rank's
    (token, choice) rows sorted by global expert, `counts` [E] rows per global expert; returns each row's expert
    output, in the same order."""

    def __init__(self, group, ep: int):
        self.group, self.ep = group, ep

    def __call__(self, experts: Sequence[nn.Module], rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        local = len(experts)
        sent = counts.view(self.ep, local)  # [destination rank, its expert]
        received = torch.empty_like(sent)  # [source rank, my expert]
        dist.all_to_all_single(received, sent.contiguous(), group=self.group)
        send, receive = sent.sum(dim=1).tolist(), received.sum(dim=1).tolist()
        arrived = AllToAll.apply(rows, send, receive, self.group)  # by source rank, then by my expert
        segment = torch.repeat_interleave(torch.arange(self.ep * local, device=rows.device), received.reshape(-1))
        order = ((segment % local) * self.ep + segment // local).argsort(stable=True)  # by my expert, then source
        outputs = run_local(experts, arrived[order], received.sum(dim=0))
        return AllToAll.apply(outputs[inverse(order)], receive, send, self.group)


def local_experts(ep_rank: int, ep: int, experts: int) -> range:
    """The global ids of the experts ep rank `ep_rank` holds."""
    share = experts // ep
    return range(ep_rank * share, (ep_rank + 1) * share)
