"""The frozen-base SAT adapter: standard rows are the base's bit for bit, speculation stays lossless,
files round-trip, and the trainer learns on a tiny model."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from helpers import tiny_llama

from models.engine import Engine, EngineConfig, SamplingParams
from models.errors import ConfigError
from models.weights.adapter import AdapterConfig, SatAdapter
from models.weights.sat import SatSpec

V = 64  # tiny vocabulary


def _adapter(model, num_sat=4, seed=0):
    cfg = AdapterConfig(base_name="tiny", base_sha256="0" * 64, vocab_size=V, num_sat=num_sat, rank=4, alpha=8.0)
    adapter = SatAdapter.create(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained-looking adapter: B != 0, embeddings apart from the mean
        for p in adapter.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return adapter


def _forward(model, adapter, ids, mask=None):
    embeds = adapter.embed(model, ids) if adapter is not None else model.get_input_embeddings()(ids.clamp(max=V - 1))
    try:
        return model(inputs_embeds=embeds, attention_mask=mask).logits
    finally:
        if adapter is not None:
            adapter.clear()


def test_standard_rows_equal_the_base_bit_for_bit_with_sat_rows_in_the_batch():
    base = tiny_llama(V, seed=1)
    model = copy.deepcopy(base)
    adapter = _adapter(model)
    # standard tokens, then SAT blocks (every layout puts SATs after the real tokens they follow),
    # and a second row whose SAT block sits in the middle of the chunk
    ids = torch.tensor([[5, 9, 11, 3, V, V + 1, V + 2, V + 3], [7, 8, V, V + 1, 2, 2, 2, 2]])
    got = _forward(model, adapter, ids)
    ref = _forward(base, None, ids)
    sat = ids >= V
    first_sat = sat.float().argmax(1)
    for b in range(2):  # rows before the first SAT never see one: they must be identical
        n = int(first_sat[b])
        assert torch.equal(got[b, :n], ref[b, :n])
        assert not torch.equal(got[b, n], ref[b, n])  # the adapter does act on SAT rows


def test_adapter_off_leaves_a_pure_standard_forward_unchanged():
    base = tiny_llama(V, seed=2)
    model = copy.deepcopy(base)
    _adapter(model)
    ids = torch.randint(0, V, (2, 12))
    assert torch.equal(model(input_ids=ids).logits, base(input_ids=ids).logits)


@pytest.mark.parametrize("method,k", [("sdsat", 3), ("sdsat", 5), ("sdsat-fused", 2), ("sdsat-fused", 4)])
def test_greedy_speculation_with_an_adapter_equals_greedy_ar(method, k):
    model = tiny_llama(V, seed=3)
    adapter = _adapter(model, num_sat=4)
    sat = SatSpec(ids=adapter.config.sat_ids, k_train=4)

    class Tok:
        eos_token_id = None

        def decode(self, ids, **kw):
            return "".join(chr(65 + i % 26) for i in ids)

    engine = Engine(model, Tok(), sat, EngineConfig(method="ar", k=k, max_context=128, max_batch=3), adapter=adapter)
    prompts = [[1, 2, 3], [10, 20, 30, 40, 50], [7]]
    ar = engine.generate_batch(prompts, SamplingParams(max_new_tokens=24, method="ar", ignore_eos=True))
    spec = engine.generate_batch(prompts, SamplingParams(max_new_tokens=24, method=method, k=k, ignore_eos=True))
    for a, s in zip(ar, spec, strict=True):
        assert s["token_ids"] == a["token_ids"]
        assert all(t < V for t in s["token_ids"])  # SAT ids are never output
        assert s["stats"]["drafted"] > 0


def test_adapter_files_round_trip_and_check_the_base(tmp_path):
    model = tiny_llama(V, seed=4)
    adapter = _adapter(model)
    adapter.save(tmp_path)
    assert json.loads((tmp_path / "adapter.json").read_text())["base_sha256"] == "0" * 64
    other = copy.deepcopy(tiny_llama(V, seed=4))
    loaded = SatAdapter.load(tmp_path, other, base_sha256="0" * 64)
    for name, tensor in adapter.adapter_state().items():
        assert torch.equal(loaded.adapter_state()[name], tensor)
    with pytest.raises(ConfigError, match="trained on base weights"):
        SatAdapter.load(tmp_path, tiny_llama(V, seed=4), base_sha256="1" * 64)


def _counting_rows(tokenizer, n: int, seed: int) -> list[dict]:
    from models.training.toy import counting_documents

    rows = []
    for doc in counting_documents(n, 24, seed=seed):
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        rows.append({"kind": "completion", "prompt_len": 4, "ids": ids})
    return rows


def test_the_trainer_learns_resumes_and_writes_a_loadable_adapter(tmp_path, counting_sdsat_dir):
    from dataclasses import replace

    from models.engine import Engine, EngineConfig, SamplingParams
    from models.training.train_adapter import train
    from models.training.train_config import AdapterTrainConfig
    from models.weights.checkpoint import load_tokenizer

    tok = load_tokenizer(counting_sdsat_dir)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _counting_rows(tok, 64, seed=5)))
    cfg = AdapterTrainConfig(model=str(counting_sdsat_dir), data=str(data), output_dir=str(tmp_path / "run"),
                             k_train=3, rank=4, alpha=8.0, labels="kl", anchors_per_seq=8, batch_size=4,
                             max_steps=20, lr=1e-2, embedding_lr=3e-2, warmup_steps=2, dtype="float32",
                             device="cpu", save_every=10, log_every=1, heldout_rows=4)
    train(cfg, progress=False)
    metrics = train(replace(cfg, max_steps=60), progress=False)  # resumes at step 20
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == list(range(1, 61))
    first, last = sum(e["loss"] for e in log[:5]) / 5, sum(e["loss"] for e in log[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    assert metrics["heldout_slot_accuracy"][0] > 0.5
    final = tmp_path / "run" / "final"
    assert {"adapter.json", "adapter.safetensors", "sdsat.json"} <= {p.name for p in final.iterdir()}
    # loaded beside its base, the adapter drafts counting well and decoding stays lossless
    from models.weights.adapter import SatAdapter, base_weights_sha256
    from models.weights.checkpoint import load_model

    model = load_model(counting_sdsat_dir)
    adapter = SatAdapter.load(final, model, base_weights_sha256(counting_sdsat_dir))
    engine = Engine(model, tok, SatSpec.load(final), EngineConfig(method="sdsat", k=3, max_context=128),
                    adapter=adapter)
    prompt = tok("3 5 7 9", add_special_tokens=False)["input_ids"]
    ar = engine.generate(prompt, SamplingParams(max_new_tokens=16, method="ar", ignore_eos=True))
    spec = engine.generate(prompt, SamplingParams(max_new_tokens=16, method="sdsat", k=3, ignore_eos=True))
    assert spec["token_ids"] == ar["token_ids"]
    assert spec["stats"]["mean_accepted_per_iteration"] > 1.0
    # a next round starts from these weights (fresh schedule and optimizer) and keeps snapshots along the way
    again = replace(cfg, output_dir=str(tmp_path / "round-2"), init_from=str(final), max_steps=10, lr=1e-4,
                    embedding_lr=1e-4, snapshot_every=5)
    train(again, progress=False)
    log2 = [json.loads(line) for line in (tmp_path / "round-2" / "log.jsonl").read_text().splitlines()]
    assert log2[0]["loss"] < 0.5 * first, (log2[0]["loss"], first)  # it starts where round 1 ended, not afresh
    snapshots = tmp_path / "round-2" / "snapshots"
    assert sorted(p.name for p in snapshots.iterdir()) == ["step-10", "step-5"]
    assert json.loads((snapshots / "step-5" / "metrics.json").read_text())["steps"] == 5
    SatAdapter.load(snapshots / "step-5", load_model(counting_sdsat_dir))  # a snapshot is a loadable adapter
    with pytest.raises(ConfigError, match="rank"):
        train(replace(again, output_dir=str(tmp_path / "round-x"), rank=8, alpha=16.0), progress=False)


@pytest.mark.parametrize("method", ["sdsat", "sdsat-fused"])
def test_exact_speculative_sampling_with_an_adapter_keeps_the_models_distribution(method):
    """The third sampled token (the first one a SAT draft can decide in both methods: the first comes
    from the prefill, the second from the exact row of the first iteration) follows the model's own
    marginal sum p(t0) p(t1 | t0) p(t2 | t0, t1) under the same temperature/top-k, with a random
    adapter whose drafts are often rejected (total variation < 0.05 over 3,000 draws)."""
    from models.engine.sampling import process_logits

    model = tiny_llama(V, seed=7)
    adapter = _adapter(model, num_sat=3, seed=1)
    sat = SatSpec(ids=adapter.config.sat_ids, k_train=3)

    class Tok:
        eos_token_id = None

        def decode(self, ids, **kw):
            return ""

    prompt, temperature, top_k = [3, 1, 4, 1, 5], 0.8, 4
    def next_p(context: list[int]) -> torch.Tensor:  # [V], the processed target distribution
        with torch.no_grad():
            return process_logits(model(input_ids=torch.tensor([context])).logits[0, -1], temperature, 1.0, top_k)

    marginal = torch.zeros(V)
    p0 = next_p(prompt)
    for t0 in p0.nonzero().flatten().tolist():  # top-k leaves 4 tokens per step: 16 two-token contexts
        p1 = next_p(prompt + [t0])
        for t1 in p1.nonzero().flatten().tolist():
            marginal += p0[t0] * p1[t1] * next_p(prompt + [t0, t1])
    engine = Engine(model, Tok(), sat, EngineConfig(method="ar", k=3, max_context=64, max_batch=64), adapter=adapter)
    params = SamplingParams(max_new_tokens=8, temperature=temperature, top_k=top_k, method=method, k=3,
                            ignore_eos=True, seed=11)
    draws = 3000
    tokens: dict[str, list[int]] = {engine.add_request(prompt, replace(params, seed=i)): [] for i in range(draws)}
    drafted = 0
    while engine.has_work():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            drafted += out.stats["drafted"] if out.finished else 0
    counts = torch.bincount(torch.tensor([t[2] for t in tokens.values()]), minlength=V).float()
    assert drafted > 0
    assert 0.5 * float((counts / counts.sum() - marginal).abs().sum()) < 0.05
