"""`sdsat-fused` (method doc section 6): the verify forward of `[cur, d_1..d_n]` also carries, for
every acceptance point j = 0..n, a block of k SAT slots that sees the chain up to j. Whatever is
accepted, the block at j = accepted was conditioned on exactly the committed tokens, so its logits
are the next iteration's drafts: one forward per iteration. The SAT rows are dropped at commit."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from models.engine.drafters.base import Drafter, EngineView, Layout, set_drafts_from_logits

if TYPE_CHECKING:
    from models.engine.sequence import Sequence


def fused_layout(num_drafts: int, k: int) -> Layout:
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


class FusedSdsatDrafter(Drafter):
    name = "sdsat-fused"
    sat_rows = True

    def unavailable(self, engine: EngineView) -> str | None:
        if engine.sat is None:
            return f"method {self.name!r} needs an SDSAT model (sdsat.json); this one has none"
        return None

    def propose(self, engine: EngineView, seqs: list[Sequence]) -> None:
        # the drafts came from the previous verify (none on the first iteration); k may have shrunk since
        for seq in seqs:
            seq.drafts = seq.drafts[: seq.k_now]
            seq.draft_probs = seq.draft_probs[: seq.k_now] if seq.draft_probs is not None else None

    def verify_rows(self, engine: EngineView, seq: Sequence) -> tuple[list[int], Layout | None]:
        if seq.k_now == 0:
            return [], None
        chain = 1 + len(seq.drafts)
        return engine.sat.slot_ids(seq.k_now) * chain, fused_layout(len(seq.drafts), seq.k_now)

    def after_accept(self, engine: EngineView, seq: Sequence, logits: torch.Tensor, hidden: torch.Tensor,
                     accepted: int) -> None:
        if seq.k_now == 0:  # no SAT blocks were carried (also the prefill): nothing to draft from
            seq.drafts, seq.draft_probs = [], None
            return
        set_drafts_from_logits(seq, logits[fused_block_rows(len(seq.drafts), seq.k_now, accepted)])
