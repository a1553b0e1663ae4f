"""The device's peak FLOP/s, the denominator of MFU: datasheet dense figures by device name.

MFU is only comparable with Megatron's, torchtitan's or a paper's if it divides by the
same number they do: the vendor's dense (no 2:4 sparsity) tensor-core peak for the
precision the matmuls run in. `peak_flops(device, precision)` looks the device's name up
in `DATASHEET` (the first pattern that the name contains wins, so the longer names come
first); a device that is not in the table (a CPU, an unlisted GPU) falls back to a
matmul measured once at start, and says so, since that reads high and compares with
nothing. `train.peak_flops` overrides both.

Precision: `bf16` and `fp16` (autocast) use the bf16 column (NVIDIA's dense fp16 and bf16
tensor-core peaks are the same figure on every card listed); `fp32` uses tf32 where torch lets fp32
matmuls run on tensor cores (`torch.get_float32_matmul_precision()` is high or medium),
else the plain fp32 (CUDA-core) column.
"""

import time
from typing import Dict, Optional, Tuple

import torch

from plait.common.precision import half_dtype

TERA = 1e12

# (name pattern, {precision: dense FLOP/s per device}), from NVIDIA's datasheets (SXM boards
# at their rated power unless the name says otherwise)
DATASHEET: Tuple[Tuple[str, Dict[str, float]], ...] = (
    ("GB200", {"bf16": 2500 * TERA, "tf32": 1250 * TERA, "fp32": 90 * TERA}),
    ("B200", {"bf16": 2250 * TERA, "tf32": 1125 * TERA, "fp32": 75 * TERA}),
    ("GH200", {"bf16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),
    ("H200 NVL", {"bf16": 835.5 * TERA, "tf32": 417.5 * TERA, "fp32": 60 * TERA}),
    ("H200", {"bf16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),
    ("H100 NVL", {"bf16": 835.5 * TERA, "tf32": 417.5 * TERA, "fp32": 60 * TERA}),
    ("H100 PCIe", {"bf16": 756.5 * TERA, "tf32": 378 * TERA, "fp32": 51.2 * TERA}),
    ("H100", {"bf16": 989.4 * TERA, "tf32": 494.7 * TERA, "fp32": 66.9 * TERA}),
    ("A100", {"bf16": 312 * TERA, "tf32": 156 * TERA, "fp32": 19.5 * TERA}),
    ("L40S", {"bf16": 362.05 * TERA, "tf32": 183 * TERA, "fp32": 91.6 * TERA}),
    ("L4", {"bf16": 121 * TERA, "tf32": 60 * TERA, "fp32": 30.3 * TERA}),
)


def matmul_precision(precision: str) -> str:
    """The datasheet column a run's matmuls use: bf16, tf32 or fp32."""
    if half_dtype(precision) is not None:  # NVIDIA's dense fp16 and bf16 peaks are one figure
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def datasheet_peak(device_name: str, column: str) -> Optional[Tuple[str, float]]:
    """(matched pattern, dense FLOP/s) for a device name and a column, or None when the device is unlisted."""
    name = device_name.upper()
    for pattern, peaks in DATASHEET:
        if pattern.upper() in name:
            return pattern, peaks[column]
    return None


def measure_matmul_flops(device: torch.device, precision: str = "fp32", seconds: float = 0.3) -> float:
    """The fastest of many 1024^3 matmuls in the run's precision (FLOP/s): a stand-in where no datasheet
    figure exists."""
    size = 1024
    dtype = half_dtype(precision) or torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    fastest, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    return 2.0 * size ** 3 / fastest


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> Tuple[float, str]:
    """(FLOP/s per device, where the figure comes from) for MFU: configured, datasheet, or measured."""
    if configured > 0:
        return float(configured), "train.peak_flops"
    column = matmul_precision(precision)
    name = device_name(device)
    found = datasheet_peak(name, column) if device.type == "cuda" else None
    if found is not None:
        return found[1], f"datasheet {found[0]} {column} dense ({name})"
    measured = measure_matmul_flops(device, precision)
    return measured, (f"measured 1024^3 matmul on {name}, no datasheet figure: MFU reads high and compares "
                      f"with no paper; set train.peak_flops")
