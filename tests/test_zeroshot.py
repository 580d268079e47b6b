"""The lm-eval wrapper (acip/zeroshot.py): log-likelihoods match the model's own, and a local task runs end to end."""

import json
import random

import pytest
import torch
from conftest import save_tiny_run, tiny_acip_model, tiny_tokenizer

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402

from acip.cli import main  # noqa: E402
from acip.zeroshot import ACIPLM, zero_shot_sweep  # noqa: E402


@pytest.fixture
def lm():
    return ACIPLM(tiny_acip_model("llama"), tokenizer=tiny_tokenizer(), batch_size=4, device="cpu")


def continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context), summed over its tokens, from the model's logits."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids).logits[0].log_softmax(-1)
    return sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))


def test_loglikelihood_matches_the_model_and_follows_the_ratio(lm):
    requests = [
        Instance("loglikelihood", {}, ("w5 w6 w7", " w8 w9"), 0),
        Instance("loglikelihood", {}, ("w10", " w11"), 1),
    ]
    for ratio in (1.0, 0.4):
        lm.set_ratio(ratio)
        (first, _), (second, _) = lm.loglikelihood(requests)
        assert first == pytest.approx(continuation_logprob(lm.acip_model, [5, 6, 7], [8, 9]), abs=1e-4)
        assert second == pytest.approx(continuation_logprob(lm.acip_model, [10], [11]), abs=1e-4)
    assert lm.acip_model.get_size_ratio() == pytest.approx(0.4, abs=0.05)


@pytest.fixture
def tiny_task(tmp_path):
    """A local lm-eval multiple-choice task over the tiny vocabulary: (folder with its YAML, its documents)."""
    rng = random.Random(0)
    docs = [{"context": " ".join(f"w{rng.randint(3, 95)}" for _ in range(4)),
             "choices": [f"w{rng.randint(3, 95)}" for _ in range(3)], "label": i % 3} for i in range(8)]  # fmt: skip
    folder = tmp_path / "task"
    folder.mkdir()
    (folder / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "acip_tiny.yaml").write_text(
        "task: acip_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
    return folder, docs


@pytest.mark.slow
def test_local_multiple_choice_task_scores_what_the_model_prefers(lm, tiny_task):
    folder, docs = tiny_task
    model = lm.acip_model
    model.prune_model_by_score(0.8)
    before = {name: layer.mask.clone() for name, layer in model.acip_layers().items()}

    results = zero_shot_sweep(lm, ["acip_tiny"], [1.0, 0.5], include_path=str(folder))
    assert all(torch.equal(layer.mask, before[n]) for n, layer in model.acip_layers().items())

    for ratio in (1.0, 0.5):
        model.prune_model_by_score(ratio)
        ids = lambda text: [int(w[1:]) for w in text.split()]  # noqa: E731  (the word-level tokenizer)
        correct = 0
        for doc in docs:
            scores = [continuation_logprob(model, ids(doc["context"]), ids(c)) for c in doc["choices"]]
            correct += max(range(3), key=scores.__getitem__) == doc["label"]
        assert results[ratio]["acip_tiny"]["acc"] == pytest.approx(correct / len(docs))


@pytest.mark.slow
def test_acip_eval_tasks_writes_the_results(tiny_task, tmp_path, capsys):
    folder, _ = tiny_task
    acip_dir, _ = save_tiny_run(tmp_path)
    main(["eval", str(acip_dir), "--tasks", "acip_tiny", "--include-path", str(folder), "--ratios", "1.0", "0.5"])
    assert "acip_tiny acc" in capsys.readouterr().out
    results = json.loads((acip_dir / "eval_zeroshot.json").read_text())["results"]
    assert set(results) == {"1.0", "0.5"} and 0 <= results["0.5"]["acip_tiny"]["acc"] <= 1


def test_wrapper_errors():
    with pytest.raises(ValueError, match="tokenizer is required"):
        ACIPLM(tiny_acip_model("llama"), device="cpu")
    with pytest.raises(TypeError, match="ACIPModel"):
        ACIPLM(torch.nn.Linear(2, 2), tokenizer=tiny_tokenizer())
