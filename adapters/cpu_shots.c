/* Exact multinomial sampling of N shots over a circuit's 2^n outcomes, for QAA's shot
 * emulation on the CPU (cpu_kernels.c's qaa_rx_residual with shots > 0). Reference semantics:
 * adapters/emulation.py `sample_counts` (torch), the same distribution from another stream.
 *
 * Streams. Every vector of every call draws from generators of its own (xoshiro256**: one
 * scalar, 8 vector lanes), seeded by mixing (adapter seed, the slot's call counter, the
 * vector's index in the call) with splitmix64's finaliser. Nothing is shared between vectors, so results do not depend on how
 * OpenMP splits the vectors over threads, and a reloaded adapter (counter 0) repeats itself.
 *
 * Counts. The outcomes are the leaves of a binary tree (a heap of 2K subtree weights); the N
 * shots at a node split between its two subtrees as Bin(count, left weight / node weight),
 * which gives the multinomial exactly. Only nodes that received shots draw, so the cost is
 * O(K) plus O(min(N, K) n) draws for few shots, and at most K - 1 binomial draws for many, each
 * in bounded expected time whatever its mean (below): the cost stops growing with N (K = 1024,
 * one core: ~2 us at 1 shot, 13 us at 1,000, 21 us at 10,000, 37 us at 100,000 and beyond).
 *
 * Binomials, Bin(n, p) with p <= 1/2 (else n - Bin(n, 1 - p)):
 *   n <= 256:     n Bernoulli trials, 16 per step of 8 vector lanes of generators (the tree's
 *                 many small counts: ~10 ns for 40 trials, where BTRS takes ~25-40 ns);
 *   n p < 10:     inversion: walk the pmf up from f(0) = (1 - p)^n with
 *                 f(x + 1) = f(x) ((n + 1) s / (x + 1) - s), s = p / (1 - p); O(n p) steps;
 *   n p >= 10:    Hormann's BTRS (transformed rejection with squeeze, W. Hormann, "The
 *                 generation of binomial random variates", J. Stat. Comput. Simul. 46, 1993),
 *                 written from the paper: a hat over the pmf from an inverse transform of a
 *                 uniform; most candidates are accepted by the squeeze from two uniforms, the
 *                 others by comparing with log f(k) / f(m) through Stirling's series.
 * Inversion and BTRS use 53-bit uniforms; a Bernoulli trial compares a 32-bit uniform with p
 * rounded to a multiple of 2^-32 (an error below 2^-33, far below that of the fp32 probabilities
 * the tree is built from).
 */
#define _DEFAULT_SOURCE
#include <math.h>
#include <string.h>

#include "cpu_shots.h"

#define BERNOULLI_MAX 256 /* 16 trials per ~1.5 ns vector step beat BTRS's ~25 ns up to about here */

