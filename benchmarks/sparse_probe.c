// Probe for issue 26: how fast could a batch-1 ternary matvec run from a transcoded, index-list form of an
// expert (decoded once from the entropy-coded stream, then kept), next to qmoe's kernel on the coded stream?
// Not used by qmoe; benchmarks/sparse_probe.py compiles it, checks it against a float64 reference and times it
// beside qmoe's own column-list kernel (src/qmoe/kernels/cpu_lists.c, byte gaps), which grew out of this probe.
//
// A row r of a ternary matrix with levels lo[r] (code -1) and hi[r] (code +1) is y[r] = hi[r] * sum(x[P_r]) +
// lo[r] * sum(x[N_r]), P_r and N_r its columns holding +1 and -1. This file holds the 16-bit layout: uint16
// columns, each list padded to a multiple of 8 with the column `cols` (x[cols] == 0).
#include <immintrin.h>
#include <stdint.h>

__attribute__((target("avx2,fma"))) static float hsum(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static float sum16(const uint16_t *p, int64_t n, const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256i c0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
        __m256i c1 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + i + 8)));
        a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(x, c0, 4));
        a1 = _mm256_add_ps(a1, _mm256_i32gather_ps(x, c1, 4));
    }
    for (; i < n; i += 8) {
        __m256i c0 = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p + i)));
        a0 = _mm256_add_ps(a0, _mm256_i32gather_ps(x, c0, 4));
    }
    return hsum(_mm256_add_ps(a0, a1));
}

// start[2 r], start[2 r + 1], start[2 r + 2]: where row r's positive and negative lists begin and end
__attribute__((target("avx2,fma"))) void probe_idx16(int64_t rows, const int64_t *start, const uint16_t *idx,
                                                     const float *lo, const float *hi, const float *x, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        float sp = sum16(idx + start[2 * r], start[2 * r + 1] - start[2 * r], x);
        float sn = sum16(idx + start[2 * r + 1], start[2 * r + 2] - start[2 * r + 1], x);
        y[r] = hi[r] * sp + lo[r] * sn;
    }
}
