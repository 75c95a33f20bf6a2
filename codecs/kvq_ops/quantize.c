/* kvq's encoder passes on the CPU (the C form of codecs/kvq_ops/quantize.py), with the GIL released so that fit
 * runs two layers at once: a layer moved to the quantization space (transposed, RoPE undone on keys), its
 * deviations from the channel centres, and its integers with each channel's spread for its class. The torch
 * forms beside it are the reference; tests/test_kvq_ops.py holds the forms to the same bits. */
#include "_symbols.h"
#include "_kvq.h"

/* kvq's fit, one layer and kind at a time, in as few passes over its elements as torch's reductions allow:
 * the means (the centre, and the rms that sets the steps) stay torch's own reductions, because their
 * summation order decides the float16-rounded centre and step of the file; everything around them is here.
 * Every operation is torch's, element for element: separate float32 multiplies, adds and divisions (no
 * multiply-add, -ffp-contract=off), rounding half to even. */

/* A strided float32 array of rank 3, as the buffer protocol describes it (strides in elements). */
typedef struct {
    View v;
    int64_t shape[3], stride[3];
} Strided;

static int strided_get(PyObject *obj, Strided *s, const char *what) {
    if (PyObject_GetBuffer(obj, &s->v.buf, PyBUF_STRIDED_RO | PyBUF_FORMAT) < 0) return -1;
    s->v.held = 1;
    const char *f = s->v.buf.format;
    if (s->v.buf.ndim != 3 || s->v.buf.itemsize != 4 || !f || (strcmp(f, "f") && strcmp(f, "<f") && strcmp(f, "=f"))) {
        PyErr_Format(PyExc_ValueError, "%s must be a float32 array of rank 3", what);
        return -1;
    }
    for (int i = 0; i < 3; i++) {
        s->shape[i] = s->v.buf.shape[i];
        if (s->v.buf.strides[i] % 4) {
            PyErr_Format(PyExc_ValueError, "%s: strides must be whole elements", what);
            return -1;
        }
        s->stride[i] = s->v.buf.strides[i] / 4;
    }
    return 0;
}

#ifdef __SSE2__
#include <emmintrin.h>

/* Four tokens (rows st apart) of four contiguous channels, as four vectors of the four tokens, one per channel. */
static inline void channels4(const float *x, int64_t st, __m128 v[4]) {
    v[0] = _mm_loadu_ps(x), v[1] = _mm_loadu_ps(x + st), v[2] = _mm_loadu_ps(x + 2 * st), v[3] = _mm_loadu_ps(x + 3 * st);
    _MM_TRANSPOSE4_PS(v[0], v[1], v[2], v[3]);
}

/* unrotate's tokens [0, blocked) of one head, blocked a multiple of 4, channels contiguous (a multiple of 4 of
 * them, or of each half with RoPE); the same separate multiplies, adds and subtractions as the scalar loop. */
static void unrotate_blocks(const float *x, int64_t st, int64_t blocked, int64_t tokens, int64_t dim,
                            const float *cs, const float *sn, float *out) {
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < blocked; t += 4) {
        const float *xt = x + t * st;
        if (!cs) {
            for (int64_t d = 0; d < dim; d += 4) {
                __m128 v[4];
                channels4(xt + d, st, v);
                for (int k = 0; k < 4; k++) _mm_storeu_ps(out + (d + k) * tokens + t, v[k]);
            }
            continue;
        }
        for (int64_t d = 0; d < half; d += 4) {
            __m128 a[4], b[4];
            channels4(xt + d, st, a);
            channels4(xt + d + half, st, b);
            for (int k = 0; k < 4; k++) {
                const __m128 c = _mm_loadu_ps(cs + (d + k) * tokens + t), s = _mm_loadu_ps(sn + (d + k) * tokens + t);
                _mm_storeu_ps(out + (d + k) * tokens + t, _mm_add_ps(_mm_mul_ps(a[k], c), _mm_mul_ps(b[k], s)));
                _mm_storeu_ps(out + (d + k + half) * tokens + t, _mm_sub_ps(_mm_mul_ps(b[k], c), _mm_mul_ps(a[k], s)));
            }
        }
    }
}
#endif

