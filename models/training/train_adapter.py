"""Training the SAT adapter on a frozen base (`sdsat train --adapter`, `python -m models.training.train_adapter`).

One step, for a batch of self-distilled sequences (models/training/data/self_distill.py):
1. standard pass, no gradient: the frozen base over the real tokens gives the KV cache that every
   SAT block attends to, and the teacher's next-token distribution at every position;
2. SAT pass, with gradient: for each anchor p (a position of the generated part) a block of k SAT
   tokens at positions p+1..p+k that sees the cache up to p and its own earlier slots (the
   inference layout [cur, S_1..S_k] of models/engine); slot i's label is x[p+i+1];
3. loss: KL from the teacher's distribution at the target (or CE on its greedy token), averaged
   over valid slots. Only SAT rows carry the adapter, so gradients reach only the SAT embeddings
   and the LoRA matrices; the base never changes.

Resumable: output_dir/checkpoint-last.pt (adapter, optimizer, step) is written every save_every
steps and picked up on restart. The final adapter goes to output_dir/final/ with sdsat.json.

    python -m models.training.train_adapter --data runs/adapter/data.jsonl --max-steps 600
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config import add_arguments, config_from_args, to_yaml
from models.errors import ConfigError
from models.training.train_config import AdapterTrainConfig
from models.weights.adapter import AdapterConfig, SatAdapter, base_weights_sha256
from models.weights.sat import SatSpec

CHECKPOINT = "checkpoint-last.pt"


def sample_anchors(rows: list[dict], per_seq: int, k: int, rng: random.Random) -> list[list[int]]:
    """Anchor positions per row: in the generated part, each with at least one valid SAT label."""
    out = []
    for row in rows:
        n, start = len(row["ids"]), row["prompt_len"]
        positions = list(range(start, n - 2))  # slot 1 of anchor p is labelled x[p+2]: p <= n-3
        out.append(positions if not per_seq or per_seq >= len(positions) else sorted(rng.sample(positions, per_seq)))
    return out


def sat_block_inputs(anchors: list[list[int]], lengths: list[int], width: int, k: int, sat_ids: list[int],
                     dtype: torch.dtype):
    """Inputs of the SAT pass after a cache of `width` columns (the padded standard pass).
    Returns ids [B, A*k], position_ids [B, A*k], an additive mask [B, 1, A*k, width + A*k], the
    target positions [B, A*k] (x[target] is the label; the teacher's logits sit at target - 1) and
    the validity mask [B, A*k]."""
    B, A = len(anchors), max(map(len, anchors))
    T = A * k
    ids = torch.tensor(sat_ids[:k] * A, dtype=torch.long).repeat(B, 1)
    slot = torch.arange(1, k + 1).repeat(A)  # [T], 1-based
    p = torch.zeros(B, A, dtype=torch.long)
    valid_anchor = torch.zeros(B, A, dtype=torch.bool)
    for b, a in enumerate(anchors):
        p[b, : len(a)] = torch.tensor(a, dtype=torch.long)
        valid_anchor[b, : len(a)] = True
    p_rows = p.repeat_interleave(k, dim=1)  # [B, T]
    positions = p_rows + slot
    targets = positions + 1
    valid = valid_anchor.repeat_interleave(k, dim=1) & (targets < torch.tensor(lengths)[:, None])
    visible = torch.zeros(B, T, width + T, dtype=torch.bool)
    visible[:, :, :width] = torch.arange(width)[None, None, :] <= p_rows[:, :, None]  # the chain up to p
    block = torch.arange(T) // k
    own = (block[:, None] == block[None, :]) & (slot[None, :] <= slot[:, None])  # own block, earlier slots
    visible[:, :, width:] = own
    mask = torch.zeros(B, 1, T, width + T, dtype=dtype)
    mask.masked_fill_(~visible[:, None], torch.finfo(dtype).min)
    return ids, positions, mask, targets.clamp(max=width - 1), valid


def step_loss(model, adapter: SatAdapter, rows: list[dict], cfg: AdapterTrainConfig, rng: random.Random,
              device: torch.device) -> tuple[torch.Tensor, dict]:
    """Loss of one batch and its per-slot accuracy (SAT argmax == the base's greedy token)."""
    from transformers import DynamicCache

    lengths = [len(r["ids"]) for r in rows]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : lengths[b]] = torch.tensor(r["ids"])
    attn = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    cache = DynamicCache(config=model.config)
    with torch.no_grad():  # 1. the frozen base: cache + teacher
        hidden = decoder(input_ids=ids.to(device), attention_mask=attn.to(device), cache=cache,
                         use_cache=True).last_hidden_state  # [B, L, H]
    anchors = sample_anchors(rows, cfg.anchors_per_seq, cfg.k_train, rng)
    dtype = next(model.parameters()).dtype
    sat_ids, positions, mask, targets, valid = sat_block_inputs(
        anchors, lengths, width, cfg.k_train, list(adapter.config.sat_ids), dtype)
    sat_ids, positions, mask, targets, valid = (t.to(device) for t in (sat_ids, positions, mask, targets, valid))
    with torch.no_grad():
        rows_idx = torch.arange(len(rows), device=device)[:, None]
        teacher = head(hidden[rows_idx, targets - 1][valid]).float()  # [N, V]: the base's prediction of x[target]
        greedy = ids.to(device)[rows_idx, targets][valid]  # [N]
    embeds = adapter.embed(model, sat_ids)  # 2. the SAT pass (every row is a SAT row)
    try:
        out = decoder(inputs_embeds=embeds, position_ids=positions, attention_mask=mask, cache=cache,
                      use_cache=True).last_hidden_state  # [B, T, H]
    finally:
        adapter.clear()
    logits = head(out[valid]).float()  # [N, V]
    logq = F.log_softmax(logits, -1)
    if cfg.labels == "kl":
        logp = F.log_softmax(teacher, -1)
        loss = (logp.exp() * (logp - logq)).sum(-1).mean()
    else:
        loss = F.nll_loss(logq, greedy)
    slot = (torch.arange(cfg.k_train, device=device).repeat(valid.shape[1] // cfg.k_train)[None, :]
            .expand_as(valid)[valid])
    hit = logits.argmax(-1) == greedy
    acc = [float(hit[slot == i].float().mean()) if (slot == i).any() else 0.0 for i in range(cfg.k_train)]
    return loss, {"slot_accuracy": [round(a, 4) for a in acc], "sat_rows": int(valid.sum())}


def lr_factor(step: int, cfg: AdapterTrainConfig) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def build(cfg: AdapterTrainConfig):
    """The frozen base, a fresh adapter on it, its SAT spec and the optimizer."""
    from models.weights.base_model import BASE_NAME, ensure_base_model
    from models.weights.checkpoint import DTYPES, load_model, load_tokenizer, resolve_device

    base_dir = Path(cfg.model) if cfg.model else ensure_base_model()
    device = resolve_device(cfg.device)
    model = load_model(base_dir, dtype=DTYPES[cfg.dtype], device=device)
    model.requires_grad_(False)
    config = AdapterConfig(base_name=BASE_NAME if not cfg.model else Path(cfg.model).name,
                           base_sha256=base_weights_sha256(base_dir), vocab_size=model.config.vocab_size,
                           num_sat=cfg.k_train, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                           base_dir="" if not cfg.model else str(Path(cfg.model).resolve()))
    torch.manual_seed(cfg.seed)
    adapter = SatAdapter.create(model, config)
    if cfg.init_from:
        _init_from(adapter, Path(cfg.init_from))
    embeddings = [adapter.sat_embeddings]
    lora = [p for p in adapter.trainable_parameters() if p is not adapter.sat_embeddings]
    optimizer = torch.optim.AdamW([{"params": lora, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
                                   {"params": embeddings, "lr": cfg.embedding_lr, "weight_decay": 0.0}])
    sat = SatSpec(ids=config.sat_ids, k_train=cfg.k_train)
    return model, load_tokenizer(base_dir), adapter, sat, optimizer, device


def _init_from(adapter: SatAdapter, directory: Path) -> None:
    """Start from the weights of a trained adapter (fp32 master copies), after checking it is the same shape
    of adapter on the same base."""
    from safetensors.torch import load_file

    from models.weights.adapter import ADAPTER_WEIGHTS

    saved, ours = AdapterConfig.load(directory), adapter.config
    for name in ("base_sha256", "vocab_size", "num_sat", "rank", "alpha", "targets"):
        if getattr(saved, name) != getattr(ours, name):
            raise ConfigError(f"init_from {directory}: its {name} is {getattr(saved, name)!r}, this run's is "
                              f"{getattr(ours, name)!r}")
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    missing = set(adapter.adapter_state()) - set(state)
    if missing:
        raise ConfigError(f"init_from {directory}: weights lack {sorted(missing)[:3]}...")
    with torch.no_grad():
        for name, tensor in adapter.adapter_state().items():
            tensor.copy_(state[name].to(tensor.dtype))


def save_adapter(directory: Path, adapter: SatAdapter, sat: SatSpec, files: dict[str, str]) -> None:
    from models.weights.checkpoint import replacing

    with replacing(directory) as tmp:
        adapter.save(tmp)
        sat.save(tmp)
        for name, text in files.items():
            (tmp / name).write_text(text)


@torch.no_grad()
def heldout_loss(model, adapter, rows, cfg, device) -> dict:
    loss, metrics = step_loss(model, adapter, rows, cfg, random.Random(1234), device)
    return {"heldout_loss": round(float(loss), 4), "heldout_slot_accuracy": metrics["slot_accuracy"]}


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Data parallelism: every worker's gradient becomes the mean over the workers (torch.distributed)."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def train(cfg: AdapterTrainConfig, progress: bool = True, rank: int = 0, world: int = 1) -> dict:
    """One process (world=1), or worker `rank` of `world` data-parallel workers whose torch.distributed
    group is already up (services/jobs/train_ray.py): each takes every world-th row of a step's batch, the
    gradients are averaged, and rank 0 alone writes files."""
    from tqdm import tqdm

    from models.training.data.self_distill import read_rows

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    lead = rank == 0
    out.mkdir(parents=True, exist_ok=True)
    if lead:
        (out / "train_config.yaml").write_text(to_yaml(cfg))
    model, _, adapter, sat, optimizer, device = build(cfg)
    rows = [r for r in read_rows(Path(cfg.data)) if len(r["ids"]) - r["prompt_len"] >= 3]  # >= 1 anchor each
    if len(rows) <= cfg.heldout_rows:
        raise ConfigError(f"{cfg.data}: {len(rows)} usable rows (3+ generated tokens), need more than "
                          f"heldout_rows={cfg.heldout_rows}")
    if world > cfg.batch_size:
        raise ConfigError(f"{world} workers need batch_size >= {world} (each takes every {world}-th row)")
    train_rows, heldout = rows[: len(rows) - cfg.heldout_rows], rows[len(rows) - cfg.heldout_rows :]
    step, seconds = 0, 0.0
    if (out / CHECKPOINT).is_file():
        state = torch.load(out / CHECKPOINT, weights_only=False)
        adapter.load_state_dict(state["adapter"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        step, seconds = state["step"], state.get("seconds", 0.0)
    order = list(range(len(train_rows)))
    random.Random(cfg.seed).shuffle(order)
    log = (out / "log.jsonl").open("a") if lead else None
    bar = tqdm(total=cfg.max_steps, initial=step, desc="adapter", unit="step", disable=not (progress and lead))
    while step < cfg.max_steps:
        t0 = time.time()
        picks = [order[(step * cfg.batch_size + i) % len(order)] for i in range(rank, cfg.batch_size, world)]
        factor = lr_factor(step, cfg)
        for group, base_lr in zip(optimizer.param_groups, (cfg.lr, cfg.embedding_lr), strict=True):
            group["lr"] = base_lr * factor
        loss, metrics = step_loss(model, adapter, [train_rows[i] for i in picks], cfg,
                                  random.Random(cfg.seed * 1_000_003 + step), device)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:
            _average_gradients(adapter.trainable_parameters(), world)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(adapter.trainable_parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        seconds += time.time() - t0
        bar.update()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc0=metrics["slot_accuracy"][0])
        if not lead:
            continue
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            entry = {"step": step, "loss": round(float(loss.detach()), 4), "lr": optimizer.param_groups[0]["lr"],
                     "seconds": round(seconds, 1), **metrics}
            if cfg.eval_every and step % cfg.eval_every == 0 and heldout:
                entry.update(heldout_loss(model, adapter, heldout, cfg, device))
            log.write(json.dumps(entry) + "\n")
            log.flush()
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            save_adapter(out / "snapshots" / f"step-{step}", adapter, sat,
                         {"metrics.json": json.dumps({"steps": step, "train_seconds": round(seconds, 1)}) + "\n"})
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            tmp = out / (CHECKPOINT + ".tmp")
            torch.save({"adapter": adapter.adapter_state(), "optimizer": optimizer.state_dict(), "step": step,
                        "seconds": seconds}, tmp)
            os.replace(tmp, out / CHECKPOINT)
    bar.close()
    if not lead:
        return {}
    metrics = {"steps": step, "train_seconds": round(seconds, 1), "rows": len(train_rows), "workers": world,
               **(heldout_loss(model, adapter, heldout, cfg, device) if heldout else {})}
    save_adapter(out / "final", adapter, sat, {"train_config.yaml": to_yaml(cfg),
                                               "metrics.json": json.dumps(metrics, indent=2) + "\n"})
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="train the frozen-base SAT adapter")
    p.add_argument("--config", default=None, help="YAML file of AdapterTrainConfig keys")
    add_arguments(p, AdapterTrainConfig)
    args = p.parse_args(argv)
    print(json.dumps(train(config_from_args(AdapterTrainConfig, args))))


if __name__ == "__main__":
    main()
