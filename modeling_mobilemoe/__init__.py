"""MobileMoE for Hugging Face Transformers.

Importing this package registers the `mobilemoe` model type with the Auto classes, so
`AutoConfig/AutoModel/AutoModelForCausalLM.from_pretrained(...)` work without `trust_remote_code`. Everything this
package saves also carries the model files and an `auto_map`, so it loads with `trust_remote_code=True` where the
package is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

from . import kernels  # CPU decode kernels, installed on every MobileMoE model (see its docstring)
from .configuration_mobilemoe import MobileMoEConfig
from .modeling_mobilemoe import MobileMoEForCausalLM, MobileMoEModel, MobileMoEPreTrainedModel
from .quantization import MobileMoEQATConfig  # registers the `mobilemoe_qat` quantization config and quantizer
from .tokenization_mobilemoe import MobileMoETokenizer


__version__ = "0.1.0"

AutoConfig.register(MobileMoEConfig.model_type, MobileMoEConfig, exist_ok=True)
AutoModel.register(MobileMoEConfig, MobileMoEModel, exist_ok=True)
AutoModelForCausalLM.register(MobileMoEConfig, MobileMoEForCausalLM, exist_ok=True)
AutoTokenizer.register(MobileMoEConfig, tokenizer_class=MobileMoETokenizer, exist_ok=True)

# Saved folders carry these files and an `auto_map` in config.json (remote code for Hub users).
MobileMoEConfig.register_for_auto_class()
MobileMoEModel.register_for_auto_class("AutoModel")
MobileMoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")
MobileMoETokenizer.register_for_auto_class("AutoTokenizer")

__all__ = [
    "MobileMoEConfig",
    "MobileMoEForCausalLM",
    "MobileMoEModel",
    "MobileMoEPreTrainedModel",
    "MobileMoEQATConfig",
    "MobileMoETokenizer",
]
