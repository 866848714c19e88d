/* CPython entry points for the serving kernels of cpu_kernels.c, built into the same shared
 * object when Python's headers are here (adapters/cpu_kernels.py `entry`).
 *
 * Why not ctypes for these two: a decode step calls them once per module, right after the
 * module's GEMMs have streamed megabytes of weights through L2, and what a call costs then is
 * mostly the code it touches coming back from L3. A ctypes call of 17 integers costs ~2 us
 * hot and ~11 us right after a GEMM (libffi and argument conversion); a METH_FASTCALL function
 * 0.1 and 2.6 us (`python -m engine.bench_adapters --cold`, docs/benchmarks.md).
 *
 *     lora(variant, y, ys0, ys1, x, xs0, xs1, T, din, dout, rows, slots, n_rows, ranks, A, Bt, R, threads)
 *     qaa(variant, h, T, d, rows, slots, v0, v1, phase, upb, n, masks, shots, seed, counter, threads)
 *
 * take lora_delta_* / qaa_rx_residual_*'s arguments as Python ints (pointers as addresses,
 * from tensor.data_ptr()), `variant` indexing lora_variants / qaa_variants. The caller keeps
 * the tensors alive and their types right, as with ctypes. The GIL is held: a call lasts tens
 * of microseconds, and giving the GIL away would let another thread hold the step up for up
 * to the interpreter's switch interval. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef uint16_t bf16;

#define LORA_SIG(T_, W_)                                                                               \
    (T_ *y, int64_t ys0, int64_t ys1, const T_ *x, int64_t xs0, int64_t xs1, int64_t T, int64_t din,   \
     int64_t dout, const int64_t *rows, const int64_t *slots, int64_t n_rows, const int64_t *ranks,     \
     const W_ *A, const W_ *Bt, int64_t R, int64_t threads)
#define QAA_SIG(T_, W_)                                                                                \
    (T_ *h, int64_t T, int64_t d, const int64_t *rows, const int64_t *slots, int64_t v0, int64_t v1,  \
     const float *phase, const W_ *upb, int64_t n, const int64_t *masks, int64_t shots, int64_t seed,  \
     int64_t counter, int64_t threads)

void lora_delta_f32 LORA_SIG(float, float);
void lora_delta_bf16 LORA_SIG(bf16, bf16);
void lora_delta_bf16_w32 LORA_SIG(bf16, float);
void qaa_rx_residual_f32 QAA_SIG(float, float);
void qaa_rx_residual_bf16 QAA_SIG(bf16, float);
void qaa_rx_residual_bf16_w16 QAA_SIG(bf16, bf16);

#define P(T_, i) ((T_ *)(intptr_t)v[i])
#define LORA_CALL(fn, T_, W_)                                                                          \
    fn(P(T_, 1), v[2], v[3], P(const T_, 4), v[5], v[6], v[7], v[8], v[9], P(const int64_t, 10),       \
       P(const int64_t, 11), v[12], P(const int64_t, 13), P(const W_, 14), P(const W_, 15), v[16], v[17])
#define QAA_CALL(fn, T_, W_)                                                                           \
    fn(P(T_, 1), v[2], v[3], P(const int64_t, 4), P(const int64_t, 5), v[6], v[7], P(const float, 8),   \
       P(const W_, 9), v[10], P(const int64_t, 11), v[12], v[13], v[14], v[15])

/* v[0..n) = the arguments as int64; -1 with a Python error set when they are not n ints. */
static int ints(PyObject *const *args, Py_ssize_t got, Py_ssize_t n, int64_t *v, const char *name) {
    if (got != n) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd integer arguments (%zd given)", name, n, got);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        v[i] = PyLong_AsLongLong(args[i]);
        if (v[i] == -1 && PyErr_Occurred()) return -1;
    }
    return 0;
}

static PyObject *lora(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[18];
    if (ints(args, nargs, 18, v, "lora") < 0) return NULL;
    switch (v[0]) {
    case 0: LORA_CALL(lora_delta_f32, float, float); break;
    case 1: LORA_CALL(lora_delta_bf16, bf16, bf16); break;
    case 2: LORA_CALL(lora_delta_bf16_w32, bf16, float); break;
    default: return PyErr_Format(PyExc_ValueError, "lora: no variant %lld", (long long)v[0]);
    }
    Py_RETURN_NONE;
}

static PyObject *qaa(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int64_t v[16];
    if (ints(args, nargs, 16, v, "qaa") < 0) return NULL;
    switch (v[0]) {
    case 0: QAA_CALL(qaa_rx_residual_f32, float, float); break;
    case 1: QAA_CALL(qaa_rx_residual_bf16, bf16, float); break;
    case 2: QAA_CALL(qaa_rx_residual_bf16_w16, bf16, bf16); break;
    default: return PyErr_Format(PyExc_ValueError, "qaa: no variant %lld", (long long)v[0]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"lora", (PyCFunction)(void (*)(void))lora, METH_FASTCALL, "lora_delta_<lora_variants[variant]>(...)"},
    {"qaa", (PyCFunction)(void (*)(void))qaa, METH_FASTCALL, "qaa_rx_residual_<qaa_variants[variant]>(...)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "qaa_cpu_entry", NULL, -1, methods};

PyMODINIT_FUNC PyInit_qaa_cpu_entry(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObject(m, "lora_variants", Py_BuildValue("(sss)", "f32", "bf16", "bf16_w32")) < 0 ||
        PyModule_AddObject(m, "qaa_variants", Py_BuildValue("(sss)", "f32", "bf16", "bf16_w16")) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
