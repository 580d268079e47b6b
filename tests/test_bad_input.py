"""Bad input to the public API (run_acip, finetune, export_model, convert) and to every command of the command line
(compress, finetune, eval, export, package, convert): each case is refused, by the API with an error of the expected
type whose message names the argument, by the command with that message as one line on stderr and exit status 2 (1
for a failure at run time: a folder another process holds), and nothing changes: neither the model given nor any file
of any folder involved (every folder of the test's tree is listed and hashed before and after)."""

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import types

import pytest
import torch
from conftest import save_tiny_run, tiny_base_model, tiny_tokenizer, upstream_base, upstream_copy, words_file

from acip import ACIPModel
from acip.cli import main
from acip.convert import convert
from acip.export import export_model
from acip.finetune import FinetuneConfig, FinetuneTask, finetune
from acip.records import RUN_FILE
from acip.training import ACIPRunConfig, ACIPTask, run_acip

RUN = dict(block_size=16, batch_size=2, lr=1e-3, lambda_init=1e-2, lambda_growth=1.1, lambda_every=1,
           stop_ratio=0.5, post_tune_steps=2, max_steps=50, checkpoint_every=1, lora_r=2, lora_alpha=4,
           basis="weight")  # fmt: skip
TUNE = dict(ratio=0.6, block_size=16, batch_size=2, steps=6, eval_blocks=0, lora_r=2, lora_alpha=4,
            checkpoint_every=1)  # fmt: skip


def killed_in_step_2(task_class):
    """Make ``task_class`` raise inside its second step, after the checkpoint of step 1 (as a kill would stop it)."""
    loss = task_class.loss

    def dying(self, ids, step):
        if step == 1:
            raise KeyboardInterrupt("killed")
        return loss(self, ids, step)

    return pytest.MonkeyPatch.context(), dying


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The folders the cases act on: a base model, an ACIP model, a compressed one, a copy, a user's folder, a text
    file, an ACIP run and a fine-tuning run both killed after a checkpoint (resumable)."""
    root = tmp_path_factory.mktemp("bad_input")
    acip_dir, base_dir = save_tiny_run(root)
    words = words_file(root / "words.txt", 3000)
    ACIPModel.from_pretrained(acip_dir).prune_model_by_score(0.5).compress().save_pretrained(root / "compressed")
    tiny_tokenizer().save_pretrained(root / "compressed")
    shutil.copytree(acip_dir, root / "other")
    shutil.copytree(acip_dir, root / "tuned_from")
    (root / "user" / "sub").mkdir(parents=True)
    (root / "user" / "notes.txt").write_text("the user's notes")
    (root / "user" / "sub" / "photo.jpg").write_bytes(b"\xff\xd8 a photo")
    (root / "mine.pt2").write_bytes(b"the user's package")
    (root / "empty.txt").write_text("")
    (root / "blank.txt").write_text(" \n\n\t \n")
    run_config = ACIPRunConfig(**RUN, data=words, base_model=str(base_dir))
    tune_config = FinetuneConfig(**TUNE, data=words)
    tiny = {"base_model": tiny_base_model(), "tokenizer": tiny_tokenizer()}
    for task_class, start in (
        (ACIPTask, lambda: run_acip(run_config, root / "run", **tiny)),
        (FinetuneTask, lambda: finetune(root / "tuned_from", root / "tuning", tune_config)),
    ):
        patch, dying = killed_in_step_2(task_class)
        with patch as monkeypatch, pytest.raises(KeyboardInterrupt):
            monkeypatch.setattr(task_class, "loss", dying)
            start()
    for name in ("tuned_from", "acip"):  # lock files, as earlier acip commands that wrote these folders left them
        (root / f".{name}.acip-lock").touch()
    original_checkpoints(root / "original")
    model = tiny_base_model()
    return types.SimpleNamespace(root=root, acip=acip_dir, base=base_dir, words=words, model=model,
                                 run_config=run_config, tune_config=tune_config)  # fmt: skip


def original_checkpoints(root):
    """Checkpoints of the original ACIP implementation (the llama fixture), sound and damaged, for acip convert."""
    upstream_copy(root / "llama", "llama")
    shutil.copytree(upstream_base("llama"), root / "base")
    shutil.copytree(upstream_base("qwen2"), root / "qwen2_base")
    shutil.copytree(upstream_base("llama"), root / "narrow_base")
    narrow = json.loads((root / "narrow_base" / "config.json").read_text())
    (root / "narrow_base" / "config.json").write_text(json.dumps({**narrow, "intermediate_size": 144}))
    parametrization = lambda **kwargs: lambda c: c["parametrization_config"].update(kwargs)  # noqa: E731
    upstream_copy(root / "unknown_parametrization", edit_config=parametrization(module_factory_cls="lowrank"))
    sigmoid = {"mask_func": "sigmoid", "mask_scaling_factor": 0.02}
    upstream_copy(root / "unknown_mask_function", edit_config=parametrization(module_factory_kwargs=sigmoid))
    quantization = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    upstream_copy(root / "4bit_config", edit_config=lambda c: c.update(weight_quantization_config=quantization))
    packed = "model.model.layers.0.mlp.up_proj.base_layer.parametrization.base.weight"
    upstream_copy(root / "4bit_tensors", tensors={packed: torch.zeros(2048, 1, dtype=torch.uint8),
                                                  f"{packed}.absmax": torch.ones(64)})  # fmt: skip
    upstream_copy(root / "missing_lora_b", drop=["model.model.layers.1.mlp.up_proj.lora_B.default.weight"])
    upstream_copy(root / "missing_norm", drop=["model.model.norm.weight"])
    upstream_copy(root / "extra_tensor", tensors={"model.model.extra.weight": torch.ones(3)})
    torn = upstream_copy(root / "torn_file", "llama")
    data = (torn / "model.safetensors").read_bytes()
    (torn / "model.safetensors").write_bytes(data[: len(data) - 1000])
    sharded = upstream_copy(root / "missing_shard", "llama", shards=3)
    (sharded / "model-00002-of-00003.safetensors").unlink()


def original(env, name="llama"):
    return env.root / "original" / name


@contextlib.contextmanager
def offline():
    """The Hub offline for this call (conftest sets HF_HUB_OFFLINE after huggingface_hub has read it)."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


