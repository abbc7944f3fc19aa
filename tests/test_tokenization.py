"""MobileMoETokenizer (Llama 3 style byte-level BPE), its training function and the tokenizer the package ships."""

import importlib.util
import json
import logging
import os
import shutil
import textwrap

import pytest

from isolation import run_without_package
from modeling_mobilemoe.tokenization_mobilemoe import (
    CHAT_TEMPLATE,
    EOT_TOKEN,
    SPECIAL_TOKENS,
    MobileMoETokenizer,
)
from modeling_mobilemoe.tokenizer_training import (
    AUTO_MAP,
    MIN_VOCAB_SIZE,
    RESOURCES_DIR,
    main,
    shipped_corpus_files,
    shipped_tokenizer_path,
    train_tokenizer,
)


ROUND_TRIP_TEXTS = [
    "",
    "Hello world! Three plus four is seven.",
    "It's 12:30, and we've got 1,234,567 apples (or so they'd say)...",
    "Héllo wörld, naïve café — Zoë's façade; Straße, Øre, İstanbul",
    "日本語のテキスト、中文文本、한국어 텍스트",
    "Emoji 🚀🤖👩🏽‍🔬 and flags 🇫🇷, math ∑ x² ≤ ∞, arrows ⇒",
    "مرحبا بالعالم and שלום עולם",
    "combining: e\u0301 a\u0308 and zero-width\u200bjoiner\u200d",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore\ttabs\n\nblank lines\n\n\n  indented\r\nwindows line\rcarriage",
    "\n\n\t \u00a0\u3000 \n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n",
    "<|not_a_special|> <| begin_of_text |> <|",
    "\x00\x01\x7f control bytes",
]

CONVERSATION = [
    {"role": "user", "content": "What is two plus three?"},
    {"role": "assistant", "content": "Two plus three is five."},
    {"role": "user", "content": "And five times two?"},
    {"role": "assistant", "content": "Five times two is ten."},
]

EXPECTED_CHAT = (
    "<|begin_of_text|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus three?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nTwo plus three is five.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd five times two?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nFive times two is ten.<|eot_id|>"
)

SMALL_CORPUS = [
    "The red fox runs in the green field. The blue bird sings in the tall tree.",
    "One plus one is two. Two plus two is four. Four plus four is eight.",
    "On Monday the cat sleeps; on Tuesday the dog barks at the moon.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return MobileMoETokenizer.from_pretrained(shipped_tokenizer_path())


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(SMALL_CORPUS) + "\n", encoding="utf-8")
    return str(path)


# --- encoding and decoding -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer.encode(text)
    assert with_bos == [tokenizer.bos_token_id, *ids]
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == text
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_default_tokenizer_is_bytes_plus_special_tokens_and_round_trips():
    tokenizer = MobileMoETokenizer()
    assert len(tokenizer) == tokenizer.vocab_size == MIN_VOCAB_SIZE == 256 + len(SPECIAL_TOKENS)
    assert tokenizer.bos_token_id == 256
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_vocabulary_layout_of_shipped_tokenizer(tokenizer):
    assert len(tokenizer) == tokenizer.vocab_size == 2048
    first_special = 2048 - len(SPECIAL_TOKENS)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(first_special, 2048))
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|begin_of_text|>", 2032)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|end_of_text|>", 2033)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|finetune_right_pad_id|>", 2036)
    assert (tokenizer.eot_token, tokenizer.eot_token_id) == ("<|eot_id|>", 2041)
    assert tokenizer.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"]) == [2038, 2039]
    assert set(SPECIAL_TOKENS) <= set(tokenizer.all_special_tokens)


def test_special_tokens_are_single_ids_and_bos_is_prepended(tokenizer):
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        assert tokenizer.encode(token, add_special_tokens=False) == [token_id]
        assert tokenizer.encode(f"a{token}b", add_special_tokens=False)[1] == token_id
        assert tokenizer.decode([token_id]) == token
        assert tokenizer.decode([token_id], skip_special_tokens=True) == ""
    ids = tokenizer("Three plus four is seven.")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[-1] != tokenizer.eos_token_id
    assert tokenizer.add_bos_token and not tokenizer.add_eos_token
    assert tokenizer("a", "b")["input_ids"] == [
        tokenizer.bos_token_id,
        *tokenizer.encode("a", add_special_tokens=False),
    ] + [
        tokenizer.bos_token_id,
        *tokenizer.encode("b", add_special_tokens=False),
    ]


