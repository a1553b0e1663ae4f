"""Checkpoints: safetensors shards under global parameter names, resumable under any layout.

A checkpoint is one directory per step under the checkpoint root:

    <root>/latest                       text: the name of the newest complete checkpoint
    <root>/step-00000020/index.json     layout, model shape, where each tensor lives, file sizes and hashes
    <root>/step-00000020/model-tp01-pp00.safetensors   tp rank 1's shard of pp stage 0's parameters
    <root>/step-00000020/optim-tp01-pp00.safetensors   the optimizer state of the same parameters
                                        (-partNNN before .safetensors: one of several dp writers' share)
    <root>/step-00000020/rank-00003.json               rank 3's trainer state (step, RNG, loader, config)

What moves where: the ranks of each (tp, pp) position's gradient group (dp, times cp)
share the writing of its parameters (this tp shard, keyed by the full model's names such as
`layers.3.attn.wqkv.weight`) and their optimizer state (`<name>/<key>`, e.g.
`layers.3.attn.wqkv.weight/exp_avg`): each whole tensor goes to one of them (`writers`,
balanced by bytes), which writes it into its own pair of files,
`model-tp01-pp00-part003.safetensors` and `optim-...` (one writer: no `-partNNN`). So dp
ranks write in parallel, each holds about 1/dp of the snapshot, and under ZeRO-2/3 each
tensor is gathered whole on its writer only. The files hold whole tensors under
their names, so the format never depends on dp or ZeRO. Every rank writes its own trainer
state.

Atomicity (`write_checkpoint`): every rank writes into `<root>/.tmp-step-XXXXXXXX`, each
file under a temporary name, flushed, fsynced and renamed. The ranks then agree that every
part is on disk (`agree`, an all-reduce of "ok" over a group: the default one for a save
in the training thread, a group of its own for the background writer); only then does rank
0 read the ranks' JSON (each lists its files' byte counts and CRC-32C), write `index.json`,
rename the directory to `step-XXXXXXXX`, move `latest`, prune to the last `keep` and remove
leftover `.tmp-*` directories. A checkpoint without `index.json` is never read, and `latest`
only ever names a complete one: a crash at any moment leaves the previous checkpoint as it
was. A write that fails (a full disk) on any rank fails on every rank, removes its
temporary directory and names `checkpoint.dir`.

Reading and resharding across layouts: `plait.train.reshard`. When and how a run saves
(in the background) and resumes: `plait.train.checkpointer`. No pickle is read or written.
"""

import base64
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from plait.parallel.grid import Grid
from plait.parallel.sharding import ShardSpec
from plait.train.filearena import write_arena
from plait.train.tensorfile import (CHECKSUM, TMP_PREFIX, CheckpointError, checksum, fsync_dir, read_verified,
                                    write_atomic, write_safetensors)

log = logging.getLogger("plait")

FORMAT = "plait-checkpoint"
VERSION = 2  # 2: files checked with CRC-32C (1: zlib CRC-32, still read)
INDEX = "index.json"
LATEST = "latest"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def shard_file(kind: str, tp_rank: int, pp_rank: int, part: int = 0, parts: int = 1) -> str:
    """The file of (tp, pp) position's tensors that writer `part` of `parts` writes."""
    share = f"-part{part:03d}" if parts > 1 else ""
    return f"{kind}-tp{tp_rank:02d}-pp{pp_rank:02d}{share}.safetensors"


def writers(specs: Dict[str, ShardSpec], tp: int, parts: int) -> Dict[str, int]:
    """{parameter name: the writer (grad-group rank) that saves it and its optimizer state}.

    Largest tensor first, each to the writer with the fewest bytes so far (ties: the lower
    rank), so every writer gets about 1/parts of the bytes. It depends only on the names and
    shapes, which every rank of a gradient group shares, so they all agree without a message.
    """
    load, owner = [0] * parts, {}
    sizes = {name: math.prod(spec.local_shape(tp)) for name, spec in specs.items()}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        part = min(range(parts), key=lambda p: (load[p], p))
        owner[name] = part
        load[part] += sizes[name]
    return owner


