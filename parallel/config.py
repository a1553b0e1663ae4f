"""The `parallel` config group: how the world is split into tp x pp x dp."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class ParallelConfig:
    """Degrees of parallelism and how each strand behaves.

    `dp` is inferred from the world size when left empty. `microbatches` is the
    number of micro-batches each data-parallel rank runs per step (gradient
    accumulation, and the pipeline's m).
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1  # context parallelism: each sequence split over cp ranks (long contexts)
    cp_mode: str = "ring"  # ring | ulysses: how attention crosses the cp ranks
    ep: int = 1  # expert parallelism: each mixture of experts' experts split over ep of the dp ranks (ep divides dp)
    vpp: int = 1
    dp: Optional[int] = None
    microbatches: int = 1
    sequence_parallel: bool = False
    tp_overlap: str = "auto"  # auto | true | false: column-parallel backwards overlap their tp collectives (auto: on
    # at tp > 1 except under a zero-bubble schedule, which splits each backward in two)
    schedule: str = "1f1b"  # gpipe | 1f1b (interleaved when vpp > 1) | zbh1 | zbv | dualpipev (zero-bubble)
    pp_transport: str = "auto"  # auto | shm | dist: pipeline messages through /dev/shm (gloo, one host) or the process group
    zero: int = 0  # 0: replicated optimizer state, 1: ZeRO-1 sharded state
    bucket_mb: float = 25.0  # gradient bucket size for data-parallel reduction
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = False  # ZeRO-1: each step's weight all-gathers overlap the next forward
    reduce_in_fp32: bool = True
    average_in_collective: bool = False
    backend: str = "auto"  # auto | nccl | gloo
    timeout_s: int = 600  # a collective fails after this long while the run starts (joining, loading, first step)
    train_timeout_s: Optional[int] = None  # ... and after this long from the second step on (None: timeout_s): a
    # stuck rank then ends the job this soon instead of holding every other rank (Megatron's
    # --distributed-timeout-minutes, torchtitan's comm.train_timeout_seconds)
