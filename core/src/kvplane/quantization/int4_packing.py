"""W4A16 int4 weight layouts of GPTQ and AWQ checkpoints: packing, dequantization, and the
torch reference of the quantized linear layer.

Pure torch on any device; no checkpoint or engine knowledge. The quantization methods call
these to read what a checkpoint holds, and platforms without a fused kernel (the CPU) run
:func:`w4a16_linear_reference`. The round-to-nearest quantizers that write these layouts
from a float weight are in :mod:`kvplane.quantization.int4_rtn`.

Every layout stores int4 values ``q`` in ``[0, 15]`` eight to an int32 word, nibble ``i`` at
bits ``4*i .. 4*i+3``, with one float16 ``scale`` and one int4 zero point ``z`` per (group of
input rows, output column); the float weight is ``W[n, k] = (q[k, n] - z[g, n]) * s[g, n]``
with ``g`` the group of input row ``k``. ``K`` is the input size, ``N`` the output size.

GPTQ (AutoGPTQ, GPTQModel and optimum; ``quantization_config`` ``quant_method: "gptq"``
with ``bits``, ``group_size``, ``desc_act``, ``sym``, ``checkpoint_format``):

- ``qweight`` int32 ``[K / 8, N]``: packed along the *input* dim, word ``(r, n)`` holds input
  rows ``8r .. 8r+7`` of column ``n``, row ``8r + i`` in nibble ``i``.
- ``qzeros`` int32 ``[num_groups, N / 8]``: packed along the *output* dim, column ``8c + i``
  in nibble ``i``.
- ``scales`` float16 ``[num_groups, N]``; ``num_groups = ceil(K / group_size)``, and
  ``group_size == -1`` means one group over all inputs.
- ``g_idx`` int32 ``[K]``: the group of each input row. Without act-order it is
  ``k // group_size``; with ``desc_act: true`` the quantizer visited rows in a permuted
  order and ``g_idx[k]`` is ``(position of k in that order) // group_size``, so a group's
  rows are scattered over ``K``.
- ``checkpoint_format: "gptq"`` (v1, the default and what AutoGPTQ writes) stores
  ``z - 1`` in ``qzeros`` (the packer subtracts one before packing), so readers add one:
  ``zeros_offset=1``. ``"gptq_v2"`` (GPTQModel) stores the true zero: ``zeros_offset=0``.
  Symmetric checkpoints have ``z = 8`` everywhere (stored ``7`` in v1).

AWQ, GEMM version (AutoAWQ; ``quant_method: "awq"`` with ``bits``, ``group_size``,
``zero_point: true``, ``version: "gemm"``):

- ``qweight`` int32 ``[K, N / 8]``: packed along the *output* dim, interleaved: nibble ``i``
  of word ``(k, c)`` holds column ``8c + AWQ_NIBBLE_ORDER[i]`` with
  ``AWQ_NIBBLE_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)`` (so column ``8c + j`` is in nibble
  ``(0, 4, 1, 5, 2, 6, 3, 7)[j]``).
- ``qzeros`` int32 ``[num_groups, N / 8]``, packed the same interleaved way; the true zero
  point (no offset).
- ``scales`` float16 ``[num_groups, N]``; groups are contiguous, ``g = k // group_size``.

Sources checked: AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_tritonv2.py``
(``QuantLinear.__init__`` buffer shapes and ``pack``: rows packed at ``bits * (j - i)``,
``zeros -= 1`` before packing), GPTQModel ``gptqmodel/utils/model.py``
(``convert_gptq_v1_to_v2_format_module``: v1 stored ``qzeros - 1``, v2 adds it back),
AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM`` buffer shapes and
``from_linear``: ``order_map = [0, 2, 4, 6, 1, 3, 5, 7]``, ``round(w / s + z)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["gptq", "awq"]
LAYOUTS: tuple[Layout, ...] = ("gptq", "awq")

#: int4 values per int32 word.
PACK_FACTOR = 8
#: Nibble ``i`` of a word holds element ``order[i]`` of its eight.
GPTQ_NIBBLE_ORDER: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_NIBBLE_ORDER: tuple[int, ...] = (0, 2, 4, 6, 1, 3, 5, 7)
#: Largest float weight chunk :func:`w4a16_linear_reference` dequantizes at once.
_CHUNK_ELEMENTS = 1 << 22


def _check_order(order: Sequence[int]) -> list[int]:
    if sorted(order) != list(range(PACK_FACTOR)):
        raise ValueError(f"nibble order must be a permutation of 0..7, got {tuple(order)}")
    return list(order)


def pack_int4(
    values: torch.Tensor, dim: int, order: Sequence[int] = GPTQ_NIBBLE_ORDER
) -> torch.Tensor:
    """Pack int4 ``values`` (integers in ``[0, 15]``) eight to an int32 word along ``dim``.

    Nibble ``i`` of each word holds element ``order[i]`` of its eight. The result has
    ``values.shape[dim] / 8`` along ``dim``; ``values`` is not modified.
    """
    order = _check_order(order)
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"pack_int4 takes an integer tensor, got {values.dtype}")
    moved = values.movedim(dim, -1).to(torch.int64)  # [..., L]
    length = moved.shape[-1]
    if length % PACK_FACTOR:
        raise ValueError(f"cannot pack {length} int4 values along dim {dim}: not a multiple of 8")
    if moved.numel() and (moved.min() < 0 or moved.max() > 15):
        raise ValueError("int4 values must lie in [0, 15]")
    groups = moved.reshape(*moved.shape[:-1], length // PACK_FACTOR, PACK_FACTOR)[..., order]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=values.device)  # [8]
    words = (groups << shifts).sum(dim=-1)  # [..., L / 8], in [0, 2**32)
    # Wrap to the signed int32 the checkpoints hold (bit pattern unchanged).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32).movedim(-1, dim)


def unpack_int4(
    packed: torch.Tensor, dim: int, order: Sequence[int] = GPTQ_NIBBLE_ORDER
) -> torch.Tensor:
    """The int4 values (int32, in ``[0, 15]``) of int32 words packed along ``dim``, the
    inverse of :func:`pack_int4` with the same ``order``."""
    order = _check_order(order)
    if packed.dtype != torch.int32:
        raise ValueError(f"packed int4 words must be int32, got {packed.dtype}")
    moved = packed.movedim(dim, -1)  # [..., W]
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)  # [8]
    # Arithmetic shift of a negative word smears the sign bit; the mask drops it.
    nibbles = (moved.unsqueeze(-1) >> shifts) & 0xF  # [..., W, 8], nibble i = element order[i]
    inverse = [order.index(element) for element in range(PACK_FACTOR)]
    values = nibbles[..., inverse].reshape(*moved.shape[:-1], moved.shape[-1] * PACK_FACTOR)
    return values.movedim(-1, dim)


@dataclass(frozen=True, slots=True)
class W4A16Shape:
    """Sizes implied by one layer's packed tensors (see :func:`check_w4a16_shapes`)."""

    input_size: int
    output_size: int
    num_groups: int
    #: Resolved group size (``-1`` replaced by ``input_size``), or ``None`` when unknown.
    group_size: int | None


