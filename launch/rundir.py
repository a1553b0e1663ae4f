"""One run directory per run, not one per rank (and the same one after a restart).

Hydra's `${now:}` resolves in each process, so ranks started a second apart would each
make their own directory. The directory is resolved once, in this order:

1. `train.run_dir` when set (plait-launch and the sbatch script pass it explicitly);
2. the Slurm job id (`outputs/slurm-<id>`): the same on every rank and after a requeue;
3. torchrun's run id (`outputs/torchrun-<id>`): the same on every node and every restart round;
4. rank 0's timestamp, broadcast to all ranks.

Only rank 0 writes the config and the logs there.
"""

import datetime
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch.distributed as dist


def run_dir_from_ids(environ: Mapping[str, str], root: str = "outputs") -> Optional[Path]:
    """The directory named by the launcher's job or run id, or None when there is none."""
    if environ.get("SLURM_JOB_ID"):
        return Path(root) / f"slurm-{environ['SLURM_JOB_ID']}"
    run_id = environ.get("TORCHELASTIC_RUN_ID")
    if run_id and run_id != "none":
        return Path(root) / f"torchrun-{run_id}"
    return None


def resolve_run_dir(cfg: Any, grid: Any, environ: Optional[Mapping[str, str]] = None) -> Path:
    """The run directory every rank agrees on (see the module docstring for the order)."""
    if cfg.train.run_dir:
        return Path(cfg.train.run_dir)
    from_ids = run_dir_from_ids(os.environ if environ is None else environ)
    if from_ids is not None:
        return from_ids
    choice = [str(Path("outputs") / datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))]
    if grid.world_size > 1:
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0])
