"""Held-out metrics that show what each stage taught: language-model loss, loss far into long documents, and answer
accuracy on held-out chat prompts."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def _target_losses(model, input_ids, position_ids, labels) -> torch.Tensor:
    """Per-target next-token losses `(batch, length - 1)`; packed documents are kept apart by `position_ids`."""
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits.float()
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(labels.shape[0], -1)


@torch.no_grad()
def long_context_loss(model, blocks, boundary: int, batch_size: int = 4) -> dict[str, float]:
    """What a long context is worth on packed `blocks`: the loss on targets with more than `boundary` tokens of their
    document before them, read once with the whole block as context and once with the context cut to `boundary`
    tokens (the same tokens, position ids restarting every `boundary`, so attention can't reach further back).

    `long_context_gain` (cut minus whole, in nats) is what the model gets out of the tokens beyond `boundary`: after
    pretraining on `boundary`-token contexts it has never used them; mid-training on long documents whose late
    sentences refer far back teaches it to.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals = {"whole": 0.0, "cut": 0.0}
    count = 0
    for start in range(0, len(blocks), batch_size):
        batch = blocks[start : start + batch_size]
        input_ids = torch.tensor(batch["input_ids"], device=device)
        positions = torch.tensor(batch["position_ids"], device=device)
        labels = torch.tensor(batch["labels"], device=device)
        offsets = torch.arange(positions.shape[1], device=device) % boundary
        cut_positions = torch.minimum(positions, offsets)  # restart where a `boundary` window starts mid-document
        far = (labels[:, 1:] != IGNORE_INDEX) & (positions[:, 1:] >= boundary)
        totals["whole"] += _target_losses(model, input_ids, positions, labels)[far].sum().item()
        totals["cut"] += _target_losses(model, input_ids, cut_positions, labels)[far].sum().item()
        count += int(far.sum())
    model.train(was_training)
    if not count:
        raise ValueError(f"long_range_boundary: no held-out target lies {boundary} or more tokens into its document.")
    whole, cut = totals["whole"] / count, totals["cut"] / count
    return {"far_loss": whole, f"far_loss_with_{boundary}_context": cut, "long_context_gain": cut - whole}


@torch.no_grad()
def chat_accuracy(
    model, tokenizer, examples: list[dict[str, Any]], max_new_tokens: int = 24, batch_size: int = 16
) -> dict[str, Any]:
    """Share of held-out prompts (`messages` + expected `answer`) whose greedy reply contains the answer
    (case-insensitive), overall and per `category`; plus a few replies to look at."""
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    device = next(model.parameters()).device
    correct: dict[str, list[int]] = {}
    samples = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        prompts = [
            tokenizer.apply_chat_template(e["messages"], add_generation_prompt=True, tokenize=False) for e in batch
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        generated = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        replies = tokenizer.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for example, reply in zip(batch, replies):
            hit = example["answer"].lower() in reply.lower()
            correct.setdefault(example.get("category", "all"), []).append(int(hit))
            if len(samples) < 3:
                samples.append(
                    {"prompt": example["messages"][-1]["content"], "reply": reply.strip(), "answer": example["answer"]}
                )
    tokenizer.padding_side = padding_side
    model.train(was_training)
    hits = [hit for per_category in correct.values() for hit in per_category]
    return {
        "chat_accuracy": sum(hits) / max(len(hits), 1),
        "chat_accuracy_by_category": {name: sum(v) / len(v) for name, v in sorted(correct.items())},
        "samples": samples,
    }
