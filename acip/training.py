"""The ACIP run: train the singular-value masks and LoRA adapters in one gradient descent, turn the order in which
masks die into a score map, and save a full ACIP model that can then be pruned to any size.

The algorithm (arXiv 2502.01717), with its published settings as the ``paper`` preset:

1. every target linear layer becomes ``U · diag(mask) · S Vᵀ`` (modeling_acip / parametrization);
2. LoRA adapters (peft; r 32, alpha 16, dropout 0.05) on the factor layers of the parametrized layers;
3. loss = next-token cross entropy + λ · Σ ||relu(mask)||₁; λ starts at 1e-3 and is multiplied by 1.01 every 4
   steps; AdamW (lr 5e-5, no weight decay) on masks and LoRA weights only;
4. after every step the score of a live mask is its value; when it dies its score becomes 0 and every later step
   subtracts 1, so earlier death means a lower score. Here the death step is refined to a fraction of a step
   (linear interpolation of where the mask crossed zero), which orders masks that die on the same step;
5. once the size ratio reaches the stop ratio (0.4), the masks freeze and the LoRA adapters alone are post-tuned
   (1000 steps); finally LoRA is merged into the factors and the full model is saved with its score map.

Beyond the original: dead ranks are sliced out while training (acip.compaction), so steps get cheaper as the masks
die; checkpoints are atomic and a killed run resumes to the same score map; under ``accelerate launch`` the run is
data parallel over N processes (acip.distributed), with optional gradient checkpointing and a device map for bases
larger than one GPU.
"""

import dataclasses
import hashlib
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from .checkpoints import (
    latest_checkpoint, load_checkpoint, load_optimizer, optimizer_tensors, prepare_output_dir, remove_checkpoints,
    restore_rng, rng_tensors, save_checkpoint, truncate_log,
)  # fmt: skip
from .compaction import RankCompactor, rank_slots
from .data import TrainBatches
from .distributed import DataParallel
from .files import write_json
from .default_model import DEFAULT_MODEL, load_default_model
from .hub.configuration_acip import BASES
from .hub.modeling_acip import ACIPModel
from .whitening import parametrize

RUN_FILE = "acip_run.json"
LOG_FILE = "run_log.jsonl"
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")  # transformers' automatic placements


def check_device_map(device_map: str | None) -> None:
    """A clear error for a device map the run cannot use."""
    if device_map is not None and device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map must be one of {DEVICE_MAPS} or None, got {device_map!r}")


