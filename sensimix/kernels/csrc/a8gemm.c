/* The A8 linear on x86 CPUs (sensimix/kernels/a8native.py): sensimix.a8's arithmetic, bit for bit.
 *
 * Built twice from this file: with AVX512-VNNI (VPDPBUSD: 64 uint8 x int8 products per instruction, exact int32
 * sums) and with AVX2 only (the int16 micro-kernel of i16_micro.h: VPMADDWD on the rows widened to int16). Both
 * compute A[m, n] = sum_k (q[m, k] - zero[m]) Q[n, k] as sum_k q Q - zero * colsum(Q)[n] (exact in int32: |A| <=
 * 255 * 128 * K < 2^31 for K <= 65,536) and then, in fp32 and in this order (no FMA: compile with
 * -ffp-contract=off), y = ((f32(A) * s[n] + f32(total[m]) * c[n]) * scale[m]) + bias[n].
 *
 * An activation operand is uint8 rows of OPERAND_BYTES(k) bytes: the row's q values (k of them, zero up to a
 * multiple of 4), then TAIL bytes: zero (int32), scale (fp32), total (int32) and 4 unused. Operand buffers hold
 * whole blocks of MR rows (the micro-kernels read rows past the last).
 *
 * sensimix_a8_quantize rounds fp32 rows to operands (the A8 rule); the GEMM's epilogue can apply the A8 GELU and
 * round its rows for the next GEMM (an FFN's middle: the fp32 intermediate never reaches memory), or add the
 * residual and apply the A8 LayerNorm (fp64 moments) while a block of rows is in cache. The float sequences are
 * sensimix/a8.py's; unit/test_a8_native.py checks every function bit for bit against it.
 *
 * Blocks of up to MC rows are shared out between `threads` POSIX threads (the caller is one of them) by an atomic
 * counter, as in int16gemm.c. Every function is reentrant.
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "a8_spec.h"
#include "i16_micro.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define VNNI 1
#define NR 64     /* output columns per panel: 4 zmm of 16 int32 */
#else
#define VNNI 0
#define NR I16_NR
#endif
#define MR 6      /* rows per micro-kernel call */
#define MC 96     /* rows per block (a multiple of MR) */

int64_t sensimix_abi_version(void) { return 1; }  /* native_builds.BUILDS' abi */
int sensimix_a8_vnni(void) { return VNNI; }
int64_t sensimix_a8_mr(void) { return MR; }
int64_t sensimix_a8_operand_bytes(int64_t k) { return kpad(k) + TAIL; }

/* ------------------------------------------------------------------------------------------------------------
 * weights: packed panels and column sums
 * ------------------------------------------------------------------------------------------------------------ */
int64_t sensimix_a8_packed_bytes(int64_t n, int64_t k) {
    return ((n + NR - 1) / NR) * kpad(k) * NR;
}

/* q: int8 [n, k] row-major -> out (padding columns and k are 0); colsum[n] = sum_k q[n, k].
 * VNNI: per panel, k in quads, each quad 64 columns x 4 bytes (lane c of vector v: column 16 v + c).
 * AVX2: i16_micro.h's layout (pairs of k, 16 columns). */
