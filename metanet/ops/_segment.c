/* Fused CSR multi-aggregation: PNA's sum, min, max and std of each segment in one pass over its
 * rows, and the gradient of all of them in one more (see metanet/ops/_fused.py).
 *
 * Rows of segment i are the rows ptr[i]..ptr[i+1] (messages sorted by destination). A segment's
 * rows are read while they sit in cache, instead of once per reduction with a fresh [E, F]
 * temporary for each as the separate PyTorch reductions do.
 *
 * Two row sources:
 *   pna_*       the rows are given: x [E, f];
 *   film_pna_*  the rows are FiLM messages built on the fly and never stored:
 *               m[k] = scale[r] * (a[sender[k]] + b[i]) + shift[r], r = rows ? rows[k] : k,
 *               for row k of segment i (GMN's / NG-GNN's edge-conditioned messages; `rows`
 *               reads the edges of a reverse direction through a permutation).
 *
 * Conventions (the same as metanet.ops.reduce):
 *   - empty segments give 0 for every reduction and -1 as arg-extreme;
 *   - min / max keep the first extreme row (the gradient goes to that row only, like
 *     torch_scatter's segment_csr); NaN propagates;
 *   - std is the two-pass population std; variances at or below eps give 0.
 * Optional outputs / inputs may be NULL. Matrices are row-major with a row stride ("ld_*") in
 * elements; `scratch` holds f values (pna_*) or (max degree + 1) * f values (film_pna_*).
 * The file includes itself once per element type (float: *_f32, double: *_f64).
 */
#ifndef SEG_T
#include <math.h>
#include <stdint.h>
#include <string.h>

#define SEG_T float
#define SEG_NAME(name) name##_f32
#define SEG_SQRT sqrtf
#include __FILE__
#undef SEG_T
#undef SEG_NAME
#undef SEG_SQRT

#define SEG_T double
#define SEG_NAME(name) name##_f64
#define SEG_SQRT sqrt
#include __FILE__

#else
#define T SEG_T

/* The reductions of one segment's rows x[0..deg) (row stride f; global row ids start at a0)
 * into row i of the outputs; mu is scratch for f values. */
static void SEG_NAME(reduce_segment)(int64_t i, int64_t a0, int64_t deg, int64_t f, const T *x,
                                     T eps, T *sum, T *mn, T *mx, T *sd, int64_t *amin,
                                     int64_t *amax, T *mu) {
    T *s = sum + i * f;
    memset(s, 0, sizeof(T) * f);
    if (deg <= 0) {
        if (mn) memset(mn + i * f, 0, sizeof(T) * f);
        if (mx) memset(mx + i * f, 0, sizeof(T) * f);
        if (sd) memset(sd + i * f, 0, sizeof(T) * f);
        for (int64_t k = 0; k < f; k++) {
            if (amin) amin[i * f + k] = -1;
            if (amax) amax[i * f + k] = -1;
        }
        return;
    }
    for (int64_t e = 0; e < deg; e++) {
        const T *r = x + e * f;
        for (int64_t k = 0; k < f; k++) s[k] += r[k];
    }
    for (int pass = 0; pass < 2; pass++) {  /* pass 0: min, pass 1: max */
        T *m = pass ? (mx ? mx + i * f : 0) : (mn ? mn + i * f : 0);
        int64_t *am = pass ? (amax ? amax + i * f : 0) : (amin ? amin + i * f : 0);
        if (!m) continue;
        memcpy(m, x, sizeof(T) * f);
        for (int64_t k = 0; k < f; k++) am[k] = a0;
        for (int64_t e = 1; e < deg; e++) {
            const T *r = x + e * f;
            for (int64_t k = 0; k < f; k++) {
                const int better = pass ? r[k] > m[k] : r[k] < m[k];
                const int take = better || r[k] != r[k]; /* a NaN, once taken, stays */
                m[k] = take ? r[k] : m[k];
                am[k] = take ? a0 + e : am[k];
            }
        }
    }
    if (sd) {
        const T cnt = (T)deg;
        T *d = sd + i * f;
        memset(d, 0, sizeof(T) * f);
        for (int64_t k = 0; k < f; k++) mu[k] = s[k] / cnt;
        for (int64_t e = 0; e < deg; e++) {
            const T *r = x + e * f;
            for (int64_t k = 0; k < f; k++) {
                const T t = r[k] - mu[k];
                d[k] += t * t;
            }
        }
        for (int64_t k = 0; k < f; k++) {
            const T var = d[k] / cnt;
            d[k] = var <= eps ? (T)0 : SEG_SQRT(var);
        }
    }
}

/* The gradient rows g[0..deg) of segment i's rows x[0..deg) (global row ids from a0):
 * gsum[i] + gstd[i] * (x - mean[i]), plus gmin / gmax at the arg-extreme rows. */
static void SEG_NAME(grad_segment)(int64_t i, int64_t a0, int64_t deg, int64_t f, const T *x,
                                   const T *gsum, const T *gstd, const T *mean, const T *gmin,
                                   const int64_t *amin, const T *gmax, const int64_t *amax,
                                   T *g) {
    const T *gs = gsum ? gsum + i * f : 0;
    const T *gd = gstd ? gstd + i * f : 0;
    const T *mu = gstd ? mean + i * f : 0;
    for (int64_t e = 0; e < deg; e++) {
        const T *r = x + e * f;
        T *ge = g + e * f;
        if (gs && gd)
            for (int64_t k = 0; k < f; k++) ge[k] = gs[k] + gd[k] * (r[k] - mu[k]);
        else if (gd)
            for (int64_t k = 0; k < f; k++) ge[k] = gd[k] * (r[k] - mu[k]);
        else if (gs)
            memcpy(ge, gs, sizeof(T) * f);
        else
            memset(ge, 0, sizeof(T) * f);
    }
    if (deg <= 0) return;
    for (int64_t k = 0; k < f; k++) {
        if (gmin) g[(amin[i * f + k] - a0) * f + k] += gmin[i * f + k];
        if (gmax) g[(amax[i * f + k] - a0) * f + k] += gmax[i * f + k];
    }
}

