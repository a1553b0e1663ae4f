"""What every benchmark does with its result: the JSON written atomically (a temporary file beside it, then a
rename), so a run stopped halfway leaves no half-written file."""

import json
import os
import tempfile


def write_json(path: str, payload: dict) -> None:
    handle, temporary = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".json")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(payload, stream, indent=2)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    print(f"wrote {path}")
