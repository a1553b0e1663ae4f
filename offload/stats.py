"""Per-step offload accounting, and the tracker of resident saved-activation bytes.

Definitions (bytes are of tensors at least `offload.min_bytes`, parameters excluded):
- offloaded: saved views handed to the offload path (each view counted);
- written / read: storage bytes actually written to and read back from the store;
- deduplicated: saved views not written because their storage already was;
- from_memory: storage bytes served from memory because the tensor was still alive;
- resident_peak: the most bytes of saved-activation storages alive at once on the
  compute device (kept tensors, offloaded ones not yet freed, read-back buffers,
  block inputs held by recompute);
- io_s: summed time of the I/O tasks; exposed_s: time the training thread waited for
  I/O; hidden_s = io_s - exposed_s (clipped at 0).
"""

import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Dict


@dataclass
class OffloadStats:
    offloaded_bytes: int = 0
    written_bytes: int = 0
    read_bytes: int = 0
    deduplicated_bytes: int = 0
    from_memory_bytes: int = 0
    kept_bytes: int = 0
    resident_peak_bytes: int = 0
    io_s: float = 0.0
    exposed_s: float = 0.0

    def metrics(self) -> Dict[str, float]:
        values = {f"offload_{key}": value for key, value in asdict(self).items()}
        values["offload_hidden_s"] = max(self.io_s - self.exposed_s, 0.0)
        return values


class ResidentBytes:
    """Sum of the sizes of the saved storages alive now, sampled at layer boundaries and unpacks.

    Weak references without callbacks: a finalizer would run Python code whenever a
    storage dies, and a Ctrl-C landing inside one is swallowed by the interpreter.
    """

    def __init__(self):
        self.lock = threading.RLock()
        self.alive: Dict[int, tuple] = {}  # id(storage) -> (weak reference, bytes)
        self.current = 0
        self.peak = 0

    def track(self, storage) -> None:
        with self.lock:
            held = self.alive.get(id(storage))
            if held is not None:
                if held[0]() is storage:
                    return
                self.current -= held[1]  # a dead storage whose id was reused
            self.alive[id(storage)] = (weakref.ref(storage), storage.nbytes())
            self.current += storage.nbytes()
        self.sample()

    def sample(self) -> int:
        """Forget the storages that died, update the peak; returns the bytes still alive."""
        with self.lock:
            dead = [key for key, (ref, _) in self.alive.items() if ref() is None]
            for key in dead:
                self.current -= self.alive.pop(key)[1]
            self.peak = max(self.peak, self.current)
            return self.current

    def reset_peak(self) -> None:
        with self.lock:
            self.peak = 0
            self.sample()
