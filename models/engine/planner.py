"""`auto`: the decoding method and draft length with the most expected tokens per second, on this host,
at the batch size the engine runs (issue [P] deliverable 3).

Two measurements decide it, both taken by the engine itself:

- cost: f(n), the time of one verify forward of n rows (one sequence, a `CONTEXT`-token context), measured
  once on this host (`Planner.calibrate`, on the first `auto` request; about a second), for standard rows
  and for rows that are SAT tokens (which carry the adapter's LoRA). A batch of B sequences of w rows each
  costs about f(B * w): the weights are read once per forward whatever its rows, and each row attends to
  its own sequence's keys in either case.
- acceptance: a_m[i], the share of method m's iterations whose draft i was accepted. It starts from the
  model's manifests (held-out acceptance measured when the adapter and the speculator were trained, worth
  `PRIOR_ITERATIONS` iterations), and every finished greedy request adds its own counts. Prompt lookup drafts without a
  forward, so every finished greedy request, whatever its method, is also replayed through lookup at each
  k (`lookup_replay`): greedy output does not depend on the method, so the replay is what lookup would
  have accepted on it, the data users actually send.

Per candidate, tokens emitted per iteration and rows per sequence (A(k) = a[0] + ... + a[k-1]):

    ar               1              1 row
    prompt-lookup k  1 + A(k)       1 + d(k) rows (d(k): drafts lookup found, per iteration)
    sdsat k          2 + A(k)       k + 1 rows with k SAT rows, then a k + 1 row verify
    sdsat-fused k    1 + A(k)       (k + 1) + (k + 1) k rows, (k + 1) k of them SAT rows
    mlp k            1 + A(k)       k speculator stages (timed at calibration), then k + 1 rows

The model ranks; the clock decides. The cost model left out work it cannot see (a drafter's own Python, the
interplay of the kernels' caches with wider rows) and was too optimistic on real hosts: it expected 1.44x over
ar where the method it chose ran at 0.93x (docs/performance.md). So one sequence at a time (the latency case),
`auto` times what it runs: each step of a lone decoding sequence adds its wall time and emitted tokens to its
(method, k) (`measure`; k = 0 is ar whatever the method). Trials: every (method, k) the model expects at
`TRIAL_PRUNE` of ar's rate or better is run for `auto_trial_iterations` iterations (methods in the model's
order, a request's draft lengths taking turns within it; one far below the best measured after
`TRIAL_EARLY` iterations stops early), then the fastest measured (method, k) serves. Batches of several
sequences, and a frozen planner without trials, use the model.

A request asking for `auto` gets, at admission, the method with the best rate at the batch size it joins;
then each iteration its k is the best for that method at the batch size of that iteration (0 = plain
decoding, where no draft length beats ar). Every method is exact, so `auto` is exact too. Each emitted
token also costs the engine's time outside the forward (accept, emit, detokenize), as the engine measures
it while it runs.
"""

from __future__ import annotations

import bisect
import json
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from models.engine.drafters import drafter_for

if TYPE_CHECKING:
    from models.engine.sequence import Sequence

log = logging.getLogger(__name__)

CANDIDATES = ("prompt-lookup", "sdsat", "sdsat-fused", "mlp")
SEEN = ("sdsat", "sdsat-fused", "mlp")  # methods whose acceptance only their own requests show
ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)  # forward widths calibrate times (past 128: linear)
SAT_ROWS = 16  # SAT rows are timed up to this width; wider, they cost what they cost there, relative to standard
WIDE = 64  # widths past this are timed in one pass only (a 128-row int4 forward takes about 0.2 s on 2 vCPUs)
CONTEXT = 256  # committed tokens the timed forwards attend to
REPEATS = 3  # timed passes over the widths (after one untimed); the median counts
PRIOR_ITERATIONS = 64  # weight of the manifest's held-out acceptance against what requests show
LOOKUP_MAX_K = 8
TRIAL_PRUNE = 0.75  # (method, k) the model expects below this share of ar's rate are not tried
TRIAL_EARLY = 8  # iterations after which a (method, k) measured below TRIAL_DROP of the best stops being tried
TRIAL_DROP = 0.8
TRIAL_CLIP = 4.0  # one step counts at most this many times its (method, k)'s mean so far (a spell of the shared
#                   machine, a collector pause, must not sink a whole trial)


