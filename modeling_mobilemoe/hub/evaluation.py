"""Evaluation with lm-evaluation-harness: `lm_eval.simple_evaluate` over its HF model wrapper (`HFLM`), with the
tasks shipped in `resources/eval/` (the offline `mobilemoe_toy_facts` and the `mobilemoe_paper_base` group of the
paper's base benchmarks, which lm-eval downloads) next to lm-eval's own. `pip install "modeling-mobilemoe[eval]"`."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel


LOCAL_TASKS_DIR = Path(__file__).resolve().parents[1] / "resources" / "eval"
LOCAL_TASK = "mobilemoe_toy_facts"
PAPER_GROUP = "mobilemoe_paper_base"


@functools.cache
def _task_manager(include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(LOCAL_TASKS_DIR), include_defaults=include_defaults)


def task_manager(tasks: list[str]):
    """lm-eval's `TaskManager` with the shipped tasks. lm-eval's own ~10k task configs are indexed (15-30 s, once
    per process) only when a task isn't one of ours (the paper group is made of lm-eval's tasks)."""
    shipped = _task_manager(False).all_tasks
    manager = _task_manager(PAPER_GROUP in tasks or not set(tasks) <= set(shipped))
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"tasks: unknown lm-eval task(s) {unknown}; the package ships {shipped}, and `lm_eval ls tasks` lists "
            "lm-eval's own."
        )
    return manager


def _check_model(model: str | os.PathLike | PreTrainedModel) -> None:
    """A path that names no folder fails here, before anything loads; other strings are Hub ids."""
    if isinstance(model, PreTrainedModel):
        return
    name = str(model)
    looks_local = os.path.isabs(name) or name.startswith(".") or os.path.exists(name) or name.count("/") > 1
    if looks_local and not os.path.isdir(name):
        raise ValueError(f"model: no model folder at {name}.")


def _load(model: str | os.PathLike | PreTrainedModel, dtype: str, trust_remote_code: bool):
    if isinstance(model, PreTrainedModel):
        return model, None
    name = str(model)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ValueError(f"dtype: {dtype!r} is not a torch dtype (float32, bfloat16, float16) or 'auto'.")
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    loaded = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return loaded, tokenizer


def evaluate(
    model: str | os.PathLike | PreTrainedModel,
    tasks: list[str] | tuple[str, ...] = (LOCAL_TASK,),
    *,
    tokenizer=None,
    output: str | os.PathLike | None = None,
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    dtype: str = "auto",
    apply_chat_template: bool = False,
    trust_remote_code: bool = False,
    bootstrap_iters: int = 1000,
) -> dict[str, Any]:
    """Runs lm-eval's `simple_evaluate` on `model` (a folder, a Hub id or a loaded model) for `tasks` and returns
    lm-eval's results dict (`results`, `n-shot`, `n-samples`, `configs`, `versions`, ...; no per-sample logs), also
    written to `output` as JSON: the input of `mobilemoe card --results`."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import handle_non_serializable

    tasks = list(tasks)
    if not tasks or not all(isinstance(task, str) and task for task in tasks):
        raise ValueError(f"tasks: expected task names, got {tasks!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size: {batch_size} must be at least 1.")
    _check_model(model)
    manager = task_manager(tasks)
    loaded, loaded_tokenizer = _load(model, dtype, trust_remote_code)
    tokenizer = tokenizer or loaded_tokenizer or AutoTokenizer.from_pretrained(loaded.config._name_or_path)
    wrapper = HFLM(pretrained=loaded.eval(), tokenizer=tokenizer, backend="causal", batch_size=batch_size, device=device)
    results = simple_evaluate(
        model=wrapper,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
        apply_chat_template=apply_chat_template,
        bootstrap_iters=bootstrap_iters,
    )
    results = json.loads(json.dumps(results, default=handle_non_serializable))
    results["config"]["model"] = str(model) if not isinstance(model, PreTrainedModel) else loaded.config._name_or_path
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(json.dumps(results, indent=2) + "\n")
    return results


def summary_lines(results: dict[str, Any]) -> list[str]:
    """`task: metric value ± stderr` for every metric of an lm-eval results dict."""
    from .card import load_results

    return [
        f"{m.task}: {m.metric} {m.value:.4f}" + (f" ± {m.stderr:.4f}" if m.stderr is not None else "")
        for m in load_results(results)[0]
    ]
