"""File backend: saved storages packed into segment files on a local SSD, moved by a thread pool.

Each rank writes into its own scratch folder `<offload.path>/plait-offload-<pid>-XXXX`,
made at start-up and removed by `close()` (also at interpreter exit and after Ctrl-C).

Where bytes go: each saved storage gets a region (a 4 KiB-aligned offset) in the open
segment file; a segment is closed once it holds `segment_bytes`, and removed once every
region in it was discarded; at the end of a step (`flush`) nothing is live, so every
segment is gone before the step returns. One file per storage would cost a create and an
unlink per tensor, and on a filesystem mounted with `discard` (online TRIM, common on cloud
VMs) each unlink of written blocks is a synchronous TRIM: the offload benchmark's aio rows
spent 0.4 s a step in them. Removal runs on a thread of its own, behind no I/O.

Writes use `os.pwrite` and reads `os.preadv` straight from and into the tensors' memory
(CPU) or a pooled pinned buffer (CUDA, staged on a side stream). A write that fails raises
`OffloadIOError` naming the path and the fix; its region goes with its segment.
"""

import errno
import itertools
import os
import shutil
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from plait.offload.config import OffloadIOError
from plait.offload.store import CudaStaging, HostPool, Store

ALIGN = 4096  # region offsets (O_DIRECT and cuFile need aligned file offsets)
SEGMENT_BYTES = 64 << 20


