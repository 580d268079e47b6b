"""A tiny ACIP run, fine-tune and export killed with SIGKILL at many points: inside checkpoint writes, between a
checkpoint's rename and the pointer update, inside the final save, inside the swap that puts a new folder in place.

Each kill happens in a fresh Python process that wraps one library function (os.replace, safetensors' save_file, the
folder exchange...) so that the process kills itself on that function's N-th matching call; the library has no test
hooks. After each kill the user's previous result is complete (same file hashes, it loads), leftovers are put right
by the next call, and resuming ends exactly where an uninterrupted run ends (same score map, same weights).
Also: a second process started on an output folder while the first holds its lock is refused, the log stays clean.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_run, tiny_base_model, tiny_tokenizer, words_file

from acip import ACIPModel
from acip.export import export_model
from acip.finetune import FinetuneConfig, finetune
from acip.training import ACIPRunConfig, run_acip

pytestmark = pytest.mark.slow

TESTS = Path(__file__).parent
RUN = dict(block_size=16, batch_size=2, lr=5e-3, lambda_init=1e-2, lambda_growth=1.2, lambda_every=1,
           stop_ratio=0.6, post_tune_steps=3, max_steps=40, checkpoint_every=2, lora_r=2, lora_alpha=4,
           basis="weight", lora_dropout=0.1)  # fmt: skip
TUNE = dict(ratio=0.6, block_size=16, batch_size=2, steps=7, eval_blocks=2, eval_block_size=16, lora_r=2,
            lora_alpha=4, checkpoint_every=2, lora_dropout=0.1)  # fmt: skip

SCRIPT = '''
import json, os, re, signal, sys
sys.path.insert(0, {tests!r})
import importlib
from conftest import tiny_base_model, tiny_tokenizer
import acip.folders, acip.runs, transformers.modeling_utils
from acip.training import ACIPRunConfig, run_acip
from acip.finetune import FinetuneConfig, finetune
from acip.export import export_model

def kill_on(target, n, match="", after=False):
    """Make the function at the dotted path ``target`` SIGKILL this process on its n-th call whose arguments match
    the regex ``match`` (before the call runs, or just after it returned)."""
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    for part in parts[cut:-1]:
        owner = getattr(owner, part)
    original, calls = getattr(owner, parts[-1]), [0]

    def wrapper(*args, **kwargs):
        hit = re.search(match, repr(args) + repr(kwargs)) is not None
        calls[0] += hit
        if hit and calls[0] == n and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if hit and calls[0] == n and after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, parts[-1], wrapper)

def no_exchange(a, b):
    raise OSError(22, "this filesystem cannot exchange folders")

job = json.loads({job!r})
if job.get("no_exchange"):
    acip.folders._exchange = no_exchange
for kill in job["kills"]:
    kill_on(**kill)
if job["kind"] == "run":
    run_acip(ACIPRunConfig(**job["config"]), job["out"], overwrite=job["overwrite"], base_model=tiny_base_model(),
             tokenizer=tiny_tokenizer())
elif job["kind"] == "finetune":
    finetune(job["model"], job["out"], FinetuneConfig(**job["config"]), overwrite=job["overwrite"])
else:
    export_model(job["model"], job["out"], license="mit", ratio=0.5, overwrite=True, validate=False)
print("not killed")
'''


def killed(tmp_path, kind: str, out, kills: list[dict], **job) -> None:
    """Run one job in a fresh process that kills itself as ``kills`` say; assert it was killed."""
    job = {"kind": kind, "out": str(out), "kills": kills, "overwrite": False, **job}
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(SCRIPT).format(tests=str(TESTS), job=json.dumps(job)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == -signal.SIGKILL, done.stdout[-2000:] + done.stderr[-4000:]


def hashes(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder``."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def leftovers(folder: Path) -> list[str]:
    """The hidden siblings of ``folder`` other than its lock file."""
    return sorted(p.name for p in folder.parent.glob(f".{folder.name}.*") if not p.name.endswith("acip-lock"))


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Uninterrupted references: an ACIP run, a fine-tune and an export; the inputs they used."""
    root = tmp_path_factory.mktemp("kills")
    acip_dir, _ = save_tiny_run(root)
    words = words_file(root / "words.txt", 3000)
    run_config = {**RUN, "data": words}
    run = run_acip(ACIPRunConfig(**run_config), root / "run", base_model=tiny_base_model(), tokenizer=tiny_tokenizer())
    tune_config = {**TUNE, "data": words, "eval_data": words}
    tuned = finetune(acip_dir, root / "tuned", FinetuneConfig(**tune_config))
    export_model(acip_dir, root / "export", license="mit", validate=False)  # prunable: the "previous" export
    export_model(acip_dir, root / "export50", license="mit", ratio=0.5, validate=False)
    steps = [json.loads(line)["step"] for line in (root / "run" / "run_log.jsonl").read_text().splitlines()]
    assert len(steps) >= 8, steps  # enough steps for four checkpoints
    return {"root": root, "acip": acip_dir, "run_config": run_config, "scores": run.score_map,
            "tune_config": tune_config, "tuned": tuned.state_dict()}  # fmt: skip


