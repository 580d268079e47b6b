"""The docs agree with the code: every count of the Hub files is that of acip.hub.HUB_FILES, the README names each
of them, each command and its plot; docs/quickstart.ipynb runs from top to bottom on a tiny ACIP model, in a kernel on
this test's interpreter."""

import re
import sys
from pathlib import Path

import pytest
from conftest import tiny_acip_model, tiny_tokenizer

from acip.cli import build_parser
from acip.hub import HUB_FILES

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "quickstart.ipynb"
NUMBER = r"([0-9.e+-]+|inf|nan)"
COUNTS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}


def test_every_count_of_the_hub_files_is_that_of_hub_files():
    texts = [ROOT / "README.md", ROOT / "pyproject.toml", ROOT / "__init__.py", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "acip").glob("*.py")), *sorted((ROOT / "tests").glob("*.py"))]  # fmt: skip
    counted = 0
    for path in texts:
        for word in re.findall(r"\b(\w+)\s+(?:Hub|remote-code)\s+files\b", path.read_text(), re.IGNORECASE):
            if word.lower() in COUNTS:
                assert COUNTS[word.lower()] == len(HUB_FILES), (path.name, word, HUB_FILES)
                counted += 1
    assert counted >= 3  # README, its layout and docs/export.md state it


def test_the_readme_names_every_hub_file_command_and_its_plot():
    readme = (ROOT / "README.md").read_text()
    for name in HUB_FILES:
        assert re.search(rf"^{re.escape(name)}\s", readme, re.M), name  # a row of the layout
    commands = build_parser().commands
    row = next(line for line in readme.splitlines() if line.startswith("  cli.py"))
    assert all(command in row for command in commands), row
    assert all(f"acip {command} " in readme for command in commands)  # each shown in use
    assert "](docs/eval_perplexity.png)" in readme and (ROOT / "docs" / "eval_perplexity.png").exists()


def printed(cell) -> str:
    """What a code cell printed to stdout."""
    return "".join(output.get("text", "") for output in cell.outputs if output.get("name") == "stdout")


def test_the_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.slow
def test_quickstart_runs_on_a_tiny_model(tmp_path, monkeypatch):
    nbclient, nbformat = pytest.importorskip("nbclient"), pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    folder = tmp_path / "tiny-acip"
    tiny_acip_model().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    monkeypatch.setenv("ACIP_MODEL", str(folder))  # the kernel inherits this process's environment
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Checked in the kernel itself: "python3" must start this interpreter (this venv, this checkout's acip).
    notebook.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.executable)"))
    client = nbclient.NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError naming the cell if any cell fails
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    text = "\n".join(printed(cell) for cell in code)
    assert printed(code[-1]).strip() == sys.executable

    assert re.search(r"^ACIPModel: [0-9,]+ parameters$", text, re.M)
    sizes = re.findall(rf"^compression_ratio {NUMBER}: size ratio {NUMBER}, perplexity {NUMBER}$", text, re.M)
    assert [float(ratio) for ratio, _, _ in sizes] == [1.0, 0.8, 0.6, 0.4]
    size_ratios = [float(size) for _, size, _ in sizes]
    assert size_ratios == sorted(size_ratios, reverse=True) and len(set(size_ratios)) == 4
    assert all(float(r) <= s < float(r) + 0.02 for (r, _, _), s in zip(sizes, size_ratios))
    assert all(0 < float(p) < float("inf") for _, _, p in sizes)
    assert re.search(r"^1\.0: '.*'$", text, re.M) and re.search(r"^0\.5: '.*'$", text, re.M)

    budgets = re.findall(rf"^\S+MiB as (stored|nf4): size ratio {NUMBER}, ([0-9,]+) bytes$", text, re.M)
    assert [kind for kind, _, _ in budgets] == ["stored", "nf4"]
    assert 0 < float(budgets[0][1]) < 1 and float(budgets[1][1]) > float(budgets[0][1])  # 4 bits fit more

    def footprint(step):
        params, nbytes = re.search(rf"^{step}: +([0-9,]+) parameters, ([0-9,]+) bytes", text, re.M).groups()
        return int(params.replace(",", "")), int(nbytes.replace(",", ""))

    before, after = footprint(r"before compress\(\)"), footprint(r"after compress\(\)")
    assert after[0] < before[0] and after[1] < before[1]
    assert f"compress() will keep {after[0]:,} parameters" in text
    if "bitsandbytes is not installed" not in text:
        quantized = re.search(r"^after quantize\(\): ([0-9,]+) bytes", text, re.M).group(1)
        assert int(quantized.replace(",", "")) < after[1] / 2
    assert "trainable params" in text
    losses = re.search(rf"^LoRA step: loss {NUMBER} before, {NUMBER} after$", text, re.M).groups()
    assert float(losses[1]) < float(losses[0])
