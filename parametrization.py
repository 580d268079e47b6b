"""SVD-parametrized linear layers for ACIP: the prunable form, the compressed form, and the global pruning planner.

A dense layer ``y = W x + b`` with ``W`` of shape (out, in) and ``k = min(in, out)`` is rewritten as

    y = U · diag(mask) · (S Vᵀ) x + b

with the two factors kept as plain ``nn.Linear`` children (``sv``: in -> k holding S·Vᵀ, ``u``: k -> out holding U
and the bias), so that bitsandbytes, peft ``"all-linear"`` and transformers' quantized loading see ordinary linear
layers. The full (out, in) weight is never materialised in the forward pass.

This file is part of the Hub payload: it imports only torch.
"""

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn


def rank_cost(rank: int, in_features: int, out_features: int) -> int:
    """Weights a layer of ``rank`` costs once compressed (bias excluded): factors, or dense when that is no larger."""
    return min(rank * (in_features + out_features), in_features * out_features)


def is_dense_rank(rank: int, in_features: int, out_features: int) -> bool:
    """Whether a layer of ``rank`` is stored dense after compression, because factors would not be smaller."""
    return rank * (in_features + out_features) >= in_features * out_features


def linear_num_params(layer: nn.Module) -> int:
    """Logical parameter count of a linear layer (``in·out`` + bias), also for 4-bit layers whose storage is packed."""
    bias = getattr(layer, "bias", None)
    return layer.in_features * layer.out_features + (bias.numel() if bias is not None else 0)


def _plain_linear(layer: nn.Module, role: str) -> nn.Linear:
    """The layer itself when it is a plain float nn.Linear; a clear error for quantized or adapter-wrapped factors."""
    if type(layer) is not nn.Linear:
        raise RuntimeError(
            f"the {role} factor is a {type(layer).__name__}, not a plain nn.Linear: merge LoRA adapters "
            "(merge_and_unload) and compress before quantizing"
        )
    return layer


class LowRankLinear(nn.Module):
    """A linear map stored as two factors, ``x -> u(sv(x))``; the compressed form of an ACIP layer."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.sv = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # S·Vᵀ, (rank, in)
        self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)  # U, (out, rank), and the bias

    @property
    def rank(self) -> int:
        """Number of singular directions this layer holds."""
        return self.sv.out_features

    @property
    def bias(self):
        """The layer's bias (held by the output factor), or None."""
        return self.u.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``u(sv(x))``: (..., in) -> (..., rank) -> (..., out)."""
        return self.u(self.sv(x))

    def num_params(self) -> int:
        """Parameters of the layer as stored now (bias included)."""
        bias = self.out_features if self.bias is not None else 0
        return self.rank * (self.in_features + self.out_features) + bias

    def _dense_weight(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The (out, in) product of the factors in float32, with an optional per-rank scale between them."""
        u = _plain_linear(self.u, "output").weight.float()  # (out, k)
        if mask is not None:
            u = u * mask
        return u @ _plain_linear(self.sv, "input").weight.float()  # (out, in)

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ordinary nn.Linear computing the same map."""
        return _dense_linear(self._dense_weight(), self.bias, self.sv.weight.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """Build an nn.Linear holding ``weight`` (out, in) and a copy of ``bias``, in ``dtype``."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)
    return layer


