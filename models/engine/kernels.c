/* Width-invariant kernels for the engine's decode and verify forwards (built and loaded by kernels.py):
 * attention over the slot KV cache (sdsat_attend) and dense fp32/bf16 projections (sdsat_linear).
 *
 * Dense projections: y[m][n] = x[m] . w[n], lane l (of 16) accumulating k = l, l+16, ... with fmaf,
 * the lanes folded as below; a row's result depends on that row and the weights only. The MLP's
 * silu(gate) * up (sdsat_silu_mul_cast) uses the exponential below too: ATen's vectorised and scalar
 * exponentials differ in the last bit, and which one an element gets depends on thread chunking.
 *
 * Attention: each query row is computed on its own, over exactly the keys it sees, taken in ascending column
 * order, with one fixed order of floating-point operations:
 *   - q.k: lane l (of 16) accumulates d = l, l+16, l+32, ... with fmaf; the lanes fold as
 *     l += l+8, l += l+4, l += l+2, l += l+1;
 *   - softmax: the maximum (exact), an exponential written here (libm's differs across versions and
 *     CPUs), and the sum accumulated in 16 lanes by visible-key index, folded the same way;
 *   - the values: out[d] = fmaf(p_i, v_i[d], out[d]) key after key, then one division by the sum.
 * So a row's bits depend on its query and its visible keys only: not on how many rows the forward
 * has, which other rows share it, the length of the aligned key buffer, or the CPU. IEEE 754 rounds
 * fmaf, +, * and / exactly whatever instruction implements them, and the file is compiled with
 * -ffp-contract=off so the compiler fuses nothing on its own. The AVX-512 and AVX2 code below computes
 * the same operations as the portable code, sixteen or eight lanes at a time; which runs is decided once
 * per process from the CPU (simd_level), and a test compares the three paths.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define LANES 16

#ifdef _OPENMP
#include <omp.h>
/* Threads of the kernels' parallel loops: set by the engine from its torch thread count (sdsat_set_threads), so
 * they follow `--threads` / a replica's cpu_threads. OpenMP's own default comes from $OMP_NUM_THREADS, which Ray
 * sets to 1 for a replica with a fractional CPU share, and omp_set_num_threads would reach only the calling
 * thread, not the replica's engine thread. 0: OpenMP's default. Each element's arithmetic is the same on any
 * number of threads (a thread takes whole rows, heads or tiles). */
static int kernel_threads = 0;
#define THREADS (kernel_threads > 0 ? kernel_threads : omp_get_max_threads())
#endif

void sdsat_set_threads(int n) {
#ifdef _OPENMP
    kernel_threads = n > 0 ? n : 0;
#endif
    (void)n;
}

int sdsat_threads(void) {
#ifdef _OPENMP
    return THREADS;
#else
    return 1;
#endif
}

static inline float bf16_to_f32(uint16_t b) {
    union { uint32_t u; float f; } x;
    x.u = (uint32_t)b << 16;
    return x.f;
}

/* exp(x) for x <= 0: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2 and p the degree-7 Taylor polynomial
 * (relative error < 2e-7); 0 below -87 (and wherever 2^n would leave the normal range). */
static inline float exp_nonpositive(float x) {
    const float y = x < -87.0f ? -87.0f : (x > 0.0f ? 0.0f : x);
    const float n = floorf(fmaf(y, 1.44269504088896341f, 0.5f));
    float r = fmaf(0.0f - n, 0.693359375f, y);  /* ln2 in two parts: n * 0.693359375 is exact */
    r = fmaf(0.0f - n, -2.12194440e-4f, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n; n >= -126 here */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

static inline float fold(float *acc) {
    for (int w = LANES / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) acc[l] += acc[l + w];
    return acc[0];
}

static inline float weight_at(const void *w, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

/* out[d] = (sum over visible columns c, ascending, of p[c] * v[c][d]) / sum, one fmaf a term: the
 * prefix [0, prefix) is visible, and new column u when vis[u]. v: rows of D at `base` of the cache buffer
 * (bf16 if bf16). */
static void values_portable(const float *restrict p, const void *v, int bf16, int64_t base, int64_t prefix,
                            const uint8_t *restrict vis, int64_t T, int64_t D, float sum, float *restrict out) {
    memset(out, 0, sizeof(float) * (size_t)D);
    for (int64_t c = 0; c < prefix + T; c++) {
        if (c >= prefix && !vis[c - prefix]) continue;
        for (int64_t d = 0; d < D; d++) out[d] = fmaf(p[c], weight_at(v, bf16, base + c * D + d), out[d]);
    }
    for (int64_t d = 0; d < D; d++) out[d] = out[d] / sum;
}

/* out[j] = scale * q . key[j] for j < n (the keys: rows of D at `base`, bf16 if bf16), each the 16-lane
 * sum folded by fold(). */
static void dots_portable(const float *restrict q, const void *k, int bf16, int64_t base, int64_t n, int64_t D,
                          float scale, float *restrict out) {
    for (int64_t j = 0; j < n; j++) {
        float acc[LANES] = {0};
        for (int64_t d = 0; d < D; d++)
            acc[d % LANES] = fmaf(q[d], weight_at(k, bf16, base + j * D + d), acc[d % LANES]);
        out[j] = fold(acc) * scale;
    }
}

static void linear_portable(const float *restrict x, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N,
                            float *restrict out, int64_t ldo) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            float acc[LANES] = {0};
            for (int64_t k = 0; k < K; k++)
                acc[k % LANES] = fmaf(x[m * K + k], weight_at(w, w_bf16, n * K + k), acc[k % LANES]);
            out[m * ldo + n] = fold(acc);
        }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#include <cpuid.h>
#define HAVE_X86 1

__attribute__((target("avx512f"))) static inline __m512 load16(const void *w, int bf16, int64_t offset) {
    if (bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + offset));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)w + offset);
}

/* values_portable with the accumulators in registers (D a multiple of 16, at most 256). */
__attribute__((target("avx512f"))) static void values_avx512(const float *restrict p, const void *v, int bf16,
                                                             int64_t base, int64_t prefix, const uint8_t *restrict vis,
                                                             int64_t T, int64_t D, float sum, float *restrict out) {
    __m512 acc[16];
    const int64_t blocks = D / 16;
    for (int64_t b = 0; b < blocks; b++) acc[b] = _mm512_setzero_ps();
    for (int64_t c = 0; c < prefix + T; c++) {
        if (c >= prefix && !vis[c - prefix]) continue;
        const __m512 pc = _mm512_set1_ps(p[c]);
        for (int64_t b = 0; b < blocks; b++) acc[b] = _mm512_fmadd_ps(pc, load16(v, bf16, base + c * D + 16 * b), acc[b]);
    }
    const __m512 vsum = _mm512_set1_ps(sum);
    for (int64_t b = 0; b < blocks; b++) _mm512_storeu_ps(out + 16 * b, _mm512_div_ps(acc[b], vsum));
}

/* Sixteen keys' lane sums acc[0..15] -> one vector of their folds, key j in lane j. The shuffles
 * pair lanes exactly as fold() does: l + 8, then l + 4, then l + 2, then l + 1. */
__attribute__((target("avx512f"))) static inline __m512 fold16(__m512 *acc) {
    __m512 v[8], w[4], x[2];
    for (int k = 0; k < 8; k++)
        v[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[k], acc[k + 8], 0x44), _mm512_shuffle_f32x4(acc[k], acc[k + 8], 0xEE));
    for (int k = 0; k < 4; k++)
        w[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[k], v[k + 4], 0x88), _mm512_shuffle_f32x4(v[k], v[k + 4], 0xDD));
    for (int k = 0; k < 2; k++)
        x[k] = _mm512_add_ps(_mm512_shuffle_ps(w[k], w[k + 2], 0x44), _mm512_shuffle_ps(w[k], w[k + 2], 0xEE));
    __m512 r = _mm512_add_ps(_mm512_shuffle_ps(x[0], x[1], 0x88), _mm512_shuffle_ps(x[0], x[1], 0xDD));
    /* r holds the keys in lane order 0 2 1 3 | 8 10 9 11 | 4 6 5 7 | 12 14 13 15 */
    const __m512i where = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(where, r);
}

/* The same as dots_portable, sixteen keys at once (D a multiple of 16); a short tile's missing keys
 * repeat its first (their results are dropped). */
__attribute__((target("avx512f"))) static void dots_avx512(const float *restrict q, const void *k, int bf16,
                                                           int64_t base, int64_t n, int64_t D, float scale,
                                                           float *restrict out) {
    __m512 acc[16];
    for (int64_t j = 0; j < 16; j++) {
        const int64_t row = base + (j < n ? j : 0) * D;
        __m512 a = _mm512_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k, bf16, row + d), a);
        acc[j] = a;
    }
    float all[16];
    _mm512_storeu_ps(all, _mm512_mul_ps(fold16(acc), _mm512_set1_ps(scale)));
    memcpy(out, all, sizeof(float) * (size_t)n);
}

