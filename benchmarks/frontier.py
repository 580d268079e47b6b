"""Quality per byte: held-out perplexity against bits per dense weight, for the dense model under plain quantizers and
for ACIP sizes under each of the project's quantizations, and the frontier (best quality at or under each budget) of
each side, in one table; and a plot.

Bits per dense weight: 8 × the bytes of the decoder's linear layers as stored (weights, quantization constants, an
aligned layer's row order; biases excluded) / the number of weights of the dense model's decoder linear layers. Model
MB: those bytes plus everything else (embeddings, norms; the head is tied) at 16 bits.

Dense rows: float32; round-to-nearest ("rtn<b>": asymmetric, groups of 64 along a row, a float16 scale and offset
per group, the plain min/max range, weights rounded and evaluated in float32 — the issue's protocol); bitsandbytes
nf4 (block 64, float32 absmax); the project's int8 / int4 (quantization.py) applied to the dense layers; HQQ
(``hqq`` package, 4/3/2 bits, groups of 64) when it is installed and runs here; llama.cpp's own quantizations
(``llama-cpp-python``, when it is installed: the embedded GGUF file requantized, evaluated by llama.cpp on the same
token windows). ACIP rows: every size of
--ratios, compressed, then float16 (weights rounded to float16, evaluated in float32), int8, int4 and nf4.
"int4-gptq" rows (dense and ACIP): int4 rounded by GPTQ (quantize("int4", calibration=...)) on the text ``acip
export`` calibrates with (48 windows of 512 tokens of wiki-train: training text, not evaluation text).

Perplexity on the first 16 windows of 512 tokens of each source (acip.evaluation.DEFAULT_DATA), float32 compute
(the int rows: bfloat16 activations, as their kernels run). Every row is cached in --root/frontier.json as it
finishes, so a run can be stopped and resumed; --rows picks rows by glob pattern.

    python benchmarks/frontier.py --model-dir runs/quality/new [--root runs/frontier] [--rows 'dense*' 'acip-0.4-*']
                                  [--merge runs/frontier2] [--plot docs/frontier.png]
"""

import argparse
import copy
import fnmatch
import functools
import json
import math
import time
from pathlib import Path

import torch
from torch import nn

from acip import ACIPModel
from acip.data import load_blocks
from acip.default_model import load_default_model
from acip.evaluation import DEFAULT_DATA, perplexity
from acip.export import CALIBRATION as EXPORT_CALIBRATION
from acip.export import CALIBRATION_BLOCKS
from acip.hub.quantization import IntLinear, input_moments
from acip.memory import model_bytes

RATIOS = (0.95, 0.9, 0.88, 0.85, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)  # finer near 4.3 bits, where llama.cpp stops
ACIP_QUANTS = ("float16", "int8", "int4", "int4-gptq", "nf4")
LLAMA_CPP_TYPES = ("Q8_0", "Q4_K_M", "Q3_K_M", "IQ4_XS", "Q2_K")  # llama.cpp's own, where llama-cpp-python builds
DENSE_ROWS = ("float32", "rtn8", "rtn4", "rtn3", "rtn2", "nf4", "int8", "int4", "int4-gptq", "hqq4", "hqq3", "hqq2")
CALIBRATION = (EXPORT_CALIBRATION, CALIBRATION_BLOCKS)  # the "-gptq" rows': as acip export calibrates
BUDGETS = (8.5, 6.0, 5.0, 4.5, 4.3, 4.0, 3.5, 3.0, 2.5, 2.0, 1.5)
GROUP = 64


def all_rows(ratios) -> list[str]:
    """Every row name, dense first."""
    dense = [f"dense-{r}" for r in DENSE_ROWS] + [f"dense-llamacpp-{t}" for t in LLAMA_CPP_TYPES]
    return dense + [f"acip-{ratio}-{q}" for ratio in ratios for q in ACIP_QUANTS]


@torch.no_grad()
def round_to_nearest(weight: torch.Tensor, bits: int, group: int = GROUP) -> torch.Tensor:
    """``weight`` (out, in) rounded to ``bits`` per value: asymmetric, groups of ``group`` along a row, float16 scale
    and offset (the row's tail is a shorter group)."""
    rows, cols = weight.shape
    pad = (-cols) % group
    w = torch.nn.functional.pad(weight.float(), (0, pad)).view(rows, -1, group)
    if pad:  # the padding must not widen the last group's range: repeat its last real value
        w[:, -1, group - pad:] = w[:, -1, group - pad - 1: group - pad]
    lo, hi = w.amin(2, keepdim=True), w.amax(2, keepdim=True)
    levels = 2**bits - 1
    scale = ((hi - lo) / levels).clamp_min(1e-8).half().float()
    offset = lo.half().float()
    q = torch.round((w - offset) / scale).clamp(0, levels)
    return (q * scale + offset).view(rows, -1)[:, :cols].to(weight.dtype)


