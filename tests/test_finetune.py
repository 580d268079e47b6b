"""LoRA fine-tuning of a compressed tiny ACIP model: the loss falls, merged equals unmerged, adapters reload,
4-bit (QLoRA), resume, and clear errors (acip/finetune.py)."""

import json

import pytest
import torch
from conftest import save_tiny_run, token_ids
from peft import PeftModel

from acip import ACIPModel
from acip.finetune import FinetuneConfig, FinetuneTask, finetune
from acip.loop import Runtime, TrainingLoop, train
from acip.records import FINETUNE_FILE


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A saved tiny prunable ACIP model with a tokenizer, a training text and a held-out text: a cycle of 40 words,
    so that the next word is learnable (random words would leave nothing to learn)."""
    root = tmp_path_factory.mktemp("finetune")
    acip_dir, _ = save_tiny_run(root)
    cycle = lambda start, n: " ".join(f"w{3 + (7 * i) % 40}" for i in range(start, start + n))  # noqa: E731
    (root / "train.txt").write_text(cycle(0, 4000))
    (root / "held_out.txt").write_text(cycle(13, 1000))
    return acip_dir, str(root / "train.txt"), str(root / "held_out.txt")


def tiny_config(tiny_run, **overrides) -> FinetuneConfig:
    _, train, held_out = tiny_run
    settings = dict(
        ratio=0.6, data=train, eval_data=held_out, eval_blocks=4, eval_block_size=32, block_size=32, batch_size=4,
        steps=30, lr=1e-2, warmup_steps=2, lora_r=4, lora_alpha=8, lora_dropout=0.0, checkpoint_every=0,
    )  # fmt: skip
    return FinetuneConfig(**{**settings, **overrides})


def trained(tiny_run, output_dir, steps: int, **overrides) -> TrainingLoop:
    """A fine-tuning loop after ``steps`` training steps, not yet saved."""
    runtime = Runtime()
    task = FinetuneTask(tiny_run[0], tiny_config(tiny_run, steps=steps, **overrides), runtime)
    loop = TrainingLoop(task, output_dir, runtime)
    data = loop.batches.batches()
    for _ in range(steps):
        loop.train_step(data)
    return loop


def losses(folder) -> list[float]:
    return [json.loads(line)["loss"] for line in (folder / "finetune_log.jsonl").read_text().splitlines()]


def test_finetune_lowers_the_loss_and_saves_a_merged_model_without_extra_modules(tiny_run, tmp_path):
    model = finetune(tiny_run[0], tmp_path / "out", tiny_config(tiny_run))
    record = json.loads((tmp_path / "out" / "finetune_run.json").read_text())
    assert record["finished"] and record["steps"] == 30
    assert record["perplexity_after"] < 0.8 * record["perplexity_before"]
    loss = losses(tmp_path / "out")
    assert len(loss) == 30 and sum(loss[-5:]) < 0.9 * sum(loss[:5])
    assert 0.59 < record["size_ratio"] <= 0.61
    assert not any("lora" in name for name in model.state_dict())
    assert not (tmp_path / "out" / "checkpoints").exists()
    assert (tmp_path / "out" / "acip_run.json").read_text() == (tiny_run[0] / "acip_run.json").read_text()

    reloaded = ACIPModel.from_pretrained(tmp_path / "out").eval()
    assert reloaded.config.compressed and reloaded.config.layer_ranks == model.config.layer_ranks
    ids = token_ids()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits)


def test_merged_and_unmerged_outputs_agree(tiny_run, tmp_path):
    tuner = trained(tiny_run, tmp_path, steps=5)
    ids = token_ids()
    with torch.no_grad():
        unmerged = tuner.task.model.eval()(ids).logits
        merged = tuner.task.model.merge_and_unload().eval()(ids).logits
        dense_before = ACIPModel.from_pretrained(tiny_run[0]).prune_model_by_score(0.6).compress().eval()(ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(merged, dense_before, atol=1e-3)  # the adapters did change the model


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_adapter_mode_saves_the_compressed_model_and_an_adapter_that_reloads(tiny_run, tmp_path, quantize):
    tuner = trained(tiny_run, tmp_path, steps=6, save="adapter", quantize=quantize)
    ids = token_ids()
    with torch.no_grad():
        expected = tuner.task.model.eval()(ids).logits
        returned = tuner.save().eval()(ids).logits
    torch.testing.assert_close(returned, expected)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    base = ACIPModel.from_pretrained(tmp_path).eval()
    assert not any("lora" in name for name in base.state_dict())
    assert (getattr(base.config, "quantization_config", None) is not None) == (quantize is not None)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, expected, atol=1e-3)  # the adapter trained
        restored = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(restored(ids).logits, expected)


class DiesAtStep8(FinetuneTask):
    """Killed inside optimizer step 8."""

    def loss(self, ids, step):
        if step == 7:
            raise KeyboardInterrupt("killed")
        return super().loss(ids, step)


def test_resumed_finetune_ends_like_an_uninterrupted_one(tiny_run, tmp_path):
    config = tiny_config(tiny_run, steps=10, checkpoint_every=3, lora_dropout=0.1, grad_accum=2)
    straight = finetune(tiny_run[0], tmp_path / "straight", config)
    with pytest.raises(KeyboardInterrupt):
        build = lambda config, runtime: DiesAtStep8(tiny_run[0], config, runtime)  # noqa: E731
        train(build, config, tmp_path / "resumed", FINETUNE_FILE, resume=False, overwrite=False)
    resumed = finetune(tiny_run[0], tmp_path / "resumed", resume=True)

    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    run = lambda name: json.loads((tmp_path / name / "finetune_run.json").read_text())  # noqa: E731
    assert run("resumed")["perplexity_before"] == run("straight")["perplexity_before"]


def test_distilled_finetune_learns_from_the_base_model(tiny_run, tmp_path):
    finetune(tiny_run[0], tmp_path / "kd", tiny_config(tiny_run, steps=8, distill_alpha=1.0, distill_temperature=2.0))
    log = [json.loads(line) for line in (tmp_path / "kd" / "finetune_log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and all(r["kd"] >= 0 for r in log)
    assert sum(r["kd"] for r in log[-3:]) < sum(r["kd"] for r in log[:3])  # the student moves toward the teacher


def test_finetune_errors(tiny_run, tmp_path):
    acip_dir = tiny_run[0]
    with pytest.raises(ValueError, match="ratio must be in"):
        finetune(acip_dir, tmp_path / "a", tiny_config(tiny_run, ratio=1.5))
    with pytest.raises(ValueError, match="--ratio"):
        finetune(acip_dir, tmp_path / "b", tiny_config(tiny_run, ratio=None))
    with pytest.raises(ValueError, match="save='adapter'"):
        finetune(acip_dir, tmp_path / "c", tiny_config(tiny_run, quantize="nf4"))
    with pytest.raises(ValueError, match="quantize must be"):
        finetune(acip_dir, tmp_path / "d", tiny_config(tiny_run, quantize="int3", save="adapter"))
    compressed = tmp_path / "compressed"
    ACIPModel.from_pretrained(acip_dir).prune_model_by_score(0.5).compress().save_pretrained(compressed)
    with pytest.raises(ValueError, match="already compressed"):
        finetune(compressed, tmp_path / "e", tiny_config(tiny_run))
    assert not any((tmp_path / name).exists() and any((tmp_path / name).iterdir()) for name in "abcd")


def test_cli_finetune(tiny_run, tmp_path, capsys):
    from acip.cli import main

    acip_dir, train, held_out = tiny_run
    main(["finetune", str(acip_dir), "--ratio", "0.6", "--output-dir", str(tmp_path / "cli"), "--data", train,
          "--eval-data", held_out, "--eval-blocks", "2", "--eval-block-size", "16", "--block-size", "16",
          "--batch-size", "2", "--steps", "3", "--lora-r", "2", "--save", "adapter"])  # fmt: skip
    printed = capsys.readouterr().out
    assert f"saved {tmp_path / 'cli'} (adapter)" in printed and "held-out perplexity" in printed
    assert (tmp_path / "cli" / "adapter" / "adapter_config.json").exists()
    record = json.loads((tmp_path / "cli" / "finetune_run.json").read_text())
    assert record["config"]["steps"] == 3 and record["config"]["lora_r"] == 2
