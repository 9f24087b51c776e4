"""Self-distilled data for the SAT adapter: the frozen base's own greedy continuations.

Greedy verification accepts exactly the base's argmax, so SAT slots trained on the base's own
greedy output learn what will be accepted. Two kinds of prompt, both from the standard library's
training split (never HumanEval, which is the benchmark):
- `chat`: a function's signature and docstring in the code-task chat form (models/weights/chat.py), as
  users send code tasks to an instruct model; the answer is the model's chat reply;
- `completion`: a raw code context of `context` tokens, continued as code.

Rows are written to a JSONL file as they finish (`{"kind", "prompt_len", "ids"}`), so a killed run
resumes where it stopped. Generation is the engine's batched greedy `ar` (continuous batching).

    python -m models.training.data.self_distill --out runs/adapter/data.jsonl --chat 1024 --completion 512
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import time
from pathlib import Path

from models.training.data.corpus import read_text, split_files, stdlib_files, stdlib_root
from models.weights.chat import code_task_messages, encode_chat


def stdlib_split(heldout: bool) -> list[Path]:
    train, held = split_files(stdlib_files(), stdlib_root(), heldout_fraction=0.02, seed=0)
    return held if heldout else train


def function_headers(paths: list[Path], max_chars: int = 1500) -> list[str]:
    """Signature + docstring of every documented top-level or method function (source text)."""
    out = []
    for path in paths:
        text = read_text(path)
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        lines = text.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or ast.get_docstring(node) is None:
                continue
            doc = node.body[0]
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            indent = len(lines[first - 1]) - len(lines[first - 1].lstrip())
            header = "".join(line[indent:] if line[:indent].isspace() else line
                             for line in lines[first - 1 : doc.end_lineno])
            if len(header) <= max_chars and len(ast.get_docstring(node)) >= 40:
                out.append(header)
    return out


def code_contexts(paths: list[Path], tokenizer, context: int, count: int, seed: int) -> list[list[int]]:
    """`count` random windows of `context` tokens from the files, each starting at a line start."""
    rng = random.Random(seed)
    docs = [ids for path in paths if len(ids := tokenizer(read_text(path), add_special_tokens=False)["input_ids"])
            > context + 64]
    out = []
    for _ in range(count):
        ids = rng.choice(docs)
        start = rng.randrange(0, len(ids) - context - 64)
        out.append(ids[start : start + context])
    return out


def prompts(tokenizer, chat: int, completion: int, context: int, seed: int, heldout: bool = False,
            skip_chat: int = 0, skip_completion: int = 0) -> list[dict]:
    """Interleaved chat and completion prompts (so a partial file has both kinds). `skip_*` drops the first
    prompts of each kind's seeded order: a later round of data takes the prompts after an earlier round's
    (the same seed's first N prompts do not depend on how many are asked for)."""
    paths = stdlib_split(heldout)
    rng = random.Random(seed)
    headers = function_headers(paths)
    rng.shuffle(headers)
    if skip_chat + chat > len(headers):
        raise ValueError(f"{skip_chat} + {chat} chat prompts asked for, the split has {len(headers)} functions")
    chat_rows = [{"kind": "chat", "ids": encode_chat(tokenizer, code_task_messages(h))}
                 for h in headers[skip_chat : skip_chat + chat]]
    contexts = code_contexts(paths, tokenizer, context, skip_completion + completion, seed)[skip_completion:]
    code_rows = [{"kind": "completion", "ids": ids} for ids in contexts]
    rows, ci, oi = [], 0, 0
    while ci < len(chat_rows) or oi < len(code_rows):  # keep the two kinds' ratio along the file
        if oi >= len(code_rows) or (ci < len(chat_rows) and ci * len(code_rows) <= oi * len(chat_rows)):
            rows.append(chat_rows[ci])
            ci += 1
        else:
            rows.append(code_rows[oi])
            oi += 1
    return rows


def generate(engine, rows: list[dict], out: Path, new_tokens: dict[str, int], progress: bool = True) -> int:
    """Continue every row greedily; append finished rows to `out` in order; skip rows already there.
    Returns the number of rows in `out`."""
    from tqdm import tqdm

    from models.engine import SamplingParams

    done = _finished_rows(out)
    todo = rows[done:]
    bar = tqdm(total=len(rows), initial=done, desc="self-distill", unit="seq", disable=not progress)
    with out.open("a") as f:
        pending: dict[str, dict] = {}
        outputs: dict[str, list[int]] = {}
        queue = list(todo)
        order: list[str] = []
        while queue or pending:
            while queue and len(pending) < engine.config.max_batch:
                row = queue.pop(0)
                params = SamplingParams(max_new_tokens=new_tokens[row["kind"]], method="ar", k=0)
                rid = engine.add_request(row["ids"], params)
                pending[rid], outputs[rid] = row, []
                order.append(rid)
            for o in engine.step():
                outputs[o.request_id] += o.token_ids
                if o.finished:
                    pending[o.request_id]["done"] = True
            while order and pending[order[0]].get("done"):  # write in prompt order: resumable by count
                rid = order.pop(0)
                row = pending.pop(rid)
                f.write(json.dumps({"kind": row["kind"], "prompt_len": len(row["ids"]),
                                    "ids": row["ids"] + outputs.pop(rid)}) + "\n")
                f.flush()
                bar.update()
        bar.close()
    return len(rows)


def _finished_rows(out: Path) -> int:
    """Rows already written; a torn last line (a kill mid-write) is cut so the next row starts clean."""
    if not out.is_file():
        return 0
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        out.write_bytes(data)
    return data.count(b"\n")


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> None:
    import torch

    from models.engine import Engine, EngineConfig
    from models.weights.base_model import ensure_base_model

    p = argparse.ArgumentParser(description="self-distilled SAT-adapter data from the frozen base")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--chat", type=int, default=1024, help="chat-form prompts")
    p.add_argument("--completion", type=int, default=512, help="raw code contexts")
    p.add_argument("--context", type=int, default=128, help="tokens per raw code context")
    p.add_argument("--chat-new-tokens", type=int, default=160)
    p.add_argument("--completion-new-tokens", type=int, default=96)
    p.add_argument("--skip-chat", type=int, default=0,
                   help="skip the first N chat prompts of the seed's order (taken by an earlier round)")
    p.add_argument("--skip-completion", type=int, default=0,
                   help="skip the first N code contexts of the seed's order (taken by an earlier round)")
    p.add_argument("--limit", type=int, default=0, help="generate only the first N prompts (0 = all)")
    p.add_argument("--heldout", action="store_true", help="prompts from the held-out split (evaluation data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16",
                   help="the base's compute dtype: the one that is served (bf16 where the CPU has it)")
    p.add_argument("--model", default=None, help="base model folder (default: the converted SmolLM2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine.from_pretrained(args.model or ensure_base_model(),
                                    EngineConfig(method="ar", k=0, max_batch=args.max_batch, max_context=1024,
                                                 dtype=args.dtype, device="cpu"))
    rows = prompts(engine.tokenizer, args.chat, args.completion, args.context, args.seed, args.heldout,
                   args.skip_chat, args.skip_completion)
    rows = rows[: args.limit] if args.limit else rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    generate(engine, rows, args.out, {"chat": args.chat_new_tokens, "completion": args.completion_new_tokens})
    print(json.dumps({"rows": len(rows), "seconds": round(time.time() - t0, 1), "out": str(args.out)}))


if __name__ == "__main__":
    main()
