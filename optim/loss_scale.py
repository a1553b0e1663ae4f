"""Loss scaling for fp16 training: the scale the loss's grad is multiplied by, and how it moves.

Under `train.precision=fp16` the forward runs in fp16 autocast, and so does its backward:
an activation grad below fp16's smallest subnormal (6e-8) becomes zero. Multiplying the
loss's grad by a large scale S lifts those grads into range; the weight grads (fp32, the
master copy) are divided by S before clipping and the update. Too large an S overflows
some grad to inf or nan: that step is skipped (no update, on every rank) and S shrinks.

The dynamic rule is Megatron's and DeepSpeed's: S starts at `initial` (2^16, torch's and
DeepSpeed's default); an overflow skips the step and, from the `hysteresis`-th overflow
since the last growth on, halves S (never below `minimum`); `window` steps in a row
without one double it and forgive the overflows seen. A static scale
(`train.loss_scale=S`) never moves, but an overflow still skips its step.

Whether a step overflowed comes from the global grad norm (`plait.parallel.global_grad_norm`),
which is summed over every tensor-, pipeline- and (sharded) data-parallel rank: a single
inf anywhere makes it inf on all of them, so every rank skips the same steps without a
collective of its own. torch's `GradScaler` checks only the grads its process holds (its
optimizer's), so under tp x pp one rank would step while another skipped.
"""

from dataclasses import dataclass, field
from typing import Dict


@dataclass
class LossScaler:
    """The current scale and the counters the dynamic rule keeps (all of them go into a checkpoint)."""

    scale: float = 2.0 ** 16
    dynamic: bool = True
    window: int = 1000  # steps without an overflow before the scale doubles
    hysteresis: int = 2  # the overflow (since the last growth) from which each one halves the scale
    minimum: float = 1.0
    good_steps: int = 0  # steps since the last overflow or growth
    skipped: int = 0  # steps skipped since the run started
    overflows_left: int = field(init=False)  # overflows until the scale halves: from hysteresis, reset at growth

    def __post_init__(self):
        self.overflows_left = self.hysteresis

    @classmethod
    def from_config(cls, train) -> "LossScaler":
        """From `train.loss_scale` (null: dynamic) and the `train.loss_scale_*` settings."""
        static = train.loss_scale is not None
        return cls(scale=float(train.loss_scale if static else train.loss_scale_initial), dynamic=not static,
                   window=int(train.loss_scale_window), hysteresis=int(train.loss_scale_hysteresis),
                   minimum=float(train.loss_scale_min))

    def update(self, overflow: bool) -> None:
        """After a step: count a skip on overflow; move the scale by the dynamic rule."""
        if overflow:
            self.skipped += 1
        if not self.dynamic:
            return
        if overflow:
            self.good_steps = 0
            self.overflows_left -= 1
            if self.overflows_left <= 0:  # and stays there until the next growth: each overflow halves
                self.scale = max(self.scale / 2.0, self.minimum)
            return
        self.good_steps += 1
        if self.good_steps == self.window:
            self.scale *= 2.0
            self.good_steps = 0
            self.overflows_left = self.hysteresis

    def state_dict(self) -> Dict[str, float]:
        """What moves from step to step (the settings come from the config)."""
        return {"scale": self.scale, "good_steps": self.good_steps, "overflows_left": self.overflows_left,
                "skipped": self.skipped}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
        self.overflows_left = int(state["overflows_left"])
        self.skipped = int(state["skipped"])
