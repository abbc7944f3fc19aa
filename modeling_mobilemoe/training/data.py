"""Data for the stage runners: `datasets` sources, weighted mixtures, and packing that respects documents.

Packed pretraining blocks carry `position_ids` that restart at every document, with no attention mask: transformers'
mask builder then gives each document its own causal block (`find_packed_sequence_indices`), so packing never lets a
token attend to another document, and the label of each document's first token is ignored.
"""

from __future__ import annotations

import os
from typing import Any

from datasets import Dataset, IterableDataset, interleave_datasets, load_dataset

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources")
# Data shipped in the package (see each folder's DATA_CARD.md): builder and files per split.
BUNDLED = {
    "corpus": ("text", {"train": os.path.join(RESOURCES, "corpus", "*.txt")}),
    "long": ("json", {split: os.path.join(RESOURCES, "long", f"{split}.jsonl") for split in ("train", "heldout")}),
    "sft": ("json", {split: os.path.join(RESOURCES, "sft", f"{split}.jsonl") for split in ("train", "heldout")}),
}
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text", ".csv": "csv"}
_SOURCE_KEYS = {"path", "name", "split", "data_files", "weight", "text_field", "revision"}
IGNORE_INDEX = -100


def _builder_and_files(source: dict[str, Any]) -> tuple[str, Any]:
    """The `load_dataset` builder name and data files for a source's `path`."""
    path = source["path"]
    if path.startswith("bundled:"):
        name = path.removeprefix("bundled:")
        if name not in BUNDLED:
            raise ValueError(f"datasets: unknown bundled dataset {name!r}; choose one of {sorted(BUNDLED)}.")
        builder, files = BUNDLED[name]
        split = source.get("split", "train")
        if split not in files:
            raise ValueError(f"datasets: bundled:{name} has splits {sorted(files)}, not {split!r}.")
        return builder, {split: files[split]}
    if os.path.isfile(path):
        extension = os.path.splitext(path)[1]
        if extension not in _BUILDERS:
            raise ValueError(f"datasets: can't tell the format of {path!r}; use one of {sorted(_BUILDERS)}.")
        return _BUILDERS[extension], path
    if os.path.isdir(path):
        files = sorted(os.listdir(path))
        for extension, builder in _BUILDERS.items():
            matching = [os.path.join(path, f) for f in files if f.endswith(extension)]
            if matching:
                return builder, matching
        raise ValueError(f"datasets: no {'/'.join(sorted(_BUILDERS))} files in {path!r}.")
    return path, source.get("data_files")  # a Hub dataset or a datasets builder name


def load_source(source: dict[str, Any], streaming: bool = False) -> Dataset | IterableDataset:
    """One source of a recipe's `datasets` list, as a dataset of documents."""
    unknown = set(source) - _SOURCE_KEYS
    if unknown:
        raise ValueError(
            f"datasets: unknown keys {sorted(unknown)} in source {source['path']!r}; allowed: {sorted(_SOURCE_KEYS)}."
        )
    builder, data_files = _builder_and_files(source)
    split = source.get("split", "train")
    dataset = load_dataset(
        builder,
        source.get("name"),
        data_files=source.get("data_files", data_files),
        split=split,
        revision=source.get("revision"),
        streaming=streaming,
    )
    text_field = source.get("text_field")
    if text_field and text_field != "text":
        dataset = dataset.rename_column(text_field, "text")
    return dataset


def load_mixture(
    sources: list[dict[str, Any]], columns: list[str], streaming: bool = False, seed: int = 0
) -> Dataset | IterableDataset:
    """The weighted mixture of `sources` (`interleave_datasets`; weights are sampling probabilities), reduced to
    `columns` (sources often share other columns with clashing types, e.g. int32 vs int64 token counts)."""
    datasets = []
    for source in sources:
        dataset = load_source(source, streaming)
        missing = set(columns) - set(dataset.column_names or columns)
        if missing:
            raise ValueError(
                f"datasets: source {source['path']!r} has no column {sorted(missing)} (set `text_field`?)."
            )
        datasets.append(dataset.select_columns(columns))
    if len(datasets) == 1:
        return datasets[0]
    weights = [float(source.get("weight", 1.0)) for source in sources]
    if any(weight <= 0 for weight in weights):
        raise ValueError(f"datasets: weights must be positive, got {weights}.")
    probabilities = [weight / sum(weights) for weight in weights]
    return interleave_datasets(datasets, probabilities=probabilities, seed=seed, stopping_strategy="all_exhausted")


def pack_documents(
    dataset: Dataset | IterableDataset, tokenizer, max_seq_length: int, text_field: str = "text"
) -> Dataset | IterableDataset:
    """Tokenizes documents (BOS ... EOS) and packs them into blocks of exactly `max_seq_length` tokens.

    Each block has `input_ids`, `position_ids` (restarting at every document and at the block start, where a long
    document continues) and `labels` (`-100` where a new document starts: nothing before it in the block predicts
    it). The tail of each mapped batch that doesn't fill a block is dropped.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        input_ids, position_ids = [], []
        for text in batch[text_field]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            document = ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
            input_ids += document
            position_ids += range(len(document))
        blocks: dict[str, list] = {"input_ids": [], "position_ids": [], "labels": []}
        for start in range(0, len(input_ids) - max_seq_length + 1, max_seq_length):
            block_ids = input_ids[start : start + max_seq_length]
            positions = position_ids[start : start + max_seq_length]
            # a document continued from the previous block restarts its positions here
            next_document = next((i for i, p in enumerate(positions) if i > 0 and p == 0), max_seq_length)
            positions = [p - positions[0] for p in positions[:next_document]] + positions[next_document:]
            labels = [IGNORE_INDEX if i > 0 and p == 0 else t for i, (t, p) in enumerate(zip(block_ids, positions))]
            blocks["input_ids"].append(block_ids)
            blocks["position_ids"].append(positions)
            blocks["labels"].append(labels)
        return blocks

    return dataset.map(pack, batched=True, batch_size=1000, remove_columns=dataset.column_names or [text_field])
