"""Fine-tune a compressed ACIP model with LoRA (peft): prune a saved ACIP model to a size ratio, compress it,
optionally quantize it to 4 bits (QLoRA), train LoRA adapters on a text source, and save either the adapter with
its compressed base model or the merged model (LoRA folded into the factor layers: no extra modules).

``acip finetune MODEL_DIR --ratio R --output-dir OUT`` is :func:`finetune`: a :class:`FinetuneTask` on the shared
training loop (acip.loop). Held-out perplexity is measured before and after and recorded in ``finetune_run.json``;
checkpoints make a killed run resumable to the same result.
"""

import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from .data import load_blocks
from .evaluation import perplexity
from .folders import check_not_busy
from .hub.modeling_acip import QUANT_TYPES, ACIPModel
from .inputs import check_data_source, check_model_dir, check_positions
from .loop import Task, TrainingConfig, default, option, set_gradient_checkpointing, train
from .base_model import load_base_model
from .fused_loss import language_model_loss
from .objective import teacher_logits
from .records import FINETUNE_FILE, FINETUNE_LOG, RUN_FILE, recorded_base_model
from .runs import recorded_settings
from .sizes import check_ratio_suits, check_size_ratio, load_at_size

ADAPTER_DIR = "adapter"
SAVE_MODES = ("merged", "adapter")