const char kvq_unrotate_doc[] = PyDoc_STR(
             "unrotate(x, cos, sin, out)\n\n"
             "x: float32 (heads, tokens, dim), any strides. out (float32 (heads, dim, tokens), C order) = x\n"
             "transposed, with RoPE (rotate-half layout) undone where cos and sin (float32 (dim / 2, tokens)) are\n"
             "given, as codecs/quantize.py's unrotate_keys: x1 * cos + x2 * sin and x2 * cos - x1 * sin.");

#define TILE 32 /* tokens per tile: a tile's rows of x stay in the L1 cache while its channels are written */

PyObject *kvq_unrotate(PyObject *self, PyObject *args) {
    PyObject *o_x, *o_cos, *o_sin, *o_out;
    Strided x = {{{0}}};
    View cv = {0}, sv = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOO", &o_x, &o_cos, &o_sin, &o_out)) return NULL;
    if (strided_get(o_x, &x, "x") || view_get(o_out, &out, 1, 4, "out")) goto done;
    const int rotate = o_cos != Py_None;
    if (rotate && (view_get(o_cos, &cv, 0, 4, "cos") || view_get(o_sin, &sv, 0, 4, "sin"))) goto done;
    const int64_t heads = x.shape[0], tokens = x.shape[1], dim = x.shape[2], half = dim / 2;
    if (ITEMS(out, float) != heads * tokens * dim ||
        (rotate && (dim % 2 || ITEMS(cv, float) != half * tokens || ITEMS(sv, float) != half * tokens))) {
        PyErr_SetString(PyExc_ValueError, "unrotate: out, cos or sin do not match x");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const float *src = (const float *)x.v.buf.buf, *cs = rotate ? DATA(cv, float) : NULL,
                *sn = rotate ? DATA(sv, float) : NULL;
    float *dst = DATA(out, float);
    const int64_t sh = x.stride[0], st = x.stride[1], sd = x.stride[2];
    /* Four tokens at a time in blocks of 4 x 4 where channels are contiguous; what is left, and any other
     * layout, in the tiles below. */
#ifdef __SSE2__
    const int64_t blocked = sd == 1 && (rotate ? half : dim) % 4 == 0 ? tokens / 4 * 4 : 0;
#else
    const int64_t blocked = 0;
#endif
    for (int64_t h = 0; h < heads; h++) {
        float *oh = dst + h * dim * tokens;
#ifdef __SSE2__
        unrotate_blocks(src + h * sh, st, blocked, tokens, dim, cs, sn, oh);
#endif
        for (int64_t t0 = blocked; t0 < tokens; t0 += TILE) {
            const int64_t t1 = t0 + TILE < tokens ? t0 + TILE : tokens;
            const float *xh = src + h * sh;
            for (int64_t d = 0; d < (rotate ? half : dim); d++) {
                float *o1 = oh + d * tokens;
                if (!rotate) {
                    for (int64_t t = t0; t < t1; t++) o1[t] = xh[t * st + d * sd];
                    continue;
                }
                float *o2 = oh + (d + half) * tokens;
                const float *c = cs + d * tokens, *s = sn + d * tokens;
                for (int64_t t = t0; t < t1; t++) {
                    float x1 = xh[t * st + d * sd], x2 = xh[t * st + (d + half) * sd];
                    float a = x1 * c[t], b = x2 * s[t], e = x2 * c[t], f = x1 * s[t];
                    o1[t] = a + b;
                    o2[t] = e - f;
                }
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    view_release(&x.v), view_release(&cv), view_release(&sv), view_release(&out);
    return result;
}

/* One channel's squares into out; returns the bits of its largest |dev|. Compared as bits: for floats without a
 * sign, their order, with NaN and infinity above every finite value, so one integer maximum (which vectorizes)
 * is both the spread and the finiteness test. */
WIDE static uint32_t deviation_row(const float *restrict x, int64_t tokens, float cr, const float *restrict f,
                                   float *restrict out) {
    uint32_t most = 0;
    if (f) {
        for (int64_t t = 0; t < tokens; t++) {
            float dev = x[t] - cr, u = dev / f[t];
            uint32_t b = bits_of(dev) & 0x7FFFFFFFu;
            most = b > most ? b : most;
            out[t] = u * u;
        }
    } else {
        for (int64_t t = 0; t < tokens; t++) {
            float dev = x[t] - cr;
            uint32_t b = bits_of(dev) & 0x7FFFFFFFu;
            most = b > most ? b : most;
            out[t] = dev * dev;
        }
    }
    return most;
}

const char kvq_deviations_doc[] = PyDoc_STR(
             "deviations(body, center, factor, spread, squares) -> bool\n\n"
             "body: float32 (heads, dim, tokens), C order; center float32 (heads, dim); factor float32 (heads, tokens)\n"
             "or None. Fills spread (float32 (heads, dim)) with max |body - center| per channel and squares (like\n"
             "body) with ((body - center) / factor)^2. Returns False if any body - center is NaN or infinite (spread\n"
             "then means nothing).");

PyObject *kvq_deviations(PyObject *self, PyObject *args) {
    PyObject *o_body, *o_center, *o_factor, *o_spread, *o_sq;
    long long heads;
    View body = {0}, center = {0}, factor = {0}, spread = {0}, sq = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOLOO", &o_body, &o_center, &o_factor, &heads, &o_spread, &o_sq)) return NULL;
    if (view_get(o_body, &body, 0, 4, "body") || view_get(o_center, &center, 0, 4, "center") ||
        view_get(o_spread, &spread, 1, 4, "spread") || view_get(o_sq, &sq, 1, 4, "squares"))
        goto done;
    const int weighted = o_factor != Py_None;
    if (weighted && view_get(o_factor, &factor, 0, 4, "factor")) goto done;
    const Py_ssize_t channels = ITEMS(center, float);
    if (heads < 1 || channels % heads || ITEMS(spread, float) != channels || channels == 0 ||
        ITEMS(body, float) % channels || ITEMS(sq, float) != ITEMS(body, float) ||
        (weighted && ITEMS(factor, float) != heads * (ITEMS(body, float) / channels))) {
        PyErr_SetString(PyExc_ValueError, "deviations: array sizes disagree");
        goto done;
    }
    uint32_t most_bits = 0;
    Py_BEGIN_ALLOW_THREADS
    const int64_t tokens = ITEMS(body, float) / channels, dim = channels / heads;
    const float *x = DATA(body, float), *c = DATA(center, float);
    float *top = DATA(spread, float), *out = DATA(sq, float);
    for (Py_ssize_t r = 0; r < channels; r++, x += tokens, out += tokens) {
        const float *f = weighted ? DATA(factor, float) + (r / dim) * tokens : NULL;
        const uint32_t most = deviation_row(x, tokens, c[r], f, out);
        memcpy(top + r, &most, 4);
        most_bits = most > most_bits ? most : most_bits;
    }
    Py_END_ALLOW_THREADS
    const int finite = most_bits < 0x7F800000u;
    result = PyBool_FromLong(finite);
done:
    view_release(&body), view_release(&center), view_release(&factor), view_release(&spread), view_release(&sq);
    return result;
}

const char kvq_quantize_doc[] = PyDoc_STR(
             "quantize(body, center, step, factor, q, std) -> bool\n\n"
             "codecs/quantize.py's quantize, element for element: q = round_half_even((body - center) / size) with\n"
             "size = step * factor in float32 (step alone without factor). body: float32 (heads, dim, tokens), C order;\n"
             "center, step float32 (heads, dim); factor float32 (heads, tokens) or None; q int16 or int32 like body.\n"
             "Also fills std (float64 per channel) as spread() would from q. Returns False, with q incomplete, if a\n"
             "value does not fit int16 q (quantize into int32 then); every value must fit int32.");

/* One channel's integers into q, and their standard deviation for its class (row_std, as spread() gives it).
 * Each loop is simple enough to vectorize. Returns 0 if int16 output does not fit. */
WIDE static int quantize_row(const float *restrict x, int64_t tokens, float cr, float sr, const float *restrict f,
                               int32_t *restrict q, double *std) {
    if (f)
        for (int64_t t = 0; t < tokens; t++) {
            float size = sr * f[t];
            q[t] = (int32_t)round_even((x[t] - cr) / size);
        }
    else
        for (int64_t t = 0; t < tokens; t++) q[t] = (int32_t)round_even((x[t] - cr) / sr);
    int32_t lo = 0, hi = 0;
    for (int64_t t = 0; t < tokens; t++) {
        lo = q[t] < lo ? q[t] : lo;
        hi = q[t] > hi ? q[t] : hi;
    }
    *std = row_std(q, tokens, lo, hi);
    return lo >= INT16_MIN && hi <= INT16_MAX;
}

PyObject *kvq_quantize(PyObject *self, PyObject *args) {
    PyObject *o_body, *o_center, *o_step, *o_factor, *o_q, *o_std;
    long long heads;
    View body = {0}, center = {0}, step = {0}, factor = {0}, q = {0}, sd = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOLOO", &o_body, &o_center, &o_step, &o_factor, &heads, &o_q, &o_std))
        return NULL;
    if (view_get(o_body, &body, 0, 4, "body") || view_get(o_center, &center, 0, 4, "center") ||
        view_get(o_step, &step, 0, 4, "step") || view_get(o_std, &sd, 1, 8, "std"))
        goto done;
    if (PyObject_GetBuffer(o_q, &q.buf, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    q.held = 1;
    const int weighted = o_factor != Py_None;
    if (weighted && view_get(o_factor, &factor, 0, 4, "factor")) goto done;
    const Py_ssize_t channels = ITEMS(center, float), item = q.buf.itemsize;
    if (heads < 1 || channels == 0 || channels % heads || ITEMS(step, float) != channels ||
        ITEMS(sd, double) != channels || ITEMS(body, float) % channels || (item != 2 && item != 4) ||
        q.buf.len / item != ITEMS(body, float) ||
        (weighted && ITEMS(factor, float) != heads * (ITEMS(body, float) / channels))) {
        PyErr_SetString(PyExc_ValueError, "quantize: array sizes disagree");
        goto done;
    }
    const int64_t tokens = ITEMS(body, float) / channels, dim = channels / heads;
    int32_t *row = item == 2 ? PyMem_RawMalloc(tokens * sizeof(int32_t)) : NULL;
    if (item == 2 && !row) {
        PyErr_NoMemory();
        goto done;
    }
    int fits = 1;
    Py_BEGIN_ALLOW_THREADS
    const float *x = DATA(body, float), *c = DATA(center, float), *s = DATA(step, float);
    double *std = DATA(sd, double);
    for (Py_ssize_t r = 0; r < channels && fits; r++, x += tokens) {
        const float *f = weighted ? DATA(factor, float) + (r / dim) * tokens : NULL;
        int32_t *q32 = item == 4 ? (int32_t *)q.buf.buf + r * tokens : row;
        fits = quantize_row(x, tokens, c[r], s[r], f, q32, std + r) || item == 4;
        if (item == 2 && fits) {
            int16_t *q16 = (int16_t *)q.buf.buf + r * tokens;
            for (int64_t t = 0; t < tokens; t++) q16[t] = (int16_t)row[t];
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(row);
    result = PyBool_FromLong(fits);
done:
    view_release(&body), view_release(&center), view_release(&step), view_release(&factor), view_release(&q),
        view_release(&sd);
    return result;
}
