"""The ACIP run: train the singular-value masks and LoRA adapters in one gradient descent, turn the order in which
masks die into a score map, and save a full ACIP model that can then be pruned to any size.

The algorithm (arXiv 2502.01717), with its published settings as the ``paper`` preset:

1. every target linear layer becomes ``U · diag(mask) · S Vᵀ`` (acip.build; modeling_acip / parametrization);
2. LoRA adapters (peft; r 32, alpha 16, dropout 0.05) on the factor layers of the parametrized layers;
3. the objective (acip.objective): cross entropy + λ · Σ ||relu(mask)||₁ with a growing λ; AdamW (lr 5e-5, no
   weight decay) on masks and LoRA weights only; the score map follows the masks step by step;
4. once the size ratio reaches the stop ratio (0.4), the masks freeze and the LoRA adapters alone are post-tuned
   (1000 steps); finally LoRA is merged into the factors and the full model is saved with its score map.

:class:`ACIPTask` is that run as a task of the shared training loop (acip.loop: devices, data, accumulation,
processes, checkpoints, logs, saving). Beyond the original: dead ranks are sliced out while training
(acip.compaction), so steps get cheaper as the masks die.
"""

import copy
import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .base_model import DEVICE_MAPS, check_device_map, load_base_model
from .build import parametrize
from .compaction import PrefixSlicer, RankCompactor, _base, best_first, rank_slots
from .data import TrainBatches
from .default_model import DEFAULT_MODEL
from .hub.configuration_acip import BASES
from .hub.modeling_acip import ACIPModel, pruning_plan
from .hub.parametrization import FactorCorrection
from .hub.pruning import RANK_COSTS, check_rank_cost, rank_cost
from .inputs import check_data_source, check_model_source, check_positions
from .loop import Task, TrainingConfig, option, set_gradient_checkpointing, train
from .objective import ACIPObjective, teacher_logits
from .records import RUN_FILE, RUN_LOG


LAMBDA_SCHEDULES = ("exponential", "paced")
POST_TUNE_LR_SCHEDULES = ("constant", "cosine")


