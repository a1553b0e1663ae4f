"""Token shards on disk: `<prefix>.bin` holds raw tokens, `<prefix>.idx` their document boundaries.

The `.idx` is Megatron's indexed-dataset format, so shards prepared by Megatron-LM (or
GPT-NeoX, Nemo) load as they are, and shards written here load there:

    magic  b"MMIDIDX\\x00\\x00"      9 bytes
    version 1                      uint64
    dtype code                     uint8  (uint8 1, int8 2, int16 3, int32 4, int64 5, uint16 8; uint32 9 is plait's)
    sequence count S               uint64
    document count D               uint64
    sequence lengths               int32[S]    tokens per sequence (one sequence = one document here)
    sequence byte pointers         int64[S]    where each sequence starts in the .bin
    document indices               int64[D]    sequence index where each document starts, then S

Opening a shard maps both files and checks their sizes against the header (O(1), no scan),
so a truncated or mismatched file is reported by name before any training step.
"""

import json
import os
import struct
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from plait.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
DTYPE_CODES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16, 9: np.uint32}
CODE_OF = {np.dtype(v): k for k, v in DTYPE_CODES.items()}


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab <= 65,536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def check_vocab_fits(vocab_size: int, dtype: np.dtype, where: Union[str, Path]) -> None:
    """A vocabulary whose largest id the token dtype cannot hold is an error naming `where`."""
    limit = int(np.iinfo(dtype).max) + 1
    if vocab_size > limit:
        raise DataError(f"{where}: vocabulary of {vocab_size} tokens does not fit {np.dtype(dtype).name} "
                        f"(at most {limit}); write the shards as uint32 (plait data prepare --dtype uint32).")


def prefix_of(path: Union[str, Path]) -> Path:
    """`x.bin`, `x.idx` or `x` -> `x`."""
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


