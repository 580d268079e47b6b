"""What a pruned model costs, and which singular values to keep: pure functions of (scores, layer shapes, storage).

A cost rule prices a layer of rank r with an (out, in) weight; it belongs to the model (``ACIPConfig.rank_cost``):

- ``"aligned"`` (new models): ``r·(in + out − r)`` weights. ``compress()`` stores the factor pair gauge-aligned: of
  ``W = U·V`` it keeps ``V' = U_Q·V`` (r, in) and ``U'' = U_rest·U_Q⁻¹`` (out − r, r) for r chosen output rows Q, so
  the rows Q of the layer's output are ``V'x`` itself and the others ``U''·V'x``. Every rank below min(in, out) then
  saves weights; a layer is stored dense only where the aligned pair would save fewer weights than the ``out``
  entries of the row order it needs, ``(in − r)·(out − r) < out``.
- ``"factors"`` (the original implementation's, kept by models converted from it): ``r·(in + out)`` as two plain
  factors, or ``in·out`` stored dense when that is not larger.

Bytes follow from the rule for a storage dtype (a torch dtype; bitsandbytes 4-bit ``"nf4"``/``"fp4"``: two values per
byte plus one float32 absmax per block of 64 weights; ``"int8"``: one byte per weight of rows padded to 16, a bf16
scale per row; ``"int4"``: two values per byte of rows padded to groups of 64 and a row count padded to 16, a bf16
scale and offset per group); an aligned layer adds its row order (int64, ``out`` entries).

The planner ranks every singular value of every layer once, globally (:class:`Ranking`), and answers each prune of
that score map by a search over prefix costs of the ranking: by a weight budget (``compression_ratio``) or by a byte
budget (``memory_budget``). No weights are needed, so it runs on a 7B-scale score map in milliseconds.

Which prefixes a prune may take is the model's selection (``ACIPConfig.selection``): ``"ranked"`` (acip's) any
prefix, ties cut by the tie-break order, a layer stored dense keeping all its ranks, and the smallest size at or
above the target; ``"threshold"`` (the original implementation's, kept by models converted from it) only the sets
``score > t`` for a threshold t, so equal scores are kept or pruned together and a layer keeps just those, the
smallest such size strictly above the target, at least the lowest-scored block pruned (ratio 1.0 keeps everything).

This file is part of the Hub payload: it imports only torch.
"""

import functools
import math
import numbers
import re
import weakref

import torch

BNB_TYPES = ("nf4", "fp4")  # bitsandbytes 4-bit
INT_TYPES = ("int8", "int4")  # weight-only integers with torch's CPU kernels (quantization.py)
QUANT_TYPES = BNB_TYPES + INT_TYPES
QUANT_BLOCK = 64  # bitsandbytes 4-bit: one float32 absmax per block of 64 weights (compress_statistics off)
INT8_COLUMNS = 16  # int8 rows are stored padded to a multiple of this (the kernel's requirement), one bf16 scale each
INT4_GROUP = 64  # int4: one bf16 scale and offset per group of this many weights of a row; rows padded to groups
INT4_ROWS = 16  # int4: the row count is padded to a multiple of this (the kernel's requirement)
RANK_COSTS = ("aligned", "factors")
SELECTIONS = ("ranked", "threshold")
ORDER_BYTES = 8  # an aligned layer's row order: one int64 per output feature
BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


# --------------------------------------------------------------------------------------------------------------------
# The cost rule, in weights and in bytes. Each function takes ints, or integer tensors (elementwise, broadcasting).
# --------------------------------------------------------------------------------------------------------------------


def check_rank_cost(rule: str) -> str:
    """``rule`` if it is one of :data:`RANK_COSTS`; a clear error otherwise."""
    if rule not in RANK_COSTS:
        raise ValueError(f"rank_cost must be one of {RANK_COSTS}, got {rule!r}")
    return rule


