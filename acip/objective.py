"""The ACIP objective (arXiv 2502.01717), all in one place: what the run minimises, how the L1 weight λ grows, how
the score map follows the masks, and when pruning stops. Edit this file to try another loss.

    loss  = CE(next token) + λ(step) · Σ_layers ||relu(mask)||₁         (the L1 term in float32, as the masks are)
    λ     = lambda_init · lambda_growth ^ (step // lambda_every)
    score = mask while the mask is alive; when it dies, the (fractional) death step counted backwards
    stop  = once the size ratio of the parametrized layers reaches stop_ratio (or after max_steps steps)
"""

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of predicting token t+1 from logits (B, T, V) at t, in float32."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


class ACIPObjective:
    """The loss, λ schedule, score rule and stop rule of an ACIP run, with its settings (an ACIPRunConfig)."""

    def __init__(self, config):
        self.config = config

    def lam(self, step: int) -> float:
        """λ at optimizer step ``step`` (0-based)."""
        c = self.config
        return c.lambda_init * c.lambda_growth ** (step // c.lambda_every)

    def loss(self, logits, ids, masks: list[torch.Tensor], lam: float | None) -> tuple[torch.Tensor, dict]:
        """The loss of one micro-batch; the L1 term only while pruning (``lam`` not None)."""
        ce = next_token_loss(logits, ids)
        l1 = sum(torch.relu(mask).sum() for mask in masks)  # float32, as the masks are
        figures = {"loss": ce.item(), "l1": l1.detach().item()}
        return (ce if lam is None else ce + lam * l1), figures

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