def to_acip(env, src, out=None, base_model="base", **options):
    """acip convert's function on an original checkpoint (by name under original/), offline."""
    base = None if base_model is None else original(env, base_model)
    with offline():
        convert(original(env, src) if isinstance(src, str) else src, out or env.root / "new", base_model=base,
                **options)  # fmt: skip


def compress(env, output, resume=False, overwrite=False, **settings):
    """run_acip on the tiny in-memory base model (whose weights must not change)."""
    config = ACIPRunConfig(**{**RUN, "data": env.words, **settings})
    run_acip(config, output, resume=resume, overwrite=overwrite, base_model=env.model, tokenizer=tiny_tokenizer())


def tune(env, model_dir, output, resume=False, overwrite=False, **settings):
    """finetune with the tiny settings."""
    finetune(model_dir, output, FinetuneConfig(**{**TUNE, "data": env.words, **settings}), resume=resume,
             overwrite=overwrite)  # fmt: skip


def export(env, model_dir, out, **options):
    """export_model without the fresh-process check."""
    export_model(model_dir, out, **{"license": "mit", "validate": False, **options})


CASES = []


def case(error: type, match: str):
    """Register a case: calling it must raise ``error`` with a message matching ``match`` (which names the
    argument)."""

    def register(call):
        CASES.append(pytest.param(call, error, match, id=call.__name__))
        return call

    return register


# -- the ACIP run (run_acip) -------------------------------------------------------------------------------------


@case(ValueError, "stop_ratio")
def compress_stop_ratio_out_of_range(env):
    compress(env, env.root / "new", stop_ratio=1.5)


@case(ValueError, "lr must be > 0")
def compress_zero_learning_rate(env):
    compress(env, env.root / "new", lr=0.0)


@case(ValueError, "batch_size")
def compress_no_batch(env):
    compress(env, env.root / "new", batch_size=0)


@case(FileNotFoundError, "data: no such file")
def compress_missing_data_file(env):
    compress(env, env.root / "new", data=str(env.root / "missing.txt"))


@case(ValueError, "data: .*empty.txt' holds no text")
def compress_empty_data_file(env):
    compress(env, env.root / "new", data=str(env.root / "empty.txt"))


@case(ValueError, r"data: .*\*.txt' holds no text \(all 2 files are empty or blank\)")
def compress_blank_data_files(env):
    (env.root / "texts").mkdir()
    for name in ("empty.txt", "blank.txt"):
        shutil.copy(env.root / name, env.root / "texts" / name)
    try:
        compress(env, env.root / "new", data=str(env.root / "texts" / "*.txt"))
    finally:
        shutil.rmtree(env.root / "texts")


@case(ValueError, r"block_size must be at most the max_position_embeddings of base_model \(LlamaForCausalLM\) "
                  r"\(128\), got 4096")
def compress_sequences_beyond_the_models_positions(env):
    compress(env, env.root / "new", block_size=4096)


@case(ValueError, "calibration_block_size must be at most the max_position_embeddings of base_model")
def compress_calibration_beyond_the_models_positions(env):
    compress(env, env.root / "new", basis="whitened", calibration_block_size=129)


