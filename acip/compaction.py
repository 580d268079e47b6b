"""Computing only the ranks still alive: while ACIP trains, dead singular values are sliced out of the SVD layers
(factors, LoRA adapters on the factors, masks and their optimizer state), so steps get cheaper as masks die; at the
end they are put back exactly, giving the full prunable model again. Post-tuning at drawn sizes computes only the
ranks each step's size keeps (PrefixSlicer).

A mask that reaches zero stays dead in practice: the straight-through gradient is zero there and Adam's momentum keeps
pushing it down, so dropping it changes nothing but the cost of a step.
"""

import torch
from torch import nn

from .hub.parametrization import SVDLinear


def _base(module: nn.Module) -> nn.Linear:
    """The frozen nn.Linear inside a factor, whether or not peft wrapped it with LoRA."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def rank_slots(layer: SVDLinear) -> list[tuple[str, torch.Tensor, int]]:
    """(name, tensor, dim) of every tensor of ``layer`` that has a rank dimension."""
    slots = [("mask", layer.mask, 0), ("sv.weight", _base(layer.sv).weight, 0), ("u.weight", _base(layer.u).weight, 1)]
    for adapter, lora_b in getattr(layer.sv, "lora_B", {}).items():  # LoRA on sv: its B has a row per rank
        slots.append((f"sv.lora_B.{adapter}.weight", lora_b.weight, 0))
        if lora_b.bias is not None:
            slots.append((f"sv.lora_B.{adapter}.bias", lora_b.bias, 0))
    for adapter, lora_a in getattr(layer.u, "lora_A", {}).items():  # LoRA on u: its A has a column per rank
        slots.append((f"u.lora_A.{adapter}.weight", lora_a.weight, 1))
    return slots


def best_first(score: torch.Tensor) -> torch.Tensor:
    """A layer's rank positions by score, best first, ties in position order: the order in which the planner
    (acip.hub.pruning.Ranking) keeps a layer's ranks, so that any size it picks keeps a prefix."""
    return torch.sort(score.detach().cpu(), descending=True, stable=True).indices


