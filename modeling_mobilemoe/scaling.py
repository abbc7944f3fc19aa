"""The on-device MoE scaling rules as a planner: the best MobileMoE shape for a memory (and compute) budget.

The MobileMoE paper picks the MoE shape jointly under a phone's memory and compute budgets and lands on E=8, g=8 with
one shared expert (60 routed experts + a shared one, top-4) for all three sizes. This module turns that into a tool:

- `MoEShape` spells a shape the way the paper does. Expansion `E` and granularity `g` cut the FFN of a dense model
  of width `d` (one SwiGLU of width `4d`) into `E * g` units of width `4d / g`; `E` times the dense FFN's parameters,
  one dense FFN of compute per token. "One shared expert" makes `g / 2` units (width `2d`) always active, and the
  token picks `g / 2` of the other `E * g - g / 2`; without it the token picks `g` of `E * g`. `E = 1` is the dense
  model. E=8, g=8 with a shared expert gives the published 60 routed experts of width `d/2`, top-4, shared width
  `2d`: 4 routed + 4 shared units = one dense `4d` FFN.
- `architecture_fields` / `shape_config` build the `MobileMoEConfig` of a shape; every count the planner uses comes
  from the config's accounting helpers (`int4_weight_bytes`, `num_parameters`, `num_active_parameters`,
  `flops_per_token`) plus `kv_cache_bytes`.
- `LossModel` scores a config (form and the source of every coefficient in its docstring).
- `plan` enumerates shapes under the budget and returns the best, `Candidate.config` ready to use.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

from .configuration_mobilemoe import INT4_FORMAT_FIELDS, MobileMoEConfig


GB = 2**30
"""Bytes in the paper's "GB": its INT4 memory of M (1.48 GB) is 1.482 GiB by `int4_weight_bytes` (1.59e9 bytes)."""

PAPER_TOKENS = 6e12
"""Pre-training tokens of the released models (spec, training recipe)."""

NO_SHARED_WIDTH = INT4_FORMAT_FIELDS["group_size"]
"""`MobileMoEConfig` always builds a shared expert, so "no shared expert" is the narrowest one the INT4 format can
pack: one group of 32 columns (3 * 32 * d weights per layer, under 1% of a `4d` FFN at d >= 1024). The accounting
counts it exactly."""

DEFAULT_HIDDEN_SIZES = tuple(range(256, 4097, 256))
"""Widths searched: multiples of 256, so that with head_dim 64 the query heads split into 4 KV groups."""

DEFAULT_MAX_LAYERS = 64


# --------------------------------------------------------------------------------------------------------------------
# Shapes and their configs


