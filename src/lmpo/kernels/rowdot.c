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
#include <math.h>
#include <stdlib.h>

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

/* One decode step of attention for every row and query head, over the filled part of preallocated key/value buffers.
 *
 * q: (B, H, D) the step's queries; K, V: (B, KV, Lmax, D) buffers of which the first L positions are filled;
 * bias: (B, Lmax) additive mask (0 or -inf; -inf on padding); out: (B, H, D). Query head h reads key/value head
 * h / (H / KV) (grouped-query attention). out = softmax(q K^T * scale + bias) V, in float32 with the maximum
 * subtracted before exponentiation. One small loop nest replaces the batched matrix products, softmax and reshapes
 * that a framework dispatches one by one for this (B x H) x 1 x L shape.
 */
void lmpo_decode_attention(const float *q, const float *K, const float *V, const float *bias, float *out, long B,
                           long H, long KV, long D, long L, long Lmax, float scale, int threads) {
    const long group = H / KV;
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long bh = 0; bh < B * H; bh++) {
        const long b = bh / H, h = bh % H, kv = h / group;
        const float *qv = q + bh * D;
        const float *Kb = K + (b * KV + kv) * Lmax * D, *Vb = V + (b * KV + kv) * Lmax * D;
        const float *bb = bias + b * Lmax;
        float stack[1024];
        float *s = L <= 1024 ? stack : (float *)malloc(sizeof(float) * L);
        float m = -INFINITY;
        for (long j = 0; j < L; j++) {
            const float *kj = Kb + j * D;
            __m256 a = _mm256_setzero_ps();
            long d = 0;
            for (; d + 8 <= D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qv + d), _mm256_loadu_ps(kj + d), a);
            float dot = hsum(a);
            for (; d < D; d++) dot += qv[d] * kj[d];
            s[j] = dot * scale + bb[j];
            if (s[j] > m) m = s[j];
        }
        float total = 0.0f;
        for (long j = 0; j < L; j++) { s[j] = expf(s[j] - m); total += s[j]; }
        float *o = out + bh * D;
        for (long d = 0; d < D; d++) o[d] = 0.0f;
        for (long j = 0; j < L; j++) {
            const float p = s[j] / total;
            const float *vj = Vb + j * D;
            const __m256 pv = _mm256_set1_ps(p);
            long d = 0;
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vj + d), _mm256_loadu_ps(o + d)));
            for (; d < D; d++) o[d] += p * vj[d];
        }
        if (s != stack) free(s);
    }
}
