"""Shared fixtures: tiny tokenizers and tiny random Llama models (CPU, seconds)."""

from __future__ import annotations

import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe badly

COUNT_MOD = 24  # the synthetic counting task's alphabet: "0".."23"


def counting_tokenizer():
    """A word-level tokenizer over "0".."23" (one token per number) and an EOS; no SAT tokens."""
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
    """Documents that count up mod COUNT_MOD with a stride of 1 or 2 from a random start: after two
    tokens every next token is determined, so SAT drafts can be learned exactly."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start, stride = rng.randrange(COUNT_MOD), rng.choice([1, 2])
        docs.append(" ".join(str((start + stride * i) % COUNT_MOD) for i in range(length)))
    return docs


@pytest.fixture(scope="session")
def count_tokenizer():
    return counting_tokenizer()


@pytest.fixture(scope="session")
def count_tokenizer_dir(tmp_path_factory, count_tokenizer):
    path = tmp_path_factory.mktemp("count_tok")
    count_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def count_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("count_corpus") / "docs.jsonl"
    import json

    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in counting_documents(400, 80)))
    return path


def tiny_llama(vocab_size: int, attn: str = "sdpa", seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=False, **overrides,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attn).eval()


@pytest.fixture(scope="session")
def counting_sdsat_dir(tmp_path_factory, count_tokenizer_dir, count_corpus):
    """A tiny SDSAT model trained on the counting task (k_train=4): it drafts well, so speculative
    decoding accepts many drafts and every rollback path runs."""
    from models.train import train
    from models.train_config import TrainConfig

    out = tmp_path_factory.mktemp("counting_sdsat")
    train(TrainConfig(model="tiny", tokenizer=str(count_tokenizer_dir), corpus=(str(count_corpus),),
                      output_dir=str(out), seq_len=48, batch_size=8, sat_k=4, anchors_per_seq=8, lr=3e-3,
                      warmup_steps=10, max_steps=300, eval_every=0, save_every=1000, num_threads=1),
          progress=False)
    return out / "final"