/* s[c] = exp_nonpositive(s[c] - top) for c < L: the same operations, sixteen at a time. */
__attribute__((target("avx512f"))) static inline __m512 exp16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.0f), zero = _mm512_setzero_ps();
    {
        const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
        __m512 y = _mm512_mask_blend_ps(under, x, lo);
        y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, zero, _CMP_GT_OQ), y, zero);
        const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(y, _mm512_set1_ps(1.44269504088896341f),
                                                              _mm512_set1_ps(0.5f)),
                                              _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
        __m512 r = _mm512_fmadd_ps(_mm512_sub_ps(zero, n), _mm512_set1_ps(0.693359375f), y);
        r = _mm512_fmadd_ps(_mm512_sub_ps(zero, n), _mm512_set1_ps(-2.12194440e-4f), r);
        __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
        const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
        const __m512 e = _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
        return _mm512_mask_blend_ps(under, e, zero);
    }
}

__attribute__((target("avx512f"))) static void exp_avx512(float *s, int64_t L, float top) {
    const __m512 vtop = _mm512_set1_ps(top);
    int64_t c = 0;
    for (; c + 16 <= L; c += 16) _mm512_storeu_ps(s + c, exp16(_mm512_sub_ps(_mm512_loadu_ps(s + c), vtop)));
    for (; c < L; c++) s[c] = exp_nonpositive(s[c] - top);
}

/* out[i] = silu(gate[i]) * up[i], sixteen at a time, with the operations of silu_mul_row below. */
__attribute__((target("avx512f"))) static void silu_mul_avx512(const float *gate, const float *up, int64_t I,
                                                               float *out) {
    const __m512 zero = _mm512_setzero_ps(), one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) {
        const __m512 x = _mm512_loadu_ps(gate + i);
        const __mmask16 negative = _mm512_cmp_ps_mask(x, zero, _CMP_LT_OQ);
        const __m512 e = exp16(_mm512_mask_blend_ps(negative, _mm512_sub_ps(zero, x), x));  /* e^-|x| */
        const __m512 num = _mm512_mask_blend_ps(negative, x, _mm512_mul_ps(x, e));
        _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_div_ps(num, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i)));
    }
    for (; i < I; i++) {
        const float x = gate[i], e = exp_nonpositive(x < 0.0f ? x : 0.0f - x);
        out[i] = (x < 0.0f ? x * e / (1.0f + e) : x / (1.0f + e)) * up[i];
    }
}
/* linear_portable, sixteen outputs at a time (K a multiple of 16). */
__attribute__((target("avx512f"))) static void linear_avx512(const float *restrict x, int64_t M, int64_t K,
                                                             const void *w, int w_bf16, int64_t N,
                                                             float *restrict out, int64_t ldo) {
    for (int64_t n0 = 0; n0 < N; n0 += 16) {
        const int64_t nn = N - n0 < 16 ? N - n0 : 16;
        for (int64_t m = 0; m < M; m++) {
            __m512 acc[16];
            for (int j = 0; j < 16; j++) acc[j] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                const __m512 xv = _mm512_loadu_ps(x + m * K + k);
                for (int j = 0; j < 16; j++)  /* a short block's missing outputs repeat its first row */
                    acc[j] = _mm512_fmadd_ps(xv, load16(w, w_bf16, (n0 + (j < nn ? j : 0)) * K + k), acc[j]);
            }
            float all[16];
            _mm512_storeu_ps(all, fold16(acc));
            memcpy(out + m * ldo + n0, all, sizeof(float) * (size_t)nn);
        }
    }
}

#endif

/* ---- The same operations with AVX2 (CPUs without AVX-512: AMD Zen 1-3, Intel before Skylake-SP) ----------
 * Sixteen lanes as two 8-float vectors: lane l of the 16 in vector l / 8, slot l % 8. */
#ifdef HAVE_X86
#define AVX2_TARGET __attribute__((target("avx2,fma,f16c")))

AVX2_TARGET static inline __m256 load8(const void *w, int bf16, int64_t offset) {
    if (bf16) {
        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + offset));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)w + offset);
}

/* fold() of the 16 lanes lo (0..7), hi (8..15): l += l+8, l += l+4, l += l+2, l += l+1. */
AVX2_TARGET static inline float fold_avx2(__m256 lo, __m256 hi) {
    const __m256 a = _mm256_add_ps(lo, hi);
    const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

/* values_portable, 8 outputs a vector (D a multiple of 16, at most 256). */
AVX2_TARGET static void values_avx2(const float *restrict p, const void *v, int bf16, int64_t base, int64_t prefix,
                                    const uint8_t *restrict vis, int64_t T, int64_t D, float sum,
                                    float *restrict out) {
    __m256 acc[32];
    const int64_t blocks = D / 8;
    for (int64_t b = 0; b < blocks; b++) acc[b] = _mm256_setzero_ps();
    for (int64_t c = 0; c < prefix + T; c++) {
        if (c >= prefix && !vis[c - prefix]) continue;
        const __m256 pc = _mm256_set1_ps(p[c]);
        for (int64_t b = 0; b < blocks; b++) acc[b] = _mm256_fmadd_ps(pc, load8(v, bf16, base + c * D + 8 * b), acc[b]);
    }
    const __m256 vsum = _mm256_set1_ps(sum);
    for (int64_t b = 0; b < blocks; b++) _mm256_storeu_ps(out + 8 * b, _mm256_div_ps(acc[b], vsum));
}

/* dots_portable, one key at a time (D a multiple of 16). */
AVX2_TARGET static void dots_avx2(const float *restrict q, const void *k, int bf16, int64_t base, int64_t n,
                                  int64_t D, float scale, float *restrict out) {
    for (int64_t j = 0; j < n; j++) {
        const int64_t row = base + j * D;
        __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
        for (int64_t d = 0; d < D; d += 16) {
            lo = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(k, bf16, row + d), lo);
            hi = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), load8(k, bf16, row + d + 8), hi);
        }
        out[j] = fold_avx2(lo, hi) * scale;
    }
}

/* exp_nonpositive, eight at a time. */
AVX2_TARGET static inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f), zero = _mm256_setzero_ps();
    const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    __m256 y = _mm256_blendv_ps(x, lo, under);
    y = _mm256_blendv_ps(y, zero, _mm256_cmp_ps(y, zero, _CMP_GT_OQ));
    const __m256 n = _mm256_round_ps(_mm256_fmadd_ps(y, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)),
                                     _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fmadd_ps(_mm256_sub_ps(zero, n), _mm256_set1_ps(0.693359375f), y);
    r = _mm256_fmadd_ps(_mm256_sub_ps(zero, n), _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), zero, under);
}

AVX2_TARGET static void exp_avx2(float *s, int64_t L, float top) {
    const __m256 vtop = _mm256_set1_ps(top);
    int64_t c = 0;
    for (; c + 8 <= L; c += 8) _mm256_storeu_ps(s + c, exp8(_mm256_sub_ps(_mm256_loadu_ps(s + c), vtop)));
    for (; c < L; c++) s[c] = exp_nonpositive(s[c] - top);
}

AVX2_TARGET static void silu_mul_avx2(const float *gate, const float *up, int64_t I, float *out) {
    const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= I; i += 8) {
        const __m256 x = _mm256_loadu_ps(gate + i);
        const __m256 negative = _mm256_cmp_ps(x, zero, _CMP_LT_OQ);
        const __m256 e = exp8(_mm256_blendv_ps(_mm256_sub_ps(zero, x), x, negative));  /* e^-|x| */
        const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), negative);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(num, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
    }
    for (; i < I; i++) {
        const float x = gate[i], e = exp_nonpositive(x < 0.0f ? x : 0.0f - x);
        out[i] = (x < 0.0f ? x * e / (1.0f + e) : x / (1.0f + e)) * up[i];
    }
}

/* linear_portable, one output at a time (K a multiple of 16). */
AVX2_TARGET static void linear_avx2(const float *restrict x, int64_t M, int64_t K, const void *w, int w_bf16,
                                    int64_t N, float *restrict out, int64_t ldo) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
            for (int64_t k = 0; k < K; k += 16) {
                lo = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), load8(w, w_bf16, n * K + k), lo);
                hi = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k + 8), load8(w, w_bf16, n * K + k + 8), hi);
            }
            out[m * ldo + n] = fold_avx2(lo, hi);
        }
}
#endif

/* The vector path that runs: 2 AVX-512 (with VNNI for the quantized projections where the CPU has it), 1 AVX2
 * with FMA and F16C (checked: a hypervisor can hide any of them), 0 the portable C. SDSAT_KERNELS=avx2 or
 * =portable caps it (the tests compare the three). Each path computes the same operations in the same order:
 * the same bits. */
static int simd_level(void) {
    static int level = -1;  /* a race here writes the same value twice */
    if (level < 0) {
        int best = 0;
#ifdef HAVE_X86
        __builtin_cpu_init();
        unsigned int a, b, c, d;  /* F16C: CPUID leaf 1, ECX bit 29 (not every compiler's cpu_supports knows it) */
        const int f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 29));
        if (f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = 1;
        if (best && __builtin_cpu_supports("avx512f")) best = 2;
#endif
        const char *cap = getenv("SDSAT_KERNELS");
        if (cap != NULL && strcmp(cap, "portable") == 0) best = 0;
        if (cap != NULL && strcmp(cap, "avx2") == 0 && best > 1) best = 1;
        level = best;
    }
    return level;
}

/* 2 or 1: the AVX-512 or AVX2 code runs for rows of D (a multiple of 16); 0: the portable code. */
static int vector_path(int64_t D) { return D % LANES == 0 ? simd_level() : 0; }

