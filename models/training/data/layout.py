"""SDSAT training layout: SAT blocks appended after the real tokens, their mask, positions and loss.

For a (right-padded) sequence x[0..n-1] and anchors p_1..p_A, the model input is
`x[0..n-1] + [S_1..S_k] * A` (one block of k SATs per anchor):

- SAT slot i (1-based) of the block for anchor p has position id p+i and label x[p+i+1];
- a real token t sees x[0..t] only, never a SAT, so its logits equal a plain forward (I1);
- slot i of block p sees x[0..p] and slots 1..i of its own block, so its logits equal the last
  logits of a plain forward on x[0..p] + [S_1..S_i] (I2).

The mask is a 4D additive float mask `[B, 1, L, L]` passed straight to a transformers model with
explicit `position_ids` (transformers returns a 4D mask as-is for "eager" and "sdpa" attention).
The loss is computed here from per-position labels: the model's built-in shifted loss would be
wrong for this layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE = -100


@dataclass
class SatBatch:
    input_ids: torch.Tensor  # [B, L] long, L = n + A*k
    position_ids: torch.Tensor  # [B, L] long
    attention_mask: torch.Tensor | None  # [B, 1, L, L] float, 0 = visible, finfo.min = hidden;
    # None for a plain batch without padding (the model's own causal mask, and its fast kernels)
    labels: torch.Tensor  # [B, L] long, IGNORE where no loss
    sat_slot: torch.Tensor  # [B, L] long, 0 for real tokens, i in 1..k for SAT slot i

    def model_inputs(self) -> dict:
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        return inputs


def build_sat_batch(
    input_ids: torch.Tensor,  # [B, n] long, right-padded
    lengths: torch.Tensor,  # [B] long, real length of each row
    anchors: torch.Tensor,  # [B, A] long, anchor positions; -1 = no block (padding)
    slot_ids: list[int],  # the k SAT ids of a block (repeated or diverse)
    std_until: torch.Tensor | None = None,  # [B] long: real-token labels only for targets < this
    dtype: torch.dtype = torch.float32,
) -> SatBatch:
    """Lay out a batch for SDSAT training. With no anchors (A == 0) this is a plain causal LM batch."""
    B, n = input_ids.shape
    A, k = anchors.shape[1], len(slot_ids)
    device = input_ids.device
    ar_n = torch.arange(n, device=device)
    real_valid = ar_n[None, :] < lengths[:, None]  # [B, n]

    # Real-token labels: x[t+1] while t+1 is inside the row (and before std_until when given).
    std_labels = torch.full((B, n), IGNORE, dtype=torch.long, device=device)
    std_labels[:, :-1] = input_ids[:, 1:]
    target_pos = ar_n + 1
    keep = target_pos[None, :] < lengths[:, None]
    if std_until is not None:
        keep &= target_pos[None, :] < std_until[:, None]
    std_labels[~keep] = IGNORE

    # SAT block entries, flattened anchor-major: entry (a, i) for i = 1..k.
    slot = torch.arange(1, k + 1, device=device).repeat(A)  # [A*k]
    block = torch.arange(A, device=device).repeat_interleave(k)  # [A*k]
    p = anchors[:, block]  # [B, A*k] anchor of each entry
    block_valid = (p >= 0) & (p < lengths[:, None] - 1)  # an anchor needs at least one real target
    sat_pos = (p + slot[None, :]).clamp(min=0)
    target = p + slot[None, :] + 1
    sat_labels = torch.gather(input_ids, 1, target.clamp(0, n - 1))
    sat_labels[~block_valid | (target >= lengths[:, None])] = IGNORE

    ids = torch.cat([input_ids, torch.tensor(slot_ids, dtype=torch.long, device=device)[None, :].repeat(B, A)], dim=1)
    positions = torch.cat([ar_n[None, :].expand(B, n), sat_pos], dim=1)
    labels = torch.cat([std_labels, sat_labels], dim=1)
    sat_slot = torch.cat([torch.zeros(B, n, dtype=torch.long, device=device), slot[None, :].expand(B, -1)], 1)
    plain = A == 0 and bool(real_valid.all())
    mask = None if plain else _sat_mask(real_valid, block_valid, p.clamp(min=0), block, slot, dtype)
    return SatBatch(ids, positions, mask, labels, sat_slot)


def _sat_mask(real_valid, block_valid, p, block, slot, dtype) -> torch.Tensor:
    """Additive 4D mask for the layout above. Rows with nothing to see attend to themselves only,
    so softmax never meets an all-masked row (it would give NaN)."""
    B, n = real_valid.shape
    m = p.shape[1]
    L = n + m
    device = real_valid.device
    ar_n = torch.arange(n, device=device)
    # Each query's limit on real keys: t for a real token, its anchor p for a SAT entry.
    real_limit = torch.cat([ar_n[None, :].expand(B, n), p], dim=1)  # [B, L]
    query_valid = torch.cat([real_valid, block_valid], dim=1)  # [B, L]
    see_real = (ar_n[None, None, :] <= real_limit[:, :, None]) & real_valid[:, None, :]  # [B, L, n]
    see_real &= query_valid[:, :, None]
    # SAT keys: same block, earlier or same slot; only SAT queries see them.
    same_block = (block[:, None] == block[None, :]) & (slot[None, :] <= slot[:, None])  # [m, m]
    see_sat = torch.zeros(B, L, m, dtype=torch.bool, device=device)
    see_sat[:, n:, :] = same_block[None] & block_valid[:, :, None] & block_valid[:, None, :]
    visible = torch.cat([see_real, see_sat], dim=2)  # [B, L, L]
    visible |= ~query_valid[:, :, None] & torch.eye(L, dtype=torch.bool, device=device)[None]
    mask = torch.zeros(B, 1, L, L, dtype=dtype, device=device)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return mask


def sample_anchors(
    lengths: torch.Tensor,  # [B]
    num_anchors: int,
    generator: torch.Generator,
    start: torch.Tensor | None = None,  # [B] first allowed anchor per row (default 0)
) -> torch.Tensor:
    """Sample up to `num_anchors` distinct anchors per row in [start, length-2]; -1 pads short rows."""
    B = lengths.shape[0]
    out = torch.full((B, num_anchors), -1, dtype=torch.long)
    for b in range(B):
        lo = 0 if start is None else int(start[b])
        hi = int(lengths[b]) - 1  # anchors need a next real token
        span = hi - lo
        if span <= 0 or num_anchors == 0:
            continue
        pick = torch.randperm(span, generator=generator)[:num_anchors] + lo
        out[b, : pick.numel()] = pick.sort().values
    return out


@dataclass
class SatLoss:
    total: torch.Tensor  # scalar, the one to backpropagate
    std: torch.Tensor  # scalar, mean CE over real-token positions (nan if none)
    sat: torch.Tensor  # scalar, weighted mean CE over SAT positions (nan if none)
    std_tokens: int
    sat_tokens: int


def _label_weights(batch: SatBatch, slot_decay: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, L] each: real-token targets (bool), SAT targets (bool), SAT slot weights (float, 0 elsewhere)."""
    has_label = batch.labels != IGNORE
    is_std = has_label & (batch.sat_slot == 0)
    is_sat = has_label & (batch.sat_slot > 0)
    return is_std, is_sat, torch.where(is_sat, slot_decay ** (batch.sat_slot - 1).clamp(min=0).float(), 0.0)


