/* qmoe native column-list kernel: y = x @ W^T for one token and a ternary W held as lists of columns.

   Why: at batch 1 the lanes kernel (cpu_lanes.c) decodes the entropy-coded stream inside every product, a
   chain of dependent table lookups per row, ~6 G weights/s on two cores (docs/kernels.md). A decoding token
   touches the same experts again and again, so the runtime decodes each ternary expert matrix once, on its
   first use, into the columns of each row that hold +1 and -1 (qmoe.kernels.lists), and a product is then
   y[r] = hi[r] * sum(x[P_r]) + lo[r] * sum(x[N_r]): loads and adds, no decoding.

   Lists. Row r's +1 columns are gaps[start[2r] .. start[2r+1]), its -1 columns gaps[start[2r+1] ..
   start[2r+2]). Each list holds byte gaps from the previous column (the first from column -1): a gap g in
   1..255 means "the next column is g further, and holds a value"; 0 means "255 further, no value" (so a gap
   of 256 or more costs one more byte per 255 columns). Each list is padded with 0 to a multiple of 8 bytes.
   At QMoE's sparsity (90% zeros) that is ~0.85 bits per weight.

   Built into the same library as cpu_lanes.c (qmoe/kernels/_native.py) and called once per work item (a
   block of rows) from the numba driver in qmoe.kernels.lists, with the lanes kernel's calling convention:
   every argument an int64.

     m   -> int64[5] {address of start [2 rows + 1] int64, of gaps uint8, of coef [rows, 2] float32 (hi, lo),
                      rows, cols}
     x   -> float32 [cols]
     y   -> float32 [rows]; rows r0 .. r1-1 are written
*/
#include <stddef.h>
#include <stdint.h>

/* The lists from codes [rows, cols] int8 in {-1, 0, 1}: qmoe_lists_size fills start and returns its last
   entry (the bytes of gaps); qmoe_lists_fill then writes gaps. Both walk a row's nonzero codes once, 32 codes
   per AVX2 compare where available (at 90% zeros most of a row is skipped that way), and hand each nonzero
   to `put`, which counts (g == NULL) or writes the bytes of its list. */
typedef struct {
    int64_t n[2], prev[2]; /* per list (0: +1, 1: -1): bytes so far, last column */
    uint8_t *g[2];         /* where each list's bytes go; NULL: count only */
} row_lists;

static inline void put(row_lists *L, int k, int64_t c) {
    int64_t gap = c - L->prev[k];
    if (L->g[k]) {
        for (; gap > 255; gap -= 255)
            L->g[k][L->n[k]++] = 0; /* escape: 255 columns further, no value */
        L->g[k][L->n[k]++] = (uint8_t)gap;
    } else {
        L->n[k] += 1 + (gap - 1) / 255;
    }
    L->prev[k] = c;
}

static void walk_scalar(const int8_t *row, int64_t c0, int64_t cols, row_lists *L) {
    for (int64_t c = c0; c < cols; c++)
        if (row[c])
            put(L, row[c] < 0, c);
}

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(QMOE_SCALAR_ONLY)
#define LISTS_AVX2 1
#include <immintrin.h>

/* Whether this CPU runs the AVX2 paths below (the library also loads where it does not). */
static int avx2_ok(void) {
    static int ok = -1; /* a benign race: every thread computes the same value */
    if (ok < 0) {
        __builtin_cpu_init();
        ok = __builtin_cpu_supports("avx2");
    }
    return ok;
}

__attribute__((target("avx2"))) static void walk_avx2(const int8_t *row, int64_t cols, row_lists *L) {
    int64_t c = 0;
    for (; c + 32 <= cols; c += 32) {
        __m256i v = _mm256_loadu_si256((const __m256i *)(row + c));
        uint32_t nz = ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(v, _mm256_setzero_si256()));
        while (nz) {
            int b = __builtin_ctz(nz);
            put(L, row[c + b] < 0, c + b);
            nz &= nz - 1;
        }
    }
    walk_scalar(row, c, cols, L);
}
#endif

