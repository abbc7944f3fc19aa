"""Self-tests of the independent reference (tests/reference_mobilemoe.py).

They check the reference against hand computations and invariants that need no package code,
so that the package tests built on it compare against something known to be right.
"""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference_mobilemoe as ref  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    config = ref.tiny_published_config()
    return config, ref.random_published_state_dict(config, seed=0)


# ------------------------------------------------------------------ INT4 format


def test_nibble_layout_low_first():
    assert ref.pack_nibbles(torch.tensor([1, -2])).tolist() == [0xE1]
    assert ref.pack_nibbles(torch.tensor([-8, 7])).tolist() == [0x78]
    assert ref.pack_nibbles(torch.tensor([-1, 0])).tolist() == [0x0F]
    q = torch.arange(-8, 8).repeat(3)
    assert torch.equal(ref.unpack_nibbles(ref.pack_nibbles(q)), q.to(torch.int8))


def test_pack_int4_hand_example():
    # amax 7 * 0.5 -> scale exactly 0.5; values are q * 0.5.
    q = torch.zeros(32)
    q[:4] = torch.tensor([7, -7, 1, -2])
    qweight, scale = ref.pack_int4(q * 0.5)
    assert qweight.dtype == torch.uint8 and scale.dtype == torch.float16
    assert qweight.shape == (16,) and scale.shape == (1,)
    assert scale.item() == 0.5
    assert qweight[:2].tolist() == [0x97, 0xE1]  # (7, -7) -> 0x97; (1, -2) -> 0xE1
    assert qweight[2:].tolist() == [0] * 14


def test_pack_unpack_exact_on_representable_values():
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-7, 8, (6, 4, 96), generator=gen).float()
    q.view(6, 4, 3, 32)[..., 5] = 7.0  # force amax = 7 * scale in every group
    scale = (2.0 ** torch.randint(-12, 2, (6, 4, 3, 1), generator=gen).float()) * 1.25  # fp16-exact
    w = (q.view(6, 4, 3, 32) * scale).view(6, 4, 96)
    qweight, s = ref.pack_int4(w)
    assert qweight.shape == (6, 4, 48) and s.shape == (6, 4, 3)
    assert torch.equal(s.float(), scale[..., 0])
    assert torch.equal(ref.unpack_int4(qweight, s), w)


def test_pack_unpack_error_bounded_by_half_scale():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 128, generator=gen) * 0.05
    w[3, :32] = 0.0  # an all-zero group must not produce NaN
    qweight, scale = ref.pack_int4(w)
    deq = ref.unpack_int4(qweight, scale)
    assert deq.dtype == torch.float32 and deq.shape == w.shape
    assert torch.all(deq[3, :32] == 0) and torch.isfinite(deq).all()
    bound = scale.float().repeat_interleave(32, dim=-1) / 2
    assert torch.all((deq - w).abs() <= bound * (1 + 1e-6))
    # dequantising what was packed and packing again is a fixed point
    q2, s2 = ref.pack_int4(deq)
    assert torch.equal(q2, qweight) and torch.equal(s2, scale)


def test_pack_rejects_bad_group_dim():
    with pytest.raises(ValueError):
        ref.pack_int4(torch.randn(4, 48))


# ------------------------------------------------------------------ RoPE


