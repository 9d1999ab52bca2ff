/* adapterhub.encoding._native: the per-byte loops of the tensor codec in C.
 *
 * Why: on a LoRA checkpoint (~45 kB tensors) the numpy codec spends most of its time in
 * per-call overhead and in whole-array temporaries (rotate, ordered map, zigzag, the
 * transpose of the split, the gathers of the code unpacker), each one more pass over
 * memory. Here every step is one fused pass into a single new bytes object, and the GIL is
 * released around the loops so that two threads can encode or decode tensors at once.
 *
 * Every function here has a numpy twin in reference.py with the same signature and the same
 * output, byte for byte (tests/test_native.py); kernels.py picks one of the two. The
 * format is docs/format/encodings.md; nothing here decides what is stored, only computes.
 *
 * Words are read and written little-endian whatever the host (byte loads and shifts), so
 * the module is correct on any host; it is fast on the little-endian ones we run on.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blake3.h"

/* Below this many bytes releasing and re-taking the GIL costs more than the loop. */
#define NOGIL_MIN 16384

#define ENTER_NOGIL(n) PyThreadState *_save = NULL; if ((n) >= NOGIL_MIN) { _save = PyEval_SaveThread(); }
#define LEAVE_NOGIL() if (_save) { PyEval_RestoreThread(_save); }

enum { KIND_XOR = 0, KIND_ORD = 1, KIND_NONE = -1 };

/* ---- words ----------------------------------------------------------------------------- */

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define LE16(x) __builtin_bswap16(x)
#define LE32(x) __builtin_bswap32(x)
#define LE64(x) __builtin_bswap64(x)
#else
#define LE16(x) (x)
#define LE32(x) (x)
#define LE64(x) (x)
#endif

/* What split applies to each element before scattering its bytes (join undoes it). The
 * mode is a compile-time constant in each specialised loop below. */
enum {
    M_COPY,      /* integers, no base */
    M_ROT,       /* floats, no base: sign bit to the bottom */
    M_XOR,       /* integers: x ^ y */
    M_XOR_ROT,   /* floats: rot(x ^ y) */
    M_ORD_INT,   /* integers: zz(x - y) */
    M_ORD_FLOAT, /* floats: zz(ord(x) - ord(y)) */
    M_EXT_INT,   /* integers: zz(x - (2y - p)), p a second, older base (encoding 4) */
    M_EXT_FLOAT, /* floats: zz(ord(x) - (2 ord(y) - ord(p))) */
};

static int split_mode(int rotate, int kind)
{
    if (kind == KIND_NONE)
        return rotate ? M_ROT : M_COPY;
    if (kind == KIND_XOR)
        return rotate ? M_XOR_ROT : M_XOR;
    return rotate ? M_ORD_FLOAT : M_ORD_INT;
}

/* Calls fn(..., mode) with `mode` as a compile-time constant, so that each loop is
 * specialised for it (the switch is outside the loop, not in it). */
#define FOR_EACH_MODE(mode, fn, ...)                                                            \
    switch (mode) {                                                                             \
    case M_COPY: fn(__VA_ARGS__, M_COPY); break;                                                \
    case M_ROT: fn(__VA_ARGS__, M_ROT); break;                                                  \
    case M_XOR: fn(__VA_ARGS__, M_XOR); break;                                                  \
    case M_XOR_ROT: fn(__VA_ARGS__, M_XOR_ROT); break;                                          \
    case M_ORD_INT: fn(__VA_ARGS__, M_ORD_INT); break;                                          \
    case M_ORD_FLOAT: fn(__VA_ARGS__, M_ORD_FLOAT); break;                                      \
    case M_EXT_INT: fn(__VA_ARGS__, M_EXT_INT); break;                                          \
    default: fn(__VA_ARGS__, M_EXT_FLOAT); break;                                               \
    }

/* Per width W (bits B, word type T): rotations, the value-order map of delta.ORD (its own
 * inverse), zigzag, and the split/join loops. `(T)(0 - (x >> (B-1)))` is all ones when the
 * top bit is set: the arithmetic shift `x >>s (B-1)` without signed shifts. */
#define DEFINE_WIDTH(W, B, T, LE)                                                              \
    static ALWAYS_INLINE T load_##W(const uint8_t *p)                                           \
    {                                                                                           \
        T v;                                                                                    \
        memcpy(&v, p, W);                                                                       \
        return LE(v);                                                                           \
    }                                                                                           \
    static ALWAYS_INLINE T rot_##W(T x) { return (T)((T)(x << 1) | (T)(x >> (B - 1))); }        \
    static ALWAYS_INLINE T unrot_##W(T x) { return (T)((T)(x >> 1) | (T)(x << (B - 1))); }      \
    static ALWAYS_INLINE T sign_##W(T x) { return (T)(0 - (T)(x >> (B - 1))); }                 \
    static ALWAYS_INLINE T ord_##W(T x) { return (T)(x ^ (T)(sign_##W(x) >> 1)); }              \
    static ALWAYS_INLINE T zz_##W(T d) { return (T)((T)(d << 1) ^ sign_##W(d)); }               \
    static ALWAYS_INLINE T unzz_##W(T z) { return (T)((T)(z >> 1) ^ (T)(0 - (T)(z & 1))); }     \
    static ALWAYS_INLINE T encode_##W(T x, T y, const int mode)                                 \
    {                                                                                           \
        switch (mode) {                                                                         \
        case M_COPY: return x;                                                                  \
        case M_ROT: return rot_##W(x);                                                          \
        case M_XOR: return (T)(x ^ y);                                                          \
        case M_XOR_ROT: return rot_##W((T)(x ^ y));                                             \
        case M_ORD_INT: return zz_##W((T)(x - y));                                              \
        case M_ORD_FLOAT: return zz_##W((T)(ord_##W(x) - ord_##W(y)));                          \
        case M_EXT_INT: return zz_##W((T)(x - y));                                              \
        default: return zz_##W((T)(ord_##W(x) - y));                                           \
        }                                                                                       \
    }                                                                                           \
    static ALWAYS_INLINE T decode_##W(T v, T y, const int mode)                                 \
    {                                                                                           \
        switch (mode) {                                                                         \
        case M_COPY: return v;                                                                  \
        case M_ROT: return unrot_##W(v);                                                        \
        case M_XOR: return (T)(v ^ y);                                                          \
        case M_XOR_ROT: return (T)(unrot_##W(v) ^ y);                                           \
        case M_ORD_INT: return (T)(unzz_##W(v) + y);                                            \
        case M_ORD_FLOAT: return ord_##W((T)(unzz_##W(v) + ord_##W(y)));                        \
        case M_EXT_INT: return (T)(unzz_##W(v) + y);                                            \
        default: return ord_##W((T)(unzz_##W(v) + y));                                         \
        }                                                                                       \
    }                                                                                           \
    /* The difference's reference for element i: the base word, or for the extrapolated \
     * modes the prediction 2y - p (value order for floats, where encode/decode expect it). */ \
    static ALWAYS_INLINE T ref_##W(const uint8_t *base, const uint8_t *prev, Py_ssize_t i, const int mode) \
    {                                                                                           \
        if (mode < M_XOR)                                                                       \
            return 0;                                                                           \
        T y = load_##W(base + i * W);                                                           \
        if (mode == M_EXT_INT)                                                                  \
            return (T)((T)(y << 1) - load_##W(prev + i * W));                                   \
        if (mode == M_EXT_FLOAT)                                                                \
            return (T)((T)(ord_##W(y) << 1) - ord_##W(load_##W(prev + i * W)));                \
        return y;                                                                               \
    }                                                                                           \
    static ALWAYS_INLINE void split_loop_##W(const uint8_t *restrict src, const uint8_t *restrict base, \
                                             const uint8_t *restrict prev, uint8_t *restrict out, \
                                             Py_ssize_t n, const int mode)                      \
    {                                                                                           \
        for (Py_ssize_t i = 0; i < n; i++) {                                                    \
            T y = ref_##W(base, prev, i, mode);                                                 \
            T v = encode_##W(load_##W(src + i * W), y, mode);                                   \
            for (int p = 0; p < W; p++)                                                         \
                out[p * n + i] = (uint8_t)(v >> (8 * p));                                       \
        }                                                                                       \
    }                                                                                           \
    static void split_##W(const uint8_t *src, const uint8_t *base, const uint8_t *prev, uint8_t *out, Py_ssize_t n, int mode) \
    {                                                                                           \
        FOR_EACH_MODE(mode, split_loop_##W, src, base, prev, out, n);                            \
    }                                                                                           \
    static ALWAYS_INLINE void join_loop_##W(const uint8_t *const *planes, const uint8_t *restrict base, \
                                            const uint8_t *restrict prev, uint8_t *restrict out, \
                                            Py_ssize_t n, const int mode)                       \
    {                                                                                           \
        const uint8_t *pl[W];                                                                   \
        for (int p = 0; p < W; p++)                                                             \
            pl[p] = planes[p];                                                                  \
        for (Py_ssize_t i = 0; i < n; i++) {                                                    \
            T v = 0;                                                                            \
            for (int p = 0; p < W; p++)                                                         \
                v |= (T)((T)pl[p][i] << (8 * p));                                               \
            T y = ref_##W(base, prev, i, mode);                                                 \
            T x = LE(decode_##W(v, y, mode));                                                   \
            memcpy(out + i * W, &x, W);                                                         \
        }                                                                                       \
    }                                                                                           \
    static void join_##W(const uint8_t *const *planes, const uint8_t *base, const uint8_t *prev, uint8_t *out, Py_ssize_t n, int mode) \
    {                                                                                           \
        FOR_EACH_MODE(mode, join_loop_##W, planes, base, prev, out, n);                         \
    }

DEFINE_WIDTH(2, 16, uint16_t, LE16)
DEFINE_WIDTH(4, 32, uint32_t, LE32)
DEFINE_WIDTH(8, 64, uint64_t, LE64)

/* fn_W for a width known only at run time (2, 4 or 8). */
#define BY_WIDTH(width, fn, ...)                                                                \
    do {                                                                                        \
        if ((width) == 2)                                                                       \
            fn##_2(__VA_ARGS__);                                                                \
        else if ((width) == 4)                                                                  \
            fn##_4(__VA_ARGS__);                                                                \
        else                                                                                    \
            fn##_8(__VA_ARGS__);                                                                \
    } while (0)

static void split_words(int width, const uint8_t *src, const uint8_t *base, const uint8_t *prev, uint8_t *out,
                        Py_ssize_t n, int mode)
{
    BY_WIDTH(width, split, src, base, prev, out, n, mode);
}

static void join_words(int width, const uint8_t *const *planes, const uint8_t *base, const uint8_t *prev, uint8_t *out,
                       Py_ssize_t n, int mode)
{
    BY_WIDTH(width, join, planes, base, prev, out, n, mode);
}

/* ---- argument helpers ------------------------------------------------------------------ */

static int check_layout(int width, int kind, int has_base)
{
    if (width != 2 && width != 4 && width != 8) {
        PyErr_Format(PyExc_ValueError, "plane width must be 2, 4 or 8, not %d", width);
        return -1;
    }
    if (has_base && kind != KIND_XOR && kind != KIND_ORD) {
        PyErr_Format(PyExc_ValueError, "unknown delta kind %d", kind);
        return -1;
    }
    return 0;
}

/* Release an optional buffer argument (one never filled has no owner). */
static void release_view(Py_buffer *view)
{
    if (view->obj)
        PyBuffer_Release(view);
}

/* A buffer argument that must hold exactly `len` bytes (a delta base, an extrapolation's
 * second source). On error `buf` may hold a view the caller releases. */
static int get_same_length(PyObject *obj, Py_buffer *buf, Py_ssize_t len, const char *what)
{
    if (PyObject_GetBuffer(obj, buf, PyBUF_SIMPLE) < 0)
        return -1;
    if (buf->len != len) {
        PyErr_Format(PyExc_ValueError, "%s must have the tensor's length", what);
        return -1;
    }
    return 0;
}

/* ---- split ----------------------------------------------------------------------------- */

PyDoc_STRVAR(split_doc,
"split(body, width, rotate, base=None, kind=1) -> bytes\n\n"
"The planes of body's whole elements, concatenated (plane i is bytes [i*n, (i+1)*n)).\n"
"With base (same length as body): the planes of the difference of `kind` (0 XOR, 1 ORD).");

static PyObject *native_split(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"body", "width", "rotate", "base", "kind", NULL};
    Py_buffer body, base = {0};
    int width, rotate, kind = KIND_ORD;
    PyObject *base_obj = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*ip|Oi", kwlist, &body, &width, &rotate, &base_obj, &kind))
        return NULL;
    PyObject *out = NULL;
    int has_base = base_obj != Py_None;
    if (check_layout(width, kind, has_base) < 0)
        goto done;
    if (has_base && get_same_length(base_obj, &base, body.len, "a delta base") < 0)
        goto done;
    Py_ssize_t n = body.len / width;
    out = PyBytes_FromStringAndSize(NULL, n * width);
    if (out == NULL)
        goto done;
    {
        const uint8_t *src = body.buf, *bsrc = has_base ? base.buf : NULL;
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        int mode = split_mode(rotate, has_base ? kind : KIND_NONE);
        ENTER_NOGIL(n * width)
        split_words(width, src, bsrc, NULL, dst, n, mode);
        LEAVE_NOGIL()
    }
done:
    PyBuffer_Release(&body);
    release_view(&base);
    return out;
}

/* ---- join ------------------------------------------------------------------------------ */

PyDoc_STRVAR(join_doc,
"join(planes, width, rotate, n, base=None, kind=1, head=b'', tail=b'') -> bytes\n\n"
"Inverse of split: head + the n words rebuilt from `width` planes of n bytes each\n"
"(undoing the difference against base when given) + tail, in one new bytes object.");

static PyObject *native_join(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"planes", "width", "rotate", "n", "base", "kind", "head", "tail", NULL};
    PyObject *planes_obj, *base_obj = Py_None, *seq = NULL, *out = NULL;
    int width, rotate, kind = KIND_ORD;
    Py_ssize_t n;
    Py_buffer head = {0}, tail = {0}, base = {0}, pbuf[8];
    int nplanes = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Oipn|Oiy*y*", kwlist, &planes_obj, &width, &rotate, &n,
                                     &base_obj, &kind, &head, &tail))
        return NULL;
    int has_base = base_obj != Py_None;
    if (check_layout(width, kind, has_base) < 0)
        goto done;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative element count");
        goto done;
    }
    seq = PySequence_Fast(planes_obj, "planes must be a sequence");
    if (seq == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(seq) != width) {
        PyErr_Format(PyExc_ValueError, "%d planes expected, got %zd", width, PySequence_Fast_GET_SIZE(seq));
        goto done;
    }
    const uint8_t *pptr[8];
    for (; nplanes < width; nplanes++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(seq, nplanes), &pbuf[nplanes], PyBUF_SIMPLE) < 0)
            goto done;
        if (pbuf[nplanes].len != n) {
            PyErr_Format(PyExc_ValueError, "plane %d holds %zd bytes, %zd expected", nplanes, pbuf[nplanes].len, n);
            nplanes++;
            goto done;
        }
        pptr[nplanes] = pbuf[nplanes].buf;
    }
    if (has_base) {
        if (PyObject_GetBuffer(base_obj, &base, PyBUF_SIMPLE) < 0)
            goto done;
        if (base.len < n * width) {
            PyErr_SetString(PyExc_ValueError, "a delta base must have the tensor's length");
            goto done;
        }
    }
    out = PyBytes_FromStringAndSize(NULL, head.len + n * width + tail.len);
    if (out == NULL)
        goto done;
    {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *bsrc = has_base ? base.buf : NULL;
        int mode = split_mode(rotate, has_base ? kind : KIND_NONE);
        if (head.len)
            memcpy(dst, head.buf, head.len);
        ENTER_NOGIL(n * width)
        join_words(width, pptr, bsrc, NULL, dst + head.len, n, mode);
        LEAVE_NOGIL()
        memcpy(dst + head.len + n * width, tail.buf, tail.len);
    }
done:
    for (int i = 0; i < nplanes; i++)
        PyBuffer_Release(&pbuf[i]);
    Py_XDECREF(seq);
    release_view(&base);
    release_view(&head);
    release_view(&tail);
    return out;
}

