"""Semantic adaptive tokens (SATs): the vocabulary side of SDSAT.

A SAT is an ordinary vocabulary id that text never produces. Fed after a real token, slot i of a
SAT block predicts the token i+1 places ahead (see models/training/data/layout.py). Two flavours are supported:
one id repeated in every slot (as the released CodeLlama-SDSAT checkpoints do) or k distinct
"diverse" ids, slot i always taking id i. `SatSpec` records the ids and `k_train` and travels with
the checkpoint as `sdsat.json` beside `config.json`.

    spec = add_sat_tokens(model, tokenizer, k_train=5, diverse=False)
    spec.save(out_dir); SatSpec.load(out_dir).slot_ids(8)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from models.errors import SatVocabularyError

SDSAT_FILE = "sdsat.json"
FORMAT_VERSION = 1


def sat_token_names(count: int) -> list[str]:
    """Names of the special tokens added for SATs: `<|sat|>` when repeated, `<|sat_i|>` when diverse."""
    return ["<|sat|>"] if count == 1 else [f"<|sat_{i}|>" for i in range(1, count + 1)]


@dataclass(frozen=True)
class SatSpec:
    """Which vocabulary ids are SATs, and the block size the model was trained with."""

    ids: tuple[int, ...]  # one id (repeated) or k_train distinct ids (diverse)
    k_train: int

    def __post_init__(self):
        if self.k_train < 1:
            raise SatVocabularyError(f"k_train must be >= 1, got {self.k_train}")
        if len(self.ids) not in (1, self.k_train):
            raise SatVocabularyError(
                f"expected 1 SAT id (repeated) or k_train={self.k_train} ids (diverse), got {len(self.ids)}"
            )
        if len(set(self.ids)) != len(self.ids):
            raise SatVocabularyError(f"diverse SAT ids must be distinct: {self.ids}")

    @property
    def diverse(self) -> bool:
        return len(self.ids) > 1

    def slot_ids(self, k: int) -> list[int]:
        """The ids for a block of k slots; past k_train, diverse blocks reuse the last id."""
        if k < 0:
            raise SatVocabularyError(f"k must be >= 0, got {k}")
        return [self.ids[min(i, len(self.ids) - 1)] for i in range(k)]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / SDSAT_FILE
        payload = {"format_version": FORMAT_VERSION, "sat_ids": list(self.ids), "k_train": self.k_train}
        path.write_text(json.dumps(payload, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> SatSpec:
        path = Path(directory) / SDSAT_FILE
        if not path.is_file():
            raise SatVocabularyError(f"{path} not found: not an SDSAT checkpoint (see `sdsat convert`)")
        data = json.loads(path.read_text())
        return cls(ids=tuple(int(i) for i in data["sat_ids"]), k_train=int(data["k_train"]))

    @classmethod
    def maybe_load(cls, directory: str | Path) -> SatSpec | None:
        return cls.load(directory) if (Path(directory) / SDSAT_FILE).is_file() else None

    def to_dict(self) -> dict:
        return asdict(self)


def add_sat_tokens(
    model,
    tokenizer,
    k_train: int,
    diverse: bool = False,
    reuse_ids: list[int] | None = None,
    allow_new_tokens: bool = True,
) -> SatSpec:
    """Set up SAT ids for `model` + `tokenizer` and return their spec.

    Order of preference: `reuse_ids` given by the caller (e.g. an unused id of the vocabulary);
    SAT special tokens the tokenizer already has (a tokenizer built with them); new special tokens,
    with the embeddings resized and every new row set to the mean of the existing rows.
    """
    if k_train < 1:
        raise SatVocabularyError(f"SAT mode needs k >= 1, got {k_train}")
    count = k_train if diverse else 1
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if reuse_ids:
        if len(reuse_ids) != count:
            raise SatVocabularyError(f"need {count} reusable ids for this mode, got {len(reuse_ids)}")
        bad = [i for i in reuse_ids if not 0 <= i < vocab_rows]
        if bad:
            raise SatVocabularyError(f"reuse ids {bad} outside the embedding matrix (0..{vocab_rows - 1})")
        return SatSpec(ids=tuple(reuse_ids), k_train=k_train)

    names = sat_token_names(count)
    vocab = tokenizer.get_vocab()
    if all(name in vocab for name in names):
        ids = [vocab[name] for name in names]
        if max(ids) >= vocab_rows:
            _resize_with_mean(model, len(tokenizer))
        return SatSpec(ids=tuple(ids), k_train=k_train)
    if not allow_new_tokens:
        raise SatVocabularyError(
            "the tokenizer has no SAT token and adding tokens is not allowed: pass reuse ids "
            "(an id the tokenizer never emits) or allow new tokens"
        )
    tokenizer.add_tokens(names, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    _resize_with_mean(model, max(len(tokenizer), max(ids) + 1))
    return SatSpec(ids=tuple(ids), k_train=k_train)


@torch.no_grad()
def _resize_with_mean(model, new_rows: int) -> None:
    """Grow the embeddings (and an untied output head) to `new_rows`, new rows = mean of old rows."""
    old_rows = model.get_input_embeddings().weight.shape[0]
    if new_rows <= old_rows:
        return
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(head.weight)
    for weight in matrices:
        weight[old_rows:] = weight[:old_rows].mean(dim=0, keepdim=True)
