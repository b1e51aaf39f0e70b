/* The page hasher of the index (dengine_cli.engine.index.hash_pages): the 128-bit xxh3 hash of
 * every 4096-byte row of a page array, in one call that lets go of the GIL.  Beside it the page
 * store's checksum of every row (dengine_cli.pages.page_checksums): xxh3-64, likewise.
 *
 * The Python loop it replaces called xxhash's xxh3_128_digest once a page (0.28-0.32 us a page
 * here, against 0.18 us from this loop) and made one memoryview a page, and a strided batch had
 * to be copied first; this takes rows at any stride (QEMU streams, whose pages lie 4104 bytes
 * apart, come as views of the mapping).  The zero flag is found in the same pass, where numpy's
 * second pass read the batch again: a page whose first 64 bytes (one cache line, which the hash
 * reads first anyway) are not all zero is hashed; one whose are is compared with a zero page
 * (glibc's vectorized memcmp, which stops at the first byte that differs) and, when it is zero,
 * given the zero page's hash without hashing it.  Zero pages are most of many guests: the hash
 * and an OR loop over every word cost 341 ns a zero page here, against 114 ns a page of other
 * content, and the compare alone costs a fraction of that.  The hashes are the same.
 *
 * xxh3 is Debian's libxxhash (libxxhash-dev), with its run-time choice of SSE2, AVX2 or AVX-512
 * on x86 (XXH3_128bits_dispatch): the same hash, bit for bit, as the xxhash package's
 * xxh3_128_digest, which the tests compare it with. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>
#include <xxhash.h>

#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<xxh_x86dispatch.h>)
#include <xxh_x86dispatch.h>
#define PAGE_HASH XXH3_128bits_dispatch
#endif
#endif
#ifndef PAGE_HASH
#define PAGE_HASH XXH3_128bits
#endif
#if defined(__x86_64__) && defined(__has_include)
#if __has_include(<xxh_x86dispatch.h>)
#define PAGE_SUM XXH3_64bits_dispatch
#endif
#endif
#ifndef PAGE_SUM
#define PAGE_SUM XXH3_64bits
#endif

#define PAGE_SIZE 4096

/* The hash of an all-zero page (set when the module loads). */
static XXH128_hash_t zero_hash;

/* A page of zero bytes, to compare pages with. */
static const char zero_page[PAGE_SIZE];

/* Whether the page at ``row`` is all zero bytes: its first cache line is looked at first, so
 * that a page of other content costs one 64-byte compare before it is hashed. */
static int
page_is_zero(const char *row)
{
    return memcmp(row, zero_page, 64) == 0 && memcmp(row + 64, zero_page, PAGE_SIZE - 64) == 0;
}

static int
out_array(PyObject *obj, Py_buffer *view, Py_ssize_t n, Py_ssize_t size, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->len != n * size) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, %zd pages need %zd", what, view->len,
                     n, n * size);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* ``obj`` as rows of 4096 bytes (2-D, the bytes of a row adjacent, rows at any stride). */
static int
page_rows(PyObject *obj, Py_buffer *pages)
{
    if (PyObject_GetBuffer(obj, pages, PyBUF_STRIDED_RO) < 0)
        return -1;
    if (pages->ndim != 2 || pages->shape[1] != PAGE_SIZE || pages->strides[1] != 1
            || pages->itemsize != 1) {
        PyErr_SetString(PyExc_ValueError,
                        "pages must be rows of 4096 bytes (2-D, bytes of a row adjacent)");
        PyBuffer_Release(pages);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(hash_pages_doc,
"hash_pages(pages, high, low, zero)\n--\n\n"
"Write the high and low 64 bits of the xxh3-128 hash of each row of ``pages`` (a 2-D buffer\n"
"of rows of 4096 bytes, the rows at any stride, the bytes of a row adjacent) into ``high``\n"
"and ``low`` (writable, contiguous, 8 bytes a row), and into ``zero`` (1 byte a row) 1 for\n"
"each row of zero bytes only, 0 for the others: a row is compared byte by byte only when its\n"
"hash is the zero page's.");

static PyObject *
hash_pages(PyObject *self, PyObject *args)
{
    PyObject *pages_obj, *high_obj, *low_obj, *zero_obj;
    Py_buffer pages, high, low, zero;
    if (!PyArg_ParseTuple(args, "OOOO:hash_pages", &pages_obj, &high_obj, &low_obj, &zero_obj))
        return NULL;
    if (page_rows(pages_obj, &pages) < 0)
        return NULL;
    Py_ssize_t n = pages.shape[0], stride = pages.strides[0];
    if (out_array(high_obj, &high, n, 8, "high") < 0) {
        PyBuffer_Release(&pages);
        return NULL;
    }
    if (out_array(low_obj, &low, n, 8, "low") < 0) {
        PyBuffer_Release(&high);
        PyBuffer_Release(&pages);
        return NULL;
    }
    if (out_array(zero_obj, &zero, n, 1, "zero") < 0) {
        PyBuffer_Release(&low);
        PyBuffer_Release(&high);
        PyBuffer_Release(&pages);
        return NULL;
    }
    const char *row = pages.buf;
    unsigned long long *hi = high.buf, *lo = low.buf;
    unsigned char *z = zero.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++, row += stride) {
        int is_zero = page_is_zero(row);
        XXH128_hash_t h = is_zero ? zero_hash : PAGE_HASH(row, PAGE_SIZE);
        hi[i] = h.high64;
        lo[i] = h.low64;
        z[i] = (unsigned char)is_zero;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&zero);
    PyBuffer_Release(&low);
    PyBuffer_Release(&high);
    PyBuffer_Release(&pages);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(checksum_pages_doc,
"checksum_pages(pages, out)\n--\n\n"
"Write the xxh3-64 hash of each row of ``pages`` (a 2-D buffer of rows of 4096 bytes, the rows\n"
"at any stride) into ``out`` (writable, contiguous, 8 bytes a row): the page store's page\n"
"checksum, the same as xxhash's xxh3_64_intdigest of the row.");

static PyObject *
checksum_pages(PyObject *self, PyObject *args)
{
    PyObject *pages_obj, *out_obj;
    Py_buffer pages, out;
    if (!PyArg_ParseTuple(args, "OO:checksum_pages", &pages_obj, &out_obj))
        return NULL;
    if (page_rows(pages_obj, &pages) < 0)
        return NULL;
    Py_ssize_t n = pages.shape[0], stride = pages.strides[0];
    if (out_array(out_obj, &out, n, 8, "out") < 0) {
        PyBuffer_Release(&pages);
        return NULL;
    }
    const char *row = pages.buf;
    unsigned long long *sums = out.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++, row += stride)
        sums[i] = PAGE_SUM(row, PAGE_SIZE);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&out);
    PyBuffer_Release(&pages);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"hash_pages", hash_pages, METH_VARARGS, hash_pages_doc},
    {"checksum_pages", checksum_pages, METH_VARARGS, checksum_pages_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dengine_cli._pagehash",
    "xxh3-128 (the index) and xxh3-64 (the store's checksums) of every page of a page array, in C, "
    "without the GIL.", -1, methods,
};

PyMODINIT_FUNC
PyInit__pagehash(void)
{
    zero_hash = PAGE_HASH(zero_page, PAGE_SIZE);
    return PyModule_Create(&module);
}