@dataclass(frozen=True)
class MoEShape:
    """An FFN shape in the paper's terms: expansion `E`, granularity `g`, with or without one shared expert."""

    expansion: int
    granularity: int = 1
    shared_expert: bool = False

    def __post_init__(self):
        for name in ("expansion", "granularity"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.shared_expert and not self.is_dense and self.granularity % 2:
            raise ValueError(
                f"`shared_expert` needs an even `granularity` (the shared expert is g/2 of the g active units), "
                f"got granularity={self.granularity}."
            )

    @property
    def is_dense(self) -> bool:
        """E = 1: all `g` units are active, which is one dense FFN of width `4d` whatever `g` and the split are."""
        return self.expansion == 1

    @property
    def shared_units(self) -> int:
        return self.granularity // 2 if self.shared_expert and not self.is_dense else 0

    @property
    def num_experts(self) -> int:
        """Routed experts (0 for dense)."""
        return 0 if self.is_dense else self.expansion * self.granularity - self.shared_units

    @property
    def top_k(self) -> int:
        """Routed experts per token: the active units that are not the shared expert."""
        return 0 if self.is_dense else self.granularity - self.shared_units

    @property
    def name(self) -> str:
        if self.is_dense:
            return "dense"
        return f"E{self.expansion}-g{self.granularity}" + ("-shared" if self.shared_expert else "")


PUBLISHED_SHAPE = MoEShape(8, 8, shared_expert=True)

DEFAULT_SHAPES: tuple[MoEShape, ...] = (MoEShape(1),) + tuple(
    MoEShape(expansion, granularity, shared)
    for expansion in (2, 4, 8, 16)
    for granularity in (1, 2, 4, 8, 16)
    for shared in (False, True)
    if not (shared and granularity == 1)
)
"""Dense plus E in {2, 4, 8, 16} x g in {1, 2, 4, 8, 16} x shared expert on/off (a shared expert needs g >= 2)."""


def architecture_fields(
    num_layers: int, hidden_size: int, shape: MoEShape, *, head_dim: int = 64, num_key_value_heads: int = 4
) -> dict[str, Any]:
    """The `MobileMoEConfig` fields of a shape at a given depth and width (heads: `hidden_size / head_dim`).

    A dense shape is a config whose layers are all dense SwiGLU layers of width `4d` (`interleave_moe_layer_step`
    past the last layer, so no layer is an MoE layer; the routed-expert fields are then unused).
    """
    if hidden_size % head_dim:
        raise ValueError(f"`hidden_size` ({hidden_size}) must be a multiple of `head_dim` ({head_dim}).")
    if 4 * hidden_size % shape.granularity:
        raise ValueError(f"`granularity` ({shape.granularity}) must divide 4 * hidden_size ({4 * hidden_size}).")
    fields = {
        "num_hidden_layers": num_layers,
        "hidden_size": hidden_size,
        "num_attention_heads": hidden_size // head_dim,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
    }
    unit_width = 4 * hidden_size // shape.granularity
    if shape.is_dense:
        return {
            **fields,
            "intermediate_size": unit_width,
            "intermediate_size_mlp": 4 * hidden_size,
            "num_local_experts": 1,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": num_layers + 1,
        }
    return {
        **fields,
        "intermediate_size": unit_width,
        "intermediate_size_mlp": shape.shared_units * unit_width if shape.shared_expert else NO_SHARED_WIDTH,
        "num_local_experts": shape.num_experts,
        "num_experts_per_tok": shape.top_k,
        "interleave_moe_layer_step": 1,
    }


def shape_config(
    num_layers: int, hidden_size: int, shape: MoEShape, *, vocab_size: int = 128256, **overrides
) -> MobileMoEConfig:
    """A `MobileMoEConfig` (MobileMoE defaults: RoPE, norms, routing) of the shape; `overrides` set other fields."""
    head_dim = overrides.pop("head_dim", 64)
    kv_heads = overrides.pop("num_key_value_heads", 4)
    fields = architecture_fields(num_layers, hidden_size, shape, head_dim=head_dim, num_key_value_heads=kv_heads)
    return MobileMoEConfig(vocab_size=vocab_size, **fields, **overrides)


def weight_bytes(config: MobileMoEConfig, int4: bool = True) -> int:
    """Weight memory: the packed `mobilemoe-int4-g32` format, or bf16 (2 bytes per parameter) when `int4=False`."""
    return config.int4_weight_bytes() if int4 else 2 * config.num_parameters()


def kv_cache_bytes(config: MobileMoEConfig, context_length: int, bytes_per_value: int = 2) -> int:
    """Keys and values of every layer for `context_length` tokens: `2 * layers * kv_heads * head_dim * context`
    values (bf16 by default)."""
    if context_length < 0:
        raise ValueError(f"`context_length` must be >= 0, got {context_length}.")
    values = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * context_length
    return values * bytes_per_value


def non_embedding_active_parameters(config: MobileMoEConfig) -> int:
    """The `N` of the loss model: active parameters without the (tied) embedding and without the router and its bias
    (they pick experts, they add no capacity; left in, 124 routed experts would out-score 60 by their router alone)."""
    groups = config._parameter_groups()
    not_capacity = groups["embedding"] + groups["lm_head"] + groups["router"] + groups["expert_bias"]
    return config.num_active_parameters() - not_capacity


# --------------------------------------------------------------------------------------------------------------------
# The loss model


@dataclass(frozen=True)
class LossModel:
    r"""Predicted pre-training loss of a shape, the planner's score.

    Form (nats per token; `N` = active parameters without the embedding and the router, from the config's accounting;
    `D` training tokens; `d` the width, `L` the depth):

        loss   = L_inf + A / N_eff^alpha + B / D^beta
        N_eff  = N * E_hat^w(N) * G(g) * S * W(d) * R(d / L)       (E_hat, G, S are 1 for dense)
        E_hat  = E * E_max / (E + E_max - 1)                        expansion, saturating at E_max
        w(N)   = w_max / (1 + (N_half / N)^p)                       how much of E_hat a model of size N uses
        G(g)   = (a_g + 1) / (a_g + g^-gamma_g)                     granularity, saturating
        S      = 1 + s with a shared expert                         shared expert
        W(d)   = 1 / (1 + (d_0 / d)^2)                              narrow models underperform their size
        R      = exp(-c * ln(d / (L * r_0))^2)                      aspect ratio

    Where the coefficients come from:

    - `L_inf, A, alpha, B, beta = 1.69, 406.4, 0.34, 410.7, 0.28`: Chinchilla's dense fit (Hoffmann et al. 2022,
      approach 3). Chinchilla counts embeddings in `N`; here they are left out (as Kaplan et al. 2020 do), because
      with a 128k vocabulary they are a large share of an on-device model's memory and buy little loss.
    - Everything else is *calibrated by hand* to the MobileMoE paper's stated findings, not fitted to losses: the
      paper states findings, not a loss table, and the tiny sweep here is far too small to fit an exponent. The forms
      follow the literature: a bounded expert count (Clark et al. 2022, simplified), an expansion benefit that grows
      with model size (Ludziejewski et al. 2025 let the `N` exponent depend on `ln E`), a saturating granularity term
      on the `N` term (Krajewski et al. 2024), the softmax bottleneck of narrow models (Godey et al. 2024). The
      calibration targets, all checked in `tests/test_scaling.py`:
      - `E_max = 12, w_max = 1.85, N_half = 6e7, p = 3`: at the memory of S, M and L (0.68 / 1.48 / 2.75 GB INT4)
        E=8 beats E=4 and E=16 (at equal memory E=16 halves the active parameters for a small `E_hat` gain: "E
        beyond 8 brings little"), and the published shape beats the best dense model from ~0.25 GB on ("MoE beats
        dense once memory exceeds ~0.25 GB"; below, the experts of such small models add little). The same terms
        make E=2 or E=4 the best MoE between 0.1 and ~0.4 GB.
      - `a_g = 2, gamma_g = 3`: g=16 is ~0.1% better than g=8 in `N_eff`, g=8 ~0.7% better than g=4 and ~50%
        better than g=1 ("g=16 barely beats g=8").
      - `s = 0.03`: "a shared expert helps at equal compute", by a few percent of `N_eff`.
      - `d_0 = 150`: a mild width penalty (4% at d=768, 8% at d=512) that stops the search from trading width for
        depth without limit; `r_0 = 39` is the `d / L` of the published S, M and L (768/20, 1024/26, 1280/32), and
        `c = 0.1` keeps that penalty mild (Kaplan et al. find loss flat within a few percent over a wide band of
        aspect ratios).

    Training time does not enter the loss (every shape trains on `D` tokens); it breaks near-ties in the ranking:
    `score = loss + time_penalty * log2(train_time)`, with `train_time = 1 + routing_cost * top_k` the training time
    per token relative to a dense model of the same active compute. `routing_cost = 0.25` reproduces the paper's
    "g=16 ... at ~50% more training time" than g=8 (top-8 vs top-4 routed experts); `time_penalty = 0.0004` nats per
    doubling only decides between shapes the loss puts within a few 1e-4 nats of each other (g=8 against g=16). The
    tiny sweep (`benchmarks/scaling_sweep.py`, README) shows how little of this is visible at 0.5 MB of weights,
    which is what the model predicts too: `w(N)` vanishes far below `N_half`.
    """

    irreducible: float = 1.69
    a: float = 406.4
    alpha: float = 0.34
    b: float = 410.7
    beta: float = 0.28
    expansion_weight: float = 1.85
    expansion_half_size: float = 6.0e7
    expansion_steepness: float = 3.0
    max_expansion: float = 12.0
    granularity_floor: float = 2.0
    granularity_exponent: float = 3.0
    shared_expert_gain: float = 0.03
    width_scale: float = 150.0
    aspect_ratio: float = 39.0
    aspect_penalty: float = 0.1
    routing_cost: float = 0.25
    time_penalty: float = 0.0004

    def effective_expansion(self, shape: MoEShape) -> float:
        e, e_max = shape.expansion, self.max_expansion
        return e * e_max / (e + e_max - 1)

    def effective_parameters(self, parameters: float, hidden_size: int, num_layers: int, shape: MoEShape) -> float:
        """`N_eff`, the dense-equivalent size, of `parameters` active non-embedding parameters in this shape."""
        multiplier = 1.0
        if not shape.is_dense:
            weight = self.expansion_weight / (1 + (self.expansion_half_size / parameters) ** self.expansion_steepness)
            multiplier *= self.effective_expansion(shape) ** weight
            floor, exponent = self.granularity_floor, self.granularity_exponent
            multiplier *= (floor + 1) / (floor + shape.granularity**-exponent)
            multiplier *= 1 + self.shared_expert_gain * shape.shared_expert
        multiplier /= 1 + (self.width_scale / hidden_size) ** 2
        aspect = math.log(hidden_size / (num_layers * self.aspect_ratio))
        return parameters * multiplier * math.exp(-self.aspect_penalty * aspect**2)

    def predict(
        self, parameters: float, hidden_size: int, num_layers: int, shape: MoEShape, tokens: float = PAPER_TOKENS
    ) -> float:
        """The loss of `parameters` active non-embedding parameters in this shape after `tokens` training tokens."""
        n_eff = self.effective_parameters(parameters, hidden_size, num_layers, shape)
        return self.irreducible + self.a * n_eff**-self.alpha + self.b * tokens**-self.beta

    def loss(self, config: MobileMoEConfig, shape: MoEShape, tokens: float = PAPER_TOKENS) -> float:
        """The predicted loss of a config (`shape` says how its FFN was cut, see `shape_config`)."""
        parameters = non_embedding_active_parameters(config)
        return self.predict(parameters, config.hidden_size, config.num_hidden_layers, shape, tokens)

    def train_time(self, shape: MoEShape) -> float:
        """Training time per token relative to a dense model of the same active compute."""
        return 1.0 + self.routing_cost * shape.top_k

    def score(self, loss: float, shape: MoEShape) -> float:
        """What the planner minimises: the loss plus `time_penalty` per doubling of training time."""
        return loss + self.time_penalty * math.log2(self.train_time(shape))


# --------------------------------------------------------------------------------------------------------------------
# The planner


@dataclass
class Candidate:
    """One planned shape with its accounting and predicted loss."""

    shape: MoEShape
    config: MobileMoEConfig
    weight_bytes: int
    kv_cache_bytes: int
    total_parameters: int
    active_parameters: int
    flops_per_token: int
    loss: float
    train_time: float
    score: float

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.kv_cache_bytes

    def config_dict(self) -> dict[str, Any]:
        """The config as `MobileMoEConfig(**config_dict())` takes it: the fields that differ from the class defaults,
        per-layer lists left out when they are the defaults the config regenerates (RoPE and full attention
        everywhere)."""
        values = self.config.to_diff_dict()
        values.pop("transformers_version", None)
        layers = self.config.num_hidden_layers
        for key, default in (("no_rope_layers", [1] * layers), ("layer_types", ["full_attention"] * layers)):
            if values.get(key) == default:
                del values[key]
        return values

    def summary(self) -> dict[str, Any]:
        """Shape, accounting and prediction as plain values (for JSON)."""
        config = self.config
        return {
            "shape": self.shape.name,
            "expansion": self.shape.expansion,
            "granularity": self.shape.granularity,
            "shared_expert": self.shape.shared_expert,
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "num_local_experts": self.shape.num_experts,
            "num_experts_per_tok": self.shape.top_k,
            "weight_gb": self.weight_bytes / GB,
            "kv_cache_gb": self.kv_cache_bytes / GB,
            "memory_gb": self.memory_bytes / GB,
            "total_parameters": self.total_parameters,
            "active_parameters": self.active_parameters,
            "flops_per_token": self.flops_per_token,
            "predicted_loss": self.loss,
            "train_time": self.train_time,
            "score": self.score,
        }


@dataclass(frozen=True)
class _Accounting:
    """What the search needs of one (depth, width, shape, vocab) point, read off its config's helpers."""

    int4_weight_bytes: int
    bf16_weight_bytes: int
    kv_bytes_per_token: int
    active_parameters: int
    non_embedding_active_parameters: int


@functools.lru_cache(maxsize=1 << 16)
def _accounting(layers: int, hidden: int, shape: MoEShape, vocab_size: int) -> _Accounting:
    config = shape_config(layers, hidden, shape, vocab_size=vocab_size)
    return _Accounting(
        int4_weight_bytes=weight_bytes(config, int4=True),
        bf16_weight_bytes=weight_bytes(config, int4=False),
        kv_bytes_per_token=kv_cache_bytes(config, 1),
        active_parameters=config.num_active_parameters(),
        non_embedding_active_parameters=non_embedding_active_parameters(config),
    )


@dataclass
class _Search:
    """The budget and loss model of one `plan` call, over (depth, width, shape) points."""

    budget_bytes: float
    int4: bool
    max_active_parameters: float | None
    context_length: int
    vocab_size: int
    tokens: float
    loss_model: LossModel

    def memory_bytes(self, layers: int, hidden: int, shape: MoEShape) -> int:
        accounting = _accounting(layers, hidden, shape, self.vocab_size)
        weights = accounting.int4_weight_bytes if self.int4 else accounting.bf16_weight_bytes
        return weights + accounting.kv_bytes_per_token * self.context_length

    def fits(self, layers: int, hidden: int, shape: MoEShape) -> bool:
        if self.memory_bytes(layers, hidden, shape) > self.budget_bytes:
            return False
        active = _accounting(layers, hidden, shape, self.vocab_size).active_parameters
        return self.max_active_parameters is None or active <= self.max_active_parameters

    def score(self, layers: int, hidden: int, shape: MoEShape) -> float:
        parameters = _accounting(layers, hidden, shape, self.vocab_size).non_embedding_active_parameters
        loss = self.loss_model.predict(parameters, hidden, layers, shape, self.tokens)
        return self.loss_model.score(loss, shape)

    def deepest_fitting(self, hidden: int, shape: MoEShape, max_layers: int) -> int:
        """The most layers that fit (0 if not even one): memory and active parameters grow with depth."""
        low, high = 0, max_layers
        while low < high:
            middle = (low + high + 1) // 2
            if self.fits(middle, hidden, shape):
                low = middle
            else:
                high = middle - 1
        return low

    def best_depth(self, hidden: int, shape: MoEShape, max_layers: int) -> int:
        """The best-scoring depth that fits (0: none fits). For a fixed width and shape the score is unimodal in
        depth (a gain that grows with `log N` against the quadratic aspect penalty in `log L`; the tests check this
        search against trying every depth), so the deepest fitting depth wins when the score still falls there, and
        a ternary search finds the minimum otherwise."""
        low, high = 1, self.deepest_fitting(hidden, shape, max_layers)
        if high <= 1 or self.score(high, hidden, shape) <= self.score(high - 1, hidden, shape):
            return high
        while high - low > 2:
            left, right = low + (high - low) // 3, high - (high - low) // 3
            if self.score(left, hidden, shape) <= self.score(right, hidden, shape):
                high = right
            else:
                low = left
        return min(range(low, high + 1), key=lambda layers: self.score(layers, hidden, shape))

    def candidate(self, layers: int, hidden: int, shape: MoEShape) -> Candidate:
        """A point with a fresh config and its accounting, straight from the config's helpers."""
        config = shape_config(layers, hidden, shape, vocab_size=self.vocab_size)
        loss = self.loss_model.loss(config, shape, self.tokens)
        return Candidate(
            shape=shape,
            config=config,
            weight_bytes=weight_bytes(config, self.int4),
            kv_cache_bytes=kv_cache_bytes(config, self.context_length),
            total_parameters=config.num_parameters(),
            active_parameters=config.num_active_parameters(),
            flops_per_token=config.flops_per_token(self.context_length),
            loss=loss,
            train_time=self.loss_model.train_time(shape),
            score=self.loss_model.score(loss, shape),
        )


def plan(
    memory_gb: float,
    *,
    int4: bool = False,
    max_active_parameters: float | None = None,
    context_length: int = 8192,
    vocab_size: int = 128256,
    tokens: float = PAPER_TOKENS,
    top: int = 3,
    loss_model: LossModel | None = None,
    hidden_sizes: tuple[int, ...] = DEFAULT_HIDDEN_SIZES,
    shapes: tuple[MoEShape, ...] = DEFAULT_SHAPES,
    max_layers: int = DEFAULT_MAX_LAYERS,
) -> list[Candidate]:
    """The `top` best shapes whose weights (bf16, or the packed INT4 format with `int4=True`) plus a bf16 KV cache of
    `context_length` tokens fit in `memory_gb` (GB as the paper counts them, 2^30 bytes), and whose active
    parameters (embedding included, as `num_active_parameters` counts) stay under `max_active_parameters` if given.

    For every width in `hidden_sizes` and shape in `shapes` the depth is searched from 1 to `max_layers`; at most one
    depth per (width, shape) is returned, best score first. Raises `ValueError` naming the argument when a budget is
    not positive or when no shape fits (with what the smallest one needs).
    """
    if not memory_gb > 0:
        raise ValueError(f"`memory_gb` must be > 0, got {memory_gb}.")
    if max_active_parameters is not None and not max_active_parameters > 0:
        raise ValueError(f"`max_active_parameters` must be > 0, got {max_active_parameters}.")
    for name, value in (("vocab_size", vocab_size), ("top", top), ("max_layers", max_layers)):
        if value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value}.")
    if context_length < 0:
        raise ValueError(f"`context_length` must be >= 0, got {context_length}.")
    if not hidden_sizes or not shapes:
        raise ValueError("`hidden_sizes` and `shapes` must each name at least one value to search.")
    search = _Search(
        budget_bytes=memory_gb * GB,
        int4=int4,
        max_active_parameters=max_active_parameters,
        context_length=context_length,
        vocab_size=vocab_size,
        tokens=tokens,
        loss_model=loss_model or LossModel(),
    )
    points = [
        (layers, hidden, shape)
        for hidden in hidden_sizes
        for shape in shapes
        if (layers := search.best_depth(hidden, shape, max_layers))
    ]
    if not points:
        one_layer = [(1, hidden, shape) for hidden in hidden_sizes for shape in shapes]
        smallest = min(one_layer, key=lambda point: search.memory_bytes(*point))
        _, hidden, shape = smallest
        weights = "INT4" if int4 else "bf16"
        memory = search.memory_bytes(*smallest) / GB
        needs = f"{memory:.4f} GB ({weights} weights + KV cache of {context_length} tokens)"
        if max_active_parameters is not None:
            needs += f" and {_accounting(*smallest, vocab_size).active_parameters:,} active parameters"
        limits = f"`memory_gb`={memory_gb}"
        if max_active_parameters is not None:
            limits += f", `max_active_parameters`={max_active_parameters:,.0f}"
        raise ValueError(
            f"{limits}: no shape fits. The smallest searched (1 layer, hidden {hidden}, {shape.name}, vocab "
            f"{vocab_size}) needs {needs}."
        )
    best = sorted(points, key=lambda point: search.score(*point))[:top]
    return [search.candidate(*point) for point in best]


__all__ = [
    "GB",
    "Candidate",
    "LossModel",
    "MoEShape",
    "PUBLISHED_SHAPE",
    "architecture_fields",
    "kv_cache_bytes",
    "non_embedding_active_parameters",
    "plan",
    "shape_config",
    "weight_bytes",
]