def check_selection(selection: str) -> str:
    """``selection`` if it is one of :data:`SELECTIONS`; a clear error otherwise."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return selection


def is_dense_rank(rank, in_features, out_features, rule="aligned"):
    """Whether a layer of ``rank`` is stored dense after compression under cost ``rule``: the factors would not be
    smaller (``"factors"``), or the aligned pair would save fewer weights than its row order holds (``"aligned"``)."""
    if rule == "aligned":
        return (in_features - rank) * (out_features - rank) < out_features
    return rank * (in_features + out_features) >= in_features * out_features


def rank_cost(rank, in_features, out_features, rule="aligned"):
    """Weights a layer of ``rank`` costs once compressed (bias excluded) under cost ``rule``: its factors, or
    ``in·out`` where it is stored dense."""
    dense = in_features * out_features
    width = in_features + out_features - rank if rule == "aligned" else in_features + out_features
    factors = rank * width
    is_dense = is_dense_rank(rank, in_features, out_features, rule)
    if isinstance(is_dense, torch.Tensor):
        return torch.where(is_dense, dense, factors)
    return dense if is_dense else factors


def stored_rank(rank, in_features, out_features, extra_rank: int = 0):
    """The rank a layer keeping ``rank`` singular values stores with ``extra_rank`` always-kept ranks on top (a
    whole-layer LoRA term), capped at min(in, out): beyond it the layer is stored dense under either rule."""
    if not extra_rank:
        return rank
    if isinstance(rank, torch.Tensor):
        full = torch.minimum(torch.as_tensor(in_features), torch.as_tensor(out_features))
        return torch.minimum(rank + extra_rank, full)
    return min(rank + extra_rank, in_features, out_features)


def first_dense_rank(in_features: torch.Tensor, out_features: torch.Tensor, rule="aligned") -> torch.Tensor:
    """(L,) the smallest rank at which each layer is stored dense under ``rule`` (at most min(in, out)), by a
    binary search over ranks: :func:`is_dense_rank` is monotone in the rank."""
    lo = torch.zeros_like(in_features)  # not dense (a rank-0 layer costs nothing)
    hi = torch.minimum(in_features, out_features)  # dense
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        dense = is_dense_rank(mid, in_features, out_features, rule)
        lo, hi = torch.where(dense, lo, mid), torch.where(dense, mid, hi)
    return hi


def padded(n, multiple: int):
    """``n`` rounded up to a multiple of ``multiple`` (ints or integer tensors)."""
    return (n + multiple - 1) // multiple * multiple


def tensor_bytes(numel, storage, rows=1):
    """Bytes of a weight of ``numel`` values in ``rows`` rows stored as ``storage`` (a torch dtype, or a quant type;
    the integer types pad rows and keep constants per row or group, so they need ``rows``)."""
    if storage in INT_TYPES:
        cols = numel // (rows.clamp(min=1) if isinstance(rows, torch.Tensor) else max(rows, 1))
        if storage == "int8":  # int8 values, one bf16 scale per row
            size = rows * padded(cols, INT8_COLUMNS) + 2 * rows
        else:  # two values per byte, a bf16 scale and offset per group, rows padded
            n, k = padded(rows, INT4_ROWS), padded(cols, INT4_GROUP)
            size = n * k // 2 + 4 * n * (k // INT4_GROUP)
        return size * (numel > 0)  # an empty factor stays a plain (empty) layer
    if isinstance(storage, str):  # two values per byte, plus the float32 absmax of every block
        return (numel + 1) // 2 + 4 * ((numel + QUANT_BLOCK - 1) // QUANT_BLOCK)
    return numel * storage.itemsize


def layer_bytes(rank, in_features, out_features, storage, rule="aligned"):
    """Bytes of a layer's weights compressed to ``rank`` (bias excluded), by the same rule as :func:`rank_cost`; in
    4 bits (int4, nf4, fp4) by the form quantize() stores them in whatever the rule: two balanced plain factors, or
    dense where those would not be smaller."""
    dense = tensor_bytes(in_features * out_features, storage, out_features)
    if storage == "int4" or storage in BNB_TYPES:
        factors = tensor_bytes(rank * in_features, storage, rank) + tensor_bytes(rank * out_features, storage,
                                                                                 out_features)  # fmt: skip
        is_dense = is_dense_rank(rank, in_features, out_features, "factors")
        if isinstance(is_dense, torch.Tensor):
            return torch.where(is_dense, dense, factors)
        return dense if is_dense else factors
    if rule == "aligned":  # V' (rank, in), U'' (out - rank, rank) and the row order
        rows = out_features - rank
        factors = tensor_bytes(rank * in_features, storage, rank) + tensor_bytes(rows * rank, storage, rows)
        factors = factors + ORDER_BYTES * out_features * (rank > 0)  # a rank-0 layer needs no row order
    else:
        factors = tensor_bytes(rank * in_features, storage, rank) + tensor_bytes(rank * out_features, storage,
                                                                                 out_features)  # fmt: skip
    is_dense = is_dense_rank(rank, in_features, out_features, rule)
    if isinstance(is_dense, torch.Tensor):
        return torch.where(is_dense, dense, factors)
    return dense if is_dense else factors


def stored_bytes(tensor: torch.Tensor, storage, quantized: bool = False) -> int:
    """Bytes ``tensor`` takes once the model is stored as ``storage``: 4 bits when ``quantized`` (quantize() turns it
    into a 4-bit layer), the storage dtype when that is a torch dtype and the tensor is float, else as it is now."""
    if quantized:
        return tensor_bytes(tensor.numel(), storage, tensor.shape[0] if tensor.dim() == 2 else 1)
    if tensor.is_floating_point() and isinstance(storage, torch.dtype):
        return tensor.numel() * storage.itemsize  # model.to(dtype) converts every float tensor
    return tensor.numel() * tensor.element_size()


# --------------------------------------------------------------------------------------------------------------------
# User input: budgets and storage.
# --------------------------------------------------------------------------------------------------------------------


def parse_bytes(value) -> int:
    """A memory size in bytes: an int, or a string such as ``"300MB"`` or ``"1.5 GiB"`` (MB = 10⁶ B, MiB = 2²⁰ B)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(value).lower())
        if isinstance(value, bool) or match is None or match.group(2) not in BYTE_UNITS:
            raise ValueError(
                f"memory_budget must be a number of bytes or a string like '300MB' or '1.5GiB' (units: "
                f"{', '.join(u for u in BYTE_UNITS if u)}), got {value!r}"
            )
        number = int(float(match.group(1)) * BYTE_UNITS[match.group(2)])
    if number <= 0:
        raise ValueError(f"memory_budget must be positive, got {value!r}")
    return number


