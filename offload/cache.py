"""The activation cache: saved-tensor hooks that offload, dedupe, prefetch and release.

While a chunk runs forward (one `Pass` per forward call, i.e. per micro-batch, so a
pipeline may keep many in flight), every tensor autograd saves for backward goes through
`pack`. Small tensors, parameters, buffers, weight casts and tensors of a kept layer are
returned as they are. Any other tensor is identified by its storage (a weak reference
to the storage object, which PyTorch keeps unique while the storage lives; data pointers
are reused by the allocator and cannot be trusted): the first view of a storage starts
an asynchronous write of the whole storage and every view gets a `SavedHandle`
(dtype, size, stride, offset) into it, so views of one storage are written once.

`unpack` turns a handle back into a tensor: from the storage itself if it is still alive
(its pending write is cancelled), else from the store. Backward prefetches: the gradient
hook on a block's output (it fires just before that block's backward) starts reading the
block and the next `prefetch` offloaded blocks below it. An entry is released, and its
file removed, as soon as all its views are unpacked or dropped by autograd.
"""

import itertools
import threading
import time
from collections import defaultdict
from functools import partial
from typing import Dict, Iterable, List, Optional

import torch

from plait.common.compat import is_param_cast
from plait.offload.config import OffloadIOError
from plait.offload.stats import OffloadStats, ResidentBytes
from plait.offload.store import EventFuture, Store


class Entry:
    """One saved storage on its way to the store and back."""

    __slots__ = ("key", "nbytes", "device", "storage_ref", "source", "write", "read", "out", "restored",
                 "users", "settled", "released")

    def __init__(self, key: int, storage, device: torch.device):
        import weakref

        self.key, self.nbytes, self.device = key, storage.nbytes(), device
        self.storage_ref = weakref.ref(storage)
        self.source: Optional[torch.Tensor] = None  # bytes of the storage, held while its write runs
        self.write = self.read = None  # futures
        self.out: Optional[torch.Tensor] = None  # buffer a read fills
        self.restored: Optional[torch.Tensor] = None  # bytes ready for unpacking
        self.users = 0  # handles not yet unpacked
        self.settled = False  # write outcome accounted
        self.released = False


class SavedHandle:
    """What autograd keeps instead of an offloaded tensor: an entry and the view into it.

    No `__del__`: views autograd never unpacks are released by `release_all` at the end
    of the step (a finalizer would run Python code at random points, and a Ctrl-C that
    lands inside one is swallowed).
    """

    __slots__ = ("cache", "entry", "dtype", "size", "stride", "offset", "used")

    def __init__(self, cache, entry: Entry, tensor: torch.Tensor):
        self.cache, self.entry, self.used = cache, entry, False
        self.dtype, self.size, self.stride, self.offset = (tensor.dtype, tensor.size(), tensor.stride(),
                                                           tensor.storage_offset())


class Pass:
    """One forward call of one chunk: its per-layer modes, the running layer, its entries.

    `profile` (adaptive keep's profiled forward) collects each block's time marks and saved bytes.
    """

    def __init__(self, modes: List[str], profile=None):
        self.modes = modes
        self.profile = profile
        self.slot: Optional[int] = None  # block running now (None: embedding, head, between blocks)
        self.by_storage: Dict[tuple, Entry] = {}
        self.slots: Dict[int, Dict[int, Entry]] = defaultdict(dict)
        self.hooks = None

    def mode(self) -> str:
        return "keep" if self.slot is None else self.modes[self.slot]


