"""DeepSpeed async-I/O backend: the file backend, with libaio queues doing the reads and writes.

DeepSpeed's `aio_handle(block_size, queue_depth, single_submit, overlap_events,
intra_op_parallelism)` splits each buffer into blocks and keeps `queue_depth` of them in
flight on the NVMe queue (O_DIRECT; unaligned or unpinned buffers go through its bounce
buffers). One worker thread drives the handle; the handle's own threads do the I/O.
The op is JIT-built once by `AsyncIOBuilder().load()` (a few minutes, cached under
~/.cache/torch_extensions) and needs `libaio-dev`.
"""

import logging

import torch

from plait.offload.config import OffloadConfig, OffloadError
from plait.offload.files import FileStore

log = logging.getLogger("plait")


def load_aio_op():
    """DeepSpeed's async_io extension, built on first use; OffloadError when it cannot be."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        builder = AsyncIOBuilder()
        if not builder.is_compatible(verbose=False):
            raise RuntimeError("AsyncIOBuilder reports the op is not compatible (is libaio-dev installed?)")
        return builder.load(verbose=False)
    except Exception as error:  # ImportError, build failures, missing libaio
        raise OffloadError(f"offload.backend=aio needs DeepSpeed's async_io op, which could not be loaded "
                           f"({str(error).splitlines()[0] if str(error) else type(error).__name__}); install "
                           f"libaio-dev (apt) or use offload.backend=file.") from None


class AioStore(FileStore):
    name = "aio"

    def __init__(self, cfg: OffloadConfig, device: torch.device, rank: int = 0):
        op = load_aio_op()
        super().__init__(cfg.path, device, threads=1, rank=rank)
        self.handle = op.aio_handle(cfg.aio_block_size, cfg.aio_queue_depth, False, True, cfg.threads)

    def write_bytes(self, name: str, data: torch.Tensor) -> None:
        self._check(self.handle.sync_pwrite(data, name), "write", name)

    def read_bytes(self, name: str, out: torch.Tensor) -> None:
        self._check(self.handle.sync_pread(out, name), "read", name)

    @staticmethod
    def _check(completed: int, action: str, name: str) -> None:
        if completed < 0:
            raise OSError(-completed, f"aio {action} of {name} failed")
