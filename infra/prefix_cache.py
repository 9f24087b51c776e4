"""Prompt-prefix KV blocks shared across decoder replicas (and restarts) through Redis.

Keys: a prompt is cut into `block_size`-token blocks; block i's key is SHA-256(key[i-1] || its token
ids as little-endian int32), and key[-1] = SHA-256(model fingerprint || tenant salt), where the salt
is an HMAC of the tenant under a server-side secret: different models and tenants never share
entries, and nobody without the secret can compute another tenant's keys. Stable across processes.

Values: `SDKV` | version | dtype | shape (5 x u32) | raw tensor bytes | HMAC-SHA256 over
(key, header, bytes) under a server-side key. Never pickle: a shared cache must not be a
code-execution path, and a client of the same Redis cannot plant KV that changes outputs (a bad
HMAC, size, shape or dtype is a miss; the entry is deleted and counted).

Lookup: the in-replica LRU first, then Redis (one pipelined MGET, short timeout), stopping at the
first miss. New blocks go to the local LRU at once and to Redis from a background thread. Redis
absent, slow or restarting means misses, never a failed request; after an error Redis is skipped
for `backoff_s`.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import queue
import struct
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAGIC, VERSION = b"SDKV", 1
# Socket reads of 1 MiB (redis-py reads 64 KiB at a time by default): a ~1,000-token prefix is a few MB,
# and every read hands the GIL back and forth with the replica's other threads.
READ_SIZE = 2**20
HEADER = struct.Struct("<4sBB5I")
DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


def model_fingerprint(model_dir: str | Path, variant: str = "") -> bytes:
    """SHA-256 over the model's config and weight files (names and contents). An adapter checkpoint
    shares its base's fingerprint: its adapter never changes a standard token's KV (models/adapter.py).
    A base converted from a GGUF is identified by the GGUF's hash instead of 538 MB of re-hashing.
    `variant` names weights served in another form than the files' (e.g. "int4", models/quant.py):
    their KV differs, so replicas serving it never share blocks with dense ones."""
    from models.checkpoint import weights_dir

    model_dir = weights_dir(model_dir)
    h = hashlib.sha256(variant.encode())
    if (Path(model_dir) / "source.json").is_file():
        h.update((Path(model_dir) / "config.json").read_bytes())
        h.update((Path(model_dir) / "source.json").read_bytes())
        return h.digest()
    for path in sorted(Path(model_dir).iterdir()):
        if path.name == "config.json" or path.suffix in (".safetensors", ".bin"):
            h.update(path.name.encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.digest()


def block_keys(tokens: list[int], block_size: int, root: bytes) -> list[bytes]:
    """Chained keys of the prompt's full blocks."""
    keys, parent = [], root
    for b in range(len(tokens) // block_size):
        block = tokens[b * block_size : (b + 1) * block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}i", *block)).digest()
        keys.append(parent)
    return keys


def encode_block(key: bytes, block: torch.Tensor, hmac_key: bytes) -> bytes:
    header = HEADER.pack(MAGIC, VERSION, DTYPE_CODES[block.dtype], *block.shape)
    payload = block.contiguous().view(torch.uint8).numpy().tobytes()
    return header + payload + hmac.new(hmac_key, key + header + payload, hashlib.sha256).digest()


def decode_block(key: bytes, value: bytes, hmac_key: bytes, shape: tuple[int, ...], dtype: torch.dtype,
                 ) -> torch.Tensor | None:
    """The block, or None when the value is not an intact, signed block of the expected shape."""
    expected = HEADER.size + torch.Size(shape).numel() * dtype.itemsize + 32
    if len(value) != expected:
        return None
    header, payload, tag = value[: HEADER.size], value[HEADER.size : -32], value[-32:]
    magic, version, code, *dims = HEADER.unpack(header)
    if magic != MAGIC or version != VERSION or DTYPES.get(code) != dtype or tuple(dims) != tuple(shape):
        return None
    if not hmac.compare_digest(tag, hmac.new(hmac_key, key + header + payload, hashlib.sha256).digest()):
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).view(shape)


