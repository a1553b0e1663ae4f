"""`train.profile_steps=[first, last]`: a torch.profiler trace of those training steps, one per rank.

The profiler starts before step `first` (steps numbered as logged, from 1) and stops after step
`last`; each rank writes `<run_dir>/profile/rank-<rank>.json`, a Chrome trace (open it in
Perfetto or chrome://tracing), under a temporary name first, so a trace on disk is whole. The
step's phases are named regions in it (`plait.data`, `plait.forward_backward`,
`plait.grad_finish`, `plait.optimizer`: `Trainer.step`), and on CUDA the kernels sit beneath
them. Rank 0 logs the operators that took the most time in the window.
"""

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger("plait")


class StepProfiler:
    """Profiles steps `first`..`last` of a run; `before(step)` / `after(step)` bracket each step."""

    def __init__(self, first: int, last: int, directory: Path, rank: int, device: torch.device, top: int = 12):
        self.first, self.last, self.directory, self.rank, self.top = first, last, Path(directory), rank, top
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profile: Optional[torch.profiler.profile] = None
        self.trace: Optional[Path] = None

    @classmethod
    def from_setting(cls, steps: Optional[Sequence[int]], directory: Path, rank: int,
                     device: torch.device) -> "StepProfiler":
        """The profiler `train.profile_steps` asks for, or one that does nothing (chosen once, for the loop)."""
        if not steps:
            return NoProfiler()
        return cls(int(steps[0]), int(steps[1]), directory, rank, device)

    def before(self, step: int) -> None:
        if step == self.first:
            self.profile = torch.profiler.profile(activities=self.activities)
            self.profile.start()

    def after(self, step: int) -> None:
        if step == self.last and self.profile is not None:
            self.finish()

    def finish(self) -> Optional[Path]:
        """Stop (if running) and write this rank's trace; returns its path (None if nothing was profiled)."""
        if self.profile is None:
            return self.trace
        profile, self.profile = self.profile, None
        profile.stop()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"rank-{self.rank:05d}.json"
        temporary = final.with_name(f".tmp-{final.name}.{os.getpid()}")
        profile.export_chrome_trace(str(temporary))
        os.replace(temporary, final)
        self.trace = final
        if self.rank == 0:
            sort = "self_cuda_time_total" if len(self.activities) > 1 else "self_cpu_time_total"
            log.info("profile of steps %d-%d (rank 0; every rank's trace in %s):\n%s", self.first, self.last,
                     self.directory, profile.key_averages().table(sort_by=sort, row_limit=self.top))
        return final


class NoProfiler(StepProfiler):
    """`train.profile_steps` unset: nothing happens."""

    def __init__(self):
        self.profile, self.trace = None, None

    def before(self, step: int) -> None:
        pass

    def after(self, step: int) -> None:
        pass
