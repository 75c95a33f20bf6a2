/* kvq version 4's inverse transform on the CPU (the C form of codecs/kvq_ops/transform.py's untransform_ref):
 * per head, M q for the int16 matrix M (dim, dim) and a segment's integers q (dim, tokens), exactly. reconstruct
 * (dequantize.c) calls it after the expansion, with the GIL released: kvq_untransform_into dequantizes, rotates and
 * casts the sums straight into a channel-major output (kvfile.decode's), kvq_untransform writes them to a float32
 * buffer for reconstruct_all (any other output, or where the first does not apply).
 *
 * Exact in any summation order (docs/codec.md, "Reconstruction"), by the bound B = max|q| times M's largest row sum
 * of |M|, which bounds every partial sum: where the CPU has AVX-512 VNNI, every |q| fits int16 and B < 2^31, int16
 * pairs multiplied and summed into int32 (vpdpwssd, exact), each sum rounded once to float32; else where B < 2^24,
 * a blocked float32 product that the compiler vectorizes (float32 holds every partial sum); else int64 sums, each
 * rounded once to float32. */
#include "_symbols.h"
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

#define VNNI_ROWS 8  /* output rows per block, one 16-token int32 accumulator each */
#define VNNI_TILE 16

/* Row r of block b in the VNNI product's order: eight consecutive rows, or for keys to be rotated rows 4b to 4b + 3
 * and their rotary partners dim/2 + 4b to dim/2 + 4b + 3 (dim a multiple of 8), so that a block holds both halves
 * of four pairs. Rows past dim (padding) have zero matrix entries. */
static inline int64_t block_row(int64_t b, int r, int64_t dim, int paired) {
    return paired ? (r < 4 ? 4 * b + r : dim / 2 + 4 * b + r - 4) : b * VNNI_ROWS + r;
}

#ifdef KVQ_X86
#define AVX512_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

/* acc += the int16 pair products of v and the broadcast pair w, summed into int32 lanes (vpdpwssd). In assembly:
 * GCC's intrinsic copied each accumulator to another register and back at every step. */
#define DPWSSD(acc, v, w) __asm__("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(v), "m"(w))

/* Clamped to +-65504, then rounded to the nearest float16, ties to even: dequantize.c's half_of, the same integer
 * and float32 operations on 16 lanes. */
AVX512_VNNI static inline __m512i half16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-65504.0f)), _mm512_set1_ps(65504.0f));
    const __m512i u = _mm512_castps_si512(x), a = _mm512_and_si512(u, _mm512_set1_epi32(0x7FFFFFFF));
    const __m512i sub = _mm512_sub_epi32(_mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(0.5f))),
                                         _mm512_set1_epi32(0x3F000000));
    __m512i normal = _mm512_add_epi32(_mm512_sub_epi32(a, _mm512_set1_epi32(0x38000000)), _mm512_set1_epi32(0xFFF));
    normal = _mm512_srli_epi32(_mm512_add_epi32(normal, _mm512_and_si512(_mm512_srli_epi32(a, 13), _mm512_set1_epi32(1))), 13);
    const __m512i magnitude = _mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x38800000)), normal, sub);
    return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x8000)), magnitude);
}

/* dequantize.c's bfloat_of on 16 lanes. */
AVX512_VNNI static inline __m512i bfloat16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), odd), 16);
}

/* The `keep` lanes of x into dst, cast to the cache dtype. */
AVX512_VNNI static inline __attribute__((always_inline)) void store16(char *dst, __mmask16 keep, __m512 x,
                                                                      const int dtype) {
    if (dtype == F32)
        _mm512_mask_storeu_ps(dst, keep, x);
    else
        _mm256_mask_storeu_epi16(dst, keep, _mm512_cvtepi32_epi16(dtype == F16 ? half16(x) : bfloat16(x)));
}

/* Step 1 of "Reconstruction" on the exact sums of one channel: float32(M q) * 2^-10 (exact), * step, * token
 * factor, + center, each a separate float32 operation. */
AVX512_VNNI static inline __m512 dequantize16(__m512i sums, float step, float center, __m512 factor) {
    __m512 x = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(0x1p-10f));
    x = _mm512_mul_ps(x, _mm512_set1_ps(step));
    x = _mm512_mul_ps(x, factor);
    return _mm512_add_ps(x, _mm512_set1_ps(center));
}

#define BUFFER (-1) /* head_vnni_as's dtype for y */

