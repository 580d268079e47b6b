"""The acip command (acip/cli.py): help texts, and acip eval writing its report next to the model."""

import csv

import pytest
from conftest import save_tiny_run, words_file

from acip.cli import main


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
    with pytest.raises(ValueError, match=r"ratios must lie in \(0, 1\], got 1.5"):
        main(["eval", str(tmp_path / "missing"), "--ratios", "1.5"])
