"""The `offload` config group: where saved activations go during forward."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class OffloadConfig:
    """`backend=none` keeps every saved activation resident (plain PyTorch)."""

    backend: str = "none"  # none | auto | host | file | aio | gds
    path: Optional[str] = None
    policy: str = "offload"  # keep | offload | recompute
    keep_last: int = 1
    min_bytes: int = 65536
    device_filter: str = "cuda"  # cuda | all
    prefetch: int = 2
