"""Recipe arguments: what a YAML recipe may say, and how `key=value` overrides apply to it.

A recipe is one flat YAML mapping, as with TRL's `TrlParser`: the keys of `StageArguments`, `ModelArguments`,
`DataArguments` and the stage's training arguments (`transformers.TrainingArguments`, or
`trl.SFTConfig` for SFT) side by side. Overrides may reach into mappings with dots
(`model_config_overrides.max_position_embeddings=8192`); their values are read as YAML (`max_steps=10`, `bf16=false`).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

STAGES = ("pretrain", "midtrain", "sft", "qat")


@dataclass
class StageArguments:
    stage: str = field(metadata={"help": f"Training stage, one of {STAGES}."})
    heldout_metric: bool = field(
        default=True, metadata={"help": "Measure the stage's held-out metric before and after training."}
    )
    long_range_boundary: int | None = field(
        default=None,
        metadata={
            "help": "Mid-training: report held-out loss on targets before/from this position (default: the starting "
            "checkpoint's `max_position_embeddings`, i.e. the context it was trained on)."
        },
    )

    trainer: str | None = field(
        default=None,
        metadata={
            "help": "`trainer` (transformers.Trainer on packed text) or `sft` (TRL SFTTrainer on chat messages); "
            "default: `sft` for the SFT stage, `trainer` otherwise. QAT of a chat model can use `sft`."
        },
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage: {self.stage!r} is not a training stage; choose one of {list(STAGES)}.")
        self.trainer = self.trainer or ("sft" if self.stage == "sft" else "trainer")
        if self.trainer not in ("trainer", "sft"):
            raise ValueError(f"trainer: {self.trainer!r} is not `trainer` or `sft`.")

    @property
    def chat(self) -> bool:
        """Whether the stage trains on chat messages with TRL's SFTTrainer."""
        return self.trainer == "sft"


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint to start from (Hub id or folder). Mutually exclusive with `preset`."},
    )
    preset: str | None = field(
        default=None, metadata={"help": "Start from random weights of a preset: S, M, L, tiny."}
    )
    tokenizer_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Tokenizer (Hub id or folder; `bundled` for the shipped one). Defaults to the checkpoint's."
        },
    )
    model_config_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Config fields to change: the longer context of mid-training, balancing "
            "(`expert_bias_update_rate`, "
            "`router_aux_loss_coef`, `router_z_loss_coef`), ..."
        },
    )
    dtype: str = field(default="float32", metadata={"help": "Weights dtype: float32 or bfloat16."})
    experts_implementation: str | None = field(default=None, metadata={"help": "Experts kernel; default: automatic."})
    quantization_config: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "`MobileMoEQATConfig` fields: quantization-aware training of a checkpoint (the QAT stage)."},
    )
    peft_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "`peft.LoraConfig` fields; trains adapters instead of the full model."}
    )

    def __post_init__(self):
        if (self.model_name_or_path is None) == (self.preset is None):
            raise ValueError("model_name_or_path / preset: give exactly one of them.")
        if self.quantization_config is not None and self.preset is not None:
            raise ValueError("quantization_config: QAT starts from a trained checkpoint; set model_name_or_path.")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype: {self.dtype!r} is not supported for training; use float32 or bfloat16.")


@dataclass
class DataArguments:
    datasets: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={
            "help": "Sources of the mixture: `{path, name, split, data_files, weight, text_field}`. `path` is a Hub "
            "dataset, a local file or folder (json/jsonl/parquet/txt), or `bundled:corpus|long|sft`."
        },
    )
    eval_datasets: list[dict[str, Any]] = field(
        default_factory=list,
        metadata={"help": "Held-out sources; if empty, `eval_fraction` of the mixture is held out."},
    )
    eval_fraction: float = field(default=0.05, metadata={"help": "Share of documents held out when no eval source."})
    max_seq_length: int = field(default=2048, metadata={"help": "Packed sequence length (the stage's context)."})
    streaming: bool = field(
        default=False, metadata={"help": "Stream sources instead of loading them (needs max_steps)."}
    )
    chat_eval_dataset: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "SFT: held-out prompts (`messages` + expected `answer`) for the chat-accuracy metric."},
    )
    max_eval_documents: int = field(
        default=1000, metadata={"help": "Cap on held-out documents (streaming: taken first)."}
    )

    def __post_init__(self):
        if not self.datasets:
            raise ValueError("datasets: a recipe needs at least one data source.")
        for source in [*self.datasets, *self.eval_datasets]:
            if not isinstance(source, dict) or "path" not in source:
                raise ValueError(f"datasets: each source is a mapping with a `path`, got {source!r}.")
        if not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}.")


def training_arguments_class(stage: StageArguments) -> type[TrainingArguments]:
    if stage.chat:
        from trl import SFTConfig

        return SFTConfig
    return TrainingArguments


@dataclass
class Recipe:
    stage: StageArguments
    model: ModelArguments
    data: DataArguments
    training: TrainingArguments


def load_recipe_dict(path: str | os.PathLike, overrides: list[str] = ()) -> dict[str, Any]:
    """The recipe's YAML mapping with `key=value` overrides applied."""
    with open(path, encoding="utf-8") as file:
        values = yaml.safe_load(file) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of argument names to values.")
    for override in overrides:
        key, separator, text = override.partition("=")
        if not separator or not key:
            raise ValueError(f"override {override!r}: write it as key=value.")
        *parents, leaf = key.split(".")
        target = values
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise ValueError(f"override {override!r}: {parent!r} is not a mapping in the recipe.")
        target[leaf] = yaml.safe_load(text)
    return values


def _coerce_scalars(dataclass_type: type, values: dict[str, Any]) -> dict[str, Any]:
    """YAML reads `1e-3` as a string and `3` where a float is declared: give declared float/int fields their type."""
    hints = typing.get_type_hints(dataclass_type)
    coerced = dict(values)
    for item in dataclasses.fields(dataclass_type):
        if item.name not in values or values[item.name] is None:
            continue
        declared = hints.get(item.name)
        options = (
            typing.get_args(declared)
            if isinstance(declared, types.UnionType) or typing.get_origin(declared) is typing.Union
            else (declared,)
        )
        value = values[item.name]
        for scalar in (int, float):
            if scalar in options and not isinstance(value, bool) and not isinstance(value, scalar):
                try:
                    coerced[item.name] = scalar(value)
                except (TypeError, ValueError):
                    raise ValueError(f"{item.name}: expected {scalar.__name__}, got {value!r}.") from None
                break
    return coerced


def parse_recipe(path: str | os.PathLike, overrides: list[str] = ()) -> Recipe:
    """Reads a recipe into its argument dataclasses; unknown keys and bad values fail naming the field."""
    values = load_recipe_dict(path, overrides)
    if "stage" not in values:
        raise ValueError(f"{path}: the recipe must name its `stage` ({', '.join(STAGES)}).")
    stage = StageArguments(stage=values["stage"], trainer=values.get("trainer"))  # picks the training arguments class
    types_ = (StageArguments, ModelArguments, DataArguments, training_arguments_class(stage))
    for dataclass_type in types_:
        values.update(
            _coerce_scalars(dataclass_type, {k: v for k, v in values.items() if k in _field_names(dataclass_type)})
        )
    try:
        parsed = HfArgumentParser(types_).parse_dict(values)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return Recipe(*parsed)


def _field_names(dataclass_type: type) -> set[str]:
    return {item.name for item in dataclasses.fields(dataclass_type) if item.init}