@dataclass
class ACIPRunConfig:
    """Everything an ACIP run depends on; saved next to the result, so a run can be resumed and reproduced."""

    base_model: str = field(default=DEFAULT_MODEL, metadata={"help": "base causal LM: 'smollm2' (embedded) or a path/Hub name"})
    data: str = field(default="wiki-train", metadata={"help": "training text: a built-in corpus, a file, or hf:NAME[:CONFIG[:SPLIT]]"})
    block_size: int = field(default=1024, metadata={"help": "tokens per training sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=5e-5, metadata={"help": "AdamW learning rate (masks and LoRA), no weight decay"})
    lambda_init: float = field(default=1e-3, metadata={"help": "initial weight λ of the L1 penalty on relu(mask)"})
    lambda_growth: float = field(default=1.01, metadata={"help": "λ is multiplied by this factor ..."})
    lambda_every: int = field(default=4, metadata={"help": "... every this many steps"})
    stop_ratio: float = field(default=0.4, metadata={"help": "stop pruning once the size ratio of the parametrized layers reaches this, in (0, 1)"})
    post_tune_steps: int = field(default=1000, metadata={"help": "LoRA-only steps with frozen masks after the stop ratio"})
    max_steps: int = field(default=20000, metadata={"help": "give up pruning after this many steps (the run still saves)"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    mask_constant: float = field(default=2e-2, metadata={"help": "initial (and live) mask value c"})
    target_modules: str | list[str] = field(default="all-linear", metadata={"help": "linear layers to parametrize (peft convention)"})
    exclude_modules: str | list[str] | None = field(default=None, metadata={"help": "linear layers to leave dense"})
    checkpoint_every: int = field(default=100, metadata={"help": "optimizer steps between checkpoints (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed for data order, LoRA init and dropout"})
    basis: str = field(default="whitened", metadata={"help": "singular basis the masks act on: whitened (SVD of W·L, L Lᵀ the Gram matrix of the layer's calibration inputs; benchmarks/basis.py: 0.15-0.72x the perplexity) or weight (SVD of W, the paper's)", "choices": BASES})
    calibration_data: str | None = field(default=None, metadata={"help": "text whose activations whiten the basis (basis whitened); default: the training data"})
    calibration_blocks: int = field(default=32, metadata={"help": "sequences of calibration text (basis whitened)"})
    calibration_block_size: int = field(default=256, metadata={"help": "tokens per calibration sequence (basis whitened)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder block's activations in the backward pass: less memory, about a third more compute"})
    device_map: str | None = field(default=None, metadata={"help": "spread the base model over every visible GPU (one process; for models larger than one GPU)", "choices": DEVICE_MAPS})

    def validate(self) -> None:
        """Clear errors for settings the run cannot use."""
        check_device_map(self.device_map)
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        if not 0 < self.stop_ratio < 1:
            raise ValueError(f"stop_ratio must be in (0, 1), got {self.stop_ratio}")
        for name in ("block_size", "batch_size", "grad_accum", "lambda_every", "max_steps", "lora_r",
                     "calibration_blocks", "calibration_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "lambda_init", "mask_constant"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.lambda_growth < 1:
            raise ValueError(f"lambda_growth must be >= 1, got {self.lambda_growth}")
        if self.post_tune_steps < 0 or self.checkpoint_every < 0:
            raise ValueError("post_tune_steps and checkpoint_every must be >= 0")

    def lam(self, step: int) -> float:
        """λ at optimizer step ``step`` (0-based)."""
        return self.lambda_init * self.lambda_growth ** (step // self.lambda_every)


PRESETS = {
    # The published settings (C4 with a network; batch 4 x 1024 tokens).
    "paper": ACIPRunConfig(),
    # For 2 CPU cores: short sequences, a 10x larger learning rate so that masks can die after ~40 steps (≈ c / lr),
    # and a λ that grows every step, so that SmolLM2 reaches the stop ratio in about 90 steps. Tried on SmolLM2:
    # λ 1e-3 ×1.05 with 25 post-tune steps gave held-out perplexity 77 / 323 / 842 at 0.8 / 0.6 / 0.4; this gives
    # 64 / 290 / 450 in about the same time.
    "quick": ACIPRunConfig(
        block_size=128,
        batch_size=4,
        lr=5e-4,
        lambda_init=5e-3,
        lambda_growth=1.035,
        lambda_every=1,
        post_tune_steps=60,
        max_steps=1000,
        checkpoint_every=25,
    ),
}


def preset(name: str, **overrides) -> ACIPRunConfig:
    """A preset with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------------------------------


def load_base_model(name: str, dtype: torch.dtype, device_map: str | None = None):
    """The base causal LM and its tokenizer: the embedded SmolLM2, or a local folder / Hub name.

    Weights are loaded straight into their final place (transformers builds the model on the meta device first, so
    no random initialisation and no second copy); ``device_map`` (e.g. "auto") spreads the layers over the visible
    GPUs, each layer is later factorized on its own device. Offloading to disk is refused: ACIP needs every weight.
    """
    if name == DEFAULT_MODEL:
        model, tokenizer = load_default_model(dtype, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, device_map=device_map).eval()
        tokenizer = AutoTokenizer.from_pretrained(name)
    placed = set((getattr(model, "hf_device_map", None) or {}).values())
    if placed & {"disk", "meta"}:
        raise ValueError(
            f"{name} does not fit the GPUs and CPU memory here (device_map={device_map!r} put layers on disk); "
            "ACIP needs every weight in memory: use more or larger GPUs"
        )
    return model, tokenizer


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """Switch recomputing activations block by block in the backward pass (non-reentrant) on or off."""
    # transformers 5.x renamed gradient to activation checkpointing; the old names warn, and earlier 5.x lack the new
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
        disable()


def _update_scores(scores: torch.Tensor, alive: torch.Tensor, mask: torch.Tensor) -> None:
    """One step of the score rule, in place on a layer's full-size float32 scores.

    Live mask: score = mask. Dying now (score was positive, mask <= 0): score = f - 1, where f in (0, 1] is where
    between the last two steps the mask crossed zero (f = 1: it landed exactly on 0, the paper's "becomes 0").
    Dead before: score - 1. Ranks no longer computed are dead before.
    """
    before = scores[alive]
    mask = mask.detach().float().to(scores.device)
    dying = (before > 0) & (mask <= 0)
    crossed = before / (before - mask).clamp_min(torch.finfo(torch.float32).tiny)  # (0, 1] where dying
    updated = torch.where(mask > 0, mask, torch.where(dying, crossed - 1, before - 1))
    scores -= 1  # every rank not computed any more died before
    scores[alive] = updated


class ACIPTrainer:
    """One ACIP run, with checkpoints. Use :func:`run_acip` unless you need the pieces."""

    def __init__(self, config: ACIPRunConfig, output_dir: str | os.PathLike, base_model=None, tokenizer=None):
        config.validate()
        self.config = config
        self.output_dir = Path(output_dir)
        self.processes = DataParallel()
        if config.device_map is not None and self.processes.world_size > 1:
            raise ValueError(
                "device_map spreads one model over every GPU, so it needs a single process; "
                f"this run has {self.processes.world_size} (accelerate launch --num_processes)"
            )
        self.device = base_model.device if base_model is not None else self.processes.device
        # bf16 compute on CUDA; float32 on the CPU, where bf16 matmuls are slow without AVX512-BF16.
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else nullcontext()
        )
        torch.manual_seed(config.seed)  # the same on every process: LoRA starts identical everywhere
        if base_model is None:
            base_model, tokenizer = load_base_model(config.base_model, self.dtype, config.device_map)
            if config.device_map is None:
                base_model.to(self.device)
            self.device = base_model.get_input_embeddings().weight.device  # where the input ids go
        self.tokenizer = tokenizer
        # One global batch of batch_size × processes sequences per micro-batch; each process reads its own rows.
        self.batches = TrainBatches(
            config.data, tokenizer, config.block_size, config.batch_size * self.processes.world_size, seed=config.seed
        )

        from peft import LoraConfig, get_peft_model

        calibration = None
        if config.basis == "whitened":  # random blocks, drawn as the training batches are (same on every process)
            source = config.calibration_data or config.data
            draw = TrainBatches(source, tokenizer, config.calibration_block_size, config.calibration_blocks, config.seed)
            calibration = next(draw.batches())  # (N, T)
        self.model = parametrize(
            base_model, config.basis, calibration, config.target_modules, config.exclude_modules, config.mask_constant
        )
        self.model.requires_grad_(False)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.model, True)
        self.layers = self.model.acip_layers()
        self.fingerprint = self._factor_fingerprint()
        if not self.processes.same_everywhere(self.fingerprint):
            # Another GPU's SVD may differ in the last bits (or in the sign of a singular vector): every process
            # must train the same factors, so they take the main process's.
            self.processes.copy_from_main([t for layer in self.layers.values() for t in layer.parameters()])
            self.fingerprint = self._factor_fingerprint()
        factors = [f"model.{name}.{part}" for name in self.layers for part in ("sv", "u")]
        lora = LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, target_modules=factors
        )
        self.peft_model = get_peft_model(self.model, lora)
        for layer in self.layers.values():
            layer.mask.requires_grad_(True)
        self.masks = [layer.mask for layer in self.layers.values()]
        self.lora_params = {n: p for n, p in self.peft_model.named_parameters() if "lora_" in n}
        self.optimizer = torch.optim.AdamW(
            [{"params": self.masks}, {"params": list(self.lora_params.values())}], lr=config.lr, weight_decay=0.0
        )
        self.compactor = RankCompactor(self.layers, self.optimizer)
        self.scores = {name: layer.score.detach().float().cpu().clone() for name, layer in self.layers.items()}
        self.step = 0  # optimizer steps taken while pruning
        self.post_step = 0  # LoRA-only steps taken after the stop ratio
        self.pruning = True
        self.elapsed = 0.0

    # -----------------------------------------------------------------------------------------------------------------

    def _factor_fingerprint(self) -> list[float]:
        """A checksum per layer of the SVD factors: a resumed run, and every process, must start from the same."""
        return [float(layer.sv.weight.double().sum()) for layer in self.layers.values()]

    def size_ratio(self) -> float:
        """Size ratio of the parametrized layers at the current masks."""
        return self.model.get_size_ratio()

    def _micro_batches(self):
        """The data stream, positioned after everything consumed so far."""
        consumed = (self.step + self.post_step) * self.config.grad_accum
        return self.batches.batches(start=consumed)

    def _train_step(self, data, lam: float | None) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; L1 term only while pruning (``lam`` not None)."""
        start = time.perf_counter()
        self.peft_model.train()
        task_loss, tokens = accumulate_gradients(
            self.peft_model, data, self.config.grad_accum, self.processes, self.device, self.autocast
        )
        l1 = sum(torch.relu(m).sum() for m in self.masks)  # float32, as the masks are
        if lam is not None:
            (lam * l1).backward()  # the same on every process, so averaging leaves it as it is
        self.processes.average_gradients(self.masks + list(self.lora_params.values()))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        return {"loss": self.processes.mean(task_loss), "l1": l1.item(), "tokens_per_s": tokens / seconds,
                "seconds": seconds}  # fmt: skip

    def _log(self, record: dict) -> None:
        if self.processes.is_main:
            with open(self.output_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")

    def run(self) -> ACIPModel:
        """Prune until the stop ratio, post-tune, save; returns the saved model. Continues from the current step."""
        config = self.config
        data = self._micro_batches()
        ratio = self.size_ratio()
        quiet = not self.processes.is_main
        bar = tqdm(desc="ACIP pruning", unit="step", initial=self.step, disable=quiet or not self.pruning)
        while self.pruning and ratio > config.stop_ratio and self.step < config.max_steps:
            lam = config.lam(self.step)
            stats = self._train_step(data, lam)
            for name, layer in self.layers.items():
                _update_scores(self.scores[name], self.compactor.alive[name], layer.mask)
            self.step += 1
            ratio = self.size_ratio()
            computed = self.compactor.computed_fraction()
            self.compactor.compact_dead()
            self._log({"step": self.step, "phase": "prune", "lambda": lam, "size_ratio": ratio,
                       "computed_ranks": computed, **stats})
            bar.update(1)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", lam=f"{lam:.2e}", ratio=f"{ratio:.3f}",
                            tok_s=f"{stats['tokens_per_s']:.0f}")
            self._maybe_checkpoint()
        bar.close()
        if not self.processes.same_everywhere(self.score_digest()):
            raise RuntimeError("the processes of this run hold different score maps (their gradients diverged)")
        if self.pruning:
            self.pruning = False
            for mask in self.masks:  # frozen from here on; their optimizer group gets no gradients
                mask.requires_grad_(False)
            self.compactor.compact_dead(force=True)
        for _ in tqdm(range(self.post_step, config.post_tune_steps), desc="LoRA post-tuning", unit="step", disable=quiet):
            stats = self._train_step(data, None)
            self.post_step += 1
            self._log({"step": self.step + self.post_step, "phase": "post-tune", "size_ratio": ratio, **stats})
            self._maybe_checkpoint()
        return self.save()

    # -----------------------------------------------------------------------------------------------------------------
    # Result and checkpoints
    # -----------------------------------------------------------------------------------------------------------------

    def score_digest(self) -> str:
        """A hash of the score map, to check that every process holds the same one."""
        scores = torch.cat([self.scores[name] for name in self.layers])
        return hashlib.sha256(scores.numpy().tobytes()).hexdigest()

    @torch.no_grad()
    def save(self) -> ACIPModel:
        """Restore full rank, merge LoRA into the factors, write the score map, save model + tokenizer (main
        process); every process returns the model."""
        self.compactor.restore()
        if self.config.gradient_checkpointing:
            set_gradient_checkpointing(self.model, False)
        model = self.peft_model.merge_and_unload()
        for name, layer in model.acip_layers().items():
            layer.score.copy_(self.scores[name])
            layer.set_kept(torch.ones_like(layer.kept))  # saved unpruned: users choose the size
        model.requires_grad_(False)
        if self.processes.is_main:
            model.save_pretrained(self.output_dir)
            self.tokenizer.save_pretrained(self.output_dir)
            record = json.loads((self.output_dir / RUN_FILE).read_text())
            record.update(finished=True, pruning_steps=self.step, post_tune_steps=self.post_step,
                          train_seconds=round(self.elapsed, 1))
            write_json(self.output_dir / RUN_FILE, record)
            remove_checkpoints(self.output_dir)
        self.processes.wait()
        return model

    def _unsliced_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA weights without a rank dimension (the others are checkpointed at full rank, per layer)."""
        sliced = {id(tensor) for layer in self.layers.values() for _, tensor, _ in rank_slots(layer)}
        return {name: p for name, p in self.lora_params.items() if id(p) not in sliced}

    def _maybe_checkpoint(self) -> None:
        every = self.config.checkpoint_every
        if every and (self.step + self.post_step) % every == 0:
            self.checkpoint()

    @torch.no_grad()
    def checkpoint(self) -> Path | None:
        """Write everything a resumed run needs, atomically (acip.checkpoints); the main process writes, the others
        hold the same state and return None."""
        if not self.processes.is_main:
            return None
        tensors = rng_tensors()
        for layer_name in self.layers:
            for key, value in self.compactor.full(layer_name).items():
                tensors[f"layer.{layer_name}.{key}"] = value
            tensors[f"alive.{layer_name}"] = self.compactor.alive[layer_name]
            tensors[f"score.{layer_name}"] = self.scores[layer_name]
        for param_name, param in self._unsliced_lora().items():
            tensors[f"lora.{param_name}"] = param
        optim, param_groups = optimizer_tensors(self.optimizer)
        meta = {"step": self.step, "post_step": self.post_step, "pruning": self.pruning, "elapsed": self.elapsed,
                "param_groups": param_groups, "fingerprint": self.fingerprint}  # fmt: skip
        return save_checkpoint(self.output_dir, self.step + self.post_step, {**tensors, **optim}, meta)

    @torch.no_grad()
    def load_checkpoint(self, folder: Path) -> None:
        """Bring a freshly built trainer to the state a checkpoint recorded."""
        tensors, meta = load_checkpoint(folder)
        if meta["fingerprint"] != self.fingerprint:
            raise RuntimeError(
                "cannot resume: the base model's SVD factors differ from the checkpointed run's "
                "(another base model, or another torch/hardware)"
            )
        for name, param in self._unsliced_lora().items():
            param.data.copy_(tensors[f"lora.{name}"])
        for name, layer in self.layers.items():
            for key, tensor, _ in rank_slots(layer):
                tensor.data = tensors[f"layer.{name}.{key}"].to(device=tensor.device, dtype=tensor.dtype)
            self.scores[name] = tensors[f"score.{name}"].clone()
            alive = tensors[f"alive.{name}"]
            keep = torch.zeros(self.compactor.full_rank[name], dtype=torch.bool)
            keep[alive] = True
            self.compactor.compact(name, keep)
        self.step, self.post_step, self.pruning = meta["step"], meta["post_step"], meta["pruning"]
        self.elapsed = meta["elapsed"]
        if not self.pruning:
            for mask in self.masks:
                mask.requires_grad_(False)
        load_optimizer(self.optimizer, tensors, meta["param_groups"], self.device)
        restore_rng(tensors)


def run_acip(
    config: ACIPRunConfig,
    output_dir: str | os.PathLike,
    *,
    resume: bool = False,
    overwrite: bool = False,
    base_model=None,
    tokenizer=None,
) -> ACIPModel:
    """Run ACIP end to end and return the saved full ACIP model (also written to ``output_dir``).

    ``resume`` continues a killed run from its last checkpoint (with the settings it was started with);
    ``overwrite`` replaces a previous run in ``output_dir``. A folder holding another run is refused otherwise.
    ``base_model``/``tokenizer`` replace loading ``config.base_model`` (for tests and notebooks).
    """
    processes = DataParallel()
    config, output_dir = prepare_run(config, output_dir, RUN_FILE, resume, overwrite, processes)
    trainer = ACIPTrainer(config, output_dir, base_model=base_model, tokenizer=tokenizer)
    if resume:
        trainer.load_checkpoint(latest_checkpoint(output_dir))
        if processes.is_main:
            truncate_log(output_dir / LOG_FILE, trainer.step + trainer.post_step)
    elif processes.is_main:
        write_json(output_dir / RUN_FILE, {"config": dataclasses.asdict(config), "processes": processes.world_size,
                              "global_batch": config.batch_size * processes.world_size * config.grad_accum,
                              "finished": False})  # fmt: skip
    return trainer.run()


def accumulate_gradients(model, data, grad_accum: int, processes: DataParallel, device, autocast) -> tuple[float, int]:
    """Forward and backward over ``grad_accum`` micro-batches, each this process's rows of the next global batch;
    returns this process's mean task loss and the tokens of the global batches."""
    loss_total, tokens = 0.0, 0
    for _ in range(grad_accum):
        ids = processes.shard(next(data)).to(device)  # (B, T): this process's rows
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        (loss / grad_accum).backward()
        loss_total += loss.item() / grad_accum
        tokens += ids.numel() * processes.world_size
    return loss_total, tokens


def prepare_run(config, output_dir, run_file: str, resume: bool, overwrite: bool, processes: DataParallel):
    """The settings and folder of a run about to start: a resumed run keeps the settings (and the number of
    processes) recorded in ``run_file``; the main process prepares the folder while the others wait for it."""
    record_path = Path(output_dir) / run_file
    if resume and record_path.exists():
        record = json.loads(record_path.read_text())
        config = type(config)(**record["config"])
        check_same_processes(record, processes.world_size)
    config.validate()
    if processes.is_main:
        prepare_output_dir(output_dir, resume, overwrite)
    processes.wait()
    return config, Path(output_dir)


def check_same_processes(record: dict, world_size: int) -> None:
    """A resumed run must split its global batches as the run it continues did."""
    started = record.get("processes", 1)
    if started != world_size:
        raise ValueError(
            f"this run was started with {started} process(es) and is resumed with {world_size}: each step's global "
            f"batch would change; resume with accelerate launch --num_processes {started}"
        )

