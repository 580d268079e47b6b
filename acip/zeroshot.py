"""Zero-shot accuracy of an ACIP model at chosen sizes through lm-eval-harness (``pip install acip[eval]``).

:class:`ACIPLM` is lm-eval's Hugging Face causal-LM class around an ACIP model that it prunes to a size ratio first;
it registers as the lm-eval model ``"acip"``, so ``lm_eval.simple_evaluate(model="acip",
model_args="pretrained=DIR,ratio=0.5", tasks=[...])`` works once this module is imported. :func:`zero_shot_sweep`
evaluates one loaded model at several ratios by revertible pruning.

lm-eval's tasks read their datasets from the Hugging Face Hub (or its local cache): without network access only
tasks whose data is already cached, or local tasks (``include_path``), can run.
"""

import os
from collections.abc import Sequence

import torch

try:
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
except ImportError as error:  # an optional extra: say how to get it
    raise ImportError("zero-shot evaluation needs lm-eval: pip install 'acip[eval]' (or lm-eval>=0.4)") from error

from .evaluation import pruning_restored
from .sizes import check_ratios
from .hub.modeling_acip import ACIPModel


@register_model("acip")
class ACIPLM(HFLM):
    """lm-eval's HFLM evaluating an ACIP model (a loaded one or a folder / Hub name) pruned to ``ratio``."""

    def __init__(self, pretrained, ratio: float | None = None, tokenizer=None, max_length: int | None = None, **kwargs):
        if isinstance(pretrained, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(pretrained)
            device = kwargs.pop("device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
            pretrained = ACIPModel.from_pretrained(pretrained).to(device).eval()
        if not isinstance(pretrained, ACIPModel):
            raise TypeError(f"pretrained must be an ACIPModel or the folder of one, got {type(pretrained).__name__}")
        if tokenizer is None:
            raise ValueError("tokenizer is required when pretrained is a loaded model")
        # The ACIP config nests the base model's config: lm-eval would not find the context length on its own.
        max_length = max_length or getattr(pretrained.config.text_config, "max_position_embeddings", None)
        super().__init__(pretrained=pretrained, tokenizer=tokenizer, backend="causal", max_length=max_length, **kwargs)
        if ratio is not None:
            self.set_ratio(float(ratio))

    @property
    def acip_model(self) -> ACIPModel:
        """The wrapped ACIP model."""
        return self._model

    def set_ratio(self, ratio: float) -> None:
        """Prune the wrapped model to ``ratio`` (revertible; any ratio in (0, 1] later)."""
        self.acip_model.prune_model_by_score(ratio)


def zero_shot_sweep(
    lm: ACIPLM,
    tasks: Sequence[str],
    ratios: Sequence[float],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    include_path: str | None = None,
) -> dict[float, dict[str, dict[str, float]]]:
    """lm-eval task metrics at each size ratio, ``{ratio: {task: {metric: value}}}``; the pruning state is restored.

    Args:
        lm: the wrapped model.
        tasks: lm-eval task names (e.g. ``["arc_easy", "hellaswag"]``).
        ratios: size ratios in (0, 1].
        num_fewshot: examples in the prompt (0-shot when None, lm-eval's default for most tasks).
        limit: evaluate only this many (int) or this fraction (float) of each task's documents.
        include_path: a folder of extra task YAML files (local tasks).
    """
    ratios = check_ratios(ratios)
    if not tasks:
        raise ValueError("tasks must name at least one lm-eval task")
    manager = TaskManager(include_path=include_path) if include_path else None
    out = {}
    with pruning_restored(lm.acip_model):
        for ratio in ratios:
            lm.set_ratio(ratio)
            result = simple_evaluate(
                model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=0,
            )  # fmt: skip
            # lm-eval names metrics "metric,filter" (e.g. "acc,none"); stderr and bookkeeping entries are dropped.
            out[ratio] = {
                task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and "_stderr" not in k}
                for task, metrics in result["results"].items()
            }
    return out
