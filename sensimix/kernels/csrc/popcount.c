/* XNOR-popcount 1-bit GEMM for x86 CPUs with AVX2 (sensimix.kernels.popcount).
 *
 * sign(x) . sign(w) over K elements = K - 2 * popcount(bits_x ^ bits_w), exactly. Operands are sign bits packed
 * 8 per byte, little-endian within a byte (the checkpoint's layout: bit i of byte j is element 8j + i), one row
 * per `ld` bytes with ld a multiple of 32 (one AVX2 vector) and every padding bit 0 on both sides, so padding
 * never counts. Popcount is the nibble-lookup method (two vpshufb per vector) with byte counters folded into
 * 64-bit sums (vpsadbw) every 31 vectors, before a byte can overflow (31 * 8 = 248).
 *
 * Blocks of rows of x are shared out between `threads` POSIX threads (the caller is one of them) by an atomic
 * counter, as in int16gemm.c: a thread that loses its core on a shared machine takes fewer blocks instead of holding
 * up the call. Every function is reentrant.
 */
#include <immintrin.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* the calling convention of the functions below, checked by sensimix.kernels.native against native_builds.BUILDS:
 * bump it with the row's abi whenever a signature or a layout the Python wrapper relies on changes */
int64_t sensimix_abi_version(void) { return 1; }

enum { OUT_I32 = 0, OUT_F32 = 1, OUT_BITS = 2 };
enum { MR = 4 };  /* rows of x per micro-kernel call: 4 byte counters + lookup + mask + temporaries fit 16 ymm */
enum { MB = 64 };  /* rows per block a thread takes (at most) */

typedef struct {
    const uint8_t *x; const uint8_t *w; int64_t m, n, ld, k;
    int mode; void *out; int64_t ldo; const float *bias; const int32_t *threshold;
    int64_t rows; atomic_long *next;  /* rows per block (a multiple of MR), the next block to take */
} job_t;

/* popcount(x[r] ^ w) for MR rows of x against one row of w: MR 64-bit sums */
static inline void dot4(const uint8_t *x, int64_t ld, const uint8_t *w, int64_t vectors, int64_t out[MR]) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    __m256i sum[MR];
    for (int r = 0; r < MR; r++) sum[r] = zero;
    for (int64_t v0 = 0; v0 < vectors; v0 += 31) {
        int64_t v1 = v0 + 31 < vectors ? v0 + 31 : vectors;
        __m256i acc[MR];
        for (int r = 0; r < MR; r++) acc[r] = zero;
        for (int64_t v = v0; v < v1; v++) {
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * v));
            for (int r = 0; r < MR; r++) {
                __m256i d = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(x + r * ld + 32 * v)), wv);
                __m256i lo = _mm256_shuffle_epi8(lut, _mm256_and_si256(d, low));
                __m256i hi = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(d, 4), low));
                acc[r] = _mm256_add_epi8(acc[r], _mm256_add_epi8(lo, hi));
            }
        }
        for (int r = 0; r < MR; r++) sum[r] = _mm256_add_epi64(sum[r], _mm256_sad_epu8(acc[r], zero));
    }
    /* horizontal sums of 4 rows at once: pair rows in the two 32-bit halves of each 64-bit lane (every lane sum
     * is below 2^32, so nothing carries across), then add the lanes */
    __m256i s01 = _mm256_add_epi64(sum[0], _mm256_slli_epi64(sum[1], 32));
    __m256i s23 = _mm256_add_epi64(sum[2], _mm256_slli_epi64(sum[3], 32));
    __m256i a = _mm256_add_epi64(_mm256_permute2x128_si256(s01, s23, 0x20), _mm256_permute2x128_si256(s01, s23, 0x31));
    a = _mm256_add_epi64(a, _mm256_shuffle_epi32(a, 0x4e));  /* lane 0: rows 0|1, lane 2: rows 2|3 */
    uint64_t r01 = (uint64_t)_mm256_extract_epi64(a, 0), r23 = (uint64_t)_mm256_extract_epi64(a, 2);
    out[0] = (int64_t)(r01 & 0xffffffffu);
    out[1] = (int64_t)(r01 >> 32);
    out[2] = (int64_t)(r23 & 0xffffffffu);
    out[3] = (int64_t)(r23 >> 32);
}

