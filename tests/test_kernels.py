"""CPU decode kernels (`modeling_mobilemoe.kernels`): the streaming linear and the fused routed experts against stock
PyTorch and the eager experts, in the model, under `torch.compile`, and kept out of exported programs."""

import contextlib
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_modeling import make_model, run_experts, tokens

from modeling_mobilemoe import kernels
from modeling_mobilemoe.modeling_mobilemoe import _onednn_supports


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True, scope="module")
def loaded_kernels():
    """The operators exist once the extension is loaded: tests that call them directly must not depend on an earlier
    test (or model) having loaded it."""
    kernels.available()


def test_kernels_build_on_this_machine():
    # CI runs on the machine kind the benchmarks ran on: a silent fallback there would hide a broken build.
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.instruction_set() in kernels.INSTRUCTION_SETS


@pytest.fixture(params=kernels.INSTRUCTION_SETS)
def instruction_set(request):
    """Each instruction set of the kernels in turn, where this CPU has it: every path runs on the machines that
    support it (AVX2 paths everywhere)."""
    native = kernels.instruction_set()
    if kernels.INSTRUCTION_SETS.index(request.param) > kernels.INSTRUCTION_SETS.index(native):
        pytest.skip(f"this CPU runs the kernels with {native}, not {request.param}")
    with kernels.limit_instruction_set(request.param) as active:
        assert active == request.param
        yield active


@pytest.fixture(params=kernels.FLOAT32_GEMMS)
def float32_gemms(request):
    """Each library the fp32 GEMMs of inference may run on, whichever this CPU's own choice is."""
    with kernels.use_float32_gemms(request.param) as library:
        yield library


@pytest.fixture
def onednn_float32_gemms():
    """fp32 GEMMs on oneDNN's linear, where this CPU would pick MKL (the checks of what must not reach it)."""
    with kernels.use_float32_gemms("onednn"):
        yield


@pytest.fixture
def two_threads():
    """Two torch threads (pytest-xdist workers run one each): the grouped GEMM splits its experts between threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def kernel_prefill_attention(monkeypatch):
    """`prefill_attention` for bf16 prefill on every CPU: where PyTorch's SDPA runs bf16 on AMX tiles it is faster and
    runs instead, and the kernel must still be tested there."""
    monkeypatch.setattr(kernels, "_sdpa_packs", lambda dtype: False)


@pytest.fixture
def native_bf16_matmul(monkeypatch):
    """The operators' GEMM paths (past a few rows) on every CPU: where bf16 matmuls are not native they are slow, not
    wrong, and the package runs the modules' float32 upcasts there instead."""
    monkeypatch.setattr(kernels, "_half_matmul_is_slow", lambda dtype: False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 72), (2, 3, 72), (4, 200)])
# 100 rows: AVX2's blocks of four plus a remainder, AVX-512's four streams plus a remainder; 1100: a thread's rows in
# two blocks applied to every input row in turn.
@pytest.mark.parametrize("rows", [100, 1100])
def test_linear_matches_float64_reference(instruction_set, dtype, shape, rows):
    # 72 and 200 features: AVX-512 runs full steps, single steps and a masked tail (16 fp32 / 32 bf16 lanes).
    weight = torch.randn(rows, shape[-1], dtype=dtype)
    bias = torch.randn(rows, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    out = torch.ops.mobilemoe_cpu.linear(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), bias.double())
    assert out.dtype == dtype and out.shape == (*shape[:-1], rows)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype] * 4, rtol=TOLERANCE[dtype])


def test_instruction_set_limits_are_checked():
    with pytest.raises(ValueError, match="instruction set 'sse2' is not one of native, avx2, avx512, avx512_bf16"):
        with kernels.limit_instruction_set("sse2"):
            pass
    with pytest.raises(RuntimeError, match="unknown instruction set 'sse2'"):
        torch.ops.mobilemoe_cpu.instruction_set("sse2")
    native = kernels.instruction_set()
    with kernels.limit_instruction_set("avx2") as active:
        assert active == "avx2" == kernels.instruction_set()
    assert kernels.instruction_set() == native


