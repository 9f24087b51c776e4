"""The MLP speculator: its checkpoint, training (both stages, resume, CLI) and the engine's `mlp` drafter."""

import json
import math
import shutil

import pytest
import torch

import models.training.train_speculator as train_module
from models.engine import Engine, EngineConfig, SamplingParams
from models.errors import ConfigError, InvalidRequestError
from models.training.train_config import SpeculatorTrainConfig
from models.training.train_speculator import train_speculator
from models.weights.checkpoint import load_model, load_tokenizer
from models.weights.sat import SatSpec
from models.weights.speculator import SPECULATOR_DIR, MLPSpeculator, SpeculatorConfig

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3, 4, 5, 6], [5, 7]]  # counting prompts (+1 ids)
N_PREDICT = 4


def _cfg(model, out, corpus, **kw) -> SpeculatorTrainConfig:
    base = dict(model=str(model), corpus=(str(corpus),), output_dir=str(out), n_predict=N_PREDICT, seq_len=48,
                batch_size=8, max_steps=120, lr=5e-3, warmup_steps=5, stage2_fraction=0.3, distill_sequences=16,
                distill_context=8, distill_new_tokens=40, distill_batch_size=16, save_every=50, log_every=1,
                num_threads=1, device="cpu")
    base.update(kw)
    return SpeculatorTrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, counting_sdsat_dir, count_corpus):
    """A copy of the counting SDSAT model with a speculator trained beside it (about 5 s on CPU)."""
    root = tmp_path_factory.mktemp("speculator")
    model = root / "model"
    shutil.copytree(counting_sdsat_dir, model)
    metrics = train_speculator(_cfg(model, root / "run", count_corpus), progress=False)
    return model, root / "run", metrics


@pytest.fixture(scope="module")
def parts(trained):
    model = trained[0]
    return load_model(model), load_tokenizer(model), SatSpec.load(model), MLPSpeculator.maybe_load(model)


def _engine(parts, method="mlp", k=3, **kw):
    model, tok, sat, speculator = parts
    return Engine(model, tok, sat, EngineConfig(method=method, k=k, max_context=256, **kw), speculator=speculator)


def test_training_lowers_the_loss_and_saves_beside_the_model(trained):
    model, run, metrics = trained
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    stage1, stage2 = [r for r in log if r["stage"] == 1], [r for r in log if r["stage"] == 2]
    assert [r["step"] for r in log] == list(range(1, 121)) and len(stage2) == 36
    assert stage1[-1]["loss"] < 0.25 * stage1[0]["loss"], (stage1[0], stage1[-1])  # measured 14.1 -> 1.1
    assert stage2[-1]["loss"] < 0.5  # the model's own continuations are easy to draft: measured 0.09
    assert len(metrics["loss_per_head"]) == N_PREDICT and metrics["step"] == 120
    assert metrics["saved_to"] == str(model / SPECULATOR_DIR) and metrics["resumed_from"] is None
    config = json.loads((model / SPECULATOR_DIR / "config.json").read_text())
    assert config["n_predict"] == N_PREDICT and config["emb_dim"] == 64


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    config = SpeculatorConfig(emb_dim=16, vocab_size=30, n_predict=3, inner_dim=8, tie_weights=tie)
    torch.manual_seed(0)
    speculator = MLPSpeculator(config)
    assert speculator.state_weight == 0.5 ** (0.5 / 3)
    assert speculator.emb_weight == math.sqrt((1 - speculator.state_weight**2) * 8 / 2)
    speculator.save(tmp_path / "ckpt" / SPECULATOR_DIR)
    loaded = MLPSpeculator.maybe_load(tmp_path / "ckpt")
    assert loaded.config == config
    hidden, tokens = torch.randn(2, 5, 16), torch.randint(30, (2, 5 + 2))
    torch.testing.assert_close(loaded(hidden, tokens), speculator(hidden, tokens), rtol=0, atol=0)
    assert (loaded.head[0] is loaded.head[2]) == tie and loaded.proj[0] is not loaded.proj[1]
    assert MLPSpeculator.maybe_load(tmp_path) is None
    (tmp_path / "ckpt" / SPECULATOR_DIR / "config.json").write_text(json.dumps({**vars(config), "scale_input": True}))
    with pytest.raises(ConfigError, match="scale_input"):
        MLPSpeculator.maybe_load(tmp_path / "ckpt")