@case(FileNotFoundError, "calibration_data")
def compress_missing_calibration_file(env):
    compress(env, env.root / "new", basis="whitened", calibration_data=str(env.root / "missing.txt"))


@case(NotADirectoryError, "output_dir must be a folder")
def compress_into_a_file(env):
    compress(env, env.words)


@case(FileExistsError, "output_dir .* holds files acip did not write")
def compress_overwriting_a_users_folder(env):
    compress(env, env.root / "user", overwrite=True)


@case(FileExistsError, "output_dir .* is not empty")
def compress_into_a_users_folder(env):
    compress(env, env.root / "user")


@case(ValueError, "output_dir must not hold data")
def compress_into_the_folder_of_its_data(env):
    compress(env, env.root, overwrite=True)


@case(ValueError, "output_dir must be a folder of its own, not the current folder")
def compress_into_the_current_folder(env):
    os.chdir(env.root / "user")
    compress(env, ".", overwrite=True)


@case(ValueError, "output_dir must be a folder of its own, not your home folder")
def compress_into_home(env):
    os.environ["HOME"] = str(env.root / "user")
    compress(env, env.root / "user", overwrite=True)


@case(ValueError, "output_dir must be a folder of its own, not the filesystem root")
def compress_into_the_filesystem_root(env):
    compress(env, "/")


@case(FileNotFoundError, "nothing to resume in output_dir")
def compress_resuming_a_folder_without_a_run(env):
    compress(env, env.root / "user", resume=True)


@case(ValueError, "resume and overwrite exclude each other")
def compress_resume_and_overwrite(env):
    compress(env, env.root / "run", resume=True, overwrite=True)


@case(ValueError, r"other settings.*\n  stop_ratio: recorded 0.5, given 0.3\n  post_tune_steps: recorded 2, given 9")
def compress_resuming_with_other_settings(env):
    config = dataclasses.replace(env.run_config, stop_ratio=0.3, post_tune_steps=9)
    run_acip(config, env.root / "run", resume=True, base_model=env.model, tokenizer=tiny_tokenizer())


@case(ValueError, r"output_dir .* holds a fine-tuning run \(acip finetune\), not an ACIP run.*acip finetune --resume")
def compress_resuming_a_fine_tuning_run(env):
    compress(env, env.root / "tuning", resume=True)


@case(FileNotFoundError, "base_model: no such folder")
def compress_missing_base_model(env):
    run_acip(ACIPRunConfig(**RUN, data=env.words, base_model=str(env.root / "nonexistent")), env.root / "new")


@case(FileNotFoundError, "base_model: .* is not a saved model")
def compress_base_model_without_config(env):
    run_acip(ACIPRunConfig(**RUN, data=env.words, base_model=str(env.root / "user")), env.root / "new")


@case(ValueError, "output_dir must not be inside base_model")
def compress_into_the_base_model(env):
    run_acip(ACIPRunConfig(**RUN, data=env.words, base_model=str(env.base)), env.base / "acip", overwrite=True)


@case(RuntimeError, r"output_dir .*run is in use by process \d+")
def compress_into_a_busy_folder(env):
    from acip.folders import folder_lock

    with folder_lock(env.root / "run"):
        run_acip(env.run_config, env.root / "run", resume=True, base_model=env.model, tokenizer=tiny_tokenizer())


# -- fine-tuning (finetune) ----------------------------------------------------------------------------------------


@case(ValueError, "output_dir must differ from model_dir")
def finetune_into_its_own_model(env):
    tune(env, env.acip, env.acip, overwrite=True)


@case(ValueError, "output_dir must not hold model_dir")
def finetune_into_the_folder_holding_its_model(env):
    tune(env, env.acip, env.root, overwrite=True)


@case(ValueError, "output_dir must not be inside model_dir")
def finetune_into_a_subfolder_of_its_model(env):
    tune(env, env.acip, env.acip / "tuned")


@case(FileNotFoundError, "model_dir: no such folder")
def finetune_missing_model(env):
    tune(env, env.root / "missing", env.root / "new")


@case(FileNotFoundError, "model_dir: .* is not a saved model")
def finetune_a_folder_without_a_model(env):
    tune(env, env.root / "user", env.root / "new")


@case(ValueError, r"ratio must be in \(0, 1\]")
def finetune_ratio_out_of_range(env):
    tune(env, env.acip, env.root / "new", ratio=1.5)


@case(ValueError, "prunable ACIP model: give the size ratio")
def finetune_prunable_without_ratio(env):
    tune(env, env.acip, env.root / "new", ratio=None)


@case(ValueError, "already compressed; leave out ratio")
def finetune_compressed_with_ratio(env):
    tune(env, env.root / "compressed", env.root / "new")


