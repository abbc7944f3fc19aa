"""Quantization-aware training and the packed INT4 format (`mobilemoe-int4-g32`).

`MobileMoEQATConfig` and its quantizer are registered with transformers when `modeling_mobilemoe` is imported; the
QAT machinery (torchao) is imported when first used.
"""

import importlib

from .config import MobileMoEQATConfig
from .quantizer import MobileMoEQATQuantizer

_LAZY = {
    "FakeQuantizedExperts": ".qat",
    "convert_to_int4": ".qat",
    "packed_state_dict": ".qat",
    "prepare_qat": ".qat",
    "fake_quantize_int4": ".int4",
    "pack_int4": ".int4",
    "quantize_int4": ".int4",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MobileMoEQATConfig", "MobileMoEQATQuantizer", *_LAZY]
