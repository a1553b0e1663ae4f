"""The `offload` config group: where saved activations go during forward.

`backend=none` (the default) attaches nothing and costs nothing. Any other backend makes
every saved activation of a model chunk pass through `plait.offload.ActivationCache`;
`policy` and `keep_last` say, layer by layer, which are kept, offloaded or recomputed.
"""

from dataclasses import dataclass
from typing import Any, List, Optional

from plait.common.checks import SettingError
from plait.common.paths import unwritable_reason

BACKENDS = ("none", "auto", "host", "file", "aio", "gds")
MODES = ("keep", "offload", "recompute")
DEVICE_FILTERS = ("cuda", "all")


class OffloadError(SettingError):
    """A bad offload setting or an offload path that cannot be used (one sentence with the fix)."""


class OffloadIOError(RuntimeError):
    """Writing or reading saved activations failed mid-run (disk full, file removed, ...)."""


@dataclass
class OffloadConfig:
    """`backend=none` keeps every saved activation resident (plain PyTorch)."""

    backend: str = "none"  # none | auto | host | file | aio | gds
    path: Optional[str] = None  # parent directory of the per-run scratch folder (file, aio, gds)
    policy: str = "offload"  # keep | offload | recompute, or one mode per layer: "recompute,offload,keep"
    keep_last: Any = "auto"  # auto: offload what the link hides behind the forward (adaptive.py); or the last K blocks stay
    min_bytes: int = 65536  # smaller saved tensors stay resident
    device_filter: str = "cuda"  # cuda: only device tensors move; all: CPU tensors too (CPU runs, tests)
    prefetch: int = 2  # offloaded layers read ahead of the backward pass
    write_window: int = 2  # forward waits for the writes of blocks this far behind (bounds memory in flight)
    threads: int = 2  # I/O worker threads (file backend; host copies on CPU)
    aio_block_size: int = 1 << 20
    aio_queue_depth: int = 32


def layer_modes(cfg: OffloadConfig, n_layers: int) -> List[str]:
    """The mode of each of a chunk's `n_layers` blocks, in forward order.

    One word applies to every block except the last `keep_last`, which are kept; a
    comma-separated list gives one mode per block and is taken as written. `keep_last=auto`
    starts as 1 (the profiled first step) and `ActivationOffload` replaces the modes after it.
    """
    words = [word.strip() for word in cfg.policy.split(",")]
    if len(words) > 1:
        if len(words) != n_layers:
            raise OffloadError(f"offload.policy lists {len(words)} modes but the chunk has {n_layers} layers; "
                               f"give one mode per layer or a single mode.")
        return words
    configured = keep_count(cfg.keep_last)
    keep = min(1 if configured is None else configured, n_layers)
    return [words[0]] * (n_layers - keep) + ["keep"] * keep


def keep_count(keep_last: Any) -> Optional[int]:
    """`offload.keep_last` as a count, or None for auto (decided from a profiled step)."""
    return None if str(keep_last).lower() == "auto" else int(keep_last)


def validate_offload(cfg: OffloadConfig) -> None:
    """Check the settings and that `offload.path` is writable; raises OffloadError with the fix."""
    if cfg.backend not in BACKENDS:
        raise OffloadError(f"offload.backend={cfg.backend} is unknown; use one of {'|'.join(BACKENDS)}.")
    for word in cfg.policy.split(","):
        if word.strip() not in MODES:
            raise OffloadError(f"offload.policy={cfg.policy} has mode '{word.strip()}'; "
                               f"use {'|'.join(MODES)} or a comma-separated list of them.")
    if cfg.device_filter not in DEVICE_FILTERS:
        raise OffloadError(f"offload.device_filter={cfg.device_filter} is unknown; use cuda or all.")
    if str(cfg.keep_last).lower() != "auto" and (isinstance(cfg.keep_last, bool) or not str(cfg.keep_last).isdigit()):
        raise OffloadError(f"offload.keep_last={cfg.keep_last} must be auto or a count of blocks (0 or more).")
    for key in ("min_bytes", "prefetch", "write_window"):
        if getattr(cfg, key) < 0:
            raise OffloadError(f"offload.{key}={getattr(cfg, key)} must be zero or positive.")
    if cfg.threads < 1:
        raise OffloadError(f"offload.threads={cfg.threads} must be at least 1.")
    if cfg.backend in ("file", "aio", "gds"):
        if not cfg.path:
            raise OffloadError(f"offload.backend={cfg.backend} needs a directory: set offload.path=/path/on/ssd.")
        check_writable(cfg.path)


def check_writable(path: str) -> None:
    """`offload.path` is (or can be made as) a writable directory; nothing is created to find out."""
    reason = unwritable_reason(path)
    if reason is not None:
        raise OffloadError(f"offload.path={path} is not a writable directory ({reason}); "
                           f"point offload.path at a writable directory on a local SSD.")
