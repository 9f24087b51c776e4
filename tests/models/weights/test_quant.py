"""Weight-only int4/int8 (models/weights/quant.py) and the lean Llama forward (models/engine/llama.py):
Q4_1 blocks come back exactly, the kernels compute the weights they claim and are batch-invariant,
and speculative greedy under int4 equals plain greedy under int4, token for token."""

import pytest
import torch
from helpers import tiny_llama

from models.engine import Engine, EngineConfig, SamplingParams, kernels
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


def test_int4_linear_keeps_the_gguf_blocks_and_computes_as_llama_cpp():
    """The blocks come back out of the tiles exactly; the projection is llama.cpp's Q4_1 x Q8_1 arithmetic
    (activations quantized per block of 32 to int8), within its rounding of the exact product."""
    w, q, d, m = q4_1_weights(200, 256)  # 200 outputs: the last tile of 16 is partly padding
    module = Int4Linear(q, d, m)
    assert torch.equal(module.dequantized(), w)
    q2, d2, m2 = module.blocks()
    assert torch.equal(q2.long(), q.long()) and torch.equal(d2, d) and torch.equal(m2, m)
    x = torch.randn(5, 256)
    y = module(x)
    assert y.shape == (5, 200) and y.dtype == torch.float32
    xq = x.view(5, 8, 32)  # the reference: Q8_1 activations by hand, then the exact product
    dx = xq.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(xq / dx).clamp(-127, 127) * dx).view(5, 256)
    torch.testing.assert_close(y, xq @ w.t(), rtol=1e-4, atol=1e-4)
    exact = x @ w.t()
    assert (y - exact).norm() / exact.norm() < 1e-2  # int8 activations: about 0.4% of a row's norm here


def test_int4_linear_survives_a_dtype_cast_of_the_modules_around_it():
    """`.to(torch.bfloat16)` on a module tree holding the projections (as an attached SAT adapter's .to()
    reaches the projections its LoRA wraps) converts floating-point buffers; the blocks must not change."""
    w, q, d, m = q4_1_weights(64, 128)
    module = Int4Linear(q, d, m)
    x = torch.randn(3, 128)
    before = module(x)
    torch.nn.Sequential(module).to(torch.bfloat16)
    assert torch.equal(module.dequantized(), w) and torch.equal(module(x), before)


def test_int4_linear_falls_back_to_the_aten_kernel_without_the_c_kernels(monkeypatch):
    """No compiler: PyTorch's int4 kernel on the same blocks (scale d and zero m + 8d rounded to bf16,
    bf16 activations), close to the exact projection."""
    w, q, d, m = q4_1_weights(128, 256)
    module = Int4Linear(q, d, m)
    x = torch.randn(5, 256)
    monkeypatch.setattr(kernels, "kernel_unavailable", lambda: "no C compiler found")
    y = module(x)
    assert module._aten is not None  # packed on first use
    torch.testing.assert_close(y, x @ w.t(), rtol=3e-2, atol=3e-2)


def int4_module(n: int, k: int, seed: int = 0) -> Int4Linear:
    _, q, d, m = q4_1_weights(n, k, seed)
    return Int4Linear(q, d, m + 8 * d)


