"""GPUDirect Storage backend: device memory to NVMe and back without a host bounce.

Uses DeepSpeed's GDS op (`GDSBuilder().load().gds_handle`, same interface as the aio
handle, on CUDA tensors). Chosen only with CUDA and a compatible cuFile install. The
worker waits on an event recorded on the compute stream before touching device memory,
so it never reads a tensor still being produced nor fills memory still in use.
"""

from concurrent.futures import Future

import torch

from plait.offload.config import OffloadConfig, OffloadError
from plait.offload.files import FileStore


def gds_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from deepspeed.ops.op_builder import GDSBuilder

        return bool(GDSBuilder().is_compatible(verbose=False))
    except Exception:
        return False


class GdsStore(FileStore):
    name = "gds"

    def __init__(self, cfg: OffloadConfig, device: torch.device, rank: int = 0):
        if device.type != "cuda" or not gds_available():
            raise OffloadError("offload.backend=gds needs CUDA and DeepSpeed's GDS op (cuFile); "
                               "use offload.backend=aio or file.")
        from deepspeed.ops.op_builder import GDSBuilder

        op = GDSBuilder().load(verbose=False)
        super().__init__(cfg.path, device, threads=1, rank=rank)
        self.staging = None
        self.handle = op.gds_handle(cfg.aio_block_size, cfg.aio_queue_depth, False, True, cfg.threads)

    def write(self, key: int, data: torch.Tensor) -> Future:
        name, offset = self.place(key, data.numel())
        produced = torch.cuda.current_stream(data.device).record_event()
        return self.submit(self._write_after, name, offset, [data], produced)

    def _write_after(self, name, offset, box, produced) -> None:
        produced.synchronize()
        self._write(name, offset, box.pop())

    def read(self, key: int, out: torch.Tensor) -> Future:
        out_ready = torch.cuda.current_stream(out.device).record_event()
        return self.submit(self._read_after, key, out, out_ready)

    def _read_after(self, key, out, out_ready):
        out_ready.synchronize()
        self._read(key, out)
        return None

    def write_bytes(self, name: str, offset: int, data: torch.Tensor) -> None:
        if self.handle.sync_pwrite(data, name, offset) < 0:
            raise OSError(5, f"GDS write of {name} at {offset} failed")

    def read_bytes(self, name: str, offset: int, out: torch.Tensor) -> None:
        if self.handle.sync_pread(out, name, offset) < 0:
            raise OSError(5, f"GDS read of {name} at {offset} failed")