def decoder_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear layers of a causal LM's decoder (every nn.Linear but the output head)."""
    head = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def hqq_quantize(model: nn.Module, bits: int) -> None:
    """HQQ (half-quadratic quantization, the ``hqq`` package) of every decoder linear layer, groups of 64, weights
    de-quantized back into the float32 layers: the perplexity is HQQ's, compute stays float32."""
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config = BaseQuantizeConfig(nbits=bits, group_size=GROUP, axis=1)
    for name, linear in decoder_linears(model).items():
        layer = HQQLinear(copy.deepcopy(linear), config, compute_dtype=torch.float32, device="cpu")
        linear.weight.data = layer.dequantize().float().reshape(linear.weight.shape)


def layer_bits_bytes(layer: nn.Module) -> int:
    """Bytes of a stored decoder layer (weights, constants, buffers), biases excluded."""
    bias = [m.bias for m in layer.modules() if getattr(m, "bias", None) is not None]
    biases = {b.data_ptr() for b in bias}
    total = model_bytes(layer)
    return total - sum(b.numel() * b.element_size() for b in bias if b.data_ptr() in biases)


def rest_bytes(model: nn.Module, layers: list[nn.Module]) -> int:
    """Bytes outside ``layers`` (tied tensors once): float parameters at 2 bytes each (stored in float16), integer
    tensors (an int8 head's) as they are."""
    inside = {t.data_ptr() for layer in layers for t in [*layer.parameters(), *layer.buffers()]}
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in inside and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * (2 if t.is_floating_point() and t.element_size() > 2 else t.element_size())
    return total


def sizes(model: nn.Module, layers: list[nn.Module], dense_weights: int, bytes_override: int | None = None) -> dict:
    """bits per dense weight and model MB of a model whose decoder layers are ``layers``."""
    stored = bytes_override if bytes_override is not None else sum(layer_bits_bytes(m) for m in layers)
    return {"bits": 8 * stored / dense_weights, "model_mb": (stored + rest_bytes(model, layers)) / 1e6}


@functools.cache  # one tokenization of the calibration text per run, not one per ACIP size
def calibration(tokenizer) -> torch.Tensor:
    """The "-gptq" rows' calibration token ids, (48, 512)."""
    source, blocks = CALIBRATION
    return load_blocks(source, tokenizer, 512, blocks)


def dense_row(kind: str, windows: dict, dense_weights: int) -> dict:
    """Build and evaluate one dense row."""
    from acip.hub.parametrization import to_4bit

    model, tokenizer = load_default_model(torch.float32)
    linears = decoder_linears(model)
    weights = sum(m.weight.numel() for m in linears.values())
    override = None
    if kind == "float32":
        override = 4 * weights
    elif kind.startswith("rtn"):
        bits = int(kind[3:])
        for m in linears.values():
            m.weight.data = round_to_nearest(m.weight.data, bits)
        groups = sum(m.out_features * math.ceil(m.in_features / GROUP) for m in linears.values())
        override = weights * bits // 8 + 4 * groups
    elif kind.startswith("hqq"):
        bits = int(kind[3:])
        hqq_quantize(model, bits)
        groups = sum(m.out_features * math.ceil(m.in_features / GROUP) for m in linears.values())
        override = weights * bits // 8 + 4 * groups  # HQQ's scale and zero per group, 16 bits each
    elif kind == "int4-gptq":
        moments = input_moments(model, calibration(tokenizer).split(2))
        for name, m in linears.items():
            model.set_submodule(name, IntLinear.from_linear(m, "int4", moments[name]))
    else:  # the project's own layers
        for name, m in linears.items():
            layer = to_4bit(m, kind, torch.float32) if kind == "nf4" else IntLinear.from_linear(m, kind)
            model.set_submodule(name, layer)
    layers = list(decoder_linears(model).values()) if override is not None else [
        model.get_submodule(n) for n in linears]  # fmt: skip
    return {**sizes(model, layers, dense_weights, override), **evaluate(model, windows)}