/* One head with AVX-512 VNNI: mp (rows, pairs), M's rows as int16 pairs (M[i][2k], M[i][2k+1]) in one int32, zero
 * rows past dim up to a whole block (pair_rows), and qp (tiles, pairs, VNNI_TILE), q's rows 2k and 2k + 1
 * interleaved likewise, padded with zeros to whole tiles of tokens (the padding adds nothing, and no edge
 * is left to a scalar loop: the int64 edges took most of this function's time on 256-token segments with sinks or
 * a short last chunk). Every sum exact in int32 here. Only the pairs of a tile that hold a nonzero
 * integer are summed, nz[tile * pairs + n] for n < count[tile] (ascending): the others add nothing (a third of
 * them at `small`, half at `tiny`, on SmolLM2, whose trailing components mostly quantize to 0). A list, not a test
 * per pair: the branch on data would mispredict. Named accumulators, not an array: GCC copied an array's eight
 * registers twice per step.
 * Without o, the sums go to y (dim, tokens) as float32 (rounded to nearest, ties to even). With o (head h), each
 * block is dequantized, rotated where o has tables (paired order) and cast straight from its registers into o's
 * output: no float32 buffer between the product and the output, and 16 lanes where reconstruct_all's portable
 * loops have 4. */
AVX512_VNNI static inline __attribute__((always_inline)) void
head_vnni_as(const int32_t *restrict mp, const int32_t *restrict qp, const int32_t *restrict nz,
             const int32_t *restrict count, int64_t dim, int64_t tokens, float *restrict y, const KvqOutput *o,
             int64_t h, const int dtype, const int paired) {
    const int64_t pairs = (dim + 1) / 2, blocks = (dim + VNNI_ROWS - 1) / VNNI_ROWS;
    const int64_t tiles = (tokens + VNNI_TILE - 1) / VNNI_TILE;
    /* o's fields in locals: the stores through char * below could otherwise change them, as far as GCC knows, and
     * it reloaded them after each one. */
    const size_t item = dtype == F32 || dtype == BUFFER ? 4 : 2;
    const float *center = o ? o->center + h * dim : NULL, *step = o ? o->step + h * dim : NULL;
    const float *factors = o ? o->factor + h * o->factor_stride : NULL;
    const float *cos = o ? o->cos : NULL, *sin = o ? o->sin : NULL;
    char *const out = o ? o->out + (size_t)(h * o->sh) * item : NULL;
    const int64_t sd = o ? o->sd : 0;
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t t0 = tile * VNNI_TILE, left = tokens - t0;
        const __mmask16 keep = left >= VNNI_TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        const int32_t *list = nz + tile * pairs, *qt = qp + tile * pairs * VNNI_TILE;
        const __m512 factor = dtype == BUFFER ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(keep, factors + t0);
        char *const at = out ? out + (size_t)t0 * item : NULL;
        for (int64_t b = 0; b < blocks; b++) {
            const int32_t *w[VNNI_ROWS];
            for (int r = 0; r < VNNI_ROWS; r++) w[r] = mp + block_row(b, r, dim, paired) * pairs;
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
            for (int32_t n = 0; n < count[tile]; n++) {
                const int64_t k = list[n];
                const __m512i v = _mm512_loadu_si512(qt + k * VNNI_TILE);
                DPWSSD(a0, v, w[0][k]);
                DPWSSD(a1, v, w[1][k]);
                DPWSSD(a2, v, w[2][k]);
                DPWSSD(a3, v, w[3][k]);
                DPWSSD(a4, v, w[4][k]);
                DPWSSD(a5, v, w[5][k]);
                DPWSSD(a6, v, w[6][k]);
                DPWSSD(a7, v, w[7][k]);
            }
            const __m512i acc[VNNI_ROWS] = {a0, a1, a2, a3, a4, a5, a6, a7};
            if (paired) {
                for (int r = 0; r < 4; r++) {  /* step 2: rows d and d + dim/2 by token t's angle for pair d */
                    const int64_t d = 4 * b + r, d2 = d + dim / 2;
                    const __m512 x = dequantize16(acc[r], step[d], center[d], factor);
                    const __m512 x2 = dequantize16(acc[r + 4], step[d2], center[d2], factor);
                    const __m512 cs = _mm512_maskz_loadu_ps(keep, cos + d * tokens + t0);
                    const __m512 sn = _mm512_maskz_loadu_ps(keep, sin + d * tokens + t0);
                    const __m512 first = _mm512_sub_ps(_mm512_mul_ps(x, cs), _mm512_mul_ps(x2, sn));
                    const __m512 second = _mm512_add_ps(_mm512_mul_ps(x2, cs), _mm512_mul_ps(x, sn));
                    store16(at + (size_t)(d * sd) * item, keep, first, dtype);
                    store16(at + (size_t)(d2 * sd) * item, keep, second, dtype);
                }
                continue;
            }
            for (int r = 0; r < VNNI_ROWS; r++) {
                const int64_t d = block_row(b, r, dim, 0);
                if (d >= dim) break;
                if (dtype == BUFFER)
                    _mm512_mask_storeu_ps(y + d * tokens + t0, keep, _mm512_cvtepi32_ps(acc[r]));
                else
                    store16(at + (size_t)(d * sd) * item, keep, dequantize16(acc[r], step[d], center[d], factor), dtype);
            }
        }
    }
}

