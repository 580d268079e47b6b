"""Building an ACIP model from a base causal LM: the one build entry of the package, :func:`parametrize`.

The Hub payload's ``ACIPModel.from_base_model`` is the minimal build a Hub user needs (the weight basis, every layer
converted before any is swapped in). This one adds what a training run needs and a Hub user never runs: the whitened
basis from calibration text (acip.whitening), and memory that stays near the finished model's size — each dense
weight is freed as soon as its factors exist, and freed heap memory goes back to the OS.
"""

import ctypes

import torch
from torch import nn

from .hub.configuration_acip import BASES
from .hub.modeling_acip import ACIPModel, find_target_modules
from .hub.parametrization import SVDLinear
from .hub.pruning import check_rank_cost
from .whitening import BlockwiseWhitening, whitened_layer

try:  # glibc only; elsewhere (macOS, Windows, musl) freed memory is simply left to the allocator
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def release_freed_memory() -> None:
    """Hand memory freed on the heap back to the OS (glibc's malloc_trim).

    Parametrizing frees a dense weight and allocates its factors, layer after layer; glibc keeps freed blocks below
    its (self-raising) mmap threshold in the heap, where fragmentation made peak RSS vary from 1.08x to 1.27x the
    finished model between identical runs. Trimming after every layer keeps it at the live size (1.07x, every run).
    """
    if _malloc_trim is not None:
        _malloc_trim(0)


def parametrize(
    base_model: nn.Module,
    basis: str = "weight",
    calibration: torch.Tensor | None = None,
    target_modules: str | list[str] = "all-linear",
    exclude_modules: str | list[str] | None = None,
    mask_constant: float = 2e-2,
    batch_size: int = 8,
    sequential: bool = True,
    rank_cost: str = "aligned",
) -> ACIPModel:
    """The ACIP model of a base causal LM in the chosen singular basis: ``"weight"`` (SVD of each weight) or
    ``"whitened"`` (SVD of W·L from the (N, T) token ids ``calibration``; scores start at the whitened singular
    values, so ``prune_model_by_score`` is a data-aware truncation right away); ``rank_cost`` is the cost rule sizes
    are counted by (see ACIPConfig).

    Every argument is checked before anything changes. The base model is then converted in place, one layer at a time
    (each dense weight freed as soon as its factors exist), so that the peak memory stays near the finished model's.
    Should a layer still fail (e.g. out of memory), the layers already converted go back to dense ``nn.Linear``
    layers recomputed from their factors (equal to the original weights up to float rounding) and the error is raised.
    """
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    if not (isinstance(mask_constant, (int, float)) and mask_constant > 0):
        raise ValueError(f"mask_constant must be a number > 0, got {mask_constant!r}")
    check_rank_cost(rank_cost)
    names = find_target_modules(base_model, target_modules, exclude_modules)
    whitening = None
    if basis == "whitened":
        _check_calibration(calibration, base_model)
        base_model.eval()  # no dropout while measuring inputs
        whitening = BlockwiseWhitening(base_model, names, calibration, batch_size=batch_size, sequential=sequential)
    was_training = base_model.training
    done = []
    try:
        for name in names:  # in module order, as the block-by-block calibration needs
            dense = base_model.get_submodule(name)
            if whitening is None:
                layer = SVDLinear.from_linear(dense, mask_constant)
            else:
                layer = whitened_layer(dense, whitening(name), mask_constant)
            base_model.set_submodule(name, layer)
            done.append(name)
            del dense, layer  # free each dense weight as soon as its factors exist
            release_freed_memory()
    except BaseException:
        with torch.no_grad():
            for name in done:
                base_model.set_submodule(name, base_model.get_submodule(name).compressed())  # full rank: dense
        raise
    return ACIPModel.from_parametrized_base(base_model, basis=basis, rank_cost=rank_cost).train(was_training)


def _check_calibration(calibration, base_model: nn.Module) -> None:
    """A clear error unless ``calibration`` is a non-empty (N, T) tensor of token ids the model knows."""
    if not torch.is_tensor(calibration) or calibration.ndim != 2 or calibration.numel() == 0:
        shape = tuple(calibration.shape) if torch.is_tensor(calibration) else type(calibration).__name__
        raise ValueError(f"calibration must be a non-empty (N, T) tensor of token ids (basis='whitened'), got {shape}")
    if calibration.is_floating_point() or calibration.is_complex():
        raise ValueError(f"calibration must hold integer token ids, got dtype {calibration.dtype}")
    vocab = base_model.get_input_embeddings().num_embeddings
    if int(calibration.min()) < 0 or int(calibration.max()) >= vocab:
        raise ValueError(f"calibration token ids must lie in [0, {vocab}) (the model's vocabulary)")
