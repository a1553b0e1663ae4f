"""Whether a directory can be written, found out before any work, leaving nothing behind."""

import os
import tempfile
from pathlib import Path
from typing import Optional


def unwritable_reason(path: str) -> Optional[str]:
    """None if `path` is (or can be made as) a writable directory, else why not, in a few words.

    Nothing is created: the nearest existing ancestor must be a directory that takes a probe
    file (made and removed at once), so a read-only filesystem is caught even as root.
    """
    target = Path(path).expanduser()
    if target.exists() and not target.is_dir():
        return "it is a file, not a directory"
    probe_dir = target
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            return "no part of it exists"
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{probe_dir} is a file, not a directory"
    try:
        with tempfile.NamedTemporaryFile(dir=probe_dir, prefix=".plait-probe-"):
            pass
    except OSError as error:
        return f"{probe_dir} cannot be written ({error.strerror or error})"
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        return f"{probe_dir} cannot be written"
    return None
