/* The int16 x int8 micro-kernel shared by int16gemm.c and a8gemm.c's AVX2 build (one home for its assembly).
 *
 * A is int16 rows (lda elements apart, 6 rows read), the panel is 16 output columns of int8 weights packed 32 bytes
 * per pair of k (columns 0-7 then 8-15, each column's two values adjacent: VPMOVSXBW turns 16 bytes into the 8
 * column pairs VPMADDWD reads). The sums are exact in int32 as long as the caller's |A| bound keeps them below
 * 2^31 (int16gemm.c: 15-bit A, KC-long chunks; a8gemm.c: A in [0, 255], any K up to 65,536).
 * Inline assembly: compilers spill the 12 accumulators otherwise.
 */
#ifndef SENSIMIX_I16_MICRO_H
#define SENSIMIX_I16_MICRO_H
#include <immintrin.h>
#include <stdint.h>

#define I16_MR 6
#define I16_NR 16

/* acc[12][8] = A[6 rows, 2 * pairs] @ panel (int32, exact); rows at a and a + lda * 1..5 */
static inline void i16_micro_kernel(const int16_t *a, int64_t lda, const int8_t *panel, int64_t pairs, int32_t acc[12][8]) {
    const int16_t *a0 = a, *a3 = a + 3 * lda;
    int64_t row_bytes = lda * (int64_t)sizeof(int16_t);
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t vpxor %%ymm1, %%ymm1, %%ymm1\n\t vpxor %%ymm2, %%ymm2, %%ymm2\n\t"
        "vpxor %%ymm3, %%ymm3, %%ymm3\n\t vpxor %%ymm4, %%ymm4, %%ymm4\n\t vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t vpxor %%ymm7, %%ymm7, %%ymm7\n\t vpxor %%ymm8, %%ymm8, %%ymm8\n\t"
        "vpxor %%ymm9, %%ymm9, %%ymm9\n\t vpxor %%ymm10, %%ymm10, %%ymm10\n\t vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
        /* one step (a pair of k): 2 panel loads, 6 broadcast rows, 12 VPMADDWD + VPADDD; the loop runs two steps
         * per iteration (an odd first step peeled): ~5% faster than one, measured, the loop's own instructions
         * competing with the step's for dispatch */
#define ROW(off, addr, c0, c1)                                                                                        \
        "vpbroadcastd " off addr ", %%ymm14\n\t"                                                                      \
        "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %%" c0 ", %%" c0 "\n\t"                              \
        "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t vpaddd %%ymm15, %%" c1 ", %%" c1 "\n\t"
#define STEP(boff, boff16, aoff)                                                                                      \
        "vpmovsxbw " boff "(%[b]), %%ymm12\n\t vpmovsxbw " boff16 "(%[b]), %%ymm13\n\t"                               \
        ROW(aoff, "(%[a0])", "ymm0", "ymm1")                                                                          \
        ROW(aoff, "(%[a0],%[ld],1)", "ymm2", "ymm3")                                                                  \
        ROW(aoff, "(%[a0],%[ld],2)", "ymm4", "ymm5")                                                                  \
        ROW(aoff, "(%[a3])", "ymm6", "ymm7")                                                                          \
        ROW(aoff, "(%[a3],%[ld],1)", "ymm8", "ymm9")                                                                  \
        ROW(aoff, "(%[a3],%[ld],2)", "ymm10", "ymm11")
        "test $1, %[n]\n\t jz 3f\n\t"
        STEP("0", "16", "")
        "add $32, %[b]\n\t add $4, %[a0]\n\t add $4, %[a3]\n\t"
        "3:\n\t shr $1, %[n]\n\t jz 2f\n\t"
        "1:\n\t"
        STEP("0", "16", "")
        STEP("32", "48", "4")
        "add $64, %[b]\n\t add $8, %[a0]\n\t add $8, %[a3]\n\t dec %[n]\n\t jnz 1b\n\t"
#undef STEP
#undef ROW
        "2:\n\t"
        "vmovdqu %%ymm0, 0(%[acc])\n\t vmovdqu %%ymm1, 32(%[acc])\n\t vmovdqu %%ymm2, 64(%[acc])\n\t"
        "vmovdqu %%ymm3, 96(%[acc])\n\t vmovdqu %%ymm4, 128(%[acc])\n\t vmovdqu %%ymm5, 160(%[acc])\n\t"
        "vmovdqu %%ymm6, 192(%[acc])\n\t vmovdqu %%ymm7, 224(%[acc])\n\t vmovdqu %%ymm8, 256(%[acc])\n\t"
        "vmovdqu %%ymm9, 288(%[acc])\n\t vmovdqu %%ymm10, 320(%[acc])\n\t vmovdqu %%ymm11, 352(%[acc])\n\t"
        : [b] "+r"(panel), [a0] "+r"(a0), [a3] "+r"(a3), [n] "+r"(pairs)
        : [ld] "r"(row_bytes), [acc] "r"(acc)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
          "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
}

#endif