void sensimix_a8_pack_weight(const int8_t *q, int64_t n, int64_t k, int8_t *out, int32_t *colsum) {
    int64_t kp = kpad(k);
    memset(out, 0, (size_t)sensimix_a8_packed_bytes(n, k));
    for (int64_t col = 0; col < n; col++) {
        int32_t sum = 0;
        int8_t *panel = out + (col / NR) * kp * NR;
        for (int64_t kk = 0; kk < k; kk++) {
            int8_t v = q[col * k + kk];
            sum += v;
#if VNNI
            panel[(kk / 4) * 4 * NR + (col % NR) * 4 + kk % 4] = v;
#else
            panel[(kk / 2) * 32 + ((col % NR) / 8) * 16 + (col % 8) * 2 + kk % 2] = v;
#endif
        }
        colsum[col] = sum;
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * the A8 rule, the A8 GELU and the A8 LayerNorm (sensimix/a8.py)
 * ------------------------------------------------------------------------------------------------------------ */
void sensimix_a8_quantize(const float *x, int64_t m, int64_t k, int64_t ldx, uint8_t *out, int64_t ldo) {
    for (int64_t i = 0; i < m; i++) quantize_row(x + i * ldx, k, out + i * ldo);
}

void sensimix_a8_gelu(const float *x, int64_t count, float *out) {
    int64_t j = 0;
    for (; j + 8 <= count; j += 8) _mm256_storeu_ps(out + j, gelu8(_mm256_loadu_ps(x + j)));
    if (j < count) {
        float in[8] = {0}, res[8];
        memcpy(in, x + j, (size_t)(count - j) * sizeof(float));
        _mm256_storeu_ps(res, gelu8(_mm256_loadu_ps(in)));
        memcpy(out + j, res, (size_t)(count - j) * sizeof(float));
    }
}

void sensimix_a8_layer_norm(const float *x, int64_t m, int64_t n, int64_t ldx, const float *gamma, const float *beta,
                            float eps, float *out, int64_t ldo) {
    for (int64_t i = 0; i < m; i++) {
        if (out + i * ldo != x + i * ldx) memcpy(out + i * ldo, x + i * ldx, (size_t)n * sizeof(float));
        norm_row(out + i * ldo, NULL, gamma, beta, n, eps);
    }
}

/* ------------------------------------------------------------------------------------------------------------
 * the GEMM
 * ------------------------------------------------------------------------------------------------------------ */
typedef struct {
    const uint8_t *a;   /* operand rows */
    int64_t lda, m, n, k;
    int64_t rows;       /* rows per block (a multiple of MR, <= MC) */
    const int8_t *packed;
    const int32_t *colsum;
    const float *s, *c, *bias;
    float *out;         /* [m, ldo] fp32, or NULL when qout is set */
    int64_t ldo;
    uint8_t *qout;      /* gelu: the next GEMM's operand rows (else NULL) */
    int64_t ldq;
    float *work;        /* gelu: MC * n floats per thread */
    int16_t *wide;      /* AVX2: MC * kpad(k) int16 per thread (the block's rows widened) */
    const float *res;   /* add_norm: out = LayerNorm(y + res) (else NULL) */
    int64_t ldr;
    const float *gamma, *beta;
    float eps;
    atomic_long *next;
    int status;
} job_t;

/* the epilogue of 8 columns of one row from their exact int32 sums of q Q (sensimix/a8.py: linear_epilogue) */
static inline __m256 epilogue8(__m256i acc, __m256i vzero, __m256 vtotal, __m256 vscale, __m256i colsum, __m256 s,
                               __m256 c) {
    __m256i a = _mm256_sub_epi32(acc, _mm256_mullo_epi32(vzero, colsum));
    __m256 t1 = _mm256_mul_ps(_mm256_cvtepi32_ps(a), s);
    __m256 t2 = _mm256_mul_ps(vtotal, c);
    return _mm256_mul_ps(_mm256_add_ps(t1, t2), vscale);
}

/* one row's `cols` (<= NR) columns: loads straight from the panel's arrays where 8 columns are whole, through a
 * zero-padded copy for the last few */
static inline void epilogue(const int32_t *acc, int cols, int32_t zero, float scale, int32_t total,
                            const int32_t *colsum, const float *s, const float *c, const float *bias, float *o) {
    const __m256 vscale = _mm256_set1_ps(scale), vtotal = _mm256_set1_ps((float)total);
    const __m256i vzero = _mm256_set1_epi32(zero);
    int h = 0;
    for (; h + 8 <= cols; h += 8) {
        __m256 v = epilogue8(_mm256_loadu_si256((const __m256i *)(acc + h)), vzero, vtotal, vscale,
                             _mm256_loadu_si256((const __m256i *)(colsum + h)), _mm256_loadu_ps(s + h),
                             _mm256_loadu_ps(c + h));
        if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + h));
        _mm256_storeu_ps(o + h, v);
    }
    if (h < cols) {
        int w = cols - h;
        int32_t ai[8] = {0}, cs[8] = {0};
        float sv[8] = {0}, cv[8] = {0}, bv[8] = {0}, y[8];
        memcpy(ai, acc + h, (size_t)w * 4);
        memcpy(cs, colsum + h, (size_t)w * 4);
        memcpy(sv, s + h, (size_t)w * 4);
        memcpy(cv, c + h, (size_t)w * 4);
        __m256 v = epilogue8(_mm256_loadu_si256((const __m256i *)ai), vzero, vtotal, vscale,
                             _mm256_loadu_si256((const __m256i *)cs), _mm256_loadu_ps(sv), _mm256_loadu_ps(cv));
        if (bias) {
            memcpy(bv, bias + h, (size_t)w * 4);
            v = _mm256_add_ps(v, _mm256_loadu_ps(bv));
        }
        _mm256_storeu_ps(y, v);
        memcpy(o + h, y, (size_t)w * 4);
    }
}

