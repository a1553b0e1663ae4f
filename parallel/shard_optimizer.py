"""The optimizer under ZeRO-2/3: any plait optimizer stepping this rank's rows of every parameter.

FSDP2 leaves each parameter a DTensor whose local rows (`to_local()`, a view of FSDP's
own storage) are this rank's shard, and each gradient a DTensor of the same rows. The
inner optimizer (AdamW, Lion: every kernel plait has) is built over those local views, so
it runs on plain tensors and its state exists for 1/dp of the model; an update of a view
is an update of the shard FSDP2 gathers next. Before each step the views take their
gradients' local rows. Groups (muP's learning-rate multipliers, weight decay) are the
whole model's, with each parameter swapped for its view; a rank whose shard of a small
parameter is empty (fewer rows than ranks) leaves it out.

Checkpoints see whole, name-keyed state (`named_state` gathers rows over the grad group,
`load_named_state` keeps this rank's rows), as the ZeRO-1 optimizer offers, so a zero=3
save loads at zero=0 and at another dp.
"""

from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from plait.common.optimizer_state import load_param_state
from plait.parallel.fsdp import ShardedGrads, local, place, row_offset, rows_of
from plait.parallel.sharded_state import ShardedState


class ShardOptimizer(ShardedState):
    """Steps this rank's rows of every FSDP2-sharded parameter with an inner optimizer."""

    def __init__(self, grads: ShardedGrads, make_optimizer: Callable[[List[Dict]], torch.optim.Optimizer],
                 groups: List[Dict]):
        self.grads = grads
        self.params: Dict[str, nn.Parameter] = dict(grads.named_params())
        with torch.no_grad():
            self.views: Dict[str, torch.Tensor] = {name: local(p) for name, p in self.params.items()}
        self.group, self.device = (grads.mesh.get_group() if grads.size > 1 else None), grads.grid.device
        pieces = {name: view for name, view in self.views.items() if view.numel() > 0}
        self._build(make_optimizer, groups, pieces,
                    {name: row_offset(self.params[name].shape, *place(self.params[name])) for name in pieces})

    def grad_entries(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, this rank's averaged gradient rows) for norms and clipping."""
        return self.grads.named_grads()

    def param_entries(self) -> List[Tuple[str, torch.Tensor]]:
        """(name, this rank's rows of the weights) for the weights' norm."""
        return list(self.views.items())

    @torch.no_grad()
    def step(self) -> None:
        for name, param in self.params.items():
            self.views[name].grad = None if param.grad is None else local(param.grad)
        self.optimizer.step()
        for view in self.views.values():
            view.grad = None

    # name-keyed state (checkpoints) --------------------------------------------------
    @torch.no_grad()
    def named_state(self, dest: Optional[Dict[str, int]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
        """{param name: {key: whole tensor}}: every rank's rows gathered (collective over the grad group) on every
        rank, or, with `dest` ({name: global rank}), each parameter's state on its rank only."""
        from torch.distributed.tensor import DTensor

        keys_of = self._keys_by_name()
        step = self._step_count()
        out: Dict[str, Dict[str, torch.Tensor]] = {}
        for name, param in self.params.items():
            view, entry = self.views[name], {}
            state = self.optimizer.state.get(view, {})
            for key in sorted(keys_of.get(name, set()) - {"step"}):
                rows = state[key] if key in state else torch.zeros_like(view)  # (an empty shard: no state)
                if dest is None:
                    entry[key] = DTensor.from_local(rows, param.device_mesh, param.placements, shape=param.shape,
                                                    stride=param.stride()).full_tensor()
                else:
                    entry[key] = self.grads.gather_to(param, rows, dest[name])
            if dest is not None and dest[name] != self.grads.grid.rank:
                continue
            if "step" in keys_of.get(name, ()):  # AdamW counts steps (the same on every rank); Lion, Muon do not
                entry["step"] = torch.tensor(step)
            if entry:
                out[name] = entry
        return out

    @torch.no_grad()
    def load_named_state(self, state: Dict[str, Dict[str, torch.Tensor]]) -> None:
        """Keep this rank's rows of whole, name-keyed state (placed as the inner optimizer places it)."""
        by_view = {}
        for name, view in self.views.items():
            if name in state and view.numel() > 0:
                by_view[view] = {key: value if key == "step" else rows_of(value, *place(self.params[name]))
                                 for key, value in state[name].items()}
        load_param_state(self.optimizer, by_view)
