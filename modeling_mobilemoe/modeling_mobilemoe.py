# Copyright 2026 The MobileMoE for Hugging Face contributors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""PyTorch MobileMoE model.

Self-contained (imports only torch, transformers and the configuration next to it) so that it can travel with a
checkpoint as remote code. Reads top to bottom like the forward pass: norms, RoPE, attention, router, experts, MoE
block, decoder layer, models; then loading of the published packed-INT4 format.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, Transpose, WeightConverter
from transformers.generation import GenerationMixin
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel, slice_logits_to_keep
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import maybe_autocast, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_mobilemoe import INT4_FORMAT, INT4_FORMAT_FIELDS, MobileMoEConfig


# Functions the `modeling_mobilemoe` package runs on every model it builds (it installs its CPU decode kernels,
# `modeling_mobilemoe.kernels`). Loaded as Hub remote code, this file has none and runs on stock PyTorch ops.
MODEL_INIT_HOOKS: list[Callable[[nn.Module], None]] = []


class MobileMoERMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # Normalised in float32 (torch's fused kernel: fewer ops per decode step), scaled in the input dtype.
        normalized = F.rms_norm(hidden_states.float(), (hidden_states.shape[-1],), eps=self.variance_epsilon)
        return self.weight * normalized.to(hidden_states.dtype)

    def extra_repr(self):
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


class MobileMoEQKNorm(nn.Module):
    """RMS normalisation without a learnable weight, applied to queries and keys after RoPE (Llama-4's L2Norm)."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)

    def extra_repr(self):
        return f"eps={self.eps}"


class MobileMoERotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor  # fix linting for `register_buffer`

    def __init__(self, config: MobileMoEConfig, device=None):
        super().__init__()
        self.max_seq_len_cached = config.max_position_embeddings
        self.original_max_seq_len = config.max_position_embeddings
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        rope_init_fn: Callable = self.compute_default_rope_parameters
        if self.rope_type != "default":
            rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = rope_init_fn(config, device)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: MobileMoEConfig, device=None, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE inverse frequencies (for checkpoints whose `rope_parameters` say `rope_type: default`)."""
        base = config.rope_parameters["rope_theta"]
        dim = config.head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
        return inv_freq, 1.0

    @torch.no_grad()
    @dynamic_rope_update
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq_expanded = self.inv_freq[None, :, None].float().expand(position_ids.shape[0], -1, 1).to(x.device)
        position_ids_expanded = position_ids[:, None, :].float()
        with maybe_autocast(device_type=x.device.type, enabled=False):  # RoPE angles in fp32
            freqs = (inv_freq_expanded.float() @ position_ids_expanded.float()).transpose(1, 2)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos = emb.cos() * self.attention_scaling
            sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotates half the hidden dims of the input."""
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim: int = 1):
    """Applies rotary position embeddings (rotate-half convention, as transformers' Llama) to queries and keys."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(batch, num_key_value_heads, seq, head_dim) -> (batch, num_attention_heads, seq, head_dim)."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
):
    key_states = repeat_kv(key, module.num_key_value_groups)
    value_states = repeat_kv(value, module.num_key_value_groups)

    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask

    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


# Where the `modeling_mobilemoe` package registered its CPU decode kernels, `sdpa` attention on CPU runs this
# implementation instead (few-query inference on the kernel, everything else transformers' `sdpa`). Remote code
# copies of this file have no such registration and run `sdpa` as asked.
CPU_SDPA = "mobilemoe_cpu_sdpa"


class MobileMoEAttention(nn.Module):
    """Grouped-query attention with RoPE (per-layer switch) and weightless QK-norm applied after RoPE."""

    def __init__(self, config: MobileMoEConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.use_rope = bool(config.no_rope_layers[layer_idx])

        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=config.attention_bias)
        # As in Llama-4, NoPE layers skip the QK-norm too.
        self.qk_norm = MobileMoEQKNorm(config.rms_norm_eps) if config.use_qk_norm and self.use_rope else None

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)

        if self.use_rope:
            cos, sin = position_embeddings
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if self.qk_norm is not None:
            query_states = self.qk_norm(query_states)
            key_states = self.qk_norm(key_states)

        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)

        implementation = self.config._attn_implementation
        if implementation == "sdpa" and CPU_SDPA in ALL_ATTENTION_FUNCTIONS and hidden_states.device.type == "cpu":
            implementation = CPU_SDPA  # the package's CPU decode attention; it hands everything else back to sdpa
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights


