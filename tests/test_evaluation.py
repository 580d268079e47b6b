"""Perplexity, ratio sweeps, the SVD-truncation baselines and the perplexity report (acip/evaluation.py, report.py)."""

import csv
import json
import math

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
from conftest import save_tiny_run, tiny_acip_model, token_ids, words_file

from acip.evaluation import (
    evaluate_perplexity,
    perplexity,
    ratio_sweep,
    singular_value_scores,
    uniform_scores,
)
from acip.report import DENSE, PerplexityReport, plot_perplexity, read_report, write_report


def test_perplexity_is_exp_of_the_mean_next_token_nll():
    model = tiny_acip_model("llama").eval()
    blocks = token_ids(batch=5, length=16)
    with torch.no_grad():
        logits = model(blocks).logits
    nll = [F.cross_entropy(logits[b, t], blocks[b, t + 1]) for b in range(5) for t in range(15)]
    expected = math.exp(sum(float(x) for x in nll) / len(nll))
    assert math.isclose(perplexity(model, blocks, batch_size=2), expected, rel_tol=1e-5)


def test_sweep_restores_the_pruning_state():
    model = tiny_acip_model("qwen2").eval()
    model.prune_model_by_score(0.7)
    before = {name: layer.mask.clone() for name, layer in model.acip_layers().items()}
    result = ratio_sweep(model, token_ids(batch=3, length=16), [1.0, 0.5], batch_size=2)
    assert set(result) == {1.0, 0.5} and result[0.5] != result[1.0]
    for name, layer in model.acip_layers().items():
        assert torch.equal(layer.mask, before[name])


def test_bad_ratios_are_refused_before_any_work():
    model = tiny_acip_model("llama")
    model.prune_model_by_score(0.7)
    before = {name: layer.mask.clone() for name, layer in model.acip_layers().items()}
    for bad in ([0.5, 1.5], [0.0], []):
        with pytest.raises(ValueError, match=r"ratios .*\(0, 1\]"):
            ratio_sweep(model, token_ids(), bad)
    assert all(torch.equal(layer.mask, before[n]) for n, layer in model.acip_layers().items())


def test_baseline_scores():
    model = tiny_acip_model("llama", random_scores=False)
    model.score_map = singular_value_scores(model)
    for layer in model.acip_layers().values():
        s = torch.linalg.svdvals(layer.u.weight.double() @ layer.sv.weight.double() * layer.mask_constant)
        torch.testing.assert_close(layer.score.double(), s, rtol=1e-4, atol=1e-5)
    model.score_map = uniform_scores(model)
    model.prune_model_by_score(0.5)
    fractions = [layer.num_params() / (layer.in_features * layer.out_features + (layer.bias is not None) *
                 layer.out_features) for layer in model.acip_layers().values()]
    # every layer at the same share of its parameters, within one rank's cost
    assert max(fractions) - min(fractions) < 0.2


def test_evaluate_perplexity_with_baselines_on_the_same_windows(tmp_path):
    acip_dir, _ = save_tiny_run(tmp_path)
    texts = [words_file(tmp_path / "a.txt", 1500, seed=1), words_file(tmp_path / "b.txt", 900, seed=2)]
    report = evaluate_perplexity(acip_dir, texts, [1.0, 0.6], block_size=32, max_blocks=10, baselines=True)
    assert report.windows == {texts[0]: 10, texts[1]: 10}
    for text in texts:
        assert list(report.results[text]) == ["ACIP", "SVD uniform", "SVD global"]
        # Untrained SVD at full rank is the base model itself: same windows, same perplexity.
        for method in ("SVD uniform", "SVD global"):
            assert math.isclose(report.results[text][method][1.0], report.dense[text], rel_tol=1e-4)
        assert report.results[text]["SVD uniform"][0.6] != report.results[text]["SVD global"][0.6]
    assert "SVD uniform" in report.table() and DENSE in report.table()


def _report() -> PerplexityReport:
    results = {
        "wiki": {"ACIP": {1.0: 21.0, 0.7: 40.0, 0.4: 300.0}, "SVD uniform": {1.0: 20.0, 0.7: 4e6, 0.4: 1e8}},
        "lee": {"ACIP": {1.0: 30.0, 0.7: 55.0, 0.4: 420.0}, "SVD uniform": {1.0: 29.0, 0.7: 5e6, 0.4: 2e8}},
    }
    return PerplexityReport("runs/x", 512, [1.0, 0.7, 0.4], {"wiki": 40, "lee": 20}, results, {"wiki": 20.0})


def test_report_files_hold_the_data_and_one_line_per_method(tmp_path):
    report = _report()
    paths = write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval_perplexity.csv", "eval_perplexity.json",
                                                          "eval_perplexity.png"]  # fmt: skip
    assert read_report(tmp_path) == report
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 1 + 2 * 3 + 2 * 3  # the dense base model once (measured on wiki only)
    assert {"data": "lee", "method": "SVD uniform", "ratio": "0.4", "perplexity": "200000000.0"} in rows
    assert json.loads(paths["json"].read_text())["results"]["wiki"]["ACIP"]["0.7"] == 40.0

    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(paths["png"]).shape
    assert width > height > 100

    fig = plot_perplexity(report)
    wiki, lee = fig.axes
    assert [line.get_label() for line in wiki.get_lines()] == ["ACIP", "SVD uniform", DENSE]
    assert [line.get_label() for line in lee.get_lines()] == ["ACIP", "SVD uniform"]
    acip = wiki.get_lines()[0]
    assert list(acip.get_xdata()) == [0.4, 0.7, 1.0] and list(acip.get_ydata()) == [300.0, 40.0, 21.0]
    assert list(wiki.get_lines()[2].get_ydata()) == [20.0, 20.0] and wiki.get_yscale() == "log"
