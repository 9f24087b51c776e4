"""Training data: corpus reading, tokenization into fixed windows, and deterministic batches.

A corpus is files, directories or JSONL (`{"text": ...}` per line). Documents are tokenized once
(EOS after each, optional fill-in-the-middle), concatenated and cut into `seq_len` windows. Batch
`i` is a pure function of (seed, i): the window order is a per-epoch permutation, so a resumed run
sees exactly the data it would have seen (the data position is the step counter).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from models.errors import DataError

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def corpus_documents(paths: tuple[str, ...] | list[str]) -> list[str]:
    """All documents of a corpus, in a stable order. Empty or missing inputs are errors."""
    if not paths:
        raise DataError("no corpus given (--corpus PATH[,PATH...])")
    docs: list[str] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"corpus path {path} does not exist")
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        for file in files:
            docs.extend(_read_jsonl(file) if file.suffix == ".jsonl" else [file.read_text(errors="replace")])
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"corpus {list(paths)} holds no text")
    return docs


def _read_jsonl(file: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            docs.append(record["text"] if isinstance(record, dict) else record)
        except (json.JSONDecodeError, KeyError) as err:
            raise DataError(f"{file}:{lineno}: expected a JSON object with a 'text' field ({err})") from None
    return docs


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Deterministic train/held-out split by document content hash."""
    if fraction <= 0 or len(docs) < 2:
        return docs, []
    def score(doc: str) -> float:
        return int(hashlib.sha256(f"{seed}:{doc}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    scores = [score(d) for d in docs]
    cut = max(fraction, min(scores))  # never an empty held-out set
    held = [d for d, s in zip(docs, scores, strict=True) if s <= cut]
    train = [d for d, s in zip(docs, scores, strict=True) if s > cut]
    if not train:
        raise DataError("held-out split left no training documents")
    return train, held


def tokenize_documents(docs: list[str], tokenizer, fim_rate: float = 0.0, seed: int = 0) -> torch.Tensor:
    """One int32 stream: each document's ids then EOS. A fraction fim_rate becomes FIM samples."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    from models.weights.tokenizer import encode_text

    rng = random.Random(seed)
    fim = None
    if fim_rate > 0:
        from models.training.data.fim import FimTokens, maybe_fim

        fim = FimTokens.from_tokenizer(tokenizer)
    ids: list[int] = []
    for doc in docs:
        if fim is not None:
            ids.extend(maybe_fim(doc, tokenizer, rng, fim_rate, fim))
        else:
            ids.extend(encode_text(tokenizer, doc))
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


def cached_stream(cache_dir: Path, name: str, docs: list[str], tokenizer, fim_rate: float, seed: int):
    """tokenize_documents, cached on disk under a key of the documents, tokenizer and options."""
    h = hashlib.sha256()
    for doc in docs:
        h.update(hashlib.sha256(doc.encode()).digest())
    h.update(json.dumps([len(tokenizer), tokenizer.eos_token_id, fim_rate, seed]).encode())
    h.update(hashlib.sha256(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode()).digest())
    path = cache_dir / f"tokens-{name}-{h.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path)
    stream = tokenize_documents(docs, tokenizer, fim_rate, seed)
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(stream, path)
    return stream


def shuffled_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Items start..start+count-1 of an endless order of n items, reshuffled (seeded) every epoch."""
    out = []
    for i in range(start, start + count):
        epoch, j = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(int(perm[j]))
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, n] long, right-padded with pad_id
    lengths: torch.Tensor  # [B] long
    anchor_from: torch.Tensor  # [B] first position allowed as a SAT anchor
    std_until: torch.Tensor  # [B] real-token labels only for target positions < this


class WindowDataset:
    """Fixed-length windows of a token stream, served in a seeded per-epoch order."""

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int):
        self.windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len).long()
        if len(self.windows) == 0:
            raise DataError(f"corpus has {len(stream)} tokens: fewer than one {seq_len}-token sequence")
        self.seed = seed

    def __len__(self) -> int:
        return len(self.windows)

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows start..start+count-1 of the infinite epoch-by-epoch shuffled order."""
        return self.windows[shuffled_indices(start, count, len(self.windows), self.seed)]

    def batch(self, start: int, count: int) -> Batch:
        ids = self.rows(start, count)
        full = torch.full((count,), ids.shape[1], dtype=torch.long)
        return Batch(ids, full, torch.zeros(count, dtype=torch.long), full.clone())


class DistillDataset:
    """Self-distilled sequences: real context + the model's own greedy continuation.

    SAT anchors lie in the generated part, so SAT slots learn what greedy verification accepts;
    real-token labels stay on the real context only (the model is not trained on its own text).
    """

    def __init__(self, sequences: torch.Tensor, lengths: torch.Tensor, context: int, pad_id: int, seed: int):
        self.sequences, self.lengths, self.context, self.pad_id, self.seed = sequences, lengths, context, pad_id, seed

    def __len__(self) -> int:
        return len(self.sequences)

    def batch(self, start: int, count: int) -> Batch:
        idx = shuffled_indices(start, count, len(self.sequences), self.seed)
        ids, lengths = self.sequences[idx].long(), self.lengths[idx].long()
        ctx = torch.full((count,), self.context, dtype=torch.long)
        return Batch(ids, lengths, ctx - 1, ctx)


class MixedDataset:
    """Self-distilled rows plus a fixed share of corpus windows in every micro-batch.

    The windows get real-token loss over their whole length and no SAT blocks (ground-truth SAT
    labels teach little acceptance), so the SAT phase keeps training the language model itself.
    """

    def __init__(self, distill: DistillDataset, windows: WindowDataset, corpus_fraction: float):
        self.distill, self.windows, self.fraction = distill, windows, corpus_fraction

    def __len__(self) -> int:
        return len(self.distill)

    def batch(self, start: int, count: int) -> Batch:
        n_corpus = min(count - 1, round(count * self.fraction))
        micro = start // count  # starts are multiples of the micro-batch size
        d = self.distill.batch(micro * (count - n_corpus), count - n_corpus)
        if n_corpus == 0:
            return d
        w = self.windows.batch(micro * n_corpus, n_corpus)
        width = max(d.input_ids.shape[1], w.input_ids.shape[1])

        def pad(ids: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=self.distill.pad_id)

        return Batch(torch.cat([pad(d.input_ids), pad(w.input_ids)]), torch.cat([d.lengths, w.lengths]),
                     torch.cat([d.anchor_from, w.lengths]), torch.cat([d.std_until, w.std_until]))


@torch.no_grad()
def generate_distill_data(model, windows: WindowDataset, cfg, pad_id: int, eos_id: int, suppress_ids):
    """Greedy continuations of `cfg.distill_sequences` random corpus contexts (batched generate)."""
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(cfg.seed + 17)
    rows = windows.windows[torch.randint(len(windows), (cfg.distill_sequences,), generator=g)]
    contexts = rows[:, : cfg.distill_context]
    device = next(model.parameters()).device
    seqs, lens = [], []
    bad = [[i] for i in suppress_ids] or None
    for chunk in tqdm(contexts.split(cfg.distill_batch_size), desc="self-distill data", unit="batch"):
        out = model.generate(
            chunk.to(device), attention_mask=torch.ones_like(chunk, device=device), do_sample=False,
            max_new_tokens=cfg.distill_new_tokens, min_new_tokens=cfg.distill_new_tokens,
            pad_token_id=pad_id, eos_token_id=None, bad_words_ids=bad,
        ).cpu()
        seqs.append(out)
        lens.append(torch.full((len(out),), out.shape[1], dtype=torch.long))
    return torch.cat(seqs).to(torch.int32), torch.cat(lens)
