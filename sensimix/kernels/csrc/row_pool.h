/* The row-block thread pool shared by the GEMM kernels (a8gemm.c, int16gemm.c; one home for it).
 *
 * A call's rows are cut into blocks of `rows` rows (a multiple of MR, at most MC); its threads take the next block
 * from one shared counter until none is left, so a thread that could not start leaves its share to the others.
 * Include after defining MR, MC, a job_t with the fields m, n, rows, next (atomic_long *), work (float *) and status
 * (int), and `static void run_rows(job_t *)`, which takes blocks from *next and sets status (0, or -3 when it could
 * not allocate).
 */
#ifndef SENSIMIX_ROW_POOL_H
#define SENSIMIX_ROW_POOL_H
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#define POOL_MAX_THREADS 64

static void *pool_thread_main(void *arg) {
    run_rows((job_t *)arg);
    return NULL;
}

/* the threads a call uses: at most one per MR-row tile, 1 to POOL_MAX_THREADS */
static int pool_threads(int64_t m, int threads) {
    int64_t tiles = (m + MR - 1) / MR;
    if (threads > POOL_MAX_THREADS) threads = POOL_MAX_THREADS;
    if (threads > tiles) threads = (int)tiles;
    return threads < 1 ? 1 : threads;
}

/* MC rows per block, or fewer where that would leave a thread idle (a few dozen rows: one query's tokens) */
static int64_t pool_block_rows(int64_t m, int threads) {
    int64_t even = (m + threads - 1) / threads;
    even = (even + MR - 1) / MR * MR;
    return even < MC ? (even > 0 ? even : MR) : MC;
}

/* runs proto's rows on up to `threads` threads; work: NULL, or pool_threads(m, threads) * MC * n floats, thread t
 * getting the MC * n at t * MC * n (a buffer the caller reuses: a fresh one per call would cost its page faults every
 * time). Returns 0, or the status of a thread that failed. */
static int pool_run(const job_t *proto, int threads, float *work) {
    job_t jobs[POOL_MAX_THREADS];
    pthread_t ids[POOL_MAX_THREADS];
    int started[POOL_MAX_THREADS] = {0};
    atomic_long next;
    atomic_init(&next, 0);
    threads = pool_threads(proto->m, threads);
    int64_t rows = pool_block_rows(proto->m, threads);
    for (int t = 0; t < threads; t++) {
        jobs[t] = *proto;
        jobs[t].rows = rows;
        jobs[t].next = &next;
        jobs[t].work = work ? work + (int64_t)t * MC * proto->n : NULL;
    }
    for (int t = 1; t < threads; t++) started[t] = pthread_create(&ids[t], NULL, pool_thread_main, &jobs[t]) == 0;
    run_rows(&jobs[0]);
    int status = jobs[0].status;
    for (int t = 1; t < threads; t++) {  /* a thread that could not start took no block: the others did its share */
        if (started[t]) {
            pthread_join(ids[t], NULL);
            if (jobs[t].status) status = jobs[t].status;
        }
    }
    return status;
}

#endif
