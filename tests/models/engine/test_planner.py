"""Method `auto` (models/engine/planner.py): lookup's replay equals a real lookup run, the cost model picks
what its inputs say, and auto decodes exactly like ar."""

import json

import pytest
import torch

from models.engine import Engine, EngineConfig, SamplingParams
from models.engine.planner import PRIOR_ITERATIONS, Planner, lookup_replay, manifest_priors
from models.weights.sat import SatSpec

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3, 4, 5, 6], [5, 7]]  # counting prompts (+1 ids)


@pytest.fixture(scope="module")
def parts(counting_sdsat_dir):
    from models.weights.checkpoint import load_model, load_tokenizer

    return load_model(counting_sdsat_dir), load_tokenizer(counting_sdsat_dir), SatSpec.load(counting_sdsat_dir)


def _engine(parts, method="auto", priors=None, **kw):
    """An engine whose `auto` follows the cost model alone, unless `auto_trial_iterations` is given."""
    model, tok, sat = parts
    kw.setdefault("auto_trial_iterations", 0)
    return Engine(model, tok, sat, EngineConfig(method=method, k=4, max_context=256, **kw), acceptance_priors=priors)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_lookup_replay_equals_a_real_prompt_lookup_run(parts, k):
    engine = _engine(parts, method="prompt-lookup")
    total = 0
    for prompt, n in zip(PROMPTS, (40, 33, 40, 7), strict=True):
        out = engine.generate(prompt, SamplingParams(max_new_tokens=n, ignore_eos=True, k=k))
        replay = lookup_replay(prompt, out["token_ids"], engine.config.prompt_lookup_ngram)
        iterations, drafted, accepted, offered = replay[k]
        stats = out["stats"]
        assert (iterations, drafted) == (stats["iterations"], stats["drafted"])
        total += drafted
        assert accepted[: len(stats["accepted_per_position"])] == stats["accepted_per_position"]
        assert offered[: len(stats["drafted_per_position"])] == stats["drafted_per_position"]
        assert not any(accepted[len(stats["accepted_per_position"]):] + offered[len(stats["drafted_per_position"]):])
    assert total > 0


def _gpu_like(planner: Planner) -> None:
    """Costs where rows are nearly free (as on a GPU), set before any request so calibration is skipped."""
    planner.widths = [1, 2, 4, 8, 16, 36, 64, 128, 256]
    planner.costs = {kind: [1.0 + 0.01 * (n - 1) for n in planner.widths] for kind in ("standard", "sat")}


def test_auto_decodes_like_ar_and_says_what_it_chose(parts):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = _engine(parts, method="ar").generate_batch(PROMPTS, params)
    engine = _engine(parts, priors={"sdsat-fused": [0.9, 0.8, 0.7, 0.6]})
    _gpu_like(engine.planner)
    single = [engine.generate(p, params) for p in PROMPTS]
    batched = engine.generate_batch(PROMPTS, params)
    for ref, one, many in zip(plain, single, batched, strict=True):
        assert one["token_ids"] == ref["token_ids"] == many["token_ids"]
    # rows nearly free and good fused drafts: every request speculates with the fused SAT blocks
    assert {o["stats"]["method"] for o in single + batched} == {"sdsat-fused"}
    assert all(o["stats"]["drafted"] > 0 for o in single + batched)
    report = engine.planner.report()
    assert report["plans"]["1"]["choice"]["method"] == "sdsat-fused" and set(report["plans"]) == {"1", "2", "4", "8",
                                                                                                  "16"}
    # every greedy request was replayed through lookup; the fused requests' own counts joined the prior
    assert report["observed_iterations"]["prompt-lookup"] > 0
    assert report["observed_iterations"]["sdsat-fused"] == sum(o["stats"]["iterations"] for o in single + batched)


def test_poor_drafts_on_dear_rows_decode_plainly(parts):
    engine = _engine(parts, priors={"sdsat-fused": [0.1], "sdsat": [0.1]})
    engine.planner.widths = [1, 2, 4, 8, 16, 36, 64]
    engine.planner.costs = {kind: [float(n) for n in engine.planner.widths] for kind in ("standard", "sat")}
    out = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert out["stats"]["method"] == "ar" and out["stats"]["drafted"] == 0


