"""The width-invariant kernels (models/engine/kernels.c): a row's bits depend on its own inputs only,
whatever the width, the batch, the tree layout or the key buffer's length; the AVX-512 and portable
paths give the same bits; and the results are the attention and the projection they claim to be."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from models.engine.kernels import Attention, add_norm, linear, lora_rows, silu_mul_cast

HQ, HKV, D, C = 6, 2, 32, 1024  # GQA group of 3, as the real base


def chain(T: int) -> torch.Tensor:
    return torch.ones(1, T, T, dtype=torch.bool).tril()


def attend(q, k_buf, v_buf, slots, start, local, scale=D**-0.5):
    return Attention(torch.tensor(slots), torch.tensor(start), local, scale)(q, k_buf, v_buf)


def random_cache(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, HKV, C, D, generator=g).to(dtype), torch.randn(3, HKV, C, D, generator=g).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("context", [0, 5, 63, 300, 700])
def test_a_rows_attention_does_not_depend_on_the_forwards_width(dtype, context):
    k_buf, v_buf = random_cache(dtype)
    q = torch.randn(1, 16, HQ, D, generator=torch.Generator().manual_seed(context))
    widest = attend(q, k_buf, v_buf, [0], [context], chain(16))[0]  # [16, HQ, D]
    for width in (1, 2, 4, 8):
        out = attend(q[:, :width], k_buf, v_buf, [0], [context], chain(width))[0]
        assert torch.equal(out, widest[:width]), width
    for j in (1, 7, 15):  # row j of a chain == that token decoded alone at its position
        alone = attend(q[:, j : j + 1], k_buf, v_buf, [0], [context + j], chain(1))[0, 0]
        assert torch.equal(alone, widest[j]), j


def test_batched_and_tree_rows_equal_their_rows_alone():
    k_buf, v_buf = random_cache(torch.bfloat16, seed=1)
    q = torch.randn(2, 4, HQ, D)
    alone = attend(q[1:], k_buf, v_buf, [2], [40], chain(4))[0]
    # beside a longer sequence in another slot, and listed first / second
    for slots, start, order in (([0, 2], [900, 40], 1), ([2, 0], [40, 900], 0)):
        qs = q if order == 1 else q.flip(0)
        out = attend(qs, k_buf, v_buf, slots, start, torch.cat([chain(4), chain(4)]))[order]
        assert torch.equal(out, alone)
    # a tree: rows 1 and 2 are siblings (both see row 0 only), row 3 follows row 2
    tree = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]]], dtype=torch.bool)
    out = attend(q[1:], k_buf, v_buf, [2], [40], tree)[0]
    assert torch.equal(out[:2], alone[:2])
    # row 2 sees [prefix, row 0, itself]: the same keys as a 2-row chain whose second row is row 2's
    k2, v2 = k_buf.clone(), v_buf.clone()
    k2[2, :, 41], v2[2, :, 41] = k_buf[2, :, 42], v_buf[2, :, 42]
    pair = attend(q[1:, [0, 2]], k2, v2, [2], [40], chain(2))[0]
    assert torch.equal(out[2], pair[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_the_softmax_attention_it_claims(dtype):
    k_buf, v_buf = random_cache(dtype, seed=2)
    T, start = 4, 100
    q = torch.randn(1, T, HQ, D)
    out = attend(q, k_buf, v_buf, [1], [start], chain(T))[0]  # [T, HQ, D]
    keys = k_buf[1, :, : start + T].float().repeat_interleave(HQ // HKV, 0)  # [HQ, L, D]
    values = v_buf[1, :, : start + T].float().repeat_interleave(HQ // HKV, 0)
    mask = torch.ones(T, start + T, dtype=torch.bool)
    mask[:, start:] = chain(T)[0]
    ref = F.scaled_dot_product_attention(q[0].transpose(0, 1), keys, values, attn_mask=mask)  # [HQ, T, D]
    torch.testing.assert_close(out, ref.transpose(0, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_projection_rows_result_does_not_depend_on_the_other_rows(dtype):
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(16, 96, generator=g).to(dtype), torch.randn(200, 96, generator=g).to(dtype)
    full = linear(x, w)
    for i in (0, 5, 15):
        assert torch.equal(linear(x[i : i + 1], w)[0], full[i])
        assert torch.equal(linear(torch.stack([x[(i + 3) % 16], x[i]]), w)[1], full[i])
    torch.testing.assert_close(full.float(), x.float() @ w.float().t(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.parametrize("rank", [16, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_sat_rows_lora_adds_s_b_a_x_to_those_rows_only(rank, dtype):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(9, 80, generator=g), torch.randn(9, 100, generator=g)
    # B of 37 outputs: its last tile of 16 is short
    a, b = torch.randn(rank, 80, generator=g).to(dtype), torch.randn(37, rank, generator=g).to(dtype)
    rows = torch.tensor([7, 2, 5])
    got = y.clone()
    lora_rows(x, rows, a, b, 0.5, got, 40)
    expected = y.clone()
    expected[rows, 40:77] += 0.5 * (x[rows] @ a.float().t()) @ b.float().t()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    untouched = torch.ones(9, 100, dtype=torch.bool)
    untouched[rows, 40:77] = False
    assert torch.equal(got[untouched], y[untouched])  # other rows and columns: not a bit changed
    for i in range(3):  # a row's result does not depend on the other SAT rows
        alone = y.clone()
        lora_rows(x, rows[i : i + 1], a, b, 0.5, alone, 40)
        assert torch.equal(alone[rows[i]], got[rows[i]])


@pytest.mark.parametrize("rank", [16, 4])
def test_the_int8_lora_is_the_lora_of_its_codes_times_their_scales(rank):
    """The LoRA's int8 format (EngineConfig.sat_lora): a scale per output of A and of B, the largest magnitude
    over 127. It computes s · B' A' x with A', B' the codes times their scales, and those are within half a
    step of A and B."""
    from models.engine.kernels import quantize_lora_int8

    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(9, 80, generator=g), torch.randn(9, 100, generator=g)
    a, b = torch.randn(rank, 80, generator=g).bfloat16(), torch.randn(37, rank, generator=g).bfloat16()
    a[1] = 0.0  # a row of zeros keeps its codes at 0
    rows = torch.tensor([7, 2, 5])
    got = y.clone()
    lora_rows(x, rows, a, b, 0.5, got, 40, int8=True)
    (ca, sa), (cb, sb) = quantize_lora_int8(a), quantize_lora_int8(b)
    assert torch.equal(ca[1], torch.zeros(80, dtype=torch.int8))
    a8, b8 = ca.float() * sa[:, None], cb.float() * sb[:, None]
    assert ((a8 - a.float()).abs() <= 0.5001 * sa[:, None]).all()
    assert ((b8 - b.float()).abs() <= 0.5001 * sb[:, None]).all()
    expected = y.clone()
    expected[rows, 40:77] += 0.5 * (x[rows] @ a8.t()) @ b8.t()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    untouched = torch.ones(9, 100, dtype=torch.bool)
    untouched[rows, 40:77] = False
    assert torch.equal(got[untouched], y[untouched])
    bf16 = y.clone()  # and near the bf16 weights' own LoRA: int8 moves a SAT row's projection a little
    lora_rows(x, rows, a, b, 0.5, bf16, 40)
    assert (got - bf16).abs().max() < 0.05 * (bf16 - y).abs().max()


SNIPPET = """
import sys, torch
from models.engine.kernels import Attention, add_norm, linear, lora_rows, q4_linear, q8_linear, silu_mul_cast
g = torch.Generator().manual_seed(0)
k = torch.randn(2, 2, 256, 32, generator=g).bfloat16(); v = torch.randn(2, 2, 256, 32, generator=g).bfloat16()
q = torch.randn(2, 3, 6, 32, generator=g)
tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
att = Attention(torch.tensor([1, 0]), torch.tensor([17, 200]), torch.stack([tree, tree]), 0.17)
a = att(q, k, v)
y = linear(torch.randn(5, 48, generator=g), torch.randn(70, 48, generator=g))
x = torch.randn(6, 70, generator=g) * 3
n = add_norm(x, torch.randn(6, 70, generator=g).bfloat16(), torch.randn(70, generator=g), 1e-5, torch.float32)
spread = torch.tensor([150.0, 5.0]).repeat_interleave(70)  # gates x150 reach the exponential's clamp at -87
s = silu_mul_cast(torch.randn(6, 2 * 70, generator=g) * spread, torch.float32)
rope = torch.randn(512, 32, generator=g), torch.randn(512, 32, generator=g)
qkv = torch.randn(6, (6 + 4) * 32, generator=g).bfloat16()
r = att.rope_attend(qkv, 6, 2, rope, torch.randint(0, 512, (6,), generator=g), k, v, torch.float32)
codes = torch.randint(0, 256, (3, 4, 4, 16, 4), generator=g, dtype=torch.uint8)  # 3 tiles of 16, K = 128
d, m = (torch.randn(2, 3, 4, 16, generator=g) * 0.05).half().view(torch.int16)
q4 = [q4_linear(torch.randn(rows, 128, generator=g), codes, d, m, 40) for rows in (1, 2, 3, 4, 5, 12)]
edge = torch.randn(3, 128, generator=g)  # the activations' int8 blocks at their edges
edge[0, :32] = 0.0  # a zero block
edge[0, 32:64] = torch.cat([torch.tensor([127.0]), torch.arange(-15, 16) + 0.5])  # d = 1: ties round half to even
edge[1, 64] = float("nan")  # a NaN's code is 0, and it does not count in the block's largest magnitude
edge[1, 96:128] = 1e-40  # a subnormal block: its codes are 0
edge[2, :32] = torch.linspace(-127.4, 127.49, 32) * 1e3  # codes reach -127 and 127
q4.append(q4_linear(edge, codes, d, m, 40))
codes8 = torch.randint(0, 256, (2, 4, 8, 16, 4), generator=g, dtype=torch.uint8)  # Q8_0: 2 tiles, K = 128
q8 = [q8_linear(torch.randn(rows, 128, generator=g), codes8, d[:2], 20) for rows in (1, 3, 6)]
lora = []
for rank, dtype, int8 in ((16, torch.bfloat16, False), (16, torch.float32, False), (4, torch.bfloat16, False),
                         (16, torch.bfloat16, True), (4, torch.float32, True)):  # rank 16: the vector code
    h, out = torch.randn(7, 96, generator=g), torch.randn(7, 120, generator=g)
    lora_rows(h, torch.tensor([6, 1, 3, 4, 0]), torch.randn(rank, 96, generator=g).to(dtype),
              torch.randn(50, rank, generator=g).to(dtype), 0.7, out, 30, int8=int8)
    lora.append(out)