/* x: [M, K] fp32, w: [N, K] (bf16 if w_bf16, else fp32), contiguous -> out [M, N] fp32. */
void sdsat_linear(const float *x, int64_t M, int64_t K, const void *w, int w_bf16, int64_t N, float *out) {
    /* blocks of 16 outputs spread over the threads (OpenMP, PyTorch's pool) where the call is large enough to
     * repay a parallel region; each output is computed by one thread in the order above, so the split changes
     * no bits (the dense projections of the fp32/bf16 lean forward, and a SAT adapter's LoRA on SAT rows) */
    const int64_t blocks = (N + 15) / 16;
    const int path = vector_path(K);
    const size_t width = w_bf16 ? sizeof(uint16_t) : sizeof(float);
#ifdef _OPENMP
    #pragma omp parallel for num_threads(THREADS) schedule(static) if (blocks > 1 && M * N * K >= 8192)
#endif
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = 16 * b, nn = N - n0 < 16 ? N - n0 : 16;
        const void *wb = (const char *)w + (size_t)(n0 * K) * width;
#ifdef HAVE_X86
        if (path == 2) {
            linear_avx512(x, M, K, wb, w_bf16, nn, out + n0, N);
            continue;
        }
        if (path == 1) {
            linear_avx2(x, M, K, wb, w_bf16, nn, out + n0, N);
            continue;
        }
#endif
        linear_portable(x, M, K, wb, w_bf16, nn, out + n0, N);
    }
    (void)path;
}

/* Sequence r's rows for query head h (of kv head h / group); see sdsat_attend. Reads the cache buffers in
 * place (bf16 converted to fp32 as it is read: exact). */
static int attend_unit(const float *q, int64_t r, int64_t h, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                       const void *k_buf, const void *v_buf, int kv_bf16, int64_t C, const int64_t *slot,
                       const int64_t *start, const uint8_t *local, float scale, float *out, int path) {
    const int64_t L = start[r] + T, prefix = start[r], g = h / (Hq / Hkv);
    const int64_t base = (slot[r] * Hkv + g) * C * D;  /* this kv head's [C, D] block */
    const uint8_t *vis = local + r * T * T;  /* [T, T] */
    float *scores = malloc(sizeof(float) * (size_t)(T * L));  /* [T, L] */
    if (scores == NULL) return 1;  /* attend() reports it */
    for (int64_t t = 0; t < T; t++) {
        const uint8_t *seen_by_t = vis + t * T;
        int64_t Tt = T;
        while (Tt > 0 && !seen_by_t[Tt - 1]) Tt--;
        const int64_t Lt = prefix + Tt;  /* past row t's last visible column */
        const float *qv = q + ((r * T + t) * Hq + h) * D;
        float *s = scores + t * L, *o = out + ((r * T + t) * Hq + h) * D;
        for (int64_t c0 = 0; c0 < Lt; c0 += 16) {
            const int64_t n = Lt - c0 < 16 ? Lt - c0 : 16;
#ifdef HAVE_X86
            if (path == 2) dots_avx512(qv, k_buf, kv_bf16, base + c0 * D, n, D, scale, s + c0);
            else if (path == 1) dots_avx2(qv, k_buf, kv_bf16, base + c0 * D, n, D, scale, s + c0);
            else
#endif
                dots_portable(qv, k_buf, kv_bf16, base + c0 * D, n, D, scale, s + c0);
        }
        /* softmax over the visible columns: the prefix, then the new columns row t sees */
        float top = -INFINITY;  /* a maximum is exact in any order */
        for (int64_t c = 0; c < prefix; c++) top = s[c] > top ? s[c] : top;
        for (int64_t u = 0; u < Tt; u++)
            if (seen_by_t[u] && s[prefix + u] > top) top = s[prefix + u];
#ifdef HAVE_X86
        if (path == 2) exp_avx512(s, Lt, top);
        else if (path == 1) exp_avx2(s, Lt, top);
        else
#endif
            for (int64_t c = 0; c < Lt; c++) s[c] = exp_nonpositive(s[c] - top);
        float lanes[LANES] = {0};
        int64_t seen = 0;
        for (; seen + LANES <= prefix; seen += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] += s[seen + l];
        for (int64_t c = seen; c < Lt; c++)
            if (c < prefix || seen_by_t[c - prefix]) lanes[seen++ % LANES] += s[c];
        const float sum = fold(lanes);
#ifdef HAVE_X86
        if (path == 2) values_avx512(s, v_buf, kv_bf16, base, prefix, seen_by_t, Tt, D, sum, o);
        else if (path == 1) values_avx2(s, v_buf, kv_bf16, base, prefix, seen_by_t, Tt, D, sum, o);
        else
#endif
            values_portable(s, v_buf, kv_bf16, base, prefix, seen_by_t, Tt, D, sum, o);
    }
    free(scores);
    return 0;
}

static int attend(const float *q, int64_t R, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const void *k_buf,
                 const void *v_buf, int kv_bf16, int64_t C, const int64_t *slot, const int64_t *start,
                 const uint8_t *local, float scale, float *out) {
    int failed = 0;
    const int path = D <= 256 ? vector_path(D) : 0;  /* values_* keep D / 16 or D / 8 accumulators; decided once */
    /* one unit of work per (sequence, query head), each computed whole by one thread in the order below, so
     * the threads change no bits; OpenMP's pool is the one PyTorch already runs (same libgomp) */
#ifdef _OPENMP
    #pragma omp parallel for num_threads(THREADS) schedule(static) reduction(| : failed) if (R * Hq > 1)
#endif
    for (int64_t unit = 0; unit < R * Hq; unit++)
        failed |= attend_unit(q, unit / Hq, unit % Hq, T, Hq, Hkv, D, k_buf, v_buf, kv_bf16, C, slot, start,
                              local, scale, out, path);
    return failed ? -1 : 0;
}

/* q: [R, T, Hq, D] fp32 (T new rows for each of R sequences, after RoPE); k_buf, v_buf: one layer's
 * cache buffers [slots, Hkv, C, D] (bf16 if kv_bf16, else fp32), contiguous. Sequence r lives in
 * cache row slot[r], whose committed keys are columns [0, start[r]); its T new columns follow, and
 * its row t sees new column u when local[(r * T + t) * T + u] is 1. out: [R, T, Hq, D] fp32.
 * Returns 0, or -1 when scratch memory could not be had. */
int sdsat_attend(const float *q, int64_t R, int64_t T, int64_t Hq, int64_t Hkv, int64_t D, const void *k_buf,
                 const void *v_buf, int kv_bf16, int64_t C, const int64_t *slot, const int64_t *start,
                 const uint8_t *local, float scale, float *out) {
    return attend(q, R, T, Hq, Hkv, D, k_buf, v_buf, kv_bf16, C, slot, start, local, scale, out);
}

/* ---- The fused layer's glue (models/engine/llama.py, `LlamaForward` with the kernels) ----------------
 * Between its four projections a decoder layer runs three calls here instead of some thirty small
 * library ops: sdsat_add_norm (residual add, then RMSNorm), sdsat_rope_attend (RoPE, the KV write,
 * attention) and sdsat_silu_mul_cast. The residual stream stays fp32; the projections' inputs and
 * outputs are bf16 (int4 and int8 kernels) or fp32 (dense), said by the *_bf16 flags. Every row is
 * computed on its own in one fixed order, as above. bf16 results are rounded to nearest even, as
 * ATen's casts are. */

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* src [n] (bf16 or fp32) -> dst [n] fp32. */
static void load_row(const void *src, int bf16, int64_t offset, int64_t n, float *restrict dst) {
    if (bf16) {
        const uint16_t *restrict h = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(h[i]);
    } else {
        memcpy(dst, (const float *)src + offset, sizeof(float) * (size_t)n);
    }
}

/* src [n] fp32 -> dst [n] (bf16, rounded to nearest even, or fp32). */
static void store_row(void *dst, int bf16, int64_t offset, int64_t n, const float *restrict src) {
    if (bf16) {
        uint16_t *restrict h = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < n; i++) h[i] = f32_to_bf16(src[i]);
    } else {
        memcpy((float *)dst + offset, src, sizeof(float) * (size_t)n);
    }
}

/* For each of the M rows of x [M, H] (fp32, updated in place): x += delta (when delta is not NULL; [M, H],
 * bf16 if delta_bf16), then out = x * (1 / sqrt(mean(x^2) + eps)) * w, the mean's sum taken in 16 lanes
 * folded as fold(). out [M, H]: bf16 if out_bf16, else fp32; NULL skips the norm (the last add). */
void sdsat_add_norm(float *x, int64_t M, int64_t H, const void *delta, int delta_bf16, const float *w, float eps,
                    void *out, int out_bf16) {
    float *d = malloc(sizeof(float) * (size_t)H);
    if (d == NULL) abort();  /* H floats: only an exhausted heap fails here */
    for (int64_t m = 0; m < M; m++) {
        float *restrict row = x + m * H;
        if (delta != NULL) {
            load_row(delta, delta_bf16, m * H, H, d);
            for (int64_t i = 0; i < H; i++) row[i] = row[i] + d[i];
        }
        if (out == NULL) continue;
        float lanes[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= H; i += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] = fmaf(row[i + l], row[i + l], lanes[l]);
        for (; i < H; i++) lanes[i % LANES] = fmaf(row[i], row[i], lanes[i % LANES]);
        const float inv = 1.0f / sqrtf(fold(lanes) / (float)H + eps);
        for (int64_t j = 0; j < H; j++) d[j] = (row[j] * inv) * w[j];
        store_row(out, out_bf16, m * H, H, d);
    }
    free(d);
}