@dataclass
class CacheCounters:
    lookups: int = 0
    hit_blocks_local: int = 0
    hit_blocks_redis: int = 0
    miss_blocks: int = 0
    errors: int = 0
    corrupt: int = 0
    writes: int = 0
    dropped_writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class PrefixCache:
    """A `models.engine.prefix.PrefixStore` backed by an in-replica LRU and (optionally) Redis."""

    def __init__(self, fingerprint: bytes, secret: bytes, block_shape: tuple[int, ...], dtype: torch.dtype,
                 block_size: int = 16, redis_url: str | None = None, ttl_s: int = 3600, timeout_s: float = 0.05,
                 local_bytes: int = 256 * 2**20, key_prefix: str = "sdsat:kv:", backoff_s: float = 1.0):
        self.block_size, self.block_shape, self.dtype = block_size, tuple(block_shape), dtype
        self.fingerprint, self.secret, self.ttl_s = fingerprint, secret, ttl_s
        self.hmac_key = hmac.new(secret, b"sdsat-kv-value", hashlib.sha256).digest()
        self.key_prefix, self.backoff_s = key_prefix, backoff_s
        self.local: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.local_bytes, self._local_used = local_bytes, 0
        self.counters = CacheCounters()
        self._skip_redis_until = 0.0
        self.redis = None
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                              socket_read_size=READ_SIZE)
        self._writes: queue.Queue = queue.Queue(maxsize=1024)
        self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
        self._writer.start()

    def redis_reachable(self) -> bool:
        try:
            return bool(self.redis is not None and self.redis.ping())
        except Exception:
            return False

    def _root(self, tenant: str) -> bytes:
        salt = hmac.new(self.secret, b"tenant:" + tenant.encode(), hashlib.sha256).digest()
        return hashlib.sha256(self.fingerprint + salt).digest()

    def _redis_key(self, key: bytes) -> str:
        return self.key_prefix + key.hex()

    # ---- PrefixStore -----------------------------------------------------------------------------
    def lookup(self, prompt_ids: list[int], tenant: str = "default") -> list[torch.Tensor]:
        self.counters.lookups += 1
        keys = block_keys(prompt_ids, self.block_size, self._root(tenant))
        blocks: list[torch.Tensor] = []
        for key in keys:  # the in-replica LRU first
            block = self.local.get(key)
            if block is None:
                break
            self.local.move_to_end(key)
            blocks.append(block)
        self.counters.hit_blocks_local += len(blocks)
        rest = keys[len(blocks):]
        if rest:
            fetched = self._redis_fetch(rest)
            self.counters.hit_blocks_redis += len(fetched)
            for key, block in zip(rest, fetched, strict=False):
                self._remember(key, block)
            blocks += fetched
        self.counters.miss_blocks += len(keys) - len(blocks)
        return blocks

    def offer(self, prompt_ids: list[int], blocks: list[torch.Tensor], start_block: int,
              tenant: str = "default") -> None:
        keys = block_keys(prompt_ids, self.block_size, self._root(tenant))[start_block : start_block + len(blocks)]
        for key, block in zip(keys, blocks, strict=True):
            self._remember(key, block)
        if self.redis is not None:
            try:
                self._writes.put_nowait(list(zip(keys, blocks, strict=True)))
            except queue.Full:
                self.counters.dropped_writes += len(blocks)

    # ---- internals -------------------------------------------------------------------------------
    def _remember(self, key: bytes, block: torch.Tensor) -> None:
        if key in self.local:
            return
        self.local[key] = block
        self._local_used += block.numel() * block.element_size()
        while self._local_used > self.local_bytes and self.local:
            _, old = self.local.popitem(last=False)
            self._local_used -= old.numel() * old.element_size()

    def _redis_fetch(self, keys: list[bytes]) -> list[torch.Tensor]:
        if self.redis is None or time.monotonic() < self._skip_redis_until:
            return []
        try:
            values = self.redis.mget([self._redis_key(k) for k in keys])
        except Exception as err:
            self._redis_failed("read", err)
            return []
        out = []
        for key, value in zip(keys, values, strict=True):
            if value is None:
                break
            block = decode_block(key, value, self.hmac_key, self.block_shape, self.dtype)
            if block is None:  # corrupt, truncated, forged or from another layout: drop it
                self.counters.corrupt += 1
                self._delete(key)
                break
            self.counters.bytes_read += len(value)
            out.append(block)
        return out

    def _delete(self, key: bytes) -> None:
        try:
            self.redis.delete(self._redis_key(key))
        except Exception as err:
            self._redis_failed("delete", err)

    def _redis_failed(self, what: str, err: Exception) -> None:
        self.counters.errors += 1
        self._skip_redis_until = time.monotonic() + self.backoff_s
        log.warning("prefix cache: Redis %s failed (%s); treating as a miss for %.1fs", what,
                    type(err).__name__, self.backoff_s)

    def _write_loop(self) -> None:
        while True:
            items = self._writes.get()
            if time.monotonic() < self._skip_redis_until:
                self.counters.dropped_writes += len(items)
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                for key, block in items:
                    value = encode_block(key, block, self.hmac_key)
                    pipe.set(self._redis_key(key), value, ex=self.ttl_s)
                    self.counters.bytes_written += len(value)
                pipe.execute()
                self.counters.writes += len(items)
            except Exception as err:
                self._redis_failed("write", err)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until queued writes are sent (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while not self._writes.empty() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
