"""Preemption: SIGTERM / SIGUSR1 set a flag; all ranks agree to stop at a step boundary.

Slurm sends the batch script a warning signal before the time limit (`--signal=B:USR1@T`)
and the script forwards SIGTERM to the job step; torchrun's agent forwards SIGTERM to its
workers. A handler that checkpoints from inside the signal would race the step in flight
and the other ranks, so the handler only sets a flag. At the next step boundary every rank
calls `should_stop(grid)`: an all-reduce (max) of the flag, so if any rank was signalled,
all ranks finish the same step, write the checkpoint and exit with `REQUEUE_EXIT_CODE`,
which the sbatch script turns into `scontrol requeue`.
"""

import logging
import signal
import threading
from typing import Dict, Iterable, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("plait")

# The exit status that asks the launcher to requeue the job: EX_TEMPFAIL from sysexits.h,
# "temporary failure, try again later". The sbatch script requeues on it.
REQUEUE_EXIT_CODE = 75

PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Raised by a training loop after a preemption signal: the step finished and the checkpoint is written.

    A SystemExit whose code is the requeue status, so an uncaught one ends the process with
    that status (no traceback); a custom loop can catch it. `path` is the checkpoint written.
    """

    def __init__(self, step: int, path: Optional[object] = None):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step, self.path = step, path


class PreemptionFlag:
    """Catches the preemption signals; `should_stop(grid)` is the agreed decision of all ranks.

    Install it once per process (the main thread only: Python runs signal handlers there);
    `restore()` puts the previous handlers back.
    """

    def __init__(self, signals: Iterable[int] = PREEMPTION_SIGNALS, install: bool = True):
        self.received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum
        log.warning("received %s: finishing this step, then checkpoint and requeue", signal.Signals(signum).name)

    def set(self, signum: int = signal.SIGTERM) -> None:
        """Raise the flag by hand (tests, or a custom loop's own stop condition)."""
        self.received = signum

    @property
    def local(self) -> bool:
        """Whether this rank was signalled (no communication)."""
        return self.received is not None

    def should_stop(self, grid) -> bool:
        """True on every rank when any rank was signalled: one all-reduce (max) over the world.

        Every rank must call it at the same step boundary (it is collective).
        """
        if grid.world_size == 1 or not dist.is_initialized():
            return self.local
        flag = torch.tensor([1.0 if self.local else 0.0], device=grid.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
