"""Lossless on every host: a verify row equals the 1-token forward bit for bit at every width and
dtype the engine serves, the start-up self-check says so, and an engine whose kernels are not
width-invariant is caught and serves `ar` instead of a silently lossy speculation."""

import pytest
import torch
import torch.nn.functional as F
from helpers import chain_logits, tiny_llama

import models.engine.llama as llama
from models.engine import Engine, EngineConfig, SamplingParams
from models.engine.invariance import check_invariance
from models.weights.quant import quantize_model
from models.weights.sat import SatSpec

SAT = SatSpec(ids=(28, 29, 30), k_train=3)  # untrained SAT ids of the random models below
WIDTHS = (1, 2, 4, 8, 16)


def tiny_engine(count_tokenizer, dtype: str, intermediate_size: int = 256, **config) -> Engine:
    # GQA groups of 3 query heads, as the real base; widths the fused int4 path takes (64-multiples)
    model = tiny_llama(32, hidden_size=192, intermediate_size=intermediate_size, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=1024)
    if dtype == "int4":
        quantize_model(model)
    elif dtype == "bfloat16":
        model.to(torch.bfloat16)
    return Engine(model, count_tokenizer, SAT, EngineConfig(**{"method": "ar", "k": 0, "max_context": 512, **config}))


def rows_of_every_width(engine: Engine, context: int) -> dict[int, torch.Tensor]:
    return chain_logits(engine, [1 + (3 * i) % 24 for i in range(context)], WIDTHS)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int4"])
@pytest.mark.parametrize("context", [3, 70, 300])
def test_a_verify_row_equals_the_one_token_forward_at_every_width(count_tokenizer, dtype, context):
    engine = tiny_engine(count_tokenizer, dtype)
    assert engine.invariant_kernels and engine.invariance.lossless, engine.invariance.failures
    rows = rows_of_every_width(engine, context)
    for w in WIDTHS:
        assert torch.equal(rows[w][0], rows[1][0]), w  # row 0 == the 1-token forward
        assert torch.equal(rows[w], rows[16][:w]), w  # every row of a chain == that row of a wider one


def _make_projections_width_dependent(monkeypatch):
    """Kernels that are not width-invariant on purpose: a forward of more than one row rounds its
    projections differently (as a library GEMM that picks another micro-kernel for wider inputs)."""
    original = llama.project

    def skewed(module, x, invariant):
        y = original(module, x, invariant)
        return y * (1 + 2**-5) if x.shape[0] > 1 else y  # 2^-5: seen even in bf16

    monkeypatch.setattr(llama, "project", skewed)


def test_the_self_check_catches_non_invariant_kernels_and_serves_ar(count_tokenizer, monkeypatch):
    _make_projections_width_dependent(monkeypatch)
    engine = tiny_engine(count_tokenizer, "bfloat16")
    report = engine.invariance
    assert not report.lossless and not engine.speculation_lossless
    assert {"case": "chain", "width": 2, "context": 3, "row": 0, "what": "logits"} in report.failures
    assert "bfloat16" in report.summary() and "width 2" in report.summary()
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ar = engine.generate([1, 2, 3, 4], params)
    for method in ("sdsat", "sdsat-fused", "prompt-lookup"):
        out = engine.generate([1, 2, 3, 4], SamplingParams(max_new_tokens=24, ignore_eos=True, method=method, k=3))
        assert out["token_ids"] == ar["token_ids"] and out["stats"]["drafted"] == 0, method


