/* The C forms of kvq's arithmetic, one file per operation (quantize.c, dequantize.c, transform.c), gathered into one
 * extension, kvcli.codecs.kvq_ops._kvq, by _kvq.c. Hidden: only the module's table reaches them. */
#ifndef KVCLI_KVQ_H
#define KVCLI_KVQ_H

#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* What quantize.c and transform.c's encoder both round with. */
static inline uint32_t bits_of(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

/* torch.round: to the nearest integer, ties to even. Below 2^23 adding 2^23 leaves no fraction bits, so the
 * float32 addition rounds (to nearest even, the default mode) and the subtraction is exact; from 2^23 up every
 * float32 is an integer already. The choice is made on the bits, without a branch, so that the loops around it
 * vectorize (nearbyintf is a libm call without SSE4.1). */
static inline float round_even(float y) {
    const float big = 8388608.0f;
    float a = fabsf(y), r = (a + big) - big;
    uint32_t ua = bits_of(a), ur = bits_of(r), small = -(uint32_t)(ua < 0x4B000000u); /* 2^23's bits */
    ur = (ur & small) | (ua & ~small) | (bits_of(y) & 0x80000000u);
    memcpy(&r, &ur, 4);
    return r;
}

#define KVQ_EXPORT __attribute__((visibility("hidden")))

KVQ_EXPORT extern const char kvq_unrotate_doc[], kvq_deviations_doc[], kvq_quantize_doc[], kvq_reconstruct_doc[],
    kvq_quantize_components_doc[], kvq_pair_rows_doc[];
KVQ_EXPORT PyObject *kvq_unrotate(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_deviations(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_quantize(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_reconstruct(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_quantize_components(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_pair_rows(PyObject *self, PyObject *args);
/* transform.c: M q per head, exactly, into y (heads, dim, tokens) float32; -1 when out of memory. mp and row_sum:
 * pair_rows's for matrix (see there; an understated row_sum would let the int32 sums wrap). */
KVQ_EXPORT int kvq_untransform(const int32_t *q, const int16_t *matrix, const int32_t *mp, int64_t row_sum,
                               int64_t heads, int64_t dim, int64_t tokens, float *y);

/* The cache dtypes reconstruct writes. */
enum { F32 = 0, F16 = 1, BF16 = 2 };

/* A segment's output and what step 1 and 2 of "Reconstruction" need (dequantize.c's reconstruct_all, per head h):
 * center and step per channel (heads * dim), factor + h * factor_stride the head's token factors (ones with stride
 * 0), cos and sin (dim / 2, tokens) or NULL, and element (h, t, d) at out + (h * sh + d * sd + t) items of dtype:
 * channel-major, each channel's tokens contiguous. */
typedef struct {
    const float *center, *step, *factor, *cos, *sin;
    int64_t factor_stride, sh, sd;
    char *out;
    int dtype;
} KvqOutput;

/* transform.c: M q, dequantized, rotated and cast straight into o's output, the values of kvq_untransform then
 * reconstruct_all, bit for bit, without the float32 buffer between them. 1 (nothing written) where it does not
 * apply: no AVX-512 VNNI, or integers past its bound; -1 when out of memory. */
KVQ_EXPORT int kvq_untransform_into(const int32_t *q, const int32_t *mp, int64_t row_sum, int64_t heads,
                                    int64_t dim, int64_t tokens, const KvqOutput *o);

#endif
