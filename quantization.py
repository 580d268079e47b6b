"""Weight-only integer quantization of linear layers (``quantize("int8")``, ``quantize("int4")``), computed with the
CPU kernels torch itself ships, so a quantized model needs nothing beyond torch.

- ``"int8"``: one symmetric bfloat16 scale per output row, ``w ≈ q·s`` with q in [-127, 127]
  (``torch._weight_int8pack_mm``).
- ``"int4"``: asymmetric, groups of :data:`INT4_GROUP` weights along a row, one bfloat16 scale and offset per group,
  ``w ≈ (q − 8)·s + z`` with q in [0, 15] (``torch._weight_int4pack_mm_for_cpu``). Each group's range is chosen by
  a small search (the clip that minimises the group's squared error), not just its min and max.

Both kernels read bfloat16 activations and write bfloat16 outputs; the layer casts to and from its input's dtype.
On one core of this project's AVX512 machine, batch 1, a (1536, 576) weight: float32 matmul 243 µs, int8 58 µs,
int4 29 µs (benchmarks/quantized_kernels.py); with float32 activations the same kernels are 2-5x slower than float32.

The kernels constrain shapes: int8 needs rows of a multiple of 16 weights (other widths give wrong results or
crash), int4 a multiple of the group size and a multiple of 16 rows. Weights are stored zero-padded to those
multiples (inputs are padded to match, outputs sliced): a factor of rank 100 is stored 128 wide in int4.

The int4 kernel wants its weights in a CPU-specific packed layout. Saved files hold a portable one (two values per
byte, even column in the low nibble); a layer converts to the kernel's layout on its first CPU forward and back
when its state dict is taken or it leaves the CPU.

This file is part of the Hub payload: it imports only torch and its siblings parametrization.py and pruning.py.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .parametrization import AlignedLowRankLinear, LowRankLinear
from .pruning import INT4_GROUP, INT4_ROWS, INT8_COLUMNS, INT_TYPES, padded

CLIP_SEARCH = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # shares of a group's range tried, around its midpoint
REFIT_RIDGE = 1e-6  # refit_output_factor's ridge, as a share of the mean diagonal: only against exact singularity
GPTQ_DAMPING = 0.1  # added to the input moment's diagonal, as a share of its mean: GPTQ's 0.01 over-fits a few
# thousand calibration tokens (held-out output error of SmolLM2's layers lower at 0.1, docs/quantization.md)
GPTQ_BLOCK = 128  # columns whose errors are passed on to the later ones at once
HEAD_TYPE = "int8"  # the output head of an int-quantized model, whichever the decoder's type: a decode step of a small
# model spends most of its time there in float32 (SmolLM2's 49152 x 576 head: 6.3 ms float32, 0.9 ms int8 on one
# core), and 4 bits there cost quality (llama.cpp keeps its output layer at 6-8 bits too)


def _has_cpu_kernels() -> bool:
    """Whether this torch ships the weight-only CPU kernels (torch >= 2.6)."""
    return hasattr(torch, "_weight_int8pack_mm") and hasattr(torch, "_weight_int4pack_mm_for_cpu")


# Compiled code (torch.export, acip package) calls the int8 kernel through this opaque op: torch 2.13's inductor fails
# to lower the kernel itself on a model's activations (an assertion on a Pointwise input). Registered once per process,
# whichever copy of this file (the package's, or a Hub folder's dynamic module) is imported first.
if _has_cpu_kernels() and not hasattr(torch.ops.acip, "int8_mm"):

    @torch.library.custom_op("acip::int8_mm", mutates_args=())
    def _int8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """``torch._weight_int8pack_mm``: (M, K) bfloat16 × (N, K) int8 with (N,) scales -> (M, N) bfloat16."""
        return torch._weight_int8pack_mm(x, qweight, scale)

    @_int8_mm.register_fake
    def _(x, qweight, scale):
        return x.new_empty(x.shape[0], qweight.shape[0])


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N, K padded) int8 and (N,) bfloat16 scales, symmetric per row."""
    rows, cols = weight.shape
    w = F.pad(weight.detach().float(), (0, padded(cols, INT8_COLUMNS) - cols))
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def _group_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, G, group) weights -> the (N, G, 1) scale and offset (bfloat16 values, as float32) of each group: of the
    clips in CLIP_SEARCH, the one with the least squared rounding error."""
    lo, hi = w.amin(dim=2, keepdim=True), w.amax(dim=2, keepdim=True)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    best_err = best_scale = best_zero = None
    for share in CLIP_SEARCH:
        scale = (2 * share * half / 15).clamp_min(1e-12).to(torch.bfloat16).float()
        zero = (mid - share * half + 8 * scale).to(torch.bfloat16).float()  # the value of q = 8
        err = ((_round_int4(w, scale, zero) - 8) * scale + zero - w).square().sum(dim=2, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err, best_scale, best_zero = [torch.where(better, a, b) for a, b in
                                               ((err, best_err), (scale, best_scale), (zero, best_zero))]  # fmt: skip
    return best_scale, best_zero


def _round_int4(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The 4-bit values q in [0, 15] nearest to ``w`` on the grid ``(q − 8)·scale + zero``."""
    return torch.round((w - zero) / scale + 8).clamp(0, 15)


