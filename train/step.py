"""Forward and backward over the micro-batches of one step, without a pipeline.

The loss of each micro-batch is scaled by 1/m before backward, so the accumulated
gradient is the gradient of the step's mean loss (never rescaled after the fact).
Returns the step's mean loss on this rank (detached).
"""

import contextlib
from typing import Callable, Optional

import torch

from plait.common.precision import half_dtype
from plait.train.model import Transformer


def autocast(device: torch.device, precision: str):
    """bf16 or fp16 autocast for the forward when asked; the weights stay fp32 either way."""
    half = half_dtype(precision)
    if half is not None:
        return torch.autocast(device_type=device.type, dtype=half)
    return contextlib.nullcontext()


def forward_backward(model: Transformer, batch: torch.Tensor, precision: str = "fp32",
                     before_last_backward: Optional[Callable[[], None]] = None,
                     loss_scale: float = 1.0) -> torch.Tensor:
    """Run every micro-batch of `batch` [m, b, s+1] forward and backward; returns the mean loss.

    `before_last_backward` is called before the last micro-batch's backward (the data-
    parallel reducer uses it to start overlapping gradient reduction only then). The grads
    come out multiplied by `loss_scale` (fp16's, `plait.optim.LossScaler`; the loss does not).
    """
    micro = batch.shape[0]
    total = torch.zeros((), device=batch.device)
    for index in range(micro):
        inputs, targets = batch[index, :, :-1], batch[index, :, 1:]
        with autocast(batch.device, precision):
            logits = model(inputs)
        loss = model.loss(logits, targets) / micro
        if index == micro - 1 and before_last_backward is not None:
            before_last_backward()
        (loss * loss_scale if loss_scale != 1.0 else loss).backward()
        total += loss.detach()
    return total
