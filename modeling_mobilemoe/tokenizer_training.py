# Copyright 2026 The MobileMoE for Hugging Face contributors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Train a MobileMoE byte-level BPE tokenizer, and find the small one this package ships.

Layout of a trained vocabulary of `vocab_size` ids:

- ids `0 .. n-1`: the learned byte-level BPE (the 256 byte symbols, then one token per merge);
- ids `n .. n+15`: `SPECIAL_TOKENS`, in the Llama 3.1 order (`<|begin_of_text|>` = n, `<|end_of_text|>` = n+1,
  `<|finetune_right_pad_id|>` = n+4, `<|start_header_id|>` = n+6, `<|end_header_id|>` = n+7, `<|eot_id|>` = n+9);
- if the corpus is too small to learn `vocab_size - 16` BPE tokens, more `<|reserved_special_token_N|>` (N >= 8) fill
  the end, so that `len(tokenizer) == tokenizer.vocab_size == vocab_size` always.

Training is deterministic: the same corpus and arguments give the same `tokenizer.json`.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from collections.abc import Iterable, Iterator, Sequence

from tokenizers import Tokenizer
from tokenizers.pre_tokenizers import ByteLevel
from tokenizers.trainers import BpeTrainer
from transformers.utils import logging

from .tokenization_mobilemoe import (
    BOS_TOKEN,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    MobileMoETokenizer,
    build_backend,
    reserved_special_token,
)


logger = logging.get_logger(__name__)

RESOURCES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "resources")
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
# The form transformers 5 itself writes for a registered tokenizer class whose name does not end in "Fast"
# (`custom_object_save`): [class, None]. AutoTokenizer loads slot 1 when it is set and slot 0 otherwise.
AUTO_MAP = {"AutoTokenizer": ["tokenization_mobilemoe.MobileMoETokenizer", None]}
_LINES_PER_BATCH = 1000


def shipped_tokenizer_path() -> str:
    """Folder of the small tokenizer (2048 ids) the package ships for its tiny demo and tests."""
    path = os.path.join(RESOURCES_DIR, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise FileNotFoundError(
            f"shipped tokenizer not found at {path}; install the package with its package data (resources/**)"
        )
    return path


def shipped_corpus_files() -> list[str]:
    """The bundled English corpus the shipped tokenizer is trained on (`resources/corpus/*.txt`, a document a line)."""
    files = sorted(glob.glob(os.path.join(RESOURCES_DIR, "corpus", "*.txt")))
    if not files:
        raise FileNotFoundError(f"no corpus files in {os.path.join(RESOURCES_DIR, 'corpus')}")
    return files


def _check_files(files: Sequence[str | os.PathLike] | str | os.PathLike) -> list[str]:
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    if not isinstance(files, Sequence):
        raise TypeError(
            f"files must be a path or a list of paths, got {type(files).__name__}; pass texts=... for text"
        )
    paths = []
    for file in files:
        if not isinstance(file, (str, os.PathLike)):
            raise TypeError(f"files must hold paths (str or os.PathLike), got {type(file).__name__}: {file!r}")
        path = os.fspath(file)
        if not os.path.exists(path):
            raise FileNotFoundError(f"training file not found: {path}")
        if not os.path.isfile(path):
            raise IsADirectoryError(f"training file is not a regular file: {path}")
        paths.append(path)
    if not paths:
        raise ValueError("files is empty: give at least one training file")
    return paths


class _Counter:
    """Notes whether a corpus iterator yields any non-whitespace text, to detect an empty corpus."""

    def __init__(self) -> None:
        self.has_text = False

    def see(self, text: str) -> str:
        if not self.has_text and not text.isspace() and text:
            self.has_text = True
        return text


def _iter_files(paths: list[str], counter: _Counter) -> Iterator[list[str]]:
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            batch = []
            try:
                for line in handle:
                    batch.append(counter.see(line))
                    if len(batch) == _LINES_PER_BATCH:
                        yield batch
                        batch = []
            except UnicodeDecodeError as error:
                raise ValueError(f"training file is not valid UTF-8: {path} ({error})") from error
            if batch:
                yield batch


def _iter_texts(texts: Iterable[str], counter: _Counter) -> Iterator[str]:
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not a single string; wrap it in a list")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must hold strings, got {type(text).__name__} at index {index}")
        yield counter.see(text)


