"""CPU inference kernels: operators for decode steps and small batches (a few rows), and for prefill.

Decoding one token reads every active weight once; on CPU that is memory-bound, and PyTorch's BLAS reads weights at a
third to a half of the machine's read bandwidth at one row. `cpu_decode.cpp` streams them at close to it, with AVX2 +
FMA, AVX-512 or AVX-512 BF16, and AMX-BF16 tiles for the experts' bf16 GEMMs (picked at run time: `instruction_set`,
`limit_instruction_set`). Past a few rows the matmuls are compute-bound and the operators run GEMMs, saving what is
around them: elementwise passes, and for the routed experts a Python iteration per expert. bf16 GEMMs run oneDNN's
matmul, as `nn.Linear` does. fp32 `nn.Linear` runs MKL's sgemm, which on AMD CPUs takes its AVX2 code; oneDNN's fp32
linear measured 1.7-2.8x faster on the Zen 5 benchmark machine (AVX-512), so there the operators and
`cpu_linear_forward` call it, and elsewhere MKL, which measured faster where its code is as wide as the CPU's
(`set_float32_gemms`). The operators:

- `linear`: a streaming gemv, fp32 or bf16 (bf16 widened in AVX2 registers measured 2.1-3.3x PyTorch's bf16 gemv on
  an AVX2-only AMD EPYC at 1-4 rows, the LM head included; with AVX-512 BF16, 3x on the LM head);
- `moe_experts`: the routed experts of a layer (gate-up, SwiGLU, down, weighted sum) reading only the selected
  experts' weights, fp32 or bf16: streamed for a few (token, expert) slots, a grouped GEMM for more (experts split
  between the cores, each expert's GEMMs on one core: 1.3x running them one after another on both; bf16 inference on
  CPUs with AMX tiles multiplies on them directly, reading the weights in place where oneDNN repacks them per call);
- `swiglu_mlp`: the shared expert (gate, up, SwiGLU, down) in one call;
- `decode_attention`: grouped-query attention of a few queries over the KV cache, each key/value head read once for
  its query group;
- `prefill_attention`: attention of many queries as eager attention computes it, GEMMs on blocks of query
  positions (a group's query heads stacked, keys no query of the block sees skipped) around one softmax pass: 2.2x
  PyTorch's CPU SDPA in bf16 on CPUs without AMX (with AMX SDPA is faster, and runs), 1.7x in fp32;
- `attention_input` and `layer_output`: the rest of a decoder layer around the cache update and attention (norms,
  projections, RoPE, QK-norm, FP32 routing, the feed-forward, residuals), which eagerly is ~350 operator calls a
  layer (full S decode steps measured 1.16-1.25x faster with them, fp32 and bf16), at decode and at prefill.

`benchmarks/bench_inference.py` measures them end to end. They are compiled the first time a model is built
(`torch.utils.cpp_extension`, cached per machine; about 30 s) and registered as `torch.ops.mobilemoe_cpu`, with fake
implementations so `torch.compile` keeps them as opaque nodes.

Importing the package installs them on every MobileMoE model it builds (`MODEL_INIT_HOOKS` of the modeling file):
`nn.Linear` layers run `cpu_linear_forward` (kernel rows <= `MAX_LINEAR_ROWS` without autograd; more fp32 rows without
autograd on the library `set_float32_gemms` chose; bf16 inputs of more rows in float32 on CPUs without native bf16
matmul; everything else `F.linear`), `MobileMoEMLP` runs `cpu_mlp_forward`, the default `sorted_mm` experts hand
inference to the `cpu_fused` experts implementation (also selectable as `experts_implementation="cpu_fused"`), `sdpa`
attention on CPU runs `cpu_sdpa_attention_forward` (inference only), and `MobileMoEDecoderLayer` runs
`cpu_decoder_layer_forward`: a layer's forward as `attention_input`, the cache update, attention and `layer_output` (a
graph being compiled runs the per-module paths instead). Training runs the routed experts' grouped GEMM with its own
backward (`GroupedExperts`: `moe_experts_forward`, `moe_experts_backward`). Each falls back to the stock path for
anything else (other training, hooks or wrappers such as PEFT's, other dtypes, and past a few rows half precision on
CPUs without native half-precision matmuls). Exported programs (`torch.export`, ONNX) never contain these operators.
`MOBILEMOE_CPU_KERNELS=0` turns them off; a model loaded as Hub remote code has none of this and runs on stock PyTorch
ops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import types
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import SiLUActivation
from transformers.integrations.moe import ExpertsInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface
from transformers.utils.output_capturing import _active_collector

from ..modeling_mobilemoe import _UPCAST_MIN_ROWS as UPCAST_MIN_ROWS
from ..modeling_mobilemoe import (
    CPU_SDPA,
    MODEL_INIT_HOOKS,
    MobileMoEAttention,
    MobileMoEDecoderLayer,
    MobileMoEExperts,
    MobileMoEMLP,
    MobileMoEQKNorm,
    MobileMoERMSNorm,
    MobileMoESparseMoeBlock,
    MobileMoETopkRouter,
    _half_matmul_is_slow,
    sorted_experts,
)
from torch.nn.modules import module as torch_module


logger = logging.getLogger(__name__)

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_decode.cpp")
# Up to this many rows a linear stays memory-bound in the kernel (measured: the LM head at 4 rows costs ~1.2x one);
# the operators run GEMMs past it (`kMaxStreamedRows` in cpu_decode.cpp).
MAX_LINEAR_ROWS = 4
# Up to this many (token, expert) slots the routed experts stream their weights (batch-4 decode at top-4); past it
# `moe_experts` runs a grouped GEMM (`kMaxStreamedSlots` in cpu_decode.cpp).
MAX_FUSED_SLOTS = 16
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
# Instruction sets of the kernels (`cpu_decode.cpp`), lowest first; a machine runs the highest it supports.
INSTRUCTION_SETS = ("avx2", "avx512", "avx512_bf16", "amx_bf16")
# Libraries the fp32 GEMMs of inference past a few rows may run on (`set_float32_gemms`).
FLOAT32_GEMMS = ("aten", "onednn")

# oneDNN's fp32 linear as PyTorch registers it (inductor's frozen CPU graphs call it; inference only), which fp32
# inference past a few rows runs where `set_float32_gemms` chose it.
_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None) if torch.backends.mkldnn.is_available() else None

_state: dict[str, object] = {
    "loaded": False,
    "reason": None,
    "enabled": True,
    "sdpa_packed_dtypes": (),
}


def set_enabled(on: bool) -> None:
    """Models use the kernels (`True`, the default) or stock PyTorch ops only (`False`) from now on."""
    _state["enabled"] = on


@contextlib.contextmanager
def _temporarily(current: Callable[[], object], choose: Callable[[object], object], value: object) -> Iterator:
    """`choose(value)` within the block only, then `choose` again what `current()` gave before it; yields what
    `choose(value)` returned."""
    previous = current()
    active = choose(value)
    try:
        yield active
    finally:
        choose(previous)


def enabled(on: bool) -> contextlib.AbstractContextManager[None]:
    """`set_enabled(on)` within the block only."""
    return _temporarily(lambda: _state["enabled"], set_enabled, on)


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
    _state["sdpa_packed_dtypes"] = tuple(dtype for dtype in _KERNEL_DTYPES if torch.ops.mobilemoe_cpu.sdpa_packs(dtype))
    _state["loaded"] = True
    set_instruction_set("native")
    return True


def instruction_set() -> str | None:
    """The instruction set the kernels run with here (one of `INSTRUCTION_SETS`), None where they can't run."""
    return torch.ops.mobilemoe_cpu.instruction_set() if available() else None


