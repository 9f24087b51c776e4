"""The SDSAT trainer: fine-tune a causal LM so SAT blocks draft the next k tokens (or train plain).

    from models.training.train import train; from models.training.train_config import TrainConfig
    train(TrainConfig(model="tiny", tokenizer="tok/", corpus=("code/",), max_steps=30))

The run writes `output_dir/checkpoint-last` every `save_every` steps (weights, tokenizer, sdsat.json,
optimizer + scheduler + step) and resumes from it when restarted; the data order and the SAT anchors
are functions of (seed, step), so a resumed run continues exactly where the killed one was. The
final model is saved to `output_dir/final`. `run_steps` (and the `train_step` it calls) is the one loop
that the Ray Train workers of services/jobs/train_ray.py also run, data-parallel.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from models.config import to_yaml
from models.errors import ConfigError
from models.training.data.layout import (
    SatBatch,
    SatLoss,
    build_sat_batch,
    loss_denominators,
    sample_anchors,
    sdsat_loss,
)
from models.training.data.windows import (
    Batch,
    DistillDataset,
    MixedDataset,
    WindowDataset,
    cached_stream,
    corpus_documents,
    generate_distill_data,
    split_documents,
)
from models.training.train_config import MODEL_PRESETS, TrainConfig, preset_config
from models.weights.checkpoint import (
    DTYPES,
    TRAINER_STATE,
    load_model,
    load_tokenizer,
    new_model,
    resolve_device,
    save_checkpoint,
)
from models.weights.sat import SatSpec, add_sat_tokens

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


def forward_loss(model, sat_batch: SatBatch, cfg: TrainConfig, step: int, device: torch.device,
                 denominators: torch.Tensor | None = None) -> SatLoss:
    inputs = {k: v.to(device) for k, v in sat_batch.model_inputs().items()}
    sat_batch.labels, sat_batch.sat_slot = sat_batch.labels.to(device), sat_batch.sat_slot.to(device)
    compute = DTYPES[cfg.dtype]
    with torch.autocast(device.type, dtype=compute, enabled=device.type == "cuda" and compute != torch.float32):
        logits = model(**inputs).logits
    std_weight = 0.0 if step < cfg.sat_warmup_steps else 1.0
    return sdsat_loss(logits, sat_batch, cfg.sat_lambda, cfg.sat_slot_decay, std_weight, denominators)


def train_step(model, optimizer, scheduler, data, cfg: TrainConfig, sat, step: int, device,
               rows_offset: int = 0, rows_stride: int = 1) -> dict:
    """One optimizer step over `grad_accum` micro-batches. The rows of step s are a pure function of s;
    data-parallel workers (`rows_stride` of them, one torch.distributed group, gradients averaged by DDP or
    FSDP) take every `rows_stride`-th micro-batch starting at `rows_offset`. The loss is normalised by the
    token counts of the whole step, so W workers compute the gradient that one process computes with
    grad_accum * W, and the returned losses are the step's, over all workers."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    micro_per_step = cfg.grad_accum * rows_stride
    batches = []  # built up front (on the CPU) to count the step's tokens before the first backward
    for micro in range(rows_offset, micro_per_step, rows_stride):
        start = (step * micro_per_step + micro) * cfg.batch_size
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + start)
        batches.append(make_sat_batch(data.batch(start, cfg.batch_size), cfg, sat, generator))
    denominators = _sum_over_workers(sum(loss_denominators(b, cfg.sat_slot_decay) for b in batches),
                                     rows_stride, device)
    totals = torch.zeros(4, dtype=torch.float64)  # [std CE sum, std tokens, SAT CE sum, SAT tokens]
    for i, sat_batch in enumerate(batches):
        # DDP all-reduces gradients in the last micro-batch's backward only.
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync():
            loss = forward_loss(model, sat_batch, cfg, step, device, denominators)
            (loss.total * rows_stride).backward()  # DDP/FSDP average gradients over workers; we want the sum
        for offset, value, n in ((0, loss.std, loss.std_tokens), (2, loss.sat, loss.sat_tokens)):
            if n:
                totals[offset : offset + 2] += torch.tensor([float(value) * n, n], dtype=torch.float64)
    std_sum, std_n, sat_sum, sat_n = _sum_over_workers(totals, rows_stride, device).tolist()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    scheduler.step()
    return {
        "loss_std": std_sum / std_n if std_n else math.nan,
        "loss_sat": sat_sum / sat_n if sat_n else math.nan,
        "tokens": int(std_n + sat_n),
    }


