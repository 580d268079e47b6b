"""The ACIP objective (acip/objective.py)."""

import pytest
import torch

from acip.objective import ACIPObjective
from acip.training import ACIPRunConfig


def test_acip_loss_adds_the_l1_term_only_while_pruning():
    objective = ACIPObjective(ACIPRunConfig())
    logits, ids = torch.randn(1, 4, 5), torch.randint(0, 5, (1, 4))
    masks = [torch.tensor([0.5, -0.2, 0.1], requires_grad=True)]
    pruning, figures = objective.loss(logits, ids, masks, lam=0.1)
    tuning, _ = objective.loss(logits, ids, masks, lam=None)
    torch.testing.assert_close(pruning - tuning, torch.tensor(0.1 * 0.6))
    assert figures["l1"] == pytest.approx(0.6)
    pruning.backward()
    torch.testing.assert_close(masks[0].grad, torch.tensor([0.1, 0.0, 0.1]))  # relu's gradient


def test_score_rule():
    scores = torch.tensor([0.02, 0.02, 0.01, -3.0, -1.5])
    alive = torch.tensor([0, 1, 2])  # the last two are not computed any more
    ACIPObjective.update_scores(scores, alive, torch.tensor([0.03, -0.02, 0.0]))
    # alive: its mask; crossed zero halfway: 0.5 - 1; landed on zero: 0; not computed: one step older
    torch.testing.assert_close(scores, torch.tensor([0.03, -0.5, 0.0, -4.0, -2.5]))


def test_lambda_schedule_and_stop_rule():
    objective = ACIPObjective(ACIPRunConfig(lambda_init=1e-3, lambda_growth=2.0, lambda_every=3, stop_ratio=0.5,
                                            max_steps=10))  # fmt: skip
    assert [objective.lam(s) for s in (0, 2, 3, 6)] == pytest.approx([1e-3, 1e-3, 2e-3, 4e-3])
    assert objective.stop(0.5, 1) and objective.stop(0.9, 10) and not objective.stop(0.51, 9)


def test_exponential_schedule_advances_with_the_steps():
    objective = ACIPObjective(ACIPRunConfig(lambda_init=1e-3, lambda_growth=2.0, lambda_every=2))
    for step in range(1, 6):
        objective.advance(step, size_ratio=1.0)
    assert objective.lam() == pytest.approx(objective.lam(5)) == pytest.approx(4e-3)


def test_paced_schedule_grows_while_the_model_is_behind_the_pace_and_shrinks_ahead_of_it():
    config = ACIPRunConfig(lambda_init=1e-3, lambda_growth=2.0, lambda_every=1, lambda_schedule="paced",
                           pruning_steps=10, stop_ratio=0.5)  # fmt: skip  target after step s: 1 - 0.05 s
    objective = ACIPObjective(config)
    objective.advance(1, size_ratio=1.0)  # behind the line (0.95): grow
    objective.advance(2, size_ratio=1.0)  # behind 0.9: grow
    objective.advance(3, size_ratio=0.8)  # ahead of 0.85: shrink
    assert objective.growths == 1 and objective.lam() == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="pruning_steps"):
        ACIPRunConfig(lambda_schedule="paced").validate()
    with pytest.raises(ValueError, match="lambda_schedule"):
        ACIPRunConfig(lambda_schedule="cosine").validate()