class MobileMoEMLP(nn.Module):
    """SwiGLU feed-forward: the shared expert of MoE layers and the FFN of dense layers."""

    def __init__(self, config: MobileMoEConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size_mlp, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size_mlp, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size_mlp, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MobileMoETopkRouter(nn.Module):
    """FP32 sigmoid router. The expert bias only chooses the top-k experts; their weights come from the raw scores."""

    def __init__(self, config: MobileMoEConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size, dtype=torch.float32))

    def forward(
        self, hidden_states: torch.Tensor, expert_bias: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with maybe_autocast(device_type=hidden_states.device.type, enabled=False):
            router_logits = F.linear(hidden_states.float(), self.weight.float())  # (tokens, experts)
            scores = router_logits.sigmoid()
            top_k_index = torch.topk(scores + expert_bias.float(), self.top_k, dim=-1).indices
            top_k_weights = scores.gather(-1, top_k_index)
            if self.norm_topk_prob:
                top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
            top_k_weights = top_k_weights * self.routed_scaling_factor
        return router_logits, top_k_weights, top_k_index


@use_experts_implementation
class MobileMoEExperts(nn.Module):
    """Routed SwiGLU experts as 3-D tensors in `nn.Linear` layout: `gate_up_proj [E, 2I, H]` (gate rows first) and
    `down_proj [E, H, I]`.

    Checkpoints keep the released `feed_forward.experts.* [E, in, out]` layout; loading and saving transpose and
    rename (see the conversion mapping at the end of this file). The `nn.Linear` layout is what CPU matmul kernels
    want: on CPUs without native bf16 matmul, a bf16 `x @ W` with `W` stored `[in, out]` falls off oneDNN's kernels
    (measured 16x slower than `F.linear`).
    """

    def __init__(self, config: MobileMoEConfig):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Reference ("eager") path: one matmul pair per expert that received tokens."""
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, tokens)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            rows = _quantize_activations(self, hidden_states[token_idx])
            gate, up = F.linear(rows, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            expert_out = F.linear(_quantize_activations(self, self.act_fn(gate) * up), self.down_proj[expert_idx])
            expert_out = expert_out * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, expert_out.to(final_hidden_states.dtype))
        return final_hidden_states


# Below this many rows, a bf16/fp16 matmul stays in its dtype even on CPUs without native half-precision kernels: it
# is memory-bound there and upcasting the weight costs more than it saves (crossover measured at 4-8 rows on AVX2).
_UPCAST_MIN_ROWS = 8
# With no more (token, expert) slots than this, compiled graphs use the gather formulation (decode); else grouped_mm.
_BATCHED_MM_MAX_SLOTS = 64


def _onednn_supports(check: str) -> bool:
    """oneDNN's answer to `torch.ops.mkldnn.<check>()`; False on PyTorch builds without oneDNN (no such op there)."""
    op = getattr(torch.ops.mkldnn, check, None) if torch.backends.mkldnn.is_available() else None
    return op is not None and bool(op())


# Half-precision dtypes this CPU has no native matmul kernels for (no AVX512-BF16/AMX): float32 is faster there. Read
# once at import, so compiled graphs see a constant rather than a call they can't trace.
_SLOW_HALF_MATMUL_DTYPES = frozenset(
    dtype
    for dtype, check in ((torch.bfloat16, "_is_mkldnn_bf16_supported"), (torch.float16, "_is_mkldnn_fp16_supported"))
    if not _onednn_supports(check)
)


def _half_matmul_is_slow(dtype: torch.dtype) -> bool:
    """Whether this CPU lacks native kernels for `dtype` matmuls (see `_SLOW_HALF_MATMUL_DTYPES`)."""
    return dtype in _SLOW_HALF_MATMUL_DTYPES


def _quantize_activations(module: nn.Module, activations: torch.Tensor) -> torch.Tensor:
    """Quantization-aware training installs `activation_fake_quantizer` on the experts (INT8 activations into every
    expert matmul); without it this is the identity."""
    quantizer = getattr(module, "activation_fake_quantizer", None)
    return activations if quantizer is None else quantizer(activations)


def _expert_swiglu(module: nn.Module, rows: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """One expert on its rows: `down(silu(gate) * up)`."""
    if rows.shape[0] >= _UPCAST_MIN_ROWS and rows.device.type == "cpu" and _half_matmul_is_slow(rows.dtype):
        return _expert_swiglu(module, rows.float(), gate_up.float(), down.float()).to(rows.dtype)
    gate, up = F.linear(_quantize_activations(module, rows), gate_up).chunk(2, dim=-1)
    return F.linear(_quantize_activations(module, module.act_fn(gate) * up), down)


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The default experts: picks a sparse formulation by device, shape and graph capture (`sorted_experts`). Where
    the `modeling_mobilemoe` package registered its CPU kernels (`cpu_fused`), CPU tensors go there (which hands back
    to `sorted_experts` whatever its operators do not take)."""
    if "cpu_fused" in ALL_EXPERTS_FUNCTIONS and hidden_states.device.type == "cpu":
        return ALL_EXPERTS_FUNCTIONS["cpu_fused"](self, hidden_states, top_k_index, top_k_weights)
    return sorted_experts(self, hidden_states, top_k_index, top_k_weights)


def sorted_experts(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Sparse experts for CPU inference and training: the (token, expert) slots are sorted by expert and each expert
    that received tokens runs one matmul pair on its contiguous rows (a grouped GEMM); unselected experts cost nothing.
    CPU training (not QAT, not slow half precision), compiled graphs and accelerators use transformers' traceable
    `batched_mm` (few slots) or `grouped_mm`; exported programs `batched_mm` at any length (a size test would
    constrain the exported sequence length; this package's exporters select `tiled_mm`, which needs `Dim.AUTO`).
    """
    num_tokens, hidden_dim = hidden_states.shape
    num_slots = top_k_index.numel()
    if torch.compiler.is_exporting():  # e.g. optimum-executorch's exporter, which keeps the model's default
        return ALL_EXPERTS_FUNCTIONS["batched_mm"](self, hidden_states, top_k_index, top_k_weights)
    # transformers' kernels know nothing of QAT's activation fake-quantizer: with one installed, stay on this path.
    quantized = getattr(self, "activation_fake_quantizer", None) is not None
    if (torch.compiler.is_compiling() or hidden_states.device.type != "cpu") and not quantized:
        fallback = "batched_mm" if num_slots <= _BATCHED_MM_MAX_SLOTS else "grouped_mm"
        return ALL_EXPERTS_FUNCTIONS[fallback](self, hidden_states, top_k_index, top_k_weights)
    # Training on CPU: `grouped_mm` is one autograd node per matmul instead of one per expert; measured 1.04x the
    # loop below in fp32 (4-layer S, 2x512 tokens, `benchmarks/bench_training.py`). Slow half-precision matmuls
    # stay on the loop, which upcasts each expert's rows.
    training = torch.is_grad_enabled() and (hidden_states.requires_grad or self.gate_up_proj.requires_grad)
    if training and not quantized and num_slots > _BATCHED_MM_MAX_SLOTS and not _half_matmul_is_slow(hidden_states.dtype):
        return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)

    # Under autograd, per-expert views come from one `unbind` so the backward writes each weight gradient once.
    if torch.is_grad_enabled() and self.gate_up_proj.requires_grad:
        gate_up_weights, down_weights = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
    else:
        gate_up_weights, down_weights = self.gate_up_proj, self.down_proj

    if num_tokens == 1:  # decode: the k selected experts, combined by one (1, k) x (k, H) matmul
        expert_outputs = [
            _expert_swiglu(self, hidden_states, gate_up_weights[expert], down_weights[expert])
            for expert in top_k_index[0].tolist()
        ]
        return torch.mm(top_k_weights.float(), torch.cat(expert_outputs).float()).to(hidden_states.dtype)

    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    token_of_slot = order // top_k
    counts = torch.bincount(expert_ids, minlength=self.num_experts)
    hit_experts = counts.nonzero().flatten()
    rows_per_expert = hidden_states[token_of_slot].split(counts[hit_experts].tolist())
    expert_outputs = [
        _expert_swiglu(self, rows, gate_up_weights[expert], down_weights[expert])
        for expert, rows in zip(hit_experts.tolist(), rows_per_expert)
    ]
    # Weighted in place in the experts' output dtype (routing weights rounded to it) and summed in it, as the eager
    # path sums: a bf16 x fp32 product of (slots, H) takes PyTorch's scalar mixed-dtype loop (10-15 ms a layer at a
    # 1k-token bf16 prefill, 0.3 ms in one dtype).
    weighted = torch.cat(expert_outputs)
    weighted = weighted.mul_(top_k_weights.reshape(-1)[order, None].to(weighted.dtype))
    output = torch.zeros(num_tokens, hidden_dim, dtype=weighted.dtype, device=hidden_states.device)
    return output.index_add_(0, token_of_slot, weighted).to(hidden_states.dtype)


ExpertsInterface.register("sorted_mm", sorted_mm_experts_forward)


def _selected_expert_weights(experts: nn.Module, expert_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`gate_up [N, 2I, H]` and `down [N, H, I]` of the listed experts only. Modules that store their experts
    quantized (the exporters' packed INT4 experts) provide `gather_weights`, which dequantizes just these."""
    gather = getattr(experts, "gather_weights", None)
    if gather is not None:
        return gather(expert_ids)
    return experts.gate_up_proj[expert_ids], experts.down_proj[expert_ids]


def _batched_swiglu(experts: nn.Module, rows: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """`rows [N, M, H]`, each batch entry through its expert `expert_ids[n]`, as two batched matmuls."""
    gate_up, down = _selected_expert_weights(experts, expert_ids)
    gate, up = torch.bmm(rows, gate_up.transpose(1, 2)).chunk(2, dim=-1)
    return torch.bmm(experts.act_fn(gate) * up, down.transpose(1, 2))


def _tiled_experts(self, hidden_states, top_k_index, top_k_weights, tile_rows) -> torch.Tensor:
    """Each expert's slots are packed into tiles of `tile_rows` rows (the last one padded), and
    every tile runs through its expert's weights as one batch entry of two batched matmuls: a grouped GEMM written
    with static-shaped ops. Experts without slots get no tile; at most `min(E, slots) * (tile_rows - 1)` padding rows."""
    num_tokens, hidden_dim = hidden_states.shape
    top_k = top_k_index.shape[-1]
    num_slots = num_tokens * top_k
    num_tiles = (num_slots + torch.sym_min(self.num_experts, num_slots) * (tile_rows - 1)) // tile_rows
    expert_ids = top_k_index.reshape(-1)
    slot_is_expert = F.one_hot(expert_ids, self.num_experts)  # (slots, E); one-hot cumsum ranks without a sort op
    rank_in_expert = (slot_is_expert.cumsum(0) - 1).gather(1, expert_ids[:, None]).squeeze(1)
    tiles_per_expert = (slot_is_expert.sum(0) + tile_rows - 1) // tile_rows
    tile_end = tiles_per_expert.cumsum(0)
    tile_in_expert = rank_in_expert // tile_rows
    slot_tile = tile_end[expert_ids] - tiles_per_expert[expert_ids] + tile_in_expert
    slot_row = rank_in_expert - tile_in_expert * tile_rows  # `%` by a symbolic size has no ONNX translation
    # Tile t belongs to the first expert whose tiles end after t; tiles past the last used one repeat that expert.
    ends = torch.zeros(num_tiles + 1, dtype=torch.long, device=expert_ids.device)
    ends = ends.scatter_add(0, tile_end.clamp(max=num_tiles), torch.ones_like(tile_end))
    tile_expert = ends.cumsum(0)[:num_tiles].clamp(max=self.num_experts - 1)
    token_of_slot = torch.arange(num_slots, device=expert_ids.device) // top_k
    rows = hidden_states.new_zeros(num_tiles, tile_rows, hidden_dim)
    rows = rows.index_put((slot_tile, slot_row), hidden_states[token_of_slot])
    expert_outputs = _batched_swiglu(self, rows, tile_expert)[slot_tile, slot_row].view(num_tokens, top_k, hidden_dim)
    return (expert_outputs * top_k_weights.unsqueeze(-1).to(expert_outputs.dtype)).sum(dim=1)


def tiled_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Sparse experts from static-shaped ops only, for `torch.export`, ONNX and ExecuTorch (which take neither
    `sorted_mm`'s data-dependent loop nor transformers' `grouped_mm` fallback op): only the selected experts' weights
    are read, and there are no per-slot weight copies at prefill. The tile height follows the number of (token,
    expert) slots symbolically, so one exported graph serves decode (2-row tiles: one per selected expert) and
    prefill (about two tiles per expert, at most 32 rows)."""
    num_slots = top_k_index.shape[0] * top_k_index.shape[1]
    tile_rows = torch.sym_max(2, torch.sym_min(32, num_slots // (2 * self.num_experts)))
    return _tiled_experts(self, hidden_states, top_k_index, top_k_weights, tile_rows)


ExpertsInterface.register("tiled_mm", tiled_mm_experts_forward)


def _keep_float32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wraps an `nn.Module._apply` function so float32 tensors keep their dtype while still following device moves."""

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        converted = fn(tensor)
        if tensor.dtype == torch.float32 and converted.dtype != torch.float32:
            return tensor.to(device=converted.device)
        return converted

    return apply


def _accept_published_experts_layout(module, state_dict, prefix, *args) -> None:
    """Lets `load_state_dict` take what `save_pretrained` writes (`experts.* [E, in, out]`), as `Trainer` does when it
    resumes from a checkpoint, not only what `state_dict()` returns."""
    for name in ("gate_up_proj", "down_proj"):
        published = f"{prefix}experts.{name}"
        if published in state_dict:
            state_dict[f"{prefix}routed_experts.{name}"] = state_dict.pop(published).transpose(1, 2)


class MobileMoESparseMoeBlock(nn.Module):
    """`y = sum_j w_j * expert_{e_j}(x) + shared_expert(x)`: routed experts plus an ungated shared expert."""

    def __init__(self, config: MobileMoEConfig):
        super().__init__()
        self.router = MobileMoETopkRouter(config)
        self.routed_experts = MobileMoEExperts(config)
        self.shared_expert = MobileMoEMLP(config)
        # Aux-loss-free balancing: training code nudges this selection bias towards under-loaded experts.
        self.register_buffer("expert_bias", torch.zeros(config.num_local_experts, dtype=torch.float32))
        # Tokens routed to each expert while training since training code last zeroed it (the bias update's input).
        self.register_buffer("expert_load", torch.zeros(config.num_local_experts, dtype=torch.float32), persistent=False)
        self.register_load_state_dict_pre_hook(_accept_published_experts_layout)

    def _apply(self, fn, recurse=True):
        # Routing is specified in FP32: dtype casts such as `model.to(torch.bfloat16)` skip the router and the bias.
        if recurse:
            for name, child in self.named_children():
                child._apply(_keep_float32(fn) if name == "router" else fn)
        return super()._apply(_keep_float32(fn), recurse=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, sequence_length, hidden_dim = hidden_states.shape
        hidden_states = hidden_states.reshape(-1, hidden_dim)
        _, top_k_weights, top_k_index = self.router(hidden_states, self.expert_bias)
        if self.training:
            with torch.no_grad():
                self.expert_load += torch.bincount(top_k_index.flatten(), minlength=self.expert_load.numel())
        routed_output = self.routed_experts(hidden_states, top_k_index, top_k_weights)
        output = routed_output + self.shared_expert(hidden_states)
        return output.reshape(batch_size, sequence_length, hidden_dim)


class MobileMoEDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: MobileMoEConfig, layer_idx: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = MobileMoEAttention(config, layer_idx)
        self.is_moe_layer = config.is_moe_layer(layer_idx)
        self.feed_forward = MobileMoESparseMoeBlock(config) if self.is_moe_layer else MobileMoEMLP(config)
        self.input_layernorm = MobileMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = MobileMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = False,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(
            hidden_states=hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = residual + hidden_states

        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.feed_forward(hidden_states)
        return residual + hidden_states


class MobileMoEPreTrainedModel(PreTrainedModel):
    config: MobileMoEConfig
    config_class = MobileMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["MobileMoEDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _can_compile_fullgraph = True
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["router", "expert_bias"]
    _can_record_outputs = {
        "router_logits": OutputRecorder(MobileMoETopkRouter, index=0),
        "hidden_states": MobileMoEDecoderLayer,
        "attentions": MobileMoEAttention,
    }

    def post_init(self):
        super().post_init()
        for hook in MODEL_INIT_HOOKS:
            hook(self)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        # Unless asked otherwise, experts run `sorted_mm`, which picks its formulation by device and graph capture.
        return super().get_correct_experts_implementation(requested_experts or "sorted_mm")

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, MobileMoEExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, MobileMoETopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MobileMoESparseMoeBlock):
            init.zeros_(module.expert_bias)
            init.zeros_(module.expert_load)

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        # Packed INT4 checkpoints (Meta's QAT release) are dequantized on the fly to the model's dtype.
        packed = getattr(model.config, "quantization", None) is not None
        if packed:
            load_config = dataclasses.replace(
                load_config, weight_mapping=[*int4_dequantize_converters(), *(load_config.weight_mapping or [])]
            )
        loading_info, disk_offload_index = PreTrainedModel._load_pretrained_model(
            model, state_dict, checkpoint_files, load_config, expected_keys
        )
        if packed:
            # The model is dense now: it saves as a plain checkpoint (default conversions), not the packed format.
            del model._weight_conversions
            model.config.quantization = None
        return loading_info, disk_offload_index

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info):
        # Refuse partial loads: a tensor left randomly initialised would silently give a broken model. Shape and
        # conversion problems are checked first, since transformers' own report raises on them without the details.
        source = load_config.pretrained_model_name_or_path
        if loading_info.mismatched_keys and not load_config.ignore_mismatched_sizes:
            shapes = ", ".join(
                f"{key} (checkpoint {tuple(ckpt)} vs model {tuple(ours)})"
                for key, ckpt, ours in sorted(loading_info.mismatched_keys)
            )
            raise ValueError(f"Checkpoint {source} has mis-shaped tensors: {shapes}.")
        if loading_info.conversion_errors:
            raise ValueError(f"Checkpoint {source} has tensors that failed to convert: {loading_info.conversion_errors}")
        loading_info = PreTrainedModel._finalize_model_loading(model, load_config, loading_info)
        problems = []
        if loading_info.missing_keys:
            problems.append(f"missing tensors: {sorted(loading_info.missing_keys)}")
        if loading_info.unexpected_keys:
            problems.append(f"unexpected tensors: {sorted(loading_info.unexpected_keys)}")
        if problems:
            raise ValueError(f"Checkpoint {source} does not match {type(model).__name__} ({'; '.join(problems)}).")
        return loading_info


class MobileMoEModel(MobileMoEPreTrainedModel):
    def __init__(self, config: MobileMoEConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [MobileMoEDecoderLayer(config, layer_idx) for layer_idx in range(config.num_hidden_layers)]
        )
        self.norm = MobileMoERMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MobileMoERotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")

        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)

        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)

        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        # `generate` may have prepared the masks already (one per layer type)
        if isinstance(attention_mask, dict):
            causal_mask = attention_mask["full_attention"]
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                cache=cache,
                position_ids=position_ids,
            )

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)

        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )

        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, cache=cache if use_cache else None)


