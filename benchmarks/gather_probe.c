/* Gather vs scalar load cost on this CPU: the numbers behind docs/kernels.md "Measured limits".

       cc -O2 -o /tmp/gather_probe benchmarks/gather_probe.c && /tmp/gather_probe

   Latency: one chain of dependent 8-lane vpgatherdd from a 16 KiB table (L1); throughput: four independent
   chains; scalar: a chain of dependent 4-byte loads from the same table. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int tab[4096];

__attribute__((target("avx2"))) int main(void) {
    for (int i = 0; i < 4096; i++) tab[i] = (int)((i * 2654435761u) & 4095);
    __m256i a = _mm256_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8), b = _mm256_add_epi32(a, _mm256_set1_epi32(10));
    __m256i c = _mm256_add_epi32(a, _mm256_set1_epi32(20)), d = _mm256_add_epi32(a, _mm256_set1_epi32(30));
    const long n = 10000000;
    double t = now();
    for (long i = 0; i < n; i++) a = _mm256_i32gather_epi32(tab, a, 4);
    double lat = (now() - t) / n;
    t = now();
    for (long i = 0; i < n; i++) {
        a = _mm256_i32gather_epi32(tab, a, 4);
        b = _mm256_i32gather_epi32(tab, b, 4);
        c = _mm256_i32gather_epi32(tab, c, 4);
        d = _mm256_i32gather_epi32(tab, d, 4);
    }
    double thr = (now() - t) / n / 4;
    int s = 1;
    t = now();
    for (long i = 0; i < n; i++) s = tab[s];
    double scalar = (now() - t) / n;
    int sink = _mm256_extract_epi32(a, 0) + _mm256_extract_epi32(b, 0) + _mm256_extract_epi32(c, 0) +
               _mm256_extract_epi32(d, 0) + s;
    printf("8-lane gather: latency %.2f ns, throughput %.2f ns; dependent scalar load %.2f ns (%d)\n", lat * 1e9,
           thr * 1e9, scalar * 1e9, sink & 1);
    return 0;
}