def test_calibration_times_widths_in_a_free_row_and_leaves_the_others_alone(parts):
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    expected = _engine(parts, method="ar").generate(PROMPTS[2], params)["token_ids"]
    engine = _engine(parts, method="ar")
    engine.add_request(PROMPTS[2], params)
    tokens = []
    for _ in range(3):
        tokens += [t for out in engine.step() for t in out.token_ids]
    row = engine.running[0].slot
    length = int(engine.cache.length[row])
    keys = [k[row, :, :length].clone() for k in engine.cache.keys]
    engine.planner.calibrate(slot=1)
    assert int(engine.cache.length[row]) == length and int(engine.cache.length[1]) == 0
    assert all(torch.equal(k[row, :, :length], before) for k, before in zip(engine.cache.keys, keys, strict=True))
    costs = engine.planner.costs
    assert set(costs) == {"standard", "sat"} and len(costs["standard"]) == len(engine.planner.widths) > 8
    assert costs["standard"][-1] > costs["standard"][0] > 0  # the widest forward costs more than one row
    while engine.has_work():  # the running request goes on as if nothing had happened
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == expected


def _planner(r: dict[int, float], sat_cost: float = 1.0, trials: int = 0) -> Planner:
    """A planner with given forward costs r(n) (a 1-row forward = 1), SAT rows `sat_cost` times dearer, and
    `trials` iterations of measured trials one sequence at a time (0: the cost model alone)."""
    class View:  # what the planner reads of an engine
        speculation_lossless, compiled, k_cap, sat, speculator = True, None, 8, SatSpec(ids=(9,), k_train=5), None
        config = EngineConfig(max_batch=16, auto_trial_iterations=trials)
        outside_seconds, decoded_tokens = 0.0, 0  # no steps yet: no overhead
        speculates_losslessly = Engine.speculates_losslessly  # the engine's own rule, on these fields

    planner = Planner(View())
    planner.widths = sorted(r)
    planner.costs = {"standard": [r[n] for n in planner.widths],
                     "sat": [r[n] * (1 + (sat_cost - 1) * (n - 1) / n) for n in planner.widths]}
    return planner


def _accept(planner: Planner, method: str, by_position: list[float]) -> None:
    planner.seen[method].add(100, 100 * len(by_position), [100 * a for a in by_position], [100] * len(by_position))
    planner._table.clear()


def test_cheap_wide_forwards_and_good_drafts_choose_speculation():
    gpu_like = {n: 1.0 + 0.01 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64, 128, 600)}  # rows nearly free
    planner = _planner(gpu_like)
    _accept(planner, "sdsat-fused", [0.9, 0.8, 0.7, 0.6, 0.5])
    best, per_method = planner.table(1)
    assert best.method == "sdsat-fused" and best.k >= 3 and best.speedup > 2
    assert per_method["ar"].speedup == 1.0


def test_dear_wide_forwards_or_poor_drafts_choose_ar():
    linear = {n: float(n) for n in (1, 2, 4, 8, 16, 36, 64)}  # every row costs a whole forward
    planner = _planner(linear)
    _accept(planner, "sdsat-fused", [0.5, 0.3, 0.1])
    _accept(planner, "sdsat", [0.5, 0.3, 0.1])
    best, per_method = planner.table(1)
    assert best.method == "ar" and best.speedup == 1.0
    assert planner.k_for("sdsat-fused", 1) == 0 and planner.k_for("sdsat", 1) == 0


def test_larger_batches_draft_less():
    cpu_like = {1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4, 16: 4.0, 32: 9.0, 64: 18.0}  # wide forwards get dear past ~4 rows
    planner = _planner(cpu_like)
    for k in planner.lookup:  # lookup finds a 3-token continuation every iteration, the first two accepted
        planner.lookup[k].add(100, 100 * min(k, 3), [100.0, 100.0, 0.0][:k], [100.0] * min(k, 3))
    ks = [planner.k_for("prompt-lookup", b) for b in (1, 4, 16)]
    assert ks[0] >= 2 and ks == sorted(ks, reverse=True) and ks[0] > ks[-1]
    assert planner.table(1)[0].method == "prompt-lookup"


def test_sat_rows_cost_counts_against_sdsat():
    flat = {n: 1.0 + 0.05 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64)}
    cheap, dear = _planner(flat), _planner(flat, sat_cost=3.0)
    for planner in (cheap, dear):
        _accept(planner, "sdsat-fused", [0.7, 0.5, 0.3])
    assert cheap.table(1)[1]["sdsat-fused"].rate > dear.table(1)[1]["sdsat-fused"].rate


def test_no_lossless_speculation_means_ar(parts):
    engine = _engine(parts, priors={"sdsat-fused": [0.9, 0.8, 0.7, 0.6]})
    _gpu_like(engine.planner)
    engine.invariance = type("Failed", (), {"lossless": False})()
    out = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True))
    assert out["stats"]["method"] == "ar" and out["stats"]["drafted"] == 0


