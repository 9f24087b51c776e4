"""The decoding engine: speculative greedy == plain greedy, rollback, batching, admission, cancel."""

import pytest
import torch
from helpers import tiny_llama

import models.engine.config as engine_config
from models.engine import METHODS, Engine, EngineConfig, SamplingParams
from models.engine.drafters import DRAFTERS, drafter_for
from models.engine.drafters.base import Drafter
from models.errors import InvalidRequestError, PromptTooLongError
from models.weights.sat import SatSpec

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3, 4, 5, 6], [5, 7]]  # counting prompts (+1 ids)


@pytest.fixture(scope="module")
def counting_engine_parts(counting_sdsat_dir):
    from models.weights.checkpoint import load_model, load_tokenizer

    return load_model(counting_sdsat_dir), load_tokenizer(counting_sdsat_dir), SatSpec.load(counting_sdsat_dir)


def _engine(parts, method="sdsat", k=4, **kw):
    model, tok, sat = parts
    return Engine(model, tok, sat, EngineConfig(method=method, k=k, max_context=kw.pop("max_context", 256), **kw))


def _hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_ar_matches_transformers_generate(counting_engine_parts):
    model = counting_engine_parts[0]
    engine = _engine(counting_engine_parts, method="ar")
    for prompt in PROMPTS:
        got = engine.generate(prompt, SamplingParams(max_new_tokens=30, ignore_eos=True))["token_ids"]
        assert got == _hf_greedy(model, prompt, 30)


@pytest.mark.parametrize("method", ["sdsat", "sdsat-fused", "prompt-lookup"])
@pytest.mark.parametrize("k", [1, 3, 5, 8])
def test_speculative_greedy_equals_plain_greedy(counting_engine_parts, method, k):
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    plain = _engine(counting_engine_parts, method="ar").generate_batch(PROMPTS, params)
    engine = _engine(counting_engine_parts, method=method, k=k)
    single = [engine.generate(p, params) for p in PROMPTS]
    batched = engine.generate_batch(PROMPTS, params)
    for ref, one, many in zip(plain, single, batched, strict=True):
        assert one["token_ids"] == ref["token_ids"] == many["token_ids"]
    stats = single[0]["stats"]
    assert stats["emitted"] == 40 and stats["drafted"] > 0
    if method.startswith("sdsat"):  # the trained SAT slots draft the counting task well
        assert stats["mean_accepted_per_iteration"] > 0.5 * min(k, 4)
        assert stats["forwards_per_token"] < 1.0


def test_requests_joining_at_different_steps(counting_engine_parts):
    params = SamplingParams(max_new_tokens=80, ignore_eos=True)
    plain = _engine(counting_engine_parts, method="ar").generate_batch(PROMPTS, params)
    engine = _engine(counting_engine_parts, method="sdsat", k=5)
    ids, got = [], {}
    for step in range(200):
        if step % 2 == 0 and len(ids) < len(PROMPTS):  # a new request every other step
            ids.append(engine.add_request(PROMPTS[len(ids)], params))
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.token_ids)
        if len(ids) == len(PROMPTS) and not engine.has_work():
            break
    assert [got[i] for i in ids] == [r["token_ids"] for r in plain]
    assert max(engine.batch_sizes) >= 3  # they really ran together


