"""Width-invariant CPU kernels (kernels.c, built once per host, called with ctypes): attention over
the slot KV cache and dense fp32/bf16 projections.

Speculative decoding is lossless only if a verify row computes the same bits as the 1-token forward
of the same token at the same position. Library kernels do not promise that: SDPA's flash attention
and the oneDNN/MKL GEMMs under it pick their blocking and micro-kernels from the number of rows, the
key length and the CPU, so a verify row can come out a few ULPs away from the same row decoded
alone (enough to flip greedy tokens in bf16), and whether it does differs between Intel and AMD hosts
and between GEMM sizes (fp32 `F.linear` of one row differs from the same row among two on an Intel
Xeon here). kernels.c computes every row on its own in one fixed order of IEEE operations, so a row's
bits depend on its inputs only: not on the forward's width, the batch, the key buffer's length or the
CPU (the AVX-512, AVX2 and portable paths give the same bits; a test compares them). The MLP's
silu(gate) * up runs here too (ATen's vectorised and scalar exponentials differ on some hosts, and which
one an element gets depends on where a thread's chunk ends). The int4 projections (the GGUF's Q4_1
blocks) and the Q8_0 LM head run here as llama.cpp computes them, against int8 activations
(models/weights/quant.py), and a whole int4 forward runs in one call (sdsat_forward_q4).

The shared library is compiled with the system C compiler (`cc`, or $CC) into the model cache folder,
keyed by the source's hash, the first time it is needed (`make setup` does it up front; under a
second). Where there is no compiler, `kernel_unavailable()` says why, the engine falls back to the
library kernels, and its start-up self-check (models/engine/invariance.py) says whether speculation
stays lossless on that host.

    attention = Attention(slots, start, local, scale)   # once per forward
    out = attention(q, k_buf, v_buf)                      # per layer: q [R, T, Hq, D] -> fp32
    y = linear(x, weight)                                 # x [M, K], weight [N, K] -> [M, N]
    h = silu_mul_cast(gate_up, torch.float32)             # [M, 2I] -> silu(gate) * up [M, I]
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")


def _flags() -> list[str]:
    # -ffp-contract=off: the compiler fuses no multiply-add on its own; the kernel's fmaf calls are the
    # only fused operations, and IEEE 754 rounds those exactly whatever instruction implements them.
    flags = ["-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno"]
    if platform.machine() in ("x86_64", "AMD64") and {"avx2", "fma"} <= _cpu_flags():
        flags += ["-mavx2", "-mfma"]  # faster portable code; the same bits without them (fmaf is exact)
    return flags


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))


def _library_path() -> Path:
    from models.weights.base_model import cache_root

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(_flags()).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"sdsat-kernels-{platform.machine()}-{digest}.so"


def build() -> Path:
    """Compile kernels.c into the cache folder (once per source and host architecture); its path."""
    path = _library_path()
    if path.exists():
        return path
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (cc, gcc or clang; or set CC)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # built aside, then moved: replicas race safely
        out = Path(tmp) / path.name
        try:  # OpenMP: attention's (sequence, kv head) units on PyTorch's own thread pool (the same libgomp)
            subprocess.run([compiler, *_flags(), "-fopenmp", str(SOURCE), "-o", str(out), "-lm"], check=True,
                           capture_output=True, text=True)
        except subprocess.CalledProcessError:  # a compiler without OpenMP: one thread, the same bits
            subprocess.run([compiler, *_flags(), str(SOURCE), "-o", str(out), "-lm"], check=True,
                           capture_output=True, text=True)
        os.replace(out, path)
    return path


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        return None, f"the width-invariant kernels could not be built: {detail.strip()[:300]}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.sdsat_attend.argtypes = [ptr, i64, i64, i64, i64, i64, ptr, ptr, ctypes.c_int, i64, ptr, ptr, ptr,
                                 ctypes.c_float, ptr]
    lib.sdsat_attend.restype = ctypes.c_int
    lib.sdsat_linear.argtypes = [ptr, i64, i64, ptr, ctypes.c_int, i64, ptr]
    lib.sdsat_linear.restype = None
    flag, f32 = ctypes.c_int, ctypes.c_float
    lib.sdsat_add_norm.argtypes = [ptr, i64, i64, ptr, flag, ptr, f32, ptr, flag]
    lib.sdsat_add_norm.restype = None
    lib.sdsat_rope_attend.argtypes = [ptr, flag, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, flag, i64, ptr,
                                      ptr, ptr, f32, ptr, flag]
    lib.sdsat_rope_attend.restype = ctypes.c_int
    lib.sdsat_set_threads.argtypes = [ctypes.c_int]
    lib.sdsat_set_threads.restype = None
    lib.sdsat_threads.argtypes = []
    lib.sdsat_threads.restype = ctypes.c_int
    lib.sdsat_silu_mul_cast.argtypes = [ptr, flag, i64, i64, ptr, flag]
    lib.sdsat_silu_mul_cast.restype = None
    lib.sdsat_q4_linear.argtypes = [ptr, i64, i64, ptr, ptr, ptr, i64, ptr]
    lib.sdsat_q4_linear.restype = ctypes.c_int
    lib.sdsat_q8_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr]
    lib.sdsat_q8_linear.restype = ctypes.c_int
    lib.sdsat_forward_q4.argtypes = [ptr, i64, i64, i64, ptr, ptr, f32, f32, f32, ptr, ptr, ptr, flag, i64, ptr, ptr,
                                     ptr, f32, ptr, ptr, ptr, i64, ptr, flag, i64, f32]
    lib.sdsat_forward_q4.restype = ctypes.c_int
    lib.sdsat_lora_rows.argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, flag, i64, i64, i64, f32]
    lib.sdsat_lora_rows.restype = None
    lib.sdsat_vector_path.argtypes = []
    lib.sdsat_vector_path.restype = ctypes.c_int
    return lib, None


def set_threads(n: int) -> int:
    """The kernels' threads, for every thread that calls them (0: OpenMP's default, from $OMP_NUM_THREADS).
    Returns the count in force; 1 where the kernels are unavailable or built without OpenMP."""
    lib, _ = _load()
    if lib is None:
        return 1
    lib.sdsat_set_threads(int(n))
    return lib.sdsat_threads()


def serial_openmp_here() -> bool:
    """Make the parallel regions of torch ops the calling thread runs execute on that thread alone (the
    kernels' own loops name their thread count, set_threads, so they are not for helper threads). For
    helper threads that touch tensors beside a running engine, such as a cache writer: libgomp keeps a
    team of workers for every thread that starts a parallel region, and once a process has more OpenMP
    threads than CPUs its workers stop spinning between regions, which made a 2-thread int4 engine about
    2x slower per token (services/serve/engine_runner.py). Sets the calling thread's OpenMP thread count
    only (omp_set_num_threads is per thread); False where no libgomp is loaded."""
    try:  # by its SONAME: the libgomp already in the process (torch's), which the kernels share
        gomp = ctypes.CDLL("libgomp.so.1", mode=getattr(os, "RTLD_NOLOAD", 0) | ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    torch.get_num_threads()  # first: torch's lazy per-thread set-up would reset the count to torch's own
    gomp.omp_set_num_threads(1)
    return True


def vector_path() -> str:
    """The kernels' code path on this host: avx512-vnni, avx512, avx2 or portable (capped by $SDSAT_KERNELS),
    or "unavailable" when they could not be built. Reports name it beside the CPU."""
    lib, _ = _load()
    return "unavailable" if lib is None else ("portable", "avx2", "avx512", "avx512-vnni")[lib.sdsat_vector_path()]


def kernel_unavailable() -> str | None:
    """Why the kernel cannot run here (no compiler, build error), or None."""
    return _load()[1]


class Attention:
    """One forward's attention calls: the rows' layout is converted once, then each layer calls
    `__call__` with its queries and cache buffers.

    slots, start: [R] (each sequence's cache row and committed length); local: [R, T, T] bool (which
    of the forward's T new columns each of its rows sees); scale: the softmax scale."""

    def __init__(self, slots: torch.Tensor, start: torch.Tensor, local: torch.Tensor, scale: float):
        self._lib = _library()
        self._fn = self._lib.sdsat_attend
        self.slots = slots.to(torch.int64).contiguous()
        self.start = start.to(torch.int64).contiguous()
        self.local = local.to(torch.uint8).contiguous()
        self.scale = scale
        # how far into the buffers the rows reach: checked against each layer's buffers without a reduction
        self._columns = int((self.start + self.local.shape[1]).max())
        self._top_slot = int(self.slots.max())

    def __call__(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        """q [R, T, Hq, D] (any float dtype), k_buf / v_buf one layer's cache [slots, Hkv, C, D] (fp32 or
        bf16, contiguous) holding the forward's new keys and values -> [R, T, Hq, D] fp32."""
        _check_buffers(k_buf, v_buf)
        q = q.float().contiguous()
        R, T, Hq, D = q.shape
        _, Hkv, C, _ = k_buf.shape
        if self._columns > C or self._top_slot >= k_buf.shape[0]:
            raise ValueError("the forward's rows reach past the KV buffers")
        out = torch.empty_like(q)
        status = self._fn(q.data_ptr(), R, T, Hq, Hkv, D, k_buf.data_ptr(), v_buf.data_ptr(),
                          int(k_buf.dtype == torch.bfloat16), C, self.slots.data_ptr(), self.start.data_ptr(),
                          self.local.data_ptr(), self.scale, out.data_ptr())
        if status != 0:
            raise MemoryError("kernels.c could not allocate its scratch memory")
        return out


    def rope_attend(self, qkv: torch.Tensor, heads: int, kv_heads: int, rope: tuple[torch.Tensor, torch.Tensor],
                    positions: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                    out_dtype: torch.dtype) -> torch.Tensor:
        """The fused layer's attention: qkv [R*T, (Hq + 2 Hkv) D] (bf16 or fp32, contiguous) of a layer's fused
        projection -> RoPE (rope: cos, sin [P, D] fp32 tables; positions [R*T] int64), the new keys and
        values written into k_buf / v_buf at the forward's columns, attention as `__call__` ->
        [R*T, Hq D] in out_dtype (bf16 or fp32)."""
        _check_buffers(k_buf, v_buf)
        D = k_buf.shape[-1]
        C = k_buf.shape[2]
        if self._columns > C or self._top_slot >= k_buf.shape[0]:
            raise ValueError("the forward's rows reach past the KV buffers")
        R, T = self.local.shape[:2]
        out = torch.empty(qkv.shape[0], heads * D, dtype=out_dtype)
        cos, sin = rope
        status = self._lib.sdsat_rope_attend(
            qkv.data_ptr(), int(qkv.dtype == torch.bfloat16), R, T, heads, kv_heads, D, cos.data_ptr(),
            sin.data_ptr(), positions.data_ptr(), k_buf.data_ptr(), v_buf.data_ptr(),
            int(k_buf.dtype == torch.bfloat16), C, self.slots.data_ptr(), self.start.data_ptr(),
            self.local.data_ptr(), self.scale, out.data_ptr(), int(out_dtype == torch.bfloat16))
        if status != 0:
            raise MemoryError("kernels.c could not allocate its scratch memory")
        return out


    def forward_q4(self, x: torch.Tensor, plan: Q4Plan, rope: tuple[torch.Tensor, torch.Tensor],
                   positions: torch.Tensor, sat_rows: torch.Tensor | None = None) -> torch.Tensor:
        """A whole int4 forward in one call (kernels.c's sdsat_forward_q4): x [R*T, H] fp32 embeddings
        (becomes the residual stream) -> the final norm's output [R*T, H] fp32. sat_rows: the flat indices
        of this forward's SAT rows, which get the plan's adapter LoRA (the plan must have one)."""
        if sat_rows is not None and plan.lora is None:
            raise ValueError("SAT rows need a plan made with the adapter's LoRA")
        R, T = self.local.shape[:2]
        if self._columns > plan.columns or self._top_slot >= plan.slots:
            raise ValueError("the forward's rows reach past the KV buffers")
        hidden = torch.empty_like(x)
        cos, sin = rope
        status = self._lib.sdsat_forward_q4(
            x.data_ptr(), R, T, plan.layers, plan.table, plan.dims, *plan.eps, cos.data_ptr(), sin.data_ptr(),
            positions.data_ptr(), plan.kv_bf16, plan.columns, self.slots.data_ptr(), self.start.data_ptr(),
            self.local.data_ptr(), self.scale, plan.final.data_ptr(), hidden.data_ptr(),
            None if sat_rows is None else sat_rows.data_ptr(), 0 if sat_rows is None else sat_rows.numel(),
            None if sat_rows is None else plan.lora, plan.lora_format, plan.rank, plan.lora_scale)
        if status != 0:
            raise MemoryError("kernels.c could not allocate its scratch memory")
        return hidden


class Q4Plan:
    """The pointers sdsat_forward_q4 reads, per layer (see kernels.c), gathered once per engine: the
    tensors behind them are held here so they stay alive."""

    def __init__(self, layers: list[list[torch.Tensor]], dims: tuple[int, ...], eps: tuple[float, float, float],
                 final: torch.Tensor, lora: list[list[torch.Tensor | None]] | None = None, rank: int = 0,
                 lora_scale: float = 0.0, lora_int8: bool = False):
        """eps: the input, post-attention and final norms' epsilons. lora: per layer the fp32 A and B of q, k,
        v, o, gate, up and down (None where not adapted; all bf16 or all fp32), a SAT adapter's
        (models/weights/adapter.py); lora_int8: kernels.c reads them as int8 codes (pack_lora), else as they are."""
        self.tensors = [t for row in layers for t in row] + [final]
        for t in self.tensors:
            if not t.is_contiguous() or t.device.type != "cpu":
                raise ValueError("sdsat_forward_q4 reads contiguous CPU tensors")
        self.layers = len(layers)
        self.table = (ctypes.c_void_p * (16 * len(layers)))(*[t.data_ptr() for row in layers for t in row])
        self.dims = (ctypes.c_int64 * len(dims))(*dims)
        self.eps, self.final = eps, final
        k_buf = layers[0][14]
        _check_buffers(*[row[i] for row in layers for i in (14, 15)])
        self.kv_bf16 = int(k_buf.dtype == torch.bfloat16)
        self.slots, self.columns = k_buf.shape[0], k_buf.shape[2]
        self.lora, self.rank, self.lora_scale, self.lora_format = None, rank, lora_scale, 0
        if lora is not None:
            held = [t for row in lora for t in row if t is not None]
            _check_buffers(*held)  # contiguous CPU tensors of one dtype, fp32 or bf16
            self.lora_format = LORA_INT8 if lora_int8 else int(held[0].dtype == torch.bfloat16)
            if any(t.shape[0] != rank for t in held[::2]) or any(t.shape[1] != rank for t in held[1::2]):
                raise ValueError("every LoRA part must have the plan's rank")  # kernels.c sizes its scratch by it
            packed = pack_lora(lora, int8=lora_int8)
            self.tensors += [t for row in packed for t in row if t is not None]
            self.lora = (ctypes.c_void_p * (14 * len(lora)))(*[None if t is None else t.data_ptr()
                                                               for row in packed for t in row])


LORA_INT8 = 2  # kernels.c's format of LoRA weights: 0 fp32, 1 bf16, 2 int8 codes with scales


def quantize_lora_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [n, m] -> (codes [n, m] int8, scales [n] fp32): a scale per row, its largest magnitude / 127 (1 for a
    row of zeros), codes round(w / scale)."""
    w = w.float()
    if not torch.isfinite(w).all():
        raise ValueError("the LoRA has non-finite weights")
    scales = w.abs().amax(dim=1) / 127.0
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    return torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8), scales


def _tiles(b: torch.Tensor) -> torch.Tensor:
    """B [out, r] as kernels.c's tiles [ceil(out / 16), r, 16], zero rows padding the last."""
    out, rank = b.shape
    padded = torch.zeros(-(-out // 16) * 16, rank, dtype=b.dtype)
    padded[:out] = b
    return padded.view(-1, 16, rank).transpose(1, 2).contiguous()


def _pack_int8(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One part as bytes (kernels.c's format 2): A as [r fp32 scales][K][r] codes; B as tiles of [16 fp32 scales
    (one per output; 1 for padding)][r][16] codes."""
    codes, scales = quantize_lora_int8(a)  # a scale per output of A
    at = torch.cat([scales.view(torch.uint8), codes.t().contiguous().view(torch.uint8).reshape(-1)])
    bc, bs = quantize_lora_int8(b)  # a scale per output of B
    tiles = _tiles(bc)  # [tiles, r, 16]
    padded = torch.ones(tiles.shape[0] * 16, dtype=torch.float32)
    padded[: b.shape[0]] = bs
    bt = torch.cat([padded.view(-1, 16).view(torch.uint8), tiles.view(torch.uint8).reshape(tiles.shape[0], -1)], dim=1)
    return at, bt.reshape(-1)


def pack_lora(lora: list[list[torch.Tensor | None]], int8: bool = False) -> list[list[torch.Tensor | None]]:
    """A SAT adapter's LoRA as kernels.c's lora_rows reads it: per layer and part, A [r, K] as A^T [K, r] and
    B [out, r] as tiles [ceil(out / 16), r, 16] (zero rows pad the last), all in one buffer in the order the
    forward reads them, so the adapter streams front to back. A copy of the adapter's weights (9.8 MB for
    SmolLM2's in bf16), made once per plan. int8: as int8 codes with a scale per output (_pack_int8; 4.9 MB),
    the parts then uint8 byte views."""
    parts = []
    for row in lora:
        for a, b in zip(row[::2], row[1::2], strict=True):
            if a is None:
                parts += [None, None]
                continue
            if int8:
                parts += list(_pack_int8(a, b))
                continue
            parts += [a.t().contiguous(), _tiles(b)]
    flat = torch.cat([t.reshape(-1) for t in parts if t is not None])  # one block: a single sequential stream
    views, offset = [], 0
    for t in parts:
        if t is None:
            views.append(None)
            continue
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return [views[i : i + 14] for i in range(0, len(views), 14)]


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
             out_dtype: torch.dtype) -> torch.Tensor | None:
    """The fused layer's residual step: x [M, H] fp32 (contiguous, updated in place) += delta ([M, H], bf16
    or fp32, contiguous; None: nothing to add), then RMSNorm(x) * weight ([H] fp32) in out_dtype (bf16 or
    fp32); weight None: the add only (returns None)."""
    out = torch.empty(x.shape, dtype=out_dtype) if weight is not None else None
    _library().sdsat_add_norm(x.data_ptr(), x.shape[0], x.shape[1], None if delta is None else delta.data_ptr(),
                              int(delta is not None and delta.dtype == torch.bfloat16),
                              None if weight is None else weight.data_ptr(), eps,
                              None if out is None else out.data_ptr(), int(out_dtype == torch.bfloat16))
    return out


def silu_mul_cast(gate_up: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """silu(gate) * up of gate_up [M, 2I] (bf16 or fp32, contiguous) -> [M, I] in out_dtype."""
    M, I2 = gate_up.shape
    out = torch.empty(M, I2 // 2, dtype=out_dtype)
    _library().sdsat_silu_mul_cast(gate_up.data_ptr(), int(gate_up.dtype == torch.bfloat16), M, I2 // 2,
                                   out.data_ptr(), int(out_dtype == torch.bfloat16))
    return out


def q4_linear(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] @ Q4_1 blocks in tiles of 16 outputs (codes [tiles, K/32, 4, 16, 4] uint8; d, m [tiles, K/32,
    16], fp16 bits in int16; models/weights/quant.py's Int4Linear) -> [M, n] fp32, llama.cpp's arithmetic
    (kernels.c)."""
    x32 = x.float().contiguous()
    M, K = x32.shape
    out = torch.empty(M, n, dtype=torch.float32)
    status = _library().sdsat_q4_linear(x32.data_ptr(), M, K, codes.data_ptr(), d.data_ptr(), m.data_ptr(), n,
                                        out.data_ptr())
    if status != 0:
        raise MemoryError("kernels.c could not allocate its scratch memory")
    return out


def q8_linear(x: torch.Tensor, codes: torch.Tensor, d: torch.Tensor, n: int) -> torch.Tensor:
    """x [M, K] @ Q8_0 blocks in tiles of 16 outputs (codes [tiles, K/32, 8, 16, 4] uint8 = q + 128; d [tiles,
    K/32, 16] fp16 bits in int16; models/weights/quant.py's Int8Linear) -> [M, n] fp32 (kernels.c)."""
    x32 = x.float().contiguous()
    M, K = x32.shape
    out = torch.empty(M, n, dtype=torch.float32)
    if _library().sdsat_q8_linear(x32.data_ptr(), M, K, codes.data_ptr(), d.data_ptr(), n, out.data_ptr()) != 0:
        raise MemoryError("kernels.c could not allocate its scratch memory")
    return out


def lora_rows(x: torch.Tensor, rows: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, y: torch.Tensor,
              col: int = 0, int8: bool = False) -> None:
    """y[rows, col:col + out] += scale · B A x[rows], in place, as sdsat_forward_q4 adds a SAT adapter's LoRA
    (tests): x [M, K] and y [M, width] fp32 contiguous, a [r, K] and b [out, r] of one dtype, fp32 or bf16;
    int8: as int8 codes (pack_lora)."""
    if not (x.dtype == y.dtype == torch.float32 and x.is_contiguous() and y.is_contiguous()):
        raise ValueError("lora_rows reads x and writes y as contiguous fp32")
    if a.shape[0] != b.shape[1] or a.shape[1] != x.shape[1] or col + b.shape[0] > y.shape[1]:
        raise ValueError("lora_rows: A [r, K], B [out, r] must match x [M, K] and fit y's columns from col")
    (at, bt), = [[t for t in row if t is not None] for row in pack_lora([[a, b] + [None] * 12], int8=int8)]
    rows = rows.to(torch.int64).contiguous()
    fmt = LORA_INT8 if int8 else int(a.dtype == torch.bfloat16)
    _library().sdsat_lora_rows(x.data_ptr(), x.shape[1], y.data_ptr(), y.shape[1], rows.data_ptr(), rows.numel(),
                               at.data_ptr(), bt.data_ptr(), fmt, a.shape[0], col, b.shape[0], scale)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ weight [N, K]^T with each output row computed on its own in one fixed order (the
    weight fp32 or bf16, contiguous) -> [M, N] in x's dtype."""
    lib = _library()
    _check_buffers(weight)
    x32 = x.float().contiguous()
    M, K = x32.shape
    out = torch.empty(M, weight.shape[0], dtype=torch.float32)
    lib.sdsat_linear(x32.data_ptr(), M, K, weight.data_ptr(), int(weight.dtype == torch.bfloat16), weight.shape[0],
                     out.data_ptr())
    return out.to(x.dtype)


def supports(dtype: torch.dtype) -> bool:
    """The dtypes the kernels read: fp32 and bf16 (weights, activations, KV)."""
    return dtype in (torch.float32, torch.bfloat16)


def _library() -> ctypes.CDLL:
    lib, why = _load()
    if lib is None:
        raise RuntimeError(why)
    return lib


def _check_buffers(*tensors: torch.Tensor) -> None:
    if any(not supports(t.dtype) or t.dtype != tensors[0].dtype or not t.is_contiguous() or t.device.type != "cpu"
           for t in tensors):
        raise ValueError("the kernels read contiguous CPU tensors of one dtype, fp32 or bf16")


if __name__ == "__main__":  # `python -m models.engine.kernels`: build at set-up
    import sys

    try:
        print(build())
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:  # the engine falls back; the self-check says so
        print(f"width-invariant kernels not built: {getattr(e, 'stderr', '') or e}", file=sys.stderr)