def resumed_run(ref, out):
    """Resume the run in ``out`` in this process; assert it ends as the uninterrupted run did."""
    model = run_acip(ACIPRunConfig(**ref["run_config"]), out, resume=True, base_model=tiny_base_model(),
                     tokenizer=tiny_tokenizer())  # fmt: skip
    assert_finished_run(ref, out)
    for name, score in ref["scores"].items():
        assert torch.equal(model.score_map[name], score), name
    assert leftovers(out) == []


def assert_finished_run(ref, out):
    """``out`` holds a complete run: it loads, with the uninterrupted run's score map and log."""
    loaded = ACIPModel.from_pretrained(out)
    for name, score in ref["scores"].items():
        assert torch.equal(loaded.score_map[name], score), name
    log = lambda folder: [json.loads(line)["step"] for line in (folder / "run_log.jsonl").read_text().splitlines()]  # noqa: E731
    assert log(out) == log(ref["root"] / "run")
    assert json.loads((out / "acip_run.json").read_text())["finished"] and not (out / "checkpoints").exists()


RENAMED = r"step-0000004\.tmp'\), PosixPath\('[^']*step-0000004'"  # os.replace(tmp, final) of step 4
RUN_KILLS = {
    # inside the second checkpoint's tensor file
    "checkpoint tensors": [{"target": "acip.runs.save_file", "n": 2}],
    # the second checkpoint renamed into place, its pointer not yet updated
    "checkpoint rename, before the pointer": [{"target": "os.replace", "n": 1, "after": True, "match": RENAMED}],
    # inside the pointer update (its temporary file written, not renamed)
    "checkpoint pointer": [{"target": "os.replace", "n": 2, "match": r"latest\.json\.\d+\.tmp"}],
    # removing the previous checkpoint after the pointer moved
    "old checkpoint removal": [{"target": "shutil.rmtree", "n": 1, "match": "step-0000002'"}],
    # inside the final save: the model's weights in the stage folder
    "final save": [{"target": "transformers.modeling_utils.safe_save_file", "n": 1, "match": "acip-save"}],
}


@pytest.mark.parametrize("point", RUN_KILLS)
def test_a_run_killed_resumes_to_the_same_score_map(ref, tmp_path, point):
    out = tmp_path / "run"
    killed(tmp_path, "run", out, RUN_KILLS[point], config=ref["run_config"])
    assert json.loads((out / "acip_run.json").read_text())["finished"] is False
    resumed_run(ref, out)


@pytest.mark.parametrize("exchange", [True, False])
def test_a_run_killed_inside_its_final_swap_is_complete(ref, tmp_path, exchange):
    out = tmp_path / "run"
    if exchange:  # swapped in one step, killed before the replaced work folder was removed
        kills = [{"target": "acip.folders._exchange", "n": 1, "after": True}]
    else:  # two renames: killed between them, when the output folder is missing for an instant
        kills = [{"target": "os.rename", "n": 1, "match": r"acip-old'", "after": True}]
    killed(tmp_path, "run", out, kills, config=ref["run_config"], no_exchange=not exchange)
    assert leftovers(out) != []
    if exchange:
        assert_finished_run(ref, out)
    with pytest.raises(FileNotFoundError, match="holds a finished run"):  # the next call puts things right
        run_acip(ACIPRunConfig(**ref["run_config"]), out, resume=True)
    assert_finished_run(ref, out)
    assert leftovers(out) == []


@pytest.mark.parametrize("point", ["training", "final save"])
def test_overwrite_keeps_the_previous_result_until_the_new_run_is_complete(ref, tmp_path, point):
    out = tmp_path / "out"
    shutil.copytree(ref["root"] / "tuned", out)  # the previous result: a fine-tuned model
    before = hashes(out)
    kills = {"training": [{"target": "acip.runs.save_file", "n": 3}],
             "final save": [{"target": "transformers.modeling_utils.safe_save_file", "n": 1, "match": "acip-save"}]}
    killed(tmp_path, "run", out, kills[point], config=ref["run_config"], overwrite=True)
    assert hashes(out) == before and ACIPModel.from_pretrained(out).config.compressed
    assert (tmp_path / ".out.acip-new" / "checkpoints" / "latest.json").exists()  # the new run, resumable
    resumed_run(ref, out)


