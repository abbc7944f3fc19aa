"""Meta's published layouts (bf16 and packed INT4) load through `from_pretrained` and match the independent
reference forward pass of `reference_mobilemoe.py` (written from the spec, no transformers)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import modeling_mobilemoe  # noqa: F401  (registers the Auto classes)
from transformers import AutoConfig, AutoModelForCausalLM

from reference_mobilemoe import (
    dequantized_state_dict,
    random_published_state_dict,
    reference_forward,
    tiny_published_config,
    write_published_checkpoint,
)


CONFIG_VARIANTS = {
    "all-moe": {},
    "interleaved-dense-and-nope": {"num_hidden_layers": 4, "interleave_moe_layer_step": 2, "no_rope_layers": [1, 0, 1, 1]},
    "plain-rope-untied-topk-unnormalised": {"rope_scaling": None, "tie_word_embeddings": False, "norm_topk_prob": False},
}


def _config(variant: str) -> dict:
    config = tiny_published_config(**CONFIG_VARIANTS[variant])
    if variant == "interleaved-dense-and-nope":
        config["layer_types"] = ["full_attention"] * 4
    return config


@pytest.fixture(scope="module", params=sorted(CONFIG_VARIANTS))
def published(request, tmp_path_factory):
    """(config dict, bf16 folder, int4 folder) for one architecture variant."""
    config = _config(request.param)
    state_dict = random_published_state_dict(config, seed=0)
    if not config["tie_word_embeddings"]:
        state_dict["lm_head.weight"] = torch.randn(config["vocab_size"], config["hidden_size"]).to(torch.bfloat16) * 0.1
    root = tmp_path_factory.mktemp(request.param)
    write_published_checkpoint(root / "bf16", config, state_dict)
    write_published_checkpoint(root / "int4", config, state_dict, int4=True)
    return config, root / "bf16", root / "int4"


def _inputs(config: dict):
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, config["vocab_size"], (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding on the second row
    return input_ids, attention_mask


@pytest.mark.parametrize("layout", ["bf16", "int4"])
def test_published_layout_matches_reference(published, layout):
    config, bf16_dir, int4_dir = published
    folder = bf16_dir if layout == "bf16" else int4_dir
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    input_ids, attention_mask = _inputs(config)

    expected = reference_forward(dequantized_state_dict(folder), config, input_ids, attention_mask)
    with torch.no_grad():
        logits = model(input_ids, attention_mask=attention_mask).logits.double()

    real = attention_mask.bool()
    torch.testing.assert_close(logits[real], expected[real], atol=1e-4, rtol=1e-4)


def test_int4_checkpoint_dequantizes_exactly(published, tmp_path):
    """Every dense weight after loading equals q * scale of the packed tensors, computed independently; saving
    writes them back in the published (bf16) layout."""
    _, _, int4_dir = published
    model = AutoModelForCausalLM.from_pretrained(int4_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    expected = dequantized_state_dict(int4_dir)
    assert sorted(saved) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(saved[key].float(), value.float(), atol=0, rtol=0, msg=key)


def test_experts_are_kept_in_linear_layout(published):
    config, bf16_dir, _ = published
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    published_tensors = dequantized_state_dict(bf16_dir)
    experts = model.moe_blocks()[0].routed_experts
    layer = next(i for i, layer in enumerate(model.model.layers) if layer.is_moe_layer)
    prefix = f"model.layers.{layer}.feed_forward.experts."
    torch.testing.assert_close(experts.gate_up_proj, published_tensors[prefix + "gate_up_proj"].transpose(1, 2))
    torch.testing.assert_close(experts.down_proj, published_tensors[prefix + "down_proj"].transpose(1, 2))


def test_load_state_dict_accepts_the_saved_layout(published, tmp_path):
    """`Trainer` resumes by `load_state_dict` on the file `save_pretrained` wrote (published expert layout)."""
    _, bf16_dir, _ = published
    model = AutoModelForCausalLM.from_pretrained(bf16_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert any(".feed_forward.experts.gate_up_proj" in key for key in saved)
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    result = fresh.load_state_dict(saved, strict=False)
    tied = ["lm_head.weight"] if model.config.tie_word_embeddings else []
    assert result.missing_keys == tied and not result.unexpected_keys
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0)


def test_int4_loads_in_bf16_with_fp32_router(published):
    config, _, int4_dir = published
    model = AutoModelForCausalLM.from_pretrained(int4_dir, dtype=torch.bfloat16)
    block = model.moe_blocks()[0]
    assert block.routed_experts.gate_up_proj.dtype == torch.bfloat16
    assert block.router.weight.dtype == torch.float32 and block.expert_bias.dtype == torch.float32
    # A dequantized model is dense: it no longer claims the packed format and saves plain tensors.
    assert model.config.quantization is None


def test_int4_loaded_model_saves_dense_and_reloads(published, tmp_path):
    _, _, int4_dir = published
    model = AutoModelForCausalLM.from_pretrained(int4_dir, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert not [key for key in saved if "qweight" in key or key.endswith("_scale")]
    assert "quantization" not in json.loads((tmp_path / "config.json").read_text()) or json.loads(
        (tmp_path / "config.json").read_text()
    )["quantization"] is None
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    input_ids, _ = _inputs(model.config.to_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids).logits, model(input_ids).logits)


def test_published_config_keys_are_understood(published):
    config, bf16_dir, _ = published
    loaded = AutoConfig.from_pretrained(bf16_dir)
    assert loaded.model_type == "mobilemoe"
    expected_rope = config["rope_scaling"]
    if expected_rope is None:
        assert loaded.rope_parameters["rope_type"] == "default"
    else:
        assert loaded.rope_parameters["rope_type"] == "llama3"
        assert loaded.rope_parameters["factor"] == expected_rope["factor"]
    assert loaded.rope_parameters["rope_theta"] == config["rope_theta"]


# ---------------------------------------------------------------------------------------------------------------------
# Bad checkpoints fail loudly and name what is wrong


@pytest.fixture()
def bf16_folder(tmp_path):
    config = tiny_published_config()
    write_published_checkpoint(tmp_path, config, random_published_state_dict(config, seed=0))
    return tmp_path


def _edit_weights(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(bf16_folder):
    _edit_weights(bf16_folder, lambda t: t.pop("model.layers.1.feed_forward.experts.down_proj"))
    with pytest.raises(ValueError, match=r"missing tensors: \[.model.layers.1.feed_forward.routed_experts.down_proj.\]"):
        AutoModelForCausalLM.from_pretrained(bf16_folder)


def test_extra_tensor_is_named(bf16_folder):
    _edit_weights(bf16_folder, lambda t: t.update({"model.layers.0.feed_forward.surprise": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unexpected tensors: \['model.layers.0.feed_forward.surprise'\]"):
        AutoModelForCausalLM.from_pretrained(bf16_folder)


def test_misshaped_tensor_is_named(bf16_folder):
    def shrink(tensors):
        tensors["model.layers.0.feed_forward.router.weight"] = tensors["model.layers.0.feed_forward.router.weight"][:-1]

    _edit_weights(bf16_folder, shrink)
    with pytest.raises(ValueError, match=r"model.layers.0.feed_forward.router.weight \(checkpoint \(7, 64\) vs model \(8, 64\)\)"):
        AutoModelForCausalLM.from_pretrained(bf16_folder)


def test_corrupt_weights_file_fails(bf16_folder):
    (bf16_folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(Exception, match="(?i)safetensor|header|deserializ"):
        AutoModelForCausalLM.from_pretrained(bf16_folder)


def test_pickle_checkpoints_are_not_loaded(bf16_folder):
    (bf16_folder / "model.safetensors").unlink()
    torch.save({}, bf16_folder / "pytorch_model.bin")
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(bf16_folder, use_safetensors=True)


def test_unknown_quantization_format_is_rejected(bf16_folder):
    config = json.loads((bf16_folder / "config.json").read_text())
    config["quantization"] = {"format": "mobilemoe-int3-g64"}
    (bf16_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match=r"quantization.format.*mobilemoe-int3-g64.*mobilemoe-int4-g32"):
        AutoConfig.from_pretrained(bf16_folder)


def test_packed_tensor_with_wrong_scale_shape_is_named(tmp_path):
    config = tiny_published_config()
    write_published_checkpoint(tmp_path, config, random_published_state_dict(config, seed=0), int4=True)

    def bad_scale(tensors):
        key = "model.layers.0.self_attn.q_proj.weight_scale"
        tensors[key] = tensors[key][:, :1].contiguous()

    _edit_weights(tmp_path, bad_scale)
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
