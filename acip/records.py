"""What acip leaves next to a result: the run record (settings, progress, figures), the step log, and the list of
the files it wrote.

The ACIP run writes ``acip_run.json`` and ``run_log.jsonl``; fine-tuning writes ``finetune_run.json`` and
``finetune_log.jsonl`` (and copies the ACIP run's record, so that a model card can tell how the score map came about);
an export writes ``acip_export.json``, a conversion (acip convert) ``acip_convert.json``. A finished record lists
every file of its folder (``files``): that is how acip recognises a folder it wrote, and the only kind of folder
``--overwrite`` replaces (a run still in progress: its record, its log and its checkpoints).
"""

import json
import os
from pathlib import Path

RUN_FILE = "acip_run.json"
RUN_LOG = "run_log.jsonl"
FINETUNE_FILE = "finetune_run.json"
FINETUNE_LOG = "finetune_log.jsonl"
EXPORT_FILE = "acip_export.json"
CONVERT_FILE = "acip_convert.json"
# The record that makes a folder what it is, most specific first: a fine-tuned model carries a copy of the ACIP
# run's record, an export copies both.
KINDS = {EXPORT_FILE: "an export (acip export)", FINETUNE_FILE: "a fine-tuning run (acip finetune)",
         RUN_FILE: "an ACIP run (acip compress)", CONVERT_FILE: "a converted checkpoint (acip convert)"}  # fmt: skip
COMMANDS = {EXPORT_FILE: "acip export", FINETUNE_FILE: "acip finetune", RUN_FILE: "acip compress",
            CONVERT_FILE: "acip convert"}  # fmt: skip
# What acip may have added to a folder after it was written: acip eval's reports.
ADDED_LATER = ("eval_perplexity.json", "eval_perplexity.csv", "eval_perplexity.png", "eval_efficiency.json",
               "eval_efficiency.csv", "eval_zeroshot.json")  # fmt: skip
# A run in progress, whose record lists no files yet, has written its step log and its checkpoints (acip.runs).
CHECKPOINTS = "checkpoints"
IN_PROGRESS = {RUN_FILE: RUN_LOG, FINETUNE_FILE: FINETUNE_LOG}


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
    known = {name, IN_PROGRESS.get(name), *ADDED_LATER}
    return [f for f in files if f not in known and not f.startswith(f"{CHECKPOINTS}/")]


def recorded_base_model(model_dir: str | os.PathLike) -> str:
    """The base model the ACIP run saved in ``model_dir`` started from (its acip_run.json)."""
    record = read_record(model_dir, RUN_FILE)
    if record is None:
        raise FileNotFoundError(f"{model_dir} has no {RUN_FILE}; name the base model (base_model=... / --base-model)")
    return record["config"]["base_model"]