/* ---- survey ---------------------------------------------------------------------------- */

static void histogram(const uint8_t *p, Py_ssize_t n, Py_ssize_t counts[256])
{
    /* Four sub-histograms: consecutive equal bytes (common in skewed planes) would
     * otherwise serialise on one counter. 32-bit counters (a smaller table) over chunks
     * short enough that they cannot overflow. */
    uint32_t c[4][256];
    memset(counts, 0, 256 * sizeof(Py_ssize_t));
    while (n > 0) {
        Py_ssize_t len = n < ((Py_ssize_t)1 << 30) ? n : ((Py_ssize_t)1 << 30);
        memset(c, 0, sizeof c);
        Py_ssize_t i = 0;
        for (; i + 4 <= len; i += 4) {
            c[0][p[i]]++;
            c[1][p[i + 1]]++;
            c[2][p[i + 2]]++;
            c[3][p[i + 3]]++;
        }
        for (; i < len; i++)
            c[0][p[i]]++;
        for (int v = 0; v < 256; v++)
            counts[v] += (Py_ssize_t)c[0][v] + c[1][v] + c[2][v] + c[3][v];
        p += len;
        n -= len;
    }
}

/* Bytes the entropy estimate of survey() reads at most: every stride-th byte, stride =
 * max(1, n / SURVEY_SAMPLE) (so 4096 to 8191 of them). Same constant in reference.py. */
#define SURVEY_SAMPLE 4096

/* c * log2(c) for every count a survey can see (a sample holds at most 2 * SURVEY_SAMPLE
 * bytes), filled at import with the very expression survey_c used to evaluate per count,
 * so entropies, and the choices made from them, are bit for bit what they were. */
#define XLOG2X_SIZE (2 * SURVEY_SAMPLE)
static double xlog2x[XLOG2X_SIZE];

static void fill_xlog2x(void)
{
    for (int i = 1; i < XLOG2X_SIZE; i++) {
        double c = (double)i;
        xlog2x[i] = c * log2(c);
    }
}

static inline double c_log2_c(uint32_t count)
{
    if (count < XLOG2X_SIZE)
        return xlog2x[count];
    double c = (double)count;
    return c * log2(c);
}

PyDoc_STRVAR(survey_doc,
"survey(section) -> (fill, entropy)\n\n"
"fill: the byte value when every byte of a non-empty section is that value, else -1;\n"
"entropy: the order-0 entropy in bits per byte (0.0 for an empty section) of a sample of\n"
"the section, every stride-th byte from the first, stride = max(1, n // 4096):\n"
"(m*log2(m) - sum(c*log2(c)))/m over the sample's byte counts c in byte-value order.");

static void survey_c(const uint8_t *p, Py_ssize_t n, int *fill_out, double *entropy_out)
{
    int fill = -1;
    double entropy = 0.0;
    if (n > 0) {
        /* Most sections differ within a few bytes: this loop is a full scan only for fills. */
        Py_ssize_t i = 1;
        while (i < n && p[i] == p[0])
            i++;
        if (i == n)
            fill = p[0];
        Py_ssize_t stride = n / SURVEY_SAMPLE > 1 ? n / SURVEY_SAMPLE : 1;
        /* Four sub-histograms, as in histogram(): skewed sections repeat one value. */
        uint32_t sub[4][256], counts[256];
        memset(sub, 0, sizeof sub);
        Py_ssize_t m = 0;
        for (i = 0; i + 3 * stride < n; i += 4 * stride, m += 4) {
            sub[0][p[i]]++;
            sub[1][p[i + stride]]++;
            sub[2][p[i + 2 * stride]]++;
            sub[3][p[i + 3 * stride]]++;
        }
        for (; i < n; i += stride, m++)
            sub[0][p[i]]++;
        for (int v = 0; v < 256; v++)
            counts[v] = sub[0][v] + sub[1][v] + sub[2][v] + sub[3][v];
        double acc = 0.0;
        for (int v = 0; v < 256; v++) {
            if (counts[v])
                acc += c_log2_c(counts[v]);
        }
        entropy = (c_log2_c((uint32_t)m) - acc) / (double)m;
    }
    *fill_out = fill;
    *entropy_out = entropy;
}