@dataclass
class ACIPRunConfig(TrainingConfig):
    """Everything an ACIP run depends on; saved next to the result, so a run can be resumed and reproduced."""

    base_model: str = option(DEFAULT_MODEL, "base causal LM: 'smollm2' (embedded) or a path/Hub name")
    lambda_init: float = option(1e-3, "initial weight λ of the L1 penalty on relu(mask)")
    lambda_growth: float = option(1.01, "λ is multiplied by this factor ...")
    lambda_every: int = option(4, "... every this many steps")
    lambda_schedule: str = option("exponential", "exponential: λ grows every lambda_every steps (the paper's); "
                                                 "paced: it grows only while the size ratio is above a line from 1 "
                                                 "to stop_ratio over pruning_steps steps, so that the model shrinks "
                                                 "at an even pace",
                                  choices=LAMBDA_SCHEDULES)
    pruning_steps: int = option(0, "paced λ schedule: the steps in which the size ratio should reach stop_ratio")
    stop_ratio: float = option(0.4, "stop pruning once the size ratio of the parametrized layers reaches this, in "
                                    "(0, 1)")
    post_tune_steps: int = option(1000, "LoRA-only steps with frozen masks after the stop ratio")
    post_tune_sizes: str = option("stop", "sizes LoRA is post-tuned at: stop (the stop ratio, the paper's), any "
                                          "(each step prunes to a ratio drawn uniformly from [stop ratio, 1], so the "
                                          "adapters serve every size) or LOW:HIGH (drawn from [LOW, HIGH])")
    post_tune_lr_schedule: str = option("constant", "learning rate of the post-tune steps: constant (lr, the "
                                                    "paper's) or cosine (from lr down to 0 over the post-tune steps)",
                                        choices=POST_TUNE_LR_SCHEDULES)
    post_tune_stop_share: float = option(0.0, "with post_tune_sizes any or LOW:HIGH: the share of post-tune steps "
                                              "taken at the stop ratio, the rest at drawn sizes (the smallest size "
                                              "gains most from tuning)")
    correction_ramp: float = option(0.25, "> 0: a layer applies its LoRA with strength min(1, f / correction_ramp), "
                                          "f the share of its ranks pruned, so a layer kept whole is the base "
                                          "model's layer and the full-size model the base model; 0: LoRA is merged "
                                          "into the factors and serves every size at full strength (the paper's)")
    post_tune_factors_lr: float = option(0.0, "> 0: post-tuning also trains the factors of the ranks each step's "
                                              "size keeps, at this learning rate (nested consolidation); 0: LoRA "
                                              "only")
    max_steps: int = option(20000, "give up pruning after this many steps (the run still saves)")
    mask_constant: float = option(2e-2, "initial (and live) mask value c")
    target_modules: str | list[str] = option("all-linear", "linear layers to parametrize (peft convention)")
    exclude_modules: str | list[str] | None = option(None, "linear layers to leave dense")
    basis: str = option("whitened", "singular basis the masks act on: whitened (SVD of W·L, L Lᵀ the Gram matrix of "
                                    "the layer's calibration inputs; benchmarks/basis.py: 0.15-0.72x the perplexity) "
                                    "or weight (SVD of W, the paper's)",
                        choices=BASES)
    calibration_data: str | None = option(None, "text whose activations whiten the basis (basis whitened); default: "
                                                "the training data")
    calibration_blocks: int = option(32, "sequences of calibration text (basis whitened)")
    calibration_block_size: int = option(256, "tokens per calibration sequence (basis whitened)")
    rank_cost: str = option("aligned", "what a layer of rank r costs, and so what a size ratio means: aligned r·(in "
                                       "+ out − r), stored gauge-aligned, or factors r·(in + out), the original "
                                       "implementation's",
                            choices=RANK_COSTS)
    device_map: str | None = option(None, "spread the base model over every visible GPU (one process; for models "
                                          "larger than one GPU)",
                                    choices=DEVICE_MAPS)

    def validate(self) -> None:
        """Clear errors for settings the run cannot use."""
        super().validate()
        check_device_map(self.device_map)
        if self.basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {self.basis!r}")
        check_rank_cost(self.rank_cost)
        if not 0 < self.stop_ratio < 1:
            raise ValueError(f"stop_ratio must be in (0, 1), got {self.stop_ratio!r}")
        for name in ("lambda_every", "max_steps", "calibration_blocks", "calibration_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("lambda_init", "mask_constant"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise ValueError(f"lambda_schedule must be one of {LAMBDA_SCHEDULES}, got {self.lambda_schedule!r}")
        if self.lambda_schedule == "paced" and not self.pruning_steps >= 1:
            raise ValueError(f"pruning_steps must be >= 1 with lambda_schedule='paced', got {self.pruning_steps!r}")
        if not self.lambda_growth >= 1:
            raise ValueError(f"lambda_growth must be >= 1, got {self.lambda_growth!r}")
        if not self.post_tune_steps >= 0:
            raise ValueError(f"post_tune_steps must be >= 0, got {self.post_tune_steps!r}")
        if self.post_tune_lr_schedule not in POST_TUNE_LR_SCHEDULES:
            raise ValueError(f"post_tune_lr_schedule must be one of {POST_TUNE_LR_SCHEDULES}, got "
                             f"{self.post_tune_lr_schedule!r}")  # fmt: skip
        if not self.correction_ramp >= 0:
            raise ValueError(f"correction_ramp must be >= 0, got {self.correction_ramp!r}")
        if not self.post_tune_factors_lr >= 0:
            raise ValueError(f"post_tune_factors_lr must be >= 0, got {self.post_tune_factors_lr!r}")
        if not 0 <= self.post_tune_stop_share <= 1:
            raise ValueError(f"post_tune_stop_share must be in [0, 1], got {self.post_tune_stop_share!r}")
        self.post_tune_range()

    def post_tune_range(self) -> tuple[float, float] | None:
        """The range of size ratios post-tuning draws from, or None to post-tune at the stop ratio only."""
        if self.post_tune_sizes == "stop":
            return None
        if self.post_tune_sizes == "any":
            return self.stop_ratio, 1.0
        low, _, high = str(self.post_tune_sizes).partition(":")
        try:
            low, high = float(low), float(high)
        except ValueError:
            low = high = float("nan")
        if not 0 < low <= high <= 1:
            raise ValueError(f"post_tune_sizes must be 'stop', 'any' or LOW:HIGH with 0 < LOW <= HIGH <= 1, got "
                             f"{self.post_tune_sizes!r}")  # fmt: skip
        return low, high


PRESETS = {
    # The published settings (C4 with a network; batch 4 x 1024 tokens).
    "paper": ACIPRunConfig(),
    # For 2 CPU cores: short sequences, a 10x larger learning rate so that masks can die after ~40 steps (≈ c / lr),
    # and a λ that grows every step, so that SmolLM2 reaches the stop ratio in about 60 steps. Beyond the paper (each
    # chosen by held-out perplexity of SmolLM2 runs, docs/quality.md): distillation from the dense model, weighted 0.9;
    # LoRA post-tuned at a size drawn anew on half of the steps, so that every size is served, and at the stop size on
    # the others; a LoRA scale alpha/r of 8, not 0.5: ~100k tokens leave the adapters under-trained (a larger scale
    # did better below 0.8 at each step up from 0.5, a decaying post-tune learning rate did worse); no LoRA dropout
    # (a fifth of a bf16 step on the CPU); the time bf16 saves spent on post-tuning (140 steps; a slower λ did worse);
    # one sequence of 512 tokens a step rather than four of 128 (the same tokens; 3-5% lower perplexity at every size
    # on 512-token windows, docs/quality.md).
    "quick": ACIPRunConfig(
        block_size=512,
        batch_size=1,
        lr=5e-4,
        lambda_init=5e-3,
        lambda_growth=1.035,
        lambda_every=1,
        post_tune_steps=140,
        post_tune_sizes="any",
        post_tune_stop_share=0.5,
        distill_alpha=0.9,
        lora_alpha=256,
        lora_dropout=0.0,
        max_steps=1000,
        checkpoint_every=25,
    ),
}


def preset(name: str, **overrides) -> ACIPRunConfig:
    """A preset with some fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


class ACIPTask(Task):
    """The ACIP run as a task of the training loop: masks and LoRA train against :class:`ACIPObjective` until the
    stop ratio, then LoRA alone; the result is the merged, unpruned ACIP model with its score map."""

    record_file, log_file = RUN_FILE, RUN_LOG
    # Pruning and post-tune steps compute each layer's ranks rounded up to this multiple (the extra ones dead or
    # masked): with exact ranks almost every step has new shapes, which bf16 on the CPU (oneDNN) compiles anew each
    # time (docs/quality.md, "Against the targets of issue 16", "Same compute", measures what that cost and what the
    # multiple saves).
    shape_multiple = 64

    def __init__(self, config: ACIPRunConfig, runtime, base_model=None, tokenizer=None):
        processes = runtime.processes
        if config.device_map is not None and processes.world_size > 1:
            raise ValueError(
                "device_map spreads one model over every GPU, so it needs a single process; "
                f"this run has {processes.world_size} (accelerate launch --num_processes)"
            )
        self.config, self.objective = config, ACIPObjective(config)
        torch.manual_seed(config.seed)  # the same on every process: LoRA starts identical everywhere
        if base_model is None:
            base_model, tokenizer = load_base_model(config.base_model, runtime.dtype, config.device_map)
            if config.device_map is None:
                base_model.to(runtime.device)
        runtime.device = base_model.get_input_embeddings().weight.device  # where the input ids go
        self.tokenizer = tokenizer
        self.teacher = frozen_teacher(base_model, runtime) if config.distill_alpha > 0 else None
        self.acip_model = parametrize(
            base_model, config.basis, self._calibration(), config.target_modules, config.exclude_modules,
            config.mask_constant, rank_cost=config.rank_cost,
        )  # fmt: skip
        self.acip_model.requires_grad_(False)
        if config.gradient_checkpointing:
            set_gradient_checkpointing(self.acip_model, True)
        self.layers = self.acip_model.acip_layers()
        self.fingerprint = self._same_factors_everywhere(processes)
        self.model = self._with_lora()
        self.masks = [layer.mask.requires_grad_(True) for layer in self.layers.values()]
        self.lora = {name: p for name, p in self.model.named_parameters() if "lora_" in name}
        self.lora_scale = config.lora_alpha / config.lora_r
        self.processes, self.pruning = processes, True
        self.summary = {"pruning_steps": 0, "post_tune_steps": 0}

    def _calibration(self) -> torch.Tensor | None:
        """Token ids (N, T) whose activations whiten the basis: random blocks, drawn as training batches are."""
        c = self.config
        if c.basis != "whitened":
            return None
        draw = TrainBatches(c.calibration_data or c.data, self.tokenizer, c.calibration_block_size,
                            c.calibration_blocks, c.seed)  # fmt: skip
        return next(draw.batches())

    def _same_factors_everywhere(self, processes) -> list[float]:
        """A checksum per layer of the SVD factors, the same on every process (a resumed run checks it)."""
        fingerprint = [float(layer.sv.weight.double().sum()) for layer in self.layers.values()]
        if not processes.same_everywhere(fingerprint):
            # Another GPU's SVD may differ in the last bits (or in the sign of a singular vector): every process
            # must train the same factors, so they take the main process's.
            processes.copy_from_main([t for layer in self.layers.values() for t in layer.parameters()])
            fingerprint = [float(layer.sv.weight.double().sum()) for layer in self.layers.values()]
        return fingerprint

    def _with_lora(self):
        """The ACIP model with LoRA adapters on both factor layers of every parametrized layer."""
        from peft import LoraConfig, get_peft_model

        c = self.config
        factors = [f"model.{name}.{part}" for name in self.layers for part in ("sv", "u")]
        lora = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=factors)
        return get_peft_model(self.acip_model, lora)

    def param_groups(self) -> list[dict]:
        """Masks and LoRA weights, in two groups; with post_tune_factors_lr the factors in a third (they get gradients
        in post-tuning only)."""
        groups = [{"params": self.masks}, {"params": list(self.lora.values())}]
        if self.config.post_tune_factors_lr > 0:
            groups.append({"params": self._factors(), "lr_scale": self.config.post_tune_factors_lr / self.config.lr})
        return groups

    def _factors(self) -> list[torch.Tensor]:
        """The two factor weights of every SVD layer (inside their LoRA wrappers)."""
        return [_base(part).weight for layer in self.layers.values() for part in (layer.sv, layer.u)]

    def _set_strength(self, kept: dict[str, int]) -> None:
        """LoRA strength of each layer for this step from the share of its ranks pruned (correction_ramp)."""
        ramp = self.config.correction_ramp
        if ramp <= 0:
            return
        for name, layer in self.layers.items():
            pruned = 1 - kept[name] / self.compactor.full_rank[name]
            strength = min(1.0, pruned / ramp)
            for part in (layer.sv, layer.u):
                part.scaling["default"] = self.lora_scale * strength

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        """Dead ranks are sliced out of the layers and of the optimizer state as they die; post-tune steps at drawn
        sizes compute only the ranks of their size."""
        self.compactor = RankCompactor(self.layers, optimizer, multiple=self.shape_multiple)
        self.slicer = PrefixSlicer(self.layers, optimizer, multiple=self.shape_multiple)

    def before_step(self, step: int) -> None:
        """Post-tuning at any size: prune to this step's ratio (the stop ratio for a share of the steps, else drawn
        from the configured range; seeded by the step, so a resumed run draws the same). The ranks are ordered best
        first (see _freeze_masks), so the plan keeps a prefix of each layer, and the step computes only that."""
        c, sizes = self.config, self.config.post_tune_range()
        if not self.pruning and sizes is not None:
            rng = np.random.default_rng([c.seed, step])
            ratio = c.stop_ratio if rng.uniform() < c.post_tune_stop_share else rng.uniform(*sizes)
            plan = pruning_plan(self.acip_model, compression_ratio=float(ratio))  # by the scores, not by position
            kept = {name: int(keep.sum()) for name, keep in zip(self.layers, plan)}
            self.slicer.narrow(kept)
        else:
            kept = {name: int(layer.kept.sum()) for name, layer in self.layers.items()}
        self._set_strength(kept)

    def lr(self, step: int) -> float:
        """``lr`` while pruning; in post-tuning constant or decaying to 0 by a cosine (post_tune_lr_schedule)."""
        c = self.config
        if self.pruning or c.post_tune_lr_schedule == "constant":
            return c.lr
        progress = self.summary["post_tune_steps"] / max(1, c.post_tune_steps)  # 0 on the first post-tune step
        return c.lr * 0.5 * (1 + math.cos(math.pi * progress))

    def loss(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        """The objective on one micro-batch: with the L1 term while pruning, distilled when there is a teacher."""
        targets = teacher_logits(self.teacher, ids)  # (B, T, V) or None
        logits = self.model(input_ids=ids).logits  # (B, T, V)
        lam = self.objective.lam() if self.pruning else None
        return self.objective.loss(logits, ids, self.masks, lam, targets)

    def after_step(self, step: int) -> dict:
        """Scores follow the masks, dead ranks are sliced out, and pruning stops at the stop ratio."""
        ratio = self.acip_model.get_size_ratio()
        if not self.pruning:
            self.slicer.widen()
            self.summary["post_tune_steps"] += 1
            return {"phase": "post-tune", "size_ratio": ratio}
        for name, layer in self.layers.items():
            self.objective.update_scores(layer.score, self.compactor.alive[name], layer.mask)
        self.summary["pruning_steps"] = step
        computed = self.compactor.computed_fraction()
        self.compactor.compact_dead()
        lam = self.objective.lam()  # the λ of the step just taken
        self.objective.advance(step, self._projected_ratio())
        if self.objective.stop(ratio, step):
            self._freeze_masks()
        return {"phase": "prune", "lambda": lam, "size_ratio": ratio, "computed_ranks": computed}

    def _projected_ratio(self) -> float:
        """The size ratio once every mask that has lost half its value is gone: masks fall about lr per step, so this
        leads the size ratio by c / (2 lr) steps (what a paced λ schedule steers by)."""
        c = self.config.mask_constant
        total = fixed = 0
        for layer in self.layers.values():
            kept = int((layer.mask.detach() > c / 2).sum())
            total += layer.in_features * layer.out_features
            fixed += rank_cost(kept, layer.in_features, layer.out_features, self.acip_model.config.rank_cost)
        return fixed / total

    def _freeze_masks(self) -> None:
        """End pruning: the masks stop training (their optimizer group gets no gradients) and every dead rank goes."""
        if not self.processes.same_everywhere(self.score_digest()):
            raise RuntimeError("the processes of this run hold different score maps (their gradients diverged)")
        self.pruning = False
        for mask in self.masks:
            mask.requires_grad_(False)
        if self.config.post_tune_factors_lr > 0:
            for factor in self._factors():
                factor.requires_grad_(True)
        if self.config.post_tune_range() is None:
            self.compactor.compact_dead(force=True)
        else:  # every size is post-tuned: every rank must be computable again, best first
            self.compactor.restore(keep_optimizer_state=True)
            for name, layer in self.layers.items():
                layer.set_kept(torch.ones_like(layer.kept))  # a step's size is the prefix it computes
                self.compactor.reorder(name, best_first(layer.score))

    def phase(self, step: int) -> tuple[str, int, int | None]:
        """Pruning (open-ended), then LoRA post-tuning."""
        if self.pruning:
            return "ACIP pruning", self.summary["pruning_steps"], None
        return "LoRA post-tuning", self.summary["post_tune_steps"], self.config.post_tune_steps

    def done(self, step: int) -> bool:
        """Over once the post-tune steps after the stop ratio are taken."""
        return not self.pruning and self.summary["post_tune_steps"] >= self.config.post_tune_steps

    def score_digest(self) -> str:
        """A hash of the score map, to check that every process holds the same one."""
        scores = torch.cat([layer.score.detach().cpu() for layer in self.layers.values()])
        return hashlib.sha256(scores.numpy().tobytes()).hexdigest()

    def _unsliced_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA weights without a rank dimension (the others are checkpointed at full rank, per layer)."""
        sliced = {id(tensor) for layer in self.layers.values() for _, tensor, _ in rank_slots(layer)}
        return {name: p for name, p in self.lora.items() if id(p) not in sliced}

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Full-rank layer tensors (computed and sliced-out parts), which ranks are computed, scores, LoRA."""
        tensors = {}
        for name, layer in self.layers.items():
            for key, value in self.compactor.full(name).items():
                tensors[f"layer.{name}.{key}"] = value
            tensors[f"alive.{name}"] = self.compactor.alive[name]
            tensors[f"score.{name}"] = layer.score
        tensors.update({f"lora.{name}": p for name, p in self._unsliced_lora().items()})
        return tensors, {"pruning": self.pruning, "fingerprint": self.fingerprint,
                         "lambda_growths": self.objective.growths}  # fmt: skip

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Bring a freshly built task to a checkpoint's state (before the optimizer state is loaded)."""
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
            layer.score.copy_(tensors[f"score.{name}"])
            alive = tensors[f"alive.{name}"]
            keep = torch.zeros(self.compactor.full_rank[name], dtype=torch.bool)
            keep[alive] = True
            self.compactor.compact(name, keep)
            order = torch.searchsorted(self.compactor.alive[name], alive)  # the checkpoint's order of the ranks
            if not torch.equal(order, torch.arange(order.numel())):
                self.compactor.reorder(name, order)
        self.pruning, self.objective.growths = meta["pruning"], meta["lambda_growths"]
        for mask in self.masks:
            mask.requires_grad_(self.pruning)
        for factor in self._factors() if self.config.post_tune_factors_lr > 0 else []:
            factor.requires_grad_(not self.pruning)

    @torch.no_grad()
    def save(self, folder: Path | None) -> ACIPModel:
        """Restore full rank and save the model unpruned (users choose the size): LoRA merged into the factors, or
        with correction_ramp kept apart as each layer's FactorCorrection (applied once the layer is pruned)."""
        self.compactor.restore()
        ramp = self.config.correction_ramp
        if ramp > 0:
            corrections = {name: self._correction(layer, ramp) for name, layer in self.layers.items()}
            model = self.model.unload()
            for name, layer in model.acip_layers().items():
                layer.correction = corrections[name]
            model.config.correction_rank, model.config.correction_ramp = self.config.lora_r, ramp
        else:
            model = self.model.merge_and_unload()
        for layer in model.acip_layers().values():
            layer.set_kept(torch.ones_like(layer.kept))
        model.requires_grad_(False)
        if folder is not None:
            model.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        return model


    def _correction(self, layer, ramp: float) -> FactorCorrection:
        """A layer's LoRA adapters (on ``sv`` and on ``u``) as its FactorCorrection, the LoRA scale folded in."""
        sv_a, sv_b = layer.sv.lora_A["default"].weight, layer.sv.lora_B["default"].weight  # (r, in), (k, r)
        u_a, u_b = layer.u.lora_A["default"].weight, layer.u.lora_B["default"].weight  # (r, k), (out, r)
        correction = FactorCorrection(layer.in_features, layer.out_features, layer.rank, sv_a.shape[0], ramp,
                                      device="meta")  # fmt: skip
        dtype = layer.sv.weight.dtype
        correction.sv_a = nn.Parameter(sv_a.detach().to(dtype).clone(), requires_grad=False)
        correction.sv_b = nn.Parameter((self.lora_scale * sv_b.detach()).to(dtype), requires_grad=False)
        correction.u_a = nn.Parameter(u_a.detach().to(dtype).clone(), requires_grad=False)
        correction.u_b = nn.Parameter((self.lora_scale * u_b.detach()).to(dtype), requires_grad=False)
        return correction


