"""INT4 group quantization with the arithmetic of the published `mobilemoe-int4-g32` format.

Per group of `group_size` values along the last dimension: `scale = fp16(max(-min / 8, max / 7))`,
`q = clamp(round(w / scale), -8, 7)`, value `q * scale`, no zero point. This choice of scale (torchao's
`SYMMETRIC_NO_CLIPPING_ERR`, which its QAT configs don't offer) is what makes quantization *idempotent*: quantizing
values that are already `q * scale` gives back the same `q` and `scale`, so fake quantization, conversion, the packed
file and a reload of it all agree bit for bit, and save -> load -> save is byte-identical.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling_mobilemoe import dequantize_int4, unpack_int4

QMIN, QMAX = -8, 7
_SMALLEST_SCALE = torch.finfo(torch.float16).tiny  # all-zero groups get a normal fp16 scale, not 0


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(q, scale)`: int8 values in [-8, 7] shaped like `weight`, fp16 scales `[..., last_dim / group_size]`."""
    if weight.shape[-1] % group_size:
        raise ValueError(
            f"group_size: {group_size} does not divide the last dimension of a {tuple(weight.shape)} weight."
        )
    groups = weight.detach().float().unflatten(-1, (-1, group_size))
    scale = torch.maximum(groups.amin(-1) / QMIN, groups.amax(-1) / QMAX).clamp(min=_SMALLEST_SCALE).half()
    q = (groups / scale.float()[..., None]).round().clamp(QMIN, QMAX).to(torch.int8)
    return q.flatten(-2), scale


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """The weight's INT4 values `q * scale` in its dtype (no gradient; see `Int4WeightFakeQuantizer`)."""
    q, scale = quantize_int4(weight, group_size)
    return (q.unflatten(-1, (-1, group_size)).float() * scale.float()[..., None]).flatten(-2).to(weight.dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two int4 values per byte, low nibble first (the published layout): `[..., n]` int8 -> `[..., n / 2]` uint8."""
    nibbles = q.to(torch.uint8) & 0x0F
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


class Int4WeightFakeQuantizer(nn.Module):
    """Fake-quantizes a weight to its INT4 values with a straight-through gradient. `transpose` groups along the
    second-to-last dimension instead (experts are stored `[E, out, in]` but grouped along `out`, as published)."""

    def __init__(self, group_size: int = 32, transpose: bool = False):
        super().__init__()
        self.group_size = group_size
        self.transpose = transpose

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        grouped = weight.transpose(-1, -2) if self.transpose else weight
        quantized = fake_quantize_int4(grouped, self.group_size)
        quantized = quantized.transpose(-1, -2) if self.transpose else quantized
        return weight + (quantized - weight).detach()

    def extra_repr(self) -> str:
        return f"int4, group_size={self.group_size}, groups along {'dim -2' if self.transpose else 'dim -1'}"


__all__ = [
    "Int4WeightFakeQuantizer",
    "dequantize_int4",
    "fake_quantize_int4",
    "pack_int4",
    "quantize_int4",
    "unpack_int4",
]
