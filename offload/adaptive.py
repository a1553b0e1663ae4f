"""Adaptive keep (`offload.keep_last=auto`): offload only what the link can move while the forward runs.

SSDTrain's policy, as plait applies it: a block's saved activations only lower the peak
(which comes at the end of the forward) if their copy has left the device by then; bytes
still in the queue when the forward ends cost link time and save nothing, and the last
block is read back the moment backward starts. So, from one profiled forward per chunk
(each block's compute time, without the waits offload adds, and its saved bytes) and the
store's bandwidth measured through the store itself at start, the plan walks the blocks in
forward order with one copy queue: block i's bytes join the queue when it ends, leave at
the measured bandwidth, and block i is offloaded only if its copy is done by the end of
the forward. The first blocks that pass are offloaded, the rest kept (a prefix, as
`keep_last` would give).

The bound the plan is judged against: the bytes the link can carry during the forward
(bandwidth x forward time), capped at what the blocks before the last save in all.
The trainer logs the plan once and reports it with every step's offload counters.
"""

import time
import weakref
from dataclasses import dataclass
from typing import List

import torch

PROBE_BYTES = {"cuda": 64 << 20, "cpu": 16 << 20}


@dataclass
class BlockProfile:
    """One block of one profiled forward: compute time and the bytes it saved for backward."""

    seconds: float = 0.0
    nbytes: int = 0


@dataclass
class OffloadPlan:
    """How many leading blocks of a chunk to offload, and the figures that chose it."""

    offloaded_blocks: int
    blocks: int
    planned_bytes: int  # saved bytes of the offloaded blocks: off the device when the forward ends
    bound_bytes: int  # bandwidth x forward time, capped at the bytes of every block but the last
    bandwidth: float  # bytes a second through the store
    forward_s: float

    @property
    def reached(self) -> float:
        return self.planned_bytes / self.bound_bytes if self.bound_bytes else 1.0

    def describe(self) -> str:
        return (f"offload {self.offloaded_blocks} of {self.blocks} blocks: {self.planned_bytes / 2**20:.1f} MiB "
                f"moved during a {1e3 * self.forward_s:.1f} ms forward at {self.bandwidth / 1e9:.2f} GB/s "
                f"(bound {self.bound_bytes / 2**20:.1f} MiB, reached {self.reached:.2f})")


def plan_offload(blocks: List[BlockProfile], bandwidth: float) -> OffloadPlan:
    """The longest prefix of blocks whose copies, queued one after another, finish by the forward's end."""
    forward_s = sum(block.seconds for block in blocks)
    queue_free, start, chosen = 0.0, 0.0, 0
    for index, block in enumerate(blocks[:-1]):
        end = start + block.seconds
        finish = max(max(queue_free, start) + block.nbytes / bandwidth, end)  # its last byte is saved at its end
        if finish > forward_s:
            break
        queue_free, start, chosen = finish, end, index + 1
    planned = sum(block.nbytes for block in blocks[:chosen])
    bound = int(min(bandwidth * forward_s, sum(block.nbytes for block in blocks[:-1])))
    return OffloadPlan(chosen, len(blocks), planned, bound, bandwidth, forward_s)


class BlockTimer:
    """Marks at block boundaries: wall-clock on CPU, CUDA events on the compute stream on a GPU
    (the GPU runs behind the Python that launches it), read once the profiled step is over."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class ChunkProfile:
    """The first forward of one chunk in the profiled step, block by block: time marks and saved bytes
    (each storage counted once, as offload writes it once)."""

    def __init__(self, n_blocks: int, timer: BlockTimer):
        self.timer = timer
        self.blocks = [BlockProfile() for _ in range(n_blocks)]
        self.marks: List[list] = [[None, None] for _ in range(n_blocks)]
        self.storages = {}  # (device, data pointer) -> weak reference: a freed storage's pointer is reused

    def start(self, slot: int) -> None:
        self.marks[slot][0] = self.timer.mark()

    def end(self, slot: int) -> None:
        self.marks[slot][1] = self.timer.mark()

    def saved(self, slot: int, storage) -> None:
        key = (storage.device, storage.data_ptr())
        seen = self.storages.get(key)
        if seen is None or seen() is not storage:
            self.storages[key] = weakref.ref(storage)
            self.blocks[slot].nbytes += storage.nbytes()

    @property
    def complete(self) -> bool:
        return all(start is not None and end is not None for start, end in self.marks)

    def resolve(self) -> List[BlockProfile]:
        for block, (start, end) in zip(self.blocks, self.marks):
            block.seconds = self.timer.seconds(start, end)
        return self.blocks


def measure_bandwidth(store, device: torch.device, repeats: int = 3) -> float:
    """Bytes a second one write moves through `store` (the median of `repeats` probes of 64 MiB on CUDA,
    16 on CPU), so the figure is the real path's: pinned copies, files or DeepSpeed's aio."""
    nbytes = PROBE_BYTES["cuda" if device.type == "cuda" else "cpu"]
    probe = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    times = []
    for attempt in range(repeats + 1):
        key = -1 - attempt  # below every key the cache uses
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        store.write(key, probe).result()
        elapsed = time.perf_counter() - start
        store.discard(key)
        if attempt:  # the first one warms pools and files up
            times.append(elapsed)
    store.flush()
    for pool in store.pools():
        pool.drop(nbytes)
    times.sort()
    return nbytes / max(times[len(times) // 2], 1e-9)
