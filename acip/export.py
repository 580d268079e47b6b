"""Export a saved ACIP model as a folder ready for the Hugging Face Hub, check it the way a user will load it, and
push it.

An exported folder holds config.json (with ``auto_map``), the safetensors weights, the tokenizer, the remote-code
files (``acip.hub.HUB_FILES``), ``requirements.txt`` and a ``README.md`` model card rendered from
``templates/model_card.md``: Hub front matter, a quick start naming the repository, what the size ratio means, the
measured perplexity table when the model folder holds an ``acip eval`` result, how the model was made, dependencies,
license and citation.
Before a folder is handed over or pushed, :func:`check_folder` loads it offline in a fresh process through
``trust_remote_code`` (``hub_check.py``), prunes it and generates a token.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .data import hub_dataset_name, load_blocks
from .default_model import HUB_NAME
from .folders import check_not_busy, check_output_dir, replaceable, replacing, tree_files, write_atomically, write_json
from .hub.modeling_acip import QUANT_TYPES, ACIPModel
from .inputs import check_data_source, check_model_dir, is_local_path
from .records import EXPORT_FILE
from .report import REPORT_STEM, read_report, write_report
from .sizes import check_ratio_suits, load_at_size

# What a Hub user needs to load an exported model (the acip package is not needed); CI installs exactly this, and
# the repository's requirements.txt is this list (tests/test_export.py checks that they agree).
HUB_REQUIREMENTS = ("torch>=2.4", "transformers>=5.0,<6", "peft>=0.17", "safetensors>=0.4")
QUANT_REQUIREMENT = "bitsandbytes>=0.45"
CALIBRATION = "wiki-train"  # export's default calibration text for int4 (GPTQ rounding)
CALIBRATION_BLOCKS = 48  # windows of 512 tokens of it: 24,576 tokens (16 did 2-4% worse, docs/quantization.md)
KNOWN_LICENSES = {HUB_NAME: "apache-2.0"}  # base models whose license we can fill in unasked
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHECK_SCRIPT = Path(__file__).with_name("hub_check.py")
TEMPLATE = Path(__file__).with_name("templates") / "model_card.md"
RECORDS = ("acip_run.json", "finetune_run.json", f"{REPORT_STEM}.json", f"{REPORT_STEM}.csv", f"{REPORT_STEM}.png")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class ExportError(RuntimeError):
    """An exported folder failed its check, or could not be pushed; the message names the step and the reason."""


def export_model(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str | None = None,
    license: str | None = None,
    ratio: float | None = None,
    quantize: str | None = None,
    dtype: str | None = None,
    calibration: str | os.PathLike | None = CALIBRATION,
    overwrite: bool = False,
    validate: bool = True,
) -> Path:
    """Write a Hub-ready copy of the ACIP model in ``model_dir`` to ``out_dir`` and return it.

    Args:
        repo_id: the Hub repository (``org/name``) the model card's quick start names; default ``ORG/<out_dir name>``.
        license: a Hub license id (``apache-2.0``, ``mit``, ``llama3.1``, ``other``...); needed unless the base
            model's license is known (the embedded SmolLM2: apache-2.0).
        ratio: prune to this size ratio and compress before export (a compressed, smaller model); None exports the
            model as it is (a prunable model stays prunable).
        quantize: ``"nf4"`` or ``"fp4"``: store the compressed model in 4 bits (a prunable model needs ``ratio``);
            the folder then needs bitsandbytes; ``"int8"`` or ``"int4"``: weight-only integers on torch's CPU
            kernels (docs/quantization.md).
        calibration: for ``"int4"``, the text whose activations guide the rounding (GPTQ; CALIBRATION_BLOCKS windows
            of 512 tokens): a built-in corpus, a file or a Hub dataset (as ``acip compress --data``); None rounds to
            nearest. Ignored by the other quant types.
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"`` weights (masks and scores stay float32).
        overwrite: replace a non-empty ``out_dir`` that an earlier acip command wrote, once the new folder is
            complete and has passed its check (swapped in at once; docs/guarantees.md).
        validate: load the written folder in a fresh offline process first (:func:`check_folder`).

    Local paths (the base model's folder, data files) are replaced by their last component in every exported file;
    ``acip_export.json`` lists where (``local_paths_replaced``).
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    settings = {"repo_id": repo_id, "license": license, "ratio": ratio, "quantize": quantize, "dtype": dtype,
                "calibration": None if quantize != "int4" or calibration is None else os.fspath(calibration)}
    settings["license"] = _check_export(model_dir, out_dir, settings)
    with replacing(out_dir, "out_dir", lambda: replaceable(out_dir, overwrite, "out_dir")) as output:
        model = load_at_size(model_dir, ratio, DTYPES.get(dtype, "auto"))
        if settings["calibration"] is not None:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            blocks = load_blocks(settings["calibration"], tokenizer, 512, CALIBRATION_BLOCKS)  # (N, 512)
            model.quantize(quantize, calibration=list(blocks.split(2)))
        elif quantize is not None:
            model.quantize(quantize)
        with output.staged() as stage:
            _write_export(model, model_dir, stage, settings, repo_id or f"ORG/{Path(os.path.abspath(out_dir)).name}")
            del model
            if validate:
                check_folder(stage)
    return out_dir


def _check_export(model_dir: Path, out_dir: Path, settings: dict) -> str:
    """Every check of an export that needs no model loaded (errors name the argument); returns the license."""
    if settings["repo_id"] is not None:
        check_repo_id(settings["repo_id"])
    ratio, quantize, dtype = settings["ratio"], settings["quantize"], settings["dtype"]
    if quantize is not None and quantize not in QUANT_TYPES:
        raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {quantize!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)} or None, got {dtype!r}")
    if settings["calibration"] is not None:
        check_data_source("calibration", settings["calibration"])
    check_model_dir("model_dir", model_dir)
    config = check_ratio_suits("model_dir", model_dir, ratio, needed=False)
    if not (model_dir / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"model_dir {model_dir} has no tokenizer files; save the tokenizer next to the model")
    check_output_dir(out_dir, {"model_dir": str(model_dir)}, "out_dir")
    if quantize is not None and ratio is None and not config.get("compressed"):
        raise ValueError(
            f"quantize needs a compressed model, and model_dir {model_dir} is prunable: give ratio (--ratio) to prune "
            "and compress it first, or export it without quantize (--quantize)"
        )
    base_model = config.get("base_model_name_or_path") or "the base model"
    license = settings["license"] or KNOWN_LICENSES.get(base_model)
    if license is None:
        raise ValueError(
            f"license is needed: name the license of the exported weights (--license; a Hub license id such as "
            f"apache-2.0, mit, llama3.1 or other), which must respect that of the base model {base_model}"
        )
    check_not_busy(model_dir, "model_dir")
    return license


