"""`train.precision`'s half types: which settings run the forward in 16 bits (or less), and in which dtype.

The one table autocast, FSDP2's mixed-precision policy, the MFU peak lookup and `plait plan`
read, so a new half precision is one line here.
"""

from typing import Optional

import torch

# train.precision -> autocast dtype; fp8 is bf16 autocast with float8 GEMMs in the linear layers
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
FLOAT8 = "fp8"


def float8_gemms(precision: str) -> bool:
    """Whether `precision` runs the linear layers' GEMMs in float8 (plait.parallel.float8)."""
    return precision == FLOAT8


def half_dtype(precision: str) -> Optional[torch.dtype]:
    """The 16-bit dtype `precision` runs its forward in, autocast's (None: fp32)."""
    return HALF_DTYPES.get(precision)


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts to on `device_type` right now (None: autocast is off there)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
