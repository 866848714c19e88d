/* Adapter kernels for the CPU. Serving: one call per module for all rows; each reads the slot
 * banks directly (no per-row gather) and adds into the base output in place. Activations are
 * fp32 or bf16 (the model's dtype; each serving kernel exists once per dtype, suffixed _f32 /
 * _bf16); the arithmetic is fp32 throughout, and a bf16 output is rounded once, when written.
 * Training: QAA RX <Z> and its gradient, fp32. Built (with cpu_shots.c, the shot sampler) and
 * loaded by cpu_kernels.py.
 */
#include <stdint.h>
#include <string.h>

#include "cpu_shots.h"

/* bf16 is the top half of an fp32: widening is a shift; narrowing rounds to nearest even, as
 * torch does (NaN stays a quiet NaN). With -march=native on a CPU with avx512_bf16 the
 * compiler may use its conversion instructions; the result is the same. */
typedef uint16_t bf16;
static inline float ld_f32(const float *p, int64_t i) { return p[i]; }
static inline void st_f32(float *p, int64_t i, float v) { p[i] = v; }
static inline float ld_bf16(const bf16 *p, int64_t i) {
    uint32_t u = (uint32_t)p[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline void st_bf16(bf16 *p, int64_t i, float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    p[i] = (u & 0x7fffffffu) > 0x7f800000u ? (bf16)((u >> 16) | 0x40u) : (bf16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* A slot's factors are a few KB read once per step, long evicted by the base model's weights
 * since the last step: read in order, each cache line's miss waits for the one before. Asking
 * for every line up front lets the memory system fetch them in parallel. */
static inline void prefetch(const void *p, int64_t bytes) {
    const char *c = (const char *)p;
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
}

/* ---- QAA, RX circuits ----------------------------------------------------------------
 * Same math as adapters/circuit.py `expectations` + QAABank's up-projection, for each
 * listed vector v (a row b and one of its T tokens), with slot s = slots[i]:
 *     u  = WHT(pad(h_v))                       Walsh-Hadamard transform, unnormalised
 *     re = WHT(u * cos(phi_s)),  im = WHT(u * sin(phi_s))
 *     p  = re^2 + im^2                         (N^2 |psi_out|^2, before the ring permutations)
 *     z_q = WHT(p)[mask_q] / WHT(p)[0]           = sum_j p_j (-1)^popcount(j & mask_q) / sum_j p_j
 *     h_v += sum_q z_q W_up[s][:, q] + b[s]
 * The WHT's scale cancels in the ratio. mask_q is the readout of wire q after the L ring
 * permutations, written as a parity: readout(n, L)[j, q] = (-1)^popcount(j & mask_q), so a
 * fourth WHT reads every wire at once. Butterflies need no Hadamard or readout matrices: the
 * only memory read per vector is the slot's phases and [W_up | b].
 */

/* The first three stages as an 8-point transform held in registers (the stride-1, 2 and 4
 * butterflies do not vectorise); the later stages run over contiguous runs of >= 8 floats. */
static void fwht(float *x, int64_t N) {
    int64_t len = 1;
    if (N >= 8) {
        for (int64_t i = 0; i < N; i += 8) {
            float *y = x + i;
            float a0 = y[0] + y[1], a1 = y[0] - y[1], a2 = y[2] + y[3], a3 = y[2] - y[3];
            float a4 = y[4] + y[5], a5 = y[4] - y[5], a6 = y[6] + y[7], a7 = y[6] - y[7];
            float b0 = a0 + a2, b1 = a1 + a3, b2 = a0 - a2, b3 = a1 - a3;
            float b4 = a4 + a6, b5 = a5 + a7, b6 = a4 - a6, b7 = a5 - a7;
            y[0] = b0 + b4; y[1] = b1 + b5; y[2] = b2 + b6; y[3] = b3 + b7;
            y[4] = b0 - b4; y[5] = b1 - b5; y[6] = b2 - b6; y[7] = b3 - b7;
        }
        len = 8;
    }
    for (; len < N; len <<= 1)
        for (int64_t i = 0; i < N; i += len << 1)
            for (int64_t j = i; j < i + len; j++) {
                float a = x[j], b = x[j + len];
                x[j] = a + b;
                x[j + len] = a - b;
            }
}

/* re/im = WHT(u * cs/sn), p = re^2 + im^2, given u = WHT(pad(h_v)): the circuit's output
 * distribution over basis indices (before the ring permutations), unnormalised. */
static void rx_probs_u(int64_t N, const float *cs, const float *sn, const float *u, float *re, float *im,
                       float *p) {
    for (int64_t j = 0; j < N; j++) {
        re[j] = u[j] * cs[j];
        im[j] = u[j] * sn[j];
    }
    fwht(re, N);
    fwht(im, N);
    for (int64_t j = 0; j < N; j++) p[j] = re[j] * re[j] + im[j] * im[j];
}

/* y = WHT(p) after rx_probs_u: the chain every QAA RX kernel runs per vector (y[0] = sum p,
 * y[mask_q] = the unnormalised <Z_q>). */
static void rx_chain_u(int64_t N, const float *cs, const float *sn, const float *u, float *re, float *im,
                       float *y) {
    rx_probs_u(N, cs, sn, u, re, im, y);
    fwht(y, N);
}

/* <Z_q> of the distribution p (N = 2^n, unnormalised, overwritten), q < n: exactly when shots
 * is 0, else estimated from `shots` outcomes drawn from it by cpu_shots.c's multinomial
 * (stream g; scratch: tree, 2N doubles, and pending, N counts):
 *     z_q = (1 / shots) sum_j c_j (-1)^popcount(j & mask_q),
 * every wire read from the same counts c, so the estimates are correlated as on hardware.
 * Either way a WHT reads every wire at once: y[mask_q] = sum_j y_j (-1)^popcount(j & mask_q)
 * (for counts, exact integer sums in fp32: shots < 2^24). A zero state gives z = 0. */
static void read_z(float *p, int64_t N, int64_t n, const int64_t *masks, int64_t shots, rng_t *g, double *tree,
                   int64_t *pending, float *z) {
    float scale;
    if (shots > 0) {
        scale = multinomial(p, n, shots, g, tree, pending) > 0 ? 1.0f / (float)shots : 0.0f;
        fwht(p, N);
    } else {
        fwht(p, N);
        scale = p[0] > 0.0f ? 1.0f / p[0] : 0.0f; /* p[0] = sum_j p_j */
    }
    for (int64_t q = 0; q < n; q++) z[q] = p[masks[q]] * scale;
}

/* u = WHT(pad(u[:d])): zero the padding after the d values already in u, then transform. */
static void pad_wht(float *u, int64_t d, int64_t N) {
    memset(u + d, 0, (N - d) * sizeof(float));
    fwht(u, N);
}

/* u = WHT(pad(h_v)), for an fp32 h_v. */
static void embed_u(const float *hv, int64_t d, int64_t N, float *u) {
    memcpy(u, hv, d * sizeof(float));
    pad_wht(u, d, N);
}

static void rx_chain(const float *hv, int64_t d, int64_t N, const float *cs, const float *sn,
                     float *u, float *re, float *im, float *y) {
    embed_u(hv, d, N, u);
    rx_chain_u(N, cs, sn, u, re, im, y);
}

/* h: (B, T, d) contiguous, of type T_ (float or bf16); rows[i], slots[i]: the rows to adapt
 * and their slots; vectors v0 <= i * T + t < v1 of them are done (split over OpenMP threads
 * when there are many); phase: (S, 2, N) cos, sin; upb: (S, n + 1, d) = [W_up^T; b], fp32 or (with
 * bf16 h, suffix _bf16_w16) bf16, read into fp32 (half the bytes of a step's coldest reads); masks:
 * (n,). The circuit, <Z> and the up-projection are fp32 whatever h's type (<Z> always is: see
 * DESIGN.md); h_v + W_up z + b is summed in fp32 and rounded once. The 4 N floats of scratch
 * live on the stack, which stays in cache between calls.
 * shots > 0: shot emulation (adapters/emulation.py `shot_z`): z is estimated from `shots`
 * outcomes drawn for vector iv from the stream (seed, counter, iv) (see cpu_shots.c); the
 * caller advances counter once per call, so each call and vector has a stream of its own. */
#define QAA_RX_RESIDUAL(SUFFIX, T_, LD, ST, W_, LDW)                                                    \
    void qaa_rx_residual_##SUFFIX(T_ *h, int64_t T, int64_t d, const int64_t *rows, const int64_t *slots, \
                                  int64_t v0, int64_t v1, const float *phase, const W_ *upb, int64_t n, \
                                  const int64_t *masks, int64_t shots, int64_t seed, int64_t counter,   \
                                  int64_t threads) {                                                    \
        const int64_t N = (int64_t)1 << n;                                                              \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && v1 - v0 >= 2)") \
        for (int64_t iv = v0; iv < v1; iv++) {                                                          \
            const int64_t i = iv / T, t = iv % T;                                                       \
            float work[4 * N], z[n];                                                                    \
            double tree[shots > 0 ? 2 * N : 1];                                                         \
            int64_t pending[shots > 0 ? N : 1];                                                         \
            rng_t g;                                                                                    \
            float *u = work, *re = work + N, *im = work + 2 * N, *y = work + 3 * N;                     \
            const float *cs = phase + slots[i] * 2 * N, *sn = cs + N;                                   \
            const W_ *w = upb + slots[i] * (n + 1) * d, *b = w + n * d;                                 \
            if (t == 0) { /* this row's circuit and [W_up | b], then the next row's (see prefetch) */   \
                prefetch(cs, 2 * N * (int64_t)sizeof(float));                                           \
                prefetch(w, (n + 1) * d * (int64_t)sizeof(W_));                                         \
                if (i + 1 < (v1 + T - 1) / T) {                                                         \
                    prefetch(phase + slots[i + 1] * 2 * N, 2 * N * (int64_t)sizeof(float));             \
                    prefetch(upb + slots[i + 1] * (n + 1) * d, (n + 1) * d * (int64_t)sizeof(W_));      \
                }                                                                                       \
            }                                                                                           \
            T_ *hv = h + (rows[i] * T + t) * d;                                                         \
            for (int64_t k = 0; k < d; k++) u[k] = LD(hv, k);                                           \
            pad_wht(u, d, N);                                                                           \
            rx_probs_u(N, cs, sn, u, re, im, y);                                                        \
            if (shots > 0) rng_init(&g, (uint64_t)seed, (uint64_t)counter, (uint64_t)iv);               \
            read_z(y, N, n, masks, shots, &g, tree, pending, z);                                        \
            float *acc = re; /* free again: h_v + delta, in fp32 (N >= d) */                            \
            for (int64_t k = 0; k < d; k++) acc[k] = LD(hv, k);                                         \
            for (int64_t q = 0; q < n; q++) {                                                           \
                const float zq = z[q]; const W_ *wq = w + q * d;                                        \
                for (int64_t k = 0; k < d; k++) acc[k] += zq * LDW(wq, k);                              \
            }                                                                                           \
            for (int64_t k = 0; k < d; k++) ST(hv, k, acc[k] + LDW(b, k));                              \
        }                                                                                               \
    }
QAA_RX_RESIDUAL(f32, float, ld_f32, st_f32, float, ld_f32)
QAA_RX_RESIDUAL(bf16, bf16, ld_bf16, st_bf16, float, ld_f32)
QAA_RX_RESIDUAL(bf16_w16, bf16, ld_bf16, st_bf16, bf16, ld_bf16)

/* ---- LoRA (and SoRA, its gates folded into B) -----------------------------------------
 * For each listed row b = rows[i] with slot s = slots[i] and r = ranks[s] (0: the slot does
 * not adapt this module, the row is skipped), and each of its T tokens:
 *     y[b, t] += (x[b, t] @ A[s, :r].T) @ Bt[s, :r]
 * x, y: row b, token t at x + b * xs0 + t * xs1 (last dim contiguous; y may be a column
 * slice of a fused q|k|v output). A (S, R, din), Bt (S, R, dout); R <= 256. x and y are
 * fp32 or bf16 (T_), the bank's A and Bt fp32 or bf16 (W_); the dot products and the sum over
 * k run in fp32, and y[b, t] is rounded once, when written. Variants: _f32 (all fp32), _bf16
 * (all bf16), _bf16_w32 (bf16 activations, fp32 bank). */
#define LORA_DELTA(SUFFIX, T_, LD, ST, W_, LDW)                                                         \
    void lora_delta_##SUFFIX(T_ *y, int64_t ys0, int64_t ys1, const T_ *x, int64_t xs0, int64_t xs1,    \
                             int64_t T, int64_t din, int64_t dout, const int64_t *rows, const int64_t *slots, \
                             int64_t n_rows, const int64_t *ranks, const W_ *A, const W_ *Bt, int64_t R, \
                             int64_t threads) {                                                         \
        _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n_rows * T >= 8)") \
        for (int64_t iv = 0; iv < n_rows * T; iv++) {                                                   \
            const int64_t i = iv / T, t = iv % T, s = slots[i], r = ranks[s];                           \
            if (r == 0) continue;                                                                       \
            const W_ *a = A + s * R * din, *bt = Bt + s * R * dout;                                     \
            if (t == 0) { /* this row's factors, then the next row's, requested at once (see prefetch) */ \
                prefetch(a, r * din * (int64_t)sizeof(W_));                                             \
                prefetch(bt, r * dout * (int64_t)sizeof(W_));                                           \
                if (i + 1 < n_rows) {                                                                   \
                    const int64_t s1 = slots[i + 1], r1 = ranks[s1];                                    \
                    prefetch(A + s1 * R * din, r1 * din * (int64_t)sizeof(W_));                         \
                    prefetch(Bt + s1 * R * dout, r1 * dout * (int64_t)sizeof(W_));                      \
                }                                                                                       \
            }                                                                                           \
            const T_ *xv = x + rows[i] * xs0 + t * xs1;                                                 \
            T_ *yv = y + rows[i] * ys0 + t * ys1;                                                       \
            float tmp[256], xf[din], acc[dout];                                                         \
            for (int64_t j = 0; j < din; j++) xf[j] = LD(xv, j);                                        \
            for (int64_t k = 0; k < r; k++) {                                                           \
                const W_ *ak = a + k * din;                                                             \
                float s_ = 0.0f;                                                                        \
                _Pragma("omp simd reduction(+ : s_)")                                                   \
                for (int64_t j = 0; j < din; j++) s_ += xf[j] * LDW(ak, j);                             \
                tmp[k] = s_;                                                                            \
            }                                                                                           \
            for (int64_t j = 0; j < dout; j++) acc[j] = LD(yv, j);                                      \
            for (int64_t k = 0; k < r; k++) {                                                           \
                const float c = tmp[k];                                                                 \
                const W_ *bk = bt + k * dout;                                                           \
                for (int64_t j = 0; j < dout; j++) acc[j] += c * LDW(bk, j);                            \
            }                                                                                           \
            for (int64_t j = 0; j < dout; j++) ST(yv, j, acc[j]);                                       \
        }                                                                                               \
    }
LORA_DELTA(f32, float, ld_f32, st_f32, float, ld_f32)
LORA_DELTA(bf16, bf16, ld_bf16, st_bf16, bf16, ld_bf16)
LORA_DELTA(bf16_w32, bf16, ld_bf16, st_bf16, float, ld_f32)

/* ---- QAA RX <Z> for training: one circuit (cs, sn) for M vectors, and its gradient ------
 * Forward: z[v, q] = y[mask_q] / y[0], y = WHT(p), p = WHT(u*cs)^2 + WHT(u*sn)^2, u = WHT(pad h_v)
 * (the same chain as qaa_rx_residual, without the up-projection, which autograd handles);
 * with shots > 0, the shot estimate of qaa_rx_residual's vector v instead (no gradient).
 * Backward, given gz (M, n), recomputing the forward per vector (nothing of size N is kept
 * between the passes; WHT is its own transpose):
 *     gy[mask_q] = gz_q / y0,  gy[0] = -sum_q gz_q z_q / y0,  gp = WHT(gy)
 *     ga = WHT(2 re gp),  gb = WHT(2 im gp)
 *     gcs += ga u,  gsn += gb u,  gh = WHT(ga cs + gb sn)[:d]
 * Both split the M vectors over the OpenMP threads (torch's own pool: see cpu_kernels.py). */
void qaa_rx_z(const float *h, int64_t M, int64_t d, const float *cs, const float *sn,
              int64_t n, const int64_t *masks, int64_t shots, int64_t seed, int64_t counter, float *z) {
    const int64_t N = (int64_t)1 << n;
#pragma omp parallel if (M >= 64)
    {
        float work[4 * N];
        double tree[shots > 0 ? 2 * N : 1];
        int64_t pending[shots > 0 ? N : 1];
        rng_t g;
        float *u = work, *re = work + N, *im = work + 2 * N, *y = work + 3 * N;
#pragma omp for schedule(static)
        for (int64_t v = 0; v < M; v++) {
            embed_u(h + v * d, d, N, u);
            rx_probs_u(N, cs, sn, u, re, im, y);
            if (shots > 0) rng_init(&g, (uint64_t)seed, (uint64_t)counter, (uint64_t)v);
            read_z(y, N, n, masks, shots, &g, tree, pending, z + v * n);
        }
    }
}

void qaa_rx_z_backward(const float *h, int64_t M, int64_t d, const float *cs, const float *sn,
                       int64_t n, const int64_t *masks, const float *gz, float *gh, float *gcs,
                       float *gsn) {
    const int64_t N = (int64_t)1 << n;
#pragma omp parallel if (M >= 64)
    {
        float work[7 * N];
        float *u = work, *re = work + N, *im = work + 2 * N, *y = work + 3 * N, *g = work + 4 * N;
        float *lcs = work + 5 * N, *lsn = work + 6 * N; /* this thread's share of gcs, gsn */
        memset(lcs, 0, 2 * N * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t v = 0; v < M; v++) {
            rx_chain(h + v * d, d, N, cs, sn, u, re, im, y);
            const float y0 = y[0];
            memset(g, 0, N * sizeof(float));
            if (y0 > 0.0f) {
                const float inv = 1.0f / y0;
                float g0 = 0.0f;
                for (int64_t q = 0; q < n; q++) {
                    const float gq = gz[v * n + q];
                    g[masks[q]] += gq * inv;
                    g0 -= gq * y[masks[q]] * inv * inv;
                }
                g[0] += g0;
            }
            fwht(g, N); /* gp */
            for (int64_t j = 0; j < N; j++) {
                re[j] *= 2.0f * g[j];
                im[j] *= 2.0f * g[j];
            }
            fwht(re, N); /* ga */
            fwht(im, N); /* gb */
            for (int64_t j = 0; j < N; j++) {
                lcs[j] += re[j] * u[j];
                lsn[j] += im[j] * u[j];
                g[j] = re[j] * cs[j] + im[j] * sn[j];
            }
            fwht(g, N);
            memcpy(gh + v * d, g, d * sizeof(float));
        }
#pragma omp critical
        for (int64_t j = 0; j < N; j++) {
            gcs[j] += lcs[j];
            gsn[j] += lsn[j];
        }
    }
}
