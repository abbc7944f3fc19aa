"""Training stages (pretrain, mid-train, SFT, QAT) on `transformers.Trainer` and TRL, driven by YAML recipes."""

from .arguments import DataArguments, ModelArguments, Recipe, StageArguments, parse_recipe
from .balancing import ExpertBalancingCallback, router_health, update_expert_bias
from .data import load_mixture, pack_documents
from .runner import run_stage, train

__all__ = [
    "DataArguments",
    "ExpertBalancingCallback",
    "ModelArguments",
    "Recipe",
    "StageArguments",
    "load_mixture",
    "pack_documents",
    "parse_recipe",
    "router_health",
    "run_stage",
    "train",
    "update_expert_bias",
]
