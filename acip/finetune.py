"""Fine-tune a compressed ACIP model with LoRA (peft): prune a saved ACIP model to a size ratio, compress it,
optionally quantize it to 4 bits (QLoRA), train LoRA adapters on a text source, and save either the adapter with
its compressed base model or the merged model (LoRA folded into the factor layers: no extra modules).

``acip finetune MODEL_DIR --ratio R --output-dir OUT`` is :func:`finetune`. Held-out perplexity is measured before
and after and recorded in ``finetune_run.json``; checkpoints make a killed run resumable to the same result.
"""

import dataclasses
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from .checkpoints import (
    latest_checkpoint, load_checkpoint, load_optimizer, optimizer_tensors, remove_checkpoints,
    restore_rng, rng_tensors, save_checkpoint, truncate_log,
)  # fmt: skip
from .data import TrainBatches, load_blocks
from .distributed import DataParallel
from .evaluation import check_ratio, perplexity
from .files import write_json
from .hub.modeling_acip import QUANT_TYPES, ACIPModel
from .training import RUN_FILE, accumulate_gradients, prepare_run, set_gradient_checkpointing

FINETUNE_FILE = "finetune_run.json"
LOG_FILE = "finetune_log.jsonl"
ADAPTER_DIR = "adapter"
SAVE_MODES = ("merged", "adapter")


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; saved next to the result (``finetune_run.json``)."""

    ratio: float | None = field(default=None, metadata={"help": "size ratio to prune to before fine-tuning, in (0, 1]; leave out for a model that is already compressed"})
    quantize: str | None = field(default=None, metadata={"help": "quantize the compressed model to 4 bits first (QLoRA): nf4 or fp4", "choices": QUANT_TYPES})
    data: str = field(default="wiki-train", metadata={"help": "training text: a built-in corpus, a file, or hf:NAME[:CONFIG[:SPLIT]]"})
    eval_data: str = field(default="wiki-validation", metadata={"help": "held-out text for perplexity before and after"})
    eval_blocks: int = field(default=16, metadata={"help": "held-out windows scored before and after (0: skip)"})
    eval_block_size: int = field(default=512, metadata={"help": "tokens per held-out window (acip eval's default)"})
    block_size: int = field(default=256, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    steps: int = field(default=200, metadata={"help": "optimizer steps"})
    lr: float = field(default=2e-4, metadata={"help": "peak AdamW learning rate (linear warm-up, cosine decay to 0)"})
    warmup_steps: int = field(default=10, metadata={"help": "steps of linear learning-rate warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient norm to this (0: no clipping)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    target_modules: str | list[str] = field(default="all-linear", metadata={"help": "layers that get LoRA (peft convention; all-linear: the factor layers and dense layers, not the head)"})
    save: str = field(default="merged", metadata={"help": "merged: LoRA folded into the weights, an ordinary model; adapter: the compressed model plus the peft adapter", "choices": SAVE_MODES})
    checkpoint_every: int = field(default=50, metadata={"help": "optimizer steps between checkpoints (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, LoRA init and dropout"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder block's activations in the backward pass: less memory, about a third more compute"})

    def validate(self) -> None:
        """Clear errors for settings the run cannot use."""
        if self.ratio is not None:
            check_ratio(self.ratio)
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            raise ValueError(f"quantize must be one of {QUANT_TYPES} or None, got {self.quantize!r}")
        if self.save not in SAVE_MODES:
            raise ValueError(f"save must be one of {SAVE_MODES}, got {self.save!r}")
        if self.save == "merged" and self.quantize is not None:
            raise ValueError(
                "save='merged' cannot be combined with quantize: folding LoRA into 4-bit weights would round the "
                "update away; use save='adapter' (--save adapter), or fine-tune without quantize"
            )
        for name in ("block_size", "batch_size", "grad_accum", "steps", "lora_r", "eval_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_blocks", "warmup_steps", "checkpoint_every", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then cosine decay to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return self.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def load_compressed(model_dir: str | os.PathLike, config: FinetuneConfig, device, dtype) -> ACIPModel:
    """A saved ACIP model pruned to ``config.ratio``, compressed, and quantized if asked."""
    model = ACIPModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if model.config.compressed:
        if config.ratio is not None:
            raise ValueError(
                f"{model_dir} is already compressed (to ratio {model.get_size_ratio():.3f}); leave out ratio (--ratio)"
            )
    elif config.ratio is None:
        raise ValueError(f"{model_dir} is a prunable ACIP model: give the size ratio to fine-tune at (--ratio, (0, 1])")
    else:
        model.prune_model_by_score(compression_ratio=config.ratio).compress()
    if config.quantize is not None:
        model.quantize(config.quantize)
    return model.requires_grad_(False)


class Finetuner:
    """One LoRA fine-tuning run of a compressed ACIP model, with checkpoints. Use :func:`finetune`."""

    def __init__(self, model_dir: str | os.PathLike, config: FinetuneConfig, output_dir: str | os.PathLike):
        from peft import LoraConfig, get_peft_model

        config.validate()
        self.config, self.model_dir, self.output_dir = config, str(model_dir), Path(output_dir)
        self.processes = DataParallel()
        self.device = self.processes.device
        # As in the ACIP run: bf16 weights and autocast on CUDA; float32 on the CPU.
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        torch.manual_seed(config.seed)
        self.model = load_compressed(model_dir, config, self.device, dtype)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.model, True)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        # Global batches of batch_size × processes sequences; each process reads its own rows (acip.distributed).
        world = self.processes.world_size
        self.batches = TrainBatches(config.data, self.tokenizer, config.block_size, config.batch_size * world, config.seed)
        self.eval_windows = (
            load_blocks(config.eval_data, self.tokenizer, config.eval_block_size, config.eval_blocks)
            if config.eval_blocks else None
        )  # fmt: skip
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=config.target_modules,
        )  # fmt: skip
        self.peft_model = get_peft_model(self.model, lora)
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.step = 0
        self.elapsed = 0.0
        self.record = {"config": dataclasses.asdict(config), "model": self.model_dir, "finished": False,
                       "processes": world, "global_batch": config.batch_size * world * config.grad_accum,
                       "size_ratio": self.model.get_size_ratio(),
                       "base_model": self.model.config.base_model_name_or_path}  # fmt: skip

    def held_out_perplexity(self) -> float | None:
        """Perplexity on the first ``eval_blocks`` windows of the held-out text (None when eval_blocks is 0)."""
        if self.eval_windows is None:
            return None
        return perplexity(self.peft_model, self.eval_windows, batch_size=self.config.batch_size, desc="perplexity")

    def _train_step(self, data) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches."""
        start = time.perf_counter()
        self.peft_model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr_at(self.step)
        loss_total, tokens = accumulate_gradients(
            self.peft_model, data, self.config.grad_accum, self.processes, self.device, self.autocast
        )
        self.processes.average_gradients(self.params)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        self.step += 1
        return {"step": self.step, "loss": self.processes.mean(loss_total), "lr": self.config.lr_at(self.step - 1),
                "tokens_per_s": tokens / seconds}  # fmt: skip

    def run(self) -> ACIPModel:
        """Perplexity before, the training steps (continuing from the current one), perplexity after, save."""
        main = self.processes.is_main
        if self.step == 0:
            self.record["perplexity_before"] = self.held_out_perplexity()
            if main:
                write_json(self.output_dir / FINETUNE_FILE, self.record)
        data = self.batches.batches(start=self.step * self.config.grad_accum)
        bar = tqdm(total=self.config.steps, initial=self.step, desc="LoRA fine-tuning", unit="step", disable=not main)
        while self.step < self.config.steps:
            stats = self._train_step(data)
            if main:
                with open(self.output_dir / LOG_FILE, "a") as log:
                    log.write(json.dumps(stats) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", tok_s=f"{stats['tokens_per_s']:.0f}")
            every = self.config.checkpoint_every
            if every and self.step % every == 0 and self.step < self.config.steps:
                self.checkpoint()
        bar.close()
        self.record["perplexity_after"] = self.held_out_perplexity()
        return self.save()

    @torch.no_grad()
    def save(self) -> ACIPModel:
        """Write the result (main process): the merged model, or the compressed model with the adapter in
        ``adapter/``; every process returns the fine-tuned model (a PeftModel in adapter mode)."""
        out, main = self.output_dir, self.processes.is_main
        if self.config.gradient_checkpointing:
            set_gradient_checkpointing(self.model, False)
        if self.config.save == "merged":
            model = self.peft_model.merge_and_unload()
        else:
            if main:
                self.peft_model.save_pretrained(out / ADAPTER_DIR)
            model = self.peft_model.unload()
        if main:
            model.save_pretrained(out)
            self.tokenizer.save_pretrained(out)
            if (Path(self.model_dir) / RUN_FILE).exists():  # how the score map came about: the model card tells it
                shutil.copy2(Path(self.model_dir) / RUN_FILE, out / RUN_FILE)
            self.record.update(finished=True, steps=self.step, train_seconds=round(self.elapsed, 1))
            write_json(out / FINETUNE_FILE, self.record)
            remove_checkpoints(out)
        self.processes.wait()
        if self.config.save == "adapter":  # hand back the fine-tuned model, as it will load from the saved files
            from peft import PeftModel

            return PeftModel.from_pretrained(model, out / ADAPTER_DIR)
        return model

    @torch.no_grad()
    def checkpoint(self) -> Path | None:
        """Write the LoRA weights, optimizer and random state atomically (acip.checkpoints); the main process writes,
        the others hold the same state and return None."""
        if not self.processes.is_main:
            return None
        lora = {f"lora.{n}": p for n, p in self.peft_model.named_parameters() if p.requires_grad}
        optim, param_groups = optimizer_tensors(self.optimizer)
        meta = {"step": self.step, "elapsed": self.elapsed, "param_groups": param_groups, "record": self.record}
        return save_checkpoint(self.output_dir, self.step, {**rng_tensors(), **lora, **optim}, meta)

    @torch.no_grad()
    def load_checkpoint(self, folder: Path) -> None:
        """Bring a freshly built fine-tuner to the state a checkpoint recorded."""
        tensors, meta = load_checkpoint(folder)
        for name, param in self.peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(tensors[f"lora.{name}"])
        self.step, self.elapsed, self.record = meta["step"], meta["elapsed"], meta["record"]
        load_optimizer(self.optimizer, tensors, meta["param_groups"], self.device)
        restore_rng(tensors)


def finetune(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    config: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
) -> ACIPModel:
    """LoRA fine-tune a saved ACIP model at ``config.ratio`` and save the result to ``output_dir``; returns the
    fine-tuned model: the merged ACIPModel (``save="merged"``), or a PeftModel around the compressed one.

    The adapter of ``save="adapter"`` loads with ``PeftModel.from_pretrained(model, output_dir / "adapter")`` on
    ``AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)``. ``resume`` continues a killed run
    from its last checkpoint with the settings it was started with; ``overwrite`` replaces a previous result.
    """
    processes = DataParallel()
    config, output_dir = prepare_run(config or FinetuneConfig(), output_dir, FINETUNE_FILE, resume, overwrite, processes)
    tuner = Finetuner(model_dir, config, output_dir)
    if resume:
        tuner.load_checkpoint(latest_checkpoint(output_dir))
        if processes.is_main:
            truncate_log(output_dir / LOG_FILE, tuner.step)
    return tuner.run()