def writer_ranks(specs: Dict[str, ShardSpec], grid: Grid) -> Dict[str, int]:
    """{parameter name: the global rank that writes it}: `writers` over this rank's grad group; an expert's own
    weights (expert parallelism: other ep ranks hold other experts) over the ranks holding that expert."""
    dense = {name: spec for name, spec in specs.items() if not spec.expert}
    experts = {name: spec for name, spec in specs.items() if spec.expert}
    owners = {name: grid.grad_member(part) for name, part in writers(dense, grid.tp, grid.grad_size).items()}
    owners.update({name: grid.expert_grad_member(part)
                   for name, part in writers(experts, grid.tp, grid.expert_grad_size).items()})
    return owners


def own_names(specs: Dict[str, ShardSpec], grid: Grid) -> set:
    """The names of the parameters (and their optimizer state) this rank writes into a checkpoint."""
    return {name for name, rank in writer_ranks(specs, grid).items() if rank == grid.rank}


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.json"


# what one rank writes ----------------------------------------------------------------
def _spec_record(spec: ShardSpec) -> Dict[str, Any]:
    return {"full_shape": list(spec.full_shape), "dim": spec.dim,
            "segments": list(spec.segments) if spec.segments else None, "valid_rows": spec.valid_rows}


def spec_of(record: Dict[str, Any]) -> ShardSpec:
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
    arenas: Dict[str, Any] = field(default_factory=dict)  # "model" / "optim": a FileArena already holding the file


Fault = Callable[[str], None]  # called at each phase of a write (tests kill the process there)


def _no_fault(phase: str) -> None:
    pass


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
    return {"layout": {"world_size": grid.world_size, "tp": grid.tp, "pp": grid.pp, "dp": grid.dp, "cp": grid.cp,
                       "ep": grid.ep, "vpp": int(vpp),
                       "zero": int(zero), "sequence_parallel": bool(sequence_parallel)}}


def _write_shards(tmp: Path, grid: Grid, request: SaveRequest, fault: Fault) -> Dict[str, Any]:
    """This rank's share (`own_names`) of its (tp, pp) position's parameters and optimizer state, in its own
    pair of files; returns what it wrote."""
    mine = own_names(request.specs, grid)
    named_params = {name: tensor for name, tensor in request.named_params.items() if name in mine}
    if not named_params:
        return {}
    part = (grid.grad_rank, grid.grad_size)
    files, params, state = {}, {}, {}
    model_name = shard_file("model", grid.tp_rank, grid.pp_rank, *part)
    files[model_name] = _write_file(tmp / model_name, request.arenas.get("model"), named_params, fault)
    for name, param in named_params.items():
        params[name] = {**_spec_record(request.specs[name]), "dtype": str(param.dtype).replace("torch.", ""),
                        "file": model_name}
    optim_state = {name: entry for name, entry in (request.optim_state or {}).items() if name in mine}
    if optim_state:
        optim_name = shard_file("optim", grid.tp_rank, grid.pp_rank, *part)
        for name, entry in optim_state.items():
            local_shape = tuple(named_params[name].shape)
            kinds = {key: "param" if tuple(value.shape) == local_shape else "replicated" for key, value in entry.items()}
            state[name] = {"keys": kinds, "file": optim_name}
        files[optim_name] = _write_file(tmp / optim_name, request.arenas.get("optim"),
                                        optim_file_tensors(optim_state), fault)
    return {"files": files, "params": params, "optim": state}


