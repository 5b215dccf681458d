/* The 8-bit index linear on 16-bit activations, for x86 CPUs with AVX2 (sensimix/kernels/int16.py).
 *
 * y[m, n] = sa[m] * (sw[n] * acc[m, n] + cw[n] * rs[m]) + bias[n], where each row of x is rounded to integers
 * A[m, :] = round(x[m, :] / sa[m]) with |A| <= 16383 (15 bits), acc = A @ Q^T is exact in int32, Q are the
 * checkpoint's int8 indices and W_hat = (Q + 128) * s + lo = s * Q + c (cw = c = 128 s + lo), rs[m] = sum_k A[m, k].
 *
 * Why 16-bit integers: an AVX2 core without VNNI multiplies 16 int16 pairs per VPMADDWD, twice the products of an
 * fp32 FMA, and int16 x int8 products cannot saturate as VPMADDUBSW's do. 15-bit activations keep every partial
 * sum exact: |A * Q| <= 16383 * 128, so KC = 1024 products per int32 lane (512 pairs) stay below 2^31; longer
 * rows are summed in fp32 per KC chunk.
 *
 * Layouts: A is int16 [mpad, lda] (lda even, rows past m are read but never written out; mpad a multiple of MR);
 * Q is packed once into panels of NR = 16 output columns, 32 bytes per pair of k (columns 0-7 then 8-15, each
 * column's two int8 values adjacent: VPMOVSXBW turns 16 bytes into the 8 column pairs VPMADDWD reads).
 * The micro-kernel (6 rows x 16 columns, 12 accumulators) is inline assembly: compilers spill its registers.
 * Blocks of up to MC rows are shared out between `threads` POSIX threads (the caller is one of them) by an atomic
 * counter, not split in fixed halves: on a shared machine a thread that loses its core for a while takes fewer
 * blocks instead of holding up the call. Every function is reentrant.
 *
 * sensimix_i16_gemm_add_norm fuses what follows an output projection: the residual add and the LayerNorm run on
 * each block of rows once its GEMM is done, while the rows are still in cache (no separate passes over [m, n]).
 *
 * sensimix_i16_gemm_gelu_rows fuses an FFN's middle: the GEMM, the erf GELU in its epilogue, and the rounding of
 * the result to the next GEMM's int16 rows, one block of rows at a time in a per-thread buffer, so the [m, n] fp32
 * intermediate is never written to memory (nor its pages faulted in), read back for the GELU, or again to round.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "i16_micro.h"

#define NR I16_NR /* output columns per panel */
#define MR I16_MR /* rows per micro-kernel call */
#define MC 96     /* rows per block: 96 x 768 int16 = 144 KiB, kept in L2 while the panels stream past */
#define KC 1024   /* products summed in int32 before the fp32 sum (see the header) */
#define AMAX 16383.0f

/* exp(x), |rel. error| ~1 ulp (Cephes expf: x = n ln2 + r, 2^n * poly(r)); x clamped to [-87.3, 88.3] */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
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
    __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

/* the erf GELU, y * (1 + erf(y / sqrt 2)) / 2, with erfc(z) = poly(t) exp(-z^2), t = 1 / (1 + p z) for z >= 0
 * (Abramowitz-Stegun 7.1.26: |erf error| <= 1.5e-7), so that y * erfc(|z|) / 2 stays accurate for y < 0 */
static inline __m256 gelu256(__m256 y) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 z = _mm256_mul_ps(_mm256_and_ps(y, absmask), _mm256_set1_ps(0.70710678118654752f));
    __m256 t = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_fmadd_ps(z, _mm256_set1_ps(0.3275911f), _mm256_set1_ps(1.0f)));
    __m256 q = _mm256_set1_ps(1.061405429f);
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-1.453152027f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(1.421413741f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(-0.284496736f));
    q = _mm256_fmadd_ps(q, t, _mm256_set1_ps(0.254829592f));
    __m256 erfc = _mm256_mul_ps(_mm256_mul_ps(q, t), exp256(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(z, z))));
    /* y >= 0: 1 + erf = 2 - erfc; y < 0: 1 + erf(-|z|) = erfc */
    __m256 one_plus_erf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0f), erfc), erfc,
                                           _mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_LT_OQ));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), y), one_plus_erf);
}

/* the calling convention of the functions below, checked by sensimix.kernels.native against native_builds.BUILDS:
 * bump it with the row's abi whenever a signature or a layout the Python wrapper relies on changes */
int64_t sensimix_abi_version(void) { return 1; }

int64_t sensimix_i16_mr(void) { return MR; }

int64_t sensimix_i16_packed_bytes(int64_t n, int64_t k) { return ((n + NR - 1) / NR) * ((k + 1) / 2) * 32; }