def _write_export(model: ACIPModel, model_dir: Path, stage: Path, settings: dict, repo_id: str) -> None:
    """Write every file of the export into the empty folder ``stage``."""
    model.save_pretrained(stage)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(stage)
    for name in RECORDS:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, stage / name)
    replaced = scrub_local_paths(stage, [str(model_dir), os.path.abspath(model_dir)])
    saved = json.loads((stage / "config.json").read_text())
    model.config.base_model_name_or_path = saved.get("base_model_name_or_path")  # the card names the base model
    quantized = getattr(model.config, "quantization_config", None) is not None
    requirements = [*HUB_REQUIREMENTS, *([QUANT_REQUIREMENT] if quantized else [])]
    write_atomically(stage / "requirements.txt", requirements_text(quantized))
    write_atomically(stage / "README.md", model_card(model, stage, repo_id, settings["license"], requirements))
    record = {"source": _name(str(model_dir)), **settings, "repo_id": repo_id,
              "exported": time.strftime("%Y-%m-%d %H:%M:%S"), "local_paths_replaced": replaced}  # fmt: skip
    record["files"] = sorted({*tree_files(stage), EXPORT_FILE})
    write_json(stage / EXPORT_FILE, record)


def requirements_text(quantized: bool = False) -> str:
    """The requirements.txt of an exported folder (and, unquantized, the repository's own): what loading needs."""
    return "\n".join([*HUB_REQUIREMENTS, *([QUANT_REQUIREMENT] if quantized else [])]) + "\n"


# Fields of config.json and of the run records whose values may be local paths.
PATH_FIELDS = {"base_model", "base_model_name_or_path", "_name_or_path", "name_or_path", "model", "data",
               "calibration_data", "eval_data", "path"}  # fmt: skip


def _name(path: str) -> str:
    """What a local path becomes in an exported file: its last component."""
    return Path(path.rstrip("/\\")).name or "local-model"


