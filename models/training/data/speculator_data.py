"""Training data for the MLP speculator on the real base: token sequences and the base's own final hidden
states at every position, as the served forward computes them.

The speculator drafts from the state the engine hands it (the decoder's output before the LM head, at the
served dtype), so its data is made by that engine: int4 weights from the GGUF, invariant kernels, batched
continuous decoding with `EngineConfig.record_hidden`. One pass gives both of the paper's stages:
- stage 1 (teacher forcing on ordinary text): the prompt positions, chat-form code tasks and raw code
  contexts from the standard library's training split (never HumanEval, the benchmark);
- stage 2 (the model's own answers): the generated positions; most rows greedy (what greedy speculation
  must match), `sampled` rows at temperature 0.7 (sampled requests draft from the same distribution).

Rows go to shards of `shard_rows` (`shard-NNNNN.pt`: ids, prompt_len, kind, hidden [L - 1, H] bf16, where
hidden[p] predicted ids[p + 1]); a killed run resumes at the first missing shard.

    python -m models.training.data.speculator_data --out runs/speculator/data --chat 768 --completion 256
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SHARD = "shard-{:05d}.pt"
SAMPLED_TEMPERATURE = 0.7


def shard_paths(directory: str | Path) -> list[Path]:
    return sorted(Path(directory).glob("shard-*.pt"))


def load_rows(directory: str | Path) -> list[dict]:
    """Every row of every shard: {"ids", "prompt_len", "kind", "hidden"}."""
    rows = []
    for path in shard_paths(directory):
        rows += torch.load(path, weights_only=False)
    return rows


@dataclass
class RecordedBatch:
    """Windows of W positions p = a..a+W-1 of recorded rows, for a speculator with n heads."""

    hidden: torch.Tensor  # [B, W, H]: the base state at p (what the engine hands the speculator)
    tokens: torch.Tensor  # [B, W + n - 1]: tokens[:, j] = ids[a + 1 + j]; head i at p reads tokens[:, p - a + i]
    teacher: torch.Tensor  # [B, W + n - 1, H]: teacher[:, j] = the state at a + 1 + j, whose LM-head
    #                        distribution is the base's for the token head j - (p - a) drafts
    valid: torch.Tensor  # [B, W + n - 1] bool: ids[a + 2 + j] exists (a target / teacher for that slot)
    trained: torch.Tensor  # [B, W] bool: positions that get a loss (stage 2: the answer part only)

    def part(self, rank: int, world: int) -> RecordedBatch:
        """Data parallelism: worker `rank` of `world` takes every world-th window."""
        if world == 1:
            return self
        return RecordedBatch(*(t[rank::world] for t in (self.hidden, self.tokens, self.teacher, self.valid,
                                                         self.trained)))


class RecordedData:
    """Recorded rows (load_rows) as training windows; each batch is a function of (seed, step), so a
    resumed run sees what an uninterrupted one would have."""

    def __init__(self, rows: list[dict], window: int, n_predict: int, seed: int):
        self.rows, self.window, self.n, self.seed = rows, window, n_predict, seed

    def token_counts(self, vocab_size: int) -> torch.Tensor:
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for row in self.rows:
            counts += torch.bincount(torch.tensor(row["ids"]), minlength=vocab_size)
        return counts

    def batch(self, step: int, size: int, answers_only: bool) -> RecordedBatch:
        rng = random.Random(self.seed * 1_000_003 + step)
        W, n = self.window, self.n
        span = W + n - 1
        hidden, tokens, teacher, valid, trained = [], [], [], [], []
        for _ in range(size):
            row = self.rows[rng.randrange(len(self.rows))]
            ids, states, first = row["ids"], row["hidden"], row["prompt_len"] - 1 if answers_only else 0
            L = len(ids)  # states: [L - 1, H], states[p] predicted ids[p + 1]
            a = rng.randint(first, max(first, L - 2 - W))  # trained positions: first..L-3 (a target at p + 2)
            pos = torch.arange(a, a + W)
            slots = torch.arange(a + 1, a + 1 + span)  # tokens read / teacher states
            ids_t = torch.tensor(ids)
            hidden.append(states[pos.clamp(max=L - 2)])
            tokens.append(ids_t[slots.clamp(max=L - 1)])
            teacher.append(states[slots.clamp(max=L - 2)])
            valid.append(slots + 1 <= L - 1)
            trained.append((pos <= L - 3) & (pos >= first))
        return RecordedBatch(torch.stack(hidden), torch.stack(tokens), torch.stack(teacher), torch.stack(valid),
                             torch.stack(trained))


def generate_shard(engine, rows: list[dict], new_tokens: dict[str, int], seed: int) -> list[dict]:
    """Continue every row (greedy, or sampled where row["sampled"]), keeping each one's hidden states."""
    from models.engine import SamplingParams

    out, ids = {}, {}
    for i, row in enumerate(rows):
        sampled = row.get("sampled", False)
        params = SamplingParams(max_new_tokens=new_tokens[row["kind"]], method="ar", k=0,
                                temperature=SAMPLED_TEMPERATURE if sampled else 0.0, seed=seed + i)
        ids[engine.add_request(row["ids"], params)] = i
    tokens = {rid: [] for rid in ids}
    while engine.has_work():
        for o in engine.step():
            tokens[o.request_id] += o.token_ids
            if o.finished:
                row = rows[ids[o.request_id]]
                full = row["ids"] + tokens[o.request_id]
                assert o.hidden.shape[0] == len(full) - 1, (o.hidden.shape, len(full))
                kind = row["kind"] + ("-sampled" if row.get("sampled") else "")
                out[ids[o.request_id]] = {"ids": full, "prompt_len": len(row["ids"]), "kind": kind,
                                          "hidden": o.hidden.clone()}
    return [out[i] for i in range(len(rows))]


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    from models.engine import Engine, EngineConfig
    from models.training.data.self_distill import prompts
    from models.weights.base_model import ensure_base_model

    p = argparse.ArgumentParser(description="MLP-speculator data: the served base's hidden states and answers")
    p.add_argument("--out", type=Path, required=True, help="folder of shard-NNNNN.pt files")
    p.add_argument("--chat", type=int, default=768, help="chat-form code tasks")
    p.add_argument("--completion", type=int, default=256, help="raw code contexts")
    p.add_argument("--context", type=int, default=128, help="tokens per raw code context")
    p.add_argument("--chat-new-tokens", type=int, default=192)
    p.add_argument("--completion-new-tokens", type=int, default=96)
    p.add_argument("--sampled", type=float, default=0.25, help="fraction of rows answered at temperature 0.7")
    p.add_argument("--shard-rows", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--dtype", default="int4", help="the served dtype (int4 on CPUs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--heldout", action="store_true", help="prompts from the held-out split (evaluation data)")
    p.add_argument("--model", default=None, help="base model folder (default: the converted SmolLM2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model or ensure_base_model(), EngineConfig(
        method="ar", k=0, max_batch=args.max_batch, max_context=1024, dtype=args.dtype, device="cpu",
        record_hidden=True, self_check=False))
    rows = prompts(engine.tokenizer, args.chat, args.completion, args.context, args.seed, args.heldout)
    rng = random.Random(args.seed)
    for row in rows:
        row["sampled"] = rng.random() < args.sampled
    args.out.mkdir(parents=True, exist_ok=True)
    shards = [rows[i : i + args.shard_rows] for i in range(0, len(rows), args.shard_rows)]
    done = len(shard_paths(args.out))
    new_tokens = {"chat": args.chat_new_tokens, "completion": args.completion_new_tokens}
    t0, tokens = time.time(), 0
    for n in tqdm(range(done, len(shards)), initial=done, total=len(shards), desc="speculator data", unit="shard"):
        data = generate_shard(engine, shards[n], new_tokens, args.seed * 1_000_003 + n * args.shard_rows)
        tmp = args.out / (SHARD.format(n) + ".tmp")
        torch.save(data, tmp)
        tmp.rename(args.out / SHARD.format(n))  # whole shards only: a kill loses at most the one in flight
        tokens += sum(len(r["ids"]) - r["prompt_len"] for r in data)
    (args.out / "data.json").write_text(json.dumps({
        "rows": len(rows), "shards": len(shards), "chat": args.chat, "completion": args.completion,
        "sampled": args.sampled, "context": args.context, "new_tokens": new_tokens, "dtype": args.dtype,
        "seed": args.seed}, indent=2) + "\n")
    print(json.dumps({"rows": len(rows), "new_tokens_this_run": tokens, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
