/* kvq's reconstruction on the CPU (the C form of codecs/kvq_ops/dequantize.py): a segment's joint symbols
 * expanded, dequantized, rotated back (keys) and cast straight into the cache tensor, in one pass over each
 * element with the GIL released; for version 4's transform, the exact M q (transform.c) after the expansion,
 * dequantized there from the product's registers where it can, else here from a float32 buffer. The torch form beside it is the reference; tests/test_kvq_ops.py holds the
 * forms to the same bits. */
#include "_symbols.h"
#include "_kvq.h"

/* docs/codec.md "Reconstruction" to the bit: every multiply and add a separate float32 operation (setup.py
 * builds with -ffp-contract=off, so none fuses into a multiply-add), casts rounded to nearest even. Every value
 * is finite here (|q| < 2^31, steps and centres at most 65504, |cos|, |sin| <= 1), so the casts need no NaN case. */

#define FLOAT16_MAX 65504.0f

/* Clamped to +-65504, then rounded to the nearest float16, ties to even. */
static inline uint16_t half_of(float x) {
    x = x < -FLOAT16_MAX ? -FLOAT16_MAX : x;
    x = x > FLOAT16_MAX ? FLOAT16_MAX : x;
    uint32_t u, a, sub_bits;
    memcpy(&u, &x, 4);
    a = u & 0x7FFFFFFFu;
    float mag, sub;
    memcpy(&mag, &a, 4);
    /* Below 2^-14 (float16 subnormals) the float32 addition rounds for us: 0.5 + |x| has a ulp of 2^-24, the
     * float16 subnormal unit, so its low mantissa bits are |x| / 2^-24 rounded to nearest even (1024, the
     * smallest normal, when it rounds up). */
    sub = mag + 0.5f;
    memcpy(&sub_bits, &sub, 4);
    uint32_t small = sub_bits - 0x3F000000u;
    /* Normal: exponent rebiased from 127 to 15, 13 mantissa bits rounded off to nearest even (the carry may
     * run into the exponent, which is right). */
    uint32_t normal = (a - 0x38000000u + 0xFFFu + ((a >> 13) & 1u)) >> 13;
    return (uint16_t)(((u >> 16) & 0x8000u) | (a < 0x38800000u ? small : normal));
}

static inline uint16_t bfloat_of(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline void put(void *out, ptrdiff_t at, float y, const int dtype) {
    if (dtype == F32)
        ((float *)out)[at] = y;
    else if (dtype == F16)
        ((uint16_t *)out)[at] = half_of(y);
    else
        ((uint16_t *)out)[at] = bfloat_of(y);
}

/* What step 1 multiplies by the step: float32(q) of the integers, or with a transform float32(M q) * 2^-10 of the
 * values M q (exact: a power of two; `unit` is 2^-10). `floats` is a constant at every call, so each loop is
 * compiled for one kind of input. */
static inline float value_at(const void *restrict q, int64_t t, const int floats, const float unit) {
    return floats ? ((const float *)q)[t] * unit : (float)((const int32_t *)q)[t];
}

/* One channel: center + (q * step) * factor into out[t * ts]. Without token weights the factors are 1, and
 * multiplying by 1 is exact, so one loop serves both. */
static inline void dequantize_row(const void *restrict q, int64_t n, float step, float center,
                                  const float *restrict factor, void *restrict out, const ptrdiff_t ts,
                                  const int dtype, const int floats, const float unit) {
    for (int64_t t = 0; t < n; t++) {
        float v = value_at(q, t, floats, unit) * step;
        v = v * factor[t];
        v = v + center;
        put(out, t * ts, v, dtype);
    }
}

/* A rotary pair of channels (i, i + dim/2): each dequantized, then rotated by its token's angle. Always inlined:
 * where GCC chose to call one generic copy instead, version 3's reconstruction took 20-25% longer. */
static inline __attribute__((always_inline)) void rotate_rows(const void *restrict qa, const void *restrict qb, int64_t n, float step_a,
                               float center_a, float step_b, float center_b, const float *restrict factor,
                               const float *restrict cos, const float *restrict sin, void *restrict out_a,
                               void *restrict out_b, const ptrdiff_t ts, const int dtype, const int floats,
                               const float unit) {
    for (int64_t t = 0; t < n; t++) {
        float a = value_at(qa, t, floats, unit) * step_a, b = value_at(qb, t, floats, unit) * step_b;
        a = a * factor[t];
        b = b * factor[t];
        a = a + center_a;
        b = b + center_b;
        float ac = a * cos[t], bs = b * sin[t], bc = b * cos[t], as = a * sin[t];
        put(out_a, t * ts, ac - bs, dtype);
        put(out_b, t * ts, bc + as, dtype);
    }
}

/* Where a segment's body goes: element (h, t, d) at offset + h * sh + t * st + d * sd of the output. */
typedef struct {
    int64_t offset, heads, dim, sh, st, sd;
} Place;

/* Every position inside the buffer of `items` elements, and no two positions on one element: sorted by
 * stride, each axis of more than one position steps past everything the smaller ones cover. */
static int place_check(const Place *p, int64_t tokens, Py_ssize_t items) {
    const int64_t stride[3] = {p->sh, p->st, p->sd}, extent[3] = {p->heads, tokens, p->dim};
    if (p->offset < 0 || p->heads < 1 || p->dim < 1 || tokens < 1) return -1;
    __int128 last = p->offset;
    for (int i = 0; i < 3; i++) {
        if (stride[i] < (extent[i] > 1)) return -1;
        last += (__int128)(extent[i] - 1) * stride[i];
    }
    if (last >= items) return -1;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < 3; j++)  /* axis j has the smaller stride (ties broken by index) */
            if (i != j && extent[i] > 1 && extent[j] > 1 &&
                (stride[j] < stride[i] || (stride[j] == stride[i] && j < i)) &&
                stride[i] < (__int128)stride[j] * extent[j])
                return -1;
    return 0;
}

