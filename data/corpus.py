"""Text named in the config -> a prepared shard directory in the cache, built once, rank 0 first.

The default corpus is the Python standard library's own source (always present, site-packages
excluded), byte-level, uint16. Any text file or directory is prepared the same way, by the
same code as `plait data prepare`, into `<cache>/<key>/` where the key hashes the file list,
sizes, mtimes, tokenizer and split; the directory is renamed into place when complete, so a
half-written cache is never read.
"""

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import List, Optional, Tuple

from plait.data.errors import DataError  # noqa: F401  (re-exported: plait.train.cli imports it from here)
from plait.data.prepare import collect_files, prepare

TOKENIZER_VERSION = "shards-v1"


def stdlib_files() -> List[Path]:
    """The standard library's .py sources (site-packages and dist-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py")
                  if not ({"site-packages", "dist-packages", "__pycache__"} & set(f.relative_to(root).parts)))


def cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir or os.environ.get("PLAIT_CACHE") or Path.home() / ".cache" / "plait").expanduser()


def corpus_key(files: List[Path], val_fraction: float, tokenizer: str = "byte", vocab_size: int = 0) -> str:
    digest = hashlib.sha256(f"{TOKENIZER_VERSION}:{val_fraction}:{tokenizer}:{vocab_size}".encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def prepare_text(path: Optional[str], cache_dir: Optional[str], val_fraction: float, tokenizer: str = "byte",
                 vocab_size: int = 8192, workers: int = 1) -> Path:
    """The cached prepared directory for text at `path` (None: the standard library)."""
    files = stdlib_files() if not path else collect_files([path])
    if not files:
        raise DataError("the standard library corpus is empty; set data.path to a directory of text.")
    bpe_vocab = vocab_size if tokenizer == "bpe" else 0
    tokenizer_key = tokenizer if tokenizer in ("byte", "bpe") else str(Path(tokenizer).expanduser().resolve())
    directory = cache_root(cache_dir) / corpus_key(files, val_fraction, tokenizer_key, bpe_vocab)
    if not (directory / "meta.json").exists():
        prepare([], directory, tokenizer, vocab_size, val_fraction, workers, progress=False, files=files)
    return directory


def prepare_corpus(path: Optional[str], cache_dir: Optional[str], val_fraction: float) -> Tuple[Path, Path]:
    """Byte-level (train.bin, val.bin) of `path` (None: the standard library), cached; raw uint16 tokens."""
    directory = prepare_text(path, cache_dir, val_fraction)
    return directory / "train.bin", directory / "val.bin"