def test_linear_rejects_unsupported_weights_with_the_reason():
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.mobilemoe_cpu.linear(torch.randn(1, 12), torch.randn(4, 12), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.mobilemoe_cpu.linear(torch.randn(1, 16).half(), torch.randn(4, 16).half(), None)


def runs(operator: str, profile) -> int:
    return sum(event.name == f"mobilemoe_cpu::{operator}" for event in profile.events())


def ran(operator: str, profile) -> bool:
    return runs(operator, profile) > 0


@contextlib.contextmanager
def onednn_off():
    """PyTorch's switch for oneDNN off (`torch.backends.mkldnn.flags` also sets TF32, which warns on CPU builds)."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


def ran_onednn_linear(profile) -> bool:
    return any(event.name == "mkldnn::_linear_pointwise" for event in profile.events())


def test_decode_linear_uses_the_kernel_only_for_few_rows_without_autograd(instruction_set, float32_gemms):
    layer = torch.nn.Linear(64, 32)
    kernels.install(layer)
    calls = []
    with torch.no_grad():
        with torch.profiler.profile() as profile:
            layer.to(torch.bfloat16)(torch.randn(1, 64, dtype=torch.bfloat16))
        assert ran("linear", profile)  # bf16 on every instruction set
        layer.float()
        for rows in (1, kernels.MAX_LINEAR_ROWS, kernels.MAX_LINEAR_ROWS + 1):
            x = torch.randn(rows, 64)
            with torch.profiler.profile() as profile:
                out = layer(x)
            calls.append((ran("linear", profile), ran_onednn_linear(profile)))
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    # few rows streamed, more on the chosen library (oneDNN's fp32 linear where this build of torch has it)
    onednn = float32_gemms == "onednn" and kernels._ONEDNN_LINEAR is not None
    assert calls == [(True, False), (True, False), (False, onednn)]
    x = torch.randn(kernels.MAX_LINEAR_ROWS + 1, 64)
    with torch.profiler.profile() as profile:
        layer(x).sum().backward()  # with autograd: F.linear, so gradients flow
    assert layer.weight.grad is not None and not ran_onednn_linear(profile)


def test_many_bf16_rows_run_in_float32_where_the_cpu_has_no_native_bf16_matmul():
    layer = torch.nn.Linear(64, 32).to(torch.bfloat16)
    kernels.install(layer)
    x = torch.randn(2, 16, 64, dtype=torch.bfloat16)
    expected = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
        with kernels.enabled(False):
            stock = layer(x)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():  # native bf16: stays on PyTorch's bf16 GEMM
        torch.testing.assert_close(out, stock, atol=0, rtol=0)
    else:
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert out.dtype == torch.bfloat16


def test_onednn_checks_answer_false_where_the_op_is_missing():
    # Builds without oneDNN have no `torch.ops.mkldnn` checks: importing the modeling file must still work there.
    assert _onednn_supports("_no_such_check") is False
    assert _onednn_supports("_is_mkldnn_bf16_supported") == torch.ops.mkldnn._is_mkldnn_bf16_supported()


def test_quantized_tensor_subclass_weights_keep_their_own_dispatch():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 32, bias=False)
    kernels.install(layer)
    quantize_(layer, Int8WeightOnlyConfig())
    assert type(layer.weight) not in (torch.Tensor, torch.nn.Parameter)
    x = torch.randn(1, 64)
    with torch.no_grad(), torch.profiler.profile() as profile:
        out = layer(x)
    assert not ran("linear", profile)
    torch.testing.assert_close(out, F.linear(x, layer.weight.dequantize()), atol=1e-4, rtol=1e-4)


def test_every_linear_of_a_model_runs_the_kernel_forward_and_stays_an_nn_linear():
    model = make_model()
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(type(module) is torch.nn.Linear for module in linears)  # what bitsandbytes looks for
    assert all(module.forward.__func__ is kernels.cpu_linear_forward for module in linears)
    copied = copy.deepcopy(model)
    assert copied.lm_head.forward.__self__ is copied.lm_head
    assert list(copied.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 2, 4, 40])  # streamed slots, and a grouped GEMM (40 tokens, 80 slots)
@pytest.mark.usefixtures("native_bf16_matmul", "two_threads")
def test_fused_experts_match_eager(instruction_set, dtype, num_tokens):
    experts = make_model().to(dtype).moe_blocks()[0].routed_experts
    hidden = torch.randn(num_tokens, 64, dtype=dtype)
    top_k_weights = torch.rand(num_tokens, 2)
    # Repeated experts across tokens, idle experts (6 always), and a tie in the routing weights.
    first_tokens = torch.tensor([[3, 5], [5, 3], [3, 0], [7, 5]])
    top_k_index = torch.cat([first_tokens, torch.rand(num_tokens, 6).topk(2).indices])[:num_tokens]
    top_k_weights[0, 1] = top_k_weights[0, 0]
    fused, eager = run_experts(experts, ("cpu_fused", "eager"), hidden, top_k_index, top_k_weights)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused.float(), eager.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.skipif(kernels.instruction_set() != "amx_bf16", reason="this CPU has no AMX-BF16 tiles")
@pytest.mark.usefixtures("two_threads")
def test_bf16_grouped_experts_on_amx_tiles_match_the_gemm_path_and_a_float64_reference():
    # H 96, I 64: tile blocks of 32 m with a 16-m tail. Expert 0 gets every token (310 rows: two passes of 256 rows
    # and 54), experts 1 and 2 half of them each, expert 3 five (under one 8-row block), experts 4 and 5 none.
    torch.manual_seed(0)
    experts, hidden_size, width, tokens = 6, 96, 64, 310
    gate_up_proj = (torch.randn(experts, 2 * width, hidden_size) * hidden_size**-0.5).bfloat16()
    down_proj = (torch.randn(experts, hidden_size, width) * width**-0.5).bfloat16()
    hidden = torch.randn(tokens, hidden_size).bfloat16()
    top_k_index = torch.stack([torch.zeros(tokens, dtype=torch.long), 1 + torch.arange(tokens) % 2], dim=1)
    top_k_index[:5, 1] = 3
    top_k_weights = torch.rand(tokens, 2)
    args = (hidden, top_k_index, top_k_weights, gate_up_proj, down_proj)
    outputs, profiles = {}, {}
    for isa in ("amx_bf16", "avx512_bf16"):
        with kernels.limit_instruction_set(isa), torch.profiler.profile() as profiles[isa]:
            outputs[isa] = torch.ops.mobilemoe_cpu.moe_experts(*args)
    gemms = {isa: sum(event.name == "aten::mm" for event in profile.events()) for isa, profile in profiles.items()}
    assert gemms["amx_bf16"] == 0 and gemms["avx512_bf16"] > 0  # the tiles read the weights in place
    # The same roundings as the GEMM path: they differ only in the order of fp32 sums (a last-bit rounding apart).
    torch.testing.assert_close(outputs["amx_bf16"].float(), outputs["avx512_bf16"].float(), atol=1e-2, rtol=1e-2)
    expected = torch.zeros(tokens, hidden_size, dtype=torch.float64)
    for slot in range(2):
        for expert in range(experts):
            rows = top_k_index[:, slot] == expert
            gate, up = (hidden[rows].double() @ gate_up_proj[expert].double().T).chunk(2, dim=-1)
            expert_out = (F.silu(gate) * up) @ down_proj[expert].double().T
            expected[rows] += top_k_weights[rows, slot, None].double() * expert_out
    torch.testing.assert_close(outputs["amx_bf16"].double(), expected, atol=5e-2, rtol=5e-2)


def test_fused_experts_reject_out_of_range_experts_and_mismatched_routing():
    experts = make_model().moe_blocks()[0].routed_experts
    weights = (experts.gate_up_proj, experts.down_proj)
    with pytest.raises(RuntimeError, match=r"expert index out of range \[0, 8\)"):
        torch.ops.mobilemoe_cpu.moe_experts(torch.randn(1, 64), torch.tensor([[1, 8]]), torch.rand(1, 2), *weights)
    with pytest.raises(RuntimeError, match=r"must both be \[tokens, k\] for 2 tokens"):
        torch.ops.mobilemoe_cpu.moe_experts(torch.randn(2, 64), torch.tensor([[1, 2]]), torch.rand(1, 2), *weights)


def test_fused_experts_run_prefill_as_a_grouped_gemm_and_fall_back_without_native_bf16_matmul(monkeypatch):
    experts = make_model().to(torch.bfloat16).moe_blocks()[0].routed_experts
    experts.config._experts_implementation = "cpu_fused"
    many = kernels.MAX_FUSED_SLOTS // 2 + 1  # top-2: one slot more than the operator streams
    hidden, top_k_index = torch.randn(many, 64, dtype=torch.bfloat16), torch.rand(many, 8).topk(2).indices
    top_k_weights = torch.rand(many, 2)
    monkeypatch.setattr(kernels, "_half_matmul_is_slow", lambda dtype: False)  # a CPU with native bf16 matmuls
    with torch.no_grad(), torch.profiler.profile() as profile:
        experts(hidden, top_k_index, top_k_weights)
    assert ran("moe_experts", profile)
    # A CPU without native bf16 matmuls: the sorted path, which upcasts each expert's rows to float32.
    monkeypatch.setattr(kernels, "_half_matmul_is_slow", lambda dtype: dtype == torch.bfloat16)
    with torch.no_grad(), torch.profiler.profile() as profile:
        experts(hidden, top_k_index, top_k_weights)
    assert not ran("moe_experts", profile)
    with torch.no_grad(), torch.profiler.profile() as profile:
        experts(hidden[:2], top_k_index[:2], top_k_weights[:2])  # streamed slots in bf16 on every instruction set
    assert ran("moe_experts", profile)
    with torch.profiler.profile() as profile:
        out = experts(hidden, top_k_index, top_k_weights)  # autograd there: the sorted path too
    assert not ran("moe_experts", profile) and not ran("moe_experts_forward", profile)
    out.float().sum().backward()
    assert experts.gate_up_proj.grad is not None


def test_padding_free_rows_attend_per_sequence_as_under_the_packed_mask():
    """TRL's padding-free packing: one row of sequences back to back with `cu_seq_lens`. Attention runs per sequence
    (one SDPA call each, not one over the whole row), with the loss and gradients of eager attention under the
    block-diagonal mask built from `position_ids` (as training runs: without a cache)."""
    lengths = [5, 9, 1, 7]
    input_ids = tokens(batch=1, length=sum(lengths))
    position_ids = torch.cat([torch.arange(length) for length in lengths])[None]
    bounds = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    packed = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": 9, "max_length_k": 9}
    results = {}
    for implementation in ("sdpa", "eager"):
        model = make_model(attn_implementation=implementation).train()
        with torch.profiler.profile() as profile:
            loss = model(input_ids, position_ids=position_ids, labels=input_ids, use_cache=False, **packed).loss
        loss.backward()
        sdpa_calls = sum(event.name == "aten::scaled_dot_product_attention" for event in profile.events())
        results[implementation] = loss, {name: p.grad for name, p in model.named_parameters()}, sdpa_calls
    assert results["sdpa"][2] == len(lengths) * model.config.num_hidden_layers and results["eager"][2] == 0
    torch.testing.assert_close(results["sdpa"][0], results["eager"][0])
    torch.testing.assert_close(results["sdpa"][1], results["eager"][1])


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this build of torch has no oneDNN linear")
@pytest.mark.usefixtures("onednn_float32_gemms")
def test_float32_linear_keeps_stock_semantics_off_the_plain_inference_path():
    layer = torch.nn.Linear(64, 32)
    kernels.install(layer)
    x = torch.randn(kernels.MAX_LINEAR_ROWS + 1, 64)
    # A frozen weight with a trainable bias (bias-only fine-tuning): the bias still gets its gradient.
    layer.weight.requires_grad_(False)
    with torch.profiler.profile() as profile:
        layer(x).sum().backward()
    assert not ran_onednn_linear(profile)
    torch.testing.assert_close(layer.bias.grad, torch.full((32,), float(x.shape[0])))
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.profiler.profile() as profile:
            out = layer(x)  # autocast's dtype, as F.linear gives under autocast
        assert out.dtype == torch.bfloat16 and not ran("linear", profile) and not ran_onednn_linear(profile)
        with onednn_off(), torch.profiler.profile() as profile:
            out = layer(x)  # oneDNN turned off in PyTorch: MKL
        assert not ran_onednn_linear(profile)
        torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias))


@pytest.mark.skipif(kernels._ONEDNN_LINEAR is None, reason="this build of torch has no oneDNN linear")
@pytest.mark.parametrize("operator", ["moe_experts", "swiglu_mlp", "prefill_attention", "moe_experts_backward"])
@pytest.mark.usefixtures("two_threads")  # the profiler sees the calling thread, which takes half of the experts
def test_float32_gemms_run_the_chosen_library_at_inference_and_mkl_in_training(operator):
    # fp32 `aten::mm` is MKL's sgemm, which takes its AVX2 code on AMD CPUs: there, with AVX-512, the inference
    # operators' GEMMs run oneDNN's linear (`set_float32_gemms`). Training stays on MKL (oneDNN's per-shape primitives
    # grew a training step's peak RSS, see the comment on `grouped_experts`).
    hidden, top_k_index, top_k_weights = torch.randn(40, 64), torch.rand(40, 8).topk(2).indices, torch.rand(40, 2)
    gate_up_proj, down_proj = torch.randn(8, 64, 64), torch.randn(8, 64, 32)
    calls = {
        "moe_experts": lambda: torch.ops.mobilemoe_cpu.moe_experts(
            hidden, top_k_index, top_k_weights, gate_up_proj, down_proj
        ),
        "swiglu_mlp": lambda: torch.ops.mobilemoe_cpu.swiglu_mlp(hidden, *gate_up_proj[:2, :32], down_proj[0]),
        "prefill_attention": lambda: torch.ops.mobilemoe_cpu.prefill_attention(
            *(torch.randn(1, heads, 70, 16, generator=torch.Generator().manual_seed(heads)) for heads in (6, 2, 2)),
            None,
            0.25,
            True,
        ),
        "moe_experts_backward": lambda: kernels.GroupedExperts.apply(
            hidden.requires_grad_(), top_k_index, top_k_weights, gate_up_proj.requires_grad_(), down_proj
        ).sum().backward(),
    }
    training = operator == "moe_experts_backward"
    outputs = {}
    for library in kernels.FLOAT32_GEMMS:
        with kernels.use_float32_gemms(library), torch.profiler.profile() as profile:
            outputs[library] = calls[operator]()
        names = {event.name for event in profile.events()}
        onednn = library == "onednn" and not training
        assert ran(operator, profile) and ran("moe_experts_forward", profile) == training
        assert ("mkldnn::_linear_pointwise" in names) == onednn
        assert ("aten::mm" in names) != onednn
    if operator == "prefill_attention":  # PyTorch's switch for oneDNN turns it off here too
        with kernels.use_float32_gemms("onednn"), onednn_off(), torch.profiler.profile() as profile:
            calls[operator]()
        assert not ran_onednn_linear(profile)
    if not training:
        torch.testing.assert_close(outputs["onednn"], outputs["aten"], atol=1e-4, rtol=1e-4)


def test_member_reads_what_getattr_reads_and_none_for_what_is_not_there():
    class Block(torch.nn.Module):
        scale = 2.0  # a class attribute

        def gather_weights(self):  # a method, as the exporters' experts have
            return None

    block = Block()
    block.linear = torch.nn.Linear(8, 8)
    block.register_buffer("bias_table", torch.zeros(3))
    block.weight = torch.nn.Parameter(torch.ones(2))
    block.plain = "set on the instance"
    block.missing_module = None  # nn.Module keeps a None assigned to a new name as a plain attribute
    for name in ("linear", "bias_table", "weight", "plain", "scale", "missing_module", "gather_weights", "training"):
        read, expected = kernels._member(block, name), getattr(block, name)
        assert read is expected or read == expected, name  # a bound method is a new, equal object each time
    assert kernels._member(block, "activation_fake_quantizer") is None
    block.linear = torch.nn.Identity()  # re-registered: read afresh, nothing cached
    assert type(kernels._member(block, "linear")) is torch.nn.Identity


def test_float32_gemm_libraries_are_checked():
    with pytest.raises(ValueError, match="fp32 GEMM library 'mkl' is not one of native, aten, onednn"):
        kernels.set_float32_gemms("mkl")
    with pytest.raises(RuntimeError, match="unknown library 'mkl'"):
        torch.ops.mobilemoe_cpu.float32_gemms("mkl")
    # oneDNN's fp32 linear only where MKL leaves AVX-512 unused: AMD (non-Intel) CPUs with AVX-512
    with open("/proc/cpuinfo") as cpuinfo:
        intel = "GenuineIntel" in cpuinfo.read()
    amd_avx512 = kernels.instruction_set() != "avx2" and not intel and kernels._ONEDNN_LINEAR is not None
    assert kernels.set_float32_gemms("native") == ("onednn" if amd_avx512 else "aten") == kernels.float32_gemms()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trained", ["everything", "frozen-experts", "routing-only"])
@pytest.mark.usefixtures("native_bf16_matmul", "two_threads")
def test_fused_experts_train_through_a_grouped_gemm_with_eager_gradients(dtype, trained):
    trainable_experts = trained == "everything"
    experts = make_model().to(dtype).moe_blocks()[0].routed_experts.requires_grad_(trainable_experts)
    num_tokens = 40
    hidden = torch.randn(num_tokens, 64, dtype=dtype, requires_grad=trained != "routing-only")
    # Repeated experts, a tie in the routing weights, idle experts (6 and 7: zero weight gradients).
    top_k_index = torch.cat([torch.tensor([[3, 5], [5, 3]]), torch.rand(num_tokens - 2, 6).topk(2).indices])
    top_k_weights = torch.rand(num_tokens, 2)
    top_k_weights[0, 1] = top_k_weights[0, 0]
    top_k_weights.requires_grad_(True)
    probe = torch.linspace(-1, 1, 64)  # a loss whose gradient differs per feature
    results = {}
    for implementation in ("cpu_fused", "eager"):
        experts.config._experts_implementation = implementation
        with torch.profiler.profile() as profile:
            out = experts(hidden, top_k_index, top_k_weights)
            (out.float() * probe).sum().backward()
        tensors = (hidden, top_k_weights, experts.gate_up_proj, experts.down_proj)
        results[implementation] = [out.detach()] + [None if t.grad is None else t.grad.clone() for t in tensors]
        for tensor in tensors:
            tensor.grad = None
        assert ran("moe_experts_backward", profile) == (implementation == "cpu_fused")
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    for name, fused, eager in zip(["output", "hidden", "routing weights", "gate_up", "down"], *results.values()):
        if (name in ("gate_up", "down") and not trainable_experts) or (name == "hidden" and trained == "routing-only"):
            assert fused is None and eager is None
            continue
        torch.testing.assert_close(fused.float(), eager.float(), atol=tolerance, rtol=tolerance, msg=name)
    if trainable_experts:
        assert not results["cpu_fused"][3][6:].any() and results["cpu_fused"][3][:6].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 9])  # streamed, and GEMMs with one SwiGLU pass
def test_swiglu_mlp_matches_float64_reference(instruction_set, dtype, rows):
    gate, up = torch.randn(40, 72, dtype=dtype), torch.randn(40, 72, dtype=dtype)
    down = torch.randn(72, 40, dtype=dtype)
    x = torch.randn(rows, 72, dtype=dtype) / 4
    expected = F.linear(F.silu(F.linear(x.double(), gate.double())) * F.linear(x.double(), up.double()), down.double())
    out = torch.ops.mobilemoe_cpu.swiglu_mlp(x, gate, up, down)
    assert out.dtype == dtype and out.shape == (rows, 72)
    scale = expected.abs().max().item()  # bf16 rounds the SwiGLU output before the down projection, as PyTorch does
    torch.testing.assert_close(out.double() / scale, expected / scale, atol=TOLERANCE[dtype], rtol=0)


def test_swiglu_mlp_rejects_mismatched_weights_with_the_reason():
    with pytest.raises(RuntimeError, match=r"expected gate and up \[I, H\] and down \[H, I\]"):
        torch.ops.mobilemoe_cpu.swiglu_mlp(torch.randn(1, 16), torch.randn(8, 16), torch.randn(8, 16), torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="gate and up must have one dtype"):
        torch.ops.mobilemoe_cpu.swiglu_mlp(
            torch.randn(1, 16), torch.randn(8, 16), torch.randn(8, 16).bfloat16(), torch.randn(16, 8)
        )


def test_shared_expert_runs_one_operator_at_inference_and_its_own_forward_otherwise():
    mlp = make_model().moe_blocks()[0].shared_expert
    assert mlp.forward.__func__ is kernels.cpu_mlp_forward
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        prefill = torch.randn(2, 9, 64)
        with torch.profiler.profile() as profile:
            out = mlp(prefill)
        assert ran("swiglu_mlp", profile)
        torch.testing.assert_close(out, type(mlp).forward(mlp, prefill), atol=1e-5, rtol=1e-5)
        expected = type(mlp).forward(mlp, x)
        with torch.profiler.profile() as profile:
            out = mlp(x)
        assert ran("swiglu_mlp", profile)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        # A hook on a projection (as PEFT, QAT or accelerate add) must run: the module's own forward takes over.
        seen = []
        mlp.up_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
        with torch.profiler.profile() as profile:
            out = mlp(x)
        assert not ran("swiglu_mlp", profile) and seen == [(1, 1, 64)]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def sdpa_reference(query, key, value, mask):
    """transformers' layout [B, Tq, Hq, D] of float64 SDPA, GQA by repeating key/value heads."""
    groups = query.shape[1] // key.shape[1]
    key, value = (tensor.double().repeat_interleave(groups, 1) for tensor in (key, value))
    return F.scaled_dot_product_attention(query.double(), key, value, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_queries", [1, 3])
# AVX-512 takes head dimensions 16, 64 and 128 with a group's query rows four (128: two) at a time, 72 row by row.
@pytest.mark.parametrize("head_dim", [16, 64, 72, 128])
def test_decode_attention_matches_sdpa(instruction_set, dtype, num_queries, head_dim):
    # 2 key/value heads of 3 query heads each (3 queries: 9 rows a head, in passes of 4, 4 and 1); 37 positions
    # (blocks of four and eight plus remainders); masks with gaps, one that differs per batch row with a row that
    # sees only its last position, one shared by the batch.
    query = torch.randn(2, 6, num_queries, head_dim, dtype=dtype)
    key, value = torch.randn(2, 2, 37, head_dim, dtype=dtype), torch.randn(2, 2, 37, head_dim, dtype=dtype)
    per_row = torch.rand(2, 1, num_queries, 37) > 0.3
    per_row[1, :, -1] = False
    per_row[1, :, -1, -1] = True
    shared = torch.rand(1, 1, num_queries, 37) > 0.5
    masks = [per_row, shared] + ([None] if num_queries == 1 else [])  # no mask: one query sees every position
    for mask in masks:
        out = torch.ops.mobilemoe_cpu.decode_attention(query, key, value, mask, head_dim**-0.5)
        assert out.dtype == dtype and out.shape == (2, num_queries, 6, head_dim)
        expected = sdpa_reference(query, key, value, mask)
        torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=0)


def test_decode_attention_gives_zeros_where_nothing_may_be_attended_and_rejects_bad_inputs(instruction_set):
    query, key = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 5, 16)
    out = torch.ops.mobilemoe_cpu.decode_attention(query, key, key, torch.zeros(1, 1, 1, 5, dtype=torch.bool), 0.25)
    assert torch.equal(out, torch.zeros(1, 1, 4, 16))
    with pytest.raises(RuntimeError, match="the mask must be bool"):
        torch.ops.mobilemoe_cpu.decode_attention(query, key, key, torch.zeros(1, 1, 1, 5), 0.25)
    with pytest.raises(RuntimeError, match="head dimension must be a multiple of 8"):
        torch.ops.mobilemoe_cpu.decode_attention(query[..., :12], key[..., :12], key[..., :12], None, 0.25)
    with pytest.raises(RuntimeError, match="does not fit key"):
        torch.ops.mobilemoe_cpu.decode_attention(torch.randn(1, 3, 1, 16), key, key, None, 0.25)