def _expect(name: str, tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {what} = {list(shape)}, got {list(tensor.shape)}")


def check_w4a16_shapes(
    layout: str,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    group_size: int | None,
) -> W4A16Shape:
    """Check one layer's packed tensors against ``layout`` and return their sizes.

    ``group_size`` may be ``-1`` (one group) or ``None`` (GPTQ with ``g_idx`` only: the
    number of groups is then taken from ``scales``). Reads no tensor data, so it never
    synchronizes a device. Raises ``ValueError`` naming the first inconsistent tensor.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for name, tensor in (("qweight", qweight), ("qzeros", qzeros)):
        if tensor.dtype != torch.int32 or tensor.dim() != 2:
            raise ValueError(
                f"{name} must be a 2-D int32 tensor, got {tensor.dtype} {list(tensor.shape)}"
            )
    if not scales.dtype.is_floating_point or scales.dim() != 2:
        raise ValueError(
            f"scales must be a 2-D float tensor, got {scales.dtype} {list(scales.shape)}"
        )
    if layout == "gptq":
        input_size, output_size = qweight.shape[0] * PACK_FACTOR, qweight.shape[1]
    else:
        input_size, output_size = qweight.shape[0], qweight.shape[1] * PACK_FACTOR
    if input_size == 0 or output_size == 0:
        raise ValueError(f"qweight must not be empty, got {list(qweight.shape)}")
    if group_size is None:
        if layout != "gptq" or g_idx is None:
            raise ValueError("group_size is needed unless a GPTQ g_idx gives each row's group")
        num_groups = scales.shape[0]
    elif group_size == -1 or group_size > 0:
        group_size = input_size if group_size == -1 else group_size
        num_groups = -(-input_size // group_size)
    else:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    _expect("scales", scales, (num_groups, output_size), "[num_groups, output_size]")
    _expect(
        "qzeros", qzeros, (num_groups, output_size // PACK_FACTOR), "[num_groups, output_size/8]"
    )
    if g_idx is not None:
        if layout == "awq":
            raise ValueError("AWQ layers have no g_idx: their groups are contiguous")
        if g_idx.dtype.is_floating_point or g_idx.dtype == torch.bool:
            raise ValueError(f"g_idx must be an integer tensor, got {g_idx.dtype}")
        _expect("g_idx", g_idx, (input_size,), "[input_size]")
    return W4A16Shape(input_size, output_size, num_groups, group_size)


def _check_zeros_offset(layout: str, zeros_offset: int) -> None:
    if zeros_offset not in (0, 1):
        raise ValueError(f"zeros_offset must be 0 or 1, got {zeros_offset}")
    if layout == "awq" and zeros_offset != 0:
        raise ValueError("AWQ checkpoints store the true zero point: zeros_offset must be 0")


def _check_g_idx_values(g_idx: torch.Tensor, num_groups: int) -> None:
    # Reads the tensor (a device sync): only for the reference path, never in a kernel call.
    if g_idx.min() < 0 or g_idx.max() >= num_groups:
        raise ValueError(f"g_idx values must lie in [0, {num_groups}) (the rows of scales)")


def sequential_g_idx(
    input_size: int, group_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """``k // group_size`` for every input row ``k``: the ``g_idx`` without act-order."""
    group_size = input_size if group_size == -1 else group_size
    if group_size <= 0:
        raise ValueError(f"group_size must be positive or -1, got {group_size}")
    return torch.arange(input_size, dtype=torch.int32, device=device) // group_size  # [K]


def is_sequential_g_idx(g_idx: torch.Tensor, group_size: int) -> bool:
    """Whether ``g_idx`` is plain ``k // group_size`` (no act-order), so a kernel may skip
    the per-row gather. Reads the tensor: call it once at load time, not per step."""
    expected = sequential_g_idx(g_idx.shape[0], group_size, g_idx.device)
    return bool(torch.equal(g_idx.to(torch.int32), expected))


def _dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    zeros_offset: int,
) -> torch.Tensor:  # [N, K] float32
    q = unpack_int4(qweight, dim=0)  # [K, N]
    zeros = unpack_int4(qzeros, dim=1) + zeros_offset  # [num_groups, N]
    groups = g_idx.long()  # [K]
    weight = (q - zeros[groups]).float() * scales.float()[groups]  # [K, N]
    return weight.t().contiguous()


