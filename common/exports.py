"""Lazy public names, shared by every plait subpackage's `__init__`.

A subpackage lists its public names as {name: "module" or "module:attribute"}; a name's
module is imported on first use, so `import plait.train` stays light (no deepspeed, no
matplotlib) and the subpackages can refer to each other without import cycles.
"""

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, exports: Dict[str, str], namespace: dict) -> Tuple[Callable, Callable]:
    """The module-level `__getattr__` and `__dir__` that resolve `exports` on first access."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attr = exports[name].partition(":")
        value = getattr(importlib.import_module(module), attr or name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
