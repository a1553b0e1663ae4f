"""The `launch` config group: where and how many processes run."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class LaunchConfig:
    """`name` selects local torchrun, a multi-node torchrun command, or a Slurm job.

    `world_size` is for `plait plan` and `train.dry_run`: a world size without a cluster
    (default: nodes x procs_per_node).
    """

    name: str = "local"  # local | torchrun | slurm
    nodes: int = 1
    procs_per_node: int = 1
    dry_run: bool = False  # print the command / sbatch script instead of running / submitting
    world_size: Optional[int] = None
    # torchrun (c10d rendezvous)
    rdzv_endpoint: Optional[str] = None  # HOST:PORT of the first node (launch=torchrun, nodes > 1)
    rdzv_id: Optional[str] = None  # default: derived from the overrides (same on every node)
    rdzv_port: Optional[int] = None  # slurm: default 20000 + job id % 20000
    rdzv_host: Optional[str] = None  # slurm: default the first node's address inside the job
    max_restarts: int = 0
    join_timeout_s: int = 600
    connect_timeout_s: int = 30  # how long a node waits for the rendezvous endpoint to answer
    torchrun: Optional[str] = None  # the torchrun command; default: this python -m torch.distributed.run
    # slurm
    job_name: str = "plait"
    partition: Optional[str] = None
    account: Optional[str] = None
    time: str = "01:00:00"
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    output_dir: str = "outputs/slurm"  # the sbatch scripts and the job logs (%x-%j.out)
    signal_s: int = 120  # warning signal (USR1) this many seconds before the time limit
    requeue: bool = True
    extra_sbatch: List[str] = field(default_factory=list)  # more "#SBATCH" lines, e.g. "--qos=high"
