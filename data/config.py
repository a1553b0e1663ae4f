"""The `data` config group: which text to train on and where its tokens are cached."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class DataConfig:
    """`path` empty means the Python standard library's own source (always present)."""

    name: str = "stdlib"
    path: Optional[str] = None
    cache_dir: Optional[str] = None  # default: $PLAIT_CACHE or ~/.cache/plait
    val_fraction: float = 0.02
    tokenizer: str = "byte"
