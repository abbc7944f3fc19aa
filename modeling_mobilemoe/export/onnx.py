"""MobileMoE -> ONNX (decoder with past, Optimum's names), and an ONNX Runtime runner for the result.

Inputs `input_ids`, `attention_mask`, `position_ids`, `past_key_values.N.key/value`; outputs `logits`,
`present.N.key/value`; batch, sequence and past lengths are dynamic (a first step feeds empty pasts). The MoE is the
traceable sparse `tiled_mm` path. `quantize="8da4w"`: every linear (and the LM head) becomes ONNX Runtime's
`com.microsoft.MatMulNBits` (INT4, blocks of 32, the published format's bytes with the sign bit flipped: MatMulNBits
stores `q + 8` and its default zero point is 8); experts and the embedding keep the published packed INT4 tensors
and dequantize only what a token reads. Activations stay fp32 (`accuracy_level` 0); ORT's `com.microsoft.QMoE` is
not used: it routes by softmax over its router input, and MobileMoE's selection (sigmoid score plus a bias that only
chooses) and weighting (the unbiased scores, renormalised, times 2.5) cannot both be expressed through one router
input.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from .common import ExportConfig, GreedyResult, check_options, check_sequence_length, load_for_export, write_companions
from .packed import GROUP_SIZE, pack_experts_and_embedding, replace_linears

PROGRAM_NAME = "model.onnx"
_SIGN_FLIP = 0x88  # two's-complement nibbles -> MatMulNBits' unsigned `q + 8`, both nibbles of a byte


@torch.library.custom_op("mobilemoe::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b_quant: torch.Tensor, scales: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """`com.microsoft.MatMulNBits(A=x, B=b_quant, scales)` with bits=4, block_size=32, default zero point 8."""
    low, high = (b_quant & 0xF).to(torch.int16), (b_quant // 16).to(torch.int16)
    values = torch.stack((low, high), dim=-1).reshape(N, K).float() - 8
    weight = values.unflatten(-1, (-1, GROUP_SIZE)) * scales.reshape(N, -1, 1)
    return F.linear(x, weight.reshape(N, K).to(x.dtype))


@matmul_nbits.register_fake
def _(x, b_quant, scales, K, N):
    return x.new_empty(*x.shape[:-1], N)


def _register_matmul_nbits_schema() -> None:
    """onnx knows no ONNX Runtime contrib op; onnxscript builds nodes from schemas, so MatMulNBits' (the inputs and
    attributes used here) is registered once."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MatMulNBits", "com.microsoft"):
        return
    Formal = OpSchema.FormalParameter
    onnx.defs.register_schema(
        OpSchema(
            "MatMulNBits",
            "com.microsoft",
            1,
            inputs=[Formal("A", "T1"), Formal("B", "T2"), Formal("scales", "T1")],
            outputs=[Formal("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], "")],
            attributes=[
                OpSchema.Attribute(name, OpSchema.AttrType.INT, "") for name in ("K", "N", "bits", "block_size")
            ],
        )
    )


def _matmul_nbits_onnx(x, b_quant, scales, K: int, N: int):
    from onnxscript.values import Opset

    _register_matmul_nbits_schema()
    return Opset("com.microsoft", 1).MatMulNBits(x, b_quant, scales, K=K, N=N, bits=4, block_size=GROUP_SIZE)


class MatMulNBitsLinear(nn.Module):
    """A bias-free linear as MatMulNBits' `B [N, K/32, 16]` uint8 and fp32 `scales [N * K/32]`, from the published
    `(qweight, scale)` pair."""

    def __init__(self, linear: nn.Linear, qweight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("MatMulNBitsLinear: MobileMoE's linears have no bias.")
        self.out_features, self.in_features = linear.weight.shape
        blocks = self.in_features // GROUP_SIZE
        self.register_buffer("b_quant", (qweight ^ _SIGN_FLIP).reshape(self.out_features, blocks, GROUP_SIZE // 2))
        self.register_buffer("scales", scale.float().reshape(-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_nbits(x, self.b_quant, self.scales, self.in_features, self.out_features)


def quantize_8da4w(model: PreTrainedModel) -> PreTrainedModel:
    pack_experts_and_embedding(model)
    replace_linears(model, MatMulNBitsLinear)
    return model


class DecoderWithPast(nn.Module):
    """The model behind Optimum's decoder-with-past signature: flat past tensors in, logits and presents out."""

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, past_key_values):
        cache = DynamicCache(config=self.model.config)
        for layer_idx, (key, value) in enumerate(zip(past_key_values[::2], past_key_values[1::2])):
            cache.update(key, value, layer_idx)
        output = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=True
        )
        presents = [tensor for layer in output.past_key_values.layers for tensor in (layer.keys, layer.values)]
        return output.logits, *presents


def _names(num_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{layer}.{kind}" for layer in range(num_layers) for kind in ("key", "value")]


def export_onnx(
    model: str | Path | PreTrainedModel,
    output_dir: str | Path,
    *,
    quantize: str = "none",
    max_seq_len: int | None = None,
    max_batch: int = 8,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Exports a MobileMoE model (a folder or a loaded model) to `output_dir/model.onnx` with its tokenizer, config
    and `export_config.json`; returns the .onnx path. Batch and lengths are dynamic; the runner enforces
    `max_seq_len` and `max_batch`."""
    model, tokenizer = load_for_export(model, tokenizer)
    max_seq_len = check_options(model.config, quantize, max_seq_len, max_batch)
    if quantize == "8da4w":
        quantize_8da4w(model)
    config = model.config
    num_layers = config.num_hidden_layers
    # Example batch 2 (a batch of 1 gets specialised) with a non-empty past (else the past axis is fixed to 0).
    batch, past, length = 2, 3, 4
    kv_shape = (batch, config.num_key_value_heads, past, config.head_dim)
    pasts = tuple(torch.zeros(kv_shape) for _ in range(2 * num_layers))
    example = (
        torch.zeros(batch, length, dtype=torch.long),
        torch.ones(batch, past + length, dtype=torch.long),
        torch.arange(past, past + length).expand(batch, -1),
        pasts,
    )
    batch_dim, sequence_dim = torch.export.Dim("batch_size"), torch.export.Dim.AUTO
    dynamic_shapes = (
        {0: batch_dim, 1: sequence_dim},
        {0: batch_dim, 1: torch.export.Dim.AUTO},
        {0: batch_dim, 1: sequence_dim},
        tuple({0: batch_dim, 2: torch.export.Dim.AUTO} for _ in pasts),
    )
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        onnx_program = torch.onnx.export(
            DecoderWithPast(model),
            example,
            dynamo=True,
            input_names=["input_ids", "attention_mask", "position_ids", *_names(num_layers, "past_key_values")],
            output_names=["logits", *_names(num_layers, "present")],
            dynamic_shapes=dynamic_shapes,
            custom_translation_table={torch.ops.mobilemoe.matmul_nbits.default: _matmul_nbits_onnx},
            optimize=True,
            verbose=False,
        )
    onnx_program.save(str(folder / PROGRAM_NAME), external_data=_external_data(model))
    export_config = ExportConfig("onnx", quantize, max_seq_len, max_batch, "cpu", PROGRAM_NAME)
    write_companions(folder, model, tokenizer, export_config)
    return folder / PROGRAM_NAME


def _external_data(model: nn.Module) -> bool:
    """Protobuf caps a file at 2 GiB: larger models keep their tensors in `model.onnx.data`."""
    size = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return size > 1.8 * 2**30


class OnnxRunner:
    """Runs an exported folder with ONNX Runtime (CPU): prefill in one call, then one call per token, past
    key/values fed back; batches of left-padded prompts take an attention mask."""

    def __init__(self, folder: str | Path, num_threads: int | None = None):
        import onnxruntime as ort

        self.export_config = ExportConfig.load(folder)
        if self.export_config.format != "onnx":
            raise ValueError(f"{folder} holds a {self.export_config.format!r} export, not an ONNX one.")
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(
            str(Path(folder) / self.export_config.program), options, providers=["CPUExecutionProvider"]
        )
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {
            i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), dtype=np.float32) for i in self.past_inputs
        }

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: dict[str, np.ndarray]):
        """`(logits, presents-as-next-past)` for `input_ids [B, T]`; `attention_mask [B, past + T]`."""
        positions = np.maximum(attention_mask.cumsum(-1) - 1, 0)[:, -input_ids.shape[1] :]
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions, **past}
        logits, *presents = self.session.run(None, feeds)
        return logits, dict(zip((i.name for i in self.past_inputs), presents))

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
    ) -> GreedyResult:
        """Greedy decoding of `input_ids [B, T]` (left-padded where `attention_mask` is 0)."""
        batch, length = input_ids.shape
        if batch > self.export_config.max_batch:
            raise ValueError(f"max_batch: the export allows {self.export_config.max_batch} sequences, got {batch}.")
        check_sequence_length(length, max_new_tokens, self.export_config.max_seq_len)
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).numpy().astype(np.int64)
        tokens, past, step_logits = input_ids.numpy().astype(np.int64), self.empty_past(batch), []
        logits, past = self.forward(tokens, mask, past)
        for step in range(max_new_tokens):
            last = logits[:, -1]
            step_logits.append(last)
            next_token = last.argmax(-1)[:, None].astype(np.int64)
            tokens = np.concatenate([tokens, next_token], axis=1)
            mask = np.concatenate([mask, np.ones_like(next_token)], axis=1)
            if step + 1 < max_new_tokens:
                logits, past = self.forward(next_token, mask, past)
        return GreedyResult(torch.from_numpy(tokens), torch.from_numpy(np.stack(step_logits, axis=1)))
