"""What acip leaves next to a result: the run record (settings, progress, figures), the step log, and the list of
the files it wrote.

The ACIP run writes ``acip_run.json`` and ``run_log.jsonl``; fine-tuning writes ``finetune_run.json`` and
``finetune_log.jsonl`` (and copies the ACIP run's record, so that a model card can tell how the score map came about);
an export writes ``acip_export.json``. A finished record lists every file of its folder (``files``): that is how acip
recognises a folder it wrote, and the only kind of folder ``--overwrite`` replaces.
"""

import dataclasses
import fnmatch
import hashlib
import json
import os
from pathlib import Path

RUN_FILE = "acip_run.json"
RUN_LOG = "run_log.jsonl"
FINETUNE_FILE = "finetune_run.json"
FINETUNE_LOG = "finetune_log.jsonl"
EXPORT_FILE = "acip_export.json"
# The record that makes a folder what it is, most specific first: a fine-tuned model carries a copy of the ACIP
# run's record, an export copies both.
KINDS = {EXPORT_FILE: "an export (acip export)", FINETUNE_FILE: "a fine-tuning run (acip finetune)",
         RUN_FILE: "an ACIP run (acip compress)"}  # fmt: skip
COMMANDS = {EXPORT_FILE: "acip export", FINETUNE_FILE: "acip finetune", RUN_FILE: "acip compress"}
# What acip may have added to a folder after it was written (acip eval's reports), and what a folder written before
# records listed their files holds: a model, its tokenizer, the Hub files, logs, checkpoints, an adapter.
ADDED_LATER = ("eval_perplexity.json", "eval_perplexity.csv", "eval_perplexity.png", "eval_efficiency.json",
               "eval_efficiency.csv", "eval_zeroshot.json")  # fmt: skip
UNLISTED = ("*.json", "*.jsonl", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.py", "README.md",
            "checkpoints/*", "adapter/*")  # fmt: skip


def read_record(folder: str | os.PathLike, name: str) -> dict | None:
    """The run record ``name`` in ``folder``, or None when there is none (or it is not a JSON object)."""
    path = Path(folder) / name
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def folder_record(folder: str | os.PathLike) -> str | None:
    """The name of the record that says what ``folder`` holds (see :data:`KINDS`), or None: not written by acip."""
    return next((name for name in KINDS if read_record(folder, name) is not None), None)


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """The files of ``folder`` that acip did not write (relative paths); all of them when it holds no acip record."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())
    name = folder_record(folder)
    if name is None:
        return files or [p.name for p in folder.iterdir()]
    listed = read_record(folder, name).get("files")
    if isinstance(listed, list):
        known = set(listed) | set(ADDED_LATER) | set(KINDS)
        return [f for f in files if f not in known]
    return [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in UNLISTED)]


def config_from_record(config_class, record: dict):
    """The settings a run record holds, as ``config_class`` (fields it does not know are left out)."""
    known = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{name: value for name, value in record["config"].items() if name in known})


def recorded_base_model(model_dir: str | os.PathLike) -> str:
    """The base model the ACIP run saved in ``model_dir`` started from (its acip_run.json)."""
    record = read_record(model_dir, RUN_FILE)
    if record is None:
        raise FileNotFoundError(f"{model_dir} has no {RUN_FILE}; name the base model (base_model=... / --base-model)")
    return record["config"]["base_model"]


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
