"""Model cards from the templates in `hub_cards/`: one per size (S, M, L, or `custom` for any other shape) and
variant (Base, SFT, QAT), filled from a model folder's config (the accounting helpers), its `stage_summary.json` and an
lm-eval results JSON, with `huggingface_hub` metadata (`ModelCardData`, `model-index` from `EvalResult`s)."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from ..configuration_mobilemoe import PRESETS, MobileMoEConfig


REPOSITORY = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = REPOSITORY / "hub_cards"
SIZES = ("S", "M", "L", "custom")
PUBLISHED_SIZES = SIZES[:3]
VARIANTS = ("Base", "SFT", "QAT")
PUBLISHED_NAMESPACE = "facebook"
# What makes a config one of the published shapes (context length and RoPE may differ between training stages).
SHAPE_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "intermediate_size_mlp",
    "num_local_experts",
    "num_experts_per_tok",
    "vocab_size",
)
STAGE_VARIANTS = {"pretrain": "Base", "midtrain": "Base", "sft": "SFT", "qat": "QAT"}
# The paper's pre-training data (MOBILEMOE.md, "Training recipe"), as Hub datasets.
PUBLISHED_DATASETS = ["allenai/dolma", "allenai/olmo-mix-1124", "HuggingFaceFW/fineweb-edu", "HuggingFaceTB/finemath"]
PAPER_TASKS = (
    "HellaSwag", "PIQA", "SIQA", "WinoGrande", "ARC-e", "ARC-c", "OBQA", "BoolQ", "MMLU", "NQ", "TriviaQA",
)  # fmt: skip
# Keys of an lm-eval results entry that are not metrics.
NON_METRIC_KEYS = {"alias", "name", "sample_len", "samples"}


def published_repo_id(size: str, variant: str) -> str:
    return f"{PUBLISHED_NAMESPACE}/MobileMoE-{size}-{variant}"


def check_repo_id(repo_id: str) -> str:
    """`namespace/name`, valid for the Hub."""
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise ValueError(f"repo_id: {repo_id!r} must be `namespace/name` (a user or organization, then the model name).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"repo_id: {error}") from None
    return repo_id


def model_folder(model_dir: str | os.PathLike) -> Path:
    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"model: no model folder at {folder}.")
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: {folder} has no config.json (not a saved model folder).")
    return folder


def detect_size(config: MobileMoEConfig) -> str:
    """The published size whose shape the config has, else `custom`."""
    for size in PUBLISHED_SIZES:
        if all(getattr(config, field) == PRESETS[size][field] for field in SHAPE_FIELDS):
            return size
    return "custom"


def check_size(config: MobileMoEConfig, size: str | None) -> str:
    if size is None:
        return detect_size(config)
    if size not in SIZES:
        raise ValueError(f"size: {size!r} is not one of {list(SIZES)}.")
    if size != "custom":
        preset = PRESETS[size]
        differ = [f"{f} {getattr(config, f)} ({size}: {preset[f]})" for f in SHAPE_FIELDS if getattr(config, f) != preset[f]]
        if differ:
            raise ValueError(f"size: the model is not MobileMoE-{size}'s shape: {', '.join(differ)}; use size 'custom'.")
    return size


def stage_summary(folder: Path) -> dict[str, Any] | None:
    path = folder / "stage_summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def detect_variant(folder: Path, config: MobileMoEConfig) -> str:
    """QAT for a quantized checkpoint, else what the training stage that wrote the folder says."""
    quantization_config = getattr(config, "quantization_config", None) or {}
    if not isinstance(quantization_config, dict):
        quantization_config = quantization_config.to_dict()
    if config.quantization or quantization_config.get("quant_method") == "mobilemoe_qat":
        return "QAT"
    summary = stage_summary(folder)
    if summary and summary.get("stage") in STAGE_VARIANTS:
        return STAGE_VARIANTS[summary["stage"]]
    raise ValueError(
        f"variant: can't tell whether {folder} is a Base, SFT or QAT model (no quantization in its config, no "
        f"stage_summary.json); pass one of {list(VARIANTS)}."
    )


def check_variant(folder: Path, config: MobileMoEConfig, variant: str | None) -> str:
    if variant is None:
        return detect_variant(folder, config)
    if variant not in VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {list(VARIANTS)}.")
    return variant


# ---------------------------------------------------------------------------------------------------------------------
# Results JSON (lm-eval's output, as `mobilemoe eval` or `lm_eval --output_path` write it)


@dataclass
class Measured:
    """One metric of one task, with what the card and `model-index` say about it."""

    task: str
    metric: str
    value: float
    stderr: float | None
    shots: int | None
    samples: int | None
    dataset: str
    dataset_config: str | None
    split: str | None

    def row(self) -> dict[str, str]:
        return {
            "task": self.task,
            "metric": self.metric,
            "value": f"{self.value:.4f}",
            "stderr": f"{self.stderr:.4f}" if self.stderr is not None else "",
            "shots": "" if self.shots is None else str(self.shots),
            "samples": "" if self.samples is None else str(self.samples),
        }

    def eval_result(self) -> EvalResult:
        metric, _, filter_name = self.metric.partition(" ")
        return EvalResult(
            task_type="text-generation",
            task_name="Text Generation",
            dataset_type=self.dataset,
            dataset_name=self.task,
            dataset_config=self.dataset_config,
            dataset_split=self.split,
            dataset_args={"num_few_shot": self.shots} if self.shots is not None else None,
            metric_type=metric,
            metric_name=self.metric,
            metric_value=self.value,
            metric_config=filter_name.strip("()") or None,
        )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_results(results: str | os.PathLike | dict) -> tuple[list[Measured], dict[str, Any]]:
    """The metrics of an lm-eval results JSON (a path or the loaded dict), and the JSON itself.

    Expects lm-eval's layout: `{"results": {task: {"acc,none": 0.61, "acc_stderr,none": 0.01, ...}}, "n-shot":
    {task: 0}, "n-samples": {task: {"effective": N}}, "configs": {task: {"dataset_path": ...}}}`; everything but
    `results` is optional. Raises `ValueError` naming the field that has the wrong shape."""
    if not isinstance(results, dict):
        path = Path(results)
        if not path.is_file():
            raise ValueError(f"results: no file at {path}.")
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"results: {path} is not JSON ({error}).") from None
    if not isinstance(results, dict) or not isinstance(results.get("results"), dict):
        raise ValueError(
            "results: expected lm-eval's results JSON, an object with a `results` object of tasks "
            "(what `mobilemoe eval --out` and `lm_eval --output_path` write)."
        )
    shots = results.get("n-shot") or {}
    samples = results.get("n-samples") or {}
    configs = results.get("configs") or {}
    for field, value in (("n-shot", shots), ("n-samples", samples), ("configs", configs)):
        if not isinstance(value, dict):
            raise ValueError(f"results.{field}: expected an object keyed by task, got {type(value).__name__}.")
    measured = []
    for task, metrics in results["results"].items():
        if not isinstance(metrics, dict):
            raise ValueError(f"results.results.{task}: expected an object of metrics, got {type(metrics).__name__}.")
        config = configs.get(task) or {}
        task_samples = samples.get(task)
        effective = task_samples.get("effective") if isinstance(task_samples, dict) else task_samples
        count = 0
        for key, value in metrics.items():
            if key in NON_METRIC_KEYS or "_stderr," in key:
                continue
            if not _is_number(value):
                raise ValueError(f"results.results.{task}.{key}: expected a number, got {value!r}.")
            name, _, filter_name = key.partition(",")
            stderr = metrics.get(f"{name}_stderr,{filter_name}")
            measured.append(
                Measured(
                    task=task,
                    metric=name if filter_name in ("", "none") else f"{name} ({filter_name})",
                    value=float(value),
                    stderr=float(stderr) if _is_number(stderr) else None,
                    shots=shots.get(task) if isinstance(shots.get(task), int) else None,
                    samples=effective if isinstance(effective, int) else None,
                    dataset=config.get("dataset_path") or task,
                    dataset_config=config.get("dataset_name"),
                    split=config.get("test_split") or config.get("validation_split"),
                )
            )
            count += 1
        if not count:
            raise ValueError(f"results.results.{task}: no metric in it (expected keys such as 'acc,none').")
    return measured, results


# ---------------------------------------------------------------------------------------------------------------------
# The card


def _count(value: int) -> str:
    return f"{value / 1e9:.2f}B" if value >= 1e9 else f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.0f}k"


def _bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 / 10 else f"{value / 2**20:.1f} MiB"


def architecture(config: MobileMoEConfig, folder: Path) -> dict[str, Any]:
    """The card's architecture table, from the config's accounting helpers and the folder's weight files."""
    stored = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    packed = bool(config.quantization)
    return {
        "layers": config.num_hidden_layers,
        "dense_layers": config.num_hidden_layers - config.num_moe_layers,
        "hidden": config.hidden_size,
        "heads": config.num_attention_heads,
        "kv_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "experts": config.num_local_experts,
        "top_k": config.num_experts_per_tok,
        "expert_width": config.intermediate_size,
        "shared_width": config.intermediate_size_mlp,
        "active": _count(config.num_active_parameters()),
        "total": _count(config.num_parameters()),
        "int4": _bytes(config.int4_weight_bytes()),
        "bf16": _bytes(2 * config.num_parameters()),
        "context": config.max_position_embeddings,
        "vocab": config.vocab_size,
        "stored": (f"packed INT4, {_bytes(stored)} of safetensors" if packed else f"{_bytes(stored)} of safetensors")
        if stored
        else "no weight files (config only)",
    }


def training_run(summary: dict[str, Any] | None) -> dict[str, str] | None:
    """The stage summary's row: steps, train loss, each held-out metric before -> after, time."""
    if not summary:
        return None
    before, after = summary.get("before") or {}, summary.get("after") or {}
    metrics = []
    for name, value in after.items():
        if isinstance(value, float) and math.isfinite(value):  # counts such as saved bytes are not metrics
            previous = before.get(name)
            metrics.append(f"{name} {previous:.3f} -> {value:.3f}" if _is_number(previous) else f"{name} {value:.3f}")
    loss = summary.get("train_loss")
    return {
        "stage": str(summary.get("stage", "")),
        "steps": str(summary.get("steps", "")),
        "train_loss": f"{loss:.3f}" if _is_number(loss) else "",
        "metrics": "; ".join(metrics) or "-",
        "time": f"{summary['seconds']:.0f} s" if _is_number(summary.get("seconds")) else "",
    }


@dataclass
class CardInfo:
    """What a card is rendered from, resolved and checked."""

    folder: Path
    config: MobileMoEConfig
    size: str
    variant: str
    repo_id: str
    base_model: str | None
    datasets: list[str]
    license: str
    measured: list[Measured]
    results: dict[str, Any] | None
    results_source: str | None


def card_info(
    model_dir: str | os.PathLike,
    *,
    results: str | os.PathLike | dict | None = None,
    repo_id: str | None = None,
    size: str | None = None,
    variant: str | None = None,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    license: str | None = None,
) -> CardInfo:
    """Resolves and checks what the card of `model_dir` says. `results`: an lm-eval results JSON (path or dict).
    `repo_id`: where the snippets load from (default: the published repository for S/M/L, a placeholder otherwise).
    `size` (S, M, L, custom) and `variant` (Base, SFT, QAT): detected unless given. `base_model`, `datasets`,
    `license`: metadata (for S/M/L by default the published previous stage, the paper's pre-training data and `other`:
    the gated repositories' terms; otherwise no base model or datasets, and apache-2.0)."""
    folder = model_folder(model_dir)
    config = MobileMoEConfig.from_pretrained(folder)
    size = check_size(config, size)
    variant = check_variant(folder, config, variant)
    if repo_id is None:
        repo_id = published_repo_id(size, variant) if size in PUBLISHED_SIZES else f"your-name/MobileMoE-{variant}"
    check_repo_id(repo_id)
    if license is None:
        license = "other" if size in PUBLISHED_SIZES else "apache-2.0"
    if size in PUBLISHED_SIZES:
        if base_model is None and variant != "Base":
            base_model = published_repo_id(size, "Base" if variant == "SFT" else "SFT")
        datasets = PUBLISHED_DATASETS if datasets is None else datasets
    if base_model is not None:
        try:
            check_repo_id(base_model)
        except ValueError as error:
            raise ValueError(f"base_model: {error}".replace("repo_id: ", "")) from None
    measured, loaded = load_results(results) if results is not None else ([], None)
    source = Path(results).name if results is not None and not isinstance(results, dict) else None
    return CardInfo(folder, config, size, variant, repo_id, base_model, list(datasets or []), license, measured, loaded,
                    source)  # fmt: skip


def license_link(info: CardInfo) -> str | None:
    """`license: other` on a published size means the gated repository's terms."""
    if info.license == "other" and info.size in PUBLISHED_SIZES:
        return f"https://huggingface.co/{published_repo_id(info.size, info.variant)}"
    return None


def card_metadata(info: CardInfo) -> ModelCardData:
    tags = ["mobilemoe", "mixture-of-experts", "moe", "on-device", "custom_code"]
    if info.variant != "Base":
        tags.append("conversational")
    if info.variant == "QAT":
        tags += ["int4", "qat", "quantized"]
    model_name = info.repo_id.split("/")[-1]
    return ModelCardData(
        language=["en"],
        license=info.license,
        license_name="mobilemoe" if license_link(info) else None,
        license_link=license_link(info),
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=info.base_model,
        datasets=info.datasets or None,
        tags=tags,
        model_name=model_name,
        eval_results=[measured.eval_result() for measured in info.measured] or None,
    )


def template_name(size: str, variant: str) -> str:
    return f"MobileMoE-{size}-{variant}.md"


def render_card(model_dir: str | os.PathLike, *, templates_dir: str | os.PathLike | None = None, **options) -> ModelCard:
    """The model card of `model_dir` from the `hub_cards/` template (or `templates_dir`'s) of its size and variant.
    `options` are `card_info`'s: `results` (an lm-eval results JSON) fills the evaluation table and `model-index`,
    `repo_id` is the repository the usage snippets load from; size and variant are detected unless given (the shape
    from the config, QAT from a quantized config, Base/SFT from `stage_summary.json`)."""
    info = card_info(model_dir, **options)
    templates = Path(templates_dir) if templates_dir is not None else TEMPLATES_DIR
    if not (templates / template_name(info.size, info.variant)).is_file():
        raise ValueError(
            f"templates_dir: no {template_name(info.size, info.variant)} in {templates} (the card templates live in "
            "the repository's hub_cards/; run from a source checkout or pass its path)."
        )
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates), undefined=jinja2.StrictUndefined, keep_trailing_newline=True
    )
    metadata = card_metadata(info)
    text = environment.get_template(template_name(info.size, info.variant)).render(
        card_data=metadata.to_yaml(),
        model_name=metadata.model_name,
        repo_id=info.repo_id,
        size=info.size,
        variant=info.variant,
        published=info.size in PUBLISHED_SIZES,
        base_model=info.base_model,
        license=info.license,
        license_link=license_link(info),
        arch=architecture(info.config, info.folder),
        run=training_run(stage_summary(info.folder)),
        results=[measured.row() for measured in info.measured],
        results_source=info.results_source or "results JSON",
        lm_eval_version=(info.results or {}).get("lm_eval_version", ""),
        paper_tasks=PAPER_TASKS,
    )
    return ModelCard(re.sub(r"\n{3,}", "\n\n", text))  # the partials' optional parts leave runs of blank lines


def validate_card(card: ModelCard | str) -> ModelCardData:
    """Checks a card's metadata offline, as far as the Hub's rules are known without its validation endpoint
    (`ModelCard.validate()` posts to the Hub): the YAML parses into `ModelCardData`, `model-index` parses back into
    `EvalResult`s, and the fields a transformers model card needs are there. Returns the parsed metadata."""
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard(str(card)) if not isinstance(card, ModelCard) else card
    data = card.data
    for field, expected in (("library_name", "transformers"), ("pipeline_tag", "text-generation")):
        if getattr(data, field) != expected:
            raise ValueError(f"card metadata: `{field}` must be {expected!r}, got {getattr(data, field)!r}.")
    for field in ("license", "tags", "language"):
        if not getattr(data, field):
            raise ValueError(f"card metadata: `{field}` is missing.")
    model_index = data.to_dict().get("model-index")
    if model_index is not None:
        name, results = model_index_to_eval_results(model_index)
        if name != data.model_name or not results:
            raise ValueError("card metadata: `model-index` must name the model and hold its results.")
        for result in results:
            if not isinstance(result.metric_value, (int, float)):
                raise ValueError(f"card metadata: `model-index` value of {result.dataset_name} is not a number.")
    base_models = [data.base_model] if isinstance(data.base_model, str) else data.base_model or []
    for repo in base_models:
        check_repo_id(repo)
    return data
