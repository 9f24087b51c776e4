"""The Redis prefix KV cache against a real Redis (the shared one at 127.0.0.1:6379, or a test-owned
redis-server where the test stops, pauses or restarts it)."""

import math
import os
import signal
import time
import uuid

import pytest
import redis
import torch
from helpers import free_port, start_redis

from infra.prefix_cache import PrefixCache, block_keys, chunk_value_bytes, decode_chunk, encode_chunk, model_fingerprint
from models.engine import Engine, EngineConfig, SamplingParams
from models.engine.prefix import block_shape

SHARED_REDIS = "redis://127.0.0.1:6379/0"
PROMPT = [(i * 7) % 24 + 1 for i in range(100)]  # 6 full 16-token blocks + 4 tokens
SMOLLM2_BLOCK = (30, 2, 3, 16, 64)  # the served model's block: 30 layers, 3 KV heads of 64


@pytest.fixture(scope="module")
def parts(counting_sdsat_dir):
    from models.weights.checkpoint import load_model, load_tokenizer
    from models.weights.sat import SatSpec

    return (load_model(counting_sdsat_dir), load_tokenizer(counting_sdsat_dir), SatSpec.load(counting_sdsat_dir),
            model_fingerprint(counting_sdsat_dir))


def _cache(parts, url=SHARED_REDIS, prefix=None, fingerprint=None, **kw) -> PrefixCache:
    model = parts[0]
    return PrefixCache(fingerprint or parts[3], b"server-secret", block_shape(model.config, 16), torch.float32,
                       block_size=16, redis_url=url, key_prefix=prefix or f"sdsat-test:{uuid.uuid4().hex}:", **kw)


def _block_bytes(parts) -> int:
    return math.prod(block_shape(parts[0].config, 16)) * 4  # fp32


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


