"""The start-up self-check: does a verify row compute the same bits as the 1-token forward, here?

Greedy speculative decoding equals plain greedy decoding only if every forward the engine runs gives
a row (same token, same position, same prefix) the same logits and the same KV whatever else the
forward carries. models/engine/kernels.py makes that hold by construction on the CPU; other paths
(SDPA, library GEMMs, GPUs, a host without a C compiler) may or may not hold it. So each engine checks
on the host it runs on, at load: after a few contexts it compares the 1-token forward of a token with
row 0 of wider forwards (chains of 2..16 rows, a tree-shaped verify, two sequences batched), logits
and the KV written for that row. If any differs, the engine serves `ar` for the speculative methods
(models/engine/engine.py) and the report says which width and dtype failed; services show it in
`/ready` and the `sdsat_speculation_lossless` gauge.

    report = check_invariance(engine)   # InvarianceReport; report.lossless, report.failures
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

WIDTHS = (2, 4, 8, 16)


@dataclass
class InvarianceReport:
    lossless: bool
    dtype: str  # what the weights are served as ("int4", "float32", ...)
    kernels: str  # "invariant" (models/engine/kernels.py) or "library" (SDPA and library GEMMs)
    device: str
    widths: list[int]
    contexts: list[int]
    failures: list[dict] = field(default_factory=list)  # {"case", "width", "context", "what": logits|kv}
    note: str | None = None  # e.g. why the invariant kernels could not be used

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        if self.lossless:
            return f"verify rows equal the 1-token forward bit for bit ({self.dtype}, {self.kernels} kernels)"
        first = self.failures[0]
        return (f"{self.dtype} with {self.kernels} kernels on {self.device}: a {first['case']} forward of width "
                f"{first['width']} at context {first['context']} differs from the 1-token forward in its "
                f"{first['what']} ({len(self.failures)} failing cases); speculative methods serve ar")


class _Row:  # what Engine._forward reads of a sequence
    def __init__(self, slot: int):
        self.slot = slot


def _kv(engine, slot: int, column: int) -> list[torch.Tensor]:
    return [buf[slot, :, column].clone() for buf in engine.cache.keys + engine.cache.values]


def _fill(engine, slot: int, tokens: list[int]) -> None:
    """Prefill `tokens` into cache row `slot` (in chunks of the engine's prefill size)."""
    engine.cache.commit(slot, 0)
    for i in range(0, len(tokens), engine.config.prefill_chunk):
        chunk = tokens[i : i + engine.config.prefill_chunk]
        engine._forward([_Row(slot)], [chunk], last_only=True)
        engine.cache.commit(slot, i + len(chunk))


@torch.inference_mode()
def check_invariance(engine, widths: tuple[int, ...] = WIDTHS, contexts: tuple[int, ...] | None = None
                     ) -> InvarianceReport:
    """Run the comparisons on `engine` (idle: it uses cache rows 0 and 1 and leaves them empty)."""
    vocab = engine.model.config.vocab_size
    room = engine.max_context - max(widths) - 40
    contexts = contexts or tuple(c for c in (3, 70, 300) if c <= room) or (max(1, room),)
    report = InvarianceReport(True, engine.weights_dtype, "invariant" if engine.invariant_kernels else "library",
                              str(engine.device), list(widths), list(contexts), note=engine.kernels_unavailable)
    for context in contexts:
        tokens = [(7 * i + 3) % vocab for i in range(context + 1)]
        prompt, token = tokens[:-1], tokens[-1]
        _fill(engine, 0, prompt)
        one = engine._forward([_Row(0)], [[token]])[0][0][0]  # [V]
        kv = _kv(engine, 0, context)
        fillers = [(11 * j + 5) % vocab for j in range(max(widths))]
        cases = [("chain", w, [_Row(0)], [[token, *fillers[: w - 1]]], None) for w in widths]
        tree = ([0, 1, 1, 2], torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool))
        cases.append(("tree", 4, [_Row(0)], [[token, *fillers[:3]]], [tree]))
        if engine.cache.slots > 1:
            _fill(engine, 1, [(5 * i + 1) % vocab for i in range(context + 37)])  # a longer neighbour
            cases.append(("batch", 4, [_Row(1), _Row(0)], [fillers[:4], [token, *fillers[:3]]], None))
        for case, width, rows, chunks, layouts in cases:
            engine.cache.commit(0, context)
            logits = engine._forward(rows, chunks, layouts)[0][[r.slot for r in rows].index(0)][0]
            same_kv = all(torch.equal(a, b) for a, b in zip(_kv(engine, 0, context), kv, strict=True))
            for what, same in (("logits", torch.equal(logits, one)), ("kv", same_kv)):
                if not same:
                    report.failures.append({"case": case, "width": width, "context": context, "what": what})
    engine.cache.commit(0, 0)
    engine.cache.commit(1 if engine.cache.slots > 1 else 0, 0)
    report.lossless = not report.failures
    return report