def eager_attention_reference(query, key, value, mask):
    """Attention as transformers' eager attention computes it in the inputs' dtype (scores and probabilities rounded
    to it, softmax in float32), in the kernels' layout [B, Tq, Hq, D]; rows that may see nothing are zeros, as SDPA
    gives."""
    groups = query.shape[1] // key.shape[1]
    key, value = (tensor.repeat_interleave(groups, 1) for tensor in (key, value))
    scores = (query @ key.transpose(2, 3) * query.shape[-1] ** -0.5).masked_fill(~mask, float("-inf"))
    probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(query.dtype)
    return (probabilities @ value).transpose(1, 2)


@pytest.mark.parametrize(
    "queries, keys, mask",
    [
        (70, 70, "causal"),  # two blocks of 64 query positions (one pair), the second partial
        (150, 150, "causal"),  # three blocks: a pair and a middle block
        (150, 151, "causal"),  # a static cache one longer: causal attention never reaches the extra key
        (40, 90, "none"),  # every query sees every key
        (70, 70, "padding"),  # left padding: rows that see nothing
        (33, 80, "random"),  # gaps, a row that sees only the last key, a row that sees nothing
    ],
)
@pytest.mark.parametrize("head_dim", [16, 72])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("two_threads")
def test_prefill_attention_matches_eager_attention(queries, keys, mask, head_dim, dtype):
    # 2 key/value heads of 3 query heads each, a batch of two.
    query = torch.randn(2, 6, queries, head_dim, dtype=dtype)
    key, value = (torch.randn(2, 2, keys, head_dim, dtype=dtype) for _ in range(2))
    allowed = torch.ones(queries, keys, dtype=torch.bool).expand(2, 1, queries, keys).clone()
    if mask in ("causal", "padding"):
        allowed = allowed.tril()  # top-left aligned, as SDPA's is_causal
    if mask == "padding":
        allowed[1, ..., :7] = False
    elif mask == "random":
        allowed = torch.rand(2, 1, queries, keys) > 0.5
        allowed[1, :, 5] = False
        allowed[1, :, 6] = False
        allowed[1, :, 6, -1] = True
    given = allowed if mask in ("padding", "random") else None  # else `causal` says which keys each query sees
    out = torch.ops.mobilemoe_cpu.prefill_attention(query, key, value, given, head_dim**-0.5, mask == "causal")
    assert out.dtype == dtype and out.shape == (2, queries, 6, head_dim)
    expected = eager_attention_reference(query, key, value, allowed)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=0)
    exact = sdpa_reference(query, key, value, allowed).nan_to_num(0.0)
    # bf16: scores and probabilities rounded as eager attention rounds them
    assert (out.double() - exact).abs().max() < (1e-5 if dtype == torch.float32 else 3e-2)
    if mask == "padding":
        assert torch.equal(out[1, :7], torch.zeros_like(out[1, :7]))


