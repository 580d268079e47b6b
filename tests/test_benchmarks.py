"""The measuring machinery of benchmarks/inference.py (the script, not the package, holds it) on a tiny model: each
saved form measured in a fresh process, its packages built and measured."""

import importlib.util
from pathlib import Path

import pytest
from conftest import needs_compiler, tiny_acip_model

pytestmark = pytest.mark.slow  # fresh processes and, for packages, a C++ compiler


def benchmark(name: str):
    """The benchmark script ``benchmarks/NAME.py`` as a module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_saved_form_is_measured_in_a_fresh_process(tmp_path):
    inference = benchmark("inference")
    tiny_acip_model("llama").prune_model_by_score(0.6).compress().fuse().save_pretrained(tmp_path / "model")
    figures = inference.measure_inference_in_subprocess(tmp_path / "model", new_tokens=4, threads=1)
    keys = {"decode_b1", "decode_b8", "prefill_256", "prefill_1024", "rss_mib", "first_calls_s"}
    assert keys <= figures.keys() and all(figures[k] > 0 for k in keys - {"rss_mib"})
    assert figures["params"] == tiny_acip_model("llama").prune_model_by_score(0.6).compress().get_num_params(full=True)


@needs_compiler
def test_packages_are_built_and_measured(tmp_path):
    inference = benchmark("inference")
    tiny_acip_model("qwen2").prune_model_by_score(0.6).compress().fuse().save_pretrained(tmp_path / "model")
    shape = dict(new_tokens=6, batches=(1,), prompts=(40,))
    out = inference.build_inference_packages(tmp_path / "model", tmp_path / "packages", **shape)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["decode_b1.pt2", "prefill_40.pt2"]
    figures = inference.measure_packages(out, best_of=1, **shape)
    keys = {"decode_b1", "prefill_40", "first_calls_s"}
    assert keys <= figures.keys() and all(figures[k] > 0 for k in keys)
    assert figures["rss_mib"] >= 0  # in this process freed memory is reused: a tiny package may add nothing
