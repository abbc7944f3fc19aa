"""Export MobileMoE to ExecuTorch (.pte) and ONNX, and run the exports against PyTorch.

`export_model(model, out, format="executorch" | "onnx", quantize="none" | "8da4w", ...)`, or the format's own
`export_executorch` / `export_onnx`; `load_runner(out)` gives the matching runner (`ExecuTorchRunner`,
`OnnxRunner`) with a greedy `generate`. executorch and onnx/onnxruntime are imported when first used
(`pip install "modeling-mobilemoe[export]"`).
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .common import (
    QUANTIZE_CHOICES,
    ExportConfig,
    GreedyResult,
    greedy_with_pytorch,
    load_for_export,
    reference_model,
)

EXPORT_FORMATS = ("executorch", "onnx")
_FORMAT_ONLY_OPTIONS = {"max_chunk": "executorch", "custom_sdpa": "executorch", "experts": "onnx"}
_LAZY = {
    "ExecuTorchRunner": ".executorch",
    "export_executorch": ".executorch",
    "OnnxRunner": ".onnx",
    "export_onnx": ".onnx",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export_model(model, output_dir: str | Path, *, format: str, target: str | None = None, **options) -> Path:
    """Exports to `format` (one of `EXPORT_FORMATS`); `options` are the format exporter's keyword arguments."""
    for option, owner in _FORMAT_ONLY_OPTIONS.items():
        if option in options and format in EXPORT_FORMATS and format != owner:
            raise ValueError(f"{option}: an option of the {owner} export only, not of {format}.")
    if format == "executorch":
        return __getattr__("export_executorch")(model, output_dir, target=target or "xnnpack", **options)
    if format == "onnx":
        if target not in (None, "cpu"):
            raise ValueError(f"target: {target!r}; the ONNX export has one target, 'cpu' (ONNX Runtime).")
        return __getattr__("export_onnx")(model, output_dir, **options)
    raise ValueError(f"format: {format!r} is not one of {list(EXPORT_FORMATS)}.")


def load_runner(folder: str | Path):
    """The runner for an export folder, by the format its `export_config.json` names."""
    runner = {"executorch": "ExecuTorchRunner", "onnx": "OnnxRunner"}[ExportConfig.load(folder).format]
    return __getattr__(runner)(folder)


__all__ = [
    "EXPORT_FORMATS",
    "QUANTIZE_CHOICES",
    "ExportConfig",
    "GreedyResult",
    "export_model",
    "greedy_with_pytorch",
    "load_for_export",
    "load_runner",
    "reference_model",
    *_LAZY,
]