def test_priors_come_from_the_manifest_and_weigh_as_iterations(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"heldout_acceptance": {
        "sdsat_k3": {"accepted_by_position": [0.6, 0.3, 0.1]},
        "sdsat_k5": {"accepted_by_position": [0.6, 0.3, 0.1, 0.05, 0.02]},
        "sdsat-fused_k3": {"accepted_by_position": [0.5, 0.2, 0.1]}, "prompts": 12}}))
    priors = manifest_priors(tmp_path)
    assert priors == {"sdsat": [0.6, 0.3, 0.1, 0.05, 0.02], "sdsat-fused": [0.5, 0.2, 0.1]}
    assert manifest_priors(tmp_path / "none") == {}
    planner = _planner({1: 1.0, 2: 1.1})
    planner.priors = priors
    planner.forget()
    assert planner.seen["sdsat"].iterations == PRIOR_ITERATIONS
    assert planner.seen["sdsat"].expected(2) == pytest.approx(0.9)


def test_the_shipped_adapter_has_priors():
    from models.weights.checkpoint import default_model_dir

    priors = manifest_priors(default_model_dir())
    assert set(priors) == {"sdsat", "sdsat-fused", "mlp"} and all(0 < p[0] <= 1 for p in priors.values())


def test_a_dear_speculator_stage_counts_against_mlp():
    flat = {n: 1.0 + 0.05 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64)}
    cheap, dear = _planner(flat), _planner(flat)
    for planner, stage in ((cheap, 0.02), (dear, 1.0)):  # one speculator stage, in units of a 1-row forward
        planner.engine.speculator = type("Speculator", (), {"n_predict": 3})()
        planner.draft_step = {1: stage, 16: 4 * stage}
        _accept(planner, "mlp", [0.8, 0.6, 0.4])
    assert cheap.table(1)[1]["mlp"].k == 3 and cheap.table(1)[0].method == "mlp"
    assert dear.table(1)[1]["mlp"].rate < cheap.table(1)[1]["mlp"].rate
    assert dear.k_for("mlp", 16) <= cheap.k_for("mlp", 16)


def test_time_outside_the_forward_is_paid_per_token_and_dilutes_speculation():
    flat = {n: 1.0 + 0.05 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64)}
    lean, heavy = _planner(flat), _planner(flat)
    for planner in (lean, heavy):
        _accept(planner, "sdsat-fused", [0.6, 0.3, 0.1])
    heavy.engine.outside_seconds, heavy.engine.decoded_tokens = 20.0, 20
    assert heavy.overhead() == 1.0 and lean.overhead() == 0.0  # 1 s a token outside the forward
    assert heavy.rate("ar", 0, 1) == pytest.approx(lean.rate("ar", 0, 1) / 2)
    # the same drafts save forwards, not the per-token work: speculation gains less where that work is large
    assert heavy.table(1)[1]["sdsat-fused"].speedup < lean.table(1)[1]["sdsat-fused"].speedup


def test_the_engine_measures_its_time_outside_the_forward(parts):
    engine = _engine(parts, method="ar")
    assert engine.forward_seconds == engine.outside_seconds == 0.0  # the start-up self-check is not counted
    engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=10, ignore_eos=True))
    assert engine.decoded_tokens == 9  # the first token comes from the prefill
    assert engine.forward_seconds > 0 and engine.outside_seconds > 0 and engine.planner.overhead() > 0
    forward = engine.forward_seconds
    engine.planner.calibrate(slot=3)  # its forwards are not decoding work
    assert engine.calibration_seconds > 0 and engine.forward_seconds == forward


def test_a_failed_calibration_leaves_the_request_on_ar_not_lost(parts, monkeypatch):
    engine = _engine(parts)

    def out_of_memory(slot):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(engine.planner, "calibrate", out_of_memory)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    out = engine.generate(PROMPTS[0], params)
    assert out["stats"]["method"] == "ar" and out["finish_reason"] == "length"
    assert out["token_ids"] == _engine(parts, method="ar").generate(PROMPTS[0], params)["token_ids"]


# ---- trials: one sequence at a time, the measured rate decides ------------------------------------------------
def _run_trials(planner: Planner, method: str, seconds_per_token: dict[int, float], tokens: dict[int, int]) -> int:
    """Play one request of `method` on `planner`: each iteration asks k_for and 'measures' a step of the given
    cost. Returns the iterations played until the method's trials are over."""
    for played in range(1000):
        if not any(planner._open(arm, planner._best_rate()) for arm in planner.arms(method)):
            return played
        k = planner.k_for(method, 1)
        planner.measure(method, k, seconds_per_token[k] * tokens[k], tokens[k])
    raise AssertionError("the trials never ended")


