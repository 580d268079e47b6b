"""What a training run leaves next to its result: the run record (settings, progress, figures) and the step log.

The ACIP run writes ``acip_run.json`` and ``run_log.jsonl``; fine-tuning writes ``finetune_run.json`` and
``finetune_log.jsonl`` (and copies the ACIP run's record, so that a model card can tell how the score map came about).
"""

import json
import os
from pathlib import Path

RUN_FILE = "acip_run.json"
RUN_LOG = "run_log.jsonl"
FINETUNE_FILE = "finetune_run.json"
FINETUNE_LOG = "finetune_log.jsonl"


def read_record(folder: str | os.PathLike, name: str) -> dict | None:
    """The run record ``name`` in ``folder``, or None when there is none."""
    path = Path(folder) / name
    return json.loads(path.read_text()) if path.exists() else None


def recorded_base_model(model_dir: str | os.PathLike) -> str:
    """The base model the ACIP run saved in ``model_dir`` started from (its acip_run.json)."""
    record = read_record(model_dir, RUN_FILE)
    if record is None:
        raise FileNotFoundError(f"{model_dir} has no {RUN_FILE}; name the base model (base_model=... / --base-model)")
    return record["config"]["base_model"]