def check_ratio(compression_ratio, size_ratio, compression_rate=None) -> float:
    """The one target ratio given by any of its names (``compression_rate``, the original implementation's, is the
    fraction removed: 1 − ratio); a clear error for anything that is not a number in [0, 1], or names that disagree."""
    named = {"compression_ratio": compression_ratio, "size_ratio": size_ratio, "compression_rate": compression_rate}
    given = {k: v for k, v in named.items() if v is not None}
    if not given:
        raise TypeError("prune_model_by_score() needs compression_ratio (the fraction of parameters kept, in [0, 1])")
    for name, value in given.items():
        meaning = "removed" if name == "compression_rate" else "kept"
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number in [0, 1] (the fraction of parameters {meaning}), got {value!r}")
        if not (0.0 <= float(value) <= 1.0):  # NaN fails this too
            raise ValueError(f"{name} must be in [0, 1] (the fraction of parameters {meaning}), got {value!r}")
    ratios = {k: 1.0 - float(v) if k == "compression_rate" else float(v) for k, v in given.items()}
    if max(ratios.values()) - min(ratios.values()) > 1e-12:
        shown = " and ".join(f"{k}={v!r}" for k, v in given.items())
        raise ValueError(
            f"{shown} disagree; they give one target (the fraction of parameters kept, or with compression_rate the "
            "fraction removed): pass one"
        )
    return ratios.get("compression_ratio", ratios.get("size_ratio", next(iter(ratios.values()))))