def test_trials_override_an_optimistic_model_with_what_was_measured():
    gpu_like = {n: 1.0 + 0.01 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64, 128, 600)}
    planner = _planner(gpu_like, trials=12)
    _accept(planner, "sdsat-fused", [0.9, 0.8, 0.7, 0.6, 0.5])
    for k in planner.lookup:  # lookup: a 2-token continuation every iteration, both accepted
        planner.lookup[k].add(100, 100 * min(k, 2), [100.0] * min(k, 2), [100.0] * min(k, 2))
    assert planner.table(1)[0].method == "sdsat-fused"  # what the model alone would pick
    first = planner.choose(1, slot=0)
    assert (first.method, first.source) == ("sdsat-fused", "trial")  # tried first: the model rates it highest
    assert planner.arms("sdsat-fused")[0] == ("ar", 0) and len(planner.arms("sdsat-fused")) > 2
    # measured on this host: the fused blocks are slow, lookup k=2 is the fastest, ar in between
    fused = {k: 0.010 if k == 0 else 0.015 + 0.002 * k for k in range(6)}  # seconds per token
    played = _run_trials(planner, "sdsat-fused", fused, {k: 1 + k for k in range(6)})
    # the draft lengths took turns; after TRIAL_EARLY steps each, every fused k was far below ar and stopped,
    # while ar ran its full trial
    assert planner.trials[("ar", 0)].iterations == 12
    assert all(planner.trials[arm].iterations == 8 for arm in planner.arms("sdsat-fused")[1:])
    assert played == 8 * len(planner.arms("sdsat-fused")) + 4
    nxt = planner.choose(1, slot=0)
    assert nxt.source == "trial" and nxt.method != "sdsat-fused"
    lookup = {0: 0.010, 1: 0.007, 2: 0.006, 3: 0.009, 4: 0.011, 5: 0.012, 6: 0.012, 7: 0.013, 8: 0.013}
    _run_trials(planner, "prompt-lookup", lookup, {k: 1 + min(k, 2) for k in range(9)})
    for method in ("sdsat", "ar"):  # the others: as slow as ar where they draft
        _run_trials(planner, method, {k: 0.010 for k in range(9)}, {k: 1 for k in range(9)})
    best = planner.choose(1, slot=0)
    assert (best.method, best.k, best.source) == ("prompt-lookup", 2, "measured")
    assert best.speedup == pytest.approx(0.010 / 0.006)
    assert planner.k_for("prompt-lookup", 1) == 2 and planner.k_for("sdsat-fused", 1) == 0
    # batches of several sequences still follow the model; a frozen planner keeps what it measured
    assert planner.k_for("sdsat-fused", 4) > 0
    planner.learning = False
    planner.measure("prompt-lookup", 2, 1.0, 1)  # ignored: frozen
    assert planner.choose(1, slot=0) == best
    report = planner.report()["trials"]
    assert report["choice"] == {"method": "prompt-lookup", "k": 2, "source": "measured",
                                "measured_speedup": round(0.010 / 0.006, 3)}
    assert report["one_sequence"]["prompt-lookup:2"]["vs_ar"] == round(0.010 / 0.006, 3)
    planner.forget()
    assert planner.trials == {}


def test_a_slow_spell_does_not_sink_a_trial():
    planner = _planner({1: 1.0, 2: 1.1}, trials=10)
    for _ in range(5):
        planner.measure("prompt-lookup", 1, 0.01, 1)
    planner.measure("prompt-lookup", 1, 5.0, 1)  # the machine stalled for 5 s once
    assert planner.trials[("prompt-lookup", 1)].rate == pytest.approx(6 / (0.05 + 0.01 * 4))


def test_the_engine_times_lone_sequences_steps_for_the_trials(parts):
    engine = _engine(parts, method="prompt-lookup", auto_trial_iterations=4)
    params = SamplingParams(max_new_tokens=30, ignore_eos=True, k=2)
    out = engine.generate(PROMPTS[2], params)
    trials = engine.planner.trials
    # every decoding step of the lone request counted, with its draft length (the last ones clamped by the end)
    assert sum(t.iterations for t in trials.values()) == out["stats"]["iterations"]
    assert sum(t.tokens for t in trials.values()) == 29  # the first token came from the prefill
    assert trials[("prompt-lookup", 2)].iterations > 0 and all(t.seconds > 0 for t in trials.values())
    before = {arm: t.iterations for arm, t in trials.items()}
    for prompt in PROMPTS[:2]:  # two decoding at once: their steps are not a lone sequence's
        engine.add_request(prompt, params)
    for _ in range(4):  # admission and prefill, then three steps of both
        engine.step()
        assert len(engine.running) == 2
    assert {arm: t.iterations for arm, t in trials.items()} == before


