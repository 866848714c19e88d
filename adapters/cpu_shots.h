/* Shot sampling for QAA's emulated circuits (cpu_shots.c), used by cpu_kernels.c. */
#ifndef QAA_CPU_SHOTS_H
#define QAA_CPU_SHOTS_H
#include <stdint.h>

typedef uint64_t u64x8 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

/* xoshiro256** states: one independent stream per (adapter seed, call counter, vector index),
 * made of a scalar generator (uniforms for inversion and BTRS) and 8 lanes of generators run
 * as one vector (16 32-bit uniforms a step, for Bernoulli trials). */
typedef struct {
    u64x8 v[4];
    uint64_t s[4];
} rng_t;

/* Shared by the two sources only: hidden, so no symbol of another loaded library can
 * interpose them (and they are not part of the library's ctypes interface). */
#define QAA_INTERNAL __attribute__((visibility("hidden")))

QAA_INTERNAL void rng_init(rng_t *g, uint64_t seed, uint64_t counter, uint64_t index);
QAA_INTERNAL int64_t binomial(rng_t *g, int64_t n, double p);
QAA_INTERNAL double multinomial(float *w, int64_t nbits, int64_t shots, rng_t *g, double *tree, int64_t *pending);

#endif
