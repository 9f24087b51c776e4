"""Weight-only int4/int8 (models/weights/quant.py) and the lean Llama forward (models/engine/llama.py):
Q4_1 blocks come back exactly, the kernels compute the weights they claim and are batch-invariant,
and speculative greedy under int4 equals plain greedy under int4, token for token."""

import pytest
import torch
from helpers import tiny_llama

from models.engine import Engine, EngineConfig, SamplingParams
from models.engine.llama import LlamaForward
from models.weights.quant import GROUP, Int4Linear, Int8Linear, quantize_model, recover_q4_1
from models.weights.sat import SatSpec


def q4_1_weights(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 weights made the way a Q4_1 GGUF dequantizes (w = d·q + m, d and m fp16), each block using
    codes 0 and 15 as llama.cpp's quantizer does (m = block min, d = (max - min) / 15)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k // GROUP, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    d = (torch.rand(n, k // GROUP, generator=g) * 0.02 + 1e-3).half().float()
    m = (-torch.rand(n, k // GROUP, generator=g) * 0.1).half().float()
    return (d[..., None] * q + m[..., None]).reshape(n, k), q.reshape(n, k), d, m


def test_q4_1_blocks_come_back_exactly():
    w, q, d, m = q4_1_weights(64, 128)
    q2, d2, m2, exact = recover_q4_1(w)
    assert exact == 1.0
    assert torch.equal(q2, q.to(torch.int32)) and torch.equal(d2, d) and torch.equal(m2, m)


def test_weights_that_were_never_q4_1_are_reported_as_inexact():
    w = torch.randn(64, 128)
    q, d, m, exact = recover_q4_1(w)
    assert exact < 0.01
    approx = (d[..., None] * q.view(64, 4, GROUP).float() + m[..., None]).view(64, 128)
    assert (approx - w).abs().max() <= d.max() / 2 + 1e-6  # still the nearest 4-bit code


def test_int4_linear_computes_its_dequantized_weights_and_rounds_only_scale_and_zero():
    w, q, d, m = q4_1_weights(128, 256)
    module = Int4Linear(q, d, m + 8 * d)
    deq = module.dequantized()
    # the changes: d and m + 8d rounded to bf16 (2^-8 relative of |zero| and of |d|·|q-8|), and the
    # bf16 output of the kernel that `dequantized` reads the weights with (2^-8 of |w|)
    bound = ((m.abs() + 8 * d) * 2**-8 + 8 * d * 2**-8).repeat_interleave(GROUP, dim=1) + w.abs() * 2**-8
    assert ((deq - w).abs() <= bound + 1e-7).all()
    x = torch.randn(5, 256).bfloat16()
    torch.testing.assert_close(module(x).float(), x.float() @ deq.t(), rtol=2e-2, atol=2e-2)


def int4_module(n: int, k: int, seed: int = 0) -> Int4Linear:
    _, q, d, m = q4_1_weights(n, k, seed)
    return Int4Linear(q, d, m + 8 * d)


def test_fused_int4_parts_equal_the_parts():
    parts = [int4_module(n, 128, seed=n) for n in (128, 64, 64)]
    fused = Int4Linear.cat(parts)
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert parts[1].packed.data_ptr() == fused.packed[128:].data_ptr()  # the parts now view the fused codes
    assert torch.equal(fused(x)[:, 128:192], parts[1](x))
    assert Int4Linear.cat([parts[0], int4_module(32, 128)]) is None  # 32 rows: the packing does not concatenate


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_kernels_are_batch_invariant(kind):
    """Row i of a call with M rows equals the 1-row call: speculation's wide verify forwards compute the
    very numbers plain decoding does (this is what keeps greedy output identical under int4)."""
    w, q, d, m = q4_1_weights(192, 256)
    module = Int4Linear(q, d, m + 8 * d) if kind == "int4" else Int8Linear(w)
    x = torch.randn(9, 256).bfloat16()
    full = module(x)
    for i in range(9):
        assert torch.equal(module(x[i : i + 1]), full[i : i + 1])


SAT = SatSpec(ids=(28, 29, 30), k_train=3)  # untrained SAT ids of the random models below


def int4_ready_llama(vocab_size: int = 32):
    """A tiny random Llama whose widths the fused int4 path takes (projections of 64-multiple rows)."""
    return tiny_llama(vocab_size, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024)


def test_quantize_model_reports_and_keeps_the_model_working():
    model = int4_ready_llama()
    report = quantize_model(model)
    assert report["projections"] == 2 * 7  # 2 layers x q, k, v, o, gate, up, down
    assert report["q4_1_exact_block_fraction"] < 0.01  # random weights were never Q4_1
    assert report["decode_bytes"] < 0.3 * sum(p.numel() * 4 for p in int4_ready_llama().parameters())
    assert isinstance(model.get_output_embeddings(), Int8Linear)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE's frequencies are not rounded
    assert LlamaForward.maybe_build(model) is not None
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_lean_forward_matches_the_transformers_forward(count_tokenizer):
    """Same model, same cache layout: the lean forward's logits equal transformers' (fp32), for a
    fused SDSAT layout (a chain, then SAT blocks under a tree mask)."""
    from models.engine.drafters.sdsat_fused import fused_layout

    model = int4_ready_llama()
    out = {}
    for forward in ("lean", "transformers"):
        engine = Engine(model, count_tokenizer, SAT, EngineConfig(method="ar", k=0, max_context=64, forward=forward))
        assert (engine.lean is not None) == (forward == "lean")
        engine.add_request(list(range(1, 12)), SamplingParams(max_new_tokens=50, ignore_eos=True))
        engine.step()  # prefill
        seq = engine.running[0]
        out[forward] = engine._forward([seq], [[seq.cur, 5, 6] + [28, 29] * 3], [fused_layout(2, 2)])[0][0]
    torch.testing.assert_close(out["lean"], out["transformers"], rtol=1e-4, atol=1e-4)


PROMPTS = [[1, 2, 3, 4], [8, 10, 12], [20, 21, 22, 23, 24, 1, 2, 3]]


def _assert_speculation_is_lossless(make_engine, method: str, k: int) -> None:
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    reference = make_engine("ar", 0).generate_batch(PROMPTS, params)
    spec = make_engine(method, k)
    single = [spec.generate(p, params) for p in PROMPTS]
    batched = spec.generate_batch(PROMPTS, params)
    for ref, one, many in zip(reference, single, batched, strict=True):
        assert one["token_ids"] == ref["token_ids"] == many["token_ids"]
    assert single[0]["stats"]["drafted"] > 0


@pytest.mark.parametrize("method,k", [("sdsat", 3), ("sdsat-fused", 2), ("prompt-lookup", 3)])
def test_int4_speculation_equals_int4_plain_decoding_lean(count_tokenizer, method, k):
    """A random model quantized to int4 on the lean forward: every method's greedy tokens equal int4
    `ar`'s, for one request and for a batch."""
    model = int4_ready_llama()
    quantize_model(model)

    def make(method, k):
        engine = Engine(model, count_tokenizer, SAT, EngineConfig(method=method, k=k, max_context=128))
        assert engine.lean is not None and engine.dtype == torch.bfloat16
        return engine

    _assert_speculation_is_lossless(make, method, k)


@pytest.mark.parametrize("method,k", [("sdsat", 3), ("sdsat-fused", 2)])
def test_int4_speculation_equals_int4_plain_decoding_trained(counting_sdsat_dir, method, k):
    """The trained counting SDSAT model loaded with dtype int4 (its widths are not 64-row multiples,
    so it runs transformers' forward over the int4 projections): lossless too, and still drafting."""
    def make(method, k):
        engine = Engine.from_pretrained(counting_sdsat_dir, EngineConfig(method=method, k=k, dtype="int4",
                                                                         max_context=128))
        assert engine.quantization is not None
        return engine

    _assert_speculation_is_lossless(make, method, k)
