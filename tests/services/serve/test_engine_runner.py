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
