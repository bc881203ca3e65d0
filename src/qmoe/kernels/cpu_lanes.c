/* qmoe native CPU kernel: y = x @ W^T from the entropy-coded stream, rows decoded across AVX2 lanes.

   Compiled on first use by qmoe/kernels/_native.py (cc -O3 -shared -fPIC; the AVX2 functions carry their own
   target attribute, so the probe below runs on any x86-64) and called once per work item from the numba
   driver qmoe.kernels._cpu_numba.matmul_call, which packs x and schedules the items over its threads.

   One lane = one matrix row. A lane's state is (bit, pos, accumulator, the row's value weights); a step
   reads 32 stream bits at byte bit>>3 (one gather; the format is LSB-first, so bytes in memory order are
   the stream), looks the next 12 bits up (two gathers: TA, TB below, built by
   qmoe.kernels.cpu.build_lane_tables), gathers x at the up to two written columns (masked gathers: empty
   slots load nothing) and adds w * x. NG groups of 8 lanes run interleaved so that one group's gathers wait
   while another's issue (a step is a chain of two dependent gathers).

   Batch 1: a lane decodes with the multi-symbol half of the tables while its 12-bit window lies in the row
   and pos < cols, then with the single-symbol half (one codeword per step, the reference decoder's own
   walk); an entry that would carry pos past the width is not committed and the lane switches halves, so a
   corrupt row stops exactly where the codec stops. A scalar handler writes a finished row and loads the
   item's next row into its lane, so lanes never idle while rows remain. Batch T > 1 (item_tn): one group,
   multi-symbol half only; the handler finishes rows with the scalar single-symbol code (as the numba
   kernel does) and adds each lane's values to its token accumulators.

   Tables [2, 8193] int32: entries 0..4095 multi-symbol (the numba kernel's lut2), 4096..8191 single-symbol
   (its lut), 8192 all zero (parked lanes: no bits, no columns, no values):
     TA[i] = len | v1 << 4 | v2 << 6 | adv << 8        (adv: pos advance, 2**22 for end of row / invalid)
     TB[i] = c1 | nz1 << 15 | c2 << 16 | nz2 << 31    (c: column of value k relative to pos, < 4096;
                                                       nz: value k present, the sign bit a gather mask uses)
   Safety: a lane decoding has pos < cols and bit < end (bit <= end - 12 in the multi-symbol half), so its
   byte load lies inside the stream (guard word) and its x columns inside the packed x (cols + pad zeros,
   pad > any c). Bits are relative to the item's first row, in int32; an item spanning >= 2**30 bits (only
   corrupt offsets give that) is decoded by the scalar path alone.
*/
#include <stdint.h>
#include <string.h>

#define QMOE_NATIVE_ABI 2

/* meta columns: qmoe.kernels._cpu_numba (M_*), one int64 row per matrix */
enum {
    M_STREAM, M_BLOCK_OFFSETS, M_ROW_DELTAS, M_LEVELS, M_LUT, M_LUT2, M_ROWS, M_COLS, M_BLOCK_LOG2, M_BITS,
    M_INT2, M_BACKGROUND, M_LEVELS_F16, M_XPAD, M_RPI, M_LANE_LUT, M_RPI_LANES
};
#define NMETA 20
#define ERR_LENGTH 1
#define ERR_WIDTH 2
#define LANE_SINGLE 4096 /* table offset of the single-symbol half */
#define LANE_ZERO 8192   /* the all-zero entry */
#define TCHUNK 64 /* tokens per pass at batch T > 1 (per-lane accumulators: 8 * NG * 64 floats) */

int64_t qmoe_native_abi(void) { return QMOE_NATIVE_ABI * 1000 + NMETA; }

typedef struct {
    const uint32_t *words;
    const uint32_t *bo;
    const uint16_t *rd;
    const void *levels;
    const int32_t *lut; /* single-symbol: len | v << 4 | adv << 6 */
    const int32_t *ta, *tb;
    int64_t rows, cols, g, bits, int2, bg, f16, xpad;
} mat_t;

