/* kvq version 4's inverse transform on the CPU (the C form of codecs/kvq_ops/transform.py's untransform_ref):
 * per head, M q for the int16 matrix M (dim, dim) and a segment's integers q (dim, tokens), exactly. reconstruct
 * (dequantize.c) calls it between the expansion and the dequantization, with the GIL released.
 *
 * Exact in any summation order (docs/codec.md, "Reconstruction"), by the bound B = max|q| times M's largest row sum
 * of |M|, which bounds every partial sum: where the CPU has AVX-512 VNNI, every |q| fits int16 and B < 2^31, int16
 * pairs multiplied and summed into int32 (vpdpwssd, exact), each sum rounded once to float32; else where B < 2^24,
 * a blocked float32 product that the compiler vectorizes (float32 holds every partial sum); else int64 sums, each
 * rounded once to float32. */
#include "_kvq.h"

#include <stdint.h>
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KVQ_X86 1  /* the VNNI path and the AVX2 clone exist only here; other CPUs use the portable loops */
#endif
#include <stdlib.h>  /* abs */
#include <string.h>  /* memcpy */

#define FLOAT32_EXACT (1 << 24)
#define ROWS 4   /* output rows per block: ROWS x 2 vectors of accumulators stay in registers */
#define TILE 16  /* tokens per block: two vectors of 8 */

typedef float vec8 __attribute__((vector_size(32)));  /* one AVX2 register, or two SSE ones */

/* One head in float32: y (dim, tokens) = m (dim, dim) qf (dim, tokens), exact here (see above). Full blocks of
 * ROWS rows and TILE tokens with their accumulators in registers, the edges one sum at a time. Cloned for AVX2
 * with FMA (x86-64-v3) beside the baseline, chosen once at load (the wheel runs on any x86-64). Fused multiply-adds
 * are allowed here, unlike in the rest of the extension: on integers below 2^24 they round nothing (5% faster). */
