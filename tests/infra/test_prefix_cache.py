"""The Redis prefix KV cache against a real Redis (the shared one at 127.0.0.1:6379, or a test-owned
redis-server where the test stops it)."""

import time
import uuid

import pytest
import redis
import torch
from helpers import free_port, start_redis

from infra.prefix_cache import PrefixCache, block_keys, decode_block, encode_block, model_fingerprint
from models.engine import Engine, EngineConfig, SamplingParams
from models.engine.prefix import block_shape

SHARED_REDIS = "redis://127.0.0.1:6379/0"
PROMPT = [(i * 7) % 24 + 1 for i in range(100)]  # 6 full 16-token blocks + 4 tokens


@pytest.fixture(scope="module")
def parts(counting_sdsat_dir):
    from models.checkpoint import load_model, load_tokenizer
    from models.sat import SatSpec

    return (load_model(counting_sdsat_dir), load_tokenizer(counting_sdsat_dir), SatSpec.load(counting_sdsat_dir),
            model_fingerprint(counting_sdsat_dir))


def _cache(parts, url=SHARED_REDIS, prefix=None, fingerprint=None, **kw) -> PrefixCache:
    model = parts[0]
    return PrefixCache(fingerprint or parts[3], b"server-secret", block_shape(model.config, 16), torch.float32,
                       block_size=16, redis_url=url, key_prefix=prefix or f"sdsat-test:{uuid.uuid4().hex}:", **kw)


def _engine(parts, cache) -> Engine:
    model, tok, sat, _ = parts
    return Engine(model, tok, sat, EngineConfig(method="sdsat", k=4, max_context=512), prefix_store=cache)


def _run(engine, prompt=PROMPT, tenant="default"):
    rid = engine.add_request(prompt, SamplingParams(max_new_tokens=24, ignore_eos=True), tenant=tenant)
    tokens, cached = [], None
    while engine.has_work():
        for out in engine.step():
            if out.request_id == rid:
                tokens += out.token_ids
                cached = out.cached_tokens
    return tokens, cached


def test_output_identical_cold_warm_local_and_warm_from_redis(parts):
    reference, _ = _run(_engine(parts, None))
    cache = _cache(parts)
    engine = _engine(parts, cache)
    cold, cached_cold = _run(engine)
    warm_local, cached_local = _run(engine)
    cache.flush()
    fresh = _cache(parts, prefix=cache.key_prefix)  # another replica: empty LRU, same Redis
    warm_redis, cached_redis = _run(_engine(parts, fresh))
    assert cold == warm_local == warm_redis == reference
    assert (cached_cold, cached_local, cached_redis) == (0, 96, 96)
    assert cache.counters.hit_blocks_local == 6 and fresh.counters.hit_blocks_redis == 6
    assert fresh.counters.hit_blocks_local == 0


def test_second_engine_gets_redis_hits_for_a_longer_prompt(parts):
    cache = _cache(parts)
    _run(_engine(parts, cache))
    cache.flush()
    other = _cache(parts, prefix=cache.key_prefix)
    longer = PROMPT + [5, 6, 7] * 10
    tokens, cached = _run(_engine(parts, other), longer)
    assert cached == 96 and tokens == _run(_engine(parts, None), longer)[0]


def test_tenants_and_models_never_share_entries(parts):
    cache = _cache(parts)
    _run(_engine(parts, cache), tenant="alice")
    cache.flush()
    bob = _cache(parts, prefix=cache.key_prefix)
    assert _run(_engine(parts, bob), tenant="bob")[1] == 0
    other_model = _cache(parts, prefix=cache.key_prefix, fingerprint=b"another-model")
    assert _run(_engine(parts, other_model), tenant="alice")[1] == 0
    alice_again = _cache(parts, prefix=cache.key_prefix)
    assert _run(_engine(parts, alice_again), tenant="alice")[1] == 96


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "resign", "garbage"])
def test_damaged_values_are_ignored_and_removed(parts, damage):
    cache = _cache(parts)
    reference, _ = _run(_engine(parts, cache))
    cache.flush()
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = block_keys(PROMPT, 16, cache._root("default"))
    victim = cache._redis_key(keys[2])
    value = client.get(victim)
    if damage == "flip_payload":
        value = value[:40] + bytes([value[40] ^ 1]) + value[41:]
    elif damage == "truncate":
        value = value[: len(value) // 2]
    elif damage == "resign":  # a valid-looking block signed with another key
        block = decode_block(keys[2], value, cache.hmac_key, cache.block_shape, torch.float32)
        value = encode_block(keys[2], block + 1.0, b"attacker-key" * 3)
    else:
        value = b"\x80\x04garbage that might be a pickle"
    client.set(victim, value)
    fresh = _cache(parts, prefix=cache.key_prefix)
    tokens, cached = _run(_engine(parts, fresh))
    assert tokens == reference and cached == 32  # blocks 0-1 used, the damaged block 2 stops the prefix
    assert fresh.counters.corrupt == 1
    fresh.flush()  # the damaged entry was deleted, and the engine's recomputed block written back intact
    assert decode_block(keys[2], client.get(victim), cache.hmac_key, cache.block_shape, torch.float32) is not None


def test_redis_stopped_and_restarted_mid_run(parts):
    port = free_port()
    server = start_redis(port)
    try:
        cache = _cache(parts, url=f"redis://127.0.0.1:{port}/0", backoff_s=0.2)
        reference, _ = _run(_engine(parts, None))
        engine = _engine(parts, cache)
        assert _run(engine)[0] == reference
        server.terminate()
        server.wait()
        cache.local.clear()
        for _ in range(3):  # Redis gone: misses, never failures
            assert _run(engine)[0] == reference
        assert cache.counters.errors >= 1
        server = start_redis(port)
        time.sleep(0.3)  # past the back-off
        cache.local.clear()
        assert _run(engine)[0] == reference
        cache.flush()
        assert redis.Redis(port=port).dbsize() > 0  # writes resumed after the restart
    finally:
        server.terminate()
        server.wait()


def test_absent_redis_is_a_miss(parts):
    cache = _cache(parts, url=f"redis://127.0.0.1:{free_port()}/0")
    assert not cache.redis_reachable()
    assert _run(_engine(parts, cache))[0] == _run(_engine(parts, None))[0]


def test_a_quantized_variant_has_its_own_fingerprint(counting_sdsat_dir):
    """int4 replicas compute other KV than dense ones from the same files: they must not share blocks."""
    dense = model_fingerprint(counting_sdsat_dir)
    assert model_fingerprint(counting_sdsat_dir, "int4") != dense
    assert model_fingerprint(counting_sdsat_dir, "") == dense
