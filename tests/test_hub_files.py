"""The Hub files (acip.hub.HUB_FILES): self-contained, one copy, all saved with a model. (Loading a saved folder
through remote code in a fresh process without the acip package: tests/test_export.py, with acip/hub_check.py.)"""

import ast
import pathlib
import subprocess
import sys

from conftest import tiny_acip_model

import acip
from acip.hub import HUB_FILES

ROOT = pathlib.Path(__file__).resolve().parents[1]
ALLOWED = {"torch", "transformers", "safetensors", "bitsandbytes"}
# Standard-library modules that reach into the OS or the process: a Hub user trusts model code not to.
IMPURE = {"ctypes", "subprocess", "multiprocessing", "socket", "signal", "resource", "shutil"}
STDLIB = set(sys.stdlib_module_names) - IMPURE


def _imports(path: pathlib.Path):
    """(module, relative level, inside try/except ImportError) for every import statement of a file."""
    tree = ast.parse(path.read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers
        ):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, 0, id(node) in guarded
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, id(node) in guarded


def test_hub_files_import_only_what_a_hub_user_has():
    for name in HUB_FILES:
        for module, level, guarded in _imports(ROOT / name):
            top = module.split(".")[0]
            if level:  # relative: only the sibling Hub files, in the `from .x import y` form the loader finds
                assert f"{module}.py" in HUB_FILES, (name, module)
            elif top == "bitsandbytes":
                assert guarded, f"{name}: bitsandbytes is optional and must be imported under try/except ImportError"
            else:
                assert top in ALLOWED or top in STDLIB, (name, module)


def test_save_pretrained_writes_every_hub_file(tmp_path):
    # transformers copies the model's file and, recursively, the files it imports relatively (pruning.py through
    # parametrization.py): a folder missing one would not load for a Hub user.
    tiny_acip_model("llama").save_pretrained(tmp_path)
    for name in HUB_FILES:
        assert (tmp_path / name).read_text() == (ROOT / name).read_text(), name


def test_one_copy_of_the_hub_files():
    # The source tree as committed: saved models (runs/, ignored) legitimately hold copies.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in HUB_FILES:
        copies = [path for path in tracked.splitlines() if pathlib.PurePosixPath(path).name == name]
        assert copies == [name], copies
    assert pathlib.Path(acip.hub.modeling_acip.__file__).name == "modeling_acip.py"
