"""Held-out perplexity of an ACIP model across size ratios, next to SVD truncation without training.

Two baselines are score maps for the same pruning machinery: ``singular_value_scores`` ranks all singular values
globally by size (the paper's ablation; it collapses because layers differ in scale) and ``uniform_scores`` cuts
every layer to the same fraction of its parameters, keeping its largest singular values (the stronger baseline).
"""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .hub.modeling_acip import ACIPModel


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over every target token of ``blocks`` (N, T): non-overlapping windows, each scored
    on its own (the first token of a window is context only)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tqdm(blocks.split(batch_size), desc=desc, disable=desc is None, leave=False):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()  # (B, T-1, V)
        targets = batch[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return math.exp(total / count)


def singular_value_scores(model: ACIPModel) -> dict[str, torch.Tensor]:
    """Score = singular value, read off the S·Vᵀ factor (row norms; exact for an untrained parametrization)."""
    return {name: layer.sv.weight.detach().float().norm(dim=1) for name, layer in model.acip_layers().items()}


def uniform_scores(model: ACIPModel) -> dict[str, torch.Tensor]:
    """Score = minus the layer's size fraction after keeping ranks up to this one: every layer keeps the same share."""
    scores = {}
    for name, layer in model.acip_layers().items():
        ranks = torch.arange(1, layer.rank + 1, dtype=torch.float64)
        fraction = ranks * (layer.in_features + layer.out_features) / (layer.in_features * layer.out_features)
        scores[name] = (-fraction).float()
    return scores


@torch.no_grad()
def ratio_sweep(
    model: ACIPModel, blocks: torch.Tensor, ratios: list[float], batch_size: int = 8, desc: str = "ratios"
) -> dict[float, float]:
    """Perplexity at each size ratio, by revertible pruning of one loaded model; its pruning state is restored."""
    saved = {name: layer.mask.detach().clone() for name, layer in model.acip_layers().items()}
    try:
        out = {}
        for ratio in tqdm(ratios, desc=desc, leave=False):
            model.prune_model_by_score(ratio)
            out[ratio] = perplexity(model, blocks, batch_size)
        return out
    finally:
        for name, layer in model.acip_layers().items():
            layer.mask.copy_(saved[name])
