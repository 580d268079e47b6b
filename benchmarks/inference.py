"""Decode speed and resident memory of SmolLM2-135M: dense vs ACIP-compressed at 0.4 vs compressed + 4-bit (nf4).

Each configuration is saved and measured in a fresh process (acip.efficiency): parameters, bytes, checkpoint size,
resident memory the model adds to the process after prefill and decode, peak resident memory, prefill tokens/s
(256 tokens) and greedy decode tokens/s (batch 1, KV cache), best of --repeats. Ratios are against the dense model
measured in the same run. Uses the ACIP model in --model-dir; without one, the embedded SmolLM2 is parametrized
untrained (pruning then truncates every layer to about the same fraction: other ranks, the same total size).
Targets at 0.4: decode >= 1.5x dense, resident memory <= 0.55x dense.

    python benchmarks/inference.py [--model-dir runs/quality] [--ratio 0.4] [--repeats 5]
"""

import argparse
import tempfile
from pathlib import Path

from acip import ACIPModel
from acip.default_model import load_default_model
from acip.efficiency import efficiency_report, format_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="a saved ACIP model (default: untrained SmolLM2)")
    parser.add_argument("--ratio", type=float, default=0.4, help="size ratio of the compressed model")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (best is kept)")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            base, _ = load_default_model()
            ACIPModel.from_base_model(base).save_pretrained(Path(tmp) / "acip")
            del base
            model_dir = Path(tmp) / "acip"
        rows = efficiency_report(model_dir, [args.ratio], "nf4", new_tokens=args.new_tokens, repeats=args.repeats)

    print(format_rows(rows))
    dense, small, _ = rows
    speed, memory = small.decode_tokens_per_s / dense.decode_tokens_per_s, small.rss_mib / dense.rss_mib
    print(f"\nat {args.ratio}: decode {speed:.2f}x dense (target >= 1.5x), resident memory {memory:.2f}x dense "
          f"(target <= 0.55x), parameter bytes {small.bytes / dense.bytes:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