def ratio_budget(ratio: float, total: int, fixed: int, full: bool, strict: bool = False) -> int:
    """Weights the target layers may cost so that (their cost + ``fixed``) / ``total`` reaches ``ratio`` (with
    ``strict``, exceeds it, compared in floats as the original implementation compares): ``fixed`` counts what
    pruning does not shrink (biases, and with ``full`` the rest of the model)."""
    if ratio * total < fixed - 1e-6:
        raise ValueError(
            f"compression_ratio={ratio} is below what full={full} allows: with the uncompressed parts counted "
            f"the ratio must be in [{fixed / total:.4f}, 1]"
        )
    if not strict:
        return math.ceil(ratio * total - fixed - 1e-6)
    budget = max(0, math.floor(ratio * total - fixed))
    while (budget + fixed) / total <= ratio:
        budget += 1
    while budget > 0 and (budget - 1 + fixed) / total > ratio:
        budget -= 1
    return budget


def bytes_budget(memory_budget, fixed: int, storage) -> int:
    """Bytes the target layers' weights may take within ``memory_budget`` when the rest takes ``fixed`` bytes."""
    budget = parse_bytes(memory_budget)
    if fixed > budget:
        raise ValueError(
            f"memory_budget={memory_budget!r} ({budget:,} bytes) is below the smallest this model can be in "
            f"{storage}: it must be at least {fixed:,} bytes (every rank pruned; the uncompressed parts remain)"
        )
    return budget - fixed