def _scrub(value, where: str, originals: dict[str, str], replaced: list[str]):
    """``value`` (parsed JSON) with local paths in :data:`PATH_FIELDS` replaced by their names; notes each."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in PATH_FIELDS and isinstance(item, str) and is_local_path(item) and _name(item) != item:
                originals[item] = _name(item)
                replaced.append(f"{where}{key} -> {_name(item)!r}")
                item = _name(item)
            out[key] = _scrub(item, f"{where}{key}.", originals, replaced)
        return out
    if isinstance(value, list):
        return [_scrub(item, where, originals, replaced) for item in value]
    return value


def scrub_local_paths(folder: Path, known: list[str]) -> list[str]:
    """Replace local paths by their last component in the JSON files, the perplexity report and any other text file
    of ``folder`` (``known``: paths to look for besides those the records name); returns what was replaced, as
    ``file: field -> 'name'`` lines, without the paths themselves."""
    originals = {path: _name(path) for path in known if is_local_path(path) and _name(path) != path}
    replaced = []
    for path in sorted(folder.glob("*.json")):
        if path.name.startswith(REPORT_STEM):
            continue
        data = json.loads(path.read_text())
        notes = []
        scrubbed = _scrub(data, "", originals, notes)
        if notes:
            write_json(path, scrubbed)
            replaced += [f"{path.name}: {note}" for note in notes]
    if (folder / f"{REPORT_STEM}.json").exists():
        report = read_report(folder)
        sources = {source: _name(source) if is_local_path(source) else source for source in report.windows}
        if is_local_path(report.model) or sources != {s: s for s in sources}:
            originals.update({s: n for s, n in sources.items() if s != n})
            report.model = _name(report.model) if is_local_path(report.model) else report.model
            for table in (report.windows, report.results, report.dense):
                for source in [s for s in table if sources.get(s, s) != s]:
                    table[sources[source]] = table.pop(source)
            write_report(report, folder)
            replaced.append(f"{REPORT_STEM}.json/.csv/.png: model and text sources -> names")
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".json", ".md", ".txt", ".csv", ".jinja")):
        text = path.read_text(errors="replace")
        found = [o for o in sorted(originals, key=len, reverse=True) if o and o in text]
        for original in found:
            text = text.replace(original, originals[original])
        if found:
            write_atomically(path, text)
            replaced.append(f"{path.name}: text -> {sorted({originals[o] for o in found})}")
    return replaced


def check_repo_id(repo_id: str) -> None:
    """A ValueError unless ``repo_id`` is ``org/name`` as the Hub spells repositories."""
    if not isinstance(repo_id, str) or not _HUB_ID.fullmatch(repo_id) or ".." in repo_id or repo_id.endswith(".git"):
        raise ValueError(f"repo_id must be 'org/name' (letters, digits, '-', '_', '.'), got {repo_id!r}")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def model_card(model: ACIPModel, folder: Path, repo_id: str, license: str, requirements: list[str]) -> str:
    """The README.md of an exported folder: front matter and text from templates/model_card.md, filled from the
    model and the records copied into ``folder`` (run, fine-tune, perplexity report and plot)."""
    import jinja2
    from huggingface_hub import ModelCardData

    quant = getattr(model.config, "quantization_config", None)
    quant_type = quant.bnb_4bit_quant_type if quant is not None else None
    records = {name: json.loads((folder / name).read_text()) for name in RECORDS if name.endswith("_run.json")
               and (folder / name).exists()}  # fmt: skip
    run, tune = records.get("acip_run.json"), records.get("finetune_run.json")
    base = model.config.base_model_name_or_path or (run or {}).get("config", {}).get("base_model") or "unknown"
    datasets = [hub_dataset_name(r["config"]["data"]) for r in (run, tune) if r is not None]
    tags = ["acip", "compression", "pruning", "low-rank", "svd"] + (["4-bit", "bitsandbytes"] if quant else [])
    card_data = ModelCardData(
        license=license,
        base_model=[base] if _is_hub_id(base) else None,
        datasets=[d for d in datasets if d] or None,
        metrics=["perplexity"],
        pipeline_tag="text-generation",
        library_name="transformers",
        tags=tags,
    )
    prunable = not model.config.compressed
    ratio = model.get_size_ratio()
    short_name = base.rstrip("/").split("/")[-1]
    values = {
        "card_data": card_data.to_yaml(),
        "title": f"{short_name}, ACIP: " + ("prunable to any size" if prunable else f"{100 * ratio:.0f}% of the size"),
        "prunable": prunable,
        "rank_cost": model.config.rank_cost,
        "base_model": base,
        "base_model_url": f"https://huggingface.co/{base}" if _is_hub_id(base) else "#how-it-was-made",
        "percent": f"{100 * ratio:.0f}",
        "ratio_row": f"{ratio:.2f}",
        "params": _count(model.get_num_params(full=True)),
        "quant_type": quant_type,
        "repo_id": repo_id,
        "license": license,
        "requirements": ", ".join(f"`{r}`" for r in requirements),
        "provenance": _provenance(run, tune, base),
        "finetune": _finetune_summary(tune),
        "perplexity_table": None,
        "plot": f"{REPORT_STEM}.png" if (folder / f"{REPORT_STEM}.png").exists() else None,
    }
    if (folder / f"{REPORT_STEM}.json").exists():
        report = read_report(folder)
        values["perplexity_table"] = report.markdown()
        values["perplexity_windows"] = " and ".join(f"{n} windows of `{s}`" for s, n in report.windows.items())
        values["perplexity_block_size"] = report.block_size
    template = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text = template.from_string(TEMPLATE.read_text()).render(**values)
    return re.sub(r"\n{3,}", "\n\n", text)


def _count(n: int) -> str:
    """A parameter count as people write it: 134.5M, 7.0B, 52,736."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _steps(n: int) -> str:
    return "step" if n == 1 else f"{n} steps"


