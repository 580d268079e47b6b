"""A saved ACIP model at a size: size ratios, checked; whether a folder holds an ACIP model at all and whether a ratio
suits it (read from its config.json, before anything is loaded); and the model loaded at that size, pruned and
compressed. ``acip finetune``, ``export``, ``package`` and ``eval --efficiency`` all go through it.
"""

import json
import numbers
import os
from collections.abc import Sequence

from .inputs import check_model_source, is_local_path


def check_size_ratio(ratio, name: str = "ratio") -> float:
    """One size ratio to evaluate or fine-tune at, as a float, or a ValueError naming ``name`` and the allowed range
    (0, 1] (the model's own ``pruning.check_ratio`` also takes 0 and two names)."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not 0 < ratio <= 1:
        raise ValueError(f"{name} must be in (0, 1] (the fraction of parameters kept), got {ratio!r}")
    return float(ratio)


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """The ratios as floats, or a ValueError naming the bad one and the allowed range."""
    ratios = list(ratios)
    if not ratios:
        raise ValueError("ratios must hold at least one size ratio in (0, 1]")
    return [check_size_ratio(r, "ratios") for r in ratios]


def check_acip_model(name: str, model_dir) -> dict | None:
    """The config.json (a dict) of the saved ACIP model that ``model_dir`` names, or an error naming ``name``: no such
    folder, no saved model, or a model of another kind (saying which, and how to make an ACIP model of it). None for a
    Hub id: its config is not read before loading."""
    check_model_source(name, model_dir)
    if not is_local_path(os.fspath(model_dir)):
        return None
    path = os.path.join(os.path.expanduser(os.fspath(model_dir)), "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{name}: {path} is not a model's config (not JSON: {error})") from None
    kind = config.get("model_type") if isinstance(config, dict) else None
    if kind == "acip_model":
        raise ValueError(
            f"{name} {os.fspath(model_dir)} is a checkpoint of the original ACIP implementation: convert it first "
            f"with acip convert {os.fspath(model_dir)} OUT --base-model BASE (acip.convert.convert)"
        )
    if kind != "acip":
        what = f"a {kind} model" if isinstance(kind, str) else "a model of no known type (no model_type in config.json)"
        raise ValueError(
            f"{name} {os.fspath(model_dir)} is {what}, not an ACIP model: make one with acip compress --base-model "
            f"{os.fspath(model_dir)} --output-dir DIR (run_acip(ACIPRunConfig(base_model=...), DIR))"
        )
    return config


def check_ratio_suits(name: str, model_dir, ratio, *, needed: bool = True) -> dict | None:
    """:func:`check_acip_model`, and a ValueError unless ``ratio`` suits the model: a ratio in (0, 1] for a prunable
    model (or None, unless ``needed``), none for one that is already compressed. Returns its config (None: Hub id)."""
    if ratio is not None:
        check_size_ratio(ratio)
    config = check_acip_model(name, model_dir)
    if config is not None:
        _check_suits(name, model_dir, bool(config.get("compressed")), ratio, needed)
    return config


def _check_suits(name: str, model_dir, compressed: bool, ratio, needed: bool) -> None:
    """The ValueError of :func:`check_ratio_suits` for a model that is (or is not) compressed."""
    if compressed and ratio is not None:
        raise ValueError(f"{name} {os.fspath(model_dir)} is already compressed; leave out ratio (--ratio)")
    if needed and not compressed and ratio is None:
        raise ValueError(f"{name} {os.fspath(model_dir)} is a prunable ACIP model: give the size ratio (ratio=..., "
                         "--ratio, in (0, 1])")  # fmt: skip


def load_at_size(model_dir, ratio: float | None = None, dtype="auto", device=None):
    """The saved ACIP model in ``model_dir`` in eval mode, pruned to ``ratio`` and compressed (None: as saved), on
    ``device`` (default: where it loads); the ratio is checked against the model first (:func:`check_ratio_suits`)."""
    from .hub.modeling_acip import ACIPModel

    check_ratio_suits("model_dir", model_dir, ratio, needed=False)
    model = ACIPModel.from_pretrained(model_dir, dtype=dtype)
    model = (model if device is None else model.to(device)).eval()
    if ratio is not None:
        _check_suits("model_dir", model_dir, model.config.compressed, ratio, needed=False)  # a Hub id, now loaded
        model.prune_model_by_score(compression_ratio=ratio).compress()
    return model
