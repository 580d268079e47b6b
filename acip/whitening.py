"""The whitened singular basis: factorize each layer so that its smallest singular values are the directions that
matter least for its output on real inputs, not for its weight alone.

For a layer with inputs X (tokens × in), ‖(W − W_r) Xᵀ‖_F is what truncation costs the layer's output. With
L Lᵀ = XᵀX (Cholesky), that is ‖W L − (W L)_r‖_F, so the SVD of W·L gives the best rank-r truncation of the output
(SVD-LLM); :func:`whitened_layer` builds the factors U and S·Vᵀ·L⁻¹, which reproduce W exactly.
ACIP then learns which of these directions to drop.

Calibration is sequential, one decoder block at a time: the inputs of block 0 are captured once; each block's input
Gram matrices are accumulated in float64 by forward hooks (layers that read the same tensor — q/k/v, gate/up —
share one matrix), factored, used and freed, and the next block's inputs come from the block just parametrized. So
the extra memory is one block's Gram matrices plus the calibration activations of one block.

Used through the one build entry, ``acip.build.parametrize(base_model, "whitened", calibration=token_ids)``.
"""

import torch
from torch import nn

from .hub.parametrization import SVDLinear

def whitening_factor(gram: torch.Tensor, ridge: float = 1e-6, tries: int = 12) -> torch.Tensor:
    """Lower-triangular L (float64) with L Lᵀ = XᵀX + εI: Cholesky with ε = ridge × mean(diag), raised tenfold on
    each failure (inputs with dead or collinear dimensions make XᵀX singular)."""
    gram = gram.double()
    scale = float(gram.diagonal().mean())
    eps = ridge * (scale if scale > 0 else 1.0)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for _ in range(tries):
        factor, info = torch.linalg.cholesky_ex(gram + eps * eye)
        if int(info) == 0:
            return factor
        eps *= 10
    raise RuntimeError(f"the input Gram matrix is not positive definite even with a ridge of {eps / 10:.3g}")


class GramCollector:
    """Forward pre-hooks that accumulate XᵀX (float64) over the inputs of some linear layers; layers that read the
    very same input tensor share one matrix. Use as a context manager; call :meth:`new_batch` before each batch."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.modules = {name: model.get_submodule(name) for name in names}
        self.grams: dict[str, torch.Tensor] = {}  # by leader name
        self.leader: dict[str, str] = {}  # layer name -> name of the layer whose matrix it shares
        self._seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs; kept alive so that ids stay unique
        self._handles = []

    def __enter__(self) -> "GramCollector":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._seen.clear()

    def new_batch(self) -> None:
        """Forget the previous batch's input tensors."""
        self._seen.clear()

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            shared = next((leader for seen, leader in self._seen if seen is x), None)
            if shared is not None:
                self.leader.setdefault(name, shared)
                return
            self.leader.setdefault(name, name)
            self._seen.append((x, name))
            rows = x.detach().reshape(-1, x.shape[-1]).double()  # (tokens, in)
            gram = rows.T @ rows  # (in, in)
            if name in self.grams:
                self.grams[name] += gram
            else:
                self.grams[name] = gram

        return hook

    def factors(self) -> dict[str, torch.Tensor]:
        """Each layer's whitening factor L (shared tensors for layers that read the same input)."""
        by_leader = {leader: whitening_factor(gram) for leader, gram in self.grams.items()}
        return {name: by_leader[self.leader[name]] for name in self.modules}


class _Captured(Exception):
    """Stops the forward pass once the first decoder block's inputs are recorded."""


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The name and the ModuleList of the model's decoder blocks: the largest ModuleList of modules holding linears."""
    lists = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and any(isinstance(m, nn.Linear) for m in module.modules())
    ]  # fmt: skip
    if not lists:
        raise ValueError("the model has no list of decoder blocks (nn.ModuleList of layers holding nn.Linear)")
    return max(lists, key=lambda item: len(item[1]))


