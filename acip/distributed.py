"""Data parallelism for the ACIP run and fine-tuning, on Hugging Face accelerate.

Started by ``accelerate launch --multi_gpu --num_processes N -m acip.cli compress ...`` (or ``torchrun``), every
process holds the whole model, reads its own rows of each global batch (rows ``rank·b … (rank+1)·b`` of a batch of
``N·b`` sequences, so the data order is that of one process with batch ``N·b``), and the gradients of the trainable
tensors (masks and LoRA weights) are averaged across processes once per optimizer step, after accumulation. Every
process then takes the same optimizer step, so masks die on the same step everywhere and the score maps agree; only
the main process writes logs, checkpoints and the result. Started plainly, there is one process and every
collective below is a no-op.

Why not wrap the model in DistributedDataParallel: while ACIP trains, dead ranks are sliced out of the masks, the
factors and the LoRA weights (acip.compaction), and DDP's reducer fixes its gradient buckets to the parameter shapes
it saw when it was built. The trainable tensors are small (masks and LoRA), so one flat all-reduce per optimizer
step — what DDP does under ``no_sync`` accumulation — costs little next to the forward and backward passes.
"""

import torch
from accelerate import PartialState
from accelerate.utils import broadcast, gather_object, reduce


class Processes:
    """This process's place among the processes of a run (one process, with no-op collectives, when not launched)."""

    def __init__(self):
        # Without the cpu flag accelerate treats CPU-only torchrun processes as independent single runs; with it
        # they join one gloo process group. On CUDA machines the flag must stay off (it would force the CPU).
        self.state = PartialState(cpu=not torch.cuda.is_available())

    @property
    def rank(self) -> int:
        """Index of this process, 0 … world_size - 1."""
        return self.state.process_index

    @property
    def world_size(self) -> int:
        """Number of processes in the run."""
        return self.state.num_processes

    @property
    def is_main(self) -> bool:
        """True in the one process that writes files and shows progress bars."""
        return self.state.is_main_process

    @property
    def device(self) -> torch.device:
        """The device this process trains on (its own GPU, or the CPU)."""
        return self.state.device

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch: (world_size · b, T) → (b, T)."""
        if batch.shape[0] % self.world_size:
            raise ValueError(f"a global batch of {batch.shape[0]} rows does not split over {self.world_size} processes")
        rows = batch.shape[0] // self.world_size
        return batch[self.rank * rows : (self.rank + 1) * rows]

    @torch.no_grad()
    def average_gradients(self, params: list[torch.Tensor]) -> None:
        """Replace each gradient by its mean over all processes (one flat all-reduce; params without one skipped)."""
        grads = [p.grad for p in params if p.grad is not None]
        if self.world_size == 1 or not grads:
            return
        flat = reduce(torch.cat([g.flatten().float() for g in grads]), reduction="mean")
        for grad, mean in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(mean.view_as(grad))

    def mean(self, value: float) -> float:
        """A number averaged over all processes (for logging)."""
        if self.world_size == 1:
            return value
        return float(reduce(torch.tensor([value], dtype=torch.float64, device=self.device), reduction="mean"))

    def same_everywhere(self, value) -> bool:
        """Whether a picklable value (e.g. a list of checksums) is equal on every process."""
        if self.world_size == 1:
            return True
        values = gather_object([value])
        return all(v == values[0] for v in values)

    @torch.no_grad()
    def copy_from_main(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite each tensor with the main process's values."""
        if self.world_size > 1:
            for tensor in tensors:
                broadcast(tensor.data, from_process=0)  # in place

    def wait(self) -> None:
        """Block until every process got here."""
        self.state.wait_for_everyone()