@case(ValueError, "model_dir .*base is a llama model, not an ACIP model: make one with acip compress --base-model")
def finetune_a_plain_model(env):
    tune(env, env.base, env.root / "new")


@case(ValueError, r"block_size must be at most the max_position_embeddings of model_dir .*acip \(128\), got 200")
def finetune_sequences_beyond_the_models_positions(env):
    tune(env, env.acip, env.root / "new", block_size=200)


@case(ValueError, r"eval_block_size must be at most the max_position_embeddings of model_dir .*acip \(128\)")
def finetune_held_out_windows_beyond_the_models_positions(env):
    tune(env, env.acip, env.root / "new", eval_blocks=2)  # eval_block_size: 512 by default


@case(ValueError, "data: .*blank.txt' holds no text")
def finetune_blank_data_file(env):
    tune(env, env.acip, env.root / "new", data=str(env.root / "blank.txt"))


@case(ValueError, "save='merged' cannot be combined with quantize")
def finetune_merged_and_quantized(env):
    tune(env, env.acip, env.root / "new", quantize="nf4")


@case(FileNotFoundError, "eval_data: no such file")
def finetune_missing_held_out_text(env):
    tune(env, env.acip, env.root / "new", eval_blocks=2, eval_data=str(env.root / "missing.txt"))


@case(ValueError, r"inputs changed:\n  model_dir: the run started from .*tuned_from, given .*other")
def finetune_resuming_with_another_model(env):
    finetune(env.root / "other", env.root / "tuning", resume=True)


@case(ValueError, r"inputs changed:\n  model_dir: .*tuned_from changed since the run started")
def finetune_resuming_with_a_changed_model(env):
    config = env.root / "tuned_from" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"mask_constant"', '"edited": true, "mask_constant"'))
    try:
        finetune(env.root / "tuned_from", env.root / "tuning", resume=True)
    finally:
        config.write_text(text)


@case(ValueError, r"other settings.*\n  steps: recorded 6, given 40")
def finetune_resuming_with_other_settings(env):
    finetune(env.root / "tuned_from", env.root / "tuning", dataclasses.replace(env.tune_config, steps=40), resume=True)


@case(ValueError, r"output_dir .* holds an ACIP run \(acip compress\), not a fine-tuning run.*acip compress --resume")
def finetune_resuming_an_acip_run(env):
    tune(env, env.acip, env.root / "run", resume=True)


@case(RuntimeError, "model_dir .*tuned_from is in use by process")
def finetune_a_model_being_written(env):
    from acip.folders import folder_lock

    with folder_lock(env.root / "tuned_from"):
        tune(env, env.root / "tuned_from", env.root / "new")


# -- export (export_model) -----------------------------------------------------------------------------------------


@case(ValueError, "out_dir must not hold model_dir")
def export_into_the_folder_holding_its_model(env):
    export(env, env.acip, env.root, overwrite=True)


@case(ValueError, "out_dir must not be inside model_dir")
def export_into_a_subfolder_of_its_model(env):
    export(env, env.acip, env.acip / "export")


@case(ValueError, "out_dir must differ from model_dir")
def export_onto_its_model(env):
    export(env, env.acip, env.acip, overwrite=True)


@case(ValueError, "quantize needs a compressed model.*give ratio")
def export_quantized_prunable_without_ratio(env):
    export(env, env.acip, env.root / "new", quantize="nf4", validate=True)


@case(ValueError, "quantize needs a compressed model.*give ratio")
def export_quantized_prunable_without_ratio_or_check(env):
    export(env, env.acip, env.root / "new", quantize="nf4")


@case(ValueError, r"quantize must be one of \('nf4', 'fp4', 'int8', 'int4'\) or None, got 'int3'")
def export_unknown_quant_type(env):
    export(env, env.root / "compressed", env.root / "new", quantize="int3")


@case(ValueError, "quantize needs a compressed model.*give ratio")
def export_int8_prunable_without_ratio(env):
    export(env, env.acip, env.root / "new", quantize="int8")


@case(FileNotFoundError, "calibration: no such file")
def export_int4_with_a_missing_calibration_file(env):
    export(env, env.root / "compressed", env.root / "new", quantize="int4", calibration=env.root / "none.txt")


@case(FileExistsError, "out_dir .* holds files acip did not write")
def export_overwriting_a_users_folder(env):
    export(env, env.acip, env.root / "user", overwrite=True)


@case(ValueError, "dtype must be one of")
def export_unknown_dtype(env):
    export(env, env.acip, env.root / "new", dtype="int8")


