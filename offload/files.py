"""File backend: one file per saved storage on a local SSD, written and read by a thread pool.

Each rank writes into its own scratch folder `<offload.path>/plait-offload-<pid>-XXXX`,
made at start-up and removed by `close()` (also at interpreter exit and after Ctrl-C).
Writes use `os.pwrite` and reads `os.preadv` straight from and into the tensors' memory
(CPU) or a pooled pinned buffer (CUDA, staged on a side stream). A write that fails
removes its partial file and raises `OffloadIOError` naming the path and the fix.
"""

import errno
import os
import shutil
import tempfile
from concurrent.futures import Future
from typing import Optional

import torch

from plait.offload.config import OffloadIOError
from plait.offload.store import CudaStaging, HostPool, Store


def io_error(path: str, action: str, error: OSError) -> OffloadIOError:
    if error.errno == errno.ENOSPC:
        return OffloadIOError(f"offload.path={path} is full: {action} failed ({error.strerror}); free space "
                              f"there, point offload.path at a larger SSD, or raise offload.keep_last.")
    return OffloadIOError(f"offload.path={path}: {action} failed ({error.strerror or error}); "
                          f"check the disk or use another offload.path.")


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU uint8 tensor, without a copy."""
    return memoryview(tensor.numpy()).cast("B")


class FileStore(Store):
    name = "file"

    def __init__(self, path: str, device: torch.device, threads: int = 2, rank: int = 0):
        super().__init__(threads)
        self.path = path
        self.dir = tempfile.mkdtemp(prefix=f"plait-offload-{os.getpid()}-r{rank}-", dir=path)
        self.staging: Optional[CudaStaging] = (CudaStaging(device, HostPool(pinned=True))
                                               if device.type == "cuda" else None)

    def file(self, key: int) -> str:
        return os.path.join(self.dir, f"{key}.bin")

    # writes ---------------------------------------------------------------------------
    def write(self, key: int, data: torch.Tensor) -> Future:
        if data.is_cuda:
            buffer, event = self.staging.to_host(data)
            return self.submit(self._write_staged, key, buffer, event)
        return self.submit(self._write_boxed, key, [data])

    def _write_boxed(self, key: int, box: list) -> None:
        """The worker takes the tensor out of the box, so nothing holds it once the future is done
        (the executor keeps a task's arguments alive until just after it sets the result)."""
        self._write(key, box.pop())

    def _write_staged(self, key: int, buffer: torch.Tensor, event) -> None:
        event.synchronize()
        try:
            self._write(key, buffer)
        finally:
            self.staging.pool.give(buffer)

    def _write(self, key: int, data: torch.Tensor) -> None:
        name = self.file(key)
        try:
            self.write_bytes(name, data)
        except OSError as error:
            self._remove(name)
            raise io_error(self.path, f"writing {data.numel()} bytes of saved activations", error) from error

    def write_bytes(self, name: str, data: torch.Tensor) -> None:
        view, offset = byte_view(data), 0
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while offset < len(view):
                offset += os.pwrite(fd, view[offset:], offset)
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
        try:
            self.read_bytes(self.file(key), out)
        except OSError as error:
            raise io_error(self.path, f"reading {out.numel()} bytes of saved activations back", error) from error

    def read_bytes(self, name: str, out: torch.Tensor) -> None:
        view, offset = byte_view(out), 0
        fd = os.open(name, os.O_RDONLY)
        try:
            while offset < len(view):
                count = os.preadv(fd, [view[offset:]], offset)
                if count == 0:
                    raise OSError(errno.EIO, f"{name} is shorter than expected")
                offset += count
        finally:
            os.close(fd)

    # cleanup --------------------------------------------------------------------------
    def discard(self, key: int) -> None:
        self._remove(self.file(key))

    @staticmethod
    def _remove(name: str) -> None:
        try:
            os.unlink(name)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def pool_bytes(self) -> int:
        return self.staging.pool.bytes if self.staging is not None else 0