class TokenShard:
    """A memory-mapped `.bin` + `.idx` pair: `tokens` (1-D, the file's dtype) and `doc_starts` (token offsets)."""

    def __init__(self, prefix: Union[str, Path]):
        self.prefix = prefix_of(prefix)
        self.idx_path, self.bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise DataError(f"{path} does not exist; a token shard needs both {self.prefix}.bin and .idx "
                                f"(make them with `plait data prepare`).")
        self.dtype, self.lengths, self.pointers, self.documents = self._read_index()
        self.tokens = self._map_tokens()

    def _read_index(self):
        size = self.idx_path.stat().st_size
        if size < HEADER.size:
            raise DataError(f"{self.idx_path} is truncated ({size} bytes, shorter than the {HEADER.size}-byte header).")
        with open(self.idx_path, "rb") as handle:
            magic, version, code, sequences, documents = HEADER.unpack(handle.read(HEADER.size))
        if magic != MAGIC or version != 1:
            raise DataError(f"{self.idx_path} is not a Megatron/plait index (bad magic or version {version}); "
                            f"re-run `plait data prepare`.")
        if code not in DTYPE_CODES:
            raise DataError(f"{self.idx_path} names token dtype code {code}, which plait does not read "
                            f"(known: {sorted(DTYPE_CODES)}).")
        expected = HEADER.size + sequences * (4 + 8) + documents * 8
        if size != expected:
            raise DataError(f"{self.idx_path} holds {size} bytes but its header ({sequences} sequences, {documents} "
                            f"documents) needs {expected}: the file is truncated or corrupted; prepare it again.")
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        lengths = index[HEADER.size:HEADER.size + 4 * sequences].view(np.int32)
        pointers = index[HEADER.size + 4 * sequences:HEADER.size + 12 * sequences].view(np.int64)
        docs = index[HEADER.size + 12 * sequences:].view(np.int64)
        return np.dtype(DTYPE_CODES[code]), lengths, pointers, docs

    def _map_tokens(self) -> np.ndarray:
        size = self.bin_path.stat().st_size
        item = self.dtype.itemsize
        expected = int(self.pointers[-1]) + int(self.lengths[-1]) * item if len(self.lengths) else 0
        if size != expected:
            multiple = size and expected and (size % expected == 0 or expected % size == 0)
            hint = " (a dtype mismatch? the sizes differ by a whole factor)" if multiple else ""
            raise DataError(f"{self.bin_path} holds {size} bytes but {self.idx_path.name} describes {expected} bytes "
                            f"of {self.dtype.name} tokens{hint}; the shard is truncated or corrupted, prepare it again.")
        if size == 0:
            raise DataError(f"{self.bin_path} holds no tokens; give it some text.")
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def max_token(self, cache: Optional[Path] = None) -> int:
        """The largest token id in the shard: one pass over the tokens, remembered in `cache` (a JSON file keyed
        by the .bin's path, size and mtime), so opening the same shard again costs nothing."""
        stat = self.bin_path.stat()
        key = f"{self.bin_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        known = _read_json(cache) if cache is not None else {}
        if key in known:
            return int(known[key])
        largest = 0
        for start in range(0, len(self.tokens), 1 << 26):  # 64M tokens at a time: bounded memory
            largest = max(largest, int(self.tokens[start:start + (1 << 26)].max()))
        if cache is not None:
            _write_json(cache, {**known, key: largest})
        return largest

    def doc_starts(self) -> np.ndarray:
        """Token offset where each document starts (D entries, Megatron's document index -> tokens)."""
        return self.pointers[self.documents[:-1]] // self.dtype.itemsize


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    """Best effort (a cache): temp name, then rename; a read-only cache just stays unwritten."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass


class ShardWriter:
    """Appends documents to `<prefix>.bin` under a temporary name; `close()` writes the `.idx` and renames both."""

    def __init__(self, prefix: Union[str, Path], dtype: np.dtype):
        self.prefix, self.dtype = Path(prefix), np.dtype(dtype)
        if self.dtype not in CODE_OF:
            raise DataError(f"{self.prefix}: token dtype {self.dtype.name} has no index code; use uint16 or uint32.")
        self._tmp_bin = Path(f"{self.prefix}.bin.tmp{os.getpid()}")
        self._handle = open(self._tmp_bin, "wb")
        self.lengths: List[int] = []

    def add(self, tokens: np.ndarray) -> None:
        """One document, already including its end-of-document token."""
        if len(tokens):
            self._handle.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
            self.lengths.append(len(tokens))

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    def take_tail(self, fraction: float) -> np.ndarray:
        """Remove and return the last `fraction` of the tokens written so far (at least one, and one is kept);
        the document the cut falls in is shortened to end there."""
        self._handle.flush()
        total = self.tokens
        cut = min(max(1, int(total * (1 - fraction))), total - 1)
        tail = np.fromfile(self._tmp_bin, dtype=self.dtype, offset=cut * self.dtype.itemsize)
        self._handle.truncate(cut * self.dtype.itemsize)
        self._handle.seek(0, os.SEEK_END)
        ends = np.cumsum(self.lengths)
        keep = int(np.searchsorted(ends, cut, side="left"))  # the document that holds token `cut`
        self.lengths = self.lengths[:keep] + [cut - (int(ends[keep - 1]) if keep else 0)]
        return tail

    def close(self) -> None:
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        docs = np.arange(len(lengths) + 1, dtype=np.int64)
        tmp_idx = Path(f"{self.prefix}.idx.tmp{os.getpid()}")
        with open(tmp_idx, "wb") as handle:
            handle.write(HEADER.pack(MAGIC, 1, CODE_OF[self.dtype], len(lengths), len(docs)))
            for array in (lengths, pointers, docs):
                handle.write(array.tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(self._tmp_bin, f"{self.prefix}.bin")
        os.replace(tmp_idx, f"{self.prefix}.idx")

    def abort(self) -> None:
        self._handle.close()
        self._tmp_bin.unlink(missing_ok=True)
