"""Access control at the router: API keys (each names a tenant) and per-key rate limits.

Keys are never stored or compared in the clear: the config holds their SHA-256 digests (raw keys
given through $SDSAT_API_KEYS are hashed by the app builder before they reach any deployment
argument), and a presented key is hashed and compared with every digest by `hmac.compare_digest`,
so the time taken tells nothing about which key, or how much of one, matched.

Rate limits are a sliding one-minute window per key, kept in the router replica's memory: a request
is charged 1 request and `prompt_tokens + max_tokens` tokens when admitted (what it may use, as
OpenAI's limits count it), and the tokens it did not generate are refunded when it ends. With R
router replicas each enforces 1/R of the configured limit (the HTTP proxies spread requests evenly).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import time
from collections import deque
from dataclasses import dataclass, field

from models.errors import SdsatError

ENV_KEYS = "SDSAT_API_KEYS"  # "tenant:key,tenant2:key2"


class AuthenticationError(SdsatError):
    status = 401
    code = "invalid_api_key"


class RateLimitError(SdsatError):
    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def keys_from_env(value: str | None = None) -> list[dict]:
    """`tenant:key` pairs from $SDSAT_API_KEYS as config entries holding only the keys' digests."""
    value = os.environ.get(ENV_KEYS, "") if value is None else value
    out = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        tenant, sep, key = item.partition(":")
        if not sep or not tenant or not key:
            raise ValueError(f"{ENV_KEYS} entries must be tenant:key")  # never echo the key itself
        out.append({"tenant": tenant, "key_sha256": key_digest(key)})
    return out


@dataclass
class KeyEntry:
    tenant: str
    digest: bytes
    requests_per_minute: int | None
    tokens_per_minute: int | None


class ApiKeys:
    """Who a request is: None when keys are off (everyone is tenant "default"), else a key's entry."""

    def __init__(self, entries: list[KeyEntry]):
        self.entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def authenticate(self, authorization: str | None) -> KeyEntry | None:
        if not self.entries:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        presented = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for entry in self.entries:  # no early exit: every digest is compared
            if hmac.compare_digest(presented, entry.digest) and scheme.lower() == "bearer" and key:
                found = entry
        if found is None:
            raise AuthenticationError("invalid or missing API key (send Authorization: Bearer <key>)")
        return found


@dataclass
class _Window:
    events: deque = field(default_factory=deque)  # (time, request id, tokens charged)
    tokens: int = 0


class RateLimiter:
    """Sliding one-minute window of requests and tokens per key."""

    WINDOW_S = 60.0

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.windows: dict[str, _Window] = {}

    def _window(self, name: str, now: float) -> _Window:
        window = self.windows.setdefault(name, _Window())
        while window.events and window.events[0][0] <= now - self.WINDOW_S:
            window.tokens -= window.events.popleft()[2]
        return window

    def admit(self, name: str, request_id: str, tokens: int, rpm: int | None, tpm: int | None) -> None:
        """Charge one request and `tokens`, or raise RateLimitError (with the seconds until it would fit)."""
        now = self.clock()
        window = self._window(name, now)
        if rpm is not None and len(window.events) >= rpm:
            self._refuse(window, now, "requests", rpm, lambda w, i: len(w.events) - i - 1 < rpm)
        if tpm is not None and tokens > tpm:
            raise RateLimitError(f"this request needs {tokens} tokens; the key's limit is {tpm} tokens per minute "
                                 "(lower max_tokens)", int(self.WINDOW_S))
        if tpm is not None and window.tokens + tokens > tpm:
            spent = [0]

            def fits(w, i):
                spent[0] += w.events[i][2]
                return w.tokens - spent[0] + tokens <= tpm
            self._refuse(window, now, "tokens", tpm, fits)
        window.events.append((now, request_id, tokens))
        window.tokens += tokens

    def refund(self, name: str, request_id: str, tokens: int) -> None:
        """Give back tokens a request was charged but did not use."""
        window = self.windows.get(name)
        if window is None or tokens <= 0:
            return
        for i, (t, rid, charged) in enumerate(window.events):
            if rid == request_id:
                back = min(tokens, charged)
                window.events[i] = (t, rid, charged - back)
                window.tokens -= back
                return

    def _refuse(self, window: _Window, now: float, what: str, limit: int, fits) -> None:
        wait = self.WINDOW_S
        for i, event in enumerate(window.events):  # oldest first: when enough has left the window
            if fits(window, i):
                wait = event[0] + self.WINDOW_S - now
                break
        raise RateLimitError(f"rate limit of {limit} {what} per minute reached for this API key",
                             max(1, math.ceil(wait)))
