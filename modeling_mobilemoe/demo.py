"""`mobilemoe demo`: the package end to end on the bundled tiny model, offline, in seconds on a CPU."""

from __future__ import annotations

import os
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from .configuration_mobilemoe import MobileMoEConfig
from .modeling_mobilemoe import MobileMoEForCausalLM
from .tokenizer_training import shipped_tokenizer_path


def run_demo(output_dir: str = "outputs/demo", seed: int = 0, max_new_tokens: int = 24) -> dict:
    """Build the tiny preset with the shipped tokenizer, save it, reload it through the Auto classes, check the
    reload is exact, and chat with it through `pipeline("text-generation")`. Returns a summary dict."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model_dir = os.path.join(output_dir, "model")

    tokenizer = AutoTokenizer.from_pretrained(shipped_tokenizer_path())
    config = MobileMoEConfig.from_preset("tiny")
    model = MobileMoEForCausalLM(config).eval()
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(
        f"[model]     tiny MobileMoE: {config.num_hidden_layers} layers, {config.num_local_experts} experts "
        f"(top-{config.num_experts_per_tok}) + shared, {config.num_active_parameters() / 1e6:.2f}M active / "
        f"{config.num_parameters() / 1e6:.2f}M total -> {model_dir}"
    )

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    reloaded_tokenizer = AutoTokenizer.from_pretrained(model_dir)
    probe = reloaded_tokenizer("The cat sat on the mat.", return_tensors="pt")
    with torch.no_grad():
        max_diff = (reloaded(**probe).logits - model(**probe).logits).abs().max().item()
    print(f"[reload]    AutoModelForCausalLM/AutoTokenizer from {model_dir}: max |logit diff| = {max_diff:.1e}")

    generator = pipeline("text-generation", model=reloaded, tokenizer=reloaded_tokenizer)
    messages = [{"role": "user", "content": "What is two plus three?"}]
    reply = generator(messages, max_new_tokens=max_new_tokens, do_sample=False)[0]["generated_text"][-1]["content"]
    print(f"[chat]      user: {messages[0]['content']}")
    print(f"[chat]      assistant (random weights, so no sense yet): {reply!r}")

    elapsed = time.perf_counter() - start
    print(f"[done]      {elapsed:.1f}s")
    return {"model_dir": model_dir, "max_reload_diff": max_diff, "reply": reply, "seconds": elapsed}
