/* Fused training and evaluation kernels for many small ReLU chains at once (the zoo builder's
 * native path, see metanet/zoo/native.py).
 *
 * A chain is a list of ops (conv2d, linear, relu, dropout, flatten, average pool), each described
 * by 12 ints: {type, c_in, h_in, w_in, c_out, h_out, w_out, k, stride, pad, weight_off, bias_off}
 * (offsets into one network's flat parameter row, PyTorch state_dict order). Features are kept in
 * PyTorch's (C, H, W) order, so Flatten is a no-op. Samples are processed eight at a time, one per
 * SIMD lane: every activation is a [features][8] array, every multiply-add a vector FMA over eight
 * samples, and parameter gradients accumulate per lane ([D][8]) until the network is done.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(32)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(32)));

enum { OP_CONV = 0, OP_LINEAR = 1, OP_RELU = 2, OP_DROPOUT = 3, OP_FLATTEN = 4, OP_POOL = 5 };
enum { D_TYPE, D_CIN, D_HIN, D_WIN, D_COUT, D_HOUT, D_WOUT, D_K, D_S, D_PAD, D_WOFF, D_BOFF };
#define DESC 12
#define LANES 8

static int feat_in(const int *d) { return d[D_CIN] * d[D_HIN] * d[D_WIN]; }
static int feat_out(const int *d) { return d[D_COUT] * d[D_HOUT] * d[D_WOUT]; }

static v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }

static uint64_t mix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

/* Copy maps [c][h][w] into the zero-padded [c][h + 2 pad][w + 2 pad]. */
static void pad_maps(const v8 *in, v8 *out, int c_n, int h, int w, int pad) {
    const int hp = h + 2 * pad, wp = w + 2 * pad;
    memset(out, 0, sizeof(v8) * c_n * hp * wp);
    for (int c = 0; c < c_n; c++)
        for (int y = 0; y < h; y++)
            memcpy(out + (c * hp + y + pad) * wp + pad, in + (c * h + y) * w, sizeof(v8) * w);
}

/* One output row of one channel, accumulated in registers (``wo`` a constant after inlining). */
static inline __attribute__((always_inline)) void conv_row(int wo, const float *w, float bias,
                                                           const v8 *inp, int ci_n, int k, int s,
                                                           int hp, int wp, int y0, v8 *out) {
    v8 acc[32];
    for (int ox = 0; ox < wo; ox++) acc[ox] = splat(bias);
    for (int ci = 0; ci < ci_n; ci++)
        for (int dy = 0; dy < k; dy++) {
            const v8 *row = inp + (ci * hp + y0 + dy) * wp;
            const float *wr = w + (ci * k + dy) * k;
            for (int dx = 0; dx < k; dx++) {
                const float wv = wr[dx];
                for (int ox = 0; ox < wo; ox++) acc[ox] += wv * row[ox * s + dx];
            }
        }
    for (int ox = 0; ox < wo; ox++) out[ox] = acc[ox];
}

/* inp: the input maps zero-padded (pad_maps), so no bounds checks; each output row is
 * accumulated in registers. */
static void conv_fwd(const int *d, const float *p, const v8 *inp, v8 *out) {
    const int ci_n = d[D_CIN], co_n = d[D_COUT], ho = d[D_HOUT], wo = d[D_WOUT];
    const int k = d[D_K], s = d[D_S], pad = d[D_PAD];
    const int hp = d[D_HIN] + 2 * pad, wp = d[D_WIN] + 2 * pad;
    const float *w = p + d[D_WOFF], *b = p + d[D_BOFF];
    for (int co = 0; co < co_n; co++) {
        const float *wc = w + co * ci_n * k * k;
        for (int oy = 0; oy < ho; oy++) {
            v8 *o = out + (co * ho + oy) * wo;
            const int y0 = oy * s;
            switch (wo) {
            case 4: conv_row(4, wc, b[co], inp, ci_n, k, s, hp, wp, y0, o); break;
            case 8: conv_row(8, wc, b[co], inp, ci_n, k, s, hp, wp, y0, o); break;
            case 16: conv_row(16, wc, b[co], inp, ci_n, k, s, hp, wp, y0, o); break;
            default:
                if (wo <= 32) {
                    conv_row(wo, wc, b[co], inp, ci_n, k, s, hp, wp, y0, o);
                } else { /* wide maps: one output at a time */
                    for (int ox = 0; ox < wo; ox++) {
                        v8 acc = splat(b[co]);
                        for (int ci = 0; ci < ci_n; ci++)
                            for (int dy = 0; dy < k; dy++)
                                for (int dx = 0; dx < k; dx++)
                                    acc += wc[(ci * k + dy) * k + dx] *
                                           inp[(ci * hp + y0 + dy) * wp + ox * s + dx];
                        o[ox] = acc;
                    }
                }
            }
        }
    }
}