@case(ValueError, "repo_id must be 'org/name'")
def export_bad_repo_id(env):
    export(env, env.acip, env.root / "new", repo_id="no namespace")


@case(FileNotFoundError, "model_dir: no such folder")
def export_missing_model(env):
    export(env, env.root / "missing", env.root / "new")


@case(ValueError, "model_dir .* is already compressed; leave out ratio")
def export_compressed_with_ratio(env):
    export(env, env.root / "compressed", env.root / "new", ratio=0.5)


@case(ValueError, "model_dir .*base is a llama model, not an ACIP model: make one with acip compress --base-model")
def export_a_plain_model(env):
    export(env, env.base, env.root / "new")


@case(ValueError, "license is needed")
def export_unknown_license(env):
    export(env, env.acip, env.root / "new", license=None)


@case(NotADirectoryError, "out_dir must be a folder")
def export_into_a_file(env):
    export(env, env.acip, env.words)


# -- converting a checkpoint of the original implementation (convert) -------------------------------------------


@case(ValueError, r"src .*base is a plain llama model, not a checkpoint of the original ACIP implementation")
def convert_a_plain_model(env):
    to_acip(env, env.base)


@case(ValueError, r"src .*acip is already one of acip's ACIP model folders .*nothing to convert")
def convert_one_of_our_acip_models(env):
    to_acip(env, env.acip)


@case(ValueError, r"base_model: the base model fixture/tiny-llama-base that src names could not be reached .*gated"
      r".*--base-model")
def convert_without_a_reachable_base_config(env):
    to_acip(env, "llama", base_model=None)


@case(FileNotFoundError, "base_model: no such folder")
def convert_missing_base_model(env):
    to_acip(env, "llama", base_model="missing")


# What acip convert says of each damaged original checkpoint under original/, given the right base config (and of the
# llama fixture given the wrong one): a regex for each, one per line after the folder's name. The function raises
# ValueError (FileNotFoundError for a missing shard), the command ends with exit status 2; case ids name the folder.
CONVERT_REFUSALS = r"""
narrow_base              narrow_base's config does not match src .*: model.*down_proj.lora_A.default.weight has shape \[8, 160\], the config gives \[8, 144\]
qwen2_base               does not hold the tensors .*qwen2_base's config needs: missing model.lm_head.weight, model.model.layers.0.self_attn.k_proj.base_layer.parametrization.ortho.bias
unknown_parametrization  uses the parametrization module_factory_cls='lowrank'; acip converts the SVD parametrization
unknown_mask_function    src .*unknown_mask_function uses the mask function mask_func='sigmoid'
4bit_config              src .*4bit_config is a 4-bit checkpoint .*convert from the unquantized one
4bit_tensors             holds quantized \(4-bit or integer\) tensors.*convert from the unquantized
missing_lora_b           lacks tensors of the parametrized layer model.model.layers.1.mlp.up_proj: missing model.model.layers.1.mlp.up_proj.lora_B.default.weight
missing_norm             src .*missing_norm does not hold the tensors .*: missing model.model.norm.weight
extra_tensor             src .*extra_tensor does not hold the tensors .*: extra model.model.extra.weight
torn_file                src: .*torn_file/model.safetensors is not a complete safetensors file .*torn shard
missing_shard            src: model.safetensors.index.json names the shard model-00002-of-00003.safetensors, which is not in
"""  # noqa: E501
CLI_REFUSALS = []  # (command, match): registered as command-line cases below, once cli_case exists


def _register_convert_refusal(folder: str, match: str) -> None:
    """The two cases of one line of CONVERT_REFUSALS: convert_<folder> (the function) and cli_convert_<folder>."""
    src, base_model = ("llama", folder) if folder.endswith("_base") else (folder, "base")

    def call(env):
        to_acip(env, src, base_model=base_model)

    def command(env):
        cli_convert(env, src, base_model=base_model)

    call.__name__, command.__name__ = f"convert_{folder}", f"cli_convert_{folder}"
    case(FileNotFoundError if folder == "missing_shard" else ValueError, match)(call)
    CLI_REFUSALS.append((command, match))


for _line in CONVERT_REFUSALS.strip().splitlines():
    _register_convert_refusal(*_line.split(maxsplit=1))


@case(ValueError, r"dtype must be one of \('float32', 'bfloat16', 'float16'\)")
def convert_an_unknown_dtype(env):
    to_acip(env, "llama", dtype="int8")


@case(ValueError, "out must differ from src")
def convert_into_its_source(env):
    to_acip(env, "llama", out=original(env, "llama"))


@case(ValueError, "out must not be inside src")
def convert_into_a_subfolder_of_its_source(env):
    to_acip(env, "llama", out=original(env, "llama") / "converted")