def _dequantize_awq(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:  # [N, K] float32
    q = unpack_int4(qweight, dim=1, order=AWQ_NIBBLE_ORDER)  # [K, N]
    zeros = unpack_int4(qzeros, dim=1, order=AWQ_NIBBLE_ORDER)  # [num_groups, N]
    groups = torch.arange(q.shape[0], device=q.device) // group_size  # [K]
    weight = (q - zeros[groups]).float() * scales.float()[groups]  # [K, N]
    return weight.t().contiguous()


def dequantize_gptq(
    qweight: torch.Tensor,  # [K / 8, N] int32
    qzeros: torch.Tensor,  # [num_groups, N / 8] int32
    scales: torch.Tensor,  # [num_groups, N]
    g_idx: torch.Tensor,  # [K]
    *,
    zeros_offset: int,
) -> torch.Tensor:  # [N, K] float32
    """The float32 weight ``[output_size, input_size]`` of a GPTQ layer.

    ``zeros_offset`` is added to every stored zero: 1 for ``checkpoint_format: "gptq"``
    (v1), 0 for ``"gptq_v2"``. Any ``g_idx`` works, act-order included. Inputs unchanged.
    """
    _check_zeros_offset("gptq", zeros_offset)
    shape = check_w4a16_shapes("gptq", qweight, qzeros, scales, g_idx, None)
    _check_g_idx_values(g_idx, shape.num_groups)
    return _dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset)