/* Weight and input gradients of one (output channel, input channel, kernel row): ``k`` a
 * constant after inlining, so the k weight-gradient accumulators stay in registers. */
static inline __attribute__((always_inline)) void conv_bwd_row(int k, const v8 *g, const v8 *inp,
                                                               const float *wr, v8 *gwr, v8 *ginp,
                                                               int ho, int wo, int s, int wp) {
    v8 acc[8];
    for (int dx = 0; dx < k; dx++) acc[dx] = splat(0.0f);
    for (int oy = 0; oy < ho; oy++) {
        const v8 *row = inp + oy * s * wp;
        const v8 *grow = g + oy * wo;
        for (int ox = 0; ox < wo; ox++) {
            const v8 gv = grow[ox];
            const v8 *r = row + ox * s;
            for (int dx = 0; dx < k; dx++) acc[dx] += gv * r[dx];
        }
    }
    for (int dx = 0; dx < k; dx++) gwr[dx] += acc[dx];
    if (!ginp) return;
    for (int oy = 0; oy < ho; oy++) {
        v8 *row = ginp + oy * s * wp;
        const v8 *grow = g + oy * wo;
        for (int ox = 0; ox < wo; ox++) {
            const v8 gv = grow[ox];
            v8 *r = row + ox * s;
            for (int dx = 0; dx < k; dx++) r[dx] += wr[dx] * gv;
        }
    }
}

/* gw, gb: per-lane parameter gradients; ginp (zeroed, padded like inp) or NULL. */
static void conv_bwd(const int *d, const float *p, const v8 *inp, const v8 *gout, v8 *gw, v8 *gb,
                     v8 *ginp) {
    const int ci_n = d[D_CIN], co_n = d[D_COUT], ho = d[D_HOUT], wo = d[D_WOUT];
    const int k = d[D_K], s = d[D_S], pad = d[D_PAD];
    const int hp = d[D_HIN] + 2 * pad, wp = d[D_WIN] + 2 * pad;
    const float *w = p + d[D_WOFF];
    for (int co = 0; co < co_n; co++) {
        const v8 *g = gout + co * ho * wo;
        v8 acc_b = splat(0.0f);
        for (int q = 0; q < ho * wo; q++) acc_b += g[q];
        gb[co] += acc_b;
        for (int ci = 0; ci < ci_n; ci++)
            for (int dy = 0; dy < k; dy++) {
                const int widx = ((co * ci_n + ci) * k + dy) * k;
                const int base = (ci * hp + dy) * wp;
                v8 *gi = ginp ? ginp + base : NULL;
                switch (k) {
                case 3: conv_bwd_row(3, g, inp + base, w + widx, gw + widx, gi, ho, wo, s, wp); break;
                case 5: conv_bwd_row(5, g, inp + base, w + widx, gw + widx, gi, ho, wo, s, wp); break;
                default:
                    if (k <= 8) {
                        conv_bwd_row(k, g, inp + base, w + widx, gw + widx, gi, ho, wo, s, wp);
                    } else { /* big kernels: one tap at a time */
                        for (int dx = 0; dx < k; dx++)
                            for (int oy = 0; oy < ho; oy++)
                                for (int ox = 0; ox < wo; ox++) {
                                    const v8 gv = g[oy * wo + ox];
                                    const int at = base + oy * s * wp + ox * s + dx;
                                    gw[widx + dx] += gv * inp[at];
                                    if (ginp) ginp[at] += w[widx + dx] * gv;
                                }
                    }
                }
            }
    }
}

/* Gradient of pad_maps: the interior of the padded gradient. */
static void unpad_maps(const v8 *inp, v8 *out, int c_n, int h, int w, int pad) {
    const int hp = h + 2 * pad, wp = w + 2 * pad;
    for (int c = 0; c < c_n; c++)
        for (int y = 0; y < h; y++)
            memcpy(out + (c * h + y) * w, inp + (c * hp + y + pad) * wp + pad, sizeof(v8) * w);
}

