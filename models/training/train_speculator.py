"""Training an MLP speculator (models/weights/speculator.py) beside a frozen base model.

    from models.training.train_speculator import train_speculator
    from models.training.train_config import SpeculatorTrainConfig
    train_speculator(SpeculatorTrainConfig(model="runs/sdsat/final", corpus=("code/",), max_steps=2000))
    # or: sdsat train-speculator --model runs/sdsat/final --corpus code/ --max-steps 2000 --n-predict 4

Stage 1 (the first steps) is teacher forcing on corpus windows. Stage 2 (the last `stage2_fraction` of
the steps) trains on the base model's own greedy continuations of corpus contexts, generated once by the
SDSAT trainer's self-distillation generator (models/training/data/windows.py), with losses only where the speculator's
first token is one the base model produced. Each step runs one no-grad base forward for the hidden states
(the decoder's output before the LM head, as the engine hands them to the speculator). Head i at position
p reads the token after p+i and learns the token after p+i+1; the loss is the sum of the heads' mean
cross-entropies. AdamW with warm-up then cosine (models/training/train.py's schedule).

`output_dir/checkpoint-last` (speculator, optimizer, scheduler, step) is written every `save_every` steps
and a restarted run resumes from it; each step's rows are a function of (seed, step), so a resumed run
ends with the weights an uninterrupted one would have. The final speculator goes beside the base
checkpoint (`MODEL/speculator/`, or `save_to`), where `Engine.from_pretrained` finds it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from models.config import to_yaml
from models.errors import ConfigError
from models.training.data.speculator_data import RecordedBatch, RecordedData, load_rows
from models.training.data.windows import (
    Batch,
    DistillDataset,
    WindowDataset,
    cached_stream,
    corpus_documents,
    generate_distill_data,
)
from models.training.train import build_optimizer
from models.training.train_config import SpeculatorTrainConfig
from models.weights.checkpoint import DTYPES, TRAINER_STATE, load_model, load_tokenizer, replacing, resolve_device
from models.weights.sat import SatSpec
from models.weights.speculator import SPECULATOR_DIR, MLPSpeculator, SpeculatorConfig

LAST = "checkpoint-last"
IGNORE = -100  # cross-entropy's ignore_index


@dataclass
class SpeculatorData:
    corpus: WindowDataset
    distill: DistillDataset | None  # None when there is no stage 2
    stage1_steps: int

    def batch(self, step: int, size: int) -> Batch:
        if step < self.stage1_steps:
            return self.corpus.batch(step * size, size)
        return self.distill.batch((step - self.stage1_steps) * size, size)


def prepare_data(cfg: SpeculatorTrainConfig, model, tokenizer, out: Path) -> SpeculatorData:
    cache = out / "cache"
    windows = WindowDataset(cached_stream(cache, "train", corpus_documents(cfg.corpus), tokenizer, 0.0, cfg.seed),
                            cfg.seq_len, cfg.seed)
    if cfg.stage1_steps == cfg.max_steps:
        return SpeculatorData(windows, None, cfg.stage1_steps)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    path = cache / f"distill-{cfg.distill_sequences}x{cfg.distill_context}+{cfg.distill_new_tokens}-{cfg.seed}.pt"
    if not path.is_file():  # the base model is frozen: its continuations are generated once
        sat = SatSpec.maybe_load(cfg.model)
        seqs, lens = generate_distill_data(model, windows, cfg, pad, tokenizer.eos_token_id,
                                           sorted(set(sat.ids)) if sat else [])
        torch.save({"sequences": seqs, "lengths": lens}, path)
    data = torch.load(path)
    distill = DistillDataset(data["sequences"], data["lengths"], cfg.distill_context, pad, cfg.seed)
    return SpeculatorData(windows, distill, cfg.stage1_steps)


@torch.no_grad()
def base_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """The frozen base model's final hidden states [B, L, H] (fp32) of ids [B, L]."""
    return model.get_decoder()(input_ids=ids).last_hidden_state.float()


def speculator_loss(speculator: MLPSpeculator, hidden: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, list[float]]:
    """Sum over heads of the mean cross-entropy, and each head's. hidden: [B, L, H], the base states of
    batch.input_ids [B, L]; positions before batch.anchor_from (stage 2: the real context) get no loss."""
    n, (_, L) = speculator.n_predict, batch.input_ids.shape
    ids = F.pad(batch.input_ids, (0, n + 1), value=IGNORE)  # [B, L + n + 1]
    ids = ids.masked_fill(torch.arange(L + n + 1) >= batch.lengths[:, None], IGNORE).to(hidden.device)
    logits = speculator(hidden, ids[:, 1 : L + n].clamp(min=0))  # [n, B, L, V]; past the end: ignored below
    context = (torch.arange(L) < batch.anchor_from[:, None]).to(hidden.device)  # [B, L]
    losses = torch.stack([
        F.cross_entropy(logits[i].flatten(0, 1), ids[:, i + 2 : i + 2 + L].masked_fill(context, IGNORE).flatten(),
                        ignore_index=IGNORE)
        for i in range(n)
    ])
    return losses.sum(), losses.tolist()


