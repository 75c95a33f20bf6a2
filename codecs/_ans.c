/* kvcli's entropy coder in C (docs/codec.md, "Entropy stream" and "Channel classes, tuples, symbols"): batch
 * encode and decode of kvcli's interleaved rANS streams, one stream after another, kvq's joint symbols both ways
 * (to_tuples, count_tuples, count_escapes, expand), kvq version 4's table of each symbol (decode_banded,
 * table_ids), each channel's spread for its class, and a segment's joint symbols coded in one call (encode_rows),
 * each with the GIL released so that threads code batches in parallel.
 * kvq's arithmetic (un-RoPE, quantization, reconstruction) is codecs/kvq_ops/, another extension.
 *
 * codecs/rans.py and codecs/entropy.py are the only callers: they build the arrays and turn the per-stream
 * results into StreamError or CodecError, and rans.py checks the constants it owns against this build's
 * (check_constants). Everything is validated before the GIL is released: sizes that do not add up, table
 * indices past the tables and symbols past their alphabet raise ValueError (a bug in the caller, never bad
 * data); bad data only shows in the returned per-stream counts.
 *
 * The decoder follows the spec's two passes per step (decode every lane, then renormalize in ascending lane
 * order) because that is also the fast order: the first pass has no dependency between lanes.
 */
#include "_symbols.h"

#define PRECISION_BITS 16
#define TOTAL (1u << PRECISION_BITS)
#define STATE_LOW (1u << 16)
#define WORD_BITS 16
#define WORD_MASK 0xFFFFu

/* The tables as the coder reads them: per table its first entry in fc and its size; fc holds
 * (freq, cum) pairs of every symbol of every table. */
typedef struct {
    const uint32_t *fc;
    const uint32_t *base;
    const uint32_t *size;
    Py_ssize_t count;
} Tables;

/* Every table inside the frequency array: enough for memory safety where no frequency divides. */
static int tables_shape(View *fc, View *base, View *size, Tables *t) {
    Py_ssize_t n_fc = ITEMS(*fc, uint32_t) / 2;
    t->count = ITEMS(*base, uint32_t);
    if (ITEMS(*size, uint32_t) != t->count || t->count > 65536) {
        PyErr_SetString(PyExc_ValueError, "table base and size arrays disagree");
        return -1;
    }
    t->fc = DATA(*fc, uint32_t);
    t->base = DATA(*base, uint32_t);
    t->size = DATA(*size, uint32_t);
    for (Py_ssize_t k = 0; k < t->count; k++) {
        if ((Py_ssize_t)t->base[k] + (Py_ssize_t)t->size[k] > n_fc || t->size[k] < 1) {
            PyErr_Format(PyExc_ValueError, "table %zd lies outside the frequency array", k);
            return -1;
        }
    }
    return 0;
}

static int tables_get(View *fc, View *base, View *size, Tables *t) {
    if (tables_shape(fc, base, size, t)) return -1;
    for (Py_ssize_t k = 0; k < t->count; k++) {
        for (uint32_t s = 0; s < t->size[k]; s++) {  /* freq in [1, TOTAL), cum + freq <= TOTAL */
            uint32_t f = t->fc[2 * (t->base[k] + s)], c = t->fc[2 * (t->base[k] + s) + 1];
            if (f < 1 || f >= TOTAL || c > TOTAL - f) {
                PyErr_Format(PyExc_ValueError, "table %zd: symbol %u has freq %u, cum %u", k, s, f, c);
                return -1;
            }
        }
    }
    return 0;
}

/* Per stream: symbol count, lane count and (decode) word count, each int64; checks they add up to the
 * concatenated arrays' lengths and that the lane counts make sense. */
