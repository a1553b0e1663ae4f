"""Checkpoints: safetensors shards under global parameter names, resumable under any layout.

A checkpoint is one directory per step under the checkpoint root:

    <root>/latest                       text: the name of the newest complete checkpoint
    <root>/step-00000020/index.json     layout, model shape, where each tensor lives, file sizes and hashes
    <root>/step-00000020/model-tp01-pp00.safetensors   tp rank 1's shard of pp stage 0's parameters
    <root>/step-00000020/optim-tp01-pp00.safetensors   the optimizer state of the same parameters
    <root>/step-00000020/rank-00003.json               rank 3's trainer state (step, RNG, loader, config)

What moves where: the dp rank 0 of each (tp, pp) position writes its parameters (this
rank's tp shard, keyed by the full model's names such as `layers.3.attn.wqkv.weight`)
and their optimizer state (`<name>/<key>`, e.g. `layers.3.attn.wqkv.weight/exp_avg`).
The optimizer state comes from `named_state`, which a ZeRO-1 optimizer gathers over dp
first, so the format never depends on dp or ZeRO. Every rank writes its own trainer state.

Atomicity: every rank writes into `<root>/.tmp-step-XXXXXXXX`, each file under a
temporary name, flushed, fsynced and renamed. After a barrier, rank 0 reads the ranks'
JSON (each lists its files' byte counts and CRC-32), writes `index.json`, renames the
directory to `step-XXXXXXXX`, moves `latest`, prunes to the last `keep`, and removes
leftover `.tmp-*` directories of killed runs. A checkpoint without `index.json` is
never read.

Resharding: the loader rebuilds each full tensor from the saved tp shards with the saved
`ShardSpec` (fused Q|K|V and gate|up segments included), cuts or zero-pads vocabulary
padding rows (the padded vocabulary depends on tp), and keeps the shard the new layout
needs. Pipeline stages only decide which parameters a rank holds, so pp and vpp need no
special case. No pickle is read or written anywhere.
"""

import base64
import json
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
import torch.distributed as dist

from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec
from plait.train.tensorfile import (TMP_PREFIX, CheckpointError, fsync_dir, read_safetensors, read_verified,
                                    write_atomic, write_safetensors)

log = logging.getLogger("plait")

FORMAT = "plait-checkpoint"
VERSION = 1
INDEX = "index.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_file(kind: str, tp_rank: int, pp_rank: int) -> str:
    return f"{kind}-tp{tp_rank:02d}-pp{pp_rank:02d}.safetensors"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# what one rank writes ----------------------------------------------------------------
def _spec_record(spec: ShardSpec) -> Dict[str, Any]:
    return {"full_shape": list(spec.full_shape), "dim": spec.dim,
            "segments": list(spec.segments) if spec.segments else None, "valid_rows": spec.valid_rows}


def _spec_of(record: Dict[str, Any]) -> ShardSpec:
    return ShardSpec(tuple(record["full_shape"]), record["dim"],
                     tuple(record["segments"]) if record["segments"] else None, valid_rows=record["valid_rows"])


def _cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def encode_bytes(tensor: torch.Tensor) -> str:
    """A uint8 tensor (an RNG state) as base64 text for JSON."""
    return base64.b64encode(tensor.cpu().numpy().tobytes()).decode("ascii")


def decode_bytes(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


@dataclass
class SaveRequest:
    """Everything one rank contributes to a checkpoint."""

    step: int
    named_params: Dict[str, torch.Tensor]
    specs: Dict[str, ShardSpec]
    optim_state: Optional[Dict[str, Dict[str, torch.Tensor]]] = None
    rank_state: Dict[str, Any] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)  # layout, model config, scales, optimizer name: into index.json


def _write_shards(tmp: Path, grid: Grid, request: SaveRequest) -> Dict[str, Any]:
    """dp rank 0 of each (tp, pp) position writes its model and optimizer shards; returns what it wrote."""
    if grid.dp_rank != 0:
        return {}
    files, params, state = {}, {}, {}
    model_name = shard_file("model", grid.tp_rank, grid.pp_rank)
    tensors = {name: _cpu(param) for name, param in request.named_params.items()}
    files[model_name] = write_safetensors(tmp / model_name, tensors)
    for name, param in request.named_params.items():
        params[name] = {**_spec_record(request.specs[name]), "dtype": str(param.dtype).replace("torch.", ""),
                        "file": model_name}
    if request.optim_state:
        optim_name = shard_file("optim", grid.tp_rank, grid.pp_rank)
        tensors = {}
        for name, entry in request.optim_state.items():
            local_shape = tuple(request.named_params[name].shape)
            kinds = {}
            for key, value in entry.items():
                tensors[f"{name}/{key}"] = _cpu(value)
                kinds[key] = "param" if tuple(value.shape) == local_shape else "replicated"
            state[name] = {"keys": kinds, "file": optim_name}
        files[optim_name] = write_safetensors(tmp / optim_name, tensors)
    return {"files": files, "params": params, "optim": state}


