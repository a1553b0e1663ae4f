"""When and how a run saves and resumes: snapshots in host memory, written in the background.

`Checkpointer.save(state)` takes a rank's `TrainerState` (its parameters, name-keyed optimizer
state, RNG, loader position, step) and, with `checkpoint.async_save=true` (the default where
host memory holds a snapshot), returns at once:

- on CUDA the parameters and optimizer state are copied into reusable pinned host buffers on
  a side stream, ordered after the compute stream; the next optimizer update waits for those
  copies on the GPU (`before_update`), not on the CPU;
- on CPU the same copies run on the writer thread, while the next step's forward and backward
  run (they only read the weights); `before_update`, called right before the optimizer step,
  waits for them, usually not at all;
- the writer thread then writes the safetensors files straight from those buffers, which are
  laid out as the files are (`FileArena`: O_DIRECT in large sequential writes, the checksum
  computed beside them, no second copy), fsyncs and renames them, agrees with
  the other ranks' writers over a process group of its own (gloo, so it never interleaves with
  the training's collectives) and lets rank 0 publish the index and move `latest`
  (`plait.train.checkpoint.write_checkpoint`).

A second save waits for the first write only if it is still running, and says how long it
waited. `checkpoint.async_save=false` writes in the calling thread with the same format (the
files are byte-identical). A failed write (a full disk) is one line naming `checkpoint.dir`;
the previous checkpoint stays `latest`; `checkpoint.on_error=stop` ends the run at the next
save or at the end (exit 2), `continue` says so and trains on.

Tests kill a writer mid-save through `PLAIT_FAULT_CHECKPOINT=<phase>[@<step>]` (read once,
here): the process SIGKILLs itself at that phase of the save of that step (default: its first
save): `files` (before any file), `tensor` (inside a file, after its first tensor),
`rank-files` (after this rank's files), `renamed` (between the rename and `latest`),
`published` (after `latest`), on rank `PLAIT_FAULT_RANK` (default 0).
"""

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec
from plait.train.checkpoint import (SaveRequest, agree_over, clean_temporaries, latest_checkpoint,
                                    optim_file_tensors, own_names, resolve, step_dir_name, write_checkpoint)
from plait.train.filearena import FileArena, items_of
from plait.train.tensorfile import CheckpointError

log = logging.getLogger("plait")

ON_ERROR = ("stop", "continue")
FAULT_PHASES = ("files", "tensor", "rank-files", "renamed", "published")


@dataclass
class TrainerState:
    """What a checkpoint holds of one rank of a run (`Trainer.state()`); tensors are the live ones."""

    step: int
    named_params: Dict[str, torch.Tensor]
    specs: Dict[str, ShardSpec]
    optim_state: Dict[str, Dict[str, torch.Tensor]]
    rank_state: Dict[str, Any] = field(default_factory=dict)  # JSON: step, RNG, loader, LR schedule, config
    meta: Dict[str, Any] = field(default_factory=dict)  # into index.json: layout, model shape, scales, optimizer

    def share(self, grid: Grid) -> "TrainerState":
        """This state with only the tensors this rank writes (`own_names`; the rest are other dp ranks' share)."""
        mine = own_names(self.specs, grid)
        return replace(self, named_params={name: t for name, t in self.named_params.items() if name in mine},
                       optim_state={name: entry for name, entry in self.optim_state.items() if name in mine})