/* splitmix64's output function: a bijective 64-bit mixer (the usual xoshiro seeding). */
static uint64_t mix64(uint64_t z) {
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void rng_init(rng_t *g, uint64_t seed, uint64_t counter, uint64_t index) {
    uint64_t k = mix64(mix64(mix64(seed) ^ counter) ^ index);
    for (int i = 0; i < 4; i++) g->s[i] = k = mix64(k);
    for (int i = 0; i < 4; i++)
        for (int l = 0; l < 8; l++) g->v[i][l] = k = mix64(k);
}

static inline uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static inline uint64_t next64(rng_t *g) {  /* xoshiro256** (Blackman & Vigna) */
    uint64_t *s = g->s;
    const uint64_t out = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

static inline double uniform(rng_t *g) { return (double)(next64(g) >> 11) * 0x1.0p-53; } /* [0, 1) */

static inline u32x16 next16(rng_t *g) { /* xoshiro256** on 8 lanes at once: 16 32-bit uniforms */
    u64x8 *s = g->v;
    const u64x8 x = (s[1] << 2) + s[1], r = (x << 7) | (x >> 57), t = s[1] << 17; /* rotl(s1 * 5, 7) */
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = (s[3] << 45) | (s[3] >> 19);
    return (u32x16)((r << 3) + r); /* * 9 */
}

/* fc(k) = log k! - ((k + 1/2) log(k + 1) - (k + 1) + log(2 pi) / 2): exact below 10, Stirling's
 * series above (error < 1e-10 at k = 10). */
static double stirling_tail(int64_t k) {
    static const double small[10] = {0.08106146679532733, 0.04134069595540946, 0.027677925684997717,
                                     0.02079067210376584, 0.016644691189820815, 0.013876128823072431,
                                     0.01189670994589287, 0.010411265261973224, 0.009255462182709007,
                                     0.008330563433359028};
    if (k < 10) return small[k];
    const double r = 1.0 / (double)(k + 1), r2 = r * r;
    return (1.0 / 12 - (1.0 / 360 - r2 / 1260) * r2) * r;
}

/* n Bernoulli(p) trials, p <= 1/2, 16 at a time: each 32-bit uniform is below p 2^32 rounded
 * with probability p to within 2^-33, far below the fp32 probabilities' own rounding. */
static int64_t bernoulli_sum(rng_t *g, int64_t n, double p) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const u32x16 below = (u32x16){0} + (uint32_t)(p * 4294967296.0 + 0.5);
    i32x16 hits = {0};
    for (int64_t i = 0; i < n; i += 16) {
        const i32x16 left = (i32x16){0} + (int32_t)(n - i < 16 ? n - i : 16);
        hits -= (next16(g) < below) & (lane < left); /* a comparison's true is -1 */
    }
    int64_t k = 0;
    for (int l = 0; l < 16; l++) k += hits[l];
    return k;
}

static int64_t inversion(rng_t *g, int64_t n, double p) {
    const double s = p / (1 - p), a = (double)(n + 1) * s, f0 = exp((double)n * log1p(-p));
    for (;;) {
        double u = uniform(g), f = f0;
        for (int64_t x = 0; x <= n && f > 0; x++) {
            if (u < f) return x;
            u -= f;
            f *= a / (double)(x + 1) - s;
        }
        /* u fell beyond the pmf's rounded total (probability ~1e-16): draw again */
    }
}

static int64_t btrs(rng_t *g, int64_t n, double p) {
    const double q = 1 - p, spq = sqrt((double)n * p * q), r = p / q;
    const double b = 1.15 + 2.53 * spq, ib = 1 / b, a = -0.0873 + 0.0248 * b + 0.01 * p, c = (double)n * p + 0.5;
    const double alpha = (2.83 + 5.1 * ib) * spq, vr = 0.92 - 4.2 * ib;
    const int64_t m = (int64_t)floor((double)(n + 1) * p); /* the mode */
    double h = NAN; /* the terms of m in log f(k) / f(m), made on the first candidate outside the squeeze */
    for (;;) {
        const double u = uniform(g) - 0.5, us = 0.5 - fabs(u);
        double v = uniform(g);
        const double kf = floor((2 * a / us + b) * u + c);
        if (kf < 0 || kf > (double)n) continue;
        const int64_t k = (int64_t)kf;
        if (us >= 0.07 && v <= vr) return k; /* inside the squeeze: under the pmf */
        v = log(v * alpha / (a / (us * us) + b)); /* the hat's height at k, relative to f(m) */
        /* log f(k) / f(m) = h + (n + 1) log((n - m + 1) / (n - k + 1)) + (k + 1/2) log(r (n - k + 1) / (k + 1))
         *                   - fc(k) - fc(n - k)  (Stirling's formula for the four factorials) */
        if (isnan(h)) h = (m + 0.5) * log((m + 1) / (r * (double)(n - m + 1))) + stirling_tail(m) + stirling_tail(n - m);
        const double nk = (double)(n - k + 1);
        const double bound = h + (double)(n + 1) * log((double)(n - m + 1) / nk) + (k + 0.5) * log(r * nk / (double)(k + 1))
                             - stirling_tail(k) - stirling_tail(n - k);
        if (v <= bound) return k;
    }
}

int64_t binomial(rng_t *g, int64_t n, double p) {
    if (n <= 0 || !(p > 0)) return 0;
    if (p >= 1) return n;
    const int flip = p > 0.5; /* draw Bin(n, 1 - p) and return n minus it: 1 - p is exact here */
    const double q = flip ? 1 - p : p;
    int64_t k;
    if (n <= BERNOULLI_MAX) {
        k = bernoulli_sum(g, n, q);
    } else if ((double)n * q < 10) {
        k = inversion(g, n, q);
    } else {
        k = btrs(g, n, q);
    }
    return flip ? n - k : k;
}

/* w (K = 2^nbits floats): weights in (non-negative, any scale), multinomial counts of `shots`
 * draws out (exact integers in fp32 for shots < 2^24). Scratch: tree, 2K doubles (the heap of
 * subtree weights: node i's children are 2i and 2i + 1, leaf j is K + j), and pending, K counts
 * (the shots that reached each internal node). Heap order is breadth-first, so one pass over
 * the internal nodes splits every node after its parent. Returns the total weight; when it is
 * 0 (no distribution) the counts are all 0. */
double multinomial(float *w, int64_t nbits, int64_t shots, rng_t *g, double *tree, int64_t *pending) {
    const int64_t K = (int64_t)1 << nbits;
    for (int64_t j = 0; j < K; j++) tree[K + j] = w[j] > 0 ? (double)w[j] : 0.0;
    for (int64_t i = K - 1; i >= 1; i--) tree[i] = tree[2 * i] + tree[2 * i + 1];
    const double total = tree[1];
    if (!(total > 0) || shots <= 0 || K == 1) {
        memset(w, 0, K * sizeof(float));
        if (total > 0 && shots > 0) w[0] = (float)shots;
        return total > 0 ? total : 0.0;
    }
    pending[1] = shots;
    for (int64_t i = 1; i < K; i++) {
        const int64_t c = pending[i];
        /* left share exactly 1 when the right subtree is empty, 0 when the left is */
        const int64_t left = c > 0 ? binomial(g, c, tree[2 * i] / tree[i]) : 0;
        if (2 * i < K) {
            pending[2 * i] = left;
            pending[2 * i + 1] = c - left;
        } else {
            w[2 * i - K] = (float)left;
            w[2 * i + 1 - K] = (float)(c - left);
        }
    }
    return total;
}

/* ---- entry points for the tests (adapters/cpu_kernels.py) ---------------------------- */

/* out[i] ~ Bin(n, p), i < M, from the stream (seed, 0, 0). */
void qaa_binomial_draws(int64_t n, double p, int64_t M, int64_t seed, int64_t *out) {
    rng_t g;
    rng_init(&g, (uint64_t)seed, 0, 0);
    for (int64_t i = 0; i < M; i++) out[i] = binomial(&g, n, p);
}

/* counts (R, 2^nbits) of `shots` draws from each row of w (R, 2^nbits), row r from the stream
 * (seed, counter, r): the sampler the residual kernel runs for its vector r. */
void qaa_multinomial(const float *w, int64_t R, int64_t nbits, int64_t shots, int64_t seed, int64_t counter,
                     float *counts, int64_t threads) {
    const int64_t K = (int64_t)1 << nbits;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && R >= 2)
    for (int64_t r = 0; r < R; r++) {
        double tree[2 * K];
        int64_t pending[K];
        rng_t g;
        rng_init(&g, (uint64_t)seed, (uint64_t)counter, (uint64_t)r);
        memcpy(counts + r * K, w + r * K, K * sizeof(float));
        multinomial(counts + r * K, nbits, shots, &g, tree, pending);
    }
}
