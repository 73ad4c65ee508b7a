/* Fused CSR multi-aggregation: PNA's sum, min, max and std of each segment in one pass over its
 * rows, and the gradient of all of them in one more (see metanet/ops/_fused.py).
 *
 * Rows of segment i are the rows ptr[i]..ptr[i+1] (messages sorted by destination). A segment's
 * rows are read while they sit in cache, instead of once per reduction with a fresh [E, F]
 * temporary for each as the separate PyTorch reductions do.
 *
 * Three kernels:
 *   pna_*       the rows are given: x [E, f];
 *   film_pna_*  the rows are FiLM messages built on the fly and never stored:
 *               m[k] = scale[r] * (a[sender[k]] + b[i]) + shift[r], r = rows ? rows[k] : k,
 *               for row k of segment i (GMN's / NG-GNN's edge-conditioned messages; `rows`
 *               reads the edges of a reverse direction through a permutation);
 *   attention_* edge-modulated multi-head attention over each segment (NG-T), likewise
 *               computed per segment and never stored.
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
#define SEG_EXP expf
#include __FILE__
#undef SEG_T
#undef SEG_NAME
#undef SEG_SQRT
#undef SEG_EXP

#define SEG_T double
#define SEG_NAME(name) name##_f64
#define SEG_SQRT sqrt
#define SEG_EXP exp
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

/* Edge-modulated attention of segment i (NG-T's relational attention; see
 * metanet/ops/attention.py). Node rows nq [.., 3f] hold q | k | v, edge rows ne [.., 3f or 4f]
 * hold the edge's q | k | v-shift (| v-scale with modulate). For row k (edge r = rows[k] or
 * k, sender s = sender[k]): qq = q[i] + eq[r], kk = k[s] + ek[r], vv = v[s] * evs[r] + evh[r]
 * (or v[s] + evh[r]); per head, softmax over the segment of <qq, kk> * scale. Fills
 * qq / kk / vv [deg, f] and attn [deg, heads]. */
static void SEG_NAME(attention_rows)(int64_t i, int64_t a0, int64_t deg, int64_t f,
                                     int64_t heads, T scale, int modulate, const int64_t *sender,
                                     const int64_t *rows, const T *nq, int64_t ld_n, const T *ne,
                                     int64_t ld_e, T *qq, T *kk, T *vv, T *attn) {
    const int64_t dh = f / heads;
    const T *qi = nq + i * ld_n;
    for (int64_t e = 0; e < deg; e++) {
        const int64_t k = a0 + e, r = rows ? rows[k] : k;
        const T *ns = nq + sender[k] * ld_n, *er = ne + r * ld_e;
        T *q = qq + e * f, *kr = kk + e * f, *v = vv + e * f;
        for (int64_t c = 0; c < f; c++) {
            q[c] = qi[c] + er[c];
            kr[c] = ns[f + c] + er[f + c];
            v[c] = modulate ? ns[2 * f + c] * er[3 * f + c] + er[2 * f + c]
                            : ns[2 * f + c] + er[2 * f + c];
        }
        for (int64_t h = 0; h < heads; h++) {
            T dot = 0;
            for (int64_t c = h * dh; c < (h + 1) * dh; c++) dot += q[c] * kr[c];
            attn[e * heads + h] = dot * scale;
        }
    }
    for (int64_t h = 0; h < heads; h++) {
        T top = attn[h], total = 0;
        for (int64_t e = 1; e < deg; e++)
            top = attn[e * heads + h] > top ? attn[e * heads + h] : top;
        for (int64_t e = 0; e < deg; e++) {
            const T w = SEG_EXP(attn[e * heads + h] - top);
            attn[e * heads + h] = w;
            total += w;
        }
        for (int64_t e = 0; e < deg; e++) attn[e * heads + h] /= total;
    }
}

/* out [n, f] = per head, the attention-weighted sum of the values of each segment (0 if
 * empty). scratch: (3 f + heads) * max_degree values. */