static void linear_fwd(const int *d, const float *p, const v8 *in, v8 *out) {
    const int n_in = feat_in(d), n_out = feat_out(d);
    const float *w = p + d[D_WOFF], *b = p + d[D_BOFF];
    int o = 0;
    for (; o + 4 <= n_out; o += 4) { /* four outputs per pass: each input loaded once */
        const float *w0 = w + (size_t)o * n_in, *w1 = w0 + n_in, *w2 = w1 + n_in, *w3 = w2 + n_in;
        v8 a0 = splat(b[o]), a1 = splat(b[o + 1]), a2 = splat(b[o + 2]), a3 = splat(b[o + 3]);
        for (int i = 0; i < n_in; i++) {
            const v8 x = in[i];
            a0 += w0[i] * x;
            a1 += w1[i] * x;
            a2 += w2[i] * x;
            a3 += w3[i] * x;
        }
        out[o] = a0;
        out[o + 1] = a1;
        out[o + 2] = a2;
        out[o + 3] = a3;
    }
    for (; o < n_out; o++) {
        v8 acc = splat(b[o]);
        const float *wr = w + (size_t)o * n_in;
        for (int i = 0; i < n_in; i++) acc += wr[i] * in[i];
        out[o] = acc;
    }
}

/* gin (any content) is overwritten when not NULL. */
static void linear_bwd(const int *d, const float *p, const v8 *in, const v8 *gout, v8 *gw, v8 *gb,
                       v8 *gin) {
    const int n_in = feat_in(d), n_out = feat_out(d);
    const float *w = p + d[D_WOFF];
    for (int o = 0; o < n_out; o++) {
        const v8 g = gout[o];
        v8 *gwr = gw + (size_t)o * n_in;
        gb[o] += g;
        for (int i = 0; i < n_in; i++) gwr[i] += g * in[i];
    }
    if (!gin) return;
    for (int i = 0; i < n_in; i++) { /* gin[i] = sum_o w[o][i] g[o], accumulated in a register */
        v8 acc = splat(0.0f);
        for (int o = 0; o < n_out; o++) acc += w[(size_t)o * n_in + i] * gout[o];
        gin[i] = acc;
    }
}

typedef struct {
    int n_ops;
    size_t *offset; /* start of each op's input activation in act (op n_ops: the logits) */
    size_t *padded; /* start of each conv op's padded input in pads */
    v8 *act, *mult, *ga, *gb, *gvec, *pads, *gpad;
} work_t;

static void work_free(work_t *wk);

/* Scratch buffers for one chain; frees everything and returns -1 when out of memory. */
static int work_init(work_t *wk, int n_ops, const int *desc, int dim) {
    memset(wk, 0, sizeof(*wk));
    wk->n_ops = n_ops;
    wk->offset = malloc(sizeof(size_t) * (n_ops + 1));
    size_t total = 0;
    int max_feat = feat_in(desc);
    for (int j = 0; j <= n_ops; j++) {
        const int f = j < n_ops ? feat_in(desc + j * DESC) : feat_out(desc + (n_ops - 1) * DESC);
        wk->offset[j] = total;
        total += f;
        if (f > max_feat) max_feat = f;
    }
    wk->padded = malloc(sizeof(size_t) * (n_ops + 1));
    size_t pads = 0, max_pad = 1;
    for (int j = 0; j < n_ops; j++) {
        const int *d = desc + j * DESC;
        wk->padded[j] = pads;
        if (d[D_TYPE] != OP_CONV) continue;
        const size_t sz = (size_t)d[D_CIN] * (d[D_HIN] + 2 * d[D_PAD]) * (d[D_WIN] + 2 * d[D_PAD]);
        pads += sz;
        if (sz > max_pad) max_pad = sz;
    }
    wk->pads = aligned_alloc(32, sizeof(v8) * (pads > 0 ? pads : 1));
    wk->gpad = aligned_alloc(32, sizeof(v8) * max_pad);
    wk->act = aligned_alloc(32, sizeof(v8) * total);
    wk->mult = aligned_alloc(32, sizeof(v8) * total);
    wk->ga = aligned_alloc(32, sizeof(v8) * max_feat);
    wk->gb = aligned_alloc(32, sizeof(v8) * max_feat);
    wk->gvec = aligned_alloc(32, sizeof(v8) * (dim > 0 ? dim : 1));
    if (wk->offset && wk->act && wk->mult && wk->ga && wk->gb && wk->gvec && wk->padded &&
        wk->pads && wk->gpad)
        return 0;
    work_free(wk);
    return -1;
}

static void work_free(work_t *wk) {
    free(wk->offset);
    free(wk->act);
    free(wk->mult);
    free(wk->ga);
    free(wk->gb);
    free(wk->gvec);
    free(wk->padded);
    free(wk->pads);
    free(wk->gpad);
}

/* Forward of one block of eight samples (act[0] filled). Dropout: rate per network, or no
 * dropout when train == 0. */
