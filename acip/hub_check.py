"""Does a saved ACIP folder work for a Hub user, who has transformers (requirements.txt) but not acip?

    python hub_check.py FOLDER [FOLDER ...] [--new-tokens N]

For each folder, offline and through ``trust_remote_code``: load with AutoModel and AutoModelForCausalLM, check that
the classes came from the folder's own code, prune a prunable model to half its size and compress it, and generate
``N`` tokens (from the folder's tokenizer when it has one). Prints one JSON line per folder; exits non-zero on the
first failure. ``acip export`` runs this file in a fresh process before it hands over (or pushes) a folder, and CI
runs it in a virtual environment that holds only requirements.txt.

Run it as a file, never as ``acip.hub_check``: it must not import the acip package (it checks that nothing does).
"""

import argparse
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"


def check_folder(folder: str, new_tokens: int = 1) -> dict:
    """Load, prune (when prunable), compress and generate; returns what was seen."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    has_tokenizer = os.path.exists(os.path.join(folder, "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True) if has_tokenizer else None
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids if tokenizer else None
    ids = prompt if prompt is not None else torch.tensor([[5, 6, 7]])
    seen = {"folder": folder}
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(folder, trust_remote_code=True).eval()
        if not type(model).__module__.startswith("transformers_modules."):
            raise AssertionError(f"{auto.__name__} gave {type(model).__module__}, not the folder's remote code")
        seen["prunable"] = not model.config.compressed
        if seen["prunable"]:
            model.prune_model_by_score(compression_ratio=0.5)
            if not 0.5 <= model.get_size_ratio() < 0.55:
                raise AssertionError(f"pruned to 0.5, the size ratio is {model.get_size_ratio()}")
            model.compress()
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        if out.shape != (1, ids.shape[1] + new_tokens):
            raise AssertionError(f"generate returned shape {tuple(out.shape)}")
        seen[auto.__name__] = type(model).__name__
    seen["size_ratio"] = round(model.get_size_ratio(), 4)
    seen["generated"] = tokenizer.decode(out[0, ids.shape[1] :]) if tokenizer else out[0, ids.shape[1] :].tolist()
    if "acip" in sys.modules:
        raise AssertionError("the Hub files imported the acip package")
    return seen


def main() -> None:
    """Check every folder on the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--new-tokens", type=int, default=1)
    args = parser.parse_args()
    for folder in args.folders:
        print(json.dumps(check_folder(folder, args.new_tokens)), flush=True)


if __name__ == "__main__":
    main()
