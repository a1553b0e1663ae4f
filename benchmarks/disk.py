"""The disk's own write bandwidth, measured beside what a benchmark writes (shared by the benchmarks)."""

import mmap
import os
import time


def disk_write_bandwidth(path: str, nbytes: int = 256 << 20) -> tuple:
    """(bytes a second, how): a plain O_DIRECT write of `nbytes` from an aligned buffer in 32 MiB writes,
    fsynced; where the filesystem refuses O_DIRECT (tmpfs), a buffered write plus fsync, labelled so."""
    chunk = 32 << 20
    buffer = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT wants
    buffer.write(b"\x5a" * chunk)
    name = os.path.join(path, ".plait-disk-probe")
    how = "O_DIRECT"
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        how, fd = "buffered+fsync", os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        start = time.perf_counter()
        for _ in range(max(1, nbytes // chunk)):
            os.write(fd, buffer)
        os.fsync(fd)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(name)
    return max(1, nbytes // chunk) * chunk / elapsed, how
