"""Logits processing, seeded sampling and draft verification: pure functions on tensors.

Vocabulary (as vLLM's rejection sampler): the *target* distribution p is the model's own next-token
distribution at a real position; the *draft* distribution q is the proposer's (a SAT slot, or a
point mass for deterministic drafters such as prompt lookup). A draft token is *accepted* or
rejected; on rejection a *recovered* token is sampled from norm(max(0, p - q)); when every draft is
accepted a *bonus* token is sampled from p at the last position. This preserves p exactly
(Leviathan et al. 2023; Chen et al. 2023). Greedy verification accepts a draft iff it equals the
target argmax, so greedy speculative output equals plain greedy output.

Randomness comes from per-request uniforms (`u` arguments) drawn from each request's own seeded
generator, so a seeded request gives the same output whatever else is in the batch.
"""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p (nucleus) filtering. logits: [..., V]."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [..., V], u [...] uniforms in [0, 1) -> ids [...]."""
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return idx.clamp(max=probs.shape[-1] - 1)


def verify_greedy(target_logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, list[int]]:
    """Greedy verification of one sequence's chain.

    target_logits: [k+1, V], logits at the chain [cur, d_1..d_k]; row i predicts the token after
    chain position i. drafts: [k] long. Returns (accepted, emitted) where emitted is the accepted
    drafts plus the bonus token (the target's argmax after the last accepted one).
    """
    target = target_logits.argmax(-1)  # [k+1]
    k = drafts.shape[0]
    accepted = int(torch.cumprod((drafts == target[:k]).int(), 0).sum()) if k else 0
    return accepted, target[: accepted + 1].tolist()


def verify_sampling(
    target_probs: torch.Tensor,  # [k+1, V] p after processing, at chain [cur, d_1..d_k]
    draft_probs: torch.Tensor | None,  # [k, V] q, or None for deterministic (point-mass) drafts
    drafts: torch.Tensor,  # [k] long
    u_accept: torch.Tensor,  # [k] uniforms for the accept tests
    u_sample: float | torch.Tensor,  # one uniform for the recovered / bonus sample
) -> tuple[int, list[int]]:
    """Exact speculative sampling for one sequence. Returns (accepted, emitted tokens)."""
    k = drafts.shape[0]
    for i in range(k):
        d = int(drafts[i])
        p_d = target_probs[i, d]
        q_d = draft_probs[i, d] if draft_probs is not None else torch.ones(())
        if u_accept[i] * q_d < p_d:  # accept with probability min(1, p(d)/q(d))
            continue
        if draft_probs is not None:
            residual = (target_probs[i] - draft_probs[i]).clamp(min=0)
        else:
            residual = target_probs[i].clone()
            residual[d] = 0.0
        if residual.sum() <= 0:  # p == q numerically: any p-sample is exact
            residual = target_probs[i]
        recovered = int(sample_from(residual / residual.sum(), torch.as_tensor(u_sample)))
        return i, drafts[:i].tolist() + [recovered]
    bonus = int(sample_from(target_probs[k], torch.as_tensor(u_sample)))
    return k, drafts.tolist() + [bonus]
