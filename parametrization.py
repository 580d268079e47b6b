"""SVD-parametrized linear layers for ACIP: the prunable form, the compressed form, and their 4-bit form.

A dense layer ``y = W x + b`` with ``W`` of shape (out, in) and ``k = min(in, out)`` is rewritten as

    y = U · diag(mask) · (S Vᵀ) x + b

with the two factors kept as plain ``nn.Linear`` children (``sv``: in -> k holding S·Vᵀ, ``u``: k -> out holding U
and the bias), so that bitsandbytes, peft ``"all-linear"`` and transformers' quantized loading see ordinary linear
layers. The full (out, in) weight is never materialised in the forward pass.

Compressed to rank r, a layer is stored in the form its model's cost rule prices (pruning.py): two plain factors
(:class:`LowRankLinear`, ``"factors"``) or gauge-aligned (:class:`AlignedLowRankLinear`, ``"aligned"``): the pair
``U_r·V_r`` (out, r)·(r, in) equals ``(U_r·A⁻¹)·(A·V_r)`` for any invertible (r, r) ``A``; taking for ``A`` the r rows
Q of ``U_r`` that span it best makes the first factor the identity on those rows, so only ``V' = A·V_r`` and the other
rows ``U'' = U_rest·A⁻¹`` are stored, r·(in + out − r) numbers instead of r·(in + out).

This file is part of the Hub payload: it imports only torch, optional bitsandbytes and its sibling pruning.py.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .pruning import is_dense_rank, rank_cost

try:  # optional: only quantize() needs it
    import bitsandbytes as bnb
except ImportError:
    bnb = None


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

    def _dense_weight(self) -> torch.Tensor:
        """The (out, in) product of the factors in float32."""
        return _plain_linear(self.u, "output").weight.float() @ _plain_linear(self.sv, "input").weight.float()

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


class AlignedLowRankLinear(nn.Module):
    """A rank-r linear map stored gauge-aligned: ``z = sv(x)`` is the output on r chosen rows, ``u(z)`` on the others.

    ``sv`` (in -> r) holds ``V' = U_Q·V``, ``u`` (r -> out − r) holds ``U'' = U_rest·U_Q⁻¹``, and ``order`` (out,)
    puts the rows back in place: ``y = cat(z, u(z))[..., order] + bias``. It stores r·(in + out − r) weights where
    plain factors store r·(in + out); the compressed form of an ACIP layer under the ``"aligned"`` cost rule. A rank-0
    layer holds an empty order (its output is its bias).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, device=None, dtype=None):
        super().__init__()
        if not 0 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank must be in [0, {min(in_features, out_features)}], got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.sv = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)  # V', (rank, in)
        self.u = nn.Linear(rank, out_features - rank, bias=False, device=device, dtype=dtype)  # U'', (out - rank, rank)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("order", torch.empty(out_features if rank else 0, dtype=torch.long, device=device))

    @property
    def rank(self) -> int:
        """Number of singular directions this layer holds."""
        return self.sv.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``cat(sv(x), u(sv(x)))`` with its rows put in order, plus the bias: (..., in) -> (..., r) -> (..., out)."""
        z = self.sv(x)
        return aligned_output(z, self.u(z), self.order, self.bias)

    def num_params(self) -> int:
        """Parameters of the layer as stored now (bias included); the row order is an index, not a parameter."""
        bias = self.out_features if self.bias is not None else 0
        return self.rank * (self.in_features + self.out_features - self.rank) + bias

    def _dense_weight(self) -> torch.Tensor:
        """The (out, in) weight this layer applies, in float32."""
        v = _plain_linear(self.sv, "input").weight.float()  # (r, in)
        stacked = torch.cat([v, _plain_linear(self.u, "output").weight.float() @ v])  # (out, in), rows Q first
        return stacked[self.order] if self.rank else stacked

    @torch.no_grad()
    def to_dense(self) -> nn.Linear:
        """An ordinary nn.Linear computing the same map."""
        return _dense_linear(self._dense_weight(), self.bias, self.sv.weight.dtype)

    @classmethod
    @torch.no_grad()
    def from_factors(cls, u: torch.Tensor, sv: torch.Tensor, bias: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None) -> "AlignedLowRankLinear":  # fmt: skip
        """The aligned form of ``u @ sv`` (u: (out, r), sv: (r, in)), computed in float64 on their device."""
        (out_features, rank), in_features = u.shape, sv.shape[1]
        dtype = dtype or sv.dtype
        with torch.device("meta"):
            layer = cls(in_features, out_features, rank, bias=bias is not None, dtype=dtype)
        rows = dominant_rows(u)  # (out,): the r rows Q first, then the others in order
        wide = u.double()
        top = wide[rows[:rank]]  # (r, r), well conditioned
        layer.sv.weight = nn.Parameter((top @ sv.double()).to(dtype))
        layer.u.weight = nn.Parameter(torch.linalg.solve(top, wide[rows[rank:]], left=False).to(dtype))
        layer.order = torch.argsort(rows) if rank else rows[:0]
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().to(dtype).clone())
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, aligned"


def aligned_output(z: torch.Tensor, rest: torch.Tensor, order: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The output of an aligned layer from ``z`` (..., r), its output on the rows Q, and ``rest`` (..., out − r),
    ``u(z)``, its output on the others."""
    y = torch.cat((z, rest), dim=-1).index_select(-1, order) if order.numel() else rest  # (..., out)
    return y + bias if bias is not None else y


