/* sensimix/a8.py's float sequences in AVX2 (256-bit) code, shared by a8gemm.c and a8attn.c: the same fp32
 * operations in the same order as the torch definitions (compile with -ffp-contract=off: no FMA may merge them),
 * sums in fp64 where the definitions sum in fp64. unit/test_a8_native.py checks them bit for bit.
 */
#ifndef SENSIMIX_A8_SPEC_H
#define SENSIMIX_A8_SPEC_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define TAIL 16   /* bytes after each operand row: zero (int32), scale (fp32), total (int32), unused (4) */

/* sensimix/a8.py's constants, as the fp32 values torch rounds them to */
#define SQRT_HALF 0x1.6a09e6p-1f
#define P_AS 0x1.4f740ap-2f
#define LOG2E 0x1.715476p+0f
#define C1 0x1.63p-1f
#define C2 -0x1.bd0106p-13f
#define ZMAX 0x1.2p+3f
#define A0 0x1.0fb844p+0f
#define A1 -0x1.7401c6p+0f
#define A2 0x1.6be1c6p+0f
#define A3 -0x1.23531cp-2f
#define A4 0x1.04f20cp-2f
#define E0 0x1.a0d2cep-13f
#define E1 0x1.6e879cp-10f
#define E2 0x1.111210p-7f
#define E3 0x1.555382p-5f
#define E4 0x1.555554p-3f
#define E5 0x1.0p-1f
#define TINY_RANGE 0x1p-100f
#define FLUSH -80.0f

static inline int64_t kpad(int64_t k) { return (k + 3) / 4 * 4; }

static inline void put_tail(uint8_t *row, int64_t k, int32_t zero, float scale, int32_t total) {
    uint8_t *t = row + kpad(k);
    memcpy(t, &zero, 4);
    memcpy(t + 4, &scale, 4);
    memcpy(t + 8, &total, 4);
    memset(t + 12, 0, 4);
}

static inline void get_tail(const uint8_t *row, int64_t k, int32_t *zero, float *scale, int32_t *total) {
    const uint8_t *t = row + kpad(k);
    memcpy(zero, t, 4);
    memcpy(scale, t + 4, 4);
    memcpy(total, t + 8, 4);
}

static inline float hmin8(__m256 v) {
    float l[8], r;
    _mm256_storeu_ps(l, v);
    r = l[0];
    for (int i = 1; i < 8; i++) r = l[i] < r ? l[i] : r;
    return r;
}

static inline float hmax8(__m256 v) {
    float l[8], r;
    _mm256_storeu_ps(l, v);
    r = l[0];
    for (int i = 1; i < 8; i++) r = l[i] > r ? l[i] : r;
    return r;
}

/* one fp32 row x[k] -> one operand row (the A8 rule of sensimix/a8.py: quantize_rows) */
static inline void quantize_row(const float *x, int64_t k, uint8_t *row) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), inf = _mm256_set1_ps(INFINITY);
    __m256 vmin = _mm256_setzero_ps(), vmax = _mm256_setzero_ps(), bad = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= k; j += 8) {
        __m256 v = _mm256_loadu_ps(x + j);
        vmin = _mm256_min_ps(vmin, v);
        vmax = _mm256_max_ps(vmax, v);
        bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(v, absmask), inf, _CMP_NLT_UQ));  /* inf or NaN */
    }
    float lo = hmin8(vmin), hi = hmax8(vmax);
    int notfinite = _mm256_movemask_ps(bad) != 0;
    for (; j < k; j++) {
        float v = x[j];
        notfinite |= !(fabsf(v) < INFINITY);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    float d = hi - lo;
    int64_t kp = kpad(k);
    if (notfinite || !(fabsf(d) < INFINITY) || d < TINY_RANGE) {  /* NaN row, or the zero row */
        memset(row, 0, (size_t)kp);
        put_tail(row, k, 0, (notfinite || !(fabsf(d) < INFINITY)) ? NAN : 0.0f, 0);
        return;
    }
    float inv = 255.0f / d;
    float zf = nearbyintf(-lo * inv);
    int32_t zero = zf < 0.0f ? 0 : (zf > 255.0f ? 255 : (int32_t)zf);
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i vz = _mm256_set1_epi32(zero), lo0 = _mm256_setzero_si256(), hi255 = _mm256_set1_epi32(255);
    __m256i vsum = _mm256_setzero_si256();
    for (j = 0; j + 16 <= k; j += 16) {
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j), vinv));       /* rint: MXCSR's RNE */
        __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8), vinv));
        i0 = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(i0, vz), lo0), hi255);
        i1 = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(i1, vz), lo0), hi255);
        vsum = _mm256_add_epi32(vsum, _mm256_add_epi32(i0, i1));
        __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(i0, i1), 0xd8);         /* 16 x u16, in order */
        __m256i b = _mm256_permute4x64_epi64(_mm256_packus_epi16(w, w), 0x08);           /* 16 x u8 in the low half */
        _mm_storeu_si128((__m128i *)(row + j), _mm256_castsi256_si128(b));
    }
    int32_t parts[8], sum = 0;
    _mm256_storeu_si256((__m256i *)parts, vsum);
    for (int t = 0; t < 8; t++) sum += parts[t];
    for (; j < k; j++) {
        int32_t v = (int32_t)nearbyintf(x[j] * inv) + zero;
        v = v < 0 ? 0 : (v > 255 ? 255 : v);
        row[j] = (uint8_t)v;
        sum += v;
    }
    for (; j < kp; j++) row[j] = 0;
    put_tail(row, k, zero, d / 255.0f, sum - (int32_t)k * zero);
}