static PyObject *native_survey(PyObject *self, PyObject *arg)
{
    Py_buffer buf;
    if (PyObject_GetBuffer(arg, &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    int fill;
    double entropy;
    survey_c(buf.buf, buf.len, &fill, &entropy);
    PyBuffer_Release(&buf);
    return Py_BuildValue("(id)", fill, entropy);
}

/* ---- code sections (frames mode 3) ----------------------------------------------------- */

PyDoc_STRVAR(pack_codes_doc,
"pack_codes(section, bits=0) -> (bits, table, packed, escapes)\n\n"
"Each byte as a `bits`-bit code (0: 2 when the three most frequent values cover 90% of\n"
"the bytes, else 4). table: the up to 2^bits-1 most frequent values present (ties to the\n"
"smaller value); packed: the codes, 8/bits a byte, first code in the high bits, zero\n"
"padded; escapes: the bytes that got the all-ones code, in order.");

/* What pack_codes decides before writing anything: the code width (`bits`; 0 chooses),
 * the table of the k most frequent values, the byte -> code map, and how many bytes will
 * need the escape code (returned). */
static Py_ssize_t codes_plan(const uint8_t *src, Py_ssize_t n, int bits_in, int *bits_out, uint8_t table[16], int *k_out,
                             uint8_t lut[256])
{
    Py_ssize_t counts[256];
    histogram(src, n, counts);
    int bits = bits_in;
    if (bits == 0) {
        Py_ssize_t top[3] = {0, 0, 0};
        for (int v = 0; v < 256; v++) {
            Py_ssize_t c = counts[v];
            if (c > top[0]) { top[2] = top[1]; top[1] = top[0]; top[0] = c; }
            else if (c > top[1]) { top[2] = top[1]; top[1] = c; }
            else if (c > top[2]) { top[2] = c; }
        }
        bits = (double)(top[0] + top[1] + top[2]) >= 0.9 * (double)n ? 2 : 4;
    }
    const int escape = (1 << bits) - 1;
    /* The table: the most frequent values present, most frequent first, ties to the
     * smaller value (numpy's stable argsort), by insertion in one pass over the values. */
    int k = 0;
    for (int v = 0; v < 256; v++) {
        Py_ssize_t c = counts[v];
        int pos;
        if (c == 0)
            continue;
        if (k < escape)
            pos = k++;
        else if (c > counts[table[k - 1]])
            pos = k - 1;
        else
            continue;
        while (pos > 0 && counts[table[pos - 1]] < c) {
            table[pos] = table[pos - 1];
            pos--;
        }
        table[pos] = (uint8_t)v;
    }
    memset(lut, escape, 256);
    Py_ssize_t n_escapes = n;
    for (int c = 0; c < k; c++) {
        lut[table[c]] = (uint8_t)c;
        n_escapes -= counts[table[c]];
    }
    *bits_out = bits;
    *k_out = k;
    return n_escapes;
}

/* The whole groups of `per` bytes of codes_fill, for a constant code width: each group
 * packed into one byte (first code in the high bits), its escaped bytes appended in
 * order. Returns the escapes written, n_escapes + 1 once there would be more. */
static ALWAYS_INLINE Py_ssize_t fill_groups(const uint8_t *restrict src, Py_ssize_t full, const uint8_t lut[256],
                                            const uint8_t emask[256], uint8_t *restrict pk, uint8_t *restrict esc,
                                            Py_ssize_t n_escapes, const int per, const int bits)
{
    Py_ssize_t e = 0;
    for (Py_ssize_t j = 0; j < full; j++) {
        const uint8_t *g = src + per * j;
        unsigned b = 0;
        for (int c = 0; c < per; c++)
            b = b << bits | lut[g[c]];
        pk[j] = (uint8_t)b;
        if (emask[b]) {
            for (int c = 0; c < per; c++) {
                if (emask[b] >> c & 1) {
                    if (e < n_escapes)
                        esc[e++] = g[c];
                    else
                        e = n_escapes + 1;
                }
            }
        }
    }
    return e;
}

/* Write the packed codes (ceil(n / (8/bits)) bytes) and the escaped bytes planned by
 * codes_plan. Returns the escapes written: n_escapes, unless `src` changed since the plan
 * (another thread wrote to it), which never writes past `esc + n_escapes`. */
static Py_ssize_t codes_fill(const uint8_t *src, Py_ssize_t n, int bits, const uint8_t lut[256], uint8_t *pk,
                             uint8_t *esc, Py_ssize_t n_escapes)
{
    const int per = 8 / bits, escape = (1 << bits) - 1;
    const Py_ssize_t full = n / per, n_packed = (n + per - 1) / per;
    /* Per packed byte value: which of its codes are the escape (bit c: code c). */
    uint8_t emask[256];
    for (int v = 0; v < 256; v++) {
        emask[v] = 0;
        for (int c = 0; c < per; c++)
            emask[v] |= (uint8_t)((((v >> (bits * (per - 1 - c))) & escape) == escape) << c);
    }
    Py_ssize_t e = bits == 2 ? fill_groups(src, full, lut, emask, pk, esc, n_escapes, 4, 2)
                             : fill_groups(src, full, lut, emask, pk, esc, n_escapes, 2, 4);
    if (full < n_packed) {
        /* The last, partial group: zero codes pad it. */
        unsigned acc = 0;
        for (int c = 0; c < n - full * per; c++) {
            const uint8_t v = src[full * per + c];
            acc |= (unsigned)lut[v] << (bits * (per - 1 - c));
            if (lut[v] == escape) {
                if (e < n_escapes) esc[e++] = v; else e = n_escapes + 1;
            }
        }
        pk[full] = (uint8_t)acc;
    }
    return e;
}

static PyObject *native_pack_codes(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int bits = 0;
    if (!PyArg_ParseTuple(args, "y*|i", &buf, &bits))
        return NULL;
    PyObject *result = NULL, *packed = NULL, *escapes = NULL;
    if (bits != 0 && bits != 2 && bits != 4) {
        PyErr_Format(PyExc_ValueError, "code width must be 2 or 4, not %d", bits);
        goto done;
    }
    const uint8_t *src = buf.buf;
    Py_ssize_t n = buf.len;
    uint8_t table[16], lut[256];
    int k;
    Py_ssize_t n_escapes = codes_plan(src, n, bits, &bits, table, &k, lut);
    const int per = 8 / bits;
    packed = PyBytes_FromStringAndSize(NULL, (n + per - 1) / per);
    escapes = PyBytes_FromStringAndSize(NULL, n_escapes);
    if (packed == NULL || escapes == NULL)
        goto done;
    {
        uint8_t *pk = (uint8_t *)PyBytes_AS_STRING(packed), *esc = (uint8_t *)PyBytes_AS_STRING(escapes);
        Py_ssize_t e;
        ENTER_NOGIL(n)
        e = codes_fill(src, n, bits, lut, pk, esc, n_escapes);
        LEAVE_NOGIL()
        if (e != n_escapes) {
            /* Only a buffer another thread wrote to while the GIL was released gets here;
             * the escape buffer was never written past its end. */
            PyErr_SetString(PyExc_ValueError, "the section changed while it was being encoded");
            goto done;
        }
    }
    result = Py_BuildValue("(iy#OO)", bits, (const char *)table, (Py_ssize_t)k, packed, escapes);
done:
    Py_XDECREF(packed);
    Py_XDECREF(escapes);
    PyBuffer_Release(&buf);
    return result;
}

static int check_code_args(int bits, int k)
{
    if ((bits != 2 && bits != 4) || k < 0 || k >= (1 << bits)) {
        PyErr_SetString(PyExc_ValueError, "bad code table");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(count_escapes_doc,
"count_escapes(packed, bits, k, expect) -> int\n\n"
"How many escape codes the packed codes of an `expect`-byte section hold, checking them:\n"
"-1 when the codes after the last one (padding) are not zero, -2 when a code (padding\n"
"included) is neither below k nor the escape. packed holds ceil(expect/(8/bits)) bytes.");

/* __builtin_popcountll is a call to libgcc's __popcountdi2 unless the compiler may use the
 * POPCNT instruction, which the x86-64 baseline the extension is built for lacks. There the
 * word loop below is compiled a second time for POPCNT, taken when the CPU has it (asked
 * at import: have_popcnt); elsewhere (another CPU, or -mpopcnt) it is compiled once. */
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && !defined(__POPCNT__)
#define POPCNT_VARIANT 1
static int have_popcnt;
#endif

/* count_escapes for valid arguments (bits 2 or 4, 0 <= k < 2^bits, expect >= 0), 64 bits of
 * codes a step; the tail code by code. */
static ALWAYS_INLINE Py_ssize_t count_escapes_body(const uint8_t *pk, Py_ssize_t n, int bits, int k, Py_ssize_t expect)
{
    const int per = 8 / bits, escape = (1 << bits) - 1;
    if (expect % per && n) {
        unsigned last = pk[n - 1];
        for (int c = (int)(expect % per); c < per; c++)
            if ((last >> (bits * (per - 1 - c))) & escape)
                return -1;
    }
    Py_ssize_t result = 0, j = 0;
    uint64_t bad_bits = 0;
    if (bits == 2) {
        /* 32 codes a step: per code, hi = its high bit, lo = its low bit; the escape is
         * hi & lo, and a code >= k that is not the escape is, by k: 0 any other, 1 codes
         * 1 and 2, 2 code 2 (k = 3 leaves none). */
        const uint64_t L = 0x5555555555555555ull;
        for (; j + 8 <= n; j += 8) {
            uint64_t x;
            memcpy(&x, pk + j, 8);
            uint64_t hi = (x >> 1) & L, lo = x & L;
            result += __builtin_popcountll(hi & lo);
            bad_bits |= k == 0 ? ~(hi & lo) & L : k == 1 ? hi ^ lo : k == 2 ? hi & ~lo : 0;
        }
    } else {
        /* 16 codes a step, the low and the high codes of the bytes apart, one a byte lane:
         * lane + 1 carries into bit 4 only for the escape (15); (lane | 0x80) - k keeps bit 7
         * only for a code >= k (no lane borrows from the next). */
        const uint64_t N = 0x0F0F0F0F0F0F0F0Full, ONE = 0x0101010101010101ull, TOP = ONE << 7;
        const uint64_t K = (uint64_t)k * ONE;
        for (; j + 8 <= n; j += 8) {
            uint64_t x;
            memcpy(&x, pk + j, 8);
            uint64_t lo = x & N, hi = x >> 4 & N;
            uint64_t lo_esc = (lo + ONE) & ONE << 4, hi_esc = (hi + ONE) & ONE << 4;
            result += __builtin_popcountll(lo_esc | hi_esc >> 1);
            bad_bits |= (((lo | TOP) - K) & TOP & ~(lo_esc << 3)) | (((hi | TOP) - K) & TOP & ~(hi_esc << 3));
        }
    }
    for (; j < n; j++) {
        for (int c = 0; c < per; c++) {
            int code = (pk[j] >> (bits * (per - 1 - c))) & escape;
            if (code == escape)
                result++;
            else if (code >= k)
                bad_bits = 1;
        }
    }
    return bad_bits ? -2 : result;
}

#ifdef POPCNT_VARIANT
__attribute__((target("popcnt"))) static Py_ssize_t count_escapes_popcnt(const uint8_t *pk, Py_ssize_t n, int bits, int k,
                                                                         Py_ssize_t expect)
{
    return count_escapes_body(pk, n, bits, k, expect);
}

static Py_ssize_t count_escapes_plain(const uint8_t *pk, Py_ssize_t n, int bits, int k, Py_ssize_t expect)
{
    return count_escapes_body(pk, n, bits, k, expect);
}
#endif

static Py_ssize_t count_escapes_c(const uint8_t *pk, Py_ssize_t n, int bits, int k, Py_ssize_t expect)
{
#ifdef POPCNT_VARIANT
    if (have_popcnt)
        return count_escapes_popcnt(pk, n, bits, k, expect);
    return count_escapes_plain(pk, n, bits, k, expect);
#else
    return count_escapes_body(pk, n, bits, k, expect);
#endif
}

static PyObject *native_count_escapes(PyObject *self, PyObject *args)
{
    Py_buffer buf;
    int bits, k;
    Py_ssize_t expect;
    if (!PyArg_ParseTuple(args, "y*iin", &buf, &bits, &k, &expect))
        return NULL;
    if (check_code_args(bits, k) < 0 || expect < 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "negative section size");
        PyBuffer_Release(&buf);
        return NULL;
    }
    Py_ssize_t result;
    ENTER_NOGIL(buf.len)
    result = count_escapes_c(buf.buf, buf.len, bits, k, expect);
    LEAVE_NOGIL()
    PyBuffer_Release(&buf);
    return PyLong_FromSsize_t(result);
}

PyDoc_STRVAR(unpack_codes_doc,
"unpack_codes(packed, escapes, table, bits, expect) -> bytes\n\n"
"Inverse of pack_codes for codes count_escapes accepted: the `expect` bytes, table[code]\n"
"for each code below len(table), the next byte of escapes for each escape code.");

/* Escape codes, found 64 bits of codes at a time and taken in order, get the escape bytes
 * (the codes were unpacked through the table already, escapes included). `bits` codes a
 * word: in each byte the codes reversed (first code in the low bits), so that bit order is
 * code order, code i of the word at bits bits*i; `ones` has the lowest bit of each code.
 * Escapes are a few percent of the codes: a branch per packed byte on them was mispredicted
 * often. Returns 1 when the escapes run out before the escape codes do. */
static ALWAYS_INLINE int put_escapes(const uint8_t *restrict pk, Py_ssize_t n_packed, const uint8_t *restrict esc,
                                     Py_ssize_t n_esc, uint8_t *restrict dst, Py_ssize_t expect, const int bits)
{
    const int per = 8 / bits;
    Py_ssize_t e = 0;
    for (Py_ssize_t w = 0; w < n_packed; w += 8) {
        uint64_t x = 0, m;
        if (n_packed - w >= 8)
            memcpy(&x, pk + w, 8); /* a constant size: one load, not a call to memcpy */
        else
            memcpy(&x, pk + w, (size_t)(n_packed - w));
        x = LE64(x);
        if (bits == 2) {
            x = (x & 0x3333333333333333ull) << 2 | (x >> 2 & 0x3333333333333333ull);
            x = (x & 0x0F0F0F0F0F0F0F0Full) << 4 | (x >> 4 & 0x0F0F0F0F0F0F0F0Full);
            m = x & x >> 1 & 0x5555555555555555ull;
        } else {
            x = (x & 0x0F0F0F0F0F0F0F0Full) << 4 | (x >> 4 & 0x0F0F0F0F0F0F0F0Full);
            m = x & x >> 1 & x >> 2 & x >> 3 & 0x1111111111111111ull;
        }
        for (; m; m &= m - 1) {
            Py_ssize_t at = per * w + __builtin_ctzll(m) / bits;
            if (at >= expect)
                break; /* padding (count_escapes refuses an escape there) */
            if (e >= n_esc)
                return 1;
            dst[at] = esc[e++];
        }
    }
    return 0;
}

/* The codes of `bits` bits in two passes: every packed byte becomes its per = 8/bits table
 * bytes (one fixed-size copy, no branch), then put_escapes. */
static ALWAYS_INLINE int unpack_loop(const uint8_t *restrict pk, Py_ssize_t n_packed, const uint8_t *restrict esc,
                                     Py_ssize_t n_esc, const uint8_t dec[256][4], uint8_t *restrict dst, Py_ssize_t expect,
                                     const int bits)
{
    const int per = 8 / bits;
    const Py_ssize_t full = expect / per;
    for (Py_ssize_t j = 0; j < full; j++)
        memcpy(dst + per * j, dec[pk[j]], per);
    if (full < n_packed)
        memcpy(dst + per * full, dec[pk[full]], (size_t)(expect - per * full));
    return put_escapes(pk, n_packed, esc, n_esc, dst, expect, bits);
}

/* unpack_codes for codes count_escapes accepted; table holds k <= 15 values. Returns 1
 * when the escapes run out before the escape codes do. */
static int unpack_codes_c(const uint8_t *pk, Py_ssize_t n_packed, const uint8_t *esc, Py_ssize_t n_esc,
                          const uint8_t *table_in, int k, int bits, uint8_t *dst, Py_ssize_t expect)
{
    const int per = 8 / bits, escape = (1 << bits) - 1;
    uint8_t table[16] = {0};
    memcpy(table, table_in, (size_t)k);
    /* Per packed byte value: its `per` decoded bytes (an escape's is overwritten). */
    uint8_t dec[256][4];
    for (int v = 0; v < 256; v++)
        for (int c = 0; c < per; c++)
            dec[v][c] = table[(v >> (bits * (per - 1 - c))) & escape];
    if (bits == 2)
        return unpack_loop(pk, n_packed, esc, n_esc, dec, dst, expect, 2);
    return unpack_loop(pk, n_packed, esc, n_esc, dec, dst, expect, 4);
}

static PyObject *native_unpack_codes(PyObject *self, PyObject *args)
{
    Py_buffer pbuf, ebuf, tbuf;
    int bits;
    Py_ssize_t expect;
    if (!PyArg_ParseTuple(args, "y*y*y*in", &pbuf, &ebuf, &tbuf, &bits, &expect))
        return NULL;
    PyObject *out = NULL;
    if (check_code_args(bits, (int)(tbuf.len < 16 ? tbuf.len : 16)) < 0 || tbuf.len > 15)
        goto done;
    const int per = 8 / bits;
    if (expect < 0 || pbuf.len != (expect + per - 1) / per) {
        PyErr_SetString(PyExc_ValueError, "packed codes do not match the section size");
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, expect);
    if (out == NULL)
        goto done;
    {
        int short_escapes;
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        ENTER_NOGIL(expect)
        short_escapes = unpack_codes_c(pbuf.buf, pbuf.len, ebuf.buf, ebuf.len, tbuf.buf, (int)tbuf.len, bits, dst, expect);
        LEAVE_NOGIL()
        if (short_escapes) {
            Py_CLEAR(out);
            PyErr_SetString(PyExc_ValueError, "fewer escaped bytes than escape codes");
        }
    }
done:
    PyBuffer_Release(&pbuf);
    PyBuffer_Release(&ebuf);
    PyBuffer_Release(&tbuf);
    return out;
}

/* ---- extrapolation score ----------------------------------------------------------------- */

/* Signed value-order integer of a word: floats through ord (its top bit then orders like a
 * sign), integers as they are. */
#define DEFINE_SCORE(W, T, ST)                                                                   \
    static void score_##W(const uint8_t *x, const uint8_t *b, const uint8_t *p, Py_ssize_t n,   \
                          Py_ssize_t step, int rotate, uint64_t *plain, uint64_t *extrap)        \
    {                                                                                           \
        uint64_t s1 = 0, s2 = 0;                                                                \
        for (Py_ssize_t i = 0; i < n; i += step) {                                              \
            T wx = load_##W(x + i * W), wb = load_##W(b + i * W), wp = load_##W(p + i * W);     \
            if (rotate) {                                                                       \
                wx = ord_##W(wx);                                                               \
                wb = ord_##W(wb);                                                               \
                wp = ord_##W(wp);                                                               \
            }                                                                                   \
            int64_t vx = (ST)wx, vb = (ST)wb, vp = (ST)wp;                                      \
            int64_t d1 = vx - vb, d2 = d1 - (vb - vp);                                          \
            uint64_t m1 = d1 < 0 ? (uint64_t)(-d1) : (uint64_t)d1;                              \
            uint64_t m2 = d2 < 0 ? (uint64_t)(-d2) : (uint64_t)d2;                              \
            s1 += m1 ? (uint64_t)(64 - __builtin_clzll(m1)) : 0;                                \
            s2 += m2 ? (uint64_t)(64 - __builtin_clzll(m2)) : 0;                                \
        }                                                                                       \
        *plain = s1;                                                                            \
        *extrap = s2;                                                                           \
    }

DEFINE_SCORE(2, uint16_t, int16_t)
DEFINE_SCORE(4, uint32_t, int32_t)

PyDoc_STRVAR(extrapolation_score_doc,
"extrapolation_score(body, base, prev, width, rotate, step) -> (plain, extrapolated)\n\n"
"Over elements 0, step, 2*step, ... of three equal-length tensors of 2- or 4-byte words:\n"
"the summed bit lengths of |x - b| and of |x - (2b - p)|, x, b, p their value-order\n"
"integers (exact in 64 bits for these widths).");

static PyObject *native_extrapolation_score(PyObject *self, PyObject *args)
{
    Py_buffer xb, bb, pb;
    int width, rotate;
    Py_ssize_t step;
    PyObject *out = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*ipn", &xb, &bb, &pb, &width, &rotate, &step))
        return NULL;
    if (width != 2 && width != 4) {
        PyErr_Format(PyExc_ValueError, "extrapolation is scored for 2- and 4-byte words, not %d", width);
    } else if (bb.len != xb.len || pb.len != xb.len) {
        PyErr_SetString(PyExc_ValueError, "body, base and prev must have the same length");
    } else if (step < 1) {
        PyErr_SetString(PyExc_ValueError, "step must be at least 1");
    } else {
        uint64_t plain, extrap;
        Py_ssize_t n = xb.len / width;
        if (width == 2)
            score_2(xb.buf, bb.buf, pb.buf, n, step, rotate, &plain, &extrap);
        else
            score_4(xb.buf, bb.buf, pb.buf, n, step, rotate, &plain, &extrap);
        out = Py_BuildValue("(KK)", (unsigned long long)plain, (unsigned long long)extrap);
    }
    PyBuffer_Release(&xb);
    PyBuffer_Release(&bb);
    PyBuffer_Release(&pb);
    return out;
}

/* ---- zstd, loaded at run time ------------------------------------------------------------ */

/* The whole-record calls below need zstd from C. The zstandard wheel links its own copy
 * privately, and no zstd.h is installed here, so the system's libzstd.so.1 is opened at
 * import with dlopen and its stable API (the functions and parameter numbers of zstd.h's
 * stable section, unchanged since 1.4) is declared here. Without the library the module
 * still loads: has_zstd() says False and the codec keeps its per-section Python path. */

typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;

enum {
    ZSTD_c_compressionLevel = 100, ZSTD_c_windowLog = 101, ZSTD_c_hashLog = 102, ZSTD_c_chainLog = 103,
    ZSTD_c_searchLog = 104, ZSTD_c_minMatch = 105, ZSTD_c_targetLength = 106, ZSTD_c_strategy = 107,
    ZSTD_c_contentSizeFlag = 200, ZSTD_fast = 1,
};
#define ZSTD_CONTENTSIZE_UNKNOWN (0ULL - 1)
#define ZSTD_CONTENTSIZE_ERROR (0ULL - 2)

static struct {
    int ok;
    unsigned version;
    ZSTD_CCtx *(*createCCtx)(void);
    size_t (*CCtx_setParameter)(ZSTD_CCtx *, int, int);
    size_t (*compress2)(ZSTD_CCtx *, void *, size_t, const void *, size_t);
    size_t (*compressBound)(size_t);
    unsigned (*isError)(size_t);
    const char *(*getErrorName)(size_t);
    ZSTD_DCtx *(*createDCtx)(void);
    size_t (*decompressDCtx)(ZSTD_DCtx *, void *, size_t, const void *, size_t);
    unsigned long long (*getFrameContentSize)(const void *, size_t);
    unsigned (*versionNumber)(void);
    size_t (*freeCCtx)(ZSTD_CCtx *);
    size_t (*freeDCtx)(ZSTD_DCtx *);
} zl;

static void load_zstd(void)
{
    void *h = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL)
        return;
#define SYM(field, name) if ((*(void **)&zl.field = dlsym(h, name)) == NULL) return;
    SYM(createCCtx, "ZSTD_createCCtx")
    SYM(CCtx_setParameter, "ZSTD_CCtx_setParameter")
    SYM(compress2, "ZSTD_compress2")
    SYM(compressBound, "ZSTD_compressBound")
    SYM(isError, "ZSTD_isError")
    SYM(getErrorName, "ZSTD_getErrorName")
    SYM(createDCtx, "ZSTD_createDCtx")
    SYM(decompressDCtx, "ZSTD_decompressDCtx")
    SYM(getFrameContentSize, "ZSTD_getFrameContentSize")
    SYM(versionNumber, "ZSTD_versionNumber")
    SYM(freeCCtx, "ZSTD_freeCCtx")
    SYM(freeDCtx, "ZSTD_freeDCtx")
#undef SYM
    zl.version = zl.versionNumber();
    zl.ok = zl.version >= 10400;
}

/* One compression and one decompression context per thread, made on first use. The
 * compression context holds frames.py's plane parameters (zstd.PLANE_PARAMS on level 1,
 * every parameter set as python-zstandard's from_level(1, ...) sets them). */
static __thread ZSTD_CCtx *tl_cctx;
static __thread ZSTD_DCtx *tl_dctx;

/* Everything a thread keeps here (zstd contexts, scratch buffers) is freed when the
 * thread ends, by the destructor of a pthread key the thread is registered under on
 * first use: a program that runs the codec on many short-lived threads would otherwise
 * leak a few MiB per thread. */
static pthread_key_t tl_key;
static int tl_key_ok;
static __thread int tl_registered;
static void free_thread_state(void *unused);

static void register_thread(void)
{
    if (!tl_registered && tl_key_ok) {
        pthread_setspecific(tl_key, (void *)1);
        tl_registered = 1;
    }
}

static ZSTD_CCtx *plane_cctx(void)
{
    if (tl_cctx == NULL) {
        register_thread();
        ZSTD_CCtx *c = zl.createCCtx();
        if (c == NULL)
            return NULL;
        static const int params[][2] = {
            {ZSTD_c_windowLog, 19}, {ZSTD_c_chainLog, 12}, {ZSTD_c_hashLog, 6}, {ZSTD_c_searchLog, 1},
            {ZSTD_c_minMatch, 7}, {ZSTD_c_targetLength, 0}, {ZSTD_c_strategy, ZSTD_fast}, {ZSTD_c_contentSizeFlag, 1},
        };
        for (size_t i = 0; i < sizeof params / sizeof params[0]; i++)
            zl.CCtx_setParameter(c, params[i][0], params[i][1]);
        tl_cctx = c;
    }
    return tl_cctx;
}

/* ---- whole sections: frames.py in one call --------------------------------------------- */

/* A growing byte string; `failed` once an allocation did not succeed (BUF_NO_MEMORY) or
 * the input changed while it was read (BUF_INPUT_CHANGED: another thread wrote to it):
 * every later append is then a no-op and the caller raises accordingly. */
enum { BUF_NO_MEMORY = 1, BUF_INPUT_CHANGED = 2 };
typedef struct {
    uint8_t *p;
    size_t len, cap;
    int failed;
} Buf;

static int buf_reserve(Buf *b, size_t extra)
{
    if (b->failed)
        return -1;
    if (b->len + extra <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *p = realloc(b->p, cap);
    if (p == NULL) {
        b->failed |= BUF_NO_MEMORY;
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void buf_put(Buf *b, const void *src, size_t n)
{
    if (n && buf_reserve(b, n) == 0) {
        memcpy(b->p + b->len, src, n);
        b->len += n;
    }
}

static void buf_byte(Buf *b, uint8_t v)
{
    buf_put(b, &v, 1);
}

static void buf_varint(Buf *b, size_t v)
{
    uint8_t tmp[10];
    int n = 0;
    do {
        uint8_t byte = v & 0x7F;
        v >>= 7;
        tmp[n++] = v ? (uint8_t)(byte | 0x80) : byte;
    } while (v);
    buf_put(b, tmp, n);
}

/* Per-thread scratch memory, kept between calls: a fresh malloc per section meant page
 * faults on every call, and page faults of two threads serialise on the process's memory
 * map (two encoding threads measured slower than one). Buffers above SCRATCH_KEEP are
 * released at the end of each call so a huge tensor does not pin its size per thread. */
enum { SC_PLANES, SC_FRAME, SC_CODES, SC_ESCAPES, SC_SLOTS };
#define SCRATCH_KEEP ((size_t)8 << 20)
static __thread Buf tl_scratch[SC_SLOTS];
static __thread Buf tl_out, tl_plain, tl_coded;

static uint8_t *scratch(int slot, size_t n)
{
    Buf *b = &tl_scratch[slot];
    register_thread();
    b->len = 0;
    b->failed = 0;
    return buf_reserve(b, n + 1) == 0 ? b->p : NULL;
}

static void trim_buf(Buf *b)
{
    if (b->cap > SCRATCH_KEEP) {
        free(b->p);
        b->p = NULL;
        b->cap = 0;
    }
    b->len = 0;
    b->failed = 0;
}

static void free_thread_state(void *unused)
{
    (void)unused;
    Buf *bufs[] = {&tl_scratch[0], &tl_scratch[1], &tl_scratch[2], &tl_scratch[3], &tl_out, &tl_plain, &tl_coded};
    for (size_t i = 0; i < sizeof bufs / sizeof bufs[0]; i++) {
        free(bufs[i]->p);
        *bufs[i] = (Buf){0};
    }
    if (tl_cctx)
        zl.freeCCtx(tl_cctx);
    if (tl_dctx)
        zl.freeDCtx(tl_dctx);
    tl_cctx = NULL;
    tl_dctx = NULL;
    tl_registered = 0;
}

static void trim_scratch(void)
{
    for (int i = 0; i < SC_SLOTS; i++)
        trim_buf(&tl_scratch[i]);
    trim_buf(&tl_out);
    trim_buf(&tl_plain);
    trim_buf(&tl_coded);
}

enum { S_RAW = 0, S_ZSTD = 1, S_FILL = 2, S_CODES = 3 };
/* frames.py's constants, for the same choices (see there for why these values). */
#define RAW_ENTROPY_BITS 7.8
#define CODES_FIRST_LO 0.2
#define CODES_FIRST_HI 2.0
#define CODES_TRIAL_BITS 2.4

/* frames._plain + _put_plain: the section as fill, zstd frame or raw, whichever is smallest. */
static void put_plain(Buf *out, const uint8_t *s, size_t n, int fill, double entropy)
{
    if (n > 2 && fill >= 0) {
        buf_byte(out, S_FILL);
        buf_byte(out, (uint8_t)fill);
        return;
    }
    if (n > 16 && entropy < RAW_ENTROPY_BITS) {
        ZSTD_CCtx *c = plane_cctx();
        size_t bound = zl.compressBound(n);
        uint8_t *frame = c ? scratch(SC_FRAME, bound) : NULL;
        if (frame == NULL) {
            out->failed |= BUF_NO_MEMORY;
            return;
        }
        size_t got = zl.compress2(c, frame, bound, s, n);
        if (!zl.isError(got) && got < n) {
            buf_byte(out, S_ZSTD);
            buf_varint(out, got);
            buf_put(out, frame, got);
            return;
        }
    }
    buf_byte(out, S_RAW);
    buf_varint(out, n);
    buf_put(out, s, n);
}

static void put_plain_surveyed(Buf *out, const uint8_t *s, size_t n)
{
    int fill;
    double entropy;
    survey_c(s, (Py_ssize_t)n, &fill, &entropy);
    put_plain(out, s, n, fill, entropy);
}

/* frames._code_section: mode 3 with a chosen code width. */
static void put_codes(Buf *out, const uint8_t *s, size_t n)
{
    uint8_t table[16], lut[256];
    int bits, k;
    Py_ssize_t n_escapes = codes_plan(s, (Py_ssize_t)n, 0, &bits, table, &k, lut);
    size_t per = 8 / (size_t)bits, n_packed = (n + per - 1) / per;
    uint8_t *pk = scratch(SC_CODES, n_packed + (size_t)n_escapes);
    if (pk == NULL) {
        out->failed |= BUF_NO_MEMORY;
        return;
    }
    uint8_t *esc = pk + n_packed;
    if (codes_fill(s, (Py_ssize_t)n, bits, lut, pk, esc, n_escapes) != n_escapes) {
        out->failed = BUF_INPUT_CHANGED; /* see native_pack_codes */
        return;
    }
    buf_byte(out, S_CODES);
    buf_byte(out, (uint8_t)bits);
    buf_byte(out, (uint8_t)k);
    buf_put(out, table, (size_t)k);
    put_plain_surveyed(out, pk, n_packed);
    put_plain_surveyed(out, esc, (size_t)n_escapes);
}

/* frames.encode_section: append one section in its smallest form. */
static void put_section(Buf *out, const uint8_t *s, size_t n)
{
    int fill;
    double entropy;
    survey_c(s, (Py_ssize_t)n, &fill, &entropy);
    Buf *coded = &tl_coded, *plain = &tl_plain;
    if (n >= 64 && fill < 0 && CODES_FIRST_LO <= entropy && entropy <= CODES_FIRST_HI) {
        coded->len = 0;
        put_codes(coded, s, n);
        out->failed |= coded->failed;
        if (!coded->failed && coded->len <= n) {
            buf_put(out, coded->p, coded->len);
            return;
        }
    }
    plain->len = 0;
    put_plain(plain, s, n, fill, entropy);
    out->failed |= plain->failed;
    if (n >= 64 && !plain->failed && (double)(plain->len * 8) < CODES_TRIAL_BITS * (double)n) {
        coded->len = 0;
        put_codes(coded, s, n);
        out->failed |= coded->failed;
        if (!coded->failed && coded->len < plain->len) {
            buf_put(out, coded->p, coded->len);
            return;
        }
    }
    buf_put(out, plain->p, plain->len);
}

/* The loop mode of a difference: split_mode's, or an extrapolated one with `prev`. */
static int delta_mode(int rotate, int kind, int has_prev)
{
    if (has_prev)
        return rotate ? M_EXT_FLOAT : M_EXT_INT;
    return split_mode(rotate, kind);
}

/* The optional `prev` argument: only next to a base, only for ORD differences, and of
 * the tensor's length. Leaves prev->obj NULL when it is None. */
static int get_prev(PyObject *prev_obj, Py_buffer *prev, int has_base, int kind, Py_ssize_t len)
{
    if (prev_obj == Py_None)
        return 0;
    if (!has_base || kind != KIND_ORD) {
        PyErr_SetString(PyExc_ValueError, "prev extrapolates a base: it needs a base and kind 1 (ORD)");
        return -1;
    }
    return get_same_length(prev_obj, prev, len, "prev");
}

/* The arguments both whole-record calls share: zstd loaded, a valid layout and delta
 * kind, and the optional base and prev of the tensor's length (views the caller
 * releases, also on error). */
static int check_record_args(int width, int kind, PyObject *base_obj, Py_buffer *base, PyObject *prev_obj, Py_buffer *prev,
                             Py_ssize_t len)
{
    int has_base = base_obj != Py_None;
    if (!zl.ok) {
        PyErr_SetString(PyExc_RuntimeError, "libzstd.so.1 is not available");
        return -1;
    }
    if (check_layout(width, kind, has_base) < 0)
        return -1;
    if (has_base && get_same_length(base_obj, base, len, "a delta base") < 0)
        return -1;
    return get_prev(prev_obj, prev, has_base, kind, len);
}

PyDoc_STRVAR(encode_sections_doc,
"encode_sections(body, width, rotate, base=None, kind=1, prev=None) -> bytes\n\n"
"What tensor._planes_body appends after the layout byte, in one call without the GIL:\n"
"the `width` plane sections of split(body, width, rotate, base, kind), then the tail\n"
"section (with prev, an older tensor of the same length: the ORD difference against\n"
"the extrapolation 2*base - prev, which predict.extrapolate would build), then the tail\n"
"section (bytes past the last whole element) if any, each chosen as frames.encode_section\n"
"chooses (zstd through libzstd: see has_zstd).");

/* The sections of one tensor (encode_sections' output) appended to `out`: planes of
 * `src` (of its difference from `bsrc`, or from the extrapolation 2*bsrc - psrc, when
 * given), then the tail. Runs without the GIL; damage and OOM are flagged in out->failed. */
static void put_tensor_sections(Buf *out, const uint8_t *src, Py_ssize_t len, int width, int rotate,
                                const uint8_t *bsrc, const uint8_t *psrc, int kind)
{
    Py_ssize_t n = len / width;
    int mode = delta_mode(rotate, bsrc ? kind : KIND_NONE, psrc != NULL);
    uint8_t *planes = scratch(SC_PLANES, (size_t)(n * width));
    if (planes == NULL || buf_reserve(out, (size_t)len / 2 + 64) < 0) {
        out->failed |= BUF_NO_MEMORY;
        return;
    }
    split_words(width, src, bsrc, psrc, planes, n, mode);
    for (int i = 0; i < width; i++)
        put_section(out, planes + (size_t)i * n, (size_t)n);
    if (len > n * width)
        put_section(out, src + n * width, (size_t)(len - n * width));
}

/* The Python error for a failed Buf (after the GIL is taken back). */
static void raise_buf_failure(int failed)
{
    if (failed & BUF_INPUT_CHANGED)
        PyErr_SetString(PyExc_ValueError, "the section changed while it was being encoded");
    else
        PyErr_NoMemory();
}

static PyObject *native_encode_sections(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"body", "width", "rotate", "base", "kind", "prev", NULL};
    Py_buffer body, base = {0}, prev = {0};
    int width, rotate, kind = KIND_ORD;
    PyObject *base_obj = Py_None, *prev_obj = Py_None, *result = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*ip|OiO", kwlist, &body, &width, &rotate, &base_obj, &kind, &prev_obj))
        return NULL;
    Buf *out = &tl_out;
    if (check_record_args(width, kind, base_obj, &base, prev_obj, &prev, body.len) < 0)
        goto done;
    {
        const uint8_t *bsrc = base.obj ? base.buf : NULL, *psrc = prev.obj ? prev.buf : NULL;
        Py_BEGIN_ALLOW_THREADS
        out->len = 0;
        out->failed = 0;
        put_tensor_sections(out, body.buf, body.len, width, rotate, bsrc, psrc, kind);
        Py_END_ALLOW_THREADS
    }
    if (out->failed)
        raise_buf_failure(out->failed);
    else
        result = PyBytes_FromStringAndSize((const char *)out->p, (Py_ssize_t)out->len);
done:
    trim_scratch();
    PyBuffer_Release(&body);
    release_view(&base);
    release_view(&prev);
    return result;
}

/* ---- whole tensor records, many at once: codec.encode_tensor's choices in C ------------- */

/* predict.py's constants: the sample the extrapolation is judged on, and its margin. */
#define EXT_SAMPLE 1024
#define EXT_MARGIN_PARTS 20

/* One tensor of a batch. The prefixes are the record bytes before the sections (record
 * header, canonical header, delta fields, layout byte), built by codec.py; they point
 * into bytes objects the job list keeps alive. */
typedef struct {
    Py_buffer body, base, prev; /* base.obj / prev.obj NULL when absent */
    const char *planes_prefix, *delta_prefix, *ext_prefix;
    Py_ssize_t planes_prefix_len, delta_prefix_len, ext_prefix_len;
    int width, rotate, kind;
    double planes_limit; /* try planes too when the delta record is longer (< 0: always) */
    Buf out;
} RecordJob;

/* predict.extrapolation_pays: the extrapolated base wins on a strided sample by a margin. */
static int extrapolation_pays_c(const RecordJob *j)
{
    Py_ssize_t n = j->body.len / j->width;
    if (n == 0 || (j->width != 2 && j->width != 4))
        return 0;
    Py_ssize_t step = n / EXT_SAMPLE > 1 ? n / EXT_SAMPLE : 1;
    uint64_t plain, extrap;
    if (j->width == 2)
        score_2(j->body.buf, j->base.buf, j->prev.buf, n, step, j->rotate, &plain, &extrap);
    else
        score_4(j->body.buf, j->base.buf, j->prev.buf, n, step, j->rotate, &plain, &extrap);
    uint64_t samples = (uint64_t)((n + step - 1) / step);
    return EXT_MARGIN_PARTS * extrap + samples < EXT_MARGIN_PARTS * plain;
}

static void put_record(Buf *out, const char *prefix, Py_ssize_t prefix_len, const RecordJob *j,
                       const uint8_t *bsrc, const uint8_t *psrc)
{
    buf_put(out, prefix, (size_t)prefix_len);
    put_tensor_sections(out, j->body.buf, j->body.len, j->width, j->rotate, bsrc, psrc, j->kind);
}

/* codec.encode_tensor for a tensor of SMALL_TENSOR bytes or more: the delta record (against
 * the extrapolation when it pays) and, when that is not small enough, the planes record;
 * the shorter one, the delta on a tie. */
static void encode_record_job(RecordJob *j)
{
    if (j->base.obj == NULL) {
        put_record(&j->out, j->planes_prefix, j->planes_prefix_len, j, NULL, NULL);
        return;
    }
    int ext = j->prev.obj != NULL && j->ext_prefix != NULL && extrapolation_pays_c(j);
    if (ext)
        put_record(&j->out, j->ext_prefix, j->ext_prefix_len, j, j->base.buf, j->prev.buf);
    else
        put_record(&j->out, j->delta_prefix, j->delta_prefix_len, j, j->base.buf, NULL);
    if (j->out.failed || (double)j->out.len <= j->planes_limit)
        return;
    Buf planes = {0};
    put_record(&planes, j->planes_prefix, j->planes_prefix_len, j, NULL, NULL);
    if (!planes.failed && planes.len < j->out.len) {
        free(j->out.p);
        j->out = planes;
    } else {
        j->out.failed |= planes.failed;
        free(planes.p);
    }
}

/* A batch is shared by the calling thread and the pool's workers: each takes the next
 * job (`one(jobs, i)`) until none is left. */
typedef struct {
    void *jobs;
    Py_ssize_t n, next;
    void (*one)(void *jobs, Py_ssize_t i);
} Batch;

static void run_batch(Batch *b)
{
    for (;;) {
        Py_ssize_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_RELAXED);
        if (i >= b->n)
            break;
        b->one(b->jobs, i);
    }
    trim_scratch();
}

static void encode_one(void *jobs, Py_ssize_t i)
{
    encode_record_job(&((RecordJob *)jobs)[i]);
}

/* Worker threads kept for the life of the process (they never touch Python): a thread
 * made per batch would start with cold scratch memory, and page faults of two threads
 * serialise on the memory map. One batch runs on the pool at a time; a caller that finds
 * it busy encodes its batch alone. After fork() the child starts with no workers. */
#define POOL_MAX 64
static struct {
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    int started, busy, tickets, running;
    unsigned gen;
    Batch *batch;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, 0, 0, 0, 0, NULL};

/* `arg` is the generation current when the worker was made (under the lock): the batch
 * it was made for is the next one, even if that has begun by the time it runs. */
static void *pool_worker(void *arg)
{
    unsigned seen = (unsigned)(uintptr_t)arg;
    pthread_mutex_lock(&pool.mu);
    for (;;) {
        while (pool.gen == seen)
            pthread_cond_wait(&pool.work, &pool.mu);
        seen = pool.gen;
        if (pool.tickets <= 0)
            continue;
        pool.tickets--;
        Batch *b = pool.batch;
        pthread_mutex_unlock(&pool.mu);
        run_batch(b);
        pthread_mutex_lock(&pool.mu);
        if (--pool.running == 0)
            pthread_cond_signal(&pool.done);
    }
    return NULL;
}

static void pool_after_fork_child(void)
{
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.work, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.started = pool.busy = pool.tickets = pool.running = 0;
    pool.batch = NULL;
}

/* A batch handed to up to threads-1 workers, without running any of it here: 1 when they
 * took it (pool_join must follow), 0 when the pool is busy or no worker is wanted (the
 * caller's pool_join then runs it all). Called without the GIL. */
static int pool_start(Batch *b, int threads)
{
    int helpers = threads - 1;
    if (helpers > POOL_MAX)
        helpers = POOL_MAX;
    if (helpers > b->n - 1)
        helpers = (int)(b->n - 1);
    pthread_mutex_lock(&pool.mu);
    if (helpers <= 0 || pool.busy) {
        pthread_mutex_unlock(&pool.mu);
        return 0;
    }
    while (pool.started < helpers) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&t, &attr, pool_worker, (void *)(uintptr_t)pool.gen);
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        pool.started++;
    }
    if (helpers > pool.started)
        helpers = pool.started;
    if (helpers <= 0) {
        pthread_mutex_unlock(&pool.mu);
        return 0;
    }
    pool.busy = 1;
    pool.batch = b;
    pool.tickets = pool.running = helpers;
    pool.gen++;
    /* Wake as many workers as there are tickets (a new worker needs no signal: it was made
     * for this generation); one that wakes anyway finds no ticket and sleeps again. */
    for (int k = 0; k < helpers; k++)
        pthread_cond_signal(&pool.work);
    pthread_mutex_unlock(&pool.mu);
    return 1;
}

