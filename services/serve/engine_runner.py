"""Runs an engine's step loop on its own thread and serves it to asyncio code.

The engine is single-threaded: only the runner thread touches it. Callers submit requests and
cancellations through a command queue; each request's outputs come back on its own asyncio queue
(via `call_soon_threadsafe`), so an async Serve replica streams them while the loop keeps batching.

Pass a factory rather than an engine where it matters how fast the engine runs: the factory runs on the
runner thread, so the engine is built, warmed and run by one thread. OpenMP (libgomp) keeps a team of
worker threads for each thread that starts parallel regions; an engine warmed on one thread and run on
another makes two teams, and once a process has more OpenMP threads than CPUs, libgomp's workers stop
spinning between regions (GOMP_SPINCOUNT: 100 spins instead of 300,000), so each of a decode step's
parallel regions waits on futex wake-ups. Measured on an AMD EPYC Zen 4 host, 2 threads, int4, 128 tokens:
0.58 s per request on the thread that built the engine, 1.33 s on another, 0.61 s with the engine built
on that other thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from models.engine import Engine, RequestOutput, SamplingParams
from models.errors import SdsatError

log = logging.getLogger(__name__)


@dataclass
class _Submit:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    tenant: str
    sink: asyncio.Queue
    loop: asyncio.AbstractEventLoop


def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one (new text, tokens and logprobs appended)."""
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return dataclasses.replace(b, text=a.text + b.text, token_ids=a.token_ids + b.token_ids, logprobs=logprobs)


class EngineRunner:
    def __init__(self, engine: Engine | Callable[[], Engine], on_step: Callable[[Engine], None] | None = None):
        """engine: the engine, or a factory that builds it on the runner thread (see the module doc);
        a factory's exception is raised here. on_step: called after each engine step (metrics)."""
        self.on_step = on_step
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, tuple[asyncio.Queue, asyncio.AbstractEventLoop]] = {}
        self._stopped = threading.Event()
        self.steps = 0
        built: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._main, args=(engine, built), name="engine-loop", daemon=True)
        self._thread.start()
        self.engine = built.get()
        if isinstance(self.engine, BaseException):
            self._thread.join()
            raise self.engine

    # ---- async side ------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                       tenant: str = "default", interval_s: float | None = 0.0) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early (or being cancelled) cancels it.

        The first output goes out at once. After it, what the engine emits is merged into one message per
        `interval_s` (0: one per engine step, fewer only when the consumer falls behind), or, with None,
        into one last message: a caller that answers in one piece needs no message per token, and on a
        small CPU host each message costs the engine CPU time."""
        sink: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self._commands.put(_Submit(request_id, prompt_ids, params, tenant, sink, loop))
        finished, pending, sent_at = False, None, None
        try:
            while True:
                item = pending if pending is not None else await sink.get()
                pending = None
                if isinstance(item, BaseException):
                    raise item
                # the first output goes out as it is; later ones wait for the next interval, or the end (None)
                while sent_at is not None and not item.finished:
                    if not sink.empty():  # the consumer fell behind: send one message
                        nxt = sink.get_nowait()
                    elif interval_s is None:
                        nxt = await sink.get()
                    elif (hold := sent_at + interval_s - loop.time()) > 0:
                        try:  # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation)
                            async with asyncio.timeout(hold):
                                nxt = await sink.get()
                        except TimeoutError:
                            break
                    else:
                        break
                    if isinstance(nxt, BaseException):
                        pending = nxt
                        break
                    item = merge_outputs(item, nxt)
                yield item
                sent_at = loop.time()
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._commands.put(("cancel", request_id))

    def load(self) -> dict:
        return {"running": len(self.engine.running), "waiting": len(self.engine.waiting),
                "queued_commands": self._commands.qsize()}

    def stop(self) -> None:
        self._stopped.set()
        self._commands.put(("stop", None))
        self._thread.join(timeout=10)

    # ---- engine thread ---------------------------------------------------------------------------
    def _main(self, engine: Engine | Callable[[], Engine], built: queue.Queue) -> None:
        if not isinstance(engine, Engine):
            try:
                engine = engine()
            except BaseException as err:  # handed to the constructor, which raises it
                built.put(err)
                return
        self.engine = engine
        built.put(engine)
        self._run()

    def _run(self) -> None:
        while not self._stopped.is_set():
            block = not self.engine.has_work()
            try:
                while True:  # drain commands; wait for one only when idle
                    self._handle(self._commands.get(block=block, timeout=0.5 if block else None))
                    block = False
            except queue.Empty:
                pass
            if self.engine.has_work():
                self._step()

    def _handle(self, command) -> None:
        if isinstance(command, _Submit):
            try:
                self.engine.add_request(command.prompt_ids, command.params, command.request_id, command.tenant)
                self._sinks[command.request_id] = (command.sink, command.loop)
            except SdsatError as err:
                command.loop.call_soon_threadsafe(command.sink.put_nowait, err)
        elif command[0] == "cancel":
            self.engine.cancel(command[1])
            self._sinks.pop(command[1], None)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as err:  # a bug or OOM: fail the requests in flight, keep the replica alive
            log.exception("engine step failed")
            for request_id, (sink, loop) in list(self._sinks.items()):
                loop.call_soon_threadsafe(sink.put_nowait, SdsatError(f"engine failure: {type(err).__name__}"))
                self.engine.cancel(request_id)
            self._sinks.clear()
            return
        self.steps += 1
        if self.on_step is not None:
            self.on_step(self.engine)
        for out in outputs:
            target = self._sinks.get(out.request_id)
            if target is None:
                continue
            sink, loop = target
            loop.call_soon_threadsafe(sink.put_nowait, out)
            if out.finished:
                del self._sinks[out.request_id]
