"""Stage runners: a recipe in, a trained checkpoint and a summary out.

Pretraining, mid-training and QAT run on `transformers.Trainer` over packed documents; SFT (and any stage with
`trainer: sft`, such as QAT of a chat model) runs on TRL's `SFTTrainer` over chat messages (assistant-only loss,
packing). QAT loads its checkpoint with a `MobileMoEQATConfig` and ends by saving the converted, packed INT4 model.
Everything distributed (DDP, FSDP2, DeepSpeed) comes from `accelerate launch` around the same entry point, as for any
`Trainer` script.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, default_data_collator, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import sort_checkpoints

from ..configuration_mobilemoe import MobileMoEConfig
from ..modeling_mobilemoe import MobileMoEForCausalLM
from ..quantization import MobileMoEQATConfig
from ..tokenizer_training import shipped_tokenizer_path
from .arguments import Recipe, parse_recipe
from .balancing import ExpertBalancingCallback, RouterMetricsMixin
from .data import load_mixture, load_source, pack_documents
from .evaluation import chat_accuracy, long_context_loss


class MobileMoETrainer(RouterMetricsMixin, Trainer):
    """`Trainer` whose logs carry router health."""


def _sft_trainer_class():
    from trl import SFTTrainer

    class MobileMoESFTTrainer(RouterMetricsMixin, SFTTrainer):
        """TRL `SFTTrainer` whose logs carry router health."""

    return MobileMoESFTTrainer


def build_tokenizer(recipe: Recipe):
    name = recipe.model.tokenizer_name_or_path or recipe.model.model_name_or_path
    return AutoTokenizer.from_pretrained(shipped_tokenizer_path() if name in (None, "bundled") else name)


def build_model(recipe: Recipe, tokenizer, quantize: bool = True) -> MobileMoEForCausalLM:
    """Random weights of a preset, or a checkpoint, with the recipe's config overrides (and QAT's fake quantization
    unless `quantize=False`), ready to train."""
    arguments = recipe.model
    dtype = getattr(torch, arguments.dtype)
    overrides = dict(arguments.model_config_overrides)
    if arguments.preset is not None:
        config = MobileMoEConfig.from_preset(arguments.preset, **overrides)
        model = MobileMoEForCausalLM._from_config(config, dtype=dtype)
    else:
        if arguments.quantization_config is not None and quantize:
            overrides["quantization_config"] = MobileMoEQATConfig(**arguments.quantization_config)
        model = AutoModelForCausalLM.from_pretrained(arguments.model_name_or_path, dtype=dtype, **overrides)
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer_name_or_path: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}."
        )
    if arguments.experts_implementation:
        model.set_experts_implementation(arguments.experts_implementation)
    model.config.use_cache = False  # a training forward has no use for a KV cache (and it hides packed documents)
    return model


def build_datasets(recipe: Recipe, tokenizer) -> tuple[Any, Dataset | None]:
    """Train and held-out datasets: packed blocks for Trainer stages, chat messages for SFT."""
    data, seed = recipe.data, recipe.training.seed
    columns = ["messages"] if recipe.stage.chat else ["text"]
    train = load_mixture(data.datasets, columns, data.streaming, seed)
    if data.eval_datasets:
        heldout = load_mixture(data.eval_datasets, columns, seed=seed)
        heldout = heldout.select(range(min(len(heldout), data.max_eval_documents)))
    elif data.eval_fraction and data.streaming:
        heldout = Dataset.from_list(list(train.take(data.max_eval_documents)))
        train = train.skip(data.max_eval_documents)
    elif data.eval_fraction:
        split = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        train, heldout = split["train"], split["test"]
        heldout = heldout.select(range(min(len(heldout), data.max_eval_documents)))
    else:
        heldout = None
    if recipe.stage.chat:
        return train, heldout
    train = pack_documents(train, tokenizer, data.max_seq_length)
    if heldout is not None:
        heldout = pack_documents(heldout, tokenizer, data.max_seq_length)
    return train, heldout


def build_trainer(recipe: Recipe, model, tokenizer, train, heldout) -> Trainer:
    peft_config = None
    if recipe.model.peft_config:
        from peft import LoraConfig

        peft_config = LoraConfig(**recipe.model.peft_config)
    arguments = {
        "args": recipe.training,
        "train_dataset": train,
        "eval_dataset": heldout,
        "processing_class": tokenizer,
        "callbacks": [ExpertBalancingCallback()],
    }
    if recipe.stage.chat:
        recipe.training.max_length = recipe.data.max_seq_length
        return _sft_trainer_class()(model=model, peft_config=peft_config, **arguments)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return MobileMoETrainer(model=model, data_collator=default_data_collator, **arguments)


def quantization_metrics(recipe: Recipe, tokenizer, train, heldout) -> dict[str, Any]:
    """QAT: held-out loss of the unquantized starting checkpoint, the reference that PTQ (the fake-quantized model
    before training) and QAT (after) are measured against."""
    if heldout is None:
        return {}
    unquantized = build_trainer(recipe, build_model(recipe, tokenizer, quantize=False), tokenizer, train, heldout)
    return {"float_heldout_loss": unquantized.evaluate()["eval_loss"]}


def _save_int4(trainer: Trainer, output_dir: str) -> dict[str, Any]:
    """QAT's output: the trained model converted to the packed INT4 format, with its size next to the accounting."""
    from ..quantization import convert_to_int4

    model = convert_to_int4(trainer.model)
    model.save_pretrained(output_dir)
    saved = sum(
        os.path.getsize(os.path.join(output_dir, f)) for f in os.listdir(output_dir) if f.endswith(".safetensors")
    )
    return {"int4_weight_bytes_predicted": model.config.int4_weight_bytes(), "saved_weights_bytes": saved}