def io_error(path: str, action: str, error: OSError) -> OffloadIOError:
    if error.errno == errno.ENOSPC:
        return OffloadIOError(f"offload.path={path} is full: {action} failed ({error.strerror}); free space "
                              f"there, point offload.path at a larger SSD, or raise offload.keep_last.")
    return OffloadIOError(f"offload.path={path}: {action} failed ({error.strerror or error}); "
                          f"check the disk or use another offload.path.")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor, without a copy."""
    return memoryview(tensor.numpy()).cast("B")


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Segment:
    """One scratch file: `used` bytes handed out as regions, `live` of them not discarded yet."""

    path: str
    used: int = 0
    live: int = 0
    closed: bool = False


class FileStore(Store):
    name = "file"

    def __init__(self, path: str, device: torch.device, threads: int = 2, rank: int = 0,
                 segment_bytes: int = SEGMENT_BYTES):
        super().__init__(threads)
        self.path, self.segment_bytes = path, segment_bytes
        os.makedirs(path, exist_ok=True)  # validation found it writable without making it
        self.dir = tempfile.mkdtemp(prefix=f"plait-offload-{os.getpid()}-r{rank}-", dir=path)
        self.staging: Optional[CudaStaging] = (CudaStaging(device, HostPool(pinned=True))
                                               if device.type == "cuda" else None)
        self.regions: Dict[int, Tuple[Segment, int]] = {}  # key -> (segment, offset)
        self.open_segment: Optional[Segment] = None
        self.segment_names = itertools.count()
        self.regions_lock = threading.Lock()
        self.janitor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"plait-offload-{self.name}-rm")
        self.removals: List[Future] = []

    # regions --------------------------------------------------------------------------
    def place(self, key: int, nbytes: int) -> Tuple[str, int]:
        """Give `key` a region of `nbytes` in the open segment (opening a new one when it is full)."""
        with self.regions_lock:
            segment = self.open_segment
            if segment is None or (segment.used and segment.used + nbytes > self.segment_bytes):
                if segment is not None:
                    self._close_segment(segment)
                segment = Segment(os.path.join(self.dir, f"{next(self.segment_names)}.seg"))
                self.open_segment = segment
            offset = segment.used
            segment.used += aligned(nbytes)
            segment.live += 1
            self.regions[key] = (segment, offset)
            return segment.path, offset

    def region(self, key: int) -> Tuple[str, int]:
        with self.regions_lock:
            segment, offset = self.regions[key]
            return segment.path, offset

    def discard(self, key: int) -> None:
        """Forget `key`'s region; its segment is removed once closed and empty."""
        with self.regions_lock:
            placed = self.regions.pop(key, None)
            if placed is None:
                return
            segment = placed[0]
            segment.live -= 1
            if segment.closed and segment.live == 0:
                self._remove_later(segment.path)

    def _close_segment(self, segment: Segment) -> None:
        """No more regions go into `segment`; remove it now if none is live (caller holds the lock)."""
        segment.closed = True
        if self.open_segment is segment:
            self.open_segment = None
        if segment.live == 0:
            self._remove_later(segment.path)

    def _remove_later(self, name: str) -> None:
        try:
            self.removals.append(self.janitor.submit(self._remove, name))
        except RuntimeError:  # closing: `close` removes the whole folder
            pass

    def flush(self) -> None:
        """Close the open segment and wait until every empty segment is gone (the end of a step).

        Reads or writes still running when the step released their entries discard from
        their done-callbacks, so the workers are drained first.
        """
        self.drain()
        with self.regions_lock:
            if self.open_segment is not None:
                self._close_segment(self.open_segment)
            removals, self.removals = self.removals, []
        for removal in removals:
            removal.result()

    # writes ---------------------------------------------------------------------------
    def write(self, key: int, data: torch.Tensor) -> Future:
        name, offset = self.place(key, data.numel())
        if data.is_cuda:
            buffer, event = self.staging.to_host(data)
            return self.submit(self._write_staged, name, offset, buffer, event)
        return self.submit(self._write_boxed, name, offset, [data])

    def _write_boxed(self, name: str, offset: int, box: list) -> None:
        """The worker takes the tensor out of the box, so nothing holds it once the future is done
        (the executor keeps a task's arguments alive until just after it sets the result)."""
        self._write(name, offset, box.pop())

    def _write_staged(self, name: str, offset: int, buffer: torch.Tensor, event) -> None:
        event.synchronize()
        try:
            self._write(name, offset, buffer)
        finally:
            self.staging.pool.give(buffer)

    def _write(self, name: str, offset: int, data: torch.Tensor) -> None:
        """Write `data` at the region placed for it when the write was submitted."""
        try:
            self.write_bytes(name, offset, data)
        except OSError as error:
            raise io_error(self.path, f"writing {data.numel()} bytes of saved activations", error) from error

    def write_bytes(self, name: str, offset: int, data: torch.Tensor) -> None:
        view, done = byte_view(data), 0
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        finally:
            os.close(fd)

    # reads ----------------------------------------------------------------------------
    def read(self, key: int, out: torch.Tensor) -> Future:
        if out.is_cuda:
            out_ready = torch.cuda.current_stream(out.device).record_event()
            return self.submit(self._read_staged, key, out, out_ready)
        return self.submit(self._read, key, out)

    def _read_staged(self, key: int, out: torch.Tensor, out_ready):
        buffer = self.staging.pool.take(out.numel())
        self._read(key, buffer)
        event = self.staging.to_device(buffer, out, out_ready)
        event.synchronize()  # the pinned buffer goes back to the pool only once copied
        self.staging.pool.give(buffer)
        return None

    def _read(self, key: int, out: torch.Tensor) -> None:
        name, offset = self.region(key)
        try:
            self.read_bytes(name, offset, out)
        except OSError as error:
            raise io_error(self.path, f"reading {out.numel()} bytes of saved activations back", error) from error

    def read_bytes(self, name: str, offset: int, out: torch.Tensor) -> None:
        view, done = byte_view(out), 0
        fd = os.open(name, os.O_RDONLY)
        try:
            while done < len(view):
                count = os.preadv(fd, [view[done:]], offset + done)
                if count == 0:
                    raise OSError(errno.EIO, f"{name} is shorter than expected")
                done += count
        finally:
            os.close(fd)

    # cleanup --------------------------------------------------------------------------
    @staticmethod
    def _remove(name: str) -> None:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        super().close()
        self.janitor.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def pools(self):
        return [self.staging.pool] if self.staging is not None else []

    @property
    def pool_bytes(self) -> int:
        return self.staging.pool.bytes if self.staging is not None else 0