torch.save({"attention": a, "linear": y, "add_norm": torch.cat([x, n]), "silu": s, "rope_attend": r, "k": k,
            **{f"q4_{i}": t for i, t in enumerate(q4)}, **{f"q8_{i}": t for i, t in enumerate(q8)},
            **{f"lora_{i}": t for i, t in enumerate(lora)}}, sys.argv[1])
"""


def test_the_avx512_avx2_and_portable_paths_give_the_same_bits(tmp_path):
    """The same rows through the host's best vector code (AVX-512, AVX2 or none), through the AVX2 code and
    through the portable C: identical. A path the CPU lacks falls back to the next one down, so on an AMD
    Zen 1-3 host "default" and "avx2" both run AVX2, and on an Intel AVX-512 host all three differ."""
    results = {}
    for name in ("default", "avx2", "portable"):
        path = tmp_path / f"{name}.pt"
        env = {key: value for key, value in os.environ.items() if key != "SDSAT_KERNELS"}  # default: uncapped
        if name != "default":
            env["SDSAT_KERNELS"] = name
        subprocess.run([sys.executable, "-c", SNIPPET, str(path)], check=True, env=env)
        results[name] = torch.load(path)
    for name in ("avx2", "portable"):
        assert results["default"].keys() == results[name].keys()
        for key in results["default"]:
            assert torch.equal(results["default"][key], results[name][key]), (name, key)


def test_the_vector_path_follows_the_cpu_and_the_cap():
    """The path the kernels report (and take) is the best this CPU has, as /proc/cpuinfo lists its flags,
    and SDSAT_KERNELS caps it."""
    from models.engine.kernels import _cpu_flags

    flags = _cpu_flags()
    avx2 = "avx2" if {"avx2", "fma", "f16c"} <= flags else "portable"
    best = avx2
    if avx2 == "avx2" and "avx512f" in flags:
        best = "avx512-vnni" if {"avx512bw", "avx512_vnni"} <= flags else "avx512"
    code = "from models.engine.kernels import vector_path; print(vector_path())"
    seen = {}
    for cap in ("", "avx2", "portable"):
        env = {**os.environ, "SDSAT_KERNELS": cap}
        seen[cap] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                   check=True).stdout.strip()
    assert seen == {"": best, "avx2": avx2, "portable": "portable"}


def test_silu_times_up_is_computed_row_by_row_and_is_silu():
    threads = torch.get_num_threads()
    torch.set_num_threads(7)
    try:
        x = torch.randn(37, 2 * 96, generator=torch.Generator().manual_seed(4)) * 4
        full = silu_mul_cast(x, torch.float32)
        assert all(torch.equal(silu_mul_cast(x[i : i + 1], torch.float32)[0], full[i]) for i in range(37))
    finally:
        torch.set_num_threads(threads)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(full, F.silu(gate) * up, rtol=1e-6, atol=1e-5)


def test_the_fused_glue_computes_the_layer_ops_it_replaces():
    """add_norm (residual add, then RMSNorm), silu_mul_cast and rope_attend against the library ops of the
    plain forward (models/engine/llama.py): the same results up to rounding."""
    g = torch.Generator().manual_seed(5)
    x, delta, w = torch.randn(7, 96, generator=g) * 2, torch.randn(7, 96, generator=g).bfloat16(), torch.rand(96)
    residual = x + delta.float()
    normed = add_norm(x, delta, w, 1e-5, torch.float32)
    assert torch.equal(x, residual)  # updated in place
    torch.testing.assert_close(normed, F.rms_norm(residual, (96,), w, eps=1e-5), rtol=1e-5, atol=1e-5)
    assert torch.equal(add_norm(residual.clone(), None, w, 1e-5, torch.bfloat16), normed.bfloat16())
    assert add_norm(x, delta, None, 1e-5, torch.float32) is None and torch.equal(x, residual + delta.float())

    gate_up = torch.randn(5, 2 * 96, generator=g) * 6
    gate, up = gate_up.chunk(2, dim=-1)
    fp32 = silu_mul_cast(gate_up, torch.float32)
    torch.testing.assert_close(fp32, F.silu(gate) * up, rtol=1e-6, atol=1e-5)
    assert torch.equal(silu_mul_cast(gate_up, torch.bfloat16), fp32.bfloat16())
    assert torch.equal(silu_mul_cast(gate_up.bfloat16(), torch.float32),
                       silu_mul_cast(gate_up.bfloat16().float(), torch.float32))

    # rope_attend = RoPE (rotate-half) on q and k, the KV write at the forward's columns, then attention
    k_buf, v_buf = random_cache(torch.float32, seed=6)
    R, T, start = 2, 3, [40, 9]
    qkv = torch.randn(R * T, (HQ + 2 * HKV) * D, generator=g)
    positions = torch.tensor([p + t for p in start for t in range(T)])
    cos, sin = torch.randn(64, D, generator=g), torch.randn(64, D, generator=g)
    attention = Attention(torch.tensor([2, 0]), torch.tensor(start), chain(T).repeat(R, 1, 1), D**-0.5)
    ref_k, ref_v = k_buf.clone(), v_buf.clone()
    out = attention.rope_attend(qkv, HQ, HKV, (cos, sin), positions, k_buf, v_buf, torch.float32)
    heads = qkv.view(R, T, HQ + 2 * HKV, D)
    c, s = cos[positions].view(R, T, 1, D), sin[positions].view(R, T, 1, D)
    half = D // 2
    rotated = torch.cat([-heads[..., half:], heads[..., :half]], dim=-1)
    qk = heads[:, :, : HQ + HKV] * c + rotated[:, :, : HQ + HKV] * s
    for r, slot in enumerate((2, 0)):
        ref_k[slot, :, start[r] : start[r] + T] = qk[r, :, HQ:].transpose(0, 1)
        ref_v[slot, :, start[r] : start[r] + T] = heads[r, :, HQ + HKV :].transpose(0, 1)
    torch.testing.assert_close(k_buf, ref_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_buf, ref_v)
    expected = attention(qk[:, :, :HQ].contiguous(), k_buf, v_buf).view(R * T, HQ * D)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_bf16_outputs_round_to_nearest_even_as_aten_does():
    """The glue's own fp32 -> bf16 rounding against ATen's, on ties, subnormals, overflow and NaN: silu(128)
    is exactly 128 (e^-128 is 0 in the kernel's exponential), so silu_mul_cast writes bf16(128 * up)."""
    special = torch.tensor([(1.0 + 2**-8) / 128, (1.0 + 3 * 2**-8) / 128, -(1.0 + 2**-8) / 128, 2**-137,
                            -(2**-140), 3.4e38, float("inf"), float("-inf"), 0.0, -0.0, 1e-45, float("nan")])
    up = torch.cat([special, torch.randn(4084, generator=torch.Generator().manual_seed(7)) * 100])
    gate_up = torch.cat([torch.full_like(up, 128.0), up])[None]
    got, want = silu_mul_cast(gate_up, torch.bfloat16)[0], (128.0 * up).bfloat16()
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().sum() == 1
    assert torch.equal(got[~got.isnan()].view(torch.int16), want[~want.isnan()].view(torch.int16))


def test_the_kernels_threads_follow_the_engine_not_omp_num_threads(counting_sdsat_dir):
    """Ray sets OMP_NUM_THREADS to 1 in a replica with a fractional CPU share: the kernels take their thread
    count from the engine (torch's), and their results do not depend on it."""
    from models.engine.kernels import q4_linear, set_threads

    g = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 256, (8, 4, 4, 16, 4), generator=g, dtype=torch.uint8)  # 8 tiles of 16, K = 128
    d, m = (torch.randn(2, 8, 4, 16, generator=g) * 0.05).half().view(torch.int16)
    x = torch.randn(5, 128, generator=g)
    try:
        assert set_threads(1) == 1
        one = q4_linear(x, codes, d, m, 120)
        if set_threads(2) != 2:
            pytest.skip("the kernels were built without OpenMP (the compiler lacked -fopenmp): one thread always")
        assert torch.equal(q4_linear(x, codes, d, m, 120), one)
    finally:
        set_threads(torch.get_num_threads())
    code = ("import sys, torch; torch.set_num_threads(2)\n"
            "from models.engine import Engine, EngineConfig\n"
            "from models.engine.kernels import _library\n"
            "Engine.from_pretrained(sys.argv[1], EngineConfig(method='ar', k=0, dtype='float32', max_context=64))\n"
            "print(_library().sdsat_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(counting_sdsat_dir)], env=env, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_a_helper_thread_runs_its_parallel_regions_alone():
    """serial_openmp_here: the calling thread's tensor ops run without OpenMP workers (one team beside the
    engine's made decoding ~2x slower), even after a large op (torch's lazy per-thread set-up would reset
    it), and the engine's thread keeps its count."""
    import threading

    from models.engine.kernels import serial_openmp_here

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # what an engine sets (a count torch's per-thread set-up hands new threads)
    seen = {}

    def helper():
        seen["serial"] = serial_openmp_here()
        x = torch.randn(2048, 2048)
        torch.stack([x, x]).sum()  # a parallel copy and reduction, were OpenMP allowed here
        seen["threads"] = torch.get_num_threads()

    t = threading.Thread(target=helper)
    try:
        t.start()
        t.join()
        assert seen == {"serial": True, "threads": 1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