def test_add_bos_and_eos_flags_survive_save_and_load(tmp_path):
    tokenizer = MobileMoETokenizer.from_pretrained(shipped_tokenizer_path(), add_bos_token=False, add_eos_token=True)
    body = tokenizer.encode("hi", add_special_tokens=False)
    assert tokenizer.encode("hi") == [*body, tokenizer.eos_token_id]
    tokenizer.save_pretrained(tmp_path)
    reloaded = MobileMoETokenizer.from_pretrained(tmp_path)
    assert (reloaded.add_bos_token, reloaded.add_eos_token) == (False, True)
    assert reloaded.encode("hi") == [*body, reloaded.eos_token_id]
    # Overriding one flag keeps the other from the file.
    both = MobileMoETokenizer.from_pretrained(tmp_path, add_bos_token=True)
    assert both.encode("hi") == [both.bos_token_id, *body, both.eos_token_id]
    # Setting the property later updates the backend too.
    both.add_eos_token = False
    assert both.encode("hi") == [both.bos_token_id, *body]


def test_padding_uses_the_pad_token(tokenizer):
    batch = tokenizer(["one", "one two three"], padding=True)
    assert batch["input_ids"][0][-1] == tokenizer.pad_token_id
    assert batch["attention_mask"][0][-1] == 0


# --- chat template ---------------------------------------------------------------------------------------------------


def test_chat_template_renders_the_llama3_format(tokenizer):
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert "{% generation %}" in CHAT_TEMPLATE and "{% endgeneration %}" in CHAT_TEMPLATE  # as TRL users grep for
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED_CHAT


def test_chat_template_generation_prompt_and_system_message(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, *CONVERSATION[:1]]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is two plus three?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert ids.count(tokenizer.bos_token_id) == 1  # the template writes bos; tokenizing it adds no second one
    # Content as a list of text parts renders the same as a string.
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "What is two "}, {"type": "text", "text": "plus three?"}],
        }
    ]
    assert tokenizer.apply_chat_template(parts, tokenize=False) == tokenizer.apply_chat_template(
        CONVERSATION[:1], tokenize=False
    )


def test_assistant_tokens_mask_covers_exactly_the_assistant_replies(tokenizer):
    out = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert ids == tokenizer.encode(EXPECTED_CHAT, add_special_tokens=False)
    assert len(mask) == len(ids)
    # Masked tokens: each assistant reply followed by its <|eot_id|> (the token that ends the turn), nothing else.
    spans, current = [], []
    for token_id, flag in zip(ids, mask, strict=True):
        if flag:
            current.append(token_id)
        elif current:
            spans.append(current)
            current = []
    if current:
        spans.append(current)
    eot = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    expected = [
        tokenizer.encode(m["content"], add_special_tokens=False) + [eot]
        for m in CONVERSATION
        if m["role"] == "assistant"
    ]
    assert spans == expected
    assert sum(mask) == sum(len(span) for span in expected)


def test_assistant_tokens_mask_with_tensors_and_batches(tokenizer):
    out = tokenizer.apply_chat_template(
        [CONVERSATION, CONVERSATION[:2]],
        return_dict=True,
        return_assistant_tokens_mask=True,
        padding=True,
        return_tensors="pt",
    )
    assert out["input_ids"].shape == out["assistant_masks"].shape
    assert out["assistant_masks"][1].sum() < out["assistant_masks"][0].sum()


# --- saving and loading ----------------------------------------------------------------------------------------------


def test_auto_map_has_the_form_transformers_writes():
    assert AUTO_MAP == {"AutoTokenizer": ["tokenization_mobilemoe.MobileMoETokenizer", None]}


def test_shipped_tokenizer_config_names_the_class_and_auto_map():
    config = json.loads(open(os.path.join(shipped_tokenizer_path(), "tokenizer_config.json"), encoding="utf-8").read())
    assert config["tokenizer_class"] == "MobileMoETokenizer"
    assert config["auto_map"] == AUTO_MAP
    assert os.path.isfile(os.path.join(shipped_tokenizer_path(), "chat_template.jinja"))


