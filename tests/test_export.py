"""Exports to ONNX and ExecuTorch: each is run with its runtime and checked against PyTorch (transformers' greedy
`generate` with the KV cache), float and INT4; the INT4 tensors of a packed checkpoint travel unchanged."""

import io
from contextlib import redirect_stdout

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import modeling_mobilemoe  # noqa: F401  (registers the Auto classes)
from modeling_mobilemoe import MobileMoEConfig, MobileMoEQATConfig
from modeling_mobilemoe.cli import main
from modeling_mobilemoe.export import (
    ExecuTorchRunner,
    OnnxRunner,
    export_executorch,
    export_model,
    export_onnx,
    greedy_with_pytorch,
    load_for_export,
    load_runner,
    reference_model,
)
from modeling_mobilemoe.quantization import convert_to_int4
from reference_mobilemoe import random_published_state_dict, tiny_published_config, write_published_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

MAX_SEQ_LEN = 64
CHUNK = 4  # the float ExecuTorch export takes 4 tokens a call: the 10-token prompts are prefilled in chunks
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    torch.manual_seed(0)
    # Two of the tiny preset's four (identical) layers: exporting and lowering take time in proportion to the graph.
    config = MobileMoEConfig.from_preset("tiny", max_position_embeddings=128, num_hidden_layers=2)
    folder = tmp_path_factory.mktemp("float")
    model = AutoModelForCausalLM.from_config(config)
    for block in model.moe_blocks():  # a selection bias that changes which experts win, as trained models have
        block.expert_bias.normal_(0, 0.3)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def packed_folder(tmp_path_factory):
    """A packed INT4 checkpoint written by the independent reference (its own scale rule, not ours)."""
    config = tiny_published_config(num_hidden_layers=2)
    folder = tmp_path_factory.mktemp("packed")
    write_published_checkpoint(folder, config, random_published_state_dict(config, seed=0), int4=True)
    return folder


@pytest.fixture(scope="module")
def qat_folder(float_folder, tmp_path_factory):
    """A QAT model converted to INT4 and saved (packed weights plus its quantization_config)."""
    model = AutoModelForCausalLM.from_pretrained(float_folder, quantization_config=MobileMoEQATConfig())
    folder = tmp_path_factory.mktemp("qat")
    convert_to_int4(model).save_pretrained(folder)
    return folder