def _token_mask(attention_mask: torch.Tensor | None, num_tokens: int, device) -> torch.Tensor | None:
    """Flat (tokens,) float mask of real tokens from a 2-D padding mask; None when there is no such mask."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.numel() != num_tokens:
        return None
    return attention_mask.reshape(-1).to(device=device, dtype=torch.float32)


def load_balancing_loss_func(
    router_logits: tuple[torch.Tensor, ...],
    expert_biases: list[torch.Tensor],
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Switch-style auxiliary balancing loss adapted to sigmoid routing, averaged over MoE layers.

    Per layer: `E * sum_i f_i * P_i`, where `f_i` is the fraction of routed slots that chose expert `i` (selection uses
    the expert bias, as the forward pass does) and `P_i` the mean normalised sigmoid affinity of expert `i`. It is 1
    for a perfectly balanced router. Padding tokens are excluded when a 2-D attention mask is given.
    """
    losses = []
    for logits, bias in zip(router_logits, expert_biases):
        num_tokens, num_experts = logits.shape
        scores = logits.float().sigmoid()
        selected = torch.topk(scores + bias.to(scores.device), top_k, dim=-1).indices
        slots = F.one_hot(selected, num_experts).sum(dim=1).float()  # (tokens, experts)
        affinity = scores / scores.sum(dim=-1, keepdim=True)
        mask = _token_mask(attention_mask, num_tokens, logits.device)
        weights = torch.ones(num_tokens, device=logits.device) if mask is None else mask
        fraction_routed = (slots * weights[:, None]).sum(0) / (weights.sum() * top_k)
        mean_affinity = (affinity * weights[:, None]).sum(0) / weights.sum()
        losses.append(num_experts * (fraction_routed * mean_affinity).sum())
    return torch.stack(losses).mean()


