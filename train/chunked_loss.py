"""The head and the loss a chunk of tokens at a time, each chunk recomputed in backward (`train.loss_chunks`).

The logits of a micro-batch, [b, s, vocab] (vocab/tp under tensor parallelism), and the softmax
the cross-entropy keeps for its backward are the largest activations of a model with a large
vocabulary: at b 8, s 2048 and 128k tokens, 8.6 GB in fp32 each. Here the last stage hands the
final norm's output to the loss instead, which runs head + cross-entropy over `chunks` slices of
the sequence under `torch.utils.checkpoint`: the forward keeps only each slice's loss, the
backward recomputes one slice's logits at a time. Peak memory for them drops by the chunk
count, at the price of running the head's matmul a second time.

Slices are cut from the tokens this rank holds at the head's input: under sequence parallelism
that is 1/tp of the sequence, which the head's input mapping gathers, so a slice of the gathered
output holds slice c of every tp rank's share; its targets are picked to match. Each slice has
as many tokens, so the mean of the slices' mean losses is the micro-batch's mean loss.
"""

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _slice_loss(head: Callable, loss_fn: Callable, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return loss_fn(head(hidden), targets)


def chunked_head_loss(head: Callable, loss_fn: Callable, hidden: torch.Tensor, targets: torch.Tensor,
                      chunks: int) -> torch.Tensor:
    """Mean loss of `head(hidden)` against `targets`, `chunks` slices of the sequence at a time.

    `hidden` [b, s_local, d] is what this rank holds at the head's input; `targets` [b, s_local x k]
    where the head's input mapping gathers k shares of the sequence (k = tp under sequence
    parallelism, else 1). `chunks` divides s_local.
    """
    local = hidden.shape[1]
    shares, size = targets.shape[1] // local, local // chunks
    offsets = torch.arange(shares, device=targets.device)[:, None] * local
    total = hidden.new_zeros((), dtype=torch.float32)
    for chunk in range(chunks):
        columns = (offsets + chunk * size + torch.arange(size, device=targets.device)).flatten()
        piece = hidden[:, chunk * size:(chunk + 1) * size]
        total = total + checkpoint(_slice_loss, head, loss_fn, piece, targets.index_select(1, columns),
                                   use_reentrant=False)
    return total / chunks
