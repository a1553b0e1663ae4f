"""Reading a checkpoint back under any layout: shards verified once, full tensors rebuilt, re-sliced.

The reader rebuilds each full tensor from the saved tp shards with the saved `ShardSpec`
(fused Q|K|V and gate|up segments included), cuts or zero-pads vocabulary padding rows
(the padded vocabulary depends on tp), and keeps the shard the new layout needs. Pipeline
stages only decide which parameters a rank holds, so pp and vpp need no special case, and
the optimizer state is name-keyed and whole over dp, so dp and ZeRO need none either.
"""

import json
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec
from plait.train.checkpoint import read_index, resolve, spec_of
from plait.train.tensorfile import CheckpointError, read_safetensors, read_verified


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
        return spec_of(record).unshard(self._pieces(record["shards"], name))

    def full_state(self, name: str, key: str) -> torch.Tensor:
        """Optimizer state `key` of parameter `name`, in full (replicated state: tp rank 0's copy)."""
        record = self.index["optimizer_state"][name]
        if record["keys"][key] != "param":
            return self.tensors(record["shards"]["0"])[f"{name}/{key}"]
        return spec_of(self.index["params"][name]).unshard(self._pieces(record["shards"], f"{name}/{key}"))

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
                     names: Iterable[str], sources: Optional[Dict[str, str]] = None) -> None:
    """Raise one error listing missing parameters and shape mismatches (padding rows aside). `sources`: the
    checkpoint name a parameter is read from where it is not its own (a tied copy reads the embedding)."""
    saved, sources = index["params"], sources or {}
    names = list(names)
    missing = [sources.get(name, name) for name in names if sources.get(name, name) not in saved]
    mismatched = []
    for name in names:
        if sources.get(name, name) not in saved:
            continue
        theirs, ours = saved[sources.get(name, name)], specs[name]
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
                grid: Grid, sources: Optional[Dict[str, str]] = None) -> None:
    """Copy this rank's slice of every parameter from the checkpoint (re-sliced for this layout); `sources`
    names the checkpoint tensor a parameter reads where it is not its own (a tied copy: the embedding)."""
    sources = sources or {}
    check_compatible(reader.index, reader.path, specs, named_params, sources)
    for name, param in named_params.items():
        param.copy_(reader.local_param(sources.get(name, name), specs[name], grid.tp_rank, grid.tp))


def load_optim_state(reader: ShardReader, named_params: Dict[str, torch.Tensor], specs: Dict[str, ShardSpec],
                     grid: Grid, sources: Optional[Dict[str, str]] = None) -> Dict[str, Dict[str, torch.Tensor]]:
    """This rank's named optimizer state (tp shard, full over dp), as `load_named_state` takes it (`sources`:
    as in `load_params`)."""
    saved, sources = reader.index.get("optimizer_state", {}), sources or {}
    state = {}
    for name in named_params:
        source = sources.get(name, name)
        if source in saved:
            state[name] = {key: reader.local_state(source, key, specs[name], grid.tp_rank, grid.tp)
                           for key in saved[source]["keys"]}
    return state


def same_layout(index: Dict[str, Any], grid: Grid, vpp: int = 1) -> bool:
    layout = index.get("layout", {})
    return (layout.get("world_size"), layout.get("tp"), layout.get("pp"), layout.get("dp"), layout.get("cp", 1),
            layout.get("ep", 1), layout.get("vpp", 1)) == (grid.world_size, grid.tp, grid.pp, grid.dp, grid.cp,
                                                           grid.ep, vpp)


def resolve_checkpoint(checkpoint: Path) -> Path:
    """What the tools read: a run directory's checkpoint root, else `checkpoint` itself (a checkpoint directory or a
    checkpoint root); a path that does not exist is a CheckpointError."""
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise CheckpointError(f"{checkpoint} does not exist; pass a checkpoint directory (with index.json), a "
                              f"checkpoint root (with latest), or a run directory.")
    return checkpoint / "checkpoints" if (checkpoint / "checkpoints").is_dir() else checkpoint


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


