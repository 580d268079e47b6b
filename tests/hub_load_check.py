"""Does a saved ACIP folder work for a Hub user, who has requirements.txt installed but not acip?

    python tests/hub_load_check.py save DIR    # with acip installed: writes DIR/full and DIR/compressed (tiny models)
    python tests/hub_load_check.py check DIR   # anywhere: loads both through trust_remote_code, prunes, generates

`check` imports only torch and transformers; it fails if the acip package gets imported along the way. The test
suite runs it in a subprocess; .ci/run also runs it in a fresh virtual environment holding only requirements.txt.
"""

import os
import sys


def save(folder: str) -> None:
    """Write a tiny prunable ACIP model and a compressed one under ``folder``."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import tiny_acip_model

    tiny_acip_model("qwen2").save_pretrained(os.path.join(folder, "full"))
    tiny_acip_model("llama").prune_model_by_score(0.5).compress().save_pretrained(os.path.join(folder, "compressed"))


def check(folder: str) -> None:
    """Load both models with each auto class through remote code, offline; prune the full one; generate."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8]])
    for name in ("full", "compressed"):
        for auto in (AutoModel, AutoModelForCausalLM):
            model = auto.from_pretrained(os.path.join(folder, name), trust_remote_code=True).eval()
            assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
            if name == "full":
                model.prune_model_by_score(compression_ratio=0.5)
                assert 0.5 <= model.get_size_ratio() < 0.52
                model.compress()
            out = model.generate(ids, max_new_tokens=3, do_sample=False)
            assert out.shape == (1, 7), out.shape
            print(f"{name} via {auto.__name__}: {type(model).__name__}, size ratio {model.get_size_ratio():.3f}")
    assert "acip" not in sys.modules, "the Hub files must not import the acip package"
    print("ok")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("save", "check"):
        sys.exit(__doc__)
    {"save": save, "check": check}[sys.argv[1]](sys.argv[2])
