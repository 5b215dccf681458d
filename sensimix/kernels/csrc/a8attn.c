/* A8 attention over packed sequences (sensimix/kernels/a8native.py), for x86 CPUs with AVX2:
 * sensimix/a8.py's attention, bit for bit (a8_spec.h; compile with -ffp-contract=off).
 *
 * Per sequence b (its tokens are rows starts[b] .. starts[b] + lens[b] - 1 of k and v) and head h (columns
 * h * d .. h * d + d - 1 of each row): s_j = f32(q . k_j summed in fp64) * scale; e_j = exp(s_j - max s) by the
 * A8 exp (0 below -80); p_j = e_j / f32(sum e in fp64); out = f32(sum p_j v_j in fp64). Products of two fp32
 * values are exact in fp64, so the sums' order changes nothing but fp64 roundings, which the rounding to fp32
 * almost surely absorbs (the torch definition sums in another order; the tests compare bit for bit).
 *
 * Queries, QB at a time: every token of the sequence (rows starts[b] + i of q and out), or with first_only the sequence's
 * first token alone (row b of q and of out: the pooled [CLS] of the last layer). Keys and values of a sequence are
 * taken to fp64 once per head. Tasks (sequence, head) are shared out between `threads` POSIX threads by an atomic
 * counter; every function is reentrant.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "a8_spec.h"

int64_t sensimix_abi_version(void) { return 1; }  /* native_builds.BUILDS' abi */

typedef struct {
    const float *q, *k, *v;
    int64_t ldq, ldkv;
    const int64_t *starts, *lens;
    int64_t nseq, heads, d, maxlen;
    float scale;
    float *out;
    int64_t ldo;
    int first_only;
    atomic_long *next;
    int status;
} job_t;

/* scores s[r][j] = f32(q_r . k_j in fp64) * scale for QB queries (rows of q64, fp64 [QB][d]) and the sequence's
 * keys (kt: fp64 [d][ldk], key j at column j, zero columns up to ldk; s holds ldk floats per row). Products of fp32 values are exact in fp64, so a fused multiply-add
 * rounds exactly as a multiply (exact) then an add would: FMA changes no bit here. */
