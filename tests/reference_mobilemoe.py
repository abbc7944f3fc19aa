"""Independent reference implementation of MobileMoE, used by the tests as ground truth.

Written from the model contract (``shared/spec/MOBILEMOE.md``) only, deliberately without
importing ``transformers`` or ``modeling_mobilemoe``: if the package and this file agree, two
independent readings of the spec agree.  Clarity beats speed everywhere (float64, explicit
per-token expert loop); it is only meant for tiny models.

Public API
----------
- :func:`reference_forward` -- logits of a published-layout state dict, float64.
- :func:`route` -- the DeepSeek-V3 style sigmoid router (selection and weights).
- :func:`llama3_scaled_inv_freq` / :func:`rope_inv_freq` -- RoPE frequencies.
- :func:`pack_int4` / :func:`unpack_int4` -- the ``mobilemoe-int4-g32`` weight format.
- :func:`tiny_published_config`, :func:`random_published_state_dict`, :func:`published_shapes`,
  :func:`write_published_checkpoint`, :func:`dequantized_state_dict` -- checkpoint helpers.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

# --------------------------------------------------------------------------------------------
# Config helpers
# --------------------------------------------------------------------------------------------


def _head_dim(config: dict) -> int:
    """``head_dim`` from the config, falling back to hidden / heads when it is absent or null."""
    head_dim = config.get("head_dim")
    if head_dim is None:
        head_dim = config["hidden_size"] // config["num_attention_heads"]
    return int(head_dim)


def is_moe_layer(config: dict, layer_idx: int) -> bool:
    """Layer ``i`` is MoE iff ``(i + 1) % interleave_moe_layer_step == 0`` (Llama-4 convention)."""
    step = int(config.get("interleave_moe_layer_step", 1))
    return (layer_idx + 1) % step == 0


def uses_rope(config: dict, layer_idx: int) -> bool:
    """``no_rope_layers[i] == 1`` means layer ``i`` *uses* RoPE (Llama-4 naming); absent -> all do."""
    no_rope_layers = config.get("no_rope_layers")
    if not no_rope_layers:
        return True
    return bool(no_rope_layers[layer_idx])


# --------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``weight * x * rsqrt(mean(x^2) + eps)`` over the last dim; ``weight=None`` -> no weight (QK-norm)."""
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return normed if weight is None else weight * normed


