"""The inference form of a compressed ACIP model (``fuse()``): fewer, larger matmuls in the layout the kernels prefer.

In a compressed model, q_proj, k_proj and v_proj (and gate_proj, up_proj) each run ``u(sv(x))`` on the same ``x``:
two matmuls per layer. Fused, their input sides (``sv``, or the whole weight of a layer stored dense) are stacked into
one (Σ rows, in) matrix, so one matmul serves the group, and each layer then applies its own output factor to its
slice (a dense member has none: its slice is its output, plus its bias). Same map, fewer matmuls: a SmolLM2 block runs
11 instead of 14. Every other target layer becomes a group of one, so that all of them share one code path.

The attention and MLP modules of transformers call their projections one by one and are left untouched. Each target
layer is replaced in place by a :class:`FusedLinear`; whichever member of a group is called first with an input
computes the shared matmul for the whole group and leaves the slices in the group's :class:`SharedInput`; the others
find them there by the identity of their input (``x is`` the tensor the slices came from), and the member called last
clears them, so nothing outlives the forward pass. A member called with another input (an architecture that feeds
the layers different tensors) computes the matmul itself: always correct, only not shared. Under torch.compile the
identity test is decided while tracing: no guard, no graph break.

Which layers form a group is found by running the model once on two tokens and recording which target layers receive
the very same input tensor, in call order (:func:`shared_input_groups`): no per-architecture table and no copy of
modeling code. A group is fused when at least one member is factorized; dense-only groups stay one matmul per layer,
as in the base model. The groups are recorded in config.json (``fused_groups``), so a fused model saves and reloads.

Layout: with float32 weights on the CPU, a matrix-vector product (decoding, batch 1) reads an (out, in) weight about
1.5x faster when it is stored in memory as its transpose (in, out) (measured on this project's 2-core AVX512 machine;
2x for the output factors, whose rows are only ``rank`` long), and prompt-sized products run as fast either way; in
bfloat16 the usual layout is faster, and so it is under torch.compile (SmolLM2 at 0.4, compiled: 19 decode tokens/s
input-major, 41 contiguous). So by default (``layout="auto"``) the fused form keeps each weight as an (out, in)
view of an (in, out) tensor for float32 on CPU, and contiguous otherwise; ``.to(dtype or device)`` re-lays it out;
``fuse(layout="contiguous")`` before ``torch.compile``. Shapes, the state dict and saved files are the same
either way.

This file is part of the Hub payload: it imports only torch and its sibling parametrization.py.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .parametrization import AlignedLowRankLinear, LowRankLinear, aligned_output, linear_num_params

FACTORED = (LowRankLinear, AlignedLowRankLinear)


class SharedInput(nn.Module):
    """The input sides of the layers of one group as one matmul: (..., in) -> one (..., rows) slice per member."""

    def __init__(self, in_features: int, sizes: list[int], device=None, dtype=None):
        super().__init__()
        self.sizes = [int(s) for s in sizes]
        self.proj = nn.Linear(in_features, sum(self.sizes), bias=False, device=device, dtype=dtype)  # (Σ rows, in)
        self.stash = None  # (input, slices) from the group's first call until its last member has taken its slice

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``proj(x)`` split into the members' slices (views, no copy)."""
        return _linear(self.proj, x).split(self.sizes, dim=-1)


