"""A checkpoint file laid out in host memory exactly as on disk, written at the disk's speed.

`FileArena(items)` allocates one page-aligned host buffer the size of a safetensors file
(pinned for CUDA sources) and writes the file's header into it; `views[name]` are tensors
over the places the file holds each tensor. A background save copies the live tensors into
those views (its snapshot, the only copy), and `write_arena` then sends the whole buffer to
disk with O_DIRECT in large aligned chunks, the last one padded and the file truncated back
to its size, while a second thread computes the CRC-32C of the same bytes: the write is not
slowed by the page cache or by the checksum, and nothing is copied again. Where the
filesystem refuses O_DIRECT (tmpfs) the same buffer goes through ordinary writes. The bytes
are those `tensorfile.write_safetensors` writes for the same tensors.
"""

import mmap
import os
import threading
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from plait.train.tensorfile import CHECKSUM, _finish, _tmp_name, checksum, safetensors_layout

PAGE = 4096
CHUNK = 32 << 20  # bytes per write: large and sequential


class FileArena:
    """One safetensors file's bytes in one page-aligned host buffer; `views` place each tensor in it."""

    def __init__(self, items: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]], pinned: bool = False):
        self.items = dict(items)
        prefix, places = safetensors_layout(self.items)
        self.nbytes = len(prefix) + sum(size for _, size in places.values())
        padded = -(-self.nbytes // PAGE) * PAGE
        populate = getattr(mmap, "MAP_POPULATE", 0)  # fault every page in now, not during a snapshot
        self._map = mmap.mmap(-1, max(padded, PAGE), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
        self.buffer = torch.frombuffer(self._map, dtype=torch.uint8)
        if pinned:  # registered with CUDA in place, so side-stream copies land here directly
            torch.cuda.cudart().cudaHostRegister(self.buffer.data_ptr(), self.buffer.numel(), 0)
        self.pinned = pinned
        self.buffer[:len(prefix)] = torch.frombuffer(bytearray(prefix), dtype=torch.uint8)
        self.views = {name: self.buffer[start:start + size].view(self.items[name][0]).view(self.items[name][1])
                      for name, (start, size) in places.items()}

    def matches(self, items: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]) -> bool:
        return items == self.items

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buffer.data_ptr())
        self.views, self.buffer = {}, None
        self._map.close()


def items_of(tensors: Dict[str, torch.Tensor]) -> Dict[str, Tuple[torch.dtype, Tuple[int, ...]]]:
    return {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}


def _open_direct(path: Path) -> Tuple[int, bool]:
    """A file descriptor for writing `path`, with O_DIRECT where the filesystem takes it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        return os.open(path, flags | getattr(os, "O_DIRECT", 0), 0o600), hasattr(os, "O_DIRECT")
    except OSError:  # tmpfs and others refuse O_DIRECT
        return os.open(path, flags, 0o600), False


def write_arena(path: Path, arena: FileArena, after_chunk: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Write the arena's file to `path` atomically (temporary name, fsync, rename); returns its size and CRC-32C."""
    path, tmp = Path(path), _tmp_name(Path(path))
    data = memoryview(arena._map)
    crc = {}
    summer = threading.Thread(target=lambda: crc.update(value=checksum(data[:arena.nbytes])), daemon=True)
    summer.start()  # the checksum releases the GIL: it runs beside the writes
    fd, direct = _open_direct(tmp)
    try:
        end = -(-arena.nbytes // PAGE) * PAGE if direct else arena.nbytes
        offset = 0
        while offset < end:
            offset += os.write(fd, data[offset:min(offset + CHUNK, end)])
            if after_chunk is not None:
                after_chunk()
        if end != arena.nbytes:
            os.ftruncate(fd, arena.nbytes)
    except BaseException:
        os.close(fd)
        summer.join()
        raise
    handle = os.fdopen(fd, "wb")
    _finish(handle, tmp, path)
    summer.join()
    return {"bytes": arena.nbytes, CHECKSUM: crc["value"]}