def test_prefill_attention_takes_broadcast_masks_and_strided_inputs():
    # A mask shared by the batch (stride 0 over it), query and key as transposed views, as an uncached prefill gives.
    query = torch.randn(2, 70, 6, 16, dtype=torch.bfloat16).transpose(1, 2)
    key, value = (torch.randn(2, 70, 2, 16, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    allowed = (torch.rand(1, 1, 70, 70) > 0.3).tril().expand(2, 1, 70, 70)
    out = torch.ops.mobilemoe_cpu.prefill_attention(query, key, value, allowed, 0.25, False)
    expected = eager_attention_reference(*(tensor.contiguous() for tensor in (query, key, value)), allowed)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[torch.bfloat16], rtol=0)


def test_prefill_attention_rejects_bad_inputs_with_the_reason():
    query, key = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16), torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="must be all float32 or all bfloat16"):
        torch.ops.mobilemoe_cpu.prefill_attention(query.half(), key.half(), key.half(), None, 0.25, True)
    with pytest.raises(RuntimeError, match="the mask must be bool"):
        torch.ops.mobilemoe_cpu.prefill_attention(query, key, key, torch.zeros(1, 1, 8, 8), 0.25, True)
    with pytest.raises(RuntimeError, match="does not fit key"):
        torch.ops.mobilemoe_cpu.prefill_attention(query[:, :3], key, key, None, 0.25, True)