@dataclass
class SpeculatorRun:
    cfg: SpeculatorTrainConfig
    speculator: MLPSpeculator
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0
    metrics: dict = field(default_factory=dict)

    def save(self, directory: Path, final: bool = False) -> None:
        with replacing(directory) as tmp:
            self.speculator.save(tmp)
            (tmp / "train_config.yaml").write_text(to_yaml(self.cfg))
            if final:
                (tmp / "metrics.json").write_text(json.dumps(self.metrics, indent=2))
            else:
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                            "step": self.step, "metrics": self.metrics}, tmp / TRAINER_STATE)

    def load(self, directory: Path, device) -> None:
        saved = MLPSpeculator.load(directory, device)
        if saved.config != self.speculator.config:
            raise ConfigError(f"{directory} holds a speculator with {saved.config}, not {self.speculator.config}: "
                              "use another output_dir, or --resume false")
        self.speculator.load_state_dict(saved.state_dict())
        self.speculator.set_vocab(saved.vocab_ids)
        state = torch.load(directory / TRAINER_STATE, weights_only=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.metrics = state["step"], state["metrics"]


def train_step(run: SpeculatorRun, model, batch: Batch, device: torch.device) -> list[float]:
    run.speculator.train()
    hidden = base_hidden(model, batch.input_ids.to(device))
    loss, per_head = speculator_loss(run.speculator, hidden, batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if run.cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(run.speculator.parameters(), run.cfg.grad_clip)
    run.optimizer.step()
    run.scheduler.step()
    return per_head


# ---- recorded data: the served engine's own states (models/training/data/speculator_data.py) ----------------
def recorded_loss(speculator: MLPSpeculator, batch: RecordedBatch, labels: str) -> tuple[torch.Tensor, list[float]]:
    """Sum over heads of the mean loss at trained positions. kl: cross-entropy to the base's distribution over
    the draft vocabulary (its LM head on the recorded state that predicted the target); ce: the recorded token."""
    n, W = speculator.n_predict, batch.hidden.shape[1]
    state = batch.hidden.float()
    if labels == "kl":
        with torch.no_grad():
            teacher = torch.log_softmax((batch.teacher.float() @ speculator.base_head.float().T), -1)  # [B, S, Vd]
    else:
        local = torch.full((speculator.config.vocab_size,), IGNORE, dtype=torch.long)
        local[speculator.vocab_ids] = torch.arange(speculator.vocab_ids.numel())
    losses = []
    for i in range(n):
        state = speculator.advance(i, state, batch.tokens[:, i : i + W])
        mask = batch.trained & batch.valid[:, i : i + W]  # [B, W]
        logp = torch.log_softmax(speculator.logits(i, state[mask]).float(), -1)  # [N, Vd]
        if labels == "kl":
            losses.append(-(teacher[:, i : i + W][mask].exp() * logp).sum(-1).mean())
        else:
            target = local[batch.tokens[:, i + 1 : i + 1 + W][mask]]
            losses.append(F.nll_loss(logp, target, ignore_index=IGNORE))
    stacked = torch.stack(losses)
    return stacked.sum(), stacked.tolist()


@torch.no_grad()
def recorded_acceptance(speculator: MLPSpeculator, rows: list[dict]) -> dict:
    """Greedy drafting on recorded greedy answers, two ways (k = n_predict):
    - `mean_accepted` / `by_position`: a chain drafted at every answer position, compared with what the base
      produced (the longest matching prefix), averaged over positions;
    - `per_iteration` / `per_iteration_by_position`: the engine's own walk: draft at the answer's start, accept
      the matching prefix, move past it and the bonus token, draft again. Positions reached this way are
      harder than the average one (the previous chain failed just before them): this is what `sdsat bench`
      measures, and it is lower."""
    speculator.eval()
    n, dtype = speculator.n_predict, next(speculator.parameters()).dtype
    rows = [r for r in rows if not r["kind"].endswith("-sampled") and len(r["ids"]) - r["prompt_len"] >= 2]

    def chains(states: torch.Tensor, first: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        """Accepted drafts [P] of chains from states [P, H] and first tokens [P] against truth [P, n]."""
        state, token, alive, accepted = states.to(dtype), first, torch.ones(len(first), dtype=torch.bool), 0
        for i in range(n):
            state, logits = speculator.step(i, state, token)
            token = speculator.vocab_ids[logits.argmax(-1)]
            alive = alive & (token == truth[:, i])
            accepted = accepted + alive.long()
        return accepted

    def truth_at(row: dict, pos: torch.Tensor) -> torch.Tensor:
        ids, L = torch.tensor(row["ids"]), len(row["ids"])
        ahead = pos[:, None] + 2 + torch.arange(n)[None]  # [P, n]: cur = ids[p + 1], drafts target ids[p + 2 ..]
        return torch.where(ahead < L, ids[ahead.clamp(max=L - 1)], -1)

    every = torch.cat([chains(r["hidden"][pos], torch.tensor(r["ids"])[pos + 1], truth_at(r, pos))
                       for r in rows for pos in [torch.arange(r["prompt_len"] - 1, len(r["ids"]) - 2)]])
    ptr = [r["prompt_len"] - 1 for r in rows]
    walked = []
    while active := [j for j, r in enumerate(rows) if ptr[j] < len(r["ids"]) - 2]:
        pos = [torch.tensor([ptr[j]]) for j in active]
        accepted = chains(torch.cat([rows[j]["hidden"][p] for j, p in zip(active, pos, strict=True)]),
                          torch.tensor([rows[j]["ids"][ptr[j] + 1] for j in active]),
                          torch.cat([truth_at(rows[j], p) for j, p in zip(active, pos, strict=True)]))
        walked.append(accepted)
        for j, a in zip(active, accepted.tolist(), strict=True):
            ptr[j] += a + 1
    walked = torch.cat(walked)
    return {"positions": int(every.numel()), "mean_accepted": round(float(every.float().mean()), 4),
            "by_position": [round(float((every > i).float().mean()), 4) for i in range(n)],
            "iterations": int(walked.numel()), "per_iteration": round(float(walked.float().mean()), 4),
            "per_iteration_by_position": [round(float((walked > i).float().mean()), 4) for i in range(n)]}


def draft_vocabulary(data: RecordedData, tokenizer, vocab_size: int, size: int,
                     data_weight: int = 10) -> tuple[torch.Tensor, float]:
    """The `size` most frequent tokens, counted over the standard library's training split (code, comments,
    docstrings) plus the recorded rows (prompts and the model's own answers, counted `data_weight` times:
    they are what the speculator drafts), and the share of the recorded tokens they cover."""
    from models.training.data.corpus import read_text
    from models.training.data.self_distill import stdlib_split

    recorded = data.token_counts(vocab_size)
    counts = recorded * data_weight
    for ids in tokenizer([read_text(p) for p in stdlib_split(False)], add_special_tokens=False)["input_ids"]:
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)[:vocab_size]
    top = counts.topk(size).indices.sort().values
    return top, float(recorded[top].sum() / recorded.sum())


def train_recorded(cfg: SpeculatorTrainConfig, progress: bool = True, rank: int = 0, world: int = 1) -> dict:
    """Train (or resume) a base_tied speculator on recorded shards (cfg.hidden_data). One process (world=1),
    or worker `rank` of `world` data-parallel workers whose torch.distributed group is up
    (services/jobs/train_ray.py): each takes every world-th window of a step's batch, the gradients are
    averaged, and rank 0 alone writes files."""
    import time

    from tqdm.auto import tqdm

    from models.training.train_adapter import _average_gradients

    if world > cfg.batch_size:
        raise ConfigError(f"{world} workers need batch_size >= {world} (each takes every {world}-th window)")
    lead = rank == 0

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, dtype=torch.float32, device="cpu").requires_grad_(False)
    embedding = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    data = RecordedData(load_rows(cfg.hidden_data), cfg.seq_len, cfg.n_predict, cfg.seed)
    heldout = load_rows(cfg.heldout_data) if cfg.heldout_data else []
    torch.manual_seed(cfg.seed)
    speculator = MLPSpeculator(SpeculatorConfig(
        emb_dim=model.config.hidden_size, vocab_size=embedding.shape[0], n_predict=cfg.n_predict,
        inner_dim=cfg.inner_dim, tie_weights=cfg.tie_weights, base_tied=True, draft_vocab=cfg.draft_vocab))
    run = SpeculatorRun(cfg, speculator, *build_optimizer(speculator, cfg))
    last = out / LAST
    resumed = cfg.resume and (last / TRAINER_STATE).is_file()
    if resumed:  # the checkpoint carries the draft vocabulary (and its coverage, in the metrics)
        run.load(last, "cpu")
    else:
        vocab, coverage = draft_vocabulary(data, load_tokenizer(cfg.model), embedding.shape[0],
                                           cfg.draft_vocab or embedding.shape[0])
        speculator.set_vocab(vocab)
        run.metrics.update(draft_vocab_coverage=round(coverage, 4), train_seconds=0.0)
    speculator.attach_base(embedding, head)
    run.metrics.update(rows=len(data.rows), positions=sum(len(r["ids"]) - 1 for r in data.rows))
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train speculator", disable=not (progress and lead))
    curve = run.metrics.setdefault("curve", [])
    with (out / "log.jsonl").open("a" if resumed else "w") if lead else contextlib.nullcontext() as log:
        while run.step < cfg.max_steps:
            t0 = time.time()
            stage = 1 if run.step < cfg.stage1_steps else 2
            batch = data.batch(run.step, cfg.batch_size, answers_only=stage == 2).part(rank, world)
            speculator.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast):
                loss, per_head = recorded_loss(speculator, batch, cfg.labels)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _average_gradients(list(speculator.parameters()), world)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(speculator.parameters(), cfg.grad_clip)
            run.optimizer.step()
            run.scheduler.step()
            run.step += 1
            run.metrics["train_seconds"] += time.time() - t0
            run.metrics.update(step=run.step, stage=stage, loss=sum(per_head), loss_per_head=per_head,
                               lr=run.scheduler.get_last_lr()[0])
            bar.set_postfix(stage=stage, loss=f"{sum(per_head):.3f}", refresh=False)
            bar.update(1)
            evaluate = heldout and cfg.eval_every and run.step % cfg.eval_every == 0
            if evaluate or (heldout and run.step == cfg.max_steps):
                acceptance = recorded_acceptance(speculator, heldout)
                curve.append({"step": run.step, "minutes": round(run.metrics["train_seconds"] / 60, 2), **acceptance})
                run.metrics["heldout"] = acceptance
            if lead and (run.step % cfg.log_every == 0 or run.step == cfg.max_steps or evaluate):
                log.write(json.dumps({k: v for k, v in run.metrics.items() if k != "curve"}) + "\n")
                log.flush()
            if lead and (run.step % cfg.save_every == 0 or run.step == cfg.max_steps):
                run.save(last)
    bar.close()
    target = Path(cfg.save_to) if cfg.save_to else Path(cfg.model) / SPECULATOR_DIR
    run.metrics.update(resumed_from=str(last) if resumed else None, saved_to=str(target), workers=world)
    if lead:
        run.save(target, final=True)
    return run.metrics