def frozen_teacher(base_model, runtime):
    """A frozen copy of the dense base model, in the dtype the run computes in, for distillation.

    The student's layers are factorized and their dead ranks sliced out while it trains, so it cannot stand in for
    the base model; a copy in bf16 (where the run computes in bf16) costs half the base model's memory.
    """
    return copy.deepcopy(base_model).to(runtime.compute_dtype).eval().requires_grad_(False)


def run_acip(config: ACIPRunConfig, output_dir, *, resume=False, overwrite=False, base_model=None, tokenizer=None):
    """Run ACIP end to end and return the saved full ACIP model (also written to ``output_dir``).

    ``resume`` continues a killed run from its last checkpoint; ``config`` must then hold the settings it was started
    with (a ValueError lists every field that differs). ``overwrite`` replaces a folder an earlier acip command
    wrote, once the new run is complete (docs/guarantees.md); any other non-empty folder is refused.
    ``base_model``/``tokenizer`` replace loading ``config.base_model`` (for tests and notebooks).
    """

    def build(config, runtime):
        """The task, its model loaded."""
        return ACIPTask(config, runtime, base_model, tokenizer)

    def inputs(config):
        """What the run reads, checked (nothing loaded)."""
        if base_model is None:
            check_model_source("base_model", config.base_model, builtin=(DEFAULT_MODEL,))
        check_data_source("data", config.data)
        if config.basis == "whitened" and config.calibration_data is not None:
            check_data_source("calibration_data", config.calibration_data)
        lengths = {"block_size": config.block_size, **({"calibration_block_size": config.calibration_block_size}
                                                       if config.basis == "whitened" else {})}  # fmt: skip
        check_positions("base_model", config.base_model if base_model is None else base_model, lengths)
        named = {"data": config.data, "calibration_data": config.calibration_data}
        return {**named, "base_model": config.base_model} if base_model is None else named

    return train(build, config, output_dir, RUN_FILE, resume=resume, overwrite=overwrite, inputs=inputs)