@pytest.mark.parametrize("method", ["sdsat", "sdsat-fused", "prompt-lookup"])
def test_cache_after_rollback_equals_fresh_prefill(counting_engine_parts, method):
    engine = _engine(counting_engine_parts, method=method, k=5)
    engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=200, ignore_eos=True))
    for _ in range(8):
        engine.step()
    seq = engine.running[0]
    committed = int(engine.cache.length[seq.slot])
    tokens = (seq.prompt_ids + seq.output_ids)[:committed]
    assert committed == seq.context_len - 1  # everything but cur
    fresh = engine.model(torch.tensor([tokens]), use_cache=True).past_key_values
    for layer in range(len(engine.cache.keys)):
        k_ref, v_ref = fresh.layers[layer].keys[0], fresh.layers[layer].values[0]
        torch.testing.assert_close(engine.cache.keys[layer][seq.slot, :, :committed], k_ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(engine.cache.values[layer][seq.slot, :, :committed], v_ref, atol=1e-5, rtol=1e-4)


def test_admission_waits_for_a_free_slot(counting_engine_parts):
    engine = _engine(counting_engine_parts, method="sdsat", k=3, max_batch=2)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in PROMPTS]
    engine.step()
    assert len(engine.running) == 2 and len(engine.waiting) == 2
    done = set()
    while engine.has_work():
        assert len(engine.running) <= 2
        done |= {o.request_id for o in engine.step() if o.finished}
    assert done == set(ids)


def test_cancel_frees_the_slot(counting_engine_parts):
    engine = _engine(counting_engine_parts, method="sdsat", k=3, max_batch=1)
    a = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=100, ignore_eos=True))
    b = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.step()
    engine.step()
    assert [s.request_id for s in engine.running] == [a]
    assert engine.cancel(a)
    assert not engine.running
    engine.step()
    assert [s.request_id for s in engine.running] == [b]
    assert not engine.cancel("no-such-request")


def test_chunked_prefill_interleaves_with_decoding(counting_engine_parts):
    engine = _engine(counting_engine_parts, method="sdsat", k=3, prefill_chunk=8)
    params = SamplingParams(max_new_tokens=60, ignore_eos=True)
    short = engine.add_request(PROMPTS[0], params)
    engine.step()  # short prompt prefilled, first token out
    long_prompt = [(i % 24) + 1 for i in range(100)]
    engine.add_request(long_prompt, params)
    progress = []
    for _ in range(6):
        before = len(engine.running[0].output_ids)
        engine.step()
        long_seq = engine.running[1]
        progress.append((len(engine.running[0].output_ids) - before, long_seq.prefilled))
    assert engine.running[0].request_id == short
    assert all(new > 0 for new, _ in progress)  # the short stream kept decoding ...
    assert [p for _, p in progress] == [8, 16, 24, 32, 40, 48]  # ... while the long prompt was chunked


def test_stop_string_spanning_two_tokens(counting_engine_parts):
    engine = _engine(counting_engine_parts, method="sdsat", k=4)
    params = SamplingParams(max_new_tokens=30, stop=("6 7",))
    result = engine.generate([1, 2, 3], params)  # ids 1,2,3 are "0 1 2": continues "3 4 5 6 7 ..."
    assert result["text"] == "3 4 5 "
    assert result["finish_reason"] == "stop"
    assert result["stats"]["emitted"] == 5  # up to the token that completed the stop string


def test_bad_inputs_raise_typed_errors(counting_engine_parts):
    engine = _engine(counting_engine_parts, max_context=64)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(PromptTooLongError):
        engine.add_request([1] * 64, SamplingParams())
    with pytest.raises(InvalidRequestError, match="k must be >= 0"):
        SamplingParams(k=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(InvalidRequestError, match="method"):
        SamplingParams(method="beam")
    model, tok, _ = counting_engine_parts
    with pytest.raises(InvalidRequestError, match="needs an SDSAT model"):
        Engine(model, tok, None, EngineConfig(method="sdsat")).add_request([1, 2], SamplingParams())


def test_seeded_sampling_is_reproducible_and_batch_independent(counting_engine_parts):
    params = SamplingParams(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    engine = _engine(counting_engine_parts, method="sdsat", k=3)
    alone = engine.generate(PROMPTS[0], params)["token_ids"]
    again = engine.generate(PROMPTS[0], params)["token_ids"]
    in_batch = engine.generate_batch([PROMPTS[0], PROMPTS[1]], params)[0]["token_ids"]
    assert alone == again == in_batch
    other = engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=20, temperature=1.0, seed=8,
                                                       ignore_eos=True))["token_ids"]
    assert len(other) == 20


