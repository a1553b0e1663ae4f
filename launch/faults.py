"""Fault injection for restart tests: one environment variable, read in one place.

`PLAIT_FAULT_AT_STEP=k` makes rank `PLAIT_FAULT_RANK` (default 0) exit with status 1 once
k steps are done (before it trains step k + 1), in the first torchrun round only (TORCHELASTIC_RESTART_COUNT 0),
as a crashed worker would: the other ranks are left waiting in a collective until torchrun
tears the round down and restarts it (`launch.max_restarts`). With `PLAIT_FAULT_STALL_S=s` the
rank instead stops for s seconds there, as a stuck one would (`parallel.train_timeout_s`).
"""

import logging
import os
import time
from typing import Mapping, Optional

log = logging.getLogger("plait")


def fault_step(rank: int, environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The step at which this rank should crash in this round, or None."""
    env = os.environ if environ is None else environ
    if not env.get("PLAIT_FAULT_AT_STEP") or int(env.get("TORCHELASTIC_RESTART_COUNT", 0)) != 0:
        return None
    if rank != int(env.get("PLAIT_FAULT_RANK", 0)):
        return None
    return int(env["PLAIT_FAULT_AT_STEP"])


def crash(step: int, rank: int) -> None:
    """Exit at once (no cleanup, like a crash), as PLAIT_FAULT_AT_STEP asked; or stall, with PLAIT_FAULT_STALL_S."""
    stall = os.environ.get("PLAIT_FAULT_STALL_S")
    if stall:
        log.error("PLAIT_FAULT_AT_STEP=%d: rank %d stalls %s s on purpose", step, rank, stall)
        time.sleep(float(stall))
        return
    log.error("PLAIT_FAULT_AT_STEP=%d: rank %d crashes on purpose", step, rank)
    logging.shutdown()
    os._exit(1)
