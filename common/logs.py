"""Log a line once per process: a hardware or transport choice made at construction is logged the
first time it is made, not once per object (a record of lines already written, not group state)."""

import logging

log = logging.getLogger("plait")
_LOGGED: set = set()


def log_once(line: str, level: int = logging.INFO) -> None:
    if line not in _LOGGED:
        _LOGGED.add(line)
        log.log(level, line)