class ActivationCache:
    def __init__(self, store: Store, min_bytes: int, device_filter: str, prefetch: int, write_window: int = 2):
        self.store, self.min_bytes, self.prefetch, self.write_window = store, min_bytes, prefetch, write_window
        self.all_devices = device_filter == "all"
        self.lock = threading.RLock()
        self.keys = itertools.count()
        self.pending: List[Entry] = []  # writes in flight
        self.live: Dict[int, Entry] = {}  # entries not released yet
        self.resident_ids: Dict[int, object] = {}  # storages of parameters and buffers
        self.stack: List[Optional[Pass]] = []
        self.stats = OffloadStats()
        self.tracker = ResidentBytes()
        self.error: Optional[BaseException] = None
        # a saved tensor is released at its first unpack, unless the backward runs in two halves (a zero-bubble
        # schedule's I and W each unpack it): then at the end of the step (`release_all`)
        self.release_on_unpack = True

    def add_resident(self, tensors: Iterable[torch.Tensor]) -> None:
        for tensor in tensors:
            storage = tensor.untyped_storage()
            self.resident_ids[id(storage)] = storage

    # forward: passes and layers -----------------------------------------------------
    def current(self) -> Optional[Pass]:
        return self.stack[-1] if self.stack else None

    def begin_pass(self, modes: List[str], profile=None) -> None:
        if not torch.is_grad_enabled():
            self.stack.append(None)
            return
        chunk_pass = Pass(modes, profile)
        chunk_pass.hooks = torch.autograd.graph.saved_tensors_hooks(partial(self.pack, chunk_pass), self.unpack)
        chunk_pass.hooks.__enter__()
        self.stack.append(chunk_pass)

    def abandon_passes(self) -> None:
        """Close scopes a forward left open (torch skips always-call hooks on KeyboardInterrupt)."""
        while self.stack:
            self.end_pass()

    def end_pass(self) -> None:
        chunk_pass = self.stack.pop()
        if chunk_pass is not None:
            chunk_pass.hooks.__exit__(None, None, None)
            chunk_pass.slot = None
            chunk_pass.by_storage = {}

    def enter_layer(self, slot: int, held: Optional[torch.Tensor] = None) -> None:
        """A block starts; `held` is its input when recompute keeps it alive for backward."""
        chunk_pass = self.current()
        if chunk_pass is None:  # no grad, or a recompute during backward
            return
        if chunk_pass.profile is not None:
            chunk_pass.profile.start(slot)
        self.reap()
        chunk_pass.slot = slot
        if held is not None and self.eligible(held):
            self.tracker.track(held.untyped_storage())

    def leave_layer(self, slot: int, output) -> None:
        chunk_pass = self.current()
        if chunk_pass is None:
            return
        if chunk_pass.profile is not None:
            chunk_pass.profile.end(slot)  # before the write-window wait: the block's own time
        self.tracker.sample()
        chunk_pass.slot = None
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(partial(self.before_layer_backward, chunk_pass, slot))
        self._bound_writes(chunk_pass, slot - self.write_window)

    def _bound_writes(self, chunk_pass: Pass, oldest: int) -> None:
        """Wait for the writes of blocks up to `oldest` (a slow disk then costs time, not memory)."""
        waits = [entry.write for lower, entries in chunk_pass.slots.items() if lower <= oldest
                 for entry in entries.values() if not entry.settled and entry.write is not None]
        if not waits:
            return
        start = time.perf_counter()
        for write in waits:
            try:
                write.result()
            except Exception:  # cancelled, or failed: `reap` records the error
                pass
        with self.lock:
            self.stats.exposed_s += time.perf_counter() - start
        self.reap()

    # pack and unpack ----------------------------------------------------------------
    def eligible(self, tensor: torch.Tensor) -> bool:
        if tensor.layout != torch.strided or (tensor.device.type == "cpu" and not self.all_devices):
            return False
        if tensor.numel() * tensor.element_size() < self.min_bytes:
            return False
        if isinstance(tensor, torch.nn.Parameter) or (tensor.is_leaf and tensor.requires_grad):
            return False
        return id(tensor.untyped_storage()) not in self.resident_ids and not is_param_cast(tensor)  # autocast's copy of a weight: kept

    def pack(self, chunk_pass: Pass, tensor: torch.Tensor):
        self.reap()
        if self.error is not None:
            raise self.error
        if not self.eligible(tensor):
            return tensor
        storage = tensor.untyped_storage()
        self.tracker.track(storage)
        view_bytes = tensor.numel() * tensor.element_size()
        if chunk_pass.profile is not None and chunk_pass.slot is not None:
            chunk_pass.profile.saved(chunk_pass.slot, storage)
        with self.lock:
            if chunk_pass.mode() != "offload":
                self.stats.kept_bytes += view_bytes
                return tensor
            lookup = (tensor.device, storage.data_ptr())
            entry = chunk_pass.by_storage.get(lookup)
            if entry is None or entry.released or entry.storage_ref() is not storage:
                entry = self._new_entry(storage, tensor.device)
                chunk_pass.by_storage[lookup] = entry
            else:
                self.stats.deduplicated_bytes += view_bytes
            chunk_pass.slots[chunk_pass.slot][entry.key] = entry
            entry.users += 1
            self.stats.offloaded_bytes += view_bytes
        return SavedHandle(self, entry, tensor)

    def _new_entry(self, storage, device: torch.device) -> Entry:
        entry = Entry(next(self.keys), storage, device)
        entry.source = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
        entry.write = self.store.write(entry.key, entry.source)
        if not isinstance(entry.write, EventFuture):  # CUDA copies are settled by `reap` instead
            entry.write.add_done_callback(partial(self._write_done, entry))
        self.pending.append(entry)
        self.live[entry.key] = entry
        return entry

    def unpack(self, handle) -> torch.Tensor:
        if not isinstance(handle, SavedHandle):
            return handle
        self.tracker.sample()
        data = self._materialize(handle.entry)
        tensor = torch.empty(0, dtype=handle.dtype, device=handle.entry.device)
        tensor.set_(data.untyped_storage(), handle.offset, handle.size, handle.stride)
        if not handle.used and self.release_on_unpack:
            handle.used = True
            self.drop(handle.entry)
        return tensor

    def _materialize(self, entry: Entry) -> torch.Tensor:
        with self.lock:
            if entry.released:
                raise RuntimeError("an offloaded activation was used after its step ended or after it was "
                                   "consumed; offload does not support retain_graph or double backward.")
            if entry.restored is None and entry.read is None:
                self._start_read(entry)
            if entry.restored is not None:
                return entry.restored
            read, out = entry.read, entry.out
        start = time.perf_counter()
        try:
            event = read.result()
        except BaseException as error:
            raise self._as_io_error(error) from error
        waited = time.perf_counter() - start
        with self.lock:
            self.stats.exposed_s += waited
            if entry.restored is None:
                if event is not None:
                    torch.cuda.current_stream(entry.device).wait_event(event)
                entry.restored, entry.read, entry.out = out, None, None
            return entry.restored

    def _start_read(self, entry: Entry) -> None:
        """Serve from memory when the storage is still alive (cancelling its write), else read it."""
        storage = entry.storage_ref()
        if storage is not None:
            entry.restored = torch.empty(0, dtype=torch.uint8, device=entry.device).set_(storage)
            self.stats.from_memory_bytes += entry.nbytes
            if entry.write is not None and entry.write.cancel():
                entry.settled, entry.source = True, None
            return
        entry.out = torch.empty(entry.nbytes, dtype=torch.uint8, device=entry.device)
        self.tracker.track(entry.out.untyped_storage())
        entry.read = self.store.read(entry.key, entry.out)
        self.stats.read_bytes += entry.nbytes

    # backward: prefetch ---------------------------------------------------------------
    def before_layer_backward(self, chunk_pass: Pass, slot: int, grad) -> None:
        """Start reading block `slot` (if offloaded) and the next `prefetch` offloaded blocks below it."""
        self.tracker.sample()
        with self.lock:
            ahead = 0
            for lower in range(slot, -1, -1):
                entries = chunk_pass.slots.get(lower)
                if not entries:
                    continue
                if lower < slot:
                    ahead += 1
                    if ahead > self.prefetch:
                        break
                for entry in entries.values():
                    if not entry.released and entry.restored is None and entry.read is None:
                        self._start_read(entry)

    # release ------------------------------------------------------------------------
    def drop(self, entry: Entry) -> None:
        with self.lock:
            entry.users -= 1
            if entry.users <= 0:
                self._release(entry)

    def _release(self, entry: Entry) -> None:
        """Forget the entry's bytes and remove what the store holds, once no I/O uses it."""
        if entry.released:
            return
        entry.released = True
        entry.restored = entry.out = entry.source = None
        self.live.pop(entry.key, None)
        running = None
        for future in (entry.read, entry.write):
            if future is not None and not future.done() and not future.cancel():
                running = future
        self._settle(entry)
        if running is not None:
            running.add_done_callback(lambda _, key=entry.key: self.store.discard(key))
        else:
            self.store.discard(entry.key)

    def _write_done(self, entry: Entry, future) -> None:
        with self.lock:
            self._settle(entry)

    def _settle(self, entry: Entry) -> None:
        """Account a finished write (bytes written, or the error to raise)."""
        write = entry.write
        if entry.settled or write is None or not write.done():
            return
        entry.settled = True
        entry.source = None  # the storage may be freed now
        if write.cancelled():
            return
        error = write.exception()
        if error is not None:
            self.error = self.error or self._as_io_error(error)
        else:
            self.stats.written_bytes += entry.nbytes

    def reap(self) -> None:
        """Settle the writes that finished (their source storages can be freed)."""
        with self.lock:
            still = []
            for entry in self.pending:
                if entry.write.done():
                    self._settle(entry)
                else:
                    still.append(entry)
            self.pending = still

    def release_all(self) -> None:
        """End of step (or an aborted one): release every entry left, remove every file."""
        with self.lock:
            for entry in list(self.live.values()):
                self._release(entry)
            self.reap()

    def wait_writes(self) -> None:
        for entry in list(self.pending):
            try:
                entry.write.result()
            except Exception:  # recorded by `reap`; Ctrl-C still goes through
                pass
        self.reap()

    @staticmethod
    def _as_io_error(error: BaseException) -> BaseException:
        if isinstance(error, (OffloadIOError, KeyboardInterrupt)):
            return error
        return OffloadIOError(f"activation offload I/O failed: {error}")
