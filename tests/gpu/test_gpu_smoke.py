"""GPU smoke test: the engine on CUDA in bf16/fp16 gives speculative == plain greedy. Skips without CUDA."""

import pytest
import torch

from models.engine import Engine, EngineConfig, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_engine_speculative_equals_plain(counting_sdsat_dir, dtype):
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [8, 10, 12]]
    outs = {}
    for method in ("ar", "sdsat", "sdsat-fused"):
        engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method=method, k=4, device="cuda",
                                                                         dtype=dtype, max_context=256))
        assert engine.device.type == "cuda"
        outs[method] = [r["token_ids"] for r in engine.generate_batch(prompts, params)]
    assert outs["sdsat"] == outs["ar"] == outs["sdsat-fused"]