@torch.no_grad()
def dominant_rows(u: torch.Tensor, tolerance: float = 0.05, max_swaps: int | None = None) -> torch.Tensor:
    """A permutation of the rows of ``u`` (out, r) whose first r rows Q span it well: every other row is a
    combination of them with coefficients of magnitude at most 1 + ``tolerance`` (a dominant submatrix).

    Rows are first chosen by Gaussian elimination with partial pivoting (LU), then improved by swapping in any row
    whose coefficient exceeds the bound (the maxvol iteration: each swap raises |det U_Q| by that coefficient), at
    most ``max_swaps`` times (default 2r). Bounded coefficients keep ``U''`` as small as the rows of U, so that it
    rounds (bf16) and quantizes (4-bit) as well as U does. Float64 throughout.
    """
    out_features, rank = u.shape
    if rank == 0:
        return torch.arange(out_features, device=u.device)
    wide = u.double()
    lu, pivots = torch.linalg.lu_factor(wide)  # pivots: LAPACK's row swaps, 1-based
    perm = list(range(out_features))
    for i, p in enumerate(pivots.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]
    chosen = torch.tensor(perm[:rank], device=u.device)
    coef = torch.linalg.solve(wide[chosen], wide, left=False)  # (out, r): u = coef @ u[Q]; coef[Q] = I
    for _ in range(2 * rank if max_swaps is None else max_swaps):
        flat = int(coef.abs().argmax())
        i, j = divmod(flat, rank)
        pivot = coef[i, j]
        if abs(float(pivot)) <= 1 + tolerance:
            break
        row = coef[i].clone()
        row[j] -= 1
        coef -= torch.outer(coef[:, j] / pivot, row)  # row i becomes e_j: row i takes column j's place in Q
        chosen[j] = i
    taken = torch.zeros(out_features, dtype=torch.bool, device=u.device)
    taken[chosen] = True
    return torch.cat([chosen, torch.nonzero(~taken).squeeze(1)])


