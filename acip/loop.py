"""The one training loop of acip: the ACIP run (acip/training.py) and LoRA fine-tuning (acip/finetune.py) are tasks
that it drives.

A :class:`Task` says what trains: the model, the trainable tensors, the loss of one micro-batch, what happens after
each optimizer step, when the run ends and what it saves. The loop owns everything else, the same for every task:
device, dtype and autocast, the data stream, gradient accumulation, averaging gradients across processes
(acip.distributed), AdamW, the step log, atomic checkpoints and resume, the run record and the final save.

    task = MyTask(config, runtime)          # builds the model to train
    TrainingLoop(task, output_dir, runtime).run()
"""

import dataclasses
import json
import os
import shutil
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.profiler import record_function
from tqdm.auto import tqdm

from .data import TrainBatches
from .distributed import Processes
from .folders import Replacement, check_output_dir, remove_tree, replacing, tree_files, write_json
from .inputs import fingerprint
from .runs import (
    RunFolder, latest_checkpoint, load_checkpoint, load_optimizer, optimizer_tensors, remove_checkpoints, restore_rng,
    rng_tensors, save_checkpoint, truncate_log,
)  # fmt: skip


COMPUTE_DTYPES = ("auto", "float32", "bfloat16")


def option(default, help: str, choices=None):
    """A field of a run config with its help text (and its choices): the command line makes one option of each
    (acip.cli), and a run's record saves them all."""
    return field(default=default, metadata={"help": help, **({"choices": choices} if choices is not None else {})})


@dataclass
class TrainingConfig:
    """The settings every training run has; the ACIP run and fine-tuning add their own (and their own defaults)."""

    data: str = option("wiki-train", "training text: a built-in corpus, a file, or hf:NAME[:CONFIG[:SPLIT]]")
    block_size: int = option(1024, "tokens per training sequence")
    batch_size: int = option(4, "sequences per micro-batch (per process)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-5, "AdamW learning rate, no weight decay")
    max_grad_norm: float = option(0.0, "clip the gradient norm to this (0: no clipping)")
    lora_r: int = option(32, "LoRA rank")
    lora_alpha: int = option(16, "LoRA alpha")
    lora_dropout: float = option(0.05, "LoRA dropout")
    checkpoint_every: int = option(100, "optimizer steps between checkpoints (0: none)")
    seed: int = option(0, "seed for data order, LoRA init and dropout")
    gradient_checkpointing: bool = option(False, "recompute each decoder block's activations in the backward pass: "
                                                 "less memory, about a third more compute")
    distill_alpha: float = option(0.0, "weight α of distillation from the dense base model: loss = (1-α)·CE + "
                                       "α·T²·KL(teacher‖student) (0: off)")
    distill_temperature: float = option(1.0, "temperature T of the distillation term")
    compute_dtype: str = option("auto", "dtype of the matrix products: auto (bfloat16 on CUDA and on CPUs with "
                                        "native bf16 units, else float32), float32 or bfloat16",
                                choices=COMPUTE_DTYPES)

    def validate(self) -> None:
        """Clear errors for settings a run cannot use."""
        for name in ("block_size", "batch_size", "grad_accum", "lora_r"):
            _at_least(self, name, 1)
        for name in ("checkpoint_every", "max_grad_norm", "lora_dropout"):
            _at_least(self, name, 0)
        if not 0 <= self.distill_alpha <= 1:
            raise ValueError(f"distill_alpha must be in [0, 1], got {self.distill_alpha!r}")
        if not self.distill_temperature > 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        check_compute_dtype(self.compute_dtype)
        if not self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")


def _at_least(config, name: str, low: float) -> None:
    """A ValueError naming the field unless it is a number >= ``low``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def default(name: str, value):
    """The field ``name`` of TrainingConfig with another default: a task's config overrides a default, not the field."""
    base = next(f for f in dataclasses.fields(TrainingConfig) if f.name == name)
    return field(default=value, metadata=base.metadata)


def check_compute_dtype(compute_dtype: str) -> None:
    """A ValueError naming ``compute_dtype`` and its choices unless it is one of them."""
    if compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {compute_dtype!r}")


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX): then they run ~4x faster than fp32."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private torch probes; absent means no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