static int layout_check(const int64_t *counts, const int64_t *lanes, Py_ssize_t streams, Py_ssize_t symbols,
                        Py_ssize_t states) {
    int64_t n = 0, l = 0;
    for (Py_ssize_t k = 0; k < streams; k++) {
        if (counts[k] < 0 || lanes[k] < 0 || lanes[k] > counts[k] || (counts[k] > 0 && lanes[k] == 0)) {
            PyErr_Format(PyExc_ValueError, "stream %zd: %lld lanes for %lld symbols", k, (long long)lanes[k],
                         (long long)counts[k]);
            return -1;
        }
        n += counts[k];
        l += lanes[k];
    }
    if (n != symbols || l != states) {
        PyErr_SetString(PyExc_ValueError, "symbol or lane counts do not add up to the arrays");
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ decode */

#define SEARCH_NAME "kvcli.codecs._ans.Search"
#define BLOCK_ALIGN 64

/* The decoder's search tables, built once per set of frequency tables (search(): a capsule that the decode
 * functions take, so that a file's tables are built when it is opened, not per batch; 206 tables of a version 4
 * file took 0.5 ms per batch). Each table is one block: per bucket of 2^(16 - bits) slots the symbol that holds
 * the bucket's first slot (uint16), then the cumulative frequencies with TOTAL appended (size + 1 uint32). A
 * slot's symbol is its bucket's or a later one, found by a forward search that rarely takes a step. 2^12 buckets
 * keep a table at 8 KiB, so a segment's one table per class stays in cache (a 2^16-entry slot table per class,
 * 128 KiB, did not, and its misses took half the decoder's time). Where each symbol of a class takes one of
 * several tables (kvq version 4: a table per band), 2^11 buckets decoded faster: 5-11% less time for version 4
 * streams, where version 3's took 4-6% more (the same streams timed batch by batch against each build, one
 * process). */
typedef struct {
    Py_ssize_t count;
    int bits;
    const uint8_t **block;
    uint8_t *arena;
} Search;

static size_t block_bytes(int bits, uint32_t size) {
    return ((sizeof(uint16_t) << bits) + (size + 1) * sizeof(uint32_t) + BLOCK_ALIGN - 1) / BLOCK_ALIGN * BLOCK_ALIGN;
}

static void search_free(Search *q) {
    if (!q) return;
    PyMem_RawFree(q->block), PyMem_RawFree(q->arena), PyMem_RawFree(q);
}

static void search_destroy(PyObject *capsule) { search_free(PyCapsule_GetPointer(capsule, SEARCH_NAME)); }

/* From tables that tables_get checked, each checked here to be contiguous and to sum to TOTAL. */
static Search *search_build(const Tables *t, int bits) {
    const uint32_t buckets = 1u << bits, shift = PRECISION_BITS - bits;
    size_t bytes = 0;
    for (Py_ssize_t k = 0; k < t->count; k++) bytes += block_bytes(bits, t->size[k]);
    Search *q = PyMem_RawCalloc(1, sizeof(Search));
    if (q) {
        q->count = t->count;
        q->bits = bits;
        q->block = PyMem_RawMalloc((size_t)t->count * sizeof(*q->block) + 1);
        q->arena = PyMem_RawMalloc(bytes + BLOCK_ALIGN);
    }
    if (!q || !q->block || !q->arena) {
        search_free(q);
        PyErr_NoMemory();
        return NULL;
    }
    uint8_t *at = q->arena + (BLOCK_ALIGN - (uintptr_t)q->arena % BLOCK_ALIGN) % BLOCK_ALIGN;
    for (Py_ssize_t k = 0; k < t->count; k++) {
        uint16_t *bucket = (uint16_t *)at;
        uint32_t *c = (uint32_t *)(bucket + buckets), end = 0;
        q->block[k] = at;
        for (uint32_t s = 0; s < t->size[k]; s++) {
            uint32_t f = t->fc[2 * (t->base[k] + s)];
            if (t->fc[2 * (t->base[k] + s) + 1] != end) {
                PyErr_Format(PyExc_ValueError, "table %zd: cum of symbol %u is %u, not %u", k, s,
                             t->fc[2 * (t->base[k] + s) + 1], end);
                search_free(q);
                return NULL;
            }
            c[s] = end;
            /* the buckets whose first slot lies in [end, end + f) */
            uint32_t b = (end + (1u << shift) - 1) >> shift;
            for (; b < buckets && b << shift < end + f; b++) bucket[b] = (uint16_t)s;
            end += f;
        }
        if (end != TOTAL) {
            PyErr_Format(PyExc_ValueError, "table %zd sums to %u", k, end);
            search_free(q);
            return NULL;
        }
        c[t->size[k]] = TOTAL;
        at += block_bytes(bits, t->size[k]);
    }
    return q;
}

PyDoc_STRVAR(search_doc,
             "search(fc, base, size, bits) -> capsule\n\n"
             "The decoder's search tables of these frequency tables, 2^bits buckets each (bits 11 or 12), which decode\n"
             "and decode_banded take. A table whose cumulative frequencies are not contiguous or do not sum to 2^16 is\n"
             "refused (ValueError).");

static PyObject *search(PyObject *self, PyObject *args) {
    PyObject *o[3], *result = NULL;
    View v[3] = {{0}};
    Tables t;
    int bits;
    if (!PyArg_ParseTuple(args, "OOOi", &o[0], &o[1], &o[2], &bits)) return NULL;
    if (bits != 11 && bits != 12) {
        PyErr_SetString(PyExc_ValueError, "search: 11 or 12 bucket bits");
        return NULL;
    }
    if (view_get(o[0], &v[0], 0, 8, "fc") || view_get(o[1], &v[1], 0, 4, "base") ||
        view_get(o[2], &v[2], 0, 4, "size") || tables_get(&v[0], &v[1], &v[2], &t))
        goto done;
    Search *q = search_build(&t, bits);
    if (q && !(result = PyCapsule_New(q, SEARCH_NAME, search_destroy))) search_free(q);
done:
    for (int i = 0; i < 3; i++) view_release(&v[i]);
    return result;
}

/* One lane's symbol under a table's block of 2^bits buckets (a constant where it inlines), its state advanced:
 * the spec's decode step. */
static inline __attribute__((always_inline)) uint16_t decode_symbol(uint32_t *restrict x, const uint8_t *block,
                                                                    const int bits) {
    const uint16_t *bucket = (const uint16_t *)block;
    const uint32_t *c = (const uint32_t *)(bucket + (1u << bits));
    uint32_t v = *x, slot = v & WORD_MASK;
    uint32_t s = bucket[slot >> (PRECISION_BITS - bits)];
    while (c[s + 1] <= slot) s++;  /* c[size] = TOTAL ends it inside the table */
    *x = (c[s + 1] - c[s]) * (v >> WORD_BITS) + slot - c[s];
    return (uint16_t)s;
}

/* A step's renormalizing pass: only the word pointer is serial, so it is branch-free (about one symbol in four
 * renormalizes, at random). A read past the stream's words counts but reads 0, as the GPU kernel does; the
 * caller refuses the stream for it. The word array's spare word keeps the load in bounds. */
static inline __attribute__((always_inline)) void renormalize(uint32_t *restrict x, int64_t end,
                                                              const uint16_t *restrict words, int64_t n_words,
                                                              int64_t *p) {
    int64_t at = *p;
    for (int64_t j = 0; j < end; j++) {
        uint32_t v = x[j], need = v < STATE_LOW, inside = at < n_words;
        uint32_t w = words[inside ? at : n_words] & -inside;
        x[j] = (v << (need * WORD_BITS)) | (w & -need);
        at += need;
    }
    *p = at;
}

/* A stream's end: the words it read, and how many lanes are not back at 2^16 (the stream is valid at 0). */
static inline void finish_stream(const uint32_t *x, int64_t lanes, int64_t p, int64_t *read, int64_t *bad) {
    int64_t off = 0;
    for (int64_t j = 0; j < lanes; j++) off += x[j] != STATE_LOW;
    *read = p;
    *bad = off;
}

/* The arguments every decode function shares after its tables (counts ... bad, 8 of them), checked. */
enum { COUNTS, LANES, STATES, WORDS, NWORDS, OUT, READ, BAD, NSTREAM };

typedef struct {
    View v[NSTREAM];
    Py_ssize_t streams;
} Streams;

static int streams_get(PyObject *const *o, Streams *s, const char *what) {
    static const Py_ssize_t item[NSTREAM] = {8, 8, 4, 2, 8, 2, 8, 8};
    static const int writable[NSTREAM] = {0, 0, 1, 0, 0, 1, 1, 1};
    static const char *names[NSTREAM] = {"counts", "lanes", "states", "words", "n_words", "out", "read", "bad"};
    for (int i = 0; i < NSTREAM; i++)
        if (view_get(o[i], &s->v[i], writable[i], item[i], names[i])) return -1;
    const int64_t *counts = DATA(s->v[COUNTS], int64_t), *n_words = DATA(s->v[NWORDS], int64_t);
    s->streams = ITEMS(s->v[COUNTS], int64_t);
    if (ITEMS(s->v[LANES], int64_t) != s->streams || ITEMS(s->v[NWORDS], int64_t) != s->streams ||
        ITEMS(s->v[READ], int64_t) != s->streams || ITEMS(s->v[BAD], int64_t) != s->streams) {
        PyErr_Format(PyExc_ValueError, "%s: array sizes disagree", what);
        return -1;
    }
    if (layout_check(counts, DATA(s->v[LANES], int64_t), s->streams, ITEMS(s->v[OUT], uint16_t),
                     ITEMS(s->v[STATES], uint32_t)))
        return -1;
    int64_t w = 0;
    for (Py_ssize_t k = 0; k < s->streams; k++) {
        if (n_words[k] < 0 || n_words[k] > counts[k]) {  /* at most one word per symbol */
            PyErr_Format(PyExc_ValueError, "%s: stream %zd has %lld words", what, k, (long long)n_words[k]);
            return -1;
        }
        w += n_words[k];
    }
    if (w + 1 != ITEMS(s->v[WORDS], uint16_t)) {
        PyErr_Format(PyExc_ValueError, "%s: the word array is not every stream's words and one spare", what);
        return -1;
    }
    return 0;
}

static void streams_release(Streams *s) {
    for (int i = 0; i < NSTREAM; i++) view_release(&s->v[i]);
}

static const Search *search_of(PyObject *capsule) {
    return PyCapsule_GetPointer(capsule, SEARCH_NAME);  /* sets an exception for anything but search()'s */
}

/* One stream; its symbols' tables are runs (run_table, run_length), checked by the caller to cover exactly the
 * stream's n symbols with tables that exist. */
static inline __attribute__((always_inline)) void decode_stream_bits(
    const Search *q, const uint16_t *restrict run_table, const int64_t *restrict run_length, int64_t n,
    int64_t lanes, uint32_t *restrict x, const uint16_t *restrict words, int64_t n_words, uint16_t *restrict out,
    int64_t *read, int64_t *bad, const int bits) {
    const uint8_t *block = NULL;
    int64_t p = 0, r = 0, run_end = 0;
    for (int64_t t0 = 0; t0 < n; t0 += lanes) {
        int64_t end = n - t0 < lanes ? n - t0 : lanes;
        /* The spec's two passes. Decoding, lanes are independent, so the CPU overlaps them ... */
        for (int64_t j = 0; j < end; j++) {
            while (t0 + j >= run_end) {  /* a step crosses into the next group's table at most a few times */
                block = q->block[run_table[r]];
                run_end += run_length[r++];
            }
            out[t0 + j] = decode_symbol(x + j, block, bits);
        }
        renormalize(x, end, words, n_words, &p);  /* ... and renormalizing */
    }
    finish_stream(x, lanes, p, read, bad);
}

__attribute__((noinline)) static void decode_stream(const Search *q, const uint16_t *run_table,
                                                   const int64_t *run_length, int64_t n, int64_t lanes, uint32_t *x,
                                                   const uint16_t *words, int64_t n_words, uint16_t *out,
                                                   int64_t *read, int64_t *bad) {
    if (q->bits == 11)
        decode_stream_bits(q, run_table, run_length, n, lanes, x, words, n_words, out, read, bad, 11);
    else
        decode_stream_bits(q, run_table, run_length, n, lanes, x, words, n_words, out, read, bad, 12);
}

PyDoc_STRVAR(decode_doc,
             "decode(search, run_tables, run_lengths, runs, counts, lanes, states, words, n_words, out, read, bad)\n\n"
             "Decode every stream into out (uint16 symbols) with search()'s tables. The symbols' tables as runs:\n"
             "run_tables (uint16) and run_lengths (int64), runs[k] (int64) of them for stream k, adding up to its\n"
             "count; words: every stream's words and one spare word at the end; counts, lanes, n_words: int64 per\n"
             "stream; states: uint32, overwritten with the final states; read, bad: int64 per stream, set to the words\n"
             "read and the lanes not back at 2^16.");

static PyObject *decode(PyObject *self, PyObject *args) {
    enum { SEARCH, RTAB, RLEN, RUNS, N = RUNS + 1 + NSTREAM };
    PyObject *o[N];
    View v[RUNS + 1] = {{0}};
    Streams st = {{{0}}};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &o[11]))
        return NULL;
    const Search *q = search_of(o[SEARCH]);
    if (!q || view_get(o[RTAB], &v[RTAB], 0, 2, "run_tables") || view_get(o[RLEN], &v[RLEN], 0, 8, "run_lengths") ||
        view_get(o[RUNS], &v[RUNS], 0, 8, "runs") || streams_get(o + RUNS + 1, &st, "decode"))
        goto done;
    const int64_t *counts = DATA(st.v[COUNTS], int64_t), *runs = DATA(v[RUNS], int64_t),
                  *run_length = DATA(v[RLEN], int64_t);
    const uint16_t *run_table = DATA(v[RTAB], uint16_t);
    if (ITEMS(v[RUNS], int64_t) != st.streams || ITEMS(v[RLEN], int64_t) != ITEMS(v[RTAB], uint16_t)) {
        PyErr_SetString(PyExc_ValueError, "decode: array sizes disagree");
        goto done;
    }
    int64_t r = 0;
    for (Py_ssize_t k = 0; k < st.streams; k++) {
        int64_t covered = 0;  /* the runs cover the stream's symbols exactly, with tables that exist */
        if (runs[k] < 0 || runs[k] > ITEMS(v[RTAB], uint16_t) - r) goto bad_runs;
        for (int64_t e = r + runs[k]; r < e; r++) {
            if (run_length[r] < 0 || run_length[r] > counts[k] - covered || run_table[r] >= q->count) goto bad_runs;
            covered += run_length[r];
        }
        if (covered != counts[k]) {
        bad_runs:
            PyErr_Format(PyExc_ValueError, "decode: stream %zd: its table runs do not cover its symbols with tables "
                         "that exist", k);
            goto done;
        }
    }
    if (r != ITEMS(v[RTAB], uint16_t)) {
        PyErr_SetString(PyExc_ValueError, "decode: runs left over after the last stream");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint16_t *words = DATA(st.v[WORDS], uint16_t);
    uint32_t *x = DATA(st.v[STATES], uint32_t);
    uint16_t *out = DATA(st.v[OUT], uint16_t);
    const int64_t *lanes = DATA(st.v[LANES], int64_t), *n_words = DATA(st.v[NWORDS], int64_t);
    for (Py_ssize_t k = 0; k < st.streams; k++) {
        decode_stream(q, run_table, run_length, counts[k], lanes[k], x, words, n_words[k], out,
                      DATA(st.v[READ], int64_t) + k, DATA(st.v[BAD], int64_t) + k);
        run_table += runs[k], run_length += runs[k];
        out += counts[k], x += lanes[k], words += n_words[k];
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i <= RUNS; i++) view_release(&v[i]);
    streams_release(&st);
    return result;
}

/* ------------------------------------------------------------------------------------------ kvq version 4 */

/* kvq version 4's tables per (class, band) (docs/codec.md, "Version 4"). A segment's symbols take their tables
 * from its layout (spec and rows as for expand: per group (table, channels, K, m), then the groups' channels as
 * flat head * dim + channel indices), the bands (heads, tokens) of its coded tokens, and lut: the table of
 * (class - MIN_CLASS) * BANDS + band, NO_TABLE where the file has none, with lut_rows[k] the first entry of table
 * k's class. Tuple u of a channel of head h takes lut[lut_rows[its group's table] + bands[h][u * m]]. All the
 * channels of one head in a group (consecutive: a group's channels ascend) share that row of tables, so the
 * coder builds it once per (group, head) block, not per symbol. */
#define BANDS 9
#define NO_TABLE 0xFFFF

typedef struct {
    const int64_t *spec, *rows;
    const uint8_t *bands;
    int64_t groups, channels, tokens, heads, dim;
} Banded;

typedef struct {
    const uint16_t *lut;
    const int64_t *lut_rows;
} BandTables;

/* One (group, head) block of consecutive channels, and (decoder) its row of tables. */
typedef struct {
    int64_t group, head, channels, per;
    const uint8_t *const *row;
} Block;

/* A segment's blocks in symbol order (at most one per channel); returns their count. */
static int64_t blocks_of(const Banded *s, Block *blocks) {
    int64_t nb = 0, c = 0;
    for (int64_t g = 0; g < s->groups; g++) {
        const int64_t m = s->spec[4 * g + 3], per = (s->tokens + m - 1) / m;
        for (int64_t end = c + s->spec[4 * g + 1]; c < end; c++) {
            const int64_t h = s->rows[c] / s->dim;
            if (nb && blocks[nb - 1].group == g && blocks[nb - 1].head == h)
                blocks[nb - 1].channels++;
            else
                blocks[nb++] = (Block){g, h, 1, per, NULL};
        }
    }
    return nb;
}

/* A block's tables, tuple by tuple, into row; -1, or the lut entry of a (class, band) without a table. */
static int64_t block_tables(const BandTables *bt, const Banded *s, const Block *b, uint16_t *row) {
    const int64_t *e = s->spec + 4 * b->group, lut_row = bt->lut_rows[e[0]];
    const uint8_t *band = s->bands + b->head * s->tokens;
    for (int64_t u = 0; u < b->per; u++) {
        const int64_t at = lut_row + band[u * e[3]];
        if ((row[u] = bt->lut[at]) == NO_TABLE) return at;
    }
    return -1;
}

/* Everything decode_banded and table_ids index with, checked before the GIL is released: the segment's groups,
 * channels and bands inside their arrays (advancing *spec, *rows, *bands past them), every group's table and
 * tuple length, every channel inside (heads, dim), every band below BANDS. Returns the segment's symbols, or -1
 * with an exception. */
static int64_t banded_get(const int64_t *shape, const View *spec, const View *rows, const View *bands,
                          Py_ssize_t *at_spec, Py_ssize_t *at_rows, Py_ssize_t *at_bands, Py_ssize_t tables,
                          const int64_t *lut_rows, Py_ssize_t lut_len, Banded *s) {
    *s = (Banded){NULL, NULL, NULL, shape[0], shape[1], shape[2], shape[3], shape[4]};
    int64_t n = 0, channels = 0;
    if (s->groups < 0 || s->channels < 0 || s->tokens < 0 || s->heads < 0 || s->dim < 1 ||
        s->groups > (ITEMS(*spec, int64_t) - 4 * *at_spec) / 4 || s->channels > ITEMS(*rows, int64_t) - *at_rows ||
        s->heads > (1 << 20) || s->tokens > (1 << 30) || s->heads * s->tokens > ITEMS(*bands, uint8_t) - *at_bands)
        goto bad;
    s->spec = DATA(*spec, int64_t) + 4 * *at_spec;
    s->rows = DATA(*rows, int64_t) + *at_rows;
    s->bands = DATA(*bands, uint8_t) + *at_bands;
    for (int64_t g = 0; g < s->groups; g++) {
        const int64_t *e = s->spec + 4 * g;
        if (e[0] < 0 || e[0] >= tables || lut_rows[e[0]] < 0 || lut_rows[e[0]] > lut_len - BANDS || e[1] < 0 ||
            e[1] > s->channels - channels || !tuple_shape_ok(e[2], e[3]))
            goto bad;
        channels += e[1];
        n += e[1] * ((s->tokens + e[3] - 1) / e[3]);
    }
    if (channels != s->channels) goto bad;
    for (int64_t c = 0; c < s->channels; c++)
        if (s->rows[c] < 0 || s->rows[c] / s->dim >= s->heads) goto bad;
    for (int64_t i = 0; i < s->heads * s->tokens; i++)
        if (s->bands[i] >= BANDS) goto bad;
    *at_spec += s->groups, *at_rows += s->channels, *at_bands += s->heads * s->tokens;
    return n;
bad:
    PyErr_SetString(PyExc_ValueError, "banded layout: groups, channels or bands do not match the arrays");
    return -1;
}

/* The lut and its rows: every entry a table that exists or NO_TABLE. */
static int band_tables_get(const View *lut, const View *lut_rows, Py_ssize_t tables, BandTables *bt) {
    bt->lut = DATA(*lut, uint16_t);
    bt->lut_rows = DATA(*lut_rows, int64_t);
    if (ITEMS(*lut_rows, int64_t) != tables) {
        PyErr_SetString(PyExc_ValueError, "lut_rows must have one entry per table");
        return -1;
    }
    for (Py_ssize_t i = 0; i < ITEMS(*lut, uint16_t); i++)
        if (bt->lut[i] >= tables && bt->lut[i] != NO_TABLE) {
            PyErr_SetString(PyExc_ValueError, "lut names a table that does not exist");
            return -1;
        }
    return 0;
}

/* The spec's two passes per step, as decode_stream, with the table of symbol i from its channel's row (blocks
 * built): a step's lanes hold consecutive symbols, so those of one channel take consecutive entries of its row. */
static inline __attribute__((always_inline)) void decode_steps_banded(const Block *blocks, int64_t n, int64_t lanes,
                                                                      uint32_t *restrict x,
                                                                      const uint16_t *restrict words, int64_t n_words,
                                                                      uint16_t *restrict out, int64_t *read,
                                                                      int64_t *bad, const int bits) {
    const Block *block = blocks - 1;
    const uint8_t *const *row = NULL;
    int64_t p = 0, left = 0, start = 0, chan_end = 0;
    for (int64_t t0 = 0; t0 < n; t0 += lanes) {
        const int64_t end = n - t0 < lanes ? n - t0 : lanes;
        for (int64_t j = 0; j < end;) {
            while (t0 + j >= chan_end) {  /* the next channel: of this block, or the first of the next */
                if (!left) left = (++block)->channels;
                left--;
                row = block->row;
                start = chan_end;
                chan_end += block->per;
            }
            const int64_t stop = chan_end - t0 < end ? chan_end - t0 : end;
            const uint8_t *const *tables = row + (t0 + j - start);
            for (int64_t k = 0; k < stop - j; k++) out[t0 + j + k] = decode_symbol(x + j + k, tables[k], bits);
            j = stop;
        }
        renormalize(x, end, words, n_words, &p);
    }
    finish_stream(x, lanes, p, read, bad);
}

/* One stream of a banded segment. Each block's row of tables is built first (ids: scratch for a row; rows:
 * scratch for every block's row of table blocks); a (class, band) without a table leaves the stream undecoded
 * and *missing its lut entry. */
__attribute__((noinline)) static void decode_stream_banded(const Search *q, const BandTables *bt, const Banded *s,
                                                          Block *blocks, uint16_t *ids, const uint8_t **rows,
                                                          int64_t n, int64_t lanes, uint32_t *x,
                                                          const uint16_t *words, int64_t n_words, uint16_t *out,
                                                          int64_t *read, int64_t *bad, int64_t *missing) {
    const int64_t nb = blocks_of(s, blocks);
    const uint8_t **at = rows;
    *missing = -1, *read = -1, *bad = 0;
    for (int64_t b = 0; b < nb; b++) {
        if ((*missing = block_tables(bt, s, blocks + b, ids)) >= 0) return;
        for (int64_t u = 0; u < blocks[b].per; u++) at[u] = q->block[ids[u]];
        blocks[b].row = at;
        at += blocks[b].per;
    }
    if (q->bits == 11)
        decode_steps_banded(blocks, n, lanes, x, words, n_words, out, read, bad, 11);
    else
        decode_steps_banded(blocks, n, lanes, x, words, n_words, out, read, bad, 12);
}

/* The tables of one banded segment's symbols, block by block (the first channel of a block computes the row, the
 * others copy it); -1, or the lut entry of a (class, band) without a table. */
static int64_t banded_ids(const BandTables *bt, const Banded *s, Block *blocks, uint16_t *ids) {
    const int64_t nb = blocks_of(s, blocks);
    for (int64_t b = 0; b < nb; b++) {
        const int64_t missing = block_tables(bt, s, blocks + b, ids);
        if (missing >= 0) return missing;
        for (int64_t c = 1; c < blocks[b].channels; c++) memcpy(ids + c * blocks[b].per, ids, blocks[b].per * 2);
        ids += blocks[b].channels * blocks[b].per;
    }
    return -1;
}

PyDoc_STRVAR(decode_banded_doc,
             "decode_banded(search, lut, lut_rows, spec, rows, bands, shape, counts, lanes, states, words, n_words, out,\n"
             "              read, bad, missing)\n\n"
             "decode for kvq version 4 segments, each symbol's table from its segment's layout and bands: shape (int64,\n"
             "per stream: groups, channels, tokens, heads, dim) says how many of spec (int64, 4 per group), rows\n"
             "(int64) and bands (uint8, heads * tokens) are each stream's; lut (uint16) the table of (class - MIN_CLASS)\n"
             "* 9 + band, 0xFFFF for none; lut_rows (int64, per table) the first lut entry of its class. missing (int64\n"
             "per stream): -1, or the lut entry of a (class, band) that the stream uses and that has no table (it is\n"
             "then not decoded). The other arguments are decode's.");

static PyObject *decode_banded(PyObject *self, PyObject *args) {
    enum { SEARCH, LUT, LUT_ROWS, SPEC, ROWS, BANDS_, SHAPE, FIRST, MISSING = FIRST + NSTREAM, N };
    PyObject *o[N];
    View v[N] = {{0}};
    Streams st = {{{0}}};
    Block *blocks = NULL;
    uint16_t *ids = NULL;
    const uint8_t **rows = NULL;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8],
                          &o[9], &o[10], &o[11], &o[12], &o[13], &o[14], &o[15]))
        return NULL;
    static const Py_ssize_t item[FIRST] = {0, 2, 8, 8, 8, 1, 8};
    static const char *names[FIRST] = {"", "lut", "lut_rows", "spec", "rows", "bands", "shape"};
    const Search *q = search_of(o[SEARCH]);
    if (!q) goto done;
    for (int i = LUT; i < FIRST; i++)
        if (view_get(o[i], &v[i], 0, item[i], names[i])) goto done;
    if (view_get(o[MISSING], &v[MISSING], 1, 8, "missing") || streams_get(o + FIRST, &st, "decode_banded")) goto done;
    BandTables bt;
    if (band_tables_get(&v[LUT], &v[LUT_ROWS], q->count, &bt)) goto done;
    if (ITEMS(v[SHAPE], int64_t) != 5 * st.streams || ITEMS(v[MISSING], int64_t) != st.streams) {
        PyErr_SetString(PyExc_ValueError, "decode_banded: one shape and one missing entry per stream");
        goto done;
    }
    const int64_t *shape = DATA(v[SHAPE], int64_t), *counts = DATA(st.v[COUNTS], int64_t);
    Py_ssize_t at_spec = 0, at_rows = 0, at_bands = 0;
    int64_t most_channels = 1, most_rows = 1, most_tokens = 1;
    for (Py_ssize_t k = 0; k < st.streams; k++) {
        Banded s;
        int64_t n = banded_get(shape + 5 * k, &v[SPEC], &v[ROWS], &v[BANDS_], &at_spec, &at_rows, &at_bands,
                               q->count, bt.lut_rows, ITEMS(v[LUT], uint16_t), &s);
        if (n < 0) goto done;
        if (n != counts[k]) {
            PyErr_Format(PyExc_ValueError, "decode_banded: stream %zd's layout has %lld symbols, not %lld", k,
                         (long long)n, (long long)counts[k]);
            goto done;
        }
        int64_t row_entries = 0, c = 0;  /* the blocks' rows, walked as blocks_of walks them */
        for (int64_t g = 0; g < s.groups; g++) {
            const int64_t *e = s.spec + 4 * g;
            for (int64_t end = c + e[1], head = -1; c < end; c++)
                if (s.rows[c] / s.dim != head) {
                    head = s.rows[c] / s.dim;
                    row_entries += (s.tokens + e[3] - 1) / e[3];
                }
        }
        most_channels = s.channels > most_channels ? s.channels : most_channels;
        most_rows = row_entries > most_rows ? row_entries : most_rows;
        most_tokens = s.tokens > most_tokens ? s.tokens : most_tokens;
    }
    if (4 * at_spec != ITEMS(v[SPEC], int64_t) || at_rows != ITEMS(v[ROWS], int64_t) ||
        at_bands != ITEMS(v[BANDS_], uint8_t)) {
        PyErr_SetString(PyExc_ValueError, "decode_banded: spec, rows or bands left over after the last stream");
        goto done;
    }
    blocks = PyMem_RawMalloc((size_t)most_channels * sizeof(Block));
    ids = PyMem_RawMalloc((size_t)most_tokens * sizeof(uint16_t));
    rows = PyMem_RawMalloc((size_t)most_rows * sizeof(*rows));
    if (!blocks || !ids || !rows) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const uint16_t *words = DATA(st.v[WORDS], uint16_t);
    uint32_t *x = DATA(st.v[STATES], uint32_t);
    uint16_t *out = DATA(st.v[OUT], uint16_t);
    const int64_t *lanes = DATA(st.v[LANES], int64_t), *n_words = DATA(st.v[NWORDS], int64_t);
    Py_ssize_t at_s = 0, at_r = 0, at_b = 0;
    for (Py_ssize_t k = 0; k < st.streams; k++) {
        const int64_t *sh = shape + 5 * k;
        const Banded s = {DATA(v[SPEC], int64_t) + 4 * at_s, DATA(v[ROWS], int64_t) + at_r,
                          DATA(v[BANDS_], uint8_t) + at_b, sh[0], sh[1], sh[2], sh[3], sh[4]};
        decode_stream_banded(q, &bt, &s, blocks, ids, rows, counts[k], lanes[k], x, words, n_words[k], out,
                             DATA(st.v[READ], int64_t) + k, DATA(st.v[BAD], int64_t) + k,
                             DATA(v[MISSING], int64_t) + k);
        at_s += sh[0], at_r += sh[1], at_b += sh[3] * sh[2];
        out += counts[k], x += lanes[k], words += n_words[k];
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_RawFree(blocks), PyMem_RawFree(ids), PyMem_RawFree(rows);
    for (int i = 0; i < N; i++) view_release(&v[i]);
    streams_release(&st);
    return result;
}

