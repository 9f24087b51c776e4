"""The SDSAT trainer: fine-tune a causal LM so SAT blocks draft the next k tokens (or train plain).

    from models.train import train; from models.train_config import TrainConfig
    train(TrainConfig(model="tiny", tokenizer="tok/", corpus=("code/",), max_steps=30))

The run writes `output_dir/checkpoint-last` every `save_every` steps (weights, tokenizer, sdsat.json,
optimizer + scheduler + step) and resumes from it when restarted; the data order and the SAT anchors
are functions of (seed, step), so a resumed run continues exactly where the killed one was. The
final model is saved to `output_dir/final`. `train_step` is the one step that Ray Train also runs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models.checkpoint import (
    DTYPES,
    TRAINER_STATE,
    load_model,
    load_tokenizer,
    new_model,
    resolve_device,
    save_checkpoint,
)
from models.config import to_yaml
from models.data import (
    Batch,
    DistillDataset,
    MixedDataset,
    WindowDataset,
    cached_stream,
    corpus_documents,
    generate_distill_data,
    split_documents,
)
from models.errors import ConfigError
from models.layout import SatBatch, SatLoss, build_sat_batch, sample_anchors, sdsat_loss
from models.sat import SatSpec, add_sat_tokens
from models.train_config import MODEL_PRESETS, TrainConfig, preset_config

LAST = "checkpoint-last"
FINAL = "final"


@dataclass
class TrainData:
    train: WindowDataset | DistillDataset | MixedDataset
    heldout: WindowDataset | None


def prepare_model(cfg: TrainConfig, resume_dir: Path | None):
    """(model, tokenizer, sat spec or None) for a fresh run or a resumed one."""
    if resume_dir is not None:
        tokenizer = load_tokenizer(resume_dir)
        model = load_model(resume_dir, cfg.attn_implementation)
        return model, tokenizer, SatSpec.maybe_load(resume_dir)
    if cfg.model in MODEL_PRESETS:
        if not cfg.tokenizer:
            raise ConfigError(f"preset {cfg.model!r} needs --tokenizer DIR")
        tokenizer = load_tokenizer(cfg.tokenizer)
        model = new_model(preset_config(cfg.model, tokenizer), cfg.attn_implementation, cfg.seed)
    elif Path(cfg.model).is_dir():
        tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        model = load_model(cfg.model, cfg.attn_implementation)
    else:
        raise ConfigError(f"model {cfg.model!r} is neither a directory nor a preset ({', '.join(MODEL_PRESETS)})")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    sat = None
    if not cfg.plain:
        sat = add_sat_tokens(model, tokenizer, cfg.sat_k, cfg.sat_diverse, list(cfg.sat_reuse_ids) or None,
                             cfg.allow_new_tokens)
    return model, tokenizer, sat


def prepare_data(cfg: TrainConfig, model, tokenizer, sat: SatSpec | None, out: Path) -> TrainData:
    docs = corpus_documents(cfg.corpus)
    if cfg.heldout:
        train_docs, held_docs = docs, corpus_documents(cfg.heldout)
    else:
        train_docs, held_docs = split_documents(docs, cfg.heldout_fraction, cfg.seed)
    cache = out / "cache"
    windows = WindowDataset(cached_stream(cache, "train", train_docs, tokenizer, cfg.fim_rate, cfg.seed),
                            cfg.seq_len, cfg.seed)
    heldout = None
    if held_docs:
        stream = cached_stream(cache, "heldout", held_docs, tokenizer, 0.0, cfg.seed)
        heldout = WindowDataset(stream, cfg.seq_len, cfg.seed) if len(stream) >= cfg.seq_len else None
    if cfg.data_source == "corpus":
        return TrainData(windows, heldout)
    path = cache / "distill.pt"
    if not path.is_file():  # generated once, by the model as it was before SAT training
        model.eval()
        seqs, lens = generate_distill_data(model, windows, cfg, tokenizer.pad_token_id, tokenizer.eos_token_id,
                                           sorted(set(sat.ids)))
        torch.save({"sequences": seqs, "lengths": lens, "context": cfg.distill_context}, path)
    data = torch.load(path)
    distill = DistillDataset(data["sequences"], data["lengths"], data["context"], tokenizer.pad_token_id, cfg.seed)
    if cfg.distill_mix > 0:
        return TrainData(MixedDataset(distill, windows, cfg.distill_mix), heldout)
    return TrainData(distill, heldout)


def make_sat_batch(batch: Batch, cfg: TrainConfig, sat: SatSpec | None, generator: torch.Generator) -> SatBatch:
    if sat is None:
        anchors = torch.empty(len(batch.lengths), 0, dtype=torch.long)
        return build_sat_batch(batch.input_ids, batch.lengths, anchors, [], batch.std_until)
    anchors = sample_anchors(batch.lengths, cfg.anchors_per_seq, generator, start=batch.anchor_from)
    return build_sat_batch(batch.input_ids, batch.lengths, anchors, sat.slot_ids(cfg.sat_k), batch.std_until)


def forward_loss(model, sat_batch: SatBatch, cfg: TrainConfig, step: int, device: torch.device) -> SatLoss:
    inputs = {k: v.to(device) for k, v in sat_batch.model_inputs().items()}
    sat_batch.labels, sat_batch.sat_slot = sat_batch.labels.to(device), sat_batch.sat_slot.to(device)
    compute = DTYPES[cfg.dtype]
    with torch.autocast(device.type, dtype=compute, enabled=device.type == "cuda" and compute != torch.float32):
        logits = model(**inputs).logits
    std_weight = 0.0 if step < cfg.sat_warmup_steps else 1.0
    return sdsat_loss(logits, sat_batch, cfg.sat_lambda, cfg.sat_slot_decay, std_weight)


def train_step(model, optimizer, scheduler, data, cfg: TrainConfig, sat, step: int, device,
               rows_offset: int = 0, rows_stride: int = 1) -> dict:
    """One optimizer step over `grad_accum` micro-batches. The rows of step s are a pure function of s;
    data-parallel workers take every `rows_stride`-th micro-batch starting at `rows_offset`."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    totals = {"std": 0.0, "sat": 0.0, "std_n": 0, "sat_n": 0}
    micro_per_step = cfg.grad_accum * rows_stride
    for micro in range(rows_offset, micro_per_step, rows_stride):
        start = (step * micro_per_step + micro) * cfg.batch_size
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
        loss = forward_loss(model, make_sat_batch(data.batch(start, cfg.batch_size), cfg, sat, generator),
                            cfg, step, device)
        (loss.total / cfg.grad_accum).backward()
        for key, value, n in (("std", loss.std, loss.std_tokens), ("sat", loss.sat, loss.sat_tokens)):
            if n:
                totals[key] += float(value) * n
                totals[key + "_n"] += n
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return {
        "loss_std": totals["std"] / totals["std_n"] if totals["std_n"] else math.nan,
        "loss_sat": totals["sat"] / totals["sat_n"] if totals["sat_n"] else math.nan,
        "tokens": totals["std_n"] + totals["sat_n"],
    }