def set_instruction_set(limit: str) -> str:
    """Caps the kernels at `limit` (one of `INSTRUCTION_SETS`, or "native": the highest this CPU supports) from now on,
    so every path a machine supports can be tested and measured; returns the instruction set now in use."""
    _check_choice(limit, INSTRUCTION_SETS, "instruction set")
    return torch.ops.mobilemoe_cpu.instruction_set(limit)


def limit_instruction_set(limit: str) -> contextlib.AbstractContextManager[str]:
    """`set_instruction_set(limit)` within the block only; yields the instruction set in use."""
    return _temporarily(instruction_set, set_instruction_set, limit)


def float32_gemms() -> str | None:
    """The library the fp32 GEMMs of inference past a few rows run on here (one of `FLOAT32_GEMMS`), None where the
    kernels can't run."""
    return torch.ops.mobilemoe_cpu.float32_gemms() if available() else None


def set_float32_gemms(library: str) -> str:
    """Runs the fp32 GEMMs of inference past a few rows (the operators' and `nn.Linear`'s) on `library` from now on:
    "aten" (`F.linear`: MKL's sgemm in PyTorch's x86 builds), "onednn" (oneDNN's fp32 linear), or "native": the one
    that measured faster on this kind of CPU (oneDNN on AMD CPUs with AVX-512, whose AVX-512 MKL leaves unused;
    `float32_gemms` in cpu_decode.cpp; MKL where this build of torch has no oneDNN linear). Returns the library now in
    use."""
    _check_choice(library, FLOAT32_GEMMS, "fp32 GEMM library")
    return torch.ops.mobilemoe_cpu.float32_gemms(library)


