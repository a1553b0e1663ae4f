"""What plait's sharded optimizers share: an inner optimizer over this rank's pieces of the parameters.

ZeRO-1 (`ZeroOptimizer`, pieces of flat buffers) and ZeRO-2/3 (`ShardOptimizer`, FSDP2's
local rows) both take the whole model's param groups as the optimizer layer makes them
(each with its `names` and hyper-parameters: learning-rate multiplier, weight decay), keep
each group's settings and swap its parameters for this rank's pieces, then build the inner
optimizer with the same builder plain training uses. Both expose `param_groups` (for LR
schedules), `state`, `zero_grad` (the reducer's job) and `state_bytes`.
"""

from typing import Callable, Dict, List, Optional, Set

import torch
import torch.distributed as dist

from plait.common.optimizer_state import state_bytes


class ShardedState:
    """Base of the sharded optimizers: set `grads` (the reducer), `group` (the grad group) and `device` (where
    its collectives' tensors live: NCCL takes CUDA tensors only), then `_build`."""

    grads: object
    group: Optional[dist.ProcessGroup]
    device: torch.device

    def _build(self, make_optimizer: Callable[[List[Dict]], torch.optim.Optimizer], groups: List[Dict],
               piece_of: Dict[str, torch.Tensor], offset_of: Dict[str, int]) -> None:
        """The inner optimizer over `piece_of[name]` for each name of each group (names without a piece left out);
        each group's `offsets` say where its pieces start in their flattened parameters (Muon puts them together)."""
        mine = []
        for group in groups:
            names = [n for n in group["names"] if n in piece_of]
            mine.append({**group, "names": names, "params": [piece_of[n] for n in names],
                         "offsets": [offset_of[n] for n in names]})
        self.optimizer = make_optimizer([g for g in mine if g["params"]] or [{**mine[0], "params": [], "names": []}])

    @property
    def param_groups(self) -> List[Dict]:
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Gradients live in the reducer (buffers, or FSDP2's shards); zeroing them is the reducer's job."""
        self.grads.zero_grad()

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors held by this rank (step counters excluded)."""
        return state_bytes(self.optimizer)

    def _keys_by_name(self) -> Dict[str, Set[str]]:
        """{parameter name: its state keys} as any rank's piece of it holds them, agreed over the grad group (a rank
        without a piece of a name cannot know them). AdamW: exp_avg, exp_avg_sq, step; Lion: exp_avg; Muon's
        matrices: momentum_buffer; nothing before the first step."""
        mine: Dict[str, Set[str]] = {}
        for group in self.optimizer.param_groups:
            for name, piece in zip(group["names"], group["params"]):
                mine.setdefault(name, set()).update(self.optimizer.state.get(piece, {}).keys())
        if self.group is None:
            return mine
        every: List = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(every, mine, group=self.group)
        agreed: Dict[str, Set[str]] = {}
        for rank_keys in every:
            for name, keys in rank_keys.items():
                agreed.setdefault(name, set()).update(keys)
        return agreed

    def _step_count(self) -> float:
        """The optimizer's step count, the same on every rank of the group (a rank with no state has none)."""
        steps = [float(s["step"]) for s in self.optimizer.state.values() if "step" in s]
        count = torch.tensor(max(steps) if steps else 0.0, device=self.device)
        if self.group is not None:
            dist.all_reduce(count, op=dist.ReduceOp.MAX, group=self.group)
        return float(count)
