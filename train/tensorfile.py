"""Files a checkpoint is made of: written atomically with their size and checksum, read back verified.

`write_safetensors` streams tensors into the safetensors format (an 8-byte little-endian
header length, a JSON header of dtype, shape and byte offsets, then the raw bytes) straight
from each tensor's memory, computing the CRC-32C of what it writes on the way: one pass and
no serialized copy of the whole file in memory (`safetensors.torch.save` makes two).
`read_safetensors` maps the file (copy-on-write), checks its size and CRC-32C on the mapped
pages, and returns tensors that view the mapping: no read copy, no deserialize copy; the
caller's `copy_` into its parameters is the only one. Tests check both against the
safetensors library, and transformers reads the exported files.

Every write goes to a temporary name in the same directory, is flushed and fsynced, then
renamed, so a reader sees the old file or the whole new one, never half of it.
"""

import json
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import crc32c
import torch

TMP_PREFIX = ".tmp-"

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_CODES = {code: dtype for dtype, code in _DTYPES.items()}


CHECKSUM = "crc32c"  # CRC-32C (Castagnoli), hardware-accelerated: 10+ GB/s a core, so checking never slows I/O


def checksum(data, value: int = 0) -> int:
    """The running CRC-32C of `data` (any buffer) after `value`; releases the GIL on large buffers."""
    return crc32c.crc32c(data, value)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or does not fit the model; one sentence naming the file or keys."""


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (best effort: some filesystems refuse directory fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")


def _finish(handle, tmp: Path, path: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes) -> Dict[str, Any]:
    """Write `data` to `path` via a temporary name (flush, fsync, rename); returns its size and CRC-32C."""
    path, tmp = Path(path), _tmp_name(Path(path))
    handle = open(tmp, "wb")
    handle.write(data)
    _finish(handle, tmp, path)
    return {"bytes": len(data), CHECKSUM: checksum(data)}


def _raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor without copying them (any dtype, any shape, 0-d included)."""
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def safetensors_layout(items: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]],
                       metadata: Optional[Dict[str, str]] = None) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    """(the file's prefix: length and JSON header, {name: (byte offset in the file, byte count)}) for tensors of
    these dtypes and shapes, in the order the file holds them (widest dtypes first, as the reference writer
    orders them: every tensor starts aligned to its element size)."""
    header, offset, sizes = {"__metadata__": dict(metadata or {"format": "pt"})}, 0, {}
    for name, (dtype, shape) in sorted(items.items(), key=lambda item: (-item[1][0].itemsize, item[0])):
        if dtype not in _DTYPES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors code")
        size = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        sizes[name] = (offset, size)
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as the reference writer does
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, {name: (len(prefix) + start, size) for name, (start, size) in sizes.items()}


def write_safetensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None,
                      after_tensor: Optional[Callable[[], None]] = None) -> Dict[str, Any]:
    """Write CPU `tensors` as one safetensors file, atomically; returns its size and CRC-32C.

    `after_tensor()` runs after each tensor's bytes are written (tests stop a write there)."""
    prefix, places = safetensors_layout({name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}, metadata)
    path, tmp = Path(path), _tmp_name(Path(path))
    crc = checksum(prefix)
    handle = open(tmp, "wb")
    handle.write(prefix)
    for name in sorted(places, key=lambda name: places[name][0]):
        raw = _raw(tensors[name])
        handle.write(raw)
        crc = checksum(raw, crc)
        if after_tensor is not None:
            after_tensor()
    _finish(handle, tmp, path)
    return {"bytes": len(prefix) + sum(size for _, size in places.values()), CHECKSUM: crc}


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete, pick another one.")


def read_verified(path: Path, record: Optional[Dict[str, Any]]) -> bytes:
    """The bytes of `path`, checked against the size and checksum in `record` (None: unchecked)."""
    path = Path(path)
    _require_file(path)
    data = path.read_bytes()
    _check(path, len(data), data, record)
    return data


def _check(path: Path, size: int, data, record: Optional[Dict[str, Any]]) -> None:
    """Compare a file's size, then its checksum (computed only when the size matches), with `record`: CRC-32C
    for checkpoints of format 2, zlib's CRC-32 for format 1's."""
    if record is None:
        return
    if size != record["bytes"]:
        raise CheckpointError(f"checkpoint file {path} has {size} bytes but the index records "
                              f"{record['bytes']} (truncated or overwritten); pick another checkpoint.")
    kind = CHECKSUM if CHECKSUM in record else "crc32"
    crc = checksum(data) if kind == CHECKSUM else zlib.crc32(data)
    if crc != record[kind]:
        raise CheckpointError(f"checkpoint file {path} fails its {kind} check (index {record[kind]:08x}, "
                              f"file {crc:08x}): it is corrupted; pick another checkpoint.")


def read_safetensors(path: Path, record: Optional[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    """{name: tensor} of a safetensors file, verified against `record`; tensors view a private file mapping."""
    path = Path(path)
    _require_file(path)
    size = path.stat().st_size
    if size == 0:
        _check(path, 0, lambda: 0, record)
        raise CheckpointError(f"checkpoint file {path} is empty; pick another checkpoint.")
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # writable for torch, never written back
    _check(path, size, mapped, record)
    try:
        (length,) = struct.unpack("<Q", mapped[:8])
        header = json.loads(mapped[8:8 + length])
        base = 8 + length
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype, shape = _CODES[entry["dtype"]], entry["shape"]
            begin, end = entry["data_offsets"]
            count = end - begin
            if count == 0:
                tensors[name] = torch.empty(shape, dtype=dtype)
            elif (base + begin) % dtype.itemsize == 0:
                tensors[name] = torch.frombuffer(mapped, dtype=dtype, count=count // dtype.itemsize,
                                                 offset=base + begin).view(shape)
            else:  # a writer that did not align: copy the bytes out
                raw = torch.frombuffer(mapped, dtype=torch.uint8, count=count, offset=base + begin).clone()
                tensors[name] = raw.view(dtype).view(shape)
            if base + end > size:
                raise ValueError(f"tensor {name} ends past the end of the file")
    except (ValueError, KeyError, struct.error, json.JSONDecodeError) as error:
        raise CheckpointError(f"checkpoint file {path} is not readable safetensors ({error}).") from None
    return tensors
