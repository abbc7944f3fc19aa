"""CPU decode kernels (`modeling_mobilemoe.kernels`): the streaming linear and the fused routed experts against stock
PyTorch and the eager experts, in the model, under `torch.compile`, and kept out of exported programs."""

import copy

import pytest
import torch
import torch.nn.functional as F
from test_modeling import make_model, run_experts, tokens

from modeling_mobilemoe import kernels


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def test_kernels_build_on_this_machine():
    # CI runs on the machine kind the benchmarks ran on: a silent fallback there would hide a broken build.
    assert kernels.available(), kernels.unavailable_reason()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (2, 3, 64), (4, 64)])
def test_linear_matches_float64_reference(dtype, shape):
    weight = torch.randn(100, 64, dtype=dtype)  # 100 rows: blocks of four plus a remainder
    bias = torch.randn(100, dtype=dtype)
    x = torch.randn(*shape, dtype=dtype)
    out = torch.ops.mobilemoe_cpu.linear(x, weight, bias)
    expected = F.linear(x.double(), weight.double(), bias.double())
    assert out.dtype == dtype and out.shape == (*shape[:-1], 100)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_linear_rejects_unsupported_weights_with_the_reason():
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.mobilemoe_cpu.linear(torch.randn(1, 12), torch.randn(4, 12), None)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        torch.ops.mobilemoe_cpu.linear(torch.randn(1, 16).half(), torch.randn(4, 16).half(), None)


def test_decode_linear_uses_the_kernel_only_for_few_rows_without_autograd():
    layer = torch.nn.Linear(64, 32)
    kernels.install(layer)
    calls = []
    with torch.no_grad():
        with torch.profiler.profile() as profile:
            layer.to(torch.bfloat16)(torch.randn(1, 64, dtype=torch.bfloat16))  # bf16: PyTorch's gemv (measured faster)
        assert not any(event.name == "mobilemoe_cpu::linear" for event in profile.events())
        layer.float()
        for rows in (1, kernels.MAX_LINEAR_ROWS, kernels.MAX_LINEAR_ROWS + 1):
            x = torch.randn(rows, 64)
            with torch.profiler.profile() as profile:
                out = layer(x)
            calls.append(any(event.name == "mobilemoe_cpu::linear" for event in profile.events()))
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)
    assert calls == [True, True, False]
    x = torch.randn(1, 64)
    layer(x).sum().backward()  # with autograd: F.linear, so gradients flow
    assert layer.weight.grad is not None


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


def test_every_linear_of_a_model_runs_the_kernel_forward_and_stays_an_nn_linear():
    model = make_model()
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    assert linears and all(type(module) is torch.nn.Linear for module in linears)  # what bitsandbytes looks for
    assert all(module.forward.__func__ is kernels.cpu_linear_forward for module in linears)
    copied = copy.deepcopy(model)
    assert copied.lm_head.forward.__self__ is copied.lm_head
    assert list(copied.state_dict()) == list(model.state_dict())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 2, 4])
def test_fused_experts_match_eager(dtype, num_tokens):
    experts = make_model().to(dtype).moe_blocks()[0].routed_experts
    hidden = torch.randn(num_tokens, 64, dtype=dtype)
    top_k_weights = torch.rand(num_tokens, 2)
    # Repeated experts across tokens, most experts idle, and a tie in the routing weights.
    top_k_index = torch.tensor([[3, 5], [5, 3], [3, 0], [7, 5]])[:num_tokens]
    top_k_weights[0, 1] = top_k_weights[0, 0]
    fused, eager = run_experts(experts, ("cpu_fused", "eager"), hidden, top_k_index, top_k_weights)
    assert fused.dtype == dtype
    torch.testing.assert_close(fused.float(), eager.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_fused_experts_reject_out_of_range_experts():
    experts = make_model().moe_blocks()[0].routed_experts
    with pytest.raises(RuntimeError, match=r"expert index out of range \[0, 8\)"):
        torch.ops.mobilemoe_cpu.moe_experts(
            torch.randn(1, 64), torch.tensor([[1, 8]]), torch.rand(1, 2), experts.gate_up_proj, experts.down_proj
        )


def test_fused_experts_fall_back_for_prefill_and_training():
    experts = make_model().moe_blocks()[0].routed_experts
    experts.config._experts_implementation = "cpu_fused"
    many = kernels.MAX_FUSED_SLOTS // 2 + 1  # top-2: one slot more than the fused operator takes
    hidden, top_k_index = torch.randn(many, 64), torch.randint(0, 8, (many, 2))
    top_k_weights = torch.rand(many, 2)
    with torch.profiler.profile() as profile:
        out = experts(hidden, top_k_index, top_k_weights)  # grad enabled and more slots: the sorted path
    assert not any(event.name == "mobilemoe_cpu::moe_experts" for event in profile.events())
    out.sum().backward()
    assert experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_decode_with_kernels_matches_stock_pytorch(dtype):
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
    if dtype == torch.float32:  # bf16 rounds differently (the kernels accumulate in fp32), so tokens may diverge
        assert torch.equal(generated.sequences, stock.sequences)
    torch.testing.assert_close(generated.logits[0].float(), stock.logits[0].float(), atol=5e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


def test_decode_step_compiles_fullgraph_with_the_kernels_as_opaque_ops():
    model = make_model()
    input_ids = tokens(batch=1, length=1)
    with torch.no_grad():
        expected = model(input_ids).logits
        with kernels.enabled(False):
            stock = model(input_ids).logits
        compiled = torch.compile(model, backend="inductor", fullgraph=True)
        with torch.profiler.profile() as profile:
            actual = compiled(input_ids).logits
    names = {event.name for event in profile.events()}
    assert {"mobilemoe_cpu::linear", "mobilemoe_cpu::moe_experts"} <= names
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(actual, stock, atol=1e-5, rtol=1e-5)


def test_exported_programs_use_stock_ops_only():
    model = make_model()
    input_ids = tokens(batch=1, length=1)
    with torch.no_grad():
        program = torch.export.export(model, (input_ids,), kwargs={"use_cache": False})
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("mobilemoe_cpu" in target for target in targets)
    assert any("linear" in target or "mm" in target for target in targets)