#ifdef KVQ_X86
__attribute__((target_clones("arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
#endif
static void head_f32(const float *restrict m, const float *restrict qf, float *restrict y, int64_t dim,
                     int64_t tokens) {
    const int64_t rows = dim - dim % ROWS, cols = tokens - tokens % TILE;
    for (int64_t i0 = 0; i0 < rows; i0 += ROWS)
        for (int64_t t0 = 0; t0 < cols; t0 += TILE) {
            vec8 acc[ROWS][2] = {{{0}}};
            for (int64_t j = 0; j < dim; j++) {
                vec8 a, b;
                memcpy(&a, qf + j * tokens + t0, sizeof a);
                memcpy(&b, qf + j * tokens + t0 + 8, sizeof b);
                for (int r = 0; r < ROWS; r++) {
                    const float x = m[(i0 + r) * dim + j];
                    const vec8 mr = {x, x, x, x, x, x, x, x};
                    acc[r][0] += mr * a;
                    acc[r][1] += mr * b;
                }
            }
            for (int r = 0; r < ROWS; r++) {
                memcpy(y + (i0 + r) * tokens + t0, &acc[r][0], sizeof acc[r][0]);
                memcpy(y + (i0 + r) * tokens + t0 + 8, &acc[r][1], sizeof acc[r][1]);
            }
        }
    for (int64_t i = 0; i < dim; i++)
        for (int64_t t = i < rows ? cols : 0; t < tokens; t++) {
            float s = 0.0f;
            for (int64_t j = 0; j < dim; j++) s += m[i * dim + j] * qf[j * tokens + t];
            y[i * tokens + t] = s;
        }
}

#ifdef KVQ_X86
#define VNNI_ROWS 8  /* output rows per block, one 16-token int32 accumulator each */
#define VNNI_TILE 16

/* One head with AVX-512 VNNI: y (dim, tokens) from mp (dim, pairs), M's rows as int16 pairs (M[i][2k], M[i][2k+1])
 * in one int32, and qp (pairs, tokens), q's rows 2k and 2k + 1 interleaved likewise; every sum exact in int32
 * here, converted to float32 (rounded to nearest, ties to even). Blocks of VNNI_ROWS rows and 16 tokens; the
 * edges one int64 sum at a time from m and q. */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
static void head_vnni(const int32_t *restrict mp, const int32_t *restrict qp, const int16_t *restrict m,
                      const int32_t *restrict q, float *restrict y, int64_t dim, int64_t tokens) {
    const int64_t pairs = (dim + 1) / 2, rows = dim - dim % VNNI_ROWS, cols = tokens - tokens % VNNI_TILE;
    for (int64_t i0 = 0; i0 < rows; i0 += VNNI_ROWS)
        for (int64_t t0 = 0; t0 < cols; t0 += VNNI_TILE) {
            __m512i acc[VNNI_ROWS];
            for (int r = 0; r < VNNI_ROWS; r++) acc[r] = _mm512_setzero_si512();
            for (int64_t k = 0; k < pairs; k++) {
                const __m512i v = _mm512_loadu_si512(qp + k * tokens + t0);
                for (int r = 0; r < VNNI_ROWS; r++)
                    acc[r] = _mm512_dpwssd_epi32(acc[r], v, _mm512_set1_epi32(mp[(i0 + r) * pairs + k]));
            }
            for (int r = 0; r < VNNI_ROWS; r++)
                _mm512_storeu_ps(y + (i0 + r) * tokens + t0, _mm512_cvtepi32_ps(acc[r]));
        }
    for (int64_t i = 0; i < dim; i++)
        for (int64_t t = i < rows ? cols : 0; t < tokens; t++) {
            int64_t s = 0;
            for (int64_t j = 0; j < dim; j++) s += (int64_t)m[i * dim + j] * q[j * tokens + t];
            y[i * tokens + t] = (float)s;
        }
}

static int has_vnni(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    return known;
}
#else
static int has_vnni(void) { return 0; }
static void head_vnni(const int32_t *mp, const int32_t *qp, const int16_t *m, const int32_t *q, float *y,
                      int64_t dim, int64_t tokens) {
    (void)mp, (void)qp, (void)m, (void)q, (void)y, (void)dim, (void)tokens;  /* never called: has_vnni is 0 */
}
#endif

/* Two int16 in one int32, `lo` in the low half: the operand layout of vpdpwssd. */
static inline int32_t pair(int32_t lo, int32_t hi) {
    return (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
}

/* One head in int64, each sum rounded once to float32 (the conversion rounds to nearest, ties to even). */
static void head_exact(const int16_t *m, const int32_t *q, float *y, int64_t dim, int64_t tokens) {
    for (int64_t i = 0; i < dim; i++)
        for (int64_t t = 0; t < tokens; t++) {
            int64_t s = 0;
            for (int64_t j = 0; j < dim; j++) s += (int64_t)m[i * dim + j] * q[j * tokens + t];
            y[i * tokens + t] = (float)s;
        }
}

int kvq_untransform(const int32_t *q, const int16_t *matrix, int64_t heads, int64_t dim, int64_t tokens, float *y) {
    int64_t largest = 0, row_sum = 0;
    for (int64_t i = 0; i < heads * dim * tokens; i++) {
        int64_t a = q[i] < 0 ? -(int64_t)q[i] : q[i];
        largest = a > largest ? a : largest;
    }
    for (int64_t r = 0; r < heads * dim; r++) {
        int64_t s = 0;
        for (int64_t j = 0; j < dim; j++) s += abs(matrix[r * dim + j]);
        row_sum = s > row_sum ? s : row_sum;
    }
    if (largest < (1 << 15) && largest * row_sum < ((int64_t)1 << 31) && has_vnni()) {
        const int64_t pairs = (dim + 1) / 2;
        int32_t *mp = PyMem_RawMalloc((size_t)(dim * pairs) * sizeof(int32_t));
        int32_t *qp = PyMem_RawMalloc((size_t)(pairs * tokens) * sizeof(int32_t));
        if (!mp || !qp) {
            PyMem_RawFree(mp);
            PyMem_RawFree(qp);
            return -1;
        }
        for (int64_t h = 0; h < heads; h++) {
            const int16_t *mh = matrix + h * dim * dim;
            const int32_t *qh = q + h * dim * tokens;
            for (int64_t i = 0; i < dim; i++)
                for (int64_t k = 0; k < pairs; k++)
                    mp[i * pairs + k] = pair(mh[i * dim + 2 * k], 2 * k + 1 < dim ? mh[i * dim + 2 * k + 1] : 0);
            for (int64_t k = 0; k < pairs; k++)
                for (int64_t t = 0; t < tokens; t++)
                    qp[k * tokens + t] = pair(qh[2 * k * tokens + t],
                                              2 * k + 1 < dim ? qh[(2 * k + 1) * tokens + t] : 0);
            head_vnni(mp, qp, mh, qh, y + h * dim * tokens, dim, tokens);
        }
        PyMem_RawFree(mp);
        PyMem_RawFree(qp);
        return 0;
    }
    if (largest * row_sum >= FLOAT32_EXACT) {
        for (int64_t h = 0; h < heads; h++)
            head_exact(matrix + h * dim * dim, q + h * dim * tokens, y + h * dim * tokens, dim, tokens);
        return 0;
    }
    float *m = PyMem_RawMalloc((size_t)(dim * dim) * sizeof(float));
    float *qf = PyMem_RawMalloc((size_t)(dim * tokens) * sizeof(float));
    if (!m || !qf) {
        PyMem_RawFree(m);
        PyMem_RawFree(qf);
        return -1;
    }
    for (int64_t h = 0; h < heads; h++) {
        for (int64_t i = 0; i < dim * dim; i++) m[i] = (float)matrix[h * dim * dim + i];
        for (int64_t i = 0; i < dim * tokens; i++) qf[i] = (float)q[h * dim * tokens + i];
        head_f32(m, qf, y + h * dim * tokens, dim, tokens);
    }
    PyMem_RawFree(m);
    PyMem_RawFree(qf);
    return 0;
}