static void load_mat(const int64_t *m, mat_t *t) {
    t->words = (const uint32_t *)(intptr_t)m[M_STREAM];
    t->bo = (const uint32_t *)(intptr_t)m[M_BLOCK_OFFSETS];
    t->rd = (const uint16_t *)(intptr_t)m[M_ROW_DELTAS];
    t->levels = (const void *)(intptr_t)m[M_LEVELS];
    t->lut = (const int32_t *)(intptr_t)m[M_LUT];
    t->ta = (const int32_t *)(intptr_t)m[M_LANE_LUT];
    t->tb = t->ta + LANE_ZERO + 1; /* [2, 8193]: TA then TB */
    t->rows = m[M_ROWS];
    t->cols = m[M_COLS];
    t->g = m[M_BLOCK_LOG2];
    t->bits = m[M_BITS];
    t->int2 = m[M_INT2];
    t->bg = m[M_BACKGROUND];
    t->f16 = m[M_LEVELS_F16];
    t->xpad = m[M_XPAD];
}

/* IEEE half -> float, exact */
static float half_to_float(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, mant = h & 0x3FF, u;
    float f;
    if (e == 0) {
        f = (float)mant * 5.9604644775390625e-08f; /* 2**-24, exact */
        return s ? -f : f;
    }
    u = e == 31 ? (s | 0x7F800000u | (mant << 13)) : (s | ((e + 112) << 23) | (mant << 13));
    memcpy(&f, &u, 4);
    return f;
}

static double level(const mat_t *t, int64_t i) {
    return t->f16 ? (double)half_to_float(((const uint16_t *)t->levels)[i]) : (double)((const float *)t->levels)[i];
}

/* w[v] = weight of value v (w[0] = 0); returns the background level (int2) or 0 (ternary) */
static float row_weights(const mat_t *t, int64_t r, float w[4]) {
    w[0] = 0.0f;
    if (t->int2) {
        int64_t bg = t->bg;
        double lb = level(t, 4 * r + bg);
        for (int v = 1; v < 4; v++) w[v] = (float)(level(t, 4 * r + ((bg + v) & 3)) - lb);
        return (float)lb;
    }
    w[1] = (float)level(t, 2 * r);
    w[2] = (float)level(t, 2 * r + 1);
    w[3] = 0.0f;
    return 0.0f;
}

static void row_bits(const mat_t *t, int64_t r, int64_t *start, int64_t *end) {
    *start = (int64_t)t->bo[r >> t->g] + t->rd[r];
    *end = r + 1 < t->rows ? (int64_t)t->bo[(r + 1) >> t->g] + t->rd[r + 1] : t->bits;
}

/* single-symbol entry at stream bit (< the row's end, so words[i + 1] exists: guard word) */
static inline int64_t entry1(const uint32_t *words, const int32_t *lut, int64_t bit) {
    uint64_t i = (uint64_t)bit >> 5;
    uint64_t win = (uint64_t)words[i] | ((uint64_t)words[i + 1] << 32);
    return lut[(win >> (bit & 31)) & 4095];
}

static int status_of(int64_t bit, int64_t end, int64_t pos, int64_t e, int64_t cols) {
    if (bit != end) return ERR_LENGTH;
    if (pos < cols || (pos > cols && ((e >> 4) & 3) != 0)) return ERR_WIDTH;
    return 0;
}

/* re-decode symbol by symbol, writing nothing, until the row ends: its status */
static int walk(const mat_t *t, int64_t bit, int64_t end, int64_t pos) {
    int64_t e = 0;
    while (pos < t->cols && bit < end) {
        e = entry1(t->words, t->lut, bit);
        bit += e & 15;
        pos += e >> 6;
    }
    return status_of(bit, end, pos, e, t->cols);
}