def test_attention_runs_the_kernels_at_inference_only(monkeypatch):
    model = make_model()
    assert model.config._attn_implementation == "sdpa"
    input_ids = tokens(batch=2, length=6)
    with torch.no_grad():
        for queries, kernel in ((6, "prefill_attention"), (1, "decode_attention")):
            with torch.profiler.profile() as profile:
                logits = model(input_ids[:, :queries]).logits
            assert ran(kernel, profile)
            with kernels.enabled(False):
                torch.testing.assert_close(logits, model(input_ids[:, :queries]).logits, atol=1e-5, rtol=1e-5)
        # A hooked attention runs the layer's own forward, whose keys and values without a cache are transposed views.
        handle = model.model.layers[0].self_attn.register_forward_hook(lambda *args: None)
        with torch.profiler.profile() as profile:
            model(input_ids, use_cache=False)
        handle.remove()
        assert runs("prefill_attention", profile) == model.config.num_hidden_layers
    for queries in (6, 1):  # autograd: sdpa, so gradients flow
        with torch.profiler.profile() as profile:
            model(input_ids[:, :queries]).logits.sum().backward()
        assert not ran("decode_attention", profile) and not ran("prefill_attention", profile)
    model.to(torch.bfloat16)
    # bf16 prefill: the kernel only where the CPU multiplies bf16 natively and PyTorch's SDPA does not on AMX tiles.
    for slow, sdpa_packs in itertools.product((False, True), repeat=2):
        monkeypatch.setattr(kernels, "_half_matmul_is_slow", lambda dtype: slow)
        monkeypatch.setattr(kernels, "_sdpa_packs", lambda dtype: sdpa_packs)
        with torch.no_grad(), torch.profiler.profile() as profile:
            model(input_ids)
        assert ran("prefill_attention", profile) is not (slow or sdpa_packs)
        sdpa = any(event.name == "aten::scaled_dot_product_attention" for event in profile.events())
        assert sdpa is (slow or sdpa_packs)


