"""A synthetic, learnable task for smoke tests and micro-benchmarks: counting.

Documents count up modulo 24 with a stride of 1 or 2 from a random start ("5 7 9 11 ..."), and a
word-level tokenizer gives each number one id. After two tokens every next token is determined, so
a tiny model learns the task in seconds and its SAT slots can learn to draft it exactly.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

COUNT_MOD = 24


def counting_tokenizer():
    """Word-level tokenizer over "0".."23" (ids 1..24), EOS (0) and <unk> (25); no SAT tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{str(i): i + 1 for i in range(COUNT_MOD)}, "<unk>": COUNT_MOD + 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=4096,
    )


def counting_documents(n_docs: int, length: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start, stride = rng.randrange(COUNT_MOD), rng.choice([1, 2])
        docs.append(" ".join(str((start + stride * i) % COUNT_MOD) for i in range(length)))
    return docs


def train_counting_sdsat(out_dir: str | Path, steps: int = 300, k_train: int = 4, progress: bool = False) -> Path:
    """Train the tiny SDSAT counting model (seconds on CPU); returns its final checkpoint directory."""
    from models.training.train import FINAL, train
    from models.training.train_config import TrainConfig

    out = Path(out_dir)
    final = out / FINAL
    if (final / "sdsat.json").is_file():
        return final
    out.mkdir(parents=True, exist_ok=True)
    counting_tokenizer().save_pretrained(out / "tokenizer")
    corpus = out / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in counting_documents(400, 80)))
    train(TrainConfig(model="tiny", tokenizer=str(out / "tokenizer"), corpus=(str(corpus),), output_dir=str(out),
                      seq_len=48, batch_size=8, sat_k=k_train, anchors_per_seq=8, lr=3e-3, warmup_steps=10,
                      max_steps=steps, eval_every=0, save_every=1000, num_threads=1), progress=progress)
    return final