def acip_rows(model_dir: str, ratio: float, quants: list[str], windows: dict, dense_weights: int, done,
              tokenizer) -> None:  # fmt: skip
    """Build and evaluate the ACIP rows of one size; ``done(row, result)`` records each."""
    model = ACIPModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.prune_model_by_score(ratio).compress()
    for quant in quants:
        q = copy.deepcopy(model)
        layers = list(q.acip_layers().values())
        override = None
        if quant == "float16":
            for layer in layers:
                for p in layer.parameters():
                    if p.is_floating_point():
                        p.data = p.data.half().float()
            override = sum(layer_bits_bytes(m) for m in layers)
            override -= sum(p.numel() * 2 for m in layers for n, p in m.named_parameters() if not n.endswith("bias"))
        elif quant == "int4-gptq":
            q.quantize("int4", calibration=calibration(tokenizer).split(2))
            layers = list(q.acip_layers().values())
        else:
            q.quantize(quant)
            layers = list(q.acip_layers().values())
        done(f"acip-{ratio}-{quant}", {**sizes(q, layers, dense_weights, override), **evaluate(q, windows)})


def evaluate(model, windows: dict) -> dict:
    """Perplexity on each source."""
    start = time.perf_counter()
    result = {"ppl": {source: perplexity(model, blocks, batch_size=2) for source, blocks in windows.items()}}
    result["eval_s"] = round(time.perf_counter() - start, 1)
    return result