static void forward_block(const work_t *wk, const int *desc, const float *p, int train, float rate,
                          uint64_t key) {
    for (int j = 0; j < wk->n_ops; j++) {
        const int *d = desc + j * DESC;
        const v8 *in = wk->act + wk->offset[j];
        v8 *out = wk->act + wk->offset[j + 1];
        v8 *mult = wk->mult + wk->offset[j + 1];
        const int f = feat_in(d);
        switch (d[D_TYPE]) {
        case OP_CONV: {
            v8 *inp = wk->pads + wk->padded[j];
            pad_maps(in, inp, d[D_CIN], d[D_HIN], d[D_WIN], d[D_PAD]);
            conv_fwd(d, p, inp, out);
            break;
        }
        case OP_LINEAR: linear_fwd(d, p, in, out); break;
        case OP_RELU:
            {
                const v8 zero = splat(0.0f);
                const v8i one = (v8i)splat(1.0f);
                for (int i = 0; i < f; i++) {
                    const v8i keep = in[i] > zero; /* all ones where positive */
                    mult[i] = (v8)(keep & one);
                    out[i] = (v8)((v8i)in[i] & keep);
                }
            }
            break;
        case OP_DROPOUT:
            if (!train || rate <= 0.0f) {
                memcpy(out, in, sizeof(v8) * f);
                for (int i = 0; i < f; i++) mult[i] = splat(1.0f);
                break;
            }
            {
                /* keep where a 16-bit draw >= rate * 65536 (four draws per 64-bit hash) */
                const uint32_t drop = rate >= 1.0f ? 65536u : (uint32_t)(rate * 65536.0f + 0.5f);
                const float scale = drop < 65536u ? 65536.0f / (65536.0f - (float)drop) : 0.0f;
                const uint64_t kj = mix64(key ^ ((uint64_t)(j + 1) << 56));
                for (int i = 0; i < f; i++) {
                    const uint64_t h0 = mix64(kj + 2 * (uint64_t)i);
                    const uint64_t h1 = mix64(kj + 2 * (uint64_t)i + 1);
                    float m[LANES] __attribute__((aligned(32)));
                    for (int l = 0; l < LANES; l++) {
                        const uint32_t u = (uint32_t)(((l < 4 ? h0 : h1) >> (16 * (l & 3))) & 0xFFFF);
                        m[l] = u >= drop ? scale : 0.0f;
                    }
                    const v8 mv = *(const v8 *)m;
                    mult[i] = mv;
                    out[i] = in[i] * mv;
                }
            }
            break;
        case OP_FLATTEN: memcpy(out, in, sizeof(v8) * f); break;
        case OP_POOL: {
            const int c_n = d[D_CIN], hw = d[D_HIN] * d[D_WIN];
            for (int c = 0; c < c_n; c++) {
                v8 acc = splat(0.0f);
                for (int q = 0; q < hw; q++) acc += in[c * hw + q];
                out[c] = acc * (1.0f / hw);
            }
            break;
        }
        }
    }
}

/* Samples b0 .. b0 + 7 of x [n, f0] into the lanes of a0 [f0][8]; lanes past n are zeros. */
static void load_block(v8 *a0, const float *x, int f0, int n, int b0) {
    for (int l = 0; l < LANES; l++) {
        const int b = b0 + l;
        for (int i = 0; i < f0; i++) a0[i][l] = b < n ? x[(size_t)b * f0 + i] : 0.0f;
    }
}

/* Gradient of each network's weighted cross-entropy sum_b w[b] CE(net(x[b]), y[b]).
 * params [M, D]; x [M, B, F0]; y [M, B]; w [M, B]; rate [M] (dropout) or NULL; keys [M]
 * (each row's dropout key, metanet.zoo.train.dropout_keys) or NULL; grad [M, D];
 * loss [M]. Returns 0, or -1 when out of memory. */