def test_save_pretrained_and_from_pretrained_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = MobileMoETokenizer.from_pretrained(tmp_path)
    assert json.loads(reloaded.backend_tokenizer.to_str()) == json.loads(tokenizer.backend_tokenizer.to_str())
    assert reloaded.chat_template == tokenizer.chat_template
    assert reloaded.special_tokens_map == tokenizer.special_tokens_map
    assert reloaded.eot_token_id == tokenizer.eot_token_id
    text = "Zoë counts 1, 2, 3 🚀"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MobileMoETokenizer"
    assert config["auto_map"] == AUTO_MAP


def test_loaded_backend_matches_tokenizer_json_exactly(tokenizer):
    with open(os.path.join(shipped_tokenizer_path(), "tokenizer.json"), encoding="utf-8") as handle:
        assert json.loads(tokenizer.backend_tokenizer.to_str()) == json.load(handle)


def test_loads_a_llama3_layout_where_special_tokens_are_only_added_tokens(tokenizer, tmp_path):
    """Llama 3's own files keep the special tokens out of the BPE vocab and list them in `added_tokens` only."""
    with open(os.path.join(shipped_tokenizer_path(), "tokenizer.json"), encoding="utf-8") as handle:
        data = json.load(handle)
    for token in SPECIAL_TOKENS:
        del data["model"]["vocab"][token]
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    data["post_processor"] = {"type": "Sequence", "processors": [byte_level, data["post_processor"]]}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    added = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in data["added_tokens"]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eot_id|>", "added_tokens_decoder": added}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")

    llama3_layout = MobileMoETokenizer.from_pretrained(tmp_path)
    assert (len(llama3_layout), llama3_layout.vocab_size) == (2048, 2032)
    assert (llama3_layout.eos_token_id, llama3_layout.pad_token_id) == (2041, 2036)
    text = "Héllo <|eot_id|> wörld 🚀"
    assert llama3_layout(text)["input_ids"] == tokenizer(text)["input_ids"]


LOAD_WITHOUT_PACKAGE = textwrap.dedent(
    """
    import json
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(tokenizer).__module__.startswith("transformers_modules"), type(tokenizer).__module__
    conversation = json.loads(sys.argv[2])
    chat = tokenizer.apply_chat_template(conversation, return_dict=True, return_assistant_tokens_mask=True)
    print(json.dumps({
        "class": type(tokenizer).__name__,
        "ids": tokenizer("Héllo wörld 🚀")["input_ids"],
        "chat_ids": chat["input_ids"],
        "mask": chat["assistant_masks"],
    }))
    """
)


def test_auto_tokenizer_loads_as_remote_code_without_the_package(tokenizer, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(shipped_tokenizer_path(), folder)
    shutil.copy(os.path.join(os.path.dirname(RESOURCES_DIR), "tokenization_mobilemoe.py"), folder)
    result = run_without_package(LOAD_WITHOUT_PACKAGE, str(folder), json.dumps(CONVERSATION), cwd=tmp_path)
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    local = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    assert remote == {
        "class": "MobileMoETokenizer",
        "ids": tokenizer("Héllo wörld 🚀")["input_ids"],
        "chat_ids": local["input_ids"],
        "mask": local["assistant_masks"],
    }


# --- training --------------------------------------------------------------------------------------------------------


def test_train_tokenizer_gives_the_requested_vocab_size(corpus_file):
    tokenizer = train_tokenizer([corpus_file], vocab_size=300)
    assert len(tokenizer) == tokenizer.vocab_size == 300
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(300 - len(SPECIAL_TOKENS), 300))
    assert tokenizer.chat_template == CHAT_TEMPLATE
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # texts= gives the same tokenizer as files=
    same = train_tokenizer(texts=[line + "\n" for line in SMALL_CORPUS], vocab_size=300)
    assert same.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    # deterministic
    assert train_tokenizer(corpus_file, 300).backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


def test_train_tokenizer_fills_a_vocab_the_corpus_cannot_support(corpus_file, caplog):
    with caplog.at_level(logging.WARNING):
        tokenizer = train_tokenizer([corpus_file], vocab_size=1000, min_frequency=1)
    assert len(tokenizer) == tokenizer.vocab_size == 1000
    n_bpe = tokenizer.bos_token_id
    assert n_bpe < 1000 - len(SPECIAL_TOKENS)
    assert tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(n_bpe, n_bpe + len(SPECIAL_TOKENS)))
    assert tokenizer.convert_ids_to_tokens(999) in tokenizer.all_special_tokens
    assert tokenizer.convert_ids_to_tokens(999).startswith("<|reserved_special_token_")
    assert tokenizer.encode(tokenizer.convert_ids_to_tokens(999), add_special_tokens=False) == [999]


