"""Ray Train data parallelism: two CPU workers make the single-process updates, and survive a crash.

Every run trains the tiny model on the counting corpus for 12 steps of 8 sequences: one process with
grad_accum=2, or two workers with one micro-batch each (same rows, same seed, loss normalised by the
step's global token count). The reference single-process run is shared by the tests of this module.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.config import build_config
from models.training.train import train
from models.training.train_config import TrainConfig
from services.jobs.train_ray import CRASH_ENV, ScaleConfig, fit_ray

STEPS, SAVE_EVERY, CRASH_STEP = 12, 4, 6
# Measured on CPU (gloo): DDP weights are bit-identical to the single-process run, FSDP within 1e-8.
# The bound leaves room for a different reduction order (NCCL), amplified by 12 AdamW steps.
WEIGHTS_ATOL, WEIGHTS_RTOL = 1e-6, 1e-5


def _cfg(out: Path, tokenizer_dir, corpus, **kw) -> TrainConfig:
    base = dict(model="tiny", tokenizer=str(tokenizer_dir), corpus=(str(corpus),), output_dir=str(out),
                seq_len=48, batch_size=4, grad_accum=1, sat_k=3, anchors_per_seq=4, lr=3e-3, warmup_steps=2,
                max_steps=STEPS, eval_every=0, save_every=SAVE_EVERY, log_every=1, num_threads=1)
    return TrainConfig(**{**base, **kw})


def _scale(**kw) -> ScaleConfig:
    return ScaleConfig(**{"workers": 2, "cpus_per_worker": 0.25, "max_failures": 1, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _assert_same_weights(out: Path, reference: Path) -> None:
    got, want = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=WEIGHTS_ATOL, rtol=WEIGHTS_RTOL, msg=lambda m, n=name: (
            f"{n}: 2 workers vs 1 process (grad_accum=2), tolerance atol={WEIGHTS_ATOL} rtol={WEIGHTS_RTOL}: {m}"))


@pytest.fixture(scope="module")
def single(tmp_path_factory, count_tokenizer_dir, count_corpus) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    train(_cfg(out, count_tokenizer_dir, count_corpus, grad_accum=2), progress=False)
    return out


@pytest.fixture
def run_cfg(tmp_path, count_tokenizer_dir, count_corpus):
    return _cfg(tmp_path / "run", count_tokenizer_dir, count_corpus)


def test_two_workers_learn_and_match_single_process(ray_session, single, run_cfg):
    metrics = fit_ray(run_cfg, _scale(), progress=False)
    out = Path(run_cfg.output_dir)
    log, reference = _log(out), _log(single)
    assert [r["step"] for r in log] == list(range(1, STEPS + 1))
    assert log[-1]["loss_std"] < 0.85 * log[0]["loss_std"] and log[-1]["loss_sat"] < log[0]["loss_sat"]
    for got, want in zip(log, reference, strict=True):  # the same log lines: losses over both workers' rows
        assert got.keys() == want.keys()
        for key in ("loss_std", "loss_sat", "lr"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)
    assert metrics["step"] == STEPS and metrics["resumed_from"] is None
    assert metrics.keys() == json.loads((single / "final" / "metrics.json").read_text()).keys()
    _assert_same_weights(out, single)


def test_worker_crash_resumes_from_last_checkpoint(ray_session, single, run_cfg, tmp_path):
    marker = tmp_path / "crashed"
    metrics = fit_ray(run_cfg, _scale(), progress=False, worker_env={CRASH_ENV: f"{CRASH_STEP}:{marker}"})
    assert marker.exists(), "the worker never crashed"
    resumed = CRASH_STEP // SAVE_EVERY * SAVE_EVERY
    assert metrics["resumed_from"].endswith(f"checkpoint-{resumed:06d}")
    steps = [r["step"] for r in _log(Path(run_cfg.output_dir))]
    assert steps == list(range(1, CRASH_STEP + 1)) + list(range(resumed + 1, STEPS + 1))
    _assert_same_weights(Path(run_cfg.output_dir), single)


def test_fsdp_rerun_after_failed_run_resumes_from_ray_storage(ray_session, single, run_cfg, tmp_path):
    """What a killed driver leaves: a run stopped at step 6, checkpoint 4 in Ray's storage path (and in
    checkpoint-last). The same command again resumes there (sharded: FSDP) and ends with the same weights."""
    import ray.train

    marker = tmp_path / "crashed"
    with pytest.raises(ray.train.TrainingFailedError):
        fit_ray(run_cfg, _scale(fsdp=True, max_failures=0), progress=False,
                worker_env={CRASH_ENV: f"{CRASH_STEP}:{marker}"})
    metrics = fit_ray(run_cfg, _scale(fsdp=True), progress=False)
    assert metrics["resumed_from"].endswith(f"checkpoint-{SAVE_EVERY:06d}")
    assert Path(metrics["resumed_from"]).parent.parent == Path(run_cfg.output_dir) / "ray"
    _assert_same_weights(Path(run_cfg.output_dir), single)


def test_cli_scale_options():
    from services.cli import build_parser

    args = build_parser().parse_args(["train", "--workers", "2", "--fsdp", "--cpus-per-worker", "0.5"])
    scale = build_config(ScaleConfig, overrides={k: getattr(args, k) for k in ScaleConfig.__dataclass_fields__})
    assert scale == ScaleConfig(workers=2, fsdp=True, cpus_per_worker=0.5)


def test_adapter_trains_on_two_ray_workers(ray_session, tmp_path, counting_sdsat_dir):
    """`sdsat train-adapter --workers 2`: each worker takes half of every batch, gradients are averaged,
    rank 0 writes the log and the final adapter."""
    import json as json_

    from models.training.toy import counting_documents
    from models.training.train_config import AdapterTrainConfig
    from models.weights.checkpoint import load_tokenizer
    from services.jobs.train_ray import fit_ray_adapter

    tok = load_tokenizer(counting_sdsat_dir)
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for doc in counting_documents(48, 24, seed=6):
            f.write(json_.dumps({"kind": "completion", "prompt_len": 4,
                                 "ids": tok(doc, add_special_tokens=False)["input_ids"]}) + "\n")
    cfg = AdapterTrainConfig(model=str(counting_sdsat_dir), data=str(data), output_dir=str(tmp_path / "run"),
                             k_train=3, rank=4, alpha=8.0, anchors_per_seq=8, batch_size=4, max_steps=30, lr=1e-2,
                             embedding_lr=3e-2, warmup_steps=2, dtype="float32", device="cpu", save_every=10,
                             log_every=1, heldout_rows=4, num_threads=1)
    metrics = fit_ray_adapter(cfg, _scale(workers=2, cpus_per_worker=0.5), progress=False)
    assert metrics["workers"] == 2 and metrics["steps"] == 30
    log = [json_.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 31))
    assert sum(e["loss"] for e in log[-5:]) < 0.7 * sum(e["loss"] for e in log[:5])
    assert (tmp_path / "run" / "final" / "adapter.safetensors").is_file()


def test_speculator_trains_on_two_ray_workers(ray_session, tmp_path, counting_sdsat_dir):
    """`sdsat train-speculator --hidden-data DIR --workers 2`: each worker takes half of every batch of recorded
    windows, gradients are averaged, rank 0 writes the log and the base-tied speculator."""
    from models.engine import Engine, EngineConfig
    from models.training.data.speculator_data import generate_shard
    from models.training.toy import COUNT_MOD
    from models.training.train_config import SpeculatorTrainConfig
    from models.weights.speculator import MLPSpeculator
    from services.jobs.train_ray import fit_ray_speculator

    engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method="ar", k=0, max_batch=8, max_context=128,
                                                                     device="cpu", record_hidden=True))
    rows = [{"kind": "completion", "ids": [1 + (s + i) % COUNT_MOD for i in range(5)]} for s in range(0, 24, 2)]
    (tmp_path / "data").mkdir()
    torch.save(generate_shard(engine, rows, {"completion": 24}, seed=0), tmp_path / "data" / "shard-00000.pt")
    cfg = SpeculatorTrainConfig(model=str(counting_sdsat_dir), hidden_data=str(tmp_path / "data"), base_tied=True,
                                draft_vocab=20, n_predict=2, seq_len=16, batch_size=8, max_steps=30, lr=5e-3,
                                warmup_steps=2, stage2_fraction=0.5, output_dir=str(tmp_path / "run"),
                                save_to=str(tmp_path / "speculator"), num_threads=1, save_every=10, log_every=1)
    metrics = fit_ray_speculator(cfg, _scale(workers=2, cpus_per_worker=0.5), progress=False)
    assert metrics["workers"] == 2 and metrics["step"] == 30
    log = _log(tmp_path / "run")
    assert [e["step"] for e in log] == list(range(1, 31))
    assert sum(e["loss"] for e in log[-5:]) < 0.7 * sum(e["loss"] for e in log[:5])
    assert MLPSpeculator.load(tmp_path / "speculator").vocab_ids.numel() == 20
