"""Prefix-affinity request routing for the decoder deployment (a Ray Serve `RequestRouter`).

Requests whose prompts share their first tokens carry the same `affinity_key` (the router computes
it from the token ids); rendezvous hashing over the live replica ids sends them to the same replica,
whose in-replica prefix cache then already holds their prefix KV. A replica whose known queue is at
`overload_fraction` of its `max_ongoing_requests` loses its preference: the request goes to the
least-loaded of the others (Serve's own queue-length probing picks within a rank). Rendezvous
hashing moves only the keys of a replica that appears or disappears, so autoscaling keeps most
affinities. Ray's own `PrefixCacheAffinityRouter` needs Ray LLM's request format and text prompts;
this one keys on the same token blocks the prefix cache uses.
"""

from __future__ import annotations

import hashlib
import struct

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

AFFINITY_TOKENS = 32  # two 16-token cache blocks: prompts sharing these share cached KV


def affinity_key(prompt_ids: list[int], tokens: int = AFFINITY_TOKENS) -> str:
    head = prompt_ids[:tokens]
    return hashlib.sha256(struct.pack(f"<{len(head)}i", *head)).hexdigest()[:32]


def _score(key: str, replica: RunningReplica) -> bytes:
    return hashlib.sha256(f"{key}/{replica.replica_id.unique_id}".encode()).digest()


class PrefixAffinityRouter(RequestRouter):
    """No FIFOMixin: with it Serve hands the replica chosen for one request to the oldest pending one,
    which scatters a burst of requests regardless of their keys; without it, each request goes where
    it was routed (Serve's default exact matching by request id)."""

    def initialize_state(self, overload_fraction: float = 0.75, **kwargs):
        self.overload_fraction = overload_fraction

    def _key(self, pending_request: PendingRequest | None) -> str | None:
        if pending_request is None or not pending_request.args:
            return None
        request = pending_request.args[0]
        return request.get("affinity_key") if isinstance(request, dict) else None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        key = self._key(pending_request)
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: _score(key, r), reverse=True)
        preferred, others = ranked[0], ranked[1:]
        queue_len = self.replica_queue_len_cache.get(preferred.replica_id)
        if queue_len is not None and queue_len >= self.overload_fraction * preferred.max_ongoing_requests:
            return [others, [preferred]]
        return [[preferred], others]
