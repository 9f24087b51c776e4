"""Fill-in-the-middle (FIM) for training and prompting, in the PSM order CodeLlama and StarCoder use.

A training document is cut at two character positions drawn uniformly at random into prefix,
middle and suffix, and rearranged as `<|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|>
middle`, so that ordinary left-to-right training teaches the model to write a middle given both
sides. Cutting characters (not tokens) and tokenizing each part separately matches what the model
sees at inference, where the user's prefix and suffix are tokenized separately too.

    fim = FimTokens.from_tokenizer(tok)
    ids = maybe_fim(text, tok, random.Random(0), fim_rate=0.5, fim_tokens=fim) + [tok.eos_token_id]
    prompt = fim_prompt("def add(a, b):\\n", "\\n\\nprint(add(1, 2))\\n", tok)
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from models.errors import ConfigError
from models.weights.tokenizer import FIM_MIDDLE_TOKEN, FIM_PREFIX_TOKEN, FIM_SUFFIX_TOKEN, encode_text


@dataclass(frozen=True)
class FimTokens:
    """The ids of the three FIM markers."""

    prefix: int
    middle: int
    suffix: int

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> FimTokens:
        return cls(
            prefix=_token_id(tokenizer, FIM_PREFIX_TOKEN),
            middle=_token_id(tokenizer, FIM_MIDDLE_TOKEN),
            suffix=_token_id(tokenizer, FIM_SUFFIX_TOKEN),
        )


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    # Unknown tokens map to None or to the UNK id, depending on the tokenizer.
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"tokenizer has no {token} token (train it with models.weights.tokenizer)")
    return token_id


def fim_document(
    text: str, tokenizer: PreTrainedTokenizerBase, rng: random.Random, fim_tokens: FimTokens
) -> list[int]:
    """PSM ids of one document cut at two uniform character positions; the caller appends EOS."""
    # Two independent draws over the len(text)+1 gaps, as StarCoder does: empty parts are allowed.
    start, end = sorted((rng.randint(0, len(text)), rng.randint(0, len(text))))
    prefix, middle, suffix = text[:start], text[start:end], text[end:]
    return _psm(prefix, suffix, tokenizer, fim_tokens) + encode_text(tokenizer, middle)


def maybe_fim(
    text: str,
    tokenizer: PreTrainedTokenizerBase,
    rng: random.Random,
    fim_rate: float,
    fim_tokens: FimTokens,
) -> list[int]:
    """With probability `fim_rate` the FIM ids of `text`, otherwise its plain ids."""
    if rng.random() < fim_rate:
        return fim_document(text, tokenizer, rng, fim_tokens)
    return encode_text(tokenizer, text)


def fim_prompt(prefix: str, suffix: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The inference prompt: PSM ending with the middle marker, so the model writes the middle."""
    return _psm(prefix, suffix, tokenizer, FimTokens.from_tokenizer(tokenizer))


def _psm(prefix: str, suffix: str, tokenizer: PreTrainedTokenizerBase, fim_tokens: FimTokens) -> list[int]:
    return [
        fim_tokens.prefix,
        *encode_text(tokenizer, prefix),
        fim_tokens.suffix,
        *encode_text(tokenizer, suffix),
        fim_tokens.middle,
    ]
