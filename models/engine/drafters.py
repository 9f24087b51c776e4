"""Drafters: where draft tokens come from. The decoding loop (models/engine/engine.py) is the same
for all of them; a drafter only decides what to propose and what extra tokens the verify forward
carries.

- `ar`: no drafts (plain decoding: every iteration verifies just `cur` and emits the bonus token).
- `prompt-lookup`: the continuation of the latest earlier occurrence of the context's last n-gram
  (training-free; a point-mass proposal).
- `sdsat` (two-step, as released): a draft forward of `[cur, S_1..S_k]` gives the exact next token
  and k SAT drafts; the verify forward checks them.
- `sdsat-fused` (method doc section 6): the verify forward of `[cur, d_1..d_k]` also carries, for
  every acceptance point j, a SAT block that sees the chain up to j; the block at j = accepted
  holds the next iteration's drafts, so each iteration costs one forward.
"""

from __future__ import annotations

import torch


def prompt_lookup(context: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier match of the context's last n-gram
    (longest n first)."""
    if k <= 0 or len(context) < 2:
        return []
    ids = torch.tensor(context)
    for n in range(min(max_ngram, len(context) - 1), 0, -1):
        windows = ids[:-1].unfold(0, n, 1)  # [len-n, n], every n-gram that has a successor
        hits = (windows == ids[-n:]).all(1).nonzero()
        if hits.numel():
            start = int(hits[-1]) + n
            return context[start : start + k]
    return []


def fused_layout(num_drafts: int, k: int) -> tuple[list[int], torch.Tensor]:
    """Position offsets and the local [T, T] visibility mask of a fused iteration's input:
    the chain [cur, d_1..d_n] (n = num_drafts), then for j = 0..n a block of k SATs whose slot i
    (1-based) sits at offset j+i and sees chain[0..j] and slots 1..i of its own block."""
    n1 = num_drafts + 1
    T = n1 + n1 * k
    offsets = list(range(n1)) + [j + i for j in range(n1) for i in range(1, k + 1)]
    visible = torch.zeros(T, T, dtype=torch.bool)
    visible[:n1, :n1] = torch.ones(n1, n1, dtype=torch.bool).tril()
    for j in range(n1):
        rows = slice(n1 + j * k, n1 + (j + 1) * k)
        visible[rows, : j + 1] = True
        visible[rows, rows] = torch.ones(k, k, dtype=torch.bool).tril()
    return offsets, visible


def fused_block_rows(num_drafts: int, k: int, j: int) -> slice:
    """Rows of the fused output that belong to the SAT block attached at chain position j."""
    start = num_drafts + 1 + j * k
    return slice(start, start + k)
