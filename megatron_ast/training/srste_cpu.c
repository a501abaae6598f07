/* The SR-STE AdamW step (training/sr_ste.py) over a whole CPU tensor: one fused OpenMP loop, for ZeRO-Offload's
 * fp32 master partitions. Built at first use by training/srste_cpu.py with the system's C compiler.
 *
 * Every element reads p, g, m, v (and the int8 indicator) once and writes p, m, v once: what DeepSpeed's CPU Adam
 * moves. The plain loop is the masked one with indicator -1, expression for expression (and -ffp-contract=off),
 * so an element's update does not depend on whether it is stepped alone or inside a flat partition. */
#include <math.h>
#include <stdint.h>

/* x86-64: an AVX2 build beside the baseline one, picked at load time by the CPU it runs on (one cached library
 * serves every node); elsewhere the compiler's default target */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

#define SRSTE_KERNELS(T, SQRT, SUFFIX)                                                                        \
    CLONES void srste_masked_##SUFFIX(T *restrict p, const T *restrict g, T *restrict m, T *restrict v,               \
                               const int8_t *restrict ind, int64_t n, double b1, double b2, double lam,        \
                               double lr_wd, double step_size, double bc2, double eps, int v_of_update,        \
                               int threads) {                                                                  \
        const T cb1 = (T)b1, c1b1 = (T)(1 - b1), cb2 = (T)b2, c1b2 = (T)(1 - b2), clam = (T)lam;               \
        const T keep = (T)(1 - lr_wd), cstep = (T)(-step_size), cbc2 = (T)bc2, ceps = (T)eps;                   \
        const int use_u = v_of_update;                                                                         \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads)")                                 \
        for (int64_t i = 0; i < n; i++) {                                                                      \
            /* branch-free (0/1 factors), so the loop vectorises: x * 1 and x + 0 are exact */                 \
            const int k = ind[i];                                                                              \
            const T pruned = (T)(k > 0), sel = (T)((k >= 0) & use_u);                                          \
            const T mi = m[i] * cb1 + g[i] * c1b1;                                                             \
            const T u = mi + clam * p[i] * pruned;                                                             \
            const T sq = sel * u + ((T)1 - sel) * g[i];                                                        \
            const T vi = v[i] * cb2 + sq * sq * c1b2;                                                          \
            p[i] = p[i] * keep + cstep * (u / (SQRT(vi / cbc2) + ceps));                                       \
            m[i] = mi;                                                                                         \
            v[i] = vi;                                                                                         \
        }                                                                                                      \
    }                                                                                                          \
    CLONES void srste_plain_##SUFFIX(T *restrict p, const T *restrict g, T *restrict m, T *restrict v, int64_t n,     \
                              double b1, double b2, double lr_wd, double step_size, double bc2, double eps,     \
                              int threads) {                                                                   \
        const T cb1 = (T)b1, c1b1 = (T)(1 - b1), cb2 = (T)b2, c1b2 = (T)(1 - b2);                              \
        const T keep = (T)(1 - lr_wd), cstep = (T)(-step_size), cbc2 = (T)bc2, ceps = (T)eps;                   \
        _Pragma("omp parallel for simd schedule(static) num_threads(threads)")                                 \
        for (int64_t i = 0; i < n; i++) {                                                                      \
            const T mi = m[i] * cb1 + g[i] * c1b1;                                                             \
            const T gi = g[i];                                                                                 \
            const T vi = v[i] * cb2 + gi * gi * c1b2;                                                          \
            p[i] = p[i] * keep + cstep * (mi / (SQRT(vi / cbc2) + ceps));                                      \
            m[i] = mi;                                                                                         \
            v[i] = vi;                                                                                         \
        }                                                                                                      \
    }

SRSTE_KERNELS(float, sqrtf, f32)
SRSTE_KERNELS(double, sqrt, f64)