/* RoPE (the rotate-half form) of one head vector v [D] in place: v[d] cos[d] - v[d + D/2] sin[d],
 * v[d + D/2] cos[d + D/2] + v[d] sin[d + D/2]. */
static inline void rope(float *restrict v, const float *restrict cos, const float *restrict sin, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < half; d++) {
        const float a = v[d], b = v[d + half];
        v[d] = a * cos[d] - b * sin[d];
        v[d + half] = b * cos[d + half] + a * sin[d + half];
    }
}

/* One layer's attention from its fused q/k/v projection. qkv: [R, T, (Hq + 2 Hkv) D] (q heads, k heads, v
 * heads; bf16 if qkv_bf16). cos, sin: [P, D] fp32 tables; positions: [R, T]. The new keys (after RoPE) and
 * values are written into the cache buffers (layout as sdsat_attend's) at columns start[r] + t of row
 * slot[r], then every row attends as sdsat_attend does. out: [R, T, Hq D] (bf16 if out_bf16).
 * Returns 0, or -1 when scratch memory could not be had. */
int sdsat_rope_attend(const void *qkv, int qkv_bf16, int64_t R, int64_t T, int64_t Hq, int64_t Hkv, int64_t D,
                      const float *cos, const float *sin, const int64_t *positions, void *k_buf, void *v_buf,
                      int kv_bf16, int64_t C, const int64_t *slot, const int64_t *start, const uint8_t *local,
                      float scale, void *out, int out_bf16) {
    const int64_t width = (Hq + 2 * Hkv) * D, N = R * T;
    float *q = malloc(sizeof(float) * (size_t)(N * Hq * D));
    float *o = malloc(sizeof(float) * (size_t)(N * Hq * D));
    float *row = malloc(sizeof(float) * (size_t)width);
    if (!q || !o || !row) {
        free(q); free(o); free(row);
        return -1;
    }
    for (int64_t r = 0; r < R; r++)
        for (int64_t t = 0; t < T; t++) {
            const int64_t n = r * T + t;
            const float *c = cos + positions[n] * D, *s = sin + positions[n] * D;
            load_row(qkv, qkv_bf16, n * width, width, row);
            for (int64_t h = 0; h < Hq + Hkv; h++) rope(row + h * D, c, s, D);  /* q heads, then k heads */
            memcpy(q + n * Hq * D, row, sizeof(float) * (size_t)(Hq * D));
            for (int64_t g = 0; g < Hkv; g++) {
                const int64_t at = ((slot[r] * Hkv + g) * C + start[r] + t) * D;
                store_row(k_buf, kv_bf16, at, D, row + (Hq + g) * D);
                store_row(v_buf, kv_bf16, at, D, row + (Hq + Hkv + g) * D);
            }
        }
    const int status = attend(q, R, T, Hq, Hkv, D, k_buf, v_buf, kv_bf16, C, slot, start, local, scale, o);
    if (status == 0) store_row(out, out_bf16, 0, N * Hq * D, o);
    free(q); free(o); free(row);
    return status;
}

/* out[i] = silu(gate[i]) * up[i] for gate_up rows [M, 2I] (gate: the first I columns, up: the last I; bf16
 * or fp32) -> out [M, I] (bf16 or fp32): silu(x) = x / (1 + e^-x), written with exp_nonpositive of -|x| on
 * both sides of 0. Element by element, so no row depends on where a thread's chunk of the tensor ends. */
void sdsat_silu_mul_cast(const void *gate_up, int in_bf16, int64_t M, int64_t I, void *out, int out_bf16) {
    float *row = malloc(sizeof(float) * (size_t)(3 * I));
    if (row == NULL) abort();
    for (int64_t m = 0; m < M; m++) {
        load_row(gate_up, in_bf16, m * 2 * I, 2 * I, row);
#ifdef HAVE_X86
        if (simd_level() == 2) silu_mul_avx512(row, row + I, I, row + 2 * I);
        else if (simd_level() == 1) silu_mul_avx2(row, row + I, I, row + 2 * I);
        else
#endif
            for (int64_t i = 0; i < I; i++) {
                const float x = row[i], e = exp_nonpositive(x < 0.0f ? x : 0.0f - x);
                row[2 * I + i] = (x < 0.0f ? x * e / (1.0f + e) : x / (1.0f + e)) * row[I + i];
            }
        store_row(out, out_bf16, m * I, I, row + 2 * I);
    }
    free(row);
}

/* ---- Q4_1 projections (models/weights/quant.py, Int4Linear), as llama.cpp computes them ----------------
 * Weights: the GGUF's own blocks of 32 (w = d * q + m, q in 0..15, d and m fp16). Activations: each row's
 * blocks of 32 quantized to int8 as llama.cpp's Q8_1 does (dx = max|x| / 127, xq = round(x / dx),
 * sx = dx * sum(xq)). A block's product is then exact integer arithmetic, and
 *     y[r][n] = sum over blocks b, ascending, of  (d * dx) * isum + m * sx,   isum = sum_i q_i * xq_i,
 * two fmaf per block in that order. Every (row, output) is computed on its own in this fixed order, so
 * a row's result depends on that row only: not on the call's rows, the tiling, the threads or the CPU
 * (the AVX-512 VNNI, AVX2 and portable paths give the same bits; a test compares them).
 *
 * The codes are stored in tiles of 16 outputs: per (tile, block) 256 bytes as 4 vectors of [16 outputs][4
 * bytes], byte j of output n in vector g holding q[n][4g + j] (low nibble) and q[n][4g + 16 + j] (high
 * nibble), so one vpdpbusd multiplies 4 codes of 16 outputs by 4 int8 activations; d and m are [tile,
 * block, 16] fp16. The rows' quantized activations are shared by every output, and each (tile, block)
 * is unpacked once for up to 4 rows. */

static inline float half_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);  /* inf, NaN */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* a subnormal half is a normal float */
        uint32_t e = 113u, m = man;
        while (!(m & 0x400u)) {
            m <<= 1;
            e--;
        }
        bits = sign | (e << 23) | ((m & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One block's scale from its largest magnitude (NaNs ignored): d = amax / 127 and its inverse (0 for a zero or
 * subnormal block, whose codes are then 0). */
static inline float q8_inverse(float amax, float *d) {
    *d = amax / 127.0f;
    const float id = *d != 0.0f ? 1.0f / *d : 0.0f;
    return isfinite(id) ? id : 0.0f;
}

/* One 32-value block in plain C: codes q = clamp(nearbyint(v * id)) (round half to even, the default rounding
 * mode; NaN -> 0), returns their sum. */
static int32_t quantize_block_portable(const float *v, int8_t *xq, float *d) {
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) {
        const float a = fabsf(v[i]);
        amax = a > amax ? a : amax;
    }
    const float id = q8_inverse(amax, d);
    int32_t sum = 0;
    for (int i = 0; i < 32; i++) {
        float q = nearbyintf(v[i] * id);
        q = q >= -127.0f ? (q <= 127.0f ? q : 127.0f) : (q < -127.0f ? -127.0f : 0.0f);  /* NaN -> 0 */
        xq[i] = (int8_t)q;
        sum += (int32_t)q;
    }
    return sum;
}

#if defined(HAVE_X86)
/* quantize_block_portable, sixteen lanes at a time. The same bits: a maximum is exact in any order (maxps returns its
 * second operand where the first is NaN, so NaNs are skipped as `a > amax` skips them), v * id is one rounded
 * product either way, roundscale to nearest is nearbyint's round half to even, and the integer sum is exact. */
__attribute__((target("avx512f"))) static int32_t quantize_block_avx512(const float *v, int8_t *xq, float *d) {
    const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16), zero = _mm512_setzero_ps();
    const __m512 top = _mm512_max_ps(_mm512_abs_ps(v1), _mm512_max_ps(_mm512_abs_ps(v0), zero));
    const __m512 id = _mm512_set1_ps(q8_inverse(_mm512_reduce_max_ps(top), d));
    const __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    __m512i sum = _mm512_setzero_si512();
    for (int h = 0; h < 2; h++) {
        const __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(h ? v1 : v0, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __mmask16 number = _mm512_cmp_ps_mask(q, q, _CMP_ORD_Q);
        const __m512i c = _mm512_cvtps_epi32(_mm512_maskz_mov_ps(number, _mm512_min_ps(_mm512_max_ps(q, lo), hi)));
        _mm_storeu_si128((__m128i *)(xq + 16 * h), _mm512_cvtepi32_epi8(c));
        sum = _mm512_add_epi32(sum, c);
    }
    return _mm512_reduce_add_epi32(sum);
}

