"""Memory of ACIP runs: an estimate for LLaMA-2 7B/13B/70B from their public shapes (meta device, no weights), and
the measured peak resident memory while parametrizing (SVD of every layer) a randomly initialised model.

    python benchmarks/memory.py [--lora-r 32]

The estimate counts the parametrized model in bf16 (full-rank factors; float32 masks and scores), the LoRA
adapters on both factors of every layer (float32), their gradients and AdamW state; not activations. The
measurement runs each model in a fresh process and reports the peak RSS from just before the base model is built,
against the bytes of the finished parametrized model (target: below 1.15x).
"""

import argparse

from transformers import LlamaConfig

from acip.memory import LLAMA2, estimate_run_memory, format_estimates, measure_parametrization

MEASURED = {
    "Llama 768x12 (97M)": dict(model_type="llama", hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                               num_attention_heads=12, num_key_value_heads=12, vocab_size=8000,
                               tie_word_embeddings=False),
    "SmolLM2-135M shape": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                               num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                               tie_word_embeddings=True),
    "Llama 1536x8 (280M)": dict(model_type="llama", hidden_size=1536, intermediate_size=4096, num_hidden_layers=8,
                                num_attention_heads=12, num_key_value_heads=12, vocab_size=16000,
                                tie_word_embeddings=False),
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lora-r", type=int, default=32, help="LoRA rank of the run (the paper's: 32)")
    args = parser.parse_args()
    estimates = [estimate_run_memory(LlamaConfig(**shape), name, args.lora_r) for name, shape in LLAMA2.items()]
    print(f"Estimated memory of an ACIP run in GiB (bf16 model, LoRA r={args.lora_r}, AdamW; no activations):")
    print(format_estimates(estimates))
    print("\nMeasured while parametrizing (float32, fresh process each):")
    print("| model | dense MB | parametrized MB | peak RSS MB | peak / parametrized |")
    print("|---|---:|---:|---:|---:|")
    for name, config in MEASURED.items():
        r = measure_parametrization(config)
        print(f"| {name} | {r['base_bytes'] / 1e6:.0f} | {r['parametrized_bytes'] / 1e6:.0f} | "
              f"{r['peak_rss_bytes'] / 1e6:.0f} | {r['peak_over_parametrized']:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
