"""CPU decode kernels: a streaming linear and a fused routed-experts operator for inputs of a few rows.

Decoding one token reads every active weight once; on CPU that is memory-bound, and PyTorch's BLAS reads fp32 weights
at about half of this machine's read bandwidth. `cpu_decode.cpp` streams them at close to it, and runs the routed
experts of a layer (fp32 or bf16) as one operator that reads only the selected experts' rows
(`benchmarks/bench_inference.py` measures the model end to end). The kernels are compiled the first time a model
needs them (`torch.utils.cpp_extension`, cached per machine; about 30 s) and registered as the
`torch.ops.mobilemoe_cpu` operators, with fake implementations so `torch.compile` keeps them as opaque nodes.

Importing the package installs them on every MobileMoE model it builds (`MODEL_INIT_HOOKS` of the modeling file):
`nn.Linear` layers run `cpu_linear_forward` (fp32 rows <= `MAX_LINEAR_ROWS` without autograd go to the kernel; bf16
inputs of more rows run in float32 on CPUs without native bf16 matmul; everything else is `F.linear`), and the
default `sorted_mm` experts hand few-slot inference to the `cpu_fused` experts implementation (also selectable as
`experts_implementation="cpu_fused"`). Exported programs (`torch.export`, ONNX) never contain these operators.
`MOBILEMOE_CPU_KERNELS=0` turns them off; a model loaded as Hub remote code has none of this and runs on stock
PyTorch ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface

from ..modeling_mobilemoe import _UPCAST_MIN_ROWS as UPCAST_MIN_ROWS
from ..modeling_mobilemoe import MODEL_INIT_HOOKS, _half_matmul_is_slow, sorted_experts


logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_decode.cpp")
# Up to this many rows a linear stays memory-bound in the kernel (measured: the LM head at 4 rows costs ~1.2x one).
MAX_LINEAR_ROWS = 4
# Up to this many (token, expert) slots the experts of a layer run in the fused operator (batch-4 decode at top-4).
MAX_FUSED_SLOTS = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# The linear kernel runs fp32 only: its bf16 variant measured no faster than PyTorch's bf16 gemv here (0.91x on the
# full S decode, dominated by the LM head; `benchmarks/results/inference_S.json`), while the fused experts gain in both.
LINEAR_KERNEL_DTYPES = (torch.float32,)

_state: dict[str, object] = {"loaded": False, "reason": None, "enabled": True}


def set_enabled(on: bool) -> None:
    """Models use the kernels (`True`, the default) or stock PyTorch ops only (`False`) from now on."""
    _state["enabled"] = on


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """`set_enabled(on)` within the block only."""
    previous = _state["enabled"]
    set_enabled(on)
    try:
        yield
    finally:
        set_enabled(previous)


def unavailable_reason() -> str | None:
    """Why the kernels can't run here (None when they can, or before anything tried to build them)."""
    if os.environ.get("MOBILEMOE_CPU_KERNELS", "1") == "0":
        return "turned off by MOBILEMOE_CPU_KERNELS=0"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"needs AVX2 + FMA; this CPU reports {torch.backends.cpu.get_cpu_capability()}"
    return _state["reason"]


