"""The training loop (acip/loop.py) on a task of its own, a two-layer next-token model: a run trains to its end and
publishes its result with the record and log, a killed run resumes to the same weights, a run over a previous
result leaves it whole until the new one is complete, and text that cannot fill a batch is refused before the run's
folder is made. The settings every run shares are checked with errors that name them."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import VOCAB, tiny_tokenizer, words_file
from safetensors.torch import load_file, save_file

from acip.loop import Runtime, Task, TrainingConfig, default, train
from acip.records import RUN_FILE, RUN_LOG

STEPS = 6


class NextToken(Task):
    """An embedding and a linear head learning the next token: a task with weights, a loss and a saved result."""

    record_file, log_file = RUN_FILE, RUN_LOG

    def __init__(self, config: TrainingConfig, runtime: Runtime, die_at: int | None = None):
        torch.manual_seed(config.seed)
        self.config, self.tokenizer, self.die_at = config, tiny_tokenizer(), die_at
        self.model = torch.nn.Sequential(torch.nn.Embedding(VOCAB, 8), torch.nn.Linear(8, VOCAB))
        self.summary = {"begun": False}

    def begin(self):
        self.summary["begun"] = True

    def param_groups(self):
        return [{"params": list(self.model.parameters())}]

    def loss(self, ids, step):
        if step == self.die_at:
            raise KeyboardInterrupt("killed")
        logits = self.model(ids[:, :-1])  # (B, T-1, V)
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return loss, {"loss": float(loss)}

    def done(self, step):
        return step >= STEPS

    def state(self):
        return {f"w.{name}": p for name, p in self.model.named_parameters()}, {}

    def load_state(self, tensors, meta):
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(tensors[f"w.{name}"])

    def save(self, folder):
        if folder is not None:
            save_file({n: p.detach().contiguous() for n, p in self.model.named_parameters()}, folder / "w.safetensors")
        return self.model


def run(config, out, die_at=None, **options):
    """``train`` with the NextToken task."""
    return train(lambda c, runtime: NextToken(c, runtime, die_at), config, out, RUN_FILE,
                 inputs=lambda c: {"data": c.data}, **{"resume": False, "overwrite": False, **options})  # fmt: skip


@pytest.fixture
def config(tmp_path):
    return TrainingConfig(data=words_file(tmp_path / "words.txt", 400), block_size=8, batch_size=2, lr=1e-2,
                          checkpoint_every=2, compute_dtype="float32")  # fmt: skip


def test_a_run_trains_to_its_end_and_publishes_record_log_and_result(tmp_path, config):
    out = tmp_path / "out"
    model = run(config, out)
    record = json.loads((out / RUN_FILE).read_text())
    assert record["finished"] and record["steps"] == STEPS and record["begun"] and record["processes"] == 1
    assert record["config"] == dataclasses.asdict(config) and record["global_batch"] == 2
    assert record["inputs"]["data"]["path"] == config.data and record["run_id"]
    assert sorted(record["files"]) == sorted(p.name for p in out.iterdir()) == [RUN_FILE, RUN_LOG, "w.safetensors"]
    steps = [json.loads(line) for line in (out / RUN_LOG).read_text().splitlines()]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1)) and all(s["lr"] == 1e-2 for s in steps)
    saved, start = load_file(out / "w.safetensors"), NextToken(config, Runtime()).model
    assert all(torch.equal(saved[n], p) for n, p in model.named_parameters())
    assert not any(torch.equal(saved[n], p) for n, p in start.named_parameters())  # it trained
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.acip-lock", "out", "words.txt"]


def test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, config):
    whole = run(config, tmp_path / "whole")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(config, out, die_at=3)  # after the checkpoint of step 2
    assert (out / "checkpoints" / "latest.json").exists()
    with pytest.raises(ValueError, match=r"other settings.*\n  lr: recorded 0.01, given 0.1\n"):
        run(dataclasses.replace(config, lr=0.1), out, resume=True)
    resumed = run(config, out, resume=True)
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    log = [json.loads(line)["step"] for line in (out / RUN_LOG).read_text().splitlines()]
    assert log == list(range(1, STEPS + 1)) and not (out / "checkpoints").exists()


def test_a_run_over_a_previous_result_leaves_it_whole_until_it_is_complete(tmp_path, config):
    out = tmp_path / "out"
    run(config, out)
    before = (out / "w.safetensors").read_bytes()
    with pytest.raises(KeyboardInterrupt):
        run(dataclasses.replace(config, seed=1), out, die_at=3, overwrite=True)
    assert (out / "w.safetensors").read_bytes() == before  # the new run lives beside it meanwhile
    assert json.loads((tmp_path / ".out.acip-new" / RUN_FILE).read_text())["config"]["seed"] == 1
    run(dataclasses.replace(config, seed=1), out, resume=True)
    assert (out / "w.safetensors").read_bytes() != before and not (tmp_path / ".out.acip-new").exists()
    assert json.loads((out / RUN_FILE).read_text())["config"]["seed"] == 1


def test_text_that_cannot_fill_a_batch_is_refused_before_the_run_has_a_folder(tmp_path, config):
    short = dataclasses.replace(config, data=words_file(tmp_path / "short.txt", 12))
    with pytest.raises(ValueError, match="too short: 1 blocks of 8 tokens, fewer than one batch of 2"):
        run(short, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_shared_settings_are_checked_by_name():
    for field_name, value, match in (("block_size", 0, "block_size must be >= 1"),
                                     ("grad_accum", 0.5, "grad_accum must be >= 1"),
                                     ("checkpoint_every", -1, "checkpoint_every must be >= 0"),
                                     ("lr", 0.0, "lr must be > 0"),
                                     ("lora_dropout", 1.0, r"lora_dropout must be in \[0, 1\)"),
                                     ("distill_alpha", 1.5, r"distill_alpha must be in \[0, 1\]"),
                                     ("distill_temperature", 0, "distill_temperature must be > 0"),
                                     ("compute_dtype", "float16", "compute_dtype must be one of"),
                                     ("batch_size", True, "batch_size must be >= 1")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            dataclasses.replace(TrainingConfig(), **{field_name: value}).validate()
    TrainingConfig().validate()

    @dataclasses.dataclass
    class Other(TrainingConfig):
        block_size: int = default("block_size", 64)

    other = next(f for f in dataclasses.fields(Other) if f.name == "block_size")
    base = next(f for f in dataclasses.fields(TrainingConfig) if f.name == "block_size")
    assert Other().block_size == 64 and other.metadata == base.metadata  # another default, the same help text


def test_the_runtime_computes_in_the_dtype_asked_for():
    plain, bf16 = Runtime(compute_dtype="float32"), Runtime(compute_dtype="bfloat16")
    assert (plain.device.type, plain.dtype, plain.compute_dtype) == ("cpu", torch.float32, torch.float32)
    assert bf16.dtype == torch.float32 and bf16.compute_dtype == torch.bfloat16  # weights stay float32 on the CPU
    layer = torch.nn.Linear(4, 4)
    with bf16.autocast:
        assert layer(torch.ones(1, 4)).dtype == torch.bfloat16
    with plain.autocast:
        assert layer(torch.ones(1, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        Runtime(compute_dtype="int8")