@case(FileExistsError, "out .*user holds files acip did not write")
def convert_overwriting_a_users_folder(env):
    to_acip(env, "llama", out=env.root / "user", overwrite=True)


@case(FileExistsError, "out .*user is not empty; pass overwrite=True")
def convert_into_a_users_folder(env):
    to_acip(env, "llama", out=env.root / "user")


# -- the command line: every subcommand ----------------------------------------------------------------------------

CLI_CASES = []


def cli_case(status: int, match: str):
    """Register a case of the command line: calling it must end the command with exit status ``status`` and one
    error line ``acip COMMAND: error: ...`` on stderr that matches ``match``, without a traceback."""

    def register(call):
        CLI_CASES.append(pytest.param(call, status, match, id=call.__name__))
        return call

    return register


@cli_case(2, "output_dir must be a folder of its own, not the current folder")
def cli_compress_overwriting_the_current_folder(env):
    os.chdir(env.root / "user")  # issue 14: this deleted every file of the current folder, then failed
    main(["compress", "--preset", "quick", "--base-model", "/nonexistent", "--output-dir", ".", "--overwrite"])


@cli_case(2, "base_model: no such folder '/nonexistent'")
def cli_compress_overwriting_with_a_missing_base_model(env):
    main(["compress", "--base-model", "/nonexistent", "--output-dir", str(env.root / "user"), "--overwrite"])


@cli_case(2, "data: no such file .*nope.txt")
def cli_compress_missing_data_file(env):
    main(["compress", "--base-model", str(env.base), "--data", "nope.txt", "--output-dir", str(env.root / "new")])


@cli_case(2, "data: .*empty.txt' holds no text")
def cli_compress_empty_data_file(env):
    main(["compress", "--base-model", str(env.base), "--data", str(env.root / "empty.txt"), "--output-dir",
          str(env.root / "new")])  # fmt: skip


@cli_case(2, r"block_size must be at most the max_position_embeddings of base_model .*base \(128\), got 4096")
def cli_compress_sequences_beyond_the_models_positions(env):
    main(["compress", "--base-model", str(env.base), "--data", env.words, "--block-size", "4096", "--output-dir",
          str(env.root / "new")])  # fmt: skip


@cli_case(2, r"stop_ratio must be in \(0, 1\), got 1.5")
def cli_compress_stop_ratio_out_of_range(env):
    main(["compress", "--base-model", str(env.base), "--data", env.words, "--stop-ratio", "1.5", "--output-dir",
          str(env.root / "new")])  # fmt: skip


@cli_case(2, r"argument --stop-ratio: invalid float value: 'half'")
def cli_compress_stop_ratio_not_a_number(env):
    main(["compress", "--stop-ratio", "half", "--output-dir", str(env.root / "new")])


@cli_case(2, r"the following arguments are required: --output-dir")
def cli_compress_without_output_dir(env):
    main(["compress", "--preset", "quick"])


@cli_case(2, r"other settings.*\n  stop_ratio: recorded 0.5, given 0.2\nleave them out")
def cli_compress_resuming_with_another_stop_ratio(env):
    main(["compress", "--output-dir", str(env.root / "run"), "--resume", "--stop-ratio", "0.2"])


@cli_case(1, r"output_dir .*run is in use by process \d+")
def cli_compress_into_a_busy_folder(env):
    from acip.folders import folder_lock

    with folder_lock(env.root / "run"):
        main(["compress", "--output-dir", str(env.root / "run"), "--resume"])


@cli_case(2, r"ratio must be in \(0, 1\].*got 1.5")
def cli_finetune_ratio_out_of_range(env):
    main(["finetune", str(env.acip), "--ratio", "1.5", "--output-dir", str(env.root / "new")])


@cli_case(2, "prunable ACIP model: give the size ratio")
def cli_finetune_prunable_without_ratio(env):
    main(["finetune", str(env.acip), "--output-dir", str(env.root / "new"), "--data", env.words])


@cli_case(2, "data: .*blank.txt' holds no text")
def cli_finetune_blank_data_file(env):
    main(["finetune", str(env.acip), "--ratio", "0.5", "--data", str(env.root / "blank.txt"), "--output-dir",
          str(env.root / "new")])  # fmt: skip


@cli_case(2, r"inputs changed:\n  model_dir: the run started from .*tuned_from, given .*other\nresume with")
def cli_finetune_resuming_with_another_model(env):
    main(["finetune", str(env.root / "other"), "--output-dir", str(env.root / "tuning"), "--resume"])


@cli_case(2, "holds an ACIP run .*not a fine-tuning run")
def cli_finetune_resuming_an_acip_run(env):
    main(["finetune", str(env.acip), "--output-dir", str(env.root / "run"), "--resume"])


