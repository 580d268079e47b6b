"""The ACIP run on a tiny model: reaching the stop ratio, the score map, resume, and clear errors (acip/training.py)."""

import copy
import json
import random

import pytest
import torch
from conftest import tiny_base_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

import acip.training as training
from acip import ACIPModel
from acip.loop import train
from acip.objective import ACIPObjective
from acip.records import RUN_FILE
from acip.training import ACIPRunConfig, ACIPTask, run_acip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text file of random words from the tiny tokenizer's vocabulary."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text(" ".join(f"w{rng.randint(3, 95)}" for _ in range(6000)))
    return str(path)


def tiny_config(corpus, **overrides) -> ACIPRunConfig:
    settings = dict(
        data=corpus, block_size=32, batch_size=4, lr=1e-3, lambda_init=1e-2, lambda_growth=1.1, lambda_every=1,
        stop_ratio=0.5, post_tune_steps=3, max_steps=200, checkpoint_every=0, lora_r=4, lora_alpha=8,
        calibration_blocks=8, calibration_block_size=32,  # the default whitened basis, on little text
    )
    return ACIPRunConfig(**{**settings, **overrides})


def run_tiny(config, output_dir, **kwargs):
    return run_acip(config, output_dir, base_model=tiny_base_model("llama"), tokenizer=tiny_tokenizer(), **kwargs)


def run_task(task_class, config, output_dir, resume=False):
    """A tiny run of a task class (an ACIPTask subclass) through the training loop."""

    def build(config, runtime):
        return task_class(config, runtime, tiny_base_model("llama"), tiny_tokenizer())

    return train(build, config, output_dir, RUN_FILE, resume=resume, overwrite=False)


