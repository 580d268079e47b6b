"""Writing files so that a crash never leaves half of one: what a user saved is either the old or the new file.

Every atomic write goes to a temporary sibling, is flushed to the disk (fsync), renamed over the target, and the
folder holding it is flushed too, so that the rename itself survives a power loss.
"""

import json
import os
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush one file or folder to the disk (folders: their entries, i.e. renames and new files in them)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if os.path.isdir(path) else os.O_RDONLY
    try:
        fd = os.open(path, flags)
    except OSError:  # some platforms (Windows) cannot open folders; their renames are durable as far as they go
        return
    try:
        os.fsync(fd)
    except OSError:  # a folder on a filesystem without fsync for directories
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file and folder under ``folder`` (and ``folder`` itself) to the disk."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def tree_files(folder: str | os.PathLike) -> list[str]:
    """The files under ``folder``, as sorted relative POSIX paths."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write text or bytes to ``path`` through a flushed temporary sibling and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps concurrent writers (e.g. two first-time corpus extractions) from sharing a temporary file.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        if not isinstance(data, (str, bytes)):
            raise TypeError(f"data must be str or bytes, got {type(data).__name__}")
        with open(tmp, "wb") as f:
            f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically, indented for people to read."""
    return write_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_jsonl(path: str | os.PathLike, records) -> Path:
    """Write one JSON record per line atomically."""
    return write_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
