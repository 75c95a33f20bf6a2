/* The C forms of kvq's arithmetic, one file per operation (quantize.c, dequantize.c, transform.c), gathered into one
 * extension, kvcli.codecs.kvq_ops._kvq, by _kvq.c. Hidden: only the module's table reaches them. */
#ifndef KVCLI_KVQ_H
#define KVCLI_KVQ_H

#include <Python.h>

#define KVQ_EXPORT __attribute__((visibility("hidden")))

KVQ_EXPORT extern const char kvq_unrotate_doc[], kvq_deviations_doc[], kvq_quantize_doc[], kvq_reconstruct_doc[];
KVQ_EXPORT PyObject *kvq_unrotate(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_deviations(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_quantize(PyObject *self, PyObject *args);
KVQ_EXPORT PyObject *kvq_reconstruct(PyObject *self, PyObject *args);
/* transform.c: M q per head, exactly, into y (heads, dim, tokens) float32; -1 when out of memory. */
KVQ_EXPORT int kvq_untransform(const int32_t *q, const int16_t *matrix, int64_t heads, int64_t dim, int64_t tokens,
                               float *y);

#endif
