"""Drafters: where draft tokens come from. The decoding loop (models/engine/engine.py) is the same
for all of them; each method is one `Drafter` (models/engine/drafters/base.py), in one file:

- `ar` (ar.py): no drafts, plain decoding.
- `prompt-lookup` (prompt_lookup.py): the continuation of the latest earlier occurrence of
  the context's last n-gram (training-free; a point-mass proposal).
- `sdsat` (sdsat.py, two-step, as released): a draft forward of `[cur, S_1..S_k]` gives the
  exact next token and k SAT drafts; the verify forward checks them.
- `sdsat-fused` (sdsat_fused.py, method doc section 6): the verify forward of
  `[cur, d_1..d_k]` also carries, for every acceptance point j, a SAT block that sees the chain up
  to j; the block at j = accepted holds the next iteration's drafts, so each iteration costs one
  forward.
- `mlp` (mlp.py): an MLP speculator chain from the base model's hidden state.

This module is the registry: method name -> drafter instance. The engine looks a request's method
up here and nowhere compares method names. A new method is a new file with a `Drafter` subclass,
listed below (or added with `register_drafter`); requests name it once it is also among the
accepted method names (models/engine/config.py `METHODS`).
"""

from __future__ import annotations

from models.engine.drafters.ar import ARDrafter
from models.engine.drafters.base import Drafter
from models.engine.drafters.mlp import MLPDrafter
from models.engine.drafters.prompt_lookup import PromptLookupDrafter, prompt_lookup
from models.engine.drafters.sdsat import SdsatDrafter
from models.engine.drafters.sdsat_fused import FusedSdsatDrafter, fused_block_rows, fused_layout
from models.errors import InvalidRequestError

__all__ = ["DRAFTERS", "Drafter", "drafter_for", "fused_block_rows", "fused_layout", "prompt_lookup",
           "register_drafter"]

# Registry order is also the order in which drafters run their proposals within an iteration.
DRAFTERS: dict[str, Drafter] = {
    d.name: d for d in (ARDrafter(), PromptLookupDrafter(), SdsatDrafter(), FusedSdsatDrafter(), MLPDrafter())
}


def register_drafter(drafter: Drafter) -> Drafter:
    """Add (or replace) the drafter for `drafter.name`."""
    if not drafter.name:
        raise ValueError("a drafter needs a name")
    DRAFTERS[drafter.name] = drafter
    return drafter


def drafter_for(method: str) -> Drafter:
    try:
        return DRAFTERS[method]
    except KeyError:
        raise InvalidRequestError(f"no drafter is registered for method {method!r}") from None