@dataclass
class FinetuneConfig(TrainingConfig):
    """Everything a fine-tuning run depends on; saved next to the result (``finetune_run.json``)."""

    block_size: int = default("block_size", 256)
    lr: float = default("lr", 2e-4)  # the peak: linear warm-up, cosine decay to 0
    max_grad_norm: float = default("max_grad_norm", 1.0)
    lora_r: int = default("lora_r", 16)
    lora_alpha: int = default("lora_alpha", 32)
    checkpoint_every: int = default("checkpoint_every", 50)
    ratio: float | None = option(None, "size ratio to prune to before fine-tuning, in (0, 1]; leave out for a model "
                                       "that is already compressed")
    quantize: str | None = option(None, "quantize the compressed model to 4 bits first (QLoRA): nf4 or fp4",
                                  choices=QUANT_TYPES)
    eval_data: str = option("wiki-validation", "held-out text for perplexity before and after")
    eval_blocks: int = option(16, "held-out windows scored before and after (0: skip)")
    eval_block_size: int = option(512, "tokens per held-out window (acip eval's default)")
    steps: int = option(200, "optimizer steps")
    warmup_steps: int = option(10, "steps of linear learning-rate warm-up (then cosine decay to 0)")
    lora_targets: str | list[str] = option("all-linear", "layers that get LoRA (peft convention; all-linear: the "
                                                         "factor layers and dense layers, not the head)")
    teacher: str | None = option(None, "with distill_alpha > 0: the dense model to distil from ('smollm2', a path or "
                                       "Hub name); default: the base model of the ACIP run (its acip_run.json)")
    save: str = option("merged", "merged: LoRA folded into the weights, an ordinary model; adapter: the compressed "
                                 "model plus the peft adapter",
                       choices=SAVE_MODES)

    def validate(self) -> None:
        """Clear errors for settings the run cannot use."""
        super().validate()
        if self.ratio is not None:
            check_size_ratio(self.ratio)
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {self.quantize!r}")
        if self.save not in SAVE_MODES:
            raise ValueError(f"save must be one of {SAVE_MODES}, got {self.save!r}")
        if self.save == "merged" and self.quantize is not None:
            raise ValueError(
                "save='merged' cannot be combined with quantize: folding LoRA into 4-bit weights would round the "
                "update away; use save='adapter' (--save adapter), or fine-tune without quantize"
            )
        for name in ("steps", "eval_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("eval_blocks", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_compressed(model_dir: str | os.PathLike, config: FinetuneConfig, device, dtype) -> ACIPModel:
    """A saved ACIP model pruned to ``config.ratio``, compressed, and quantized if asked."""
    check_ratio_suits("model_dir", model_dir, config.ratio)
    model = load_at_size(model_dir, config.ratio, dtype, device)
    if config.quantize is not None:
        model.quantize(config.quantize)
    return model.requires_grad_(False)


class FinetuneTask(Task):
    """LoRA fine-tuning of a compressed ACIP model as a task of the training loop."""

    record_file, log_file = FINETUNE_FILE, FINETUNE_LOG

    def __init__(self, model_dir: str | os.PathLike, config: FinetuneConfig, runtime):
        from peft import LoraConfig, get_peft_model

        self.config, self.model_dir = config, str(model_dir)
        torch.manual_seed(config.seed)
        self.compressed = load_compressed(model_dir, config, runtime.device, runtime.dtype)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.compressed, True)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.eval_windows = (
            load_blocks(config.eval_data, self.tokenizer, config.eval_block_size, config.eval_blocks)
            if config.eval_blocks else None
        )  # fmt: skip
        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=config.lora_targets)  # fmt: skip
        self.model = get_peft_model(self.compressed, lora)
        self.teacher = None
        if config.distill_alpha > 0:  # the dense model, frozen, in the dtype the run computes in
            name = config.teacher or recorded_base_model(model_dir)
            self.teacher = load_base_model(name, runtime.compute_dtype)[0].to(runtime.device).requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.summary = {"model": self.model_dir, "size_ratio": self.compressed.get_size_ratio(),
                        "base_model": self.compressed.config.base_model_name_or_path}  # fmt: skip

    def held_out_perplexity(self) -> float | None:
        """Perplexity on the first ``eval_blocks`` windows of the held-out text (None when eval_blocks is 0)."""
        if self.eval_windows is None:
            return None
        return perplexity(self.model, self.eval_windows, batch_size=self.config.batch_size, desc="perplexity")

    def begin(self) -> None:
        """A fresh run measures the held-out perplexity it starts from."""
        self.summary["perplexity_before"] = self.held_out_perplexity()

    def param_groups(self) -> list[dict]:
        """The LoRA weights."""
        return [{"params": self.params}]

    def loss(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """Next-token cross entropy, distilled from the teacher when there is one."""
        targets = teacher_logits(self.teacher, ids)  # (B, T, V) or None
        logits = self.model(input_ids=ids).logits  # (B, T, V)
        return language_model_loss(logits, ids, targets, self.config.distill_alpha,
                                   self.config.distill_temperature)  # fmt: skip

    def lr(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 0."""
        return self.config.lr_at(step)

    def phase(self, step: int) -> tuple[str, int, int | None]:
        """One phase of ``steps`` steps."""
        return "LoRA fine-tuning", step, self.config.steps

    def done(self, step: int) -> bool:
        """Over after ``steps`` optimizer steps."""
        return step >= self.config.steps

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The LoRA weights."""
        return {f"lora.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Put back the checkpointed LoRA weights."""
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if param.requires_grad:
                    param.copy_(tensors[f"lora.{name}"])

    @torch.no_grad()
    def save(self, folder: Path | None):
        """The merged model, or (``save="adapter"``) the compressed model plus the adapter in ``adapter/``; returns
        the fine-tuned model (a PeftModel in adapter mode, as it will load from the saved files)."""
        from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

        self.summary["perplexity_after"] = self.held_out_perplexity()
        if self.config.save == "merged":
            model = self.model.merge_and_unload()
        else:
            adapter, lora = get_peft_model_state_dict(self.model), self.model.peft_config["default"]
            if folder is not None:
                self.model.save_pretrained(folder / ADAPTER_DIR)
            model = self.model.unload()
        if folder is not None:
            model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
            if (Path(self.model_dir) / RUN_FILE).exists():  # how the score map came about: the model card tells it
                shutil.copy2(Path(self.model_dir) / RUN_FILE, folder / RUN_FILE)
        if self.config.save == "merged":
            return model
        tuned = PeftModel(model, lora)
        set_peft_model_state_dict(tuned, adapter)
        return tuned.requires_grad_(False).eval()


def finetune(model_dir, output_dir, config: FinetuneConfig | None = None, *, resume=False, overwrite=False):
    """LoRA fine-tune a saved ACIP model at ``config.ratio`` and save the result to ``output_dir``; returns the
    fine-tuned model: the merged ACIPModel (``save="merged"``), or a PeftModel around the compressed one.

    The adapter of ``save="adapter"`` loads with ``PeftModel.from_pretrained(model, output_dir / "adapter")`` on
    ``AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)``. ``resume`` continues a killed run
    from its last checkpoint: ``model_dir`` must be the model it started from, unchanged, and ``config`` (None: the
    recorded settings) its settings. ``overwrite`` replaces a folder an earlier acip command wrote, once the new
    result is complete (docs/guarantees.md); any other non-empty folder is refused.
    """

    def build(config, runtime):
        """The task, its model loaded."""
        return FinetuneTask(model_dir, config, runtime)

    def inputs(config):
        """What the run reads, checked (nothing loaded)."""
        check_model_dir("model_dir", model_dir)
        check_not_busy(model_dir, "model_dir")
        check_ratio_suits("model_dir", model_dir, config.ratio)
        check_data_source("data", config.data)
        if config.eval_blocks:
            check_data_source("eval_data", config.eval_data)
        lengths = {"block_size": config.block_size, **({"eval_block_size": config.eval_block_size}
                                                       if config.eval_blocks else {})}  # fmt: skip
        check_positions("model_dir", model_dir, lengths)
        return {"model_dir": model_dir, "data": config.data, "eval_data": config.eval_data}

    compare = None
    if config is None:  # no settings given: a resumed run takes the recorded ones
        recorded = recorded_settings(output_dir, FINETUNE_FILE, FinetuneConfig) if resume else None
        config, compare = recorded or FinetuneConfig(), ()
    return train(build, config, output_dir, FINETUNE_FILE, resume=resume, overwrite=overwrite, inputs=inputs,
                 compare=compare)  # fmt: skip

