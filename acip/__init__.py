"""acip: Any Compression via Iterative Pruning for Hugging Face causal LMs."""

import logging
from contextlib import contextmanager

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM


@contextmanager
def _import_notices_silenced():
    """Import within the body with the import-time notices of bitsandbytes (and the kernels package) silenced.

    On CPUs with AVX512-BF16, bitsandbytes tries to fetch an optional kernel from the Hub when it is imported (by
    parametrization.py), and it and the kernels package log that they could not (offline, or the publisher
    unverified). Its fallback works, and acip turns that CPU path off on every 4-bit layer anyway; the notices would
    be the first lines of every `acip` command's output, its one-line errors included. Later warnings are kept.
    """
    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "kernels")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


with _import_notices_silenced():
    from .hub.configuration_acip import ACIPConfig
    from .hub.modeling_acip import ACIPModel
    from .hub.parametrization import AlignedLowRankLinear, LowRankLinear, SVDLinear
    from .hub.pruning import plan_pruning
    from .training import ACIPRunConfig, preset, run_acip
    from .build import parametrize

# With acip imported, AutoModel & co. resolve saved ACIP folders to these classes even without trust_remote_code.
AutoConfig.register("acip", ACIPConfig, exist_ok=True)
AutoModel.register(ACIPConfig, ACIPModel, exist_ok=True)
AutoModelForCausalLM.register(ACIPConfig, ACIPModel, exist_ok=True)

__all__ = [
    "ACIPConfig", "ACIPModel", "ACIPRunConfig", "AlignedLowRankLinear", "LowRankLinear", "SVDLinear", "parametrize",
    "plan_pruning", "preset", "run_acip",
]
__version__ = "0.1.0"