def check_scores(name: str, scores, shape: torch.Size) -> torch.Tensor:
    """``score_map[name]`` as float32 scores of ``shape``: real numbers (±inf allowed: they rank first or last)."""
    try:
        scores = torch.as_tensor(scores).detach()
    except (TypeError, ValueError, RuntimeError) as error:
        raise TypeError(f"score_map[{name!r}] must be a tensor of real numbers, got {type(scores).__name__}") from error
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"score_map[{name!r}] must hold real numbers, got dtype {scores.dtype}")
    if scores.shape != shape:
        raise ValueError(f"score_map[{name!r}] must have shape {tuple(shape)}, got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError(f"score_map[{name!r}] contains NaN; scores must be numbers")
    return scores.float()


def check_storage(dtype):
    """``dtype`` if it names a storage bytes can be counted for: a floating torch dtype, or a quant type."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point or isinstance(dtype, str) and dtype in QUANT_TYPES:
        return dtype
    raise ValueError(f"dtype must be a floating torch dtype or one of {QUANT_TYPES}, got {dtype!r}")


# --------------------------------------------------------------------------------------------------------------------
# The global ranking, sorted once per score map.
# --------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _shape_tables(ranks: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each item's layer id, and the tie-break order of all items: by relative position ``i / k`` in its layer, then
    by layer. Shape-only, so cached: a model's shapes do not change between score maps. int32: gathers by int32
    indices are several times faster than by int64 ones on large tensors."""
    layer_ids = torch.repeat_interleave(torch.arange(len(ranks), dtype=torch.int32), torch.tensor(ranks))  # (n,)
    relative = torch.cat([torch.div(torch.arange(k) << 30, k, rounding_mode="floor") for k in ranks])  # i/k · 2^30
    tie_order = torch.sort(relative.to(torch.int32), stable=True).indices  # stable: layer order breaks ties
    return layer_ids, tie_order.to(torch.int32)


def _descending_key(flat: torch.Tensor) -> torch.Tensor:
    """int32 keys whose ascending order is the descending order of the float32 ``flat`` (equal scores stay equal).

    Integer keys because torch sorts them by radix, several times faster than floats. Overwrites ``flat``."""
    flat.add_(0.0)  # -0.0 becomes +0.0, so that the two tie
    bits = flat.view(torch.int32)
    bits ^= (bits >> 31) & 0x7FFFFFFF  # IEEE sign-magnitude -> two's complement order
    return bits.bitwise_not_()  # reverses the order without overflow


class Ranking:
    """One score map's global order of all singular values, sorted once; it then answers any number of prunes.

    Order: score descending; ties by relative position ``i / k`` within the layer (larger singular values first), then
    by layer order; -0.0 ties +0.0, ±inf are scores like any other, NaN is rejected. A block of equal scores (an
    untrained map, or masks that died on the same step) is thereby cut evenly across layers.

    A prefix of the order keeps, in each layer, its items in the prefix; a layer whose kept ranks reach the dense
    cost keeps all its ranks (they cost nothing more; not under the threshold selection, where a layer keeps just
    its scores above the threshold). Walking the order, each item adds what its layer's next rank costs, so the
    cost of every prefix is one cumulative sum, and a budget is met by one binary search over it.
    Holds about 20 bytes per score, plus 8 per score for each storage a memory budget was asked in.
    """

    def __init__(self, scores: list[torch.Tensor], shapes: list[tuple[int, int]], rule: str = "aligned"):
        self.rule = check_rank_cost(rule)
        self.ranks = tuple(int(s.numel()) for s in scores)
        self.shapes = [(int(i), int(o)) for i, o in shapes]
        if len(self.shapes) != len(self.ranks):
            raise ValueError(f"{len(self.ranks)} score vectors for {len(self.shapes)} layer shapes")
        for rank, (in_features, out_features) in zip(self.ranks, self.shapes):
            if rank != min(in_features, out_features):
                raise ValueError(f"a score vector of length {rank} does not fit a {out_features}x{in_features} layer")
        self._sources = [(weakref.ref(s), s._version, s.data_ptr()) for s in scores]
        flat = torch.cat([s.detach().to(device="cpu", dtype=torch.float32).flatten() for s in scores])  # (n,), a copy
        if not torch.isfinite(flat.sum()) and torch.isnan(flat).any():  # the sum is a cheap first test
            raise ValueError("the score map contains NaN; scores must be numbers")
        n = flat.numel()
        layer_ids, tie_order = _shape_tables(self.ranks)
        key = _descending_key(flat).index_select(0, tie_order)  # (n,) in tie-break order
        order = tie_order.index_select(0, torch.argsort(key, stable=True).to(torch.int32))  # (n,) items, best first
        place = torch.empty(n, dtype=torch.int32)  # (n,) each item's position in the order
        place.scatter_(0, order.long(), torch.arange(n, dtype=torch.int32))
        self._places = place.split(list(self.ranks))  # (k,) per layer
        self._layer_of = layer_ids.index_select(0, order)  # (n,) the layer of each position
        by_layer = torch.argsort(self._layer_of, stable=True)  # (n,) positions, grouped by layer, ascending in each
        starts = torch.tensor([0, *self.ranks[:-1]], dtype=torch.int64).cumsum(0)  # (L,) where each group begins
        self._taken = torch.empty(n, dtype=torch.int32)  # (n,) ranks of its layer kept before each position
        self._taken.scatter_(0, by_layer, (torch.arange(n) - starts.index_select(0, layer_ids)).to(torch.int32))
        self.in_features = torch.tensor([i for i, _ in self.shapes], dtype=torch.int64)  # (L,)
        self.out_features = torch.tensor([o for _, o in self.shapes], dtype=torch.int64)  # (L,)
        first_dense = first_dense_rank(self.in_features, self.out_features, rule)  # (L,) smallest rank stored dense
        self._dense_from = by_layer.index_select(0, starts + first_dense - 1) + 1  # (L,) prefixes that make it dense
        self.cost = self._prefix_totals(lambda r, i, o: rank_cost(r, i, o, rule))  # (n + 1,) weights of every prefix
        self._bytes = {}

    def _prefix_totals(self, price) -> torch.Tensor:
        """(n + 1,) ``price`` (a function of rank, in_features, out_features) summed over the layers, at every prefix
        length: what each position adds to its layer, accumulated."""
        in_features = self.in_features.index_select(0, self._layer_of)  # (n,)
        out_features = self.out_features.index_select(0, self._layer_of)  # (n,)
        taken = self._taken.long()
        added = price(taken + 1, in_features, out_features) - price(taken, in_features, out_features)  # (n,)
        return torch.cat([added.new_zeros(1), added.cumsum(0)])

    def bytes(self, storage, extra_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(n + 1,) bytes of the compressed layers' weights in ``storage`` at every prefix length, and their suffix
        minimum: the fewest bytes of this or any longer prefix (computed once per storage). ``extra_rank``: ranks
        every layer stores on top of its kept ones (a whole-layer LoRA term, see :func:`stored_rank`).

        Bytes are not monotone in the prefix: a layer turning dense gives some back (an aligned layer's row order
        goes, in 4 bits two partly filled blocks of absmax become one). The longest prefix that fits a budget is the
        last position whose suffix minimum fits, found by one search; a larger budget finds a longer one (nested)."""
        if (storage, extra_rank) not in self._bytes:
            price = lambda r, i, o: layer_bytes(stored_rank(r, i, o, extra_rank), i, o, storage, self.rule)  # noqa: E731
            sizes = self._prefix_totals(price) + price(torch.zeros_like(self.in_features), self.in_features,
                                                       self.out_features).sum()  # fmt: skip
            self._bytes[storage, extra_rank] = sizes, sizes.flip(0).cummin(0).values.flip(0)
        return self._bytes[storage, extra_rank]

    def is_for(self, scores: list[torch.Tensor], shapes: list[tuple[int, int]], rule: str) -> bool:
        """Whether this ranking still describes ``scores`` under cost ``rule``: the same tensors, unchanged since
        (their in-place version counter and storage). Writes that bypass the counter (``.data``, numpy views) are not
        seen."""
        if rule != self.rule or len(scores) != len(self._sources):
            return False
        if [(int(i), int(o)) for i, o in shapes] != self.shapes:
            return False
        return all(
            ref() is s and s._version == version and s.data_ptr() == pointer
            for (ref, version, pointer), s in zip(self._sources, scores)
        )

    def alive(self) -> bool:
        """Whether every score tensor it was built from still exists."""
        return all(ref() is not None for ref, _, _ in self._sources)

    def rounded_ranks(self, prefix: int, multiple: int, whole: bool = True) -> torch.Tensor:
        """(L,) each layer's kept rank for the first ``prefix`` items, rounded up to a multiple of ``multiple`` (at
        most its full rank); with ``whole``, a layer whose rounded rank is stored dense keeps its full rank."""
        counts = torch.bincount(self._layer_of[:prefix], minlength=len(self.ranks))  # (L,)
        full = torch.tensor(self.ranks, dtype=torch.int64)
        rounded = torch.minimum((counts + multiple - 1) // multiple * multiple, full)
        if not whole:
            return rounded
        return torch.where(is_dense_rank(rounded, self.in_features, self.out_features, self.rule), full, rounded)

    def rounded_cost(self, prefix: int, multiple: int, storage=None, extra_rank: int = 0, whole: bool = True) -> int:
        """Weights (or with ``storage``, bytes, each layer storing ``extra_rank`` more ranks) of the plan that rounds
        the first ``prefix`` items' ranks up."""
        ranks, ins, outs = self.rounded_ranks(prefix, multiple, whole), self.in_features, self.out_features
        if storage is None:
            return int(rank_cost(ranks, ins, outs, self.rule).sum())
        return int(layer_bytes(stored_rank(ranks, ins, outs, extra_rank), ins, outs, storage, self.rule).sum())

    def keep_ranks(self, ranks: torch.Tensor) -> list[torch.Tensor]:
        """One boolean keep mask (k,) per layer keeping its ``ranks[l]`` best items, by the global order."""
        if not hasattr(self, "_sorted_places"):
            self._sorted_places = [p.sort().values for p in self._places]
        ranks = ranks.tolist()
        return [p < (s[r - 1] + 1 if r else 0) for p, s, r in zip(self._places, self._sorted_places, ranks)]

    def keep(self, prefix: int, whole: bool = True) -> list[torch.Tensor]:
        """One boolean keep mask (k,) per layer for the first ``prefix`` items: one comparison per score. With
        ``whole``, a layer stored dense keeps all its ranks: they cost no more."""
        dense = (self._dense_from <= prefix).tolist() if whole else [False] * len(self.ranks)
        # Layer by layer: each comparison is small enough to run on one thread, while one (n,) comparison would be
        # split across threads and, on a busy machine, wait for the slowest (about a scheduler tick, ~8 ms here).
        return [torch.ones_like(p, dtype=torch.bool) if d else p < prefix for p, d in zip(self._places, dense)]


    def threshold_prefixes(self) -> torch.Tensor:
        """(B,) the prefix lengths, ascending, that keep exactly the scores above some threshold: 0, n, and every
        position where the score changes (a block of equal scores is never split). Computed once."""
        if not hasattr(self, "_thresholds"):
            flat = torch.cat([ref().detach().to(device="cpu", dtype=torch.float32).flatten()
                              for ref, _, _ in self._sources])  # fmt: skip
            key = torch.empty_like(flat, dtype=torch.int32)
            key[torch.cat(self._places).long()] = _descending_key(flat)  # (n,) in order: ascending
            change = torch.nonzero(key[1:] != key[:-1]).squeeze(1) + 1
            self._thresholds = torch.cat([torch.zeros(1, dtype=torch.int64), change, torch.tensor([key.numel()])])
            self._thresholds = self._thresholds.unique_consecutive()
        return self._thresholds


_RANKINGS: list[Ranking] = []  # the last few score maps seen, most recent last
_KEPT_RANKINGS = 4


def ranking(scores: list[torch.Tensor], shapes: list[tuple[int, int]], rule: str = "aligned") -> Ranking:
    """The :class:`Ranking` of a score map under cost ``rule``: sorted when the map is new or changed, else the cached
    one."""
    for cached in _RANKINGS:
        if cached.is_for(scores, shapes, rule):
            return cached
    fresh = Ranking(scores, shapes, rule)
    _RANKINGS[:] = [r for r in _RANKINGS if r.alive()][-(_KEPT_RANKINGS - 1) :] + [fresh]
    return fresh


def _search(lo: int, hi: int, fits) -> int:
    """The largest ``p`` in [lo, hi] with ``fits(p)``, given ``fits(lo)`` and that ``fits`` is monotone."""
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _check_multiple(rank_multiple) -> int:
    """``rank_multiple`` as a positive int; a clear error otherwise."""
    if isinstance(rank_multiple, bool) or not isinstance(rank_multiple, numbers.Integral) or rank_multiple < 1:
        raise ValueError(f"rank_multiple must be a positive integer (e.g. 8, 16, 64), got {rank_multiple!r}")
    return int(rank_multiple)


def plan_pruning(
    scores: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int, rank_multiple: int = 1,
    rule: str = "aligned", selection: str = "ranked",
) -> tuple[list[torch.Tensor], int]:
    """Choose which singular values to keep so that the compressed layers cost at least ``budget`` weights, by as
    little as one rank allows: the shortest prefix of the global ranking (see :class:`Ranking`) whose cost reaches
    ``budget``. Kept sets are nested: a larger budget keeps a superset.

    With ``rank_multiple`` m > 1, each layer's kept rank of a prefix is rounded up to a multiple of m (or to its full
    rank), keeping the layer's next best values by the same order, and the shortest prefix whose rounded plan costs
    at least ``budget`` is taken: still the smallest plan ≥ the budget among rounded plans (it overshoots by at most
    one layer's m ranks), and still nested, since rounding up is monotone.

    Args:
        scores: one float tensor of shape (k,) per layer.
        shapes: ``(in_features, out_features)`` per layer, in the same order.
        budget: weights the compressed layers may cost (biases excluded); clipped to [0, every layer dense].
        rank_multiple: round every kept rank up to a multiple of this (1: no rounding).
        rule: the cost rule of the model (see :data:`RANK_COSTS`).
        selection: which prefixes may be taken (see :data:`SELECTIONS`): with ``"threshold"`` only those ending a
            block of equal scores, short of the whole ranking (at least the lowest block is pruned, as the original
            implementation prunes; for everything, keep everything), and the longest one when none reaches the
            budget; a layer keeps just its prefix's ranks.

    Returns:
        One boolean keep mask per layer, and the cost of the plan in weights.
    """
    order, multiple = ranking(scores, shapes, rule), _check_multiple(rank_multiple)
    whole = check_selection(selection) == "ranked"
    budget = min(max(int(budget), 0), int(order.cost[-1]))
    if whole:  # every prefix may be taken: prefix j is j
        taken, last = None, order.cost.numel() - 1
    else:
        taken = order.threshold_prefixes()
        taken = taken[:-1] if taken.numel() > 1 else taken  # never the whole ranking
        last = taken.numel() - 1
    at = (lambda j: j) if taken is None else (lambda j: int(taken[j]))  # noqa: E731
    costs = order.cost if taken is None else order.cost.index_select(0, taken)
    j = min(int(torch.searchsorted(costs, budget)), last)  # the shortest allowed prefix that costs at least the budget
    if multiple == 1:
        return order.keep(at(j), whole), int(order.cost[at(j)])
    # Rounding up only adds ranks, so the rounded plan of `j` already reaches the budget: search below it.
    j = _search(0, j, lambda i: i == 0 or order.rounded_cost(at(i - 1), multiple, whole=whole) < budget)
    ranks = order.rounded_ranks(at(j), multiple, whole)
    return order.keep_ranks(ranks), order.rounded_cost(at(j), multiple, whole=whole)


def plan_memory(
    scores: list[torch.Tensor], shapes: list[tuple[int, int]], budget: int, storage, rank_multiple: int = 1,
    rule: str = "aligned", extra_rank: int = 0, selection: str = "ranked",
) -> tuple[list[torch.Tensor], int]:
    """The largest prefix of the global ranking whose compressed layers' weights take at most ``budget`` bytes in
    ``storage`` (see :func:`layer_bytes`); the same order as :func:`plan_pruning`, so also nested. With
    ``rank_multiple``, the largest prefix whose plan, ranks rounded up as in :func:`plan_pruning`, fits; ``rule`` the
    model's cost rule; ``extra_rank`` the ranks each layer stores beyond its kept ones (:func:`stored_rank`);
    ``selection`` which prefixes may be taken (with ``"threshold"``: the longest that ends a block of equal scores).

    Returns:
        One boolean keep mask per layer, and the bytes of the plan's weights.
    """
    order, multiple = ranking(scores, shapes, rule), _check_multiple(rank_multiple)
    whole = check_selection(selection) == "ranked"
    sizes, least = order.bytes(storage, extra_rank)  # (n + 1,) each
    if whole:
        taken, j = None, int(torch.searchsorted(least, int(budget), right=True)) - 1  # the longest prefix that fits
    else:
        taken = order.threshold_prefixes()
        fits = torch.nonzero(sizes.index_select(0, taken) <= int(budget)).squeeze(1)
        j = int(fits[-1]) if fits.numel() else -1
    if j < 0:  # every layer at rank 0 (plus extra_rank) is the least: a smaller budget gets here
        raise ValueError(f"no plan fits {budget} bytes")
    at = (lambda i: i) if taken is None else (lambda i: int(taken[i]))  # noqa: E731
    if multiple == 1:
        return order.keep(at(j), whole), int(sizes[at(j)])
    j = _search(0, j, lambda i: order.rounded_cost(at(i), multiple, storage, extra_rank, whole) <= budget)
    ranks = order.rounded_ranks(at(j), multiple, whole)
    return order.keep_ranks(ranks), order.rounded_cost(at(j), multiple, storage, extra_rank, whole)
