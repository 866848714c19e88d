/* Adapter kernels for the CPU (fp32). Serving: one call per module for all rows; each reads
 * the slot banks directly (no per-row gather) and adds into the base output in place.
 * Training: QAA RX <Z> and its gradient. Built and loaded by cpu_kernels.py.
 */
#include <stdint.h>
#include <string.h>

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

/* u = WHT(pad(h_v)), re/im = WHT(u * cs/sn), y = WHT(re^2 + im^2): the chain every QAA RX
 * kernel runs per vector (y[0] = sum p, y[mask_q] = the unnormalised <Z_q>). */
static void rx_chain(const float *hv, int64_t d, int64_t N, const float *cs, const float *sn,
                     float *u, float *re, float *im, float *y) {
    memcpy(u, hv, d * sizeof(float));
    memset(u + d, 0, (N - d) * sizeof(float));
    fwht(u, N);
    for (int64_t j = 0; j < N; j++) {
        re[j] = u[j] * cs[j];
        im[j] = u[j] * sn[j];
    }
    fwht(re, N);
    fwht(im, N);
    for (int64_t j = 0; j < N; j++) y[j] = re[j] * re[j] + im[j] * im[j];
    fwht(y, N);
}

/* h: (B, T, d) contiguous; rows[i], slots[i]: the rows to adapt and their slots; vectors
 * v0 <= i * T + t < v1 of them are done (split over OpenMP threads when there are many);
 * phase: (S, 2, N) cos, sin; upb: (S, n + 1, d) = [W_up^T; b]; masks: (n,). The 4 N floats
 * of scratch live on the stack, which stays in cache between calls. */
void qaa_rx_residual(float *h, int64_t T, int64_t d, const int64_t *rows, const int64_t *slots,
                     int64_t v0, int64_t v1, const float *phase, const float *upb, int64_t n,
                     const int64_t *masks, int64_t threads) {
    const int64_t N = (int64_t)1 << n;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && v1 - v0 >= 8)
    for (int64_t iv = v0; iv < v1; iv++) {
        const int64_t i = iv / T, t = iv % T;
        float work[4 * N];
        float *u = work, *re = work + N, *im = work + 2 * N, *y = work + 3 * N;
        const float *cs = phase + slots[i] * 2 * N, *sn = cs + N;
        const float *w = upb + slots[i] * (n + 1) * d, *b = w + n * d;
        float *hv = h + (rows[i] * T + t) * d;
        rx_chain(hv, d, N, cs, sn, u, re, im, y);
        const float inv = y[0] > 0.0f ? 1.0f / y[0] : 0.0f; /* y[0] = sum_j p_j */
        for (int64_t q = 0; q < n; q++) {
            const float zq = y[masks[q]] * inv, *wq = w + q * d;
            for (int64_t k = 0; k < d; k++) hv[k] += zq * wq[k];
        }
        for (int64_t k = 0; k < d; k++) hv[k] += b[k];
    }
}

/* ---- LoRA (and SoRA, its gates folded into B) -----------------------------------------
 * For each listed row b = rows[i] with slot s = slots[i] and r = ranks[s] (0: the slot does
 * not adapt this module, the row is skipped), and each of its T tokens:
 *     y[b, t] += (x[b, t] @ A[s, :r].T) @ Bt[s, :r]
 * x, y: row b, token t at x + b * xs0 + t * xs1 (last dim contiguous; y may be a column
 * slice of a fused q|k|v output). A (S, R, din), Bt (S, R, dout); R <= 256. */
void lora_delta(float *y, int64_t ys0, int64_t ys1, const float *x, int64_t xs0, int64_t xs1,
                int64_t T, int64_t din, int64_t dout, const int64_t *rows, const int64_t *slots,
                int64_t n_rows, const int64_t *ranks, const float *A, const float *Bt, int64_t R,
                int64_t threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n_rows * T >= 8)
    for (int64_t iv = 0; iv < n_rows * T; iv++) {
        const int64_t i = iv / T, t = iv % T, s = slots[i], r = ranks[s];
        if (r == 0) continue;
        const float *a = A + s * R * din, *bt = Bt + s * R * dout;
        const float *xv = x + rows[i] * xs0 + t * xs1;
        float *yv = y + rows[i] * ys0 + t * ys1;
        float tmp[256];
        for (int64_t k = 0; k < r; k++) {
            const float *ak = a + k * din;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < din; j++) acc += xv[j] * ak[j];
            tmp[k] = acc;
        }
        for (int64_t k = 0; k < r; k++) {
            const float c = tmp[k], *bk = bt + k * dout;
            for (int64_t j = 0; j < dout; j++) yv[j] += c * bk[j];
        }
    }
}

/* ---- QAA RX <Z> for training: one circuit (cs, sn) for M vectors, and its gradient ------
 * Forward: z[v, q] = y[mask_q] / y[0], y = WHT(p), p = WHT(u*cs)^2 + WHT(u*sn)^2, u = WHT(pad h_v)
 * (the same chain as qaa_rx_residual, without the up-projection, which autograd handles).
 * Backward, given gz (M, n), recomputing the forward per vector (nothing of size N is kept
 * between the passes; WHT is its own transpose):
 *     gy[mask_q] = gz_q / y0,  gy[0] = -sum_q gz_q z_q / y0,  gp = WHT(gy)
 *     ga = WHT(2 re gp),  gb = WHT(2 im gp)
 *     gcs += ga u,  gsn += gb u,  gh = WHT(ga cs + gb sn)[:d]
 * Both split the M vectors over the OpenMP threads (torch's own pool: see cpu_kernels.py). */
void qaa_rx_z(const float *h, int64_t M, int64_t d, const float *cs, const float *sn,
              int64_t n, const int64_t *masks, float *z) {
    const int64_t N = (int64_t)1 << n;
#pragma omp parallel if (M >= 64)
    {
        float work[4 * N];
        float *u = work, *re = work + N, *im = work + 2 * N, *y = work + 3 * N;
#pragma omp for schedule(static)
        for (int64_t v = 0; v < M; v++) {
            rx_chain(h + v * d, d, N, cs, sn, u, re, im, y);
            const float inv = y[0] > 0.0f ? 1.0f / y[0] : 0.0f;
            for (int64_t q = 0; q < n; q++) z[v * n + q] = y[masks[q]] * inv;
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