class SVDLinear(LowRankLinear):
    """The prunable ACIP layer: ``x -> U · (mask ⊙ S Vᵀ x)`` with a trainable mask and a score per singular value.

    The mask is float32 and acts through a straight-through estimator: the forward pass uses ``c`` where the mask is
    positive and 0 elsewhere, the backward pass treats it as ``relu(mask)``. ``u`` holds ``U / c`` so that the layer
    reproduces the original weight exactly while every mask entry sits at its initial value ``c``. The float32
    ``score`` buffer ranks the singular values for pruning (higher = more important).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mask_constant: float = 2e-2,
        device=None,
        dtype=None,
    ):
        rank = min(in_features, out_features)
        super().__init__(in_features, out_features, rank, bias=bias, device=device, dtype=dtype)
        self.mask_constant = mask_constant
        self.mask = nn.Parameter(torch.full((rank,), mask_constant, dtype=torch.float32, device=device))
        self.register_buffer("score", torch.full((rank,), mask_constant, dtype=torch.float32, device=device))

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls, linear: nn.Linear, mask_constant: float = 2e-2, whitening: torch.Tensor | None = None
    ) -> "SVDLinear":
        """Factorize a dense layer by its SVD (on the layer's device); the result reproduces it exactly.

        Plain basis (``whitening`` None): the SVD of W, in float32; the factors are the SVD's own output tensors,
        scaled in place, so besides the SVD's workspace nothing is allocated and parametrizing a model layer by layer
        never holds more than the finished model plus one layer. Every score starts at ``mask_constant``.

        Whitened basis: ``whitening`` is a lower-triangular (in, in) L with L Lᵀ = XᵀX, the Gram matrix of the
        layer's inputs. Then W L = U S Vᵀ and W = U · S (Vᵀ L⁻¹), in float64: dropping the smallest singular values
        of W L removes the least output energy on those inputs (‖(W − W_r) Xᵀ‖ = ‖(W L − (W L)_r)‖). The scores
        start at the whitened singular values divided by their norm (the share of the layer's output each direction
        carries, comparable across layers), so pruning a fresh model by score is already a data-aware truncation.
        """
        dtype, device = linear.weight.dtype, linear.weight.device
        if whitening is None:
            u, s, vh = torch.linalg.svd(linear.weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
            score = torch.full_like(s, mask_constant)
        else:
            chol = whitening.to(device=device, dtype=torch.float64)  # (in, in)
            u, s, vh = torch.linalg.svd(linear.weight.double() @ chol, full_matrices=False)
            vh = torch.linalg.solve_triangular(chol, vh, upper=False, left=False)  # Vᵀ L⁻¹, (k, in)
            score = (s / s.norm().clamp_min(torch.finfo(s.dtype).tiny)).float()  # comparable across layers
        with torch.device("meta"):  # the structure only; every tensor is put in below
            layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                        mask_constant=mask_constant, dtype=dtype)  # fmt: skip
        layer.sv.weight = nn.Parameter(vh.mul_(s[:, None]).to(dtype))
        layer.u.weight = nn.Parameter(u.div_(mask_constant).to(dtype))
        if linear.bias is not None:
            layer.u.bias = nn.Parameter(linear.bias.detach())  # the dense layer's own tensor: no copy
        layer.mask = nn.Parameter(torch.full_like(s, mask_constant, dtype=torch.float32))
        layer.score = score
        return layer.to(device)

    def mask_value(self) -> torch.Tensor:
        """The mask as the forward pass uses it: ``c`` where alive, 0 where pruned; gradient as for ``relu(mask)``."""
        alive = F.relu(self.mask)  # (k,)
        hard = (alive.detach() > 0).to(alive.dtype) * self.mask_constant
        return hard + (alive - alive.detach())  # exactly ``hard`` forward; relu's gradient backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``u(mask_value ⊙ sv(x))``; pruned singular values contribute nothing."""
        kept = self._pruned_index() if self._can_skip_pruned() else None
        if kept is not None:
            # Without gradients a pruned rank is pure waste: compute the kept ones only, as compress() would.
            h = F.linear(x, self.sv.weight[kept]) * self.mask_constant  # (..., r)
            return F.linear(h, self.u.weight[:, kept], self.u.bias)
        h = self.sv(x)  # (..., k)
        return self.u(h * self.mask_value().to(h.dtype))

    def _can_skip_pruned(self) -> bool:
        # Only plain factors: adapters (peft) or quantized layers around them must see the full rank.
        return not torch.is_grad_enabled() and type(self.sv) is nn.Linear and type(self.u) is nn.Linear

    def _pruned_index(self) -> torch.Tensor | None:
        """Indices of the kept ranks, or None when nothing is pruned; cached until the mask changes."""
        version = (self.mask._version, self.mask.data_ptr())
        if getattr(self, "_kept_cache", (None,))[0] != version:
            keep = self.mask.detach() > 0
            self._kept_cache = (version, None if bool(keep.all()) else torch.nonzero(keep).squeeze(1))
        return self._kept_cache[1]

    @property
    def kept(self) -> torch.Tensor:
        """Boolean (k,): which singular values the current mask keeps."""
        return self.mask.detach() > 0

    @torch.no_grad()
    def set_kept(self, keep: torch.Tensor) -> None:
        """Prune revertibly: kept mask entries go back to ``c``, the others to 0. Factors and scores are untouched."""
        keep = keep.to(device=self.mask.device, dtype=torch.bool)
        self.mask.copy_(torch.where(keep, self.mask_constant, 0.0))

    def num_params(self) -> int:
        """Parameters the layer will have once compressed at its current mask (bias included)."""
        bias = self.out_features if self.bias is not None else 0
        return rank_cost(int(self.kept.sum()), self.in_features, self.out_features) + bias

    @torch.no_grad()
    def compressed(self) -> nn.Module:
        """The physically small layer for the current mask: factors sliced to the kept ranks, or a dense nn.Linear
        when factors would not be smaller. The two compute the same map as this layer does now."""
        keep = self.kept
        rank = int(keep.sum())
        sv, u = _plain_linear(self.sv, "input"), _plain_linear(self.u, "output")
        if is_dense_rank(rank, self.in_features, self.out_features):
            return _dense_linear(self._dense_weight(self.mask_value()), self.bias, sv.weight.dtype)
        layer = LowRankLinear(
            self.in_features, self.out_features, rank, self.bias is not None, sv.weight.device, sv.weight.dtype
        )
        layer.sv.weight.copy_(sv.weight[keep])
        layer.u.weight.copy_(u.weight[:, keep] * self.mask_constant)
        if self.bias is not None:
            layer.u.bias.copy_(self.bias)
        return layer

    def _apply(self, fn, recurse=True):
        # Masks and scores stay float32 whatever dtype the factors are cast to: in bf16 the scores of a trained run
        # collapse into ties and the ranking degrades. Device moves still apply to them.
        keep = {"mask": self.mask.data, "score": self.score}
        super()._apply(fn, recurse)
        for name, before in keep.items():
            after = getattr(self, name)
            if after.dtype != torch.float32:
                restored = before.to(device=after.device)
                if name == "mask":
                    self.mask.data = restored
                else:
                    self.score = restored
        return self

    def extra_repr(self) -> str:
        kept = "?" if self.mask.is_meta else int(self.kept.sum())
        return f"{super().extra_repr()}, kept={kept}, mask_constant={self.mask_constant}"


# --------------------------------------------------------------------------------------------------------------------
# Global pruning plan: a pure function of (scores, layer shapes), so it runs on a 7B-scale score map without weights.
# --------------------------------------------------------------------------------------------------------------------

_TOP_BITS = 10  # the first radix round buckets every score by its key's top 10 bits...
_LOW_ROUNDS = ((11, 11), (0, 11))  # ...further (shift, bits) rounds narrow the crossing bucket...
_SORT_BELOW = 1 << 16  # ...until this few candidates are left, which are then sorted
_BLOCK = 1024  # items per block when walking the sorted candidates


def _ascending_key(scores: torch.Tensor) -> torch.Tensor:
    """int32 keys whose ascending order is the descending order of the float32 ``scores`` (ties stay ties).

    Overwrites ``scores``, whose storage the keys reuse: the planner's arrays are large enough for allocation to
    show in its timing.
    """
    scores.add_(0.0)  # turns -0.0 into +0.0, so that the two tie
    bits = scores.view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # IEEE sign-magnitude -> two's complement order
    return bits.bitwise_not_()  # reverses the order without overflow


@functools.lru_cache(maxsize=8)
def _shape_tables(ranks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shape-only tables for :func:`plan_pruning`, cached because a model's shapes do not change between prunes.

    Items are the singular values of all layers, concatenated layer by layer. Ties in score are broken by relative
    position ``i / k`` in the layer, then by layer: a block of equal scores (an untrained map, or masks that died
    on the same step) is then cut evenly across layers, each keeping its largest singular values. Returns each
    item's layer id (int32), the tie-break order (item indices) and each item's place in it.
    """
    layer_ids = torch.repeat_interleave(torch.arange(len(ranks), dtype=torch.int32), torch.tensor(ranks))
    relative = torch.cat([torch.div(torch.arange(k) << 30, k, rounding_mode="floor") for k in ranks])  # i/k · 2^30
    tie_order = torch.sort(relative.to(torch.int32), stable=True).indices
    tie_place = torch.empty_like(tie_order)
    tie_place[tie_order] = torch.arange(tie_order.numel())
    return layer_ids, tie_order, tie_place


def _where(items: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``items[mask]``; nonzero + index_select is several times faster than boolean indexing on large tensors."""
    return items.index_select(0, torch.nonzero(mask).squeeze(1))


class _Costs:
    """Capped cost of per-layer kept counts, and where along a ranking it first reaches the budget."""

    def __init__(self, shapes: list[tuple[int, int]], budget: int):
        self.width = torch.tensor([i + o for i, o in shapes], dtype=torch.int64)  # cost of one rank, per layer
        self.dense = torch.tensor([i * o for i, o in shapes], dtype=torch.int64)  # cost when stored dense
        self.budget = min(max(int(budget), 0), int(self.dense.sum()))

    def of(self, counts: torch.Tensor) -> torch.Tensor:
        """Cost of each row of per-layer kept counts (..., L)."""
        return torch.minimum(counts * self.width, self.dense).sum(-1)

    def crossing_bucket(self, digit, layers, n_buckets: int, before: torch.Tensor) -> tuple[int, torch.Tensor]:
        """First bucket (by ``digit``) at whose end the cost reaches the budget, and the per-layer counts before it."""
        n_layers = before.numel()
        index = digit * n_layers
        index += layers
        counts = torch.bincount(index, minlength=n_buckets * n_layers).view(n_buckets, n_layers).cumsum(0) + before
        bucket = int(torch.searchsorted(self.of(counts), self.budget))
        return bucket, (counts[bucket - 1] if bucket > 0 else before)

    def crossing_item(self, layers: torch.Tensor, before: torch.Tensor) -> int:
        """How many items of the ordered run ``layers`` to keep so that the cost first reaches the budget."""
        position = torch.arange(layers.numel(), dtype=torch.int32) // _BLOCK
        block, before = self.crossing_bucket(position, layers, max(1, math.ceil(layers.numel() / _BLOCK)), before)
        inside = F.one_hot(layers[block * _BLOCK : (block + 1) * _BLOCK].long(), before.numel()).cumsum(0) + before
        return block * _BLOCK + int(torch.searchsorted(self.of(inside), self.budget)) + 1


def plan_pruning(
    scores: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int
) -> tuple[list[torch.Tensor], int]:
    """Choose which singular values to keep so that the compressed layers cost at least ``budget`` weights, by as
    little as one rank allows.

    Every singular value of every layer is ranked once, globally: by score (higher first), ties by relative
    position within its layer (larger singular values first), then by layer order. The kept set is the shortest
    prefix of that ranking whose cost reaches ``budget``; a layer of rank r costs ``rank_cost(r, in, out)``. A layer
    whose kept ranks reach the dense cost keeps all its ranks, which costs nothing more. Kept sets are nested: a
    larger budget keeps a superset.

    The ranking is found without sorting everything: a radix select over the bits of the scores, with per-layer
    counts so that every bucket-aligned prefix has its exact cost, narrows the candidates to those around the
    point where the budget is crossed; only they are sorted and walked with cumulative costs.

    Args:
        scores: one float tensor of shape (k,) per layer.
        shapes: ``(in_features, out_features)`` per layer, in the same order.
        budget: weights the compressed layers may cost (biases excluded).

    Returns:
        One boolean keep mask per layer, and the cost of the plan in weights.
    """
    ranks = tuple(int(s.numel()) for s in scores)
    for rank, (in_features, out_features) in zip(ranks, shapes):
        if rank != min(in_features, out_features):
            raise ValueError(f"a score vector of length {rank} does not fit a {out_features}x{in_features} layer")
    flat = torch.cat([s.detach().to(device="cpu", dtype=torch.float32).flatten() for s in scores])
    if not torch.isfinite(flat.sum()) and torch.isnan(flat).any():  # the sum is a cheap first test
        raise ValueError("the score map contains NaN; scores must be numbers")
    costs = _Costs(shapes, budget)
    layer_ids, tie_order, tie_place = _shape_tables(ranks)
    key = _ascending_key(flat)  # (n,) int32, smaller = more important

    before = torch.zeros(len(ranks), dtype=torch.int64)  # per-layer counts of items ranked before the candidates
    if costs.budget == 0:
        keep = torch.zeros(key.numel(), dtype=torch.bool)
    else:
        digit = key >> (32 - _TOP_BITS)
        digit += 1 << (_TOP_BITS - 1)  # the top digit carries the sign: shift it into [0, 2^bits) in key order
        bucket, before = costs.crossing_bucket(digit, layer_ids, 1 << _TOP_BITS, before)
        keep = digit < bucket
        members = torch.nonzero(digit == bucket).squeeze(1)  # candidates, as item indices
        unresolved = 32 - _TOP_BITS  # low key bits not yet used to split the candidates
        for shift, bits in _LOW_ROUNDS:
            member_keys = key.index_select(0, members)
            if members.numel() <= _SORT_BELOW or member_keys.min() == member_keys.max():
                break
            digit = (member_keys >> shift) & ((1 << bits) - 1)
            bucket, before = costs.crossing_bucket(digit, layer_ids.index_select(0, members), 1 << bits, before)
            keep.index_fill_(0, _where(members, digit < bucket), True)
            members = _where(members, digit == bucket)
            unresolved = shift
        # Order the candidates: tie-break order first (a long run of equal scores is picked out of the cached
        # order rather than sorted), then stably by their unresolved key bits.
        if members.numel() == tie_order.numel():
            members = tie_order
        elif members.numel() > tie_order.numel() // 16:
            in_run = torch.zeros_like(keep)
            in_run[members] = True
            members = _where(tie_order, in_run.index_select(0, tie_order))
        else:
            members = members.index_select(0, torch.argsort(tie_place.index_select(0, members)))
        low_bits = key.index_select(0, members) & ((1 << unresolved) - 1)
        if unresolved and low_bits.min() != low_bits.max():
            members = members.index_select(0, torch.sort(low_bits, stable=True).indices)
        member_layers = layer_ids.index_select(0, members)
        taken = costs.crossing_item(member_layers, before)
        keep.index_fill_(0, members[:taken], True)
        before = before + torch.bincount(member_layers[:taken], minlength=len(ranks))

    now_dense = before * costs.width >= costs.dense
    keep |= now_dense.index_select(0, layer_ids)  # a layer stored dense keeps all its ranks: they cost nothing more
    return list(keep.split(list(ranks))), int(costs.of(before))