def router_z_loss_func(router_logits: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean squared log-sum-exp of the router logits, averaged over MoE layers."""
    losses = []
    for logits in router_logits:
        z_squared = torch.logsumexp(logits.float(), dim=-1).pow(2)
        mask = _token_mask(attention_mask, logits.shape[0], logits.device)
        losses.append(z_squared.mean() if mask is None else (z_squared * mask).sum() / mask.sum())
    return torch.stack(losses).mean()


class MobileMoEForCausalLM(MobileMoEPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: MobileMoEConfig):
        super().__init__(config)
        self.model = MobileMoEModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def moe_blocks(self) -> list[MobileMoESparseMoeBlock]:
        """The MoE blocks, in layer order (training code reads their `expert_load` and updates `expert_bias`)."""
        return [layer.feed_forward for layer in self.model.layers if layer.is_moe_layer]

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Labels for the language-modelling loss (shifted inside); `-100` entries are ignored.
        output_router_logits (`bool`, *optional*):
            Return every MoE layer's FP32 router logits. Also switched on when the auxiliary or z-loss coefficient is
            non-zero and `labels` are given, since those losses need them.

        Example:

        ```python
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer
        >>> import modeling_mobilemoe  # registers the "mobilemoe" model type
        >>> model = AutoModelForCausalLM.from_pretrained("facebook/MobileMoE-S-SFT")
        >>> tokenizer = AutoTokenizer.from_pretrained("facebook/MobileMoE-S-SFT")
        >>> inputs = tokenizer("The capital of France is", return_tensors="pt")
        >>> tokenizer.decode(model.generate(**inputs, max_new_tokens=8)[0])
        ```"""
        output_router_logits = (
            output_router_logits if output_router_logits is not None else self.config.output_router_logits
        )
        balancing = self.config.router_aux_loss_coef > 0 or self.config.router_z_loss_coef > 0
        output_router_logits = output_router_logits or (labels is not None and balancing)

        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **kwargs,
        )

        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)

        aux_loss = None
        if output_router_logits and outputs.router_logits:
            expert_biases = [block.expert_bias for block in self.moe_blocks()]
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, expert_biases, self.config.num_experts_per_tok, attention_mask
            )
            if loss is not None and balancing:
                z_loss = router_z_loss_func(outputs.router_logits, attention_mask)
                loss = loss + self.config.router_aux_loss_coef * aux_loss.to(loss.device)
                loss = loss + self.config.router_z_loss_coef * z_loss.to(loss.device)

        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )


# ------------------------------------------------------------------------------------------------------------------
# Loading the published packed INT4 format (`quantization.format == "mobilemoe-int4-g32"`)


def _int4_byte_values() -> torch.Tensor:
    """`[256, 2]`: the two two's-complement int4 values of every byte, low nibble first, as float32."""
    nibbles = torch.stack((torch.arange(256) % 16, torch.arange(256) // 16), dim=-1)
    return (nibbles - 16 * (nibbles >= 8)).float()


# Unpacking is one `embedding` lookup per byte into this table: exported programs run it too, when they dequantize
# gathered experts, and runtimes execute it as row copies (ExecuTorch decode of a 2-layer S-shaped model: 4.3 tok/s
# with nibble arithmetic, 19 tok/s with lookups, measured with benchmarks/bench_export.py).
_INT4_BYTE_VALUES = _int4_byte_values()


def _int4_values(qweight: torch.Tensor) -> torch.Tensor:
    bytes_as_index = qweight.to(torch.uint8).to(torch.int32)  # uint8 on disk; an int8 copy reads the same bits
    return F.embedding(bytes_as_index, _INT4_BYTE_VALUES.to(qweight.device)).flatten(-2)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., n/2]` -> int8 `[..., n]`: two's-complement nibbles, low nibble first."""
    return _int4_values(qweight).to(torch.int8)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`value = q * scale` with one scale per group of `group_size` consecutive values along the last dim."""
    values = _int4_values(qweight)
    group_size = INT4_FORMAT_FIELDS["group_size"]
    if values.shape[-1] != scale.shape[-1] * group_size or values.shape[:-1] != scale.shape[:-1]:
        raise ValueError(
            f"Packed INT4 tensor of {tuple(values.shape)} values does not fit scales of shape {tuple(scale.shape)} "
            f"with group size {group_size}."
        )
    grouped = values.unflatten(-1, (scale.shape[-1], group_size)) * scale.float()[..., None]
    return grouped.flatten(-2).to(dtype)


class MobileMoEDequantizeInt4(ConversionOps):
    """Loader op: (`qweight`, `scale`) of one tensor -> its dense weight in the dtype of the model parameter."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, model=None, full_layer_name=None, **kwargs):
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        missing = [pattern for pattern in source_patterns if pattern not in tensors]
        if missing:
            raise ValueError(f"{full_layer_name}: packed INT4 checkpoint lacks {missing} ({INT4_FORMAT}).")
        qweight, scale = (tensors[pattern] for pattern in source_patterns)
        dtype = torch.float32
        if model is not None:  # the parameter itself: QAT wrappers may read it through a property
            module_name, _, name = full_layer_name.rpartition(".")
            dtype = model.get_submodule(module_name)._parameters[name].dtype
        return {target_patterns[0]: dequantize_int4(qweight, scale, dtype)}


def int4_dequantize_converters() -> list[WeightConverter]:
    """Key mapping of the packed format. Expert patterns come first: `qweight` would also match `gate_up_qweight`."""
    return [
        WeightConverter(
            [rf"feed_forward\.experts\.{name}_qweight", rf"feed_forward\.experts\.{name}_scale"],
            f"feed_forward.routed_experts.{name}_proj",
            [MobileMoEDequantizeInt4(), Transpose(1, 2)],
        )
        for name in ("gate_up", "down")
    ] + [WeightConverter(["qweight", "weight_scale"], "weight", [MobileMoEDequantizeInt4()])]


# Checkpoints store experts as `feed_forward.experts.* [E, in, out]` (the released layout); the model keeps them as
# `feed_forward.routed_experts.*` in `nn.Linear` layout. The new name is what tells the layouts apart (a checkpoint
# saved with `save_original_format=False` is already converted): shapes cannot, since for MobileMoE-S both layouts of
# `gate_up_proj` are [60, 768, 768].
register_checkpoint_conversion_mapping(
    MobileMoEConfig.model_type,
    [
        WeightConverter(rf"feed_forward\.experts\.{name}", f"feed_forward.routed_experts.{name}", [Transpose(1, 2)])
        for name in ("gate_up_proj", "down_proj")
    ],
    overwrite=True,
)


__all__ = ["MobileMoEForCausalLM", "MobileMoEModel", "MobileMoEPreTrainedModel"]
