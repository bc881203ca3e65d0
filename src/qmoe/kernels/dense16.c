/* qmoe native dense kernel: y = x @ W^T for 16-bit weights (fp16 or bf16) and float32 x and y.

   What it is for: the non-expert weights of a compressed model (attention, the LM head) are stored in the
   checkpoint's 16-bit type. Widening them to float32 at load doubles their memory and the bytes a decode step
   reads; computing in the 16-bit type rounds the activations. This kernel reads the 16-bit weights and widens
   them in registers (exact: every fp16 and bf16 value is a float32 value), so the result is that of the
   float32 model up to the order of the sums, at half the bytes. It is for a few tokens per call (decoding);
   qmoe.kernels.dense16 sends larger batches to torch's GEMM on widened blocks of rows instead.

   Built into the same library as cpu_lanes.c (qmoe/kernels/_native.py) and called once per work item (a
   block of rows) from the numba driver qmoe.kernels.dense16, with the lanes kernel's calling convention:
   every argument an int64.

     m   -> int64[4] {address of W [rows, cols] (16-bit, row-major), rows, cols, 1 for bf16 / 0 for fp16}
     x   -> float32 [ntok, cols], row-major
     y   -> float32 [ntok, rows], row-major; rows r0 .. r1-1 of every token are written
*/
#include <stdint.h>
#include <string.h>

static float widen(uint16_t h, int bf16) {
    if (bf16) {
        uint32_t u = (uint32_t)h << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    /* IEEE half -> float: sign, exponent rebias, subnormals and inf/nan */
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, mant = h & 0x3FF, u;
    if (e == 0) {
        if (mant == 0) {
            u = s;
        } else { /* subnormal: normalise */
            e = 127 - 15 + 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                e--;
            }
            u = s | (e << 23) | ((mant & 0x3FF) << 13);
        }
    } else if (e == 31) {
        u = s | 0x7F800000u | (mant << 13);
    } else {
        u = s | ((e + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* The portable item: one row at a time, one token at a time. */
static void item_scalar(const uint16_t *W, int64_t cols, int bf16, const float *x, float *y, int64_t rows,
                        int64_t ntok, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const uint16_t *w = W + r * cols;
        for (int64_t t = 0; t < ntok; t++) {
            const float *xt = x + t * cols;
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; c++) acc += widen(w[c], bf16) * xt[c];
            y[t * rows + r] = acc;
        }
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX2F16 __attribute__((target("avx2,fma,f16c")))

int64_t qmoe_dense16_cpu_ok(void) {
    static int ok = -1; /* probed once: every item asks */
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return ok;
}

AVX2F16 static inline __m256 load8(const uint16_t *p, int bf16) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (bf16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

AVX2F16 static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Two rows per step, four accumulators per (row, token) chain: the 16-bit rows stream from memory once per
   item and stay in L1 while every token of the call (at most a few) reads them. */
AVX2F16 static void item_avx2(const uint16_t *W, int64_t cols, int bf16, const float *x, float *y, int64_t rows,
                              int64_t ntok, int64_t r0, int64_t r1) {
    const int64_t c32 = cols & ~(int64_t)31, c8 = cols & ~(int64_t)7;
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
        const uint16_t *wa = W + r * cols, *wb = wa + cols;
        for (int64_t t = 0; t < ntok; t++) {
            const float *xt = x + t * cols;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            int64_t c = 0;
            for (; c < c32; c += 32) {
                if (t == 0 && r + 4 <= r1) { /* the next pair of rows, a cache line each per step: with it
                                                  two cores read ~20 GB/s of 4 KiB bf16 rows, ~13 without */
                    _mm_prefetch((const char *)(wa + 2 * cols + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(wb + 2 * cols + c), _MM_HINT_T0);
                }
                __m256 x0 = _mm256_loadu_ps(xt + c), x1 = _mm256_loadu_ps(xt + c + 8);
                __m256 x2 = _mm256_loadu_ps(xt + c + 16), x3 = _mm256_loadu_ps(xt + c + 24);
                a0 = _mm256_fmadd_ps(load8(wa + c, bf16), x0, a0);
                a1 = _mm256_fmadd_ps(load8(wa + c + 8, bf16), x1, a1);
                a2 = _mm256_fmadd_ps(load8(wa + c + 16, bf16), x2, a2);
                a3 = _mm256_fmadd_ps(load8(wa + c + 24, bf16), x3, a3);
                b0 = _mm256_fmadd_ps(load8(wb + c, bf16), x0, b0);
                b1 = _mm256_fmadd_ps(load8(wb + c + 8, bf16), x1, b1);
                b2 = _mm256_fmadd_ps(load8(wb + c + 16, bf16), x2, b2);
                b3 = _mm256_fmadd_ps(load8(wb + c + 24, bf16), x3, b3);
            }
            for (; c < c8; c += 8) {
                __m256 xv = _mm256_loadu_ps(xt + c);
                a0 = _mm256_fmadd_ps(load8(wa + c, bf16), xv, a0);
                b0 = _mm256_fmadd_ps(load8(wb + c, bf16), xv, b0);
            }
            float sa = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            float sb = hsum(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
            for (; c < cols; c++) {
                sa += widen(wa[c], bf16) * xt[c];
                sb += widen(wb[c], bf16) * xt[c];
            }
            y[t * rows + r] = sa;
            y[t * rows + r + 1] = sb;
        }
    }
    if (r < r1) item_scalar(W, cols, bf16, x, y, rows, ntok, r, r1);
}

int64_t qmoe_dense16_item(const int64_t *m, const float *x, float *y, int64_t ntok, int64_t unused, int64_t r0,
                          int64_t r1) {
    (void)unused;
    const uint16_t *W = (const uint16_t *)(intptr_t)m[0];
    if (qmoe_dense16_cpu_ok())
        item_avx2(W, m[2], (int)m[3], x, y, m[1], ntok, r0, r1);
    else
        item_scalar(W, m[2], (int)m[3], x, y, m[1], ntok, r0, r1);
    return -1;
}

#else /* not x86-64: the portable loop */
int64_t qmoe_dense16_cpu_ok(void) { return 0; }
int64_t qmoe_dense16_item(const int64_t *m, const float *x, float *y, int64_t ntok, int64_t unused, int64_t r0,
                          int64_t r1) {
    (void)unused;
    item_scalar((const uint16_t *)(intptr_t)m[0], m[2], (int)m[3], x, y, m[1], ntok, r0, r1);
    return -1;
}
#endif