def rounded_rank(needed: int, rank: int, multiple: int) -> int:
    """``needed`` ranks of a layer of ``rank`` rounded up to its step: ``multiple``, or an eighth of its rank where that
    is smaller (so that small layers still shrink), at most ``rank``."""
    step = max(1, min(multiple, rank // 8))
    return min(-(-needed // step) * step, rank)


def _set_rank(layer: SVDLinear, rank: int) -> None:
    """Update the feature counts that describe the rank dimension (peft reads them when merging)."""
    for module in (layer.sv, _base(layer.sv), *getattr(layer.sv, "lora_B", {}).values()):
        module.out_features = rank
    for module in (layer.u, _base(layer.u), *getattr(layer.u, "lora_A", {}).values()):
        module.in_features = rank


class RankCompactor:
    """Slices dead ranks out of SVD layers during training and restores them afterwards.

    Args:
        layers: the SVD layers by name (LoRA adapters on their factors, if any, are handled too).
        optimizer: the optimizer over masks and LoRA weights; its per-parameter state is sliced alongside.
        min_dead_fraction: compact a layer once this fraction of its computed ranks is dead (each compaction
            reallocates the layer's tensors, so it is not done for every single death).
        multiple: keep each layer's computed ranks a multiple of this (or of an eighth of its full rank where that is
            smaller; or its full rank) by computing a few dead ones too, the most recently dead: bf16 kernels on the
            CPU (oneDNN) compile every new shape, ~1 ms each, which with exact ranks made the late pruning steps twice
            as slow as the first on SmolLM2.
    """

    def __init__(self, layers: dict[str, SVDLinear], optimizer: torch.optim.Optimizer, min_dead_fraction=0.05,
                 multiple: int = 1):
        self.layers = layers
        self.optimizer = optimizer
        self.min_dead_fraction = min_dead_fraction
        self.multiple = multiple
        self.full_rank = {name: layer.rank for name, layer in layers.items()}
        self.alive = {name: torch.arange(layer.rank) for name, layer in layers.items()}  # computed rank positions
        self.stash: dict[str, dict[str, list[tuple[torch.Tensor, torch.Tensor]]]] = {name: {} for name in layers}

    def computed_fraction(self) -> float:
        """Ranks still computed / all ranks."""
        return sum(a.numel() for a in self.alive.values()) / sum(self.full_rank.values())

    @torch.no_grad()
    def compact(self, name: str, keep: torch.Tensor) -> None:
        """Drop the computed ranks of layer ``name`` where ``keep`` (over its computed ranks) is False."""
        layer = self.layers[name]
        kept = torch.nonzero(keep.cpu()).squeeze(1)
        dropped = torch.nonzero(~keep.cpu()).squeeze(1)
        if dropped.numel() == 0:
            return
        for key, tensor, dim in rank_slots(layer):
            # on the CPU: frees accelerator memory
            dead_values = tensor.data.index_select(dim, dropped.to(tensor.device)).cpu()
            self.stash[name].setdefault(key, []).append((self.alive[name][dropped], dead_values))
            self._slice(tensor, dim, kept.to(tensor.device))
        self.alive[name] = self.alive[name][kept]
        _set_rank(layer, kept.numel())

    @torch.no_grad()
    def reorder(self, name: str, order: torch.Tensor) -> None:
        """Permute the computed ranks of layer ``name`` (``order`` indexes its computed positions); the layer computes
        the same map, and :meth:`full` / :meth:`restore` still put every rank back where it was."""
        for _, tensor, dim in rank_slots(self.layers[name]):
            self._slice(tensor, dim, order.to(tensor.device))
        self.alive[name] = self.alive[name][order.cpu()]

    def _slice(self, tensor: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """Keep ``index`` along ``dim`` of a parameter, and of its optimizer state."""
        old_shape = tensor.shape
        tensor.data = tensor.data.index_select(dim, index)
        tensor.grad = None
        for value in self.optimizer.state.get(tensor, {}).values():
            if torch.is_tensor(value) and value.shape == old_shape:
                value.data = value.data.index_select(dim, index)

    def _widened(self, state: dict, shape, full_shape, dim: int, name: str) -> dict:
        """Optimizer state of a rank-indexed tensor, scattered from the computed ranks into zeros of full rank."""
        out = {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == shape:
                wide = value.new_zeros(full_shape)
                wide.index_copy_(dim, self.alive[name].to(value.device), value)
                value = wide
            out[key] = value
        return out

    def compact_dead(self, force: bool = False) -> int:
        """Compact every layer whose dead computed ranks (mask <= 0) reached the threshold (with ``force``: any dead
        rank), down to a multiple of ``multiple``. Returns how many."""
        compacted = 0
        for name, layer in self.layers.items():
            keep = layer.kept
            alive, rank = int(keep.sum()), keep.numel()
            if alive == rank or not (force or rank - alive >= max(1, self.min_dead_fraction * rank)):
                continue
            # Rounded even when forced: exact ranks give every layer its own matrix shapes, and bf16 kernels on the
            # CPU (oneDNN) then keep compiling them: post-tune steps at the stop ratio took 2.5x those at drawn sizes.
            computed = rounded_rank(alive, self.full_rank[name], self.multiple)
            if computed >= rank:
                continue
            if computed > alive:  # pad with the most recently dead ranks (the highest masks among the dead)
                dead_masks = layer.mask.detach().masked_fill(keep, -torch.inf)
                keep = keep.clone()
                keep[dead_masks.topk(computed - alive).indices] = True
            self.compact(name, keep)
            compacted += 1
        return compacted

    @torch.no_grad()
    def full(self, name: str) -> dict[str, torch.Tensor]:
        """Full-rank copies of every rank-indexed tensor of layer ``name``: computed part plus stashed part."""
        out = {}
        for key, tensor, dim in rank_slots(self.layers[name]):
            shape = list(tensor.shape)
            shape[dim] = self.full_rank[name]
            whole = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
            whole.index_copy_(dim, self.alive[name].to(tensor.device), tensor.data)
            for positions, values in self.stash[name].get(key, []):
                whole.index_copy_(dim, positions.to(tensor.device), values.to(tensor.device))
            out[key] = whole
        return out

    @torch.no_grad()
    def restore(self, keep_optimizer_state: bool = False) -> None:
        """Put every layer back at full rank, exactly as if nothing had been dropped. The optimizer state of the
        rank-indexed tensors is dropped, or with ``keep_optimizer_state`` kept for the computed ranks (zeros for the
        restored ones, as for a tensor that never had a gradient there)."""
        for name, layer in self.layers.items():
            whole = self.full(name)
            for key, tensor, dim in rank_slots(layer):
                state = self.optimizer.state.pop(tensor, {})
                if keep_optimizer_state and state:  # frozen tensors (the factors) have none and get none
                    self.optimizer.state[tensor] = self._widened(state, tensor.shape, whole[key].shape, dim, name)
                tensor.data = whole[key]
            _set_rank(layer, self.full_rank[name])
            self.alive[name] = torch.arange(self.full_rank[name])
            self.stash[name] = {}


class PrefixSlicer:
    """Computes only the first ``k`` ranks of each SVD layer for a step, then gives the layers their full rank back.

    With each layer's ranks ordered best first (:meth:`RankCompactor.reorder` by score), every size the planner picks
    keeps a prefix of every layer, so a post-tune step at a drawn size costs that size instead of the full rank.
    Frozen tensors (factors, masks) are narrowed as views, without a copy; trainable ones (LoRA) whose view would not be
    contiguous are copied, with their optimizer state, and written back by :meth:`widen` (fused AdamW on the CPU writes
    a non-contiguous parameter as if it were contiguous: torch 2.13).
    """

    def __init__(self, layers: dict[str, SVDLinear], optimizer: torch.optim.Optimizer, multiple: int = 1):
        self.layers = layers
        self.optimizer = optimizer
        self.multiple = multiple  # as RankCompactor's: computed ranks rounded up by rounded_rank
        self._narrowed: list[tuple[torch.Tensor, torch.Tensor, int, bool, dict[int, torch.Tensor]]] = []
        self._ranks: dict[str, int] = {}  # full rank of each narrowed layer
        self._masked: list[tuple[torch.Tensor, torch.Tensor]] = []  # (mask entries set to 0, their values before)

    @torch.no_grad()
    def narrow(self, ranks: dict[str, int]) -> None:
        """Let layer ``name`` compute its first ``ranks[name]`` ranks only (layers not named keep all). With
        ``multiple`` > 1 it computes them rounded up (:func:`rounded_rank`), the extra ones masked to zero:
        fewer distinct shapes, which bf16 kernels on the CPU (oneDNN) would otherwise compile anew almost every step."""
        self.widen()
        for name, rank in ranks.items():
            layer = self.layers[name]
            computed = rounded_rank(rank, layer.rank, self.multiple)
            if computed > rank:
                self._masked.append((layer.mask.data[rank:computed], layer.mask.data[rank:computed].clone()))
                layer.mask.data[rank:computed] = 0.0
            if computed >= layer.rank:
                continue
            self._ranks[name] = layer.rank
            for _, tensor, dim in rank_slots(layer):
                self._narrow(tensor, dim, computed)
            _set_rank(layer, computed)

    def _narrow(self, tensor: torch.Tensor, dim: int, rank: int) -> None:
        """Narrow one rank-indexed parameter and its optimizer state to the first ``rank`` along ``dim``."""
        wide = tensor.data
        part = wide.narrow(dim, 0, rank)
        copied = tensor.requires_grad and not part.is_contiguous()
        tensor.data = part.contiguous() if copied else part
        states = {}
        for value in self.optimizer.state.get(tensor, {}).values():
            if torch.is_tensor(value) and value.shape == wide.shape:
                states[id(value)] = value.data
                part = value.data.narrow(dim, 0, rank)
                value.data = part.contiguous() if copied else part
        tensor.grad = None
        self._narrowed.append((tensor, wide, dim, copied, states))

    @torch.no_grad()
    def widen(self) -> None:
        """Every layer back at its full rank, with what the step changed in the narrowed part kept."""
        for tensor, wide, dim, copied, states in self._narrowed:
            narrow_shape = tensor.shape
            if copied:
                wide.narrow(dim, 0, narrow_shape[dim]).copy_(tensor.data)
            tensor.data = wide
            tensor.grad = None
            for value in self.optimizer.state.get(tensor, {}).values():
                if not (torch.is_tensor(value) and value.shape == narrow_shape):
                    continue
                full = states.get(id(value))
                if full is None:  # state the step created: zeros for the ranks it did not see
                    full = value.new_zeros(wide.shape)
                if copied or id(value) not in states:
                    full.narrow(dim, 0, narrow_shape[dim]).copy_(value.data)
                value.data = full
        for name, rank in self._ranks.items():
            _set_rank(self.layers[name], rank)
        for entries, values in self._masked:
            entries.copy_(values)
        self._narrowed, self._ranks, self._masked = [], {}, []