def llama3_scaled_inv_freq(
    inv_freq: torch.Tensor,
    factor: float,
    original_max_position_embeddings: int,
    low_freq_factor: float,
    high_freq_factor: float,
) -> torch.Tensor:
    """Llama-3.1 RoPE frequency scaling, element by element (a loop, to read like the paper's code).

    wavelen < high_freq_wavelen  -> unchanged (high frequencies keep their resolution)
    wavelen > low_freq_wavelen   -> inv_freq / factor (low frequencies are stretched)
    otherwise                    -> smooth interpolation between the two.

    With ``low_freq_factor == high_freq_factor`` (MobileMoE uses 1 and 1) both wavelengths are
    equal and there is no band in between, so the interpolation's division by
    ``high - low`` must never run.  Exactly on the boundary we use ``inv_freq / factor``, which is
    what the smooth formula gives there in the limit (its numerator ``old_ctx/wavelen - low`` is 0).
    """
    old_ctx = float(original_max_position_embeddings)
    low_freq_wavelen = old_ctx / low_freq_factor
    high_freq_wavelen = old_ctx / high_freq_factor
    out = []
    for freq in inv_freq.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        elif high_freq_factor == low_freq_factor:
            out.append(freq / factor)  # the degenerate boundary case described above
        else:
            smooth = (old_ctx / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return torch.tensor(out, dtype=torch.float64)


def rope_inv_freq(config: dict) -> torch.Tensor:
    """Inverse frequencies ``theta^(-2i/d)`` (float64), llama3-scaled when ``rope_scaling`` says so."""
    head_dim = _head_dim(config)
    theta = float(config["rope_theta"])
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaling = config.get("rope_scaling")
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "llama3":
            inv_freq = llama3_scaled_inv_freq(
                inv_freq,
                factor=float(scaling["factor"]),
                original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
            )
        elif rope_type not in (None, "default"):
            raise NotImplementedError(f"reference only knows llama3 rope scaling, got {rope_type!r}")
    return inv_freq


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``cat(-x2, x1)`` of the two halves of the last dim (transformers' Llama convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [B, heads, T, d]`` by positions ``[B, T]`` (cos/sin of ``cat(freqs, freqs)``)."""
    freqs = position_ids.to(torch.float64)[..., None] * inv_freq  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, d]: same for every head
    return x * emb.cos() + rotate_half(x) * emb.sin()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count real tokens only (``cumsum(mask) - 1``, clamped at 0), as HF generate does
    for left padding, so a padded sequence sees the same positions as the unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    config: dict,
    layer_idx: int,
    position_ids: torch.Tensor,
    key_mask: torch.Tensor,
) -> torch.Tensor:
    """Causal GQA self-attention of one layer; ``params`` holds ``q_proj``..``o_proj`` ([out, in]).

    ``key_mask [B, T]`` (bool) says which key positions are real tokens.
    """
    batch, seq, _ = x.shape
    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    head_dim = _head_dim(config)

    def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # [B, T, n*d] -> [B, n, T, d]
        return t.view(batch, seq, n, head_dim).transpose(1, 2)

    q = heads(x @ params["q_proj"].T, n_heads)
    k = heads(x @ params["k_proj"].T, n_kv)
    v = heads(x @ params["v_proj"].T, n_kv)

    if uses_rope(config, layer_idx):
        inv_freq = rope_inv_freq(config)
        q = apply_rope(q, position_ids, inv_freq)
        k = apply_rope(k, position_ids, inv_freq)
        # QK-norm has no weight and comes AFTER RoPE.  Assumption (Llama-4 convention): a NoPE layer
        # gets no QK-norm either; MobileMoE has RoPE on every layer so this never matters for it.
        if config.get("use_qk_norm", False):
            q = rms_norm(q, None, config["rms_norm_eps"])
            k = rms_norm(k, None, config["rms_norm_eps"])

    # GQA: query head h reads kv head h // (n_heads // n_kv).
    k = k.repeat_interleave(n_heads // n_kv, dim=1)
    v = v.repeat_interleave(n_heads // n_kv, dim=1)

    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)  # [B, heads, T, T]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = causal[None, None] & key_mask[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
    # A padding query with no visible key would give NaN (softmax of all -inf); zero it instead so
    # the NaN cannot leak into real tokens later through 0 * NaN in the next layer's attention.
    probs = torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))

    out = (probs @ v).transpose(1, 2).reshape(batch, seq, n_heads * head_dim)
    return out @ params["o_proj"].T