/* The jobs of a batch no worker took yet, run on the calling thread; then, when pool_start
 * handed it to workers (`started`), the wait for them. Called without the GIL. */
static void pool_join(Batch *b, int started)
{
    run_batch(b);
    if (!started)
        return;
    pthread_mutex_lock(&pool.mu);
    while (pool.running > 0)
        pthread_cond_wait(&pool.done, &pool.mu);
    pool.busy = 0;
    pool.batch = NULL;
    pthread_mutex_unlock(&pool.mu);
}

/* Run a batch on the calling thread and up to threads-1 workers (called without the GIL). */
static void pool_run(Batch *b, int threads)
{
    pool_join(b, pool_start(b, threads));
}

/* What a batch call does with each of its jobs: parse it from its Python item (GIL held;
 * -1 with an exception set), run it (`one`, without the GIL, on any thread), turn it into
 * its list item (GIL held; a new reference, or NULL with an exception set) and release it
 * (also when parsing failed halfway: jobs start zeroed). */
typedef struct {
    size_t size;
    int (*parse)(PyObject *item, void *job, const void *ctx);
    void (*one)(void *jobs, Py_ssize_t i);
    PyObject *(*result)(void *job);
    void (*release)(void *job);
} JobKind;

/* `kind` jobs parsed from `items` into a zeroed array (*n of them, *seq the tuple holding
 * the items: jobs point into them, prefixes and ids, while the GIL is released, and another
 * thread may empty the caller's list meanwhile); NULL with an exception set, what was
 * parsed released. */
