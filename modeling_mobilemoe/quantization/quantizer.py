"""The `HfQuantizer` behind `from_pretrained(..., quantization_config=MobileMoEQATConfig())`."""

from __future__ import annotations

from transformers.quantizers.auto import register_quantizer
from transformers.quantizers.base import HfQuantizer

from ..configuration_mobilemoe import INT4_FORMAT_FIELDS
from .config import QUANT_METHOD, MobileMoEQATConfig


@register_quantizer(QUANT_METHOD)
class MobileMoEQATQuantizer(HfQuantizer):
    """Prepares the model for QAT before its weights load (fake-quantized modules keep the parameter names), and
    saves converted models in the packed INT4 layout. A converted checkpoint carries both the published
    `quantization` block (its weights load anywhere the packed format does) and this config (activation quantization
    too, so a reload computes exactly what the converted model did)."""

    requires_calibration = False

    def __init__(self, quantization_config: MobileMoEQATConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        import torchao  # noqa: F401  (raises a clear ImportError when missing)

    def _process_model_before_weight_loading(self, model, **kwargs):
        if getattr(model.config, "model_type", None) != "mobilemoe":
            raise ValueError(
                f"quantization_config: {QUANT_METHOD} quantizes MobileMoE models, not {model.config.model_type!r}."
            )
        from .qat import prepare_qat

        prepare_qat(model, self.quantization_config)

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self.quantization_config.converted:
            # Loading dequantized the packed weights and marked the model dense; it is still an INT4 model.
            model.config.quantization = dict(INT4_FORMAT_FIELDS)
        return model

    def get_state_dict_and_metadata(self, model):
        if self.quantization_config.converted:
            from .qat import packed_state_dict

            return packed_state_dict(model), {}
        return None, {}

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True