def _sum_over_workers(values: torch.Tensor, workers: int, device: torch.device) -> torch.Tensor:
    if workers == 1:
        return values
    values = values.to(device)  # NCCL reduces GPU tensors only
    torch.distributed.all_reduce(values)
    return values.cpu()


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


@dataclass
class Run:
    """A training run in progress: what `run_steps` advances and a checkpoint stores."""

    cfg: TrainConfig
    model: torch.nn.Module  # wrapped (DDP, FSDP) by data-parallel callers
    tokenizer: object
    sat: SatSpec | None
    data: TrainData
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    step: int = 0
    metrics: dict = field(default_factory=dict)

    @classmethod
    def create(cls, cfg: TrainConfig, model, tokenizer, sat, data: TrainData, device) -> Run:
        return cls(cfg, model, tokenizer, sat, data, *build_optimizer(model, cfg), device)

    @property
    def files(self) -> dict[str, str]:
        return {"train_config.yaml": to_yaml(self.cfg)}

    def trainer_state(self, optimizer_state: dict | None = None) -> dict:
        """checkpoint-last's trainer_state.pt (FSDP passes the optimizer state gathered from its shards)."""
        return {"optimizer": self.optimizer.state_dict() if optimizer_state is None else optimizer_state,
                "scheduler": self.scheduler.state_dict(), "step": self.step, "metrics": dict(self.metrics)}

    def load_trainer_state(self, state: dict, load_optimizer: Callable[[dict], None] | None = None) -> None:
        (load_optimizer or self.optimizer.load_state_dict)(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.metrics = state["step"], state.get("metrics", {})


def run_steps(run: Run, save: Callable[[Run], None], log_path: Path | None, progress: bool = True,
              rows_offset: int = 0, rows_stride: int = 1, bar_options: dict | None = None) -> None:
    """Train from run.step to max_steps: step, metrics, held-out eval, a log.jsonl line, `save(run)` every
    save_every steps. Data-parallel workers pass their rows (see train_step) and one of them the log."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="sdsat train" if run.sat else "train",
               disable=not progress, **(bar_options or {}))
    t0, tokens = time.perf_counter(), 0
    with log_path.open("a") if log_path else contextlib.nullcontext() as log:
        while run.step < cfg.max_steps:
            stats = train_step(run.model, run.optimizer, run.scheduler, run.data.train, cfg, run.sat, run.step,
                               run.device, rows_offset, rows_stride)
            run.step += 1
            step, metrics = run.step, run.metrics
            tokens += stats["tokens"]
            metrics.update(step=step, loss_std=stats["loss_std"], loss_sat=stats["loss_sat"],
                           lr=run.scheduler.get_last_lr()[0], tokens_per_s=tokens / (time.perf_counter() - t0))
            if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps:
                metrics.update(evaluate(run.model, run.data.heldout, cfg, run.sat, run.device))
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items() if k.startswith(("loss", "eval"))},
                            refresh=False)  # drawn by update(), at most every mininterval
            bar.update(1)
            if log and (step % cfg.log_every == 0 or step == cfg.max_steps):
                log.write(json.dumps(metrics) + "\n")
                log.flush()
            if step % cfg.save_every == 0 or step == cfg.max_steps:
                save(run)
    bar.close()


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Run (or resume) training; returns the final metrics. See the module docstring."""
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
    run = Run.create(cfg, model, tokenizer, sat, data, device)
    if resume_dir is not None:
        run.load_trainer_state(torch.load(resume_dir / TRAINER_STATE, weights_only=False))

    def save(run: Run) -> None:
        save_checkpoint(last, run.model, tokenizer, sat, run.files, trainer_state=run.trainer_state())

    run_steps(run, save, out / "log.jsonl", progress)
    run.metrics["resumed_from"] = None if resume_dir is None else str(resume_dir)
    save_final(run, out / FINAL)
    return run.metrics


def save_final(run: Run, directory: Path, model=None, state_dict: dict | None = None) -> None:
    """The final model in save_dtype, with its metrics (a data-parallel caller passes the unwrapped model,
    and FSDP the full state dict it gathered)."""
    save_checkpoint(directory, run.model if model is None else model, run.tokenizer, run.sat,
                    {**run.files, "metrics.json": json.dumps(run.metrics, indent=2)},
                    dtype=DTYPES[run.cfg.save_dtype], state_dict=state_dict)
