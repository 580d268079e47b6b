"""What a command reads, checked before it writes anything: models, data sources, which of them are local paths, and
what identifies a local one's contents (a resumed run must read the same).

Each check raises an error that names the argument (``base_model``, ``model_dir``, ``data``...) and says what is
allowed; none of them loads a model or opens a data set (a file is read only as far as its first non-blank byte, a
model folder only for its config).
"""

import glob
import hashlib
import os
import re
from pathlib import Path

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def is_local_path(value: str) -> bool:
    """Whether a model or data string names something on this machine rather than a Hub repository or a built-in
    name: it exists here, is absolute, starts with ``.`` or ``~``, or has more than one ``/``."""
    value = os.fspath(value)
    if os.path.exists(value) or os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value:
        return True
    return value.count("/") > 1


def check_model_source(name: str, value, builtin: tuple[str, ...] = ()) -> None:
    """A model named by ``value``: a built-in name, a local folder holding config.json, or a Hub id ``org/name``."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a model folder or a Hub id (org/name), got {value!r}")
    value = os.fspath(value)
    if value in builtin:
        return
    if is_local_path(value):
        check_model_dir(name, value)
    elif not HUB_ID.fullmatch(value) or ".." in value:
        raise ValueError(f"{name} must be a model folder or a Hub id (org/name), got {value!r}")


def check_model_dir(name: str, value) -> Path:
    """A local folder holding a saved model (config.json); returns it as a Path."""
    path = Path(os.path.expanduser(os.fspath(value)))
    if not path.exists():
        raise FileNotFoundError(f"{name}: no such folder {os.fspath(value)!r}")
    if not path.is_dir():
        raise NotADirectoryError(f"{name} must be a folder holding a saved model, got the file {os.fspath(value)!r}")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{name}: {os.fspath(value)!r} is not a saved model (no config.json)")
    return path


def check_data_source(name: str, value) -> None:
    """A text source: a built-in corpus, ``hf:NAME[:CONFIG[:SPLIT]]``, or an existing file (or glob of files)."""
    from .data import CORPORA

    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise ValueError(f"{name} must be a built-in corpus ({', '.join(CORPORA)}), a file or hf:NAME, got {value!r}")
    spec = os.fspath(value)
    if spec in CORPORA:
        return
    if spec.startswith("hf:"):
        if not spec[3:].split(":")[0] or spec.count(":") > 3:
            raise ValueError(f"{name} must be hf:NAME[:CONFIG[:SPLIT]], got {spec!r}")
        return
    if os.path.isdir(spec):
        raise IsADirectoryError(f"{name}: {spec!r} is a folder; pass a file, or a glob such as {spec}/*.txt")
    files = [spec] if os.path.isfile(spec) else [p for p in sorted(glob.glob(spec)) if os.path.isfile(p)]
    if not files:
        raise FileNotFoundError(
            f"{name}: no such file {spec!r} (a data source is a built-in corpus ({', '.join(CORPORA)}), an existing "
            "file or glob of files, or hf:NAME[:CONFIG[:SPLIT]])"
        )
    if not any(_holds_text(path) for path in files):
        what = "the file is" if files == [spec] else f"all {len(files)} files are"
        raise ValueError(f"{name}: {spec!r} holds no text ({what} empty or blank): there are no tokens to read")


def _holds_text(path: str) -> bool:
    """Whether the file holds anything but whitespace (read up to its first other byte)."""
    with open(path, "rb") as f:
        while chunk := f.read(2**20):
            if chunk.strip():
                return True
    return False


def max_positions(model) -> int | None:
    """The longest sequence a model is made for (its config's ``max_position_embeddings``): ``model`` is a loaded
    model, the embedded one's name, a local model folder or a Hub id whose config is in the local cache; None where
    that is not known without fetching anything."""
    from transformers import AutoConfig, PreTrainedModel

    from .default_model import DEFAULT_MODEL, MAX_POSITIONS

    if isinstance(model, PreTrainedModel):
        config = model.config
    elif model == DEFAULT_MODEL:
        return MAX_POSITIONS
    else:
        try:
            config = AutoConfig.from_pretrained(os.fspath(model), local_files_only=True)
        except (OSError, ValueError, KeyError):  # not cached, or a model type this transformers does not know
            return None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def check_positions(name: str, model, lengths: dict[str, int]) -> None:
    """A ValueError naming the first of ``lengths`` (argument name -> tokens per sequence) that is longer than the
    model ``name`` (see :func:`max_positions`) is made for: beyond its positions a model's output means nothing."""
    positions = max_positions(model)
    for length_name, length in lengths.items():
        if positions is not None and length > positions:
            shown = os.fspath(model) if isinstance(model, (str, os.PathLike)) else f"({type(model).__name__})"
            raise ValueError(f"{length_name} must be at most the max_position_embeddings of {name} {shown} "
                             f"({positions}), got {length}")  # fmt: skip


def local_inputs(inputs: dict[str, object]) -> dict[str, str]:
    """The inputs (name -> value) that are existing local files or folders, as absolute paths."""
    return {name: os.path.abspath(os.fspath(value)) for name, value in inputs.items()
            if isinstance(value, (str, os.PathLike)) and os.fspath(value) and os.path.exists(value)}  # fmt: skip


def fingerprint(path: str | os.PathLike) -> dict:
    """What identifies the contents of an input file or model folder cheaply: the SHA-256 of small files (config.json,
    text files up to 64 MiB), the size and modification time of large ones (weights)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir():  # a model folder: its config and weights define it (a report written into it does not)
        files = [p for p in files if p.name == "config.json" or p.suffix in (".safetensors", ".bin")]
    seen = {}
    for file in files:
        stat = file.stat()
        key = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if stat.st_size <= 64 * 2**20:
            seen[key] = hashlib.sha256(file.read_bytes()).hexdigest()
        else:
            seen[key] = f"{stat.st_size} bytes, modified {stat.st_mtime_ns}"
    return seen


def changed_inputs(recorded: dict, inputs: dict[str, str]) -> list[str]:
    """For each input of ``inputs`` (name -> local path) that differs from the run record's ``inputs``: what
    differs, in words. Inputs the record does not name (older records, Hub names) are not compared."""
    changes = []
    for name, path in inputs.items():
        then = recorded.get(name)
        if then is None:
            continue
        if os.path.abspath(path) != then["path"]:
            changes.append(f"{name}: the run started from {then['path']}, given {os.path.abspath(path)}")
        elif fingerprint(path) != then["fingerprint"]:
            changes.append(f"{name}: {path} changed since the run started (its files differ)")
    return changes