def test_sdpa_packs_what_pytorch_multiplies_on_amx_tiles():
    # PyTorch packs bf16 for AMX only; where it does, the CPU reports AMX (Linux lists it in /proc/cpuinfo).
    assert not kernels._sdpa_packs(torch.float32)
    if kernels._sdpa_packs(torch.bfloat16):
        with open("/proc/cpuinfo") as cpuinfo:
            assert " amx_bf16" in cpuinfo.read()


def decode_step(model, input_ids, **kwargs):
    """One decode step (the last token, after a prefill of the others) with the kernels and with stock PyTorch, and
    the profile of the kernel step."""
    with torch.no_grad():
        cache = model(input_ids[:, :-1], use_cache=True).cache
        stock_cache = copy.deepcopy(cache)
        with torch.profiler.profile() as profile:
            out = model(input_ids[:, -1:], cache=cache, use_cache=True, **kwargs)
        with kernels.enabled(False):
            stock = model(input_ids[:, -1:], cache=stock_cache, use_cache=True, **kwargs)
    return out, stock, profile


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "overrides",
    [{}, dict(use_qk_norm=False, norm_topk_prob=False, routed_scaling_factor=2.5)],
    ids=["default", "options"],
)
def test_decoder_layers_run_two_operators_at_decode_and_match_stock_pytorch(instruction_set, dtype, overrides):
    # Dense (0, 2) and MoE (1, 3) layers, a NoPE layer (1), a batch of two decoding together.
    model = make_model(num_hidden_layers=4, interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1, 1], **overrides)
    model = model.to(dtype)
    assert all(layer.forward.__func__ is kernels.cpu_decoder_layer_forward for layer in model.model.layers)
    out, stock, profile = decode_step(model, tokens(batch=2, length=7))
    layers = model.config.num_hidden_layers  # bf16 too on every instruction set
    assert runs("attention_input", profile) == runs("layer_output", profile) == layers
    torch.testing.assert_close(out.logits, stock.logits, atol=TOLERANCE[dtype], rtol=0)
    for layer in range(model.config.num_hidden_layers):  # the cache holds the same keys and values
        keys, stock_keys = out.cache.layers[layer].keys, stock.cache.layers[layer].keys
        torch.testing.assert_close(keys, stock_keys, atol=TOLERANCE[dtype], rtol=0)