class FactorCorrection(nn.Module):
    """Low-rank corrections of an SVD layer's two factors, ``sv + s·sv_b·sv_a`` and ``u + s·u_b·u_a``, applied with a
    strength ``s`` that grows with the share f of the layer's ranks that are pruned: ``s = min(1, f / ramp)``. A layer
    kept whole (f = 0) computes exactly its factors, so the full-size model is the base model; a pruned layer gets the
    correction tuned for pruned sizes (by the ACIP run's LoRA post-tuning).

    Plain parameters, not nn.Linear layers: peft's "all-linear" and quantize() leave them alone.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, correction_rank: int, ramp: float,
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        if not ramp > 0:
            raise ValueError(f"correction_ramp must be > 0, got {ramp!r}")
        self.ramp = float(ramp)
        self.sv_a = nn.Parameter(torch.empty(correction_rank, in_features, device=device, dtype=dtype))  # (c, in)
        self.sv_b = nn.Parameter(torch.empty(rank, correction_rank, device=device, dtype=dtype))  # (k, c)
        self.u_a = nn.Parameter(torch.empty(correction_rank, rank, device=device, dtype=dtype))  # (c, k)
        self.u_b = nn.Parameter(torch.empty(out_features, correction_rank, device=device, dtype=dtype))  # (out, c)

    def strength(self, pruned: float) -> float:
        """``s`` for a layer with the share ``pruned`` of its ranks pruned."""
        return min(1.0, pruned / self.ramp)

    def sv_delta(self, x: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """The correction of the input side's output, ``x -> sv_b·sv_a·x`` (..., in) -> (..., k or r)."""
        b = self.sv_b if kept is None else self.sv_b[kept]
        return F.linear(F.linear(x, self.sv_a.to(x.dtype)), b.to(x.dtype))

    def u_delta(self, h: torch.Tensor, kept: torch.Tensor | None = None) -> torch.Tensor:
        """The correction of the output side's output, ``h -> u_b·u_a·h`` (..., k or r) -> (..., out)."""
        a = self.u_a if kept is None else self.u_a[:, kept]
        return F.linear(F.linear(h, a.to(h.dtype)), self.u_b.to(h.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.sv_a.shape[0]}, ramp={self.ramp}"


class LayerLoRA(nn.Module):
    """A whole-layer low-rank term ``x -> b·a·x``, added to a prunable layer's output at every size: the LoRA of the
    original ACIP implementation (its ``(alpha / r)·B·A·x``, the scale folded into ``b``), kept by models converted
    from it. ``compress()`` stores it as ``rank`` extra, always-kept ranks of the layer's factors.

    Plain parameters, not nn.Linear layers: peft's "all-linear" and quantize() leave them alone.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))  # (r, in)
        self.b = nn.Parameter(torch.empty(out_features, rank, device=device, dtype=dtype))  # (out, r), scale folded in

    @property
    def rank(self) -> int:
        """Rank of the term."""
        return self.a.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``b·a·x``: (..., in) -> (..., r) -> (..., out)."""
        return F.linear(F.linear(x, self.a.to(x.dtype)), self.b.to(x.dtype))

    def extra_repr(self) -> str:
        return f"rank={self.rank}"


class SVDLinear(LowRankLinear):
    """The prunable ACIP layer: ``x -> U · (mask ⊙ S Vᵀ x)`` with a trainable mask and a score per singular value.

    The mask is float32 and acts through a straight-through estimator: the forward pass uses ``c`` where the mask is
    positive and 0 elsewhere, the backward pass treats it as ``relu(mask)``. ``u`` holds ``U / c`` so that the layer
    reproduces the original weight exactly while every mask entry sits at its initial value ``c``. The float32
    ``score`` buffer ranks the singular values for pruning (higher = more important). With ``correction_rank`` > 0 the
    layer holds a :class:`FactorCorrection` that it applies once it is pruned; with ``lora_rank`` > 0 a
    :class:`LayerLoRA` (``layer_lora``) that it adds at every size.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mask_constant: float = 2e-2,
        device=None,
        dtype=None,
        correction_rank: int = 0,
        correction_ramp: float = 0.0,
        lora_rank: int = 0,
    ):
        rank = min(in_features, out_features)
        super().__init__(in_features, out_features, rank, bias=bias, device=device, dtype=dtype)
        self.mask_constant = mask_constant
        self.mask = nn.Parameter(torch.full((rank,), mask_constant, dtype=torch.float32, device=device))
        self.register_buffer("score", torch.full((rank,), mask_constant, dtype=torch.float32, device=device))
        self.correction = None
        if correction_rank:
            self.correction = FactorCorrection(in_features, out_features, rank, correction_rank, correction_ramp,
                                               device=device, dtype=dtype)  # fmt: skip
        self.layer_lora = LayerLoRA(in_features, out_features, lora_rank, device, dtype) if lora_rank else None

    @property
    def lora_rank(self) -> int:
        """Rank of the whole-layer term (:class:`LayerLoRA`), 0 without one: ranks ``compress()`` stores on top of
        the kept ones."""
        return 0 if self.layer_lora is None else self.layer_lora.rank

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, mask_constant: float = 2e-2) -> "SVDLinear":
        """Factorize a dense layer by the SVD of its weight, in float32 on the layer's device; the result reproduces
        it exactly, keeps the layer's dtype and shares its bias tensor. Every score starts at ``mask_constant``."""
        u, s, vh = torch.linalg.svd(linear.weight.float(), full_matrices=False)  # (out, k), (k,), (k, in)
        return cls.from_svd(u, s, vh, linear.bias, mask_constant, dtype=linear.weight.dtype)

    @classmethod
    @torch.no_grad()
    def from_svd(
        cls,
        u: torch.Tensor,
        s: torch.Tensor,
        vh: torch.Tensor,
        bias: torch.Tensor | None = None,
        mask_constant: float = 2e-2,
        score: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SVDLinear":
        """A layer computing ``U · diag(s) · Vh`` (+ bias) from SVD outputs u (out, k), s (k,), vh (k, in), on their
        device, in ``dtype`` (default: u's).

        The factors are made in place from the given tensors (``U / c`` and ``diag(s) · Vh``; only the cast to
        ``dtype`` copies), so that building a model layer by layer never holds more than the finished model plus one
        layer. ``bias`` is shared, not copied. Scores start at ``score`` (k,), or at ``mask_constant`` when None. For
        a whitened basis, W·L = U S Vᵀ, the caller passes Vᵀ·L⁻¹ as ``vh``.
        """
        (out_features, k), in_features = u.shape, vh.shape[-1]
        if s.shape != (k,) or vh.shape != (k, in_features) or k != min(in_features, out_features):
            raise ValueError(f"u {tuple(u.shape)}, s {tuple(s.shape)}, vh {tuple(vh.shape)} are not a thin SVD")
        if not mask_constant > 0:
            raise ValueError(f"mask_constant must be > 0, got {mask_constant!r}")
        dtype = dtype or u.dtype
        with torch.device("meta"):  # the structure only; every tensor is put in below
            layer = cls(in_features, out_features, bias=bias is not None, mask_constant=mask_constant, dtype=dtype)
        layer.sv.weight = nn.Parameter(vh.mul_(s[:, None]).to(dtype))
        layer.u.weight = nn.Parameter(u.div_(mask_constant).to(dtype))
        if bias is not None:
            layer.u.bias = nn.Parameter(bias.detach().to(dtype))
        layer.mask = nn.Parameter(torch.full((k,), mask_constant, dtype=torch.float32, device=u.device))
        scores = torch.full_like(layer.mask, mask_constant) if score is None else score.detach().to(layer.mask)
        layer.score = scores.requires_grad_(False)
        return layer

    def mask_value(self) -> torch.Tensor:
        """The mask as the forward pass uses it: ``c`` where alive, 0 where pruned; gradient as for ``relu(mask)``."""
        alive = F.relu(self.mask)  # (k,)
        hard = (alive.detach() > 0).to(alive.dtype) * self.mask_constant
        return hard + (alive - alive.detach())  # exactly ``hard`` forward; relu's gradient backward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``u(mask_value ⊙ sv(x))``, with the correction at its strength; pruned singular values contribute
        nothing."""
        strength = self.correction_strength()
        kept = self._pruned_index() if self._can_skip_pruned() else None
        if kept is not None:
            # Without gradients a pruned rank is pure waste: compute the kept ones only, as compress() would.
            h = F.linear(x, self.sv.weight[kept])  # (..., r)
            if strength:
                h = h + strength * self.correction.sv_delta(x, kept)
            h = h * self.mask_constant
            y = F.linear(h, self.u.weight[:, kept], self.u.bias)
            y = y + strength * self.correction.u_delta(h, kept) if strength else y
            return y if self.layer_lora is None else y + self.layer_lora(x)
        h = self.sv(x)  # (..., k)
        if strength:
            h = h + strength * self.correction.sv_delta(x)
        h = h * self.mask_value().to(h.dtype)
        y = self.u(h)
        y = y + strength * self.correction.u_delta(h) if strength else y
        return y if self.layer_lora is None else y + self.layer_lora(x)

    def correction_strength(self) -> float:
        """The strength the correction applies with at the current mask: 0 without one or while nothing is pruned."""
        if self.correction is None or self.mask.is_meta:
            return 0.0
        self._pruned_index()
        return self.correction.strength(1 - self._kept_cache[2] / self.rank)

    def _can_skip_pruned(self) -> bool:
        # Only plain factors: adapters (peft) or quantized layers around them must see the full rank.
        return not torch.is_grad_enabled() and type(self.sv) is nn.Linear and type(self.u) is nn.Linear

    def _pruned_index(self) -> torch.Tensor | None:
        """Indices of the kept ranks, or None when nothing is pruned; cached until the mask changes."""
        version = (self.mask._version, self.mask.data_ptr())
        if getattr(self, "_kept_cache", (None,))[0] != version:
            keep = self.mask.detach() > 0
            index = None if bool(keep.all()) else torch.nonzero(keep).squeeze(1)
            self._kept_cache = (version, index, keep.numel() if index is None else index.numel())
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

    def num_params(self, rule: str = "aligned") -> int:
        """Parameters the layer will have once compressed at its current mask under cost ``rule`` (bias included)."""
        bias = self.out_features if self.bias is not None else 0
        return rank_cost(int(self.kept.sum()), self.in_features, self.out_features, rule) + bias

    @torch.no_grad()
    def compressed(self, rule: str = "aligned") -> nn.Module:
        """The physically small layer for the current mask in the form cost ``rule`` prices: the kept ranks
        gauge-aligned (:class:`AlignedLowRankLinear`, "aligned") or as sliced factors (:class:`LowRankLinear`,
        "factors"), or a dense nn.Linear where the rule stores it dense. Each computes the map this layer computes now.
        A :class:`LayerLoRA` term becomes extra ranks of the factors (``[sv; a]``, ``[u | b]``), or merged into the
        weight of a layer stored dense.
        """
        keep = self.kept
        dtype = _plain_linear(self.sv, "input").weight.dtype
        u, sv = self.effective_factors(keep)
        if self.layer_lora is not None:
            u = torch.cat([u, self.layer_lora.b.float()], dim=1)  # (out, r + lora_rank)
            sv = torch.cat([sv, self.layer_lora.a.float()], dim=0)  # (r + lora_rank, in)
        rank = sv.shape[0]
        if rank > self.rank or is_dense_rank(rank, self.in_features, self.out_features, rule):
            return _dense_linear(u @ sv, self.bias, dtype)
        if rule == "aligned":
            return AlignedLowRankLinear.from_factors(u, sv, self.bias, dtype)
        layer = LowRankLinear(self.in_features, self.out_features, rank, self.bias is not None, sv.device, dtype)
        layer.sv.weight.copy_(sv)
        layer.u.weight.copy_(u)
        if self.bias is not None:
            layer.u.bias.copy_(self.bias)
        return layer

    @torch.no_grad()
    def effective_factors(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors this layer applies to its kept ranks ``keep`` (k,) at the current mask, in float32: the output
        factor (out, r) with the mask constant folded in, and the input factor (r, in), each with its correction at
        the current strength."""
        sv = _plain_linear(self.sv, "input").weight[keep].float()  # (r, in)
        u = _plain_linear(self.u, "output").weight[:, keep].float()  # (out, r)
        strength = self.correction_strength()
        if strength:
            c = self.correction
            sv = sv + strength * c.sv_b[keep].float() @ c.sv_a.float()
            u = u + strength * c.u_b.float() @ c.u_a[:, keep].float()
        return u * self.mask_constant, sv

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


def to_4bit(linear: nn.Linear, quant_type: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes 4-bit copy of ``linear`` ("nf4" or "fp4"), quantized on the layer's own device."""
    if bnb is None:
        raise ImportError("quantize() needs bitsandbytes: pip install bitsandbytes")
    layer = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=compute_dtype,
        compress_statistics=False,
        quant_type=quant_type,
        device="meta",
    )
    layer.weight = bnb.nn.Params4bit(
        linear.weight.data, requires_grad=False, quant_type=quant_type, compress_statistics=False, module=layer
    ).to(linear.weight.device)
    if linear.bias is not None:
        layer.bias = linear.bias
    keep_4bit_cpu_path_safe(layer)
    return layer


def keep_4bit_cpu_path_safe(model: nn.Module) -> None:
    """Turn off bitsandbytes' AVX512-BF16 CPU path on every 4-bit layer of ``model``.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 repacks the weight in place on the first no-grad eval forward, after
    which training forwards lose their input gradient, and the packed path fails when in_features % 64 != 0.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
