"""Loader of the `mobilemoe_toy_facts` lm-eval task (`custom_dataset: !function toy_facts.load` in its YAML): the
questions next to this file as a `datasets.DatasetDict` with one `test` split, read without a download or a cache."""

from __future__ import annotations

import json
import os

import datasets


DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "toy_facts.jsonl")


def load(**_metadata) -> datasets.DatasetDict:
    """lm-eval passes the task's metadata as keyword arguments; none of it changes the data."""
    with open(DATA_FILE, encoding="utf-8") as file:
        rows = [json.loads(line) for line in file]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
