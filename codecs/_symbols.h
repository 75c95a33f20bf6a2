/* What the entropy coder (codecs/_ans.c) and kvq's arithmetic (the .c files of codecs/kvq_ops/) share: buffer
 * views, kvq's joint-symbol layout and its expansion into integers (expand in the coder, fused into reconstruct
 * in the arithmetic), and a row's population standard deviation (spread in the coder, fused into quantize).
 * Each extension compiles its own copy, inside the file that calls it, so the calls inline as they did when
 * both lived in one file. SHARED functions are static, and marked unused because no file calls all of them. */
#ifndef KVCLI_SYMBOLS_H
#define KVCLI_SYMBOLS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <float.h>
#include <math.h>
#include <string.h>

#define SHARED static __attribute__((unused))

/* The encoder's element loops are also compiled for AVX2 and picked at load time where the CPU has it (glibc's
 * ifunc): twice the lanes of the SSE2 that every x86-64 has, and the same IEEE results (no FMA: -ffp-contract=off).
 * CFLAGS=-DWIDE= builds the SSE2 loops alone, to test them on a CPU with AVX2. */
#ifndef WIDE
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define WIDE __attribute__((target_clones("avx2", "default")))
#else
#define WIDE
#endif
#endif

typedef struct {
    Py_buffer buf;
    int held;
} View;

SHARED int view_get(PyObject *obj, View *v, int writable, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(obj, &v->buf, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    v->held = 1;
    if (v->buf.len % itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes is not a whole number of %zd-byte items", what, v->buf.len,
                     itemsize);
        return -1;
    }
    return 0;
}

SHARED void view_release(View *v) {
    if (v->held) PyBuffer_Release(&v->buf);
    v->held = 0;
}

#define ITEMS(v, type) ((Py_ssize_t)((v).buf.len / (Py_ssize_t)sizeof(type)))
#define DATA(v, type) ((type *)(v).buf.buf)

/* kvq's joint symbols (codecs/entropy.py, docs/codec.md "Channel classes, tuples, symbols"): a segment's
 * symbols are its groups' in order; a group's are its channels' in order, each channel's ceil(tokens / m)
 * tuples in token order. spec holds per group (digit table, channels, half range K, tuple length m); rows the
 * groups' channels, concatenated. The escape symbol of a group is (2K + 1)^m. */
typedef struct {
    const int64_t *spec;
    const int64_t *rows;
    Py_ssize_t groups, channels;
    int64_t tokens;
} Layout;

/* The tuple shapes kvq's classes use (entropy.class_layout): every loop over tuples handles exactly these. */
SHARED int tuple_shape_ok(long long half, long long m) {
    return half >= 1 && half <= 255 && (m == 1 || m == 2 || m == 4);
}

SHARED int layout_get(View *spec, View *rows, int64_t tokens, Py_ssize_t symbols, Py_ssize_t out_rows, Layout *l) {
    l->spec = DATA(*spec, int64_t);
    l->rows = DATA(*rows, int64_t);
    l->groups = ITEMS(*spec, int64_t) / 4;
    l->channels = ITEMS(*rows, int64_t);
    l->tokens = tokens;
    int64_t n = 0, c = 0;
    if (ITEMS(*spec, int64_t) % 4 || tokens < 0) goto bad;
    for (Py_ssize_t g = 0; g < l->groups; g++) {
        const int64_t *e = l->spec + 4 * g;
        if (e[1] < 0 || !tuple_shape_ok(e[2], e[3])) goto bad;
        c += e[1];
        n += e[1] * ((tokens + e[3] - 1) / e[3]);
    }
    if (c != l->channels || n != symbols) goto bad;
    for (Py_ssize_t r = 0; r < l->channels && tokens > 0; r++)  /* with no tokens, nothing is written */
        if (l->rows[r] < 0 || l->rows[r] >= out_rows) goto bad;
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "joint symbols: the group layout does not match the arrays");
    return -1;
}

SHARED uint32_t escape_symbol(const int64_t *e) {
    uint32_t base = 2 * (uint32_t)e[2] + 1, esc = 1;
    for (int64_t j = 0; j < e[3]; j++) esc *= base;
    return esc;
}

/* One channel: its ceil(tokens / m) tuples into dst. The tuple length is a constant in each copy of the loop,
 * so the compiler turns the copies into single moves. Returns 1 for a symbol past the alphabet or an escape
 * with no values left. */