def heldout_metrics(recipe: Recipe, trainer: Trainer, tokenizer, heldout, boundary: int | None) -> dict[str, Any]:
    """The stage's held-out metrics: loss/perplexity; mid-training adds loss by position, SFT chat accuracy."""
    metrics: dict[str, Any] = {}
    if heldout is not None:
        loss = trainer.evaluate()["eval_loss"]
        metrics.update(heldout_loss=loss, heldout_perplexity=math.exp(min(loss, 50.0)))
    stage = recipe.stage.stage
    if stage == "midtrain" and heldout is not None and boundary is not None:
        metrics.update(long_context_loss(trainer.model, heldout, boundary))
    if recipe.stage.chat and recipe.data.chat_eval_dataset:
        examples = list(load_source(recipe.data.chat_eval_dataset))
        metrics.update(chat_accuracy(trainer.model, tokenizer, examples))
    return metrics


def last_complete_checkpoint(output_dir: str) -> str | None:
    """The newest `checkpoint-N` in `output_dir` that was written to the end: `Trainer` writes `trainer_state.json`
    last, so a run killed while saving leaves a folder without it, which is skipped."""
    if not os.path.isdir(output_dir):
        return None
    checkpoints = sort_checkpoints(output_dir)
    complete = [path for path in checkpoints if os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))]
    return complete[-1] if complete else None


def _resume_checkpoint(recipe: Recipe) -> str | None:
    """`resume_from_checkpoint`: a path, or `auto` for the last checkpoint in `output_dir` if there is one."""
    value = recipe.training.resume_from_checkpoint
    if value in (None, False, "", "false", "none"):
        return None
    if value in (True, "auto", "last", "true"):
        return last_complete_checkpoint(recipe.training.output_dir)
    if not os.path.isdir(value):
        raise ValueError(f"resume_from_checkpoint: {value!r} is not a checkpoint folder.")
    return value


def run_stage(recipe: Recipe) -> dict[str, Any]:
    """Trains one stage as the recipe says, saves the model and tokenizer to `output_dir`, and returns a summary
    (also written to `output_dir/stage_summary.json`)."""
    start = time.perf_counter()
    set_seed(recipe.training.seed)
    stage = recipe.stage.stage
    tokenizer = build_tokenizer(recipe)
    model = build_model(recipe, tokenizer)
    boundary = recipe.stage.long_range_boundary
    if boundary is None and recipe.model.model_name_or_path is not None:
        boundary = MobileMoEConfig.from_pretrained(recipe.model.model_name_or_path).max_position_embeddings
    train, heldout = build_datasets(recipe, tokenizer)
    trainer = build_trainer(recipe, model, tokenizer, train, heldout)

    resume = _resume_checkpoint(recipe)
    before = {}
    if recipe.stage.heldout_metric and resume is None:
        before = heldout_metrics(recipe, trainer, tokenizer, heldout, boundary)
        if stage == "qat":
            before.update(quantization_metrics(recipe, tokenizer, train, heldout))
    result = trainer.train(resume_from_checkpoint=resume)
    after = heldout_metrics(recipe, trainer, tokenizer, heldout, boundary) if recipe.stage.heldout_metric else {}

    trainer.model.config.use_cache = True
    if stage == "qat":
        after.update(_save_int4(trainer, recipe.training.output_dir))
        tokenizer.save_pretrained(recipe.training.output_dir)
    else:
        trainer.save_model(recipe.training.output_dir)
    trainer.save_state()
    summary = {
        "stage": stage,
        "output_dir": recipe.training.output_dir,
        "steps": trainer.state.global_step,
        "processes": trainer.args.world_size,
        "train_loss": result.training_loss,
        "resumed_from": resume,
        "before": before,
        "after": after,
        "seconds": time.perf_counter() - start,
    }
    if trainer.is_world_process_zero():
        with open(os.path.join(recipe.training.output_dir, "stage_summary.json"), "w", encoding="utf-8") as file:
            json.dump(summary, file, indent=2)
        print(summary_line(summary), flush=True)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """`[stage] steps, train loss, each held-out metric before -> after, time`."""
    parts = [f"[{summary['stage']}] {summary['steps']} steps", f"train loss {summary['train_loss']:.3f}"]
    if summary["processes"] > 1:
        parts[0] += f" x {summary['processes']} processes"
    before, after = summary["before"], summary["after"]
    for name, value in after.items():
        if isinstance(value, float):
            previous = before.get(name)
            parts.append(f"{name} {previous:.3f} -> {value:.3f}" if previous is not None else f"{name} {value:.3f}")
        elif name.endswith("_bytes"):
            parts.append(f"{name.removesuffix('_bytes')} {value / 2**20:.2f} MiB")
    parts += [
        f"{name} {value:.3f}" for name, value in before.items() if isinstance(value, float) and name not in after
    ]
    parts.append(f"{summary['seconds']:.0f}s -> {summary['output_dir']}")
    return ", ".join(parts)


def train(recipe_path: str, overrides: list[str] = ()) -> dict[str, Any]:
    """`mobilemoe train RECIPE.yaml [key=value ...]`."""
    return run_stage(parse_recipe(recipe_path, overrides))