static char *parse_jobs(const JobKind *kind, PyObject *items, const void *ctx, PyObject **seq_out, Py_ssize_t *n_out)
{
    PyObject *seq = PySequence_Tuple(items);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq), parsed = 0;
    char *jobs = PyMem_Calloc(n ? (size_t)n : 1, kind->size);
    if (jobs == NULL) {
        PyErr_NoMemory();
        Py_DECREF(seq);
        return NULL;
    }
    for (; parsed < n; parsed++)
        if (kind->parse(PyTuple_GET_ITEM(seq, parsed), jobs + (size_t)parsed * kind->size, ctx) < 0) {
            for (Py_ssize_t i = 0; i <= parsed; i++)
                kind->release(jobs + (size_t)i * kind->size);
            PyMem_Free(jobs);
            Py_DECREF(seq);
            return NULL;
        }
    *seq_out = seq;
    *n_out = n;
    return jobs;
}

/* The list of the results of n run jobs (NULL with an exception set); then every job is
 * released, the array freed and the items' tuple let go. */
static PyObject *finish_jobs(const JobKind *kind, char *jobs, Py_ssize_t n, PyObject *seq)
{
    PyObject *result = PyList_New(n);
    for (Py_ssize_t i = 0; result != NULL && i < n; i++) {
        PyObject *item = kind->result(jobs + (size_t)i * kind->size);
        if (item == NULL)
            Py_CLEAR(result);
        else
            PyList_SET_ITEM(result, i, item);
    }
    for (Py_ssize_t i = 0; i < n; i++)
        kind->release(jobs + (size_t)i * kind->size);
    PyMem_Free(jobs);
    Py_DECREF(seq);
    return result;
}

