"""Method `auto` (models/engine/planner.py): lookup's replay equals a real lookup run, the cost model picks
what its inputs say, and auto decodes exactly like ar."""

import json

import pytest

from models.engine import Engine, EngineConfig, SamplingParams
from models.engine.planner import PRIOR_ITERATIONS, Planner, lookup_replay, manifest_priors
from models.weights.sat import SatSpec

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3, 4, 5, 6], [5, 7]]  # counting prompts (+1 ids)


@pytest.fixture(scope="module")
def parts(counting_sdsat_dir):
    from models.weights.checkpoint import load_model, load_tokenizer

    return load_model(counting_sdsat_dir), load_tokenizer(counting_sdsat_dir), SatSpec.load(counting_sdsat_dir)


def _engine(parts, method="auto", priors=None, **kw):
    model, tok, sat = parts
    return Engine(model, tok, sat, EngineConfig(method=method, k=4, max_context=256, **kw), acceptance_priors=priors)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_lookup_replay_equals_a_real_prompt_lookup_run(parts, k):
    engine = _engine(parts, method="prompt-lookup")
    for prompt in PROMPTS:
        out = engine.generate(prompt, SamplingParams(max_new_tokens=40, ignore_eos=True, k=k))
        replay = lookup_replay(prompt, out["token_ids"], engine.config.prompt_lookup_ngram)
        iterations, drafted, per_position = replay[k]
        stats = out["stats"]
        assert (iterations, drafted) == (stats["iterations"], stats["drafted"]) and drafted > 0
        assert per_position[: len(stats["accepted_per_position"])] == stats["accepted_per_position"]
        assert not any(per_position[len(stats["accepted_per_position"]):])


def test_auto_decodes_like_ar_and_says_what_it_chose(parts):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = _engine(parts, method="ar").generate_batch(PROMPTS, SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine = _engine(parts, priors={"sdsat-fused": [0.9, 0.8, 0.7, 0.6]})
    single = [engine.generate(p, params) for p in PROMPTS]
    batched = engine.generate_batch(PROMPTS, params)
    for ref, one, many in zip(plain, single, batched, strict=True):
        assert one["token_ids"] == ref["token_ids"] == many["token_ids"]
    chosen = {o["stats"]["method"] for o in single + batched}
    assert chosen <= {"ar", "prompt-lookup", "sdsat", "sdsat-fused"} and "auto" not in chosen
    report = engine.planner.report()
    assert report["calibrated"] and report["r"]["1"] == 1.0 and set(report["plans"]) == {"1", "2", "4", "8", "16"}
    # every greedy request was replayed through lookup; the fused requests' own counts joined the prior
    assert report["observed_iterations"]["prompt-lookup"] > 0
    fused = [o["stats"] for o in single + batched if o["stats"]["method"] == "sdsat-fused"]
    assert report["observed_iterations"]["sdsat-fused"] == sum(s["iterations"] for s in fused)


def test_calibration_times_widths_in_a_free_row_and_leaves_it_empty(parts):
    engine = _engine(parts)
    engine.planner.calibrate(slot=2)
    assert engine.cache.length.tolist() == [0] * engine.cache.slots
    costs = engine.planner.costs
    assert set(costs) == {"standard", "sat"} and len(costs["standard"]) == len(engine.planner.widths) > 8
    assert costs["standard"][-1] > costs["standard"][0] > 0  # 64 rows cost more than one


def _planner(r: dict[int, float], sat_cost: float = 1.0) -> Planner:
    """A planner with given forward costs r(n) (a 1-row forward = 1), SAT rows `sat_cost` times dearer."""
    class View:  # what the planner reads of an engine
        speculation_lossless, compiled, k_cap, sat, speculator = True, None, 8, SatSpec(ids=(9,), k_train=5), None
        config = EngineConfig(max_batch=16)

    planner = Planner(View())
    planner.widths = sorted(r)
    planner.costs = {"standard": [r[n] for n in planner.widths],
                     "sat": [r[n] * (1 + (sat_cost - 1) * (n - 1) / n) for n in planner.widths]}
    return planner


def _accept(planner: Planner, method: str, by_position: list[float]) -> None:
    planner.seen[method].add(100, 100 * len(by_position), [100 * a for a in by_position])
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
        planner.lookup[k].add(100, 100 * min(k, 3), [100.0, 100.0, 0.0][:k] + [0.0] * max(0, k - 3))
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
    engine = _engine(parts)
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
