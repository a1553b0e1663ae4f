"""Host-memory backend: saved activations are copied into pooled (pinned, on GPU) host buffers.

On CUDA the device-to-host and host-to-device copies run on a side stream ordered after
the compute stream (torchtune's design, with a pool). On CPU the copies run on the
worker threads: the memory is not saved there, but the semantics are the same and tested.
"""

from concurrent.futures import Future
from typing import Dict

import torch

from plait.offload.store import CudaStaging, EventFuture, HostPool, Store, done_future


class HostStore(Store):
    name = "host"

    def __init__(self, device: torch.device, threads: int = 1):
        super().__init__(threads)
        self.on_cuda = device.type == "cuda"
        self.buffers = HostPool(pinned=self.on_cuda)
        self.staging = CudaStaging(device, self.buffers) if self.on_cuda else None
        self.saved: Dict[int, torch.Tensor] = {}

    def write(self, key: int, data: torch.Tensor) -> Future:
        if data.is_cuda:
            buffer, event = self.staging.to_host(data)
            with self.lock:
                self.saved[key] = buffer
            return EventFuture(event)
        return self.submit(self._copy_out, key, [data])

    def _copy_out(self, key: int, box: list) -> None:
        data = box.pop()  # so the executor does not keep it alive past the future (see FileStore)
        buffer = self.buffers.take(data.numel())
        buffer.copy_(data)
        with self.lock:
            self.saved[key] = buffer

    def read(self, key: int, out: torch.Tensor) -> Future:
        with self.lock:
            buffer = self.saved[key]
        if out.is_cuda:
            out_ready = torch.cuda.current_stream(out.device).record_event()
            return done_future(self.staging.to_device(buffer, out, out_ready))
        return self.submit(self._copy_in, buffer, out)

    @staticmethod
    def _copy_in(buffer: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(buffer)

    def discard(self, key: int) -> None:
        with self.lock:
            buffer = self.saved.pop(key, None)
        if buffer is not None:
            self.buffers.give(buffer)

    def pools(self):
        return [self.buffers]

    @property
    def pool_bytes(self) -> int:
        return self.buffers.bytes

    def close(self) -> None:
        super().close()
        self.saved.clear()
        self.buffers.clear()
