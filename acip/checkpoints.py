"""Training checkpoints that a crash cannot corrupt and that never need unpickling.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding ``state.safetensors`` (tensors) and ``trainer.json``
(everything else), written under a temporary name and renamed into place; ``checkpoints/latest.json`` then points at
it and older folders are removed. The ACIP run and the fine-tuning run both use it.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .files import write_atomically, write_json

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def save_checkpoint(output_dir: str | os.PathLike, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write one checkpoint of ``output_dir``'s run atomically and make it the latest; returns its folder."""
    root = Path(output_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:07d}"
    tmp = root / f"{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, tmp / "state.safetensors")
    write_json(tmp / "trainer.json", meta)
    final = root / name
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    write_json(root / LATEST, {"checkpoint": name})
    for old in root.iterdir():
        if old.is_dir() and old.name != name:
            shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The folder of the run's latest checkpoint, or None when none was written."""
    latest = Path(output_dir) / CHECKPOINTS / LATEST
    if not latest.exists():
        return None
    return latest.parent / json.loads(latest.read_text())["checkpoint"]


def load_checkpoint(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the JSON record of one checkpoint folder."""
    folder = Path(folder)
    return load_file(folder / "state.safetensors"), json.loads((folder / "trainer.json").read_text())


def remove_checkpoints(output_dir: str | os.PathLike) -> None:
    """Delete a finished run's checkpoints."""
    shutil.rmtree(Path(output_dir) / CHECKPOINTS, ignore_errors=True)


def prepare_output_dir(output_dir: str | os.PathLike, resume: bool, overwrite: bool, check_only: bool = False) -> Path:
    """The run's folder, ready: for ``resume`` it must hold a checkpoint; otherwise it must be empty or absent, or
    ``overwrite`` clears it. ``check_only`` raises what would be refused and changes nothing."""
    output_dir = Path(output_dir)
    if resume:
        if latest_checkpoint(output_dir) is None:
            raise FileNotFoundError(f"nothing to resume in {output_dir}: no checkpoint was written there")
    elif output_dir.exists() and any(output_dir.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"{output_dir} is not empty (it holds another run or other files); "
                "pass overwrite=True (--overwrite) to replace it, or resume=True (--resume) to continue a run"
            )
        if not check_only:
            shutil.rmtree(output_dir)
    if not check_only:
        output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


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
    """Drop the lines of a JSONL run log written after step ``steps`` (a resumed run rewrites them)."""
    path = Path(path)
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= steps]
        write_atomically(path, "".join(line + "\n" for line in lines))
