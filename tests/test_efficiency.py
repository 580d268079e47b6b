"""Size, memory and speed report (acip/efficiency.py) on a tiny saved model."""

import pytest
from conftest import save_tiny_run, tiny_acip_model

from acip.efficiency import efficiency_report, format_rows, model_bytes, write_rows


def test_model_bytes_counts_parameters_buffers_and_4bit_constants():
    # under the "factors" cost rule the balanced pairs quantize() stores hold as many weights as compress() kept
    model = tiny_acip_model("llama", rank_cost="factors")
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}  # tied weights once
    assert model_bytes(model) == sum(t.numel() * t.element_size() for t in tensors.values())
    model.prune_model_by_score(0.5).compress()
    fp32 = model_bytes(model)
    model.quantize("nf4")
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    absmax = sum(m.weight.quant_state.absmax.numel() * 4 for m in quantized)
    packed = sum(m.weight.numel() for m in quantized)  # two 4-bit values per byte
    assert absmax > 0 and model_bytes(model) < fp32
    assert model_bytes(model) - fp32 == pytest.approx(packed + absmax - 4 * 2 * packed, abs=4 * 1024)


@pytest.mark.slow
def test_report_rows_dense_compressed_and_4bit(tmp_path):
    acip_dir, _ = save_tiny_run(tmp_path)
    rows = efficiency_report(acip_dir, ratios=[0.5], prompt_tokens=16, new_tokens=4, repeats=1)
    dense, small, quantized = rows
    assert [r.name for r in rows] == ["dense", "ACIP 0.5", "ACIP 0.5 + nf4"]
    # 4-bit stores balanced plain factors: more weights than the gauge-aligned pairs, fewer than dense
    assert dense.params > quantized.params >= small.params
    assert dense.bytes > small.bytes > quantized.bytes and dense.file_bytes > small.file_bytes > quantized.file_bytes
    for row in rows:
        assert row.rss_mib > 0 and row.peak_rss_mib >= row.rss_mib * 0.5
        assert row.prefill_tokens_per_s > 0 and row.decode_tokens_per_s > 0
    assert "ACIP 0.5 + nf4" in format_rows(rows)
    paths = write_rows(rows, tmp_path)
    assert paths["csv"].read_text().count("\n") == 4


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"ratios must be in \(0, 1\].*got 2.0"):
        efficiency_report(tmp_path, ratios=[2.0])
    with pytest.raises(ValueError, match="new_tokens must be at least 2, got 1"):
        efficiency_report(tmp_path, new_tokens=1)
    assert not any(tmp_path.iterdir())