/* q: int8 [n, k] row-major -> out: sensimix_i16_packed_bytes(n, k) bytes (padding columns and k are 0) */
void sensimix_i16_pack_weight(const int8_t *q, int64_t n, int64_t k, int8_t *out) {
    int64_t pairs = (k + 1) / 2, panels = (n + NR - 1) / NR;
    memset(out, 0, (size_t)(panels * pairs * 32));
    for (int64_t col = 0; col < n; col++) {
        int8_t *panel = out + (col / NR) * pairs * 32 + ((col % NR) / 8) * 16 + (col % 8) * 2;
        for (int64_t kk = 0; kk < k; kk++) panel[(kk / 2) * 32 + (kk % 2)] = q[col * k + kk];
    }
}

/* rows of x [m, k] (stride ldx) -> A [m, lda] int16 (columns k..lda zero), scale sa[m] and row sums rs[m].
 * A row holding a NaN or an infinity gets sa = NaN, so its outputs are NaN as the exact GEMM's would be. */
void sensimix_i16_quantize(const float *x, int64_t m, int64_t k, int64_t ldx, int16_t *a, int64_t lda, float *sa,
                           int32_t *rs) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int64_t i = 0; i < m; i++) {
        const float *xr = x + i * ldx;
        int16_t *ar = a + i * lda;
        __m256 vmax = _mm256_setzero_ps(), vsum = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 8 <= k; j += 8) {
            __m256 v = _mm256_loadu_ps(xr + j);
            vmax = _mm256_max_ps(vmax, _mm256_and_ps(v, absmask));
            vsum = _mm256_add_ps(vsum, v);  /* only to detect NaN / inf */
        }
        float lanes[8], sums[8], amax = 0.0f, total = 0.0f;
        _mm256_storeu_ps(lanes, vmax);
        _mm256_storeu_ps(sums, vsum);
        for (int t = 0; t < 8; t++) {
            amax = lanes[t] > amax ? lanes[t] : amax;
            total += sums[t];
        }
        for (; j < k; j++) {
            float v = fabsf(xr[j]);
            amax = v > amax ? v : amax;
            total += xr[j];
        }
        if (!isfinite(total) || !isfinite(amax)) {
            sa[i] = NAN;
            rs[i] = 0;
            memset(ar, 0, (size_t)lda * sizeof(int16_t));
            continue;
        }
        float s = amax > 0.0f ? amax / AMAX : 1.0f, inv = 1.0f / s;
        sa[i] = s;
        if (amax > 0.0f && amax < 0x1p-100f) {  /* 1 / s could overflow (s subnormal): scale in double */
            double dinv = (double)AMAX / (double)amax;
            int32_t sum = 0;
            for (j = 0; j < k; j++) {
                double f = nearbyint((double)xr[j] * dinv);
                int32_t v = (int32_t)(f > AMAX ? AMAX : (f < -AMAX ? -AMAX : f));
                ar[j] = (int16_t)v;
                sum += v;
            }
            for (; j < lda; j++) ar[j] = 0;
            rs[i] = sum;
            continue;
        }
        __m256 vinv = _mm256_set1_ps(inv), lim = _mm256_set1_ps(AMAX);
        __m256i isum = _mm256_setzero_si256();
        for (j = 0; j + 16 <= k; j += 16) {  /* round to nearest even (MXCSR default), clamped to +-16383 */
            __m256 f0 = _mm256_mul_ps(_mm256_loadu_ps(xr + j), vinv);
            __m256 f1 = _mm256_mul_ps(_mm256_loadu_ps(xr + j + 8), vinv);
            f0 = _mm256_max_ps(_mm256_min_ps(f0, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
            f1 = _mm256_max_ps(_mm256_min_ps(f1, lim), _mm256_sub_ps(_mm256_setzero_ps(), lim));
            __m256i i0 = _mm256_cvtps_epi32(f0), i1 = _mm256_cvtps_epi32(f1);
            isum = _mm256_add_epi32(isum, _mm256_add_epi32(i0, i1));
            _mm256_storeu_si256((__m256i *)(ar + j), _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xd8));
        }
        int32_t parts[8], sum = 0;
        _mm256_storeu_si256((__m256i *)parts, isum);
        for (int t = 0; t < 8; t++) sum += parts[t];
        for (; j < k; j++) {
            float f = xr[j] * inv;
            f = f > AMAX ? AMAX : (f < -AMAX ? -AMAX : f);
            int32_t v = (int32_t)nearbyintf(f);
            ar[j] = (int16_t)v;
            sum += v;
        }
        for (; j < lda; j++) ar[j] = 0;
        rs[i] = sum;
    }
}

