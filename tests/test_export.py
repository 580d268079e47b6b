"""acip export and push (acip/export.py): the folder's files and model card, its offline check in a fresh process,
the compressed export's size, refusals that leave folders alone, and the push path up to huggingface_hub."""

import hashlib
import json
import shutil
import struct
from pathlib import Path

import huggingface_hub
import pytest
import safetensors.torch
import torch
from conftest import save_tiny_run
from huggingface_hub import ModelCard

import acip.export as export
from acip import ACIPModel
from acip.cli import main
from acip.export import ExportError, check_folder, export_model, push_to_hub
from acip.finetune import FinetuneConfig
from acip.hub import HUB_FILES
from acip.report import PerplexityReport, read_report, write_report

EXPORTED_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "requirements.txt", "README.md", "eval_perplexity.png",
                  "acip_export.json")  # fmt: skip


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny ACIP run with an eval report, exported full (prunable) and at ratio 0.5 (compressed)."""
    root = tmp_path_factory.mktemp("export")
    acip_dir, _ = save_tiny_run(root)
    report = PerplexityReport(str(acip_dir), 32, [1.0, 0.5], {"wiki-validation": 4})
    report.results["wiki-validation"] = {"ACIP": {1.0: 12.345, 0.5: 67.891}}
    report.dense["wiki-validation"] = 11.5
    write_report(report, acip_dir)
    # Checked once each, by the offline-load test below (each check is a fresh Python process: seconds).
    full = export_model(acip_dir, root / "full", repo_id="acme/tiny-acip", license="mit", validate=False)
    small = export_model(acip_dir, root / "small", repo_id="acme/x-50", license="mit", ratio=0.5, validate=False)
    return acip_dir, full, small


def safetensors_data_bytes(path) -> int:
    """Bytes of tensor data in a safetensors file (its size minus the 8-byte length and the JSON header)."""
    with open(path, "rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


def test_exported_folders_hold_every_file_and_a_filled_model_card(exported):
    _, full, small = exported
    for folder, repo_id in ((full, "acme/tiny-acip"), (small, "acme/x-50")):
        for name in (*EXPORTED_FILES, *HUB_FILES):
            assert (folder / name).is_file(), (folder, name)
        config = json.loads((folder / "config.json").read_text())
        assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
        assert (folder / "requirements.txt").read_text().split() == list(export.HUB_REQUIREMENTS)

        text = (folder / "README.md").read_text()
        assert "{{" not in text and "{%" not in text and "}}" not in text and "None" not in text
        card = ModelCard(text)
        assert card.data.license == "mit" and card.data.pipeline_tag == "text-generation"
        assert card.data.library_name == "transformers" and "acip" in card.data.tags
        assert card.data.metrics == ["perplexity"] and card.data.datasets == ["org/texts"]
        assert f'from_pretrained("{repo_id}", trust_remote_code=True)' in text
        assert "| dense base model | 11.50 |" in text and "| 0.50 | 67.89 |" in text  # the measured table
        assert "](eval_perplexity.png)" in text
        record = json.loads((folder / "acip_export.json").read_text())
        assert record["repo_id"] == repo_id and set(record["files"]) == {
            p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()
        }
    assert "prune_model_by_score(compression_ratio=0.5)" in (full / "README.md").read_text()
    assert "model.prune_model_by_score(" not in (small / "README.md").read_text()  # compressed: nothing to prune


@pytest.mark.slow
def test_exported_folders_load_offline_in_a_fresh_process(exported):
    _, full, small = exported
    seen = check_folder(full)
    assert seen["prunable"] and seen["AutoModel"] == seen["AutoModelForCausalLM"] == "ACIPModel"
    assert 0.5 <= seen["size_ratio"] < 0.55
    seen = check_folder(small)
    assert not seen["prunable"] and 0.5 <= seen["size_ratio"] < 0.55


def state_bytes(model) -> int:
    """Bytes of a model's state dict, shared (tied) tensors once: what save_pretrained writes."""
    unique = {t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}
    return sum(unique.values())


