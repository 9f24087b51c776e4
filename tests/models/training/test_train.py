"""The trainer: learning a synthetic task, checkpoints that transformers loads, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from models.config import build_config
from models.errors import ConfigError, DataError, SatVocabularyError
from models.training.toy import counting_documents
from models.training.train import train
from models.training.train_config import TrainConfig
from models.weights.sat import SatSpec

ROOT = Path(__file__).resolve().parents[3]


def _cfg(tmp_path, tokenizer_dir, corpus, **kw) -> TrainConfig:
    base = dict(model="tiny", tokenizer=str(tokenizer_dir), corpus=(str(corpus),), output_dir=str(tmp_path / "run"),
                seq_len=48, batch_size=8, sat_k=4, anchors_per_seq=8, lr=3e-3, warmup_steps=10,
                max_steps=30, eval_every=0, save_every=1000, log_every=1, num_threads=1)
    base.update(kw)
    return TrainConfig(**base)


@torch.no_grad()
def _draft_accuracy(model, spec: SatSpec, tokenizer, docs, k: int) -> float:
    """Fraction of SAT slots whose argmax equals the true token, over the SAT blocks of many anchors."""
    hits = total = 0
    for doc in docs:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for p in range(2, len(ids) - k - 1, 5):
            seq = torch.tensor([ids[: p + 1] + spec.slot_ids(k)])
            drafts = model(seq).logits[0, -k:].argmax(-1).tolist()
            truth = ids[p + 2 : p + 2 + k]
            hits += sum(d == t for d, t in zip(drafts, truth, strict=True))
            total += k
    return hits / total


def test_sdsat_training_learns_counting(tmp_path, count_tokenizer_dir, count_corpus, count_tokenizer):
    cfg = _cfg(tmp_path, count_tokenizer_dir, count_corpus, max_steps=400)
    metrics = train(cfg, progress=False)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    first_sat = log[0]["loss_sat"]
    assert metrics["step"] == 400
    assert metrics["eval_loss_sat"] < 0.2 * first_sat, (first_sat, metrics)
    assert metrics["eval_loss_std"] < 1.0  # after two tokens the next one is determined

    from transformers import AutoModelForCausalLM

    final = tmp_path / "run" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True).eval()
    spec = SatSpec.load(final)
    assert spec.k_train == 4
    accuracy = _draft_accuracy(model, spec, count_tokenizer, counting_documents(20, 40, seed=99), k=4)
    assert accuracy > 0.8, accuracy


def test_plain_training_has_no_sat(tmp_path, count_tokenizer_dir, count_corpus):
    metrics = train(_cfg(tmp_path, count_tokenizer_dir, count_corpus, sat_k=0, max_steps=20, eval_every=10),
                    progress=False)
    final = tmp_path / "run" / "final"
    assert not (final / "sdsat.json").exists()
    first = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert metrics["eval_loss_std"] < 0.7 * first["loss_std"]
    assert "eval_loss_sat" not in metrics


def _train_cmd(tmp_path, tokenizer_dir, corpus, out: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "services.cli", "train", "--model", "tiny", "--tokenizer", str(tokenizer_dir),
            "--corpus", str(corpus), "--output-dir", str(tmp_path / out), "--max-steps", str(steps),
            "--seq-len", "48", "--batch-size", "4", "--sat-k", "3", "--anchors-per-seq", "4",
            "--save-every", "5", "--log-every", "1", "--eval-every", "0", "--num-threads", "1",
            "--no-progress", "--json", "-"]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path, count_tokenizer_dir, count_corpus):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    steps = 400
    cmd = _train_cmd(tmp_path, count_tokenizer_dir, count_corpus, "killed", steps)
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = tmp_path / "killed" / "checkpoint-last" / "trainer_state.pt"
    deadline = time.time() + 120
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # let it run past the checkpoint, so the resume must discard later progress
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved_step = torch.load(state, weights_only=False)["step"]
    assert 0 < saved_step < steps

    resumed = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = json.loads(resumed.stdout)
    assert metrics["step"] == steps and metrics["resumed_from"].endswith("checkpoint-last")
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert logged[-1] == steps and saved_step + 1 in logged

    straight = subprocess.run(_train_cmd(tmp_path, count_tokenizer_dir, count_corpus, "straight", steps),
                              env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]
    from safetensors.torch import load_file

    a = load_file(tmp_path / "killed" / "final" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_bad_inputs_give_clear_errors(tmp_path, count_tokenizer_dir, count_corpus):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="holds no text"):
        train(_cfg(tmp_path, count_tokenizer_dir, empty), progress=False)
    with pytest.raises(DataError, match="does not exist"):
        train(_cfg(tmp_path, count_tokenizer_dir, tmp_path / "missing"), progress=False)
    with pytest.raises(ConfigError, match="sat_k must be >= 1"):
        _cfg(tmp_path, count_tokenizer_dir, count_corpus, sat_k=-1)
    with pytest.raises(SatVocabularyError, match="adding tokens is not allowed"):
        train(_cfg(tmp_path, count_tokenizer_dir, count_corpus, allow_new_tokens=False), progress=False)
    with pytest.raises(ConfigError, match="unknown TrainConfig key"):
        build_config(TrainConfig, overrides={"max_stepz": 3})
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text("max_steps: lots\n")
    with pytest.raises(ConfigError, match="max_steps"):
        build_config(TrainConfig, yaml_path)


def test_cli_reports_errors_and_documents_options(tmp_path, count_tokenizer_dir, count_corpus):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "services.cli", "train", "--help"], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0
    import dataclasses

    for f in dataclasses.fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out.stdout
    bad = subprocess.run(_train_cmd(tmp_path, count_tokenizer_dir, count_corpus, "bad", 3) + ["--sat-k", "-2"],
                         env=env, cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "sat_k must be >= 1" in bad.stderr
