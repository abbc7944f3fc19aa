"""MobileMoE -> ExecuTorch (.pte, XNNPACK), and a runner for the result.

The program is transformers' `TorchExportableModuleForDecoderOnlyLM` (static KV cache; inputs `input_ids [1, T]`
and `cache_position [T]`, output logits), with one dynamic sequence axis, so it serves prefill and decode as
ExecuTorch's LLM runner calls it, plus the metadata methods that runner and optimum-executorch read. The MoE is the
traceable sparse `tiled_mm` path. `quantize="8da4w"`: linears (and the LM head) become torchao's INT8-dynamic-
activation INT4-weight linears, which XNNPACK runs, holding the published format's INT4 values (see `packed`);
experts and the embedding keep the packed INT4 tensors and dequantize only what a token reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .common import (
    ExportConfig,
    GreedyResult,
    check_options,
    check_sequence_length,
    eos_token_ids,
    load_for_export,
    write_companions,
)
from .packed import GROUP_SIZE, dequantized, pack_experts_and_embedding, replace_linears

PROGRAM_NAME = "model.pte"
TARGETS = ("xnnpack", "arm")


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"target: {target!r} is not one of {list(TARGETS)}.")
    if target == "arm":
        has_kernels = hasattr(torch.ops.torchao, "_pack_8bit_act_4bit_weight")
        reason = (
            "this build has torchao's low-bit kernels, but lowering MobileMoE's experts to the fused op is not "
            "implemented in this package yet"
            if has_kernels
            else "it packs expert weights with torchao's low-bit CPU kernels "
            "(torch.ops.torchao._pack_8bit_act_4bit_weight), which ExecuTorch/torchao wheels ship for aarch64 only "
            "(x86 is off on purpose: the kernels are Arm NEON dot-product code)"
        )
        raise ValueError(
            f"target 'arm' (MoE lowered to ExecuTorch's fused llama::quantized_moe_ffn) is not available here: "
            f"{reason}. Use --target xnnpack (sparse tiled experts, runs on any CPU)."
        )


def _intx_linear(linear: nn.Linear, qweight: torch.Tensor, scale: torch.Tensor) -> nn.Linear:
    """torchao's INT8-dynamic-activation INT4-weight linear (what XNNPACK's 8da4w kernels run) holding exactly the
    pair's values: quantized with the pair's own scales, so `q` comes back as it was."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    scale = scale.float()
    weight = IntxUnpackedToInt8Tensor.from_hp(
        dequantized(qweight, scale),
        (1, GROUP_SIZE),
        torch.int4,
        activation_quantization="int8_asym_per_token",
        intx_choose_qparams_algorithm=None,  # the scales are given
        custom_scale=scale,
        custom_zero_point=torch.zeros_like(scale, dtype=torch.int8),
    )
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def quantize_8da4w(model: PreTrainedModel) -> PreTrainedModel:
    """INT4 group-32 weights everywhere but the FP32 router; INT8 dynamic activations into the linears."""
    pack_experts_and_embedding(model)
    replace_linears(model, _intx_linear)
    return model


def _metadata(model: PreTrainedModel, tokenizer, max_seq_len: int) -> dict:
    """The constant methods ExecuTorch's LLM runner (and optimum-executorch) read."""
    config = model.config
    bos = config.bos_token_id if config.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    metadata = {
        "get_max_seq_len": max_seq_len,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": config.vocab_size,
        "get_n_layers": config.num_hidden_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": False,
        "enable_dynamic_shape": True,
        "get_eos_ids": eos_token_ids(config),
    }
    if bos is not None:
        metadata["get_bos_id"] = bos
    return metadata


def export_executorch(
    model: str | Path | PreTrainedModel,
    output_dir: str | Path,
    *,
    quantize: str = "none",
    max_seq_len: int | None = None,
    max_batch: int = 1,
    target: str = "xnnpack",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Exports a MobileMoE model (a folder or a loaded model) to `output_dir/model.pte` with its tokenizer, config
    and `export_config.json`; returns the .pte path."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    _check_target(target)
    if max_batch != 1:
        raise ValueError(f"max_batch: {max_batch}; the ExecuTorch program serves the LLM runner, batch 1.")
    model, tokenizer = load_for_export(model, tokenizer)
    max_seq_len = check_options(model.config, quantize, max_seq_len, max_batch)
    if quantize == "8da4w":
        quantize_8da4w(model)
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
    )  # fmt: skip
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    example = torch.zeros(1, 2, dtype=torch.long)
    # AUTO: the tile height of the sparse experts is a function of the sequence length (see `tiled_mm`).
    sequence = torch.export.Dim.AUTO(min=1, max=max_seq_len - 1)
    with torch.no_grad():
        program = exportable.export(
            input_ids=example,
            cache_position=torch.arange(2),
            dynamic_shapes={"input_ids": {1: sequence}, "cache_position": {0: sequence}},
        )
    lowered = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=_metadata(model, tokenizer, max_seq_len),
    ).to_executorch()

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROGRAM_NAME).write_bytes(lowered.buffer)
    experts = "packed" if quantize == "8da4w" else "float"
    export_config = ExportConfig("executorch", quantize, max_seq_len, max_batch, target, PROGRAM_NAME, experts)
    write_companions(folder, model, tokenizer, export_config)
    return folder / PROGRAM_NAME


class ExecuTorchRunner:
    """Runs an exported folder with ExecuTorch's Python runtime: prefill in one call, then one call per token."""

    def __init__(self, folder: str | Path):
        from executorch.runtime import Runtime

        self.export_config = ExportConfig.load(folder)
        if self.export_config.format != "executorch":
            raise ValueError(f"{folder} holds a {self.export_config.format!r} export, not an ExecuTorch one.")
        program = Runtime.get().load_program(Path(folder) / self.export_config.program)
        self.method = program.load_method("forward")
        self.metadata = {}
        for name in program.method_names - {"forward"}:
            values = program.load_method(name).execute([])
            self.metadata[name] = values[0] if len(values) == 1 else list(values)

    def forward(self, input_ids: torch.Tensor, start_position: int) -> torch.Tensor:
        """Logits `[1, T, V]` for `input_ids [1, T]` placed at `start_position` in the KV cache."""
        positions = torch.arange(start_position, start_position + input_ids.shape[1])
        return self.method.execute([input_ids, positions])[0]

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> GreedyResult:
        """Greedy decoding of `input_ids [1, T]` with the program's KV cache."""
        if input_ids.ndim != 2 or input_ids.shape[0] != 1:
            raise ValueError(f"input_ids: shape {tuple(input_ids.shape)}; the ExecuTorch program takes batch 1.")
        check_sequence_length(input_ids.shape[1], max_new_tokens, self.export_config.max_seq_len)
        sequences, step_logits = input_ids, []
        logits = self.forward(input_ids, 0)[:, -1]
        for _ in range(max_new_tokens):
            step_logits.append(logits)
            next_token = logits.argmax(-1, keepdim=True)
            sequences = torch.cat([sequences, next_token], dim=1)
            if len(step_logits) < max_new_tokens:
                logits = self.forward(next_token, sequences.shape[1] - 1)[:, -1]
        return GreedyResult(sequences, torch.stack(step_logits, dim=1))
