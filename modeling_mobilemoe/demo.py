"""`mobilemoe demo`: the whole pipeline on the tiny preset and bundled data, offline, in minutes on a CPU.

tokenizer (trained on the bundled corpus) -> pretraining (256-token context) -> mid-training (1024) -> SFT (chat,
assistant-only loss) -> QAT (INT4 weights, INT8 activations; saved in the packed INT4 format) -> a loss-curve plot ->
a chat with the INT4 model through `pipeline("text-generation")` -> lm-eval on the shipped offline task -> its model
card and a dry-run publish folder (what `mobilemoe publish` would upload). Each stage is the tiny recipe in
`recipes/tiny/` run by the same runner as `mobilemoe train`; each prints its held-out metric before and after training.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from .tokenizer_training import shipped_corpus_files, train_tokenizer

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RECIPES = os.path.join(REPOSITORY, "recipes", "tiny")
STAGES = ("pretrain", "midtrain", "sft", "qat")
CHAT_PROMPTS = ("What sound does a cow make?", "How many legs does a spider have?", "What day comes after Monday?")
DEMO_REPO_ID = "your-name/MobileMoE-tiny-demo"  # the card's snippets load from it once uploaded


def plot_losses(stage_dirs: dict[str, str], path: str) -> None:
    """Training loss of every stage on one step axis, a dashed line where each stage starts, written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    offset = 0
    for stage, folder in stage_dirs.items():
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as file:
            state = json.load(file)
        points = [(entry["step"] + offset, entry["loss"]) for entry in state["log_history"] if "loss" in entry]
        axis.plot(*zip(*points), marker=".", label=stage)
        axis.axvline(offset, color="grey", linestyle="--", linewidth=0.8)
        offset += state["global_step"]
    axis.set(xlabel="optimizer step (stages in sequence)", ylabel="training loss", title="MobileMoE tiny: training")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def chat(model_dir: str, prompts: tuple[str, ...] = CHAT_PROMPTS, max_new_tokens: int = 24) -> list[dict[str, str]]:
    """Greedy replies of the model in `model_dir` through the Auto classes and `pipeline("text-generation")`."""
    generator = pipeline(
        "text-generation",
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
    )
    exchanges = []
    for prompt in prompts:
        output = generator([{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, do_sample=False)
        exchanges.append({"user": prompt, "assistant": output[0]["generated_text"][-1]["content"].strip()})
    return exchanges


def run_demo(output_dir: str = "outputs/demo", seed: int = 0, recipes_dir: str | None = None) -> dict[str, Any]:
    """Runs the pipeline into `output_dir` and returns every stage's summary, the plot's path and the chat."""
    from .training import parse_recipe, run_stage

    start = time.perf_counter()
    recipes_dir = recipes_dir or TINY_RECIPES
    torch.manual_seed(seed)
    if not os.path.isdir(recipes_dir):
        raise FileNotFoundError(
            f"recipes_dir: no tiny recipes at {recipes_dir} (run the demo from a source checkout)."
        )

    tokenizer_dir = os.path.join(output_dir, "tokenizer")
    tokenizer = train_tokenizer(shipped_corpus_files(), vocab_size=2048, output_dir=tokenizer_dir)
    print(f"[tokenizer] byte-level BPE, {len(tokenizer)} ids, trained on the bundled corpus -> {tokenizer_dir}")

    summaries, stage_dirs, previous = {}, {}, None
    for stage in STAGES:
        stage_dirs[stage] = os.path.join(output_dir, stage)
        overrides = [f"output_dir={stage_dirs[stage]}", f"seed={seed}", "resume_from_checkpoint=null"]
        overrides.append(
            f"tokenizer_name_or_path={tokenizer_dir}" if previous is None else f"model_name_or_path={previous}"
        )
        summaries[stage] = run_stage(parse_recipe(os.path.join(recipes_dir, stage, "config.yaml"), overrides))
        previous = stage_dirs[stage]

    plot_path = os.path.join(output_dir, "loss_curve.png")
    plot_losses(stage_dirs, plot_path)
    print(f"[plot]      training loss of every stage -> {plot_path}")

    exchanges = chat(previous)
    for exchange in exchanges:
        print(f"[chat]      user: {exchange['user']}\n[chat]      assistant: {exchange['assistant']}")

    hub = publish_demo_model(previous, output_dir)

    elapsed = time.perf_counter() - start
    print(f"[done]      {elapsed:.0f}s; the INT4 chat model is in {previous}")
    return {
        "stages": summaries, "loss_curve": plot_path, "chat": exchanges, "model_dir": previous, "seconds": elapsed,
        **hub,
    }  # fmt: skip


def publish_demo_model(model_dir: str, output_dir: str) -> dict[str, Any]:
    """lm-eval on the shipped offline task, then the card and the Hub-ready folder of the model, as a dry run."""
    from .hub import LOCAL_TASK, evaluate, publish

    eval_path = os.path.join(output_dir, "eval", "results.json")
    results = evaluate(model_dir, [LOCAL_TASK], output=eval_path, batch_size=32)
    metrics = results["results"][LOCAL_TASK]
    print(
        f"[eval]      lm-eval {LOCAL_TASK} ({results['n-samples'][LOCAL_TASK]['effective']} questions, chance 25.3%): "
        f"acc {metrics['acc,none']:.3f} ± {metrics['acc_stderr,none']:.3f} -> {eval_path}"
    )
    hub_dir = os.path.join(output_dir, "hub")
    folder = publish(model_dir, DEMO_REPO_ID, dry_run=hub_dir, results=eval_path).folder
    files = sorted(name for name in os.listdir(folder))
    print(f"[card]      model card with the eval table and model-index -> {os.path.join(hub_dir, 'README.md')}")
    print(
        f"[publish]   dry run: Hub-ready folder ({', '.join(files)}) -> {hub_dir}; upload with `mobilemoe publish "
        f"--model {model_dir} --repo-id NAME/REPO --results {eval_path}`"
    )
    return {"eval": eval_path, "eval_accuracy": metrics["acc,none"], "hub_dir": hub_dir}
