"""Peak resident memory of a stretch of work in this process (Linux), for benchmarks that compare what contenders
hold at their peak on the CPU.

glibc serves a big allocation from its own mapping, returned on free, only while the block is above its mmap
threshold, and that threshold rises (to 32 MB) as big blocks are freed; after that, freed tensors stay in the heap
and a peak counts the churn, not the live bytes. `fix_mmap_threshold()` pins it (before the workers are spawned:
they read it at start), so the peak follows the live tensors.
"""

import os


def fix_mmap_threshold(threshold: int = 1 << 20) -> None:
    """Blocks of `threshold` bytes and more get their own mapping in processes started after this call."""
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(threshold))


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as stream:
        for line in stream:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def start_peak() -> float:
    """Reset this process's peak resident memory to its current one (clear_refs 5); returns the current MB."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")
    return _status_mb("VmRSS")


def peak_above(start_mb: float) -> float:
    """MB the resident memory rose above `start_mb` at its peak since `start_peak()`."""
    return _status_mb("VmHWM") - start_mb