def available() -> bool:
    """Build (once per machine) and load the kernels; False, with a logged reason, where that is impossible."""
    if _state["loaded"]:
        return True
    if unavailable_reason() is not None or torch.compiler.is_compiling():
        return False
    from torch.utils.cpp_extension import load

    try:
        load(
            name="mobilemoe_cpu_kernels",
            sources=[_SOURCE],
            extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # no compiler, no headers, ...: run on stock PyTorch ops instead
        _state["reason"] = f"building {_SOURCE} failed: {error}"
        logger.warning("MobileMoE CPU decode kernels unavailable (%s); using PyTorch's ops.", _state["reason"])
        return False
    _register_fakes()
    _state["loaded"] = True
    return True


def _register_fakes() -> None:
    @torch.library.register_fake("mobilemoe_cpu::linear")
    def _(input, weight, bias):
        return input.new_empty((*input.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mobilemoe_cpu::moe_experts")
    def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        return torch.empty_like(hidden_states)


def _cpu_outside_export(input: torch.Tensor) -> bool:
    """This module's paths are on, `input` is on the CPU, and no program is being exported (those keep stock ops)."""
    return _state["enabled"] and input.device.type == "cpu" and not torch.compiler.is_exporting()


def _kernel_applies(input: torch.Tensor, *weights: torch.Tensor) -> bool:
    """The kernels are inference-only, for CPU tensors of one supported dtype, and never go into exported programs."""
    if not _cpu_outside_export(input):
        return False
    if torch.is_grad_enabled() and (input.requires_grad or any(weight.requires_grad for weight in weights)):
        return False
    dtype_ok = input.dtype in _KERNEL_DTYPES and all(weight.dtype == input.dtype for weight in weights)
    layout_ok = all(weight.is_contiguous() and weight.shape[-1] % 8 == 0 for weight in weights)
    return dtype_ok and layout_ok and (_state["loaded"] if torch.compiler.is_compiling() else available())


def cpu_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` for CPUs: few-row inference on the streaming kernel (see the module docstring); bf16/fp16
    inputs of more rows in float32 where the CPU has no native half-precision matmul (as `sorted_mm` does for the
    experts: the upcast costs one pass over the weight, the half-precision GEMM falls off oneDNN's fast kernels)."""
    # Shapes are checked last: under torch.export a size test would constrain the exported sequence length.
    streamed = input.dtype in LINEAR_KERNEL_DTYPES and _kernel_applies(input, self.weight)
    if streamed and input.numel() <= MAX_LINEAR_ROWS * input.shape[-1]:
        return torch.ops.mobilemoe_cpu.linear(input, self.weight, self.bias)
    upcast = _cpu_outside_export(input) and _half_matmul_is_slow(input.dtype)
    if upcast and input.numel() >= UPCAST_MIN_ROWS * input.shape[-1]:
        bias = None if self.bias is None else self.bias.float()
        return F.linear(input.float(), self.weight.float(), bias).to(input.dtype)
    return F.linear(input, self.weight, self.bias)


def cpu_fused_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Few-slot inference: gate-up, SwiGLU, down and the weighted sum of the selected experts in one operator that
    reads only their rows; anything else (prefill, training, QAT, other activations) runs `sorted_mm`'s formulations."""
    fused = (
        isinstance(self.act_fn, (nn.SiLU, SiLUActivation))
        and getattr(self, "activation_fake_quantizer", None) is None
        and getattr(self, "gather_weights", None) is None  # the exporters' packed INT4 experts
        and _kernel_applies(hidden_states, self.gate_up_proj, self.down_proj)
        and top_k_index.numel() <= MAX_FUSED_SLOTS  # last, as in `cpu_linear_forward`
    )
    if not fused:
        return sorted_experts(self, hidden_states, top_k_index, top_k_weights)
    return torch.ops.mobilemoe_cpu.moe_experts(
        hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj
    )


def install(model: nn.Module) -> None:
    """Give `model`'s `nn.Linear` layers `cpu_linear_forward` as their `forward`, in place. Only the instance's
    method changes: class, parameters and state dict stay those of `nn.Linear`, so libraries that look for exactly
    `nn.Linear` (bitsandbytes, torchao, PEFT) still find and replace them."""
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = types.MethodType(cpu_linear_forward, module)


ExpertsInterface.register("cpu_fused", cpu_fused_experts_forward)
if install not in MODEL_INIT_HOOKS:
    MODEL_INIT_HOOKS.append(install)

__all__ = [
    "available",
    "cpu_fused_experts_forward",
    "cpu_linear_forward",
    "enabled",
    "install",
    "set_enabled",
    "unavailable_reason",
]