@torch.no_grad()
def whitened_layer(linear: nn.Linear, chol: torch.Tensor, mask_constant: float = 2e-2) -> SVDLinear:
    """The SVD layer of ``linear`` in the whitened basis of the lower-triangular (in, in) L with L Lᵀ = XᵀX, the Gram
    matrix of the layer's inputs: W L = U S Vᵀ and W = U · S (Vᵀ L⁻¹), in float64. Dropping the smallest singular
    values of W L removes the least output energy on those inputs (‖(W − W_r) Xᵀ‖ = ‖(W L − (W L)_r)‖). The scores
    start at the whitened singular values divided by their norm (the share of the layer's output each direction
    carries, comparable across layers), so pruning a fresh model by score is already a data-aware truncation."""
    chol = chol.to(device=linear.weight.device, dtype=torch.float64)  # (in, in)
    u, s, vh = torch.linalg.svd(linear.weight.double() @ chol, full_matrices=False)  # (out, k), (k,), (k, in)
    vh = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)  # Vᵀ L⁻¹, (k, in)
    score = s / s.norm().clamp_min(torch.finfo(s.dtype).tiny)
    return SVDLinear.from_svd(u, s, vh, linear.bias, mask_constant, score=score, dtype=linear.weight.dtype)


class BlockwiseWhitening:
    """The whitening factors of :func:`parametrize`: for each target layer (asked in module order),
    its input Gram factor L, computed from calibration token ids block by block (``sequential``), or for every layer
    in one pass through the dense model (``sequential=False``: all Gram matrices at once; for small models and tests).
    """

    def __init__(self, model: nn.Module, names: list[str], calibration: torch.Tensor, batch_size: int = 8,
                 sequential: bool = True):  # fmt: skip
        if calibration.ndim != 2 or calibration.shape[0] < 1:
            raise ValueError(f"calibration must be a (N, T) tensor of token ids, got shape {tuple(calibration.shape)}")
        self.model, self.names, self.sequential = model, list(names), sequential
        self.batches = list(calibration.split(batch_size))
        self.prefix, self.blocks = decoder_blocks(model)
        self.block_of = {name: self._block_index(name) for name in self.names}
        self.factors: dict[str, torch.Tensor] = {}
        self.inputs: list[tuple[torch.Tensor, tuple, dict]] | None = None  # per batch: hidden states, args, kwargs
        self.position = 0  # the block whose inputs self.inputs holds

    def _block_index(self, name: str) -> int | None:
        head = f"{self.prefix}." if self.prefix else ""
        if not name.startswith(head):
            return None
        index = name[len(head) :].split(".", 1)[0]
        return int(index) if index.isdigit() else None

    def __call__(self, name: str) -> torch.Tensor:
        """The whitening factor of target layer ``name``."""
        if name not in self.factors:
            block = self.block_of[name]
            if not self.sequential or block is None:
                todo = [n for n in self.names if not self.sequential or self.block_of[n] is None]
                self.factors.update(self._full_pass(todo))
            else:
                self.factors.update(self._block_pass(block))
        return self.factors.pop(name)

    @torch.no_grad()
    def _full_pass(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Factors for ``names`` from the whole model run over every calibration batch."""
        device = self.model.get_input_embeddings().weight.device
        with GramCollector(self.model, names) as grams:
            for batch in self.batches:
                grams.new_batch()
                self.model(input_ids=batch.to(device), use_cache=False)
            return grams.factors()

    @torch.no_grad()
    def _block_pass(self, block: int) -> dict[str, torch.Tensor]:
        """Factors for the targets of decoder block ``block``, from its inputs given the blocks before it as they
        are now (already parametrized)."""
        if self.inputs is None:
            self.inputs = self._capture_first_inputs()
        if block < self.position:
            raise RuntimeError(f"layers must be asked for in module order: block {block} after {self.position}")
        for index in range(self.position, block):  # the earlier blocks' outputs become this block's inputs
            self.inputs = [(_hidden(self.blocks[index](h, *args, **kwargs)), args, kwargs)
                           for h, args, kwargs in self.inputs]  # fmt: skip
        self.position = block
        names = [n for n in self.names if self.block_of[n] == block]
        with GramCollector(self.model, names) as grams:
            for h, args, kwargs in self.inputs:
                grams.new_batch()
                self.blocks[block](h, *args, **kwargs)
            return grams.factors()

    def _capture_first_inputs(self) -> list[tuple[torch.Tensor, tuple, dict]]:
        """Run the model up to its first decoder block for each batch; record that block's arguments."""
        captured = []

        def record(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            captured.append((hidden, tuple(args[1:]), kwargs))
            raise _Captured

        device = self.model.get_input_embeddings().weight.device
        handle = self.blocks[0].register_forward_pre_hook(record, with_kwargs=True)
        try:
            for batch in self.batches:
                try:
                    self.model(input_ids=batch.to(device), use_cache=False)
                except _Captured:
                    pass
        finally:
            handle.remove()
        return captured


def _hidden(output) -> torch.Tensor:
    """A decoder block's hidden states, whether it returns a tensor or a tuple."""
    return output[0] if isinstance(output, tuple) else output
