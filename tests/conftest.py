"""Shared fixtures: tiny tokenizers and tiny random Llama models (CPU, seconds)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from models.training.toy import counting_documents, counting_tokenizer  # noqa: E402

torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe badly

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


@pytest.fixture(scope="session")
def counting_sdsat_dir(tmp_path_factory):
    """A tiny SDSAT model trained on the counting task (k_train=4): it drafts well, so speculative
    decoding accepts many drafts and every rollback path runs."""
    from models.training.toy import train_counting_sdsat

    return train_counting_sdsat(tmp_path_factory.mktemp("counting_sdsat"))
