"""The compiled forward (models/engine/compiled.py): torch.compile'd graphs give eager's tokens.

One compile, of one shape class on the tiny counting model, as issue [O] asks of the suite: 2 sequences
x 4 tokens, so a single sequence's 1-token decode runs padded with a spare-row sequence and 3 padding
tokens, and every speculative verify (k <= 3) fits it too.
"""

import pytest
import torch

from models.engine import Engine, EngineConfig, SamplingParams

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def compiled_engine(counting_sdsat_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("inductor")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(
            method="ar", k=3, attention="sdpa", compile=True, compile_widths=(4,), compile_batches=(2,),
            max_batch=2, max_context=256))  # the self-check waits for the class, then checks the compiled path
        yield engine, cache


@pytest.fixture(scope="module")
def eager(counting_sdsat_dir) -> Engine:
    return Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method="ar", k=3, attention="sdpa", max_batch=2,
                                                                   max_context=256))


def test_the_compiled_class_is_ready_and_cached_under_the_cache_folder(compiled_engine):
    engine, cache = compiled_engine
    report = engine.compiled.report()
    assert report["active"] and report["classes_ready"].keys() == {"2x4"} and not report["failed"]
    assert report["cache_dir"] == str(cache) and any(cache.iterdir())  # inductor wrote its artifacts there


def test_compiled_forwards_give_the_eager_tokens(compiled_engine, eager):
    """Plain decoding. (Speculation here: the self-check of the compiled graphs fails on CPUs, as for eager
    SDPA, so speculative requests serve ar; the GPU test asserts speculation on its graphs.)"""
    engine, _ = compiled_engine
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    before = engine.compiled.forwards
    single = [engine.generate(p, params)["token_ids"] for p in PROMPTS]  # padded: a spare row, 3 padding tokens
    batched = [r["token_ids"] for r in engine.generate_batch(PROMPTS[:2], params)]
    assert engine.compiled.forwards > before  # decode and verify forwards ran compiled (prefill > 4 tokens: eager)
    expected_ar = [eager.generate(p, SamplingParams(max_new_tokens=24, ignore_eos=True))["token_ids"]
                   for p in PROMPTS]
    assert single == expected_ar and batched == expected_ar[:2]


def test_sat_row_methods_serve_ar_under_a_compiled_forward(compiled_engine):
    """SDSAT's forwards carry SAT rows, which run eager; beside compiled rows they could differ, so the
    engine serves such requests as ar (no drafts), and k stays within the widest class (4: k <= 3)."""
    engine, _ = compiled_engine
    assert engine.k_cap == 3
    for method in ("sdsat", "sdsat-fused"):
        out = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=8, ignore_eos=True, method=method, k=3))
        assert out["stats"]["drafted"] == 0 and len(out["token_ids"]) == 8
    assert engine.invariance is not None  # the self-check ran on the compiled graphs (chains of 2 and 4 rows)
    checked, engine.invariance = engine.invariance, None  # trust the forward for a moment, so prompt lookup drafts
    try:
        out = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=24, ignore_eos=True, method="prompt-lookup",
                                                         k=8))
    finally:
        engine.invariance = checked
    assert out["stats"]["drafted"] > 0 and len(out["stats"]["accepted_per_position"]) <= 3  # k = 8 asked: at most 3


def test_compiled_and_eager_write_the_same_kv(compiled_engine, eager):
    engine, _ = compiled_engine
    for e in (engine, eager):
        e.add_request(PROMPTS[2], SamplingParams(max_new_tokens=6, ignore_eos=True))
        while not e.running or len(e.running[0].output_ids) < 5:
            e.step()
    n = int(engine.cache.length[0])
    assert n == int(eager.cache.length[0]) > len(PROMPTS[2])
    for ours, theirs in zip(engine.cache.keys + engine.cache.values, eager.cache.keys + eager.cache.values,
                            strict=True):
        torch.testing.assert_close(ours[0, :, :n], theirs[0, :, :n], rtol=1e-5, atol=1e-5)
    for e in (engine, eager):
        e.cancel(e.running[0].request_id)


def test_speculation_is_not_trusted_once_the_checked_graphs_are_turned_off(compiled_engine):
    """The self-check judged the compiled graphs; a graph error while serving turns them off, and the eager
    ops that serve then were never checked: speculation stops (serves ar) rather than trusting them."""
    engine, _ = compiled_engine
    checked, engine.invariance = engine.invariance, None  # as if the graphs had passed the check
    try:
        assert engine.speculation_lossless
        engine.compiled.failed[(0, 0)] = "while serving: a test's failure"
        assert not engine.compiled.active and not engine.speculation_lossless
    finally:
        engine.compiled.failed.pop((0, 0), None)
        engine.invariance = checked
    assert engine.compiled.active
