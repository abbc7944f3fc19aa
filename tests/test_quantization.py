"""Quantization-aware training through `MobileMoEQATConfig`, and conversion to the packed INT4 format."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from reference_mobilemoe import dequantized_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM, MobileMoEQATConfig
from modeling_mobilemoe.modeling_mobilemoe import MobileMoERMSNorm, MobileMoETopkRouter
from modeling_mobilemoe.quantization import FakeQuantizedExperts, convert_to_int4, quantize_int4


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    MobileMoEForCausalLM(MobileMoEConfig.from_preset("tiny", num_hidden_layers=2)).save_pretrained(folder)
    return folder


@pytest.fixture
def inputs():
    return torch.randint(0, 2000, (2, 24), generator=torch.Generator().manual_seed(1))


def qat_model(base_dir, **config):
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=MobileMoEQATConfig(**config))


def test_config_is_registered_and_round_trips():
    from transformers.quantizers.auto import AutoQuantizationConfig

    restored = AutoQuantizationConfig.from_dict(MobileMoEQATConfig(group_size=64, activation_bits=None).to_dict())
    assert isinstance(restored, MobileMoEQATConfig)
    assert restored.group_size == 64 and restored.activation_bits is None and not restored.converted


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weight_bits": 8}, "weight_bits"),
        ({"embedding_bits": 2}, "embedding_bits"),
        ({"group_size": 31}, "group_size"),
        ({"activation_bits": 4}, "activation_bits"),
        ({"quant_method": "awq"}, "quant_method"),
    ],
)
def test_invalid_config_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        MobileMoEQATConfig(**fields)


def test_group_size_must_divide_the_grouped_dimensions(base_dir):
    with pytest.raises(ValueError, match="group_size: 48 does not divide"):
        qat_model(base_dir, group_size=48)


def test_every_linear_expert_and_the_embedding_are_fake_quantized_but_not_the_router_or_norms(base_dir):
    model = qat_model(base_dir)
    names = {type(module).__name__ for module in model.modules()}
    assert {"FakeQuantizedLinear", "FakeQuantizedEmbedding", "FakeQuantizedExperts"} <= names
    assert "Linear" not in names and "Embedding" not in names  # nothing left out
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for module in model.modules():
        if isinstance(module, (MobileMoETopkRouter, MobileMoERMSNorm)):
            assert not any("fake_quantizer" in name for name, _ in module.named_modules())
        if isinstance(module, MobileMoETopkRouter):
            assert module.weight.dtype == torch.float32


def test_fake_quantized_weights_are_on_the_published_int4_grid(base_dir):
    model = qat_model(base_dir)
    experts = next(m for m in model.modules() if isinstance(m, FakeQuantizedExperts))
    published = experts.gate_up_proj.detach().transpose(1, 2)  # [E, in, out]: grouped along out, as published
    q, scale = quantize_int4(published, 32)
    grid = (q.float().unflatten(-1, (-1, 32)) * scale.float()[..., None]).flatten(-2)
    torch.testing.assert_close(published, grid, rtol=0, atol=0)
    assert not torch.equal(experts.gate_up_proj, experts._parameters["gate_up_proj"])  # the parameter stays float


def test_training_step_reaches_every_weight_and_leaves_router_bias_alone(base_dir, inputs):
    model = qat_model(base_dir).train()
    bias_before = [block.expert_bias.clone() for block in model.moe_blocks()]
    model(inputs, labels=inputs).loss.backward()
    experts = model.moe_blocks()[0].routed_experts
    assert experts._parameters["gate_up_proj"].grad.abs().sum() > 0  # straight-through gradients
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0
    assert model.moe_blocks()[0].router.weight.grad is not None
    for block, before in zip(model.moe_blocks(), bias_before):
        assert torch.equal(block.expert_bias, before)


def test_weights_are_fake_quantized_once_per_forward_not_per_token(base_dir):
    model = qat_model(base_dir).eval()
    experts = model.moe_blocks()[0].routed_experts
    calls = []
    experts.weight_fake_quantizer.register_forward_hook(lambda *args: calls.append(1))
    for tokens in (4, 64):
        calls.clear()
        with torch.no_grad():
            model(torch.randint(0, 2000, (1, tokens)))
        assert len(calls) == 2  # gate_up and down, whatever the number of tokens


def test_sorted_mm_and_eager_experts_agree_under_qat(base_dir, inputs):
    model = qat_model(base_dir).eval()
    with torch.no_grad():
        fast = model(inputs).logits
        model.set_experts_implementation("eager")
        reference = model(inputs).logits
    torch.testing.assert_close(fast, reference, rtol=1e-4, atol=1e-4)


def test_convert_saves_the_published_packed_layout_and_reloads_exactly(base_dir, inputs, tmp_path):
    model = qat_model(base_dir).eval()
    with torch.no_grad():
        fake_quantized = model(inputs).logits
        convert_to_int4(model)
        converted = model(inputs).logits
    torch.testing.assert_close(converted, fake_quantized, rtol=0, atol=0)  # converting changes nothing

    model.save_pretrained(tmp_path / "int4")
    config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert config["quantization"]["format"] == "mobilemoe-int4-g32"
    assert config["quantization_config"]["converted"] is True
    tensors = load_file(tmp_path / "int4" / "model.safetensors")
    prefix = "model.layers.0.feed_forward."
    hidden, width = model.config.hidden_size, model.config.intermediate_size
    assert tensors[prefix + "experts.gate_up_qweight"].shape == (16, hidden, width)  # [E, H, 2I/2]
    assert tensors[prefix + "experts.gate_up_scale"].dtype == torch.float16
    assert tensors["model.embed_tokens.qweight"].dtype == torch.uint8
    assert tensors[prefix + "router.weight"].dtype == torch.float32
    assert not any(name.endswith("proj.weight") or name == "lm_head.weight" for name in tensors)

    # An independent reader of the published format sees the converted model's weights.
    published = dequantized_state_dict(tmp_path / "int4")
    experts = model.moe_blocks()[0].routed_experts
    torch.testing.assert_close(published[prefix + "experts.gate_up_proj"], experts.gate_up_proj.transpose(1, 2))
    torch.testing.assert_close(published["model.embed_tokens.weight"], model.model.embed_tokens.weight)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "int4")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(inputs).logits, converted, rtol=0, atol=0)
    reloaded.save_pretrained(tmp_path / "again")
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest() for d in ("int4", "again")]
    assert digest[0] == digest[1]  # save -> load -> save is byte-identical


def test_convert_is_idempotent_and_needs_a_qat_model(base_dir, inputs):
    model = convert_to_int4(qat_model(base_dir))
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    convert_to_int4(model)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    with pytest.raises(ValueError, match="MobileMoEQATConfig"):
        convert_to_int4(AutoModelForCausalLM.from_pretrained(base_dir))


def test_weight_only_qat_keeps_activations_float(base_dir, inputs):
    model = qat_model(base_dir, activation_bits=None)
    assert all(getattr(m, "activation_fake_quantizer", None) is None for m in model.modules())


def test_bitsandbytes_4bit_loading_and_a_qlora_step(base_dir, inputs):
    """QLoRA the usual way: bitsandbytes 4-bit linears (on CPU too), LoRA adapters from PEFT, one optimizer step."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    bnb_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=bnb_config)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert model.moe_blocks()[0].router.weight.dtype == torch.float32
    model = get_peft_model(
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=False),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    assert trainable and all(parameter.dtype == torch.float32 for parameter in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    before = model(inputs, labels=inputs).loss
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert model(inputs, labels=inputs).loss < before
