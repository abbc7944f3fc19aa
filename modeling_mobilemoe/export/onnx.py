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
from .packed import GROUP_SIZE, pack_experts_and_embedding, packed_int4, replace_linears

PROGRAM_NAME = "model.onnx"
ONNX_EXPERTS = ("qmoe", "packed")
_SIGN_FLIP = 0x88  # two's-complement nibbles -> MatMulNBits' unsigned `q + 8`, both nibbles of a byte


def _dequantize_unsigned(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MatMulNBits/QMoE bytes (`q + 8`, low nibble first) and scales per 32 along the last dim -> float."""
    values = torch.stack(((packed & 0xF).float(), (packed // 16).float()), dim=-1).flatten(-2) - 8
    return (values.unflatten(-1, (-1, GROUP_SIZE)) * scales[..., None]).flatten(-2)


@torch.library.custom_op("mobilemoe::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b_quant: torch.Tensor, scales: torch.Tensor, K: int, N: int) -> torch.Tensor:
    """`com.microsoft.MatMulNBits(A=x, B=b_quant, scales)` with bits=4, block_size=32, default zero point 8."""
    return F.linear(x, _dequantize_unsigned(b_quant.reshape(N, K // 2), scales.reshape(N, -1)).to(x.dtype))


@matmul_nbits.register_fake
def _(x, b_quant, scales, K, N):
    return x.new_empty(*x.shape[:-1], N)


def _register_schema(name: str, inputs: list[tuple[str, str]], attributes: dict[str, object]) -> None:
    """onnx knows no ONNX Runtime contrib op, and onnxscript builds nodes from schemas: the inputs and attributes
    used here of com.microsoft's `name` are registered once."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(name, "com.microsoft"):
        return
    kinds = {int: OpSchema.AttrType.INT, float: OpSchema.AttrType.FLOAT, str: OpSchema.AttrType.STRING}
    optional = OpSchema.FormalParameterOption.Optional
    onnx.defs.register_schema(
        OpSchema(
            name,
            "com.microsoft",
            1,
            inputs=[OpSchema.FormalParameter(n, t, param_option=optional) for n, t in inputs],
            outputs=[OpSchema.FormalParameter("Y", "T")],
            type_constraints=[("T", ["tensor(float)"], ""), ("T1", ["tensor(uint8)"], "")],
            attributes=[OpSchema.Attribute(n, kinds[kind], "") for n, kind in attributes.items()],
        )
    )


def _register_matmul_nbits_schema() -> None:
    _register_schema(
        "MatMulNBits", [("A", "T"), ("B", "T1"), ("scales", "T")], dict(K=int, N=int, bits=int, block_size=int)
    )


def _register_qmoe_schema() -> None:
    inputs = ["input", "router_probs", "fc1_experts_weights", "fc1_scales", "fc1_experts_bias", "fc2_experts_weights",
              "fc2_scales", "fc2_experts_bias", "fc3_experts_weights", "fc3_scales", "fc3_experts_bias",
              "fc1_zero_points", "fc2_zero_points", "fc3_zero_points", "router_weights"]  # fmt: skip
    types = {"fc1_experts_weights": "T1", "fc2_experts_weights": "T1", "fc3_experts_weights": "T1"}
    attributes = dict(k=int, activation_type=str, swiglu_fusion=int, activation_alpha=float, activation_beta=float,
                      swiglu_limit=float, normalize_routing_weights=int, expert_weight_bits=int, block_size=int,
                      use_sparse_mixer=int)  # fmt: skip
    _register_schema("QMoE", [(n, types.get(n, "T")) for n in inputs], attributes)


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


@torch.library.custom_op("mobilemoe::qmoe", mutates_args=())
def qmoe(
    x: torch.Tensor,
    router_probs: torch.Tensor,
    router_weights: torch.Tensor,
    fc1_weights: torch.Tensor,
    fc1_scales: torch.Tensor,
    fc2_weights: torch.Tensor,
    fc2_scales: torch.Tensor,
    k: int,
    normalize: int,
) -> torch.Tensor:
    """`com.microsoft.QMoE` as configured by `_qmoe_onnx`: top-k of `router_probs` choose, `router_weights` at those
    experts mix (renormalised when `normalize`), SwiGLU experts with interleaved gate/up rows, INT4 `q + 8` weights in
    blocks of 32 along the input dimension. The reference the exported op is checked against."""
    selected = router_probs.topk(k, dim=-1).indices
    weights = router_weights.gather(-1, selected)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    fc1 = _dequantize_unsigned(fc1_weights[selected.reshape(-1)], fc1_scales[selected.reshape(-1)])
    fc2 = _dequantize_unsigned(fc2_weights[selected.reshape(-1)], fc2_scales[selected.reshape(-1)])
    rows = x.repeat_interleave(k, dim=0)[:, :, None]
    gate_up = torch.bmm(fc1, rows).squeeze(-1)
    hidden = F.silu(gate_up[:, 0::2]) * gate_up[:, 1::2]
    out = torch.bmm(fc2, hidden[:, :, None]).squeeze(-1).view(x.shape[0], k, -1)
    return (out * weights[..., None]).sum(dim=1)


@qmoe.register_fake
def _(x, router_probs, router_weights, fc1_weights, fc1_scales, fc2_weights, fc2_scales, k, normalize):
    return torch.empty_like(x)


def _qmoe_onnx(x, router_probs, router_weights, fc1_weights, fc1_scales, fc2_weights, fc2_scales, k: int, normalize: int):
    from onnxscript.values import Opset

    _register_qmoe_schema()
    return Opset("com.microsoft", 1).QMoE(
        x, router_probs, fc1_weights, fc1_scales, None, fc2_weights, fc2_scales, None, None, None, None, None, None,
        None, router_weights, k=k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
        activation_beta=0.0, swiglu_limit=float("inf"), normalize_routing_weights=normalize, expert_weight_bits=4,
        block_size=GROUP_SIZE, use_sparse_mixer=0,
    )  # fmt: skip


def _quantize_unsigned(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[..., K]` float -> (`q + 8` packed `[..., K/2]` uint8, fp32 scales `[..., K/32]`), the format's INT4 rule."""
    qweight, scale = packed_int4(weight)
    return qweight ^ _SIGN_FLIP, scale.float()


class QMoESparseMoeBlock(nn.Module):
    """An MoE block as one `com.microsoft.QMoE`: ONNX Runtime's fused sparse INT4 MoE kernel. MobileMoE's routing maps
    onto it exactly: `router_probs = sigmoid(logits) + expert_bias` selects, `router_weights = sigmoid(logits)` mixes
    (renormalised over the top-k by the op), times `routed_scaling_factor`; the shared expert stays beside it.
    QMoE groups expert weights along their input dimension, the published format along the output one, so the
    experts are quantized again here (INT4, blocks of 32 along the input)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.router, self.shared_expert = block.router, block.shared_expert
        self.register_buffer("expert_bias", block.expert_bias)
        experts = block.routed_experts
        gate, up = experts.gate_up_proj.chunk(2, dim=1)  # [E, I, H] each
        interleaved = torch.stack((gate, up), dim=2).flatten(1, 2)  # rows gate0, up0, gate1, ... (swiglu_fusion=1)
        for name, weight in (("fc1", interleaved), ("fc2", experts.down_proj)):
            packed, scales = _quantize_unsigned(weight)
            self.register_buffer(f"{name}_weights", packed)
            self.register_buffer(f"{name}_scales", scales)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        scores = F.linear(hidden_states.float(), self.router.weight.float()).sigmoid()
        routed = qmoe(
            hidden_states, scores + self.expert_bias, scores, self.fc1_weights, self.fc1_scales, self.fc2_weights,
            self.fc2_scales, self.router.top_k, int(self.router.norm_topk_prob),
        )  # fmt: skip
        output = routed * self.router.routed_scaling_factor + self.shared_expert(hidden_states)
        return output.reshape(batch_size, sequence_length, hidden_dim)


def quantize_8da4w(model: PreTrainedModel, experts: str = "qmoe") -> PreTrainedModel:
    """INT4 weights everywhere but the FP32 router: MatMulNBits linears, the packed embedding, and experts as QMoE
    (`experts="qmoe"`, fast) or as the published packed tensors dequantized per gathered tile (`"packed"`: the
    checkpoint's bytes unchanged)."""
    if experts not in ONNX_EXPERTS:
        raise ValueError(f"experts: {experts!r} is not one of {list(ONNX_EXPERTS)}.")
    if experts == "qmoe":
        for layer in model.get_decoder().layers:
            if layer.is_moe_layer:
                layer.feed_forward = QMoESparseMoeBlock(layer.feed_forward)
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
    experts: str = "qmoe",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Path:
    """Exports a MobileMoE model (a folder or a loaded model) to `output_dir/model.onnx` with its tokenizer, config
    and `export_config.json`; returns the .onnx path. Batch and lengths are dynamic; the runner enforces
    `max_seq_len` and `max_batch`. `experts` picks the INT4 experts' form (see `quantize_8da4w`)."""
    if experts not in ONNX_EXPERTS:  # before loading: a full-size model takes a while
        raise ValueError(f"experts: {experts!r} is not one of {list(ONNX_EXPERTS)}.")
    model, tokenizer = load_for_export(model, tokenizer)
    max_seq_len = check_options(model.config, quantize, max_seq_len, max_batch)
    if quantize == "8da4w":
        quantize_8da4w(model, experts)
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
            custom_translation_table={
                torch.ops.mobilemoe.matmul_nbits.default: _matmul_nbits_onnx,
                torch.ops.mobilemoe.qmoe.default: _qmoe_onnx,
            },
            optimize=True,
            verbose=False,
        )
    onnx_program.save(str(folder / PROGRAM_NAME), external_data=_external_data(model))
    experts = experts if quantize == "8da4w" else "float"
    export_config = ExportConfig("onnx", quantize, max_seq_len, max_batch, "cpu", PROGRAM_NAME, experts)
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
