"""MobileMoEConfig: presets reproduce the paper's counts, accounting matches real models, bad fields fail precisely."""

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError

from modeling_mobilemoe import MobileMoEConfig, MobileMoEForCausalLM
from modeling_mobilemoe.configuration_mobilemoe import INT4_FORMAT_FIELDS


@pytest.mark.parametrize(
    "preset, active, total",
    [("S", 272e6, 1.26e9), ("M", 528e6, 2.82e9), ("L", 922e6, 5.33e9)],
)
def test_presets_reproduce_published_parameter_counts(preset, active, total):
    config = MobileMoEConfig.from_preset(preset)
    assert config.num_active_parameters() == pytest.approx(active, rel=0.01)
    assert config.num_parameters() == pytest.approx(total, rel=0.01)


def test_preset_shapes_follow_the_spec_table():
    config = MobileMoEConfig.from_preset("L")
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        32,
        1280,
        20,
        4,
    )
    assert (config.intermediate_size, config.intermediate_size_mlp) == (640, 2560)
    assert (config.num_local_experts, config.num_experts_per_tok, config.vocab_size) == (60, 4, 128256)
    assert config.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 8192,
        "low_freq_factor": 1.0,
        "high_freq_factor": 1.0,
    }


def test_default_config_is_the_s_preset():
    assert MobileMoEConfig().to_dict() == MobileMoEConfig.from_preset("S").to_dict()


def test_unknown_preset():
    with pytest.raises(ValueError, match=r"Unknown MobileMoE preset 'XL'.*\['L', 'M', 'S', 'tiny'\]"):
        MobileMoEConfig.from_preset("XL")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"interleave_moe_layer_step": 2, "num_hidden_layers": 4},
        {"tie_word_embeddings": False, "attention_bias": True},
    ],
)
def test_parameter_count_matches_instantiated_model(overrides):
    config = MobileMoEConfig.from_preset("tiny", **overrides)
    model = MobileMoEForCausalLM(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    persistent_buffers = sum(b.numel() for name, b in model.named_buffers() if name in model.state_dict())
    assert config.num_parameters() == sum(unique.values()) + persistent_buffers


def test_active_parameters_count_only_selected_experts():
    config = MobileMoEConfig.from_preset("tiny")
    per_expert = 3 * config.hidden_size * config.intermediate_size
    unselected = config.num_hidden_layers * (config.num_local_experts - config.num_experts_per_tok) * per_expert
    assert config.num_parameters() - config.num_active_parameters() == unselected


def test_flops_per_token_counts_matmuls_and_attention():
    config = MobileMoEConfig.from_preset("tiny")
    base = config.flops_per_token(0)
    # Two FLOPs per active weight except the embedding lookup, whose tied matrix is still used by the LM head.
    norms_and_bias = (2 * config.num_hidden_layers + 1) * config.hidden_size + config.num_hidden_layers * config.num_local_experts
    per_head_position = 4 * config.num_hidden_layers * config.num_attention_heads * config.head_dim
    assert base == 2 * (config.num_active_parameters() - norms_and_bias) + per_head_position
    assert config.flops_per_token(100) - base == 100 * per_head_position


def test_int4_weight_bytes():
    config = MobileMoEConfig.from_preset("tiny")
    groups = config._parameter_groups()
    quantized = config.num_parameters() - groups["router"] - groups["expert_bias"] - groups["norms"]
    group_size = INT4_FORMAT_FIELDS["group_size"]
    expected = quantized // 2 + 2 * quantized // group_size + 4 * (groups["router"] + groups["expert_bias"])
    assert config.int4_weight_bytes() == expected + 2 * groups["norms"]
    # The paper quotes 0.68 / 1.48 / 2.75 GB for S / M / L (GiB-sized, group scales included).
    for preset, gigabytes in (("S", 0.68), ("M", 1.48), ("L", 2.75)):
        assert MobileMoEConfig.from_preset(preset).int4_weight_bytes() / 2**30 == pytest.approx(gigabytes, rel=0.03)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_attention_heads": 5}, r"`num_attention_heads` x `head_dim` \(5 x 64 = 320\) must equal `hidden_size` \(768\)"),
        ({"num_key_value_heads": 5}, r"`num_attention_heads` \(12\) must be a multiple of `num_key_value_heads` \(5\)"),
        ({"num_experts_per_tok": 61}, r"`num_experts_per_tok` \(61\) must be <= `num_local_experts` \(60\)"),
        ({"no_rope_layers": [1, 1]}, r"`no_rope_layers` must have one entry per layer \(num_hidden_layers=20\), got 2"),
        ({"no_rope_layers": [2] * 20}, r"`no_rope_layers` entries must be 1 \(RoPE\) or 0 \(NoPE\)"),
        ({"layer_types": ["sliding_attention"] * 20}, r"layer_types"),
        ({"hidden_size": 0}, r"`hidden_size` must be a positive integer, got 0"),
        ({"routed_scaling_factor": 0.0}, r"`routed_scaling_factor` must be > 0"),
        ({"attn_temperature_tuning": True}, r"`attn_temperature_tuning=True` is not supported"),
        ({"hidden_act": "gelu"}, r"`hidden_act` must be 'silu'"),
        ({"quantization": {"format": "gptq"}}, r"`quantization.format` 'gptq' is not a known MobileMoE checkpoint format"),
        ({"quantization": {"format": "mobilemoe-int4-g32", "group_size": 64}}, r"`quantization.group_size` must be 32"),
        (
            {"quantization": {"format": "mobilemoe-int4-g32"}, "intermediate_size": 40},
            r"`2 \* intermediate_size` \(80\) must be a multiple of the INT4 group size 32",
        ),
        (
            {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0, "original_max_position_embeddings": 8192, "low_freq_factor": 4.0, "high_freq_factor": 1.0}},
            r"`rope_parameters.high_freq_factor` must be >= `low_freq_factor`",
        ),
    ],
)
def test_invalid_fields_fail_with_precise_message(overrides, message):
    with pytest.raises(StrictDataclassError, match=message):
        MobileMoEConfig(**overrides)


def test_wrong_field_type_is_rejected():
    with pytest.raises(StrictDataclassError, match="num_local_experts"):
        MobileMoEConfig(num_local_experts="60")


def test_invalid_config_is_rejected_at_save(tmp_path):
    config = MobileMoEConfig.from_preset("tiny")
    config.num_experts_per_tok = 99
    with pytest.raises(StrictDataclassError, match="num_experts_per_tok"):
        config.save_pretrained(tmp_path)


def test_legacy_rope_keys_become_rope_parameters():
    rope_scaling = {"rope_type": "llama3", "factor": 16.0, "original_max_position_embeddings": 8192}
    rope_scaling |= {"low_freq_factor": 1.0, "high_freq_factor": 1.0}
    config = MobileMoEConfig(rope_theta=10000.0, rope_scaling=rope_scaling)
    assert config.rope_parameters == {**rope_scaling, "rope_theta": 10000.0}


def test_config_round_trip(tmp_path):
    config = MobileMoEConfig.from_preset("tiny", interleave_moe_layer_step=2, router_aux_loss_coef=0.01)
    config.save_pretrained(tmp_path)
    reloaded = MobileMoEConfig.from_pretrained(tmp_path)
    assert reloaded.to_dict() == config.to_dict()
    assert reloaded.dtype in (None, torch.float32)
