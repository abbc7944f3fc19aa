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
"""Tokenizer for MobileMoE: a Llama-3 style byte-level BPE backed by the `tokenizers` library.

This file is self-contained (it imports only `tokenizers` and `transformers`) so that a Hub repository can carry it as
remote code next to `tokenizer.json` / `tokenizer_config.json` and load it with `trust_remote_code=True`.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers.tokenization_utils_tokenizers import TokenizersBackend
from transformers.utils import logging


logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"tokenizer_file": "tokenizer.json"}

# The pre-tokenizer split of Llama 3 (the GPT-4 / cl100k pattern): contractions, letter runs with one optional leading
# non-letter, digit groups of at most three, punctuation runs, newlines and other whitespace.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOM_TOKEN = "<|eom_id|>"
EOT_TOKEN = "<|eot_id|>"
PYTHON_TAG_TOKEN = "<|python_tag|>"


def reserved_special_token(index: int) -> str:
    """The name Llama 3 gives its `index`-th reserved special token."""
    return f"<|reserved_special_token_{index}|>"


# The special tokens in the order Llama 3.1/3.2 lays them out right after the BPE vocabulary (Llama 3 puts them at ids
# 128000 + offset). MobileMoE tokenizers keep the same offsets: `<|begin_of_text|>` is the first id after the BPE
# merges, `<|end_of_text|>` the second, the pad token the fifth, and so on.
SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    EOS_TOKEN,
    reserved_special_token(0),
    reserved_special_token(1),
    PAD_TOKEN,
    reserved_special_token(2),
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOM_TOKEN,
    EOT_TOKEN,
    PYTHON_TAG_TOKEN,
    *(reserved_special_token(i) for i in range(3, 8)),
)

# Llama 3 chat format. The assistant reply *and* its `<|eot_id|>` sit inside `{% generation %}`, so
# `apply_chat_template(..., return_assistant_tokens_mask=True)` (and TRL's `assistant_only_loss=True`) train the model
# on what it must produce, including the token that ends its turn; the header that cues the reply is prompt.
# Content is trimmed as in Llama 3; a list of `{"type": "text", "text": ...}` parts is joined. The markers are spelled
# exactly `{% generation %}` / `{% endgeneration %}` (no whitespace control), which tools that grep for them expect.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first -%}{{- bos_token -}}{%- endif -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{- content | trim + '<|eot_id|>' -}}{% endgeneration %}"
    "{%- else -%}"
    "{{- content | trim + '<|eot_id|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)


def bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def default_vocab() -> dict[str, int]:
    """A merge-free vocabulary: the 256 byte symbols, then `SPECIAL_TOKENS` (272 ids)."""
    tokens = list(bytes_to_unicode().values()) + list(SPECIAL_TOKENS)
    return {token: index for index, token in enumerate(tokens)}


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]] | list[str]) -> Tokenizer:
    """The `tokenizers` pipeline of MobileMoE: Llama-3 regex split, byte-level BPE, byte-level decoding."""
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=True,  # as Llama 3: a pre-token that is itself in the vocabulary is not re-merged
        )
    )
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _template_adds(post_processor: dict | None, bos: str, eos: str) -> tuple[bool, bool] | None:
    """Whether a serialized `TemplateProcessing` (alone or in a `Sequence`) puts `bos` first / `eos` last of a text."""
    if not post_processor:
        return None
    if post_processor.get("type") == "Sequence":
        processors = post_processor.get("processors") or []
    else:
        processors = [post_processor]
    for processor in processors:
        if processor.get("type") == "TemplateProcessing":
            single = processor.get("single") or []
            first = single[0].get("SpecialToken", {}).get("id") if single else None
            last = single[-1].get("SpecialToken", {}).get("id") if single else None
            return first == bos, last == eos
    return None


def _saved_post_processor(kwargs: dict) -> dict | None:
    """The post-processor of the tokenizer being loaded (as `from_pretrained` passes it), serialized; else None."""
    if kwargs.get("post_processor") is not None:
        return json.loads(kwargs["post_processor"].__getstate__())
    if kwargs.get("tokenizer_object") is not None and kwargs["tokenizer_object"].post_processor is not None:
        return json.loads(kwargs["tokenizer_object"].post_processor.__getstate__())
    if kwargs.get("tokenizer_file") is not None and os.path.isfile(kwargs["tokenizer_file"]):
        with open(kwargs["tokenizer_file"], encoding="utf-8") as handle:
            return json.load(handle).get("post_processor")
    return None


class MobileMoETokenizer(TokenizersBackend):
    """
    Construct a MobileMoE tokenizer: a byte-level BPE with the Llama 3 pre-tokenizer regex and special tokens.

    Any text round-trips (`decode(encode(text)) == text`): every byte has a symbol in the vocabulary. By default a
    `<|begin_of_text|>` is prepended to every sequence (as Llama 3 does) and no end token is appended.

    The special tokens sit right after the BPE vocabulary in the Llama 3.1 order (see `SPECIAL_TOKENS`), inside the
    BPE vocabulary itself, so that `tokenizer.vocab_size == len(tokenizer)`, the number a model's embedding needs.

    ```python
    >>> from modeling_mobilemoe.tokenizer_training import shipped_tokenizer_path
    >>> tokenizer = MobileMoETokenizer.from_pretrained(shipped_tokenizer_path())
    >>> tokenizer.decode(tokenizer("Two plus two is four.")["input_ids"])
    '<|begin_of_text|>Two plus two is four.'
    ```

    Args:
        vocab (`dict[str, int]`, *optional*):
            Token -> id of the byte-level BPE. Defaults to the 256 byte symbols followed by `SPECIAL_TOKENS`.
            Special tokens missing from it are appended after its last id.
        merges (`list[tuple[str, str]]` or `list[str]`, *optional*):
            The BPE merges, in priority order. Defaults to none.
        bos_token (`str`, *optional*, defaults to `"<|begin_of_text|>"`):
            Token that starts every sequence (and every chat).
        eos_token (`str`, *optional*, defaults to `"<|end_of_text|>"`):
            End of a document (base models). Chat models end a turn with `eot_token` instead.
        pad_token (`str`, *optional*, defaults to `"<|finetune_right_pad_id|>"`):
            Padding token.
        eot_token (`str`, *optional*, defaults to `"<|eot_id|>"`):
            End of a chat turn, exposed as `tokenizer.eot_token` / `tokenizer.eot_token_id`.
        add_bos_token (`bool`, *optional*):
            Whether to prepend `bos_token`. Defaults to `True` for a new tokenizer and to what `tokenizer.json` does
            for a loaded one.
        add_eos_token (`bool`, *optional*):
            Whether to append `eos_token`. Defaults to `False` for a new tokenizer and to what `tokenizer.json` does
            for a loaded one.
        extra_special_tokens (`list[str]`, *optional*):
            The other special tokens. Defaults to the `SPECIAL_TOKENS` that are not bos, eos or pad.
        clean_up_tokenization_spaces (`bool`, *optional*, defaults to `False`):
            Must stay `False` for exact round trips.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    model = BPE

    def __init__(
        self,
        vocab: dict[str, int] | None = None,
        merges: list[tuple[str, str]] | list[str] | None = None,
        bos_token: str = BOS_TOKEN,
        eos_token: str = EOS_TOKEN,
        pad_token: str = PAD_TOKEN,
        eot_token: str = EOT_TOKEN,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        extra_special_tokens: list[str] | None = None,
        clean_up_tokenization_spaces: bool = False,
        **kwargs,
    ):
        if vocab is None:
            vocab = default_vocab()
        if not isinstance(vocab, dict):
            raise TypeError(f"vocab must be a dict of token -> id, got {type(vocab).__name__}")
        self._tokenizer = build_backend(vocab, list(merges or []))

        if extra_special_tokens is None:
            named = {str(bos_token), str(eos_token), str(pad_token)}
            extra_special_tokens = [token for token in SPECIAL_TOKENS if token not in named]

        # `save_pretrained` does not write `add_bos_token` / `add_eos_token` to tokenizer_config.json: when loading,
        # the post-processor in tokenizer.json says whether bos/eos are added. A new tokenizer adds bos only (Llama 3).
        saved = _template_adds(_saved_post_processor(kwargs), str(bos_token), str(eos_token)) or (True, False)
        add_bos_token = saved[0] if add_bos_token is None else bool(add_bos_token)
        add_eos_token = saved[1] if add_eos_token is None else bool(add_eos_token)
        kwargs.setdefault("model_max_length", 8192)

        super().__init__(
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            eot_token=eot_token,
            add_bos_token=add_bos_token,  # explicit, so the backend's post-processor is rebuilt from these two flags
            add_eos_token=add_eos_token,
            extra_special_tokens=extra_special_tokens,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )


__all__ = ["MobileMoETokenizer"]
