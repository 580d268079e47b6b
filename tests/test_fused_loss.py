"""The chunked language-model loss (acip/fused_loss.py) against its autograd definition."""

import pytest
import torch
import torch.nn.functional as F

from acip import fused_loss
from acip.fused_loss import language_model_loss


def reference(logits, ids, teacher, alpha, temperature):
    """(1 − α) · CE + α · T² · KL written with autograd: what the fused form must equal."""
    v = logits.shape[-1]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), ids[:, 1:].reshape(-1))
    if teacher is None:
        return ce, ce, None
    student = F.log_softmax(logits.reshape(-1, v).float() / temperature, -1)
    target = F.log_softmax(teacher.reshape(-1, v).float() / temperature, -1)
    kd = F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature**2
    return (1 - alpha) * ce + alpha * kd, ce, kd


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("alpha,temperature,with_teacher", [(0.0, 1.0, False), (0.25, 1.0, True), (0.9, 2.0, True),
                                                            (1.0, 1.0, True), (0.5, 1.0, False)])  # fmt: skip
def test_loss_parts_and_gradient_equal_the_autograd_definition(monkeypatch, dtype, alpha, temperature, with_teacher):
    monkeypatch.setattr(fused_loss, "CHUNK_ROWS", 4)  # 3 x 5 = 15 rows: several chunks and a ragged last one
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 37) * 3).to(dtype).requires_grad_(True)
    teacher = (torch.randn(3, 5, 37) * 3).to(dtype) if with_teacher else None
    ids = torch.randint(0, 37, (3, 5))
    expected, ce, kd = reference(logits, ids, teacher, alpha, temperature)
    expected_grad = torch.autograd.grad(expected, logits)[0]
    loss, figures = language_model_loss(logits, ids, teacher, alpha, temperature)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=2e-2)
    torch.testing.assert_close(loss, expected.float(), **tol)
    grad = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.float(), expected_grad.float(), **tol)
    grad = torch.autograd.grad(loss / 3, logits)[0]  # a scaled loss (micro-batches) scales the gradient
    torch.testing.assert_close(grad.float(), expected_grad.float() / 3, **tol)
    assert figures["loss"] == pytest.approx(ce.item(), rel=1e-4)
    assert ("kd" in figures) == with_teacher
    if with_teacher:
        assert figures["kd"] == pytest.approx(kd.item(), rel=1e-4)


def test_a_student_equal_to_its_teacher_has_zero_kl():
    logits, ids = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6))
    loss, figures = language_model_loss(logits, ids, logits.clone(), 1.0, 2.0)
    assert abs(figures["kd"]) < 1e-6
    assert not loss.requires_grad  # logits without grad give a loss without a graph
