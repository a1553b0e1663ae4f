"""Setting an optimizer's state through its own `load_state_dict`, so each value lands where that
optimizer would have put it (fused AdamW keeps `step` on the parameter's device, foreach AdamW on the
CPU; moments follow their parameter). The optimizer layer's name-keyed checkpoints and ZeRO-1's
shards both load through here."""

from typing import Dict, Mapping

import torch


@torch.no_grad()
def load_param_state(optimizer: torch.optim.Optimizer, state: Mapping[torch.Tensor, Dict[str, torch.Tensor]]) -> None:
    """Set the state of the given parameters (keys are the optimizer's own param tensors).

    Builds the optimizer's `state_dict` form (state by parameter index, the current groups)
    and hands it to `optimizer.load_state_dict`. Values are copied first: loading never
    aliases checkpoint memory. Parameters not in `state` keep no state (as before their first step).
    """
    index_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            index_of.setdefault(param, len(index_of))
    by_index = {index_of[param]: {key: value.detach().clone() for key, value in entry.items()}
                for param, entry in state.items()}
    groups, start = [], 0
    for group in optimizer.param_groups:
        groups.append({**{k: v for k, v in group.items() if k != "params"},
                       "params": list(range(start, start + len(group["params"])))})
        start += len(group["params"])
    optimizer.load_state_dict({"state": by_index, "param_groups": groups})


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of `optimizer`'s state tensors (step counters excluded)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
