"""The three Hub files: self-contained, one copy, and loadable through remote code without the acip package."""

import ast
import pathlib
import subprocess
import sys

import acip

ROOT = pathlib.Path(__file__).resolve().parents[1]
HUB_FILES = ("configuration_acip.py", "modeling_acip.py", "parametrization.py")
ALLOWED = {"torch", "transformers", "peft", "safetensors", "bitsandbytes"}
STDLIB = set(sys.stdlib_module_names)


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


def test_one_copy_of_the_hub_files():
    # The source tree as committed: saved models (runs/, ignored) legitimately hold copies.
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in HUB_FILES:
        copies = [path for path in tracked.splitlines() if pathlib.PurePosixPath(path).name == name]
        assert copies == [name], copies
    assert pathlib.Path(acip.hub.modeling_acip.__file__).name == "modeling_acip.py"
