"""Preparing a MobileMoE model for QAT, and converting it to the packed INT4 checkpoint format.

Linears become torchao's `FakeQuantizedLinear` (INT8 per-token activation fake-quantizer from torchao, our INT4
weight fake-quantizer), the embedding torchao's `FakeQuantizedEmbedding`; the 3-D experts, which torchao's
`quantize_` skips (about 85% of MobileMoE's weights), get the same treatment through `FakeQuantizedExperts`. Weights
are fake-quantized once per forward (per layer), not per token, so every experts kernel keeps working.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear, IntxFakeQuantizeConfig
from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

from ..configuration_mobilemoe import INT4_FORMAT_FIELDS
from ..modeling_mobilemoe import MobileMoEExperts, MobileMoETopkRouter
from .config import MobileMoEQATConfig
from .int4 import Int4WeightFakeQuantizer, pack_int4, quantize_int4


def activation_fake_quantizer(config: MobileMoEQATConfig) -> nn.Module | None:
    """INT8 dynamic per-token asymmetric activations (torchao), as XNNPACK's 8da4w kernels quantize them."""
    if config.activation_bits is None:
        return None
    return IntxFakeQuantizer(IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False))


class FakeQuantizedExperts(MobileMoEExperts):
    """Routed experts whose `gate_up_proj`/`down_proj` read as their INT4 values (straight-through gradients) while
    the parameters, their names and the state dict stay those of `MobileMoEExperts`; expert inputs and the SwiGLU
    hidden state go through `activation_fake_quantizer` (the experts kernels apply it when present)."""

    @property
    def gate_up_proj(self) -> torch.Tensor:
        return self.weight_fake_quantizer(self._parameters["gate_up_proj"])

    @property
    def down_proj(self) -> torch.Tensor:
        return self.weight_fake_quantizer(self._parameters["down_proj"])

    @classmethod
    def from_experts(cls, experts: MobileMoEExperts, config: MobileMoEQATConfig) -> FakeQuantizedExperts:
        experts.__class__ = cls  # same parameters and buffers, read through the fake-quantizer
        # Experts are stored [E, out, in] and grouped along `out`, as the packed format stores them ([E, in, out]).
        experts.weight_fake_quantizer = Int4WeightFakeQuantizer(config.group_size, transpose=True)
        experts.activation_fake_quantizer = activation_fake_quantizer(config)
        return experts


def _kept_in_high_precision(name: str, module: nn.Module, config: MobileMoEQATConfig) -> bool:
    return isinstance(module, MobileMoETopkRouter) or any(
        name == kept or name.endswith(f".{kept}") for kept in config.modules_to_not_convert
    )


def _check_groups(name: str, size: int, group_size: int, field: str) -> None:
    if size % group_size:
        raise ValueError(f"{field}: {group_size} does not divide {name}'s grouped dimension ({size}).")


def prepare_qat(model: nn.Module, config: MobileMoEQATConfig) -> nn.Module:
    """Swaps the model's linears, embedding and experts for fake-quantized ones, in place (also on the meta device,
    before weights are loaded). The router, norms and `expert_bias` are left alone."""
    replacements = {}
    for name, module in model.named_modules():
        if _kept_in_high_precision(name, module, config):
            continue
        if isinstance(module, nn.Linear) and not isinstance(module, FakeQuantizedLinear):
            _check_groups(name, module.in_features, config.group_size, "group_size")
            linear = FakeQuantizedLinear.from_linear(module, activation_config=None, weight_config=None)
            linear.activation_fake_quantizer = activation_fake_quantizer(config)
            linear.weight_fake_quantizer = Int4WeightFakeQuantizer(config.group_size)
            replacements[name] = linear
        elif isinstance(module, nn.Embedding) and not isinstance(module, FakeQuantizedEmbedding):
            _check_groups(name, module.embedding_dim, config.embedding_group_size, "embedding_group_size")
            embedding = FakeQuantizedEmbedding(
                module.num_embeddings, module.embedding_dim, module.padding_idx, device=module.weight.device,
                dtype=module.weight.dtype,
            )  # fmt: skip
            embedding.weight = module.weight
            embedding.weight_fake_quantizer = Int4WeightFakeQuantizer(config.embedding_group_size)
            replacements[name] = embedding
        elif isinstance(module, MobileMoEExperts) and not isinstance(module, FakeQuantizedExperts):
            _check_groups(name, 2 * module.intermediate_dim, config.group_size, "group_size")
            _check_groups(name, module.hidden_dim, config.group_size, "group_size")
            FakeQuantizedExperts.from_experts(module, config)
    for name, replacement in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


@torch.no_grad()
def convert_to_int4(model: nn.Module) -> nn.Module:
    """Puts every fake-quantized weight on its INT4 grid (`q * scale`) and marks the model converted: its config gets
    the published `quantization` block and it saves in the packed `mobilemoe-int4-g32` layout. Its outputs don't
    change (quantizing INT4 values again is exact), so a reload of the saved folder matches it. Without training
    first, this is post-training quantization (PTQ) in the same format. Converting twice changes nothing."""
    quantization_config = getattr(model.config, "quantization_config", None)
    if not isinstance(quantization_config, MobileMoEQATConfig):
        raise ValueError(
            "convert_to_int4: the model has no MobileMoEQATConfig; load it with "
            "`from_pretrained(..., quantization_config=MobileMoEQATConfig())` first."
        )
    for module in model.modules():
        if isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding)) and module.weight_fake_quantizer:
            module.weight.copy_(module.weight_fake_quantizer(module.weight))
        elif isinstance(module, FakeQuantizedExperts):
            for name in ("gate_up_proj", "down_proj"):
                module._parameters[name].copy_(getattr(module, name))
    quantization_config.converted = True
    model.config.quantization = dict(INT4_FORMAT_FIELDS)
    return model


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The converted model's state dict in the published packed layout: `X.qweight`/`X.weight_scale` for linears and
    the embedding, `feed_forward.experts.{gate_up,down}_{qweight,scale}` (`[E, in, out]`) for experts, the rest as
    it is."""
    tied_head = model.get_output_embeddings() if model.config.tie_word_embeddings else None
    state_dict = dict(model.state_dict())
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, (FakeQuantizedLinear, FakeQuantizedEmbedding)) and module.weight_fake_quantizer:
            weight = state_dict.pop(f"{prefix}weight")
            if module is tied_head:  # the embedding carries it
                continue
            group_size = module.weight_fake_quantizer.group_size
            q, scale = quantize_int4(weight, group_size)
            state_dict[f"{prefix}qweight"], state_dict[f"{prefix}weight_scale"] = pack_int4(q), scale
        elif isinstance(module, FakeQuantizedExperts):
            published_prefix = prefix.replace(".routed_experts.", ".experts.")
            for short in ("gate_up", "down"):
                weight = state_dict.pop(f"{prefix}{short}_proj").transpose(1, 2)  # [E, in, out]
                q, scale = quantize_int4(weight, module.weight_fake_quantizer.group_size)
                state_dict[f"{published_prefix}{short}_qweight"] = pack_int4(q).contiguous()
                state_dict[f"{published_prefix}{short}_scale"] = scale.contiguous()
    return state_dict
