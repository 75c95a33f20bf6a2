/* The extension kvcli.codecs.kvq_ops._kvq: the C forms of kvq's operations, defined beside their torch forms
 * (quantize.c: unrotate, deviations, quantize; dequantize.c: reconstruct, with transform.c's inverse transform;
 * transform.c: quantize_components, pair_rows).
 * The .py files beside them are its only callers. */
#include "_kvq.h"

static PyMethodDef methods[] = {
    {"unrotate", kvq_unrotate, METH_VARARGS, kvq_unrotate_doc},
    {"deviations", kvq_deviations, METH_VARARGS, kvq_deviations_doc},
    {"quantize", kvq_quantize, METH_VARARGS, kvq_quantize_doc},
    {"reconstruct", kvq_reconstruct, METH_VARARGS, kvq_reconstruct_doc},
    {"quantize_components", kvq_quantize_components, METH_VARARGS, kvq_quantize_components_doc},
    {"pair_rows", kvq_pair_rows, METH_VARARGS, kvq_pair_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvcli.codecs.kvq_ops._kvq",
                                    "kvq's arithmetic in C (codecs/kvq_ops/*.py are its interface).", -1, methods};

PyMODINIT_FUNC PyInit__kvq(void) { return PyModule_Create(&module); }
