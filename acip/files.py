"""Writing files so that a crash never leaves half of one: what a user saved is either the old or the new file."""

import json
import os
from pathlib import Path


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` through a temporary sibling and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps concurrent writers (e.g. two first-time corpus extractions) from sharing a temporary file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically, indented for people to read."""
    return write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write one JSON record per line atomically."""
    return write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
