"""A FlexRank-style peer for benchmarks/quality.py: FlexRank's recipe (arXiv 2602.02680) built from acip's parts.

1. Whitened SVD of every target layer (acip.parametrize, the ACIP run's calibration draw).
2. One global nested order from truncation errors, no mask training: each layer's loss sensitivity is probed once
   (the calibration loss with that layer alone cut to half its rank), and its error at rank r is taken as that
   sensitivity times its whitened tail energy sum_{i>=r} s_i^2 (FlexRank's fast profile: a few measured points,
   the rest from the tail energy). Ranks are ordered by error removed per parameter, the greedy solution of the
   additive-error knapsack that FlexRank's dynamic program solves (exact here: each layer's error is convex in r).
3. Consolidation only: every step distils a size drawn as the ACIP run draws them from the dense model, training
   the factors of the ranks that size keeps (no LoRA); the full-size model is trained too, as in FlexRank.

The same training loop, data, batches and distillation as the ACIP run, so a row compares recipes, not plumbing.
"""

import torch
import torch.nn.functional as F

from acip.compaction import best_first
from acip.training import ACIPTask


class FlexRankStyleTask(ACIPTask):
    """FlexRank's recipe as a task of acip's training loop: truncation-error order, then nested consolidation."""

    probe_blocks = 4  # calibration sequences each layer's sensitivity is measured on

    def __init__(self, config, runtime, base_model=None, tokenizer=None):
        super().__init__(config, runtime, base_model, tokenizer)
        self._order_by_truncation_error()

    @torch.no_grad()
    def _order_by_truncation_error(self) -> None:
        """Scores = probed sensitivity x whitened singular value^2 per parameter of the next rank (non-increasing)."""
        ids = self._calibration()[: self.probe_blocks].to(self.model.device)
        base_loss = self._loss(ids)
        for layer in self.layers.values():
            sigma2 = layer.score.double() ** 2  # the whitened singular values, as parametrize leaves the scores
            k = sigma2.numel()
            layer.set_kept(torch.arange(k) < k // 2)
            increase = max(self._loss(ids) - base_loss, 1e-6)
            layer.set_kept(torch.ones(k, dtype=torch.bool))
            sensitivity = increase / float(sigma2[k // 2 :].sum().clamp_min(1e-30))
            marginal = layer.in_features + layer.out_features - 2 * torch.arange(k, dtype=torch.float64) - 1
            per_parameter = (sensitivity * sigma2 / marginal).cummin(0).values  # nested: a layer keeps a prefix
            layer.score.copy_(per_parameter.float())

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
