"""A global batch that grows during the first samples of a run (Megatron's `--rampup-batch-size`).

`train.rampup_batch_size=[start, increment, samples]`: the first steps read `start` sequences,
and the batch grows by `increment` each time another `samples / n` sequences have been read
(n = (train.batch_size - start) / increment, the number of increments), until it reaches
`train.batch_size`. Megatron's rule, on the samples consumed before the step:

    batch(consumed) = min(start + floor(consumed / (samples / n)) * increment, batch_size)

The micro-batch keeps its size; a step reads more micro-batches as the batch grows. A step's
first sample is the number consumed before it, so the run reads the sample stream in order,
each position once, as a run without a ramp does. Everything is a function of the step:
`at(step)` walks a short table of levels (one row per batch size the ramp passes through),
so resuming needs no state beyond the step.
"""

import bisect
from typing import List, Sequence, Tuple


class BatchRamp:
    """(samples consumed before the step, global batch size of the step) for every step."""

    def __init__(self, start: int, increment: int, samples: int, final: int):
        self.start, self.increment, self.samples, self.final = start, increment, samples, final
        self.increments = (final - start) // increment
        self.levels = self._levels()  # (first step, consumed before it, batch size), the last one the final size
        self.first_steps = [level[0] for level in self.levels]  # searched by `at`, every step

    @classmethod
    def from_setting(cls, setting: Sequence[int], final: int) -> "BatchRamp":
        start, increment, samples = (int(value) for value in setting)
        return cls(start, increment, samples, final)

    def batch_size(self, consumed: int) -> int:
        """Megatron's rule in integers: floor(consumed / (samples / n)) = floor(consumed x n / samples)."""
        steps = consumed * self.increments // self.samples
        return min(self.start + steps * self.increment, self.final)

    def _levels(self) -> List[Tuple[int, int, int]]:
        levels, step, consumed = [], 0, 0
        while True:
            batch = self.batch_size(consumed)
            levels.append((step, consumed, batch))
            if batch == self.final:
                return levels
            level = consumed * self.increments // self.samples
            threshold = -(-(level + 1) * self.samples // self.increments)  # first consumed count of the next level
            steps_here = -(-(threshold - consumed) // batch)
            step, consumed = step + steps_here, consumed + steps_here * batch

    def at(self, step: int) -> Tuple[int, int]:
        """(samples consumed before `step`, the global batch size of `step`)."""
        index = bisect.bisect_right(self.first_steps, step) - 1
        first, consumed, batch = self.levels[index]
        return consumed + (step - first) * batch, batch

    @property
    def ramp_steps(self) -> int:
        """The first step at the final batch size."""
        return self.levels[-1][0]

    def describe(self) -> str:
        sizes = [level[2] for level in self.levels]
        shown = sizes if len(sizes) <= 6 else sizes[:3] + ["..."] + sizes[-2:]
        return (f"batch size ramp {' -> '.join(map(str, shown))} over the first {self.ramp_steps} steps "
                f"({self.levels[-1][1]} samples)")