@pytest.mark.parametrize("point", ["checkpoint", "final save"])
def test_a_fine_tune_killed_resumes_to_the_same_weights_and_keeps_the_previous_result(ref, tmp_path, point):
    out = tmp_path / "out"
    shutil.copytree(ref["root"] / "export50", out)  # the previous result: an export
    before = hashes(out)
    kills = {"checkpoint": [{"target": "acip.runs.save_file", "n": 2}],
             "final save": [{"target": "transformers.modeling_utils.safe_save_file", "n": 1, "match": "acip-save"}]}
    killed(tmp_path, "finetune", out, kills[point], config=ref["tune_config"], model=str(ref["acip"]), overwrite=True)
    assert hashes(out) == before
    tuned = finetune(ref["acip"], out, resume=True)
    for name, tensor in ref["tuned"].items():
        assert torch.equal(tuned.state_dict()[name], tensor), name
    assert json.loads((out / "finetune_run.json").read_text())["finished"] and leftovers(out) == []


EXPORT_KILLS = {
    "writing the new folder": ([{"target": "transformers.modeling_utils.safe_save_file", "n": 1}], True),
    "swapped, old not yet removed": ([{"target": "acip.folders._exchange", "n": 1, "after": True}], True),
    "between the two renames": ([{"target": "os.rename", "n": 1, "match": "acip-old'", "after": True}], False),
}


@pytest.mark.parametrize("point", EXPORT_KILLS)
def test_an_export_killed_leaves_the_old_or_the_new_export_complete(ref, tmp_path, point):
    out = tmp_path / "out"
    shutil.copytree(ref["root"] / "export", out)  # the previous, prunable export
    before, (kills, exchange) = hashes(out), EXPORT_KILLS[point]
    killed(tmp_path, "export", out, kills, model=str(ref["acip"]), no_exchange=not exchange)
    if out.exists():  # old or new, complete
        record = json.loads((out / "acip_export.json").read_text())
        assert hashes(out) == before or (record["ratio"] == 0.5 and set(record["files"]) == set(hashes(out)))
        assert ACIPModel.from_pretrained(out) is not None
    export_model(ref["acip"], tmp_path / "other", license="mit", validate=False)  # not a call on out: nothing done
    assert leftovers(out) != []
    export_model(ref["acip"], out, license="mit", ratio=0.5, overwrite=True, validate=False)  # the next call
    assert ACIPModel.from_pretrained(out).config.compressed and leftovers(out) == []


HOLD = """
import os, runpy, sys, time
import acip.runs

marker, release, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
original = acip.runs.save_file

def hold(*args, **kwargs):
    # at the first checkpoint (the folder's lock is held): say so, and wait until the test lets the run go on
    if not os.path.exists(marker):
        open(marker, "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
    return original(*args, **kwargs)

acip.runs.save_file = hold
sys.argv = ["acip", *argv]
runpy.run_module("acip.cli", run_name="__main__")
"""


def test_two_runs_started_at_once_on_one_folder(ref, tmp_path):
    base = tmp_path / "base"
    tiny_base_model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    out = tmp_path / "out"
    options = [f"--{k.replace('_', '-')}={v}" for k, v in ref["run_config"].items()]
    args = ["compress", "--base-model", str(base), "--output-dir", str(out), *options]
    env = dict(os.environ, PYTHONPATH=str(TESTS))
    # The first run holds still inside its lock until the second has come and gone: the overlap is certain, not a
    # race between two process start-ups (a tiny run can finish before the other process has imported torch).
    marker, release = tmp_path / "holding", tmp_path / "go-on"
    first = subprocess.Popen([sys.executable, "-c", HOLD, str(marker), str(release), *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        while not marker.exists():
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "acip.cli", *args], capture_output=True, text=True, env=env,
                                timeout=600)  # fmt: skip
    finally:
        release.touch()
    _, first_err = first.communicate(timeout=600)
    assert first.returncode == 0, first_err[-4000:]
    refused = second.stderr
    assert second.returncode == 1, refused  # a failure at run time, told in one line
    assert refused.startswith(f"acip compress: error: output_dir {out} is in use by process"), refused
    assert "Traceback" not in refused
    assert f"process {first.pid} " in refused and "compress --base-model" in refused
    steps = [json.loads(line)["step"] for line in (out / "run_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