#define QB 4
static void scores(const double *q64, int nq, const double *kt, int64_t len, int64_t ldk, int64_t d, float scale,
                   float *s, int64_t lds) {
    int64_t j = 0;
    const __m128 vscale = _mm_set1_ps(scale);
    for (; j < len; j += 8) {  /* kt's columns are zero up to ldk (a multiple of 8): those scores are not used */
        __m256d acc[QB][2];
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
        for (int64_t t = 0; t < d; t++) {
            const __m256d k0 = _mm256_loadu_pd(kt + t * ldk + j), k1 = _mm256_loadu_pd(kt + t * ldk + j + 4);
            for (int r = 0; r < QB; r++) {
                const __m256d q = _mm256_broadcast_sd(q64 + r * d + t);
                acc[r][0] = _mm256_fmadd_pd(q, k0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_pd(q, k1, acc[r][1]);
            }
        }
        for (int r = 0; r < QB; r++) {  /* every row (s has QB): a fixed count keeps acc in registers */
            _mm_storeu_ps(s + r * lds + j, _mm_mul_ps(_mm256_cvtpd_ps(acc[r][0]), vscale));
            _mm_storeu_ps(s + r * lds + j + 4, _mm_mul_ps(_mm256_cvtpd_ps(acc[r][1]), vscale));
        }
    }
    (void)nq;
}

/* s[j] <- p_j = e_j / f32(sum e in fp64), e_j = exp(s_j - max s) (the A8 softmax, in place) */
static void softmax_row(float *s, int64_t len) {
    float m = s[0];
    for (int64_t j = 1; j < len; j++) m = (s[j] > m || s[j] != s[j]) ? s[j] : m;  /* a NaN wins, as torch.amax */
    __m256d z0 = _mm256_setzero_pd(), z1 = _mm256_setzero_pd();
    const __m256 vm = _mm256_set1_ps(m);
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
        __m256 e = softmax_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
        _mm256_storeu_ps(s + j, e);
        z0 = _mm256_add_pd(z0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        z1 = _mm256_add_pd(z1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double zsum = hsum4d(_mm256_add_pd(z0, z1));
    if (j < len) {
        float in[8] = {0}, e[8];
        memcpy(in, s + j, (size_t)(len - j) * sizeof(float));
        _mm256_storeu_ps(e, softmax_exp8(_mm256_sub_ps(_mm256_loadu_ps(in), vm)));
        for (int64_t t = 0; t < len - j; t++) {
            s[j + t] = e[t];
            zsum += (double)e[t];
        }
    }
    const __m256 z = _mm256_set1_ps((float)zsum);
    for (j = 0; j + 8 <= len; j += 8) _mm256_storeu_ps(s + j, _mm256_div_ps(_mm256_loadu_ps(s + j), z));
    for (; j < len; j++) s[j] = s[j] / (float)zsum;
}

/* out[r][t] = f32(sum_j p[r][j] v_j[t] in fp64) for nq <= QB queries; vd: fp64 [L][d] */
static void weighted(const float *p, int64_t ldp, int nq, const double *vd, int64_t len, int64_t d, float *out,
                     int64_t ldo) {
    int64_t t0 = 0;
    for (; t0 + 8 <= d; t0 += 8) {
        __m256d acc[QB][2];
        for (int r = 0; r < QB; r++) acc[r][0] = acc[r][1] = _mm256_setzero_pd();
        for (int64_t j = 0; j < len; j++) {  /* every row of p (rows past nq: finite leftovers, never stored) */
            const __m256d v0 = _mm256_loadu_pd(vd + j * d + t0), v1 = _mm256_loadu_pd(vd + j * d + t0 + 4);
            for (int r = 0; r < QB; r++) {
                const __m256d pr = _mm256_set1_pd((double)p[r * ldp + j]);
                acc[r][0] = _mm256_fmadd_pd(pr, v0, acc[r][0]);
                acc[r][1] = _mm256_fmadd_pd(pr, v1, acc[r][1]);
            }
        }
        float rows[QB][8];
        for (int r = 0; r < QB; r++) {
            _mm_storeu_ps(rows[r], _mm256_cvtpd_ps(acc[r][0]));
            _mm_storeu_ps(rows[r] + 4, _mm256_cvtpd_ps(acc[r][1]));
        }
        for (int r = 0; r < nq; r++) memcpy(out + r * ldo + t0, rows[r], sizeof(rows[r]));
    }
    for (; t0 < d; t0++)
        for (int r = 0; r < nq; r++) {
            double a = 0.0;
            for (int64_t j = 0; j < len; j++) a += (double)p[r * ldp + j] * vd[j * d + t0];
            out[r * ldo + t0] = (float)a;
        }
}

static void run_tasks(job_t *jb) {
    int64_t d = jb->d, maxlen = (jb->maxlen + 7) / 8 * 8, lds = maxlen + 8;
    double *kt = (double *)malloc((size_t)(2 * maxlen * d + QB * d) * sizeof(double));
    float *s = (float *)calloc((size_t)(QB * lds), sizeof(float));  /* zeros: rows past nq stay finite */
    if (!kt || !s) {
        free(kt);
        free(s);
        jb->status = -3;
        return;
    }
    double *vd = kt + maxlen * d, *q64 = vd + maxlen * d;
    for (;;) {
        int64_t task = (int64_t)atomic_fetch_add(jb->next, 1);
        if (task >= jb->nseq * jb->heads) break;
        int64_t b = task / jb->heads, h = task % jb->heads, start = jb->starts[b], len = jb->lens[b];
        int64_t ldk = (len + 7) / 8 * 8;  /* whole vectors of keys: the scores need no scalar tail */
        for (int64_t j = 0; j < len; j++) {  /* the sequence's keys (transposed) and values, in fp64 */
            const float *kr = jb->k + (start + j) * jb->ldkv + h * d, *vr = jb->v + (start + j) * jb->ldkv + h * d;
            for (int64_t t = 0; t < d; t++) {
                kt[t * ldk + j] = (double)kr[t];
                vd[j * d + t] = (double)vr[t];
            }
        }
        for (int64_t t = 0; t < d; t++)
            for (int64_t j = len; j < ldk; j++) kt[t * ldk + j] = 0.0;
        int64_t queries = jb->first_only ? 1 : len;
        for (int64_t i0 = 0; i0 < queries; i0 += QB) {
            int nq = (int)(queries - i0 < QB ? queries - i0 : QB);
            for (int r = 0; r < QB; r++) {  /* rows past the last query: copies of it (their results unused) */
                int64_t row = jb->first_only ? b : start + i0 + (r < nq ? r : nq - 1);
                const float *qr = jb->q + row * jb->ldq + h * d;
                for (int64_t t = 0; t < d; t++) q64[r * d + t] = (double)qr[t];
            }
            scores(q64, nq, kt, len, ldk, d, jb->scale, s, lds);
            for (int r = 0; r < nq; r++) softmax_row(s + r * lds, len);
            float *o = jb->out + (jb->first_only ? b : start + i0) * jb->ldo + h * d;
            weighted(s, lds, nq, vd, len, d, o, jb->ldo);
        }
    }
    free(kt);
    free(s);
}

static void *thread_main(void *arg) {
    run_tasks((job_t *)arg);
    return NULL;
}

/* see the header; lens[b] >= 1. Returns 0, or -3 when memory ran out. */
int sensimix_a8_attention(const float *q, int64_t ldq, const float *k, const float *v, int64_t ldkv,
                          const int64_t *starts, const int64_t *lens, int64_t nseq, int64_t heads, int64_t d,
                          float scale, int first_only, float *out, int64_t ldo, int threads) {
    job_t jobs[64];
    pthread_t ids[64];
    int started[64] = {0};
    atomic_long next;
    atomic_init(&next, 0);
    int64_t maxlen = 1, tasks = nseq * heads;
    for (int64_t b = 0; b < nseq; b++) maxlen = lens[b] > maxlen ? lens[b] : maxlen;
    if (threads > 64) threads = 64;
    if (threads > tasks) threads = (int)tasks;
    if (threads < 1) threads = 1;
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){.q = q, .k = k, .v = v, .ldq = ldq, .ldkv = ldkv, .starts = starts, .lens = lens,
                          .nseq = nseq, .heads = heads, .d = d, .maxlen = maxlen, .scale = scale, .out = out,
                          .ldo = ldo, .first_only = first_only, .next = &next, .status = 0};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, thread_main, &jobs[t]) == 0;
    run_tasks(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {
        if (started[t]) {
            pthread_join(ids[t], NULL);
            if (jobs[t].status) status = jobs[t].status;
        }
    }
    return status;
}