/* The same with AVX2: four vectors of eight. */
AVX2_TARGET static int32_t quantize_block_avx2(const float *v, int8_t *xq, float *d) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 w[4], top = _mm256_setzero_ps();
    for (int j = 0; j < 4; j++) {
        w[j] = _mm256_loadu_ps(v + 8 * j);
        top = _mm256_max_ps(_mm256_and_ps(w[j], magnitude), top);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    const __m256 id = _mm256_set1_ps(q8_inverse(_mm_cvtss_f32(m), d));
    const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    __m256i c[4], sum = _mm256_setzero_si256();
    for (int j = 0; j < 4; j++) {
        const __m256 q = _mm256_round_ps(_mm256_mul_ps(w[j], id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 number = _mm256_cmp_ps(q, q, _CMP_ORD_Q);
        c[j] = _mm256_cvtps_epi32(_mm256_and_ps(number, _mm256_min_ps(_mm256_max_ps(q, lo), hi)));
        sum = _mm256_add_epi32(sum, c[j]);
    }
    /* int32 -> int8 (every code is in [-127, 127]): the packs interleave 128-bit lanes, the permute undoes it */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)xq, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}
#endif

/* Row blocks of x [M, K] -> xq [M, K] int8, dx and sx [M, K / 32]: every path the same bits. */
static void q8_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx, int32_t *isx) {
    const int path = simd_level();
    for (int64_t r = 0; r < M; r++)
        for (int64_t b = 0; b < K / 32; b++) {
            const int64_t at = r * (K / 32) + b;
            const float *v = x + r * K + 32 * b;
            int8_t *q = xq + r * K + 32 * b;
            float d;
            int32_t sum;
#if defined(HAVE_X86)
            if (path == 2) sum = quantize_block_avx512(v, q, &d);
            else if (path == 1) sum = quantize_block_avx2(v, q, &d);
            else
#endif
                sum = quantize_block_portable(v, q, &d);
            dx[at] = d;
            sx[at] = d * (float)sum;
            isx[at] = sum;
        }
    (void)path;
}

/* Code i (0..31) of output j (0..15) in one (tile, block)'s 256 bytes. */
static inline int q4_code(const uint8_t *block, int j, int i) {
    const int g = (i % 16) / 4, byte = block[g * 64 + j * 4 + i % 4];
    return i < 16 ? byte & 0xf : byte >> 4;
}

#if defined(HAVE_X86)
#define Q4_TARGET __attribute__((target("avx512f,avx512bw,avx512vnni,f16c")))
typedef int32_t aliased_i32 __attribute__((may_alias, aligned(1)));  /* 4 int8 activations read as one */

/* The weights stream from DRAM once per forward: each (tile, block) step asks for the codes and the scales of
 * the block 8 ahead in its stream (a tile's blocks, then the next tile's, are contiguous): PREFETCH = 2 KiB of
 * Q4_1 codes, 4 KiB of Q8_0, so the loads are in flight while the current block computes. About 9% faster
 * decoding than none on an AMD EPYC (Zen 4) host (4 and 8 KiB did no better), the bits unchanged (a prefetch
 * reads nothing into the results and never faults, past the end of an array included). */
#define PREFETCH 2048
static inline void prefetch_block(const uint8_t *block, int64_t bytes, const uint16_t *d, const uint16_t *m,
                                  int64_t at) {
    const uint8_t *ahead = block + bytes / 256 * PREFETCH;  /* 8 blocks of `bytes` ahead */
    for (int64_t line = 0; line < bytes; line += 64) _mm_prefetch((const char *)(ahead + line), _MM_HINT_T0);
    _mm_prefetch((const char *)(d + at + PREFETCH / 16), _MM_HINT_T0);
    if (m != NULL) _mm_prefetch((const char *)(m + at + PREFETCH / 16), _MM_HINT_T0);
}
/* Tile t (16 outputs) for rows [r0, r0 + rows), rows <= 4. */
Q4_TARGET static void q4_tile_vnni(const int8_t *xq, const float *dx, const float *sx, int64_t r0, int rows,
                                   int64_t K, const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t t,
                                   float *out, int64_t N) {
    const int64_t B = K / 32;
    const __m512i low = _mm512_set1_epi8(0x0f);
    __m512 y[4];
    for (int r = 0; r < 4; r++) y[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *block = codes + (t * B + b) * 256;
        prefetch_block(block, 256, d, m, (t * B + b) * 16);
        __m512i c[8];
        for (int g = 0; g < 4; g++) {
            const __m512i v = _mm512_loadu_si512((const void *)(block + 64 * g));
            c[g] = _mm512_and_si512(v, low);                          /* codes 4g .. 4g + 3 */
            c[g + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low); /* codes 16 + 4g .. */
        }
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + (t * B + b) * 16)));
        const __m512 mw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + (t * B + b) * 16)));
        for (int r = 0; r < rows; r++) {
            const aliased_i32 *x4 = (const aliased_i32 *)(xq + (r0 + r) * K + 32 * b);  /* 8 groups of 4 */
            __m512i isum = _mm512_setzero_si512();  /* the broadcasts fold into vpdpbusd's memory operand */
            for (int g = 0; g < 8; g++) isum = _mm512_dpbusd_epi32(isum, c[g], _mm512_set1_epi32(x4[g]));
            const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx[(r0 + r) * B + b]));
            y[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), y[r]);
            y[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(sx[(r0 + r) * B + b]), y[r]);
        }
    }
    const int64_t n0 = t * 16;
    const __mmask16 keep = N - n0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1u);
    for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(out + (r0 + r) * N + n0, keep, y[r]);
}
#endif

static int use_vnni(void) {
#if defined(HAVE_X86)
    /* every AVX-512F CPU has F16C (and older compilers reject "f16c" as a feature name here) */
    return simd_level() == 2 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* ---- Q8_0 projections (the LM head; models/weights/quant.py, Int8Linear) ---------------------------------
 * The GGUF's Q8_0 blocks: 32 int8 codes and an fp16 d per block (w = d * q). With the rows' Q8_1 activations
 * as above, y[r][n] = sum over blocks, ascending, of fmaf(d * dx, isum, .), isum = sum_i q_i * xq_i (exact).
 * For VNNI (unsigned times signed bytes) the codes are stored plus 128, and 128 * sum(xq) is taken back
 * out of each block's integer sum. Tiles of 16 outputs: per (tile, block) 512 bytes as 8 vectors of [16
 * outputs][4 bytes], byte j of output n in vector g holding q[n][4g + j] + 128; d is [tile, block, 16]. */

/* Tile t of a Q4_1 (q4) or Q8_0 projection in plain C: the operations of q4_tile_vnni / q8_tile_vnni, in
 * their order (the integer sums are exact, so the order of their terms does not matter). */
static void tile_portable(int q4, const int8_t *xq, const float *dx, const float *sx, const int32_t *isx, int64_t M,
                          int64_t K, const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t t,
                          float *out, int64_t N) {
    const int64_t B = K / 32, bytes = q4 ? 256 : 512;
    for (int64_t r = 0; r < M; r++)
        for (int j = 0; j < 16 && t * 16 + j < N; j++) {
            float y = 0.0f;
            for (int64_t b = 0; b < B; b++) {
                const uint8_t *block = codes + (t * B + b) * bytes;
                const int64_t at = (t * B + b) * 16 + j;
                int32_t isum = 0;
                for (int i = 0; i < 32; i++) {
                    const int32_t code = q4 ? q4_code(block, j, i) : block[(i / 4) * 64 + j * 4 + i % 4];
                    isum += code * (int32_t)xq[r * K + 32 * b + i];
                }
                if (q4) {
                    y = fmaf(half_to_f32(d[at]) * dx[r * B + b], (float)isum, y);
                    y = fmaf(half_to_f32(m[at]), sx[r * B + b], y);
                } else {
                    isum -= 128 * isx[r * B + b];
                    y = fmaf(half_to_f32(d[at]) * dx[r * B + b], (float)isum, y);
                }
            }
            out[r * N + t * 16 + j] = y;
        }
}

#if defined(HAVE_X86)
Q4_TARGET static void q8_tile_vnni(const int8_t *xq, const float *dx, const int32_t *isx, int64_t r0, int rows,
                                   int64_t K, const uint8_t *codes, const uint16_t *d, int64_t t, float *out,
                                   int64_t N) {
    const int64_t B = K / 32;
    __m512 y[4];
    for (int r = 0; r < 4; r++) y[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < B; b++) {
        const uint8_t *block = codes + (t * B + b) * 512;
        prefetch_block(block, 512, d, NULL, (t * B + b) * 16);
        __m512i c[8];
        for (int g = 0; g < 8; g++) c[g] = _mm512_loadu_si512((const void *)(block + 64 * g));
        const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + (t * B + b) * 16)));
        for (int r = 0; r < rows; r++) {
            const aliased_i32 *x4 = (const aliased_i32 *)(xq + (r0 + r) * K + 32 * b);
            __m512i isum = _mm512_setzero_si512();
            for (int g = 0; g < 8; g++) isum = _mm512_dpbusd_epi32(isum, c[g], _mm512_set1_epi32(x4[g]));
            isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(128 * isx[(r0 + r) * B + b]));
            const __m512 scale = _mm512_mul_ps(dw, _mm512_set1_ps(dx[(r0 + r) * B + b]));
            y[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), y[r]);
        }
    }
    const int64_t n0 = t * 16;
    const __mmask16 keep = N - n0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1u);
    for (int r = 0; r < rows; r++) _mm512_mask_storeu_ps(out + (r0 + r) * N + n0, keep, y[r]);
}
#endif