@cli_case(2, "unrecognized arguments: --target-modules")
def cli_finetune_former_option_name(env):
    main(["finetune", str(env.acip), "--ratio", "0.5", "--output-dir", str(env.root / "new"), "--target-modules",
          "all-linear"])  # fmt: skip


@cli_case(2, "model_dir .*base is a llama model, not an ACIP model: make one with acip compress --base-model .*base")
def cli_finetune_a_plain_model(env):
    main(["finetune", str(env.base), "--ratio", "0.5", "--output-dir", str(env.root / "new")])


@cli_case(1, "model_dir .*tuned_from is in use by process")
def cli_finetune_a_model_being_written(env):
    from acip.folders import folder_lock

    with folder_lock(env.root / "tuned_from"):
        main(["finetune", str(env.root / "tuned_from"), "--ratio", "0.5", "--output-dir", str(env.root / "new")])


@cli_case(2, r"ratios must be in \(0, 1\]")
def cli_eval_ratio_out_of_range(env):
    main(["eval", str(env.acip), "--ratios", "0.5", "1.5"])


@cli_case(2, "model_dir: no such folder")
def cli_eval_missing_model(env):
    main(["eval", str(env.root / "missing"), "--ratios", "0.5"])


@cli_case(2, "model_dir .*base is a llama model, not an ACIP model: make one with acip compress --base-model .*base")
def cli_eval_a_plain_model(env):
    main(["eval", str(env.base)])


@cli_case(2, r"model_dir .*original/llama is a checkpoint of the original ACIP implementation: convert it first with "
          r"acip convert")
def cli_eval_an_original_checkpoint(env):
    main(["eval", str(original(env)), "--ratios", "0.5"])


@cli_case(2, "data: no such file")
def cli_eval_missing_text(env):
    main(["eval", str(env.acip), "--data", str(env.root / "missing.txt")])


@cli_case(2, "block_size must be at least 2")
def cli_eval_one_token_windows(env):
    main(["eval", str(env.acip), "--data", env.words, "--block-size", "1"])


@cli_case(2, r"block_size must be at most the max_position_embeddings of model_dir .*acip \(128\), got 512")
def cli_eval_windows_beyond_the_models_positions(env):
    main(["eval", str(env.acip), "--data", env.words])  # --block-size: 512 by default


@cli_case(2, "output_dir must be a folder")
def cli_eval_report_into_a_file(env):
    main(["eval", str(env.acip), "--data", env.words, "--output-dir", env.words])


@cli_case(1, "model_dir .*acip is in use by process")
def cli_eval_a_model_being_written(env):
    from acip.folders import folder_lock

    with folder_lock(env.acip):
        main(["eval", str(env.acip), "--data", env.words])


@cli_case(2, "quantize needs a compressed model.*--ratio")
def cli_export_quantized_prunable_without_ratio(env):
    main(["export", str(env.acip), str(env.root / "new"), "--license", "mit", "--quantize", "nf4", "--no-validate"])


@cli_case(2, "out_dir must not hold model_dir")
def cli_export_over_the_folder_holding_its_model(env):
    main(["export", str(env.acip), str(env.root), "--license", "mit", "--overwrite"])


@cli_case(2, "model_dir: no such folder")
def cli_export_missing_model(env):
    main(["export", str(env.root / "missing"), str(env.root / "new"), "--license", "mit"])


@cli_case(2, "model_dir .*base is a llama model, not an ACIP model: make one with acip compress --base-model .*base")
def cli_export_a_plain_model(env):
    main(["export", str(env.base), str(env.root / "new"), "--license", "mit"])


@cli_case(2, "--push-to-hub needs --repo-id")
def cli_export_push_without_repo_id(env):
    main(["export", str(env.acip), str(env.root / "new"), "--license", "mit", "--push-to-hub"])


@cli_case(2, r"argument --quantize: invalid choice: 'int3'")
def cli_export_unknown_quantization(env):
    main(["export", str(env.acip), str(env.root / "new"), "--quantize", "int3"])


def cli_convert(env, src, *options, out=None, base_model="base"):
    """acip convert of an original checkpoint (by name under original/) into ``out``, offline."""
    source = original(env, src) if isinstance(src, str) else src
    base = [] if base_model is None else ["--base-model", str(original(env, base_model))]
    with offline():
        main(["convert", str(source), str(out or env.root / "new"), *base, *options])


@cli_case(2, r"src .*base is a plain llama model, not a checkpoint of the original ACIP implementation")
def cli_convert_a_plain_model(env):
    cli_convert(env, env.base)


@cli_case(2, r"src .*acip is already one of acip's ACIP model folders")
def cli_convert_one_of_our_acip_models(env):
    cli_convert(env, env.acip)


