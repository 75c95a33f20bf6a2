/* kvq version 4's inverse transform on the CPU (the C form of codecs/kvq_ops/transform.py's untransform_ref):
 * per head, M q for the int16 matrix M (dim, dim) and a segment's integers q (dim, tokens), exactly. reconstruct
 * (dequantize.c) calls it between the expansion and the dequantization, with the GIL released.
 *
 * Exact in any summation order (docs/codec.md, "Reconstruction"): where max|q| times M's largest row sum of |M|
 * is below 2^24, every partial sum is an integer float32 holds, so a blocked float32 product that the compiler
 * vectorizes gives M q exactly; otherwise int64 sums, rounded once to float32. */
#include "_kvq.h"

#include <stdint.h>
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
__attribute__((target_clones("arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
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