/* head_vnni_as compiled for each output: the dtype and the rotation constants in each copy. */
AVX512_VNNI static void head_vnni(const int32_t *restrict mp, const int32_t *restrict qp, const int32_t *restrict nz,
                                  const int32_t *restrict count, int64_t dim, int64_t tokens, float *restrict y,
                                  const KvqOutput *o, int64_t h) {
#define AS(dtype, paired) head_vnni_as(mp, qp, nz, count, dim, tokens, y, o, h, dtype, paired)
    if (!o)
        AS(BUFFER, 0);
    else if (o->cos)
        o->dtype == F32 ? AS(F32, 1) : o->dtype == F16 ? AS(F16, 1) : AS(BF16, 1);
    else
        o->dtype == F32 ? AS(F32, 0) : o->dtype == F16 ? AS(F16, 0) : AS(BF16, 0);
#undef AS
}

/* One head's integers q (dim, tokens) into qp (tiles, pairs, VNNI_TILE) as head_vnni takes them, zero-padded, with
 * each tile's list of pairs that are not zero (appended without a branch on the data). Returns max |q|, found on
 * the way (a pass of its own over q took as long as the packing): the int16 pairs hold q only below 2^15. */
AVX512_VNNI static int64_t pack_head(const int32_t *restrict q, int64_t dim, int64_t tokens, int32_t *restrict qp,
                                     int32_t *restrict nz, int32_t *restrict count) {
    const int64_t pairs = (dim + 1) / 2, tiles = (tokens + VNNI_TILE - 1) / VNNI_TILE;
    const __m512i low = _mm512_set1_epi32(0xFFFF);
    __m512i least = _mm512_setzero_si512(), most = least;
    for (int64_t tile = 0; tile < tiles; tile++) {
        const int64_t t0 = tile * VNNI_TILE, left = tokens - t0;
        const __mmask16 keep = left >= VNNI_TILE ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
        int32_t n = 0, *list = nz + tile * pairs;
        for (int64_t k = 0; k < pairs; k++) {
            const __m512i lo = _mm512_maskz_loadu_epi32(keep, q + 2 * k * tokens + t0);
            const __m512i hi = 2 * k + 1 < dim ? _mm512_maskz_loadu_epi32(keep, q + (2 * k + 1) * tokens + t0)
                                               : _mm512_setzero_si512();
            least = _mm512_min_epi32(least, _mm512_min_epi32(lo, hi));
            most = _mm512_max_epi32(most, _mm512_max_epi32(lo, hi));
            const __m512i packed = _mm512_or_si512(_mm512_and_si512(lo, low), _mm512_slli_epi32(hi, 16));
            _mm512_storeu_si512(qp + (tile * pairs + k) * VNNI_TILE, packed);
            list[n] = (int32_t)k;
            n += _mm512_test_epi32_mask(packed, packed) != 0;
        }
        count[tile] = n;
    }
    const int64_t lo = _mm512_reduce_min_epi32(least), hi = _mm512_reduce_max_epi32(most);
    return -lo > hi ? -lo : hi;
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
static void head_vnni(const int32_t *mp, const int32_t *qp, const int32_t *nz, const int32_t *count, int64_t dim,
                      int64_t tokens, float *y, const KvqOutput *o, int64_t h) {
    (void)mp, (void)qp, (void)nz, (void)count, (void)dim, (void)tokens, (void)y, (void)o, (void)h;  /* never called */
}
static int64_t pack_head(const int32_t *q, int64_t dim, int64_t tokens, int32_t *qp, int32_t *nz, int32_t *count) {
    (void)q, (void)dim, (void)tokens, (void)qp, (void)nz, (void)count;  /* never called */
    return 0;
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

/* max |q| over n integers: their extremes in int32, which vectorize (a running maximum of |q| in int64 did not, and
 * took two thirds of kvq_untransform's own time). */
WIDE static int64_t largest_magnitude(const int32_t *restrict q, int64_t n) {
    int32_t lo = 0, hi = 0;
    for (int64_t i = 0; i < n; i++) {
        lo = q[i] < lo ? q[i] : lo;
        hi = q[i] > hi ? q[i] : hi;
    }
    return -(int64_t)lo > hi ? -(int64_t)lo : hi;
}

/* M's largest sum of |M| over a row, over every head's rows: with max |q| it bounds every partial sum. Each sum in
 * int32 (at most 256 * 2^15), which vectorizes. */
WIDE static int64_t largest_row_sum(const int16_t *restrict matrix, int64_t heads, int64_t dim) {
    int32_t most = 0;
    for (int64_t r = 0; r < heads * dim; r++) {
        int32_t s = 0;
        for (int64_t j = 0; j < dim; j++) s += abs((int32_t)matrix[r * dim + j]);
        most = s > most ? s : most;
    }
    return most;
}

const char kvq_pair_rows_doc[] = PyDoc_STR(
    "pair_rows(matrix, heads, out) -> int\n\n"
    "The operand of the inverse transform's AVX-512 VNNI product: matrix int16 (heads, dim, dim); out int32\n"
    "(heads, rows, pairs), rows = dim rounded up to 8 and pairs = ceil(dim / 2), receives row i's int16 pairs\n"
    "(M[i][2k], M[i][2k + 1]) (zero past dim), or None where they are matrix's own bytes (dim a multiple of 8).\n"
    "Returns the largest sum of |M| over a row, which reconstruct takes with the pairs (with max |q|, it bounds\n"
    "every partial sum).");

PyObject *kvq_pair_rows(PyObject *self, PyObject *args) {
    PyObject *o_matrix, *o_out, *result = NULL;
    long long heads;
    View matrix = {0}, out = {0};
    if (!PyArg_ParseTuple(args, "OLO", &o_matrix, &heads, &o_out)) return NULL;
    if (view_get(o_matrix, &matrix, 0, 2, "matrix") || (o_out != Py_None && view_get(o_out, &out, 1, 4, "out")))
        goto done;
    int64_t dim = 0;
    while (heads >= 1 && dim <= 256 && heads * dim * dim < ITEMS(matrix, int16_t)) dim++;
    const int64_t pairs = (dim + 1) / 2, rows = (dim + VNNI_ROWS - 1) / VNNI_ROWS * VNNI_ROWS;
    if (heads < 1 || dim < 1 || heads * dim * dim != ITEMS(matrix, int16_t) ||
        (o_out == Py_None ? dim % VNNI_ROWS != 0 : ITEMS(out, int32_t) != heads * rows * pairs)) {
        PyErr_SetString(PyExc_ValueError, "pair_rows: matrix must be (heads, dim, dim), dim at most 256, and out "
                                          "(heads, rows, pairs), or None for a dim that is a multiple of 8");
        goto done;
    }
    const int16_t *m = DATA(matrix, int16_t);
    int32_t *o = o_out == Py_None ? NULL : DATA(out, int32_t);
    int64_t row_sum;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t h = 0; o && h < heads; h++)
        for (int64_t i = 0; i < rows; i++)
            for (int64_t k = 0; k < pairs; k++) {
                const int16_t *row = m + (h * dim + (i < dim ? i : 0)) * dim;
                o[(h * rows + i) * pairs + k] = i < dim ? pair(row[2 * k], 2 * k + 1 < dim ? row[2 * k + 1] : 0) : 0;
            }
    row_sum = largest_row_sum(m, heads, dim);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(row_sum);
done:
    view_release(&matrix), view_release(&out);
    return result;
}

/* Every head through head_vnni, into y or o (see there), where the CPU has AVX-512 VNNI and B = max |q| times
 * row_sum (M's largest row sum of |M|) keeps every partial sum exact in int32, with every |q| below 2^15; else 1,
 * nothing written. Every head is packed, and max |q| known, before any is summed. mp: pair_rows's. */
static int untransform_vnni(const int32_t *q, const int32_t *mp, int64_t row_sum, int64_t heads, int64_t dim,
                            int64_t tokens, float *y, const KvqOutput *o) {
    if (!has_vnni() || dim > 256 || (o && o->cos && dim % 8)) return 1;
    const int64_t pairs = (dim + 1) / 2, tiles = (tokens + VNNI_TILE - 1) / VNNI_TILE;
    const int64_t rows = (dim + VNNI_ROWS - 1) / VNNI_ROWS * VNNI_ROWS, per_head = tiles * pairs * VNNI_TILE;
    int32_t *qp = PyMem_RawMalloc((size_t)(heads * per_head) * sizeof(int32_t));
    int32_t *nz = PyMem_RawMalloc((size_t)(heads * (pairs + 1) * tiles) * sizeof(int32_t));
    int status = !qp || !nz ? -1 : 0;
    int64_t largest = 0;
    for (int64_t h = 0; h < heads && !status; h++) {
        int32_t *list = nz + h * (pairs + 1) * tiles;
        const int64_t m = pack_head(q + h * dim * tokens, dim, tokens, qp + h * per_head, list, list + pairs * tiles);
        largest = m > largest ? m : largest;
    }
    if (!status && !(largest < (1 << 15) && largest * row_sum < ((int64_t)1 << 31))) status = 1;
    for (int64_t h = 0; h < heads && !status; h++) {
        const int32_t *list = nz + h * (pairs + 1) * tiles;
        head_vnni(mp + h * rows * pairs, qp + h * per_head, list, list + pairs * tiles, dim, tokens,
                  y ? y + h * dim * tokens : NULL, o, h);
    }
    PyMem_RawFree(qp);
    PyMem_RawFree(nz);
    return status;
}

int kvq_untransform_into(const int32_t *q, const int32_t *mp, int64_t row_sum, int64_t heads, int64_t dim,
                         int64_t tokens, const KvqOutput *o) {
    return untransform_vnni(q, mp, row_sum, heads, dim, tokens, NULL, o);
}

int kvq_untransform(const int32_t *q, const int16_t *matrix, const int32_t *mp, int64_t row_sum, int64_t heads,
                    int64_t dim, int64_t tokens, float *y) {
    const int fast = untransform_vnni(q, mp, row_sum, heads, dim, tokens, y, NULL);
    if (fast <= 0) return fast;
    /* Past the VNNI bound (or without VNNI): the portable loops, by the bound taken from the matrices here. */
    if (largest_magnitude(q, heads * dim * tokens) * largest_row_sum(matrix, heads, dim) >= FLOAT32_EXACT) {
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

/* ------------------------------------------------------------------------------------------------------------
 * The encoder's side: quantize_components, the C form of transform.py's quantize_components_ref, whose integers
 * are q = round(M^-1 u) (round half to even) with u = (x - center) / (step * g) per channel and M^-1 (times 2^10,
 * `inverse` below) in float64. Here the product is taken in float32, 16 tokens at a time; an element is redone in
 * float64 (component_f64) wherever float32 cannot be trusted to round the same way. Why that is enough:
 *
 * Let d = 2^-24 (float32's unit roundoff), D = dim <= 256, a_j = inverse[i][j] (float64), u_j the exact real
 * (x_j - c_j) / (s_j g), S = sum_j a_j u_j, and P = sum_j |a_j u_j|. Every float32 operation rounds to nearest,
 * so fl(v) = v (1 + e) + n with |e| <= d and |n| <= 2^-150, n nonzero only below 2^-126 (an addition or
 * subtraction is exact there).
 * - x_j - c_j: relative error <= d. s_j g: a normal product (kvq's are at least 2^-14 * 2^-3, MIN_STEP times
 *   the smallest token factor; the function refuses anything below 2^-126), <= d. The quotient: <= d and 2^-150. So u'_j = u_j (1 + t_j) + n_j, |t_j| <= (1+d)^2/(1-d) - 1
 *   <= 3.0001 d. a'_j = float32(a_j) = a_j (1 + e_j) + n'_j.
 * - The float32 sum of the D products is taken as partial sums of B = min(ENC_BLOCK, D) consecutive terms, in any
 *   order and with or without fused multiply-adds, then the ceil(D / B) partial sums added one by one: within
 *   (g_B + g_(D/B) + g_B g_(D/B)) sum_j |a'_j u'_j| (g_n = n d / (1 - n d), Higham's bound for n terms) plus
 *   D 2^-150 of sum_j a'_j u'_j; and |sum_j a'_j u'_j - S| <= ((1+d)(1+3.0001 d) - 1) P + (underflow terms).
 *   Together, for D <= 256: |c32 - S| <= (B + ceil(D / B) + 5) d P + 2^-100 (every |a|, |u| here is far below
 *   2^40, so the 2^-150 terms stay below 2^-100). One sum of all D terms would give (D + 5) d P: for D = 256,
 *   seven times the bound, and seven times the elements to redo.
 * - The float64 reference (any summation order, as BLAS may choose) is within (D + 3) 2^-53 P of S, so
 *   |c32 - c64| <= G d P + 2^-100 with G = B + ceil(D / B) + 6.
 * - P <= |a|_2 |u|_2 (Cauchy-Schwarz). |a|_2 = A_i is computed in float64 once per row. |u|_2 from the float32 u':
 *   with N = float32(sqrt(float32(sum u'_j^2))), |u|_2 <= N (1 + (D/2 + 5) d) + 2^-70 <= N (1 + 2^-16) + 2^-70.
 * So with K_i = G d A_i (1 + 2^-12) rounded up to float32 (the 2^-12 covers the 2^-16 above and the float32
 * roundings of K_i N and of the margin below), E = K_i N + 2^-90 bounds |c32 - c64|. With r = round_even(c32) and
 * the margin m = 0.5 - |c32 - r| (exact wherever |c32| >= 1/4; below that it is at least 1/4 and rounds by at most
 * 2^-26), m > E means no half-integer lies between c32 and c64 and c64 is none: round(c64) = r. Otherwise, and for
 * anything not finite (the comparison fails), the element is computed again in float64. Where |c32| >= 2^23
 * (where float32 has no fraction bits), E >= G d |c32| / (1 + 2^-15) > 1/2 (G >= 8) and m <= 1/2: always redone.
 * The float64 recomputation sums in index order, where the reference's BLAS product sums in its own: the two can
 * differ only where c64 lies within (D + 3) 2^-53 P of a half-integer, as two BLAS builds can; the tests compare
 * every integer with the reference's. */

#define ENC_TILE 16  /* tokens per block: one vector of 16 float32 (one AVX-512 register, two AVX2 ones) */
#define ENC_ROWS 8   /* components per block: ENC_ROWS accumulators of ENC_TILE tokens */
#define ENC_BLOCK 16 /* terms per partial sum (B above) */
#define ENC_PREFETCH 4 /* tiles ahead */

typedef float vec16 __attribute__((vector_size(64)));

/* One component i of token t of one head in float64, as the reference computes it (separate float64 operations:
 * this file never fuses them outside head_f32 and block_f32), rounded half to even. */
static double component_f64(const float *x, int64_t tokens, const float *c, const float *s, const float *g,
                            const double *a, int64_t dim, int64_t t) {
    double sum = 0.0;
    for (int64_t j = 0; j < dim; j++) {
        double size = g ? (double)s[j] * (double)g[t] : (double)s[j];
        double u = ((double)x[j * tokens + t] - (double)c[j]) / size;
        sum += a[j] * u;
    }
    return nearbyint(sum);
}

/* c (rows, ENC_TILE) = m (rows padded to ENC_ROWS, dim) ut (dim, ENC_TILE) in float32: each sum in blocks of
 * ENC_BLOCK terms, added up block by block (the bound above for that order), fused multiply-adds allowed (the bound
 * holds either way). Cloned for AVX-512 and AVX2 beside the baseline. */
#ifdef KVQ_X86
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("fp-contract=fast")))
#endif
static void block_f32(const float *restrict m, const float *restrict ut, float *restrict c, int64_t rows,
                      int64_t dim) {
    for (int64_t i0 = 0; i0 < rows; i0 += ENC_ROWS) {
        vec16 total[ENC_ROWS] = {{0}};
        for (int64_t j0 = 0; j0 < dim; j0 += ENC_BLOCK) {
            const int64_t j1 = j0 + ENC_BLOCK < dim ? j0 + ENC_BLOCK : dim;
            vec16 acc[ENC_ROWS] = {{0}};
            for (int64_t j = j0; j < j1; j++) {
                vec16 u;
                memcpy(&u, ut + j * ENC_TILE, sizeof u);
                for (int r = 0; r < ENC_ROWS; r++) acc[r] += m[(i0 + r) * dim + j] * u;
            }
            for (int r = 0; r < ENC_ROWS; r++) total[r] += acc[r];
        }
        for (int r = 0; r < ENC_ROWS; r++) memcpy(c + (i0 + r) * ENC_TILE, &total[r], sizeof total[r]);
    }
}

/* One head: q (dim, tokens) int32. x (dim, tokens), c and s (dim,), g (tokens,) or NULL, a (dim, dim) float64;
 * m (rows, dim) float32 and k (rows,) its bounds K_i, scratch ut (dim, ENC_TILE) and cb (rows, ENC_TILE).
 * Returns how many elements went through float64, or -1 for one whose integer leaves int32. */
#ifdef KVQ_X86
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static int64_t head_components(const float *x, int64_t tokens, const float *c, const float *s, const float *g,
                               const double *a, int64_t dim, int64_t rows, const float *m, const float *k,
                               float *ut, float *cb, int32_t *q) {
    int64_t redone = 0;
    for (int64_t t0 = 0; t0 < tokens; t0 += ENC_TILE) {
        const int64_t n = tokens - t0 < ENC_TILE ? tokens - t0 : ENC_TILE;
        float norm[ENC_TILE] = {0};
        for (int64_t j = 0; j < dim; j++) {
            float *uj = ut + j * ENC_TILE;
            const float *xj = x + j * tokens + t0;
            /* A tile reads one line from each of dim rows, too many streams for the hardware to guess ahead. */
            __builtin_prefetch(xj + ENC_PREFETCH * ENC_TILE);
            for (int64_t t = 0; t < n; t++) {
                float size = g ? s[j] * g[t0 + t] : s[j];
                uj[t] = (xj[t] - c[j]) / size;
            }
            for (int64_t t = n; t < ENC_TILE; t++) uj[t] = 0.0f;
            for (int64_t t = 0; t < ENC_TILE; t++) norm[t] += uj[t] * uj[t];
        }
        for (int64_t t = 0; t < ENC_TILE; t++) norm[t] = sqrtf(norm[t]);
        block_f32(m, ut, cb, rows, dim);
        for (int64_t i = 0; i < dim; i++) {
            const float *ci = cb + i * ENC_TILE;
            int32_t *qi = q + i * tokens + t0;
            int trusted = 1;
            float r[ENC_TILE];
            for (int64_t t = 0; t < ENC_TILE; t++) {
                r[t] = round_even(ci[t]);
                float margin = 0.5f - fabsf(ci[t] - r[t]), bound = k[i] * norm[t] + 0x1p-90f;
                trusted &= margin > bound;
            }
            if (trusted) {
                for (int64_t t = 0; t < n; t++) qi[t] = (int32_t)r[t];
                continue;
            }
            for (int64_t t = 0; t < n; t++) {
                float margin = 0.5f - fabsf(ci[t] - r[t]), bound = k[i] * norm[t] + 0x1p-90f;
                if (margin > bound) {
                    qi[t] = (int32_t)r[t];
                    continue;
                }
                double v = component_f64(x, tokens, c, s, g, a + i * dim, dim, t0 + t);
                if (!(fabs(v) < 2147483648.0)) return -1;
                qi[t] = (int32_t)v;
                redone++;
            }
        }
    }
    return redone;
}

const char kvq_quantize_components_doc[] = PyDoc_STR(
    "quantize_components(body, center, step, factor, inverse, heads, q, std) -> int\n\n"
    "transform.py's quantize_components_ref, integer for integer: q = round_half_even(inverse @ u) per token and\n"
    "head, u = (body - center) / (step * factor) (step alone without factor), in float32 with a proven error bound\n"
    "and in float64 where that bound cannot decide the rounding. body: float32 (heads, dim, tokens), C order;\n"
    "center, step float32 (heads, dim); factor float32 (heads, tokens) or None; inverse float64 (heads, dim, dim);\n"
    "q int16 or int32 like body. Also fills std (float64 per component) as spread() would from q. Returns the\n"
    "count of elements computed in float64, or -1, with q incomplete, if a value does not fit int16 q (quantize\n"
    "into int32 then). ValueError if an integer does not fit int32.");

PyObject *kvq_quantize_components(PyObject *self, PyObject *args) {
    PyObject *o_body, *o_center, *o_step, *o_factor, *o_inv, *o_q, *o_std;
    long long heads;
    View body = {0}, center = {0}, step = {0}, factor = {0}, inv = {0}, q = {0}, sd = {0};
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOLOO", &o_body, &o_center, &o_step, &o_factor, &o_inv, &heads, &o_q, &o_std))
        return NULL;
    if (view_get(o_body, &body, 0, 4, "body") || view_get(o_center, &center, 0, 4, "center") ||
        view_get(o_step, &step, 0, 4, "step") || view_get(o_inv, &inv, 0, 8, "inverse") ||
        view_get(o_std, &sd, 1, 8, "std"))
        goto done;
    if (PyObject_GetBuffer(o_q, &q.buf, PyBUF_C_CONTIGUOUS | PyBUF_WRITABLE) < 0) goto done;
    q.held = 1;
    const int weighted = o_factor != Py_None;
    if (weighted && view_get(o_factor, &factor, 0, 4, "factor")) goto done;
    const Py_ssize_t channels = ITEMS(center, float), item = q.buf.itemsize;
    const int64_t dim = heads >= 1 ? channels / heads : 0, tokens = channels ? ITEMS(body, float) / channels : 0;
    if (heads < 1 || channels == 0 || channels % heads || ITEMS(step, float) != channels ||
        ITEMS(sd, double) != channels || ITEMS(body, float) != channels * tokens || (item != 2 && item != 4) ||
        q.buf.len / item != ITEMS(body, float) || ITEMS(inv, double) != channels * dim ||
        (weighted && ITEMS(factor, float) != heads * tokens)) {
        PyErr_SetString(PyExc_ValueError, "quantize_components: array sizes disagree");
        goto done;
    }
    /* The bound needs every step times factor a normal float32 (kvq's lie within [2^-17, 2^19]). */
    int in_range = 1;
    float extremes[2][2] = {{INFINITY, 0.0f}, {1.0f, 1.0f}};  /* (least, most) of the steps, of the factors */
    for (int which = 0; which < 2; which++) {
        const float *v = which ? (weighted ? DATA(factor, float) : NULL) : DATA(step, float);
        const Py_ssize_t n = which ? (weighted ? heads * tokens : 0) : channels;
        if (which && n) extremes[1][0] = INFINITY, extremes[1][1] = 0.0f;
        for (Py_ssize_t i = 0; i < n; i++) {
            in_range &= v[i] > 0.0f && v[i] < INFINITY;  /* false for NaN */
            extremes[which][0] = v[i] < extremes[which][0] ? v[i] : extremes[which][0];
            extremes[which][1] = v[i] > extremes[which][1] ? v[i] : extremes[which][1];
        }
    }
    if (!in_range || !((double)extremes[0][0] * extremes[1][0] >= 0x1p-126) ||
        !((double)extremes[0][1] * extremes[1][1] <= 0x1p100)) {
        PyErr_SetString(PyExc_ValueError, "quantize_components: steps times token factors must lie in [2^-126, 2^100]");
        goto done;
    }
    const int64_t rows = (dim + ENC_ROWS - 1) / ENC_ROWS * ENC_ROWS;
    float *m = PyMem_RawCalloc((size_t)(rows * dim + rows + dim * ENC_TILE + rows * ENC_TILE), sizeof(float));
    int32_t *scratch = item == 2 ? PyMem_RawMalloc((size_t)(dim * tokens) * sizeof(int32_t) + 1) : NULL;
    if (!m || (item == 2 && !scratch)) {
        PyMem_RawFree(m);
        PyMem_RawFree(scratch);
        PyErr_NoMemory();
        goto done;
    }
    float *k = m + rows * dim, *ut = k + rows, *cb = ut + dim * ENC_TILE;
    int64_t redone = 0;
    int fits = 1;
    Py_BEGIN_ALLOW_THREADS
    const double *a = DATA(inv, double);
    const int64_t block = dim < ENC_BLOCK ? dim : ENC_BLOCK;
    const double bound = (double)(block + (dim + block - 1) / block + 6);  /* G */
    for (int64_t h = 0; h < heads && fits && redone >= 0; h++) {
        const double *ah = a + h * dim * dim;
        for (int64_t i = 0; i < dim; i++) {
            double norm2 = 0.0;
            for (int64_t j = 0; j < dim; j++) {
                m[i * dim + j] = (float)ah[i * dim + j];
                norm2 += ah[i * dim + j] * ah[i * dim + j];
            }
            /* K_i, rounded up: the float64 norm's own error (well under 2^-40) is inside the 2^-12. */
            k[i] = nextafterf((float)(bound * 0x1p-24 * sqrt(norm2) * (1.0 + 0x1p-12)), INFINITY);
        }
        int32_t *qh = item == 4 ? (int32_t *)q.buf.buf + h * dim * tokens : scratch;
        const int64_t got = head_components(DATA(body, float) + h * dim * tokens, tokens, DATA(center, float) + h * dim,
                                            DATA(step, float) + h * dim, weighted ? DATA(factor, float) + h * tokens : NULL,
                                            ah, dim, rows, m, k, ut, cb, qh);
        redone = got < 0 ? -1 : redone + got;
        for (int64_t i = 0; i < dim && redone >= 0; i++) {
            const int32_t *row = qh + i * tokens;
            int32_t lo = 0, hi = 0;
            for (int64_t t = 0; t < tokens; t++) {
                lo = row[t] < lo ? row[t] : lo;
                hi = row[t] > hi ? row[t] : hi;
            }
            DATA(sd, double)[h * dim + i] = row_std(row, tokens, lo, hi);
            if (item == 2) {
                fits &= lo >= INT16_MIN && hi <= INT16_MAX;
                int16_t *q16 = (int16_t *)q.buf.buf + (h * dim + i) * tokens;
                for (int64_t t = 0; t < tokens && fits; t++) q16[t] = (int16_t)row[t];
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(m);
    PyMem_RawFree(scratch);
    if (redone < 0) {
        PyErr_SetString(PyExc_ValueError, "quantize_components: a component integer does not fit int32");
        goto done;
    }
    result = PyLong_FromLongLong(fits ? redone : -1);
done:
    view_release(&body), view_release(&center), view_release(&step), view_release(&factor), view_release(&inv),
        view_release(&q), view_release(&sd);
    return result;
}