void SEG_NAME(attention_forward)(int64_t n, int64_t f, int64_t heads, T scale, int modulate,
                                 const int64_t *ptr, const int64_t *sender, const int64_t *rows,
                                 const T *nq, int64_t ld_n, const T *ne, int64_t ld_e, T *out,
                                 int64_t max_degree, T *scratch) {
    T *qq = scratch, *kk = qq + max_degree * f, *vv = kk + max_degree * f;
    T *attn = vv + max_degree * f;
    const int64_t dh = f / heads;
    for (int64_t i = 0; i < n; i++) {
        const int64_t a0 = ptr[i], deg = ptr[i + 1] - ptr[i];
        T *o = out + i * f;
        memset(o, 0, sizeof(T) * f);
        if (deg <= 0) continue;
        SEG_NAME(attention_rows)(i, a0, deg, f, heads, scale, modulate, sender, rows, nq, ld_n,
                                 ne, ld_e, qq, kk, vv, attn);
        for (int64_t e = 0; e < deg; e++)
            for (int64_t h = 0; h < heads; h++) {
                const T a = attn[e * heads + h];
                for (int64_t c = h * dh; c < (h + 1) * dh; c++) o[c] += a * vv[e * f + c];
            }
    }
}

/* Gradients of attention_forward: dn [N, 3f] (accumulated, must start at 0) and de [E, 3f or
 * 4f] (every edge row written). scratch: (3 f + 2 heads) * max_degree + heads values. */
void SEG_NAME(attention_backward)(int64_t n, int64_t f, int64_t heads, T scale, int modulate,
                                  const int64_t *ptr, const int64_t *sender, const int64_t *rows,
                                  const T *nq, int64_t ld_n, const T *ne, int64_t ld_e,
                                  const T *gout, T *dn, T *de, int64_t max_degree, T *scratch) {
    T *qq = scratch, *kk = qq + max_degree * f, *vv = kk + max_degree * f;
    T *attn = vv + max_degree * f, *ds = attn + max_degree * heads, *acc = ds + max_degree * heads;
    const int64_t dh = f / heads, we = modulate ? 4 * f : 3 * f;
    for (int64_t i = 0; i < n; i++) {
        const int64_t a0 = ptr[i], deg = ptr[i + 1] - ptr[i];
        if (deg <= 0) continue;
        const T *go = gout + i * f;
        SEG_NAME(attention_rows)(i, a0, deg, f, heads, scale, modulate, sender, rows, nq, ld_n,
                                 ne, ld_e, qq, kk, vv, attn);
        for (int64_t h = 0; h < heads; h++) acc[h] = 0;
        for (int64_t e = 0; e < deg; e++)
            for (int64_t h = 0; h < heads; h++) {
                T dot = 0; /* d loss / d attn */
                for (int64_t c = h * dh; c < (h + 1) * dh; c++) dot += vv[e * f + c] * go[c];
                ds[e * heads + h] = dot;
                acc[h] += attn[e * heads + h] * dot;
            }
        T *dqi = dn + i * 3 * f;
        for (int64_t e = 0; e < deg; e++) {
            const int64_t k = a0 + e, r = rows ? rows[k] : k, s = sender[k];
            const T *ns = nq + s * ld_n, *er = ne + r * ld_e;
            T *dns = dn + s * 3 * f, *der = de + r * we;
            for (int64_t h = 0; h < heads; h++) {
                const T a = attn[e * heads + h];
                const T g = a * (ds[e * heads + h] - acc[h]) * scale; /* d loss / d <qq, kk> */
                for (int64_t c = h * dh; c < (h + 1) * dh; c++) {
                    der[c] = g * kk[e * f + c];
                    der[f + c] = g * qq[e * f + c];
                    der[2 * f + c] = a * go[c];
                }
            }
            /* node gradients from the edge row just written (separate loops: dqi and dns may
             * be the same row of dn on a self-loop) */
            for (int64_t c = 0; c < f; c++) dqi[c] += der[c];
            for (int64_t c = 0; c < f; c++) dns[f + c] += der[f + c];
            if (modulate)
                for (int64_t c = 0; c < f; c++) {
                    const T dv = der[2 * f + c];
                    dns[2 * f + c] += dv * er[3 * f + c];
                    der[3 * f + c] = dv * ns[2 * f + c];
                }
            else
                for (int64_t c = 0; c < f; c++) dns[2 * f + c] += der[2 * f + c];
        }
    }
}
#undef T
#endif