def _provenance(run: dict | None, tune: dict | None, base: str) -> str:
    """How the model was made, from the run records."""
    if run is None:
        text = f"Built with the `acip` package from `{base}`; no ACIP run record was saved with it."
    else:
        c = run["config"]
        basis = "the singular basis of the weights"
        if c.get("basis") == "whitened":
            basis = (f"the whitened singular basis (input statistics of {c['calibration_blocks']} calibration "
                     f"sequences of {c['calibration_block_size']} tokens)")  # fmt: skip
        text = (
            f"One ACIP run in {basis}, on `{c['data']}` (sequences of {c['block_size']} tokens, batch "
            f"{c['batch_size']}×{c['grad_accum']}, AdamW learning rate {c['lr']:g}, L1 weight {c['lambda_init']:g} "
            f"growing ×{c['lambda_growth']:g} every {_steps(c['lambda_every'])}, LoRA rank {c['lora_r']}) trained the "
            f"singular-value masks for {run.get('pruning_steps', '?')} steps, until the compressible layers reached "
            f"size ratio {c['stop_ratio']:g}; then LoRA alone was tuned for {run.get('post_tune_steps', '?')} steps "
            f"and merged into the factors ({run.get('train_seconds', '?')} s of training). The order in which the "
            "masks died is the score map that `prune_model_by_score` follows."
        )
    if tune is not None:
        text += f" The model was then compressed to size ratio {tune['size_ratio']:.3f} and fine-tuned (below)."
    return text


def _finetune_summary(tune: dict | None) -> dict | None:
    """The fine-tuning facts the card states, or None."""
    if tune is None or not tune.get("finished"):
        return None
    c = tune["config"]
    fmt = lambda x: "not measured" if x is None else f"{x:.2f}"  # noqa: E731
    return {"size_ratio": f"{tune['size_ratio']:.3f}", "lora_r": c["lora_r"], "steps": tune["steps"],
            "data": c["data"], "eval_data": c["eval_data"], "before": fmt(tune.get("perplexity_before")),
            "after": fmt(tune.get("perplexity_after"))}  # fmt: skip


def check_folder(folder: str | os.PathLike, timeout: float = 1800) -> dict:
    """Load ``folder`` as a Hub user would, in a fresh offline Python process through ``trust_remote_code``; prune a
    prunable model, generate a token. Returns what the check saw; raises ExportError with its output on failure."""
    folder = Path(folder).resolve()
    with tempfile.TemporaryDirectory() as scratch:
        # -I: the script's own folder (acip/) must not land on sys.path; a private module cache keeps it offline.
        env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=os.path.join(scratch, "modules"))
        command = [sys.executable, "-I", str(CHECK_SCRIPT), str(folder)]
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch, timeout=timeout)
    if done.returncode != 0:
        raise ExportError(
            f"{folder} does not load as a Hub user would load it (AutoModel.from_pretrained(..., "
            f"trust_remote_code=True), offline, in a fresh process):\n{done.stderr[-3000:]}"
        )
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload ACIP model",
    validate: bool = True,
) -> str:
    """Upload an exported folder to the Hub repository ``repo_id`` (created if missing) and return the commit URL.

    The token comes from ``token``, else from the environment (``HF_TOKEN``) or the saved Hub login. A folder that
    fails :func:`check_folder` is refused. A failed upload raises ExportError naming the step; the folder is kept.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    check_repo_id(repo_id)
    missing = [name for name in ("config.json", "README.md", "requirements.txt") if not (folder / name).exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not an exported folder (missing {', '.join(missing)}); run acip export")
    if validate:
        check_folder(folder)
    api = HfApi(token=token)
    step = f"creating the repository {repo_id}"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = f"uploading {folder} to {repo_id}"
        commit = api.upload_folder(
            repo_id=repo_id, folder_path=folder, repo_type="model", commit_message=commit_message
        )
    except Exception as error:
        raise ExportError(
            f"push to the Hub failed while {step}: {type(error).__name__}: {error}\n"
            f"The exported folder {folder} is complete and unchanged; retry with `acip export ... --push-to-hub`, "
            f"`hf upload {repo_id} {folder}`, or check the token (HF_TOKEN, or `hf auth login`) and network."
        ) from error
    return str(commit.commit_url)
