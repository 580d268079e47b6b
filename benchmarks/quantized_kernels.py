"""Matmul speed of the weight-only CPU kernels torch ships (what quantize("int8") / quantize("int4") run on) against
float32 and bfloat16 matmuls, at SmolLM2's shapes: dense layers (576 wide, MLP 1536) and factor pairs of the ranks a
0.4 model keeps, batch 1 (a decode step) and 512 (a prompt), one thread by default.

Every shape holds as many copies of its weight as make ~64 MiB of float32, cycled through, so the weights come from
memory, not cache, as they do in a model. Methods run interleaved (each once per repeat, in turn); each figure is the
median over --repeats with [min-max], in µs per matmul, and ratios are float32's median over the method's.

    python benchmarks/quantized_kernels.py [--repeats 5] [--threads 1]
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from acip.hub.quantization import IntLinear

# (in, out): dense q/o, k/v, gate/up, down; then factor sides of ranks a 0.4 model keeps
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576), (576, 160), (160, 416), (1536, 256), (256, 320))
METHODS = ("float32", "bfloat16", "int8", "int4")


def layers(n_in: int, n_out: int, method: str, copies: int) -> list:
    """``copies`` layers of one shape as ``method`` computes them."""
    out = []
    for _ in range(copies):
        linear = torch.nn.Linear(n_in, n_out, bias=False)
        if method in ("int8", "int4"):
            out.append(IntLinear.from_linear(linear, method))
        else:
            out.append(linear.to(getattr(torch, method)))
    return out


@torch.inference_mode()
def time_once(stack: list, x: torch.Tensor) -> float:
    """µs per matmul over one pass through ``stack``."""
    start = time.perf_counter()
    for layer in stack:
        layer(x) if not isinstance(layer, torch.nn.Linear) else F.linear(x, layer.weight)
    return (time.perf_counter() - start) / len(stack) * 1e6


def main() -> None:
    """Print one table per batch size."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 512])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), median of {args.repeats} [min-max], µs per matmul")  # fmt: skip
    for batch in args.batches:
        print(f"\nbatch {batch}\n")
        print("| in → out | " + " | ".join(METHODS) + " | " + " | ".join(f"{m} speed-up" for m in METHODS[1:]) + " |")
        print("|---|" + "---:|" * (2 * len(METHODS) - 1))
        for n_in, n_out in SHAPES:
            copies = max(2, (64 << 20) // (4 * n_in * n_out)) if batch == 1 else 2
            stacks = {m: layers(n_in, n_out, m, copies) for m in METHODS}
            inputs = {m: torch.randn(batch, n_in, dtype=torch.bfloat16 if m == "bfloat16" else torch.float32)
                      for m in METHODS}  # fmt: skip
            for m in METHODS:  # warm-up: first calls (int4 repacks its weights once)
                time_once(stacks[m], inputs[m])
            times = {m: [] for m in METHODS}
            for _ in range(args.repeats):
                for m in METHODS:
                    times[m].append(time_once(stacks[m], inputs[m]))
            med = {m: statistics.median(t) for m, t in times.items()}
            cells = [f"{med[m]:.1f} [{min(times[m]):.1f}-{max(times[m]):.1f}]" for m in METHODS]
            ratios = [f"{med['float32'] / med[m]:.2f}×" for m in METHODS[1:]]
            print(f"| {n_in} → {n_out} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |", flush=True)


if __name__ == "__main__":
    main()