def test_without_the_self_check_the_same_engine_would_speculate(count_tokenizer, monkeypatch):
    """The check is what turns speculation off above: unchecked, the skewed engine drafts."""
    _make_projections_width_dependent(monkeypatch)
    engine = tiny_engine(count_tokenizer, "bfloat16", self_check=False)
    assert engine.invariance is None and engine.speculation_lossless
    out = engine.generate([1, 2, 3, 4], SamplingParams(max_new_tokens=24, ignore_eos=True, method="sdsat", k=3))
    assert out["stats"]["drafted"] > 0
    assert not check_invariance(engine).lossless


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int4"])
def test_library_kernels_are_either_invariant_here_or_caught(count_tokenizer, dtype):
    """attention: sdpa (SDPA and library GEMMs): whether they are width-invariant depends on the host
    (fp32 GEMMs of 1 and 2 rows differ on an Intel Xeon). Either the self-check passes and the rows
    really are equal at every width, or it fails and speculative requests are served as ar."""
    engine = tiny_engine(count_tokenizer, dtype, attention="sdpa")
    assert not engine.invariant_kernels
    if engine.invariance.lossless:
        for context in (3, 70):
            rows = rows_of_every_width(engine, context)
            assert all(torch.equal(rows[w][0], rows[1][0]) for w in WIDTHS)
    else:
        out = engine.generate([1, 2, 3], SamplingParams(max_new_tokens=8, ignore_eos=True, method="sdsat", k=3))
        assert out["stats"]["drafted"] == 0


@pytest.mark.parametrize("method,k", [("sdsat", 3), ("sdsat-fused", 2), ("prompt-lookup", 3)])
def test_batched_speculation_equals_plain_decoding_with_the_invariant_kernels(count_tokenizer, method, k):
    """Several sequences of different lengths at once, in bf16 (where a flipped last bit changes
    greedy tokens): every output equals that prompt decoded alone with ar."""
    engine = tiny_engine(count_tokenizer, "bfloat16")
    prompts = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3], [5] * 40]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    alone = [engine.generate(p, SamplingParams(max_new_tokens=40, ignore_eos=True, method="ar")) for p in prompts]
    batched = engine.generate_batch(prompts, SamplingParams(**{**params.__dict__, "method": method, "k": k}))
    assert [b["token_ids"] for b in batched] == [a["token_ids"] for a in alone]
    assert sum(b["stats"]["drafted"] for b in batched) > 0


def chunked_silu_mul(gate_up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up as ATen computes it on hosts where its vectorised and scalar exponentials differ:
    a tensor of 32,768 elements or more (ATen's grain) is cut into 6 per-thread chunks, and every other
    chunk's results come out one ULP away. Written out so the test sees the same on every host (ATen's own
    SiLU is chunk-invariant on some: an AMD EPYC Zen 1 host here)."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    out = F.silu(gate) * up
    if out.numel() >= 32768:
        flat = out.reshape(-1)
        size = -(-flat.numel() // 6)
        for start in range(size, flat.numel(), 2 * size):
            part = flat[start : start + size]
            part.copy_(torch.nextafter(part, torch.full_like(part, float("inf"))))
    return out.to(out_dtype)


def test_many_rows_on_many_threads_stay_invariant(count_tokenizer, monkeypatch):
    """Over 100 rows in one forward on more threads than cores: ATen splits element-wise work (SiLU's
    exponential, RoPE's cos and sin) into per-thread chunks whose ends can fall inside a row, and on some
    hosts its vectorised and scalar exponentials differ in the last bit. The kernels keep such rows
    identical, and the self-check catches a SiLU that does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(6)
    try:
        # 128 rows x 704 = 90,112 SiLU elements: 6 chunks of 15,019, whose ends fall inside rows
        engine = tiny_engine(count_tokenizer, "float32", intermediate_size=704, max_batch=8)
        assert engine.cache.slots == 8 and engine.invariance.lossless, engine.invariance.failures  # 128-row batch
        # the same engine with a chunk-dependent SiLU: a row of the batch comes out different, and the check
        # says so (the chains and the tree stay under the grain, so only the batch case fails)
        monkeypatch.setattr(llama, "silu_mul_cast", chunked_silu_mul)
        report = check_invariance(engine)
        assert not report.lossless and {f["case"] for f in report.failures} == {"batch"}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("widths", [(2,), (3,), (2, 4)])
def test_the_self_check_runs_at_the_narrow_widths_a_capped_engine_verifies(count_tokenizer, widths):
    """A compiled engine checks only the widths its verifies can have (k + 1 up to its widest class): the tree
    case, 4 rows wide, runs only where 4 is among them."""
    engine = tiny_engine(count_tokenizer, "float32", self_check=False)
    report = check_invariance(engine, widths)
    assert report.lossless and report.widths == list(widths), report.failures