def test_random_model_near_ties_only(count_tokenizer):
    """On an untrained model (flat logits) batching may reorder float sums: any mismatch with plain
    decoding must be a near-tie (top-2 gap < 1e-4)."""
    model = tiny_llama(30)
    sat = SatSpec(ids=(29,), k_train=4)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    plain = Engine(model, count_tokenizer, sat, EngineConfig(method="ar", max_context=128))
    spec = Engine(model, count_tokenizer, sat, EngineConfig(method="sdsat-fused", k=4, max_context=128))
    refs, gots = plain.generate_batch(PROMPTS, params), spec.generate_batch(PROMPTS, params)
    for prompt, ref, got in zip(PROMPTS, refs, gots, strict=True):
        ref, got = ref["token_ids"], got["token_ids"]
        if ref != got:
            i = next(j for j, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b)
            top2 = model(torch.tensor([prompt + ref[:i]])).logits[0, -1].topk(2).values
            assert float(top2[0] - top2[1]) < 1e-4, (i, ref, got)


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_other_llama_family_models(family, count_tokenizer):
    """The engine drives other Llama-family architectures unchanged (speculative == plain == HF)."""
    import transformers

    config_cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[family]
    model_cls = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=30, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = model_cls._from_config(config, attn_implementation="sdpa").eval()
    sat = SatSpec(ids=(29,), k_train=3)
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompt = [3, 4, 5, 6]
    outs = {m: Engine(model, count_tokenizer, sat, EngineConfig(method=m, k=3, max_context=128))
            .generate(prompt, params)["token_ids"] for m in ("ar", "sdsat", "sdsat-fused", "prompt-lookup")}
    reference = list(prompt)  # greedy by full forwards, no cache at all
    with torch.no_grad():
        for _ in range(16):
            reference.append(int(model(torch.tensor([reference])).logits[0, -1].argmax()))
    assert all(o == reference[4:] for o in outs.values()), outs


class FixedDrafter(Drafter):
    """A whole new method: always proposes the same tokens (a point mass), cut to this iteration's k."""

    name = "fixed"

    def __init__(self, tokens: list[int]):
        self.tokens = tokens

    def propose(self, engine, seqs):
        for seq in seqs:
            seq.drafts, seq.draft_probs = self.tokens[: seq.k_now], None


def test_a_registered_drafter_decodes_like_greedy_ar(counting_engine_parts, monkeypatch):
    monkeypatch.setattr(engine_config, "METHODS", (*METHODS, "fixed"))  # a new method name is accepted ...
    monkeypatch.setitem(DRAFTERS, "fixed", FixedDrafter([6, 7, 8, 9]))  # ... and runs the registered drafter
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    plain = _engine(counting_engine_parts, method="ar").generate_batch(PROMPTS, params)
    engine = _engine(counting_engine_parts, method="fixed", k=3)
    single = [engine.generate(p, params) for p in PROMPTS]
    batched = engine.generate_batch(PROMPTS, params)
    for ref, one, many in zip(plain, single, batched, strict=True):
        assert one["token_ids"] == ref["token_ids"] == many["token_ids"]
        stats = one["stats"]  # no drafting forward: one verify per iteration, plus the prefill
        assert stats["drafted"] > 0 and stats["forwards"] == stats["iterations"] + 1
    assert single[0]["stats"]["accepted"] >= 3  # "0 1 2 3" -> cur "4": the drafts "5 6 7" are all accepted


def test_every_method_has_a_drafter():
    drafted = set(METHODS) - {"auto"}  # auto is not a drafter: the planner gives each request one of the others
    assert set(DRAFTERS) == drafted
    assert all(drafter_for(m).name == m for m in drafted)
    with pytest.raises(InvalidRequestError, match="no drafter"):
        drafter_for("beam")