def train_speculator(cfg: SpeculatorTrainConfig, progress: bool = True) -> dict:
    """Train (or resume) a speculator for cfg.model; returns the final metrics. See the module docstring."""
    from tqdm.auto import tqdm

    if cfg.hidden_data:
        return train_recorded(cfg, progress)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out, device = Path(cfg.output_dir), resolve_device(cfg.device)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model, dtype=DTYPES[cfg.dtype], device=device).requires_grad_(False)
    tokenizer = load_tokenizer(cfg.model)
    data = prepare_data(cfg, model, tokenizer, out)
    torch.manual_seed(cfg.seed)
    speculator = MLPSpeculator(SpeculatorConfig(
        emb_dim=model.config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
        n_predict=cfg.n_predict, inner_dim=cfg.inner_dim, tie_weights=cfg.tie_weights)).to(device)
    run = SpeculatorRun(cfg, speculator, *build_optimizer(speculator, cfg))
    last = out / LAST
    resumed = cfg.resume and (last / TRAINER_STATE).is_file()
    if resumed:
        run.load(last, device)
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="train speculator", disable=not progress)
    with (out / "log.jsonl").open("a" if resumed else "w") as log:
        while run.step < cfg.max_steps:
            stage = 1 if run.step < data.stage1_steps else 2
            losses = train_step(run, model, data.batch(run.step, cfg.batch_size), device)
            run.step += 1
            run.metrics.update(step=run.step, stage=stage, loss=sum(losses), loss_per_head=losses,
                               lr=run.scheduler.get_last_lr()[0])
            bar.set_postfix(stage=stage, loss=f"{sum(losses):.3f}", refresh=False)
            bar.update(1)
            if run.step % cfg.log_every == 0 or run.step == cfg.max_steps:
                log.write(json.dumps(run.metrics) + "\n")
                log.flush()
            if run.step % cfg.save_every == 0 or run.step == cfg.max_steps:
                run.save(last)
    bar.close()
    target = Path(cfg.save_to) if cfg.save_to else Path(cfg.model) / SPECULATOR_DIR
    run.metrics.update(resumed_from=str(last) if resumed else None, saved_to=str(target))
    run.save(target, final=True)
    return run.metrics