static int run_rows(const job_t *j) {
    const int64_t vectors = j->ld / 32;
    uint8_t *tail = NULL;  /* the last < MR rows, zero-padded to MR rows */
    for (;;) {
        int64_t m0 = (int64_t)atomic_fetch_add(j->next, 1) * j->rows;
        if (m0 >= j->m) break;
        int64_t m1 = m0 + j->rows < j->m ? m0 + j->rows : j->m;
        for (int64_t m = m0; m < m1; m += MR) {
            int64_t rows = m1 - m < MR ? m1 - m : MR;
            const uint8_t *x = j->x + m * j->ld;
            if (rows < MR) {
                tail = calloc(MR, (size_t)j->ld);
                if (!tail) return -3;  /* the other threads finish their blocks; the caller raises */
                memcpy(tail, x, (size_t)(rows * j->ld));
                x = tail;
            }
            if (j->mode == OUT_BITS) {
                /* 8 outputs per byte, set without branches (the comparisons are data-dependent coin flips) */
                for (int64_t n0 = 0; n0 < j->ldo * 8; n0 += 8) {
                    uint8_t byte[MR] = {0};
                    for (int64_t n = n0; n < n0 + 8 && n < j->n; n++) {
                        int64_t pop[MR];
                        dot4(x, j->ld, j->w + n * j->ld, vectors, pop);
                        for (int r = 0; r < MR; r++)
                            byte[r] |= (uint8_t)(((int32_t)(j->k - 2 * pop[r]) > j->threshold[n]) << (n - n0));
                    }
                    for (int64_t r = 0; r < rows; r++) ((uint8_t *)j->out)[(m + r) * j->ldo + n0 / 8] = byte[r];
                }
                continue;
            }
            for (int64_t n = 0; n < j->n; n++) {
                int64_t pop[MR];
                dot4(x, j->ld, j->w + n * j->ld, vectors, pop);
                for (int64_t r = 0; r < rows; r++) {
                    int32_t acc = (int32_t)(j->k - 2 * pop[r]);
                    if (j->mode == OUT_I32)
                        ((int32_t *)j->out)[(m + r) * j->ldo + n] = acc;
                    else
                        ((float *)j->out)[(m + r) * j->ldo + n] = (float)acc + (j->bias ? j->bias[n] : 0.0f);
                }
            }
        }
    }
    free(tail);
    return 0;
}

static void *thread_main(void *arg) {
    return (void *)(intptr_t)run_rows((const job_t *)arg);
}

/* Returns 0; -1 for a row stride that is not a whole number of vectors, -3 if memory ran out (the output is then
 * incomplete: the caller raises). A thread that cannot start is no error: the others take its blocks. */
int sensimix_xnor_gemm(const uint8_t *x, int64_t m, const uint8_t *w, int64_t n, int64_t ld, int64_t k, int mode,
                       void *out, int64_t ldo, const float *bias, const int32_t *threshold, int threads) {
    if (ld % 32 != 0) return -1;
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    int64_t tiles = (m + MR - 1) / MR;
    if (threads > tiles) threads = tiles > 0 ? (int)tiles : 1;
    int64_t rows = (m + threads - 1) / threads;  /* an even split, or MB rows where there are many */
    rows = (rows + MR - 1) / MR * MR;
    rows = rows < MB ? (rows > 0 ? rows : MR) : MB;
    atomic_long next;
    atomic_init(&next, 0);
    job_t jobs[64];
    pthread_t ids[64];
    int started[64] = {0}, status = 0;
    for (int t = 0; t < threads; t++)
        jobs[t] = (job_t){x, w, m, n, ld, k, mode, out, ldo, bias, threshold, rows, &next};
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, thread_main, &jobs[t]) == 0;
    int first = run_rows(&jobs[0]);
    if (first) status = first;
    for (int t = 1; t < threads; t++) {
        void *rc = NULL;
        if (started[t] && pthread_join(ids[t], &rc) == 0 && rc) status = (int)(intptr_t)rc;
    }
    return status;
}

/* bits of (x > 0) for float rows x [m, k] (row stride ldx elements) -> bytes [m, ldo], padding zero.
 * NaN > 0 is false: a NaN becomes -1, as torch's (x > 0) does. */
void sensimix_pack_signs(const float *x, int64_t m, int64_t k, int64_t ldx, uint8_t *out, int64_t ldo) {
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t r = 0; r < m; r++) {
        const float *row = x + r * ldx;
        uint8_t *o = out + r * ldo;
        int64_t full = k / 8;
        for (int64_t b = 0; b < full; b++)
            o[b] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + 8 * b), zero, _CMP_GT_OQ));
        int64_t b = full;
        if (k % 8) {
            uint8_t v = 0;
            for (int64_t i = 0; i < k % 8; i++) v |= (uint8_t)((row[8 * b + i] > 0.0f) << i);
            o[b++] = v;
        }
        memset(o + b, 0, (size_t)(ldo - b));
    }
}