def _prompt(vocab_size: int, batch: int = 1, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


def _check_greedy(runner, folder, quantize: str, atol: float) -> None:
    reference = reference_model(folder, quantize, runner.export_config.experts)
    prompt = _prompt(reference.config.vocab_size)
    exported = runner.generate(prompt, NEW_TOKENS)
    expected = greedy_with_pytorch(reference, prompt, NEW_TOKENS)
    assert torch.equal(exported.sequences, expected.sequences)
    torch.testing.assert_close(exported.logits, expected.logits, atol=atol, rtol=0)


@pytest.fixture(scope="module")
def onnx_float(float_folder, tmp_path_factory):
    return export_onnx(float_folder, tmp_path_factory.mktemp("onnx_float"), max_seq_len=MAX_SEQ_LEN).parent


@pytest.fixture(scope="module")
def onnx_qmoe(float_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_qmoe")
    return export_onnx(float_folder, out, quantize="8da4w", max_seq_len=MAX_SEQ_LEN).parent


@pytest.fixture(scope="module")
def onnx_packed(packed_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx_packed")
    return export_onnx(packed_folder, out, quantize="8da4w", experts="packed", max_seq_len=MAX_SEQ_LEN).parent


@pytest.fixture(scope="module")
def executorch_float(float_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("et_float")
    # transformers' SDPA over the static cache here, ExecuTorch's custom_sdpa (the default) in the INT4 one.
    return export_executorch(float_folder, out, max_seq_len=MAX_SEQ_LEN, max_chunk=CHUNK, custom_sdpa=False).parent


@pytest.fixture(scope="module")
def executorch_int4(qat_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("et_int4")
    # The default program: 8da4w, custom SDPA, prefilled in chunks as well.
    return export_executorch(qat_folder, out, quantize="8da4w", max_seq_len=MAX_SEQ_LEN, max_chunk=CHUNK).parent


def test_onnx_float_generates_as_pytorch(onnx_float, float_folder):
    _check_greedy(OnnxRunner(onnx_float), float_folder, "none", atol=1e-4)


def test_onnx_qmoe_generates_as_pytorch(onnx_qmoe, float_folder):
    """ONNX Runtime's fused QMoE against MobileMoE's own block (sigmoid scores, selection-only bias, renormalised
    top-k times 2.5) on the same INT4 values: the routing maps onto the op exactly."""
    assert OnnxRunner(onnx_qmoe).export_config.experts == "qmoe"
    _check_greedy(OnnxRunner(onnx_qmoe), float_folder, "8da4w", atol=1e-4)


def test_onnx_qmoe_graph(onnx_qmoe):
    nodes = onnx.load(onnx_qmoe / "model.onnx").graph.node
    config = MobileMoEConfig.from_pretrained(onnx_qmoe)
    qmoe = [n for n in nodes if n.op_type == "QMoE" and n.domain == "com.microsoft"]
    assert len(qmoe) == config.num_moe_layers
    assert len([n for n in nodes if n.op_type == "MatMulNBits"]) == 7 * config.num_hidden_layers + 1
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in qmoe[0].attribute}
    assert attributes["k"] == config.num_experts_per_tok and attributes["normalize_routing_weights"] == 1
    assert qmoe[0].input[14]  # router_weights: the unbiased scores mix, the biased ones only select


def test_onnx_packed_experts_generate_as_the_int4_checkpoint(onnx_packed, packed_folder):
    _check_greedy(OnnxRunner(onnx_packed), packed_folder, "8da4w", atol=1e-4)


def test_onnx_left_padded_batch_matches_pytorch(onnx_float, float_folder):
    reference = load_for_export(float_folder)[0]
    prompt = _prompt(reference.config.vocab_size, batch=2, length=9)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0
    exported = OnnxRunner(onnx_float).generate(prompt, 8, attention_mask=mask)
    with torch.no_grad():
        expected = reference.generate(prompt, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert torch.equal(exported.sequences, expected)


def test_onnx_signature_follows_optimum(onnx_float):
    graph = onnx.load(onnx_float / "model.onnx", load_external_data=False).graph
    layers = MobileMoEConfig.from_pretrained(onnx_float).num_hidden_layers
    pasts = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
    assert [i.name for i in graph.input] == ["input_ids", "attention_mask", "position_ids", *pasts]
    presents = [name.replace("past_key_values", "present") for name in pasts]
    assert [o.name for o in graph.output] == ["logits", *presents]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert isinstance(dims["input_ids"][0], str) and isinstance(dims["input_ids"][1], str)  # batch, sequence
    assert isinstance(dims["past_key_values.0.key"][2], str)  # past length


def test_onnx_int4_carries_the_checkpoint_bytes_and_reads_experts_sparsely(onnx_packed, packed_folder):
    model = onnx.load(onnx_packed / "model.onnx")
    initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    checkpoint = load_file(packed_folder / "model.safetensors")
    experts = [k for k in checkpoint if "experts." in k]
    assert experts
    by_value = [v.tobytes() for v in initializers.values()]
    for key in experts + ["model.embed_tokens.qweight"]:
        assert checkpoint[key].numpy().tobytes() in by_value, key
    # Linears are MatMulNBits holding the checkpoint's nibbles as `q + 8`: 4 attention + 3 shared-expert per layer,
    # plus the tied LM head.
    nodes = model.graph.node
    matmul_nbits = [n for n in nodes if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    layers = MobileMoEConfig.from_pretrained(onnx_packed).num_hidden_layers
    assert len(matmul_nbits) == 7 * layers + 1
    q_proj = (checkpoint["model.layers.0.self_attn.q_proj.qweight"].numpy() ^ 0x88).tobytes()
    assert q_proj in [initializers[n.input[1]].tobytes() for n in matmul_nbits]
    dense_weights = {name for name in initializers if "router" not in name}  # the router stays an FP32 MatMul
    assert not [n for n in nodes if n.op_type in ("MatMul", "Gemm") and set(n.input) & dense_weights]
    # Expert tensors are only ever gathered by the selected ids (no full-tensor matmul or dequantization).
    expert_names = {n for n, v in initializers.items() if v.tobytes() in {checkpoint[k].numpy().tobytes() for k in experts}}
    consumers, frontier = [], expert_names
    while frontier:  # through reshapes (views) to the ops that read the values
        users = [n for n in nodes if set(n.input) & frontier]
        consumers += [n.op_type for n in users if n.op_type != "Reshape"]
        frontier = {out for n in users if n.op_type == "Reshape" for out in n.output}
    assert consumers and set(consumers) <= {"Gather", "GatherND"}


def test_executorch_float_generates_as_pytorch(executorch_float, float_folder):
    runner = ExecuTorchRunner(executorch_float)
    _check_greedy(runner, float_folder, "none", atol=1e-4)
    config = MobileMoEConfig.from_pretrained(float_folder)
    assert runner.metadata["get_max_context_len"] == MAX_SEQ_LEN
    assert runner.metadata["get_max_seq_len"] == runner.export_config.max_chunk == CHUNK
    assert runner.metadata["get_vocab_size"] == config.vocab_size
    assert runner.metadata["get_eos_ids"] == config.eos_token_id
    assert runner.metadata["use_kv_cache"] is True and runner.metadata["enable_dynamic_shape"] is True


def test_executorch_int4_from_a_qat_checkpoint(executorch_int4, qat_folder):
    # INT8 dynamic activations (XNNPACK's 8da4w kernels) against the INT4-weight model with float activations.
    _check_greedy(ExecuTorchRunner(executorch_int4), qat_folder, "8da4w", atol=0.2)


def _program_operators(folder) -> set[str]:
    """The operators the program's `forward` calls outside its XNNPACK delegates, as ExecuTorch names them."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary((folder / "model.pte").read_bytes()).program
    (forward,) = [plan for plan in program.execution_plan if plan.name == "forward"]
    return {operator.name for operator in forward.operators}


def test_executorch_programs_use_executorchs_llm_ops(executorch_float, executorch_int4):
    stock, custom = _program_operators(executorch_float), _program_operators(executorch_int4)
    # The KV cache is written and read in place by ExecuTorch's LLM ops, not attended as a whole under a mask.
    assert {"llama::update_cache", "llama::custom_sdpa"} <= custom
    assert not any(name.startswith("llama::") for name in stock)
    assert "quantized_decomposed::embedding_4bit" in custom and "quantized_decomposed::embedding_4bit" not in stock


def test_executorch_int4_bytes_hold_the_published_values():
    """Every byte of the published layout, re-encoded for `embedding_4bit`, dequantizes to the same two values."""
    import executorch.exir  # noqa: F401  (defines `embedding_4bit`)

    from modeling_mobilemoe.export.executorch import executorch_int4_bytes
    from modeling_mobilemoe.export.packed import dequantized

    published = torch.arange(256, dtype=torch.uint8).reshape(8, 32)  # 8 rows of 64 INT4 values, 2 groups each
    scale = torch.tensor([0.5, 2.0]).repeat(8, 1).to(torch.float16)
    rows = torch.arange(8)
    read = torch.ops.quantized_decomposed.embedding_4bit.dtype(
        executorch_int4_bytes(published), scale, None, -8, 7, rows, dtype=torch.float32
    )
    torch.testing.assert_close(read, dequantized(published, scale), atol=0, rtol=0)


def test_exported_experts_read_only_the_gathered_experts(packed_folder):
    """In the graph the exporters lower, expert tensors are only read by row gathers of the selected experts."""
    from modeling_mobilemoe.export.executorch import quantize_8da4w

    model = quantize_8da4w(load_for_export(packed_folder)[0])
    block = model.moe_blocks()[0]
    hidden = torch.randn(12, model.config.hidden_size)
    _, top_k_weights, top_k_index = block.router(hidden, block.expert_bias)
    program = torch.export.export(block.routed_experts, (hidden, top_k_index, top_k_weights))
    expert_inputs = {
        name for name, target in program.graph_signature.inputs_to_buffers.items() if "qweight" in target or "_scale" in target
    }
    views = {torch.ops.aten.flatten.using_ints, torch.ops.aten.view.default, torch.ops.aten.reshape.default}
    uses, frontier = set(), [node for node in program.graph.nodes if node.name in expert_inputs]
    while frontier:  # through views to the ops that read the values
        users = [user for node in frontier for user in node.users]
        uses |= {user.target for user in users if user.target not in views}
        frontier = [user for user in users if user.target in views]
    # Row gathers of the selected experts, dequantized by ExecuTorch's INT4 embedding kernel.
    assert uses == {torch.ops.quantized_decomposed.embedding_4bit.dtype}


def test_runner_refuses_sequences_longer_than_the_export(onnx_float, executorch_float):
    for runner in (OnnxRunner(onnx_float), ExecuTorchRunner(executorch_float)):
        with pytest.raises(ValueError, match="max_seq_len"):
            runner.generate(_prompt(100, length=40), 30)
    with pytest.raises(ValueError, match="max_batch"):
        OnnxRunner(onnx_float).generate(_prompt(100, batch=9), 2)
    with pytest.raises(ValueError, match="batch 1"):
        ExecuTorchRunner(executorch_float).generate(_prompt(100, batch=2), 2)
    with pytest.raises(ValueError, match="would end at 65"):  # a call past the static cache, not a runtime abort
        ExecuTorchRunner(executorch_float).forward(_prompt(100, length=2), MAX_SEQ_LEN - 1)


def test_load_runner_picks_the_format(onnx_float, executorch_float, float_folder):
    assert isinstance(load_runner(onnx_float), OnnxRunner)
    assert isinstance(load_runner(executorch_float), ExecuTorchRunner)
    with pytest.raises(ValueError, match="not an export folder"):
        load_runner(float_folder)
    with pytest.raises(ValueError, match="not an ONNX one"):
        OnnxRunner(executorch_float)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"format": "tflite"}, "format: 'tflite'"),
        ({"format": "onnx", "quantize": "int2"}, "quantize: 'int2'"),
        ({"format": "onnx", "max_seq_len": 10**6}, "max_seq_len"),
        ({"format": "onnx", "target": "arm"}, "target"),
        ({"format": "onnx", "quantize": "8da4w", "experts": "dense"}, "experts: 'dense'"),
        ({"format": "executorch", "max_batch": 4}, "max_batch"),
        ({"format": "executorch", "target": "arm"}, "llama::quantized_moe_ffn"),
        ({"format": "executorch", "target": "gpu"}, "target: 'gpu'"),
        ({"format": "executorch", "max_seq_len": 48, "max_chunk": 48}, "max_chunk: 48"),
        ({"format": "executorch", "max_chunk": 1}, "max_chunk: 1; .* at least 2"),
        ({"format": "executorch", "experts": "qmoe"}, "experts: an option of the onnx export only"),
        ({"format": "onnx", "max_chunk": 16}, "max_chunk: an option of the executorch export only"),
    ],
)
def test_unsupported_options_fail_clearly(float_folder, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        export_model(float_folder, tmp_path, **options)
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "model.pte").exists()


def test_export_cli_checks_against_pytorch(float_folder, tmp_path):
    output = io.StringIO()
    with redirect_stdout(output):
        code = main(["export", "--format", "onnx", "--model", str(float_folder), "--out", str(tmp_path),
                     "--max-seq-len", "48", "--check-tokens", "16"])  # fmt: skip
    assert code == 0
    assert "check: 16/16 greedy tokens as PyTorch" in output.getvalue()
    assert np.isclose(float(output.getvalue().split("max |logit diff| ")[1].split()[0]), 0, atol=1e-4)
