"""The `data` config group: which corpus (or blend) to train on, how text is tokenized, where shards are cached."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DataConfig:
    """`path` empty means the Python standard library's own source (always present).

    `path` may be text (a file, a directory, .jsonl), a directory made by `plait data prepare`,
    or Megatron-style `.bin/.idx` shards; `paths` with `weights` blends several of them.
    """

    name: str = "stdlib"
    path: Optional[str] = None
    paths: List[str] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)
    cache_dir: Optional[str] = None  # default: $PLAIT_CACHE or ~/.cache/plait
    val_fraction: float = 0.02
    tokenizer: str = "byte"  # byte | bpe (trained on the corpus) | path to a tokenizer.json
    vocab_size: int = 8192  # vocabulary of a BPE trained on the corpus
    workers: int = 1  # processes that tokenize text when it is first prepared