int chain_ce_grad(int n_ops, const int *desc, int m_nets, int batch, int dim, const float *params,
                  const float *x, const int64_t *y, const float *w, const float *rate,
                  const uint64_t *keys, float *grad, float *loss) {
    work_t wk;
    if (work_init(&wk, n_ops, desc, dim)) return -1;
    const int f0 = feat_in(desc), n_cls = feat_out(desc + (n_ops - 1) * DESC);
    for (int m = 0; m < m_nets; m++) {
        const float *p = params + (size_t)m * dim;
        const float r = rate ? rate[m] : 0.0f;
        memset(wk.gvec, 0, sizeof(v8) * dim);
        double loss_m = 0.0;
        for (int b0 = 0; b0 < batch; b0 += LANES) {
            float wl[LANES];
            int64_t yl[LANES];
            load_block(wk.act, x + (size_t)m * batch * f0, f0, batch, b0);
            for (int l = 0; l < LANES; l++) {
                const int b = b0 + l;
                wl[l] = b < batch ? w[(size_t)m * batch + b] : 0.0f;
                yl[l] = b < batch ? y[(size_t)m * batch + b] : 0;
            }
            forward_block(&wk, desc, p, 1, r, keys ? keys[m] ^ mix64((uint64_t)b0) : 0);
            /* softmax cross-entropy per lane; g = (softmax - onehot) * w */
            const v8 *logit = wk.act + wk.offset[n_ops];
            v8 *g = wk.ga;
            for (int l = 0; l < LANES; l++) {
                float mx = logit[0][l];
                for (int c = 1; c < n_cls; c++) mx = logit[c][l] > mx ? logit[c][l] : mx;
                float sum = 0.0f;
                for (int c = 0; c < n_cls; c++) sum += expf(logit[c][l] - mx);
                for (int c = 0; c < n_cls; c++)
                    g[c][l] = (expf(logit[c][l] - mx) / sum - (c == yl[l] ? 1.0f : 0.0f)) * wl[l];
                if (wl[l] != 0.0f) loss_m += wl[l] * (logf(sum) + mx - logit[yl[l]][l]);
            }
            for (int j = n_ops - 1; j >= 0; j--) {
                const int *d = desc + j * DESC;
                const v8 *in = wk.act + wk.offset[j];
                const int fi = feat_in(d), fo = feat_out(d);
                v8 *gnext = g == wk.ga ? wk.gb : wk.ga;
                switch (d[D_TYPE]) {
                case OP_RELU:
                case OP_DROPOUT: {
                    const v8 *mult = wk.mult + wk.offset[j + 1];
                    for (int i = 0; i < fo; i++) g[i] *= mult[i];
                    break;
                }
                case OP_FLATTEN: break;
                case OP_POOL: {
                    const int hw = d[D_HIN] * d[D_WIN];
                    for (int c = 0; c < d[D_CIN]; c++)
                        for (int q = 0; q < hw; q++) gnext[c * hw + q] = g[c] * (1.0f / hw);
                    g = gnext;
                    break;
                }
                case OP_CONV:
                case OP_LINEAR: {
                    v8 *gin = j > 0 ? gnext : NULL;
                    if (d[D_TYPE] == OP_CONV) {
                        const int pad = d[D_PAD], hp = d[D_HIN] + 2 * pad, wp = d[D_WIN] + 2 * pad;
                        v8 *gpad = gin ? wk.gpad : NULL;
                        if (gpad) memset(gpad, 0, sizeof(v8) * d[D_CIN] * hp * wp);
                        conv_bwd(d, p, wk.pads + wk.padded[j], g, wk.gvec + d[D_WOFF],
                                 wk.gvec + d[D_BOFF], gpad);
                        if (gin) unpad_maps(gpad, gin, d[D_CIN], d[D_HIN], d[D_WIN], pad);
                    } else
                        linear_bwd(d, p, in, g, wk.gvec + d[D_WOFF], wk.gvec + d[D_BOFF], gin);
                    if (gin) g = gin;
                    break;
                }
                }
            }
        }
        float *gm = grad + (size_t)m * dim;
        for (int i = 0; i < dim; i++) {
            float s = 0.0f;
            for (int l = 0; l < LANES; l++) s += wk.gvec[i][l];
            gm[i] = s;
        }
        loss[m] = (float)loss_m;
    }
    work_free(&wk);
    return 0;
}

/* Evaluation logits out [M, S, C] of the M networks (params [M, D]) on shared inputs x [S, F0]
 * (dropout off). Returns 0, or -1 when out of memory. */
int chain_forward(int n_ops, const int *desc, int m_nets, int n_samples, int dim,
                  const float *params, const float *x, float *out) {
    work_t wk;
    if (work_init(&wk, n_ops, desc, dim)) return -1;
    const int f0 = feat_in(desc), n_cls = feat_out(desc + (n_ops - 1) * DESC);
    for (int m = 0; m < m_nets; m++) {
        const float *p = params + (size_t)m * dim;
        for (int b0 = 0; b0 < n_samples; b0 += LANES) {
            load_block(wk.act, x, f0, n_samples, b0);
            forward_block(&wk, desc, p, 0, 0.0f, 0);
            const v8 *logit = wk.act + wk.offset[n_ops];
            for (int l = 0; l < LANES && b0 + l < n_samples; l++)
                for (int c = 0; c < n_cls; c++)
                    out[((size_t)m * n_samples + b0 + l) * n_cls + c] = logit[c][l];
        }
    }
    work_free(&wk);
    return 0;
}