def test_resume_continues_from_the_checkpoint(tmp_path, counting_sdsat_dir, count_corpus, monkeypatch):
    def cfg(name):  # 9 stage-1 steps, then 3 stage-2 steps
        return _cfg(counting_sdsat_dir, tmp_path / name, count_corpus, max_steps=12, stage2_fraction=0.25,
                    save_every=5, save_to=str(tmp_path / name / "speculator"))

    train_speculator(cfg("straight"), progress=False)
    real_step = train_module.train_step

    def killed_in_step_8(run, *args):
        if run.step == 7:
            raise RuntimeError("killed")
        return real_step(run, *args)

    monkeypatch.setattr(train_module, "train_step", killed_in_step_8)
    with pytest.raises(RuntimeError, match="killed"):
        train_speculator(cfg("killed"), progress=False)
    monkeypatch.setattr(train_module, "train_step", real_step)
    metrics = train_speculator(cfg("killed"), progress=False)
    assert metrics["resumed_from"].endswith("checkpoint-last") and metrics["step"] == 12
    logged = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10, 11, 12]  # steps 6-7 are redone from the step-5 checkpoint
    a = MLPSpeculator.load(tmp_path / "straight" / "speculator").state_dict()
    b = MLPSpeculator.load(tmp_path / "killed" / "speculator").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_mlp_equals_plain_greedy(parts, k):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = _engine(parts, method="ar").generate_batch(PROMPTS, params)
    engine = _engine(parts, k=k)
    single = [engine.generate(p, params) for p in PROMPTS]
    batched = engine.generate_batch(PROMPTS, params)
    for ref, one, many in zip(plain, single, batched, strict=True):
        assert one["token_ids"] == ref["token_ids"] == many["token_ids"]
    for result in single + batched:  # drafting costs no base-model forward: one per iteration, plus the prefill
        assert result["stats"]["forwards"] == result["stats"]["iterations"] + 1
        assert result["stats"]["drafted"] > 0


def test_mlp_drafter_accepts_several_tokens_per_iteration(parts):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    results = _engine(parts, k=8).generate_batch(PROMPTS, params)  # k is capped at n_predict = 4
    for result in results:
        stats = result["stats"]
        assert len(stats["accepted_per_position"]) <= N_PREDICT
        assert stats["mean_accepted_per_iteration"] > 3.0, stats  # measured 3.88 on every prompt
        assert stats["forwards_per_token"] < 0.4, stats


def test_seeded_sampling_is_valid_and_reproducible(parts):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    engine = _engine(parts, k=3)
    alone = engine.generate(PROMPTS[0], params)
    again = engine.generate(PROMPTS[0], params)["token_ids"]
    in_batch = engine.generate_batch([PROMPTS[0], PROMPTS[1]], params)[0]["token_ids"]
    assert alone["token_ids"] == again == in_batch
    vocab = parts[0].config.vocab_size
    assert len(alone["token_ids"]) == 20 and all(0 <= t < vocab for t in alone["token_ids"])
    assert alone["stats"]["accepted"] > 0
    other = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=0.7, seed=8, ignore_eos=True))
    assert len(other["token_ids"]) == 20 and all(0 <= t < vocab for t in other["token_ids"])


def test_mlp_needs_a_speculator(parts):
    model, tok, sat, _ = parts
    engine = Engine(model, tok, sat, EngineConfig(method="sdsat"))
    with pytest.raises(InvalidRequestError, match="speculator"):
        engine.add_request([1, 2], SamplingParams(method="mlp"))


