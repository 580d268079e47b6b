"""The acip command (acip/cli.py): help texts, how it ends on an error (one line and the exit status; the traceback
with --debug, and for a bug with where to report it), acip eval writing its report next to the model, resuming a run
with no other option, and acip package. (Every refused argument of every command: tests/test_bad_input.py.)"""

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import (greedy, needs_compiler, save_tiny_run, tiny_base_model, tiny_tokenizer, token_ids,
                      words_file)

from acip.aot import PackagedLM
from acip.cli import main
from acip.hub.modeling_acip import ACIPModel
from acip.training import ACIPRunConfig, ACIPTask, run_acip


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compress", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--stop-ratio" in out and "--resume" in out and "LoRA rank" in out


def test_eval_prints_the_table_and_writes_csv_json_png_next_to_the_model(tmp_path, capsys):
    acip_dir, _ = save_tiny_run(tmp_path)
    text = words_file(tmp_path / "words.txt", 1200)
    main(["eval", str(acip_dir), "--data", text, "--ratios", "1.0", "0.5", "--block-size", "32", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert f"perplexity on {text}: 37 windows of 32 tokens" in out and "ACIP" in out
    rows = list(csv.DictReader((acip_dir / "eval_perplexity.csv").open()))
    assert [(r["method"], r["ratio"]) for r in rows] == [("ACIP", "1.0"), ("ACIP", "0.5")]
    assert (acip_dir / "eval_perplexity.png").stat().st_size > 1000 and (acip_dir / "eval_perplexity.json").exists()


def test_a_mistake_is_one_line_and_status_2_with_the_traceback_under_debug(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("ACIP_DEBUG", raising=False)
    argv = ["eval", str(tmp_path / "missing"), "--ratios", "1.5"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err == "acip eval: error: ratios must be in (0, 1] (the fraction of parameters kept), got 1.5\n"
    for debug_argv, env in ((argv + ["--debug"], None), (["--debug", *argv], None), (argv, "1")):
        if env is not None:
            monkeypatch.setenv("ACIP_DEBUG", env)
        with pytest.raises(SystemExit) as exit_info:
            main(debug_argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and err.startswith("Traceback") and "in check_size_ratio" in err
        assert err.endswith("acip eval: error: ratios must be in (0, 1] (the fraction of parameters kept), got 1.5\n")


def test_a_bug_shows_its_traceback_and_where_to_report_it(tmp_path, capsys, monkeypatch):
    acip_dir, _ = save_tiny_run(tmp_path)

    def broken(args, out_dir):
        return {}["no such key"]  # a KeyError inside acip: no check of the user's input raises that

    monkeypatch.setattr("acip.cli._perplexity", broken)
    capsys.readouterr()  # what saving the model printed
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(acip_dir), "--data", words_file(tmp_path / "w.txt", 100)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("Traceback") and "in broken" in err
    assert "acip eval: internal error: KeyError: 'no such key'\nacip eval: this is a bug in acip" in err
    assert "please report it" in err.splitlines()[-1]


def test_a_value_error_that_acip_did_not_raise_is_a_bug(tmp_path, capsys, monkeypatch):
    acip_dir, _ = save_tiny_run(tmp_path)

    def broken(args, out_dir):
        _, _ = [1, 2, 3]  # Python's ValueError in acip's code: a bug, not bad input

    monkeypatch.setattr("acip.cli._perplexity", broken)
    capsys.readouterr()  # what saving the model printed
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", str(acip_dir), "--data", words_file(tmp_path / "w.txt", 100)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("Traceback") and "internal error: ValueError" in err


def test_an_interrupt_and_a_failure_of_the_machine_are_one_line(tmp_path, capsys, monkeypatch):
    acip_dir, _ = save_tiny_run(tmp_path)
    argv = ["eval", str(acip_dir), "--data", words_file(tmp_path / "w.txt", 100)]
    capsys.readouterr()  # what saving the model printed
    for error, status, line in ((KeyboardInterrupt(), 130, "acip eval: error: interrupted\n"),
                                (OSError(28, "No space left on device"), 1,
                                 "acip eval: error: [Errno 28] No space left on device\n")):  # fmt: skip

        def stopped(args, out_dir, error=error):
            raise error

        monkeypatch.setattr("acip.cli._perplexity", stopped)
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == status and capsys.readouterr().err == line


def test_the_acip_command_prints_only_the_error_line(tmp_path):
    # The installed entry point in a fresh process: nothing else on stderr (no import-time notices either).
    acip = Path(sys.executable).with_name("acip")
    done = subprocess.run([str(acip), "package", str(tmp_path / "missing"), str(tmp_path / "m.pt2")],
                          capture_output=True, text=True, env={**os.environ, "ACIP_DEBUG": ""})  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"acip package: error: model_dir: no such folder '{tmp_path / 'missing'}'\n"


@pytest.mark.slow
def test_compress_resume_with_no_other_option_continues_with_the_recorded_settings(tmp_path, monkeypatch, capsys):
    """README: `acip compress --output-dir runs/demo --resume` continues a killed run as it was started."""
    base = tmp_path / "base"
    tiny_base_model().save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    config = ACIPRunConfig(data=words_file(tmp_path / "words.txt", 2000), base_model=str(base), block_size=16,
                           batch_size=2, lr=1e-2, lambda_init=1e-2, lambda_growth=1.3, lambda_every=1, stop_ratio=0.8,
                           post_tune_steps=1, checkpoint_every=1, lora_r=2, lora_alpha=4, basis="weight")  # fmt: skip
    loss = ACIPTask.loss

    def killed_in_step_2(self, ids, step):
        if step == 1:
            raise KeyboardInterrupt("killed")
        return loss(self, ids, step)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(ACIPTask, "loss", killed_in_step_2)
        run_acip(config, tmp_path / "run")
    main(["compress", "--output-dir", str(tmp_path / "run"), "--resume"])
    assert f"saved {tmp_path / 'run'}" in capsys.readouterr().out
    record = json.loads((tmp_path / "run" / "acip_run.json").read_text())
    assert record["finished"] and record["config"] == dataclasses.asdict(config)
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, record["steps"] + 1)) and record["steps"] >= 2


@pytest.mark.slow
@needs_compiler
def test_package_prunes_compresses_and_compiles(tmp_path, capsys):
    acip_dir, _ = save_tiny_run(tmp_path)
    path = tmp_path / "m.pt2"
    args = ["package", str(acip_dir), str(path), "--ratio", "0.6", "--no-fuse", "--batch-size", "2",
            "--max-cache-len", "24"]  # fmt: skip
    main(args)
    assert f"wrote {path}" in capsys.readouterr().out
    model = ACIPModel.from_pretrained(acip_dir).eval().prune_model_by_score(0.6).compress()
    ids = token_ids(2, 7)
    assert torch.equal(PackagedLM(path).generate(ids, 9), greedy(model, ids, 9))
    model.save_pretrained(tmp_path / "small")
    main(["package", str(tmp_path / "small"), str(tmp_path / "n.pt2"), "--no-fuse", "--batch-size", "2",
          "--max-cache-len", "24"])  # an already compressed model, packaged as it is
    assert torch.equal(PackagedLM(tmp_path / "n.pt2").generate(ids, 9), greedy(model, ids, 9))
