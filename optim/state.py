"""Optimizer state keyed by parameter name, the form checkpoints save and reshard.

`named_state` returns, for each local parameter (this rank's tp shard), its state
tensors (AdamW: exp_avg, exp_avg_sq; Lion: exp_avg) plus the step count, whatever the
optimizer's own layout is. The ZeRO-1 optimizer offers the same two functions as
methods (it gathers its dp shards), so checkpoints never depend on dp or ZeRO.

Loading goes through the optimizer's own `load_state_dict` (`plait.common.optimizer_state`), so each
state tensor lands on the device and in the dtype that optimizer itself would have made:
fused AdamW keeps `step` as an fp32 tensor on the parameter's device, foreach AdamW keeps
it on the CPU, moments follow their parameter. A hand-written placement missed that once
(fused AdamW on CUDA refused a CPU `step` after resume).
"""

from typing import Dict, Optional

import torch
from torch import nn

from plait.common.optimizer_state import load_param_state

NamedState = Dict[str, Dict[str, torch.Tensor]]


def named_state(optimizer: torch.optim.Optimizer, named_params: Dict[str, nn.Parameter],
                copy: bool = True, dest: Optional[Dict[str, int]] = None) -> NamedState:
    """{param name: {state key: tensor}} with scalar steps as 0-d tensors.

    `copy=False` hands out the optimizer's own tensors (a checkpoint snapshots them before the
    next step changes them); a ZeRO optimizer gathers its shards into new tensors either way
    (collective: every rank of the grad group calls it). `dest` ({name: global rank}): a ZeRO
    optimizer gathers each parameter's state whole only where it goes (other ranks may get
    fewer names; a replicated optimizer hands out every name, its own tensors, for free).
    """
    if hasattr(optimizer, "named_state"):
        return optimizer.named_state(dest)
    out: NamedState = {}
    for name, param in named_params.items():
        state = optimizer.state.get(param)
        if not state:
            continue
        out[name] = {key: ((value.detach().clone() if copy else value.detach()) if torch.is_tensor(value)
                           else torch.tensor(float(value))) for key, value in state.items()}
    return out


def load_named_state(optimizer: torch.optim.Optimizer, named_params: Dict[str, nn.Parameter],
                     state: NamedState) -> None:
    """Put `state` (as `named_state` returns it) back into `optimizer`, placed as the optimizer places it."""
    if hasattr(optimizer, "load_named_state"):
        optimizer.load_named_state(state)
        return
    load_param_state(optimizer, {param: state[name] for name, param in named_params.items() if name in state})
