/* Few-row float32 linear layer, y = x W^T (+ b), that streams every weight row once for all rows of x.
 *
 * x: (M, K) row-major; W: (N, K) row-major, nn.Linear's own layout (nothing is repacked); b: (N) or NULL;
 * y: (M, N) row-major. In a KV-cached decode step M is the batch (a handful of rows) and the weights are far larger
 * than the caches, so the product costs what reading W from memory costs. A general matrix multiply packs W into a
 * blocked copy on every call (reading it and writing it again) and stalls on memory between blocks. Here one weight
 * row is dotted with up to eight rows of x at once (eight AVX2 accumulators, x read from L1), and the row 4 KB
 * ahead is prefetched so that memory keeps streaming while the current row is multiplied. Rows of x beyond the
 * first eight reuse the weight row from L1. Each dot product sums eight interleaved partial sums, so results agree
 * with a BLAS to float rounding, not bit for bit. Built and loaded by lmpo.kernels.rowdot (cc -O3 -mavx2 -mfma).
 */
#include <immintrin.h>

#define PREFETCH_FLOATS 1024

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* y[m0 + i, n] for i < mb (mb <= 8, a compile-time constant after inlining) */
static inline __attribute__((always_inline)) void row_block(const float *restrict x, const float *restrict w,
                                                            float bias, float *restrict y, long K, long N, long n,
                                                            long m0, const int mb, const int prefetch) {
    __m256 acc[8];
    for (int i = 0; i < mb; i++) acc[i] = _mm256_setzero_ps();
    const float *xb = x + m0 * K;
    const long K8 = K & ~7L;
    for (long k = 0; k < K8; k += 8) {
        if (prefetch) _mm_prefetch((const char *)(w + k + PREFETCH_FLOATS), _MM_HINT_T0);
        const __m256 v = _mm256_loadu_ps(w + k);
        for (int i = 0; i < mb; i++) acc[i] = _mm256_fmadd_ps(v, _mm256_loadu_ps(xb + i * K + k), acc[i]);
    }
    for (int i = 0; i < mb; i++) {
        float s = hsum(acc[i]);
        for (long k = K8; k < K; k++) s += w[k] * xb[i * K + k];
        y[(m0 + i) * N + n] = s + bias;
    }
}

#define BLOCK(MB) row_block(x, w, bias, y, K, N, n, m0, MB, m0 == 0)

void lmpo_rowdot(const float *x, const float *W, const float *b, float *y, long M, long K, long N, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long n = 0; n < N; n++) {
        const float *w = W + n * K;
        const float bias = b ? b[n] : 0.0f;
        for (long m0 = 0; m0 < M; m0 += 8) {
            switch (M - m0 >= 8 ? 8 : M - m0) {
            case 8: BLOCK(8); break;
            case 7: BLOCK(7); break;
            case 6: BLOCK(6); break;
            case 5: BLOCK(5); break;
            case 4: BLOCK(4); break;
            case 3: BLOCK(3); break;
            case 2: BLOCK(2); break;
            default: BLOCK(1); break;
            }
        }
    }
}
