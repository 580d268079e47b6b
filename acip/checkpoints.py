"""Training checkpoints that a crash cannot corrupt and that never need unpickling.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding ``state.safetensors`` (tensors) and ``trainer.json``
(everything else), written under a temporary name, flushed and renamed into place; ``checkpoints/latest.json`` then
points at it and older folders are removed. The ACIP run and the fine-tuning run both use it.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import fsync_path, fsync_tree, write_atomically, write_json

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def save_checkpoint(output_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one checkpoint of ``output_dir``'s run atomically and make it the latest; returns its folder.

    The folder is written under a temporary name, flushed to the disk and renamed into place; only then does
    ``latest.json`` (itself replaced atomically) point at it, and only then are older checkpoints removed. A kill at
    any moment leaves ``latest.json`` pointing at a complete checkpoint (or no checkpoint yet).
    """
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, tmp / "state.safetensors")
    write_json(tmp / "trainer.json", meta)
    fsync_tree(tmp)
    final = root / name
    if final.exists():  # a killed run wrote this step without pointing at it: the pointer never names it
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_path(root)
    write_json(root / LATEST, {"checkpoint": name})
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder of the run's latest complete checkpoint, or None when none was written."""
    root = Path(output_dir) / CHECKPOINTS
    try:
        folder = root / json.loads((root / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if (folder / "state.safetensors").is_file() and (folder / "trainer.json").is_file() else None


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON record of one checkpoint folder."""
    folder = Path(folder)
    return load_file(folder / "state.safetensors"), json.loads((folder / "trainer.json").read_text())


def remove_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete a finished run's checkpoints."""
    shutil.rmtree(Path(output_dir) / CHECKPOINTS, ignore_errors=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """An optimizer's state as named tensors (``optim.<index>.<field>``) plus its JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {
        f"optim.{index}.{key}": value for index, fields in state["state"].items() for key, value in fields.items()
    }
    return tensors, state["param_groups"]


def load_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict], device
) -> None:
    """Restore what :func:`optimizer_tensors` recorded."""
    state = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, field_name = key.split(".", 2)
            state.setdefault(int(index), {})[field_name] = value.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    """The random generators' states (CPU, and CUDA when present), for a resumed run to draw the same numbers."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    """Put back what :func:`rng_tensors` recorded."""
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def truncate_log(path: str | os.PathLike, steps: int) -> None:
    """Drop the lines of a JSONL run log written after step ``steps`` (a resumed run rewrites them), and a torn last
    line (a full disk or a power loss cut it short)."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= steps:
            kept.append(line)
    write_atomically(path, "".join(line + "\n" for line in kept))
