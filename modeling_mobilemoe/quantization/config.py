"""`MobileMoEQATConfig`: MobileMoE quantization-aware training, registered with transformers' quantization registry."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.quantizers.auto import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "mobilemoe_qat"


@register_quantization_config(QUANT_METHOD)
@dataclass
class MobileMoEQATConfig(QuantizationConfigMixin):
    """The paper's QAT stage as a `quantization_config` for `from_pretrained`.

    INT4 symmetric group weights for every linear (grouped along `in`), every expert (grouped along `out`, as the
    packed format stores them) and the embedding / tied LM head; INT8 dynamic per-token asymmetric activations into
    every linear and expert matmul (what XNNPACK's 8da4w kernels compute); the router (FP32), norms and `expert_bias`
    untouched. `modeling_mobilemoe.quantization.convert_to_int4(model)` then turns the trained model into the published
    packed `mobilemoe-int4-g32` checkpoint format.

    Args:
        weight_bits: bits of linear and expert weights (the packed format is INT4: 4).
        group_size: values per scale for linears and experts (32).
        embedding_bits: bits of the embedding (and the tied LM head): 4.
        embedding_group_size: values per scale for the embedding (32).
        activation_bits: 8 for INT8 dynamic per-token activations, `None` for weight-only.
        modules_to_not_convert: names (or name suffixes) of further modules kept in high precision.
        converted: set by `convert_to_int4`: the weights are already INT4 values and save packed.
    """

    weight_bits: int = 4
    group_size: int = 32
    embedding_bits: int = 4
    embedding_group_size: int = 32
    activation_bits: int | None = 8
    modules_to_not_convert: list[str] = field(default_factory=list)
    converted: bool = False
    quant_method: str = QUANT_METHOD

    def __post_init__(self):
        if self.quant_method != QUANT_METHOD:
            raise ValueError(f"quant_method: {self.quant_method!r} is not {QUANT_METHOD!r}.")
        for name in ("weight_bits", "embedding_bits"):
            if getattr(self, name) != 4:
                raise ValueError(
                    f"{name}: only 4 is supported (the packed mobilemoe-int4-g32 format), got {getattr(self, name)}"
                )
        for name in ("group_size", "embedding_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2 or value % 2:
                raise ValueError(f"{name}: must be a positive even number of values per scale, got {value!r}.")
        if self.activation_bits not in (8, None):
            raise ValueError(f"activation_bits: 8 (INT8 dynamic per token) or None, got {self.activation_bits!r}.")
