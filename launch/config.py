"""The `launch` config group: where and how many processes run."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LaunchConfig:
    """`name` selects local torchrun, a printed multi-node torchrun, or Slurm."""

    name: str = "local"  # local | torchrun | slurm
    nodes: int = 1
    procs_per_node: int = 1
    dry_run: bool = False
    world_size: Optional[int] = None  # for `plait plan`: a world size without a cluster
    rdzv_endpoint: Optional[str] = None
    rdzv_id: Optional[str] = None
    max_restarts: int = 0
    join_timeout_s: int = 600
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    signal_s: int = 120
    extra_sbatch: List[str] = field(default_factory=list)
