"""Prompt-prefix KV blocks shared across decoder replicas (and restarts) through Redis.

Keys: a prompt is cut into `block_size`-token blocks; block i's key is SHA-256(key[i-1] || its token
ids as little-endian int32), and key[-1] = SHA-256(model fingerprint || KV dtype || layout || tenant
salt), where the salt is an HMAC of the tenant under a server-side secret: different models, KV dtypes
and tenants never share entries, and nobody without the secret can compute another tenant's keys.

Values: Redis holds chunks of `chunk_blocks` consecutive blocks (sized to about `chunk_bytes`, so a
chunk is one round trip whatever the model), stored under the key of the chunk's first block:
`SDKV` | version | dtype | blocks | block shape (5 x u32) | each block's key | raw KV bytes in the
cache's own dtype | HMAC-SHA256 over (Redis key, all of that) under a server-side key. A reader uses
the chunk's leading blocks whose keys equal its own prompt's, so prompts that part inside a chunk
still share its common blocks. Never pickle: a shared cache must not be a code-execution path, and
a client of the same Redis cannot plant KV that changes outputs (a bad HMAC, size, shape or dtype is
a miss; the entry is deleted and counted).

Lookup: the in-replica LRU first, then Redis one chunk per round trip, stopping at the first miss (a
chunk the LRU already covers in part is first asked, by its header, whether it holds the next block).
Every round trip's socket timeout is `latency_s` plus the time a chunk takes at `min_bytes_per_s`,
and the whole lookup gets the same allowance for the bytes it may read: a busy host that stalls a
transfer costs the rest of that prefix, not a failed request, and the chunks read before it are kept.
New blocks go to the local LRU at once and to Redis from a background thread, one chunk per SET.
Redis absent or restarting means misses, never a failed request: a connection error (or
`max_timeouts` timeouts in a row) makes the cache skip Redis for `backoff_s`, during which the
write-back waits. Overload: the write-back queue holds up to `write_queue_bytes`; beyond that the
oldest queued chunks are dropped and counted (`dropped_writes`, in blocks).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import struct
import threading
import time
import warnings
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MAGIC, VERSION = b"SDKV", 2
# Socket reads of 1 MiB (redis-py reads 64 KiB at a time by default): a chunk is a few MB, and every
# read hands the GIL back and forth with the replica's other threads.
READ_SIZE = 2**20
HEADER = struct.Struct("<4sBBH5I")  # magic, version, dtype code, blocks in the chunk, block shape
KEY_BYTES = TAG_BYTES = 32
COALESCE_S = 10.0  # the same chunk offered again within this long is not written again
DTYPES = {1: torch.float32, 2: torch.bfloat16, 3: torch.float16}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}


def model_fingerprint(model_dir: str | Path, variant: str = "") -> bytes:
    """SHA-256 over the model's config and weight files (names and contents). An adapter checkpoint
    shares its base's fingerprint: its adapter never changes a standard token's KV (models/weights/adapter.py).
    A base converted from a GGUF is identified by the GGUF's hash instead of 538 MB of re-hashing.
    `variant` names weights served in another form than the files' (e.g. "int4", models/weights/quant.py):
    their KV differs, so replicas serving it never share blocks with dense ones."""
    from models.weights.checkpoint import weights_dir

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


def chunk_value_bytes(blocks: int, block_shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return HEADER.size + blocks * (KEY_BYTES + torch.Size(block_shape).numel() * dtype.itemsize) + TAG_BYTES


def encode_chunk(redis_key: bytes, keys: list[bytes], blocks: list[torch.Tensor], hmac_key: bytes) -> bytes:
    """One Redis value: `blocks` (each [layers, 2, kv_heads, block, head_dim]) with their chained keys, signed."""
    header = HEADER.pack(MAGIC, VERSION, DTYPE_CODES[blocks[0].dtype], len(blocks), *blocks[0].shape)
    payload = torch.stack(blocks).view(torch.uint8).numpy()  # [blocks, ...] as bytes: one copy
    tag = hmac.new(hmac_key, redis_key, hashlib.sha256)
    for part in (header, *keys, payload):
        tag.update(part)
    return b"".join([header, *keys, payload, tag.digest()])


def decode_chunk(redis_key: bytes, value: bytes, hmac_key: bytes, block_shape: tuple[int, ...],
                 dtype: torch.dtype) -> tuple[list[bytes], torch.Tensor] | None:
    """(block keys, [blocks, *block_shape] KV), or None when the value is not an intact, signed chunk of
    the expected layout."""
    if len(value) < HEADER.size + TAG_BYTES:
        return None
    magic, version, code, n, *dims = HEADER.unpack_from(value)
    if magic != MAGIC or version != VERSION or DTYPES.get(code) != dtype or tuple(dims) != tuple(block_shape):
        return None
    if n < 1 or len(value) != chunk_value_bytes(n, block_shape, dtype):
        return None
    body = memoryview(value)[: -TAG_BYTES]
    tag = hmac.new(hmac_key, redis_key, hashlib.sha256)
    tag.update(body)
    if not hmac.compare_digest(value[-TAG_BYTES:], tag.digest()):
        return None
    start = HEADER.size + n * KEY_BYTES
    keys = [bytes(body[HEADER.size + i * KEY_BYTES : HEADER.size + (i + 1) * KEY_BYTES]) for i in range(n)]
    with warnings.catch_warnings():  # read-only bytes: these tensors are only ever copied from, never written
        warnings.simplefilter("ignore", UserWarning)
        kv = torch.frombuffer(value, dtype=torch.uint8, offset=start, count=len(body) - start)
    return keys, kv.view(dtype).view(n, *block_shape)


@dataclass
class CacheCounters:
    lookups: int = 0
    hit_blocks_local: int = 0
    hit_blocks_redis: int = 0
    miss_blocks: int = 0
    errors: int = 0  # failed Redis calls, timeouts included: each one a miss or an unwritten chunk
    timeouts: int = 0
    corrupt: int = 0
    writes: int = 0  # blocks written to Redis (in chunks)
    coalesced_writes: int = 0  # blocks not written again: this replica wrote the same chunk recently
    dropped_writes: int = 0  # blocks never written: the queue's oldest under overload, or a timed-out SET
    bytes_read: int = 0
    bytes_written: int = 0
    write_backlog_blocks: int = 0  # a gauge: blocks queued or being written now

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class _ChunkWrite:
    redis_key: bytes
    keys: list[bytes]
    blocks: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.blocks)


class PrefixCache:
    """A `models.engine.prefix.PrefixStore` backed by an in-replica LRU and (optionally) Redis."""

    def __init__(self, fingerprint: bytes, secret: bytes, block_shape: tuple[int, ...], dtype: torch.dtype,
                 block_size: int = 16, redis_url: str | None = None, ttl_s: int = 3600, latency_s: float = 0.05,
                 min_bytes_per_s: float = 50e6, chunk_bytes: int = 16 * 2**20, max_chunk_blocks: int = 16,
                 local_bytes: int = 256 * 2**20, write_queue_bytes: int = 256 * 2**20,
                 key_prefix: str = "sdsat:kv:", backoff_s: float = 1.0, max_timeouts: int = 3):
        self.block_size, self.block_shape, self.dtype = block_size, tuple(block_shape), dtype
        self.fingerprint, self.secret, self.ttl_s = fingerprint, secret, ttl_s
        self.hmac_key = hmac.new(secret, b"sdsat-kv-value", hashlib.sha256).digest()
        self.key_prefix, self.backoff_s, self.max_timeouts = key_prefix, backoff_s, max_timeouts
        block_bytes = torch.Size(block_shape).numel() * dtype.itemsize
        self.chunk_blocks = max(1, min(max_chunk_blocks, chunk_bytes // block_bytes))
        # Every round trip moves at most one chunk: its timeout is a latency allowance plus the chunk's bytes
        # at the slowest rate we accept. A fixed timeout fails large values exactly when the host is busy.
        self.latency_s, self.min_bytes_per_s = latency_s, min_bytes_per_s
        self.round_trip_timeout_s = self.transfer_budget_s(chunk_value_bytes(self.chunk_blocks, block_shape, dtype))
        self.local: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.local_bytes, self._local_used = local_bytes, 0
        self.counters = CacheCounters()
        self._skip_redis_until, self._timeouts_in_row = 0.0, 0
        self.redis = None
        if redis_url:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            # No retries: redis-py would send the whole command again while the engine thread waits; a miss
            # costs less. (redis.Redis() retries 10 times by default; from_url takes only what it is given.)
            self.redis = redis.Redis.from_url(redis_url, socket_timeout=self.round_trip_timeout_s,
                                              socket_connect_timeout=self.round_trip_timeout_s,
                                              socket_read_size=READ_SIZE, retry=Retry(NoBackoff(), 0))
        self._pending: deque[_ChunkWrite] = deque()
        self._writing: _ChunkWrite | None = None
        self.write_queue_bytes, self._pending_bytes = write_queue_bytes, 0
        self._queued: OrderedDict[bytes, float] = OrderedDict()  # last-block key of chunks queued -> when
        self._last_drop_warning = 0.0
        self._cond = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name="prefix-cache-writer", daemon=True)
        self._writer.start()

    def transfer_budget_s(self, nbytes: int) -> float:
        """How long moving `nbytes` to or from Redis may take before it counts as a miss."""
        return self.latency_s + nbytes / self.min_bytes_per_s

    def redis_reachable(self) -> bool:
        try:
            return bool(self.redis is not None and self.redis.ping())
        except Exception:
            return False

    def _root(self, tenant: str) -> bytes:
        salt = hmac.new(self.secret, b"tenant:" + tenant.encode(), hashlib.sha256).digest()
        layout = f"v{VERSION}:{self.dtype}:{self.block_size}x{self.chunk_blocks}".encode()
        return hashlib.sha256(self.fingerprint + layout + salt).digest()

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
        if len(blocks) < len(keys):
            fetched = self._redis_fetch(keys, len(blocks))
            self.counters.hit_blocks_redis += len(fetched)
            for key, block in zip(keys[len(blocks):], fetched, strict=False):
                self._remember(key, block)
            blocks += fetched
        self.counters.miss_blocks += len(keys) - len(blocks)
        return blocks

    def offer(self, prompt_ids: list[int], blocks: list[torch.Tensor], start_block: int,
              tenant: str = "default") -> None:
        keys = block_keys(prompt_ids, self.block_size, self._root(tenant))[: start_block + len(blocks)]
        for key, block in zip(keys[start_block:], blocks, strict=True):
            self._remember(key, block)
        if self.redis is None or not blocks:
            return
        n = self.chunk_blocks
        for lo in range(start_block // n * n, len(keys), n):  # chunk starts; the first may hold earlier blocks
            hi = min(lo + n, len(keys))
            chunk = [blocks[i - start_block] if i >= start_block else self.local.get(keys[i]) for i in range(lo, hi)]
            if any(b is None for b in chunk):  # its leading blocks left the LRU since the lookup: skip it
                continue
            self._enqueue(_ChunkWrite(keys[lo], keys[lo:hi], chunk))

    # ---- reads -----------------------------------------------------------------------------------
    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._skip_redis_until

    def _redis_fetch(self, keys: list[bytes], start: int) -> list[torch.Tensor]:
        """Blocks `start..` of the prompt from Redis, one chunk per round trip, until a miss, a mismatch,
        an error or the lookup's byte-derived deadline."""
        if not self._redis_usable():
            return []
        import redis

        n, out = self.chunk_blocks, []
        chunks = range(start // n * n, len(keys), n)
        deadline = time.monotonic() + self.transfer_budget_s(
            len(chunks) * chunk_value_bytes(n, self.block_shape, self.dtype))
        for lo in chunks:
            if out and time.monotonic() > deadline:
                self._timed_out("read (lookup deadline)")
                break
            redis_key = self._redis_key(keys[lo])
            try:
                if lo < start and not self._holds(redis_key, start - lo, keys[start]):
                    break
                value = self.redis.get(redis_key)
            except redis.TimeoutError as err:
                self._timed_out(f"read ({type(err).__name__})")
                break
            except Exception as err:
                self._redis_failed("read", err)
                break
            self._timeouts_in_row = 0
            if value is None:
                break
            chunk = decode_chunk(redis_key.encode(), value, self.hmac_key, self.block_shape, self.dtype)
            if chunk is None:  # corrupt, truncated, forged or from another layout: drop it
                self.counters.corrupt += 1
                self._delete(redis_key)
                break
            self.counters.bytes_read += len(value)
            stored_keys, kv = chunk
            matching = 0
            while matching < len(stored_keys) and lo + matching < len(keys) and \
                    stored_keys[matching] == keys[lo + matching]:
                matching += 1
            used = kv[max(start - lo, 0) : matching]
            whole = start <= lo and matching == len(stored_keys)  # else keep no view of the unused bytes
            out += list(used.unbind(0)) if whole else [b.clone() for b in used]
            if matching < n:  # the prompts part here, or the chunk ends the prefix another replica saw
                break
        return out

    def _holds(self, redis_key: str, index: int, key: bytes) -> bool:
        """Whether the chunk's block `index` has this key, from its header alone (an unsigned hint: the chunk
        is verified when read). A prompt cached locally up to the middle of a chunk asks this first, so it
        does not read a whole chunk to find its next block absent."""
        head = self.redis.getrange(redis_key, 0, HEADER.size + (index + 1) * KEY_BYTES - 1)
        if len(head) < HEADER.size + (index + 1) * KEY_BYTES:
            return False
        magic, version, _, n, *_ = HEADER.unpack_from(head)
        return magic == MAGIC and version == VERSION and n > index and head[-KEY_BYTES:] == key

    def _delete(self, redis_key: str) -> None:
        try:
            self.redis.delete(redis_key)
        except Exception as err:
            self._redis_failed("delete", err)

    def _timed_out(self, what: str) -> None:
        """A stalled transfer: a miss (redis-py has closed the connection). Only repeated stalls back off."""
        with self._cond:  # the engine thread and the writer both count
            self.counters.timeouts += 1
            self.counters.errors += 1
            self._timeouts_in_row += 1
            if self._timeouts_in_row < self.max_timeouts:
                return
            self._timeouts_in_row = 0
        self._back_off(what, "timeouts")

    def _redis_failed(self, what: str, err: Exception) -> None:
        with self._cond:
            self.counters.errors += 1
        self._back_off(what, type(err).__name__)

    def _back_off(self, what: str, why: str) -> None:
        self._skip_redis_until = time.monotonic() + self.backoff_s
        with self._cond:
            self._queued.clear()  # Redis may come back empty: a chunk offered again is written again
        log.warning("prefix cache: Redis %s failed (%s); treating Redis as absent for %.1fs", what, why,
                    self.backoff_s)

    # ---- write-back ------------------------------------------------------------------------------
    def _remember(self, key: bytes, block: torch.Tensor) -> None:
        if key in self.local:
            return
        self.local[key] = block
        self._local_used += block.numel() * block.element_size()
        while self._local_used > self.local_bytes and self.local:
            _, old = self.local.popitem(last=False)
            self._local_used -= old.numel() * old.element_size()

    def _enqueue(self, item: _ChunkWrite) -> None:
        with self._cond:
            # Requests sharing a new prefix, admitted together, all offer it: the same chunk (its last block's
            # key fixes every byte) is written once per COALESCE_S.
            now, last = time.monotonic(), item.keys[-1]
            if now - self._queued.get(last, -COALESCE_S) < COALESCE_S:
                self.counters.coalesced_writes += len(item.blocks)
                return
            self._queued[last] = now
            self._queued.move_to_end(last)
            while len(self._queued) > 65536:
                self._queued.popitem(last=False)
            self._pending.append(item)
            self._pending_bytes += item.nbytes
            self.counters.write_backlog_blocks += len(item.blocks)
            while self._pending_bytes > self.write_queue_bytes and len(self._pending) > 1:
                old = self._pending.popleft()  # overload: the oldest backlog goes first
                self._pending_bytes -= old.nbytes
                self._queued.pop(old.keys[-1], None)
                self.counters.write_backlog_blocks -= len(old.blocks)
                self.counters.dropped_writes += len(old.blocks)
                self._warn_dropped()
            self._cond.notify_all()

    def _warn_dropped(self) -> None:
        if time.monotonic() - self._last_drop_warning > 10:
            self._last_drop_warning = time.monotonic()
            log.warning("prefix cache: write-back backlog over %.1f MiB; dropping the oldest chunks (%d blocks so "
                        "far)", self.write_queue_bytes / 2**20, self.counters.dropped_writes)

    def _write_loop(self) -> None:
        from models.engine.kernels import serial_openmp_here

        serial_openmp_here()  # its tensor copies must not add an OpenMP team beside the engine's (see there)
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                wait = self._skip_redis_until - time.monotonic()
                if wait <= 0:
                    item = self._writing = self._pending.popleft()
                    self._pending_bytes -= item.nbytes
            if wait > 0:  # Redis is out: the backlog waits (bounded by write_queue_bytes)
                time.sleep(min(wait, 0.1))
                continue
            try:
                self._write(item)
            finally:
                with self._cond:
                    if self._writing is not None:  # not put back for a retry
                        self.counters.write_backlog_blocks -= len(item.blocks)
                    self._writing = None
                    self._cond.notify_all()

    def _write(self, item: _ChunkWrite) -> None:
        import redis

        redis_key = self._redis_key(item.redis_key)
        value = encode_chunk(redis_key.encode(), item.keys, item.blocks, self.hmac_key)
        try:
            self.redis.set(redis_key, value, ex=self.ttl_s)
        except redis.TimeoutError as err:  # it may have landed or not: not sent again
            with self._cond:
                self.counters.dropped_writes += len(item.blocks)
                self._queued.pop(item.keys[-1], None)
            self._timed_out(f"write ({type(err).__name__})")
            return
        except (redis.ConnectionError, OSError) as err:  # Redis went away: retried once it is back
            with self._cond:
                self._pending.appendleft(item)
                self._pending_bytes += item.nbytes
                self._writing = None
            self._redis_failed("write", err)
            return
        except Exception as err:  # e.g. Redis out of memory: this chunk is not written
            with self._cond:
                self.counters.dropped_writes += len(item.blocks)
                self._queued.pop(item.keys[-1], None)
            self._redis_failed("write", err)
            return
        with self._cond:
            self._timeouts_in_row = 0
            self.counters.writes += len(item.blocks)
            self.counters.bytes_written += len(value)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued write has been sent (tests, benchmarks, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending or self._writing is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
