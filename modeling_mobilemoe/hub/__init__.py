"""Publishing to the Hugging Face Hub: model cards from `hub_cards/` (`render_card`), Hub-ready folders and uploads
(`publish`), and evaluation with lm-evaluation-harness (`evaluate`, with a small offline task shipped in the package).
The `mobilemoe card`, `mobilemoe publish` and `mobilemoe eval` commands call these."""

from .card import (
    PAPER_TASKS,
    SIZES,
    TEMPLATES_DIR,
    VARIANTS,
    card_info,
    card_metadata,
    check_repo_id,
    load_results,
    render_card,
    validate_card,
)
from .evaluation import LOCAL_TASK, LOCAL_TASKS_DIR, PAPER_GROUP, evaluate
from .publish import assemble_folder, publish, upload_folder


__all__ = [
    "LOCAL_TASK",
    "LOCAL_TASKS_DIR",
    "PAPER_GROUP",
    "PAPER_TASKS",
    "SIZES",
    "TEMPLATES_DIR",
    "VARIANTS",
    "assemble_folder",
    "card_info",
    "card_metadata",
    "check_repo_id",
    "evaluate",
    "load_results",
    "publish",
    "render_card",
    "upload_folder",
    "validate_card",
]