#if defined(HAVE_X86)
/* q4_tile_vnni and q8_tile_vnni without VNNI: vpmaddubsw multiplies unsigned codes by signed activations into
 * int16 pair sums, which add up without saturating (a Q4_1 pair is at most 2 * 15 * 127 in size, eight groups
 * 30480; a Q8_0 code's two nibbles are multiplied apart for the same reason), then vpmaddwd sums them into
 * each output's int32. The same exact integer sums, so the same bits. Half h of the tile: outputs 8h..8h+7. */
AVX2_TARGET static void store_rows8(const __m256 *y, int rows, int64_t r0, int64_t n0, float *out, int64_t N) {
    for (int r = 0; r < rows; r++) {
        if (N - n0 >= 8) {
            _mm256_storeu_ps(out + (r0 + r) * N + n0, y[r]);
        } else {
            float all[8];
            _mm256_storeu_ps(all, y[r]);
            memcpy(out + (r0 + r) * N + n0, all, sizeof(float) * (size_t)(N - n0));
        }
    }
}

/* One (tile, block) for `rows` rows (a constant where it is inlined, so the accumulators stay in registers):
 * each group's codes are unpacked once and multiplied by every row's activations. */
__attribute__((always_inline)) AVX2_TARGET static inline void q4_block_avx2(
        const int8_t *xq, const float *dx, const float *sx, int64_t r0, const int rows, int64_t K, int64_t B,
        int64_t b, const uint8_t *block, const uint16_t *d, const uint16_t *m, int64_t at, __m256 (*y)[2]) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    __m256i p[4][2];
    for (int r = 0; r < rows; r++) p[r][0] = p[r][1] = _mm256_setzero_si256();
    for (int g = 0; g < 4; g++) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(block + 64 * g));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(block + 64 * g + 32));
        const __m256i c0 = _mm256_and_si256(v0, low), c1 = _mm256_and_si256(v1, low);
        const __m256i h0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low), h1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
        for (int r = 0; r < rows; r++) {
            const aliased_i32 *x4 = (const aliased_i32 *)(xq + (r0 + r) * K + 32 * b);
            const __m256i xl = _mm256_set1_epi32(x4[g]), xh = _mm256_set1_epi32(x4[g + 4]);
            p[r][0] = _mm256_add_epi16(p[r][0], _mm256_add_epi16(_mm256_maddubs_epi16(c0, xl), _mm256_maddubs_epi16(h0, xh)));
            p[r][1] = _mm256_add_epi16(p[r][1], _mm256_add_epi16(_mm256_maddubs_epi16(c1, xl), _mm256_maddubs_epi16(h1, xh)));
        }
    }
    const __m256 d0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + at)));
    const __m256 d1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + at + 8)));
    const __m256 m0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + at)));
    const __m256 m1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + at + 8)));
    for (int r = 0; r < rows; r++) {
        const __m256 vdx = _mm256_set1_ps(dx[(r0 + r) * B + b]), vsx = _mm256_set1_ps(sx[(r0 + r) * B + b]);
        y[r][0] = _mm256_fmadd_ps(_mm256_mul_ps(d0, vdx), _mm256_cvtepi32_ps(_mm256_madd_epi16(p[r][0], ones)), y[r][0]);
        y[r][1] = _mm256_fmadd_ps(_mm256_mul_ps(d1, vdx), _mm256_cvtepi32_ps(_mm256_madd_epi16(p[r][1], ones)), y[r][1]);
        y[r][0] = _mm256_fmadd_ps(m0, vsx, y[r][0]);
        y[r][1] = _mm256_fmadd_ps(m1, vsx, y[r][1]);
    }
}

/* The Q8_0 twin: each group's codes split into nibbles once, for every row. */
__attribute__((always_inline)) AVX2_TARGET static inline void q8_block_avx2(
        const int8_t *xq, const float *dx, const int32_t *isx, int64_t r0, const int rows, int64_t K, int64_t B,
        int64_t b, const uint8_t *block, const uint16_t *d, int64_t at, __m256 (*y)[2]) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        __m256i lo[4], hi[4];
        for (int r = 0; r < rows; r++) lo[r] = hi[r] = _mm256_setzero_si256();
        for (int g = 0; g < 8; g++) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(block + 64 * g + 32 * h));
            const __m256i cl = _mm256_and_si256(v, low), ch = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int r = 0; r < rows; r++) {
                const __m256i x = _mm256_set1_epi32(((const aliased_i32 *)(xq + (r0 + r) * K + 32 * b))[g]);
                lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(cl, x));
                hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(ch, x));
            }
        }
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + at + 8 * h)));
        for (int r = 0; r < rows; r++) {
            __m256i isum = _mm256_add_epi32(_mm256_madd_epi16(lo[r], ones), _mm256_slli_epi32(_mm256_madd_epi16(hi[r], ones), 4));
            isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(128 * isx[(r0 + r) * B + b]));
            y[r][h] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_set1_ps(dx[(r0 + r) * B + b])), _mm256_cvtepi32_ps(isum), y[r][h]);
        }
    }
}

/* Tile t (16 outputs: two vectors of 8) for rows [r0, r0 + rows), rows <= 4; q4 (Q4_1) or Q8_0 (m NULL). */
AVX2_TARGET static void tile_avx2(int q4, const int8_t *xq, const float *dx, const float *sx, const int32_t *isx,
                                  int64_t r0, int rows, int64_t K, const uint8_t *codes, const uint16_t *d,
                                  const uint16_t *m, int64_t t, float *out, int64_t N) {
    const int64_t B = K / 32;
    __m256 y[4][2];
    for (int r = 0; r < 4; r++) y[r][0] = y[r][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < B; b++) {
        const int64_t at = (t * B + b) * 16;
        prefetch_block(codes + (t * B + b) * (q4 ? 256 : 512), q4 ? 256 : 512, d, q4 ? m : NULL, at);
#define Q_BLOCK(ROWS) do { \
            if (q4) q4_block_avx2(xq, dx, sx, r0, ROWS, K, B, b, codes + (t * B + b) * 256, d, m, at, y); \
            else q8_block_avx2(xq, dx, isx, r0, ROWS, K, B, b, codes + (t * B + b) * 512, d, at, y); \
        } while (0)
        switch (rows) {
            case 1: Q_BLOCK(1); break;
            case 2: Q_BLOCK(2); break;
            case 3: Q_BLOCK(3); break;
            default: Q_BLOCK(4); break;
        }
#undef Q_BLOCK
    }
    for (int h = 0; h < 2 && t * 16 + 8 * h < N; h++) {
        __m256 half[4];
        for (int r = 0; r < rows; r++) half[r] = y[r][h];
        store_rows8(half, rows, r0, t * 16 + 8 * h, out, N);
    }
}
#endif

/* The Q4_1 (q4: codes and m) or Q8_0 (codes + 128, m NULL) projection of x [M, K]: the rows' activations
 * quantized once, then tiles of 16 outputs spread over the threads, up to 4 rows at a time on VNNI.
 * Returns 0, or -1 when scratch memory could not be had. */
static int quantized_linear(int q4, const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                            const uint16_t *m, int64_t N, float *out) {
    int8_t *xq = malloc((size_t)(M * K));
    float *dx = malloc(sizeof(float) * (size_t)(M * (K / 32))), *sx = malloc(sizeof(float) * (size_t)(M * (K / 32)));
    int32_t *isx = malloc(sizeof(int32_t) * (size_t)(M * (K / 32)));
    if (!xq || !dx || !sx || !isx) {
        free(xq); free(dx); free(sx); free(isx);
        return -1;
    }
    q8_rows(x, M, K, xq, dx, sx, isx);
    const int64_t tiles = (N + 15) / 16;
    const int path = use_vnni() ? 2 : (simd_level() >= 1 ? 1 : 0);
#ifdef _OPENMP
    #pragma omp parallel for num_threads(THREADS) schedule(static) if (tiles > 1)
#endif
    for (int64_t t = 0; t < tiles; t++) {
#if defined(HAVE_X86)
        if (path) {
            for (int64_t r0 = 0; r0 < M; r0 += 4) {
                const int rows = M - r0 < 4 ? (int)(M - r0) : 4;
                if (path == 2 && q4) q4_tile_vnni(xq, dx, sx, r0, rows, K, codes, d, m, t, out, N);
                else if (path == 2) q8_tile_vnni(xq, dx, isx, r0, rows, K, codes, d, t, out, N);
                else tile_avx2(q4, xq, dx, sx, isx, r0, rows, K, codes, d, m, t, out, N);
            }
            continue;
        }
#endif
        tile_portable(q4, xq, dx, sx, isx, M, K, codes, d, m, t, out, N);
    }
    (void)path;
    free(xq); free(dx); free(sx); free(isx);
    return 0;
}

/* x: [M, K] fp32 (K a multiple of 32); codes: [ceil(N / 16), K / 32, 256] bytes; d, m: [ceil(N / 16), K / 32,
 * 16] fp16 bits -> out [M, N] fp32. Returns 0, or -1 when scratch memory could not be had. */
int sdsat_q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d,
                    const uint16_t *m, int64_t N, float *out) {
    return quantized_linear(1, x, M, K, codes, d, m, N, out);
}

/* x: [M, K] fp32 (K a multiple of 32); codes: [ceil(N / 16), K / 32, 512] bytes (q + 128); d: [ceil(N / 16),
 * K / 32, 16] fp16 bits -> out [M, N] fp32. Returns 0, or -1 when scratch memory could not be had. */