def test_auto_on_trial_decodes_like_ar_and_ends_on_the_fastest_measured(parts):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = [_engine(parts, method="ar").generate(p, params)["token_ids"] for p in PROMPTS]
    engine = _engine(parts, priors={"sdsat-fused": [0.9, 0.8, 0.7, 0.6], "sdsat": [0.9, 0.8, 0.7, 0.6]},
                     auto_trial_iterations=3)
    _gpu_like(engine.planner)
    methods = []
    for _ in range(4):
        for prompt, ref in zip(PROMPTS, plain, strict=True):
            out = engine.generate(prompt, params)
            assert out["token_ids"] == ref
            methods.append(out["stats"]["method"])
    planner = engine.planner
    assert len(set(methods)) >= 3  # the trials ran several methods
    choice = planner.choose(1, slot=0)
    assert choice.source == "measured"
    assert planner.settled() and planner.report()["trials"]["settled"]
    assert planner.k_for(choice.method, 1) == choice.k  # what it chose is what a lone request runs
    tried = {arm: t.rate for arm, t in planner.trials.items() if t.iterations >= 3}
    assert planner.trials[(choice.method, choice.k)].rate == max(tried.values())


def test_a_method_far_faster_than_ar_still_measures_ar_to_the_end():
    gpu_like = {n: 1.0 + 0.01 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64, 128, 600)}
    planner = _planner(gpu_like, trials=12)
    _accept(planner, "sdsat-fused", [0.9, 0.8, 0.7, 0.6, 0.5])
    assert planner.choose(1, slot=0).method == "sdsat-fused"
    fused = {k: 0.010 if k == 0 else 0.004 for k in range(6)}  # every fused k 2.5x ar: ar is the one far below
    _run_trials(planner, "sdsat-fused", fused, {k: 1 + k for k in range(6)})
    assert planner.trials[("ar", 0)].iterations == 12  # ar is never stopped early: it is what choices are against
    for method in ("prompt-lookup", "sdsat"):
        _run_trials(planner, method, {k: 0.010 for k in range(9)}, {k: 1 for k in range(9)})
    assert planner.settled()
    best = planner.choose(1, slot=0)
    assert best.source == "measured" and best.method == "sdsat-fused" and best.speedup == pytest.approx(2.5)
    assert planner.k_for("sdsat-fused", 1) == best.k


def test_trials_stay_within_the_requests_own_k():
    planner = _planner({n: 1.0 + 0.01 * (n - 1) for n in (1, 2, 4, 8, 16, 36, 64)}, trials=6)
    _accept(planner, "sdsat-fused", [0.9, 0.8, 0.7, 0.6, 0.5])
    assert max(k for _, k in planner.arms("sdsat-fused")) > 2
    # a request that asks for auto with k=2: only k <= 2 is tried, so its trial ends
    assert [k for _, k in planner.arms("sdsat-fused", cap=2)] == [0, 1, 2]
    for _ in range(200):
        k = planner.k_for("sdsat-fused", 1, cap=2)
        assert k <= 2
        planner.measure("sdsat-fused", k, {0: 0.010, 1: 0.010, 2: 0.024}[k], 1 + k)  # 100, 200, 125 tokens/s
    assert {arm: t.iterations for arm, t in planner.trials.items()} == {("ar", 0): 6, ("sdsat-fused", 1): 200 - 12,
                                                                       ("sdsat-fused", 2): 6}
    assert planner.k_for("sdsat-fused", 1, cap=2) == 1  # the fastest of the three


def test_what_auto_chooses_is_what_its_sequences_run():
    planner = _planner({1: 1.0, 2: 1.1, 4: 1.4, 8: 2.4, 16: 4.0, 36: 9.0, 64: 16.0}, trials=4)
    assert ("sdsat", 7) not in planner.arms("sdsat")  # past the adapter's k_train (5)
    for _ in range(4):  # a client asking for sdsat k=7 itself ran fast: not one of auto's arms
        planner.measure("sdsat", 7, 0.001, 5)
    for method in ("prompt-lookup", "sdsat", "sdsat-fused", "ar"):
        _run_trials(planner, method, {k: 0.010 for k in range(9)}, {k: 1 for k in range(9)})
    best = planner.choose(1, slot=0)
    assert best.source == "measured" and (best.method, best.k) != ("sdsat", 7)
    assert planner.k_for(best.method, 1) == best.k