@pytest.mark.parametrize(
    "dtype, library", [(torch.float32, "aten"), (torch.float32, "onednn"), (torch.bfloat16, "native")]
)
@pytest.mark.usefixtures("native_bf16_matmul", "kernel_prefill_attention", "two_threads")
def test_decoder_layers_run_two_operators_at_prefill_and_match_stock_pytorch(dtype, library):
    # Dense (0, 2) and MoE (1, 3) layers, a NoPE layer (1), a left-padded batch of two: GEMMs, a grouped GEMM for
    # the experts (2 x 12 tokens, 48 slots), `prefill_attention` with the padding mask (it computes what eager
    # attention does).
    model = make_model(
        num_hidden_layers=4, interleave_moe_layer_step=2, no_rope_layers=[1, 0, 1, 1], routed_scaling_factor=1.7
    ).to(dtype)
    if library == "onednn" and kernels._ONEDNN_LINEAR is None:
        pytest.skip("this build of torch has no oneDNN linear")
    input_ids = tokens(batch=2, length=12)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0
    with torch.no_grad(), kernels.use_float32_gemms(library):
        with torch.profiler.profile() as profile:
            out = model(input_ids, attention_mask=attention_mask, use_cache=True)
        with kernels.enabled(False):
            model.set_attn_implementation("eager")
            stock = model(input_ids, attention_mask=attention_mask, use_cache=True)
            model.set_attn_implementation("sdpa")
        with torch.inference_mode():  # the grouped GEMM's and the attention's worker threads run under it too
            inference = model(input_ids, attention_mask=attention_mask, use_cache=True)
    assert runs("attention_input", profile) == runs("layer_output", profile) == runs("prefill_attention", profile) == 4
    assert ran_onednn_linear(profile) == (library == "onednn")
    if library == "onednn":  # the MoE layers' FP32 routers on at::linear, as the router module's F.linear: ties agree
        assert sum(event.name == "aten::linear" for event in profile.events()) == 2
    torch.testing.assert_close(inference.logits, out.logits, atol=0, rtol=0)
    kept = attention_mask.bool()  # padding positions see nothing: zeros in SDPA and the kernels, a mean in eager
    torch.testing.assert_close(out.logits[kept], stock.logits[kept], atol=TOLERANCE[dtype], rtol=0)
    for fused_layer, stock_layer in zip(out.cache.layers, stock.cache.layers):
        fused_keys, stock_keys = (keys.transpose(1, 2)[kept] for keys in (fused_layer.keys, stock_layer.keys))
        torch.testing.assert_close(fused_keys, stock_keys, atol=TOLERANCE[dtype], rtol=0)


def test_bf16_prefill_runs_the_layers_own_forward_where_the_cpu_has_no_native_bf16_matmul(monkeypatch):
    # There the modules upcast bf16 GEMMs to float32 (see `cpu_linear_forward`); decode steps stay fused unless their
    # (token, expert) slots would take the experts' grouped GEMM (top-5 of a batch of four: 20 slots).
    monkeypatch.setattr(kernels, "_half_matmul_is_slow", lambda dtype: dtype == torch.bfloat16)
    model = make_model(num_experts_per_tok=5).to(torch.bfloat16)
    input_ids = tokens(batch=4, length=6)
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(input_ids)
    assert not ran("layer_output", profile)
    out, stock, profile = decode_step(model, input_ids[:1])
    assert runs("layer_output", profile) == 2
    torch.testing.assert_close(out.logits, stock.logits, atol=TOLERANCE[torch.bfloat16], rtol=0)
    out, stock, profile = decode_step(model, input_ids)
    assert not ran("layer_output", profile)
    torch.testing.assert_close(out.logits, stock.logits, atol=TOLERANCE[torch.bfloat16], rtol=0)


def test_decoder_layer_runs_its_own_forward_where_the_operators_would_skip_something():
    model = make_model()
    input_ids = tokens(batch=1, length=6)

    def fused_layers(**kwargs) -> int:
        out, stock, profile = decode_step(model, input_ids, **kwargs)
        torch.testing.assert_close(out.logits, stock.logits, atol=1e-5, rtol=0)
        return runs("layer_output", profile)

    assert fused_layers() == 2
    # Router logits and attentions are captured from modules inside the layer, so the layer runs them.
    assert fused_layers(output_router_logits=True) == fused_layers(output_attentions=True) == 0
    out, _, _ = decode_step(model, input_ids, output_router_logits=True, output_hidden_states=True)
    assert len(out.router_logits) == 2 and out.router_logits[0].shape == (1, 8)
    assert fused_layers(output_hidden_states=True) == 2  # captured at the layer, which still runs its hooks
    # Hooks anywhere inside (here a router hook on the first layer, global module hooks) run.
    seen = []
    handle = model.moe_blocks()[0].router.register_forward_hook(lambda *args: seen.append("router"))
    assert fused_layers() == 1 and seen == ["router"] * 3  # the prefill, the kernel step and the stock one
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, *args: seen.append(module))
    try:
        assert fused_layers() == 0
    finally:
        handle.remove()
    assert any(isinstance(module, torch.nn.Linear) for module in seen)
    # Other experts or attention implementations, training and autograd run the layer's own forward.
    model.set_experts_implementation("grouped_mm")
    assert fused_layers() == 0
    model.set_experts_implementation("sorted_mm")
    model.set_attn_implementation("eager")
    assert fused_layers() == 0
    model.set_attn_implementation("sdpa")
    with torch.profiler.profile() as profile:
        model(input_ids[:, :1]).logits.sum().backward()
    assert not ran("layer_output", profile)
    assert all(parameter.grad is not None for parameter in model.model.layers[0].parameters())
    model.train()
    with torch.no_grad(), torch.profiler.profile() as profile:
        model(input_ids[:, :1])
    assert not ran("layer_output", profile)
    # Training only the routers: a gradient must reach them.
    model.eval().requires_grad_(False)
    router = model.moe_blocks()[-1].router
    router.weight.requires_grad_(True)
    with torch.profiler.profile() as profile:
        model(input_ids[:, :1]).logits.sum().backward()
    assert runs("layer_output", profile) == 1 and router.weight.grad is not None  # the first layer has nothing to train


