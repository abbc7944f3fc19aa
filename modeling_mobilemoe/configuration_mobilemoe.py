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
"""MobileMoE model configuration.

Self-contained (imports only transformers and huggingface_hub) so that it can travel with a checkpoint as remote code.
"""

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig
from transformers.modeling_rope_utils import RopeParameters


# The packed INT4 format of Meta's QAT release: what `quantization` in config.json must say, key by key.
INT4_FORMAT = "mobilemoe-int4-g32"
INT4_FORMAT_FIELDS = {
    "format": INT4_FORMAT,
    "group_size": 32,
    "embedding_group_size": 32,
    "qmin": -8,
    "qmax": 7,
    "symmetric": True,
    "packed": True,
    "scale_dtype": "float16",
    "linear_group_axis": "in (last dim of [out, in])",
    "expert_group_axis": "out (last dim of [E, in, out])",
}

# Llama-3 RoPE exactly as the released checkpoints use it. `low_freq_factor == high_freq_factor` is intended: there is
# no smoothly interpolated band, every frequency is either kept or divided by `factor`.
DEFAULT_ROPE_PARAMETERS = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 16.0,
    "original_max_position_embeddings": 8192,
    "low_freq_factor": 1.0,
    "high_freq_factor": 1.0,
}

_COMMON_SHAPE = {
    "vocab_size": 128256,
    "head_dim": 64,
    "num_key_value_heads": 4,
    "num_local_experts": 60,
    "num_experts_per_tok": 4,
    "max_position_embeddings": 8192,
}
# Table "Sizes" of the spec. Expert width is d/2 and shared width 2d (E=8, g=8: 64 units of 4d/8, 4 of them shared).
PRESETS: dict[str, dict[str, Any]] = {
    "S": {**_COMMON_SHAPE, "num_hidden_layers": 20, "hidden_size": 768, "num_attention_heads": 12},
    "M": {**_COMMON_SHAPE, "num_hidden_layers": 26, "hidden_size": 1024, "num_attention_heads": 16},
    "L": {**_COMMON_SHAPE, "num_hidden_layers": 32, "hidden_size": 1280, "num_attention_heads": 20},
    # A CPU-sized model with the same structure, sized for the shipped 2048-token tokenizer and the demo.
    "tiny": {
        "vocab_size": 2048,
        "head_dim": 32,
        "num_key_value_heads": 2,
        "num_local_experts": 16,
        "num_experts_per_tok": 4,
        "max_position_embeddings": 2048,
        "num_hidden_layers": 4,
        "hidden_size": 128,
        "num_attention_heads": 4,
        "rope_parameters": {**DEFAULT_ROPE_PARAMETERS, "original_max_position_embeddings": 2048},
        # Ids of the shipped tokenizer: 2032 byte-level BPE tokens, then the Llama-3 specials. Generation stops at
        # <|end_of_text|> or at the chat turn's <|eot_id|>.
        "bos_token_id": 2032,
        "eos_token_id": [2033, 2041],
        "pad_token_id": 2036,
    },
}
for _preset in PRESETS.values():
    _preset.setdefault("intermediate_size", _preset["hidden_size"] // 2)
    _preset.setdefault("intermediate_size_mlp", _preset["hidden_size"] * 2)


@strict
class MobileMoEConfig(PreTrainedConfig):
    r"""
    Configuration of a MobileMoE model: a decoder-only transformer whose feed-forward blocks are fine-grained
    mixtures of experts (sigmoid top-k routing with a selection-only expert bias, plus one ungated shared expert).
    The defaults give MobileMoE-S; [`~MobileMoEConfig.from_preset`] gives S, M, L and a CPU-sized "tiny" model. Key
    names follow the released `config.json` (Llama-4 naming); legacy `rope_theta`/`rope_scaling` are accepted and
    stored as `rope_parameters`.

    Args:
        vocab_size (`int`, defaults to 128256): Vocabulary size (Llama-3 tokenizer).
        hidden_size (`int`, defaults to 768): Width of the residual stream.
        intermediate_size (`int`, defaults to 384): Width of each routed expert.
        intermediate_size_mlp (`int`, defaults to 1536): Width of the shared expert, and of the dense FFN of layers
            that are not MoE layers.
        num_hidden_layers (`int`, defaults to 20): Number of decoder layers.
        num_attention_heads (`int`, defaults to 12): Query heads.
        num_key_value_heads (`int`, defaults to 4): Key/value heads (grouped-query attention).
        head_dim (`int`, defaults to 64): Width of one attention head.
        hidden_act (`str`, defaults to `"silu"`): Activation of the SwiGLU experts.
        max_position_embeddings (`int`, defaults to 8192): Longest context the model is meant for.
        initializer_range (`float`, defaults to 0.02): Std of the normal initializer.
        rms_norm_eps (`float`, defaults to 1e-5): Epsilon of the RMSNorms and of the weightless QK-norm.
        use_cache (`bool`, defaults to `True`): Whether to return the KV cache.
        tie_word_embeddings (`bool`, defaults to `True`): Tie the LM head to the input embedding.
        rope_parameters (`dict`, *optional*): RoPE type and parameters; defaults to Llama-3 scaling (theta 5e5,
            factor 16, original context 8192, low/high frequency factors 1).
        attention_bias (`bool`, defaults to `False`): Biases on the q/k/v/o projections.
        attention_dropout (`float`, defaults to 0.0): Dropout on attention probabilities.
        use_qk_norm (`bool`, defaults to `True`): Weightless RMS normalisation of q and k after RoPE.
        attn_temperature_tuning (`bool`, defaults to `False`): Llama-4's NoPE temperature tuning; MobileMoE does not
            use it and only `False` is supported.
        num_local_experts (`int`, defaults to 60): Routed experts per MoE layer.
        num_experts_per_tok (`int`, defaults to 4): Routed experts each token uses (top-k).
        interleave_moe_layer_step (`int`, defaults to 1): Layer `i` is an MoE layer when `(i + 1) % step == 0`, else
            a dense SwiGLU layer of width `intermediate_size_mlp`.
        no_rope_layers (`list[int]`, *optional*): Per layer, 1 if the layer uses RoPE and 0 if not (Llama-4
            convention). Defaults to RoPE everywhere.
        layer_types (`list[str]`, *optional*): Per-layer attention type; only `"full_attention"` exists.
        routed_scaling_factor (`float`, defaults to 2.5): Multiplier of the normalised routing weights.
        norm_topk_prob (`bool`, defaults to `True`): Normalise the k selected sigmoid scores to sum to one.
        output_router_logits (`bool`, defaults to `False`): Return router logits (and the auxiliary loss).
        router_aux_loss_coef (`float`, defaults to 0.0): Weight of the optional load-balancing loss. MobileMoE
            balances with the expert bias instead, so it is off by default.
        router_z_loss_coef (`float`, defaults to 0.0): Weight of the optional router z-loss.
        expert_bias_update_rate (`float`, defaults to 1e-3): Step of the aux-loss-free bias update
            (`bias += rate * sign(mean_load - load)`) that training code applies.
        quantization (`dict`, *optional*): Set by packed INT4 checkpoints (`{"format": "mobilemoe-int4-g32", ...}`).

    ```python
    >>> from modeling_mobilemoe import MobileMoEConfig
    >>> config = MobileMoEConfig.from_preset("S")
    >>> round(config.num_active_parameters() / 1e6), round(config.num_parameters() / 1e9, 2)
    (272, 1.26)
    ```
    """

    model_type = "mobilemoe"
    keys_to_ignore_at_inference = ["past_key_values"]
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.feed_forward.shared_expert.gate_proj": "colwise",
        "layers.*.feed_forward.shared_expert.up_proj": "colwise",
        "layers.*.feed_forward.shared_expert.down_proj": "rowwise",
        "layers.*.feed_forward.gate_proj": "colwise",
        "layers.*.feed_forward.up_proj": "colwise",
        "layers.*.feed_forward.down_proj": "rowwise",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    vocab_size: int = 128256
    hidden_size: int = 768
    intermediate_size: int = 384
    intermediate_size_mlp: int = 1536
    num_hidden_layers: int = 20
    num_attention_heads: int = 12
    num_key_value_heads: int = 4
    head_dim: int = 64
    hidden_act: str = "silu"
    max_position_embeddings: int = 8192
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    tie_word_embeddings: bool = True
    rope_parameters: RopeParameters | dict | None = None
    attention_bias: bool = False
    attention_dropout: float | int = 0.0
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = False
    num_local_experts: int = 60
    num_experts_per_tok: int = 4
    interleave_moe_layer_step: int = 1
    no_rope_layers: list[int] | None = None
    layer_types: list[str] | None = None
    routed_scaling_factor: float | int = 2.5
    norm_topk_prob: bool = True
    output_router_logits: bool = False
    router_aux_loss_coef: float | int = 0.0
    router_z_loss_coef: float | int = 0.0
    expert_bias_update_rate: float | int = 1e-3
    quantization: dict | None = None
    pad_token_id: int | None = None
    bos_token_id: int | None = 128000
    eos_token_id: int | list[int] | None = 128001

    def __post_init__(self, **kwargs):
        # Released config.json files carry legacy `rope_theta`/`rope_scaling` (an explicit `rope_scaling: null` means
        # plain RoPE); a config that names no RoPE at all gets MobileMoE's Llama-3 scaling.
        if self.rope_parameters is None and "rope_scaling" not in kwargs and "rope_theta" not in kwargs:
            self.rope_parameters = {**DEFAULT_ROPE_PARAMETERS}
        if self.no_rope_layers is None:
            self.no_rope_layers = [1] * self.num_hidden_layers
        if self.layer_types is None:
            self.layer_types = ["full_attention"] * self.num_hidden_layers
        super().__post_init__(**kwargs)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "MobileMoEConfig":
        """The published S/M/L shapes or the CPU-sized `"tiny"` one; keyword arguments override single fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown MobileMoE preset {name!r}; choose one of {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})

    # ----------------------------------------------------------------------------------------------------------------
    # Validation (run by `@strict` after init and before every save, validators in alphabetical order)

    def validate_architecture(self):
        super().validate_architecture()
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "intermediate_size_mlp",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "num_local_experts",
            "num_experts_per_tok",
            "interleave_moe_layer_step",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {getattr(self, name)}.")
        for name in ("rms_norm_eps", "routed_scaling_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be > 0, got {getattr(self, name)}.")
        for name in ("router_aux_loss_coef", "router_z_loss_coef", "expert_bias_update_rate", "attention_dropout"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0, got {getattr(self, name)}.")

    def validate_attention(self):
        if self.num_attention_heads * self.head_dim != self.hidden_size:
            raise ValueError(
                f"`num_attention_heads` x `head_dim` ({self.num_attention_heads} x {self.head_dim} = "
                f"{self.num_attention_heads * self.head_dim}) must equal `hidden_size` ({self.hidden_size})."
            )
        if self.head_dim % 2:
            raise ValueError(f"`head_dim` must be even for rotary embeddings, got {self.head_dim}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads}) for grouped-query attention."
            )
        if self.attn_temperature_tuning:
            raise ValueError("`attn_temperature_tuning=True` is not supported by MobileMoE; set it to False.")

    def validate_moe(self):
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) must be <= `num_local_experts` "
                f"({self.num_local_experts})."
            )
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"`hidden_act` must be 'silu' (SwiGLU experts), got {self.hidden_act!r}.")

    def validate_layer_lists(self):
        for name in ("no_rope_layers", "layer_types"):
            values = getattr(self, name)
            if len(values) != self.num_hidden_layers:
                raise ValueError(
                    f"`{name}` must have one entry per layer (num_hidden_layers={self.num_hidden_layers}), "
                    f"got {len(values)}: {values}."
                )
        if any(value not in (0, 1) for value in self.no_rope_layers):
            raise ValueError(f"`no_rope_layers` entries must be 1 (RoPE) or 0 (NoPE), got {self.no_rope_layers}.")
        if any(value != "full_attention" for value in self.layer_types):
            raise ValueError(f"`layer_types` entries must be 'full_attention', got {self.layer_types}.")

    def validate_quantization(self):
        if self.quantization is None:
            return
        quant_format = self.quantization.get("format")
        if quant_format != INT4_FORMAT:
            raise ValueError(
                f"`quantization.format` {quant_format!r} is not a known MobileMoE checkpoint format; "
                f"supported: [{INT4_FORMAT!r}]."
            )
        for key, expected in INT4_FORMAT_FIELDS.items():
            if key in self.quantization and self.quantization[key] != expected:
                raise ValueError(
                    f"`quantization.{key}` must be {expected!r} for {INT4_FORMAT!r}, got {self.quantization[key]!r}."
                )
        group_size = INT4_FORMAT_FIELDS["group_size"]
        # Linears and the embedding are grouped along their input dim, experts along their output dim.
        grouped_dims = {
            "hidden_size": self.hidden_size,
            "intermediate_size_mlp": self.intermediate_size_mlp,
            "2 * intermediate_size": 2 * self.intermediate_size,
            "num_attention_heads * head_dim": self.num_attention_heads * self.head_dim,
        }
        for name, size in grouped_dims.items():
            if size % group_size:
                raise ValueError(
                    f"`{name}` ({size}) must be a multiple of the INT4 group size {group_size} for {INT4_FORMAT!r}."
                )

    def _validate_llama3_rope_parameters(self, rope_parameters: dict, ignore_keys: set | None = None) -> None:
        # Replaces transformers' check, which warns on the released `low_freq_factor == high_freq_factor` and on
        # `original_max_position_embeddings == max_position_embeddings`; both are valid here.
        required = {"rope_type", "rope_theta", "factor", "original_max_position_embeddings"}
        required |= {"low_freq_factor", "high_freq_factor"}
        self._check_received_keys("llama3", set(rope_parameters), required, ignore_keys=ignore_keys)
        if rope_parameters["factor"] < 1:
            raise ValueError(f"`rope_parameters.factor` must be >= 1, got {rope_parameters['factor']}.")
        if rope_parameters["high_freq_factor"] < rope_parameters["low_freq_factor"]:
            raise ValueError(
                "`rope_parameters.high_freq_factor` must be >= `low_freq_factor`, got "
                f"{rope_parameters['high_freq_factor']} < {rope_parameters['low_freq_factor']}."
            )

    # ----------------------------------------------------------------------------------------------------------------
    # Accounting (the paper's counts: tied embedding counted once, in total and in active parameters)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return (layer_idx + 1) % self.interleave_moe_layer_step == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    def _parameter_groups(self) -> dict[str, int]:
        """Parameter counts by kind, for the whole model (routed experts: all of them)."""
        hidden, layers, moe_layers = self.hidden_size, self.num_hidden_layers, self.num_moe_layers
        q_width = self.num_attention_heads * self.head_dim
        kv_width = self.num_key_value_heads * self.head_dim
        attention = hidden * (q_width + 2 * kv_width) + q_width * hidden
        if self.attention_bias:
            attention += q_width + 2 * kv_width + hidden
        swiglu_mlp = 3 * hidden * self.intermediate_size_mlp
        return {
            "embedding": self.vocab_size * hidden,
            "lm_head": 0 if self.tie_word_embeddings else self.vocab_size * hidden,
            "attention": layers * attention,
            "shared_or_dense_mlp": layers * swiglu_mlp,
            "routed_experts": moe_layers * self.num_local_experts * 3 * hidden * self.intermediate_size,
            "router": moe_layers * self.num_local_experts * hidden,
            "expert_bias": moe_layers * self.num_local_experts,
            "norms": (2 * layers + 1) * hidden,
        }

    def num_parameters(self) -> int:
        """Total parameter count (persistent buffers such as `expert_bias` included)."""
        return sum(self._parameter_groups().values())

    def num_active_parameters(self) -> int:
        """Parameters one token touches: everything but the routed experts it does not select."""
        groups = self._parameter_groups()
        unselected = self.num_local_experts - self.num_experts_per_tok
        groups["routed_experts"] -= self.num_moe_layers * unselected * 3 * self.hidden_size * self.intermediate_size
        return sum(groups.values())

    def flops_per_token(self, context_length: int = 0) -> int:
        """Forward FLOPs for one token attending to `context_length` earlier tokens.

        2 FLOPs per multiply-add of every weight matrix the token uses (attention projections, router, its top-k
        experts, the shared expert, the LM head; the embedding lookup is free), plus 4 * head_dim per head and
        layer per attended position (q.k and p.v).
        """
        groups = self._parameter_groups()
        unselected = self.num_local_experts - self.num_experts_per_tok
        matmul_params = (
            groups["attention"]
            + groups["shared_or_dense_mlp"]
            + groups["router"]
            + groups["routed_experts"]
            - self.num_moe_layers * unselected * 3 * self.hidden_size * self.intermediate_size
            + self.vocab_size * self.hidden_size
        )
        attention = 4 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * (context_length + 1)
        return 2 * matmul_params + attention

    def int4_weight_bytes(self) -> int:
        """Bytes of the weights in the `mobilemoe-int4-g32` format.

        Every linear, expert and the embedding: 4 bits per weight plus one fp16 scale per group of 32. The router
        and `expert_bias` stay fp32 and the norms bf16, as in the released QAT checkpoints.
        """
        groups = self._parameter_groups()
        quantized = sum(groups[k] for k in ("embedding", "lm_head", "attention", "shared_or_dense_mlp"))
        quantized += groups["routed_experts"]
        group_size = INT4_FORMAT_FIELDS["group_size"]
        return quantized // 2 + 2 * (quantized // group_size) + 4 * (groups["router"] + groups["expert_bias"]) + (
            2 * groups["norms"]
        )


__all__ = ["MobileMoEConfig"]
