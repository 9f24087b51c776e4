"""Tests for models/weights/tokenizer.py: exact round-trips, special tokens, and save/load through AutoTokenizer."""

import pytest

from models.errors import ConfigError
from models.training.data.corpus import read_text, stdlib_files
from models.weights.tokenizer import (
    EOS_TOKEN,
    SAT_TOKENS,
    SPECIAL_TOKENS,
    encode_text,
    encode_texts,
    load_tokenizer,
    train_code_tokenizer,
)

VOCAB_SIZE = 600
CODE = 'def f(a , b):\n\t"""Doc."""\r\n    return {"k": [a, b]}  # trailing  \n\n'
NON_ASCII = "naïve café → λx: x² 日本語 🚀 \u200b\x00\x7f end"


@pytest.fixture(scope="module")
def texts():
    return [read_text(path) for path in stdlib_files()[:40]]


@pytest.fixture(scope="module")
def saved(texts, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tokenizer")
    return train_code_tokenizer(texts, VOCAB_SIZE, out_dir=out_dir), out_dir


@pytest.fixture(scope="module")
def tokenizer(saved):
    return saved[0]


def test_vocab_size_includes_special_tokens(tokenizer):
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 4096


def test_sat_token_names():
    assert SAT_TOKENS == ("<|sat|>", *(f"<|sat_{i}|>" for i in range(1, 9)))


@pytest.mark.parametrize("text", [CODE, NON_ASCII, "", " leading space", "<|sat|> literal"])
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(encode_text(tokenizer, text)) == text


def test_round_trip_stdlib_files(tokenizer, texts):
    for text, ids in zip(texts[:10], encode_texts(tokenizer, texts[:10]), strict=True):
        assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(len(SPECIAL_TOKENS)))
    assert set(tokenizer.all_special_ids) == set(ids)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN


def test_ordinary_text_never_yields_special_ids(tokenizer, texts):
    special = set(tokenizer.all_special_ids)
    for ids in encode_texts(tokenizer, texts):
        assert not special & set(ids)


def test_literal_special_strings(tokenizer):
    text = "x = '<|sat|>' + '<|endoftext|>' + '<|fim_middle|>'"
    special = set(tokenizer.all_special_ids)
    # encode_text treats them as text ...
    assert not special & set(encode_text(tokenizer, text))
    # ... while the library default maps them to the special ids (the Hugging Face convention).
    default = tokenizer(text)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|sat|>") in default
    assert tokenizer.eos_token_id in default
    # The split flag does not stick to the tokenizer between calls.
    assert encode_text(tokenizer, text) != tokenizer(text)["input_ids"]


def test_merges_never_spell_special_tokens():
    # A corpus full of special-token strings: the byte-level regex splits "<|", letters and "|>",
    # so no merge can produce a special token even here.
    corpus = [f"{token} {token}{token}\n" * 50 for token in SPECIAL_TOKENS] * 5
    tokenizer = train_code_tokenizer(corpus, vocab_size=400, min_frequency=1)
    special = set(tokenizer.all_special_ids)
    for text in corpus:
        ids = encode_text(tokenizer, text)
        assert not special & set(ids)
        assert tokenizer.decode(ids) == text


def test_no_special_tokens_added_on_encode(tokenizer):
    assert tokenizer("x = 1")["input_ids"] == encode_text(tokenizer, "x = 1")


def test_autotokenizer_loads_saved(saved, monkeypatch):
    tokenizer, out_dir = saved
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert {"tokenizer.json", "tokenizer_config.json"} <= {path.name for path in out_dir.iterdir()}
    loaded = load_tokenizer(out_dir)
    assert len(loaded) == VOCAB_SIZE
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token_id, loaded.bos_token_id, loaded.pad_token_id) == (0, 0, 0)
    assert loaded.model_max_length == 4096
    for text in (CODE, NON_ASCII, "a <|sat_3|> b"):
        assert encode_text(loaded, text) == encode_text(tokenizer, text)
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.decode(encode_text(loaded, NON_ASCII)) == NON_ASCII


def test_rejects_vocab_smaller_than_bytes_and_specials():
    with pytest.raises(ConfigError):
        train_code_tokenizer(["x"], vocab_size=256)


def test_model_max_length_is_a_parameter():
    assert train_code_tokenizer(["abc abc"], vocab_size=300, model_max_length=128).model_max_length == 128
