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

`keep_last=auto` with the `offload` policy (the default): the store's bandwidth is
measured at construction, the first step runs as keep_last=1 and profiles each chunk's
first forward, and at its end each chunk's modes become the prefix `adaptive.plan_offload`
chooses (logged once; its figures join every step's counters).
"""

import contextlib
import logging
import weakref
from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from plait.offload.adaptive import BlockTimer, ChunkProfile, OffloadPlan, measure_bandwidth, plan_offload
from plait.offload.backends import make_store
from plait.offload.cache import ActivationCache
from plait.offload.config import OffloadConfig, OffloadError, keep_count, layer_modes, validate_offload

log = logging.getLogger("plait")


def _checkpointed(forward):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def _close(store, cache) -> None:
    cache.release_all()
    store.close()


def whole_weights(module: nn.Module) -> List[torch.Tensor]:
    """`module`'s parameters as its forward sees them. Under ZeRO-2/3 FSDP2 swaps in whole weights gathered
    just before (its pre-forward hook runs first) and frees them after: a view of one saved for backward
    (a transposed weight) must stay resident, never be copied out while FSDP2 frees it. Sharded
    (DTensor) parameters are not looked at: they are not the ones the forward uses."""
    from torch.distributed.tensor import DTensor

    return [p for p in module.parameters() if not isinstance(p, DTensor)]


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
        self.rank = grid.rank if grid is not None else 0
        words = [word.strip() for word in cfg.policy.split(",")]
        self.adaptive = keep_count(cfg.keep_last) is None and words == ["offload"]
        self.bandwidth = measure_bandwidth(self.store, self.device) if self.adaptive else None
        self.timer = BlockTimer(self.device)
        self.chunk_modes: List[List[str]] = []  # per attached chunk, the modes its passes read (changed in place)
        self.profiles: List = []  # per attached chunk, the profiled first forward (adaptive, until planned)
        self.plans: Optional[List[OffloadPlan]] = None
        self.last_metrics: Dict[str, float] = {}
        self._io_start = 0.0
        self._closer = weakref.finalize(self, _close, self.store, self.cache)

    def attach(self, chunk: nn.Module) -> nn.Module:
        """Offload `chunk`'s saved activations from now on (call after moving it to its device)."""
        blocks = list(getattr(chunk, "layers", {}).values())
        modes = layer_modes(self.cfg, len(blocks))
        index = len(self.chunk_modes)
        self.chunk_modes.append(modes)
        self.profiles.append(None)
        cache = self.cache
        cache.add_resident(list(chunk.parameters()) + list(chunk.buffers()))
        def begin(module, args):
            cache.add_resident(whole_weights(module))
            cache.begin_pass(modes, self._profile(index, len(blocks)))

        self.hooks.append(chunk.register_forward_pre_hook(begin))
        self.hooks.append(chunk.register_forward_hook(lambda module, args, out: cache.end_pass(), always_call=True))
        for slot, (block, mode) in enumerate(zip(blocks, modes)):
            self.hooks.append(block.register_forward_pre_hook(self._enter(slot, mode)))
            self.hooks.append(block.register_forward_hook(
                lambda module, args, out, slot=slot: cache.leave_layer(slot, out), always_call=True))
            if mode == "recompute":
                block.forward = _checkpointed(block.forward)
                self.wrapped.append(block)
        return chunk

    def _profile(self, index: int, n_blocks: int) -> Optional[ChunkProfile]:
        """The profile to fill in this pass: the first training forward of each chunk, until the plan is made."""
        if not self.adaptive or self.plans is not None or self.profiles[index] is not None:
            return None
        if not torch.is_grad_enabled():
            return None
        self.profiles[index] = ChunkProfile(n_blocks, self.timer)
        return self.profiles[index]

    def _plan(self) -> None:
        """After the profiled step: each chunk offloads the prefix of blocks the link hides behind its forward."""
        if any(profile is None or not profile.complete for profile in self.profiles):
            self.profiles = [None] * len(self.profiles)  # an aborted step: profile the next one
            return
        self.plans = []
        for modes, profile in zip(self.chunk_modes, self.profiles):
            plan = plan_offload(profile.resolve(), self.bandwidth)
            modes[:] = ["offload"] * plan.offloaded_blocks + ["keep"] * (len(modes) - plan.offloaded_blocks)
            self.plans.append(plan)
            if self.rank == 0:
                log.info("activation offload: keep_last=auto: %s", plan.describe())
        self.profiles = [None] * len(self.profiles)

    def plan_metrics(self) -> Dict[str, float]:
        """The adaptive plan's figures summed over this rank's chunks (empty before the plan)."""
        if not self.plans:
            return {}
        return {"offload_link_bytes_per_s": self.bandwidth,
                "offload_bound_bytes": sum(plan.bound_bytes for plan in self.plans),
                "offload_planned_bytes": sum(plan.planned_bytes for plan in self.plans),
                "offload_blocks_offloaded": sum(plan.offloaded_blocks for plan in self.plans)}

    def _enter(self, slot: int, mode: str):
        recompute = mode == "recompute"

        def hook(module, args):
            held = args[0] if recompute and args and isinstance(args[0], torch.Tensor) else None
            self.cache.add_resident(whole_weights(module))
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
        if self.adaptive and self.plans is None and error is None:
            self._plan()
        self.last_metrics = stats.metrics()
        self.last_metrics["offload_host_pool_bytes"] = getattr(self.store, "pool_bytes", 0)
        self.last_metrics.update(self.plan_metrics())
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