PyDoc_STRVAR(table_ids_doc,
             "table_ids(lut, lut_rows, spec, rows, bands, shape, out) -> int\n\n"
             "kvq version 4: the table of every symbol of one segment (out, uint16), as decode_banded takes them (the\n"
             "arguments are its, for one stream; lut_rows' length is the table count). Returns -1, or the lut entry of\n"
             "a (class, band) without a table that a symbol uses.");

static PyObject *table_ids(PyObject *self, PyObject *args) {
    enum { LUT, LUT_ROWS, SPEC, ROWS, BANDS_, SHAPE, OUT, N };
    PyObject *o[N];
    View v[N] = {{0}};
    Block *blocks = NULL;
    PyObject *result = NULL;
    static const Py_ssize_t item[N] = {2, 8, 8, 8, 1, 8, 2};
    static const char *names[N] = {"lut", "lut_rows", "spec", "rows", "bands", "shape", "out"};
    if (!PyArg_ParseTuple(args, "OOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6])) return NULL;
    for (int i = 0; i < N; i++)
        if (view_get(o[i], &v[i], i == OUT, item[i], names[i])) goto done;
    BandTables bt;
    Banded s;
    Py_ssize_t at_spec = 0, at_rows = 0, at_bands = 0, tables = ITEMS(v[LUT_ROWS], int64_t);
    if (band_tables_get(&v[LUT], &v[LUT_ROWS], tables, &bt)) goto done;
    if (ITEMS(v[SHAPE], int64_t) != 5) {
        PyErr_SetString(PyExc_ValueError, "table_ids: shape is one segment's");
        goto done;
    }
    int64_t n = banded_get(DATA(v[SHAPE], int64_t), &v[SPEC], &v[ROWS], &v[BANDS_], &at_spec, &at_rows, &at_bands,
                           tables, bt.lut_rows, ITEMS(v[LUT], uint16_t), &s);
    if (n < 0) goto done;
    if (n != ITEMS(v[OUT], uint16_t)) {
        PyErr_SetString(PyExc_ValueError, "table_ids: out must have one entry per symbol");
        goto done;
    }
    if (!(blocks = PyMem_RawMalloc((size_t)(s.channels + 1) * sizeof(Block)))) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t missing;
    Py_BEGIN_ALLOW_THREADS
    missing = banded_ids(&bt, &s, blocks, DATA(v[OUT], uint16_t));
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(missing);
done:
    PyMem_RawFree(blocks);
    for (int i = 0; i < N; i++) view_release(&v[i]);
    return result;
}

/* ------------------------------------------------------------------------------------------ encode */

/* Codes lane j's symbols from the last step to the first (ANS is a stack); the words go backwards from
 * `top`, so that they end up in step order and, within a step, in ascending lane order. Returns the number
 * of words, or -1 for a table index or symbol out of range. */
__attribute__((noinline)) static int64_t encode_stream(const Tables *t, const int32_t *sym, const uint16_t *ids, int64_t n, int64_t lanes,
                             uint32_t *x, uint16_t *top) {
    uint16_t *w = top;
    for (int64_t j = 0; j < lanes; j++) x[j] = STATE_LOW;
    if (n == 0) return 0;
    int64_t last = (n - 1) / lanes * lanes;
    for (int64_t t0 = last; t0 >= 0; t0 -= lanes) {
        int64_t end = n - t0 < lanes ? n - t0 : lanes;
        for (int64_t j = end - 1; j >= 0; j--) {
            uint32_t k = ids[t0 + j];
            int32_t s = sym[t0 + j];
            if (k >= (uint32_t)t->count || s < 0 || (uint32_t)s >= t->size[k]) return -1;
            const uint32_t *e = t->fc + 2 * (t->base[k] + (uint32_t)s);
            uint32_t v = x[j], f = e[0];
            if (v >= f << WORD_BITS) {
                *--w = (uint16_t)(v & WORD_MASK);
                v >>= WORD_BITS;
            }
            x[j] = ((v / f) << WORD_BITS) + v % f + e[1];
        }
    }
    return top - w;
}

PyDoc_STRVAR(encode_doc,
             "encode(fc, base, size, symbols, ids, counts, lanes, states, words, n_words)\n\n"
             "Encode every stream. symbols: int32; ids: uint16 table per symbol; counts, lanes: int64 per stream.\n"
             "Fills states (uint32, per lane) and n_words (int64 per stream); stream k's words (uint16) are the\n"
             "last n_words[k] of its slice of `words`, which is as long as `symbols` (one slice per stream).");

static PyObject *encode(PyObject *self, PyObject *args) {
    PyObject *o[10];
    View v[10] = {{0}};
    static const Py_ssize_t item[10] = {8, 4, 4, 4, 2, 8, 8, 4, 2, 8};
    static const int writable[10] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1};
    static const char *names[10] = {"fc", "base", "size", "symbols", "ids", "counts", "lanes", "states", "words",
                                    "n_words"};
    Tables t;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9]))
        return NULL;
    for (int i = 0; i < 10; i++)
        if (view_get(o[i], &v[i], writable[i], item[i], names[i])) goto done;
    if (tables_get(&v[0], &v[1], &v[2], &t)) goto done;
    const int64_t *counts = DATA(v[5], int64_t), *lanes = DATA(v[6], int64_t);
    Py_ssize_t streams = ITEMS(v[5], int64_t), n = ITEMS(v[3], int32_t);
    if (ITEMS(v[4], uint16_t) != n || ITEMS(v[8], uint16_t) != n || ITEMS(v[6], int64_t) != streams ||
        ITEMS(v[9], int64_t) != streams) {
        PyErr_SetString(PyExc_ValueError, "encode: array sizes disagree");
        goto done;
    }
    if (layout_check(counts, lanes, streams, n, ITEMS(v[7], uint32_t))) goto done;
    Py_ssize_t bad_stream = -1;
    Py_BEGIN_ALLOW_THREADS
    const int32_t *sym = DATA(v[3], int32_t);
    const uint16_t *ids = DATA(v[4], uint16_t);
    uint32_t *x = DATA(v[7], uint32_t);
    uint16_t *words = DATA(v[8], uint16_t);
    int64_t *n_words = DATA(v[9], int64_t);
    for (Py_ssize_t k = 0; k < streams; k++) {
        n_words[k] = encode_stream(&t, sym, ids, counts[k], lanes[k], x, words + counts[k]);
        if (n_words[k] < 0) {
            bad_stream = k;
            break;
        }
        sym += counts[k], ids += counts[k], words += counts[k], x += lanes[k];
    }
    Py_END_ALLOW_THREADS
    if (bad_stream >= 0) {
        PyErr_Format(PyExc_ValueError, "stream %zd: a table index or symbol out of range", bad_stream);
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (int i = 0; i < 10; i++) view_release(&v[i]);
    return result;
}


