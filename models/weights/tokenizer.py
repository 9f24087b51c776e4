"""A byte-level BPE code tokenizer with FIM and SAT special tokens, trained with `tokenizers`.

`train_code_tokenizer` learns GPT-2-style byte-level BPE (so any text, non-ASCII included, encodes
and decodes exactly) and reserves the special tokens this product needs: one document separator,
the three fill-in-the-middle markers and the SAT ids (`<|sat|>` for the repeated flavour,
`<|sat_1|>`..`<|sat_8|>` for the diverse one). The result saves as `tokenizer.json` +
`tokenizer_config.json` and loads back with `transformers.AutoTokenizer.from_pretrained(dir)`.
Encode training data and prompts with `encode_text`, which never turns text into special ids.

    tok = train_code_tokenizer(texts, vocab_size=4096, out_dir=Path("runs/tok"))
    tok = load_tokenizer("runs/tok"); ids = encode_text(tok, "def f():\\n    return 1\\n")
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from models.errors import ConfigError
from models.weights.sat import sat_token_names

EOS_TOKEN = "<|endoftext|>"
FIM_PREFIX_TOKEN = "<|fim_prefix|>"
FIM_MIDDLE_TOKEN = "<|fim_middle|>"
FIM_SUFFIX_TOKEN = "<|fim_suffix|>"
FIM_TOKENS = (FIM_PREFIX_TOKEN, FIM_MIDDLE_TOKEN, FIM_SUFFIX_TOKEN)
# Both SAT flavours are reserved up front so one tokenizer serves repeated and diverse checkpoints;
# 8 diverse slots cover the k_train values the paper uses (5 and 7).
SAT_TOKENS = tuple(sat_token_names(1) + sat_token_names(8))
# EOS first so that it gets id 0; the order fixes the ids of every special token.
SPECIAL_TOKENS = (EOS_TOKEN, *FIM_TOKENS, *SAT_TOKENS)
BYTE_ALPHABET_SIZE = 256


def train_code_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    out_dir: Path | None = None,
    min_frequency: int = 2,
    model_max_length: int = 4096,
) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`; save to `out_dir` when given.

    `vocab_size` counts everything: the 256 byte tokens, the special tokens and the merges. A corpus
    too small to supply that many merges of `min_frequency` yields a smaller vocabulary.

    Special tokens never come out of merges: the byte-level regex splits `<|`, the letters and `|>`
    into separate pre-tokens, so no merge can spell a special token. A literal special-token string
    in the text, however, *is* matched to its special id by the default `tokenizer(text)` call
    (the Hugging Face convention). Encode ordinary text with `encode_text`, which passes
    `split_special_tokens=True`, so a file containing "<|sat|>" yields plain byte tokens.

    EOS doubles as BOS and PAD: a code model trained on packed documents needs exactly one
    separator, and padding is always masked out, so separate BOS/PAD ids would be unused rows.
    Nothing is added automatically on encode; callers append EOS after each document.
    """
    if vocab_size < BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS):
        raise ConfigError(
            f"vocab_size must be >= {BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)} "
            f"(bytes + special tokens), got {vocab_size}"
        )
    backend = Tokenizer(models.BPE())
    # No prefix space: in code a leading space is meaningful, and decoding must round-trip exactly.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes from the start, so text never seen in training still encodes (no UNK).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = _wrap(backend, model_max_length)
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def _wrap(backend: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        extra_special_tokens=[token for token in SPECIAL_TOKENS if token != EOS_TOKEN],
        model_max_length=model_max_length,
        # Cleaning would turn "f(a , b)" into "f(a, b)" on decode and break the exact round-trip.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved by `train_code_tokenizer` (or any local HF tokenizer directory)."""
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Ids of `text` as plain text: no special tokens added, none matched from the text itself."""
    return encode_texts(tokenizer, [text])[0]


def encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """`encode_text` for a batch; the Rust backend encodes the batch in parallel."""
    if not texts:
        return []
    # verbose=False: whole documents are expected to exceed model_max_length; packing cuts them later.
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)
    return encoded["input_ids"]
