/* Fused CSR multi-aggregation: PNA's sum, min, max and std of each segment in one pass over its
 * rows, and the gradient of all of them in one more (see metanet/ops/_fused.py).
 *
 * Rows x[e, 0:f] for e in ptr[i]..ptr[i+1] form segment i (edges sorted by destination). A
 * segment's rows are read while they sit in cache, instead of once per reduction with a fresh
 * [E, F] temporary for each as the separate PyTorch reductions do.
 *
 * Conventions (the same as metanet.ops.reduce):
 *   - empty segments give 0 for every reduction and -1 as arg-extreme;
 *   - min / max keep the first extreme row (the gradient goes to that row only, like
 *     torch_scatter's segment_csr); NaN propagates;
 *   - std is the two-pass population std; variances at or below eps give 0.
 * Every pointer is to a contiguous row-major array; optional outputs / inputs may be NULL; the
 * forward's mu is scratch space for f values.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* Running extreme (CMP is < for min, > for max) of segment i's rows a..b into out / arg: the
 * first extreme row wins ties; a NaN, once seen, stays. */
#define EXTREME(T, CMP, out, arg)                                                                \
    do {                                                                                         \
        T *m = out + i * f;                                                                      \
        int64_t *am = arg + i * f;                                                               \
        memcpy(m, x + a * f, sizeof(T) * f);                                                     \
        for (int64_t k = 0; k < f; k++) am[k] = a;                                               \
        for (int64_t e = a + 1; e < b; e++) {                                                    \
            const T *r = x + e * f;                                                              \
            for (int64_t k = 0; k < f; k++) {                                                    \
                const int take = r[k] CMP m[k] || r[k] != r[k];                                  \
                m[k] = take ? r[k] : m[k];                                                       \
                am[k] = take ? e : am[k];                                                        \
            }                                                                                    \
        }                                                                                        \
    } while (0)

#define PNA_KERNELS(T, SUF, SQRT)                                                                \
    void pna_forward_##SUF(int64_t n, int64_t f, const int64_t *ptr, const T *x, T eps, T *sum,  \
                           T *mn, T *mx, T *sd, int64_t *amin, int64_t *amax, T *mu) {           \
        for (int64_t i = 0; i < n; i++) {                                                        \
            const int64_t a = ptr[i], b = ptr[i + 1];                                            \
            T *s = sum + i * f;                                                                  \
            memset(s, 0, sizeof(T) * f);                                                         \
            if (b <= a) {                                                                        \
                if (mn) memset(mn + i * f, 0, sizeof(T) * f);                                    \
                if (mx) memset(mx + i * f, 0, sizeof(T) * f);                                    \
                if (sd) memset(sd + i * f, 0, sizeof(T) * f);                                    \
                for (int64_t k = 0; k < f; k++) {                                                \
                    if (amin) amin[i * f + k] = -1;                                              \
                    if (amax) amax[i * f + k] = -1;                                              \
                }                                                                                \
                continue;                                                                        \
            }                                                                                    \
            for (int64_t e = a; e < b; e++) {                                                    \
                const T *r = x + e * f;                                                          \
                for (int64_t k = 0; k < f; k++) s[k] += r[k];                                    \
            }                                                                                    \
            if (mn) EXTREME(T, <, mn, amin);                                                     \
            if (mx) EXTREME(T, >, mx, amax);                                                     \
            if (sd) {                                                                            \
                const T cnt = (T)(b - a);                                                        \
                T *d = sd + i * f;                                                               \
                memset(d, 0, sizeof(T) * f);                                                     \
                for (int64_t k = 0; k < f; k++) mu[k] = s[k] / cnt;                              \
                for (int64_t e = a; e < b; e++) {                                                \
                    const T *r = x + e * f;                                                      \
                    for (int64_t k = 0; k < f; k++) {                                            \
                        const T t = r[k] - mu[k];                                                \
                        d[k] += t * t;                                                           \
                    }                                                                            \
                }                                                                                \
                for (int64_t k = 0; k < f; k++) {                                                \
                    const T var = d[k] / cnt;                                                    \
                    d[k] = var <= eps ? (T)0 : SQRT(var);                                        \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
                                                                                                 \
    /* gx[e] = gsum[seg] + gstd[seg] * (x[e] - mean[seg]), plus gmin / gmax at the arg rows. */  \
    void pna_backward_##SUF(int64_t n, int64_t f, const int64_t *ptr, const T *x, const T *gsum, \
                            const T *gstd, const T *mean, const T *gmin, const int64_t *amin,    \
                            const T *gmax, const int64_t *amax, T *gx) {                         \
        for (int64_t i = 0; i < n; i++) {                                                        \
            const int64_t a = ptr[i], b = ptr[i + 1];                                            \
            const T *gs = gsum ? gsum + i * f : 0;                                               \
            const T *gd = gstd ? gstd + i * f : 0;                                               \
            const T *mu = gstd ? mean + i * f : 0;                                               \
            for (int64_t e = a; e < b; e++) {                                                    \
                const T *r = x + e * f;                                                          \
                T *g = gx + e * f;                                                               \
                if (gs && gd)                                                                    \
                    for (int64_t k = 0; k < f; k++) g[k] = gs[k] + gd[k] * (r[k] - mu[k]);       \
                else if (gd)                                                                     \
                    for (int64_t k = 0; k < f; k++) g[k] = gd[k] * (r[k] - mu[k]);               \
                else if (gs)                                                                     \
                    memcpy(g, gs, sizeof(T) * f);                                                \
                else                                                                             \
                    memset(g, 0, sizeof(T) * f);                                                 \
            }                                                                                    \
            if (b <= a) continue;                                                                \
            for (int64_t k = 0; k < f; k++) {                                                    \
                if (gmin) gx[amin[i * f + k] * f + k] += gmin[i * f + k];                        \
                if (gmax) gx[amax[i * f + k] * f + k] += gmax[i * f + k];                        \
            }                                                                                    \
        }                                                                                        \
    }

PNA_KERNELS(float, f32, sqrtf)
PNA_KERNELS(double, f64, sqrt)