/* finish a row symbol by symbol from (bit, pos) at batch 1; x[cols] is 0 */
static int tail1(const mat_t *t, const float *x, const float w[4], int64_t bit, int64_t end, int64_t pos,
                 float *acc) {
    int64_t e = 0, cols = t->cols;
    float a = *acc;
    while (pos < cols && bit < end) {
        e = entry1(t->words, t->lut, bit);
        bit += e & 15;
        pos += e >> 6;
        a += w[(e >> 4) & 3] * x[pos - 1 < cols ? pos - 1 : cols];
    }
    *acc = a;
    return status_of(bit, end, pos, e, cols);
}

/* the same at batch T: xt [cols + pad + 1, tp], tokens t0 .. t0 + tc */
static int tailt(const mat_t *t, const float *xt, int64_t tp, const float w[4], int64_t bit, int64_t end,
                 int64_t pos, float *acc, int tc) {
    int64_t e = 0, cols = t->cols;
    while (pos < cols && bit < end) {
        e = entry1(t->words, t->lut, bit);
        bit += e & 15;
        pos += e >> 6;
        const float wv = w[(e >> 4) & 3], *xr = xt + (pos - 1 < cols ? pos - 1 : cols) * tp;
        for (int k = 0; k < tc; k++) acc[k] += wv * xr[k];
    }
    return status_of(bit, end, pos, e, cols);
}

static void note_bad(int64_t *bad, int64_t r, int st) {
    if (st && (*bad < 0 || r * 4 + st < *bad)) *bad = r * 4 + st;
}

/* rows [r0, r1) without lanes (items whose bit span does not fit the lanes' int32 offsets) */
static int64_t item_scalar(const mat_t *t, const float *x, float *out, int64_t ntok, int64_t tp, int64_t r0,
                           int64_t r1) {
    int64_t bad = -1, cols = t->cols, pad = t->xpad;
    float w[4], acc[TCHUNK];
    for (int64_t r = r0; r < r1; r++) {
        int64_t s, e;
        row_bits(t, r, &s, &e);
        float base = row_weights(t, r, w);
        for (int64_t t0 = 0; t0 < ntok; t0 += TCHUNK) {
            int tc = (int)(ntok - t0 < TCHUNK ? ntok - t0 : TCHUNK), st;
            memset(acc, 0, sizeof acc);
            if (tp == 1)
                st = tail1(t, x, w, s, e, 0, acc);
            else
                st = tailt(t, x + t0, tp, w, s, e, 0, acc, tc);
            for (int k = 0; k < tc; k++) out[(t0 + k) * t->rows + r] = acc[k] + base * x[(cols + pad) * tp + t0 + k];
            note_bad(&bad, r, st);
        }
    }
    return bad;
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#define AVX2 __attribute__((target("avx2,fma")))
#define NG 4 /* groups of 8 lanes in flight */
#define NL (8 * NG)

int64_t qmoe_native_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}

typedef struct {
    /* vector state, spilled here by the handler */
    int32_t bit[NL] __attribute__((aligned(32)));
    int32_t pos[NL] __attribute__((aligned(32)));
    int32_t end12[NL] __attribute__((aligned(32)));
    int32_t off[NL] __attribute__((aligned(32)));
    float acc[NL] __attribute__((aligned(32)));
    float w1[NL] __attribute__((aligned(32)));
    float w2[NL] __attribute__((aligned(32)));
    float w3[NL] __attribute__((aligned(32)));
    int32_t ea[NL] __attribute__((aligned(32)));
    /* scalar state */
    int64_t row[NL], end[NL];
    float base[NL];
    const mat_t *t;
    int64_t gbase, next, r1, bad, ntok;
    int64_t live; /* lanes holding a row: refill decrements it when it parks a lane */
} lanes_t;

/* Put the item's next row that has a zone into lane l (rows too short for one are finished here); park
   the lane when none is left. tokens: 0 at batch 1 (x = packed x), else the T > 1 pass (xt, tp, t0, tc)
   and the lane's accumulators accT [tc]. */