@torch.no_grad()
def evaluate(model, heldout: WindowDataset | None, cfg: TrainConfig, sat, device) -> dict:
    """Held-out L_std and L_sat on fixed windows and fixed anchors (comparable across steps and runs)."""
    if heldout is None:
        return {}
    model.eval()
    sums = {"std": [0.0, 0], "sat": [0.0, 0]}
    for b in range(cfg.eval_batches):
        start = b * cfg.batch_size
        if start >= len(heldout):
            break
        batch = heldout.batch(start, min(cfg.batch_size, len(heldout) - start))
        loss = forward_loss(model, make_sat_batch(batch, cfg, sat, torch.Generator().manual_seed(start)),
                            cfg, cfg.max_steps, device)
        for key, value, n in (("std", loss.std, loss.std_tokens), ("sat", loss.sat, loss.sat_tokens)):
            if n:
                sums[key][0] += float(value) * n
                sums[key][1] += n
    return {f"eval_loss_{k}": s / n for k, (s, n) in sums.items() if n}


def build_optimizer(model, cfg: TrainConfig):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )

    def schedule(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final metrics. See the module docstring."""
    from tqdm.auto import tqdm

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    last = out / LAST
    resume_dir = last if (last / TRAINER_STATE).is_file() else None
    model, tokenizer, sat = prepare_model(cfg, resume_dir)
    model.to(device)
    data = prepare_data(cfg, model, tokenizer, sat, out)
    optimizer, scheduler = build_optimizer(model, cfg)
    step, metrics = 0, {}
    if resume_dir is not None:
        state = torch.load(resume_dir / TRAINER_STATE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, metrics = state["step"], state.get("metrics", {})
    files = {"train_config.yaml": to_yaml(cfg)}
    log = (out / "log.jsonl").open("a")
    bar = tqdm(total=cfg.max_steps, initial=step, desc="sdsat train" if sat else "train", disable=not progress)
    t0, tokens = time.perf_counter(), 0
    while step < cfg.max_steps:
        stats = train_step(model, optimizer, scheduler, data.train, cfg, sat, step, device)
        step += 1
        tokens += stats["tokens"]
        metrics.update(step=step, loss_std=stats["loss_std"], loss_sat=stats["loss_sat"],
                       lr=scheduler.get_last_lr()[0], tokens_per_s=tokens / (time.perf_counter() - t0))
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
            metrics.update(evaluate(model, data.heldout, cfg, sat, device))
        bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k.startswith(("loss", "eval"))})
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": step, "metrics": dict(metrics)}
            save_checkpoint(last, model, tokenizer, sat, files, trainer_state=state)
    bar.close()
    log.close()
    metrics["resumed_from"] = None if resume_dir is None else str(resume_dir)
    save_checkpoint(out / FINAL, model, tokenizer, sat, {**files, "metrics.json": json.dumps(metrics, indent=2)},
                    dtype=DTYPES[cfg.save_dtype])
    return metrics
