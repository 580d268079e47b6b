"""The ACIP objective (arXiv 2502.01717), all in one place: what the run minimises, how the L1 weight λ grows, how
the score map follows the masks, and when pruning stops. Edit this file to try another loss.

    loss  = (1 − α) · CE(next token) + α · T² · KL(teacher ‖ student at T) + λ(step) · Σ_layers ||relu(mask)||₁
            (α = 0: the paper's loss; the teacher is the dense base model; every term in float32;
            acip.fused_loss computes the first two terms and their gradient in one chunked pass)
    λ     = lambda_init · lambda_growth ^ g, with g = step // lambda_every ("exponential", the paper's), or ("paced")
            every lambda_every steps g grows by one while the size ratio is above a line falling from 1 to the stop
            ratio over pruning_steps steps, and shrinks by one while it is below: the model shrinks at an even pace
            instead of ever faster (with AdamW a mask moves about lr per step whatever λ is; λ decides which move)
    score = mask while the mask is alive; when it dies, the (fractional) death step counted backwards
    stop  = once the size ratio of the parametrized layers reaches stop_ratio (or after max_steps steps)
"""

import torch

from .fused_loss import language_model_loss


@torch.no_grad()
def teacher_logits(teacher, ids: torch.Tensor) -> torch.Tensor | None:
    """The frozen teacher's logits on ``ids`` (B, T, V) for distillation, or None when there is no teacher."""
    return None if teacher is None else teacher(input_ids=ids).logits


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
