"""`ar`: plain decoding. No drafts: every iteration verifies just `cur` and emits the bonus token."""

from __future__ import annotations

from models.engine.drafters.base import Drafter


class ARDrafter(Drafter):
    name = "ar"
    speculative = False  # k is 0 whatever the request asks, so the loop never calls `propose`