@cli_case(2, r"base_model: the base model fixture/tiny-llama-base that src names could not be reached .*--base-model")
def cli_convert_without_a_reachable_base_config(env):
    cli_convert(env, "llama", base_model=None)


for _command, _match in CLI_REFUSALS:
    cli_case(2, _match)(_command)


@cli_case(2, r"argument --dtype: invalid choice: 'int8'")
def cli_convert_an_unknown_dtype(env):
    cli_convert(env, "llama", "--dtype", "int8")


@cli_case(1, r"out .*run is in use by process \d+")
def cli_convert_into_a_busy_folder(env):
    from acip.folders import folder_lock

    with folder_lock(env.root / "run"):
        cli_convert(env, "llama", "--overwrite", out=env.root / "run")


def package(env, *options, model=None, out="m.pt2"):
    """acip package of the ACIP model (or ``model``) to ``out`` in the test's folder."""
    main(["package", str(model or env.acip), str(env.root / out), *options])


@cli_case(2, r"mine.pt2 exists: pass overwrite=True \(--overwrite\) to replace it")
def cli_package_onto_an_existing_file(env):
    package(env, "--ratio", "0.5", out="mine.pt2")


@cli_case(2, "path must end in .pt2")
def cli_package_without_the_suffix(env):
    package(env, "--ratio", "0.5", out="mine")


@cli_case(2, "model_dir: no such folder")
def cli_package_missing_model(env):
    package(env, "--ratio", "0.5", model=env.root / "missing")


@cli_case(2, r"ratio must be in \(0, 1\].*got 1.7")
def cli_package_ratio_out_of_range(env):
    package(env, "--ratio", "1.7")


@cli_case(2, "model_dir .*base is a llama model, not an ACIP model: make one with acip compress --base-model .*base")
def cli_package_a_plain_model(env):
    package(env, "--ratio", "0.5", model=env.base)


@cli_case(2, "prunable ACIP model: give the size ratio")
def cli_package_prunable_without_ratio(env):
    package(env)


@cli_case(2, "already compressed.*leave out ratio")
def cli_package_compressed_with_ratio(env):
    package(env, "--ratio", "0.5", model=env.root / "compressed")


@cli_case(2, "max_cache_len must be an integer >= 2")
def cli_package_one_position(env):
    package(env, "--ratio", "0.5", "--max-cache-len", "1")


@cli_case(2, "batch_size must be an integer >= 1")
def cli_package_no_batch(env):
    package(env, "--ratio", "0.5", "--batch-size", "0")


def snapshot(root) -> dict[str, str]:
    """Every file and folder under ``root``: relative path -> SHA-256 of its bytes ('dir' for folders; 'lock' for
    lock files, which every holder rewrites with its name)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = path.relative_to(root).as_posix()
        if path.is_dir() or path.name.endswith(".acip-lock"):
            out[key] = "dir" if path.is_dir() else "lock"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def test_enough_cases():
    assert len(CASES) >= 30 and {c.id.split("_")[0] for c in CASES} == {"compress", "finetune", "export", "convert"}
    commands = {c.id.split("_")[1] for c in CLI_CASES}
    assert commands == {"compress", "finetune", "eval", "export", "package", "convert"}
    for command in commands:  # each command: refused arguments (2) and, but for package, a busy folder (1)
        statuses = {c.values[1] for c in CLI_CASES if c.id.split("_")[1] == command}
        assert statuses == ({2} if command in ("export", "package") else {1, 2}), command


@pytest.mark.parametrize("call, error, match", CASES)
def test_bad_input_is_refused_and_changes_nothing(env, call, error, match, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))  # cases may point it elsewhere; monkeypatch restores it
    before = snapshot(env.root)
    weights = {name: tensor.clone() for name, tensor in env.model.state_dict().items()}
    with pytest.raises(error, match=match):
        call(env)
    assert snapshot(env.root) == before
    for name, tensor in env.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    assert json.loads((env.root / "run" / RUN_FILE).read_text())["finished"] is False


@pytest.mark.parametrize("call, status, match", CLI_CASES)
def test_the_command_line_says_what_is_wrong_in_one_line(env, call, status, match, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("ACIP_DEBUG", raising=False)
    before = snapshot(env.root)
    with pytest.raises(SystemExit) as exit_info:
        call(env)
    err = capsys.readouterr().err
    command = call.__name__.split("_")[1]
    assert exit_info.value.code == status, err
    assert err.startswith(f"acip {command}: error: ") and "Traceback" not in err, err
    assert re.search(match, err), err
    if "\\n" not in match:  # a message of one line (others list differences, one a line)
        assert err.count("\n") == 1, err
    assert snapshot(env.root) == before