def test_llama3_scaling_matches_hand_computation():
    theta, d = 500000.0, 16
    inv = [theta ** (-2 * i / d) for i in range(d // 2)]
    wavelens = [2 * math.pi / f for f in inv]

    # MobileMoE-style: low == high -> no smooth band (old ctx 64 cuts between i=1 and i=2).
    got = ref.rope_inv_freq(ref.tiny_published_config())
    assert wavelens[1] < 64 < wavelens[2]
    assert got[0].item() == pytest.approx(inv[0], rel=1e-14)  # wavelen 6.28: kept
    assert got[1].item() == pytest.approx(inv[1], rel=1e-14)  # wavelen 32.4: kept
    assert got[2].item() == pytest.approx(inv[2] / 16, rel=1e-14)  # wavelen 167: divided
    assert got[7].item() == pytest.approx(inv[7] / 16, rel=1e-14)
    assert torch.isfinite(got).all()

    # With a real band (low 1, high 4 -> wavelens 64 and 16): i=1 (32.4) is smoothed.
    got = ref.llama3_scaled_inv_freq(torch.tensor(inv, dtype=torch.float64), 16.0, 64, 1.0, 4.0)
    smooth = (64 / wavelens[1] - 1.0) / (4.0 - 1.0)
    assert 0 < smooth < 1
    assert got[0].item() == pytest.approx(inv[0], rel=1e-14)
    assert got[1].item() == pytest.approx((1 - smooth) * inv[1] / 16 + smooth * inv[1], rel=1e-14)
    assert got[2].item() == pytest.approx(inv[2] / 16, rel=1e-14)

    # No rope_scaling -> plain frequencies.
    plain = ref.rope_inv_freq(ref.tiny_published_config(rope_scaling=None))
    assert torch.allclose(plain, torch.tensor(inv, dtype=torch.float64), rtol=1e-14)


def test_rotate_half_convention():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert ref.rotate_half(x).tolist() == [-3.0, -4.0, 1.0, 2.0]
    # position p rotates the pair (x_i, x_{i+d/2}) by p * inv_freq_i
    inv = torch.tensor([0.5, 0.25], dtype=torch.float64)
    out = ref.apply_rope(x.view(1, 1, 1, 4), torch.tensor([[3]]), inv).flatten()
    a0, a1 = 1.5, 0.75
    expected = [
        1 * math.cos(a0) - 3 * math.sin(a0),
        2 * math.cos(a1) - 4 * math.sin(a1),
        3 * math.cos(a0) + 1 * math.sin(a0),
        4 * math.cos(a1) + 2 * math.sin(a1),
    ]
    assert out.tolist() == pytest.approx(expected, rel=1e-14)


# ------------------------------------------------------------------ routing


def test_route_bias_chooses_but_does_not_weight():
    s = torch.tensor([[0.9, 0.8, 0.7, 0.6]], dtype=torch.float64)
    logits = torch.log(s / (1 - s))  # sigmoid(logits) == s
    idx, w = ref.route(logits, None, 2, 2.5, True)
    assert idx.tolist() == [[0, 1]]
    assert w[0].tolist() == pytest.approx([0.9 / 1.7 * 2.5, 0.8 / 1.7 * 2.5])

    bias = torch.tensor([0.0, 0.0, 0.0, 0.25], dtype=torch.float64)  # 0.6 + 0.25 = 0.85 beats 0.8
    idx, w = ref.route(logits, bias, 2, 2.5, True)
    assert idx.tolist() == [[0, 3]]
    # weights use the unbiased scores of the chosen experts
    assert w[0].tolist() == pytest.approx([0.9 / 1.5 * 2.5, 0.6 / 1.5 * 2.5])

    idx, w = ref.route(logits, bias, 2, 2.5, False)
    assert idx.tolist() == [[0, 3]]
    assert w[0].tolist() == pytest.approx([0.9 * 2.5, 0.6 * 2.5])


def test_random_weights_make_bias_matter(tiny):
    config, sd = tiny
    x = torch.randn(64, config["hidden_size"], generator=torch.Generator().manual_seed(3))
    logits = x @ sd["model.layers.0.feed_forward.router.weight"].T
    bias = sd["model.layers.0.feed_forward.expert_bias"]
    assert torch.all(bias.abs() >= 0.009) and torch.all(bias.abs() <= 0.1)
    with_bias, _ = ref.route(logits, bias, 2, 2.5, True)
    without, _ = ref.route(logits, None, 2, 2.5, True)
    changed = (with_bias.sort(-1).values != without.sort(-1).values).any(-1)
    assert 0 < changed.sum() < 64


def test_moe_loop_matches_dense_formulation(tiny):
    """The per-token loop equals an all-experts computation with a scattered weight matrix."""
    config, sd = tiny
    sd = {k: v.double() for k, v in sd.items()}
    ff = "model.layers.1.feed_forward."
    p = {
        "router": sd[ff + "router.weight"], "expert_bias": sd[ff + "expert_bias"],
        "gate_up_proj": sd[ff + "experts.gate_up_proj"], "down_proj": sd[ff + "experts.down_proj"],
        "shared_gate": sd[ff + "shared_expert.gate_proj.weight"],
        "shared_up": sd[ff + "shared_expert.up_proj.weight"],
        "shared_down": sd[ff + "shared_expert.down_proj.weight"],
    }
    x = torch.randn(2, 5, config["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    got = ref.moe_block(x, p, config)

    t = x.reshape(-1, config["hidden_size"])
    s = (t @ p["router"].T).sigmoid()
    idx = (s + p["expert_bias"]).topk(2, dim=-1).indices
    dense_w = torch.zeros_like(s).scatter(-1, idx, s.gather(-1, idx))
    dense_w = dense_w / dense_w.sum(-1, keepdim=True) * 2.5
    gate, up = torch.einsum("nh,ehf->enf", t, p["gate_up_proj"]).chunk(2, dim=-1)
    per_expert = torch.einsum("eni,eih->enh", F.silu(gate) * up, p["down_proj"])
    routed = torch.einsum("ne,enh->nh", dense_w, per_expert)
    shared = (F.silu(t @ p["shared_gate"].T) * (t @ p["shared_up"].T)) @ p["shared_down"].T
    assert torch.allclose(got.reshape(-1, config["hidden_size"]), routed + shared, atol=1e-12)


# ------------------------------------------------------------------ attention / forward


def test_attention_matches_torch_sdpa(tiny):
    config, sd = tiny
    sd = {k: v.double() for k, v in sd.items()}
    params = {n: sd[f"model.layers.0.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    B, T, hd = 2, 7, config["head_dim"]
    x = torch.randn(B, T, config["hidden_size"], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pos = torch.arange(T).expand(B, T)
    got = ref.attention(x, params, config, 0, pos, torch.ones(B, T, dtype=torch.bool))

    inv = ref.rope_inv_freq(config)
    q = (x @ params["q_proj"].T).view(B, T, 4, hd).transpose(1, 2)
    k = (x @ params["k_proj"].T).view(B, T, 2, hd).transpose(1, 2)
    v = (x @ params["v_proj"].T).view(B, T, 2, hd).transpose(1, 2)
    q = F.rms_norm(ref.apply_rope(q, pos, inv), (hd,), eps=config["rms_norm_eps"])
    k = F.rms_norm(ref.apply_rope(k, pos, inv), (hd,), eps=config["rms_norm_eps"])
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    expected = o.transpose(1, 2).reshape(B, T, -1) @ params["o_proj"].T
    assert torch.allclose(got, expected, atol=1e-12)


def test_forward_shape_and_causality(tiny):
    config, sd = tiny
    gen = torch.Generator().manual_seed(6)
    ids = torch.randint(3, config["vocab_size"], (2, 9), generator=gen)
    logits = ref.reference_forward(sd, config, ids)
    assert logits.shape == (2, 9, config["vocab_size"]) and logits.dtype == torch.float64
    assert torch.isfinite(logits).all() and logits.std() > 0.3

    changed = ids.clone()
    changed[:, 5:] = torch.randint(3, config["vocab_size"], (2, 4), generator=gen)
    logits2 = ref.reference_forward(sd, config, changed)
    assert torch.allclose(logits[:, :5], logits2[:, :5], atol=1e-10)
    assert not torch.allclose(logits[:, 5:], logits2[:, 5:], atol=1e-3)


def test_left_padding_matches_unpadded(tiny):
    config, sd = tiny
    gen = torch.Generator().manual_seed(7)
    long_ids = torch.randint(3, config["vocab_size"], (1, 8), generator=gen)
    short_ids = torch.randint(3, config["vocab_size"], (1, 5), generator=gen)
    pad = config["pad_token_id"]
    batch = torch.cat([long_ids, torch.cat([torch.full((1, 3), pad), short_ids], dim=1)])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])

    padded = ref.reference_forward(sd, config, batch, attention_mask=mask)
    assert torch.isfinite(padded).all()
    assert torch.allclose(padded[0], ref.reference_forward(sd, config, long_ids)[0], atol=1e-10)
    assert torch.allclose(padded[1, 3:], ref.reference_forward(sd, config, short_ids)[0], atol=1e-10)
    # positions count only real tokens
    assert ref.position_ids_from_mask(mask)[1].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]


def test_dense_layers_and_plain_rope_run():
    config = ref.tiny_published_config(num_hidden_layers=4, interleave_moe_layer_step=2, rope_scaling=None,
                                       use_qk_norm=False)
    assert [ref.is_moe_layer(config, i) for i in range(4)] == [False, True, False, True]
    assert len(config["no_rope_layers"]) == 4 and len(config["layer_types"]) == 4
    sd = ref.random_published_state_dict(config, seed=1, dtype=torch.float32)
    assert "model.layers.0.feed_forward.gate_proj.weight" in sd
    assert "model.layers.0.feed_forward.router.weight" not in sd
    logits = ref.reference_forward(sd, config, torch.tensor([[1, 5, 9, 13]]))
    assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()


# ------------------------------------------------------------------ checkpoints


def test_random_state_dict_layout(tiny):
    config, sd = tiny
    assert set(sd) == set(ref.published_shapes(config))
    assert "lm_head.weight" not in sd
    assert sd["model.layers.0.feed_forward.experts.gate_up_proj"].shape == (8, 64, 64)
    assert sd["model.layers.0.feed_forward.experts.down_proj"].shape == (8, 32, 64)
    assert sd["model.layers.0.feed_forward.router.weight"].dtype == torch.float32
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    again = ref.random_published_state_dict(config, seed=0)
    assert all(torch.equal(sd[k], again[k]) for k in sd)


def test_bf16_checkpoint_round_trip(tiny, tmp_path):
    config, sd = tiny
    ref.write_published_checkpoint(tmp_path, config, sd)
    assert json.loads((tmp_path / "config.json").read_text()) == config
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    back = ref.dequantized_state_dict(tmp_path)
    assert set(back) == set(sd)
    assert all(back[k].dtype == torch.float32 and torch.equal(back[k], sd[k].float()) for k in sd)


def test_int4_checkpoint_layout_and_round_trip(tiny, tmp_path):
    config, sd = tiny
    ref.write_published_checkpoint(tmp_path, config, sd, int4=True)
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["quantization"] == {
        "format": "mobilemoe-int4-g32", "group_size": 32, "embedding_group_size": 32, "qmin": -8,
        "qmax": 7, "symmetric": True, "packed": True, "scale_dtype": "float16",
        "linear_group_axis": "in (last dim of [out, in])",
        "expert_group_axis": "out (last dim of [E, in, out])",
    }
    assert "quantization" not in config  # the caller's dict is untouched

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        t = {k: f.get_tensor(k) for k in f.keys()}
    ff = "model.layers.0.feed_forward."
    expected = {
        "model.embed_tokens.qweight": ((128, 32), torch.uint8),
        "model.embed_tokens.weight_scale": ((128, 2), torch.float16),
        "model.layers.0.self_attn.q_proj.qweight": ((64, 32), torch.uint8),
        "model.layers.0.self_attn.k_proj.weight_scale": ((32, 2), torch.float16),
        ff + "experts.gate_up_qweight": ((8, 64, 32), torch.uint8),
        ff + "experts.gate_up_scale": ((8, 64, 2), torch.float16),
        ff + "experts.down_qweight": ((8, 32, 32), torch.uint8),
        ff + "experts.down_scale": ((8, 32, 2), torch.float16),
        ff + "shared_expert.down_proj.qweight": ((64, 32), torch.uint8),
        ff + "router.weight": ((8, 64), torch.float32),
        ff + "expert_bias": ((8,), torch.float32),
        "model.norm.weight": ((64,), torch.bfloat16),
        "model.layers.1.input_layernorm.weight": ((64,), torch.bfloat16),
    }
    for key, (shape, dtype) in expected.items():
        assert tuple(t[key].shape) == shape and t[key].dtype == dtype, key
    assert not any(k.endswith(("_proj.weight", "embed_tokens.weight", "experts.gate_up_proj")) for k in t)

    back = ref.dequantized_state_dict(tmp_path)
    assert set(back) == set(sd)
    q, s = ref.pack_int4(sd[ff + "experts.gate_up_proj"])
    assert torch.equal(back[ff + "experts.gate_up_proj"], ref.unpack_int4(q, s))
    for k in sd:
        err = (back[k] - sd[k].float()).abs().max()
        assert err <= sd[k].float().abs().max() / 14 * 1.01, k  # <= scale/2 with scale <= amax/7

    # INT4 of random Gaussian weights is coarse (and routing is discontinuous), so the quantized
    # model only roughly follows the bf16 one: check the logits still point the same way.
    ids = torch.tensor([[1, 7, 3, 99, 42, 5, 8, 9]])
    a, b = ref.reference_forward(sd, config, ids), ref.reference_forward(back, config, ids)
    assert F.cosine_similarity(a, b, dim=-1).mean() > 0.6


def test_dequantize_rejects_packed_without_quantization_block(tiny, tmp_path):
    config, sd = tiny
    ref.write_published_checkpoint(tmp_path, config, sd, int4=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError):
        ref.dequantized_state_dict(tmp_path)
