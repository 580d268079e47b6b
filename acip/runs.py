"""A training run's folder: where the run lives until its result is complete, its checkpoints and step log, and what
resuming it checks (the kind of run, its settings, its number of processes, its inputs).

A run started into an absent or empty folder lives there; one started with ``--overwrite`` over a previous result
lives in ``.NAME.acip-new`` beside it until it is complete (acip.folders), and ``--resume`` finds it in either.
:meth:`RunFolder.settle` is the one way a run's settings and inputs come in, checked before anything is written;
:func:`recorded_settings` reads what a run recorded (the command line's ``--resume`` starts from it).

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding ``state.safetensors`` (tensors) and ``trainer.json``
(everything else), written under a temporary name, flushed and renamed into place; ``checkpoints/latest.json`` then
points at it and older folders are removed. The ACIP run and the fine-tuning run both use it.
"""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .folders import (
    NEW, check_output_dir, fsync_path, fsync_tree, remove_tree, replaceable, sibling, write_atomically, write_json,
)  # fmt: skip
from .inputs import changed_inputs, local_inputs
from .records import CHECKPOINTS, COMMANDS, KINDS, folder_record, read_record

LATEST = "latest.json"


def recorded_settings(output_dir: str | os.PathLike, record_file: str, config_class, **given):
    """The settings the run to resume in ``output_dir`` recorded (``record_file``: its kind), as ``config_class`` with
    the fields in ``given`` replaced; None when there is no such run."""
    return RunFolder(output_dir, record_file).recorded_config(config_class, **given)


class RunFolder:
    """The folders of one training run: ``result`` (what the user named) and where the run lives until it is complete
    (``result`` itself, or ``.NAME.acip-new`` while ``result`` holds a previous result); its save is staged and swapped
    in by acip.folders.replacing."""

    def __init__(self, result: str | os.PathLike, record_file: str):
        self.result = Path(os.path.abspath(result))
        if self.result.is_symlink():  # swap at the real place; the link keeps pointing there
            self.result = Path(os.path.realpath(self.result))
        self.record_file = record_file
        self.new = sibling(self.result, NEW)

    @property
    def work(self) -> Path:
        """Where the run in progress lives (once :meth:`prepare` ran)."""
        return self.new if self.new.exists() else self.result

    def check(self, resume: bool, overwrite: bool, name: str = "output_dir") -> Path:
        """Where the run will live, or an error naming ``name`` when the folders do not allow this run."""
        if resume:
            return self._resumable(name)
        if not self.new.exists():
            replaceable(self.result, overwrite, name)
            return self.new if self.result.exists() and any(self.result.iterdir()) else self.result
        if not overwrite:
            raise FileExistsError(
                f"{name} {self.result} has an unfinished run in {self.new}; pass resume=True (--resume) to continue "
                "it, or overwrite=True (--overwrite) to start anew"
            )
        replaceable(self.result, overwrite, name)
        return self.new

    def _resumable(self, name: str) -> Path:
        """The folder of the run to resume, or an error saying why there is none."""
        work = self.work
        kind = folder_record(work) if work.is_dir() else None
        if kind is not None and kind != self.record_file:
            raise ValueError(
                f"cannot resume {name} {self.result}: it holds {KINDS[kind]}, not {KINDS[self.record_file]}; "
                f"resume it with {COMMANDS[kind]} --resume"
            )
        if kind is None:
            raise FileNotFoundError(f"nothing to resume in {name} {self.result}: no acip run was started there")
        if latest_checkpoint(work) is None:
            finished = (read_record(work, kind) or {}).get("finished")
            why = "holds a finished run" if finished else "has no checkpoint yet (start it again with --overwrite)"
            raise FileNotFoundError(f"nothing to resume in {name} {self.result}: it {why}")
        return work

    def recorded(self) -> dict | None:
        """The record of the run to resume here (of this kind, in the work folder), or None when there is none."""
        work = self.work
        if not work.is_dir() or folder_record(work) != self.record_file:
            return None
        return read_record(work, self.record_file)

    def recorded_config(self, config_class, **given):
        """The settings of the run to resume here as ``config_class``, with the fields in ``given`` replaced; None
        when there is no such run. Every reading of a run's recorded settings goes through here."""
        record = self.recorded()
        if record is None:
            return None
        known = {f.name for f in dataclasses.fields(config_class)}
        recorded = config_class(**{name: value for name, value in record["config"].items() if name in known})
        return dataclasses.replace(recorded, **given)

    def settle(self, config, resume: bool, overwrite: bool, world_size: int, compare, inputs):
        """Every check of a run before it starts, in one pass down: the folders (is there a run of this kind to
        resume? may this folder be written?), the settings (a resumed run's recorded ones: ``compare`` names the
        fields that must equal them), the inputs (``inputs(config)`` checks them and names them) against the folder and,
        on resume, against those the run started from. Returns the settings, the local inputs (name -> absolute path)
        and the folder the run will live in; writes nothing."""
        if resume:  # what the folder holds comes first: is there a run of this kind to resume?
            work = self.check(resume, overwrite)
            config = self.resumed_settings(config, world_size, compare)
        config.validate()
        paths = local_inputs(inputs(config)) if inputs is not None else {}
        check_output_dir(self.result, paths)
        if resume:
            changes = changed_inputs(self.recorded().get("inputs") or {}, paths)
            if changes:
                raise ValueError(f"cannot resume {work}: its inputs changed:\n  " + "\n  ".join(changes)
                                 + "\nresume with the same inputs, or start a new run with --overwrite")  # fmt: skip
        else:
            work = self.check(resume, overwrite)
        return config, paths, work

    def resumed_settings(self, config, world_size: int, compare=()):
        """The settings of the run to resume here: those it recorded, and as many processes as it started with; each
        field named in ``compare`` must equal that of ``config``, or a ValueError lists every field that differs."""
        started = self.recorded().get("processes", 1)
        if started != world_size:
            raise ValueError(
                f"this run was started with {started} process(es) and is resumed with {world_size}: each step's "
                f"global batch would change; resume with accelerate launch --num_processes {started}"
            )
        recorded = self.recorded_config(type(config))
        plain = lambda value: json.loads(json.dumps(value))  # noqa: E731  (tuples and lists compare alike)
        differing = [f"{name}: recorded {getattr(recorded, name)!r}, given {getattr(config, name)!r}"
                     for name in compare if plain(getattr(config, name)) != plain(getattr(recorded, name))]  # fmt: skip
        if differing:
            raise ValueError(
                f"cannot resume {self.work} with other settings than it was started with:\n  " + "\n  ".join(differing)
                + "\nleave them out (or give the recorded values) to resume, or start a new run with --overwrite"
            )
        return recorded

    def prepare(self, work: Path, resume: bool) -> Path:
        """Make ``work`` ready for the run (main process, once the inputs are loaded): a new run in
        ``.NAME.acip-new`` replaces an unfinished one there."""
        if work == self.new and not resume:
            remove_tree(self.new)
            print(f"{self.result} keeps its previous contents until this run is complete; the run's record, log and "
                  f"checkpoints are in {self.new} meanwhile (--resume finds them there)", file=sys.stderr)  # fmt: skip
        work.mkdir(parents=True, exist_ok=True)
        fsync_path(work.parent)
        return work


# -- checkpoints and the step log --------------------------------------------------------------------------------------


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
