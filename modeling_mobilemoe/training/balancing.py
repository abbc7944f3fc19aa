"""Aux-loss-free expert balancing and router health for `Trainer`s.

Each MoE block counts, in training mode, how many tokens its router sent to each expert (`expert_load`). After every
optimizer step `ExpertBalancingCallback` nudges the selection-only `expert_bias` towards balance with the spec's rule,
`bias += rate * sign(mean_load - load)` (`rate = config.expert_bias_update_rate`), and zeroes the counts. The counts
are summed over all processes first, so every rank applies the same update. Recomputation under gradient
checkpointing counts every token twice, which the sign rule and the load ratios below don't see.
"""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from ..modeling_mobilemoe import MobileMoESparseMoeBlock


def moe_blocks(model: torch.nn.Module) -> list[MobileMoESparseMoeBlock]:
    """The MoE blocks of a model, also when wrapped (PEFT, DDP, FSDP)."""
    return [module for module in model.modules() if isinstance(module, MobileMoESparseMoeBlock)]


def update_expert_bias(blocks: list[MobileMoESparseMoeBlock], rate: float) -> torch.Tensor:
    """Applies the sign rule to every block from its `expert_load`, zeroes the loads and returns them `(layers, E)`."""
    loads = torch.stack([block.expert_load for block in blocks])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(loads)
    with torch.no_grad():
        for block, load in zip(blocks, loads):
            if rate:
                block.expert_bias += rate * torch.sign(load.mean() - load)
            block.expert_load.zero_()
    return loads


def router_health(loads: torch.Tensor) -> dict[str, float]:
    """Summary of per-layer expert loads `(layers, E)`: worst max/min ratio, dead experts, mean coefficient of
    variation (0 is perfect balance)."""
    loads = loads.double()
    max_load, min_load = loads.max(dim=-1).values, loads.min(dim=-1).values
    ratio = torch.where(min_load > 0, max_load / min_load.clamp(min=1), torch.full_like(max_load, float("inf")))
    coefficient_of_variation = loads.std(dim=-1, unbiased=False) / loads.mean(dim=-1).clamp(min=1e-12)
    return {
        "router/max_min_load_ratio": ratio.max().item(),
        "router/dead_experts": int((loads == 0).sum().item()),
        "router/load_cv": coefficient_of_variation.mean().item(),
    }


class ExpertBalancingCallback(TrainerCallback):
    """Updates `expert_bias` after each optimizer step and keeps the loads seen since the last log.

    `pop_router_metrics()` gives the router health of that window (the trainers of this package add it to their logs);
    the per-expert loads of the whole run are written to `router_load.json` at every save and at the end.
    """

    def __init__(self):
        self._window: torch.Tensor | None = None
        self._total: torch.Tensor | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for block in moe_blocks(model):
            block.expert_load.zero_()  # evaluation or an earlier run may have left counts behind

    def on_step_end(self, args, state, control, model=None, **kwargs):
        blocks = moe_blocks(model)
        if not blocks:
            return
        loads = update_expert_bias(blocks, model.config.expert_bias_update_rate).cpu()
        self._window = loads if self._window is None else self._window + loads
        self._total = loads if self._total is None else self._total + loads

    def pop_router_metrics(self) -> dict[str, float]:
        if self._window is None:
            return {}
        metrics, self._window = router_health(self._window), None
        return metrics

    def _write_loads(self, args, state):
        if self._total is not None and state.is_world_process_zero:
            os.makedirs(args.output_dir, exist_ok=True)
            with open(os.path.join(args.output_dir, "router_load.json"), "w", encoding="utf-8") as file:
                json.dump({"step": state.global_step, "tokens_per_expert": self._total.tolist()}, file)

    def on_save(self, args, state, control, **kwargs):
        self._write_loads(args, state)

    def on_train_end(self, args, state, control, **kwargs):
        self._write_loads(args, state)


class RouterMetricsMixin:
    """Adds router health to a `Trainer`'s logs before its integrations (TensorBoard, W&B, ...) receive them."""

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # training logs only; evaluation sees no optimizer steps
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, ExpertBalancingCallback):
                    logs.update(callback.pop_router_metrics())
        super().log(logs, *args, **kwargs)