static void refill(lanes_t *L, int l, const float *x, float *out, int64_t tp, int64_t t0, int tc, float *accT,
                   int single) {
    const mat_t *t = L->t;
    float w[4];
    while (L->next < L->r1) {
        int64_t r = L->next++, s, e;
        row_bits(t, r, &s, &e);
        float base = row_weights(t, r, w);
        if (e - s >= 12 || single) {
            L->bit[l] = (int32_t)(s - L->gbase);
            L->pos[l] = 0;
            L->end12[l] = (int32_t)(e - 12 - L->gbase);
            L->off[l] = e - s >= 12 || !single ? 0 : LANE_SINGLE;
            L->acc[l] = 0.0f;
            L->w1[l] = w[1];
            L->w2[l] = w[2];
            L->w3[l] = w[3];
            L->row[l] = r;
            L->end[l] = e;
            L->base[l] = base;
            if (accT) memset(accT, 0, sizeof(float) * tc);
            return;
        }
        int st;
        int64_t cols = t->cols, pad = t->xpad;
        if (tp == 1) {
            float a = 0.0f;
            st = tail1(t, x, w, s, e, 0, &a);
            out[r] = a + base * x[cols + pad];
        } else {
            float a[TCHUNK] = {0};
            st = tailt(t, x + t0, tp, w, s, e, 0, a, tc);
            for (int k = 0; k < tc; k++) a[k] += base * x[(cols + pad) * tp + t0 + k];
            for (int k = 0; k < tc && t0 + k < L->ntok; k++) out[(t0 + k) * t->rows + r] = a[k];
        }
        note_bad(&L->bad, r, st);
    }
    L->bit[l] = 0; /* the item's first byte: always readable */
    L->pos[l] = 0;
    L->end12[l] = INT32_MAX;
    L->off[l] = LANE_ZERO;
    L->acc[l] = 0.0f;
    L->w1[l] = L->w2[l] = L->w3[l] = 0.0f;
    L->row[l] = -1;
    L->live--;
}

/* lane l finished its row (batch 1) with the step whose entry was L->ea[l]: write it, refill the lane */
static void finish1(lanes_t *L, int l, const float *x, float *out) {
    const mat_t *t = L->t;
    int64_t r = L->row[l];
    out[r] = L->acc[l] + L->base[l] * x[t->cols + t->xpad];
    note_bad(&L->bad, r, status_of(L->gbase + L->bit[l], L->end[l], L->pos[l], L->ea[l], t->cols));
    refill(L, l, x, out, 1, 0, 0, NULL, 1);
}

AVX2 static inline void store_group(lanes_t *L, int g, __m256i bit, __m256i pos, __m256i end12, __m256i off,
                                    __m256 acc, __m256 w1, __m256 w2, __m256 w3, __m256i ea) {
    _mm256_store_si256((__m256i *)(L->bit + 8 * g), bit);
    _mm256_store_si256((__m256i *)(L->pos + 8 * g), pos);
    _mm256_store_si256((__m256i *)(L->end12 + 8 * g), end12);
    _mm256_store_si256((__m256i *)(L->off + 8 * g), off);
    _mm256_store_ps(L->acc + 8 * g, acc);
    _mm256_store_ps(L->w1 + 8 * g, w1);
    _mm256_store_ps(L->w2 + 8 * g, w2);
    _mm256_store_ps(L->w3 + 8 * g, w3);
    _mm256_store_si256((__m256i *)(L->ea + 8 * g), ea);
}

/* weight of the value in bits (b0, b1) of each lane's entry: ternary v in {1, 2}, int2 v in {1, 2, 3};
   an empty slot's x was not loaded (0), so its weight does not matter */
#define PICK(INT2, ea, s0, s1, w1, w2, w3)                                                                       \
    ((INT2) ? _mm256_blendv_ps(w1, _mm256_blendv_ps(w2, w3, _mm256_castsi256_ps(_mm256_slli_epi32(ea, s0))),    \
                               _mm256_castsi256_ps(_mm256_slli_epi32(ea, s1)))                                   \
            : _mm256_blendv_ps(w1, w2, _mm256_castsi256_ps(_mm256_slli_epi32(ea, s1))))