def checkpoint_root(cfg, run_dir: Path) -> Path:
    """`checkpoint.dir`, or `<run_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def due(cfg, step: int) -> bool:
    """Whether `checkpoint.every` asks for a checkpoint after `step`."""
    every = int(cfg.checkpoint.every)
    return every > 0 and step % every == 0


def state_bytes(state: TrainerState) -> int:
    tensors = list(state.named_params.values()) + [v for entry in state.optim_state.values() for v in entry.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class Checkpointer:
    """Saves one rank's part of each checkpoint under `root`, in the background or in the calling thread."""

    def __init__(self, root: Path, grid: Grid, device: torch.device, *, keep: int = 0, asynchronous: bool = True,
                 on_error: str = "stop", keep_every: int = 0):
        self.root, self.grid, self.device, self.keep = Path(root), grid, torch.device(device), keep
        self.keep_every = keep_every  # milestones: checkpoints at multiples of this step are never pruned
        self.asynchronous, self.on_error = asynchronous, on_error
        self.cuda = self.device.type == "cuda"
        self.arenas: Dict[str, FileArena] = {}  # "model" / "optim": kept from one save to the next
        self.writer: Optional[ThreadPoolExecutor] = None
        self.group = None
        if asynchronous:
            self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plait-checkpoint")
            if grid.world_size > 1:  # the writer's own collectives never meet the training's on one group
                self.group = dist.new_group(backend="gloo")
        self.pending: Optional[Future] = None
        self.pending_step: Optional[int] = None
        self.copied = threading.Event()
        self.copied.set()
        self.copy_event = None  # CUDA: the side stream's copies of the latest save
        self.side = torch.cuda.Stream(self.device) if self.cuda else None
        self.stall_s = 0.0  # seconds the training thread last waited for a snapshot (before_update)
        self.last_write: Dict[str, float] = {}  # bytes of files and seconds of the last write (benchmarks)
        self.said_sync = False  # a background save did not fit in host memory (said once)
        self.fault = _fault_from_environment(grid.rank)

    # saving -------------------------------------------------------------------------------------------
    def save(self, state: TrainerState) -> Path:
        """Checkpoint `state`'s step; returns the directory it will have (it exists once the write is done)."""
        state = state.share(self.grid)  # what this rank writes; the snapshot holds only that
        previous = self.pending_step
        waited = self.wait()
        if waited > 0.01 and previous is not None:
            log.info("checkpoint: waited %.2f s for step %s's write to finish before saving step %d", waited,
                     previous, state.step)
        if not self._fits_in_host_memory(state):  # stream the files from the live tensors, in this thread
            return write_checkpoint(self.root, self.grid, self._request(state, {}), self.keep,
                                    agree_over(None, self.device, self.grid.world_size),
                                    lambda phase: self.fault(phase, state.step), self.keep_every)
        request, sources = self._request(state, self._arenas_for(state)), []
        for kind, arena in request.arenas.items():
            live = state.named_params if kind == "model" else optim_file_tensors(state.optim_state)
            sources += [(arena.views[name], tensor) for name, tensor in live.items()]
        if not self.asynchronous:
            for view, source in sources:
                view.copy_(source)
            return self._timed_write(request, agree_over(None, self.device, self.grid.world_size))
        self.copied.clear()
        if self.cuda:
            self._copy_on_side_stream(sources)
        self.pending_step = state.step
        self.pending = self.writer.submit(self._write, request, sources)
        return self.root / step_dir_name(state.step)

    def prepare(self, state: TrainerState) -> None:
        """Make the host buffers in the background now (a run that will save calls this at start), so the first
        save finds them allocated and paged in instead of paying for that while training waits."""
        state = state.share(self.grid)
        if self.asynchronous and self.pending is None and self._fits_in_host_memory(state):
            self.pending_step = None
            self.pending = self.writer.submit(self._arenas_for, state)

    def _arenas_for(self, state: TrainerState) -> Dict[str, FileArena]:
        """The host buffers this rank's files are laid out in (its share of its tp x pp position's tensors; a
        rank with no share holds none), made once and kept while the shapes stay."""
        files = {"model": state.named_params, "optim": optim_file_tensors(state.optim_state)}
        files = {kind: tensors for kind, tensors in files.items() if tensors}
        for kind, tensors in files.items():
            items = items_of(tensors)
            if kind not in self.arenas or not self.arenas[kind].matches(items):
                if kind in self.arenas:
                    self.arenas.pop(kind).close()
                self.arenas[kind] = FileArena(items, pinned=self.cuda)
        return {kind: self.arenas[kind] for kind in files}

    def _request(self, state: TrainerState, arenas: Dict[str, FileArena]) -> SaveRequest:
        """What `write_checkpoint` writes: with arenas, the tensors are their views (the snapshot)."""
        params, optim = state.named_params, state.optim_state
        if "model" in arenas:
            params = {name: arenas["model"].views[name] for name in params}
        if "optim" in arenas:
            optim = {name: {key: arenas["optim"].views[f"{name}/{key}"] for key in entry} for name, entry in optim.items()}
        return SaveRequest(state.step, params, state.specs, optim, state.rank_state, state.meta, arenas)

    def _copy_on_side_stream(self, sources) -> None:
        """Start the device-to-host copies on the side stream, after what the compute stream has queued."""
        compute = torch.cuda.current_stream(self.device)  # captured before entering the side stream
        self.side.wait_stream(compute)
        with torch.cuda.stream(self.side):
            for buffer, source in sources:
                buffer.copy_(source, non_blocking=True)
                source.record_stream(self.side)
            self.copy_event = torch.cuda.Event()
            self.copy_event.record(self.side)
        self.copied.set()

    def _write(self, request: SaveRequest, sources) -> Path:
        """The writer thread: finish the snapshot, then write and publish (or record why not)."""
        try:
            if self.cuda:
                self.copy_event.synchronize()
            else:
                for buffer, source in sources:
                    buffer.copy_(source)
        finally:
            self.copied.set()  # the training thread may update the weights now
        del sources
        return self._timed_write(request, agree_over(self.group, torch.device("cpu"), self.grid.world_size))

    def _timed_write(self, request: SaveRequest, agree) -> Path:
        """Write and publish; remember how many bytes of files this rank wrote, and how long writing took."""
        start = time.perf_counter()
        path = write_checkpoint(self.root, self.grid, request, self.keep, agree,
                                lambda phase: self.fault(phase, request.step), self.keep_every)
        self.last_write = {"seconds": time.perf_counter() - start,
                           "bytes": sum(arena.nbytes for arena in request.arenas.values())}
        return path

    def before_update(self) -> None:
        """Call right before anything updates the weights or the optimizer state (the optimizer step)."""
        if self.cuda:
            if self.copy_event is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copy_event)
            return
        if self.copied.is_set():
            self.stall_s = 0.0
            return
        start = time.perf_counter()
        self.copied.wait()
        self.stall_s = time.perf_counter() - start

    def wait(self) -> float:
        """Wait for the write in flight; returns the seconds waited. Its failure raises (on_error=stop) or is
        reported in one line (continue)."""
        if self.pending is None:
            return 0.0
        start = time.perf_counter()
        pending, self.pending = self.pending, None
        try:
            pending.result()
        except CheckpointError as error:
            if self.on_error == "stop":
                raise
            log.warning("checkpoint: %s Training goes on (checkpoint.on_error=continue).", error)
        return time.perf_counter() - start

    def _fits_in_host_memory(self, state: TrainerState) -> bool:
        """A background save holds a copy of the state in host memory: only where that fits (half of what is
        free), else this save is written in the calling thread, said once."""
        import psutil

        needed = state_bytes(state) - sum(arena.nbytes for arena in self.arenas.values())
        if needed <= 0 or needed < 0.5 * psutil.virtual_memory().available:
            return True
        if not self.said_sync:
            self.said_sync = True
            log.warning("checkpoint: a background save would need %.1f GiB more host memory than is free; "
                        "saving in the training thread instead", needed / 2**30)
        return False

    def close(self) -> None:
        """Finish the write in flight, stop the writer, free the host buffers."""
        try:
            self.wait()
        finally:
            if self.writer is not None:
                self.writer.shutdown(wait=True)
            for arena in self.arenas.values():
                arena.close()
            self.arenas = {}