class OwnRedis:
    """A redis-server of the test's own on a free port, to stop, restart, pause and resume."""

    def __init__(self):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = start_redis(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()

    def start(self) -> None:
        self.proc = start_redis(self.port)

    def pause(self, paused: bool = True) -> None:  # alive, connections accepted, nothing answered
        os.kill(self.proc.pid, signal.SIGSTOP if paused else signal.SIGCONT)


@pytest.fixture
def own_redis():
    server = OwnRedis()
    yield server
    if server.proc.poll() is None:
        server.pause(False)
        server.stop()


def test_output_identical_cold_warm_local_and_warm_from_redis(parts):
    reference, _ = _run(_engine(parts, None))
    cache = _cache(parts)
    engine = _engine(parts, cache)
    cold, cached_cold = _run(engine)
    warm_local, cached_local = _run(engine)
    assert cache.flush()
    fresh = _cache(parts, prefix=cache.key_prefix)  # another replica: empty LRU, same Redis
    warm_redis, cached_redis = _run(_engine(parts, fresh))
    assert cold == warm_local == warm_redis == reference
    assert (cached_cold, cached_local, cached_redis) == (0, 96, 96)
    assert cache.counters.hit_blocks_local == 6 and fresh.counters.hit_blocks_redis == 6
    assert fresh.counters.hit_blocks_local == 0
    assert cache.counters.writes == 6 and fresh.counters.bytes_read == cache.counters.bytes_written  # one chunk


def test_second_engine_gets_redis_hits_for_a_longer_prompt(parts):
    cache = _cache(parts)
    _run(_engine(parts, cache))
    assert cache.flush()
    other = _cache(parts, prefix=cache.key_prefix)
    longer = PROMPT + [5, 6, 7] * 10
    tokens, cached = _run(_engine(parts, other), longer)
    assert cached == 96 and tokens == _run(_engine(parts, None), longer)[0]


@pytest.mark.parametrize("chunk_blocks", [16, 2])
def test_prompts_parting_inside_a_chunk_share_its_leading_blocks(parts, chunk_blocks):
    """A chunk holds its blocks' chained keys: a prompt that parts from the writer's in block 2 uses blocks
    0-1, whether they sit in the same chunk as the parted ones (16) or not (2); then it writes its own."""
    size = chunk_blocks * _block_bytes(parts)
    cache = _cache(parts, chunk_bytes=size)
    _run(_engine(parts, cache))
    assert cache.flush()
    parted = PROMPT[:40] + [3] * 60
    reader = _cache(parts, prefix=cache.key_prefix, chunk_bytes=size)
    tokens, cached = _run(_engine(parts, reader), parted)
    assert cached == 32 and tokens == _run(_engine(parts, None), parted)[0]
    assert reader.flush()  # blocks 2-5 of its own; one chunk of 16 goes out whole, blocks 0-1 with them
    assert reader.counters.writes == (6 if chunk_blocks == 16 else 4)
    assert _run(_engine(parts, _cache(parts, prefix=cache.key_prefix, chunk_bytes=size)), parted)[1] == 96


def test_a_chunk_partly_cached_locally_is_read_only_when_it_holds_the_next_block(parts):
    cache = _cache(parts)
    _run(_engine(parts, cache))  # chunk 0: blocks 0-5
    assert cache.flush()
    keys = block_keys(PROMPT, 16, cache._root("default"))
    for key in keys[3:]:  # blocks 0-2 stay in the LRU
        del cache.local[key]
    assert len(cache.lookup(PROMPT[:48] + [2] * 52)) == 3 and cache.counters.bytes_read == 0  # block 3 is not there
    assert len(cache.lookup(PROMPT)) == 6 and cache.counters.hit_blocks_redis == 3
    assert cache.counters.bytes_read == cache.counters.bytes_written


def test_tenants_and_models_never_share_entries(parts):
    cache = _cache(parts)
    _run(_engine(parts, cache), tenant="alice")
    assert cache.flush()
    bob = _cache(parts, prefix=cache.key_prefix)
    assert _run(_engine(parts, bob), tenant="bob")[1] == 0
    other_model = _cache(parts, prefix=cache.key_prefix, fingerprint=b"another-model")
    assert _run(_engine(parts, other_model), tenant="alice")[1] == 0
    alice_again = _cache(parts, prefix=cache.key_prefix)
    assert _run(_engine(parts, alice_again), tenant="alice")[1] == 96


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "resign", "garbage"])
def test_damaged_values_are_ignored_and_removed(parts, damage):
    cache = _cache(parts, chunk_bytes=2 * _block_bytes(parts))  # chunks of 2 blocks: the damaged one is blocks 2-3
    reference, _ = _run(_engine(parts, cache))
    assert cache.flush()
    client = redis.Redis.from_url(SHARED_REDIS)
    keys = block_keys(PROMPT, 16, cache._root("default"))
    victim = cache._redis_key(keys[2])
    value = client.get(victim)
    if damage == "flip_payload":
        value = value[:-100] + bytes([value[-100] ^ 1]) + value[-99:]
    elif damage == "truncate":
        value = value[: len(value) // 2]
    elif damage == "resign":  # a valid-looking chunk signed with another key
        stored_keys, kv = decode_chunk(victim.encode(), value, cache.hmac_key, cache.block_shape, torch.float32)
        value = encode_chunk(victim.encode(), stored_keys, list(kv + 1.0), b"attacker-key" * 3)
    else:
        value = b"\x80\x04garbage that might be a pickle"
    client.set(victim, value)
    fresh = _cache(parts, prefix=cache.key_prefix, chunk_bytes=2 * _block_bytes(parts))
    tokens, cached = _run(_engine(parts, fresh))
    assert tokens == reference and cached == 32  # blocks 0-1 used, the damaged chunk stops the prefix
    assert fresh.counters.corrupt == 1
    assert fresh.flush()  # the damaged entry was deleted, and the engine's recomputed blocks written back intact
    assert decode_chunk(victim.encode(), client.get(victim), cache.hmac_key, cache.block_shape, torch.float32)


def test_values_are_in_the_kv_dtype_and_timeouts_follow_their_bytes():
    """bf16 KV (int4 and bf16 engines) is stored as bf16: half the bytes of fp32, and a shorter timeout."""
    fp32 = PrefixCache(b"m", b"s", SMOLLM2_BLOCK, torch.float32, redis_url=SHARED_REDIS)
    bf16 = PrefixCache(b"m", b"s", SMOLLM2_BLOCK, torch.bfloat16, redis_url=SHARED_REDIS)
    assert fp32.chunk_blocks == bf16.chunk_blocks == 16  # 256 tokens: 11.8 MB in fp32, 5.9 MB in bf16
    sizes = {c.dtype: chunk_value_bytes(c.chunk_blocks, SMOLLM2_BLOCK, c.dtype) for c in (fp32, bf16)}
    assert sizes[torch.float32] - sizes[torch.bfloat16] == 16 * 30 * 2 * 3 * 16 * 64 * 2
    for cache in (fp32, bf16):
        assert math.isclose(cache.round_trip_timeout_s, 0.05 + sizes[cache.dtype] / 50e6)
        assert cache.redis.connection_pool.connection_kwargs["socket_timeout"] == cache.round_trip_timeout_s
    key = b"k" * 32
    block = torch.randn(SMOLLM2_BLOCK).to(torch.bfloat16)
    value = encode_chunk(key, [key], [block], b"h" * 32)
    assert len(value) == chunk_value_bytes(1, SMOLLM2_BLOCK, torch.bfloat16)
    assert torch.equal(decode_chunk(key, value, b"h" * 32, SMOLLM2_BLOCK, torch.bfloat16)[1][0], block)
    assert decode_chunk(key, value, b"h" * 32, SMOLLM2_BLOCK, torch.float32) is None  # another dtype: a miss
    assert fp32._root("t") != bf16._root("t")  # and never the same keys


def test_a_bf16_engine_caches_bf16_blocks(counting_sdsat_dir):
    from services.serve.config import DecoderConfig
    from services.serve.decoder import engine_from_config, prefix_cache_from_config

    cfg = DecoderConfig(model_dir=str(counting_sdsat_dir), device="cpu", redis_url=SHARED_REDIS,
                        engine={"method": "ar", "k": 0, "dtype": "bfloat16", "max_context": 256})
    engine = engine_from_config(cfg)
    cache = engine.prefix_store = prefix_cache_from_config(cfg, engine)
    cache.key_prefix = f"sdsat-test:{uuid.uuid4().hex}:"
    engine.generate(PROMPT, SamplingParams(max_new_tokens=2))
    assert cache.dtype == torch.bfloat16 and cache.flush()
    assert cache.counters.bytes_written == chunk_value_bytes(6, cache.block_shape, torch.bfloat16)


def test_a_stalled_redis_costs_a_bounded_miss_then_backs_off(parts, own_redis):
    writer = _cache(parts, url=own_redis.url)
    reference, _ = _run(_engine(parts, writer))
    assert writer.flush()
    reader = _cache(parts, url=own_redis.url, prefix=writer.key_prefix)
    own_redis.pause()  # every round trip times out
    for n in range(1, 4):
        reader.local.clear()
        t0 = time.monotonic()
        assert reader.lookup(PROMPT) == []
        assert time.monotonic() - t0 < reader.round_trip_timeout_s + 0.5
        assert reader.counters.timeouts == n
    t0 = time.monotonic()
    assert reader.lookup(PROMPT) == [] and time.monotonic() - t0 < 0.01  # 3 in a row: Redis skipped
    own_redis.pause(False)
    time.sleep(reader.backoff_s)
    tokens, cached = _run(_engine(parts, reader))  # a fresh connection: no stale reply is ever read
    assert tokens == reference and cached == 96


def test_write_back_holds_through_an_outage_and_drops_the_oldest_past_its_bound(parts, own_redis):
    chunk = 6 * _block_bytes(parts)  # each prompt below is one chunk of 6 blocks
    prompts = [[(i * 7 + p) % 24 + 1 for i in range(100)] for p in range(10)]
    blocks = [torch.randn(block_shape(parts[0].config, 16)) for _ in range(6)]
    cache = _cache(parts, url=own_redis.url, write_queue_bytes=3 * chunk, backoff_s=0.3)
    own_redis.stop()
    cache.lookup(prompts[0])  # notices the outage: the writer holds its backlog
    for prompt in prompts:
        cache.offer(prompt, blocks, 0)
    time.sleep(0.5)
    assert cache.counters.writes == 0 and cache.counters.write_backlog_blocks == 18
    assert cache.counters.dropped_writes == 42  # the 7 oldest chunks
    own_redis.start()
    assert cache.flush()
    assert cache.counters.writes == 18 and cache.counters.write_backlog_blocks == 0
    fresh = _cache(parts, url=own_redis.url, prefix=cache.key_prefix)
    assert [len(fresh.lookup(p)) for p in prompts] == [0] * 7 + [6] * 3  # the newest were kept


def test_write_back_keeps_up_without_drops(parts, own_redis):
    """Faster than any replica prefills: 100 prompts of 6 new blocks offered at once."""
    blocks = [torch.randn(block_shape(parts[0].config, 16)) for _ in range(6)]
    cache = _cache(parts, url=own_redis.url)
    for p in range(100):
        cache.offer([p + 100] + PROMPT[1:], blocks, 0)
    cache.offer([100] + PROMPT[1:], blocks, 0)  # offered twice: written once
    assert cache.flush(timeout=60)
    counters = cache.counters
    assert (counters.writes, counters.dropped_writes, counters.coalesced_writes, counters.errors) == (600, 0, 6, 0)


def test_redis_stopped_and_restarted_mid_run(parts, own_redis):
    cache = _cache(parts, url=own_redis.url, backoff_s=0.2)
    reference, _ = _run(_engine(parts, None))
    engine = _engine(parts, cache)
    assert _run(engine)[0] == reference
    own_redis.stop()
    cache.local.clear()
    for _ in range(3):  # Redis gone: misses, never failures
        assert _run(engine)[0] == reference
    assert cache.counters.errors >= 1
    own_redis.start()
    time.sleep(0.3)  # past the back-off
    cache.local.clear()
    assert _run(engine)[0] == reference
    assert cache.flush()
    assert redis.Redis(port=own_redis.port).dbsize() > 0  # writes resumed after the restart


def test_absent_redis_is_a_miss(parts):
    cache = _cache(parts, url=f"redis://127.0.0.1:{free_port()}/0")
    assert not cache.redis_reachable()
    assert _run(_engine(parts, cache))[0] == _run(_engine(parts, None))[0]


def test_a_quantized_variant_has_its_own_fingerprint(counting_sdsat_dir):
    """int4 replicas compute other KV than dense ones from the same files: they must not share blocks."""
    dense = model_fingerprint(counting_sdsat_dir)
    assert model_fingerprint(counting_sdsat_dir, "int4") != dense
    assert model_fingerprint(counting_sdsat_dir, "") == dense


def test_real_model_answers_the_same_cold_and_warm():
    """SmolLM2 int4, as served: a prompt whose leading blocks come from the cache gets the answer it gets
    prefilled whole (invariant prefill; with the library kernels the answer changed: docs/engine.md)."""
    from models.training.recipe_adapter import SHIP_DIR
    from models.weights.base_model import ensure_base_model
    from models.weights.chat import encode_chat

    ensure_base_model()
    engine = Engine.from_pretrained(SHIP_DIR, EngineConfig(method="ar", k=0, max_batch=2, max_context=512,
                                                           dtype="int4", device="cpu", self_check=False))
    assert engine.config.invariant_prefill
    engine.prefix_store = PrefixCache(b"real-model-probe" * 2, b"server-secret", block_shape(engine.model.config, 16),
                                      torch.bfloat16, block_size=16, redis_url=SHARED_REDIS,
                                      key_prefix=f"sdsat-test:{uuid.uuid4().hex}:")
    task = "Write a Python function that parses an INI file into a dict of dicts."
    prompt = encode_chat(engine.tokenizer, [{"role": "user", "content": task}])
    longer = encode_chat(engine.tokenizer, [{"role": "user", "content": task + " Use configparser."}])
    params = SamplingParams(max_new_tokens=48)
    cold = engine.generate(prompt, params)
    engine.generate(longer, params)  # offers its own blocks too
    warm = engine.generate(prompt, params)
    assert cold["cached_tokens"] == 0 and warm["cached_tokens"] >= 32
    assert warm["token_ids"] == cold["token_ids"]