void SEG_NAME(pna_forward)(int64_t n, int64_t f, const int64_t *ptr, const T *x, T eps, T *sum,
                           T *mn, T *mx, T *sd, int64_t *amin, int64_t *amax, T *scratch) {
    for (int64_t i = 0; i < n; i++)
        SEG_NAME(reduce_segment)(i, ptr[i], ptr[i + 1] - ptr[i], f, x + ptr[i] * f, eps, sum, mn,
                                 mx, sd, amin, amax, scratch);
}

void SEG_NAME(pna_backward)(int64_t n, int64_t f, const int64_t *ptr, const T *x, const T *gsum,
                            const T *gstd, const T *mean, const T *gmin, const int64_t *amin,
                            const T *gmax, const int64_t *amax, T *gx) {
    for (int64_t i = 0; i < n; i++)
        SEG_NAME(grad_segment)(i, ptr[i], ptr[i + 1] - ptr[i], f, x + ptr[i] * f, gsum, gstd,
                               mean, gmin, amin, gmax, amax, gx + ptr[i] * f);
}

/* Segment i's FiLM messages into m[0..deg) (row stride f); u (if not NULL) receives the
 * modulated sums a[sender] + b[i]. */
static void SEG_NAME(film_rows)(int64_t i, int64_t a0, int64_t deg, int64_t f,
                                const int64_t *sender, const int64_t *rows, const T *scale,
                                int64_t ld_scale, const T *shift, int64_t ld_shift, const T *a,
                                int64_t ld_a, const T *b, int64_t ld_b, T *m, T *u) {
    const T *bi = b + i * ld_b;
    for (int64_t e = 0; e < deg; e++) {
        const int64_t k = a0 + e, r = rows ? rows[k] : k;
        const T *as = a + sender[k] * ld_a, *sc = scale + r * ld_scale, *sh = shift + r * ld_shift;
        T *me = m + e * f;
        if (u) {
            T *ue = u + e * f;
            for (int64_t c = 0; c < f; c++) {
                ue[c] = as[c] + bi[c];
                me[c] = sc[c] * ue[c] + sh[c];
            }
        } else {
            for (int64_t c = 0; c < f; c++) me[c] = sc[c] * (as[c] + bi[c]) + sh[c];
        }
    }
}

void SEG_NAME(film_pna_forward)(int64_t n, int64_t f, const int64_t *ptr, const int64_t *sender,
                                const int64_t *rows, const T *scale, int64_t ld_scale,
                                const T *shift, int64_t ld_shift, const T *a, int64_t ld_a,
                                const T *b, int64_t ld_b, T eps, T *sum, T *mn, T *mx, T *sd,
                                int64_t *amin, int64_t *amax, T *scratch) {
    for (int64_t i = 0; i < n; i++) {
        const int64_t a0 = ptr[i], deg = ptr[i + 1] - ptr[i];
        T *m = scratch + f;
        SEG_NAME(film_rows)(i, a0, deg, f, sender, rows, scale, ld_scale, shift, ld_shift, a,
                            ld_a, b, ld_b, m, 0);
        SEG_NAME(reduce_segment)(i, a0, deg, f, m, eps, sum, mn, mx, sd, amin, amax, scratch);
    }
}

/* Gradients of film_pna_forward's reductions: dscale / dshift [E, f] at the edge rows, da
 * (accumulated, must start at 0) and db [n, f]. scratch: 3 * (max degree) * f values. */
void SEG_NAME(film_pna_backward)(int64_t n, int64_t f, const int64_t *ptr, const int64_t *sender,
                                 const int64_t *rows, const T *scale, int64_t ld_scale,
                                 const T *shift, int64_t ld_shift, const T *a, int64_t ld_a,
                                 const T *b, int64_t ld_b, const T *gsum, const T *gstd,
                                 const T *mean, const T *gmin, const int64_t *amin,
                                 const T *gmax, const int64_t *amax, T *dscale, T *dshift, T *da,
                                 T *db, int64_t max_degree, T *scratch) {
    T *m = scratch, *u = scratch + max_degree * f, *g = scratch + 2 * max_degree * f;
    for (int64_t i = 0; i < n; i++) {
        const int64_t a0 = ptr[i], deg = ptr[i + 1] - ptr[i];
        T *dbi = db + i * f;
        memset(dbi, 0, sizeof(T) * f);
        if (deg <= 0) continue;
        SEG_NAME(film_rows)(i, a0, deg, f, sender, rows, scale, ld_scale, shift, ld_shift, a,
                            ld_a, b, ld_b, m, u);
        SEG_NAME(grad_segment)(i, a0, deg, f, m, gsum, gstd, mean, gmin, amin, gmax, amax, g);
        for (int64_t e = 0; e < deg; e++) {
            const int64_t k = a0 + e, r = rows ? rows[k] : k;
            const T *ge = g + e * f, *ue = u + e * f, *sc = scale + r * ld_scale;
            T *ds = dscale + r * f, *dh = dshift + r * f, *das = da + sender[k] * f;
            for (int64_t c = 0; c < f; c++) {
                const T gu = ge[c] * sc[c];
                ds[c] = ge[c] * ue[c];
                dh[c] = ge[c];
                das[c] += gu;
                dbi[c] += gu;
            }
        }
    }
}
#undef T
#endif