@dataclass
class Acceptance:
    """Iterations, drafts proposed, and per draft position: iterations that drafted it (`offered`) and
    iterations that accepted it."""

    iterations: float = 0.0
    drafted: float = 0.0
    accepted: list[float] = field(default_factory=list)
    offered: list[float] = field(default_factory=list)

    def add(self, iterations: float, drafted: float, accepted: list[float], offered: list[float]) -> None:
        self.iterations += iterations
        self.drafted += drafted
        for mine, theirs in ((self.accepted, accepted), (self.offered, offered)):
            mine.extend([0.0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    def rate(self, i: int) -> float:
        """a[i]: the share of iterations that drafted position i and accepted it (0 where none drafted it).
        Iterations that drafted less (k = 0 under load, the end of a request) say nothing about position i."""
        if i >= len(self.offered) or not self.offered[i]:
            return 0.0
        return self.accepted[i] / self.offered[i]

    def expected(self, k: int) -> float:
        """Drafts accepted per iteration that drafts k."""
        return sum(self.rate(i) for i in range(k))

    def per_iteration(self) -> float:
        """Drafts accepted per iteration, iterations that found nothing to draft included (prompt lookup)."""
        return sum(self.accepted) / self.iterations if self.iterations else 0.0


@dataclass
class Trial:
    """Measured steps of one (method, k) with one sequence decoding: wall seconds and tokens emitted."""

    iterations: int = 0
    seconds: float = 0.0
    tokens: int = 0

    def add(self, seconds: float, tokens: int) -> None:
        if self.iterations >= 4:
            seconds = min(seconds, TRIAL_CLIP * self.seconds / self.iterations)
        self.iterations += 1
        self.seconds += seconds
        self.tokens += tokens

    @property
    def rate(self) -> float:
        """Tokens per second."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


AR = ("ar", 0)


@dataclass(frozen=True)
class Choice:
    method: str
    k: int
    rate: float  # expected tokens per unit of time, in units of a 1-row forward's time, for the whole batch
    speedup: float  # rate / ar's rate at the same batch size
    source: str = "model"  # model: the cost model; trial: being timed; measured: the fastest (method, k) timed


def lookup_replay(context: list[int], output: list[int], ngram: int, max_k: int = LOOKUP_MAX_K,
                  limit: int | None = None) -> dict[int, tuple[int, int, list[int], list[int]]]:
    """What prompt lookup would have done on a finished greedy request, for every k in 1..max_k:
    k -> (iterations, drafts proposed, accepted per position, drafted per position). `context` is the
    prompt, `output` every emitted token, `limit` the most tokens the request could emit (default: as many
    as it did); the first output token comes from the prefill, so iterations start after it. Exact for a
    request that ended by its length; for one that stopped at EOS or a stop string, its last iteration may
    differ (the engine may have drafted past the stop). One pass over the tokens: an index from each
    n-gram to its latest start, grown as the context grows (the engine's `prompt_lookup` at every step)."""
    tokens = list(context) + list(output)
    limit = len(output) if limit is None else limit
    index: list[dict[tuple, int]] = [{} for _ in range(ngram + 1)]
    proposals, indexed = [[] for _ in output], -1  # indexed: windows ending at or before this index are known
    for pos in range(1, len(output)):
        end = len(context) + pos  # the context at this iteration is tokens[:end]
        while indexed < end - 2:  # a window must have a successor inside the context
            indexed += 1
            for n in range(1, ngram + 1):
                if indexed - n + 1 >= 0:
                    index[n][tuple(tokens[indexed - n + 1 : indexed + 1])] = indexed - n + 1
        for n in range(min(ngram, end - 1), 0, -1):  # the longest n-gram with an earlier occurrence
            start = index[n].get(tuple(tokens[end - n : end]))
            if start is not None:
                proposals[pos] = tokens[start + n : min(start + n + max_k, end)]
                break
    out = {}
    for k in range(1, max_k + 1):
        pos, iterations, drafted, accepted, offered = 1, 0, 0, [0] * k, [0] * k
        while pos < len(output):
            drafts = proposals[pos][: max(0, min(k, limit - pos - 1))]
            n = 0
            while n < len(drafts) and pos + n < len(output) and drafts[n] == output[pos + n]:
                accepted[n] += 1
                n += 1
            for i in range(len(drafts)):
                offered[i] += 1
            iterations += 1
            drafted += len(drafts)
            pos += n + 1
        out[k] = (iterations, drafted, accepted, offered)
    return out


class Planner:
    def __init__(self, engine, priors: dict[str, list[float]] | None = None):
        self.engine = engine
        self.costs: dict[str, list[float]] | None = None  # "standard" / "sat" -> seconds per forward, at widths
        self.widths: list[int] = []
        self.draft_step: dict[int, float] = {}  # mlp: seconds of one speculator stage for B sequences
        self.priors = dict(priors or {})
        self.learning = True  # False: finished requests no longer change the acceptance (benchmarks freeze it)
        self._calibrated_compiled = False  # whether the costs were timed on compiled graphs
        self._lock = threading.RLock()  # the engine's thread learns and plans; /ready reads from another
        self._table: dict[int, tuple[Choice, dict[str, Choice]]] = {}
        self._arms: dict[str, list[tuple[str, int]]] = {}  # method -> the (method, k) it tries, ar included
        self.forget()

    @property
    def trial_iterations(self) -> int:
        return self.engine.config.auto_trial_iterations

    def forget(self) -> None:
        """Drop what requests showed: acceptance is the manifests' prior again, and the time outside the
        forward is measured afresh (the forward costs stay)."""
        self.engine.outside_seconds, self.engine.decoded_tokens = 0.0, 0
        with self._lock:
            self.seen: dict[str, Acceptance] = {m: Acceptance() for m in SEEN}
            self.lookup: dict[int, Acceptance] = {k: Acceptance() for k in range(1, LOOKUP_MAX_K + 1)}
            for method, by_position in self.priors.items():
                if method in self.seen:
                    n = PRIOR_ITERATIONS
                    self.seen[method].add(n, n * len(by_position), [n * a for a in by_position],
                                          [n] * len(by_position))
            self.trials: dict[tuple[str, int], Trial] = {}
            self._table.clear()
            self._arms.clear()

    # ---- what the engine tells it -----------------------------------------------------------------
    def observe(self, seq: Sequence) -> None:
        """A finished request's acceptance: its own method's counts, and lookup's replay. Only once `auto`
        is in use on this engine (its costs measured): before that nothing here is read."""
        if self.costs is None or not self.learning or not seq.params.greedy or seq.finish_reason == "cancelled":
            return
        s = seq.stats
        replay = None
        if len(seq.output_ids) > 1:
            limit = min(seq.params.max_new_tokens, seq.max_context - len(seq.prompt_ids))
            replay = lookup_replay(seq.prompt_ids, seq.output_ids, self.engine.config.prompt_lookup_ngram,
                                   limit=limit)
        with self._lock:
            if seq.method in self.seen and s.iterations:
                self.seen[seq.method].add(s.iterations, s.drafted, list(s.accepted_per_position),
                                          list(s.drafted_per_position))
            for k, (iterations, drafted, accepted, offered) in (replay or {}).items():
                self.lookup[k].add(iterations, drafted, accepted, offered)
            self._table.clear()  # the arms stay: re-deriving them as acceptance moves reopened trials for ever

    def measure(self, method: str, k: int, seconds: float, tokens: int) -> None:
        """One engine step with one sequence decoding, by `method` with draft length `k` (0: plain)."""
        if not self.learning or not self.trial_iterations:
            return
        with self._lock:
            self.trials.setdefault((method, k) if k else AR, Trial()).add(seconds, tokens)

    def calibrate(self, slot: int) -> None:
        """Time forwards of every width in ROWS over a CONTEXT-token context in the free cache row `slot`,
        standard rows and SAT rows (and one MLP speculator stage); the row is left empty."""
        eng = self.engine
        began, forward0 = time.perf_counter(), eng.forward_seconds
        cache = eng.cache
        context = min(CONTEXT, eng.max_context // 2)
        widths = [n for n in ROWS if context + n <= eng.max_context]
        holder = _Slot(slot)
        vocab = eng.model.config.vocab_size
        filler = [(17 + 31 * i) % vocab for i in range(context + max(widths))]
        sat_ids = list(eng.sat.ids) if eng.sat is not None and eng.sat.ids else None
        costs: dict[str, list[float]] = {"standard": [], "sat": []}
        cache.commit(slot, 0)
        try:
            eng._forward([holder], [filler[:context]], last_only=True)
            cache.commit(slot, context)
            chunks = []
            for n in widths:
                chunks.append(("standard", n, filler[context : context + n]))
                if sat_ids is not None and n <= SAT_ROWS:
                    chunks.append(("sat", n, [filler[context]] + [sat_ids[i % len(sat_ids)] for i in range(n - 1)]))
            times: dict[tuple[str, int], list[float]] = {(kind, n): [] for kind, n, _ in chunks}
            for rep in range(REPEATS + 1):  # every width once per pass (the first pass warms up, untimed), so a
                for kind, n, chunk in chunks:  # slow spell of the shared machine hits all widths alike
                    if n > WIDE and rep < REPEATS:
                        continue
                    t0 = time.perf_counter()
                    eng._forward([holder], [chunk])
                    if rep:
                        times[(kind, n)].append(time.perf_counter() - t0)
                    cache.commit(slot, context)
            for kind, n, _ in chunks:
                costs[kind].append(statistics.median(times[(kind, n)]))
            for series in costs.values():  # a wider forward never costs less than a narrower one
                for i in range(1, len(series)):
                    series[i] = max(series[i], series[i - 1])
            if costs["sat"]:  # past SAT_ROWS: the widest timed SAT-row cost ratio
                ratio = costs["sat"][-1] / costs["standard"][len(costs["sat"]) - 1]
                costs["sat"] += [c * ratio for c in costs["standard"][len(costs["sat"]) :]]
            draft_step = {b: self._time_draft_step(b) for b in sorted({1, eng.config.max_batch})} \
                if eng.speculator is not None else {}
        finally:
            cache.commit(slot, 0)
            eng.forward_seconds = forward0  # the calibration is not the engine's decoding work
            eng.calibration_seconds += time.perf_counter() - began
        with self._lock:
            self.widths = widths
            self.costs = {kind: c for kind, c in costs.items() if c}
            self.draft_step = draft_step
            self._calibrated_compiled = eng.compiled is not None and eng.compiled.active
            self._table.clear()
            self._arms.clear()

    def _time_draft_step(self, batch: int) -> float:
        """Seconds of one MLP speculator stage for `batch` sequences, as the `mlp` drafter runs it (the
        stage, its logits to the CPU, the argmax)."""
        import functools

        import torch

        from models.engine.drafters.mlp import _linear

        eng = self.engine
        spec, linear = eng.speculator, functools.partial(_linear, invariant=eng.invariant_kernels)
        state = torch.zeros(batch, eng.model.config.hidden_size, dtype=eng.dtype, device=eng.device)
        tokens = torch.zeros(batch, dtype=torch.long, device=eng.device)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(REPEATS):
                t0 = time.perf_counter()
                _, logits = spec.step(0, state, tokens, linear)
                logits.float().cpu().argmax(-1)
                best = min(best, time.perf_counter() - t0)
        return best

    # ---- the model ----------------------------------------------------------------------------------
    def f(self, rows: float, kind: str = "standard") -> float:
        """Seconds of one forward of `rows` rows (linear between timed widths, and past the widest)."""
        xs, ys = self.widths, self.costs[kind]
        if len(xs) == 1:
            return ys[0] * max(1.0, rows)
        rows = max(1.0, rows)
        i = min(max(bisect.bisect_left(xs, rows), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)

    def mixed(self, rows: float, sat_rows: float) -> float:
        """A forward of `rows` rows of which `sat_rows` are SAT rows."""
        if "sat" not in self.costs or rows <= 1:
            return self.f(rows)
        standard, sat = self.f(rows), self.f(rows, "sat")  # the "sat" timing has rows - 1 SAT rows
        return standard + (sat - standard) * sat_rows / (rows - 1)

    def draft_cost(self, batch: int, k: int) -> float:
        """mlp: k speculator stages for `batch` sequences (linear between the timed batch sizes)."""
        (b0, t0), (b1, t1) = min(self.draft_step.items()), max(self.draft_step.items())
        per_stage = t0 if b1 == b0 else t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        return k * per_stage

    def candidates(self) -> list[str]:
        """Methods this engine can run losslessly for a request now."""
        eng = self.engine
        return [m for m in CANDIDATES
                if (drafter := drafter_for(m)).unavailable(eng) is None and eng.speculates_losslessly(drafter)]

    def overhead(self) -> float:
        """Seconds of engine work outside the forward per emitted token, as the engine has measured it so far
        (accepting, emitting, detokenizing, drafting without a forward); 0 before any step. Counted per token,
        not per iteration: speculation is not credited with spreading it over several tokens, since most of it
        (the argmax over each verified row, emitting, detokenizing) grows with the tokens."""
        eng = self.engine
        return max(0.0, eng.outside_seconds) / eng.decoded_tokens if eng.decoded_tokens else 0.0

    def rate(self, method: str, k: int, batch: int) -> float:
        """Expected tokens per unit of time (a 1-row forward = 1) for `batch` sequences decoding with it.
        A batched forward pads every sequence to the widest chunk, so B sequences of up to w rows cost f(B w);
        each emitted token also costs the engine's time outside the forward (`overhead`)."""
        unit, per_token = self.f(1), self.overhead()

        def per_time(tokens: float, forward_cost: float) -> float:  # `tokens` per sequence and iteration
            return batch * tokens * unit / (forward_cost + batch * tokens * per_token)

        if method == "ar" or k == 0:
            return per_time(1.0, self.f(batch))
        if method == "prompt-lookup":  # replayed at this k: iterations without a match draft nothing
            seen = self.lookup[k]
            matched = seen.offered[0] / seen.iterations if seen.iterations and seen.offered else 0.0
            drafts = seen.drafted / seen.offered[0] if seen.offered and seen.offered[0] else 0.0
            width = 1 + drafts * (1 - (1 - matched) ** batch)  # the widest chunk: one match pads them all
            return per_time(1 + seen.per_iteration(), self.f(batch * width))
        seen = self.seen[method]
        if method == "sdsat":  # two forwards an iteration
            return per_time(2 + seen.expected(k), self.mixed(batch * (k + 1), batch * k) + self.f(batch * (k + 1)))
        if method == "sdsat-fused":
            rows = (k + 1) + (k + 1) * k
            return per_time(1 + seen.expected(k), self.mixed(batch * rows, batch * (k + 1) * k))
        if method == "mlp":  # its stages, then a plain k + 1 row verify
            return per_time(1 + seen.expected(k), self.draft_cost(batch, k) + self.f(batch * (k + 1)))
        raise ValueError(method)

    def k_range(self, method: str) -> range:
        eng = self.engine
        top = min(eng.config.max_k, eng.k_cap)
        if method == "prompt-lookup":
            return range(1, min(top, LOOKUP_MAX_K) + 1)
        if method == "mlp":
            return range(1, min(top, eng.speculator.n_predict if eng.speculator is not None else 0) + 1)
        return range(1, min(top, eng.sat.k_train if eng.sat is not None else 0) + 1)

    def table(self, batch: int) -> tuple[Choice, dict[str, Choice]]:
        """The best choice at this batch size, and each candidate method's best k there."""
        with self._lock:
            if batch in self._table:
                return self._table[batch]
            ar_rate = self.rate("ar", 0, batch)
            per_method = {"ar": Choice("ar", 0, ar_rate, 1.0)}
            for method in self.candidates():
                scored = [(self.rate(method, k, batch), k) for k in self.k_range(method)]
                rate, k = max(scored, default=(0.0, 0), key=lambda x: (x[0], -x[1]))
                if k and rate > ar_rate:
                    per_method[method] = Choice(method, k, rate, rate / ar_rate)
                else:  # no draft length beats plain decoding: the method decodes plainly at this size
                    per_method[method] = Choice(method, 0, ar_rate, 1.0)
            best = max(per_method.values(), key=lambda c: (c.rate, c.method == "ar"))
            self._table[batch] = entry = (best, per_method)
            return entry

    # ---- trials: what one sequence at a time measured ---------------------------------------------------
    def arms(self, method: str, cap: int | None = None) -> list[tuple[str, int]]:
        """The (method, k) one sequence of `method` tries: ar, and each k the model expects at TRIAL_PRUNE of ar's
        rate or better, up to `cap` (the request's own k) and what the load policy allows one sequence."""
        with self._lock:
            if method not in self._arms:
                floor = TRIAL_PRUNE * self.rate("ar", 0, 1)
                top = self.engine.config.k_under_load(self.engine.config.max_k, 1)
                ks = [k for k in self.k_range(method) if k <= top] if method != "ar" else []
                self._arms[method] = [AR] + [(method, k) for k in ks if self.rate(method, k, 1) >= floor]
            return [arm for arm in self._arms[method] if cap is None or arm[1] <= cap]

    def _open(self, arm: tuple[str, int], best: float) -> bool:
        """Still to be tried: fewer than `trial_iterations` steps, unless TRIAL_EARLY steps showed it far below
        `best`. ar always runs its whole trial: every choice is measured against it."""
        trial = self.trials.get(arm) or Trial()
        if trial.iterations >= self.trial_iterations:
            return False
        return arm == AR or not (trial.iterations >= TRIAL_EARLY and best and trial.rate < TRIAL_DROP * best)

    def _best_rate(self) -> float:
        """The best rate among (method, k) with at least TRIAL_EARLY steps: what an early stop compares with
        (draft lengths take turns, so none has finished its trial when the others reach TRIAL_EARLY)."""
        least = min(TRIAL_EARLY, self.trial_iterations)
        return max((t.rate for t in self.trials.values() if t.iterations >= least), default=0.0)

    def _fastest(self, arms: list[tuple[str, int]]) -> tuple[str, int] | None:
        """The fastest of `arms` that finished its trial (ar on a tie), or None before ar has finished its own."""
        tried = [arm for arm in arms
                 if (trial := self.trials.get(arm)) is not None and trial.iterations >= self.trial_iterations]
        if AR not in tried:
            return None
        return max(tried, key=lambda arm: (self.trials[arm].rate, arm == AR))

    def _measured(self, cap: int | None = None, learning: bool | None = None) -> Choice | None:
        """One sequence: a method still on trial (while learning), else the fastest (method, k) tried among
        every method's arms, else None (then the model decides)."""
        with self._lock:
            methods = ["ar", *self.candidates()]
            if self.learning if learning is None else learning:
                best = self._best_rate()
                model = self.table(1)[1]  # try the methods the model rates highest first
                for method in sorted(methods, key=lambda m: -model[m].rate if m in model else 0.0):
                    arms = self.arms(method, cap)
                    if any(self._open(arm, best) for arm in arms):
                        return Choice(method, max(k for _, k in arms), 0.0, 0.0, "trial")
            fastest = self._fastest(list(dict.fromkeys(arm for m in methods for arm in self.arms(m, cap))))
            if fastest is None:
                return None
            rate = self.trials[fastest].rate
            return Choice(*fastest, rate, rate / self.trials[AR].rate, "measured")

    def _measured_k(self, method: str, cap: int | None) -> int | None:
        """One sequence of `method`: the draft length on trial with the fewest steps so far (learning), else the
        fastest tried, else None."""
        with self._lock:
            arms = self.arms(method, cap)
            if self.learning:
                best = self._best_rate()
                waiting = [arm for arm in arms if self._open(arm, best)]
                if waiting:
                    return min(waiting, key=lambda arm: self.trials[arm].iterations if arm in self.trials else 0)[1]
            fastest = self._fastest(arms)
            return None if fastest is None else fastest[1]

    def settled(self) -> bool:
        """Whether the trials are over: every arm tried or stopped, and a measured choice stands."""
        choice = self._measured(learning=True)
        return choice is not None and choice.source == "measured"

    # ---- what the engine asks -----------------------------------------------------------------------
    def choose(self, batch: int, slot: int, cap: int | None = None) -> Choice:
        """The method for a request joining a batch of `batch` sequences, drafting at most `cap` (calibrates
        first if needed, in the free cache row `slot`, and again once a compiled forward has taken over from
        eager ops: the trials then start over). Alone, it is what the trials say once they say anything."""
        compiled = self.engine.compiled
        if self.costs is None or (compiled is not None and compiled.active != self._calibrated_compiled):
            if self.costs is not None:
                with self._lock:
                    self.trials = {}
            self.calibrate(slot)
        if batch <= 1 and self.trial_iterations and (choice := self._measured(cap)) is not None:
            return choice
        return self.table(max(1, batch))[0]

    def k_for(self, method: str, batch: int, cap: int | None = None) -> int:
        """This iteration's draft length for a sequence of `method` (its own k `cap`) in a batch of `batch`."""
        if batch <= 1 and self.trial_iterations and self.costs is not None \
                and (k := self._measured_k(method, cap)) is not None:
            return k
        return self.table(max(1, batch))[1].get(method, Choice(method, 0, 0.0, 1.0)).k

    def report(self, batches: tuple[int, ...] = (1, 2, 4, 8, 16)) -> dict:
        """What auto would choose at each batch size and why (for `/ready` and `sdsat bench`)."""
        with self._lock:
            if self.costs is None:
                return {"calibrated": False, "priors": self.priors}
            one = self.costs["standard"][0]
            out = {"calibrated": True, "host_forward_ms": round(one * 1e3, 3),
                   "outside_forward_ms_per_token": round(self.overhead() * 1e3, 3),
                   "r": {str(n): round(c / one, 3) for n, c in zip(self.widths, self.costs["standard"], strict=True)},
                   "acceptance_by_position": {
                       **{m: [round(a.rate(i), 3) for i in range(len(a.offered))] for m, a in self.seen.items()},
                       "prompt-lookup": [round(self.lookup[LOOKUP_MAX_K].rate(i), 3) for i in range(LOOKUP_MAX_K)]},
                   "lookup_accepted_per_iteration": {str(k): round(a.per_iteration(), 3)
                                                     for k, a in self.lookup.items()},
                   "observed_iterations": {
                       **{m: round(a.iterations - (PRIOR_ITERATIONS if m in self.priors else 0))
                          for m, a in self.seen.items()},
                       "prompt-lookup": int(self.lookup[1].iterations)},
                   "priors": self.priors}
            if self.trial_iterations:
                ar = self.trials[AR].rate if AR in self.trials else 0.0
                out["trials"] = {"iterations_each": self.trial_iterations,
                                 "one_sequence": {f"{m}:{k}": {"iterations": t.iterations,
                                                               "tokens_per_s": round(t.rate, 2),
                                                               "vs_ar": round(t.rate / ar, 3) if ar else None}
                                                  for (m, k), t in sorted(self.trials.items())}}
                out["trials"]["settled"] = self.settled()
                if (measured := self._measured()) is not None:
                    out["trials"]["choice"] = {"method": measured.method, "k": measured.k, "source": measured.source,
                                               **({"measured_speedup": round(measured.speedup, 3)}
                                                  if measured.source == "measured" else {})}
            if self.draft_step:
                out["mlp_stage_ms"] = {str(b): round(t * 1e3, 3) for b, t in self.draft_step.items()}
            if "sat" in self.costs:
                out["sat_row_cost"] = {str(n): round(s / c, 3) for n, c, s in
                                       zip(self.widths, self.costs["standard"], self.costs["sat"], strict=True)
                                       if n > 1}
            plans = {}
            for b in batches:
                if b > self.engine.config.max_batch:
                    continue
                best, per_method = self.table(b)
                plans[str(b)] = {"choice": {"method": best.method, "k": best.k,
                                            "expected_speedup": round(best.speedup, 3)},
                                 "candidates": {m: {"k": c.k, "expected_speedup": round(c.speedup, 3)}
                                                for m, c in per_method.items()}}
            out["plans"] = plans
            return out


class _Slot:
    """Stands in for a Sequence in `Engine._forward`, which reads only the cache row."""

    def __init__(self, slot: int):
        self.slot = slot


def manifest_priors(directory: str | Path) -> dict[str, list[float]]:
    """Held-out acceptance by position per SDSAT method, from the model folder's manifest.json (the
    longest k measured), or nothing."""
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        return {}
    report = json.loads(path.read_text()).get("heldout_acceptance") or {}
    priors: dict[str, list[float]] = {}
    for key, value in report.items():
        if not isinstance(value, dict) or "accepted_by_position" not in value:
            continue
        method = key.rsplit("_k", 1)[0]
        if method in ("sdsat", "sdsat-fused") and len(value["accepted_by_position"]) > len(priors.get(method, [])):
            priors[method] = [float(a) for a in value["accepted_by_position"]]
    speculator = Path(directory) / "speculator" / "manifest.json"
    if speculator.is_file():  # the served engine's own greedy check of the speculator shipped beside the model
        check = json.loads(speculator.read_text()).get("engine_check") or {}
        if check.get("accepted_by_position"):
            priors["mlp"] = [float(a) for a in check["accepted_by_position"]]
    return priors


def resolve(engine, seq: Sequence, batch: int) -> None:
    """Give an `auto` request its method at admission (its cache row is not yet taken). If planning fails
    (the calibration's widest forward out of memory, say), the request decodes plainly rather than being lost."""
    try:
        choice = engine.planner.choose(batch, len(engine.running), cap=seq.k)
    except Exception:
        log.exception("auto: planning failed; the request decodes with ar")
        seq.method, seq.k, seq.auto = "ar", 0, False
        return
    seq.method = choice.method if choice.k else "ar"
    if seq.method == "ar":
        seq.k = 0
