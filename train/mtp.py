"""Multi-token prediction (DeepSeek-V3, section 2.2; Megatron-LM's `--mtp-num-layers`): a training signal, off at
inference but for drafting tokens in speculative decoding (train/speculative.py).

With `model.mtp_layers=D` the decoder grows D small modules after its last layer, run in sequence. Module k (1..D)
takes the hidden state h of the one before it (the last layer's output for k = 1) and the embedding of the token k
places ahead, and predicts the token k + 1 places ahead:

    h'_i = proj([hnorm(h_i); enorm(Emb(t_{i+k}))])      proj: 2 dim -> dim, one matrix
    h_i  = block(h')                                      one more decoder block (attention and MLP)
    loss_k = cross-entropy(head(norm(h_i)), t_{i+k+1})   over the positions that have that token

The embedding and the head are the model's own (shared, as in DeepSeek-V3), so the predictions' gradients reach
them too. The loss added to training is `model.mtp_weight` / D x the sum of the D losses (DeepSeek-V3's lambda:
0.3, then 0.1; Megatron's default 0.1).

How the loss reaches backward: the MTP losses are computed in the forward (which has the document mask and the
tokens ahead) and kept until the model's `loss` runs, right after; `loss` returns the main loss with them hung on
it (`LossBeside`): its value is the main loss's, and in backward the MTP losses get the main loss's own grad times
the weight (1 / micro-batches, fp16's loss scale and all). So `forward` still returns the logits, the loss the
trainer logs and evaluates is next-token cross-entropy alone, and the MTP losses are kept apart (`take_losses`)
for the `mtp_loss` metric, as Megatron logs `mtp_1 loss` beside `lm loss`. Hung on the loss, not on the last
layer's output, the MTP graph sits beside the main one: a zero-bubble schedule's split backward finds no path from
the head's input back into it.

Under a pipeline the depths run on the last stage, which holds a copy of the embedding (`mtp.embed`, kept equal to
it as a tied head is: `plait.parallel.tied`).

What it reads: `future` [b, D + 1, s], row j the token j + 1 places ahead of each position (row 0: the next-token
targets), -1 past the end of the sequence (`future_tokens`). It is cut from the whole sequence before context
parallelism splits it, so a rank's share of the sequence sees the tokens that live on another rank. Module k embeds
row k - 1 and predicts row k. The last k positions of each sequence have no token k + 1 ahead: their loss is not
counted. Under context parallelism those positions sit on some ranks and not others, so each rank divides its sum
by its share of the whole count, (s - k) / cp per sequence (`sequence_shares` = cp, set by the parallel plan): the
mean over the cp ranks is then the mean over the sequence, as at cp = 1.
"""

import functools
from typing import Callable, Optional, Tuple

import torch
from torch import nn

from plait.train.attention_mask import AttentionMask
from plait.train.chunked_loss import chunked_head_loss
from plait.train.config import ModelConfig

PAST_END = -1  # a `future` entry with no token: past the end of the sequence


def future_tokens(tokens: torch.Tensor, depths: int) -> torch.Tensor:
    """[..., s + 1] tokens -> [..., depths + 1, s]: row j holds, at position i, token i + j + 1 (PAST_END where the
    sequence has none). Row 0 is the next-token targets."""
    targets = tokens[..., 1:]
    rows = [targets]
    for shift in range(1, depths + 1):
        tail = targets.new_full((*targets.shape[:-1], shift), PAST_END)
        rows.append(torch.cat([targets[..., shift:], tail], dim=-1))
    return torch.stack(rows, dim=-2)


