"""Hub-ready folders and uploads: `assemble_folder` writes what a model repository holds (safetensors weights, config
with `auto_map`, the remote-code files, tokenizer, generation config, the model card, exports if asked), `upload_folder`
sends it with `huggingface_hub` (`create_repo` + `upload_folder`, token from `HF_TOKEN` or `hf auth login`), and
`publish` does both, or only the first with `dry_run`."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from transformers import GenerationConfig
from transformers.utils import logging

from ..configuration_mobilemoe import MobileMoEConfig
from .card import check_repo_id, model_folder, render_card, validate_card


logger = logging.get_logger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parents[1]
REMOTE_CODE_FILES = ("configuration_mobilemoe.py", "modeling_mobilemoe.py", "tokenization_mobilemoe.py")
AUTO_MAP = {
    "AutoConfig": "configuration_mobilemoe.MobileMoEConfig",
    "AutoModel": "modeling_mobilemoe.MobileMoEModel",
    "AutoModelForCausalLM": "modeling_mobilemoe.MobileMoEForCausalLM",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_mobilemoe.MobileMoETokenizer", None]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
WEIGHT_INDEX = "model.safetensors.index.json"
EXPORT_FORMATS = ("onnx", "executorch")


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _prepare_output(out: Path, source: Path) -> None:
    """An empty folder at `out`: new, or emptied when it is an earlier output of this function."""
    if out.resolve() == source.resolve():
        raise ValueError(f"dry_run: the output folder {out} is the model folder itself.")
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"dry_run: {out} exists and is not a folder.")
        if any(out.iterdir()):
            if not ((out / "README.md").is_file() and (out / "config.json").is_file()):
                raise ValueError(f"dry_run: {out} is not empty and is not an earlier publish folder; pick a new one.")
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def assemble_folder(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    repo_id: str,
    results: str | os.PathLike | dict | None = None,
    export: list[str] | tuple[str, ...] = (),
    export_quantize: str | None = None,
    **card_options,
) -> Path:
    """Writes the repository of `model_dir` to `out_dir` and returns it. The card (`README.md`) is rendered for
    `repo_id` from `results` (an lm-eval results JSON) and `card_options` (`size`, `variant`, `base_model`,
    `datasets`, `license`, `templates_dir`: see `render_card`); `export` adds `onnx/` and/or `executorch/` exports
    (`export_quantize`: `8da4w` for a packed INT4 model, `none` otherwise, by default)."""
    folder = model_folder(model_dir)
    check_repo_id(repo_id)
    for fmt in export:
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"export: {fmt!r} is not one of {list(EXPORT_FORMATS)}.")
    card = render_card(folder, results=results, repo_id=repo_id, **card_options)  # every check before any write
    validate_card(card)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise ValueError(f"model: {folder} has no safetensors weights (save it with save_pretrained).")
    missing = [name for name in ("tokenizer.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"model: {folder} has no tokenizer ({', '.join(missing)} missing); save one next to the model.")

    out = Path(out_dir)
    _prepare_output(out, folder)
    for path in weights + [folder / WEIGHT_INDEX]:
        if path.is_file():
            shutil.copy2(path, out / path.name)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
    for name in REMOTE_CODE_FILES:  # the code the weights were saved with, else this package's
        shutil.copy2(folder / name if (folder / name).is_file() else PACKAGE_DIR / name, out / name)

    config = _json(folder / "config.json")
    config["auto_map"] = {**AUTO_MAP, **config.get("auto_map", {})}
    _write_json(out / "config.json", config)
    tokenizer_config = _json(out / "tokenizer_config.json")
    tokenizer_config["auto_map"] = {**TOKENIZER_AUTO_MAP, **tokenizer_config.get("auto_map", {})}
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    if (folder / "generation_config.json").is_file():
        shutil.copy2(folder / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(MobileMoEConfig.from_pretrained(folder)).save_pretrained(out)

    if export:
        from ..export import export_model

        quantize = export_quantize or ("8da4w" if config.get("quantization") else "none")
        for fmt in export:
            path = export_model(out, out / fmt, format=fmt, quantize=quantize)
            logger.info(f"exported {fmt} to {path}")
    card.save(out / "README.md")
    return out


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Upload MobileMoE model",
    token: str | None = None,
    endpoint: str | None = None,
) -> CommitInfo:
    """Creates `repo_id` (if it doesn't exist) and uploads `folder` to it in one `upload_folder` call. The token is
    `token` or the usual ones (`HF_TOKEN`, `hf auth login`); `endpoint` defaults to `HF_ENDPOINT` or the Hub."""
    check_repo_id(repo_id)
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, repo_type="model")


@dataclass
class Published:
    folder: Path | None  # the dry-run folder (None after an upload: it was a temporary one)
    commit: CommitInfo | None  # None for a dry run


def publish(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    dry_run: str | os.PathLike | None = None,
    commit_message: str = "Upload MobileMoE model",
    token: str | None = None,
    endpoint: str | None = None,
    **assemble_options,
) -> Published:
    """Assembles the Hub folder of `model_dir` (see `assemble_folder`) and uploads it to `repo_id`; with `dry_run`,
    writes the folder there and uploads nothing."""
    if dry_run is not None:
        return Published(assemble_folder(model_dir, dry_run, repo_id=repo_id, **assemble_options), None)
    with tempfile.TemporaryDirectory(prefix="mobilemoe-publish-") as staging:
        folder = assemble_folder(model_dir, Path(staging) / "repo", repo_id=repo_id, **assemble_options)
        commit = upload_folder(
            folder, repo_id, private=private, commit_message=commit_message, token=token, endpoint=endpoint
        )
    return Published(None, commit)
