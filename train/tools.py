"""`plait <tool> ...`: the command-line tools beside training.

Each tool is a module with a `main(argv)` function, registered by name below, so adding
a tool is one line here and one module beside its component.
"""

import importlib
import sys
from typing import Dict, List, Optional

TOOLS: Dict[str, str] = {
    # "name": "module:function" ; multi-word names ("data prepare") are matched first
    "data prepare": "plait.data.prepare:main",
    "eval": "plait.train.evaluate:main",
    "export": "plait.train.export:main",
    "generate": "plait.train.decode:main",
    "mup coord-check": "plait.train.coord_check:main",
    "plan": "plait.train.plan:main",
    "plot": "plait.train.curves:main",
    "schedule": "plait.parallel.pipeline.cli:main",
}


def _usage() -> str:
    names = "\n".join(f"  plait {name}" for name in sorted(TOOLS))
    return f"usage: plait <tool> [args]\ntools:\n{names}"


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in TOOLS:
            module, function = TOOLS[name].split(":")
            sys.exit(getattr(importlib.import_module(module), function)(argv[words:]) or 0)
    print(_usage(), file=sys.stderr)
    sys.exit(2 if argv and argv[0] not in ("-h", "--help") else 0)


if __name__ == "__main__":
    main()