def _fault_from_environment(rank: int):
    """The test-only kill switch (see the module docstring), read once; a no-op unless asked for."""
    setting = os.environ.get("PLAIT_FAULT_CHECKPOINT")
    if not setting or rank != int(os.environ.get("PLAIT_FAULT_RANK", 0)):
        return lambda reached, step: None
    phase, _, at_step = setting.partition("@")
    if phase not in FAULT_PHASES:
        raise ValueError(f"PLAIT_FAULT_CHECKPOINT={setting}: the phase is not one of {', '.join(FAULT_PHASES)}")
    wanted = {"step": int(at_step) if at_step else None}

    def fault(reached: str, step: int) -> None:
        if wanted["step"] is None:
            wanted["step"] = step  # the first save
        if reached == phase and step == wanted["step"]:
            log.error("PLAIT_FAULT_CHECKPOINT=%s: rank %d is killed mid-save on purpose", phase, rank)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)
    return fault


def resume_target(cfg, root: Path, grid: Grid) -> Optional[Path]:
    """The checkpoint `train.resume` asks for: none, the latest under the root (auto), or a given path.

    Rank 0 first removes temporaries a killed run left under the root; `auto` with no
    checkpoint yet starts fresh.
    """
    mode = str(cfg.train.resume or "none")
    if mode == "none":
        return None
    if mode == "auto":
        if grid.rank == 0:
            for path in clean_temporaries(root):
                log.info("checkpoint: removed %s left by an interrupted save", path)
        if grid.world_size > 1:
            dist.barrier()
        found = latest_checkpoint(root)
        if found is None:
            log.info("checkpoint: train.resume=auto found no checkpoint under %s; starting fresh", root)
        return found
    return resolve(Path(mode))