int sdsat_q8_linear(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *d, int64_t N,
                    float *out) {
    return quantized_linear(0, x, M, K, codes, d, NULL, N, out);
}

/* ---- A SAT adapter's LoRA on SAT rows (models/weights/adapter.py), packed for streaming ------------------
 * y[row, col + o] += (B A x)[o] * s for each SAT row, with A [r, K] packed as A^T [K][r] and B [out, r] as
 * tiles [ceil(out / 16)][r][16] (Q4Plan packs them, zero-padded): each weight stream is read once, front to
 * back, and the vector lanes run over A's r outputs and over B's 16 outputs of a tile. Stage A: t[j] is four
 * fmaf chains over k (k % 4 = 0..3, k ascending; four so the FMAs overlap) summed (c0 + c1) + (c2 + c3).
 * Stage B, tile by tile: d[o] one chain over j ascending; then y + d * s.
 * fmt: the weights' format, 0 fp32, 1 bf16, 2 int8 codes with a scale per output (its largest magnitude / 127):
 * A^T as [r fp32 scales][K][r] codes, B as tiles of [16 fp32 scales][r][16] codes. The chains run over the
 * codes; then t[j] * sa[j], and y + (d * sb[o]) * s. Half the bytes of bf16: a SAT row's LoRA is a stream of
 * weights, and the forward around it already reads memory as fast as the host gives it.
 * The vector paths (r = 16) and the portable one compute the same operations in the same order: the same bits on
 * every host, and a row's result does not depend on which other rows a call computes. */
static inline const void *lora_a_weights(const void *AT, int fmt, int64_t r) {  /* past int8's scales */
    return fmt == 2 ? (const void *)((const float *)AT + r) : AT;
}

/* B's tile `tile`: its r x 16 weights; *scales its 16 scales (int8) or NULL */
static inline const void *lora_b_tile(const void *Bt, int fmt, int64_t r, int64_t tile, const float **scales) {
    if (fmt == 2) {
        const char *tb = (const char *)Bt + tile * (16 * (int64_t)sizeof(float) + r * 16);
        *scales = (const float *)tb;
        return tb + 16 * sizeof(float);
    }
    *scales = NULL;
    return (const char *)Bt + (size_t)(tile * r * 16) * (fmt ? sizeof(uint16_t) : sizeof(float));
}

static inline float lora_weight(const void *w, int fmt, int64_t i) {
    return fmt == 2 ? (float)((const int8_t *)w)[i] : weight_at(w, fmt, i);
}

static void lora_a_portable(const float *x, int64_t K, const int64_t *rows, int64_t n, const void *AT, int fmt,
                            int64_t r, float *t) {
    const void *a = lora_a_weights(AT, fmt, r);
    for (int64_t i = 0; i < n; i++) {
        float *ti = t + i * r;
        const float *xi = x + rows[i] * K;
        for (int64_t j = 0; j < r; j++) {
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t k = 0; k < K; k++) c[k % 4] = fmaf(xi[k], lora_weight(a, fmt, k * r + j), c[k % 4]);
            ti[j] = (c[0] + c[1]) + (c[2] + c[3]);
            if (fmt == 2) ti[j] *= ((const float *)AT)[j];
        }
    }
}

static void lora_b_portable(float *y, int64_t width, const int64_t *rows, int64_t n, const void *Bt, int fmt,
                            int64_t r, int64_t col, int64_t out, float s, const float *t) {
    for (int64_t i = 0; i < n; i++) {
        const float *ti = t + i * r;
        for (int64_t o = 0; o < out; o++) {
            const int64_t lane = o % 16;
            const float *sb;
            const void *b = lora_b_tile(Bt, fmt, r, o / 16, &sb);
            float d = 0.0f;
            for (int64_t j = 0; j < r; j++) d = fmaf(ti[j], lora_weight(b, fmt, j * 16 + lane), d);
            y[rows[i] * width + col + o] += (sb ? d * sb[lane] : d) * s;
        }
    }
}

#ifdef HAVE_X86
__attribute__((target("avx512f"))) static inline __m512 lora_load16(const void *w, int fmt, int64_t offset) {
    if (fmt == 2)
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + offset))));
    return load16(w, fmt, offset);
}

__attribute__((target("avx512f"))) static void lora_a_avx512(const float *x, int64_t K, const int64_t *rows,
                                                             int64_t n, const void *AT, int fmt, float *t) {
    const void *a = lora_a_weights(AT, fmt, 16);
    for (int64_t i0 = 0; i0 < n; i0 += 4) {  /* up to 4 rows share each 16-wide row of A^T */
        const int64_t ni = n - i0 < 4 ? n - i0 : 4;
        __m512 acc[4][4];  /* [row][k % 4]: four independent chains per row, so the FMAs overlap */
        for (int m = 0; m < 4; m++)
            for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            const __m512 w = lora_load16(a, fmt, k * 16);
            for (int m = 0; m < ni; m++)
                acc[m][k % 4] = _mm512_fmadd_ps(_mm512_set1_ps(x[rows[i0 + m] * K + k]), w, acc[m][k % 4]);
        }
        for (int m = 0; m < ni; m++) {
            __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
            if (fmt == 2) sum = _mm512_mul_ps(sum, _mm512_loadu_ps((const float *)AT));
            _mm512_storeu_ps(t + (i0 + m) * 16, sum);
        }
    }
}

__attribute__((target("avx512f"))) static void lora_b_avx512(float *y, int64_t width, const int64_t *rows,
                                                             int64_t n, const void *Bt, int fmt, int64_t col,
                                                             int64_t out, float s, const float *t) {
    const __m512 sv = _mm512_set1_ps(s);
    for (int64_t tile = 0; tile * 16 < out; tile++) {  /* one 16 x 16 tile (512 bytes in bf16) at a time */
        const int64_t nn = out - tile * 16 < 16 ? out - tile * 16 : 16;
        const __mmask16 keep = (__mmask16)((1u << nn) - 1u);
        const float *sb;
        const void *b = lora_b_tile(Bt, fmt, 16, tile, &sb);
        for (int64_t i = 0; i < n; i++) {
            __m512 d = _mm512_setzero_ps();
            for (int j = 0; j < 16; j++)
                d = _mm512_fmadd_ps(_mm512_set1_ps(t[i * 16 + j]), lora_load16(b, fmt, j * 16), d);
            if (sb) d = _mm512_mul_ps(d, _mm512_loadu_ps(sb));
            float *yo = y + rows[i] * width + col + tile * 16;
            _mm512_mask_storeu_ps(yo, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, yo), _mm512_mul_ps(d, sv)));
        }
    }
}

AVX2_TARGET static inline __m256 lora_load8(const void *w, int fmt, int64_t offset) {
    if (fmt == 2)
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + offset))));
    return load8(w, fmt, offset);
}

AVX2_TARGET static void lora_a_avx2(const float *x, int64_t K, const int64_t *rows, int64_t n, const void *AT,
                                    int fmt, float *t) {
    const void *a = lora_a_weights(AT, fmt, 16);
    for (int64_t i0 = 0; i0 < n; i0 += 2) {  /* lanes 0-7 and 8-15 of lora_a_avx512, 2 rows at a time */
        const int64_t ni = n - i0 < 2 ? n - i0 : 2;
        __m256 lo[2][4], hi[2][4];
        for (int m = 0; m < 2; m++)
            for (int c = 0; c < 4; c++) lo[m][c] = hi[m][c] = _mm256_setzero_ps();
        for (int64_t k = 0; k < K; k++) {
            const __m256 wl = lora_load8(a, fmt, k * 16), wh = lora_load8(a, fmt, k * 16 + 8);
            for (int m = 0; m < ni; m++) {
                const __m256 xv = _mm256_set1_ps(x[rows[i0 + m] * K + k]);
                lo[m][k % 4] = _mm256_fmadd_ps(xv, wl, lo[m][k % 4]);
                hi[m][k % 4] = _mm256_fmadd_ps(xv, wh, hi[m][k % 4]);
            }
        }
        for (int m = 0; m < ni; m++) {
            __m256 sl = _mm256_add_ps(_mm256_add_ps(lo[m][0], lo[m][1]), _mm256_add_ps(lo[m][2], lo[m][3]));
            __m256 sh = _mm256_add_ps(_mm256_add_ps(hi[m][0], hi[m][1]), _mm256_add_ps(hi[m][2], hi[m][3]));
            if (fmt == 2) {
                sl = _mm256_mul_ps(sl, _mm256_loadu_ps((const float *)AT));
                sh = _mm256_mul_ps(sh, _mm256_loadu_ps((const float *)AT + 8));
            }
            _mm256_storeu_ps(t + (i0 + m) * 16, sl);
            _mm256_storeu_ps(t + (i0 + m) * 16 + 8, sh);
        }
    }
}