class Runtime:
    """Where and how a run computes: its processes, the device, the weights' dtype and the autocast context.

    On CUDA: bf16 weights and bf16 autocast. On the CPU: float32 weights (the saved model keeps full precision) and,
    with ``compute_dtype`` "auto" on a CPU with native bf16 matrix units or "bfloat16", bf16 autocast: the matrix
    products run in bf16, the loss, masks, scores and optimizer in float32. ``device`` is where input ids go (with a
    device map, the input embeddings' device).
    """

    def __init__(self, processes: Processes | None = None, compute_dtype: str = "auto"):
        check_compute_dtype(compute_dtype)
        self.processes = processes or Processes()
        self.device = self.processes.device
        cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16 if cuda else torch.float32
        bf16 = compute_dtype == "bfloat16" or (compute_dtype == "auto" and (cuda or cpu_has_fast_bf16()))
        self.compute_dtype = torch.bfloat16 if bf16 else torch.float32
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


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


class Task:
    """One kind of training run, as the loop sees it. Subclasses set the four attributes and implement
    ``param_groups``, ``loss``, ``done`` and ``save``; the other methods have defaults.

    Attributes: ``config`` (a TrainingConfig), ``model`` (the module that trains; ``loss`` calls it), ``tokenizer``,
    ``record_file`` and ``log_file`` (names in the output folder), and ``summary``: figures for the run record, kept
    across checkpoints.
    """

    record_file: str
    log_file: str
    summary: dict

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups (AdamW, lr from :meth:`lr`, no weight decay)."""
        raise NotImplementedError

    def prepare(self, optimizer: torch.optim.Optimizer) -> None:
        """Called once the optimizer exists (e.g. to slice its state along with the parameters)."""

    def begin(self) -> None:
        """Called when a run starts afresh (not on resume), before its record is first written."""

    def before_step(self, step: int) -> None:
        """Called before optimizer step ``step`` (0-based), e.g. to choose this step's model size."""

    def loss(self, ids: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch of token ids (B, T) at optimizer step ``step`` (0-based), and figures to log."""
        raise NotImplementedError

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        return self.config.lr

    def after_step(self, step: int) -> dict:
        """Bookkeeping after optimizer step ``step`` (1-based count of steps taken); returns figures to log."""
        return {}

    def phase(self, step: int) -> tuple[str, int, int | None]:
        """The progress bar after ``step`` optimizer steps: name, steps done in this phase, steps in it (None:
        open-ended)."""
        return "training", step, None

    def done(self, step: int) -> bool:
        """Whether the run is over after ``step`` optimizer steps."""
        raise NotImplementedError

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """What a checkpoint must hold besides the loop's own state: tensors and JSON-able values."""
        return {}, {}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Restore what :meth:`state` returned."""

    def save(self, folder: Path | None):
        """The trained result, written to ``folder`` (None on processes that do not write); returns it."""
        raise NotImplementedError


class TrainingLoop:
    """Trains a :class:`Task` to its end and saves the result, with checkpoints every ``config.checkpoint_every``."""

    # Set by train(): the run's folders and the output being replaced under its lock (None: a loop run by hand saves
    # straight into output_dir), the run's identity (kept across checkpoints: a finished result and its leftover work
    # folder are recognised by it) and the local inputs with their fingerprints (a resumed run must read the same).
    folder: RunFolder | None = None
    output: Replacement | None = None
    run_info: dict | None = None
    inputs: dict | None = None

    def __init__(self, task: Task, output_dir: str | os.PathLike, runtime: Runtime):
        self.task, self.output_dir, self.runtime = task, Path(output_dir), runtime
        config, world = task.config, runtime.processes.world_size
        # One global batch of batch_size × processes sequences per micro-batch; each process reads its own rows.
        self.batches = TrainBatches(
            config.data, task.tokenizer, config.block_size, config.batch_size * world, seed=config.seed
        )
        groups = task.param_groups()
        self.params = [p for group in groups for p in group["params"]]
        # fused: one kernel per step instead of a dozen elementwise passes over every LoRA tensor (3x faster on CPU)
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0, fused=True)
        task.prepare(self.optimizer)
        self.step = 0  # optimizer steps taken: the data position
        self.elapsed = 0.0

    @property
    def record_path(self) -> Path:
        """The run record in the output folder."""
        return self.output_dir / self.task.record_file

    def record(self, finished: bool = False) -> dict:
        """The run record: identity, settings, inputs, processes, progress and the task's figures."""
        config, world = self.task.config, self.runtime.processes.world_size
        return {**(self.run_info or {}), "config": dataclasses.asdict(config), "inputs": self.inputs or {},
                "processes": world, "global_batch": config.batch_size * world * config.grad_accum,
                "finished": finished, "steps": self.step, "train_seconds": round(self.elapsed, 1),
                **self.task.summary}  # fmt: skip

    def train_step(self, data) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns the figures of the step."""
        task, config, processes = self.task, self.task.config, self.runtime.processes
        start = time.perf_counter()
        task.model.train()
        task.before_step(self.step)
        lr = task.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # a task may give a group its own rate
        totals, tokens = {}, 0
        for _ in range(config.grad_accum):
            ids = processes.shard(next(data)).to(self.runtime.device)  # (B, T): this process's rows
            with self.runtime.autocast, record_function("forward and loss"):  # profiler labels (benchmarks/training.py)
                loss, figures = task.loss(ids, self.step)
            with record_function("backward"):
                (loss / config.grad_accum).backward()
            for key, value in figures.items():
                totals[key] = totals.get(key, 0.0) + value / config.grad_accum
            tokens += ids.numel() * processes.world_size
        with record_function("optimizer"):
            processes.average_gradients(self.params)
            if config.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], config.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        with record_function("after step"):
            after = task.after_step(self.step)
        seconds = time.perf_counter() - start
        self.elapsed += seconds
        figures = {key: processes.mean(value) for key, value in totals.items()}
        return {"step": self.step, **after, **figures, "lr": lr, "tokens_per_s": tokens / seconds, "seconds": seconds}

    def run(self):
        """Train from the current step until the task is done, then save; returns the saved result."""
        task, main = self.task, self.runtime.processes.is_main
        data = self.batches.batches(start=self.step * task.config.grad_accum)
        bar, shown = None, None
        while not task.done(self.step):
            name, done, total = task.phase(self.step)
            if name != shown:
                if bar is not None:
                    bar.close()
                bar, shown = tqdm(desc=name, total=total, initial=done, unit="step", disable=not main), name
            stats = self.train_step(data)
            if main:
                with open(self.output_dir / task.log_file, "a") as log:
                    log.write(json.dumps(stats) + "\n")
            bar.update(1)
            bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "lambda", "size_ratio")})
            every = task.config.checkpoint_every
            if every and self.step % every == 0 and not task.done(self.step):
                self.checkpoint()
        if bar is not None:
            bar.close()
        return self.save()

    def begin(self) -> None:
        """Start a fresh run: give it an identity and write its record (main process)."""
        self.run_info = {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.task.begin()
        if self.runtime.processes.is_main:
            write_json(self.record_path, self.record())

    @torch.no_grad()
    def save(self):
        """The task's result with the finished run record, written by the main process; returns the result.

        Under :func:`train` the result is written to a stage folder, flushed, and swapped with the output folder in
        one step (acip.folders), so that a kill leaves the output folder either as it was or complete; the work
        folder (log, checkpoints) goes with the swap. A loop run by hand saves straight into its ``output_dir``."""
        main = self.runtime.processes.is_main
        if self.task.config.gradient_checkpointing:
            set_gradient_checkpointing(self.task.model, False)
        if self.output is None:
            result = self.task.save(self.output_dir if main else None)
            if main:
                write_json(self.record_path, self.record(finished=True))
                remove_checkpoints(self.output_dir)
        elif main:
            with self.output.staged() as stage:
                result = self.task.save(stage)
                self._complete(stage)
            remove_tree(self.folder.new)  # the work folder of a run over a previous result (gone with the swap else)
        else:
            result = self.task.save(None)
        self.runtime.processes.wait()
        return result

    def _complete(self, stage: Path) -> None:
        """Complete the stage: the step log, and the finished record listing every file."""
        log = self.output_dir / self.task.log_file
        if log.exists():
            shutil.copy2(log, stage / log.name)
        record = self.record(finished=True)
        record["files"] = sorted({*tree_files(stage), self.task.record_file})
        write_json(stage / self.task.record_file, record)

    @torch.no_grad()
    def checkpoint(self) -> Path | None:
        """Write everything a resumed run needs, atomically (acip.runs); the main process writes, the others
        hold the same state and return None."""
        if not self.runtime.processes.is_main:
            return None
        tensors, task_meta = self.task.state()
        optim, param_groups = optimizer_tensors(self.optimizer)
        meta = {"step": self.step, "elapsed": self.elapsed, "param_groups": param_groups, "task": task_meta,
                "summary": self.task.summary, "run": self.run_info}  # fmt: skip
        return save_checkpoint(self.output_dir, self.step, {**rng_tensors(), **tensors, **optim}, meta)

    @torch.no_grad()
    def resume(self) -> None:
        """Bring a freshly built loop and task to the state of the output folder's latest checkpoint."""
        tensors, meta = load_checkpoint(latest_checkpoint(self.output_dir))
        self.task.load_state(tensors, meta["task"])
        self.task.summary = meta["summary"]
        self.step, self.elapsed = meta["step"], meta["elapsed"]
        self.run_info = meta.get("run") or {"run_id": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        load_optimizer(self.optimizer, tensors, meta["param_groups"], self.runtime.device)
        restore_rng(tensors)
        if self.runtime.processes.is_main:
            truncate_log(self.output_dir / self.task.log_file, self.step)


def train(build, config: TrainingConfig, output_dir, record_file: str, *, resume: bool, overwrite: bool,
          inputs=None, compare=None):  # fmt: skip
    """Run a task end to end: check the settings and the folders, then ``build(config, runtime) -> Task``, resume or
    begin, train, save. Nothing is written before every check passed, and nothing deleted before the result is
    complete (acip.folders); the output folder is locked for the whole run.

    ``inputs(config) -> {argument name: value}`` checks what the run reads (raising errors that name the argument) and
    names it; local files and folders among them must not overlap ``output_dir`` and, on resume, must be the ones the
    run started from, unchanged. ``compare``: the settings that must equal the recorded ones on resume (default all).
    """
    processes = Processes()
    main = processes.is_main
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues the run in output_dir, "
                         "overwrite starts a new one")  # fmt: skip
    check_output_dir(output_dir, {})
    folder = RunFolder(output_dir, record_file)
    compare = [f.name for f in dataclasses.fields(config)] if compare is None else compare

    def settle():
        """Every check of the run (read-only): the settings, the inputs and the folders."""
        return folder.settle(config, resume, overwrite, processes.world_size, compare, inputs)

    with replacing(folder.result, "output_dir", settle, main=main) as output:
        config, paths, work = output.checked
        runtime = Runtime(processes, config.compute_dtype)
        task = build(config, runtime)
        loop = TrainingLoop(task, work, runtime)  # packs the data: a text too short is refused before a folder is made
        if main:
            folder.prepare(work, resume)
        processes.wait()
        loop.folder, loop.output = folder, output
        loop.inputs = {name: {"path": p, "fingerprint": fingerprint(p)} for name, p in paths.items()}
        if resume:
            loop.resume()
        else:
            loop.begin()
        return loop.run()
