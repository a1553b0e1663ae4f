"""plait.offload: saved-activation offload to host memory or SSD (SSDTrain-style).

`ActivationOffload(cfg, grid, device).attach(chunk)` is the entry point; see
docs/offload.md.
"""

from plait.offload.attach import ActivationOffload
from plait.offload.config import OffloadConfig, OffloadError, OffloadIOError, layer_modes, validate_offload

__all__ = ["ActivationOffload", "OffloadConfig", "OffloadError", "OffloadIOError", "layer_modes",
           "validate_offload"]