def _barrier(grid: Grid) -> None:
    if grid.world_size > 1:
        dist.barrier()


def _build_index(tmp: Path, grid: Grid, request: SaveRequest) -> Dict[str, Any]:
    """Rank 0 merges every rank's JSON (what it wrote) into one index with sizes and hashes."""
    index = {"format": FORMAT, "version": VERSION, "step": request.step, "created": time.time(),
             **request.meta, "params": {}, "optimizer_state": {}, "files": {}, "ranks": {}}
    for rank in range(grid.world_size):
        name = rank_file(rank)
        data = read_verified(tmp / name, None)
        index["files"][name] = {"bytes": len(data), "crc32": zlib.crc32(data)}
        index["ranks"][str(rank)] = name
        written = json.loads(data).get("written", {})
        tp_rank = str(grid.layout.coords(rank)["tp"])
        index["files"].update(written.get("files", {}))
        for pname, record in written.get("params", {}).items():
            entry = index["params"].setdefault(pname, {key: value for key, value in record.items() if key != "file"})
            entry.setdefault("shards", {})[tp_rank] = record["file"]
        for pname, record in written.get("optim", {}).items():
            entry = index["optimizer_state"].setdefault(pname, {"keys": record["keys"]})
            entry.setdefault("shards", {})[tp_rank] = record["file"]
    return index


def save(root: Path, grid: Grid, request: SaveRequest, keep: int = 0) -> Path:
    """Write one checkpoint collectively (every rank calls this); returns its directory.

    The directory appears under its final name, and `latest` moves to it, only after
    every rank's files are on disk. `keep` > 0 prunes to the newest `keep` checkpoints.
    """
    root = Path(root)
    final = root / step_dir_name(request.step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    try:
        if grid.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        _barrier(grid)
        written = _write_shards(tmp, grid, request)
        write_atomic(tmp / rank_file(grid.rank), json.dumps({**request.rank_state, "written": written}).encode())
        _barrier(grid)
        if grid.rank == 0:
            index = _build_index(tmp, grid, request)
            write_atomic(tmp / INDEX, json.dumps(index, indent=1).encode())
            fsync_dir(tmp)
            _publish(root, tmp, final)
            prune(root, keep)
            log.info("checkpoint: step %d saved to %s", request.step, final)
    except OSError as error:  # a full or read-only disk: the earlier checkpoints are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint.dir={root}: saving step {request.step} failed ({error.strerror or error}); "
                              f"{kept}; free space there or point checkpoint.dir elsewhere.") from None
    _barrier(grid)
    return final


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rename the finished directory into place, then move `latest` to it."""
    if final.exists():  # an older save of the same step (e.g. a resumed run saving again): replace it
        stale = root / f"{TMP_PREFIX}old-{final.name}"
        if stale.exists():
            shutil.rmtree(stale)
        os.replace(final, stale)
        os.replace(tmp, final)
        shutil.rmtree(stale)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    write_atomic(root / LATEST, (final.name + "\n").encode())
    fsync_dir(root)


def complete_checkpoints(root: Path) -> List[Path]:
    """Finished checkpoints under `root` (those with an index), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir()
             if path.is_dir() and path.name.startswith("step-") and (path / INDEX).is_file()]
    return sorted(found, key=lambda path: path.name)


