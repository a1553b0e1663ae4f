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
INTERRUPT_EXIT_CODE = 130  # the shell's status for a process ended by Ctrl-C (128 + SIGINT)


class Preempted(SystemExit):
    """Raised by a training loop after a preemption signal: the step finished and the checkpoint is written.

    A SystemExit whose code is the requeue status, so an uncaught one ends the process with
    that status (no traceback); a custom loop can catch it. `path` is the checkpoint written.
    """

    def __init__(self, step: int, path: Optional[object] = None):
        super().__init__(REQUEUE_EXIT_CODE)
        self.step, self.path = step, path


class Interrupted(SystemExit):
    """Raised by a training loop after Ctrl-C: the step finished (and the checkpoint is written when
    checkpoints are on). A SystemExit with the shell's Ctrl-C status, 130; `path` is the checkpoint."""

    def __init__(self, step: int, path: Optional[object] = None):
        super().__init__(INTERRUPT_EXIT_CODE)
        self.step, self.path = step, path


class PreemptionFlag:
    """Catches the preemption signals and Ctrl-C; `decision(grid)` is the agreed decision of all ranks.

    SIGTERM and SIGUSR1 mean preemption (checkpoint, then exit with the requeue status);
    SIGINT (Ctrl-C) means stop (checkpoint if checkpoints are on, exit 130). The first Ctrl-C
    only raises the flag; the default handler is back at once, so a second one stops now.
    Install it once per process (the main thread only: Python runs signal handlers there);
    `restore()` puts the previous handlers back.
    """

    def __init__(self, signals: Iterable[int] = PREEMPTION_SIGNALS + (signal.SIGINT,), install: bool = True):
        self.received: Optional[int] = None
        self.time_up = False  # `train.max_minutes` has passed on this rank
        self._previous: Dict[int, object] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))
            if self.received is None:
                self.received = signum
            log.warning("Ctrl-C: finishing this step, then checkpoint (if on) and stop; Ctrl-C again stops now")
            return
        self.received = signum  # a preemption outranks Ctrl-C: the job is requeued
        log.warning("received %s: finishing this step, then checkpoint and requeue", signal.Signals(signum).name)

    def set(self, signum: int = signal.SIGTERM) -> None:
        """Raise the flag by hand (tests, or a custom loop's own stop condition)."""
        self.received = signum

    @property
    def local(self) -> bool:
        """Whether this rank was signalled (no communication)."""
        return self.received is not None

    def out_of_time(self) -> None:
        """This rank's clock says the run's time is up (`train.max_minutes`): stop at this step, checkpointed."""
        self.time_up = True

    def decision(self, grid) -> Optional[str]:
        """"requeue" when any rank was preempted, else "time" when any rank's time is up, else "interrupt" when
        any got Ctrl-C, else None: the same answer on every rank (one all-reduce, max, over the world; every
        rank calls it at the same step, so ranks whose clocks differ by a step still stop together)."""
        level = 3 if self.received not in (None, signal.SIGINT) else 2 if self.time_up else \
            1 if self.received == signal.SIGINT else 0
        if grid.world_size > 1 and dist.is_initialized():
            flag = torch.tensor([float(level)], device=grid.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            level = int(flag.item())
        return {0: None, 1: "interrupt", 2: "time", 3: "requeue"}[level]

    def should_stop(self, grid) -> bool:
        """True on every rank when any rank was signalled (collective, like `decision`)."""
        return self.decision(grid) is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