#if VNNI
/* acc[r][64] = sum over k of q[r] * panel, r < MR: the block's rows at a + r * lda */
static void micro_vnni(const uint8_t *a, int64_t lda, const int8_t *panel, int64_t quads, int32_t acc[MR][NR]) {
    __m512i c[MR][4];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < 4; v++) c[r][v] = _mm512_setzero_si512();
    for (int64_t q = 0; q < quads; q++) {
        const __m512i b0 = _mm512_loadu_si512(panel), b1 = _mm512_loadu_si512(panel + 64);
        const __m512i b2 = _mm512_loadu_si512(panel + 128), b3 = _mm512_loadu_si512(panel + 192);
        panel += 256;
        for (int r = 0; r < MR; r++) {
            int32_t four;
            memcpy(&four, a + r * lda + 4 * q, 4);
            const __m512i x = _mm512_set1_epi32(four);
            c[r][0] = _mm512_dpbusd_epi32(c[r][0], x, b0);
            c[r][1] = _mm512_dpbusd_epi32(c[r][1], x, b1);
            c[r][2] = _mm512_dpbusd_epi32(c[r][2], x, b2);
            c[r][3] = _mm512_dpbusd_epi32(c[r][3], x, b3);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < 4; v++) _mm512_storeu_si512(acc[r] + 16 * v, c[r][v]);
}
#endif

static void run_rows(job_t *j) {
    int64_t kp = kpad(j->k), panels = (j->n + NR - 1) / NR;
    float *block = j->work, *owned = NULL;
    if (j->qout && !block) {
        block = owned = (float *)malloc((size_t)MC * (size_t)j->n * sizeof(float));
        if (!block) { j->status = -3; return; }
    }
#if !VNNI
    int16_t *wide = j->wide, *owned_wide = NULL;
    if (!wide) {
        wide = owned_wide = (int16_t *)malloc((size_t)MC * (size_t)kp * sizeof(int16_t));
        if (!wide) { free(owned); j->status = -3; return; }
    }
#endif
    int32_t acc[MR][NR];
    for (;;) {
        int64_t mb = (int64_t)atomic_fetch_add(j->next, 1) * j->rows;
        if (mb >= j->m) break;
        int64_t me = mb + j->rows < j->m ? mb + j->rows : j->m;
        int64_t tiles_end = mb + (me - mb + MR - 1) / MR * MR;  /* whole micro-tiles: rows past m exist */
#if !VNNI
        for (int64_t r = mb; r < tiles_end; r++) {  /* the block's uint8 rows as int16 for VPMADDWD */
            const uint8_t *src = j->a + r * j->lda;
            int16_t *dst = wide + (r - mb) * kp;
            for (int64_t t = 0; t < kp; t++) dst[t] = src[t];
        }
#endif
        for (int64_t p = 0; p < panels; p++) {
            int64_t n0 = p * NR;
            int cols = (int)(j->n - n0 < NR ? j->n - n0 : NR);
            for (int64_t m = mb; m < tiles_end; m += MR) {
#if VNNI
                micro_vnni(j->a + m * j->lda, j->lda, j->packed + p * kp * NR, kp / 4, acc);
#else
                int32_t raw[12][8];
                i16_micro_kernel(wide + (m - mb) * kp, kp, j->packed + p * kp * NR, kp / 2, raw);
                for (int r = 0; r < MR; r++) {
                    memcpy(acc[r], raw[2 * r], 32);
                    memcpy(acc[r] + 8, raw[2 * r + 1], 32);
                }
#endif
                for (int r = 0; r < MR && m + r < me; r++) {
                    int32_t zero, total;
                    float scale;
                    get_tail(j->a + (m + r) * j->lda, j->k, &zero, &scale, &total);
                    float *o = (block ? block + (m + r - mb) * j->n : j->out + (m + r) * j->ldo) + n0;
                    epilogue(acc[r], cols, zero, scale, total, j->colsum + n0, j->s + n0, j->c + n0,
                             j->bias ? j->bias + n0 : NULL, o);
                }
            }
        }
        if (block) {  /* the block's rows are complete: GELU, then rounded for the next GEMM */
            for (int64_t r = mb; r < me; r++) {
                float *row = block + (r - mb) * j->n;
                sensimix_a8_gelu(row, j->n, row);
                quantize_row(row, j->n, j->qout + r * j->ldq);
            }
        }
        if (j->res)  /* the block's rows are complete (and in cache): residual and LayerNorm */
            for (int64_t r = mb; r < me; r++)
                norm_row(j->out + r * j->ldo, j->res + r * j->ldr, j->gamma, j->beta, j->n, j->eps);
    }
    free(owned);
#if !VNNI
    free(owned_wide);
#endif
}

