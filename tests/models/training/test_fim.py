"""Tests for models/training/data/fim.py: PSM layout, exact reconstruction, fim_rate and the inference prompt."""

import random

import pytest

from models.errors import ConfigError
from models.training.data.corpus import read_text, stdlib_files
from models.training.data.fim import FimTokens, fim_document, fim_prompt, maybe_fim
from models.weights.tokenizer import encode_text, train_code_tokenizer

DOCUMENT = 'def greet(name):\n    """Say hi."""\n    return f"héllo, {name} 🚀"\n\n\nprint(greet("wörld"))\n'


@pytest.fixture(scope="module")
def tokenizer():
    return train_code_tokenizer((read_text(path) for path in stdlib_files()[:30]), vocab_size=600)


@pytest.fixture(scope="module")
def fim(tokenizer):
    return FimTokens.from_tokenizer(tokenizer)


def split_psm(ids, fim):
    """(prefix, suffix, middle) id lists of a PSM sequence; checks each marker occurs once, in order."""
    for marker in (fim.prefix, fim.suffix, fim.middle):
        assert ids.count(marker) == 1
    assert ids[0] == fim.prefix
    suffix_at, middle_at = ids.index(fim.suffix), ids.index(fim.middle)
    assert suffix_at < middle_at
    return ids[1:suffix_at], ids[suffix_at + 1 : middle_at], ids[middle_at + 1 :]


def test_fim_tokens_are_the_special_ids(tokenizer, fim):
    assert fim == FimTokens(
        prefix=tokenizer.convert_tokens_to_ids("<|fim_prefix|>"),
        middle=tokenizer.convert_tokens_to_ids("<|fim_middle|>"),
        suffix=tokenizer.convert_tokens_to_ids("<|fim_suffix|>"),
    )
    assert len({fim.prefix, fim.middle, fim.suffix}) == 3


@pytest.mark.parametrize("seed", range(20))
def test_fim_document_reconstructs_text(tokenizer, fim, seed):
    ids = fim_document(DOCUMENT, tokenizer, random.Random(seed), fim)
    prefix, suffix, middle = split_psm(ids, fim)
    assert tokenizer.eos_token_id not in ids
    assert "".join(tokenizer.decode(part) for part in (prefix, middle, suffix)) == DOCUMENT


def test_fim_document_is_seeded(tokenizer, fim):
    runs = [fim_document(DOCUMENT, tokenizer, random.Random(7), fim) for _ in range(2)]
    assert runs[0] == runs[1]
    assert len({tuple(fim_document(DOCUMENT, tokenizer, random.Random(s), fim)) for s in range(10)}) > 1


def test_fim_document_of_empty_text(tokenizer, fim):
    assert fim_document("", tokenizer, random.Random(0), fim) == [fim.prefix, fim.suffix, fim.middle]


def test_fim_document_ignores_literal_markers_in_text(tokenizer, fim):
    text = "s = '<|fim_middle|>'  # <|fim_prefix|>\n"
    prefix, suffix, middle = split_psm(fim_document(text, tokenizer, random.Random(3), fim), fim)
    assert "".join(tokenizer.decode(part) for part in (prefix, middle, suffix)) == text


def test_fim_rate_zero_is_plain(tokenizer, fim):
    rng = random.Random(0)
    for _ in range(20):
        assert maybe_fim(DOCUMENT, tokenizer, rng, 0.0, fim) == encode_text(tokenizer, DOCUMENT)


def test_fim_rate_one_always_transforms(tokenizer, fim):
    rng = random.Random(0)
    for _ in range(20):
        split_psm(maybe_fim(DOCUMENT, tokenizer, rng, 1.0, fim), fim)


def test_fim_rate_is_a_probability(tokenizer, fim):
    rng = random.Random(0)
    transformed = sum(fim.middle in maybe_fim(DOCUMENT, tokenizer, rng, 0.5, fim) for _ in range(400))
    assert 150 < transformed < 250


def test_fim_prompt(tokenizer, fim):
    prefix, suffix = "def add(a, b):\n", "\n\nprint(add(1, 2))\n"
    ids = fim_prompt(prefix, suffix, tokenizer)
    assert ids[-1] == fim.middle
    assert ids == [
        fim.prefix,
        *encode_text(tokenizer, prefix),
        fim.suffix,
        *encode_text(tokenizer, suffix),
        fim.middle,
    ]


class WithoutFim:
    """A tokenizer stand-in that knows none of the FIM markers."""

    unk_token_id = 3

    def convert_tokens_to_ids(self, token):
        return self.unk_token_id


def test_fim_tokens_missing_from_tokenizer():
    with pytest.raises(ConfigError, match="fim_prefix"):
        FimTokens.from_tokenizer(WithoutFim())