def dequantize_awq(
    qweight: torch.Tensor,  # [K, N / 8] int32
    qzeros: torch.Tensor,  # [num_groups, N / 8] int32
    scales: torch.Tensor,  # [num_groups, N]
    group_size: int,
) -> torch.Tensor:  # [N, K] float32
    """The float32 weight ``[output_size, input_size]`` of an AWQ (GEMM) layer;
    ``group_size`` ``-1`` means one group. Inputs unchanged."""
    shape = check_w4a16_shapes("awq", qweight, qzeros, scales, None, group_size)
    assert shape.group_size is not None
    return _dequantize_awq(qweight, qzeros, scales, shape.group_size)


def w4a16_linear_reference(
    x: torch.Tensor,  # [..., K]
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,  # [N]
    *,
    layout: str,
    group_size: int,
    zeros_offset: int,
) -> torch.Tensor:  # [..., N], x.dtype
    """``x @ W.T + bias`` for a packed int4 weight, in torch on any device.

    The weight is dequantized in float32 a slice of output columns at a time (never the
    whole float matrix), products are accumulated in float32, and the output is rounded
    once to ``x.dtype``. ``g_idx`` (GPTQ only) may be ``None`` for ``k // group_size``;
    ``zeros_offset`` is 1 for GPTQ v1 checkpoints, 0 for GPTQ v2 and AWQ. This is the
    reference the platform kernels are tested against. Inputs are not modified.
    """
    _check_zeros_offset(layout, zeros_offset)
    shape = check_w4a16_shapes(layout, qweight, qzeros, scales, g_idx, group_size)
    assert shape.group_size is not None
    if x.shape[-1] != shape.input_size:
        raise ValueError(f"x must have shape [..., {shape.input_size}], got {list(x.shape)}")
    if bias is not None:
        _expect("bias", bias, (shape.output_size,), "[output_size]")
    if layout == "gptq":
        if g_idx is None:
            g_idx = sequential_g_idx(shape.input_size, shape.group_size, qweight.device)
        _check_g_idx_values(g_idx, shape.num_groups)
    rows = x.reshape(-1, shape.input_size).float()  # [num_tokens, K]
    out = torch.empty(rows.shape[0], shape.output_size, dtype=torch.float32, device=x.device)
    step = max(PACK_FACTOR, _CHUNK_ELEMENTS // shape.input_size // PACK_FACTOR * PACK_FACTOR)
    for start in range(0, shape.output_size, step):
        stop = min(start + step, shape.output_size)
        words = slice(start // PACK_FACTOR, stop // PACK_FACTOR)
        if layout == "gptq":
            assert g_idx is not None
            weight = _dequantize_gptq(
                qweight[:, start:stop], qzeros[:, words], scales[:, start:stop], g_idx, zeros_offset
            )
        else:
            weight = _dequantize_awq(
                qweight[:, words], qzeros[:, words], scales[:, start:stop], shape.group_size
            )
        out[:, start:stop] = rows @ weight.t()  # [num_tokens, stop - start]
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype).view(*x.shape[:-1], shape.output_size)


def dequantize_int4(
    layout: str,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    *,
    group_size: int,
    zeros_offset: int,
) -> torch.Tensor:  # [N, K] float32
    """The float32 weight of a packed layer whose shapes were checked at load.

    Unlike :func:`dequantize_gptq` it reads no tensor values on the host (no ``g_idx``
    range check), so a device may run it inside a captured graph. ``g_idx`` ``None``
    means ``k // group_size``; ``group_size`` ``-1`` means one group.
    """
    input_size = qweight.shape[0] * PACK_FACTOR if layout == "gptq" else qweight.shape[0]
    size = input_size if group_size == -1 else group_size
    if layout == "awq":
        return _dequantize_awq(qweight, qzeros, scales, size)
    if g_idx is None:
        g_idx = sequential_g_idx(input_size, size, qweight.device)
    return _dequantize_gptq(qweight, qzeros, scales, g_idx, zeros_offset)
