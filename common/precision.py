"""`train.precision`'s half types: which settings run the forward in 16 bits, and in which dtype.

The one table autocast, FSDP2's mixed-precision policy, the MFU peak lookup and `plait plan`
read, so a new half precision is one line here.
"""

from typing import Optional

import torch

HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # train.precision -> autocast dtype


def half_dtype(precision: str) -> Optional[torch.dtype]:
    """The 16-bit dtype `precision` runs its forward in (None: fp32)."""
    return HALF_DTYPES.get(precision)