SHARED inline int expand_tuples(const uint16_t *restrict s, int64_t tokens, const int m, uint32_t esc,
                                const int32_t *restrict table, const int32_t *restrict escapes, Py_ssize_t n_esc,
                                Py_ssize_t *used, int32_t *restrict dst) {
    int64_t full = tokens / m;
    for (int64_t i = 0; i < full; i++) {
        uint32_t v = s[i];
        const int32_t *src = table + (size_t)v * m;
        if (v >= esc) {
            if (v != esc || *used + m > n_esc) return 1;
            src = escapes + *used;
            *used += m;
        }
        memcpy(dst + i * m, src, m * sizeof(int32_t));
    }
    if (full * m < tokens) {  /* the last tuple's padding is dropped */
        uint32_t v = s[full];
        const int32_t *src = table + (size_t)v * m;
        if (v >= esc) {
            if (v != esc || *used + m > n_esc) return 1;
            src = escapes + *used;
            *used += m;
        }
        memcpy(dst + full * m, src, (tokens - full * m) * sizeof(int32_t));
    }
    return 0;
}

SHARED int expand_row(const uint16_t *s, int64_t tokens, int m, uint32_t esc, const int32_t *table,
                      const int32_t *escapes, Py_ssize_t n_esc, Py_ssize_t *used, int32_t *dst) {
    switch (m) {
        case 1: return expand_tuples(s, tokens, 1, esc, table, escapes, n_esc, used, dst);
        case 2: return expand_tuples(s, tokens, 2, esc, table, escapes, n_esc, used, dst);
        case 4: return expand_tuples(s, tokens, 4, esc, table, escapes, n_esc, used, dst);
        default: return expand_tuples(s, tokens, m, esc, table, escapes, n_esc, used, dst);
    }
}

/* The checks expand and reconstruct share, before any write: the layout fits the symbols and `out_rows` rows
 * of `tokens`, and every group's digit table lies inside the digits. */
SHARED int expansion_get(View *sym, View *spec, View *rows, int64_t tokens, View *digits, View *offsets,
                         Py_ssize_t out_rows, Layout *l, const char *what) {
    if (layout_get(spec, rows, tokens, ITEMS(*sym, uint16_t), out_rows, l)) return -1;
    const int64_t *off = DATA(*offsets, int64_t);
    for (Py_ssize_t g = 0; g < l->groups; g++) {  /* every symbol's digits lie inside its table */
        const int64_t *e = l->spec + 4 * g;
        if (e[0] < 0 || e[0] >= ITEMS(*offsets, int64_t) || off[e[0]] < 0 ||
            off[e[0]] + ((int64_t)escape_symbol(e) + 1) * e[3] > ITEMS(*digits, int32_t)) {
            PyErr_Format(PyExc_ValueError, "%s: group %zd's digit table lies outside the digits", what, g);
            return -1;
        }
    }
    return 0;
}

/* Every group's channels into out (row r of `tokens` values at out + r * tokens), without the GIL. Returns 1
 * for a symbol past its alphabet or escapes that are not exactly those the symbols use.
 * Never inlined, as when expand and reconstruct shared it in one file: inlined into reconstruct, its one caller
 * in dequantize.c, it made reconstruct 13-23% slower (the same decode's calls replayed on both builds). */
__attribute__((noinline)) SHARED int expand_all(const Layout *l, const uint16_t *s, const int32_t *digits,
                                                const int64_t *offsets, const int32_t *escapes, Py_ssize_t n_esc,
                                                int32_t *out) {
    int fault = 0;
    Py_ssize_t used = 0;
    const int64_t *row = l->rows;
    for (Py_ssize_t g = 0; g < l->groups && !fault; g++) {
        const int64_t *e = l->spec + 4 * g;
        int64_t n = (l->tokens + e[3] - 1) / e[3];
        for (int64_t r = 0; r < e[1] && !fault; r++, row++, s += n)
            fault = expand_row(s, l->tokens, (int)e[3], escape_symbol(e), digits + offsets[e[0]], escapes, n_esc,
                               &used, out + *row * l->tokens);
    }
    return fault || used != n_esc;
}

/* The population standard deviation of a row of integers, from their exact sum and sum of squares
 * (tokens * squares - sum^2 = tokens^2 * variance, exact), given the row's extremes. The squares take 64 bits
 * unless some |v| reaches 46341 (2^15.5) or the row reaches 2^32 tokens, where they could overflow and go
 * through 128 bits. spread() and the fused quantize() must give the same classes bit for bit, so both call
 * this. */
SHARED inline double row_std(const int32_t *restrict v, int64_t tokens, int32_t lo, int32_t hi) {
    int64_t sum = 0;
    __int128 squares = 0;
    if (lo > -46341 && hi < 46341 && tokens < ((int64_t)1 << 32)) {
        int64_t sq = 0;
        for (int64_t t = 0; t < tokens; t++) {
            sum += v[t];
            sq += (int64_t)v[t] * v[t];
        }
        squares = sq;
    } else {
        for (int64_t t = 0; t < tokens; t++) {
            sum += v[t];
            squares += (int64_t)v[t] * v[t];
        }
    }
    __int128 spread2 = squares * tokens - (__int128)sum * sum;
    return sqrt((double)spread2) / (double)tokens;
}

#endif
