"""GPU: the compiled forward with CUDA graphs (models/engine/compiled.py) gives the eager forward's tokens, one
sequence and several, and its start-up self-check passes, so speculation stays on and lossless. Skips without
CUDA (`make gpu-check` runs it)."""

import pytest
import torch

from models.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [5, 6, 7, 8, 9, 10, 11]]


def test_cuda_graphs_of_the_compiled_forward_give_the_eager_tokens(counting_sdsat_dir):
    def engine(compile: bool) -> Engine:
        return Engine.from_pretrained(counting_sdsat_dir, EngineConfig(
            method="ar", k=3, device="cuda", dtype="bfloat16", max_context=256, max_batch=4, compile=compile,
            compile_widths=(1, 4, 16), compile_batches=(1, 4)))

    eager, compiled = engine(False), engine(True)
    report = compiled.compiled.report()
    assert report["active"] and not report["failed"], report
    # lossless by check, not by falling back: verify rows of the graphs equal their 1-token rows bit for bit
    assert compiled.speculation_lossless, compiled.invariance.summary()
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    expected = [r["token_ids"] for r in eager.generate_batch(PROMPTS, params)]
    p = SamplingParams(max_new_tokens=32, ignore_eos=True, method="prompt-lookup")
    assert [compiled.generate(x, p)["token_ids"] for x in PROMPTS] == expected
    assert [r["token_ids"] for r in compiled.generate_batch(PROMPTS, p)] == expected
    assert [r["token_ids"] for r in compiled.generate_batch(PROMPTS, params)] == expected
    assert compiled.compiled.report()["cuda_graphs"] >= 2 and compiled.compiled.forwards > 0