def llama_cpp_available() -> bool:
    """Whether llama-cpp-python imports (it builds llama.cpp from source at install: not a requirement)."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # missing, or its shared library failed to load
        return False
    return True


def llama_cpp_row(kind: str, windows: dict, dense_weights: int) -> dict:
    """llama.cpp's quantization ``kind`` (e.g. "Q2_K") of the embedded GGUF file, requantized from its Q4_1 by
    llama.cpp itself, and its perplexity computed by llama.cpp on the same token windows (each window on its own,
    its first token context only, as :func:`acip.evaluation.perplexity`). Bits: the stored bytes of the decoder's
    2-D weights in the quantized file; model MB: the file."""
    import ctypes
    import os
    import tempfile

    import gguf
    import llama_cpp
    import numpy as np

    from acip.default_model import GGUF_FILE, smollm2_dir

    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="acip-frontier-") as tmp:
        path = os.path.join(tmp, f"{kind}.gguf")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
        params.allow_requantize, params.nthread = True, threads
        source = os.path.join(smollm2_dir(), GGUF_FILE).encode()
        if llama_cpp.llama_model_quantize(source, path.encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama.cpp could not quantize the GGUF file to {kind}")
        stored = sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name.startswith("blk.") and
                     len(t.shape) == 2)  # fmt: skip
        size = os.path.getsize(path)
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, logits_all=True, n_threads=threads,
                              verbose=False)  # fmt: skip
        start, ppl = time.perf_counter(), {}
        for source_name, blocks in windows.items():
            total, count = 0.0, 0
            for ids in blocks.tolist():
                llm.reset()
                llm.eval(ids)
                logits = torch.from_numpy(np.array(llm.scores[: len(ids) - 1], dtype=np.float32))  # (T - 1, V)
                total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum"))
                count += len(ids) - 1
            ppl[source_name] = math.exp(total / count)
        llm.close()
    return {"bits": 8 * stored / dense_weights, "model_mb": size / 1e6, "ppl": ppl,
            "eval_s": round(time.perf_counter() - start, 1)}  # fmt: skip


def hqq_available() -> bool:
    """Whether the hqq package imports."""
    try:
        import hqq.core.quantize  # noqa: F401
    except Exception:  # any failure to import (missing, or its optional extensions) means no HQQ rows
        return False
    return True


def frontier(results: dict, side: str, source: str, budget: float):
    """The best (lowest perplexity) row of ``side`` ("dense" or "acip") at or under ``budget`` bits, or None."""
    rows = [(r["ppl"][source], name) for name, r in results.items() if name.startswith(side) and r["bits"] <= budget]
    return min(rows) if rows else None


def table(results: dict, sources) -> str:
    """Markdown: every row, then the frontier of each side per budget."""
    dense = results.get("dense-float32")
    lines = ["| row | bits per dense weight | model MB | " + " | ".join(f"{s} ppl (× dense)" for s in sources) + " |",
             "|---|---:|---:|" + "---:|" * len(sources)]  # fmt: skip
    for name, r in sorted(results.items(), key=lambda kv: (kv[0].split("-")[0], -kv[1]["bits"])):
        cells = []
        for s in sources:
            ratio = f" ({r['ppl'][s] / dense['ppl'][s]:.2f}×)" if dense else ""
            cells.append(f"{r['ppl'][s]:.2f}{ratio}")
        lines.append(f"| {name} | {r['bits']:.2f} | {r['model_mb']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Frontier: the best row of each side at or under each budget (perplexity × dense).", "",
              "| bits ≤ | " + " | ".join(f"{s}: dense side | {s}: ACIP side" for s in sources) + " |",
              "|---:|" + "---|---|" * len(sources)]  # fmt: skip
    for budget in BUDGETS:
        cells = []
        for s in sources:
            for side in ("dense", "acip"):
                best = frontier(results, side, s, budget)
                scale = dense["ppl"][s] if dense else 1.0
                cells.append("—" if best is None else f"{best[0] / scale:.2f} ({best[1]})")
        lines.append(f"| {budget} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, sources, path: Path) -> None:
    """Perplexity × dense against bits per dense weight, one panel per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = results["dense-float32"]
    fig, axes = plt.subplots(1, len(sources), figsize=(6 * len(sources), 4.5))
    for ax, source in zip(axes, sources):
        groups = {}
        for name, r in results.items():
            # acip-<ratio>-<quant>: one curve per quant; dense-<quantizer><bits>: one per quantizer
            family = name.split("-", 2)[2] if name.startswith("acip") else "dense " + name.split("-", 1)[1].rstrip(
                "0123456789")  # fmt: skip
            family = "llama.cpp" if name.startswith("dense-llamacpp-") else family
            label = f"ACIP {family}" if name.startswith("acip") else family
            groups.setdefault(label, []).append((r["bits"], r["ppl"][source] / dense["ppl"][source]))
        for label, points in sorted(groups.items()):
            points.sort()
            ax.plot(*zip(*points), marker="o" if label.startswith("ACIP") else "s",
                    linestyle="-" if label.startswith("ACIP") else ":", label=label)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("bits per dense weight")
        ax.set_ylabel("perplexity / dense")
        ax.set_title(source)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_ylim(0.9, 20)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    """Evaluate the missing rows, then print the table (and write the plot)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True, help="a trained ACIP model folder (acip compress)")
    parser.add_argument("--root", default="runs/frontier", help="cache folder (frontier.json, frontier.png)")
    parser.add_argument("--rows", nargs="*", default=["*"], help="glob patterns of rows to evaluate")
    parser.add_argument("--ratios", type=float, nargs="*", default=list(RATIOS))
    parser.add_argument("--max-blocks", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--merge", nargs="*", default=[], help="other --root folders whose rows to take in (runs of "
                        "this script in parallel, each with its own cache)")  # fmt: skip
    parser.add_argument("--plot", default=None, help="where to write the plot (default: ROOT/frontier.png)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    cache = root / "frontier.json"
    results = json.loads(cache.read_text()) if cache.exists() else {}
    for other in args.merge:
        results.update(json.loads((Path(other) / "frontier.json").read_text()))
    if args.merge:
        cache.write_text(json.dumps(results, indent=1))

    def done(row, result):
        results[row] = result
        cache.write_text(json.dumps(results, indent=1))
        print(f"{row}: {result}", flush=True)

    wanted = [r for r in all_rows(args.ratios) if any(fnmatch.fnmatch(r, p) for p in args.rows)]
    todo = [r for r in wanted if r not in results and (not r.startswith("dense-hqq") or hqq_available()) and
            (not r.startswith("dense-llamacpp-") or llama_cpp_available())]  # fmt: skip
    if todo:
        model, tokenizer = load_default_model(torch.float32)
        dense_weights = sum(m.weight.numel() for m in decoder_linears(model).values())
        del model
        windows = {s: load_blocks(s, tokenizer, 512, args.max_blocks) for s in DEFAULT_DATA}
        for row in [r for r in todo if r.startswith("dense-")]:
            kind = row.split("-", 1)[1]
            if kind.startswith("llamacpp-"):
                done(row, llama_cpp_row(kind.split("-", 1)[1], windows, dense_weights))
            else:
                done(row, dense_row(kind, windows, dense_weights))
        for ratio in args.ratios:
            quants = [q for q in ACIP_QUANTS if f"acip-{ratio}-{q}" in todo]
            if quants:
                acip_rows(args.model_dir, ratio, quants, windows, dense_weights, done, tokenizer)
    print(table(results, DEFAULT_DATA))
    if "dense-float32" in results:
        plot(results, DEFAULT_DATA, Path(args.plot) if args.plot else root / "frontier.png")


if __name__ == "__main__":
    main()