/* Batch 1. The step of one group. A lane is in multi-symbol mode (off 0) while its whole 12-bit window lies
   in the row and pos < cols; an entry that would carry pos past the width is not committed (bit, pos and acc
   keep their values) and the lane, like one with fewer than 12 bits left, continues in single-symbol mode
   (off LANE_SINGLE): one codeword per step, exactly the reference decoder's walk, so a corrupt row stops
   where the codec stops. A single-mode lane is done when pos >= cols or bit >= end; ex holds those lanes. */
#define STEP1(INT2, gg)                                                                                         \
    do {                                                                                                        \
        __m256i raw = _mm256_i32gather_epi32((const int *)bytes, _mm256_srli_epi32(vbit[gg], 3), 1);            \
        __m256i win = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_and_si256(vbit[gg], seven)), m4095);       \
        __m256i idx = _mm256_min_epi32(_mm256_add_epi32(win, voff[gg]), zidx);                                  \
        __m256i ea = _mm256_i32gather_epi32(t->ta, idx, 4);                                                     \
        __m256i eb = _mm256_i32gather_epi32(t->tb, idx, 4);                                                     \
        __m256i i1 = _mm256_add_epi32(vpos[gg], _mm256_and_si256(eb, mcol));                                    \
        __m256i i2 = _mm256_add_epi32(vpos[gg], _mm256_and_si256(_mm256_srli_epi32(eb, 16), mcol));             \
        __m256 x1 = _mm256_mask_i32gather_ps(zero, x, i1, _mm256_castsi256_ps(_mm256_slli_epi32(eb, 16)), 4);   \
        __m256 x2 = _mm256_mask_i32gather_ps(zero, x, i2, _mm256_castsi256_ps(eb), 4);                          \
        __m256 acc = _mm256_fmadd_ps(PICK(INT2, ea, 27, 26, vw1[gg], vw2[gg], vw3[gg]), x1, vacc[gg]);          \
        acc = _mm256_fmadd_ps(PICK(INT2, ea, 25, 24, vw1[gg], vw2[gg], vw3[gg]), x2, acc);                      \
        __m256i nbit = _mm256_add_epi32(vbit[gg], _mm256_and_si256(ea, m15));                                   \
        __m256i npos = _mm256_add_epi32(vpos[gg], _mm256_srli_epi32(ea, 8));                                    \
        __m256i multi = _mm256_cmpeq_epi32(voff[gg], izero);                                                    \
        __m256i crossed = _mm256_and_si256(multi, _mm256_cmpgt_epi32(npos, colsm1));                            \
        vbit[gg] = _mm256_blendv_epi8(nbit, vbit[gg], crossed);                                                 \
        vpos[gg] = _mm256_blendv_epi8(npos, vpos[gg], crossed);                                                 \
        vacc[gg] = _mm256_blendv_ps(acc, vacc[gg], _mm256_castsi256_ps(crossed));                               \
        __m256i to1 = _mm256_and_si256(multi, _mm256_or_si256(crossed, _mm256_cmpgt_epi32(vbit[gg], vend[gg])));\
        voff[gg] = _mm256_or_si256(voff[gg], _mm256_and_si256(to1, vsingle));                                   \
        __m256i done = _mm256_and_si256(_mm256_cmpeq_epi32(voff[gg], vsingle),                                  \
                                        _mm256_or_si256(_mm256_cmpgt_epi32(vpos[gg], colsm1),                   \
                                                        _mm256_cmpgt_epi32(vbit[gg], _mm256_add_epi32(vend[gg], eleven)))); \
        vea[gg] = ea;                                                                                           \
        ex[gg] = _mm256_movemask_ps(_mm256_castsi256_ps(done));                                                 \
    } while (0)