/* 2^n for integer-valued n in [-126, 127] (lanes outside: any value, their results are NaN anyway) */
static inline __m256 pow2_8(__m256 n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23));
}

/* exp(y) for y in [-81, 0] (sensimix/a8.py: exp_neg): Cephes' expf, the same fp32 operations in the same order */
static inline __m256 exp_neg8(__m256 y) {
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(y, _mm256_set1_ps(LOG2E)), half));
    __m256 r = _mm256_sub_ps(_mm256_sub_ps(y, _mm256_mul_ps(n, _mm256_set1_ps(C1))), _mm256_mul_ps(n, _mm256_set1_ps(C2)));
    __m256 e = _mm256_set1_ps(E0);
    e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(E1));
    e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(E2));
    e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(E3));
    e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(E4));
    e = _mm256_add_ps(_mm256_mul_ps(e, r), _mm256_set1_ps(E5));
    return _mm256_mul_ps(_mm256_add_ps(_mm256_mul_ps(e, _mm256_mul_ps(r, r)), _mm256_add_ps(r, one)), pow2_8(n));
}

/* the softmax's exp of d = s - max (sensimix/a8.py: softmax_exp): exp_neg8, and +0 below -80 or for -inf/NaN */
static inline __m256 softmax_exp8(__m256 d) {
    __m256 keep = _mm256_cmp_ps(d, _mm256_set1_ps(FLUSH), _CMP_GE_OQ);
    return _mm256_and_ps(keep, exp_neg8(_mm256_and_ps(keep, d)));
}

/* the A8 GELU (sensimix/a8.py: gelu), the same fp32 operations in the same order */
static inline __m256 gelu8(__m256 x) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f), half = _mm256_set1_ps(0.5f);
    __m256 z = _mm256_mul_ps(_mm256_and_ps(x, absmask), _mm256_set1_ps(SQRT_HALF));
    __m256 beyond = _mm256_cmp_ps(z, _mm256_set1_ps(ZMAX), _CMP_GT_OQ);              /* false for NaN */
    z = _mm256_blendv_ps(z, _mm256_set1_ps(ZMAX), beyond);
    __m256 t = _mm256_div_ps(one, _mm256_add_ps(one, _mm256_mul_ps(_mm256_set1_ps(P_AS), z)));
    __m256 poly = _mm256_set1_ps(A0);
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(A1));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(A2));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(A3));
    poly = _mm256_add_ps(_mm256_mul_ps(poly, t), _mm256_set1_ps(A4));
    poly = _mm256_mul_ps(poly, t);
    __m256 e = exp_neg8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, z)));       /* -(z z): exact negation */
    __m256 erfc = _mm256_andnot_ps(beyond, _mm256_mul_ps(poly, e));                      /* beyond: +0 */
    __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    return _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_blendv_ps(_mm256_sub_ps(two, erfc), erfc, neg));
}

static inline double hsum4d(__m256d v) {
    double l[4];
    _mm256_storeu_pd(l, v);
    return (l[0] + l[1]) + (l[2] + l[3]);
}

/* y[n] = the A8 LayerNorm of y (+ res when not NULL), in place (sensimix/a8.py: layer_norm) */
static inline void norm_row(float *y, const float *res, const float *gamma, const float *beta, int64_t n, float eps) {
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(y + j);
        if (res) {
            v = _mm256_add_ps(v, _mm256_loadu_ps(res + j));
            _mm256_storeu_ps(y + j, v);
        }
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
    }
    double sum = hsum4d(_mm256_add_pd(s0, s1));
    for (; j < n; j++) {
        if (res) y[j] = y[j] + res[j];
        sum += (double)y[j];
    }
    float mean = (float)(sum / (double)n);
    const __m256d md = _mm256_set1_pd((double)mean);
    s0 = s1 = _mm256_setzero_pd();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 v = _mm256_loadu_ps(y + j);
        __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), md);
        __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), md);
        s0 = _mm256_add_pd(s0, _mm256_mul_pd(d0, d0));
        s1 = _mm256_add_pd(s1, _mm256_mul_pd(d1, d1));
    }
    double sq = hsum4d(_mm256_add_pd(s0, s1));
    for (; j < n; j++) {
        double d = (double)y[j] - (double)mean;
        sq += d * d;
    }
    float var = (float)(sq / (double)n);
    float rstd = 1.0f / sqrtf(var + eps);
    const __m256 vm = _mm256_set1_ps(mean), vr = _mm256_set1_ps(rstd);
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(y + j), vm), vr), _mm256_loadu_ps(gamma + j));
        _mm256_storeu_ps(y + j, _mm256_add_ps(v, _mm256_loadu_ps(beta + j)));
    }
    for (; j < n; j++) y[j] = ((y[j] - mean) * rstd) * gamma[j] + beta[j];
}

#endif
