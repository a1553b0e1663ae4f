"""The storage interface every offload backend implements, and the pieces they share.

A store keeps byte buffers (1-D uint8 tensors, one per saved storage) under integer
keys. `write(key, data)` starts copying `data` out and returns a future; the caller
keeps `data` alive and unmodified until the future is done. `read(key, out)` starts
filling `out` (same size, on the compute device) and returns a future whose result is
a CUDA event the consumer must wait on, or None when `out` is ready as soon as the
future is. `discard(key)` frees what a completed or never-started write left behind
(maybe in the background: `flush()` waits until it is gone). `close()` removes
everything. All backends have these semantics; the CPU ones are
tested in CI, the CUDA paths (pinned staging, side stream, GDS) whenever a GPU is lent.
"""

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import torch


def done_future(result=None) -> Future:
    future = Future()
    future.set_result(result)
    return future


class EventFuture(Future):
    """A future that is done when a CUDA event has completed (copies issued on a side stream)."""

    def __init__(self, event):
        super().__init__()
        self.event = event

    def done(self) -> bool:
        return self.event.query()

    def cancel(self) -> bool:
        return False

    def result(self, timeout=None):
        self.event.synchronize()
        return None

    def exception(self, timeout=None):
        return None

    def add_done_callback(self, fn: Callable) -> None:
        self.event.synchronize()
        fn(self)


class HostPool:
    """Reusable host buffers by exact size (pinned when a GPU is used: pinning costs ~3 ms each)."""

    def __init__(self, pinned: bool):
        self.pinned = pinned
        self.free: Dict[int, List[torch.Tensor]] = {}
        self.lock = threading.Lock()
        self.bytes = 0  # all buffers the pool ever made (held by the pool or lent out)

    def take(self, nbytes: int) -> torch.Tensor:
        with self.lock:
            spare = self.free.get(nbytes)
            if spare:
                return spare.pop()
            self.bytes += nbytes
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buffer: torch.Tensor) -> None:
        with self.lock:
            self.free.setdefault(buffer.numel(), []).append(buffer)

    def drop(self, nbytes: int) -> None:
        """Free the spare buffers of one size (a probe's, never to be asked for again)."""
        with self.lock:
            self.bytes -= nbytes * len(self.free.pop(nbytes, []))

    def clear(self) -> None:
        with self.lock:
            self.free.clear()
            self.bytes = 0


class CudaStaging:
    """Device <-> pinned host copies on a side stream that waits on the compute stream.

    The compute stream is captured BEFORE entering the side stream (inside
    `torch.cuda.stream(side)`, `current_stream()` is the side stream itself, and waiting
    on it would be a silent no-op).
    """

    def __init__(self, device: torch.device, pool: HostPool):
        self.device, self.pool = device, pool
        self.side = torch.cuda.Stream(device)

    def to_host(self, data: torch.Tensor):
        """Start copying device bytes into a pooled pinned buffer; returns (buffer, event)."""
        compute = torch.cuda.current_stream(self.device)
        buffer = self.pool.take(data.numel())
        self.side.wait_stream(compute)
        with torch.cuda.stream(self.side):
            buffer.copy_(data, non_blocking=True)
            data.record_stream(self.side)
            event = torch.cuda.Event()
            event.record(self.side)
        return buffer, event

    def to_device(self, buffer: torch.Tensor, out: torch.Tensor, out_ready):
        """Start copying a host buffer into `out` on the side stream; returns the event to wait on.

        `out_ready` is an event recorded on the compute stream after `out` was allocated
        (its memory may be recycled from tensors that pending compute kernels still use).
        """
        with torch.cuda.device(self.device):
            self.side.wait_event(out_ready)
            with torch.cuda.stream(self.side):
                out.copy_(buffer, non_blocking=True)
                out.record_stream(self.side)
                event = torch.cuda.Event()
                event.record(self.side)
        return event


class Store:
    """Base of the backends: a worker pool whose tasks are timed (and delayed, in stress tests)."""

    name = "store"

    def __init__(self, threads: int):
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"plait-offload-{self.name}")
        self.jitter: Optional[Callable[[], None]] = None  # tests inject random I/O delays here
        self.io_seconds = 0.0  # summed duration of the I/O tasks
        self.lock = threading.Lock()
        self.host_bytes = 0  # host memory the store holds (host backend, staging pools)

    def submit(self, task: Callable, *args) -> Future:
        return self.pool.submit(self._timed, task, *args)

    def _timed(self, task: Callable, *args):
        if self.jitter is not None:
            self.jitter()
        start = time.perf_counter()
        try:
            return task(*args)
        finally:
            with self.lock:
                self.io_seconds += time.perf_counter() - start

    def write(self, key: int, data: torch.Tensor) -> Future:
        raise NotImplementedError

    def read(self, key: int, out: torch.Tensor) -> Future:
        raise NotImplementedError

    def discard(self, key: int) -> None:
        raise NotImplementedError

    def drain(self) -> None:
        """Return once every task submitted so far has finished and run its done-callbacks.

        One barrier task per worker: a worker takes it only after finishing its previous task
        (callbacks included), and all of them meeting means no earlier task is left.
        """
        barrier = threading.Barrier(self.threads + 1, timeout=300)  # every wait, the workers' too, is bounded
        try:
            for _ in range(self.threads):
                self.pool.submit(barrier.wait)
            barrier.wait()
        except RuntimeError:  # the pool is shut down, or the barrier broke (a worker stuck on a dead disk)
            barrier.abort()
        except BaseException:  # Ctrl-C while submitting or waiting: free the workers, or the exit joins them forever
            barrier.abort()
            raise

    def flush(self) -> None:
        """Wait for discards still in progress (stores that remove in the background override this)."""

    def pools(self) -> List[HostPool]:
        """The host buffer pools this store owns (to drop a probe's buffers from)."""
        return []

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