/* Every channel of a segment: q holds int32 integers, or (floats) the float32 values M q. */
static inline __attribute__((always_inline)) void
reconstruct_all(const void *q, int64_t tokens, const float *center, const float *step, const float *factors,
                int64_t factor_stride, const float *cos, const float *sin, const Place *p, char *out, int dtype,
                const int floats) {
    const size_t item = dtype == F32 ? 4 : 2;
    const float unit = 0x1p-10f;  /* 2^-SCALE_BITS, codecs/transform.py */
    const int64_t half = p->dim / 2;
    for (int64_t h = 0; h < p->heads; h++) {
        char *head = out + (size_t)(p->offset + h * p->sh) * item;
        const float *factor = factors + h * factor_stride;
        for (int64_t d = 0; d < (cos ? half : p->dim); d++) {
            int64_t c = h * p->dim + d;
            void *dst = head + (size_t)(d * p->sd) * item;
            if (cos) {
                int64_t c2 = c + half;
                void *dst2 = head + (size_t)((d + half) * p->sd) * item;
                const float *cs = cos + d * tokens, *sn = sin + d * tokens;
                const char *qa = (const char *)q + c * tokens * 4, *qb = (const char *)q + c2 * tokens * 4;
#define ROTATE(ts, dt) rotate_rows(qa, qb, tokens, step[c], center[c], step[c2], center[c2], factor, cs, sn, dst, dst2, ts, dt, floats, unit)
                if (p->st == 1) {  /* channel-major storage: each channel's tokens are contiguous */
                    if (dtype == F32) ROTATE(1, F32); else if (dtype == F16) ROTATE(1, F16); else ROTATE(1, BF16);
                } else {
                    if (dtype == F32) ROTATE(p->st, F32); else if (dtype == F16) ROTATE(p->st, F16); else ROTATE(p->st, BF16);
                }
#undef ROTATE
            } else {
                const char *qa = (const char *)q + c * tokens * 4;
#define DEQUANTIZE(ts, dt) dequantize_row(qa, tokens, step[c], center[c], factor, dst, ts, dt, floats, unit)
                if (p->st == 1) {
                    if (dtype == F32) DEQUANTIZE(1, F32); else if (dtype == F16) DEQUANTIZE(1, F16); else DEQUANTIZE(1, BF16);
                } else {
                    if (dtype == F32) DEQUANTIZE(p->st, F32); else if (dtype == F16) DEQUANTIZE(p->st, F16); else DEQUANTIZE(p->st, BF16);
                }
#undef DEQUANTIZE
            }
        }
    }
}