typedef struct {
    const int16_t *a;
    int64_t lda, m, n, k;
    int64_t rows;     /* rows per block taken from the counter (<= MC, a multiple of MR) */
    const int8_t *packed;
    const float *sa;
    const int32_t *rs;
    const float *sw, *cw, *bias;
    float *out;
    int64_t ldo;
    int16_t *qa;      /* gelu_rows: the next GEMM's rows (else NULL) */
    int64_t ldq;
    float *qsa;
    int32_t *qrs;
    float *work;      /* gelu_rows: MC * n floats per thread (sensimix_i16_work_floats), or NULL to allocate */
    const float *res; /* add_norm: out = LayerNorm(y + res) with gamma, beta, eps (else NULL) */
    int64_t ldr;
    const float *gamma, *beta;
    float eps;
    atomic_long *next;  /* the next block to take (shared by the call's threads) */
    int status;       /* 0, or -3 when the block buffer could not be allocated */
} job_t;

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* y = LayerNorm(y + res) over n values: mean, then the variance about it (two passes, as torch's CPU LayerNorm is
 * accurate to: no E[x^2] - E[x]^2 cancellation), then (y - mean) / sqrt(var + eps) * gamma + beta */
static void add_norm_row(float *y, const float *res, const float *gamma, const float *beta, int64_t n, float eps) {
    __m256 vs = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        __m256 v = _mm256_add_ps(_mm256_loadu_ps(y + j), _mm256_loadu_ps(res + j));
        _mm256_storeu_ps(y + j, v);
        vs = _mm256_add_ps(vs, v);
    }
    float sum = hsum256(vs);
    for (; j < n; j++) sum += (y[j] += res[j]);
    float mean = sum / (float)n;
    __m256 vm = _mm256_set1_ps(mean), vq = _mm256_setzero_ps();
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 d = _mm256_sub_ps(_mm256_loadu_ps(y + j), vm);
        vq = _mm256_fmadd_ps(d, d, vq);
    }
    float sq = hsum256(vq);
    for (; j < n; j++) sq += (y[j] - mean) * (y[j] - mean);
    float rstd = 1.0f / sqrtf(sq / (float)n + eps);
    __m256 vr = _mm256_set1_ps(rstd);
    for (j = 0; j + 8 <= n; j += 8) {
        __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(y + j), vm), vr);
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(d, _mm256_loadu_ps(gamma + j), _mm256_loadu_ps(beta + j)));
    }
    for (; j < n; j++) y[j] = (y[j] - mean) * rstd * gamma[j] + beta[j];
}

static void run_rows(job_t *j) {
    int64_t pairs = (j->k + 1) / 2, panels = (j->n + NR - 1) / NR, chunk = KC / 2;
    int32_t acc[12][8];
    float *block = j->work, *owned = NULL;  /* gelu_rows: a block of fp32 rows, GELU applied, rounded when done */
    if (j->qa && !block) {
        block = owned = (float *)malloc((size_t)MC * (size_t)j->n * sizeof(float));
        if (!block) {
            j->status = -3;
            return;
        }
    }
    for (;;) {
        int64_t mb = (int64_t)atomic_fetch_add(j->next, 1) * j->rows;
        if (mb >= j->m) break;
        int64_t me = mb + j->rows < j->m ? mb + j->rows : j->m;
        for (int64_t p = 0; p < panels; p++) {
            const int8_t *panel = j->packed + p * pairs * 32;
            int64_t n0 = p * NR, cols = j->n - n0 < NR ? j->n - n0 : NR;
            float sw[NR] = {0}, cw[NR] = {0}, bias[NR] = {0};
            for (int c = 0; c < cols; c++) {
                sw[c] = j->sw[n0 + c];
                cw[c] = j->cw[n0 + c];
                bias[c] = j->bias ? j->bias[n0 + c] : 0.0f;
            }
            __m256 vsw[2], vcw[2], vbias[2];
            for (int h = 0; h < 2; h++) {
                vsw[h] = _mm256_loadu_ps(sw + 8 * h);
                vcw[h] = _mm256_loadu_ps(cw + 8 * h);
                vbias[h] = _mm256_loadu_ps(bias + 8 * h);
            }
            for (int64_t m = mb; m < me; m += MR) {
                __m256 sums[12];
                for (int64_t k0 = 0; k0 < pairs; k0 += chunk) {
                    int64_t np = pairs - k0 < chunk ? pairs - k0 : chunk;
                    i16_micro_kernel(j->a + m * j->lda + 2 * k0, j->lda, panel + k0 * 32, np, acc);
                    for (int t = 0; t < 12; t++) {
                        __m256 f = _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)acc[t]));
                        sums[t] = k0 ? _mm256_add_ps(sums[t], f) : f;
                    }
                }
                for (int r = 0; r < MR && m + r < me; r++) {
                    __m256 s = _mm256_set1_ps(j->sa[m + r]), row_sum = _mm256_set1_ps((float)j->rs[m + r]);
                    float *o = (block ? block + (m + r - mb) * j->n : j->out + (m + r) * j->ldo) + n0;
                    for (int h = 0; h < 2; h++) {
                        __m256 y = _mm256_fmadd_ps(vcw[h], row_sum, _mm256_mul_ps(vsw[h], sums[2 * r + h]));
                        y = _mm256_fmadd_ps(s, y, vbias[h]);
                        if (block) y = gelu256(y);
                        if (cols == NR) {
                            _mm256_storeu_ps(o + 8 * h, y);
                        } else {
                            float tail[8];
                            _mm256_storeu_ps(tail, y);
                            for (int c = 0; c < 8 && 8 * h + c < cols; c++) o[8 * h + c] = tail[c];
                        }
                    }
                }
            }
        }
        if (block)  /* the block's rows are complete: round them for the next GEMM */
            sensimix_i16_quantize(block, me - mb, j->n, j->n, j->qa + mb * j->ldq, j->ldq, j->qsa + mb, j->qrs + mb);
        if (j->res)  /* the block's rows are complete (and in cache): residual and LayerNorm */
            for (int64_t r = mb; r < me; r++)
                add_norm_row(j->out + r * j->ldo, j->res + r * j->ldr, j->gamma, j->beta, j->n, j->eps);
    }
    free(owned);
}

