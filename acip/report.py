"""The perplexity report of a ratio sweep: its table, a CSV and JSON copy, and the plot users pick a size from."""

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

from .folders import write_atomically, write_json

REPORT_STEM = "eval_perplexity"  # eval_perplexity.json / .csv / .png, next to the model
DENSE = "dense base model"


@dataclass
class PerplexityReport:
    """Held-out perplexity of one model across size ratios, for each text source and method."""

    model: str  # the evaluated model (folder or Hub name)
    block_size: int  # tokens per non-overlapping window
    ratios: list[float]  # size ratios swept, as given
    windows: dict[str, int] = field(default_factory=dict)  # text source -> windows scored
    results: dict[str, dict[str, dict[float, float]]] = field(default_factory=dict)  # source -> method -> ratio -> ppl
    dense: dict[str, float] = field(default_factory=dict)  # source -> ppl of the dense base model, when measured

    def rows(self) -> list[dict]:
        """One record per (source, method, ratio); the dense base model is one row at ratio 1.0."""
        rows = []
        for data, by_method in self.results.items():
            if data in self.dense:
                rows.append({"data": data, "method": DENSE, "ratio": 1.0, "perplexity": self.dense[data]})
            for method, by_ratio in by_method.items():
                rows += [{"data": data, "method": method, "ratio": r, "perplexity": p} for r, p in by_ratio.items()]
        return rows

    def to_json(self) -> dict:
        """A JSON-ready dict (ratios become strings as JSON keys must)."""
        return {
            "model": self.model,
            "block_size": self.block_size,
            "ratios": self.ratios,
            "windows": self.windows,
            "dense": self.dense,
            "results": {
                data: {m: {repr(r): p for r, p in by_ratio.items()} for m, by_ratio in by_method.items()}
                for data, by_method in self.results.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict) -> "PerplexityReport":
        """The inverse of :meth:`to_json`."""
        results = {
            source: {m: {float(r): p for r, p in by_ratio.items()} for m, by_ratio in by_method.items()}
            for source, by_method in data["results"].items()
        }
        return cls(data["model"], data["block_size"], data["ratios"], data["windows"], results, data["dense"])

    def table(self) -> str:
        """The report as plain-text tables, one per text source."""
        lines = []
        for data, by_method in self.results.items():
            lines.append(f"perplexity on {data}: {self.windows[data]} windows of {self.block_size} tokens")
            if data in self.dense:
                lines.append(f"{DENSE}: {_fmt(self.dense[data])}")
            lines.append(f"{'ratio':>6}" + "".join(f"{m:>14}" for m in by_method))
            for ratio in self.ratios:
                lines.append(f"{ratio:>6.2f}" + "".join(f"{_fmt(by_method[m][ratio]):>14}" for m in by_method))
        return "\n".join(lines)

    def markdown(self) -> str:
        """The report as one Markdown table: a row per ratio, a column per (text, method), the dense model first."""
        columns = [(data, method) for data, by_method in self.results.items() for method in by_method]
        lines = [
            "| size ratio | " + " | ".join(f"{method}, {data}" for data, method in columns) + " |",
            "|---:|" + "---:|" * len(columns),
        ]
        if self.dense:
            dense = [_fmt(self.dense[d]) if d in self.dense else "" for d, _ in columns]
            lines.append(f"| {DENSE} | " + " | ".join(dense) + " |")
        for ratio in self.ratios:
            lines.append(f"| {ratio:.2f} | " + " | ".join(_fmt(self.results[d][m][ratio]) for d, m in columns) + " |")
        return "\n".join(lines)


def _fmt(ppl: float) -> str:
    """Perplexities span 10 to 10⁸: fixed point while short, scientific after."""
    return f"{ppl:.2f}" if ppl < 1e5 else f"{ppl:.3g}"


def plot_perplexity(report: PerplexityReport):
    """A matplotlib Figure: perplexity (log scale) against size ratio, one panel per source, one line per method;
    the dense base model is a dashed horizontal line."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    sources = list(report.results)
    fig = Figure(figsize=(5.5 * len(sources), 4.2), layout="constrained")
    axes = fig.subplots(1, len(sources), squeeze=False)[0]
    for ax, data in zip(axes, sources):
        for method, by_ratio in report.results[data].items():
            ratios = sorted(by_ratio)
            ax.plot(ratios, [by_ratio[r] for r in ratios], marker="o", label=method)
        if data in report.dense:
            ax.axhline(report.dense[data], linestyle="--", color="gray", label=DENSE)
        ax.set_yscale("log")
        ax.set_xlabel("size ratio (fraction of parameters kept)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{data}: {report.windows[data]} × {report.block_size} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{Path(report.model).name or report.model}: held-out perplexity by size")
    return fig


def write_report(report: PerplexityReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``eval_perplexity.{json,csv,png}`` to ``out_dir`` atomically; returns the paths by suffix."""
    out_dir = Path(out_dir)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["data", "method", "ratio", "perplexity"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.rows())
    png = io.BytesIO()
    plot_perplexity(report).savefig(png, format="png", dpi=110)
    return {
        "json": write_json(out_dir / f"{REPORT_STEM}.json", report.to_json()),
        "csv": write_atomically(out_dir / f"{REPORT_STEM}.csv", text.getvalue()),
        "png": write_atomically(out_dir / f"{REPORT_STEM}.png", png.getvalue()),
    }


def read_report(path: str | Path) -> PerplexityReport:
    """Load a report written by :func:`write_report` (the JSON file, or the folder holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{REPORT_STEM}.json"
    return PerplexityReport.from_json(json.loads(path.read_text()))