/* The list of results of `kind` jobs, one per item of `items`, run on the pool. */
static PyObject *run_jobs(const JobKind *kind, PyObject *items, int threads, const void *ctx)
{
    PyObject *seq;
    Py_ssize_t n;
    char *jobs = parse_jobs(kind, items, ctx, &seq, &n);
    if (jobs == NULL)
        return NULL;
    Batch batch = {jobs, n, 0, kind->one};
    Py_BEGIN_ALLOW_THREADS
    pool_run(&batch, threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS
    return finish_jobs(kind, jobs, n, seq);
}

/* A whole-record batch call: its arguments (jobs, threads), zstd loaded, then run_jobs. */
static PyObject *record_batch_call(PyObject *args, const JobKind *kind)
{
    PyObject *jobs;
    int threads;
    if (!PyArg_ParseTuple(args, "Oi", &jobs, &threads))
        return NULL;
    if (!zl.ok) {
        PyErr_SetString(PyExc_RuntimeError, "libzstd.so.1 is not available");
        return NULL;
    }
    return run_jobs(kind, jobs, threads, NULL);
}

static void release_job(void *job)
{
    RecordJob *j = job;
    release_view(&j->body);
    release_view(&j->base);
    release_view(&j->prev);
    free(j->out.p);
}

/* A job from its tuple (see encode_records' doc); -1 with an exception set. */
static int parse_job(PyObject *item, void *job, const void *unused)
{
    RecordJob *j = job;
    PyObject *body, *planes_prefix, *base, *delta_prefix, *prev, *ext_prefix;
    if (!PyTuple_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "each job must be a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "OipSOiOOOd;a job is (body, width, rotate, planes_prefix, base, kind, delta_prefix, "
                          "prev, ext_prefix, planes_limit)", &body, &j->width, &j->rotate, &planes_prefix, &base,
                          &j->kind, &delta_prefix, &prev, &ext_prefix, &j->planes_limit))
        return -1;
    if (PyObject_GetBuffer(body, &j->body, PyBUF_SIMPLE) < 0)
        return -1;
    if (check_layout(j->width, j->kind, base != Py_None) < 0)
        return -1;
    if (base != Py_None) {
        if (get_same_length(base, &j->base, j->body.len, "a delta base") < 0)
            return -1;
        if (!PyBytes_Check(delta_prefix)) {
            PyErr_SetString(PyExc_TypeError, "a job with a base needs its delta_prefix (bytes)");
            return -1;
        }
        j->delta_prefix = PyBytes_AS_STRING(delta_prefix);
        j->delta_prefix_len = PyBytes_GET_SIZE(delta_prefix);
    }
    if (get_prev(prev, &j->prev, base != Py_None, j->kind, j->body.len) < 0)
        return -1;
    if (j->prev.obj != NULL) {
        if (!PyBytes_Check(ext_prefix)) {
            PyErr_SetString(PyExc_TypeError, "a job with prev needs its ext_prefix (bytes)");
            return -1;
        }
        j->ext_prefix = PyBytes_AS_STRING(ext_prefix);
        j->ext_prefix_len = PyBytes_GET_SIZE(ext_prefix);
    }
    j->planes_prefix = PyBytes_AS_STRING(planes_prefix);
    j->planes_prefix_len = PyBytes_GET_SIZE(planes_prefix);
    return 0;
}

PyDoc_STRVAR(encode_records_doc,
"encode_records(jobs, threads) -> list[bytes]\n\n"
"codec.encode_tensor for many tensors in one call without the GIL, on the calling thread\n"
"and up to threads-1 kept worker threads. Each job is a tuple (body, width, rotate,\n"
"planes_prefix, base, kind, delta_prefix, prev, ext_prefix, planes_limit): with base None,\n"
"the record planes_prefix + encode_sections(body, width, rotate); with a base, the delta\n"
"record (delta_prefix + the sections of the difference of `kind`; with prev, and when\n"
"predict.extrapolation_pays would say so, ext_prefix + the sections of the difference\n"
"from 2*base - prev) and, when that is longer than planes_limit, the planes record if\n"
"it is shorter. The records are codec.encode_tensor's, byte for byte.");

static PyObject *record_of(void *job)
{
    RecordJob *j = job;
    if (j->out.failed) {
        raise_buf_failure(j->out.failed);
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)j->out.p, (Py_ssize_t)j->out.len);
}

static const JobKind record_jobs = {sizeof(RecordJob), parse_job, encode_one, record_of, release_job};

static PyObject *native_encode_records(PyObject *self, PyObject *args)
{
    return record_batch_call(args, &record_jobs);
}

/* ---- reading sections: frames.decode_section in C --------------------------------------- */

/* Why a record cannot be read; the message is frames.py's for the same damage. */
typedef struct {
    char msg[160];
    int oom; /* not damage: memory ran out (raised as MemoryError) */
} Fault;

static int fault(Fault *f, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(f->msg, sizeof f->msg, fmt, ap);
    va_end(ap);
    return -1;
}

static int out_of_memory(Fault *f)
{
    f->oom = 1;
    return fault(f, "out of memory");
}

/* zstd.zstd_exact: inflate one frame that must be exactly `expect` bytes, never more. */
static int zstd_exact_c(const uint8_t *frame, size_t len, uint8_t *dst, size_t expect, Fault *f)
{
    unsigned long long declared = zl.getFrameContentSize(frame, len);
    if (declared == ZSTD_CONTENTSIZE_ERROR)
        return fault(f, "bad zstd frame: not a zstd frame header");
    if (declared != ZSTD_CONTENTSIZE_UNKNOWN && declared != expect)
        return fault(f, "zstd frame declares %llu bytes where %zu are expected", declared, expect);
    if (tl_dctx == NULL) {
        register_thread();
        if ((tl_dctx = zl.createDCtx()) == NULL)
            return out_of_memory(f);
    }
    uint8_t one;
    size_t got = zl.decompressDCtx(tl_dctx, expect ? dst : &one, expect, frame, len);
    if (zl.isError(got))
        return fault(f, "zstd frame does not decompress: %s", zl.getErrorName(got));
    if (got != expect)
        return fault(f, "zstd frame inflated to %zu bytes, %zu expected", got, expect);
    return 0;
}

static int get_varint_c(const uint8_t *d, size_t len, size_t *pos, size_t *value, Fault *f)
{
    uint64_t v = 0;
    int overflow = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*pos >= len)
            return fault(f, "stored record is truncated (in a length field)");
        uint8_t byte = d[(*pos)++];
        uint64_t part = byte & 0x7F;
        if (shift >= 64 || (shift > 0 && part >> (64 - shift)))
            overflow |= part != 0;
        else
            v |= part << shift;
        if (!(byte & 0x80)) {
            /* A length past 2^64 runs past any record: report it as that. */
            *value = overflow ? SIZE_MAX : (size_t)v;
            return 0;
        }
    }
    return fault(f, "stored record has an overlong length field");
}

static int read_section(const uint8_t *d, size_t len, size_t *pos, uint8_t *dst, size_t expect, int nested, Fault *f);

