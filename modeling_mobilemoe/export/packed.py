"""The INT4 tensors exported programs carry, and the experts and embedding that keep them packed.

Every weight the `mobilemoe-int4-g32` format quantizes gets its published `(qweight, scale)` pair (uint8, two values
per byte, low nibble first; fp16 scales per group of 32 along the last dimension; experts `[E, in, out]`, grouped
along `out`). A model loaded from a packed checkpoint keeps the checkpoint's own pairs, so its export carries them
byte for byte (ExecuTorch's experts and embedding: the same values re-encoded in its nibble order), whatever rule
made them; other weights are quantized with the format's rule (post-training
quantization; idempotent, so a QAT model's weights come back unchanged).

The experts and the embedding read only what a token needs, and dequantize just that: the embedding its rows, the
experts the experts of their tiles (`tiled_mm_experts_forward` calls `gather_weights`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..configuration_mobilemoe import INT4_FORMAT_FIELDS
from ..modeling_mobilemoe import MobileMoEExperts, dequantize_int4, tiled_mm_experts_forward
from ..quantization.int4 import pack_int4, quantize_int4

GROUP_SIZE = INT4_FORMAT_FIELDS["group_size"]
PUBLISHED_INT4_ATTRIBUTE = "_published_int4_tensors"


def read_published_int4(folder: Path) -> dict[str, torch.Tensor]:
    """The packed tensors (`*qweight`, `*scale`) of a checkpoint folder in the packed format."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for file in files:
        with safe_open(folder / file, framework="pt") as reader:
            for key in reader.keys():
                if key.endswith(("qweight", "_scale")):
                    tensors[key] = reader.get_tensor(key)
    return tensors


def int4_pair(model: nn.Module, published_name: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(qweight, scale)` of the weight the checkpoint calls `published_name` (`X.qweight` / `X.weight_scale`
    without the suffix for linears and the embedding, `...experts.gate_up` / `down` for experts); `weight` is
    the dense weight in the published layout, quantized only when the checkpoint has no packed pair for it."""
    published = getattr(model, PUBLISHED_INT4_ATTRIBUTE, {})
    for qweight_key, scale_key in ((f"{published_name}.qweight", f"{published_name}.weight_scale"),
                                   (f"{published_name}_qweight", f"{published_name}_scale")):  # fmt: skip
        if qweight_key in published:
            return published[qweight_key], published[scale_key]
    return packed_int4(weight)


def packed_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` quantized with the format's rule along its last dimension: `(qweight, scale)` as published."""
    q, scale = quantize_int4(weight.detach(), GROUP_SIZE)
    return pack_int4(q).contiguous(), scale.contiguous()


def dequantized(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_int4(qweight, scale, torch.float32)


def _rows(ids: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """`tensor[ids]` for each tensor, as `embedding` lookups: ExecuTorch's portable kernel copies whole rows, its
    generic `index` kernel element by element."""
    return [F.embedding(ids, t.flatten(1)).unflatten(-1, t.shape[1:]) for t in tensors]


class PackedInt4Experts(nn.Module):
    """Routed experts as `gate_up_qweight [E, H, I]` (2I values packed in pairs), `down_qweight [E, I, H/2]` and their
    fp16 scales; runs `tiled_mm_experts_forward`, dequantizing only the experts it gathers."""

    def __init__(self, experts: MobileMoEExperts, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        self.compute_dtype = experts.gate_up_proj.dtype
        for name, (qweight, scale) in pairs.items():
            self.register_buffer(f"{name}_qweight", qweight)
            self.register_buffer(f"{name}_scale", scale)

    def gather_weights(self, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`gate_up [N, 2I, H]`, `down [N, H, I]` (nn.Linear layout, as views) of the listed experts."""
        gate_up = dequantize_int4(*_rows(expert_ids, self.gate_up_qweight, self.gate_up_scale), self.compute_dtype)
        down = dequantize_int4(*_rows(expert_ids, self.down_qweight, self.down_scale), self.compute_dtype)
        return gate_up.transpose(1, 2), down.transpose(1, 2)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return tiled_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)


class PackedInt4Embedding(nn.Module):
    """Token embedding as `qweight [V, H/2]` + `weight_scale [V, H/32]`; a lookup dequantizes only its rows."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("qweight", qweight)
        self.register_buffer("weight_scale", scale)
        self.compute_dtype = dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int4(*_rows(input_ids, self.qweight, self.weight_scale), self.compute_dtype)


def replace_linears(model: nn.Module, make: callable) -> None:
    """Replaces every `nn.Linear` (the FP32 router is not one) by `make(published_name, linear, qweight, scale)`.
    A tied LM head uses the embedding's pair."""
    tied = model.config.tie_word_embeddings
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        published_name = "model.embed_tokens" if tied and name == "lm_head" else name
        qweight, scale = int4_pair(model, published_name, module.weight)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, make(module, qweight, scale))
    model.config.tie_word_embeddings = False  # the head has its own INT4 form now, the embedding keeps its rows


def pack_experts_and_embedding(model: nn.Module) -> nn.Module:
    """Swaps every MoE layer's experts and the embedding for their packed INT4 forms, in place. Call before
    `replace_linears`: a tied LM head must still see the dense embedding weight."""
    if model.config.tie_word_embeddings:  # the head keeps a dense copy until its backend quantizes it
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    backbone = model.get_decoder()
    embedding = backbone.embed_tokens
    qweight, scale = int4_pair(model, "model.embed_tokens", embedding.weight)
    backbone.embed_tokens = PackedInt4Embedding(qweight, scale, embedding.weight.dtype)
    for layer_idx, layer in enumerate(backbone.layers):
        experts = getattr(layer.feed_forward, "routed_experts", None)
        if not isinstance(experts, MobileMoEExperts):  # a dense layer, or experts a backend has taken over
            continue
        prefix = f"model.layers.{layer_idx}.feed_forward.experts"
        pairs = {
            name: int4_pair(model, f"{prefix}.{name}", getattr(experts, f"{name}_proj").transpose(1, 2))
            for name in ("gate_up", "down")
        }
        layer.feed_forward.routed_experts = PackedInt4Experts(experts, pairs)
    return model
