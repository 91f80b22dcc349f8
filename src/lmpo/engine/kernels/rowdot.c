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

/* exp(x) for 8 lanes (Cephes' single-precision polynomial, ~1 ulp); exactly 0 below -87.3 (masked scores). */
static inline __m256 exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.3f);
    const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(dead, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* Rotary embedding in place on n vectors of D floats: x[i] = x[i] c[i] - x[i+D/2] s[i] and
 * x[i+D/2] = x[i+D/2] c[i+D/2] + x[i] s[i+D/2] (Llama's q cos + rotate_half(q) sin), c and s: one D-vector each. */
static inline void rope(float *x, const float *c, const float *s, long D) {
    const long half = D / 2;
    for (long i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* One decode step of attention for every row and query head over preallocated key/value buffers.
 *
 * q: (B, H, D) the step's queries, rotated in place when cos/sin are given; k, v: (B, KV, D) the step's keys and
 * values (k rotated likewise), written to position L-1 of the buffers when not NULL; cos, sin: (B, D) or NULL;
 * K, V: (B, KV, Lmax, D) buffers of which the first L positions are attended; bias: (B, Lmax) additive mask (0 or
 * -inf on padding); out: (B, H, D). Query head h reads key/value head h / (H / KV) (grouped-query attention).
 * out = softmax(q K^T * scale + bias) V in float32, the maximum subtracted before exponentiation. One call replaces
 * the rotary embedding, the cache write, the batched products, softmax and reshapes a framework dispatches one by
 * one for this (B x H) x 1 x L shape.
 */
void lmpo_decode_attention(float *q, float *k, const float *v, const float *cos, const float *sin, float *K, float *V,
                           const float *bias, float *out, long B, long H, long KV, long D, long L, long Lmax,
                           float scale, int threads) {
    const long group = H / KV;
    if (cos) {
        for (long bh = 0; bh < B * H; bh++) rope(q + bh * D, cos + (bh / H) * D, sin + (bh / H) * D, D);
        if (k)
            for (long bk = 0; bk < B * KV; bk++) rope(k + bk * D, cos + (bk / KV) * D, sin + (bk / KV) * D, D);
    }
    if (k)
        for (long bk = 0; bk < B * KV; bk++)
            for (long d = 0; d < D; d++) {
                K[(bk * Lmax + L - 1) * D + d] = k[bk * D + d];
                V[(bk * Lmax + L - 1) * D + d] = v[bk * D + d];
            }
    #pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (long bh = 0; bh < B * H; bh++) {
        const long b = bh / H, h = bh % H, kv = h / group;
        const float *qv = q + bh * D;
        const float *Kb = K + (b * KV + kv) * Lmax * D, *Vb = V + (b * KV + kv) * Lmax * D;
        const float *bb = bias + b * Lmax;
        float stack[2048];
        float *s = L <= 2048 ? stack : (float *)malloc(sizeof(float) * L);
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
        const __m256 mv = _mm256_set1_ps(m);
        __m256 tv = _mm256_setzero_ps();
        long j = 0;
        for (; j + 8 <= L; j += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
            _mm256_storeu_ps(s + j, e);
            tv = _mm256_add_ps(tv, e);
        }
        float total = hsum(tv);
        for (; j < L; j++) { s[j] = expf(s[j] - m); total += s[j]; }
        const float inv = 1.0f / total;
        float *o = out + bh * D;
        for (long d = 0; d < D; d++) o[d] = 0.0f;
        for (j = 0; j < L; j++) {
            const float p = s[j] * inv;
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

/* RMSNorm of `rows` vectors of H floats: y = w * (x / sqrt(mean(x^2) + eps)) (Llama's, in float32). */
void lmpo_rms_norm(const float *x, const float *w, float *y, long rows, long H, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * H;
        float *yr = y + r * H;
        __m256 a = _mm256_setzero_ps();
        long i = 0;
        for (; i + 8 <= H; i += 8) { const __m256 t = _mm256_loadu_ps(xr + i); a = _mm256_fmadd_ps(t, t, a); }
        float ss = hsum(a);
        for (; i < H; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (i = 0; i < H; i++) yr[i] = w[i] * (xr[i] * inv);
    }
}

/* AdamW's weight update from its moments in one pass over memory, for an optimizer folded into backward
 * (lmpo.train.inbackward; torch's element-wise operations take five): p <- p decay - step m / (sqrt(v) / bc2_sqrt +
 * eps), fused AdamW's expression with decay = 1 - lr wd and step = lr / (1 - b1^t). Threads split the elements. */
void lmpo_adam_apply(float *restrict p, const float *restrict m, const float *restrict v, long n, float decay,
                     float step, float bc2_sqrt, float eps, int threads) {
    const __m256 vd = _mm256_set1_ps(decay), vs = _mm256_set1_ps(step), vb = _mm256_set1_ps(bc2_sqrt),
                 ve = _mm256_set1_ps(eps);
    const long n8 = n & ~7L;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (long i = 0; i < n8; i += 8) {
        const __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(_mm256_loadu_ps(v + i)), vb), ve);
        const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), vd);
        _mm256_storeu_ps(p + i, _mm256_sub_ps(pi, _mm256_div_ps(_mm256_mul_ps(vs, _mm256_loadu_ps(m + i)), den)));
    }
    for (long i = n8; i < n; i++) p[i] = p[i] * decay - step * m[i] / (sqrtf(v[i]) / bc2_sqrt + eps);
}

/* Draw one token per row from softmax(logits / temperature) by inverse CDF, in three passes over each row instead
 * of a framework's division, finiteness check, log-softmax, exponential, cumulative sum and search.
 *
 * logits: (n, V); u: (n) uniforms in [0, 1), or NULL for the argmax (greedy; the first maximum); e: (n, V) scratch
 * that receives exp(logits / temperature - max). token: (n) the drawn index: the first i whose running sum of e,
 * accumulated sequentially in double precision (as a CPU cumulative sum does), exceeds u * sum(e) (so entries of
 * zero probability are never drawn); logp: (n) its log-probability, logits[i] / temperature - max - log(sum(e)).
 * Returns the number of rows holding a NaN or an infinity (their outputs are left unset). */
long lmpo_sample_rows(const float *logits, long n, long V, float temperature, const float *u, float *e,
                      long *token, float *logp) {
    long bad = 0;
    for (long r = 0; r < n; r++) {
        const float *x = logits + r * V;
        float *er = e + r * V;
        /* pass 1: maximum of x / temperature, and whether every entry is finite */
        __m256 mv = _mm256_set1_ps(-INFINITY), finite = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
        const __m256 vt = _mm256_set1_ps(temperature), big = _mm256_set1_ps(INFINITY);
        long i = 0;
        for (; i + 8 <= V; i += 8) {
            const __m256 y = _mm256_div_ps(_mm256_loadu_ps(x + i), vt);
            mv = _mm256_max_ps(mv, y);
            /* |y| < inf is false for NaN and for +-inf */
            finite = _mm256_and_ps(finite, _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), y), big, _CMP_LT_OQ));
        }
        float m = -INFINITY;
        float lanes[8];
        _mm256_storeu_ps(lanes, mv);
        for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
        int ok = _mm256_movemask_ps(finite) == 0xFF;
        for (; i < V; i++) {
            const float y = x[i] / temperature;
            if (!(fabsf(y) < INFINITY)) ok = 0;
            if (y > m) m = y;
        }
        if (!ok) { bad++; continue; }
        /* pass 2: e = exp(y - m) and its sequential double-precision sum */
        const __m256 vm = _mm256_set1_ps(m);
        for (i = 0; i + 8 <= V; i += 8)
            _mm256_storeu_ps(er + i, exp256(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(x + i), vt), vm)));
        for (; i < V; i++) er[i] = expf(x[i] / temperature - m);
        double total = 0.0;
        for (i = 0; i < V; i++) total += er[i];
        long pick = 0;
        if (u) { /* pass 3: the first index whose running sum exceeds u * total */
            const double target = (double)u[r] * total;
            double run = 0.0;
            pick = -1;
            for (i = 0; i < V; i++) {
                run += er[i];
                if (run > target) { pick = i; break; }
            }
            if (pick < 0) /* unreachable in exact arithmetic (u < 1); take the last entry of non-zero probability */
                for (pick = V - 1; pick > 0 && er[pick] == 0.0f; pick--) {}
        } else {
            for (i = 1; i < V; i++) if (x[i] / temperature > x[pick] / temperature) pick = i;
        }
        token[r] = pick;
        logp[r] = (float)((double)(x[pick] / temperature) - (double)m - log(total));
    }
    return bad;
}