/* frames._decode_codes: mode 3 after its mode byte. */
static int read_codes(const uint8_t *d, size_t len, size_t *pos, uint8_t *dst, size_t expect, Fault *f)
{
    size_t p = *pos;
    if (p + 2 > len)
        return fault(f, "stored record is truncated (in a code section)");
    int bits = d[p], k = d[p + 1];
    if ((bits != 2 && bits != 4) || k >= (1 << bits) || p + 2 + (size_t)k > len)
        return fault(f, "stored record has a bad code table");
    const uint8_t *table = d + p + 2;
    size_t per = 8 / (size_t)bits, n_packed = (expect + per - 1) / per;
    *pos = p + 2 + (size_t)k;
    uint8_t *packed = scratch(SC_CODES, n_packed), *esc;
    if (packed == NULL)
        return out_of_memory(f);
    if (read_section(d, len, pos, packed, n_packed, 1, f) < 0)
        return -1;
    Py_ssize_t n_escapes = count_escapes_c(packed, (Py_ssize_t)n_packed, bits, k, (Py_ssize_t)expect);
    if (n_escapes == -1)
        return fault(f, "stored record has non-zero padding after its last code");
    if (n_escapes < 0)
        return fault(f, "stored record has a code outside its code table");
    if ((esc = scratch(SC_ESCAPES, (size_t)n_escapes)) == NULL)
        return out_of_memory(f);
    if (read_section(d, len, pos, esc, (size_t)n_escapes, 1, f) < 0)
        return -1;
    unpack_codes_c(packed, (Py_ssize_t)n_packed, esc, n_escapes, table, k, bits, dst, (Py_ssize_t)expect);
    return 0;
}

/* frames.decode_section: exactly `expect` bytes into dst, *pos moved past the section. */
static int read_section(const uint8_t *d, size_t len, size_t *pos, uint8_t *dst, size_t expect, int nested, Fault *f)
{
    if (*pos >= len)
        return fault(f, "stored record is truncated (missing a section)");
    int mode = d[(*pos)++];
    if (mode == S_FILL) {
        if (*pos >= len)
            return fault(f, "stored record is truncated (in a fill section)");
        memset(dst, d[(*pos)++], expect);
        return 0;
    }
    if (mode == S_CODES && !nested)
        return read_codes(d, len, pos, dst, expect, f);
    if (mode != S_RAW && mode != S_ZSTD)
        return fault(f, "unknown section mode %d", mode);
    size_t length = 0;
    if (get_varint_c(d, len, pos, &length, f) < 0)
        return -1;
    if (length > len - *pos)
        return fault(f, "stored record is truncated (a section runs past its end)");
    const uint8_t *chunk = d + *pos;
    *pos += length;
    if (mode == S_RAW) {
        if (length != expect)
            return fault(f, "raw section holds %zu bytes, %zu expected", length, expect);
        memcpy(dst, chunk, length);
        return 0;
    }
    return zstd_exact_c(chunk, length, dst, expect, f);
}

static PyObject *corrupt_record_error;

PyDoc_STRVAR(decode_sections_doc,
"decode_sections(payload, pos, body_len, width, rotate, head=b'', base=None, kind=1, prev=None) -> bytes\n\n"
"Inverse of encode_sections, in one call without the GIL: head + the body_len bytes whose\n"
"plane and tail sections start at payload[pos] and must end exactly at its end (with base:\n"
"the difference of `kind` against it undone; with prev too, the ORD difference against\n"
"2*base - prev). Damage raises CorruptRecord with the message\n"
"frames.py gives for it.");

/* Decode the sections of a tensor record (from `pos` to the payload's end) into `dst`
 * (body_len bytes): the planes joined, against `bsrc` (and the extrapolation with `psrc`)
 * when given, and the tail. Runs without the GIL; 0, or -1 with the fault in `f`. */
static int read_tensor_sections(const uint8_t *d, size_t len, size_t pos, uint8_t *dst, Py_ssize_t body_len, int width,
                                int rotate, const uint8_t *bsrc, const uint8_t *psrc, int kind, Fault *f)
{
    Py_ssize_t n = body_len / width, tail_len = body_len - n * width;
    int mode = delta_mode(rotate, bsrc ? kind : KIND_NONE, psrc != NULL), rc = 0;
    uint8_t *planes = scratch(SC_PLANES, (size_t)(n * width));
    if (planes == NULL)
        return out_of_memory(f);
    const uint8_t *pptr[8];
    for (int i = 0; rc == 0 && i < width; i++) {
        pptr[i] = planes + (size_t)i * n;
        rc = read_section(d, len, &pos, planes + (size_t)i * n, (size_t)n, 0, f);
    }
    if (rc == 0 && tail_len)
        rc = read_section(d, len, &pos, dst + n * width, (size_t)tail_len, 0, f);
    if (rc == 0 && pos != len)
        rc = fault(f, "stored record has %zu stray bytes after its data", len - pos);
    if (rc == 0)
        join_words(width, pptr, bsrc, psrc, dst, n, mode);
    return rc;
}

static PyObject *native_decode_sections(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"payload", "pos", "body_len", "width", "rotate", "head", "base", "kind", "prev", NULL};
    Py_buffer payload, head = {0}, base = {0}, prev = {0};
    Py_ssize_t pos_in, body_len;
    int width, rotate, kind = KIND_ORD;
    PyObject *base_obj = Py_None, *prev_obj = Py_None, *out = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnip|y*OiO", kwlist, &payload, &pos_in, &body_len, &width, &rotate,
                                     &head, &base_obj, &kind, &prev_obj))
        return NULL;
    if (pos_in < 0 || pos_in > payload.len || body_len < 0) {
        PyErr_SetString(PyExc_ValueError, "position or length out of range");
        goto done;
    }
    if (check_record_args(width, kind, base_obj, &base, prev_obj, &prev, body_len) < 0)
        goto done;
    out = PyBytes_FromStringAndSize(NULL, head.len + body_len);
    if (out == NULL)
        goto done;
    {
        uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(out);
        const uint8_t *bsrc = base.obj ? base.buf : NULL, *psrc = prev.obj ? prev.buf : NULL;
        Fault f = {{0}, 0};
        int rc;
        if (head.len)
            memcpy(dst, head.buf, head.len);
        Py_BEGIN_ALLOW_THREADS
        rc = read_tensor_sections(payload.buf, (size_t)payload.len, (size_t)pos_in, dst + head.len, body_len, width, rotate,
                                  bsrc, psrc, kind, &f);
        Py_END_ALLOW_THREADS
        if (rc < 0) {
            Py_CLEAR(out);
            if (f.oom)
                PyErr_NoMemory();
            else
                PyErr_SetString(corrupt_record_error, f.msg);
        }
    }
done:
    trim_scratch();
    PyBuffer_Release(&payload);
    release_view(&head);
    release_view(&base);
    release_view(&prev);
    return out;
}

/* ---- many tensor records read at once, each checked against its id ---------------------- */

static void object_id(const char *type, const uint8_t *body, size_t len, uint8_t digest[BLAKE3_OUT_LEN]);

typedef struct {
    Py_buffer payload, base, prev; /* base.obj / prev.obj NULL when absent */
    const char *oid;               /* 64 hex digits */
    Py_ssize_t pos, body_len;
    int width, rotate, kind;
    PyObject *out;                 /* a bytes object of body_len, written without the GIL */
    int ok, oom;
} ReadJob;

static int hex_matches(const char *hex, const uint8_t digest[BLAKE3_OUT_LEN])
{
    static const char digits[] = "0123456789abcdef";
    for (int k = 0; k < BLAKE3_OUT_LEN; k++)
        if (hex[2 * k] != digits[digest[k] >> 4] || hex[2 * k + 1] != digits[digest[k] & 15])
            return 0;
    return 1;
}

static void read_one(void *jobs, Py_ssize_t i)
{
    ReadJob *j = &((ReadJob *)jobs)[i];
    Fault f = {{0}, 0};
    uint8_t *dst = (uint8_t *)PyBytes_AS_STRING(j->out);
    if (read_tensor_sections(j->payload.buf, (size_t)j->payload.len, (size_t)j->pos, dst, j->body_len, j->width, j->rotate,
                             j->base.obj ? j->base.buf : NULL, j->prev.obj ? j->prev.buf : NULL, j->kind, &f) < 0) {
        j->oom = f.oom;
        return;
    }
    uint8_t digest[BLAKE3_OUT_LEN];
    object_id("tensor", dst, (size_t)j->body_len, digest);
    j->ok = hex_matches(j->oid, digest);
}

static void release_read_job(void *job)
{
    ReadJob *j = job;
    release_view(&j->payload);
    release_view(&j->base);
    release_view(&j->prev);
    Py_CLEAR(j->out);
}

/* A read job from its tuple (see read_tensors' doc); -1 with an exception set. */
static int parse_read_job(PyObject *item, void *job, const void *unused)
{
    ReadJob *j = job;
    PyObject *payload, *base, *prev;
    Py_ssize_t oid_len;
    if (!PyTuple_Check(item)) {
        PyErr_SetString(PyExc_TypeError, "each job must be a tuple");
        return -1;
    }
    if (!PyArg_ParseTuple(item, "s#OnnipOiO;a job is (oid, payload, pos, body_len, width, rotate, base, kind, prev)", &j->oid,
                          &oid_len, &payload, &j->pos, &j->body_len, &j->width, &j->rotate, &base, &j->kind, &prev))
        return -1;
    if (oid_len != 2 * BLAKE3_OUT_LEN) {
        PyErr_SetString(PyExc_ValueError, "an object id is 64 hex digits");
        return -1;
    }
    if (PyObject_GetBuffer(payload, &j->payload, PyBUF_SIMPLE) < 0)
        return -1;
    if (j->pos < 0 || j->pos > j->payload.len || j->body_len < 0) {
        PyErr_SetString(PyExc_ValueError, "position or length out of range");
        return -1;
    }
    if (check_layout(j->width, j->kind, base != Py_None) < 0)
        return -1;
    if (base != Py_None && get_same_length(base, &j->base, j->body_len, "a delta base") < 0)
        return -1;
    if (get_prev(prev, &j->prev, base != Py_None, j->kind, j->body_len) < 0)
        return -1;
    j->out = PyBytes_FromStringAndSize(NULL, j->body_len);
    return j->out == NULL ? -1 : 0;
}

/* codec.py's record header and tensor.py's payload layouts (docs/format/encodings.md). */
#define REC_MAGIC "AHO1"
#define REC_HEAD 13 /* magic, encoding byte, u64 raw length */
enum { ENC_PLANES = 1, ENC_DELTA = 2, ENC_EXTRAPOLATED = 4 };
#define MAX_CHAIN 16 /* chain.MAX_CHAIN */
#define MAX_RAW_LEN ((uint64_t)8 << 30) /* codec.MAX_RAW_LEN */

static PyObject *hex_id(const uint8_t digest[BLAKE3_OUT_LEN]);

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int k = 7; k >= 0; k--)
        v = (v << 8) | p[k];
    return v;
}

PyDoc_STRVAR(read_plan_doc,
"read_plan(record) -> (pos, body_len, width, rotate, kind, base, depth, prev) | None\n\n"
"How read_tensors reads a stored tensor record of encoding 1 (planes), 2 (delta) or 4\n"
"(extrapolated delta): where its sections start, the body length, the plane layout, the\n"
"delta kind, the hex ids of its base and of the extrapolation's second source (None when\n"
"absent) and its declared chain depth (0 for planes). None for anything else: another\n"
"encoding, a header that is not `tensor <len>\\0`, a chain deeper than MAX_CHAIN, an\n"
"extrapolation that is no ORD delta, or any damage in these fields (the one-by-one read\n"
"then says what is wrong).");