def test_tiny_run_reaches_the_stop_ratio_and_orders_scores_by_death(corpus, tmp_path):
    history = []

    class Recording(ACIPTask):
        """Records, after every pruning step, the full-size masks, to find when each value died."""

        def after_step(self, step):
            if self.pruning:
                for name, layer in self.layers.items():
                    full = torch.full_like(layer.score, -1.0)  # not computed any more: dead before
                    full[self.compactor.alive[name]] = layer.mask.detach().float()
                    history.append(full)
            return super().after_step(step)

    model = run_task(Recording, tiny_config(corpus), tmp_path / "run")

    log = [json.loads(line) for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    pruning = [r for r in log if r["phase"] == "prune"]
    assert pruning[-1]["size_ratio"] <= 0.5 < pruning[-2]["size_ratio"]
    assert [r["phase"] for r in log].count("post-tune") == 3
    assert pruning[-1]["computed_ranks"] < pruning[0]["computed_ranks"] == 1.0  # dead ranks stopped costing

    n_layers = len(model.config.target_modules)
    steps = len(history) // n_layers
    scores = torch.cat(list(model.score_map.values()))
    masks = torch.stack([torch.cat(history[s * n_layers : (s + 1) * n_layers]) for s in range(steps)])  # (steps, n)
    dead = masks[-1] <= 0
    assert dead.any() and (~dead).any()
    assert bool((scores[dead] <= 0).all()) and bool((scores[~dead] > 0).all())
    death_step = (masks <= 0).float().argmax(0)  # first step at which the value was dead
    d, s = death_step[dead], scores[dead]
    earlier = d[:, None] < d[None, :]
    assert bool((s[:, None] < s[None, :])[earlier].all()), "an earlier death must score lower"
    # Scores of the final alive values are their mask values.
    torch.testing.assert_close(scores[~dead], masks[-1][~dead])

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert isinstance(reloaded, ACIPModel)
    for ratio in (0.5, 0.8):
        assert reloaded.prune_model_by_score(ratio).get_size_ratio() >= ratio
    assert (tmp_path / "run" / "tokenizer.json").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


class DiesAtStep27(ACIPTask):
    """Killed inside optimizer step 27: in post-tuning (pruning stops after step 21), after a checkpoint there."""

    def loss(self, ids, step):
        if step == 26:
            raise KeyboardInterrupt("killed")
        return super().loss(ids, step)


@pytest.mark.parametrize("sizes, extra", [("stop", {}), ("any", {}),  # any: checkpoints hold ranks best first
                                          ("any", {"correction_ramp": 0.25, "post_tune_factors_lr": 1e-3})])
def test_resumed_run_ends_like_an_uninterrupted_one(corpus, tmp_path, sizes, extra):
    config = tiny_config(corpus, checkpoint_every=4, lora_dropout=0.1, grad_accum=2, post_tune_sizes=sizes,
                         post_tune_steps=8, **extra)  # fmt: skip
    straight = run_tiny(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run_task(DiesAtStep27, config, tmp_path / "resumed")
    latest = tmp_path / "resumed" / "checkpoints" / "latest.json"
    assert json.loads(latest.read_text()) == {"checkpoint": "step-0000024"}
    resumed = run_tiny(config, tmp_path / "resumed", resume=True)

    for name, score in straight.score_map.items():
        assert torch.equal(resumed.score_map[name], score), name
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    log = lambda run: (tmp_path / run / "run_log.jsonl").read_text().splitlines()  # noqa: E731
    lines = lambda run: [json.loads(line)["step"] for line in log(run)]  # noqa: E731
    assert lines("resumed") == lines("straight")


def test_paced_lambda_steers_by_the_projected_size(corpus, tmp_path):
    config = tiny_config(corpus, lambda_schedule="paced", pruning_steps=40, lambda_growth=1.2, post_tune_steps=1)
    run_tiny(config, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    pruning = [r for r in log if r["phase"] == "prune"]
    assert pruning[-1]["size_ratio"] <= 0.5
    lams = [r["lambda"] for r in pruning]
    # λ grows while no mask has gone halfway, then falls once they have (ahead of the pace) before any has died.
    falls = [i for i, (a, b) in enumerate(zip(lams, lams[1:])) if b < a]
    assert falls and lams[falls[0]] > lams[0] and pruning[falls[0]]["size_ratio"] == 1.0


def test_any_size_post_tuning_with_distillation(corpus, tmp_path):
    config = tiny_config(corpus, post_tune_sizes="any", post_tune_steps=6, distill_alpha=0.5, distill_temperature=2.0,
                         checkpoint_every=2)  # fmt: skip  (checkpoints in both phases)
    model = run_tiny(config, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    post = [r for r in log if r["phase"] == "post-tune"]
    sizes = [r["size_ratio"] for r in post]
    assert len(post) == 6 and len(set(sizes)) == 6 and 0.5 <= min(sizes) and max(sizes) <= 1.0
    # KL >= 0, up to float32 rounding: at step 1 the student is the teacher (full ranks, LoRA B = 0), KL ~ +-1e-8
    assert all("kd" in r and r["kd"] >= -1e-6 for r in log) and abs(log[0]["kd"]) < 1e-6
    assert model.get_size_ratio() == 1.0  # saved unpruned
    pruned = [r for r in log if r["phase"] == "prune"]
    assert pruned[-1]["size_ratio"] <= 0.5


def test_corrections_leave_the_full_size_model_the_base_model(corpus, tmp_path):
    config = tiny_config(corpus, post_tune_sizes="any", post_tune_steps=6, correction_ramp=0.25)
    model = run_tiny(config, tmp_path / "run").eval()
    base = tiny_base_model("llama")
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-4, rtol=0)  # at 1.0: the base model
        assert model.config.correction_rank == 4 and model.config.correction_ramp == 0.25
        model.prune_model_by_score(0.5)
        corrected = model(ids).logits
        strengths = [layer.correction_strength() for layer in model.acip_layers().values()]
        assert max(strengths) == 1.0 and min(strengths) >= 0
        plain = copy.deepcopy(model)
        for layer in plain.acip_layers().values():
            layer.correction = None
        assert (plain(ids).logits - corrected).abs().max() > 1e-3  # the trained corrections act at 0.5
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval().prune_model_by_score(0.5)
        torch.testing.assert_close(reloaded(ids).logits, corrected, atol=0, rtol=0)
        small = reloaded.compress()
        torch.testing.assert_close(small(ids).logits, corrected, atol=1e-4, rtol=0)


def test_post_tuning_the_factors_changes_them(corpus, tmp_path):
    common = dict(post_tune_sizes="any", post_tune_steps=4, correction_ramp=0.25)
    lora_only = run_tiny(tiny_config(corpus, **common), tmp_path / "lora")
    factors = run_tiny(tiny_config(corpus, post_tune_factors_lr=1e-3, **common), tmp_path / "factors")
    name = "model.layers.0.mlp.up_proj"
    a, b = lora_only.acip_layers()[name], factors.acip_layers()[name]
    assert torch.equal(lora_only.score_map[name], factors.score_map[name])  # the same pruning
    assert not torch.equal(a.sv.weight, b.sv.weight) and not torch.equal(a.u.weight, b.u.weight)


def test_a_share_of_any_size_post_tuning_stays_at_the_stop_ratio(corpus, tmp_path):
    config = tiny_config(corpus, post_tune_sizes="any", post_tune_steps=8, post_tune_stop_share=0.5)
    model = run_tiny(config, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    sizes = [r["size_ratio"] for r in log if r["phase"] == "post-tune"]
    stop_size = model.prune_model_by_score(compression_ratio=0.5).get_size_ratio()
    assert 0 < sizes.count(stop_size) < len(sizes) and len(set(sizes)) > 2  # some steps at the stop size, some drawn


def test_cosine_post_tune_learning_rate(corpus, tmp_path):
    config = tiny_config(corpus, post_tune_steps=4, post_tune_lr_schedule="cosine", checkpoint_every=2)
    run_tiny(config, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run" / "run_log.jsonl").read_text().splitlines()]
    assert {r["lr"] for r in log if r["phase"] == "prune"} == {1e-3}
    post = [r["lr"] for r in log if r["phase"] == "post-tune"]
    assert post == pytest.approx([1e-3, 1e-3 * (1 + 2**-0.5) / 2, 5e-4, 1e-3 * (1 - 2**-0.5) / 2])


def test_run_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="stop_ratio"):
        run_tiny(tiny_config(corpus, stop_ratio=1.0), tmp_path / "a")
    with pytest.raises(ValueError, match="stop_ratio"):
        run_tiny(tiny_config(corpus, stop_ratio=0), tmp_path / "a")
    with pytest.raises(ValueError, match="post_tune_stop_share"):
        run_tiny(tiny_config(corpus, post_tune_stop_share=1.5), tmp_path / "a")
    for sizes in ("some", "0.2:0.1", "0:1", "0.5:1.5"):
        with pytest.raises(ValueError, match="post_tune_sizes"):
            run_tiny(tiny_config(corpus, post_tune_sizes=sizes), tmp_path / "a")
    with pytest.raises(ValueError, match="distill_alpha"):
        run_tiny(tiny_config(corpus, distill_alpha=1.5), tmp_path / "a")
    with pytest.raises(ValueError, match="post_tune_lr_schedule"):
        run_tiny(tiny_config(corpus, post_tune_lr_schedule="linear"), tmp_path / "a")
    with pytest.raises(ValueError, match="compute_dtype"):
        run_tiny(tiny_config(corpus, compute_dtype="float16"), tmp_path / "a")
    with pytest.raises(ValueError, match="no linear layer"):
        run_tiny(tiny_config(corpus, exclude_modules=".*"), tmp_path / "b")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|short"):
        run_tiny(tiny_config(str(empty)), tmp_path / "c")
    short = tmp_path / "short.txt"
    short.write_text("w5 w6 w7 " * 20)
    with pytest.raises(ValueError, match="short"):
        run_tiny(tiny_config(str(short)), tmp_path / "d")

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_tiny(tiny_config(corpus), tmp_path / "taken")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        run_tiny(tiny_config(corpus), tmp_path / "taken", resume=True)
    assert (tmp_path / "taken" / "config.json").read_text() == "{}"  # refused runs leave the folder alone


def test_presets_and_lambda_schedule():
    paper = training.PRESETS["paper"]
    assert (paper.block_size, paper.batch_size, paper.lr, paper.stop_ratio, paper.post_tune_steps) == (
        1024, 4, 5e-5, 0.4, 1000,
    )
    assert (paper.lora_r, paper.lora_alpha, paper.lora_dropout, paper.mask_constant) == (32, 16, 0.05, 2e-2)
    objective = ACIPObjective(paper)
    assert objective.lam(0) == objective.lam(3) == 1e-3 and objective.lam(4) == pytest.approx(1.01e-3)
    assert training.preset("quick", seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown preset"):
        training.preset("fastest")