class FusedLinear(nn.Module):
    """A target layer of a fused model: its slice of its group's shared input matmul, then its own output factor
    ``u`` (rank -> out, with the bias), or for a layer stored dense no factor, only its ``bias``. A gauge-aligned
    layer's slice is its output on its rows Q; ``u`` (rank -> out − rank) gives the others, ``order`` puts them in
    place, and it holds its ``bias`` itself (see :class:`AlignedLowRankLinear`).

    The member called first in the group owns the :class:`SharedInput` as its child ``shared`` (so the state dict
    holds it once: ``<first>.shared.proj.weight``); every member refers to it.
    """

    def __init__(self, shared: SharedInput, index: int, out_features: int, rank: int | None, bias: bool,
                 last: bool, aligned: bool = False, device=None, dtype=None):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = shared.proj.in_features, out_features
        self.index, self.last, self.alone = index, last, len(shared.sizes) == 1
        self.layout = "auto"  # of its weights: one of LAYOUTS
        self.__dict__["_shared"] = shared  # a plain reference: registered once, under the first member
        if index == 0:
            self.shared = shared
        self.aligned = aligned and rank is not None
        if rank is None or self.aligned:  # dense: the slice is the output; aligned: it is the output on rows Q
            own_bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
            self.register_parameter("bias", own_bias)  # before ``u`` exists, so the ``bias`` property is unset
            self.u = None
        if self.aligned:
            self.u = nn.Linear(rank, out_features - rank, bias=False, device=device, dtype=dtype)
            self.register_buffer("order", torch.empty(out_features if rank else 0, dtype=torch.long, device=device))
        elif rank is not None:
            self.u = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The layer's bias: held by the output factor, or by the layer itself when it is stored dense or aligned."""
        return self._parameters.get("bias") if self.u is None or self.aligned else self.u.bias

    @property
    def rank(self) -> int | None:
        """Rank of the output factor, or None for a layer stored dense."""
        return None if self.u is None else self.u.in_features

    @property
    def rows(self) -> int:
        """Rows of the shared input matmul that belong to this layer (its rank, or out_features if dense)."""
        return self._shared.sizes[self.index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This layer's output: the group's shared matmul (computed once per input), sliced, through ``u``."""
        shared = self._shared
        if self.alone:
            h = _linear(shared.proj, x)
        else:
            stash = shared.stash
            if stash is None or stash[0] is not x:  # the first member called with this input computes for all
                stash = (x, shared(x))
                shared.stash = stash
            if self.last:
                shared.stash = None  # the group is done with this input: hold no activations between calls
            h = stash[1][self.index]
        if self.aligned:
            return aligned_output(h, _linear(self.u, h), self.order, self.bias)
        if self.u is not None:
            return _linear(self.u, h)
        # A dense member's output is a slice of a wider matmul: make it an ordinary contiguous tensor, as
        # nn.Linear's output is, for callers that reshape it freely.
        return h + self.bias if self.bias is not None else h.contiguous()

    def num_params(self) -> int:
        """Parameters of the layer (its rows of the shared matmul, its output factor, its bias)."""
        bias = self.bias.numel() if self.bias is not None and (self.u is None or self.aligned) else 0
        return self.rows * self.in_features + (linear_num_params(self.u) if self.u is not None else 0) + bias

    def _apply(self, fn, recurse=True):
        # A dtype or device change may call for the other weight layout (see the module docstring).
        super()._apply(fn, recurse)
        lay_out(self)
        return self

    def extra_repr(self) -> str:
        rank = "dense" if self.u is None else f"rank={self.rank}{', aligned' if self.aligned else ''}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {rank}, slice={self.index}"


def _linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain nn.Linear straight through F.linear: nn.Module's call machinery, ~1 µs a call, adds up
    to about 2% of a decode step at 0.4 (two calls per layer). Quantized or adapter-wrapped layers are called."""
    if type(layer) is nn.Linear:
        return F.linear(x, layer.weight, layer.bias)
    return layer(x)


LAYOUTS = ("auto", "input-major", "contiguous")


def prefers_input_major(weight: torch.Tensor) -> bool:
    """Whether matmuls with ``weight`` (out, in) run faster when it is stored as its transpose: float32 on CPU."""
    return weight.dtype == torch.float32 and weight.device.type == "cpu"


def _lay_out_linear(linear: nn.Module, layout: str) -> bool:
    """Store a plain nn.Linear's weight in ``layout`` (same values, same shape); others are left alone. Returns
    whether the weight was copied."""
    if type(linear) is not nn.Linear or linear.weight.is_meta:
        return False
    weight = linear.weight
    # "input-major": the (out, in) weight as a view of a contiguous (in, out) tensor
    input_major = prefers_input_major(weight) if layout == "auto" else layout == "input-major"
    if (weight.t() if input_major else weight).is_contiguous():
        return False
    data = weight.detach().t().contiguous().t() if input_major else weight.detach().contiguous()
    linear.weight = nn.Parameter(data, requires_grad=weight.requires_grad)
    return True


def lay_out(member: "FusedLinear") -> bool:
    """Put the weights of a fused layer (the shared matmul it owns, its output factor) in the preferred layout.
    Returns whether a weight was copied."""
    copied = member.index == 0 and _lay_out_linear(member.shared.proj, member.layout)
    return (member.u is not None and _lay_out_linear(member.u, member.layout)) or copied


@torch.no_grad()
def _own_every_tensor(model: nn.Module) -> None:
    """Copy every contiguous CPU parameter and buffer into memory of its own, in place (the weights laid out anew are
    not contiguous, and copies already).

    A checkpoint is loaded memory-mapped: its weights stay pages of the file. Once the target weights are laid out
    anew, the pages read to copy them would stay resident as long as any tensor still maps the file (resident memory
    of the fused SmolLM2 at 0.4: 465 MiB instead of 304 MiB, measured); owning the rest too releases the file."""
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type == "cpu" and tensor.is_contiguous():
            tensor.data = tensor.data.clone()


def _input_side(layer: nn.Module) -> torch.Tensor:
    """The (rows, in) weight a compressed layer applies to its input: ``sv`` of a factorized layer, else W."""
    return layer.sv.weight if isinstance(layer, FACTORED) else layer.weight


def _check_fusable(name: str, layer: nn.Module) -> None:
    """A clear error unless ``layer`` is a plain compressed layer: factors (aligned or not) of plain nn.Linear
    layers, or an nn.Linear."""
    plain = type(layer) is nn.Linear or (
        type(layer) in FACTORED and type(layer.sv) is nn.Linear and type(layer.u) is nn.Linear
    )
    if not plain:
        raise RuntimeError(
            f"{name!r} is a {type(layer).__name__} (adapters or 4-bit weights?): fuse() works on a compressed model "
            "of plain layers; merge LoRA adapters (merge_and_unload) first, and fuse before quantize()"
        )


@torch.no_grad()
def shared_input_groups(model: nn.Module, names: list[str], probe: torch.Tensor) -> list[list[str]]:
    """The layers among ``names`` grouped by the input tensor they receive in one forward pass of ``model`` on
    ``probe`` token ids (the same tensor object, not equal values), each group in call order."""
    seen = {}  # id(input) -> (input, names): holding the input keeps its id from being reused
    hooks = []
    for name in names:
        def record(module, args, kwargs, name=name):
            """Note the input tensor this layer is called with."""
            x = args[0] if args else next(iter(kwargs.values()))
            if not any(name in group for _, group in seen.values()):  # a layer called twice: its first input
                seen.setdefault(id(x), (x, []))[1].append(name)
        hooks.append(model.get_submodule(name).register_forward_pre_hook(record, with_kwargs=True))
    try:
        model(input_ids=probe, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    called = [name for _, group in seen.values() for name in group]
    return [group for _, group in seen.values()] + [[name] for name in names if name not in called]


def fusable_groups(model: nn.Module, groups: list[list[str]]) -> list[list[str]]:
    """``groups`` as they will be fused: a group stays whole when at least one member is factorized and all read one
    input width and dtype; otherwise (dense only: as the base model has them) each member is a group of its own."""
    kept = []
    for group in groups:
        layers = [model.get_submodule(name) for name in group]
        for name, layer in zip(group, layers):
            _check_fusable(name, layer)
        widths = {(layer.in_features, _input_side(layer).dtype) for layer in layers}
        if any(isinstance(layer, FACTORED) for layer in layers) and len(widths) == 1:
            kept.append(group)
        else:
            kept.extend([name] for name in group)
    return kept


@torch.no_grad()
def fuse_group(model: nn.Module, group: list[str]) -> None:
    """Replace the compressed layers named in ``group`` (in call order) by :class:`FusedLinear` layers sharing one
    input-side matmul. Output factors and biases are moved over as they are; the input sides are concatenated."""
    layers = [model.get_submodule(name) for name in group]
    weights = [_input_side(layer) for layer in layers]
    first = weights[0]
    shared = SharedInput(first.shape[1], [w.shape[0] for w in weights], device="meta", dtype=first.dtype)
    stacked = torch.cat(weights) if len(weights) > 1 else first
    shared.proj.weight = nn.Parameter(stacked, requires_grad=first.requires_grad)
    for index, (name, layer) in enumerate(zip(group, layers)):
        factorized, aligned = isinstance(layer, FACTORED), isinstance(layer, AlignedLowRankLinear)
        member = FusedLinear(shared, index, layer.out_features, layer.rank if factorized else None,
                             layer.bias is not None, last=index == len(group) - 1, aligned=aligned, device="meta",
                             dtype=first.dtype)  # fmt: skip
        if factorized:
            member.u = layer.u
        if aligned:
            member.order = layer.order
        if not factorized or aligned:
            member.register_parameter("bias", layer.bias)
        lay_out(member)
        model.set_submodule(name, member)


@torch.no_grad()
def unfuse_group(model: nn.Module, group: list[str]) -> None:
    """Undo :func:`fuse_group`: each member back to a LowRankLinear (or a dense nn.Linear), with its own rows of the
    shared matmul as input side, in the usual contiguous layout. Exact: values are copied, never recomputed."""
    members = [model.get_submodule(name) for name in group]
    rows = members[0].shared.proj.weight.split(members[0].shared.sizes)
    for name, member, weight in zip(group, members, rows):
        weight = nn.Parameter(weight.contiguous(), requires_grad=weight.requires_grad)
        if member.u is not None:
            factors = AlignedLowRankLinear if member.aligned else LowRankLinear
            layer = factors(member.in_features, member.out_features, member.rank, member.bias is not None,
                            device="meta")  # fmt: skip
            layer.sv.weight = weight
            member.u.weight = nn.Parameter(member.u.weight.contiguous(), requires_grad=member.u.weight.requires_grad)
            layer.u = member.u
            if member.aligned:
                layer.order = member.order
                layer.bias = member.bias
        else:
            layer = nn.Linear(member.in_features, member.out_features, bias=member.bias is not None, device="meta")
            layer.weight = weight
            layer.register_parameter("bias", member.bias)
        model.set_submodule(name, layer)


def _check_unfusable(name: str, member: nn.Module) -> None:
    """A clear error for a fused layer whose weights are no longer plain float tensors (4-bit, adapters)."""
    if type(member._shared.proj) is not nn.Linear or (member.u is not None and type(member.u) is not nn.Linear):
        raise RuntimeError(
            f"{name!r}: unfuse() needs plain float layers; a quantized or adapter-wrapped fused model cannot be "
            "split exactly. Reload the compressed model instead"
        )


def build_fused(model: nn.Module, groups: list[list[str]]) -> None:
    """Turn the compressed layers of ``model`` into the fused groups ``groups`` (each in call order)."""
    for group in groups:
        fuse_group(model, group)


def fuse_model(acip_model, layout: str = "auto") -> None:
    """:meth:`ACIPModel.fuse`: group the target layers of a compressed, unquantized model, fuse them, record it;
    lay the weights out in ``layout``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    config = acip_model.config
    if config.fused_groups:  # fused already: only the layout may change
        for name in config.target_modules:
            member = acip_model.model.get_submodule(name)
            member.layout = layout
            lay_out(member)
        return
    if not config.compressed:
        raise RuntimeError("fuse() works on a compressed model: call prune_model_by_score(...) and compress() first")
    if getattr(config, "quantization_config", None) is not None or config.int_quantization is not None:
        raise RuntimeError("fuse() before quantize(): quantized layers cannot be concatenated exactly. Reload the "
                           "compressed model, fuse it, then quantize it")  # fmt: skip
    probe = torch.zeros((1, 2), dtype=torch.long, device=acip_model.device)  # two tokens: any ids will do
    groups = fusable_groups(acip_model.model, shared_input_groups(acip_model.model, config.target_modules, probe))
    build_fused(acip_model.model, groups)
    config.fused_groups = groups
    if layout != "auto":
        fuse_model(acip_model, layout)


def settle_loaded(acip_model) -> None:
    """After loading a fused model: weights in the preferred layout and, where that took copies, every other tensor
    in memory of its own too (see :func:`_own_every_tensor`)."""
    layers = [acip_model.model.get_submodule(name) for name in acip_model.config.target_modules]
    for layer in layers:  # the loader may have laid them out already (through .to()): then this copies nothing
        lay_out(layer)
    if any(not p.is_contiguous() for layer in layers for p in layer.parameters()):  # laid out anew: copies
        _own_every_tensor(acip_model)


def unfuse_model(acip_model) -> None:
    """:meth:`ACIPModel.unfuse`: every fused group back to its compressed layers (all checked before any changes)."""
    groups = acip_model.config.fused_groups
    for name in [name for group in groups for name in group]:
        _check_unfusable(name, acip_model.model.get_submodule(name))
    for group in groups:
        unfuse_group(acip_model.model, group)
    acip_model.config.fused_groups = []
