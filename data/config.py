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
    eos_id: Optional[int] = None  # the end-of-document token (default: what the data's preparation recorded)


TOKENIZERS = ("byte", "bpe")  # or a path to a tokenizer.json


def validate_data(cfg: DataConfig) -> None:
    """The `data` group's rules (DataError, one sentence naming the setting)."""
    from pathlib import Path

    from plait.common.checks import number
    from plait.data.errors import DataError

    number(DataError, "data.val_fraction", cfg.val_fraction, low=0, high=1, high_open=True)
    number(DataError, "data.vocab_size", cfg.vocab_size, low=2, integer=True)
    number(DataError, "data.workers", cfg.workers, low=1, integer=True)
    if cfg.eos_id is not None:
        number(DataError, "data.eos_id", cfg.eos_id, low=0, integer=True)
    if cfg.tokenizer not in TOKENIZERS and not Path(cfg.tokenizer).expanduser().is_file():
        raise DataError(f"data.tokenizer={cfg.tokenizer} is not one of {', '.join(TOKENIZERS)} nor a tokenizer.json "
                        f"file; pick byte, bpe or the path of a tokenizer.json.")
    for index, weight in enumerate(cfg.weights):
        number(DataError, f"data.weights[{index}]", weight, low=0)
    if cfg.weights and len(cfg.weights) != len(cfg.paths):
        raise DataError(f"data.weights has {len(cfg.weights)} entries but data.paths has {len(cfg.paths)}; "
                        f"give one weight per path.")
    for key, path in [("data.path", cfg.path)] + [(f"data.paths[{i}]", p) for i, p in enumerate(cfg.paths)]:
        if path and not Path(path).expanduser().exists() and not Path(f"{path}.idx").exists():
            raise DataError(f"{key}={path} does not exist; point it at a text file, a directory or prepared shards.")
