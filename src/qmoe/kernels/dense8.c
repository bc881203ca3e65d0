/* qmoe native int8 dense kernel: y = (x @ Q^T) * s for int8 weights Q [rows, cols] with one float32 scale per
   row s [rows], and float32 x and y.

   What it is for: at batch 1 a decode step reads every non-expert weight (attention, the LM head) once, and on
   the real-shaped benchmark (Qwen3-30B-A3B's layers, docs/runtime.md) those reads were the largest part of a
   token once the experts had column lists. Kept 16-bit they cost two bytes a weight; weight-only int8 with a
   scale per output row (``qmoe.load(..., int8_weights=True)``, qmoe/runtime/int8.py) halves that. The
   activations stay float32: each int8 weight is widened in registers and the products summed in float32, the
   row's scale applied once at the end, so the only rounding is the weights' own.

   Built into the same library as cpu_lanes.c (qmoe/kernels/_native.py) and called per work item (a block of
   rows) from the numba row-block driver of qmoe.kernels.dense16, with the lanes kernel's calling convention.

     m   -> int64[4] {address of Q [rows, cols] (int8, row-major), rows, cols, address of s [rows] (float32)}
     x   -> float32 [ntok, cols], row-major
     y   -> float32 [ntok, rows], row-major; rows r0 .. r1-1 of every token are written
*/
#include <stdint.h>

/* The portable item: one row at a time, one token at a time. */
static void item8_scalar(const int8_t *Q, const float *s, int64_t cols, const float *x, float *y, int64_t rows,
                         int64_t ntok, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) {
        const int8_t *q = Q + r * cols;
        for (int64_t t = 0; t < ntok; t++) {
            const float *xt = x + t * cols;
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; c++) acc += (float)q[c] * xt[c];
            y[t * rows + r] = acc * s[r];
        }
    }
}

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(QMOE_SCALAR_ONLY)
#include <immintrin.h>

#define AVX2FMA __attribute__((target("avx2,fma")))

static int cpu_ok(void) {
    static int ok = -1; /* probed once: every item asks */
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }
    return ok;
}

AVX2FMA static inline __m256 load8(const int8_t *p) { /* 8 int8 -> 8 float32, exact */
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2FMA static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Two rows per step, four accumulators per (row, token) chain, as dense16.c: the int8 rows stream from memory
   once per item and stay in L1 while the call's few tokens read them. */
AVX2FMA static void item8_avx2(const int8_t *Q, const float *s, int64_t cols, const float *x, float *y,
                               int64_t rows, int64_t ntok, int64_t r0, int64_t r1) {
    const int64_t c32 = cols & ~(int64_t)31, c8 = cols & ~(int64_t)7;
    int64_t r = r0;
    for (; r + 2 <= r1; r += 2) {
        const int8_t *qa = Q + r * cols, *qb = qa + cols;
        for (int64_t t = 0; t < ntok; t++) {
            const float *xt = x + t * cols;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            int64_t c = 0;
            for (; c < c32; c += 32) {
                if (t == 0 && r + 4 <= r1) { /* the next pair of rows: rows of 2 KiB are too short for the
                                                  hardware prefetcher to reach full speed (5 -> 8 GB/s a core) */
                    _mm_prefetch((const char *)(qa + 2 * cols + c), _MM_HINT_T0);
                    _mm_prefetch((const char *)(qb + 2 * cols + c), _MM_HINT_T0);
                }
                __m256 x0 = _mm256_loadu_ps(xt + c), x1 = _mm256_loadu_ps(xt + c + 8);
                __m256 x2 = _mm256_loadu_ps(xt + c + 16), x3 = _mm256_loadu_ps(xt + c + 24);
                a0 = _mm256_fmadd_ps(load8(qa + c), x0, a0);
                a1 = _mm256_fmadd_ps(load8(qa + c + 8), x1, a1);
                a2 = _mm256_fmadd_ps(load8(qa + c + 16), x2, a2);
                a3 = _mm256_fmadd_ps(load8(qa + c + 24), x3, a3);
                b0 = _mm256_fmadd_ps(load8(qb + c), x0, b0);
                b1 = _mm256_fmadd_ps(load8(qb + c + 8), x1, b1);
                b2 = _mm256_fmadd_ps(load8(qb + c + 16), x2, b2);
                b3 = _mm256_fmadd_ps(load8(qb + c + 24), x3, b3);
            }
            for (; c < c8; c += 8) {
                __m256 xv = _mm256_loadu_ps(xt + c);
                a0 = _mm256_fmadd_ps(load8(qa + c), xv, a0);
                b0 = _mm256_fmadd_ps(load8(qb + c), xv, b0);
            }
            float sa = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            float sb = hsum8(_mm256_add_ps(_mm256_add_ps(b0, b1), _mm256_add_ps(b2, b3)));
            for (; c < cols; c++) {
                sa += (float)qa[c] * xt[c];
                sb += (float)qb[c] * xt[c];
            }
            y[t * rows + r] = sa * s[r];
            y[t * rows + r + 1] = sb * s[r + 1];
        }
    }
    if (r < r1) item8_scalar(Q, s, cols, x, y, rows, ntok, r, r1);
}
#endif

int64_t qmoe_dense8_item(const int64_t *m, const float *x, float *y, int64_t ntok, int64_t unused, int64_t r0,
                         int64_t r1) {
    (void)unused;
    const int8_t *Q = (const int8_t *)(intptr_t)m[0];
    const float *s = (const float *)(intptr_t)m[3];
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(QMOE_SCALAR_ONLY)
    if (cpu_ok()) {
        item8_avx2(Q, s, m[2], x, y, m[1], ntok, r0, r1);
        return -1;
    }
#endif
    item8_scalar(Q, s, m[2], x, y, m[1], ntok, r0, r1);
    return -1;
}