AVX2_TARGET static void lora_b_avx2(float *y, int64_t width, const int64_t *rows, int64_t n, const void *Bt,
                                    int fmt, int64_t col, int64_t out, float s, const float *t) {
    for (int64_t tile = 0; tile * 16 < out; tile++) {
        const int64_t nn = out - tile * 16 < 16 ? out - tile * 16 : 16;
        const float *sb;
        const void *b = lora_b_tile(Bt, fmt, 16, tile, &sb);
        for (int64_t i = 0; i < n; i++) {
            __m256 dl = _mm256_setzero_ps(), dh = _mm256_setzero_ps();
            for (int j = 0; j < 16; j++) {
                const __m256 tv = _mm256_set1_ps(t[i * 16 + j]);
                dl = _mm256_fmadd_ps(tv, lora_load8(b, fmt, j * 16), dl);
                dh = _mm256_fmadd_ps(tv, lora_load8(b, fmt, j * 16 + 8), dh);
            }
            float d[16];
            _mm256_storeu_ps(d, dl);
            _mm256_storeu_ps(d + 8, dh);
            float *yo = y + rows[i] * width + col + tile * 16;
            for (int64_t o = 0; o < nn; o++) yo[o] += (sb ? d[o] * sb[o] : d[o]) * s;
        }
    }
}
#endif

static void lora_a(const float *x, int64_t K, const int64_t *rows, int64_t n, const void *AT, int fmt, int64_t r,
                   float *t) {
#ifdef HAVE_X86
    if (r == 16 && simd_level() == 2) {
        lora_a_avx512(x, K, rows, n, AT, fmt, t);
        return;
    }
    if (r == 16 && simd_level() == 1) {
        lora_a_avx2(x, K, rows, n, AT, fmt, t);
        return;
    }
#endif
    lora_a_portable(x, K, rows, n, AT, fmt, r, t);
}

static void lora_b(float *y, int64_t width, const int64_t *rows, int64_t n, const void *Bt, int fmt, int64_t r,
                   int64_t col, int64_t out, float s, const float *t) {
#ifdef HAVE_X86
    if (r == 16 && simd_level() == 2) {
        lora_b_avx512(y, width, rows, n, Bt, fmt, col, out, s, t);
        return;
    }
    if (r == 16 && simd_level() == 1) {
        lora_b_avx2(y, width, rows, n, Bt, fmt, col, out, s, t);
        return;
    }
#endif
    lora_b_portable(y, width, rows, n, Bt, fmt, r, col, out, s, t);
}

static void lora_rows(const float *x, int64_t K, float *y, int64_t width, const int64_t *rows, int64_t n,
                      const void *AT, const void *Bt, int fmt, int64_t r, int64_t col, int64_t out, float s,
                      float *scratch) {
    lora_a(x, K, rows, n, AT, fmt, r, scratch);
    lora_b(y, width, rows, n, Bt, fmt, r, col, out, s, scratch);
}

/* lora_rows on its own (tests): y [*, width] fp32 gets the LoRA of rows[n] of x [*, K], A^T and B tiles packed
 * as above (fmt: 0 fp32, 1 bf16, 2 int8 codes), r outputs of A, out of B written from column col. */
void sdsat_lora_rows(const float *x, int64_t K, float *y, int64_t width, const int64_t *rows, int64_t n,
                     const void *AT, const void *Bt, int fmt, int64_t r, int64_t col, int64_t out, float s) {
    float *t = malloc(sizeof(float) * (size_t)(n * r));
    if (t == NULL) return;
    lora_rows(x, K, y, width, rows, n, AT, Bt, fmt, r, col, out, s, t);
    free(t);
}

/* The adapted parts of one projection: lora[2j], lora[2j + 1] = A and B of part j (NULL: not adapted);
 * part j's output columns start at cols[j] and it has outs[j] of them. */
static void lora_parts(const float *x, int64_t K, float *y, int64_t width, const int64_t *rows, int64_t n,
                       void *const *lora, int fmt, int parts, const int64_t *cols, const int64_t *outs, int64_t r,
                       float s, float *scratch) {
    for (int j = 0; j < parts; j++)
        if (lora[2 * j] != NULL)
            lora_rows(x, K, y, width, rows, n, lora[2 * j], lora[2 * j + 1], fmt, r, cols[j], outs[j], s, scratch);
}

/* ---- A whole int4 forward in one call ------------------------------------------------------------------
 * The lean forward's per-layer steps (models/engine/llama.py, LlamaForward._fused) composed here for a
 * forward without SAT rows whose projections are all Int4Linear: the same functions on the same fp32
 * data, so the same bits as the Python loop calling them one by one, without ~200 calls from Python.
 * layer[l]: 16 pointers: input norm weight (fp32), qkv codes, d, m, o_proj codes, d, m, post norm weight,
 * gate_up codes, d, m, down_proj codes, d, m, then the layer's key and value cache buffers.
 * dims: H, Hq, Hkv, D, I (intermediate); eps, eps_post, eps_final: the input, post-attention and final norms'
 * epsilons (one value for every layer). x: [R*T, H] fp32 embeddings in, the residual stream after the
 * last layer out; hidden: [R*T, H] fp32, the final norm's output. A SAT adapter (models/weights/adapter.py):
 * sat_rows [n_sat] (flat row indices), lora: per layer 14 pointers, A and B of q, k, v, o, gate, up, down, packed
 * as lora_rows reads them (NULL where not adapted; lora_format: 0 fp32, 1 bf16, 2 int8 codes), its rank and scale; lora NULL or n_sat 0: none. Every standard row's
 * arithmetic is the same with or without it. Returns 0, or -1 (out of memory). */
int sdsat_forward_q4(float *x, int64_t R, int64_t T, int64_t layers, void *const *layer, const int64_t *dims,
                     float eps, float eps_post, float eps_final, const float *cos, const float *sin,
                     const int64_t *positions, int kv_bf16, int64_t C, const int64_t *slot, const int64_t *start,
                     const uint8_t *local, float scale, const float *final_w, float *hidden,
                     const int64_t *sat_rows, int64_t n_sat, void *const *lora, int lora_format, int64_t rank,
                     float lora_scale) {
    const int64_t H = dims[0], Hq = dims[1], Hkv = dims[2], D = dims[3], I = dims[4], N = R * T;
    const int64_t qkv_w = (Hq + 2 * Hkv) * D;
    float *h = malloc(sizeof(float) * (size_t)(N * (H > Hq * D ? H : Hq * D)));
    float *wide = malloc(sizeof(float) * (size_t)(N * (qkv_w > 2 * I ? qkv_w : 2 * I)));
    float *attn = malloc(sizeof(float) * (size_t)(N * Hq * D));
    float *act = malloc(sizeof(float) * (size_t)(N * I));
    float *delta = malloc(sizeof(float) * (size_t)(N * H));
    const int adapted = lora != NULL && n_sat > 0;
    float *scratch = adapted ? malloc(sizeof(float) * (size_t)(n_sat * rank)) : NULL;  /* A x of each SAT row */
    int status = (h && wide && attn && act && delta && (scratch || !adapted)) ? 0 : -1;
    /* the parts of each projection, in the order of the lora table: q, k, v | o | gate, up | down */
    const int64_t qkv_cols[3] = {0, Hq * D, (Hq + Hkv) * D}, qkv_outs[3] = {Hq * D, Hkv * D, Hkv * D};
    const int64_t zero[1] = {0}, h_out[1] = {H}, gu_cols[2] = {0, I}, gu_outs[2] = {I, I};
    for (int64_t l = 0; l < layers && status == 0; l++) {  /* a failed step stops the forward at once */
        void *const *p = layer + 16 * l, *const *ad = adapted ? lora + 14 * l : NULL;
        sdsat_add_norm(x, N, H, l ? delta : NULL, 0, p[0], eps, h, 0);
        if ((status = sdsat_q4_linear(h, N, H, p[1], p[2], p[3], qkv_w, wide)) != 0) break;
        if (ad) lora_parts(h, H, wide, qkv_w, sat_rows, n_sat, ad, lora_format, 3, qkv_cols, qkv_outs, rank, lora_scale,
                           scratch);
        if ((status = sdsat_rope_attend(wide, 0, R, T, Hq, Hkv, D, cos, sin, positions, p[14], p[15], kv_bf16, C,
                                        slot, start, local, scale, attn, 0)) != 0) break;
        if ((status = sdsat_q4_linear(attn, N, Hq * D, p[4], p[5], p[6], H, delta)) != 0) break;
        if (ad) lora_parts(attn, Hq * D, delta, H, sat_rows, n_sat, ad + 6, lora_format, 1, zero, h_out, rank,
                           lora_scale, scratch);
        sdsat_add_norm(x, N, H, delta, 0, p[7], eps_post, h, 0);
        if ((status = sdsat_q4_linear(h, N, H, p[8], p[9], p[10], 2 * I, wide)) != 0) break;
        if (ad) lora_parts(h, H, wide, 2 * I, sat_rows, n_sat, ad + 8, lora_format, 2, gu_cols, gu_outs, rank,
                           lora_scale, scratch);
        sdsat_silu_mul_cast(wide, 0, N, I, act, 0);
        if ((status = sdsat_q4_linear(act, N, I, p[11], p[12], p[13], H, delta)) != 0) break;
        if (ad) lora_parts(act, I, delta, H, sat_rows, n_sat, ad + 12, lora_format, 1, zero, h_out, rank, lora_scale,
                           scratch);
    }
    if (status == 0) sdsat_add_norm(x, N, H, layers ? delta : NULL, 0, final_w, eps_final, hidden, 0);
    free(h); free(wide); free(attn); free(act); free(delta); free(scratch);
    return status ? -1 : 0;
}

/* The vector path the kernels take in this process: 0 portable C, 1 AVX2, 2 AVX-512, 3 AVX-512 with VNNI
 * for the quantized projections. */
int sdsat_vector_path(void) { return use_vnni() ? 3 : simd_level(); }
