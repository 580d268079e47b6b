"""A FlexRank-style peer for benchmarks/quality.py: FlexRank's recipe (arXiv 2602.02680) built from acip's parts.

1. Whitened SVD of every target layer (acip.parametrize, the ACIP run's calibration draw).
2. One global nested order from truncation errors, no mask training: each layer's loss increase is measured with
   that layer alone cut to 10%, 25%, 50% and 75% of its rank (on a few calibration sequences), and its error at any
   rank in between is read off those points against its whitened tail energy sum_{i>=r} s_i^2, linearly (FlexRank's
   fast profile: a few measured points, the rest from the tail energy); as FlexRank's candidate ranks start at 10%
   of a layer's rank (its min_p), no layer is cut below that. Ranks are ordered by error removed per parameter of
   the next rank, made non-increasing within a layer: the greedy solution of the additive-error knapsack that
   FlexRank's dynamic program solves, nested by construction.
3. Consolidation only: every step distils a size drawn as the ACIP run draws them from the dense model, training
   the factors of the ranks that size keeps (no LoRA); the full-size model is trained too, as in FlexRank.

The same training loop, data, batches and distillation as the ACIP run, so a row compares recipes, not plumbing.
"""

import numpy as np
import torch
import torch.nn.functional as F

from acip.compaction import best_first
from acip.training import ACIPTask


class FlexRankStyleTask(ACIPTask):
    """FlexRank's recipe as a task of acip's training loop: truncation-error order, then nested consolidation."""

    probe_blocks = 2  # calibration sequences each layer's sensitivity is measured on
    probe_shares = (0.1, 0.25, 0.5, 0.75)  # the shares of a layer's rank it is cut to, one at a time; the first
    # is also the least it keeps (FlexRank's min_p)

    def __init__(self, config, runtime, base_model=None, tokenizer=None):
        super().__init__(config, runtime, base_model, tokenizer)
        self._order_by_truncation_error()

    @torch.no_grad()
    def _order_by_truncation_error(self) -> None:
        """Scores: each rank's share of its layer's measured error per parameter it costs (non-increasing)."""
        ids = self._calibration()[: self.probe_blocks, :128].to(self.model.device)
        base_loss = self._loss(ids)
        for layer in self.layers.values():
            sigma2 = layer.score.double() ** 2  # the whitened singular values, as parametrize leaves the scores
            k = sigma2.numel()
            tail = sigma2.flip(0).cumsum(0).flip(0)  # (k,) tail energy from rank i on
            ranks = [max(1, int(share * k)) for share in self.probe_shares]
            increases = []
            for rank in ranks:
                layer.set_kept(torch.arange(k) < rank)
                increases.append(max(self._loss(ids) - base_loss, 0.0))
            layer.set_kept(torch.ones(k, dtype=torch.bool))
            # error(tail energy): through (0, 0) and the probed points, made monotone
            energy = torch.tensor([0.0] + [float(tail[r]) for r in reversed(ranks)], dtype=torch.float64)
            error = torch.tensor([0.0] + list(reversed(increases)), dtype=torch.float64).cummax(0).values
            at_rank = torch.from_numpy(np.interp(torch.cat([tail, tail.new_zeros(1)]).numpy(), energy.numpy(),
                                                 error.numpy()))  # fmt: skip  (k + 1,) error when cut to rank r
            floor = tail > energy[-1]  # below the smallest probed rank: never pruned
            removed = (at_rank[:-1] - at_rank[1:]).clamp_min(1e-12)  # (k,) error rank i removes
            marginal = layer.in_features + layer.out_features - 2 * torch.arange(k, dtype=torch.float64) - 1
            score = (removed / marginal).masked_fill(floor, float("inf"))
            layer.score.copy_(score.cummin(0).values.float())

    def _loss(self, ids: torch.Tensor) -> float:
        """Mean next-token cross entropy of the model on ``ids``."""
        logits = self.model(input_ids=ids).logits[:, :-1].float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))

    def param_groups(self) -> list[dict]:
        """The factors only, at the run's post_tune_factors_lr."""
        return [{"params": self._factors(), "lr_scale": self.config.post_tune_factors_lr / self.config.lr}]

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        """Straight to consolidation: masks frozen, every rank computable, each layer's ranks best first."""
        super().prepare(optimizer)
        self.pruning = False
        for mask in self.masks:
            mask.requires_grad_(False)
        for factor in self._factors():
            factor.requires_grad_(True)
        for adapter in self.lora.values():  # FlexRank trains the factors themselves: no LoRA
            adapter.requires_grad_(False)
        for name, layer in self.layers.items():
            self.compactor.reorder(name, best_first(layer.score))