def optim_file_tensors(optim_state: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The optimizer file's tensors: `<param name>/<state key>`."""
    return {f"{name}/{key}": value for name, entry in optim_state.items() for key, value in entry.items()}


def _write_file(path: Path, arena, tensors: Dict[str, torch.Tensor], fault: Fault) -> Dict[str, Any]:
    """One safetensors file: from its arena (the bytes already laid out: O_DIRECT) or streamed from the tensors."""
    if arena is not None:
        return write_arena(path, arena, after_chunk=lambda: fault("tensor"))
    return write_safetensors(path, {name: _cpu(t) for name, t in tensors.items()}, after_tensor=lambda: fault("tensor"))


def _build_index(tmp: Path, grid: Grid, request: SaveRequest) -> Dict[str, Any]:
    """Rank 0 merges every rank's JSON (what it wrote) into one index with sizes and hashes."""
    index = {"format": FORMAT, "version": VERSION, "step": request.step, "created": time.time(),
             **request.meta, "params": {}, "optimizer_state": {}, "files": {}, "ranks": {}}
    for rank in range(grid.world_size):
        name = rank_file(rank)
        data = read_verified(tmp / name, None)
        index["files"][name] = {"bytes": len(data), CHECKSUM: checksum(data)}
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


Agree = Callable[[bool], bool]  # every rank's "my part is done": True when all of them are


def agree_over(group, device: torch.device, world_size: int) -> Agree:
    """`agree` as an all-reduce (min) of one flag over `group` (nothing to ask in one process)."""
    def agree(ok: bool) -> bool:
        if world_size == 1:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        return bool(flag.item())
    return agree


def write_checkpoint(root: Path, grid: Grid, request: SaveRequest, keep: int, agree: Agree,
                     fault: Fault = _no_fault, keep_every: int = 0) -> Path:
    """Write one checkpoint (every rank calls this with its part); returns its directory.

    The directory appears under its final name, and `latest` moves to it, only once every
    rank's files are on disk. `keep` > 0 prunes to the newest `keep` checkpoints (and the
    milestones at multiples of `keep_every`). A failure
    on any rank (a full or read-only disk) is a CheckpointError on every rank, naming
    `checkpoint.dir`; the temporary directory is removed and `latest` is untouched.
    """
    root = Path(root)
    final = root / step_dir_name(request.step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    problem = _attempt(lambda: _fresh_directory(tmp) if grid.rank == 0 else None)
    if agree(problem is None):
        problem = _attempt(lambda: _write_part(tmp, grid, request, fault))
    else:
        problem = problem or "another rank could not start it"
    if agree(problem is None):
        if grid.rank == 0:
            problem = _attempt(lambda: _publish(root, tmp, final, grid, request, fault))
    else:
        problem = problem or "another rank could not write its part"
    if agree(problem is None):
        if grid.rank == 0:
            _prune_quietly(root, keep, keep_every)
        return final
    if grid.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(root)
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"checkpoint.dir={root}: saving step {request.step} failed "
                          f"({problem or 'rank 0 could not publish it'}); {kept}; free space there or point "
                          f"checkpoint.dir elsewhere.")


def _prune_quietly(root: Path, keep: int, keep_every: int = 0) -> None:
    """Prune after publishing: a failure to remove an old checkpoint costs disk, not the new one."""
    try:
        prune(root, keep, keep_every)
    except OSError as error:
        log.warning("checkpoint: could not remove old checkpoints under %s (%s)", root, error.strerror or error)


def _attempt(work: Callable[[], None]) -> Optional[str]:
    """None if `work()` ran, else the OS's reason it could not (a full or read-only disk)."""
    try:
        work()
    except OSError as error:
        return error.strerror or str(error)
    return None


def _fresh_directory(tmp: Path) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)


def _write_part(tmp: Path, grid: Grid, request: SaveRequest, fault: Fault) -> None:
    """This rank's files: its share of its tp x pp position's tensors and its JSON."""
    fault("files")
    written = _write_shards(tmp, grid, request, fault)
    write_atomic(tmp / rank_file(grid.rank), json.dumps({**request.rank_state, "written": written}).encode())
    fault("rank-files")


def save(root: Path, grid: Grid, request: SaveRequest, keep: int = 0) -> Path:
    """Write one checkpoint collectively from the calling thread (every rank calls this); returns its directory."""
    return write_checkpoint(root, grid, request, keep, agree_over(None, grid.device, grid.world_size))


def _publish(root: Path, tmp: Path, final: Path, grid: Grid, request: SaveRequest, fault: Fault) -> None:
    """Rank 0: the index, then rename the finished directory into place, then move `latest` to it."""
    index = _build_index(tmp, grid, request)
    write_atomic(tmp / INDEX, json.dumps(index, indent=1).encode())
    fsync_dir(tmp)
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
    fault("renamed")
    write_atomic(root / LATEST, (final.name + "\n").encode())
    fsync_dir(root)
    fault("published")
    log.info("checkpoint: step %d saved to %s", request.step, final)


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


def step_of(path: Path) -> int:
    """The step a checkpoint directory (`step-XXXXXXXX`) holds."""
    return int(Path(path).name.split("-", 1)[1])


def prune(root: Path, keep: int, keep_every: int = 0) -> None:
    """Keep the newest `keep` complete checkpoints, every milestone (a step that is a multiple of `keep_every`,
    when > 0) and the one `latest` names; drop temporaries."""
    clean_temporaries(root)
    if keep <= 0:
        return
    latest = latest_checkpoint(root)
    for path in complete_checkpoints(root)[:-keep]:
        milestone = keep_every > 0 and step_of(path) % keep_every == 0
        if not milestone and (latest is None or path.resolve() != latest.resolve()):
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