def test_decoder_layers_with_lora_adapters_run_them():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(make_model(), config).eval()
    input_ids = tokens(batch=1, length=6)
    out, stock, profile = decode_step(model, input_ids)
    assert runs("layer_output", profile) == 0  # every layer has an adapted q_proj
    torch.testing.assert_close(out.logits, stock.logits, atol=1e-5, rtol=0)
    with model.disable_adapter():
        base, _, _ = decode_step(model, input_ids)
    assert (out.logits - base.logits).abs().max() > 1e-3  # the adapters took part


def test_layer_operators_reject_mismatched_inputs_with_the_reason():
    hidden, norm = torch.randn(1, 1, 16), torch.ones(16)
    weights = torch.randn(32, 16), torch.randn(16, 16), torch.randn(16, 16)
    angles = torch.randn(1, 1, 16)
    with pytest.raises(RuntimeError, match=r"cos and sin must be \[B or 1, T, 16\]"):
        torch.ops.mobilemoe_cpu.attention_input(hidden, norm, 1e-5, *weights, 16, *(angles[..., :8],) * 2, None)
    with pytest.raises(RuntimeError, match="give both cos and sin"):
        torch.ops.mobilemoe_cpu.attention_input(hidden, norm, 1e-5, *weights, 16, angles, None, None)
    with pytest.raises(RuntimeError, match=r"do not split into heads of 8 \(a multiple of 16\)"):
        torch.ops.mobilemoe_cpu.attention_input(hidden, norm, 1e-5, *weights, 8, None, None, None)
    with pytest.raises(RuntimeError, match=r"norm weight must be \[16\]"):
        torch.ops.mobilemoe_cpu.attention_input(hidden, torch.ones(8), 1e-5, *weights, 16, None, None, None)
    mlp = torch.randn(32, 16), torch.randn(32, 16), torch.randn(16, 32)
    attention = torch.randn(1, 1, 2, 16)
    with pytest.raises(RuntimeError, match="a router needs expert_bias"):
        torch.ops.mobilemoe_cpu.layer_output(
            attention, hidden, weights[0].T.contiguous(), norm, 1e-5, *mlp, torch.randn(8, 16), None, None, None, 2,
            True, 1.0,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="router and expert_bias must be float32"):
        torch.ops.mobilemoe_cpu.layer_output(
            attention, hidden, weights[0].T.contiguous(), norm, 1e-5, *mlp, torch.randn(8, 16).double(),
            torch.zeros(8), torch.randn(8, 64, 16), torch.randn(8, 16, 32), 2, True, 1.0,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"residual must be \[B, T, H\] and attention"):
        torch.ops.mobilemoe_cpu.layer_output(
            attention[..., :8], hidden, weights[0].T.contiguous(), norm, 1e-5, *mlp, None, None, None, None, 0, False,
            1.0,
        )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_with_kernels_matches_stock_pytorch(instruction_set, dtype):
    model = make_model().to(dtype)
    input_ids = tokens(batch=2, length=8)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # a left-padded row
    settings = dict(attention_mask=attention_mask, max_new_tokens=32, do_sample=False, output_logits=True,
                    return_dict_in_generate=True, pad_token_id=0)  # fmt: skip
    with torch.no_grad():
        generated = model.generate(input_ids, **settings)
        with kernels.enabled(False):
            stock = model.generate(input_ids, **settings)
            # Every decode step's logits against stock PyTorch reading the same tokens in one pass (teacher forcing),
            # so bf16 is checked at each step even where its greedy tokens would diverge.
            mask = torch.cat([attention_mask, torch.ones(2, settings["max_new_tokens"], dtype=torch.long)], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            reference = model(generated.sequences, attention_mask=mask, position_ids=positions).logits
    if dtype == torch.float32:  # bf16 rounds differently (the kernels accumulate in fp32), so tokens may diverge
        assert torch.equal(generated.sequences, stock.sequences)
    steps = torch.stack(generated.logits, dim=1).float()
    expected = reference[:, input_ids.shape[1] - 1 : -1].float()
    torch.testing.assert_close(steps, expected, atol=5e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_compiles_fullgraph_with_the_kernels_as_opaque_ops(dtype):
    model = make_model().to(dtype)
    input_ids = tokens(batch=1, length=1)
    with torch.no_grad():
        expected = model(input_ids).logits
        with kernels.enabled(False):
            stock = model(input_ids).logits
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        with torch.profiler.profile() as profile:
            actual = compiled(input_ids).logits
    names = {event.name for event in profile.events()}
    operators = ["moe_experts", "decode_attention", "linear", "swiglu_mlp"]
    assert {f"mobilemoe_cpu::{operator}" for operator in operators} <= names
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2  # inductor fuses the norms: bf16 rounds elsewhere
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(actual, stock, atol=tolerance, rtol=tolerance)


@pytest.mark.usefixtures("native_bf16_matmul", "kernel_prefill_attention")
def test_bf16_prefill_compiles_fullgraph_with_the_attention_kernel_as_an_opaque_op():
    model = make_model().to(torch.bfloat16)
    input_ids = tokens(batch=1, length=9)
    with torch.no_grad():
        expected = model(input_ids).logits
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        with torch.profiler.profile() as profile:
            actual = compiled(input_ids).logits
    assert ran("prefill_attention", profile)
    torch.testing.assert_close(actual, expected, atol=3e-2, rtol=3e-2)  # inductor fuses the norms, as above


@pytest.mark.parametrize("length", [1, kernels.MAX_LINEAR_ROWS + 2])  # decode-sized, and past the streamed rows
def test_exported_programs_use_stock_ops_only(length):
    model = make_model()
    input_ids = tokens(batch=1, length=length)
    with torch.no_grad():
        program = torch.export.export(model, (input_ids,), kwargs={"use_cache": False})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mobilemoe_cpu" in target or "mkldnn" in target for target in targets)
    assert any("linear" in target or "mm" in target for target in targets)