def test_train_tokenizer_saves_a_folder_that_loads(corpus_file, tmp_path):
    out = tmp_path / "tok"
    registered_before = MobileMoETokenizer._auto_class
    tokenizer = train_tokenizer([corpus_file], vocab_size=300, output_dir=str(out))
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    assert (out / "tokenization_mobilemoe.py").is_file()  # remote code travels with the files
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MobileMoETokenizer"
    assert config["auto_map"] == AUTO_MAP
    reloaded = MobileMoETokenizer.from_pretrained(out)
    assert reloaded.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    assert MobileMoETokenizer._auto_class == registered_before  # saving left the class registration alone


def test_train_tokenizer_without_remote_code_or_chat_template(corpus_file, tmp_path, monkeypatch):
    monkeypatch.setattr(MobileMoETokenizer, "_auto_class", "AutoTokenizer")  # as if registered at package import
    out = tmp_path / "tok"
    tokenizer = train_tokenizer(
        [corpus_file], vocab_size=300, output_dir=out, save_remote_code=False, chat_template=None
    )
    assert not (out / "tokenization_mobilemoe.py").exists()
    assert not (out / "chat_template.jinja").exists()
    assert tokenizer.chat_template is None
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["auto_map"] == AUTO_MAP


def test_train_tokenizer_errors(corpus_file, tmp_path):
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([corpus_file, missing], vocab_size=300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([corpus_file], vocab_size=MIN_VOCAB_SIZE - 1)
    with pytest.raises(TypeError, match="vocab_size"):
        train_tokenizer([corpus_file], vocab_size=300.0)
    with pytest.raises(ValueError, match="min_frequency"):
        train_tokenizer([corpus_file], vocab_size=300, min_frequency=-1)
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n\t\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([str(empty)], vocab_size=300)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(texts=[], vocab_size=300)
    with pytest.raises(ValueError, match="files"):
        train_tokenizer([], vocab_size=300)
    with pytest.raises(ValueError, match="exactly one of files"):
        train_tokenizer([corpus_file], vocab_size=300, texts=["a"])
    with pytest.raises(ValueError, match="exactly one of files"):
        train_tokenizer(vocab_size=300)
    with pytest.raises(TypeError, match="texts"):
        train_tokenizer(texts="a single string", vocab_size=300)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt"):
        train_tokenizer([str(latin1)], vocab_size=300)


def test_cli_main(corpus_file, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["--files", corpus_file, corpus_file, "--vocab-size", "300", "--out", str(out), "--quiet"]) == 0
    assert "300 ids" in capsys.readouterr().out
    assert len(MobileMoETokenizer.from_pretrained(out)) == 300
    with pytest.raises(SystemExit) as exit_info:
        main(["--files", str(tmp_path / "nope.txt"), "--vocab-size", "300", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "nope.txt" in capsys.readouterr().err


# --- the shipped corpus and tokenizer are reproducible ---------------------------------------------------------------


def test_corpus_generator_reproduces_the_shipped_corpus(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "generate_corpus", os.path.join(RESOURCES_DIR, "corpus", "generate_corpus.py")
    )
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generator.main(str(tmp_path))
    shipped = shipped_corpus_files()
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(path) for path in shipped)
    for path in shipped:
        with open(path, "rb") as a, open(tmp_path / os.path.basename(path), "rb") as b:
            assert a.read() == b.read(), path
    assert sum(os.path.getsize(path) for path in shipped) < 512 * 1024


@pytest.mark.slow
def test_training_on_the_shipped_corpus_rebuilds_the_shipped_tokenizer(tmp_path):
    train_tokenizer(
        shipped_corpus_files(), vocab_size=2048, output_dir=tmp_path, min_frequency=2, save_remote_code=False
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        with open(os.path.join(shipped_tokenizer_path(), name), encoding="utf-8") as handle:
            assert (tmp_path / name).read_text(encoding="utf-8") == handle.read(), name