def counted_sum(loss_fn: Callable, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy summed over the positions that have a target, over all the positions (`loss_fn(logits,
    targets, weights=)`: the mean of each token's loss times its weight, here 1 or 0). Slices of equal size
    average to the whole's. Shapes stay fixed: nothing waits on the device, nothing recompiles."""
    counted = targets != PAST_END
    return loss_fn(logits, targets.clamp(min=0), weights=counted.to(torch.float32))


class LossBeside(torch.autograd.Function):
    """Forward: the main loss, as it is (what is logged). Backward: the main loss's grad passes through, and `extra`
    gets it times `weight`: the gradient of main + weight x extra, whatever scale the loss's grad carries."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, extra: torch.Tensor, weight: float):
        ctx.weight = weight
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad * ctx.weight, None


class MTPLayer(nn.Module):
    """One depth: the two norms, the projection of their concatenation, a decoder block and the norm before the head."""

    def __init__(self, cfg: ModelConfig, block: nn.Module, norm: Callable[[], nn.Module], linear: Callable,
                 device=None):
        super().__init__()
        self.hnorm, self.enorm = norm(), norm()
        self.proj = linear(2 * cfg.dim, cfg.dim, device=device)
        self.block = block
        self.norm = norm()

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: Optional[AttentionMask]) -> Tuple[torch.Tensor, torch.Tensor]:
        """(the depth's hidden state, which the next depth reads; its norm, which the head reads): both in one
        forward, so that ZeRO-3, which gathers this depth's weights for its forward, gathers the norm's too."""
        joined = torch.cat([self.hnorm(hidden), self.enorm(embedded)], dim=-1)
        state = self.block(self.proj(joined), cos, sin, mask)
        return state, self.norm(state)


class MultiTokenPrediction(nn.Module):
    """The D depths (`layers`, global names `mtp.layers.{k-1}.*`), their weight, and the sums the metric reads."""

    def __init__(self, layers, weight: float, embed: Optional[nn.Module] = None):
        """`embed`: on a last pipeline stage, a copy of the model's embedding (`Transformer.tied_copies`)."""
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.embed = embed
        self.weight = float(weight)
        self.sequence_shares = 1  # cp: how many ranks share each sequence (the plan sets it)
        self.totals = torch.zeros(2)  # (sum of the forwards' mean MTP losses, forwards) since `take_losses`
        self.pending: Optional[torch.Tensor] = None  # the last forward's mean MTP loss, until `beside` takes it

    def forward(self, hidden: torch.Tensor, future: torch.Tensor, embed: Callable, head: Callable, loss_fn: Callable,
                cos: torch.Tensor, sin: torch.Tensor, mask: Optional[AttentionMask], loss_chunks: int) -> None:
        """The mean MTP loss from `hidden` (the last layer's output), kept for `beside`. `embed(ids)` and `head(x)`
        are the model's (its embedding with the embedding multiplier, its head with the logits multiplier);
        `loss_fn` its mean cross-entropy."""
        total, state = hidden.new_zeros((), dtype=torch.float32), hidden
        for depth, layer in enumerate(self.layers, start=1):
            state, normed = layer(state, embed(future[:, depth - 1].clamp(min=0)), cos, sin, mask)
            total = total + self._depth_loss(normed, future[:, depth], depth, head, loss_fn, loss_chunks)
        mean = total / len(self.layers)
        self.totals = self.totals.to(mean.device) + torch.stack([mean.detach(), mean.new_ones(())])
        self.pending = mean

    def beside(self, loss: torch.Tensor) -> torch.Tensor:
        """`loss` (the main one, of the forward just run), carrying the MTP losses' gradient if that forward
        computed them."""
        pending, self.pending = self.pending, None
        return loss if pending is None else LossBeside.apply(loss, pending, self.weight)

    def _depth_loss(self, normed: torch.Tensor, targets: torch.Tensor, depth: int, head: Callable,
                    loss_fn: Callable, loss_chunks: int) -> torch.Tensor:
        """Mean cross-entropy over the positions with a token `depth` + 1 ahead, this rank's share of it."""
        summed = functools.partial(counted_sum, loss_fn)
        if loss_chunks:
            per_position = chunked_head_loss(head, summed, normed, targets, loss_chunks)
        else:
            per_position = summed(head(normed), targets)
        length = targets.shape[-1] * self.sequence_shares
        share = (length - depth) / length  # of the positions, those counted (over the whole sequence)
        return per_position / share


def take_losses(module: MultiTokenPrediction) -> torch.Tensor:
    """(sum of the mean MTP losses, forwards) since the last call; restart at 0."""
    totals = module.totals.clone()
    module.totals = torch.zeros_like(module.totals)
    return totals
