"""The embedded default model, reproduced from scratch: `make model` (= python -m models.training.recipe).

Stages, each skipped when its output exists (and each training stage resumable after a kill):
1. corpus: the standard library's non-test `.py` files, split by file (manifest with hashes);
2. tokenizer: byte-level BPE (4,096 ids) with EOS, FIM and SAT special tokens;
3. base: a Llama trained from scratch as a plain causal LM, with 20% fill-in-the-middle samples;
4. sdsat: SDSAT fine-tuning on self-distilled data (the base model's own greedy continuations);
5. mix: more SDSAT training on fresh self-distilled data (the stage-4 model's continuations of other
   contexts), with half of every batch taken from corpus windows trained with the plain LM loss:
   stage 4 alone raised the held-out loss by 10.7% because only 128-token contexts kept real labels;
6. ship: fp16 weights + tokenizer + sdsat.json + configs + manifest to models/checkpoints/NAME;
7. speculator: an MLP speculator (models/weights/speculator.py) trained on the shipped model, frozen (so
   both drafters speed up the same served model), shipped in fp16 under NAME/speculator/.

Test files are left out of the corpus: they are repetitive assertion boilerplate that would take
a large share of a small model's capacity away from the library code users ask it to write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

from models.training.data.corpus import corpus_manifest, read_text, split_files, stdlib_files, stdlib_root
from models.training.train_config import SpeculatorTrainConfig, TrainConfig

NAME = "sdsat-code-small"
SHIP_DIR = Path(__file__).resolve().parents[1] / "checkpoints" / NAME  # models/checkpoints
VOCAB = 4096

BASE = TrainConfig(
    model="code-small", sat_k=0, fim_rate=0.2, seq_len=512, batch_size=16, max_steps=1000, lr=1.5e-3,
    warmup_steps=100, eval_every=200, eval_batches=8, save_every=50, log_every=10, num_threads=2,
)
SDSAT = TrainConfig(
    sat_k=5, data_source="self-distill", distill_sequences=4096, distill_context=128, distill_new_tokens=128,
    anchors_per_seq=48, seq_len=512, batch_size=8, max_steps=1800, lr=5e-4, warmup_steps=50, eval_every=400,
    eval_batches=8, save_every=100, log_every=20, num_threads=2,
)
MIX = replace(SDSAT, distill_sequences=8192, distill_mix=0.5, seed=1, max_steps=800, lr=3e-4, eval_every=200)
SPECULATOR = dict(n_predict=5, max_steps=1200, distill_sequences=512, num_threads=2)  # SpeculatorTrainConfig


def build_corpus(work: Path) -> dict:
    out = work / "corpus"
    if (out / "manifest.json").is_file():
        return json.loads((out / "manifest.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    root = stdlib_root()
    train, heldout = split_files(stdlib_files(include_tests=False), root, heldout_fraction=0.02, seed=0)
    for name, files in (("train", train), ("heldout", heldout)):
        with (out / f"{name}.jsonl").open("w") as f:
            for path in files:
                f.write(json.dumps({"path": str(path.relative_to(root)), "text": read_text(path)}) + "\n")
    manifest = corpus_manifest(train, heldout, root, include_tests=False)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def build_tokenizer(work: Path) -> Path:
    from models.weights.tokenizer import train_code_tokenizer

    out = work / "tokenizer"
    if not (out / "tokenizer.json").is_file():
        texts = (json.loads(line)["text"] for line in (work / "corpus" / "train.jsonl").open())
        train_code_tokenizer(texts, vocab_size=VOCAB, out_dir=out, model_max_length=2048)
    return out


def run_stage(cfg: TrainConfig) -> dict:
    from models.training.train import FINAL, train

    final = Path(cfg.output_dir) / FINAL
    if (final / "metrics.json").is_file():
        return json.loads((final / "metrics.json").read_text())
    t0 = time.time()
    metrics = train(cfg)
    metrics["wall_s_this_run"] = round(time.time() - t0, 1)
    (final / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_hashes(dest: Path) -> dict[str, str]:
    """SHA-256 of every shipped file (paths relative to `dest`), the manifest itself excepted."""
    return {str(p.relative_to(dest)): sha256(p) for p in sorted(dest.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def ship(sdsat_final: Path, manifest: dict, dest: Path = SHIP_DIR) -> Path:
    """Copy the SDSAT model in fp16 (upcast on load) with its configs and a manifest of hashes."""
    from models.weights.checkpoint import load_model, load_tokenizer, save_checkpoint
    from models.weights.sat import SatSpec

    model = load_model(sdsat_final)
    files = {name: (sdsat_final / name).read_text() for name in ("train_config.yaml", "metrics.json")}
    save_checkpoint(dest, model.half(), load_tokenizer(sdsat_final), SatSpec.load(sdsat_final), files)
    manifest = dict(manifest, files=file_hashes(dest))
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return dest


def ship_speculator(work: Path, train_jsonl: str, dest: Path = SHIP_DIR) -> dict:
    """Train the MLP speculator on the shipped model (resumable) and ship it in fp16 beside it."""
    from models.training.train_speculator import train_speculator
    from models.weights.speculator import SPECULATOR_DIR, MLPSpeculator

    cfg = SpeculatorTrainConfig(**SPECULATOR, model=str(dest), corpus=(train_jsonl,),
                                output_dir=str(work / "speculator"), save_to=str(work / "speculator" / "final"))
    metrics_path = work / "speculator" / "final" / "metrics.json"
    if metrics_path.is_file():
        metrics = json.loads(metrics_path.read_text())
    else:
        t0 = time.time()
        metrics = train_speculator(cfg)
        metrics["wall_s_this_run"] = round(time.time() - t0, 1)
        metrics_path.write_text(json.dumps(metrics, indent=2))
    shutil.rmtree(dest / SPECULATOR_DIR, ignore_errors=True)
    MLPSpeculator.load(work / "speculator" / "final").half().save(dest / SPECULATOR_DIR)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest.update(speculator=metrics, speculator_config=cfg.__dict__)
    manifest["files"] = file_hashes(dest)
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="runs/code-small", help="where the stages write (resumable)")
    parser.add_argument("--stop-after", default="speculator",
                        choices=["corpus", "tokenizer", "base", "sdsat", "mix", "ship", "speculator"])
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    corpus = build_corpus(work)
    if args.stop_after == "corpus":
        return 0
    tokenizer = build_tokenizer(work)
    if args.stop_after == "tokenizer":
        return 0
    train_jsonl, heldout_jsonl = str(work / "corpus" / "train.jsonl"), str(work / "corpus" / "heldout.jsonl")
    base_cfg = replace(BASE, tokenizer=str(tokenizer), corpus=(train_jsonl,), heldout=(heldout_jsonl,),
                       output_dir=str(work / "base"))
    base = run_stage(base_cfg)
    if args.stop_after == "base":
        return 0
    sdsat_cfg = replace(SDSAT, model=str(work / "base" / "final"), corpus=(train_jsonl,), heldout=(heldout_jsonl,),
                        output_dir=str(work / "sdsat"))
    sdsat = run_stage(sdsat_cfg)
    if args.stop_after == "sdsat":
        return 0
    mix_cfg = replace(MIX, model=str(work / "sdsat" / "final"), corpus=(train_jsonl,), heldout=(heldout_jsonl,),
                      output_dir=str(work / "mix"))
    mix = run_stage(mix_cfg)
    if args.stop_after == "mix":
        return 0
    manifest = {"name": NAME, "corpus": corpus, "base": base, "sdsat": sdsat, "mix": mix,
                "base_config": base_cfg.__dict__, "sdsat_config": sdsat_cfg.__dict__, "mix_config": mix_cfg.__dict__}
    shutil.rmtree(SHIP_DIR, ignore_errors=True)
    print(f"shipped {ship(work / 'mix' / 'final', manifest)}")
    if args.stop_after == "ship":
        return 0
    ship_speculator(work, train_jsonl)
    print(f"shipped the speculator beside it: {SHIP_DIR / 'speculator'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