def test_fused_int4_parts_equal_the_parts():
    parts = [int4_module(n, 128, seed=n) for n in (128, 64, 64)]
    fused = Int4Linear.cat(parts)
    x = torch.randn(3, 128).bfloat16()
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert parts[1].codes.data_ptr() == fused.codes[128 // 16 :].data_ptr()  # the parts view the fused tiles
    assert torch.equal(fused(x)[:, 128:192], parts[1](x))
    assert Int4Linear.cat([parts[0], int4_module(32, 128)]).out_features == 160  # whole tiles of 16 concatenate
    assert Int4Linear.cat([parts[0], int4_module(40, 128)]) is None  # a part tile does not
    assert Int4Linear.cat([parts[0], int4_module(32, 64)]) is None  # nor different inputs


def test_quantized_weights_move_into_huge_pages_and_compute_the_same_bits():
    """models/engine/memory.py: a fused Int4Linear (its parts stay views of it) and an Int8Linear move into one
    2 MiB-aligned block, give the same outputs, and (where Linux offers transparent huge pages) the block
    is backed by huge pages."""
    from pathlib import Path

    from models.engine.memory import HUGE_PAGE, huge_page_bytes, place_in_huge_pages

    parts = [int4_module(n, 128, seed=n) for n in (128, 64)]
    fused, head = Int4Linear.cat(parts), Int8Linear(torch.randn(48, 128, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(3, 128).bfloat16()
    before = [fused(x), parts[1](x), head(x)]
    old = fused.codes.data_ptr()
    placed = place_in_huge_pages([fused, head, fused])  # a module listed twice moves once
    if placed == 0:
        pytest.skip("madvise(MADV_HUGEPAGE) is unavailable or refused here (not Linux, or a kernel without THP)")
    assert placed == sum(-(-t.nbytes // 64) * 64 for m in (fused, head) for t in m.quantized_tensors())
    assert fused.codes.data_ptr() != old and fused.codes.data_ptr() % HUGE_PAGE == 0
    assert parts[1].codes.data_ptr() == fused.codes[128 // 16 :].data_ptr()  # the parts follow as views
    after = [fused(x), parts[1](x), head(x)]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert huge_page_bytes(fused.codes) >= HUGE_PAGE


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
    if kind == "int4":  # the register path (up to 8 rows) and the tiled one (more) give the same bits
        many = torch.randn(40, 256)
        assert torch.equal(module(many)[:8], module(many[:8]))
        assert torch.equal(module(many)[17:18], module(many[17:18]))


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


def test_the_one_call_int4_forward_equals_the_per_layer_loop(count_tokenizer, monkeypatch):
    """kernels.c's sdsat_forward_q4 (a forward without SAT rows) composes the very steps the per-layer
    loop calls one by one (the loop serves forwards with SAT rows): the same logits and hidden states bit
    for bit, over two sequences of different lengths with a tree layout, and the same KV written."""
    from models.engine.drafters.sdsat_fused import fused_layout

    model = int4_ready_llama()
    quantize_model(model)
    out = {}
    for path in ("one call", "per layer"):
        if path == "per layer":
            monkeypatch.setattr(LlamaForward, "_q4_plan", lambda self, cache: None)
        engine = Engine(model, count_tokenizer, None, EngineConfig(method="ar", k=0, max_context=128, max_batch=2))
        assert (engine.lean._q4_plan(engine.cache) is not None) == (path == "one call")
        engine.add_request(list(range(1, 12)), SamplingParams(max_new_tokens=50, ignore_eos=True))
        engine.add_request(list(range(3, 30)), SamplingParams(max_new_tokens=50, ignore_eos=True))
        while not all(s.prefilled >= len(s.prompt_ids) for s in engine.running) or len(engine.running) < 2:
            engine.step()
        seqs = engine.running
        logits, hidden = engine._forward(seqs, [[seqs[0].cur, 5, 6, 7, 8, 9, 10, 11, 12], [seqs[1].cur]],
                                         [fused_layout(2, 2), None])
        out[path] = (logits, hidden, [k.clone() for k in engine.cache.keys], [v.clone() for v in engine.cache.values])
    for a, b in zip(out["one call"], out["per layer"], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("sat_lora", ["weights", "int8"])
@pytest.mark.parametrize("rank", [4, 16])  # kernels.c's portable LoRA loops, and its vector code (rank 16)
def test_sat_rows_ride_the_one_call_int4_forward(count_tokenizer, monkeypatch, rank, sat_lora):
    """A SAT adapter's LoRA inside sdsat_forward_q4 (its rows only): the standard rows of a forward with SAT
    rows are bit for bit those of the per-layer loop, and with the adapter's own weights the SAT rows agree
    with the loop's LoRA (torch matmuls there, kernels.c's fixed order here) to rounding. (The int8 codes'
    own arithmetic is test_kernels' test_the_int8_lora_is_the_lora_of_its_codes_times_their_scales.)"""
    from models.weights.adapter import AdapterConfig, SatAdapter

    model = int4_ready_llama()
    cfg = AdapterConfig(base_name="tiny", base_sha256="0" * 64, vocab_size=32, num_sat=3, rank=rank, alpha=2.0 * rank)
    adapter = SatAdapter.create(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: B != 0
        for t in adapter.trainable_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    report = quantize_model(model)
    adapter.to(torch.bfloat16)  # as Engine.from_pretrained does under int4
    out = {}
    for path in ("one call", "per layer"):
        if path == "per layer":
            monkeypatch.setattr(LlamaForward, "_lora_table", lambda self, loras, intermediate: (None, 0, 0.0))
        engine = Engine(model, count_tokenizer, None, EngineConfig(method="ar", k=0, max_context=128,
                                                                   sat_lora=sat_lora),
                        adapter=adapter, quantization=report)
        plan = engine.lean._q4_plan(engine.cache)
        assert plan is not None and (plan.lora is not None) == (path == "one call")
        engine.add_request(list(range(1, 12)), SamplingParams(max_new_tokens=50, ignore_eos=True))
        engine.step()
        seq = engine.running[0]
        out[path] = engine._forward([seq], [[seq.cur, 5, 32, 33, 34]])[0][0].float()  # 2 standard, 3 SAT rows
    assert torch.equal(out["one call"][:2], out["per layer"][:2])
    if sat_lora == "weights":
        # (the LoRA here moves a SAT row's projections by several units: a path that skipped it could not agree)
        torch.testing.assert_close(out["one call"][2:], out["per layer"][2:], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sat_lora", ["int8", "weights"])
@pytest.mark.parametrize("rank", [4, 16])
def test_a_sat_rows_logits_do_not_depend_on_the_other_sat_rows(count_tokenizer, rank, sat_lora):
    """In sdsat_forward_q4, with the LoRA as int8 codes (the default) or in the adapter's own dtype: a SAT
    row's logits are the same bits alone or beside more SAT rows, the standard rows the same with or without
    the SAT rows, and the two formats part only on the SAT rows."""
    from models.weights.adapter import AdapterConfig, SatAdapter

    model = int4_ready_llama()
    cfg = AdapterConfig(base_name="tiny", base_sha256="0" * 64, vocab_size=32, num_sat=3, rank=rank, alpha=2.0 * rank)
    adapter = SatAdapter.create(model, cfg)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for t in adapter.trainable_parameters():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    report = quantize_model(model)
    adapter.to(torch.bfloat16)
    out = {}
    for fmt in ("int8", "weights"):
        engine = Engine(model, count_tokenizer, None, EngineConfig(method="ar", k=0, max_context=128, sat_lora=fmt),
                        adapter=adapter, quantization=report)
        plan = engine.lean._q4_plan(engine.cache)
        assert plan.lora is not None and plan.lora_format == (2 if fmt == "int8" else 1)
        engine.add_request(list(range(1, 12)), SamplingParams(max_new_tokens=50, ignore_eos=True))
        engine.step()
        seq = engine.running[0]
        out[fmt] = [engine._forward([seq], [chunk])[0][0] for chunk in
                    ([seq.cur, 5, 32, 33, 34], [seq.cur, 5, 32], [seq.cur, 5])]  # 3, 1 and no SAT rows
        scale, plan.lora_scale = plan.lora_scale, 0.0  # the same forward with the LoRA adding nothing
        out[fmt].append(engine._forward([seq], [[seq.cur, 5, 32, 33, 34]])[0][0])
        plan.lora_scale = scale
    many, one, plain, skipped = out[sat_lora]
    assert torch.equal(many[:2], plain) and torch.equal(one[:2], plain)
    assert torch.equal(one[2], many[2])  # the first SAT row alone or beside two more
    assert not torch.equal(many[2], many[3])  # (the SAT rows differ: the check has teeth)
    other = out["weights" if sat_lora == "int8" else "int8"][0]
    assert torch.equal(other[:2], many[:2]) and not torch.equal(other[2:], many[2:])
    # int8 codes move a SAT row's logits little against what the LoRA itself moves them
    assert (other[2:] - many[2:]).abs().max() < 0.1 * (skipped[2:] - many[2:]).abs().max()


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


def test_the_engine_serves_its_int4_weights_from_one_huge_page_block(count_tokenizer):
    """An int4 engine (quantization report given, as `from_pretrained` gives it) copies the fused projections, the
    unfused ones and the LM head into one block; the parts of a fused projection view it; greedy tokens equal
    those of an engine on an identical model whose weights stayed where they were."""
    import copy

    model = int4_ready_llama()
    report = quantize_model(model)
    twin = copy.deepcopy(model)
    engine = Engine(model, count_tokenizer, SAT, EngineConfig(method="ar", k=0, max_context=128), quantization=report)
    if engine.huge_page_bytes == 0:
        pytest.skip("madvise(MADV_HUGEPAGE) is unavailable or refused here (not Linux, or a kernel without THP)")
    plain = Engine(twin, count_tokenizer, SAT, EngineConfig(method="ar", k=0, max_context=128))
    assert plain.huge_page_bytes == 0 and engine.huge_pages()["placed_mib"] == round(engine.huge_page_bytes / 2**20, 1)
    modules = engine._quantized_modules()
    fused = list(engine.lean.fused_projections())
    assert fused and all(f in modules for f in fused) and engine.lm_head in modules
    assert not any(p in modules for f in fused for p, _, _ in f._parts)  # parts are views, never copied apart
    start = modules[0].quantized_tensors()[0].data_ptr()
    for m in [*modules, *(p for f in fused for p, _, _ in f._parts)]:
        for t in m.quantized_tensors():
            assert start <= t.data_ptr() and t.data_ptr() + t.nbytes <= start + engine.huge_page_bytes
    ids = [1, 2, 3, 4, 5, 6]
    params = SamplingParams(max_new_tokens=12, method="ar", ignore_eos=True)
    assert engine.generate(ids, params)["token_ids"] == plain.generate(ids, params)["token_ids"]