def _pack_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) values in [0, 15] and (N, K / group, 1) scales and offsets -> quantize_int4's two tensors."""
    q = q.to(torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scale_zero = torch.cat([scale, zero], dim=2).permute(1, 0, 2).to(torch.bfloat16).contiguous()
    return packed, scale_zero


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float weight -> (N padded, K padded / 2) uint8 in the portable layout and (K padded / group, N padded, 2)
    bfloat16 scales and offsets, ``w ≈ (q − 8)·s + z`` per group of ``group`` weights along a row, each weight
    rounded to nearest."""
    rows, cols = weight.shape
    n, k = padded(rows, INT4_ROWS), padded(cols, group)
    w = F.pad(weight.detach().float(), (0, k - cols, 0, n - rows)).view(n, k // group, group)
    scale, zero = _group_grid(w)
    return _pack_int4(_round_int4(w, scale, zero).view(n, k), scale, zero)


@torch.no_grad()
def gptq_int4(weight: torch.Tensor, moment: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_int4`'s output, rounded by GPTQ (Frantar et al. 2022) instead of to nearest: the columns are
    rounded one by one and each rounding error is passed on to the columns not yet rounded, weighted by the inverse
    of ``moment`` (K, K), the second moment ``E[x·xᵀ]`` of the layer's inputs, so that the error of the layer's
    outputs on such inputs is small, not that of each weight. Columns go in order of decreasing input energy (the
    hardest first, while the most columns are left to absorb their errors: GPTQ's "act order"), each on its group's
    grid, chosen beforehand from the weights as they are (:func:`_group_grid`): groups stay runs of a row."""
    rows, cols = weight.shape
    n, k = padded(rows, INT4_ROWS), padded(cols, group)
    w = F.pad(weight.detach().double(), (0, k - cols, 0, n - rows))  # (N, K)
    h = F.pad(moment.detach().double().to(w.device), (0, k - cols, 0, k - cols))  # (K, K)
    dead = h.diagonal() == 0  # inputs that are always 0 (and the padding): their weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    scale, zero = (t.double() for t in _group_grid(w.float().view(n, k // group, group)))  # (N, K / group, 1)
    order = torch.argsort(h.diagonal(), descending=True)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(GPTQ_DAMPING * h.diagonal().mean())  # keeps the inverse well conditioned
    # upper Cholesky factor of H⁻¹: row i holds how column i's error spreads over the columns after it
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    column_scale, column_zero = scale[:, order // group, 0], zero[:, order // group, 0]  # (N, K), permuted
    q = torch.empty(n, k, dtype=torch.float64, device=w.device)
    for start in range(0, k, GPTQ_BLOCK):
        end = min(start + GPTQ_BLOCK, k)
        errors = torch.empty(n, end - start, dtype=torch.float64, device=w.device)
        for i in range(start, end):
            s, z = column_scale[:, i], column_zero[:, i]
            q[:, i] = torch.round((w[:, i] - z) / s + 8).clamp(0, 15)
            error = (w[:, i] - ((q[:, i] - 8) * s + z)) / hinv[i, i]
            w[:, i:end] -= error[:, None] * hinv[i, i:end][None]
            errors[:, i - start] = error
        w[:, end:] -= errors @ hinv[start:end, end:]  # the block's errors, passed on to every later column at once
    return _pack_int4(q[:, torch.argsort(order)], scale.float(), zero.float())


def dequantize_int4(packed: torch.Tensor, scale_zero: torch.Tensor, rows: int, cols: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:  # fmt: skip
    """:func:`quantize_int4`'s two tensors (the portable layout) -> the (rows, cols) weight they stand for."""
    q = _unpack_nibbles(packed).float()  # (N padded, K padded)
    scale, zero = scale_zero.float().permute(1, 0, 2).repeat_interleave(INT4_GROUP, dim=1).unbind(2)
    return ((q - 8) * scale + zero)[:rows, :cols].to(dtype)


def stack_rounded(parts: list[tuple[torch.Tensor, torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights of one input width rounded to int4 each on its own ((packed, scale_zero) and its real row count) ->
    the (packed, scale_zero) of their rows stacked: what rounding the stacked weight gives, since each row is rounded
    on its own (a fused group's shared matmul from its members' roundings)."""
    q = torch.cat([packed[:rows] for packed, _, rows in parts])
    scale_zero = torch.cat([constants[:, :rows] for _, constants, rows in parts], dim=1)
    pad = padded(q.shape[0], INT4_ROWS) - q.shape[0]  # padding rows hold zeros, as quantize_int4's
    return F.pad(q, (0, 0, 0, pad)).contiguous(), F.pad(scale_zero, (0, 0, 0, pad)).contiguous()


@torch.no_grad()
def refit_output_factor(pair: LowRankLinear, moment: torch.Tensor,
                        rounded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """For a balanced pair whose input factor V is rounded to V̂ (``rounded``: :func:`gptq_int4`'s output for it,
    inputs of second moment ``moment``, H): set the output factor to the U' for which U'·V̂x is closest to U·Vx on
    such inputs (least squares, U' = U·(V·H·V̂ᵀ)·(V̂·H·V̂ᵀ)⁻¹), so that U makes up for V's rounding; returns V̂·H·V̂ᵀ,
    the second moment of U's inputs then."""
    v, h, u = pair.sv.weight.double(), moment.double().to(pair.sv.weight.device), pair.u.weight.double()
    v_hat = dequantize_int4(*rounded, pair.rank, pair.in_features, torch.float64)
    own = v_hat @ h @ v_hat.T  # (r, r)
    cross = v @ h @ v_hat.T  # (r, r)
    ridge = REFIT_RIDGE * own.diagonal().mean() * torch.eye(pair.rank, dtype=own.dtype, device=own.device)
    refit = torch.linalg.solve(own + ridge, (u @ cross).T).T  # own is symmetric: U·cross·own⁻¹
    pair.u.weight.copy_(refit.to(pair.u.weight.dtype))
    return own.float()


@torch.no_grad()
def input_moments(model: nn.Module, batches, names=None) -> dict[str, torch.Tensor]:
    """The second moment ``E[x·xᵀ]`` (in, in) of the inputs of every nn.Linear of ``model`` called as a module (or of
    those in ``names``), by name, over the token id batches ``batches`` (each (B, T)): what :func:`gptq_int4` needs.
    ``model`` is a causal LM: only the last position's logits are computed (the head's inputs are not wanted)."""
    sums, counts, hooks = {}, {}, []
    leader = {}  # layer name -> the layer whose moment it shares: layers that read the very same input (q, k, v)
    seen = []  # (input, name) of this batch; kept alive so that the identity check stays sound

    def hook(name):
        def accumulate(module, args):
            shared = next((first for tensor, first in seen if tensor is args[0]), None)
            if shared is not None:
                leader.setdefault(name, shared)
                return
            leader.setdefault(name, name)
            seen.append((args[0], name))
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]

        return accumulate

    for name, module in model.named_modules():
        if type(module) is nn.Linear and (names is None or name in names):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        for ids in batches:
            model(ids.to(device), logits_to_keep=1)  # the logits of every position would cost a fifth of the pass
            seen.clear()
    finally:
        model.train(training)
        for handle in hooks:
            handle.remove()
    moments = {name: total / counts[name] for name, total in sums.items()}
    return {name: moments[first] for name, first in leader.items()}


@torch.no_grad()
def balanced(layer: nn.Module) -> nn.Module:
    """A compressed layer in the form ``quantize("int8"/"int4")`` stores: two balanced plain factors
    (:class:`LowRankLinear` ``u = Q·A·√S``, ``sv = √S·Bᵀ`` from the SVD ``A·S·Bᵀ`` of the pair's product, Q
    orthonormal), or a dense nn.Linear where two factors would not be smaller than the dense weight.

    Why not the gauge-aligned pair: its output on the rows Q is ``V'x`` itself and every other row a combination
    ``U''·V'x`` of them; rounding errors of ``V'`` then add up in those combinations, while the rows themselves may
    largely cancel. Measured on the quick preset's SmolLM2 at 0.5, int4, one window of wiki-validation: perplexity
    15,429 aligned, 147 balanced (float16: 98). A
    balanced pair has orthogonal columns and rows of equal scale on both sides: errors stay where they arise. It
    also needs no row order (8 bytes per output), which at 4 bits costs about what the r² weights the alignment
    saves do."""
    if type(layer) is nn.Linear:
        return layer
    rank, n_in, n_out = layer.rank, layer.in_features, layer.out_features
    if rank * (n_in + n_out) >= n_in * n_out:
        return layer.to_dense()
    dtype, device = layer.sv.weight.dtype, layer.sv.weight.device
    out = LowRankLinear(n_in, n_out, rank, bias=layer.bias is not None, device=device, dtype=dtype)
    if layer.bias is not None:
        out.u.bias.copy_(layer.bias)
    if rank == 0:
        return out
    v = layer.sv.weight.double()
    if isinstance(layer, AlignedLowRankLinear):
        u = torch.cat([torch.eye(rank, dtype=torch.float64, device=device), layer.u.weight.double()])[layer.order]
    else:
        u = layer.u.weight.double()
    q, r = torch.linalg.qr(u)
    a, s, bt = torch.linalg.svd(r @ v, full_matrices=False)
    root = s.sqrt()
    out.u.weight.copy_((q @ a) * root)
    out.sv.weight.copy_(root[:, None] * bt)
    return out


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 in the portable layout -> (N, K) int32 values in [0, 15]."""
    return torch.stack([packed & 15, packed >> 4], dim=2).flatten(1).to(torch.int32)


def _kernel_positions(rows: int, cols: int) -> torch.Tensor:
    """(rows, cols/2, 2): for each nibble of the CPU kernel's packed layout, the flat index (row·cols + col) of the
    value it holds. Found by packing the base-16 digits of every index (the layout is the kernel's own business)."""
    index = torch.arange(rows * cols, dtype=torch.int64).view(rows, cols)
    positions = torch.zeros(rows, cols // 2, 2, dtype=torch.int64)
    shift = 0
    while (rows * cols - 1) >> shift:
        packed = torch._convert_weight_to_int4pack_for_cpu(((index >> shift) & 15).to(torch.int32), 2)
        positions[..., 0] |= (packed & 15).to(torch.int64) << shift
        positions[..., 1] |= (packed >> 4).to(torch.int64) << shift
        shift += 4
    return positions


class IntLinear(nn.Module):
    """A linear layer with int8 or int4 weights (see the module docstring), ``y = x·Wᵀ + b``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant_type: str = "int8",
                 device=None, dtype=None):  # fmt: skip
        super().__init__()
        if quant_type not in INT_TYPES:
            raise ValueError(f"quant_type must be one of {INT_TYPES}, got {quant_type!r}")
        self.in_features, self.out_features, self.quant_type = in_features, out_features, quant_type
        if quant_type == "int8":
            k = padded(in_features, INT8_COLUMNS)
            self.register_buffer("qweight", torch.empty(out_features, k, dtype=torch.int8, device=device))
            self.register_buffer("scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        else:
            n, k = padded(out_features, INT4_ROWS), padded(in_features, INT4_GROUP)
            self.register_buffer("qweight", torch.empty(n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("scale_zero", torch.empty(k // INT4_GROUP, n, 2, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.kernel_layout = False  # int4: whether qweight holds the CPU kernel's layout (else the portable one)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, quant_type: str, moment: torch.Tensor | None = None,
                    rounded: tuple[torch.Tensor, torch.Tensor] | None = None) -> "IntLinear":  # fmt: skip
        """A quantized copy of ``linear`` (plain float nn.Linear), on its device; the bias keeps its dtype. With the
        second moment of its inputs (``moment``, see :func:`input_moments`), int4 is rounded by :func:`gptq_int4`;
        ``rounded``: that rounding, already made (int4)."""
        weight = linear.weight
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, quant_type)
        if quant_type == "int8":
            layer.qweight, layer.scale = quantize_int8(weight)
        else:
            if rounded is None:
                rounded = quantize_int4(weight) if moment is None else gptq_int4(weight, moment.to(weight.device))
            layer.qweight, layer.scale_zero = (t.to(weight.device) for t in rounded)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def settle_loaded(self) -> None:
        """After loading: the weights and constants in memory of their own. A memory-mapped checkpoint places a tensor
        at any byte offset of the file, and the int8 kernel crashes on weights that are not aligned (measured)."""
        for name, tensor in self._buffers.items():
            if tensor is not None and tensor.device.type == "cpu" and not tensor.is_meta:
                self._buffers[name] = tensor.clone()

    def _portable_qweight(self) -> torch.Tensor:
        """The int4 weights in the portable layout, whichever layout ``qweight`` holds now."""
        if not self.kernel_layout:
            return self.qweight
        n, half = self.qweight.shape
        positions = _kernel_positions(n, 2 * half).view(-1)
        flat = torch.empty(n * 2 * half, dtype=torch.uint8)
        flat[positions] = torch.stack([self.qweight & 15, self.qweight >> 4], dim=2).view(-1)
        q = flat.view(n, 2 * half)
        return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()

    def _to_kernel_layout(self) -> None:
        """int4 on CPU: put ``qweight`` in the kernel's packed layout (once)."""
        if not self.kernel_layout and not self.qweight.is_meta:
            self.qweight = torch._convert_weight_to_int4pack_for_cpu(_unpack_nibbles(self.qweight), 2)
            self.kernel_layout = True

    def _to_portable_layout(self) -> None:
        """int4: put ``qweight`` back in the portable layout."""
        if self.kernel_layout:
            self.qweight = self._portable_qweight()
            self.kernel_layout = False

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_layout:  # files hold the portable layout: the kernel's depends on the CPU
            destination[prefix + "qweight"] = self._portable_qweight()

    def _apply(self, fn, recurse=True):
        # The kernel layout only exists on the CPU: leave it before a move (it is rebuilt on the next CPU forward).
        self._to_portable_layout()
        super()._apply(fn, recurse)
        for name in ("scale", "scale_zero"):  # the kernels take bfloat16 constants whatever the model is cast to
            constants = self._buffers.get(name)
            if constants is not None and constants.dtype != torch.bfloat16:
                self._buffers[name] = constants.to(torch.bfloat16)
        return self

    @torch.no_grad()
    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) weight this layer applies, in ``dtype``."""
        n, k = self.out_features, self.in_features
        if self.quant_type == "int8":
            return (self.qweight.float() * self.scale.float()[:, None])[:, :k].to(dtype)
        return dequantize_int4(self._portable_qweight(), self.scale_zero, n, k, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Wᵀ + b``: the CPU kernel on bfloat16 activations, elsewhere a matmul with the dequantized weight."""
        if x.device.type != "cpu" or not _has_cpu_kernels() or torch.is_grad_enabled() and x.requires_grad:
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        h = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        width = self.qweight.shape[1] * (2 if self.quant_type == "int4" else 1)
        if width != self.in_features:
            h = F.pad(h, (0, width - self.in_features))
        if self.quant_type == "int8":
            kernel = torch.ops.acip.int8_mm if torch.compiler.is_compiling() else torch._weight_int8pack_mm
            y = kernel(h, self.qweight, self.scale)
        else:
            self._to_kernel_layout()
            y = torch._weight_int4pack_mm_for_cpu(h, self.qweight, INT4_GROUP, self.scale_zero)
        y = y[:, : self.out_features].to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.quant_type}"


class TiedIntEmbedding(nn.Module):
    """The input embedding of a model whose int8 output head was tied to it: each token's row is read from the head's
    int8 weights and scaled, so the table is stored once, in int8 (``quantize("int8"/"int4")`` of a tied model)."""

    def __init__(self, head: IntLinear, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(head, IntLinear) or head.quant_type != "int8":
            raise ValueError(f"head must be an int8 IntLinear, got {head!r}")
        # Not a submodule: the head's tensors are saved, moved and counted once, as the head's.
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim, self.dtype = head.out_features, head.in_features, dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(..., T) token ids -> (..., T, hidden) embeddings in this module's dtype."""
        rows = self.head.qweight[input_ids][..., : self.embedding_dim]  # (..., T, H) int8
        return rows.to(self.dtype) * self.head.scale[input_ids].to(self.dtype)[..., None]

    def _apply(self, fn, recurse=True):
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # .to(dtype) / .half() reach the output dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the int8 head"