#include "row_pool.h"

/* floats of work space gelu_rows needs: MC * n per thread (see pool_run) */
int64_t sensimix_i16_work_floats(int64_t m, int64_t n, int threads) {
    return (int64_t)pool_threads(m, threads) * MC * n;
}

/* out [m, n] (stride ldo) = the header's y. Returns 0, or -3 if memory ran out (nothing is then trustworthy in
 * out). bias may be NULL. */
int sensimix_i16_gemm(const int16_t *a, int64_t lda, int64_t m, const int8_t *packed, int64_t n, int64_t k,
                      const float *sa, const int32_t *rs, const float *sw, const float *cw, const float *bias,
                      float *out, int64_t ldo, int threads) {
    job_t proto = {.a = a, .lda = lda, .m = m, .n = n, .k = k, .packed = packed, .sa = sa, .rs = rs, .sw = sw,
                   .cw = cw, .bias = bias, .out = out, .ldo = ldo};
    return pool_run(&proto, threads, NULL);
}

/* out [m, n] (stride ldo) = LayerNorm(the header's y + res) with gamma, beta and eps (res [m, n], stride ldr: the
 * residual stream; out must not overlap it). Returns as sensimix_i16_gemm. */
int sensimix_i16_gemm_add_norm(const int16_t *a, int64_t lda, int64_t m, const int8_t *packed, int64_t n, int64_t k,
                               const float *sa, const int32_t *rs, const float *sw, const float *cw,
                               const float *bias, const float *res, int64_t ldr, const float *gamma,
                               const float *beta, float eps, float *out, int64_t ldo, int threads) {
    job_t proto = {.a = a, .lda = lda, .m = m, .n = n, .k = k, .packed = packed, .sa = sa, .rs = rs, .sw = sw,
                   .cw = cw, .bias = bias, .out = out, .ldo = ldo, .res = res, .ldr = ldr, .gamma = gamma,
                   .beta = beta, .eps = eps};
    return pool_run(&proto, threads, NULL);
}

/* GELU(the header's y) for [m, n], rounded as sensimix_i16_quantize rounds it into qa [m, ldq] (ldq >= n + n % 2),
 * qsa [m], qrs [m]; the fp32 values exist only block by block, in work (see pool_run). Returns as
 * sensimix_i16_gemm. */
int sensimix_i16_gemm_gelu_rows(const int16_t *a, int64_t lda, int64_t m, const int8_t *packed, int64_t n, int64_t k,
                                const float *sa, const int32_t *rs, const float *sw, const float *cw,
                                const float *bias, int16_t *qa, int64_t ldq, float *qsa, int32_t *qrs, float *work,
                                int threads) {
    job_t proto = {.a = a, .lda = lda, .m = m, .n = n, .k = k, .packed = packed, .sa = sa, .rs = rs, .sw = sw,
                   .cw = cw, .bias = bias, .qa = qa, .ldq = ldq, .qsa = qsa, .qrs = qrs};
    return pool_run(&proto, threads, work);
}
