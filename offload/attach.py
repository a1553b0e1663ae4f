"""`ActivationOffload(cfg, grid, device).attach(chunk)`: offload a model chunk without changing it.

Forward hooks on the chunk open and close one saved-tensor-hook scope per forward call
(one `Pass` per micro-batch, however a pipeline interleaves them); hooks on its blocks
(`chunk.layers`, in forward order) mark layer boundaries for the keep / offload /
recompute policy and register the gradient hook that prefetches in backward. A block
under "recompute" runs through `torch.utils.checkpoint(use_reentrant=False)` (its
forward is wrapped on the instance, so parameter names do not change).

Per step: `with offload.step(): ...` (or `begin_step()` / `end_step()`) resets the
counters and, at the end, releases whatever is left and removes every file, also when
the step raised. The scratch folder is removed by `close()`, at exit and after Ctrl-C.
"""

import contextlib
import weakref
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.offload.backends import make_store
from plait.offload.cache import ActivationCache
from plait.offload.config import OffloadConfig, OffloadError, layer_modes, validate_offload


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _close(store, cache) -> None:
    cache.release_all()
    store.close()


class ActivationOffload:
    """Offloads the saved activations of the chunks it is attached to, through one store (host, file, aio, gds).

    Built from an `OffloadConfig` (backend, path, policy), the rank (from `grid`, for file
    names) and the compute device; `attach(chunk)` per model chunk, `step()` per step.
    """

    def __init__(self, cfg: OffloadConfig, grid: Optional[Any] = None, device: Optional[torch.device] = None):
        validate_offload(cfg)
        if cfg.backend == "none":
            raise OffloadError("offload.backend=none attaches nothing; choose host|file|aio|gds|auto to offload.")
        self.cfg = cfg
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.store = make_store(cfg, self.device, rank=grid.rank if grid is not None else 0)
        self.cache = ActivationCache(self.store, cfg.min_bytes, cfg.device_filter, cfg.prefetch,
                                     cfg.write_window)
        self.hooks: List = []
        self.wrapped: List[nn.Module] = []
        self.last_metrics: Dict[str, float] = {}
        self._io_start = 0.0
        self._closer = weakref.finalize(self, _close, self.store, self.cache)

    def attach(self, chunk: nn.Module) -> nn.Module:
        """Offload `chunk`'s saved activations from now on (call after moving it to its device)."""
        blocks = list(getattr(chunk, "layers", {}).values())
        modes = layer_modes(self.cfg, len(blocks))
        cache = self.cache
        cache.add_resident(list(chunk.parameters()) + list(chunk.buffers()))
        self.hooks.append(chunk.register_forward_pre_hook(lambda module, args: cache.begin_pass(modes)))
        self.hooks.append(chunk.register_forward_hook(lambda module, args, out: cache.end_pass(), always_call=True))
        for slot, (block, mode) in enumerate(zip(blocks, modes)):
            self.hooks.append(block.register_forward_pre_hook(self._enter(slot, mode)))
            self.hooks.append(block.register_forward_hook(
                lambda module, args, out, slot=slot: cache.leave_layer(slot, out), always_call=True))
            if mode == "recompute":
                block.forward = _checkpointed(block.forward)
                self.wrapped.append(block)
        return chunk

    def _enter(self, slot: int, mode: str):
        recompute = mode == "recompute"

        def hook(module, args):
            held = args[0] if recompute and args and isinstance(args[0], torch.Tensor) else None
            self.cache.enter_layer(slot, held)

        return hook

    def detach(self) -> None:
        for handle in self.hooks:
            handle.remove()
        for block in self.wrapped:
            del block.forward
        self.hooks, self.wrapped = [], []

    # steps --------------------------------------------------------------------------
    def begin_step(self) -> None:
        cache = self.cache
        cache.abandon_passes()
        cache.release_all()
        cache.error = None
        with cache.lock:
            cache.stats = type(cache.stats)()
        cache.tracker.reset_peak()
        self._io_start = self.store.io_seconds

    def end_step(self, raise_errors: bool = True) -> Dict[str, float]:
        """Release what is left, remove every file, and return the step's counters."""
        cache = self.cache
        cache.abandon_passes()
        cache.release_all()
        cache.wait_writes()
        self.store.flush()  # every file of the step is gone before the step returns
        error, cache.error = cache.error, None
        stats = cache.stats
        stats.resident_peak_bytes = cache.tracker.peak
        stats.io_s = self.store.io_seconds - self._io_start
        self.last_metrics = stats.metrics()
        self.last_metrics["offload_host_pool_bytes"] = getattr(self.store, "pool_bytes", 0)
        if error is not None and raise_errors:
            raise error
        return self.last_metrics

    @contextlib.contextmanager
    def step(self):
        """`with offload.step(): forward and backward` (cleans up when they raise)."""
        self.begin_step()
        finished = False
        try:
            yield self
            finished = True
        finally:
            self.end_step(raise_errors=finished)

    def close(self) -> None:
        self._closer()
