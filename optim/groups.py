"""Parameter groups: which weights decay, and each group's learning-rate multiplier.

A group carries `lr_mult` (and `wd_mult`), and any other key `group_of` gives (Muon's `muon`);
the schedule sets `lr = schedule(step) * lr_mult`, so per-group multipliers (muP's
lr/width_mult) survive every schedule step.
"""

from typing import Callable, Dict, List, Optional

from torch import nn

GroupKey = Callable[[str, nn.Parameter], Dict]


def standard_group(name: str, param: nn.Parameter) -> Dict:
    """Matrices decay; norm gains and biases do not. Every multiplier is 1."""
    decays = param.ndim >= 2
    return {"group": "decay" if decays else "no_decay", "lr_mult": 1.0, "wd_mult": 1.0 if decays else 0.0}


def param_groups(named_params: Dict[str, nn.Parameter], weight_decay: float,
                 group_of: Optional[GroupKey] = None) -> List[Dict]:
    """Optimizer param groups from `group_of(name, param)`; each group lists its names."""
    group_of = group_of or standard_group
    groups: Dict[str, Dict] = {}
    for name, param in named_params.items():
        if not param.requires_grad:
            continue
        info = group_of(name, param)
        group = groups.setdefault(info["group"], {
            "params": [], "names": [], "lr_mult": info["lr_mult"],
            "weight_decay": weight_decay * info["wd_mult"], "group_name": info["group"],
            **{key: value for key, value in info.items() if key not in ("group", "lr_mult", "wd_mult")}})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())
