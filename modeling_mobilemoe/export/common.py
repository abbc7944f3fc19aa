"""What both exporters share: the model they export, its INT4 form, the export folder, and greedy runs to check it."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..configuration_mobilemoe import INT4_FORMAT_FIELDS
from ..modeling_mobilemoe import MobileMoEExperts
from .packed import PUBLISHED_INT4_ATTRIBUTE, read_published_int4

QUANTIZE_CHOICES = ("none", "8da4w")
EXPORT_CONFIG_NAME = "export_config.json"


@dataclass
class ExportConfig:
    """What an export folder holds, written next to the program as `export_config.json`."""

    format: str
    quantize: str
    max_seq_len: int
    max_batch: int
    target: str
    program: str
    experts: str  # "float", "packed" (the published INT4 tensors) or "qmoe" (ONNX Runtime's fused op)
    max_chunk: int | None = None  # most tokens one call takes (ExecuTorch); None: any length

    def save(self, folder: Path) -> None:
        (folder / EXPORT_CONFIG_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ExportConfig:
        path = Path(folder) / EXPORT_CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"{folder} is not an export folder: it has no {EXPORT_CONFIG_NAME}.")
        return cls(**json.loads(path.read_text()))


def check_options(config, quantize: str, max_seq_len: int | None, max_batch: int) -> int:
    """Validates the options every exporter takes; returns the max sequence length (default: the model's)."""
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize: {quantize!r} is not one of {list(QUANTIZE_CHOICES)}.")
    max_seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
    if not 2 <= max_seq_len <= config.max_position_embeddings:
        raise ValueError(
            f"max_seq_len: {max_seq_len} must be between 2 and the model's max_position_embeddings "
            f"({config.max_position_embeddings})."
        )
    if max_batch < 1:
        raise ValueError(f"max_batch: {max_batch} must be at least 1.")
    return max_seq_len


def _strip_fake_quantization(model: PreTrainedModel) -> None:
    """A QAT model (or a reloaded converted one) exports from plain modules holding its INT4 grid values: those
    quantize back to the same bytes (the INT4 rule is idempotent), so the export re-quantizes nothing."""
    if getattr(model, "hf_quantizer", None) is None:
        return
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    from ..quantization.qat import FakeQuantizedExperts, convert_to_int4

    convert_to_int4(model)  # weights onto their grid; a no-op for a converted model
    replacements = {}
    for name, module in model.named_modules():
        if isinstance(module, FakeQuantizedLinear):
            replacements[name] = module.to_linear()
        elif isinstance(module, FakeQuantizedEmbedding):
            replacements[name] = module.to_embedding()
        elif isinstance(module, FakeQuantizedExperts):
            module.__class__ = MobileMoEExperts
            del module.weight_fake_quantizer, module.activation_fake_quantizer
    for name, replacement in replacements.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, replacement)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.quantization_config = None
    model.config.quantization = None  # the export's companion config describes a model, not packed weights
    if model.config.tie_word_embeddings:
        model.tie_weights()


def load_for_export(
    model: str | Path | PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """The model as exporters take it: float32, eval, sdpa attention, the traceable sparse experts (`tiled_mm`).
    Folders load with the Auto classes (bf16, packed INT4 and QAT checkpoints alike), with their tokenizer if any;
    a packed checkpoint's INT4 tensors are kept for the export to carry unchanged."""
    if not isinstance(model, PreTrainedModel):
        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise ValueError(f"model: {folder} is not a model folder (no config.json).")
        if tokenizer is None and any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        if json.loads((folder / "config.json").read_text()).get("quantization"):
            setattr(model, PUBLISHED_INT4_ATTRIBUTE, read_published_int4(folder))  # exported as they are
    _strip_fake_quantization(model)
    model = model.float().eval()
    model.set_attn_implementation("sdpa")
    model.set_experts_implementation("tiled_mm")
    return model, tokenizer


def reference_model(model: str | Path, quantize: str, experts: str = "packed") -> PreTrainedModel:
    """The PyTorch model an export of the folder `model` is checked against: for `8da4w`, the model holding the
    values the export's INT4 tensors hold. A packed checkpoint's weights are its INT4 values already; other weights
    are put on their INT4 grid (linears and the embedding along `in`, experts along `out` as published, or along
    `in` with `experts="qmoe"`, as QMoE groups them)."""
    packed = json.loads((Path(model) / "config.json").read_text()).get("quantization")
    reference = load_for_export(model)[0]
    if quantize == "none":
        return reference
    from ..quantization.int4 import fake_quantize_int4

    group_size = INT4_FORMAT_FIELDS["group_size"]
    with torch.no_grad():
        if not packed:
            for module in reference.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):  # not the router: a plain FP32 parameter
                    module.weight.copy_(fake_quantize_int4(module.weight, group_size))
        for block in reference.moe_blocks():
            for weight in (block.routed_experts.gate_up_proj, block.routed_experts.down_proj):
                if experts == "qmoe":
                    weight.copy_(fake_quantize_int4(weight, group_size))
                elif not packed:
                    weight.copy_(fake_quantize_int4(weight.transpose(1, 2), group_size).transpose(1, 2))
    return reference


def write_companions(
    folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None, export_config: ExportConfig
) -> None:
    """Model config, generation config, tokenizer files and `export_config.json` next to the program."""
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    export_config.save(folder)


def eos_token_ids(config) -> list[int]:
    eos = config.eos_token_id
    return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]


@dataclass
class GreedyResult:
    """Tokens (prompt included) and the logits of every generated position, `[batch, new_tokens, vocab]`."""

    sequences: torch.Tensor
    logits: torch.Tensor


def check_sequence_length(prompt_length: int, max_new_tokens: int, max_seq_len: int) -> None:
    if prompt_length + max_new_tokens > max_seq_len:
        raise ValueError(
            f"max_seq_len: the export holds {max_seq_len} positions, but the prompt ({prompt_length} tokens) plus "
            f"max_new_tokens ({max_new_tokens}) needs {prompt_length + max_new_tokens}; export with a larger "
            f"--max-seq-len."
        )


def greedy_with_pytorch(model: PreTrainedModel, input_ids: torch.Tensor, max_new_tokens: int) -> GreedyResult:
    """The reference the runners are checked against: transformers' `generate`, greedy, KV cache."""
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return GreedyResult(output.sequences, torch.stack(output.logits, dim=1))
