"""`sdsat` (two-step, as released): a draft forward of `[cur, S_1..S_k]` whose first row gives the
exact next token and whose SAT rows give k drafts; the verify forward then checks them. Two
forwards per iteration, but the exact token means every iteration emits at least two tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING

from models.engine.drafters.base import Drafter, EngineView, sample_token, set_drafts_from_logits

if TYPE_CHECKING:
    from models.engine.sequence import Sequence


class SdsatDrafter(Drafter):
    name = "sdsat"
    sat_rows = True

    def unavailable(self, engine: EngineView) -> str | None:
        if engine.sat is None:
            return f"method {self.name!r} needs an SDSAT model (sdsat.json); this one has none"
        return None

    def k_for(self, engine: EngineView, seq: Sequence, k: int) -> int:
        # the exact token is emitted before the drafts: leave room for it too
        room = seq.max_context - seq.context_len
        return max(0, min(k, seq.remaining - 2, room - 2))

    def propose(self, engine: EngineView, seqs: list[Sequence]) -> None:
        chunks = [[s.cur, *engine.sat.slot_ids(s.k_now)] for s in seqs]
        logits, _ = engine._forward(seqs, chunks)  # per sequence [1 + k_now, V]
        for seq, row in zip(seqs, logits, strict=True):
            seq.stats.forwards += 1
            engine.cache.commit(seq.slot, seq.context_len)  # keep cur, drop the SAT entries
            exact = sample_token(seq, row[0])
            set_drafts_from_logits(seq, row[1 : 1 + seq.k_now])
            seq.emit([exact], row[:1])  # the new cur; the verify forward checks the drafts after it
