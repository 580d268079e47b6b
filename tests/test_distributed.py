"""Data parallelism (acip/distributed.py): two CPU processes under ``accelerate launch`` (gloo) against one process
with twice the batch on the same data order, for the ACIP run and for fine-tuning; gradient checkpointing; loading
the base model with a device map."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_run, tiny_base_model, tiny_tokenizer, words_file
from safetensors.torch import load_file

from acip import ACIPModel
from acip.base_model import load_base_model
from acip.distributed import Processes
from acip.finetune import FinetuneConfig, finetune
from acip.loop import Runtime, TrainingLoop
from acip.records import RUN_FILE
from acip.runs import RunFolder
from acip.training import ACIPRunConfig, ACIPTask, run_acip

REPO = Path(__file__).resolve().parents[1]
RUN = dict(block_size=32, lr=1e-3, lambda_init=1e-2, lambda_growth=1.1, lambda_every=1, stop_ratio=0.5,
           post_tune_steps=3, max_steps=200, checkpoint_every=0, lora_r=4, lora_alpha=8, lora_dropout=0.0,
           basis="weight", compute_dtype="float32")  # fmt: skip  (bf16 rounding would blur the comparison)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved tiny Llama with its tokenizer, and a text file of its words."""
    folder = tmp_path_factory.mktemp("dp")
    tiny_base_model("llama").save_pretrained(folder / "base")
    tiny_tokenizer().save_pretrained(folder / "base")
    return folder / "base", words_file(folder / "words.txt", 6000)


def options(settings: dict) -> list[str]:
    """Command-line options for config fields."""
    return [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def launch_two(*args: str) -> str:
    """Run ``acip.cli`` in two CPU processes through accelerate launch; returns their stdout."""
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(port), "-m", "acip.cli", *args]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_two_processes_prune_like_one_process_with_twice_the_batch(base, tmp_path):
    base_dir, words = base
    settings = dict(RUN, base_model=str(base_dir), data=words)
    stdout = launch_two("compress", *options(settings), "--batch-size", "2", "--output-dir", str(tmp_path / "two"))
    one = run_acip(ACIPRunConfig(**settings, batch_size=4), tmp_path / "one")
    two = ACIPModel.from_pretrained(tmp_path / "two")

    assert stdout.count("saved ") == 1  # only the main process reports (and writes)
    record = json.loads((tmp_path / "two" / "acip_run.json").read_text())
    assert (record["processes"], record["global_batch"]) == (2, 4)
    assert record["pruning_steps"] == json.loads((tmp_path / "one" / "acip_run.json").read_text())["pruning_steps"]
    logs = [(tmp_path / run / "run_log.jsonl").read_text().splitlines() for run in ("one", "two")]
    losses = [[json.loads(line)["loss"] for line in log] for log in logs]
    assert len(losses[0]) == len(losses[1])
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    # Two half-batch means averaged are the full-batch mean up to rounding, so the score maps agree to rounding:
    # the same values die on the same step, in the same order; measured max |Δscore| 3e-4 (scores are in steps).
    for name, score in one.score_map.items():
        other = two.score_map[name]
        assert torch.equal(score <= 0, other <= 0), name
        torch.testing.assert_close(other, score, rtol=0, atol=5e-3)
    for ratio in (0.5, 0.7, 0.9):
        one.prune_model_by_score(ratio)
        two.prune_model_by_score(ratio)
        for name, layer in one.acip_layers().items():
            assert torch.equal(layer.kept, two.acip_layers()[name].kept), (ratio, name)


@pytest.mark.slow
def test_two_processes_fine_tune_like_one_process_with_twice_the_batch(base, tmp_path):
    acip_dir, _ = save_tiny_run(tmp_path)
    words = base[1]
    settings = dict(ratio=0.6, data=words, eval_data=words, eval_blocks=2, eval_block_size=32, block_size=32, steps=6,
                    warmup_steps=2, lr=1e-3, lora_r=4, lora_dropout=0.0, checkpoint_every=0,
                    compute_dtype="float32")  # fmt: skip
    two = str(tmp_path / "two")
    launch_two("finetune", str(acip_dir), *options(settings), "--batch-size", "2", "--output-dir", two)
    finetune(acip_dir, tmp_path / "one", FinetuneConfig(**settings, batch_size=4))

    records = [json.loads((tmp_path / run / "finetune_run.json").read_text()) for run in ("one", "two")]
    assert (records[1]["processes"], records[1]["global_batch"]) == (2, 4)
    assert records[1]["perplexity_after"] == pytest.approx(records[0]["perplexity_after"], rel=1e-5)
    weights = [load_file(tmp_path / run / "model.safetensors") for run in ("one", "two")]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=0, atol=1e-5)  # measured 3e-8


def test_one_process_data_parallel_is_the_identity():
    processes = Processes()
    assert (processes.rank, processes.world_size, processes.is_main) == (0, 1, True)
    batch = torch.arange(12).view(4, 3)
    assert torch.equal(processes.shard(batch), batch)
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 2.0)
    processes.average_gradients([param])
    assert torch.equal(param.grad, torch.full((3,), 2.0))
    assert processes.mean(1.5) == 1.5 and processes.same_everywhere([1.0, 2.0])


def test_a_resumed_run_needs_as_many_processes_as_it_started_with(tmp_path):
    config = ACIPRunConfig(**RUN)
    record = tmp_path / "acip_run.json"
    for processes in (1, None):  # None: records written before data parallelism
        record.write_text(json.dumps({"config": vars(config), **({"processes": processes} if processes else {})}))
        assert RunFolder(tmp_path, RUN_FILE).resumed_settings(ACIPRunConfig(), 1) == config
    record.write_text(json.dumps({"config": vars(config), "processes": 2}))
    with pytest.raises(ValueError, match="started with 2 process.*--num_processes 2"):
        RunFolder(tmp_path, RUN_FILE).resumed_settings(config, 1)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_takes_the_same_step(base, tmp_path, dropout):
    words = base[1]

    def one_step(checkpointing: bool):
        config = ACIPRunConfig(**{**RUN, "lora_dropout": dropout}, data=words, gradient_checkpointing=checkpointing)
        runtime = Runtime()
        task = ACIPTask(config, runtime, tiny_base_model("llama"), tiny_tokenizer())
        loop = TrainingLoop(task, tmp_path / str(checkpointing), runtime)
        torch.manual_seed(1)  # the same dropout draws for both
        stats = loop.train_step(loop.batches.batches())
        return task, stats["loss"]

    plain, loss = one_step(False)
    recomputed, recomputed_loss = one_step(True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in recomputed.acip_model.modules())
    assert recomputed_loss == loss
    for (name, a), (_, b) in zip(plain.model.named_parameters(), recomputed.model.named_parameters()):
        assert torch.equal(a, b), name


def test_base_model_with_a_device_map(base):
    model, tokenizer = load_base_model(str(base[0]), torch.float32, device_map="auto")
    # One CPU here; on GPUs the decoder layers spread over them and each is factorized where it lies.
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert tokenizer is not None
    with pytest.raises(ValueError, match="device_map must be one of"):
        ACIPRunConfig(device_map="everywhere").validate()
