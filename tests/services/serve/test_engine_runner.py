"""The engine thread's async front: a slow consumer gets the outputs it fell behind on as one message,
with nothing lost or reordered."""

import asyncio

from models.engine import Engine, EngineConfig, SamplingParams
from services.serve.engine_runner import EngineRunner


def test_slow_consumer_gets_merged_outputs_equal_to_the_whole(counting_sdsat_dir):
    engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method="ar", k=0, max_context=256))
    prompt = engine.tokenizer("3 4 5", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=1)
    whole = engine.generate(prompt, params)
    runner = EngineRunner(engine)

    async def consume():
        items = []
        async for out in runner.generate("r1", prompt, params):
            items.append(out)
            await asyncio.sleep(0.05)  # slower than the engine: outputs pile up in the sink
        return items

    try:
        items = asyncio.run(consume())
    finally:
        runner.stop()
    assert [t for it in items for t in it.token_ids] == whole["token_ids"]
    assert "".join(it.text for it in items) == whole["text"]
    assert sum(len(it.logprobs) for it in items) == len(whole["token_ids"])
    assert items[-1].finished and items[-1].completion_tokens == 40
    assert len(items) < 40  # some messages carried several steps' tokens


def _collect(runner: EngineRunner, prompt: list[int], params: SamplingParams, interval_s) -> tuple[list, list]:
    async def consume():
        items, arrived = [], []
        async for out in runner.generate("r", prompt, params, interval_s=interval_s):
            items.append(out)
            arrived.append(asyncio.get_running_loop().time())
        return items, arrived

    return asyncio.run(consume())


def test_coalesced_streams_carry_the_same_outputs_in_fewer_messages(counting_sdsat_dir):
    """interval None (an answer in one piece): the first output, then one message at the end; a positive
    interval: messages at least that far apart but for the last. Either way nothing is lost or reordered."""
    engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method="ar", k=0, max_context=256))
    prompt = engine.tokenizer("3 4 5", add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=60, ignore_eos=True, logprobs=1)
    whole = engine.generate(prompt, params)
    runner = EngineRunner(engine)
    try:
        at_end, _ = _collect(runner, prompt, params, None)
        timed, arrived = _collect(runner, prompt, params, 0.02)
    finally:
        runner.stop()
    for items in (at_end, timed):
        assert [t for it in items for t in it.token_ids] == whole["token_ids"]
        assert "".join(it.text for it in items) == whole["text"]
        assert sum(len(it.logprobs) for it in items) == len(whole["token_ids"])
        assert items[-1].finished and not any(it.finished for it in items[:-1])
    assert len(at_end) == 2 and len(at_end[0].token_ids) == 1  # the first token, then the rest at once
    gaps = [b - a for a, b in zip(arrived[:-2], arrived[1:-1], strict=True)]  # the last goes out when it is done
    assert all(gap >= 0.02 - 1e-3 for gap in gaps), gaps  # (less the event loop's clock slack)


def test_a_factory_builds_the_engine_on_the_thread_that_runs_it(counting_sdsat_dir):
    """OpenMP keeps one team of workers per thread that starts parallel regions: the engine is built,
    warmed and run by one thread (services/serve/engine_runner.py says why). A factory's error is raised."""
    import threading

    import pytest

    built_on = []

    def build():
        built_on.append(threading.get_ident())
        engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method="ar", k=0, max_context=256))
        engine.generate([1, 2, 3], SamplingParams(max_new_tokens=2))
        return engine

    runner = EngineRunner(build)
    try:
        prompt = runner.engine.tokenizer("3 4 5", add_special_tokens=False)["input_ids"]
        items, _ = _collect(runner, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), 0.0)
    finally:
        runner.stop()
    assert built_on == [runner._thread.ident] != [threading.get_ident()]
    assert sum(len(it.token_ids) for it in items) == 8

    def broken():
        raise ValueError("no such model")

    with pytest.raises(ValueError, match="no such model"):
        EngineRunner(broken)
