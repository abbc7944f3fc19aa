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
from transformers.cache_utils import StaticLayer

from .common import (
    ExportConfig,
    GreedyResult,
    check_options,
    check_sequence_length,
    eos_token_ids,
    load_for_export,
    write_companions,
)
from .packed import (
    GROUP_SIZE,
    PackedInt4Embedding,
    PackedInt4Experts,
    dequantized,
    pack_experts_and_embedding,
    replace_linears,
)

PROGRAM_NAME = "model.pte"
TARGETS = ("xnnpack", "arm")
DEFAULT_MAX_CHUNK = 128


def _check_max_chunk(max_chunk: int | None, max_seq_len: int) -> int:
    max_chunk = min(DEFAULT_MAX_CHUNK, max_seq_len - 1) if max_chunk is None else max_chunk
    # torch.export specialises a dimension of size 1, so the call length is dynamic only from 2 tokens on.
    if not 2 <= max_chunk < max_seq_len:
        raise ValueError(
            f"max_chunk: {max_chunk}; the tokens one call takes must be at least 2 and below max_seq_len "
            f"({max_seq_len})."
        )
    return max_chunk


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


def executorch_int4_bytes(qweight: torch.Tensor) -> torch.Tensor:
    """The published bytes (low nibble first, two's complement) as ExecuTorch's `embedding_4bit` reads them (high
    nibble first, offset by 8): the same INT4 values, re-encoded losslessly (flipping bit 3 adds 8 modulo 16)."""
    return (((qweight & 0x0F) << 4) | (qweight >> 4)) ^ 0x88