def test_bench_has_mlp_rows(trained, parts):
    from services.bench import common as bench

    report = bench.run_bench(str(trained[0]), ["0 1 2 3", "7 9 11"], 12, [1, 3], 1, ["mlp"], progress=False,
                             prompt_sets={"first": 1, "second": 1})
    rows = [(r["method"], r["k"]) for r in report["results"]]
    assert rows == [("ar", 0), ("mlp", 1), ("mlp", 3)]
    assert all(r["identical_fraction"] == 1.0 for r in report["results"])
    assert all(r["ceiling"] > 0 for r in report["results"][1:])
    by_set = report["by_prompt_set"]  # each set's rows, which add up to the rows over all prompts
    assert [v["prompts"] for v in by_set.values()] == [1, 1]
    for i, row in enumerate(report["results"][1:], start=1):
        per_set = [v["results"][i]["accepted_per_position"] for v in by_set.values()]
        assert [a + b for a, b in zip(*per_set, strict=True)] == row["accepted_per_position"]
    linear = report["linear_cost_ratio"]  # the matmul probe covers the same widths as r(w)
    assert set(linear) == {"largest_decoder_linear", "lm_head"}
    assert all(set(v) == set(report["cost_ratio_r"]) | {"t1_us"} and v["t1_us"] > 0 for v in linear.values())
    model, tok, sat, _ = parts
    assert not bench.available(Engine(model, tok, sat, EngineConfig(method="ar")), "mlp")


def test_cli_trains_and_reports_errors(tmp_path, counting_sdsat_dir, count_corpus, capsys):
    from services.cli import main

    args = ["train-speculator", "--model", str(counting_sdsat_dir), "--corpus", str(count_corpus),
            "--output-dir", str(tmp_path / "run"), "--save-to", str(tmp_path / "speculator"), "--max-steps", "3",
            "--n-predict", "2", "--seq-len", "24", "--stage2-fraction", "0", "--device", "cpu",
            "--num-threads", "1", "--no-progress", "--json", "-"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 3
    assert MLPSpeculator.load(tmp_path / "speculator").n_predict == 2
    assert main(args + ["--n-predict", "0"]) == 2
    assert "n_predict must be >= 1" in capsys.readouterr().err


def test_auto_weighs_the_speculator_too_and_stays_exact(parts):
    prompts = [[1, 2, 3, 4], [8, 10, 12], [5, 7]]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = _engine(parts, method="ar").generate_batch(prompts, params)
    engine = _engine(parts, method="auto")
    engine.planner.priors = {"mlp": [0.95, 0.9, 0.85, 0.8]}  # as the speculator's manifest would give it
    engine.planner.forget()
    got = engine.generate_batch(prompts, params)
    assert [o["token_ids"] for o in got] == [o["token_ids"] for o in plain]
    report = engine.planner.report()
    assert set(report["mlp_stage_ms"]) == {"1", "16"} and all(v > 0 for v in report["mlp_stage_ms"].values())
    assert "mlp" in report["plans"]["1"]["candidates"]


def test_bench_runs_auto_after_a_warm_up_and_records_its_choices(trained):
    from services.bench import common as bench

    report = bench.run_bench(str(trained[0]), ["0 1 2 3", "7 9 11"], 12, [2], 1, ["prompt-lookup", "auto"],
                             progress=False, warmup_prompts=["4 5 6", "10 12 14"])
    rows = {r["method"]: r for r in report["results"]}
    assert set(rows) == {"ar", "prompt-lookup", "auto"} and rows["auto"]["identical_fraction"] == 1.0
    auto = report["auto"]
    assert auto["warmup_prompts"] == 2 and sum(auto["chosen"].values()) == 2  # one timed request per prompt
    assert set(auto["chosen"]) <= {"ar", "prompt-lookup", "sdsat", "sdsat-fused", "mlp"}
    # learned from the two warm-up prompts only, then frozen: the timed runs added nothing
    plan = auto["plan"]
    assert plan["calibrated"] and plan["observed_iterations"]["prompt-lookup"] > 0
    # one pass over the warm-up prompts, then on while auto's trials last (at most three passes)
    assert 2 <= auto["warmup_requests"] <= 6 and (plan["trials"]["settled"] or auto["warmup_requests"] == 6)
    assert plan["observed_iterations"]["prompt-lookup"] <= auto["warmup_requests"] * 12  # one per warm-up token
