"""plait.optim: AdamW, Lion and Muon, muP, parameter groups, LR schedules, gradient clipping, fp16 loss scaling.

Public names are listed in `__all__`; modules and names not listed are private and may
change. Construction takes explicit arguments (a config dataclass, a `Grid` or plain
values), never hidden globals. Names are imported lazily on first use.

Nothing here imports `plait.train`: Lion and the muP table work on any `nn.Module`.
"""

from typing import TYPE_CHECKING

from plait.common.exports import lazy_exports

_EXPORTS = {
    # config and builders
    "OptimConfig": "plait.optim.config",
    "build_optimizer": "plait.optim.builder",
    "make_optimizer": "plait.optim.builder",
    "param_groups": "plait.optim.groups",
    "standard_group": "plait.optim.groups",
    # Lion, Muon
    "Lion": "plait.optim.lion",
    "Muon": "plait.optim.muon",
    "WholeMatrices": "plait.optim.muon",
    "muon_group_of": "plait.optim.muon",
    "newton_schulz": "plait.optim.muon",
    # muP
    "MupRole": "plait.optim.mup",
    "MupError": "plait.optim.mup",
    "mup_table": "plait.optim.mup",
    "group_key": "plait.optim.mup",
    "ForwardScales": "plait.optim.mup",
    "forward_scales": "plait.optim.mup",
    # schedules, clipping, name-keyed state
    "lr_factor": "plait.optim.schedule",
    "apply_lr": "plait.optim.schedule",
    "clip_by_norm": "plait.optim.clip",
    "LossScaler": "plait.optim.loss_scale",
    "named_state": "plait.optim.state",
    "load_named_state": "plait.optim.state",
}

__all__ = list(_EXPORTS)

if TYPE_CHECKING:  # static tools see real imports; at run time they happen on first access
    from plait.optim.builder import build_optimizer, make_optimizer
    from plait.optim.clip import clip_by_norm
    from plait.optim.config import OptimConfig
    from plait.optim.groups import param_groups, standard_group
    from plait.optim.loss_scale import LossScaler
    from plait.optim.lion import Lion
    from plait.optim.muon import Muon, WholeMatrices, muon_group_of, newton_schulz
    from plait.optim.mup import ForwardScales, MupError, MupRole, forward_scales, group_key, mup_table
    from plait.optim.schedule import apply_lr, lr_factor
    from plait.optim.state import load_named_state, named_state


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