def route(
    router_logits: torch.Tensor,
    expert_bias: torch.Tensor | None,
    top_k: int,
    routed_scaling_factor: float,
    norm_topk_prob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 style routing: ``(expert indices [N, k], weights [N, k])``.

    ``s = sigmoid(logits)``; selection is ``topk(s + expert_bias)`` -- the bias only *chooses*;
    weights come from the unbiased ``s`` of the chosen experts, normalised to sum 1 (``+1e-20``)
    when ``norm_topk_prob``, and then multiplied by ``routed_scaling_factor``.
    """
    scores = router_logits.sigmoid()
    choice = scores if expert_bias is None else scores + expert_bias
    _, indices = torch.topk(choice, top_k, dim=-1)
    chosen = scores.gather(-1, indices)
    if norm_topk_prob:
        chosen = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
    return indices, chosen * routed_scaling_factor


def swiglu_linear(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``down(silu(gate(x)) * up(x))`` with nn.Linear ``[out, in]`` weights (shared expert, dense FFN)."""
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def routed_expert(x: torch.Tensor, gate_up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """One routed expert, weights stored ``[in, out]``: gate comes first in ``gate_up_proj``."""
    gate, up = (x @ gate_up_proj).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down_proj


def moe_block(x: torch.Tensor, p: dict[str, torch.Tensor], config: dict) -> torch.Tensor:
    """Router + routed experts (explicit per-token loop) + ungated shared expert."""
    shape = x.shape
    tokens = x.reshape(-1, shape[-1])
    indices, weights = route(
        tokens @ p["router"].T,
        p.get("expert_bias"),
        config["num_experts_per_tok"],
        config.get("routed_scaling_factor", 1.0),
        config.get("norm_topk_prob", True),
    )
    routed = torch.zeros_like(tokens)
    for n in range(tokens.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[n, j])
            routed[n] += weights[n, j] * routed_expert(tokens[n], p["gate_up_proj"][e], p["down_proj"][e])
    shared = swiglu_linear(tokens, p["shared_gate"], p["shared_up"], p["shared_down"])
    return (routed + shared).reshape(shape)


def reference_forward(
    state_dict: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.LongTensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits ``[B, T, V]`` (float64) of a published-layout (dense) state dict.

    ``attention_mask [B, T]`` of 1/0 (left padding): masked keys are never attended to and
    positions count only real tokens.  Logits at padded positions are meaningless.
    """
    sd = {k: v.detach().to(torch.float64) for k, v in state_dict.items()}
    eps = config["rms_norm_eps"]
    batch, seq = input_ids.shape
    if attention_mask is None:
        key_mask = torch.ones(batch, seq, dtype=torch.bool)
        position_ids = torch.arange(seq).expand(batch, seq)
    else:
        key_mask = attention_mask.bool()
        position_ids = position_ids_from_mask(attention_mask)

    embed = sd["model.embed_tokens.weight"]
    h = embed[input_ids]
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        attn_params = {n: sd[f"{pre}self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        h = h + attention(rms_norm(h, sd[pre + "input_layernorm.weight"], eps), attn_params, config, i, position_ids, key_mask)

        x = rms_norm(h, sd[pre + "post_attention_layernorm.weight"], eps)
        ff = pre + "feed_forward."
        if is_moe_layer(config, i):
            moe_params = {
                "router": sd[ff + "router.weight"],
                "expert_bias": sd.get(ff + "expert_bias"),
                "gate_up_proj": sd[ff + "experts.gate_up_proj"],
                "down_proj": sd[ff + "experts.down_proj"],
                "shared_gate": sd[ff + "shared_expert.gate_proj.weight"],
                "shared_up": sd[ff + "shared_expert.up_proj.weight"],
                "shared_down": sd[ff + "shared_expert.down_proj.weight"],
            }
            h = h + moe_block(x, moe_params, config)
        else:
            h = h + swiglu_linear(x, sd[ff + "gate_proj.weight"], sd[ff + "up_proj.weight"], sd[ff + "down_proj.weight"])

    h = rms_norm(h, sd["model.norm.weight"], eps)
    # Tied embeddings; an explicit lm_head is only honoured when the config unties it.
    head = sd["lm_head.weight"] if (not config.get("tie_word_embeddings", True) and "lm_head.weight" in sd) else embed
    return h @ head.T


# --------------------------------------------------------------------------------------------
# INT4 "mobilemoe-int4-g32"
# --------------------------------------------------------------------------------------------

GROUP_SIZE = 32
QMIN, QMAX = -8, 7
QUANTIZATION_CONFIG = {
    "format": "mobilemoe-int4-g32",
    "group_size": 32,
    "embedding_group_size": 32,
    "qmin": -8,
    "qmax": 7,
    "symmetric": True,
    "packed": True,
    "scale_dtype": "float16",
    "linear_group_axis": "in (last dim of [out, in])",
    "expert_group_axis": "out (last dim of [E, in, out])",
}


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Integers in [-8, 7] -> uint8, two's complement, element 2j in the LOW nibble, 2j+1 in the high."""
    if q.shape[-1] % 2:
        raise ValueError("last dim must be even to pack two int4 values per byte")
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: uint8 ``[..., n]`` -> int8 ``[..., 2n]`` in [-8, 7]."""
    nibbles = torch.stack((packed & 0xF, packed >> 4), dim=-1).to(torch.int16)  # low first
    signed = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return signed.flatten(-2).to(torch.int8)


def pack_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 per group of 32 along the LAST dim -> ``(qweight uint8 [..., n/2], scale fp16 [..., n/32])``.

    ``scale = amax(|w|)/7`` rounded to fp16; ``q = clamp(round(w / scale), -8, 7)`` is computed
    with that fp16 scale so that ``unpack_int4`` reproduces ``q * scale`` exactly.  Rounding is
    ``torch.round`` (half to even) of the quotient computed in float64.  A group whose fp16 scale
    would be 0 (all zeros, or amax below fp16's smallest subnormal * 7) gets scale 1.0: its q are
    then 0 and the error is still <= scale/2.
    """
    n = w.shape[-1]
    if n % GROUP_SIZE:
        raise ValueError(f"last dim {n} is not a multiple of the group size {GROUP_SIZE}")
    groups = w.detach().to(torch.float64).reshape(*w.shape[:-1], n // GROUP_SIZE, GROUP_SIZE)
    amax = groups.abs().amax(dim=-1)
    scale = (amax / QMAX).clamp(max=torch.finfo(torch.float16).max).to(torch.float16)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(groups / scale.to(torch.float64)[..., None]).clamp(QMIN, QMAX)
    return pack_nibbles(q.reshape(w.shape).to(torch.int8)), scale


def unpack_int4(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` as float32, shape ``[..., 2 * qweight.shape[-1]]`` (exact: 4-bit x 11-bit mantissas)."""
    q = unpack_nibbles(qweight)
    n = q.shape[-1]
    if scale.shape[-1] * GROUP_SIZE != n or scale.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"scale {tuple(scale.shape)} does not match qweight {tuple(qweight.shape)}")
    groups = q.to(torch.float32).reshape(*q.shape[:-1], n // GROUP_SIZE, GROUP_SIZE)
    return (groups * scale.to(torch.float32)[..., None]).reshape(q.shape)


# --------------------------------------------------------------------------------------------
# Published checkpoints
# --------------------------------------------------------------------------------------------

# Dense linears (and the embedding) stored [out, in] that the int4 release packs as X.qweight/X.weight_scale.
_PACKED_LINEAR = re.compile(
    r"^(model\.embed_tokens"
    r"|lm_head"
    r"|model\.layers\.\d+\.self_attn\.[qkvo]_proj"
    r"|model\.layers\.\d+\.feed_forward\.shared_expert\.(gate|up|down)_proj"
    r"|model\.layers\.\d+\.feed_forward\.(gate|up|down)_proj)\.weight$"
)
# Expert tensors stored [E, in, out]: published bf16 name -> (int4 qweight name, int4 scale name).
_EXPERT_PACKED = {
    "experts.gate_up_proj": ("experts.gate_up_qweight", "experts.gate_up_scale"),
    "experts.down_proj": ("experts.down_qweight", "experts.down_scale"),
}


def tiny_published_config(**overrides) -> dict:
    """A small, valid config.json dict in the published key set (all INT4 dims multiples of 32).

    Overriding ``num_hidden_layers`` also resizes ``no_rope_layers`` / ``layer_types`` unless those
    are overridden too.  ``original_max_position_embeddings`` is 64 (real: 8192) so the llama3
    scaling actually changes some of the 8 frequencies of head_dim 16.
    """
    config = {
        "model_type": "mobilemoe",
        "architectures": ["MobileMoEForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 32,
        "intermediate_size_mlp": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 128,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 16.0,
            "original_max_position_embeddings": 64,
            "low_freq_factor": 1.0,
            "high_freq_factor": 1.0,
        },
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "interleave_moe_layer_step": 1,
        "use_qk_norm": True,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "attn_temperature_tuning": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "bfloat16",
    }
    config.update(copy.deepcopy(overrides))
    layers = config["num_hidden_layers"]
    config.setdefault("no_rope_layers", [1] * layers)
    config.setdefault("layer_types", ["full_attention"] * layers)
    return config


def published_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the dense published (bf16) layout and its shape."""
    H, V = config["hidden_size"], config["vocab_size"]
    I, I_mlp = config["intermediate_size"], config["intermediate_size_mlp"]
    E, hd = config["num_local_experts"], _head_dim(config)
    nq, nkv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    for i in range(config["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (H,)
        shapes[pre + "post_attention_layernorm.weight"] = (H,)
        shapes[pre + "self_attn.q_proj.weight"] = (nq, H)
        shapes[pre + "self_attn.k_proj.weight"] = (nkv, H)
        shapes[pre + "self_attn.v_proj.weight"] = (nkv, H)
        shapes[pre + "self_attn.o_proj.weight"] = (H, nq)
        ff = pre + "feed_forward."
        if is_moe_layer(config, i):
            shapes[ff + "router.weight"] = (E, H)
            shapes[ff + "expert_bias"] = (E,)
            shapes[ff + "experts.gate_up_proj"] = (E, H, 2 * I)
            shapes[ff + "experts.down_proj"] = (E, I, H)
            shapes[ff + "shared_expert.gate_proj.weight"] = (I_mlp, H)
            shapes[ff + "shared_expert.up_proj.weight"] = (I_mlp, H)
            shapes[ff + "shared_expert.down_proj.weight"] = (H, I_mlp)
        else:
            shapes[ff + "gate_proj.weight"] = (I_mlp, H)
            shapes[ff + "up_proj.weight"] = (I_mlp, H)
            shapes[ff + "down_proj.weight"] = (H, I_mlp)
    if not config.get("tie_word_embeddings", True):
        shapes["lm_head.weight"] = (V, H)
    return shapes


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    """Input width of a matrix: dim -1 for nn.Linear [out, in], dim 1 for experts [E, in, out]."""
    if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
        return shape[1]
    return shape[-1]


def random_published_state_dict(config: dict, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random weights in the published layout, deterministic in ``seed``.

    Matrices use std ``1/sqrt(fan_in)`` (0.125 for hidden 64) rather than 0.02, so that every
    block changes the residual stream by O(1) and a wrong formula anywhere moves the logits far
    beyond float32/bf16 tolerances; the embedding likewise (tied logits then have std ~1).
    The router (float32, as published) gets logits of std ~1, so sigmoid scores really differ;
    ``expert_bias`` (float32, values exactly representable in bf16 so the stored dtype cannot
    matter) is +-U(0.01, 0.1), which flips some top-k selections; norms are 1 +- 0.1.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float32) * std

    sd = {}
    for name, shape in published_shapes(config).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            sd[name] = (1.0 + randn(shape, 0.1)).to(dtype)
        elif name.endswith("router.weight"):
            sd[name] = randn(shape, shape[-1] ** -0.5).to(torch.float32)
        elif name.endswith("expert_bias"):
            magnitude = 0.01 + 0.09 * torch.rand(shape, generator=gen)
            sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
            sd[name] = (sign * magnitude).to(torch.bfloat16).to(torch.float32)
        else:
            sd[name] = randn(shape, _fan_in(name, shape) ** -0.5).to(dtype)
    return sd


def quantize_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense published layout -> packed ``mobilemoe-int4-g32`` layout (router, norms, bias untouched)."""
    out = {}
    for name, tensor in state_dict.items():
        expert_key = next((k for k in _EXPERT_PACKED if name.endswith("feed_forward." + k)), None)
        if _PACKED_LINEAR.match(name):
            module = name[: -len(".weight")]
            out[module + ".qweight"], out[module + ".weight_scale"] = pack_int4(tensor)
        elif expert_key is not None:
            prefix = name[: -len(expert_key)]
            q_name, s_name = _EXPERT_PACKED[expert_key]
            out[prefix + q_name], out[prefix + s_name] = pack_int4(tensor)  # groups along out (last dim)
        else:
            out[name] = tensor
    return out


def write_published_checkpoint(directory, config: dict, state_dict: dict[str, torch.Tensor], int4: bool = False) -> None:
    """Write ``config.json`` + ``model.safetensors`` (metadata ``{"format": "pt"}``) in the published layout.

    bf16 (``int4=False``): tensors are written with the dtypes they have (use
    :func:`random_published_state_dict` for the published ones).  ``int4=True``: every linear, the
    embedding and the experts are packed and the spec's ``quantization`` block is added.
    """
    os.makedirs(directory, exist_ok=True)
    config = copy.deepcopy(config)
    config.pop("quantization", None)
    if int4:
        config["quantization"] = dict(QUANTIZATION_CONFIG)
        state_dict = quantize_state_dict(state_dict)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    # clone: safetensors refuses tensors sharing storage (views of one buffer).
    tensors = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def _load_tensors(directory) -> dict[str, torch.Tensor]:
    """All tensors of a folder: ``model.safetensors`` or the shards of ``model.safetensors.index.json``."""
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(single):
        return load_file(single)
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(os.path.join(directory, shard)))
    return tensors


def dequantized_state_dict(directory) -> dict[str, torch.Tensor]:
    """Read a published folder (bf16 or int4) back as the dense published layout in float32."""
    with open(os.path.join(directory, "config.json")) as f:
        config = json.load(f)
    tensors = _load_tensors(directory)
    packed = any(k.endswith(("qweight", "_scale")) for k in tensors)
    if packed and (config.get("quantization") or {}).get("format") != QUANTIZATION_CONFIG["format"]:
        raise ValueError("packed tensors found but config.json has no mobilemoe-int4-g32 quantization block")

    out = {}
    for name, tensor in tensors.items():
        if name.endswith(".qweight"):
            module = name[: -len(".qweight")]
            out[module + ".weight"] = unpack_int4(tensor, tensors[module + ".weight_scale"])
        elif name.endswith(".weight_scale"):
            continue  # consumed with its qweight
        elif any(name.endswith(q) for q, _ in _EXPERT_PACKED.values()):
            dense_key, (q_name, s_name) = next((d, qs) for d, qs in _EXPERT_PACKED.items() if name.endswith(qs[0]))
            prefix = name[: -len(q_name)]
            out[prefix + dense_key] = unpack_int4(tensor, tensors[prefix + s_name])
        elif any(name.endswith(s) for _, s in _EXPERT_PACKED.values()):
            continue
        else:
            out[name] = tensor.to(torch.float32)
    return out