#define LOAD_GROUP(g)                                                                                           \
    do {                                                                                                        \
        vbit[g] = _mm256_load_si256((const __m256i *)(L.bit + 8 * (g)));                                        \
        vpos[g] = _mm256_load_si256((const __m256i *)(L.pos + 8 * (g)));                                        \
        vend[g] = _mm256_load_si256((const __m256i *)(L.end12 + 8 * (g)));                                      \
        voff[g] = _mm256_load_si256((const __m256i *)(L.off + 8 * (g)));                                      \
        vacc[g] = _mm256_load_ps(L.acc + 8 * (g));                                                              \
        vw1[g] = _mm256_load_ps(L.w1 + 8 * (g));                                                                \
        vw2[g] = _mm256_load_ps(L.w2 + 8 * (g));                                                                \
        vw3[g] = _mm256_load_ps(L.w3 + 8 * (g));                                                                \
    } while (0)

#define ITEM_T1(NAME, INT2)                                                                                     \
    AVX2 static void NAME(lanes_t *restrict Lp, const float *restrict x, float *restrict out) {                \
        lanes_t L = *Lp;                                                                                        \
        const mat_t *t = L.t;                                                                                   \
        const uint8_t *bytes = (const uint8_t *)t->words + (L.gbase >> 3);                                      \
        const __m256i seven = _mm256_set1_epi32(7), m4095 = _mm256_set1_epi32(4095);                            \
        const __m256i m15 = _mm256_set1_epi32(15), mcol = _mm256_set1_epi32(0x7FFF);                            \
        const __m256i colsm1 = _mm256_set1_epi32((int32_t)(t->cols - 1));                                       \
        const __m256 zero = _mm256_setzero_ps();                                                                \
        const __m256i izero = _mm256_setzero_si256(), zidx = _mm256_set1_epi32(LANE_ZERO);                      \
        const __m256i vsingle = _mm256_set1_epi32(LANE_SINGLE), eleven = _mm256_set1_epi32(11);                 \
        __m256i vbit[NG], vpos[NG], vend[NG], voff[NG], vea[NG];                                               \
        __m256 vacc[NG], vw1[NG], vw2[NG], vw3[NG];                                                             \
        int ex[NG];                                                                                             \
        for (int g = 0; g < NG; g++) LOAD_GROUP(g);                                                             \
        while (L.live > 0) {                                                                                    \
            int any = 0;                                                                                        \
            for (int g = 0; g < NG; g++) {                                                                      \
                STEP1(INT2, g);                                                                                 \
                any |= ex[g];                                                                                   \
            }                                                                                                   \
            if (__builtin_expect(any, 0)) {                                                                     \
                for (int g = 0; g < NG; g++) {                                                                  \
                    if (!ex[g]) continue;                                                                       \
                    store_group(&L, g, vbit[g], vpos[g], vend[g], voff[g], vacc[g], vw1[g], vw2[g], vw3[g],     \
                                vea[g]);                                                                        \
                    for (int m = ex[g]; m; m &= m - 1) finish1(&L, 8 * g + __builtin_ctz(m), x, out);           \
                    LOAD_GROUP(g);                                                                              \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
        *Lp = L;                                                                                                \
    }

ITEM_T1(item_t1_ternary, 0)
ITEM_T1(item_t1_int2, 1)

/* Batch T > 1, tokens t0 .. t0 + tc of xt [cols + pad + 1, tp]: lanes decode, then each lane's (up to two)
   values add w * xt[col] to its row's token accumulators accT[lane] [tc]. */
AVX2 static void item_tn(lanes_t *restrict Lp, const float *restrict xt, float *restrict out, int64_t tp,
                         int64_t t0, int tc, int64_t ntok, float (*accT)[TCHUNK]) {
    lanes_t L = *Lp;
    const mat_t *t = L.t;
    const uint8_t *bytes = (const uint8_t *)t->words + (L.gbase >> 3);
    const __m256i seven = _mm256_set1_epi32(7), m4095 = _mm256_set1_epi32(4095);
    const __m256i m15 = _mm256_set1_epi32(15), mcol = _mm256_set1_epi32(0x7FFF);
    const __m256i colsm1 = _mm256_set1_epi32((int32_t)(t->cols - 1));
    const int64_t cols = t->cols, pad = t->xpad;
    const float *xs = xt + (cols + pad) * tp + t0; /* per-token sums (int2's background) */
    static const int nl = 8;                          /* one group: the token work hides the gathers' latency */
    int32_t i1a[8] __attribute__((aligned(32))), i2a[8] __attribute__((aligned(32)));
    float w1a[8] __attribute__((aligned(32))), w2a[8] __attribute__((aligned(32)));
    __m256i vbit = _mm256_load_si256((const __m256i *)L.bit), vpos = _mm256_load_si256((const __m256i *)L.pos);
    __m256i vend = _mm256_load_si256((const __m256i *)L.end12), vpark = _mm256_load_si256((const __m256i *)L.off);
    __m256 vw1 = _mm256_load_ps(L.w1), vw2 = _mm256_load_ps(L.w2), vw3 = _mm256_load_ps(L.w3);
    while (L.live > 0) {
        __m256i raw = _mm256_i32gather_epi32((const int *)bytes, _mm256_srli_epi32(vbit, 3), 1);
        __m256i win = _mm256_and_si256(_mm256_srlv_epi32(raw, _mm256_and_si256(vbit, seven)), m4095);
        win = _mm256_max_epi32(win, vpark);
        __m256i ea = _mm256_i32gather_epi32(t->ta, win, 4);
        __m256i eb = _mm256_i32gather_epi32(t->tb, win, 4);
        _mm256_store_si256((__m256i *)i1a, _mm256_add_epi32(vpos, _mm256_and_si256(eb, mcol)));
        _mm256_store_si256((__m256i *)i2a,
                           _mm256_add_epi32(vpos, _mm256_and_si256(_mm256_srli_epi32(eb, 16), mcol)));
        __m256 nz1 = _mm256_castsi256_ps(_mm256_srai_epi32(_mm256_slli_epi32(eb, 16), 31));
        __m256 nz2 = _mm256_castsi256_ps(_mm256_srai_epi32(eb, 31));
        __m256 w1 = t->int2 ? PICK(1, ea, 27, 26, vw1, vw2, vw3) : PICK(0, ea, 27, 26, vw1, vw2, vw3);
        __m256 w2 = t->int2 ? PICK(1, ea, 25, 24, vw1, vw2, vw3) : PICK(0, ea, 25, 24, vw1, vw2, vw3);
        _mm256_store_ps(w1a, _mm256_and_ps(w1, nz1));
        _mm256_store_ps(w2a, _mm256_and_ps(w2, nz2));
        for (int l = 0; l < nl; l++) {
            const float *xa = xt + (int64_t)i1a[l] * tp + t0, *xb = xt + (int64_t)i2a[l] * tp + t0;
            const __m256 wa = _mm256_set1_ps(w1a[l]), wb = _mm256_set1_ps(w2a[l]);
            float *a = accT[l];
            for (int k = 0; k < tc; k += 8) {
                __m256 v = _mm256_fmadd_ps(wa, _mm256_loadu_ps(xa + k), _mm256_load_ps(a + k));
                _mm256_store_ps(a + k, _mm256_fmadd_ps(wb, _mm256_loadu_ps(xb + k), v));
            }
        }
        vbit = _mm256_add_epi32(vbit, _mm256_and_si256(ea, m15));
        vpos = _mm256_add_epi32(vpos, _mm256_srli_epi32(ea, 8));
        int ex = _mm256_movemask_ps(_mm256_castsi256_ps(
            _mm256_or_si256(_mm256_cmpgt_epi32(vpos, colsm1), _mm256_cmpgt_epi32(vbit, vend))));
        if (__builtin_expect(ex, 0)) {
            _mm256_store_si256((__m256i *)L.bit, vbit);
            _mm256_store_si256((__m256i *)L.pos, vpos);
            _mm256_store_si256((__m256i *)L.ea, ea);
            for (int m = ex; m; m &= m - 1) {
                int l = __builtin_ctz(m);
                int64_t bit = L.gbase + L.bit[l], pos = L.pos[l], e = L.ea[l], end = L.end[l], r = L.row[l];
                float w[4] = {0.0f, L.w1[l], L.w2[l], L.w3[l]};
                int st;
                if (pos >= cols)
                    st = walk(t, bit - (e & 15), end, pos - (e >> 8));
                else
                    st = tailt(t, xt + t0, tp, w, bit, end, pos, accT[l], tc);
                for (int k = 0; k < tc && t0 + k < ntok; k++)
                    out[(t0 + k) * t->rows + r] = accT[l][k] + L.base[l] * xs[k];
                note_bad(&L.bad, r, st);
                refill(&L, l, xt, out, tp, t0, tc, accT[l], 0);
            }
            vbit = _mm256_load_si256((const __m256i *)L.bit);
            vpos = _mm256_load_si256((const __m256i *)L.pos);
            vend = _mm256_load_si256((const __m256i *)L.end12);
            vpark = _mm256_load_si256((const __m256i *)L.off);
            vw1 = _mm256_load_ps(L.w1);
            vw2 = _mm256_load_ps(L.w2);
            vw3 = _mm256_load_ps(L.w3);
        }
    }
    *Lp = L;
}

/* Rows [r0, r1) of matrix m (a registry row) for the packed input x into out [ntok * rows]: -1, or the
   smallest (bad row) * 4 + status. Batch 1: x [cols + pad + 1]; batch T: x [cols + pad + 1, tp]. */
int64_t qmoe_native_item(const int64_t *m, const float *x, float *out, int64_t ntok, int64_t tp, int64_t r0,
                         int64_t r1) {
    mat_t t;
    load_mat(m, &t);
    if (r0 >= r1) return -1;
    int64_t s0, e0, s1, e1;
    row_bits(&t, r0, &s0, &e0);
    row_bits(&t, r1 - 1, &s1, &e1);
    int64_t gbase = s0 & ~(int64_t)7;
#ifdef QMOE_SCALAR_ONLY /* tests: the path below for every item */
    e1 = gbase + ((int64_t)1 << 30);
#endif
    if (e1 - gbase >= ((int64_t)1 << 30)) return item_scalar(&t, x, out, ntok, tp, r0, r1);
    lanes_t L;
    memset(&L, 0, sizeof L);
    L.t = &t;
    L.gbase = gbase;
    L.bad = -1;
    if (ntok == 1) {
        L.next = r0;
        L.r1 = r1;
        L.live = NL;
        L.ntok = 1;
        for (int l = 0; l < NL; l++) refill(&L, l, x, out, 1, 0, 0, NULL, 1);
        if (t.int2)
            item_t1_int2(&L, x, out);
        else
            item_t1_ternary(&L, x, out);
        return L.bad;
    }
    int64_t bad = -1;
    float accT[8][TCHUNK] __attribute__((aligned(32)));
    for (int64_t t0 = 0; t0 < ntok; t0 += TCHUNK) {
        int tc = (int)(tp - t0 < TCHUNK ? tp - t0 : TCHUNK); /* tp: a multiple of 8 */
        memset(&L, 0, sizeof L);
        L.t = &t;
        L.gbase = gbase;
        L.bad = -1;
        L.next = r0;
        L.r1 = r1;
        L.live = 8;
        L.ntok = ntok;
        for (int l = 0; l < NL; l++) {
            if (l < 8) {
                refill(&L, l, x, out, tp, t0, tc, accT[l], 0);
            } else { /* item_tn runs one group: park the others */
                L.off[l] = LANE_ZERO;
                L.end12[l] = INT32_MAX;
            }
        }
        item_tn(&L, x, out, tp, t0, tc, ntok, accT);
        if (L.bad >= 0 && (bad < 0 || L.bad < bad)) bad = L.bad;
    }
    return bad;
}

#else /* not x86-64: the numba kernel runs instead */
int64_t qmoe_native_cpu_ok(void) { return 0; }
int64_t qmoe_native_item(const int64_t *m, const float *x, float *out, int64_t ntok, int64_t tp, int64_t r0,
                         int64_t r1) {
    mat_t t;
    load_mat(m, &t);
    return item_scalar(&t, x, out, ntok, tp, r0, r1);
}
#endif
