"""acip: Any Compression via Iterative Pruning for Hugging Face causal LMs."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

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
