"""The acip command (acip/cli.py): help texts, acip eval writing its report next to the model, resuming a run with
no other option, and acip package."""

import csv
import dataclasses
import json

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


def test_eval_refuses_bad_ratios_before_loading(tmp_path):
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 1\].*got 1.5"):
        main(["eval", str(tmp_path / "missing"), "--ratios", "1.5"])


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


@pytest.mark.parametrize(
    "extra, match",
    [(["--ratio", "1.5"], r"ratio must be in \(0, 1\]"),
     ([], r"prunable: give the size ratio"),
     (["--ratio", "0.5", "--max-cache-len", "1"], "max_cache_len must be an integer >= 2"),
     (["--ratio", "0.5", "--batch-size", "0"], "batch_size must be an integer >= 1")],  # fmt: skip
)
def test_package_refuses_bad_arguments_and_writes_nothing(tmp_path, extra, match):
    acip_dir, _ = save_tiny_run(tmp_path)
    with pytest.raises(ValueError, match=match):
        main(["package", str(acip_dir), str(tmp_path / "m.pt2"), *extra])
    with pytest.raises(ValueError, match="must end in .pt2"):
        main(["package", str(acip_dir), str(tmp_path / "m.bin"), "--ratio", "0.5"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acip", "base"]


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
    with pytest.raises(FileExistsError, match="overwrite"):
        main(args)
    model.save_pretrained(tmp_path / "small")
    with pytest.raises(ValueError, match="already compressed"):
        main(["package", str(tmp_path / "small"), str(tmp_path / "n.pt2"), "--ratio", "0.5"])
