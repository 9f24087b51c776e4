"""The start-up self-check: does a verify row compute the same bits as the 1-token forward, here?

Greedy speculative decoding equals plain greedy decoding only if every forward the engine runs gives
a row (same token, same position, same prefix) the same logits and the same KV whatever else the
forward carries. models/engine/kernels.py makes that hold by construction on the CPU; other paths
(SDPA, library GEMMs, GPUs, a host without a C compiler) may or may not hold it. So each engine checks
on the host it runs on, at load: after a few contexts it decodes 16 tokens one forward each, then
compares every row of wider forwards with them (chains of 2..16 rows and the KV they write, a
tree-shaped verify whose rows skip a sibling, and up to 8 sequences of other lengths batched with
one chain, over 100 rows at once). If any differs, the engine serves `ar` for the speculative methods
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
    failures: list[dict] = field(default_factory=list)  # {"case", "width", "context", "row", "what": logits|kv}
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


def _decode_alone(engine, context: int, tokens: list[int]) -> list[torch.Tensor]:
    """Row 0 of cache row 0 holds `context` committed tokens: decode `tokens` one forward each (the
    plain 1-token forward), committing each. Their logits [V], one per token."""
    out = []
    for i, token in enumerate(tokens):
        engine.cache.commit(0, context + i)
        out.append(engine._forward([_Row(0)], [[token]])[0][0][0])
    return out


def _compare_tree(engine, context: int, chain: list[int], alone: list[torch.Tensor], compare) -> None:
    """A 4-row tree-shaped verify (row 3 skips its sibling row 1) against the rows decoded alone."""
    tree = ([0, 1, 1, 2], torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool))
    engine.cache.commit(0, context)
    rows = engine._forward([_Row(0)], [chain[:4]], [tree])[0][0]
    engine.cache.commit(0, context)
    _decode_alone(engine, context, chain[:1])  # row 0's KV back at its column, then row 2's branch alone
    branch = _decode_alone(engine, context + 1, chain[2:4])
    compare("tree", 4, context, list(rows), [alone[0], alone[1], *branch])


@torch.inference_mode()
def check_invariance(engine, widths: tuple[int, ...] = WIDTHS, contexts: tuple[int, ...] | None = None
                     ) -> InvarianceReport:
    """Run the comparisons on `engine` (idle: it uses its cache rows and leaves them empty)."""
    vocab = engine.model.config.vocab_size
    room = engine.max_context - max(widths) - 40
    contexts = contexts or tuple(c for c in (3, 70, 300) if c <= room) or (max(1, room),)
    report = InvarianceReport(True, engine.weights_dtype, "invariant" if engine.invariant_kernels else "library",
                              str(engine.device), list(widths), list(contexts), note=engine.kernels_unavailable)
    fillers = [(11 * j + 5) % vocab for j in range(max(widths))]

    def compare(case: str, width: int, context: int, got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
        for row, (a, b) in enumerate(zip(got, want, strict=True)):
            if not torch.equal(a, b):
                report.failures.append({"case": case, "width": width, "context": context, "row": row,
                                        "what": "logits"})
                return

    for context in contexts:
        prompt = [(7 * i + 3) % vocab for i in range(context)]
        chain = [(7 * context + 3) % vocab, *fillers[: max(widths) - 1]]
        _fill(engine, 0, prompt)
        alone = _decode_alone(engine, context, chain)  # the reference: every row decoded on its own
        kv = [_kv(engine, 0, context + t) for t in range(len(chain))]
        for width in widths:  # chains: every row, and the KV each row writes
            engine.cache.commit(0, context)
            rows = engine._forward([_Row(0)], [chain[:width]])[0][0]
            compare("chain", width, context, list(rows), alone[:width])
            if any(not torch.equal(a, b) for t in range(width) for a, b in zip(_kv(engine, 0, context + t), kv[t],
                                                                                 strict=True)):
                report.failures.append({"case": "chain", "width": width, "context": context, "what": "kv"})
        if max(widths) >= 4:  # a tree: rows 1 and 2 are siblings after row 0, row 3 follows row 2 (not row 1)
            _compare_tree(engine, context, chain, alone, compare)
        if engine.cache.slots > 1:  # batched: beside a longer sequence and copies of itself, many rows at once
            # at the first context up to 6 copies (over 100 rows in all, so that ATen's per-thread chunks
            # end inside some row), later the longer neighbour alone; every copy's rows are compared
            copies = list(range(2, min(engine.cache.slots, 8))) if context == contexts[0] else []
            _fill(engine, 1, [(5 * i + 1) % vocab for i in range(context + 37)])
            for slot in [*copies, 0]:
                _fill(engine, slot, prompt)
            width = max(widths)
            slots = [1, *copies, 0]
            batch = engine._forward([_Row(s) for s in slots], [fillers[:width]] + [chain[:width]] * (len(slots) - 1))
            for logits in batch[0][1:]:
                compare("batch", len(slots) * width, context, list(logits), alone[:width])
    for slot in range(engine.cache.slots):
        engine.cache.commit(slot, 0)
    report.lossless = not report.failures
    return report
