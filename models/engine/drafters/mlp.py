"""`mlp`: an MLP speculator chain (models/weights/speculator.py) from the base model's final hidden state
where `cur` was predicted. Head i reads the state and the token chosen at head i-1 (cur for head 0).
Drafting costs no base-model forward; the verify forward is plain [cur, d_1..d_k]."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from models.engine.drafters.base import Drafter, EngineView
from models.engine.llama import project
from models.engine.sampling import process_logits, sample_from

if TYPE_CHECKING:
    from models.engine.sequence import Sequence


def _linear(module, x, invariant: bool):
    return project(module, x.reshape(-1, x.shape[-1]), invariant).reshape(*x.shape[:-1], -1)


class MLPDrafter(Drafter):
    name = "mlp"

    def unavailable(self, engine: EngineView) -> str | None:
        if engine.speculator is None:
            return f"method {self.name!r} needs a model with a speculator (speculator/); this one has none"
        return None

    def k_for(self, engine: EngineView, seq: Sequence, k: int) -> int:
        return min(k, engine.speculator.n_predict)  # one head per draft

    def propose(self, engine: EngineView, seqs: list[Sequence]) -> None:
        spec = engine.speculator
        linear = functools.partial(_linear, invariant=engine.invariant_kernels)
        state = torch.stack([s.hidden for s in seqs])  # [B, H]
        tokens = torch.tensor([s.cur for s in seqs], device=engine.device)  # [B]
        vocab_ids = spec.vocab_ids.cpu()  # a base-tied speculator scores its draft vocabulary only
        drafts, draft_probs = [[] for _ in seqs], [[] for _ in seqs]
        for i in range(max(s.k_now for s in seqs)):
            state, logits = spec.step(i, state, tokens, linear)
            logits = logits.float().cpu()  # [B, V] or [B, draft_vocab]
            chosen = vocab_ids[logits.argmax(-1)]  # [B] greedy drafts; sampled ones replace theirs below
            for b, seq in enumerate(seqs):
                if i >= seq.k_now:
                    continue
                if not seq.params.greedy:
                    p = seq.params
                    q = process_logits(spec.to_vocab(logits[b]), p.temperature, p.top_p, p.top_k)  # [V]
                    chosen[b] = sample_from(q, seq.uniforms(1)[0])
                    draft_probs[b].append(q)
                drafts[b].append(int(chosen[b]))
            tokens = chosen.to(engine.device)
        for seq, d, q in zip(seqs, drafts, draft_probs, strict=True):
            seq.drafts, seq.draft_probs = d, torch.stack(q) if q else None

    def after_accept(self, engine: EngineView, seq: Sequence, logits: torch.Tensor, hidden: torch.Tensor,
                     accepted: int) -> None:
        seq.hidden = hidden[accepted]  # [H], the state that predicted the next cur: the chain's next start
