"""`prompt-lookup`: the continuation of the latest earlier occurrence of the context's last n-gram
(training-free; a point-mass proposal, so `draft_probs` is None and sampling verification uses q = 1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.engine.drafters.base import Drafter, EngineView

if TYPE_CHECKING:
    from models.engine.sequence import Sequence


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


class PromptLookupDrafter(Drafter):
    name = "prompt-lookup"

    def propose(self, engine: EngineView, seqs: list[Sequence]) -> None:
        for seq in seqs:
            context = seq.prompt_ids + seq.output_ids
            seq.drafts, seq.draft_probs = prompt_lookup(context, seq.k_now, engine.config.prompt_lookup_ngram), None