def test_compressed_export_is_smaller_by_the_bytes_pruning_removes(exported):
    acip_dir, full, small = exported
    model = ACIPModel.from_pretrained(acip_dir)
    assert safetensors_data_bytes(full / "model.safetensors") == state_bytes(model)
    # The memory-budget planner's figure for ratio 0.5, less the buffers that are not saved (rotary inv_freq):
    model.prune_model_by_score(0.5)
    saved = set(model.state_dict())
    unsaved = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in saved)
    assert safetensors_data_bytes(small / "model.safetensors") == model.compressed_bytes() - unsaved
    assert (small / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size


@pytest.mark.slow
def test_quantized_bf16_export_needs_bitsandbytes_and_loads(exported, tmp_path):
    acip_dir, _, _ = exported
    out = export_model(acip_dir, tmp_path / "q", license="mit", ratio=0.5, quantize="nf4", dtype="bfloat16")
    assert (out / "requirements.txt").read_text().split()[-1] == export.QUANT_REQUIREMENT
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert "4-bit" in ModelCard((out / "README.md").read_text()).data.tags


def test_export_refusals_leave_folders_alone(exported, tmp_path):
    acip_dir, full, small = exported
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_model(acip_dir, taken, license="mit")
    with pytest.raises(ValueError, match="license"):
        export_model(acip_dir, tmp_path / "a")
    with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\]"):
        export_model(acip_dir, tmp_path / "b", license="mit", ratio=1.5)
    with pytest.raises(ValueError, match="repo_id must be 'org/name'"):
        export_model(acip_dir, tmp_path / "c", license="mit", repo_id="no-namespace")
    with pytest.raises(ValueError, match="already compressed"):
        export_model(small, tmp_path / "d", license="mit", ratio=0.5)
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(full, no_tokenizer)
    (no_tokenizer / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        export_model(no_tokenizer, tmp_path / "e", license="mit")
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    assert not any((tmp_path / name).exists() for name in "abcde")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def hashes(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_folder_that_fails_its_check_is_not_exported_and_the_old_one_stays(exported, tmp_path, monkeypatch):
    acip_dir, full, _ = exported
    out = tmp_path / "out"
    shutil.copytree(full, out)  # an earlier export
    before = hashes(out)
    failing = tmp_path / "fail.py"
    failing.write_text("import sys; sys.exit('simulated load failure')")
    monkeypatch.setattr(export, "CHECK_SCRIPT", failing)
    with pytest.raises(ExportError, match="simulated load failure"):
        export_model(acip_dir, out, license="mit", overwrite=True)
    assert hashes(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [".out.acip-lock"]  # no stage left


def test_overwrite_swaps_in_the_new_export_and_clears_what_killed_exports_left(exported, tmp_path):
    acip_dir, full, _ = exported
    out = tmp_path / "out"
    shutil.copytree(full, out)  # an earlier, prunable export
    (tmp_path / ".out.acip-save").mkdir()  # an export killed while writing its new folder
    (tmp_path / "mine.txt").write_text("the user's")
    export_model(acip_dir, out, license="mit", ratio=0.5, overwrite=True, validate=False)
    assert ACIPModel.from_pretrained(out).config.compressed
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.acip-lock", "mine.txt", "out"]


def test_the_repository_requirements_are_what_an_export_writes():
    root_requirements = Path(__file__).parents[1] / "requirements.txt"
    assert root_requirements.read_text() == export.requirements_text() == "\n".join(export.HUB_REQUIREMENTS) + "\n"


def test_exported_files_name_no_local_path(exported, tmp_path, capsys):
    """A fine-tuned model whose records and config name local folders and files: the export carries their names."""
    acip_dir, _, _ = exported
    tuned = tmp_path / "private" / "tuned"
    shutil.copytree(acip_dir, tuned)
    config = json.loads((tuned / "config.json").read_text())
    config["base_model_name_or_path"] = config["text_config"]["_name_or_path"] = str(tmp_path / "private" / "llama")
    (tuned / "config.json").write_text(json.dumps(config))
    data = str(tmp_path / "private" / "corpus.txt")
    (tuned / "finetune_run.json").write_text(json.dumps({
        "config": {**FinetuneConfig(ratio=0.5, data=data, eval_data=data).__dict__}, "finished": True, "steps": 3,
        "size_ratio": 0.5, "model": str(acip_dir), "base_model": str(tmp_path / "private" / "llama"),
        "inputs": {"model_dir": {"path": str(acip_dir), "fingerprint": {}}},
    }))  # fmt: skip
    report = read_report(tuned)
    report.model, report.windows = str(tuned), {data: 4}
    report.results, report.dense = {data: report.results["wiki-validation"]}, {}
    write_report(report, tuned)
    out = tmp_path / "out"
    main(["export", str(tuned), str(out), "--license", "mit", "--no-validate"])
    printed = capsys.readouterr().out
    assert "local paths replaced" in printed and "config.json: base_model_name_or_path -> 'llama'" in printed
    assert "finetune_run.json: config.data -> 'corpus.txt'" in printed
    assert str(tmp_path) not in printed.split("local paths replaced")[1]  # it says where, not what the paths were
    for path in out.rglob("*"):
        if path.is_file():
            assert str(tmp_path).encode() not in path.read_bytes(), path.name
    card = (out / "README.md").read_text()
    assert "`llama`" in card and "corpus.txt" in card


class FakeHfApi:
    """Stands in for huggingface_hub.HfApi: records the calls, lists the uploaded files, or fails on demand."""

    calls: list = []
    fail_on: str | None = None

    def __init__(self, token=None):
        FakeHfApi.calls.append(("init", token))

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None):
        FakeHfApi.calls.append(("create_repo", repo_id, private, exist_ok, repo_type))
        if FakeHfApi.fail_on == "create_repo":
            raise PermissionError("401 Unauthorized: invalid token")
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None):
        files = sorted(p.name for p in folder_path.iterdir())
        FakeHfApi.calls.append(("upload_folder", repo_id, files, repo_type, commit_message))
        if FakeHfApi.fail_on == "upload_folder":
            raise ConnectionError("connection reset by peer")
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.fail_on = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    return FakeHfApi


def test_push_creates_the_repo_and_uploads_every_file(exported, fake_hub):
    _, full, _ = exported
    url = push_to_hub(full, "acme/tiny-acip", private=True, token="hf_test", validate=False)
    assert url == "https://huggingface.co/acme/tiny-acip/commit/abc"
    files = sorted(p.name for p in full.iterdir())
    assert fake_hub.calls == [
        ("init", "hf_test"),
        ("create_repo", "acme/tiny-acip", True, True, "model"),
        ("upload_folder", "acme/tiny-acip", files, "model", "Upload ACIP model"),
    ]
    assert {"model.safetensors", "README.md", "requirements.txt", *HUB_FILES} <= set(files)


@pytest.mark.parametrize("step", ["create_repo", "upload_folder"])
def test_a_failed_push_names_the_step_and_keeps_the_folder(exported, fake_hub, step):
    _, full, _ = exported
    before = sorted((p.name, p.stat().st_size) for p in full.iterdir())
    fake_hub.fail_on = step
    with pytest.raises(ExportError, match="creating the repository" if step == "create_repo" else "uploading") as info:
        push_to_hub(full, "acme/tiny-acip", validate=False)
    assert str(full) in str(info.value) and "unchanged" in str(info.value)
    assert sorted((p.name, p.stat().st_size) for p in full.iterdir()) == before


@pytest.mark.slow
def test_push_refuses_a_folder_that_does_not_load(exported, fake_hub, tmp_path):
    _, full, _ = exported
    broken = tmp_path / "broken"
    shutil.copytree(full, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated upload
    with pytest.raises(ExportError, match="does not load"):
        push_to_hub(broken, "acme/tiny-acip")
    assert fake_hub.calls == []  # the Hub was never contacted


def test_cli_export_and_push(exported, fake_hub, tmp_path, capsys):
    acip_dir, _, _ = exported
    out = tmp_path / "cli"
    main(["export", str(acip_dir), str(out), "--license", "mit", "--ratio", "0.5", "--repo-id", "acme/x",
          "--no-validate", "--push-to-hub", "--private"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"exported {out}" in printed and "pushed to https://huggingface.co/acme/x/commit/abc" in printed
    assert [c[0] for c in fake_hub.calls] == ["init", "create_repo", "upload_folder"]
    assert fake_hub.calls[1][2] is True  # --private
    with torch.no_grad():
        assert ACIPModel.from_pretrained(out).config.compressed
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(acip_dir), str(tmp_path / "y"), "--license", "mit", "--push-to-hub"])
    assert exit_info.value.code == 2 and "acip export: error: --push-to-hub needs --repo-id" in capsys.readouterr().err


def test_int4_export_is_calibrated_unless_told_not_to(exported, tmp_path):
    acip_dir, _, _ = exported
    with pytest.raises(FileNotFoundError, match="calibration: no such file"):
        export_model(acip_dir, tmp_path / "bad", license="mit", ratio=0.5, quantize="int4",
                     calibration=str(tmp_path / "missing.txt"))  # fmt: skip
    assert not (tmp_path / "bad").exists()
    calibrated = export_model(acip_dir, tmp_path / "gptq", license="mit", ratio=0.5, quantize="int4", validate=False)
    nearest = export_model(acip_dir, tmp_path / "rtn", license="mit", ratio=0.5, quantize="int4", calibration=None,
                           validate=False)  # fmt: skip
    assert json.loads((calibrated / "config.json").read_text())["int_quantization"]["quant_type"] == "int4"
    a, b = (safetensors.torch.load_file(folder / "model.safetensors") for folder in (calibrated, nearest))
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if k.endswith("qweight"))
