"""The base-tied MLP speculator (the base's own embedding and LM head, a draft vocabulary) trained on data
recorded by the served engine (EngineConfig.record_hidden): recording, training, saving and lossless drafting."""

import json

import pytest
import torch

from models.engine import Engine, EngineConfig, SamplingParams
from models.errors import ConfigError
from models.training.data.speculator_data import RecordedData, generate_shard
from models.training.toy import COUNT_MOD
from models.training.train_config import SpeculatorTrainConfig
from models.training.train_speculator import recorded_acceptance, train_speculator
from models.weights.checkpoint import load_model
from models.weights.speculator import MLPSpeculator, SpeculatorConfig

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3, 4, 5, 6], [5, 7]]
DRAFT_VOCAB = 22


def _engine(model_dir, **kw):
    return Engine.from_pretrained(model_dir, EngineConfig(max_context=256, device="cpu", **kw))


def _record(model_dir, prompts, new_tokens=40, sampled=False):
    engine = _engine(model_dir, method="ar", k=0, max_batch=8, record_hidden=True)
    rows = [{"kind": "completion", "ids": p, "sampled": sampled} for p in prompts]
    return generate_shard(engine, rows, {"completion": new_tokens}, seed=0)


@pytest.fixture(scope="module")
def recorded(counting_sdsat_dir, tmp_path_factory):
    """Counting sequences continued by the counting model's engine, with its hidden states, as shards."""
    root = tmp_path_factory.mktemp("tied")
    prompts = [[1 + (s + i * step) % COUNT_MOD for i in range(6)] for s in range(0, 40, 3) for step in (1, 2)]
    for n, chunk in enumerate([prompts[:16], prompts[16:]]):
        torch.save(_record(counting_sdsat_dir, chunk, sampled=n == 1), root / f"shard-{n:05d}.pt")
    torch.save(_record(counting_sdsat_dir, PROMPTS), (root / "heldout").mkdir() or root / "heldout" / "shard-00000.pt")
    return root


def test_recorded_states_are_the_served_forwards(counting_sdsat_dir):
    """hidden[p] is the state that predicted ids[p + 1]: its LM-head argmax is the greedy token there."""
    row = _record(counting_sdsat_dir, [PROMPTS[0]], new_tokens=12)[0]
    model = load_model(counting_sdsat_dir)
    assert row["hidden"].shape == (len(row["ids"]) - 1, model.config.hidden_size)
    assert row["hidden"].dtype == torch.bfloat16 and row["prompt_len"] == len(PROMPTS[0])
    greedy = (row["hidden"].float() @ model.get_output_embeddings().weight.T).argmax(-1)
    answer = slice(row["prompt_len"] - 1, None)
    assert greedy[answer].tolist() == row["ids"][row["prompt_len"] :]


def test_windows_only_train_positions_with_targets(recorded):
    rows = torch.load(recorded / "shard-00000.pt", weights_only=False)
    data = RecordedData(rows, window=16, n_predict=3, seed=0)
    batch = data.batch(5, 4, answers_only=True)
    assert batch.hidden.shape == (4, 16, rows[0]["hidden"].shape[1]) and batch.tokens.shape == (4, 18)
    assert batch.trained.any() and batch.valid.any()
    again = data.batch(5, 4, answers_only=True)  # a function of (seed, step): a resumed run sees the same rows
    assert torch.equal(batch.tokens, again.tokens) and torch.equal(batch.trained, again.trained)


@pytest.fixture(scope="module")
def tied(counting_sdsat_dir, recorded, tmp_path_factory):
    out = tmp_path_factory.mktemp("tied-run")
    cfg = SpeculatorTrainConfig(
        model=str(counting_sdsat_dir), hidden_data=str(recorded), heldout_data=str(recorded / "heldout"),
        base_tied=True, draft_vocab=DRAFT_VOCAB, n_predict=3, seq_len=24, batch_size=8, max_steps=150, lr=5e-3,
        warmup_steps=5, stage2_fraction=0.5, output_dir=str(out), save_to=str(out / "speculator"), num_threads=1,
        eval_every=50, save_every=50, log_every=10)
    return out, train_speculator(cfg, progress=False)


def test_tied_training_learns_to_draft(tied):
    out, metrics = tied
    curve = metrics["curve"]
    assert [c["step"] for c in curve] == [50, 100, 150]
    assert metrics["heldout"]["mean_accepted"] > 1.5, metrics["heldout"]  # counting: easy to draft
    assert 0 < metrics["draft_vocab_coverage"] <= 1
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"]


def test_tied_speculator_round_trips_without_the_base_tables(tied, recorded, counting_sdsat_dir):
    out, metrics = tied
    saved = MLPSpeculator.load(out / "speculator")
    assert saved.config.base_tied and saved.vocab_ids.numel() == DRAFT_VOCAB
    assert not any("base" in name for name in saved.state_dict())  # the base's tables are never stored
    with pytest.raises(ConfigError, match="attach_base"):
        saved.step(0, torch.zeros(1, saved.config.emb_dim), torch.tensor([1]))
    model = load_model(counting_sdsat_dir)
    saved.attach_base(model.get_input_embeddings().weight, model.get_output_embeddings().weight)
    _, logits = saved.step(0, torch.zeros(2, saved.config.emb_dim), torch.tensor([1, 2]))
    full = saved.to_vocab(logits)
    assert logits.shape == (2, DRAFT_VOCAB) and full.shape == (2, saved.config.vocab_size)
    assert torch.equal(full[:, saved.vocab_ids], logits)
    assert torch.isinf(full).sum() == 2 * (full.shape[1] - DRAFT_VOCAB)
    heldout = torch.load(recorded / "heldout" / "shard-00000.pt", weights_only=False)
    assert recorded_acceptance(saved, heldout) == metrics["heldout"]  # the saved file drafts as the trained one


def test_draft_vocab_needs_base_tied():
    with pytest.raises(ConfigError, match="draft_vocab"):
        SpeculatorConfig(emb_dim=8, vocab_size=32, draft_vocab=16)
    with pytest.raises(ConfigError, match="base_tied"):
        SpeculatorTrainConfig(model="m", base_tied=True)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_tied_mlp_equals_plain_greedy(tied, counting_sdsat_dir, tmp_path, k):
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(counting_sdsat_dir, model_dir)
    shutil.copytree(tied[0] / "speculator", model_dir / "speculator")
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = _engine(model_dir, method="ar", k=0).generate_batch(PROMPTS, params)
    engine = _engine(model_dir, method="mlp", k=k)
    batched = engine.generate_batch(PROMPTS, params)
    for ref, got in zip(plain, batched, strict=True):
        assert got["token_ids"] == ref["token_ids"]
        assert got["stats"]["forwards"] == got["stats"]["iterations"] + 1  # drafting costs no base forward
    assert sum(r["stats"]["accepted"] for r in batched) > 0
    sampled = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=1.0, seed=3, ignore_eos=True))
    assert len(sampled["token_ids"]) == 20 and sampled["stats"]["drafted"] > 0
