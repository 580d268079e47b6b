"""Write exported tiny ACIP folders for CI's Hub-user check.

    python tests/hub_load_check.py DIR   # with acip installed: DIR/full (prunable) and DIR/compressed, as exported

CI then installs DIR/full/requirements.txt, and nothing else, in a fresh virtual environment and runs
acip/hub_check.py on both folders there: they must load through trust_remote_code without the acip package.
"""

import os
import sys
from pathlib import Path


def save(folder: Path) -> None:
    """Export a tiny Qwen2 ACIP model as it is (prunable) and a tiny Llama one compressed to half its size."""
    sys.path.insert(0, os.path.dirname(__file__))
    from conftest import save_tiny_run

    from acip.export import export_model

    full_run, _ = save_tiny_run(folder / "runs" / "qwen2", "qwen2")
    small_run, _ = save_tiny_run(folder / "runs" / "llama", "llama")
    export_model(full_run, folder / "full", license="mit", repo_id="acme/tiny-acip", validate=False)
    export_model(small_run, folder / "compressed", license="mit", ratio=0.5, validate=False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    save(Path(sys.argv[1]))