#include "row_pool.h"

/* floats of work space gelu needs: MC * n per thread (a buffer the caller reuses across calls) */
int64_t sensimix_a8_work_floats(int64_t m, int64_t n, int threads) {
    return (int64_t)pool_threads(m, threads) * MC * n;
}

/* out [m, n] (stride ldo) = the A8 linear of the operand rows a (stride lda bytes). bias may be NULL.
 * Returns 0, or -3 when memory ran out. */
int sensimix_a8_gemm(const uint8_t *a, int64_t lda, int64_t m, const int8_t *packed, const int32_t *colsum,
                     int64_t n, int64_t k, const float *s, const float *c, const float *bias, float *out, int64_t ldo,
                     int threads) {
    job_t proto = {.a = a, .lda = lda, .m = m, .n = n, .k = k, .packed = packed, .colsum = colsum, .s = s, .c = c,
                   .bias = bias, .out = out, .ldo = ldo};
    return pool_run(&proto, threads, NULL);
}

/* out = the A8 LayerNorm of (the A8 linear + res); res [m, n] (stride ldr) must not overlap out */
int sensimix_a8_gemm_add_norm(const uint8_t *a, int64_t lda, int64_t m, const int8_t *packed, const int32_t *colsum,
                              int64_t n, int64_t k, const float *s, const float *c, const float *bias,
                              const float *res, int64_t ldr, const float *gamma, const float *beta, float eps,
                              float *out, int64_t ldo, int threads) {
    job_t proto = {.a = a, .lda = lda, .m = m, .n = n, .k = k, .packed = packed, .colsum = colsum, .s = s, .c = c,
                   .bias = bias, .out = out, .ldo = ldo, .res = res, .ldr = ldr, .gamma = gamma, .beta = beta,
                   .eps = eps};
    return pool_run(&proto, threads, NULL);
}

/* qout (operand rows for n inputs, stride ldq bytes) = the A8 rule of the A8 GELU of the A8 linear; the fp32 rows
 * exist only block by block, in work (sensimix_a8_work_floats) */
int sensimix_a8_gemm_gelu_quantize(const uint8_t *a, int64_t lda, int64_t m, const int8_t *packed,
                                   const int32_t *colsum, int64_t n, int64_t k, const float *s, const float *c,
                                   const float *bias, uint8_t *qout, int64_t ldq, float *work, int threads) {
    job_t proto = {.a = a, .lda = lda, .m = m, .n = n, .k = k, .packed = packed, .colsum = colsum, .s = s, .c = c,
                   .bias = bias, .qout = qout, .ldq = ldq};
    return pool_run(&proto, threads, work);
}