def train_tokenizer(
    files: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
    vocab_size: int = 2048,
    output_dir: str | os.PathLike | None = None,
    min_frequency: int = 2,
    *,
    texts: Iterable[str] | None = None,
    chat_template: str | None = CHAT_TEMPLATE,
    save_remote_code: bool = True,
    show_progress: bool = False,
) -> MobileMoETokenizer:
    """
    Train a MobileMoE byte-level BPE tokenizer of exactly `vocab_size` ids (special tokens included).

    The pipeline is `MobileMoETokenizer`'s: Llama 3 split regex, byte-level BPE over all 256 bytes (so any text
    round-trips), byte-level decoder, `<|begin_of_text|>` prepended. See the module docstring for the id layout.

    Args:
        files: UTF-8 text files to train on (a path or a list of paths). Give either `files` or `texts`.
        vocab_size: Total number of ids, at least 256 bytes + 16 special tokens (272).
        output_dir: If given, the tokenizer is saved there with `save_pretrained`.
        min_frequency: A pair must occur at least this often to be merged.
        texts: An iterable of strings to train on, instead of `files`.
        chat_template: Jinja chat template stored with the tokenizer (Llama 3 format with `{% generation %}`
            markers by default); `None` for a base tokenizer without one.
        save_remote_code: With `output_dir`, also copy `tokenization_mobilemoe.py` there, so the folder loads with
            `AutoTokenizer.from_pretrained(output_dir, trust_remote_code=True)` where this package is not installed.
            `tokenizer_config.json` carries `tokenizer_class` and `auto_map` either way.
        show_progress: Show the `tokenizers` trainer's progress bars.

    Returns:
        The trained `MobileMoETokenizer`.

    Raises:
        FileNotFoundError: A training file does not exist (its path is in the message).
        ValueError: `vocab_size` is smaller than 272, `min_frequency` is negative, the corpus is empty, a file is not
            UTF-8, or not exactly one of `files` / `texts` is given.
        TypeError: An argument has the wrong type.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be >= {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} byte symbols + {len(SPECIAL_TOKENS)} special tokens)"
        )
    if isinstance(min_frequency, bool) or not isinstance(min_frequency, int):
        raise TypeError(f"min_frequency must be an int, got {type(min_frequency).__name__}")
    if min_frequency < 0:
        raise ValueError(f"min_frequency={min_frequency} must be >= 0")
    if (files is None) == (texts is None):
        raise ValueError("give exactly one of files (paths) or texts (an iterable of strings)")

    counter = _Counter()
    if files is not None:
        corpus = _iter_files(_check_files(files), counter)
    else:
        corpus = _iter_texts(texts, counter)

    n_bpe = vocab_size - len(SPECIAL_TOKENS)
    backend: Tokenizer = build_backend({}, [])  # the trainer fills its BPE; the pipeline is MobileMoETokenizer's
    trainer = BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=min_frequency,
        show_progress=show_progress,
        special_tokens=[],
        initial_alphabet=ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    if not counter.has_text:
        raise ValueError("the training corpus is empty (no non-whitespace text in files/texts)")

    model = json.loads(backend.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in model["merges"]]
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise RuntimeError("the BPE trainer returned non-contiguous ids")

    n_learned = len(vocab)
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    fillers = []
    next_reserved = 1 + max(
        int(token.removeprefix("<|reserved_special_token_").removesuffix("|>"))
        for token in SPECIAL_TOKENS
        if token.startswith("<|reserved_special_token_")
    )
    while len(vocab) < vocab_size:
        token = reserved_special_token(next_reserved + len(fillers))
        vocab[token] = len(vocab)
        fillers.append(token)
    if fillers:
        logger.warning(
            f"The corpus only supports {n_learned} BPE tokens (asked for {n_bpe}); {len(fillers)} reserved special "
            f"tokens fill the vocabulary up to vocab_size={vocab_size}. Use more text for a real tokenizer."
        )

    named = {BOS_TOKEN, EOS_TOKEN, PAD_TOKEN}
    extra_special_tokens = [token for token in SPECIAL_TOKENS if token not in named] + fillers
    tokenizer = MobileMoETokenizer(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=extra_special_tokens,
        chat_template=chat_template,
    )
    if len(tokenizer) != vocab_size or tokenizer.vocab_size != vocab_size:
        raise RuntimeError(f"trained tokenizer has {len(tokenizer)} ids, expected vocab_size={vocab_size}")

    if output_dir is not None:
        save_tokenizer(tokenizer, output_dir, save_remote_code=save_remote_code)
    return tokenizer


def save_tokenizer(
    tokenizer: MobileMoETokenizer, output_dir: str | os.PathLike, save_remote_code: bool = True
) -> None:
    """`save_pretrained` with `tokenizer_class` and `auto_map` in tokenizer_config.json.

    With `save_remote_code`, `tokenization_mobilemoe.py` is copied next to the files (remote code); without it, it is
    not, even when `MobileMoETokenizer.register_for_auto_class()` was called on the class.
    """
    tokenizer.init_kwargs["auto_map"] = json.loads(json.dumps(AUTO_MAP))
    # Set on the instance only (the class attribute is left alone): `save_pretrained` copies the module file and writes
    # auto_map when `_auto_class` is set.
    tokenizer._auto_class = "AutoTokenizer" if save_remote_code else None
    try:
        tokenizer.save_pretrained(os.fspath(output_dir))
    finally:
        del tokenizer._auto_class


def add_train_tokenizer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `train-tokenizer` options to `parser`."""
    parser.add_argument("--files", nargs="+", required=True, metavar="FILE", help="UTF-8 text files to train on")
    parser.add_argument("--vocab-size", type=int, default=2048, help="total ids, special tokens included (>= 272)")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to save the tokenizer to")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum count of a pair to merge it")
    parser.add_argument("--no-chat-template", action="store_true", help="save without the Llama 3 chat template")
    parser.add_argument(
        "--no-remote-code", action="store_true", help="do not copy tokenization_mobilemoe.py into the folder"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """Run `train-tokenizer` from parsed arguments; returns the exit code."""
    tokenizer = train_tokenizer(
        args.files,
        vocab_size=args.vocab_size,
        output_dir=args.out,
        min_frequency=args.min_frequency,
        chat_template=None if args.no_chat_template else CHAT_TEMPLATE,
        save_remote_code=not args.no_remote_code,
        show_progress=not args.quiet,
    )
    print(
        f"train-tokenizer: {len(tokenizer)} ids ({len(tokenizer) - len(tokenizer.all_special_tokens)} BPE + "
        f"{len(tokenizer.all_special_tokens)} special, bos={tokenizer.bos_token_id} eos={tokenizer.eos_token_id} "
        f"eot={tokenizer.eot_token_id} pad={tokenizer.pad_token_id}) from {len(args.files)} file(s) -> {args.out}"
    )
    return 0


def add_tokenizer_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `train-tokenizer` on a CLI's subparsers; the parser's `func` default runs it."""
    parser = subparsers.add_parser(
        "train-tokenizer",
        help="train a byte-level BPE tokenizer",
        description="Train a MobileMoE byte-level BPE tokenizer (Llama 3 special tokens and chat template).",
    )
    add_train_tokenizer_arguments(parser)
    parser.set_defaults(func=run_train_tokenizer)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`mobilemoe train-tokenizer --files a.txt b.txt --vocab-size 2048 --out DIR`."""
    parser = argparse.ArgumentParser(
        prog="mobilemoe train-tokenizer",
        description="Train a MobileMoE byte-level BPE tokenizer (Llama 3 special tokens and chat template).",
    )
    add_train_tokenizer_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_train_tokenizer(args)
    except (FileNotFoundError, IsADirectoryError, ValueError, TypeError) as error:
        parser.error(str(error))  # exits with status 2


if __name__ == "__main__":
    raise SystemExit(main())
