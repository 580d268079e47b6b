"""Held-out perplexity of an ACIP model across size ratios, next to SVD truncation without training.

:func:`evaluate_perplexity` is ``acip eval``: it scores a saved model on non-overlapping windows of each text source
at every ratio (revertible pruning of one loaded model), optionally with the baselines on the same windows, and
returns a :class:`~acip.report.PerplexityReport` (table, CSV/JSON, plot).

Two baselines are score maps for the same pruning machinery: ``singular_value_scores`` ranks all singular values
globally by size (the paper's ablation; it collapses because layers differ in scale) and ``uniform_scores`` cuts
every layer to the same fraction of its parameters, keeping its largest singular values (the stronger baseline).
"""

import math
import os
from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .hub.modeling_acip import ACIPModel
from .hub.pruning import rank_cost
from .records import recorded_base_model
from .inputs import check_positions
from .report import PerplexityReport
from .sizes import check_ratios

DEFAULT_DATA = ("wiki-validation", "lee")
DEFAULT_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


LOGITS_BYTES = 256 * 2**20  # at most this much float32 logits per forward pass (see perplexity)


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, desc: str | None = None) -> float:
    """exp(mean next-token NLL) over every target token of ``blocks`` (N, T): non-overlapping windows, each scored
    on its own (the first token of a window is context only).

    Windows go through the model ``batch_size`` at a time, fewer where their float32 logits would exceed
    :data:`LOGITS_BYTES` (two 512-token windows of a 49k vocabulary): the logits of eight such windows, their
    log-softmax and their copies held 2-3 GB before, for no gain in speed on a CPU."""
    model.eval()
    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().out_features
    rows = max(1, min(batch_size, LOGITS_BYTES // (4 * blocks.shape[1] * vocab)))
    total, count = 0.0, 0
    for batch in tqdm(blocks.split(rows), desc=desc, disable=desc is None, leave=False):
        batch = batch.to(device)
        logits = model(batch).logits  # (B, T, V)
        for row, ids in zip(logits, batch):  # one window at a time: a contiguous (T - 1, V) view, no copy
            total += float(F.cross_entropy(row[:-1].float(), ids[1:], reduction="sum"))
        count += batch[:, 1:].numel()
        del logits
    return math.exp(total / count)


def singular_value_scores(model: ACIPModel) -> dict[str, torch.Tensor]:
    """Score = singular value, read off the S·Vᵀ factor (row norms; exact for an untrained parametrization)."""
    return {name: layer.sv.weight.detach().float().norm(dim=1) for name, layer in model.acip_layers().items()}


def uniform_scores(model: ACIPModel) -> dict[str, torch.Tensor]:
    """Score = minus the layer's size fraction after keeping ranks up to this one: every layer keeps the same share."""
    scores = {}
    for name, layer in model.acip_layers().items():
        ranks = torch.arange(1, layer.rank + 1, dtype=torch.float64)
        cost = rank_cost(ranks, layer.in_features, layer.out_features, model.config.rank_cost)
        scores[name] = (-cost / (layer.in_features * layer.out_features)).float()
    return scores


@contextmanager
def pruning_restored(model: ACIPModel):
    """Run the body, then put every mask back as it was: sweeps leave the user's pruning state alone."""
    saved = {name: layer.mask.detach().clone() for name, layer in model.acip_layers().items()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, layer in model.acip_layers().items():
                layer.mask.copy_(saved[name])


@torch.no_grad()
def ratio_sweep(
    model: ACIPModel, blocks: torch.Tensor, ratios: Sequence[float], batch_size: int = 8, desc: str = "ratios"
) -> dict[float, float]:
    """Perplexity at each size ratio, by revertible pruning of one loaded model; its pruning state is restored."""
    ratios = check_ratios(ratios)
    with pruning_restored(model):
        out = {}
        for ratio in tqdm(ratios, desc=desc):
            model.prune_model_by_score(ratio)
            out[ratio] = perplexity(model, blocks, batch_size, desc=f"{ratio:.2f}")
        return out


def evaluate_perplexity(
    model_dir: str | os.PathLike,
    data: Sequence[str] = DEFAULT_DATA,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    block_size: int = 512,
    max_blocks: int | None = None,
    batch_size: int = 8,
    baselines: bool = False,
    base_model: str | None = None,
) -> PerplexityReport:
    """Sweep a saved ACIP model over size ratios on each text source (same windows for every method); with
    ``baselines`` also the dense base model and SVD truncation without training (uniform per layer, and global by
    singular value). One model is in memory at a time; it runs on CUDA when there is one, in float32."""
    from transformers import AutoTokenizer

    from .base_model import load_base_model
    from .data import load_blocks

    ratios = check_ratios(ratios)
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    check_positions("model_dir", model_dir, {"block_size": block_size})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = ACIPModel.from_pretrained(model_dir).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    blocks = {source: load_blocks(source, tokenizer, block_size, max_blocks=max_blocks) for source in data}
    report = PerplexityReport(str(model_dir), block_size, ratios, {s: len(b) for s, b in blocks.items()})
    for source, windows in blocks.items():
        report.results[source] = {"ACIP": ratio_sweep(model, windows, ratios, batch_size, desc=f"ACIP, {source}")}
    if not baselines:
        return report
    targets = list(model.config.target_modules)
    del model  # one model in memory at a time
    base, _ = load_base_model(base_model or recorded_base_model(model_dir), torch.float32)
    base = base.to(device)
    for source, windows in blocks.items():
        report.dense[source] = perplexity(base, windows, batch_size, desc=f"dense, {source}")
    baseline = ACIPModel.from_base_model(base, target_modules=targets).eval()
    for method, scores in (("SVD uniform", uniform_scores), ("SVD global", singular_value_scores)):
        baseline.score_map = scores(baseline)
        for source, windows in blocks.items():
            report.results[source][method] = ratio_sweep(baseline, windows, ratios, batch_size, f"{method}, {source}")
    return report
