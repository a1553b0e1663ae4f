"""The unified tensor (PyTorch-Direct, Min et al. 2021): host memory the GPU indexes directly.

A host array (here a memory-mapped token file) is registered with CUDA in place
(`cudaHostRegister`: its pages are pinned and mapped into the GPU's address space, no copy)
and viewed as a CUDA tensor through `__cuda_array_interface__`. `gather(index)` with a CUDA
index then runs `index_select` on the GPU, whose threads read exactly the rows they need
over PCIe/NVLink: no CPU gather, no staging buffer, no separate host-to-device copy. Under
UVA the registered host pointer is also the device pointer. `close()` unregisters the
memory (also done when the object is collected).

The mode is chosen once, at construction, and logged once per mode:

- "unified": registered host memory gathered by the GPU (CUDA device, registration worked);
- "staged": gather on the CPU, then copy the rows to the device (CUDA without registration:
  the usual pinned-staging path, and the baseline the benchmark compares against);
- "host": the device is the CPU; the tensor is the host array itself, same API and results.
"""

import warnings
import weakref
from typing import Optional

import numpy as np
import torch

from plait.common.logs import log_once

HOST_REGISTER_PORTABLE, HOST_REGISTER_MAPPED, HOST_REGISTER_READ_ONLY = 1, 2, 8


def _log_once(mode: str, why: str) -> None:
    log_once(f"data: {mode} gather ({why})")


class _CudaView:
    """Describes registered host memory to `torch.as_tensor` as CUDA memory (the CUDA array interface)."""

    def __init__(self, pointer: int, shape, typestr: str):
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr, "data": (pointer, False),
                                         "version": 3, "strides": None}


def _register(pointer: int, nbytes: int) -> Optional[str]:
    """cudaHostRegister the range read-only if the driver can, else writable; None on success, else the error."""
    cudart = torch.cuda.cudart()
    error = None
    for flags in (HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED | HOST_REGISTER_READ_ONLY,
                  HOST_REGISTER_PORTABLE | HOST_REGISTER_MAPPED):
        code = cudart.cudaHostRegister(pointer, nbytes, flags)
        if int(code) == 0:
            return None
        error = str(code)
    return error


def _unregister(pointer: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(pointer)
    except Exception:  # interpreter shutdown: CUDA may be gone already
        pass


def host_tensor(array: np.ndarray) -> torch.Tensor:
    """A CPU tensor over `array`'s memory (read-only maps included; nothing is written through it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.from_numpy(array)


class UnifiedTensor:
    """Rows of a host array, gathered on `device`: `gather(index)` == `tensor[index]` along dim 0, on the device."""

    def __init__(self, array: np.ndarray, device: torch.device = torch.device("cpu"), mode: str = "auto"):
        if not array.flags["C_CONTIGUOUS"]:
            raise ValueError("UnifiedTensor needs a C-contiguous host array")
        self.array, self.device = array, torch.device(device)
        self.host = host_tensor(array)
        self.mode = self._choose_mode(mode)
        self._finalizer, self.parent = None, None
        self._pinned = self._copied = None
        if self.mode == "unified":
            pointer = array.ctypes.data
            self._finalizer = weakref.finalize(self, _unregister, pointer)
            view = _CudaView(pointer, array.shape, array.dtype.str)
            self.view = torch.as_tensor(view, device=self.device)
        else:
            self.view = self.host

    def _choose_mode(self, mode: str) -> str:
        if self.device.type != "cuda":
            _log_once("host", f"device {self.device}")
            return "host"
        if mode == "staged":
            return "staged"
        error = _register(self.array.ctypes.data, self.array.nbytes) if self.array.nbytes else "empty array"
        if error is None:
            _log_once("unified", "host memory registered with CUDA and read by the GPU in place")
            return "unified"
        if mode == "unified":
            raise RuntimeError(f"cudaHostRegister failed ({error}); cannot make a unified tensor")
        _log_once("staged", f"cudaHostRegister failed ({error}); gathering on the CPU and copying")
        return "staged"

    def strided(self, size, stride, offset: int = 0) -> "UnifiedTensor":
        """A strided view (e.g. overlapping windows) sharing this tensor's memory and registration."""
        child = object.__new__(UnifiedTensor)
        child.array, child.device, child.mode, child.parent = self.array, self.device, self.mode, self
        child._finalizer, child._pinned, child._copied = None, None, None
        child.host = self.host.as_strided(size, stride, offset)
        child.view = self.view.as_strided(size, stride, offset) if self.mode == "unified" else child.host
        return child

    @property
    def shape(self):
        return self.host.shape

    @property
    def dtype(self):
        return self.host.dtype

    def __len__(self) -> int:
        return len(self.host)

    def index_device(self) -> torch.device:
        """Where `gather` wants its index: the GPU for "unified", the CPU otherwise."""
        return self.device if self.mode == "unified" else torch.device("cpu")

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` (a 1-D integer tensor on `index_device()`), returned on `self.device`."""
        if self.mode != "staged":
            return torch.index_select(self.view, 0, index)
        return self._gather_staged(index)

    def _gather_staged(self, index: torch.Tensor) -> torch.Tensor:
        """CPU gather into a reused pinned buffer, then an async copy; the next call waits for that copy."""
        shape = (len(index), *self.host.shape[1:])
        if self._copied is not None:
            self._copied.synchronize()
        if self._pinned is None or self._pinned.numel() < int(np.prod(shape)):
            self._pinned = torch.empty(int(np.prod(shape)), dtype=self.host.dtype).pin_memory()
        staging = self._pinned[:int(np.prod(shape))].view(shape)
        torch.index_select(self.host, 0, index, out=staging)
        rows = staging.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return rows

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        flat = index.reshape(-1).to(self.index_device())
        return self.gather(flat).reshape(*index.shape, *self.shape[1:])

    def close(self) -> None:
        """Unregister the host memory (unified mode) and drop the views; the object is unusable after."""
        if self._finalizer is not None:
            self.view = None
            self._finalizer()
            self._finalizer = None
        self.view = self.host = self._pinned = None

    @property
    def closed(self) -> bool:
        return self.host is None

    def __enter__(self) -> "UnifiedTensor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