def use_float32_gemms(library: str) -> contextlib.AbstractContextManager[str]:
    """`set_float32_gemms(library)` within the block only; yields the library in use."""
    return _temporarily(float32_gemms, set_float32_gemms, library)


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    """`value` is one of `choices` or "native", and the kernels can run here (the setters' precondition)."""
    if value not in (*choices, "native"):
        raise ValueError(f"{what} {value!r} is not one of native, {', '.join(choices)}")
    if not available():
        raise RuntimeError(f"MobileMoE CPU kernels are unavailable: {unavailable_reason()}")


def _register_fakes() -> None:
    @torch.library.register_fake("mobilemoe_cpu::linear")
    def _(input, weight, bias):
        return input.new_empty((*input.shape[:-1], weight.shape[0]))

    @torch.library.register_fake("mobilemoe_cpu::moe_experts")
    def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        return torch.empty_like(hidden_states)

    @torch.library.register_fake("mobilemoe_cpu::moe_experts_forward")
    def _(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        slots, intermediate = top_k_index.numel(), down_proj.shape[-1]
        return (
            torch.empty_like(hidden_states),
            hidden_states.new_empty((slots, 2 * intermediate)),
            hidden_states.new_empty((slots, intermediate)),
            hidden_states.new_empty((slots, hidden_states.shape[-1])),
        )

    @torch.library.register_fake("mobilemoe_cpu::moe_experts_backward")
    def _(grad_output, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up, swiglu,
          expert_out, weight_grads):
        weight_grad = (torch.empty_like(gate_up_proj), torch.empty_like(down_proj)) if weight_grads else (None, None)
        grad_weights = top_k_weights.new_empty(top_k_weights.shape, dtype=torch.float32)
        return hidden_states.new_empty(hidden_states.shape), grad_weights, *weight_grad

    @torch.library.register_fake("mobilemoe_cpu::swiglu_mlp")
    def _(hidden_states, gate, up, down):
        return torch.empty_like(hidden_states)

    @torch.library.register_fake("mobilemoe_cpu::decode_attention")
    def _(query, key, value, mask, scale):
        return query.new_empty((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))

    @torch.library.register_fake("mobilemoe_cpu::prefill_attention")
    def _(query, key, value, mask, scale, causal):
        return query.new_empty((query.shape[0], query.shape[2], query.shape[1], query.shape[3]))

    @torch.library.register_fake("mobilemoe_cpu::attention_input")
    def _(hidden_states, norm_weight, eps, q_proj, k_proj, v_proj, head_dim, cos, sin, qk_norm_eps):
        batch, length = hidden_states.shape[:2]
        return tuple(
            hidden_states.new_empty((batch, projection.shape[0] // head_dim, length, head_dim))
            for projection in (q_proj, k_proj, v_proj)
        )

    @torch.library.register_fake("mobilemoe_cpu::layer_output")
    def _(attention, residual, o_proj, norm_weight, eps, gate, up, down, router, expert_bias, gate_up_proj, down_proj,
          top_k, norm_topk_prob, routed_scaling_factor):
        return torch.empty_like(residual)


def _cpu_outside_export(input: torch.Tensor) -> bool:
    """This module's paths are on, `input` is on the CPU, and no program is being exported (those keep stock ops)."""
    return _state["enabled"] and input.device.type == "cpu" and not torch.compiler.is_exporting()


def _kernel_applies(
    input: torch.Tensor, *weights: torch.Tensor, differentiable: bool = False, strided: bool = False
) -> bool:
    """The kernels are for CPU tensors of one supported dtype and never go into exported programs; they are
    inference-only unless the caller is `differentiable` (runs them inside an `autograd.Function`). `weights` must be
    contiguous unless the operator takes them `strided` (copying them itself, as the attention operators do)."""
    # Under autocast the stock ops run in the autocast dtype; the kernels would compute in the inputs' own.
    if not _cpu_outside_export(input) or torch.is_autocast_enabled("cpu"):
        return False
    needs_grad = input.requires_grad or any(weight.requires_grad for weight in weights)
    if torch.is_grad_enabled() and needs_grad and not differentiable:
        return False
    # Plain tensors only: a tensor subclass (torchao's quantized weights) must reach its own dispatch, not the kernels.
    dtype_ok = input.dtype in _KERNEL_DTYPES and all(
        weight.dtype == input.dtype and type(weight) in (torch.Tensor, nn.Parameter) for weight in weights
    )
    layout_ok = all((strided or weight.is_contiguous()) and weight.shape[-1] % 8 == 0 for weight in weights)
    return dtype_ok and layout_ok and (_state["loaded"] if torch.compiler.is_compiling() else available())


def _member(module: nn.Module, name: str) -> object:
    """`getattr(module, name)`, read from the module's registries first: nn.Module's `__getattr__` reaches a registered
    submodule, parameter or buffer only after Python's own lookup has raised and caught an AttributeError (~1.7 us an
    access on the 2-core AMD EPYC; a decode step's checks made ~70 such accesses a layer, ~2.4 ms a bf16 S step). An
    attribute that is not there is None (the optional hooks of QAT and the exporters), without an exception either."""
    for registry in (module._modules, module._parameters, module._buffers, vars(module)):
        if name in registry:
            return registry[name]
    return None if getattr(type(module), name, None) is None else getattr(module, name)  # bound, as getattr binds


def _onednn_linear_applies() -> bool:
    """oneDNN's fp32 linear is chosen (`set_float32_gemms`), there and on (`torch.backends.mkldnn.enabled`), and no
    graph is being compiled (it is an eager-only choice: compiled graphs take inductor's own GEMMs)."""
    # The library is asked of the operators (one source of truth), at the cost of a call next to a GEMM of 5+ rows.
    return (
        not torch.compiler.is_compiling()
        and _ONEDNN_LINEAR is not None
        and torch.backends.mkldnn.enabled
        and torch.ops.mobilemoe_cpu.float32_gemms() == "onednn"
    )


def cpu_linear_forward(self: nn.Linear, input: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` for CPUs: few-row inference on the streaming kernel (see the module docstring), more fp32
    rows on the library `set_float32_gemms` chose; bf16/fp16 inputs of more rows in float32 where the CPU has no native
    half-precision matmul (as `sorted_mm` does for the experts: the upcast costs one pass over the weight, the
    half-precision GEMM falls off oneDNN's fast kernels)."""
    weight, bias = _member(self, "weight"), _member(self, "bias")
    bias_needs_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    inference = _kernel_applies(input, weight) and not bias_needs_grad
    # Shapes are checked last: under torch.export a size test would constrain the exported sequence length.
    if inference and input.numel() <= MAX_LINEAR_ROWS * input.shape[-1]:
        return torch.ops.mobilemoe_cpu.linear(input, weight, bias)
    if inference and input.dtype == torch.float32 and _onednn_linear_applies():
        return _ONEDNN_LINEAR(input, weight, bias, "none", [], "")
    upcast = _cpu_outside_export(input) and _half_matmul_is_slow(input.dtype)
    if upcast and input.numel() >= UPCAST_MIN_ROWS * input.shape[-1]:
        return F.linear(input.float(), weight.float(), None if bias is None else bias.float()).to(input.dtype)
    return F.linear(input, weight, bias)


def _rows_fit(input: torch.Tensor, rows: int, streamed_limit: int) -> bool:
    """Up to `streamed_limit` rows (or slots) an operator streams its weights, in every dtype it takes; more run GEMMs
    inside it, for dtypes this CPU has native matmul kernels for (elsewhere the modules upcast half precision to
    float32 first, see `cpu_linear_forward`)."""
    return rows <= streamed_limit or not _half_matmul_is_slow(input.dtype)


def _sdpa_packs(dtype: torch.dtype) -> bool:
    """PyTorch's CPU SDPA multiplies `dtype` on packed operands here (AMX tiles; `cpublas::could_pack`, which it asks
    itself), and then beats `prefill_attention`: bf16 at a 1k-token S layer 4.6 against 8.7 ms on a 2-core Xeon with
    AMX, a left-padded batch 14.0 against 17.7 (`benchmarks/bench_attention.py`)."""
    return dtype in _state["sdpa_packed_dtypes"]


def _global_module_hooks() -> bool:
    """Forward hooks registered for every module (`register_module_forward_hook`), which a fused operator would skip."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _is_plain_kernel_linear(module: nn.Module) -> bool:
    """An `nn.Linear` without bias that runs `cpu_linear_forward` with nothing hooked in: not replaced or wrapped
    since `install` (PEFT's LoRA layers, QAT's fake-quantized linears, bitsandbytes, accelerate's offload hooks)."""
    forward = vars(module).get("forward")
    return (
        type(module) is nn.Linear
        and _member(module, "bias") is None
        and getattr(forward, "__func__", None) is cpu_linear_forward
        and not (module._forward_hooks or module._forward_pre_hooks)
        and not _global_module_hooks()
    )


def _swiglu_mlp_weights(mlp: MobileMoEMLP) -> tuple[torch.Tensor, ...] | None:
    """gate, up and down weights where `swiglu_mlp` computes what `mlp` does (SiLU, plain kernel linears), or None."""
    projections = tuple(_member(mlp, name) for name in ("gate_proj", "up_proj", "down_proj"))
    if isinstance(_member(mlp, "act_fn"), (nn.SiLU, SiLUActivation)) and all(map(_is_plain_kernel_linear, projections)):
        return tuple(_member(projection, "weight") for projection in projections)
    return None


def _moe_experts_fit(experts: nn.Module) -> bool:
    """`moe_experts` computes what these experts do: SiLU, no QAT activation quantizer, not exporters' packed INT4."""
    return (
        isinstance(_member(experts, "act_fn"), (nn.SiLU, SiLUActivation))
        and _member(experts, "activation_fake_quantizer") is None
        and _member(experts, "gather_weights") is None
    )


def cpu_mlp_forward(self: MobileMoEMLP, hidden_states: torch.Tensor) -> torch.Tensor:
    """`MobileMoEMLP.forward` for CPUs (the shared expert): inference runs gate, up, SwiGLU and down as one operator
    (few rows streamed, fp32 or bf16, more as GEMMs with the SwiGLU in one pass); anything else is the module's own
    forward."""
    weights = _swiglu_mlp_weights(self)
    fused = (
        weights is not None
        and _kernel_applies(hidden_states, *weights)
        # last, as in `cpu_linear_forward`
        and _rows_fit(hidden_states, hidden_states.numel() // hidden_states.shape[-1], MAX_LINEAR_ROWS)
    )
    if not fused:
        return MobileMoEMLP.forward(self, hidden_states)
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    out = torch.ops.mobilemoe_cpu.swiglu_mlp(rows, *weights)
    return out.view(hidden_states.shape)


def _is_stock(module: nn.Module | None, cls: type) -> bool:
    """`module` is exactly a `cls` running the class's own forward (not a subclass, not a replaced forward)."""
    return type(module) is cls and "forward" not in vars(module)


def _runs_unhooked(*modules: nn.Module) -> bool:
    """Nothing hooks into these modules' calls, which a fused operator skips: no global module hooks, no hooks of
    their own except transformers' output-capturing ones while they capture nothing from inside a layer (router
    logits, attentions; a layer's hidden states are captured at the layer, which still runs its hooks)."""
    if _global_module_hooks():
        return False
    collected = _active_collector.get()
    if collected and any(key not in ("hidden_states", "_hidden_states_layers") for key in collected):
        return False
    for module in modules:
        hooks = (*module._forward_pre_hooks.values(), *module._forward_hooks.values())
        if any(getattr(hook, "__name__", None) != "output_capturing_hook" for hook in hooks):
            return False
    return True


def _fusable_feed_forward(feed_forward: nn.Module) -> tuple[tuple[nn.Module, ...], tuple[torch.Tensor, ...]] | None:
    """For a layer's feed-forward that `layer_output` computes (a `MobileMoEMLP`, or a `MobileMoESparseMoeBlock` whose
    experts run the default `sorted_mm` or `cpu_fused`): the modules it would skip (for the hook check) and the
    weights it takes. None where it runs anything else."""
    if type(feed_forward) is MobileMoEMLP:
        mlp, skipped, routing = feed_forward, (), ()
    elif _is_stock(feed_forward, MobileMoESparseMoeBlock):
        router, experts, mlp = (_member(feed_forward, name) for name in ("router", "routed_experts", "shared_expert"))
        router_weight = _member(router, "weight")
        if not (
            _is_stock(router, MobileMoETopkRouter)
            and _is_stock(experts, MobileMoEExperts)
            and type(mlp) is MobileMoEMLP
            and experts.config._experts_implementation in ("sorted_mm", "cpu_fused")
            and _moe_experts_fit(experts)
            and type(router_weight) is nn.Parameter
            # The FP32 router's weight is left out of `_kernel_applies` (another dtype than the activations'), so
            # what that checks is checked here: a trainable router under autograd needs its gradient.
            and router_weight.dtype == torch.float32
            and router_weight.is_contiguous()
            and not (torch.is_grad_enabled() and router_weight.requires_grad)
        ):
            return None
        skipped = (feed_forward, router, experts)
        experts_weights = (_member(experts, "gate_up_proj"), _member(experts, "down_proj"))
        routing = (router_weight, _member(feed_forward, "expert_bias"), *experts_weights)
    else:
        return None
    mlp_weights = _swiglu_mlp_weights(mlp)
    if getattr(vars(mlp).get("forward"), "__func__", None) is not cpu_mlp_forward or mlp_weights is None:
        return None
    return (*skipped, mlp), (*mlp_weights, *routing)


def _layer_rows_fit(hidden_states: torch.Tensor, top_k: int) -> bool:
    """The layer operators take these rows (`_rows_fit`), and an MoE layer's experts (`top_k` of them a token, 0 in a
    dense layer) their (token, expert) slots."""
    rows = hidden_states.shape[0] * hidden_states.shape[1]
    return _rows_fit(hidden_states, rows, MAX_LINEAR_ROWS) and _rows_fit(hidden_states, rows * top_k, MAX_FUSED_SLOTS)


def cpu_decoder_layer_forward(
    self: MobileMoEDecoderLayer,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    cache=None,
    use_cache: bool | None = False,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs,
) -> torch.Tensor:
    """`MobileMoEDecoderLayer.forward` for CPUs: inference runs the layer as `attention_input`, the cache update,
    attention (`cpu_sdpa_attention_forward`) and `layer_output`: three operators for what eagerly is ~350 (norms,
    projections, RoPE, QK-norm, routing, residuals), the same math rounded at the same points; in bf16 past a few
    rows only where the CPU has native bf16 matmuls. Anything else (training, autograd, replaced or hooked modules,
    other attention or experts implementations, captured router logits or attentions, head dimensions that are not a
    multiple of 16) is the layer's own forward."""
    # Submodules and weights by `_member`: these checks run for every layer of every decode step.
    attention = _member(self, "self_attn")
    input_norm, post_norm = _member(self, "input_layernorm"), _member(self, "post_attention_layernorm")
    qk_norm = _member(attention, "qk_norm")
    projections = tuple(_member(attention, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
    norms = (input_norm, post_norm) if qk_norm is None else (input_norm, post_norm, qk_norm)
    skip_fusion = self.training or torch.compiler.is_compiling()
    fusable = None if skip_fusion else _fusable_feed_forward(_member(self, "feed_forward"))
    feed_forward_modules, feed_forward = fusable or ((), None)
    router = feed_forward_modules[1] if len(feed_forward_modules) > 1 else None  # (block, router, experts, mlp)
    fused = (
        fusable is not None
        and _is_stock(attention, MobileMoEAttention)
        and _is_stock(input_norm, MobileMoERMSNorm)
        and _is_stock(post_norm, MobileMoERMSNorm)
        and (qk_norm is None or _is_stock(qk_norm, MobileMoEQKNorm))
        and attention.config._attn_implementation in ("sdpa", CPU_SDPA)
        and not kwargs.get("output_attentions", False)
        and "past_key_values" not in kwargs
        and all(_is_plain_kernel_linear(projection) for projection in projections)
        and _runs_unhooked(attention, *norms, *feed_forward_modules)
        and (position_embeddings is not None or not attention.use_rope)
        and attention.head_dim % 16 == 0
        and _kernel_applies(
            hidden_states,
            *(_member(module, "weight") for module in (input_norm, post_norm, *projections)),
            *feed_forward[:3],
            *feed_forward[5:],
        )
        and hidden_states.dim() == 3
        and _layer_rows_fit(hidden_states, 0 if router is None else router.top_k)  # last, as in `cpu_linear_forward`
    )
    if not fused:
        # By keyword, as the model calls it: the class's checkpointing and `past_key_values` wrappers read keywords.
        return MobileMoEDecoderLayer.forward(
            self,
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
    q_weight, k_weight, v_weight, o_weight = (_member(projection, "weight") for projection in projections)
    cos, sin = position_embeddings if attention.use_rope else (None, None)
    query, key, value = torch.ops.mobilemoe_cpu.attention_input(
        hidden_states,
        _member(input_norm, "weight"),
        input_norm.variance_epsilon,
        q_weight,
        k_weight,
        v_weight,
        attention.head_dim,
        cos,
        sin,
        None if qk_norm is None else qk_norm.eps,
    )
    if cache is not None:
        key, value = cache.update(key, value, attention.layer_idx, kwargs=kwargs)
    attended, _ = cpu_sdpa_attention_forward(
        attention, query, key, value, attention_mask, scaling=attention.scaling, **kwargs
    )
    return torch.ops.mobilemoe_cpu.layer_output(
        attended,
        hidden_states,
        o_weight,
        _member(post_norm, "weight"),
        post_norm.variance_epsilon,
        *feed_forward[:3],
        *(feed_forward[3:] or (None,) * 4),
        0 if router is None else router.top_k,
        router is not None and router.norm_topk_prob,
        1.0 if router is None else router.routed_scaling_factor,
    )


class GroupedExperts(torch.autograd.Function):
    """The routed experts as `moe_experts_forward`'s grouped GEMM, differentiable: the backward is
    `moe_experts_backward` (per expert four GEMMs on one core, experts split between the cores, as the forward; the
    weight gradients only where the experts' weights require them)."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj):
        output, *activations = torch.ops.mobilemoe_cpu.moe_experts_forward(
            hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj
        )
        ctx.save_for_backward(hidden_states, top_k_index, top_k_weights, gate_up_proj, down_proj, *activations)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        saved = ctx.saved_tensors  # unpacked once: non-reentrant gradient checkpointing allows no second unpack
        weight_grads = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        grad_hidden, grad_weights, grad_gate_up, grad_down = torch.ops.mobilemoe_cpu.moe_experts_backward(
            grad_output, *saved, weight_grads
        )
        return grad_hidden, None, grad_weights.to(saved[2].dtype), grad_gate_up, grad_down


def cpu_fused_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """gate-up, SwiGLU, down and the weighted sum of the selected experts in one operator, which reads only their
    weights: at inference few slots streamed, more as a grouped GEMM; under autograd (training) the grouped GEMM with
    its backward (`GroupedExperts`), past `MAX_FUSED_SLOTS` slots and outside graph capture. Anything else (QAT, other
    activations, tensor-subclass weights, compiled graphs under autograd) runs `sorted_mm`'s formulations."""
    if not _moe_experts_fit(self):
        return sorted_experts(self, hidden_states, top_k_index, top_k_weights)
    weights = (self.gate_up_proj, self.down_proj)
    routing_needs_grad = torch.is_grad_enabled() and top_k_weights.requires_grad  # a trainable router
    if (
        not routing_needs_grad
        and _kernel_applies(hidden_states, *weights)
        and _rows_fit(hidden_states, top_k_index.numel(), MAX_FUSED_SLOTS)  # last, as elsewhere
    ):
        return torch.ops.mobilemoe_cpu.moe_experts(hidden_states, top_k_index, top_k_weights, *weights)
    trains = (
        torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and _kernel_applies(hidden_states, *weights, differentiable=True)
        and top_k_index.numel() > MAX_FUSED_SLOTS
        and not _half_matmul_is_slow(hidden_states.dtype)
    )
    if trains:
        return GroupedExperts.apply(hidden_states, top_k_index, top_k_weights, *weights)
    return sorted_experts(self, hidden_states, top_k_index, top_k_weights)


def _padding_free_bounds(query: torch.Tensor, key: torch.Tensor, dropout: float, kwargs: dict) -> list[int] | None:
    """The sequence bounds of a padding-free batch (TRL's packing: one row of whole sequences back to back, with
    `cu_seq_lens_q/k` from the collator) when attention can run per sequence, else None."""
    bounds, key_bounds = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if bounds is None or key_bounds is None or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return None
    plain = dropout == 0.0 and all(kwargs.get(option) is None for option in ("position_bias", "softcap"))
    one_row = query.shape[0] == 1 and query.shape[2] == key.shape[2]  # no cache: the row's keys are its queries'
    if not (plain and one_row and not kwargs.get("output_attentions", False) and torch.equal(bounds, key_bounds)):
        return None
    bounds = bounds.tolist()
    return bounds if bounds[0] == 0 and bounds[-1] == query.shape[2] and bounds == sorted(bounds) else None


def _attention_per_sequence(module, query, key, value, bounds, scaling, is_causal) -> tuple[torch.Tensor, None]:
    """`sdpa_attention_forward` on each sequence of a padding-free row (causal within it unless `is_causal` or the
    module says otherwise, as that function decides). Over the whole row SDPA takes
    the block-diagonal mask and computes every query-key pair of the row: TRL's SFT rows of 8 x 512 tokens cost 8x the
    products (the demo's SFT steps: 5.0 s against 1.9 per sequence, one thread of a 2-core AMD EPYC, same losses)."""
    pieces = [
        sdpa_attention_forward(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None,
            scaling=scaling, is_causal=is_causal,
        )[0]
        for start, end in zip(bounds[:-1], bounds[1:])
        if end > start
    ]  # fmt: skip
    return torch.cat(pieces, dim=1), None


def cpu_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' `sdpa` attention for CPUs, at inference: few queries (decode) run the `decode_attention` kernel,
    which reads each key/value head once for its whole query group (PyTorch's CPU SDPA took ~220 us a layer for one
    bf16 query at 1k context); more queries (prefill) run `prefill_attention`, GEMMs around one softmax pass,
    as eager attention computes it (`benchmarks/bench_attention.py`, a 1k-token S layer: bf16 7.7 ms against SDPA's
    16.6, which on CPUs without AMX multiplies bf16 at its fp32 speed; fp32 9.6 against 16.5), bf16 only where the
    CPU has native bf16 matmuls and SDPA has no AMX (`_sdpa_packs`); a padding-free batch (training too) runs
    `sdpa_attention_forward` per sequence; anything else is `sdpa_attention_forward` itself."""
    bool_mask = attention_mask is not None and attention_mask.dtype == torch.bool and attention_mask.dim() == 4
    supported = (
        (attention_mask is None or bool_mask)
        and dropout == 0.0
        and all(kwargs.get(option) is None for option in ("position_bias", "softcap"))
        and not kwargs.get("output_attentions", False)
        and _kernel_applies(query, key, value, strided=True)  # e.g. keys and values without a cache: transposed views
        # Shapes last, as in `cpu_linear_forward`.
        and key.shape == value.shape
        and (attention_mask is None or attention_mask.shape[1] == 1 and attention_mask.shape[-1] == key.shape[2])
    )
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    queries = query.shape[2]
    # Without a mask, one decoded query attends to every key (no causal mask), and more attend causally.
    if supported and queries <= MAX_LINEAR_ROWS and (queries == 1 or attention_mask is not None):
        return torch.ops.mobilemoe_cpu.decode_attention(query, key, value, attention_mask, scale), None
    if supported and queries > MAX_LINEAR_ROWS and not (_half_matmul_is_slow(query.dtype) or _sdpa_packs(query.dtype)):
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        return torch.ops.mobilemoe_cpu.prefill_attention(query, key, value, attention_mask, scale, causal), None
    bounds = _padding_free_bounds(query, key, dropout, kwargs)
    if bounds is not None:
        return _attention_per_sequence(module, query, key, value, bounds, scaling, is_causal)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def install(model: nn.Module) -> None:
    """Give `model`'s `nn.Linear` layers `cpu_linear_forward`, its `MobileMoEMLP`s `cpu_mlp_forward` and its decoder
    layers `cpu_decoder_layer_forward` as their `forward`, in place. Only the instance's method changes: class,
    parameters and state dict stay the same, so libraries that look for exactly `nn.Linear` (bitsandbytes, torchao,
    PEFT) still find and replace them. The kernels
    are built (or loaded) now for a model on the CPU, so a graph compiled before its first eager forward has them."""
    if any(parameter.device.type == "cpu" for parameter in model.parameters()):
        available()
    forwards = {
        nn.Linear: cpu_linear_forward,
        MobileMoEMLP: cpu_mlp_forward,
        MobileMoEDecoderLayer: cpu_decoder_layer_forward,
    }
    for module in model.modules():
        forward = forwards.get(type(module))
        if forward is not None and "forward" not in vars(module):
            module.forward = types.MethodType(forward, module)


ExpertsInterface.register("cpu_fused", cpu_fused_experts_forward)
AttentionInterface.register(CPU_SDPA, cpu_sdpa_attention_forward)
if install not in MODEL_INIT_HOOKS:
    MODEL_INIT_HOOKS.append(install)

__all__ = [
    "available",
    "GroupedExperts",
    "cpu_fused_experts_forward",
    "cpu_decoder_layer_forward",
    "cpu_linear_forward",
    "cpu_mlp_forward",
    "cpu_sdpa_attention_forward",
    "enabled",
    "float32_gemms",
    "install",
    "instruction_set",
    "limit_instruction_set",
    "set_enabled",
    "set_float32_gemms",
    "set_instruction_set",
    "unavailable_reason",
    "use_float32_gemms",
]