static PyObject *native_read_plan(PyObject *self, PyObject *arg)
{
    Py_buffer rec;
    PyObject *out = NULL;
    if (PyObject_GetBuffer(arg, &rec, PyBUF_SIMPLE) < 0)
        return NULL;
    const uint8_t *d = rec.buf;
    size_t len = (size_t)rec.len, pos = REC_HEAD;
    if (len < REC_HEAD || memcmp(d, REC_MAGIC, 4) != 0)
        goto none;
    int enc = d[4];
    uint64_t raw_len = load_le64(d + 5);
    if (raw_len > MAX_RAW_LEN)
        goto none;
    const uint8_t *prev_id = NULL, *base_id = NULL;
    int depth = 0, kind = KIND_ORD;
    if (enc != ENC_PLANES && enc != ENC_DELTA && enc != ENC_EXTRAPOLATED)
        goto none;
    if (enc == ENC_EXTRAPOLATED) {
        if (len < pos + BLAKE3_OUT_LEN)
            goto none;
        prev_id = d + pos;
        pos += BLAKE3_OUT_LEN;
    }
    if (pos >= len)
        goto none;
    size_t hlen = d[pos++];
    if (hlen > 32 || hlen > raw_len || pos + hlen > len)
        goto none;
    uint64_t body_len = raw_len - hlen;
    char want[48];
    int wlen = snprintf(want, sizeof want, "tensor %llu", (unsigned long long)body_len);
    if ((size_t)wlen + 1 != hlen || memcmp(d + pos, want, (size_t)wlen + 1) != 0)
        goto none;
    pos += hlen;
    if (enc != ENC_PLANES) {
        if (pos + BLAKE3_OUT_LEN + 2 > len)
            goto none;
        base_id = d + pos;
        depth = d[pos + BLAKE3_OUT_LEN];
        kind = d[pos + BLAKE3_OUT_LEN + 1];
        pos += BLAKE3_OUT_LEN + 2;
        if (depth < 1 || depth > MAX_CHAIN || (kind != KIND_XOR && kind != KIND_ORD) || (prev_id && kind != KIND_ORD))
            goto none;
    }
    if (pos >= len)
        goto none;
    int layout = d[pos++], width = layout & 0x0F;
    if ((width != 2 && width != 4 && width != 8) || (layout & ~0x1F))
        goto none;
    {
        PyObject *base = base_id ? hex_id(base_id) : Py_NewRef(Py_None);
        PyObject *prev = prev_id ? hex_id(prev_id) : Py_NewRef(Py_None);
        if (base != NULL && prev != NULL)
            out = Py_BuildValue("(nKiNiNiN)", (Py_ssize_t)pos, (unsigned long long)body_len, width,
                                PyBool_FromLong(layout & 0x10), kind, base, depth, prev);
        else {
            Py_XDECREF(base);
            Py_XDECREF(prev);
        }
    }
    PyBuffer_Release(&rec);
    return out;
none:
    PyBuffer_Release(&rec);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(read_tensors_doc,
"read_tensors(jobs, threads) -> list[bytes | None]\n\n"
"The bodies of many tensor records, in one call without the GIL on the calling thread and\n"
"up to threads-1 kept workers. Each job is (oid, payload, pos, body_len, width, rotate,\n"
"base, kind, prev), decode_sections' arguments less the head plus the tensor's hex id:\n"
"the body is decoded and its id (BLAKE3 of `tensor <len>\\0` + body) checked. None where\n"
"the record is damaged or the body does not hash to its id (the caller reads that one\n"
"again the slow way, for its exact error); MemoryError when memory ran out.");

static PyObject *body_of(void *job)
{
    ReadJob *j = job;
    if (j->oom)
        return PyErr_NoMemory();
    return Py_NewRef(j->ok ? j->out : Py_None);
}

static const JobKind read_jobs = {sizeof(ReadJob), parse_read_job, read_one, body_of, release_read_job};

static PyObject *native_read_tensors(PyObject *self, PyObject *args)
{
    return record_batch_call(args, &read_jobs);
}

/* read_tensors in two steps (read_tensors_start): the jobs parsed and handed to the pool's
 * workers, then `wait` runs what they have not taken yet on the calling thread and returns
 * the list. Between the two the caller runs Python (a checkout writes the last batch while
 * a worker decodes the next); the object holds the jobs, and the items they point into,
 * until then. Dropped without a wait, it waits for its workers before letting go. */
typedef struct {
    PyObject_HEAD
    const JobKind *kind;
    PyObject *seq; /* the items' tuple; NULL once waited for */
    char *jobs;
    Py_ssize_t n;
    Batch batch;
    int started, joined;
} PendingRead;

static void pending_join(PendingRead *p)
{
    if (p->joined)
        return;
    Py_BEGIN_ALLOW_THREADS
    pool_join(&p->batch, p->started);
    Py_END_ALLOW_THREADS
    p->joined = 1;
}

static PyObject *pending_wait(PyObject *self, PyObject *unused)
{
    PendingRead *p = (PendingRead *)self;
    PyObject *seq = p->seq;
    if (seq == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this read was waited for already");
        return NULL;
    }
    p->seq = NULL; /* taken before the GIL is let go: a second waiter finds it gone */
    pending_join(p);
    return finish_jobs(p->kind, p->jobs, p->n, seq);
}

static void pending_dealloc(PyObject *self)
{
    PendingRead *p = (PendingRead *)self;
    if (p->seq != NULL) {
        pending_join(p);
        for (Py_ssize_t i = 0; i < p->n; i++)
            p->kind->release(p->jobs + (size_t)i * p->kind->size);
        PyMem_Free(p->jobs);
        Py_CLEAR(p->seq);
    }
    PyObject_Free(self);
}

static PyMethodDef pending_methods[] = {
    {"wait", pending_wait, METH_NOARGS, "wait() -> list[bytes | None]\n\nread_tensors' result (once)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PendingReadType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "adapterhub.encoding._native.PendingRead",
    .tp_basicsize = sizeof(PendingRead),
    .tp_dealloc = pending_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A read_tensors batch being decoded (read_tensors_start); wait() for its list.",
    .tp_methods = pending_methods,
};

PyDoc_STRVAR(read_tensors_start_doc,
"read_tensors_start(jobs, threads) -> PendingRead\n\n"
"read_tensors(jobs, threads) begun on up to threads-1 of the kept workers; its wait()\n"
"decodes what they have not taken yet on the calling thread and returns the same list.");

static PyObject *native_read_tensors_start(PyObject *self, PyObject *args)
{
    PyObject *items;
    int threads;
    if (!PyArg_ParseTuple(args, "Oi", &items, &threads))
        return NULL;
    if (!zl.ok) {
        PyErr_SetString(PyExc_RuntimeError, "libzstd.so.1 is not available");
        return NULL;
    }
    PyObject *seq;
    Py_ssize_t n;
    char *jobs = parse_jobs(&read_jobs, items, NULL, &seq, &n);
    if (jobs == NULL)
        return NULL;
    PendingRead *p = PyObject_New(PendingRead, &PendingReadType);
    if (p == NULL) {
        for (Py_ssize_t i = 0; i < n; i++)
            read_jobs.release(jobs + (size_t)i * read_jobs.size);
        PyMem_Free(jobs);
        Py_DECREF(seq);
        return NULL;
    }
    p->kind = &read_jobs;
    p->seq = seq;
    p->jobs = jobs;
    p->n = n;
    p->batch = (Batch){jobs, n, 0, read_jobs.one};
    p->joined = 0;
    Py_BEGIN_ALLOW_THREADS
    p->started = pool_start(&p->batch, threads < 1 ? 1 : threads);
    Py_END_ALLOW_THREADS
    return (PyObject *)p;
}

PyDoc_STRVAR(has_zstd_doc,
"has_zstd() -> bool\n\nWhether libzstd.so.1 was found, so that encode_sections and decode_sections work.");

static PyObject *native_has_zstd(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(zl.ok);
}

/* ---- object ids: BLAKE3 of the canonical bytes, many at once -------------------------- */

typedef struct {
    Py_buffer body;
    const char *type;
    uint8_t digest[BLAKE3_OUT_LEN];
} HashJob;

/* objects.hash_object: BLAKE3 of `<type> <len>\0` followed by the body. */
static void object_id(const char *type, const uint8_t *body, size_t len, uint8_t digest[BLAKE3_OUT_LEN])
{
    char head[64];
    int hlen = snprintf(head, sizeof head, "%s %zu", type, len);
    blake3_hasher h;
    blake3_hasher_init(&h);
    blake3_hasher_update(&h, head, (size_t)hlen + 1); /* with its NUL */
    blake3_hasher_update(&h, body, len);
    blake3_hasher_finalize(&h, digest, BLAKE3_OUT_LEN);
}

static void hash_one(void *jobs, Py_ssize_t i)
{
    HashJob *j = &((HashJob *)jobs)[i];
    object_id(j->type, j->body.buf, (size_t)j->body.len, j->digest);
}

static PyObject *hex_id(const uint8_t digest[BLAKE3_OUT_LEN])
{
    static const char digits[] = "0123456789abcdef";
    char hex[2 * BLAKE3_OUT_LEN];
    for (int k = 0; k < BLAKE3_OUT_LEN; k++) {
        hex[2 * k] = digits[digest[k] >> 4];
        hex[2 * k + 1] = digits[digest[k] & 15];
    }
    return PyUnicode_FromStringAndSize(hex, sizeof hex);
}

PyDoc_STRVAR(hash_objects_doc,
"hash_objects(obj_type, bodies, threads) -> list[str]\n\n"
"objects.hash_object(obj_type, body) of each body (hex BLAKE3 of `<type> <len>\\0` + body),\n"
"in one call without the GIL on the calling thread and up to threads-1 kept workers.");

static int parse_hash_job(PyObject *item, void *job, const void *type)
{
    HashJob *j = job;
    j->type = type;
    return PyObject_GetBuffer(item, &j->body, PyBUF_SIMPLE);
}

static PyObject *id_of(void *job)
{
    return hex_id(((HashJob *)job)->digest);
}

static void release_hash_job(void *job)
{
    release_view(&((HashJob *)job)->body);
}

static const JobKind hash_jobs = {sizeof(HashJob), parse_hash_job, hash_one, id_of, release_hash_job};

static PyObject *native_hash_objects(PyObject *self, PyObject *args)
{
    const char *type;
    PyObject *bodies;
    int threads;
    if (!PyArg_ParseTuple(args, "sOi", &type, &bodies, &threads))
        return NULL;
    if (strlen(type) > 16) {
        PyErr_SetString(PyExc_ValueError, "object type names are short");
        return NULL;
    }
    return run_jobs(&hash_jobs, bodies, threads, type);
}

/* ---- module ---------------------------------------------------------------------------- */

PyDoc_STRVAR(use_popcnt_doc,
"_use_popcnt(on=None) -> bool | None\n\n"
"For tests: whether count_escapes takes its POPCNT build (None where there is only one\n"
"build); with `on`, switch to it (True is refused where the CPU lacks POPCNT).");

static PyObject *native_use_popcnt(PyObject *self, PyObject *args)
{
    PyObject *on = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &on))
        return NULL;
#ifdef POPCNT_VARIANT
    int was = have_popcnt;
    if (on != Py_None) {
        int want = PyObject_IsTrue(on);
        if (want < 0)
            return NULL;
        if (want && !__builtin_cpu_supports("popcnt")) {
            PyErr_SetString(PyExc_ValueError, "this CPU has no POPCNT instruction");
            return NULL;
        }
        have_popcnt = want;
    }
    return PyBool_FromLong(was);
#else
    Py_RETURN_NONE;
#endif
}

static PyMethodDef methods[] = {
    {"_use_popcnt", native_use_popcnt, METH_VARARGS, use_popcnt_doc},
    {"split", (PyCFunction)(void (*)(void))native_split, METH_VARARGS | METH_KEYWORDS, split_doc},
    {"join", (PyCFunction)(void (*)(void))native_join, METH_VARARGS | METH_KEYWORDS, join_doc},
    {"survey", native_survey, METH_O, survey_doc},
    {"pack_codes", native_pack_codes, METH_VARARGS, pack_codes_doc},
    {"count_escapes", native_count_escapes, METH_VARARGS, count_escapes_doc},
    {"unpack_codes", native_unpack_codes, METH_VARARGS, unpack_codes_doc},
    {"extrapolation_score", native_extrapolation_score, METH_VARARGS, extrapolation_score_doc},
    {"encode_sections", (PyCFunction)(void (*)(void))native_encode_sections, METH_VARARGS | METH_KEYWORDS, encode_sections_doc},
    {"encode_records", native_encode_records, METH_VARARGS, encode_records_doc},
    {"hash_objects", native_hash_objects, METH_VARARGS, hash_objects_doc},
    {"read_tensors", native_read_tensors, METH_VARARGS, read_tensors_doc},
    {"read_tensors_start", native_read_tensors_start, METH_VARARGS, read_tensors_start_doc},
    {"read_plan", native_read_plan, METH_O, read_plan_doc},
    {"decode_sections", (PyCFunction)(void (*)(void))native_decode_sections, METH_VARARGS | METH_KEYWORDS, decode_sections_doc},
    {"has_zstd", native_has_zstd, METH_NOARGS, has_zstd_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_native",
    "The tensor codec's per-byte loops in C (see reference.py for their numpy twins).", -1, methods,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    corrupt_record_error = PyErr_NewExceptionWithDoc("adapterhub.encoding._native.CorruptRecord",
                                                     "A stored record's sections are damaged (the message says how).",
                                                     PyExc_ValueError, NULL);
    if (corrupt_record_error == NULL || PyModule_AddObjectRef(m, "CorruptRecord", corrupt_record_error) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    if (PyType_Ready(&PendingReadType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    fill_xlog2x();
    load_zstd();
#ifdef POPCNT_VARIANT
    __builtin_cpu_init();
    have_popcnt = __builtin_cpu_supports("popcnt");
#endif
    {
        /* BLAKE3 1.3.1 detects the CPU's features on first use into a plain global (a benign
         * race upstream fixed later with an atomic): detect them here, before any thread. */
        uint8_t digest[BLAKE3_OUT_LEN];
        object_id("blob", (const uint8_t *)"", 0, digest);
    }
    tl_key_ok = pthread_key_create(&tl_key, free_thread_state) == 0;
    pthread_atfork(NULL, NULL, pool_after_fork_child);
    return m;
}