def _int4_rows(qweight: torch.Tensor, scale: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` of a packed INT4 table `[rows, n/2]`, dequantized in one pass by ExecuTorch's quantized kernel."""
    return torch.ops.quantized_decomposed.embedding_4bit.dtype(qweight, scale, None, -8, 7, ids, dtype=dtype)


class ExecuTorchInt4Embedding(PackedInt4Embedding):
    """The packed INT4 embedding read by ExecuTorch's `embedding_4bit` kernel (ExecuTorch's own INT4 embedding)."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return _int4_rows(self.qweight, self.weight_scale, input_ids, self.compute_dtype)


class ExecuTorchInt4Experts(PackedInt4Experts):
    """Packed INT4 experts whose gathers go through `embedding_4bit`: an expert is `H` rows of its `[E * H, I]`
    table, so a tile's weights are gathered and dequantized by one kernel instead of a chain of portable ops."""

    def gather_weights(self, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = []
        for name in ("gate_up", "down"):
            qweight, scale = getattr(self, f"{name}_qweight"), getattr(self, f"{name}_scale")
            rows_per_expert = qweight.shape[1]
            ids = expert_ids[:, None] * rows_per_expert + torch.arange(rows_per_expert, device=expert_ids.device)
            table = _int4_rows(qweight.flatten(0, 1), scale.flatten(0, 1), ids, self.compute_dtype)
            weights.append(table.transpose(1, 2))  # [N, in, out] -> nn.Linear layout
        return weights[0], weights[1]


def _to_executorch_int4(module: PackedInt4Embedding | PackedInt4Experts) -> None:
    module.__class__ = ExecuTorchInt4Embedding if isinstance(module, PackedInt4Embedding) else ExecuTorchInt4Experts
    for name, buffer in module.named_buffers(recurse=False):
        if name.endswith("qweight"):
            setattr(module, name, executorch_int4_bytes(buffer))


def quantize_8da4w(model: PreTrainedModel) -> PreTrainedModel:
    """INT4 group-32 weights everywhere but the FP32 router; INT8 dynamic activations into the linears; experts and
    embedding packed and read by ExecuTorch's INT4 embedding kernel."""
    import executorch.exir  # noqa: F401  (defines `quantized_decomposed::embedding_4bit` and its eager kernel)

    pack_experts_and_embedding(model)
    for module in list(model.modules()):
        if isinstance(module, (PackedInt4Embedding, PackedInt4Experts)):
            _to_executorch_int4(module)
    replace_linears(model, _intx_linear)
    return model


CUSTOM_SDPA = "executorch_custom_sdpa"


def _custom_sdpa_attention(module, query, key_cache, value_cache, attention_mask, scaling=None, **kwargs):
    """Attention through ExecuTorch's `llama::custom_sdpa`: causal attention of the queries to the cache positions
    before them only (the stock path attends to the whole static cache under a mask, so decode pays for
    `max_seq_len` positions at every step). The cache is `[batch, positions, heads, head_dim]` (`CustomSdpaLayer`)."""
    start_pos = kwargs["position_ids"][0, 0].item()
    output = torch.ops.llama.custom_sdpa(
        query.transpose(1, 2), key_cache, value_cache, start_pos, None, 0.0, True, scaling
    )
    return output, None


def _no_mask(*args, **kwargs) -> None:
    return None  # `custom_sdpa` masks causally itself


class CustomSdpaLayer(StaticLayer):
    """A static cache layer stored `[batch, positions, heads, head_dim]` and written by ExecuTorch's
    `llama::update_cache`: the layout `custom_sdpa` reads in place (the stock layout would need a transposed copy
    of the whole cache per layer and step)."""

    @classmethod
    def from_layer(cls, layer: StaticLayer) -> CustomSdpaLayer:
        layer.__class__ = cls
        layer.keys, layer.values = (t.transpose(1, 2).contiguous() for t in (layer.keys, layer.values))
        return layer

    def update(self, key_states, value_states, *args, **kwargs):
        start_pos = self.cumulative_length.item()
        torch.ops.llama.update_cache(key_states.transpose(1, 2), self.keys, start_pos)
        torch.ops.llama.update_cache(value_states.transpose(1, 2), self.values, start_pos)
        self.cumulative_length.add_(key_states.shape[-2])
        return self.keys, self.values


def _use_custom_sdpa(exportable: nn.Module, model: PreTrainedModel) -> None:
    """Switches the exportable module (transformers' static-cache wrapper) to ExecuTorch's cache layout and SDPA."""
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401  (registers llama::custom_sdpa)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(CUSTOM_SDPA, _custom_sdpa_attention)
    AttentionMaskInterface.register(CUSTOM_SDPA, _no_mask)
    model.set_attn_implementation(CUSTOM_SDPA)
    for index, layer in enumerate(exportable.static_cache.layers):
        CustomSdpaLayer.from_layer(layer)
        exportable.register_buffer(f"key_cache_{index}", layer.keys, persistent=False)
        exportable.register_buffer(f"value_cache_{index}", layer.values, persistent=False)


def _metadata(model: PreTrainedModel, tokenizer, max_seq_len: int, max_chunk: int, custom_sdpa: bool) -> dict:
    """The constant methods ExecuTorch's LLM runner (and optimum-executorch) read. As in ExecuTorch's own LLM
    exports, `get_max_seq_len` is the most tokens one call takes (the runner prefills longer prompts in chunks of
    it) and `get_max_context_len` the positions the KV cache holds."""
    config = model.config
    bos = config.bos_token_id if config.bos_token_id is not None else getattr(tokenizer, "bos_token_id", None)
    metadata = {
        "get_max_seq_len": max_chunk,
        "get_max_context_len": max_seq_len,
        "get_vocab_size": config.vocab_size,
        "get_n_layers": config.num_hidden_layers,
        "use_kv_cache": True,
        "use_sdpa_with_kv_cache": custom_sdpa,
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
    max_chunk: int | None = None,
    custom_sdpa: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Exports a MobileMoE model (a folder or a loaded model) to `output_dir/model.pte` with its tokenizer, config
    and `export_config.json`; returns the .pte path. `max_chunk` (default `DEFAULT_MAX_CHUNK`) is the most tokens
    one call takes: ExecuTorch plans memory for the largest call, and the sparse experts' gathered weights grow
    with it, so longer prompts are prefilled in chunks. A loaded model is prepared in place (see `load_for_export`;
    INT4 with `quantize="8da4w"`) and left on transformers' SDPA."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower
    from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM

    _check_target(target)
    if max_batch != 1:
        raise ValueError(f"max_batch: {max_batch}; the ExecuTorch program serves the LLM runner, batch 1.")
    model, tokenizer = load_for_export(model, tokenizer)
    max_seq_len = check_options(model.config, quantize, max_seq_len, max_batch)
    max_chunk = _check_max_chunk(max_chunk, max_seq_len)
    if quantize == "8da4w":
        quantize_8da4w(model)
    model.generation_config = GenerationConfig(
        use_cache=True, cache_implementation="static", bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id,
    )  # fmt: skip
    exportable = TorchExportableModuleForDecoderOnlyLM(model, batch_size=1, max_cache_len=max_seq_len)
    attention = model.config._attn_implementation
    if custom_sdpa:
        _use_custom_sdpa(exportable.model, model)
    example = torch.zeros(1, 2, dtype=torch.long)
    # AUTO: the tile height of the sparse experts is a function of the sequence length (see `tiled_mm`).
    sequence = torch.export.Dim.AUTO(min=1, max=max_chunk)
    try:
        with torch.no_grad():
            program = exportable.export(
                input_ids=example,
                cache_position=torch.arange(2),
                dynamic_shapes={"input_ids": {1: sequence}, "cache_position": {0: sequence}},
            )
    finally:
        model.set_attn_implementation(attention)  # a caller's model keeps running in PyTorch
    lowered = to_edge_transform_and_lower(
        program,
        partitioner=[XnnpackPartitioner()],
        compile_config=EdgeCompileConfig(_check_ir_validity=False),
        constant_methods=_metadata(model, tokenizer, max_seq_len, max_chunk, custom_sdpa),
    ).to_executorch()

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PROGRAM_NAME).write_bytes(lowered.buffer)
    experts = "packed" if quantize == "8da4w" else "float"
    export_config = ExportConfig(
        "executorch", quantize, max_seq_len, max_batch, target, PROGRAM_NAME, experts, max_chunk=max_chunk
    )
    write_companions(folder, model, tokenizer, export_config)
    return folder / PROGRAM_NAME


class ExecuTorchRunner:
    """Runs an exported folder with ExecuTorch's Python runtime: prefill in calls of at most `max_chunk` tokens, then
    one call per token."""

    def __init__(self, folder: str | Path):
        # The kernels of ExecuTorch's INT4 embedding and LLM ops (custom_sdpa, update_cache), for the runtime too.
        import executorch.kernels.quantized  # noqa: F401
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
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
        """Logits `[1, T, V]` for `input_ids [1, T]` placed at `start_position` in the KV cache, in calls of at most
        the export's `max_chunk` tokens."""
        if start_position + input_ids.shape[1] > self.export_config.max_seq_len:
            raise ValueError(
                f"max_seq_len: the export holds {self.export_config.max_seq_len} positions; {input_ids.shape[1]} "
                f"tokens at position {start_position} would end at {start_position + input_ids.shape[1]}."
            )
        chunk_size = self.export_config.max_chunk or input_ids.shape[1]  # None (older exports): any length
        logits = []
        for start in range(0, input_ids.shape[1], chunk_size):
            chunk = input_ids[:, start : start + chunk_size]
            positions = torch.arange(start_position + start, start_position + start + chunk.shape[1])
            logits.append(self.method.execute([chunk, positions])[0])
        return logits[0] if len(logits) == 1 else torch.cat(logits, dim=1)

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
