"""Real text to byte-level tokens: the standard library by default, or the user's files.

Tokens are bytes (0-255) in a uint16 file; a document (file) ends with byte 0, which
text never contains. Files are split into train and validation by a hash of their path,
so the split is deterministic and the same on every rank and machine. The token files
are cached under a key of the file list, sizes and mtimes, written atomically.
"""

import hashlib
import os
import sysconfig
import zlib
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

EOS = 0
TOKENIZER_VERSION = "byte-v1"


class DataError(ValueError):
    """A corpus that cannot be used, explained in one sentence naming the path."""


def stdlib_files() -> List[Path]:
    """The standard library's .py sources (site-packages and dist-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*.py")
                  if not ({"site-packages", "dist-packages", "__pycache__"} & set(f.relative_to(root).parts)))


def _is_text(path: Path) -> bool:
    with open(path, "rb") as handle:
        return b"\x00" not in handle.read(4096)


def text_files(path: str) -> List[Path]:
    """A text file, or every text file under a directory (binary files skipped), sorted."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path={path} does not exist; point it at a text file or a directory of text.")
    candidates = [root] if root.is_file() else sorted(f for f in root.rglob("*") if f.is_file())
    files = [f for f in candidates if f.stat().st_size > 0 and _is_text(f)]
    if not files:
        raise DataError(f"data.path={path} holds no non-empty text files; give a directory with text in it.")
    return files


def cache_root(cache_dir: Optional[str]) -> Path:
    return Path(cache_dir or os.environ.get("PLAIT_CACHE") or Path.home() / ".cache" / "plait").expanduser()


def corpus_key(files: List[Path], val_fraction: float) -> str:
    digest = hashlib.sha256(f"{TOKENIZER_VERSION}:{val_fraction}".encode())
    for f in files:
        stat = f.stat()
        digest.update(f"{f}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def is_validation(path: Path, val_fraction: float) -> bool:
    return (zlib.crc32(str(path.name).encode() + str(path.parent.name).encode()) % 10000) < val_fraction * 10000


def _write_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(array.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def tokenize(files: List[Path]) -> np.ndarray:
    """Bytes of every file, each followed by EOS, as uint16."""
    parts = []
    for f in files:
        parts.append(np.frombuffer(f.read_bytes(), dtype=np.uint8))
        parts.append(np.array([EOS], dtype=np.uint8))
    return np.concatenate(parts).astype(np.uint16) if parts else np.zeros(0, np.uint16)


def prepare_corpus(path: Optional[str], cache_dir: Optional[str], val_fraction: float) -> Tuple[Path, Path]:
    """Token files (train, validation) for `path` (None: the standard library), built once and cached."""
    files = stdlib_files() if not path else text_files(path)
    if not files:
        raise DataError("the standard library corpus is empty; set data.path to a directory of text.")
    directory = cache_root(cache_dir) / corpus_key(files, val_fraction)
    train_path, val_path = directory / "train.bin", directory / "val.bin"
    if train_path.exists() and val_path.exists():
        return train_path, val_path
    directory.mkdir(parents=True, exist_ok=True)
    val_files = [f for f in files if is_validation(f, val_fraction)]
    train_files = [f for f in files if not is_validation(f, val_fraction)]
    if not val_files or not train_files:  # tiny corpora: hold out the tail of the token stream instead
        tokens = tokenize(files)
        cut = int(len(tokens) * (1 - val_fraction))
        train, val = tokens[:cut], tokens[cut:]
    else:
        train, val = tokenize(train_files), tokenize(val_files)
    _write_atomic(val_path, val)
    _write_atomic(train_path, train)
    return train_path, val_path