const char kvq_reconstruct_doc[] = PyDoc_STR(
             "reconstruct(symbols, spec, rows, tokens, digits, offsets, escapes, center, step, factor, cos, sin, out,\n"
             "            place, dtype, matrix=None, pairs=None, row_sum=0)\n\n"
             "One segment's body, expanded as expand does, dequantized, rotated (keys: cos and sin float32 (dim / 2,\n"
             "tokens); None for no rotation) and cast to dtype (0 float32, 1 float16, 2 bfloat16) straight into out,\n"
             "the writable bytes of the cache tensor's storage. center, step: float32 per channel (heads * dim);\n"
             "factor: float32 token weights (heads, tokens), or None; place: int64 (offset, heads, dim, stride of\n"
             "heads, of tokens, of dim) in elements of dtype; matrix: version 4's transform, int16 (heads, dim, dim),\n"
             "whose M q (exact) takes the integers' place, times 2^-10, or None; with it pairs and row_sum, what\n"
             "pair_rows makes of it.");

PyObject *kvq_reconstruct(PyObject *self, PyObject *args) {
    enum { SYM, SPEC, ROWS, TOK, DIGITS, OFFSETS, ESC, CENTER, STEP, FACTOR, COS, SIN, OUT, PLACE, MATRIX, PAIRS, N };
    PyObject *o[N];
    long long tokens, row_sum = 0;
    int dtype;
    View v[N] = {{0}};
    static const Py_ssize_t item[N] = {2, 8, 8, 0, 4, 8, 4, 4, 4, 4, 4, 4, 1, 8, 2, 4};
    static const char *names[N] = {"symbols", "spec", "rows", "", "digits", "offsets", "escapes", "center", "step",
                                   "factor", "cos", "sin", "out", "place", "matrix", "pairs"};
    Layout l;
    PyObject *result = NULL;
    int32_t *q = NULL;
    float *ones = NULL, *values = NULL;
    o[MATRIX] = o[PAIRS] = Py_None;
    if (!PyArg_ParseTuple(args, "OOOLOOOOOOOOOOi|OOL", &o[SYM], &o[SPEC], &o[ROWS], &tokens, &o[DIGITS], &o[OFFSETS],
                          &o[ESC], &o[CENTER], &o[STEP], &o[FACTOR], &o[COS], &o[SIN], &o[OUT], &o[PLACE], &dtype,
                          &o[MATRIX], &o[PAIRS], &row_sum))
        return NULL;
    int rope = o[COS] != Py_None, scaled = o[FACTOR] != Py_None, transformed = o[MATRIX] != Py_None;
    if (rope != (o[SIN] != Py_None) || transformed != (o[PAIRS] != Py_None) || row_sum < 0) {
        PyErr_SetString(PyExc_ValueError, "reconstruct: cos and sin go together, as matrix and pairs do");
        return NULL;
    }
    for (int i = 0; i < N; i++)
        if (i != TOK && (rope || (i != COS && i != SIN)) && (scaled || i != FACTOR) &&
            (transformed || (i != MATRIX && i != PAIRS)) && view_get(o[i], &v[i], i == OUT, item[i], names[i]))
            goto done;
    if (dtype < F32 || dtype > BF16 || ITEMS(v[PLACE], int64_t) != 6) {
        PyErr_SetString(PyExc_ValueError, "reconstruct: dtype must be 0, 1 or 2 and place six integers");
        goto done;
    }
    const int64_t *pl = DATA(v[PLACE], int64_t);
    Place p = {pl[0], pl[1], pl[2], pl[3], pl[4], pl[5]};
    Py_ssize_t items = v[OUT].buf.len / (dtype == F32 ? 4 : 2);
    if (place_check(&p, tokens, items)) {
        PyErr_SetString(PyExc_ValueError, "reconstruct: the output's shape and strides leave its buffer or overlap");
        goto done;
    }
    int64_t channels = p.heads * p.dim;
    if (ITEMS(v[CENTER], float) != channels || ITEMS(v[STEP], float) != channels ||
        (scaled && ITEMS(v[FACTOR], float) != p.heads * tokens) ||
        (rope && (p.dim % 2 || ITEMS(v[COS], float) != p.dim / 2 * tokens || ITEMS(v[SIN], float) != p.dim / 2 * tokens)) ||
        (transformed && (ITEMS(v[MATRIX], int16_t) != channels * p.dim ||
                         ITEMS(v[PAIRS], int32_t) != p.heads * ((p.dim + 7) / 8 * 8) * ((p.dim + 1) / 2)))) {
        PyErr_SetString(PyExc_ValueError,
                        "reconstruct: centers, steps, token weights, rotary tables or matrices do not match the output");
        goto done;
    }
    if (expansion_get(&v[SYM], &v[SPEC], &v[ROWS], tokens, &v[DIGITS], &v[OFFSETS], channels, &l, "reconstruct"))
        goto done;
    if (l.channels != channels) {  /* with layout_get's bounds: every channel exactly once */
        PyErr_SetString(PyExc_ValueError, "reconstruct: the groups do not cover every channel once");
        goto done;
    }
    q = PyMem_RawMalloc((size_t)channels * (size_t)tokens * sizeof(int32_t) + 1);
    unsigned char *seen = PyMem_RawCalloc((size_t)channels, 1);
    if (!scaled) {
        ones = PyMem_RawMalloc((size_t)tokens * sizeof(float));
        for (int64_t t = 0; ones && t < tokens; t++) ones[t] = 1.0f;
    }
    if (!q || !seen || (!scaled && !ones)) {
        PyMem_RawFree(seen);
        PyErr_NoMemory();
        goto done;
    }
    int missing = 0;
    for (int64_t r = 0; r < channels; r++) seen[l.rows[r]] = 1;
    for (int64_t c = 0; c < channels; c++) missing |= !seen[c];
    PyMem_RawFree(seen);
    if (missing) {
        PyErr_SetString(PyExc_ValueError, "reconstruct: the groups do not cover every channel once");
        goto done;
    }
    int fault, short_of_memory;
    Py_BEGIN_ALLOW_THREADS
    fault = expand_all(&l, DATA(v[SYM], uint16_t), DATA(v[DIGITS], int32_t), DATA(v[OFFSETS], int64_t),
                       DATA(v[ESC], int32_t), ITEMS(v[ESC], int32_t), q);
    /* A transformed segment into channel-major storage (kvfile.decode's) goes straight from M q's registers to
     * the output where transform.c can (kvq_untransform_into); anything else through a float32 buffer of M q. */
    int buffered = transformed;
    short_of_memory = 0;
    if (!fault && transformed && p.st == 1) {
        const KvqOutput o = {DATA(v[CENTER], float), DATA(v[STEP], float), scaled ? DATA(v[FACTOR], float) : ones,
                             rope ? DATA(v[COS], float) : NULL, rope ? DATA(v[SIN], float) : NULL, scaled ? tokens : 0,
                             p.sh, p.sd, (char *)v[OUT].buf.buf + (size_t)p.offset * (dtype == F32 ? 4 : 2), dtype};
        const int got = kvq_untransform_into(q, DATA(v[PAIRS], int32_t), row_sum, p.heads, p.dim, tokens, &o);
        short_of_memory = got < 0;
        buffered = got == 1;
    }
    if (!fault && buffered && !short_of_memory) {
        values = PyMem_RawMalloc((size_t)channels * (size_t)tokens * sizeof(float) + 1);
        short_of_memory = !values || kvq_untransform(q, DATA(v[MATRIX], int16_t), DATA(v[PAIRS], int32_t), row_sum,
                                                     p.heads, p.dim, tokens, values);
    }
    /* Two calls, each with a constant `floats`: each inlines into loops for one kind of input. */
#define RECONSTRUCT(input, floats)                                                                                  \
    reconstruct_all(input, tokens, DATA(v[CENTER], float), DATA(v[STEP], float), scaled ? DATA(v[FACTOR], float) : ones, \
                    scaled ? tokens : 0, rope ? DATA(v[COS], float) : NULL, rope ? DATA(v[SIN], float) : NULL, &p,  \
                    (char *)v[OUT].buf.buf, dtype, floats)
    if (!fault && !short_of_memory) {
        if (buffered)
            RECONSTRUCT(values, 1);
        else if (!transformed)
            RECONSTRUCT(q, 0);
    }
#undef RECONSTRUCT
    Py_END_ALLOW_THREADS
    if (short_of_memory) {
        PyErr_NoMemory();
        goto done;
    }
    if (fault) {
        PyErr_SetString(PyExc_ValueError, "reconstruct: a symbol past its alphabet, or escapes not count_escapes' count");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(q);
    PyMem_RawFree(ones);
    PyMem_RawFree(values);
    for (int i = 0; i < N; i++) view_release(&v[i]);
    return result;
}

