"""The drafter interface: what one decoding method contributes to the engine's loop.

The engine (models/engine/engine.py) runs the same iteration for every method,

    draft   -> each drafter proposes for its sequences (`propose`, batched per drafter)
    verify  -> one batched forward over every live sequence's [cur, d_1..d_k] + `verify_rows`
    accept  -> greedy match or exact speculative sampling against the drafter's q
    commit  -> keep the KV of cur + accepted drafts, `after_accept`, emit accepted + bonus

so a drafter is one object with a few hooks (as vLLM's proposers). Drafters are stateless
singletons: per-request state lives on the `Sequence` (`drafts`, `draft_probs` [len(drafts), V] q
or None for point-mass drafts, `k_now`, `hidden`). The engine is passed to each hook as an
`EngineView`: what a drafter may use of it (the batched model forward, the cache, the SAT vocabulary,
the speculator, the device, the config, the context limit). Drafters import nothing from the engine
module, so the engine can import the registry (models/engine/drafters/__init__.py; or `register_drafter`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from models.engine.sampling import process_logits, sample_from

if TYPE_CHECKING:
    from models.engine.config import EngineConfig
    from models.engine.kv_cache import SlotKVCache
    from models.engine.sequence import Sequence
    from models.weights.sat import SatSpec
    from models.weights.speculator import MLPSpeculator


class EngineView(Protocol):
    """The part of the engine (models/engine/engine.py) that drafters use."""

    cache: SlotKVCache
    config: EngineConfig
    device: torch.device
    sat: SatSpec | None
    speculator: MLPSpeculator | None
    max_context: int
    invariant_kernels: bool  # models/engine/kernels.py runs this engine's dense projections

    def _forward(self, seqs: list, chunks: list[list[int]], layouts=None, last_only: bool = False
                 ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """One batched forward over new tokens of several sequences: per sequence [T_i, V] logits (CPU)
        and [T_i, H] final hidden states."""
        ...

Layout = tuple[list[int], torch.Tensor]  # (position offsets [T], local visibility [T, T] bool) of a verify chunk


class Drafter:
    """Defaults: no drafts and nothing extra in the verify forward (which is plain decoding)."""

    name: str = ""
    speculative: bool = True  # False: the request's k is ignored (stored as 0)
    sat_rows: bool = False  # its forwards carry SAT rows (the adapter's LoRA), which a compiled forward runs eager

    def unavailable(self, engine: EngineView) -> str | None:
        """Why this engine cannot run the method (the request is refused with it), or None."""
        return None

    def k_for(self, engine: EngineView, seq: Sequence, k: int) -> int:
        """This iteration's draft length, given k after the engine's own limits (request k, load
        policy, room for k drafts + the bonus token). Drafters that need more room clamp further."""
        return k

    def propose(self, engine: EngineView, seqs: list[Sequence]) -> None:
        """Set `seq.drafts` (at most `seq.k_now`) and `seq.draft_probs` for every sequence, all with
        k_now > 0 (the engine clears the others). Batched: a drafter that needs a forward runs one for
        all of them. It may also emit tokens (a sequence that finishes is not verified)."""
        for seq in seqs:
            seq.drafts, seq.draft_probs = [], None

    def verify_rows(self, engine: EngineView, seq: Sequence) -> tuple[list[int], Layout | None]:
        """Extra token ids the verify forward carries after [cur, *drafts], and the layout of the
        whole chunk (None: causal). The chain's rows must stay causal: they are what is verified."""
        return [], None

    def after_accept(self, engine: EngineView, seq: Sequence, logits: torch.Tensor, hidden: torch.Tensor,
                     accepted: int) -> None:
        """Keep what the next iteration needs from the forward that just chose the next token: this
        sequence's rows logits [T, V] (CPU) and hidden [T, H] (model device); row `accepted`
        predicted it. Called after every verify and once after the prefill (T = 1, accepted = 0)."""


def sample_token(seq: Sequence, logits: torch.Tensor) -> int:
    """One target token from logits [V]: argmax when greedy, else a seeded sample."""
    if seq.params.greedy:
        return int(logits.argmax())
    p = seq.params
    return int(sample_from(process_logits(logits, p.temperature, p.top_p, p.top_k), seq.uniforms(1)[0]))


def set_drafts_from_logits(seq: Sequence, draft_logits: torch.Tensor) -> None:
    """Drafts from a drafter's logits [k, V]: argmax when greedy, else samples from q (kept, so the
    accept test is exact)."""
    if seq.params.greedy:
        seq.drafts, seq.draft_probs = draft_logits.argmax(-1).tolist(), None
        return
    p = seq.params
    q = process_logits(draft_logits, p.temperature, p.top_p, p.top_k)  # [k, V]
    seq.drafts, seq.draft_probs = sample_from(q, seq.uniforms(len(q))).tolist(), q