def clean_temporaries(root: Path) -> List[Path]:
    """Remove what killed runs left behind (`.tmp-*` directories and files); returns what was removed."""
    root = Path(root)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed.append(path)
    return removed


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (and never the one `latest` names); drop temporaries."""
    clean_temporaries(root)
    if keep <= 0:
        return
    latest = latest_checkpoint(root)
    for path in complete_checkpoints(root)[:-keep]:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path)


def latest_checkpoint(root: Path, strict: bool = False) -> Optional[Path]:
    """The checkpoint `latest` names under `root`, else the newest complete one, else None.

    `latest` naming a checkpoint that is gone or incomplete is never silent: with `strict` it is
    an error naming both, otherwise a warning before the newest complete one is taken.
    """
    root = Path(root)
    pointer = root / LATEST
    found = complete_checkpoints(root)
    if pointer.is_file():
        named = pointer.read_text().strip()
        path = root / named
        if (path / INDEX).is_file():
            return path
        newest = found[-1].name if found else None
        if strict:
            hint = f"pass {root / newest} to take the newest complete one" if newest else "no complete one is left"
            raise CheckpointError(f"{pointer} names {named}, which is missing or incomplete; {hint}.")
        log.warning("checkpoint: %s names %s, which is missing or incomplete; taking %s", pointer, named, newest)
    return found[-1] if found else None


def resolve(path: Path) -> Path:
    """A checkpoint directory from a checkpoint or a checkpoint root; a clear error when there is none."""
    path = Path(path)
    if (path / INDEX).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist; pass a checkpoint directory "
                              f"(with {INDEX}) or a checkpoint root (with {LATEST}).")
    found = latest_checkpoint(path, strict=True)
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint (no {INDEX} and no {LATEST}); "
                              f"pick another directory.")
    return found


def read_index(path: Path) -> Dict[str, Any]:
    path = resolve(path)
    try:
        index = json.loads((path / INDEX).read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / INDEX} is not valid JSON ({error}); the checkpoint is damaged.") from None
    if index.get("format") != FORMAT:
        raise CheckpointError(f"{path / INDEX} is not a plait checkpoint index (format {index.get('format')!r}).")
    if index.get("version", 0) > VERSION:
        raise CheckpointError(f"{path / INDEX} has format version {index['version']}, newer than this plait "
                              f"reads ({VERSION}); upgrade plait.")
    return index


# reading and resharding ----------------------------------------------------------------
class ShardReader:
    """Reads (and verifies, once per file) the safetensors files of one checkpoint."""

    def __init__(self, path: Path, index: Optional[Dict[str, Any]] = None):
        self.path = resolve(path)
        self.index = index or read_index(self.path)
        self._files: Dict[str, Dict[str, torch.Tensor]] = {}

    def tensors(self, file: str) -> Dict[str, torch.Tensor]:
        if file not in self._files:
            self._files[file] = read_safetensors(self.path / file, self.index["files"].get(file))
        return self._files[file]

    def rank_state(self, rank: int) -> Dict[str, Any]:
        file = self.index["ranks"][str(rank)]
        return json.loads(read_verified(self.path / file, self.index["files"].get(file)))

    def _pieces(self, shards: Dict[str, str], key: str) -> List[torch.Tensor]:
        return [self.tensors(shards[str(rank)])[key] for rank in range(len(shards))]

    def full_param(self, name: str) -> torch.Tensor:
        """Parameter `name` in full (as the saving layout padded it)."""
        record = self.index["params"][name]
        return _spec_of(record).unshard(self._pieces(record["shards"], name))

    def full_state(self, name: str, key: str) -> torch.Tensor:
        """Optimizer state `key` of parameter `name`, in full (replicated state: tp rank 0's copy)."""
        record = self.index["optimizer_state"][name]
        if record["keys"][key] != "param":
            return self.tensors(record["shards"]["0"])[f"{name}/{key}"]
        return _spec_of(self.index["params"][name]).unshard(self._pieces(record["shards"], f"{name}/{key}"))

    def local_param(self, name: str, spec: ShardSpec, tp_rank: int, tp: int) -> torch.Tensor:
        """This rank's shard of `name` under `spec` over `tp`: read directly, or re-sliced from the full tensor."""
        record = self.index["params"][name]
        if len(record["shards"]) == tp and tuple(record["full_shape"]) == tuple(spec.full_shape):
            return self.tensors(record["shards"][str(tp_rank)])[name]
        return spec.shard(fit_rows(self.full_param(name), spec), tp_rank, tp)

    def local_state(self, name: str, key: str, spec: ShardSpec, tp_rank: int, tp: int) -> torch.Tensor:
        record = self.index["optimizer_state"][name]
        if record["keys"][key] != "param":
            return self.full_state(name, key)
        if len(record["shards"]) == tp and tuple(self.index["params"][name]["full_shape"]) == tuple(spec.full_shape):
            return self.tensors(record["shards"][str(tp_rank)])[f"{name}/{key}"]
        return spec.shard(fit_rows(self.full_state(name, key), spec), tp_rank, tp)


def fit_rows(full: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """Cut or zero-pad vocabulary padding rows so `full` has `spec.full_shape` (real rows are kept)."""
    if tuple(full.shape) == tuple(spec.full_shape) or spec.valid_rows is None:
        return full
    out = torch.zeros(spec.full_shape, dtype=full.dtype)
    out[:spec.valid_rows] = full[:spec.valid_rows]
    return out


def check_compatible(index: Dict[str, Any], path: Path, specs: Dict[str, ShardSpec],
                     names: Iterable[str]) -> None:
    """Raise one error listing missing parameters and shape mismatches (padding rows aside)."""
    saved = index["params"]
    missing = [name for name in names if name not in saved]
    mismatched = []
    for name in names:
        if name not in saved:
            continue
        theirs, ours = saved[name], specs[name]
        their_shape, our_shape = list(theirs["full_shape"]), list(ours.full_shape)
        if ours.valid_rows is not None:  # compare real rows, not tp-dependent padding
            their_shape[0], our_shape[0] = theirs["valid_rows"], ours.valid_rows
        if their_shape != our_shape or (theirs["segments"] and ours.segments
                                        and list(theirs["segments"]) != list(ours.segments)):
            mismatched.append(f"{name} (checkpoint {theirs['full_shape']}, model {list(ours.full_shape)})")
    if missing or mismatched:
        parts = []
        if mismatched:
            parts.append(f"shape mismatch: {', '.join(mismatched[:6])}" + (" ..." if len(mismatched) > 6 else ""))
        if missing:
            parts.append(f"missing: {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""))
        raise CheckpointError(f"checkpoint {path} does not fit this model ({'; '.join(parts)}); "
                              f"it was saved from model {_shape_summary(index.get('model', {}))}.")


def _shape_summary(model: Dict[str, Any]) -> str:
    keys = ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size")
    return ", ".join(f"{key}={model[key]}" for key in keys if key in model) or "(unknown)"


@torch.no_grad()
def load_params(reader: ShardReader, named_params: Dict[str, torch.Tensor], specs: Dict[str, ShardSpec],
                grid: Grid) -> None:
    """Copy this rank's slice of every parameter from the checkpoint (re-sliced for this layout)."""
    check_compatible(reader.index, reader.path, specs, named_params)
    for name, param in named_params.items():
        param.copy_(reader.local_param(name, specs[name], grid.tp_rank, grid.tp))


def load_optim_state(reader: ShardReader, named_params: Dict[str, torch.Tensor], specs: Dict[str, ShardSpec],
                     grid: Grid) -> Dict[str, Dict[str, torch.Tensor]]:
    """This rank's named optimizer state (tp shard, full over dp), as `load_named_state` takes it."""
    saved = reader.index.get("optimizer_state", {})
    state = {}
    for name in named_params:
        if name in saved:
            state[name] = {key: reader.local_state(name, key, specs[name], grid.tp_rank, grid.tp)
                           for key in saved[name]["keys"]}
    return state


def same_layout(index: Dict[str, Any], grid: Grid, vpp: int = 1) -> bool:
    layout = index.get("layout", {})
    return (layout.get("world_size"), layout.get("tp"), layout.get("pp"), layout.get("dp"), layout.get("vpp", 1)) == \
        (grid.world_size, grid.tp, grid.pp, grid.dp, vpp)


def load_full_model(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(index, {name: full tensor with vocabulary padding cut to the real rows}): for export and tools."""
    reader = ShardReader(path)
    full = {}
    for name, record in reader.index["params"].items():
        tensor = reader.full_param(name)
        if record["valid_rows"] is not None:
            tensor = tensor[:record["valid_rows"]].clone()
        full[name] = tensor
    return reader.index, full


# the trainer's side: what a run saves and restores ---------------------------------------
def checkpoint_root(cfg, run_dir: Path) -> Path:
    """`checkpoint.dir`, or `<run_dir>/checkpoints`."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(run_dir) / "checkpoints"


def _chunks(trainer) -> list:
    """The trainer's model chunks (one, or several under a pipeline)."""
    model = getattr(trainer, "chunks", None) or trainer.model
    return list(model) if isinstance(model, (list, tuple, torch.nn.ModuleList)) else [model]


def _parallel_rng(trainer):
    """The `ParallelRNG` dropout draws from (the model keeps it as `rng`), or None."""
    return getattr(trainer, "rng", None) or getattr(_chunks(trainer)[0], "rng", None)


def _rng_state(trainer) -> Dict[str, Any]:
    state = {"torch": encode_bytes(torch.get_rng_state())}
    if trainer.device.type == "cuda":
        state["cuda"] = encode_bytes(torch.cuda.get_rng_state(trainer.device))
    rng = _parallel_rng(trainer)
    if rng is not None:
        state["parallel"] = {key: encode_bytes(value) for key, value in rng.state().items()}
    return state


def _load_rng_state(trainer, state: Dict[str, Any]) -> None:
    torch.set_rng_state(decode_bytes(state["torch"]))
    if "cuda" in state and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(decode_bytes(state["cuda"]), trainer.device)
    rng = _parallel_rng(trainer)
    if rng is not None and "parallel" in state:
        rng.load_state({key: decode_bytes(value) for key, value in state["parallel"].items()})


def model_meta(model_cfg, scales=None) -> Dict[str, Any]:
    """The model's shape (as the index records it, with ffn_dim and n_kv_heads filled in) and muP scales."""
    from dataclasses import asdict, is_dataclass

    from omegaconf import OmegaConf

    from plait.train.config import ffn_dim, kv_heads

    model = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else \
        (asdict(model_cfg) if is_dataclass(model_cfg) else dict(model_cfg))
    model.update(ffn_dim=ffn_dim(model_cfg), n_kv_heads=kv_heads(model_cfg))
    return {"model": model, "scales": asdict(scales) if is_dataclass(scales) else None}


def layout_meta(grid: Grid, vpp: int = 1, zero: int = 0, sequence_parallel: bool = False) -> Dict[str, Any]:
    return {"layout": {"world_size": grid.world_size, "tp": grid.tp, "pp": grid.pp, "dp": grid.dp, "vpp": int(vpp),
                       "zero": int(zero), "sequence_parallel": bool(sequence_parallel)}}


def _trainer_meta(trainer) -> Dict[str, Any]:
    cfg = trainer.cfg
    return {**layout_meta(trainer.grid, cfg.parallel.vpp, cfg.parallel.zero, cfg.parallel.sequence_parallel),
            **model_meta(cfg.model, getattr(_chunks(trainer)[0], "scales", None)), "optimizer": cfg.optim.name}


def save_trainer(trainer) -> Path:
    """Checkpoint a `Trainer` at its current step (every rank calls this)."""
    from omegaconf import OmegaConf

    from plait.optim.schedule import lr_factor
    from plait.optim.state import named_state

    cfg = trainer.cfg
    optim_state = named_state(trainer.optimizer, trainer.named_params)  # collective under ZeRO-1
    loader_state = trainer.loader.state() if hasattr(trainer.loader, "state") else None
    rank_state = {"step": trainer.step_num, "rank": trainer.grid.rank, "rng": _rng_state(trainer),
                  "loader": loader_state,
                  "lr_schedule": {"step": trainer.step_num, "total_steps": int(cfg.train.steps),
                                  "factor": lr_factor(trainer.step_num, int(cfg.train.steps), cfg.optim)},
                  "config": OmegaConf.to_container(cfg, resolve=True)}
    request = SaveRequest(trainer.step_num, trainer.named_params, trainer.specs, optim_state, rank_state,
                          _trainer_meta(trainer))
    return save(trainer.checkpoint_dir, trainer.grid, request, keep=int(cfg.checkpoint.keep))


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
        _barrier(grid)
        found = latest_checkpoint(root)
        if found is None:
            log.info("checkpoint: train.resume=auto found no checkpoint under %s; starting fresh", root)
        return found
    return resolve(Path(mode))


def restore_trainer(trainer, path: Path) -> None:
    """Load model, optimizer, step, RNG and loader position into a built `Trainer` (any layout)."""
    from plait.optim.state import load_named_state

    reader = ShardReader(path)
    grid = trainer.grid
    if int(reader.index["step"]) > int(trainer.cfg.train.steps):
        raise CheckpointError(f"{reader.path} is at step {reader.index['step']}, past train.steps="
                              f"{trainer.cfg.train.steps}; raise train.steps to train on, or resume an earlier "
                              f"checkpoint.")
    load_params(reader, trainer.named_params, trainer.specs, grid)
    optim_state = load_optim_state(reader, trainer.named_params, trainer.specs, grid)
    load_named_state(trainer.optimizer, trainer.named_params, optim_state)  # ZeRO-1 keeps its dp shard
    same = same_layout(reader.index, grid, int(trainer.cfg.parallel.vpp))
    rank_state = reader.rank_state(grid.rank if same else 0)
    trainer.step_num = int(rank_state["step"])
    if rank_state.get("loader") is not None and hasattr(trainer.loader, "load_state"):
        trainer.loader.load_state(rank_state["loader"])  # (seed, step, global batch): the same under any dp
    if same:
        _load_rng_state(trainer, rank_state["rng"])
    else:
        log.info("checkpoint: layout changed (%s -> %s); per-rank RNG streams start from the seed",
                 reader.index.get("layout"), grid.layout.describe())
    log.info("checkpoint: resumed from %s at step %d", reader.path, trainer.step_num)


def due(cfg, step: int) -> bool:
    """Whether `checkpoint.every` asks for a checkpoint after `step`."""
    every = int(cfg.checkpoint.every)
    return every > 0 and step % every == 0