static void walk(const int8_t *row, int64_t cols, row_lists *L) {
#ifdef LISTS_AVX2
    if (avx2_ok()) {
        walk_avx2(row, cols, L);
        return;
    }
#endif
    walk_scalar(row, 0, cols, L);
}

int64_t qmoe_lists_size(int64_t codes, int64_t rows, int64_t cols, int64_t start) {
    const int8_t *W = (const int8_t *)(intptr_t)codes;
    int64_t *s = (int64_t *)(intptr_t)start;
    s[0] = 0;
    for (int64_t r = 0; r < rows; r++) {
        row_lists L = {{0, 0}, {-1, -1}, {NULL, NULL}};
        walk(W + r * cols, cols, &L);
        s[2 * r + 1] = s[2 * r] + (L.n[0] + 7) / 8 * 8; /* each list padded to whole 8-byte steps */
        s[2 * r + 2] = s[2 * r + 1] + (L.n[1] + 7) / 8 * 8;
    }
    return s[2 * rows];
}

int64_t qmoe_lists_fill(int64_t codes, int64_t rows, int64_t cols, int64_t start, int64_t gaps) {
    const int8_t *W = (const int8_t *)(intptr_t)codes;
    const int64_t *s = (const int64_t *)(intptr_t)start;
    uint8_t *G = (uint8_t *)(intptr_t)gaps;
    for (int64_t r = 0; r < rows; r++) {
        row_lists L = {{0, 0}, {-1, -1}, {G + s[2 * r], G + s[2 * r + 1]}};
        walk(W + r * cols, cols, &L);
        for (int k = 0; k < 2; k++)
            for (int64_t end = s[2 * r + k + 1] - s[2 * r + k]; L.n[k] < end;)
                L.g[k][L.n[k]++] = 0; /* padding: escapes, which add nothing */
    }
    return 0;
}

/* sum(x[columns of one list]). Scalar code, four values per step with four partial sums: each value is one
   byte load, one add to the running column and one float load, and the core runs several of them at once.
   An AVX2 version (prefix sum of eight gaps, then one masked gather) measured 15-25% slower on the
   real-shaped model's expert shapes (Zen 3, benchmarks/sparse_probe.py, ratios to the lanes kernel in the
   same process): a gather of eight costs about as much as eight loads here and adds the prefix sum's work.
   Trailing zeros are the list's padding; an escape inside a list (a gap over 255 columns, rare at QMoE's
   densities) leaves the unrolled loop for the byte-at-a-time one, which reads the format as written. */
static float sum_list(const uint8_t *g, int64_t n, const float *x) {
    while (n > 0 && g[n - 1] == 0) n--;
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    int64_t c = -1, i = 0;
    for (; i + 4 <= n; i += 4) {
        uint32_t g0 = g[i], g1 = g[i + 1], g2 = g[i + 2], g3 = g[i + 3];
        if (__builtin_expect(!(g0 && g1 && g2 && g3), 0)) break;
        int64_t c0 = c + g0, c1 = c0 + g1, c2 = c1 + g2;
        c = c2 + g3;
        a0 += x[c0];
        a1 += x[c1];
        a2 += x[c2];
        a3 += x[c];
    }
    for (; i < n; i++) {
        c += g[i] ? g[i] : 255;
        if (g[i]) a0 += x[c];
    }
    return (a0 + a1) + (a2 + a3);
}

int64_t qmoe_lists_item(const int64_t *m, const float *x, float *y, int64_t ntok, int64_t unused, int64_t r0,
                        int64_t r1) {
    (void)ntok;
    (void)unused;
    const int64_t *s = (const int64_t *)(intptr_t)m[0];
    const uint8_t *G = (const uint8_t *)(intptr_t)m[1];
    const float *coef = (const float *)(intptr_t)m[2];
    for (int64_t r = r0; r < r1; r++) {
        float sp = sum_list(G + s[2 * r], s[2 * r + 1] - s[2 * r], x);
        float sn = sum_list(G + s[2 * r + 1], s[2 * r + 2] - s[2 * r + 1], x);
        y[r] = coef[2 * r] * sp + coef[2 * r + 1] * sn;
    }
    return -1;
}