def loss_denominators(batch: SatBatch, slot_decay: float = 1.0) -> torch.Tensor:
    """[2] float64: the batch's real-token count and summed SAT slot weight, what `sdsat_loss` divides by.
    Summed over every micro-batch of a step (on every worker) they make the step's loss one mean over its
    tokens, whatever way the micro-batches are split between gradient accumulation and workers."""
    is_std, _, slot_w = _label_weights(batch, slot_decay)
    return torch.stack([is_std.sum().double(), slot_w.sum().double()])


def sdsat_loss(
    logits: torch.Tensor,  # [B, L, V]
    batch: SatBatch,
    sat_lambda: float = 1.0,
    slot_decay: float = 1.0,  # weight of slot i is slot_decay**(i-1)
    std_weight: float = 1.0,  # 0 for the SAT-only warm-up stage
    denominators: torch.Tensor | None = None,  # [2] from loss_denominators, summed over a step; default: this batch
) -> SatLoss:
    """loss = std_weight * CE(real positions) + sat_lambda * CE(SAT positions), per-slot decay.
    `std` and `sat` are this batch's means; `total` divides the CE sums by `denominators`."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), batch.labels, ignore_index=IGNORE, reduction="none")
    is_std, is_sat, slot_w = _label_weights(batch, slot_decay)
    n_std, n_sat = int(is_std.sum()), int(is_sat.sum())
    std_sum, sat_sum = (ce * is_std).sum(), (ce * slot_w).sum()
    std = std_sum / n_std if n_std else ce.new_tensor(float("nan"))
    sat = sat_sum / slot_w.sum() if n_sat else ce.new_tensor(float("nan"))
    d_std, d_sat = (n_std, slot_w.sum()) if denominators is None else (float(d) for d in denominators)
    total = ce.new_zeros(())
    if n_std and std_weight:
        total = total + std_weight * std_sum / d_std
    if n_sat and sat_lambda:
        total = total + sat_lambda * sat_sum / d_sat
    return SatLoss(total, std.detach(), sat.detach(), n_std, n_sat)
