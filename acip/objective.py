"""The ACIP objective (arXiv 2502.01717), all in one place: what the run minimises, how the L1 weight λ grows, how
the score map follows the masks, and when pruning stops. Edit this file to try another loss.

    loss  = (1 − α) · CE(next token) + α · T² · KL(teacher ‖ student at T) + λ(step) · Σ_layers ||relu(mask)||₁
            (α = 0: the paper's loss; the teacher is the dense base model; every term in float32)
    λ     = lambda_init · lambda_growth ^ g, with g = step // lambda_every ("exponential", the paper's), or ("paced")
            every lambda_every steps g grows by one while the size ratio is above a line falling from 1 to the stop
            ratio over pruning_steps steps, and shrinks by one while it is below: the model shrinks at an even pace
            instead of ever faster (with AdamW a mask moves about lr per step whatever λ is; λ decides which move)
    score = mask while the mask is alive; when it dies, the (fractional) death step counted backwards
    stop  = once the size ratio of the parametrized layers reaches stop_ratio (or after max_steps steps)
"""

import torch
import torch.nn.functional as F


def _targets(ids: torch.Tensor) -> torch.Tensor:
    """The token each position predicts, (B·T,): the next one; -100 (ignored) at the last position."""
    # The targets move, not the logits: slicing (B, T, V) would copy it, and its gradient would be a zero-filled copy.
    return F.pad(ids[:, 1:], (0, 1), value=-100).flatten()


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of predicting token t+1 from logits (B, T, V) at t, in float32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), _targets(ids), ignore_index=-100)


@torch.no_grad()
def teacher_logits(teacher, ids: torch.Tensor) -> torch.Tensor | None:
    """The frozen teacher's logits on ``ids`` (B, T, V) for distillation, or None when there is no teacher."""
    return None if teacher is None else teacher(input_ids=ids).logits


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      student: torch.Tensor | None = None) -> torch.Tensor:
    """T² · KL(teacher ‖ student) of the next-token distributions softened by T, mean over positions, in float32.

    The T² keeps the gradient's scale independent of T (Hinton et al., 2015); the last position is scored too: it
    predicts a token the block does not hold, but the teacher still says what it would be. ``student``: the student's
    log-probabilities at T (B·T, V), when the caller has them already.
    """
    if student is None:
        student = F.log_softmax(logits.flatten(0, 1).float() / temperature, dim=-1)  # (B·T, V)
    teacher = F.log_softmax(teacher_logits.flatten(0, 1).float() / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def language_model_loss(logits, ids, teacher_logits, alpha: float, temperature: float) -> tuple[torch.Tensor, dict]:
    """(1 − α) · CE + α · distillation (no teacher: CE alone), and its parts as numbers to log."""
    if teacher_logits is None or alpha == 0:
        ce = next_token_loss(logits, ids)
        return ce, {"loss": ce.item()}
    # At T = 1 both terms take the same log-probabilities: one pass over the (B·T, V) logits instead of two, a
    # tenth of a post-tune step on SmolLM2 (49,152 logits a position, bandwidth-bound on the CPU).
    student = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)  # (B·T, V)
    ce = F.nll_loss(student, _targets(ids), ignore_index=-100)
    kd = distillation_loss(logits, teacher_logits, temperature, student if temperature == 1 else None)
    return (1 - alpha) * ce + alpha * kd, {"loss": ce.item(), "kd": kd.item()}


class ACIPObjective:
    """The loss, λ schedule, score rule and stop rule of an ACIP run, with its settings (an ACIPRunConfig)."""

    def __init__(self, config):
        self.config = config
        self.growths = 0  # times λ has grown so far: the schedule's state (checkpointed with the run)

    def lam(self, step: int | None = None) -> float:
        """λ for optimizer step ``step`` (0-based) of the exponential schedule; the current λ without a step."""
        c = self.config
        growths = self.growths if step is None else step // c.lambda_every
        return c.lambda_init * c.lambda_growth**growths

    def advance(self, step: int, size_ratio: float) -> None:
        """Move the schedule on after ``step`` pruning steps, which left the model at ``size_ratio``."""
        c = self.config
        if c.lambda_schedule == "exponential":
            self.growths = step // c.lambda_every
        elif step % c.lambda_every == 0:
            target = 1 - (1 - c.stop_ratio) * step / c.pruning_steps  # the pace: a line from 1 to the stop ratio
            self.growths += 1 if size_ratio > target else -1

    def loss(self, logits, ids, masks: list[torch.Tensor], lam: float | None, teacher_logits=None):
        """The loss of one micro-batch and its parts to log; the L1 term only while pruning (``lam`` not None)."""
        c = self.config
        loss, figures = language_model_loss(logits, ids, teacher_logits, c.distill_alpha, c.distill_temperature)
        l1 = sum(torch.relu(mask).sum() for mask in masks)  # float32, as the masks are
        figures["l1"] = l1.detach().item()
        return (loss if lam is None else loss + lam * l1), figures

    @staticmethod
    @torch.no_grad()
    def update_scores(scores: torch.Tensor, alive: torch.Tensor, mask: torch.Tensor) -> None:
        """One step of the score rule, in place on a layer's full-size float32 scores.

        Live mask: score = mask. Dying now (score was positive, mask <= 0): score = f - 1, where f in (0, 1] is where
        between the last two steps the mask crossed zero (f = 1: it landed exactly on 0, the paper's "becomes 0"),
        which orders the many masks that die on the same step. Dead before: score - 1. ``alive`` indexes the ranks
        still computed (acip.compaction); the others died before.
        """
        before = scores[alive]
        mask = mask.detach().float().to(scores.device)
        dying = (before > 0) & (mask <= 0)
        crossed = before / (before - mask).clamp_min(torch.finfo(torch.float32).tiny)  # (0, 1] where dying
        updated = torch.where(mask > 0, mask, torch.where(dying, crossed - 1, before - 1))
        scores -= 1
        scores[alive] = updated

    def stop(self, size_ratio: float, step: int) -> bool:
        """Whether pruning ends after ``step`` steps at ``size_ratio``."""
        return size_ratio <= self.config.stop_ratio or step >= self.config.max_steps