/* ------------------------------------------------------------------------------------------ joint symbols */

/* Their layout (Layout, layout_get) and expansion (expand_all) are in _symbols.h: reconstruct expands too. */

PyDoc_STRVAR(count_escapes_doc,
             "count_escapes(symbols, spec, rows, tokens) -> int\n\nThe values a segment's escape symbols stand for: m per escape symbol.");

static PyObject *count_escapes(PyObject *self, PyObject *args) {
    PyObject *o_sym, *o_spec, *o_rows;
    long long tokens;
    View sym = {0}, spec = {0}, rows = {0};
    Layout l;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOL", &o_sym, &o_spec, &o_rows, &tokens)) return NULL;
    if (view_get(o_sym, &sym, 0, 2, "symbols") || view_get(o_spec, &spec, 0, 8, "spec") ||
        view_get(o_rows, &rows, 0, 8, "rows") ||
        layout_get(&spec, &rows, tokens, ITEMS(sym, uint16_t), PY_SSIZE_T_MAX, &l))
        goto done;
    int64_t values = 0;
    Py_BEGIN_ALLOW_THREADS
    const uint16_t *s = DATA(sym, uint16_t);
    for (Py_ssize_t g = 0; g < l.groups; g++) {
        const int64_t *e = l.spec + 4 * g;
        uint32_t esc = escape_symbol(e);
        int64_t n = e[1] * ((tokens + e[3] - 1) / e[3]), hits = 0;
        for (int64_t i = 0; i < n; i++) hits += s[i] == esc;
        values += hits * e[3];
        s += n;
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(values);
done:
    view_release(&sym), view_release(&spec), view_release(&rows);
    return result;
}

PyDoc_STRVAR(expand_doc,
             "expand(symbols, spec, rows, tokens, digits, offsets, escapes, out)\n\n"
             "out (int32, channels x tokens): every group's channels from its joint symbols. digits: int32, the m\n"
             "values of every symbol of every digit table (entropy._digits_table), table t from offsets[t];\n"
             "escapes: int32, exactly the values count_escapes gives, in symbol order.");

static PyObject *expand(PyObject *self, PyObject *args) {
    PyObject *o[8];
    long long tokens;
    View sym = {0}, spec = {0}, rows = {0}, digits = {0}, offsets = {0}, escapes = {0}, out = {0};
    Layout l;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOLOOOO", &o[0], &o[1], &o[2], &tokens, &o[4], &o[5], &o[6], &o[7])) return NULL;
    if (view_get(o[0], &sym, 0, 2, "symbols") || view_get(o[1], &spec, 0, 8, "spec") ||
        view_get(o[2], &rows, 0, 8, "rows") || view_get(o[4], &digits, 0, 4, "digits") ||
        view_get(o[5], &offsets, 0, 8, "offsets") || view_get(o[6], &escapes, 0, 4, "escapes") ||
        view_get(o[7], &out, 1, 4, "out"))
        goto done;
    Py_ssize_t cells = ITEMS(out, int32_t);
    if (tokens <= 0 ? cells != 0 : cells % tokens) {
        PyErr_SetString(PyExc_ValueError, "expand: the output is not whole rows");
        goto done;
    }
    if (expansion_get(&sym, &spec, &rows, tokens, &digits, &offsets, tokens > 0 ? cells / tokens : 0, &l, "expand"))
        goto done;
    int fault;
    Py_BEGIN_ALLOW_THREADS
    fault = expand_all(&l, DATA(sym, uint16_t), DATA(digits, int32_t), DATA(offsets, int64_t),
                       DATA(escapes, int32_t), ITEMS(escapes, int32_t), DATA(out, int32_t));
    Py_END_ALLOW_THREADS
    if (fault) {
        PyErr_SetString(PyExc_ValueError, "expand: a symbol past its alphabet, or escapes not count_escapes' count");
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    view_release(&sym), view_release(&spec), view_release(&rows), view_release(&digits), view_release(&offsets),
        view_release(&escapes), view_release(&out);
    return result;
}

/* The inverse, for the encoder: m consecutive tokens of a channel as one joint symbol, sum over j of
 * (v_j + K)(2K + 1)^(m - 1 - j), the last tuple padded with zeros; a tuple with any value outside [-K, K]
 * is the escape symbol (2K + 1)^m, and its m values go to `escapes` (when given) at *used. One row of `tokens`
 * int16 or int32 values (wide) into sym. to_tuples, count_tuples and encode_rows all call row_symbols, so
 * they cannot disagree; each (m, wide) is its own copy of the loop, with m a constant. */
/* Tuple i of a row into v, zeros past the row's end. */
static inline __attribute__((always_inline)) void tuple_at(const void *row, const int wide, int64_t tokens,
                                                           const int m, int64_t i, int32_t v[4]) {
    for (int j = 0; j < m; j++)
        v[j] = i * m + j >= tokens ? 0 : wide ? ((const int32_t *)row)[i * m + j] : ((const int16_t *)row)[i * m + j];
}

static inline __attribute__((always_inline)) void row_symbols_of(const void *row, const int wide, int64_t tokens,
                                                                 const int m, int32_t half, uint32_t *restrict sym,
                                                                 int32_t *restrict escapes, int64_t *used) {
    const uint32_t base = 2 * (uint32_t)half + 1;
    uint32_t esc = 1, any = 0;
    for (int j = 0; j < m; j++) esc *= base;
    const int64_t full = tokens / m, per_row = (tokens + m - 1) / m;
    /* Whole tuples without a branch, so that the loop vectorizes; escapes are rare, and their values are
     * collected after. Negative values wrap: one comparison tests both sides of [-K, K]. */
    for (int64_t i = 0; i < full; i++) {
        uint32_t s = 0, out = 0;
        for (int j = 0; j < m; j++) {
            uint32_t d = (uint32_t)((wide ? ((const int32_t *)row)[i * m + j] : ((const int16_t *)row)[i * m + j]) + half);
            out |= d >= base;
            s = s * base + d;
        }
        any |= out;
        sym[i] = out ? esc : s;
    }
    if (full < per_row) {
        int32_t v[4];
        uint32_t s = 0, out = 0;
        tuple_at(row, wide, tokens, m, full, v);
        for (int j = 0; j < m; j++) {
            uint32_t d = (uint32_t)(v[j] + half);
            out |= d >= base;
            s = s * base + d;
        }
        any |= out;
        sym[full] = out ? esc : s;
    }
    if (any && escapes)
        for (int64_t i = 0; i < per_row; i++)
            if (sym[i] == esc) {
                tuple_at(row, wide, tokens, m, i, escapes + *used);
                *used += m;
            }
}

WIDE static void row_symbols(const void *row, int wide, int64_t tokens, int m, int32_t half, uint32_t *sym,
                        int32_t *escapes, int64_t *used) {
    switch (2 * m + wide) {
    case 2: row_symbols_of(row, 0, tokens, 1, half, sym, escapes, used); break;
    case 3: row_symbols_of(row, 1, tokens, 1, half, sym, escapes, used); break;
    case 4: row_symbols_of(row, 0, tokens, 2, half, sym, escapes, used); break;
    case 5: row_symbols_of(row, 1, tokens, 2, half, sym, escapes, used); break;
    case 8: row_symbols_of(row, 0, tokens, 4, half, sym, escapes, used); break;
    case 9: row_symbols_of(row, 1, tokens, 4, half, sym, escapes, used); break;
    default: break; /* no other shape passes tuple_shape_ok */
    }
}

PyDoc_STRVAR(to_tuples_doc,
             "to_tuples(rows, tokens, half, m, symbols, escapes) -> int\n\n"
             "rows: int16 or int32 (n, tokens), C order. Fills symbols (int32, n * ceil(tokens / m)) and the first\n"
             "values of escapes (int32, m per symbol); returns how many escape values it wrote.");

static PyObject *to_tuples(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_sym, *o_esc;
    long long tokens, half, m;
    View rows = {0}, sym = {0}, esc_view = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OLLLOO", &o_rows, &tokens, &half, &m, &o_sym, &o_esc)) return NULL;
    if (PyObject_GetBuffer(o_rows, &rows.buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    rows.held = 1;
    if (view_get(o_sym, &sym, 1, 4, "symbols") || view_get(o_esc, &esc_view, 1, 4, "escapes")) goto done;
    Py_ssize_t item = rows.buf.itemsize;
    if ((item != 2 && item != 4) || tokens < 1 || !tuple_shape_ok(half, m) ||
        rows.buf.len % (item * tokens)) {
        PyErr_SetString(PyExc_ValueError, "to_tuples: rows must be int16 or int32 (n, tokens); 1 <= K <= 255, m 1, 2 or 4");
        goto done;
    }
    int64_t n = rows.buf.len / item / tokens, per_row = (tokens + m - 1) / m;
    if (ITEMS(sym, int32_t) != n * per_row || ITEMS(esc_view, int32_t) != n * per_row * m) {
        PyErr_SetString(PyExc_ValueError, "to_tuples: output sizes do not match the rows");
        goto done;
    }
    uint32_t *buf = PyMem_RawMalloc(per_row * sizeof(uint32_t));
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t used = 0;
    Py_BEGIN_ALLOW_THREADS
    int32_t *symbols = DATA(sym, int32_t), *escapes = DATA(esc_view, int32_t);
    for (int64_t r = 0; r < n; r++) {
        row_symbols((const char *)rows.buf.buf + r * tokens * item, item == 4, tokens, (int)m, (int32_t)half, buf,
                    escapes, &used);
        for (int64_t i = 0; i < per_row; i++) *symbols++ = (int32_t)buf[i];
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    result = PyLong_FromLongLong(used);
done:
    view_release(&rows), view_release(&sym), view_release(&esc_view);
    return result;
}


/* ------------------------------------------------------------------------------------------ channel spread */

/* row_std is in _symbols.h: quantize takes the classes' spread on the way. */

PyDoc_STRVAR(spread_doc,
             "spread(q, tokens, out)\n\nout (float64, one per row): the population standard deviation of each row of q\n"
             "(int32, (rows, tokens), C order), summed exactly in integers.");

static PyObject *spread(PyObject *self, PyObject *args) {
    PyObject *o_q, *o_out;
    long long tokens;
    View q = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OLO", &o_q, &tokens, &o_out)) return NULL;
    if (view_get(o_q, &q, 0, 4, "q") || view_get(o_out, &out, 1, 8, "out")) goto done;
    if (tokens < 1 || ITEMS(q, int32_t) != ITEMS(out, double) * tokens) {
        PyErr_SetString(PyExc_ValueError, "spread: q is not (rows, tokens) for the rows of out");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    const int32_t *v = DATA(q, int32_t);
    double *std = DATA(out, double);
    for (Py_ssize_t r = 0; r < ITEMS(out, double); r++, v += tokens) {
        int32_t lo = 0, hi = 0;
        for (int64_t i = 0; i < tokens; i++) {
            lo = v[i] < lo ? v[i] : lo;
            hi = v[i] > hi ? v[i] : hi;
        }
        std[r] = row_std(v, tokens, lo, hi);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    view_release(&q), view_release(&out);
    return result;
}

/* ------------------------------------------------------------------------------------------ encoder: segments */

PyDoc_STRVAR(count_tuples_doc,
             "count_tuples(rows, tokens, half, m, counts[, bands])\n\n"
             "Adds to counts (int64, (2K + 1)^m + 1) how often each joint symbol of to_tuples(rows, ...) occurs. With\n"
             "bands (uint8, one per value of rows, each below 9; kvq version 4), counts has 9 such rows and each tuple\n"
             "counts in the row of its first token's band.");

static PyObject *count_tuples(PyObject *self, PyObject *args) {
    PyObject *o_rows, *o_counts, *o_bands = Py_None;
    long long tokens, half, m;
    View rows = {0}, cv = {0}, bv = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OLLLO|O", &o_rows, &tokens, &half, &m, &o_counts, &o_bands)) return NULL;
    if (PyObject_GetBuffer(o_rows, &rows.buf, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) goto done;
    rows.held = 1;
    if (view_get(o_counts, &cv, 1, 8, "counts") || (o_bands != Py_None && view_get(o_bands, &bv, 0, 1, "bands")))
        goto done;
    Py_ssize_t item = rows.buf.itemsize;
    if ((item != 2 && item != 4) || tokens < 1 || !tuple_shape_ok(half, m) ||
        rows.buf.len % (item * tokens)) {
        PyErr_SetString(PyExc_ValueError, "count_tuples: rows must be int16 or int32 (n, tokens); 1 <= K <= 255, m 1, 2 or 4");
        goto done;
    }
    uint32_t esc = 1;
    for (int64_t j = 0; j < m; j++) esc *= 2 * (uint32_t)half + 1;
    const int64_t n = rows.buf.len / item / tokens, per_row = (tokens + m - 1) / m;
    const uint8_t *band = bv.held ? DATA(bv, uint8_t) : NULL;
    if (ITEMS(cv, int64_t) != (Py_ssize_t)(esc + 1) * (band ? BANDS : 1)) {
        PyErr_SetString(PyExc_ValueError, "count_tuples: counts must have one entry per symbol of the alphabet (per band)");
        goto done;
    }
    if (band) {
        if (ITEMS(bv, uint8_t) != n * tokens) {
            PyErr_SetString(PyExc_ValueError, "count_tuples: one band per value of rows");
            goto done;
        }
        for (Py_ssize_t i = 0; i < ITEMS(bv, uint8_t); i++)
            if (band[i] >= BANDS) {
                PyErr_SetString(PyExc_ValueError, "count_tuples: a band past the last");
                goto done;
            }
    }
    uint32_t *buf = PyMem_RawMalloc(per_row * sizeof(uint32_t));
    if (!buf) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    int64_t *counts = DATA(cv, int64_t);
    for (int64_t r = 0; r < n; r++) {
        row_symbols((const char *)rows.buf.buf + r * tokens * item, item == 4, tokens, (int)m, (int32_t)half, buf,
                    NULL, NULL);
        if (band) {
            const uint8_t *b = band + r * tokens;
            for (int64_t i = 0; i < per_row; i++) counts[(int64_t)b[i * m] * (esc + 1) + buf[i]]++;
        } else {
            for (int64_t i = 0; i < per_row; i++) counts[buf[i]]++;
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    result = Py_None;
    Py_INCREF(result);
done:
    view_release(&rows), view_release(&cv), view_release(&bv);
    return result;
}

PyDoc_STRVAR(encode_rows_doc,
             "encode_rows(fc, base, size, reciprocals, rows, spec, channels, states, words, escapes[, ids])\n"
             "    -> (words used, escapes used)\n\n"
             "One segment's stream straight from its integers: to_tuples of each group's channels (spec and channels\n"
             "as for expand: per group (table, channels, K, m), int64; the groups' rows of `rows`, int64), the\n"
             "symbols coded as encode() codes one stream, its lane count the length of states. rows: int16 or int32\n"
             "(channels, tokens), rows at any stride, tokens contiguous. words (uint16) has one entry per symbol;\n"
             "the stream's words are its last `words used`. escapes (int32) takes the escaped tuples' values.\n"
             "reciprocals: reciprocals(fc)'s, which replace the coder's divisions. ids (uint16, one per symbol; kvq\n"
             "version 4): each symbol's table, of its group's alphabet, instead of the group's.");

/* Whether a buffer holds native int16 or int32 (struct codes h, i, or l where long has 4 bytes): a float32
 * array has the item size of int32 and would be coded as its bit patterns. */
static int native_signed(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    if (*f == '@' || *f == '=') f++;
    if (f[0] == '\0' || f[1] != '\0') return 0;
    return (f[0] == 'h' && b->itemsize == 2) ||
           ((f[0] == 'i' || (f[0] == 'l' && sizeof(long) == 4)) && b->itemsize == 4);
}

static PyObject *encode_rows(PyObject *self, PyObject *args) {
    PyObject *o[10], *o_ids = Py_None;
    View v[10] = {{0}}, vids = {0};
    Py_buffer rows = {0};
    int rows_held = 0;
    Tables t;
    Layout l;
    uint32_t *sym = NULL;
    const uint32_t **entry = NULL;
    const uint64_t **inverse = NULL;
    int64_t *count = NULL;
    PyObject *result = NULL;
    enum { FC, BASE, SIZE, RCP, ROWS, SPEC, CHANNELS, STATES, WORDS, ESCAPES, N };
    static const Py_ssize_t item[N] = {8, 4, 4, 8, 0, 8, 8, 4, 2, 4};
    static const int writable[N] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 1};
    static const char *names[N] = {"fc", "base", "size", "reciprocals", "", "spec", "channels", "states", "words",
                                   "escapes"};
    if (!PyArg_ParseTuple(args, "OOOOOOOOOO|O", &o[0], &o[1], &o[2], &o[3], &o[4], &o[5], &o[6], &o[7], &o[8], &o[9],
                          &o_ids))
        return NULL;
    for (int i = 0; i < N; i++)
        if (i != ROWS && view_get(o[i], &v[i], writable[i], item[i], names[i])) goto done;
    if (PyObject_GetBuffer(o[ROWS], &rows, PyBUF_STRIDED_RO | PyBUF_FORMAT) < 0) goto done;
    rows_held = 1;
    const Py_ssize_t ri = rows.itemsize;
    /* The stride of an axis of one entry is whatever the exporter chose: never used, never checked. */
    if (rows.ndim != 2 || !native_signed(&rows) || (rows.shape[1] > 1 && rows.strides[1] != ri) ||
        (rows.shape[0] > 1 && rows.strides[0] % ri)) {
        PyErr_SetString(PyExc_ValueError, "encode_rows: rows must be int16 or int32 (channels, tokens), tokens contiguous");
        goto done;
    }
    const int64_t tokens = rows.shape[1], row_stride = rows.shape[0] > 1 ? rows.strides[0] / ri : 0;
    const Py_ssize_t n = ITEMS(v[WORDS], uint16_t), lanes = ITEMS(v[STATES], uint32_t);
    /* Only the tables' shape is checked, not every frequency (that would cost as much as a small segment): with
     * reciprocals for divisions, bad frequencies make a bad stream, never a fault. */
    if (tables_shape(&v[FC], &v[BASE], &v[SIZE], &t) ||
        layout_get(&v[SPEC], &v[CHANNELS], tokens, n, rows.shape[0], &l))
        goto done;
    if (ITEMS(v[RCP], uint64_t) != ITEMS(v[FC], uint64_t)) {
        PyErr_SetString(PyExc_ValueError, "encode_rows: one reciprocal per frequency");
        goto done;
    }
    const uint16_t *ids = NULL;
    if (o_ids != Py_None) {
        if (view_get(o_ids, &vids, 0, 2, "ids")) goto done;
        if (ITEMS(vids, uint16_t) != n) {
            PyErr_SetString(PyExc_ValueError, "encode_rows: one table id per symbol");
            goto done;
        }
        ids = DATA(vids, uint16_t);
        /* each symbol's table must have its group's alphabet: the symbols are formed for the group's */
        Py_ssize_t i = 0;
        for (Py_ssize_t g = 0; g < l.groups; g++) {
            const int64_t *e = l.spec + 4 * g, per = e[1] * ((tokens + e[3] - 1) / e[3]);
            for (int64_t k = 0; k < per; k++, i++)
                if (ids[i] >= t.count || t.size[ids[i]] != escape_symbol(e) + 1) {
                    PyErr_Format(PyExc_ValueError, "encode_rows: symbol %zd's table is not its class's alphabet", i);
                    goto done;
                }
        }
    }
    int64_t escape_room = 0;
    for (Py_ssize_t g = 0; g < l.groups; g++) {
        const int64_t *e = l.spec + 4 * g;
        if (e[0] < 0 || e[0] >= t.count || t.size[e[0]] != escape_symbol(e) + 1) {
            PyErr_Format(PyExc_ValueError, "encode_rows: group %zd's table is not its class's alphabet", g);
            goto done;
        }
        escape_room += e[1] * ((tokens + e[3] - 1) / e[3]) * e[3];
    }
    if (lanes > n || (n > 0 && lanes == 0) || ITEMS(v[ESCAPES], int32_t) < escape_room) {
        PyErr_SetString(PyExc_ValueError, "encode_rows: lanes or escape room do not fit the symbols");
        goto done;
    }
    sym = PyMem_RawMalloc((n ? n : 1) * sizeof(uint32_t));
    entry = PyMem_RawMalloc((l.groups ? l.groups : 1) * sizeof(*entry));
    inverse = PyMem_RawMalloc((l.groups ? l.groups : 1) * sizeof(*inverse));
    count = PyMem_RawMalloc((l.groups ? l.groups : 1) * sizeof(*count));
    if (!sym || !entry || !inverse || !count) {
        PyErr_NoMemory();
        goto done;
    }
    int64_t used = 0, n_words = 0;
    Py_BEGIN_ALLOW_THREADS
    /* The symbols, group after group, channel after channel. */
    uint32_t *s = sym;
    int32_t *escapes = DATA(v[ESCAPES], int32_t);
    const int64_t *channel = l.rows;
    for (Py_ssize_t g = 0; g < l.groups; g++) {
        const int64_t *e = l.spec + 4 * g, per_row = (tokens + e[3] - 1) / e[3];
        entry[g] = t.fc + 2 * (size_t)t.base[e[0]];
        inverse[g] = DATA(v[RCP], uint64_t) + t.base[e[0]];
        count[g] = e[1] * per_row;
        for (int64_t k = 0; k < e[1]; k++, channel++, s += per_row)
            row_symbols((const char *)rows.buf + (size_t)(*channel * row_stride) * ri, ri == 4, tokens, (int)e[3],
                        (int32_t)e[2], s, escapes, &used);
    }
    /* Coded from the last symbol to the first (ANS is a stack): symbol i on lane i mod lanes, as encode_stream. */
    uint32_t *x = DATA(v[STATES], uint32_t);
    uint16_t *top = DATA(v[WORDS], uint16_t) + n, *w = top;
    for (Py_ssize_t j = 0; j < lanes; j++) x[j] = STATE_LOW;
    Py_ssize_t g = l.groups - 1, j = n ? (n - 1) % lanes : 0;
    int64_t start = n;
    const uint32_t *fc = NULL;
    const uint64_t *rcp = NULL;
    for (int64_t i = n - 1; i >= 0; i--) {
        while (i < start) start -= count[g], fc = entry[g], rcp = inverse[g--];
        if (ids) fc = t.fc + 2 * (size_t)t.base[ids[i]], rcp = DATA(v[RCP], uint64_t) + t.base[ids[i]];
        const uint32_t *en = fc + 2 * sym[i];
        const uint64_t r = rcp[sym[i]];
        uint32_t u = x[j], f = en[0];
        if (u >= f << WORD_BITS) {
            *--w = (uint16_t)(u & WORD_MASK);
            u >>= WORD_BITS;
        }
        const uint32_t q = r ? (uint32_t)(((unsigned __int128)u * r) >> 64) : u; /* u / f */
        x[j] = (q << WORD_BITS) + (u - q * f) + en[1];
        j = j ? j - 1 : lanes - 1;
    }
    n_words = top - w;
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("LL", (long long)n_words, (long long)used);
done:
    PyMem_RawFree(sym), PyMem_RawFree(entry), PyMem_RawFree(inverse), PyMem_RawFree(count);
    view_release(&vids);
    if (rows_held) PyBuffer_Release(&rows);
    for (int i = 0; i < N; i++) view_release(&v[i]);
    return result;
}

PyDoc_STRVAR(reciprocals_doc,
             "reciprocals(fc, out)\n\n"
             "out (uint64, one per (freq, cum) pair of fc): ceil(2^64 / freq), 0 for a frequency below 2. For a state\n"
             "u < 2^32 the high 64 bits of u * ceil(2^64 / f) are u / f exactly: the error u * (ceil - 2^64 / f) / 2^64\n"
             "is below 2^-32, and the fraction of u / f is at most 1 - 1/f <= 1 - 2^-16.");

static PyObject *reciprocals(PyObject *self, PyObject *args) {
    PyObject *o_fc, *o_out;
    View fc = {0}, out = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OO", &o_fc, &o_out)) return NULL;
    if (view_get(o_fc, &fc, 0, 8, "fc") || view_get(o_out, &out, 1, 8, "out")) goto done;
    if (ITEMS(out, uint64_t) != ITEMS(fc, uint64_t)) {
        PyErr_SetString(PyExc_ValueError, "reciprocals: one output per frequency");
        goto done;
    }
    const uint32_t *f = DATA(fc, uint32_t);
    uint64_t *r = DATA(out, uint64_t);
    for (Py_ssize_t i = 0; i < ITEMS(out, uint64_t); i++) {
        uint64_t freq = f[2 * i];
        r[i] = freq < 2 ? 0 : (uint64_t)((((unsigned __int128)1 << 64) + freq - 1) / freq);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    view_release(&fc), view_release(&out);
    return result;
}

/* ------------------------------------------------------------------------------------------ module */

PyDoc_STRVAR(check_doc, "check_constants(precision_bits, state_low, word_bits): raise unless they are this build's.");

static PyObject *check_constants(PyObject *self, PyObject *args) {
    unsigned long precision, low, word;
    if (!PyArg_ParseTuple(args, "kkk", &precision, &low, &word)) return NULL;
    if (precision != PRECISION_BITS || low != STATE_LOW || word != WORD_BITS) {
        PyErr_SetString(PyExc_ImportError, "kvcli.codecs._ans was built for other rANS constants; rebuild it");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"search", search, METH_VARARGS, search_doc},
    {"decode", decode, METH_VARARGS, decode_doc},
    {"decode_banded", decode_banded, METH_VARARGS, decode_banded_doc},
    {"table_ids", table_ids, METH_VARARGS, table_ids_doc},
    {"encode", encode, METH_VARARGS, encode_doc},
    {"count_escapes", count_escapes, METH_VARARGS, count_escapes_doc},
    {"expand", expand, METH_VARARGS, expand_doc},
    {"to_tuples", to_tuples, METH_VARARGS, to_tuples_doc},
    {"spread", spread, METH_VARARGS, spread_doc},
    {"count_tuples", count_tuples, METH_VARARGS, count_tuples_doc},
    {"encode_rows", encode_rows, METH_VARARGS, encode_rows_doc},
    {"reciprocals", reciprocals, METH_VARARGS, reciprocals_doc},
    {"check_constants", check_constants, METH_VARARGS, check_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "kvcli.codecs._ans",
                                    "kvcli's interleaved rANS coder (codecs/rans.py is its interface).", -1,
                                    methods};

PyMODINIT_FUNC PyInit__ans(void) { return PyModule_Create(&module); }
