/* corrlab's compiled kernels (see match_kernel.py). corrlab_attention_matches, the fused probe's: softmax attention
 * of one batch entry and, from the same logits, every query's per-image max, first argmax and global confidence.
 * corrlab_window_attention, CorrAdapter's windowed aggregation: at the end of this file.
 *
 * For every head and every block of RB query rows:
 *   1. S = q_rows . k^T, a register tile of RB rows x 16 keys over the head size (keys packed in panels of 16);
 *   2. per row, per key block b (the n keys of image b): its max m_b and FIRST argmax (ties resolve to the
 *      lowest index, as torch.argmax and corrlab's matcher do); the row max M = max_b m_b;
 *   3. in place: S_l <- P_l = exp(S_l - M), with the row sum Z; the matcher's global confidence of block b,
 *      1 / sum_{l in b} exp(S_l - m_b) = exp(m_b - M) / Z_b (Z_b the block's share of Z); where m_b lies more
 *      than `gap` below M the block's numerators lose precision, and its confidence is summed from its own max
 *      before step 3 overwrites it;
 *   4. out_rows = (P @ v) / Z, a register tile of RB rows x 16 values over the keys.
 * S of the RB rows (RB x L floats) is the only intermediate, so it stays in the first cache levels.
 *
 * Written with GCC vector extensions (8 float lanes): it compiles wherever GCC or Clang does; with -march=native
 * on an AVX2 machine each vector operation is one instruction. exp is a Cephes-style polynomial on a Cody-Waite
 * reduced argument (relative error ~1e-7 for the arguments used here, x <= 0).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }
static inline v8i splati(int32_t x) { return (v8i){x, x, x, x, x, x, x, x}; }
static inline v8f load(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, v8f v) { memcpy(p, &v, sizeof v); }
static inline v8i as_int(v8f x) { v8i i; memcpy(&i, &x, sizeof i); return i; }
static inline v8f as_float(v8i i) { v8f x; memcpy(&x, &i, sizeof x); return x; }

/* exp(x) for x <= 0 (and -inf -> 0, NaN -> NaN); x < -87 gives 0 (below float's normal range). */
static inline v8f vexp(v8f x) {
    const v8f magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v8f t = x * splat(1.44269504088896341f) + magic;
    v8i n = as_int(t) - as_int(magic);
    v8f nf = t - magic;
    v8f r = x - nf * splat(0.693359375f) - nf * splat(-2.12194440e-4f);
    /* exp(r) ~ 1 + r + r^2 (c5 + c4 r + c3 r^2 + c2 r^3 + c1 r^4 + c0 r^5), Estrin's scheme */
    v8f r2 = r * r, r4 = r2 * r2;
    v8f a = splat(5.0000001201e-1f) + r * splat(1.6666665459e-1f);
    v8f b = splat(4.1665795894e-2f) + r * splat(8.3334519073e-3f);
    v8f c = splat(1.3981999507e-3f) + r * splat(1.9875691500e-4f);
    v8f p = (a + r2 * b + r4 * c) * r2 + r + splat(1.0f);
    v8i bits = as_int(p) + (n << 23);
    v8i under = (v8i)(x < splat(-87.0f)); /* all ones where exp underflows (and for -inf) */
    bits &= ~under;
    v8i nan = (v8i)(x != x);
    bits = (bits & ~nan) | (as_int(x) & nan);
    return as_float(bits);
}

static inline float hsum(v8f v) {
    float s = 0.0f;
    for (int i = 0; i < 8; i++) s += v[i];
    return s;
}

/* max and first argmax of x[0..n): four independent lane sets (32 values a step) keep the compare-blend
 * chains short; lane l of set s holds the first maximum among positions = 8s + l (mod 32) */
static inline float block_max_argmax(const float *x, int64_t n, int64_t *arg) {
    int64_t n32 = n - n % 32;
    float best = -INFINITY;
    int64_t bi = 0;
    if (n32) {
        v8f m0 = splat(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
        v8i i0 = splati(0), i1 = i0, i2 = i0, i3 = i0;
        v8i pos = (v8i){0, 1, 2, 3, 4, 5, 6, 7};
        for (int64_t j = 0; j < n32; j += 32) {
            v8f a = load(x + j), b = load(x + j + 8), c = load(x + j + 16), d = load(x + j + 24);
            v8i ga = (v8i)(a > m0), gb = (v8i)(b > m1), gc = (v8i)(c > m2), gd = (v8i)(d > m3);
            m0 = as_float((as_int(a) & ga) | (as_int(m0) & ~ga));
            m1 = as_float((as_int(b) & gb) | (as_int(m1) & ~gb));
            m2 = as_float((as_int(c) & gc) | (as_int(m2) & ~gc));
            m3 = as_float((as_int(d) & gd) | (as_int(m3) & ~gd));
            i0 = (pos & ga) | (i0 & ~ga);
            i1 = ((pos + splati(8)) & gb) | (i1 & ~gb);
            i2 = ((pos + splati(16)) & gc) | (i2 & ~gc);
            i3 = ((pos + splati(24)) & gd) | (i3 & ~gd);
            pos += splati(32);
        }
        v8f ms[4] = {m0, m1, m2, m3};
        v8i is[4] = {i0, i1, i2, i3};
        bi = n; /* the smallest index among all lanes holding the max */
        for (int s = 0; s < 4; s++) {
            for (int l = 0; l < 8; l++) {
                if (ms[s][l] > best || (ms[s][l] == best && is[s][l] < bi)) {
                    best = ms[s][l];
                    bi = is[s][l];
                }
            }
        }
        if (best == -INFINITY) bi = 0; /* every value -inf (or NaN): the first index, like the max's ties */
    }
    for (int64_t j = n32; j < n; j++) {
        if (x[j] > best) {
            best = x[j];
            bi = j;
        }
    }
    *arg = bi;
    return best;
}

/* sum_l exp(x_l - m) over x[0..n), x overwritten with the exponentials when `out` is nonzero
 * (two vectors a step: independent exponentials overlap in the pipeline) */
static inline float block_exp_sum(float *x, int64_t n, float m, int out) {
    int64_t n16 = n - n % 16, n8 = n - n % 8;
    v8f acc0 = splat(0.0f), acc1 = splat(0.0f), vm = splat(m);
    for (int64_t j = 0; j < n16; j += 16) {
        v8f e0 = vexp(load(x + j) - vm), e1 = vexp(load(x + j + 8) - vm);
        if (out) {
            store(x + j, e0);
            store(x + j + 8, e1);
        }
        acc0 += e0;
        acc1 += e1;
    }
    for (int64_t j = n16; j < n8; j += 8) {
        v8f e = vexp(load(x + j) - vm);
        if (out) store(x + j, e);
        acc0 += e;
    }
    float s = hsum(acc0 + acc1);
    for (int64_t j = n8; j < n; j++) {
        float e = expf(x[j] - m);
        if (out) x[j] = e;
        s += e;
    }
    return s;
}

/* The row pass (steps 2-3) over R rows of S at row stride ld, each with V blocks of n logits from column 0;
 * writes argmax and conf (R, V) and rowsum (R). */
static void match_rows(float *S, int64_t R, int64_t V, int64_t n, int64_t ld, int64_t *argmax, float *conf,
                       float *rowsum, float gap) {
    float bmax[V > 0 ? V : 1];
    for (int64_t r = 0; r < R; r++) {
        float *row = S + r * ld;
        int64_t *am = argmax + r * V;
        float *cf = conf + r * V;
        float M = -INFINITY;
        for (int64_t b = 0; b < V; b++) {
            bmax[b] = block_max_argmax(row + b * n, n, am + b);
            if (bmax[b] > M) M = bmax[b];
        }
        for (int64_t b = 0; b < V; b++) { /* blocks far below the row max: their own normaliser first */
            cf[b] = (bmax[b] - M < -gap) ? 1.0f / block_exp_sum(row + b * n, n, bmax[b], 0) : -1.0f;
        }
        float Z = 0.0f;
        for (int64_t b = 0; b < V; b++) {
            float Zb = block_exp_sum(row + b * n, n, M, 1);
            Z += Zb;
            if (cf[b] < 0.0f) {
                float x = expf(bmax[b] - M) / Zb;
                cf[b] = x > 1.0f ? 1.0f : x;
            }
        }
        rowsum[r] = Z;
    }
}

/* Steps 1 and 4: q: (H, L, d) already scaled; kP: (H, Lp/16, d, 16) the keys in panels of 16 (Lp = L rounded
 * up to 16, zero keys past L); v: (H, L, dv); out: (H, L, dv); argmax, conf: (H, L, V); rowsum: (H, L);
 * work: RB * Lp floats. */
#ifndef RB
#define RB 6
#endif

/* S (RB, Lp) = q_rows (RB, d) . k^T, k packed in panels of 16 keys: kP[c/16][kk][16] (Lp = 16 * panels). */
static void q_kT_tile(const float *q, int64_t d, const float *kP, int64_t Lp, int64_t nrows, float *S) {
    const float *qr[RB];
    for (int i = 0; i < RB; i++) qr[i] = q + (i < nrows ? i : nrows - 1) * d; /* missing rows repeat the last */
    for (int64_t c = 0; c < Lp; c += 16) {
        const float *panel = kP + c * d;
        v8f acc[RB][2];
        for (int i = 0; i < RB; i++) acc[i][0] = acc[i][1] = splat(0.0f);
        for (int64_t kk = 0; kk < d; kk++) {
            v8f b0 = load(panel + kk * 16), b1 = load(panel + kk * 16 + 8);
            for (int i = 0; i < RB; i++) {
                v8f w = splat(qr[i][kk]);
                acc[i][0] += w * b0;
                acc[i][1] += w * b1;
            }
        }
        for (int i = 0; i < RB; i++) {
            store(S + i * Lp + c, acc[i][0]);
            store(S + i * Lp + c + 8, acc[i][1]);
        }
    }
}

/* out (nrows, dv) = (P (RB, L) @ v (L, dv)) / Z, P at row stride Lp. */
static void p_v_tile(const float *P, int64_t L, int64_t Lp, const float *v, int64_t dv, const float *Z, int64_t nrows,
                     float *out) {
    int64_t j = 0;
    for (; j + 16 <= dv; j += 16) {
        v8f acc[RB][2];
        for (int i = 0; i < RB; i++) acc[i][0] = acc[i][1] = splat(0.0f);
        for (int64_t l = 0; l < L; l++) {
            const float *vl = v + l * dv + j;
            v8f b0 = load(vl), b1 = load(vl + 8);
            for (int i = 0; i < RB; i++) {
                v8f w = splat(P[i * Lp + l]);
                acc[i][0] += w * b0;
                acc[i][1] += w * b1;
            }
        }
        for (int i = 0; i < RB; i++) {
            if (i >= nrows) break;
            v8f inv = splat(1.0f / Z[i]);
            store(out + i * dv + j, acc[i][0] * inv);
            store(out + i * dv + j + 8, acc[i][1] * inv);
        }
    }
    for (; j + 8 <= dv; j += 8) { /* head sizes like 24 or 40: one vector of values per row */
        v8f acc[RB];
        for (int i = 0; i < RB; i++) acc[i] = splat(0.0f);
        for (int64_t l = 0; l < L; l++) {
            v8f b0 = load(v + l * dv + j);
            for (int i = 0; i < RB; i++) acc[i] += splat(P[i * Lp + l]) * b0;
        }
        for (int i = 0; i < RB; i++) {
            if (i >= nrows) break;
            store(out + i * dv + j, acc[i] * splat(1.0f / Z[i]));
        }
    }
    for (; j < dv; j++) {
        for (int64_t i = 0; i < nrows; i++) {
            float a = 0.0f;
            for (int64_t l = 0; l < L; l++) a += P[i * Lp + l] * v[l * dv + j];
            out[i * dv + j] = a / Z[i];
        }
    }
}

void corrlab_attention_matches(const float *q, const float *kP, const float *v, int64_t H, int64_t L, int64_t Lp,
                               int64_t d, int64_t dv, int64_t V, int64_t n, float gap, float *work, int64_t *argmax,
                               float *conf, float *rowsum, float *out) {
    for (int64_t h = 0; h < H; h++) {
        const float *qh = q + h * L * d, *kh = kP + h * d * Lp, *vh = v + h * L * dv;
        for (int64_t r0 = 0; r0 < L; r0 += RB) {
            int64_t nrows = L - r0 < RB ? L - r0 : RB;
            q_kT_tile(qh + r0 * d, d, kh, Lp, nrows, work);
            int64_t base = h * L + r0;
            match_rows(work, nrows, V, n, Lp, argmax + base * V, conf + base * V, rowsum + base, gap);
            p_v_tile(work, L, Lp, vh, dv, rowsum + base, nrows, out + base * dv);
        }
    }
}

/* CorrAdapter's windowed aggregation (corrlab/interventions/aggregation.py), blended into the attention output in
 * place. For every (b, i, h) of jobs [job0, job1) (flattened over B x V x H) and every source token p with at least
 * one kept match: the mean over the kept other images t (image j = targets[i][t], matched token c) of
 *   softmax_{w in window(c)} (scale q_p . k_w) applied to v_w,
 * the window being the tokens c + (dr, dc), |dr| <= wr, |dc| <= wc, on the gh x gw grid; entries outside the grid
 * are left out of the softmax, or with `clamp` clamped into it (then counted once per entry). Then
 *   out_p <- (scale_out ? eta out_p : out_p) + (1 - eta) mean.
 * Rows: q, k, v and out hold rows of d (q, k) or dv (v, out) contiguous floats; row (b, img, h, n) is row
 * s[0] + b s[1] + img s[2] + h s[3] + n s[4] of its tensor (strides in rows). kT: the keys transposed and padded,
 * (B, V, H, d, NP) contiguous, key n of column j at [.., j, wc + n], NP = N + 2 wc + 8 (the zero padding lets one
 * vector load read 8 consecutive keys of a window row; lanes outside the grid are masked). index (int64) and kept
 * (uint8): (B, V, Hp, V-1, N) contiguous, Hp = H or 1 (one match for every head).
 * work: (2 wr + 1) * (2 wc + 8) + 8 + dv floats and tok: (2 wr + 1) * (2 wc + 8) + 8 int64, per thread. */
static inline float dot(const float *a, const float *b, int64_t d) {
    v8f acc = splat(0.0f);
    int64_t j = 0;
    for (; j + 8 <= d; j += 8) acc += load(a + j) * load(b + j);
    float s = hsum(acc);
    for (; j < d; j++) s += a[j] * b[j];
    return s;
}

static inline int64_t clampi(int64_t x, int64_t hi) { return x < 0 ? 0 : (x > hi ? hi : x); }

void corrlab_window_attention(const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *kT,
                              const float *v, const int64_t *vs, float *out, const int64_t *os, const int64_t *index,
                              const uint8_t *kept, const int64_t *targets, int64_t wr, int64_t wc, int64_t V,
                              int64_t H, int64_t Hp, int64_t N, int64_t d, int64_t dv, int64_t gh, int64_t gw,
                              int32_t clamp, float scale, float eta, int32_t scale_out, int64_t job0, int64_t job1,
                              float *work, int64_t *tok) {
    const int64_t W = 2 * wc + 1, NP = N + 2 * wc + 8;
    float *logit = work, *acc = work + (2 * wr + 1) * (W + 7) + 8;
    for (int64_t job = job0; job < job1; job++) {
        int64_t b = job / (V * H), i = (job / H) % V, h = job % H, hp = Hp == 1 ? 0 : h;
        const int64_t *idx_bi = index + ((b * V + i) * Hp + hp) * (V - 1) * N;
        const uint8_t *kept_bi = kept + ((b * V + i) * Hp + hp) * (V - 1) * N;
        for (int64_t p = 0; p < N; p++) {
            int n_kept = 0, nan_row = 0;
            const float *qp = q + (qs[0] + b * qs[1] + i * qs[2] + h * qs[3] + p * qs[4]) * d;
            for (int64_t t = 0; t < V - 1; t++) {
                if (!kept_bi[t * N + p]) continue;
                int64_t c = idx_bi[t * N + p], j = targets[i * (V - 1) + t];
                int64_t r0 = c / gw, c0 = c % gw;
                int64_t kbase = ks[0] + b * ks[1] + j * ks[2] + h * ks[3];
                int64_t vbase = vs[0] + b * vs[1] + j * vs[2] + h * vs[3];
                int64_t used = 0;
                if (!clamp) { /* window rows of W consecutive keys, 8 at a time from the transposed keys */
                    const float *kTh = kT + ((b * V + j) * H + h) * d * NP + wc;
                    int64_t rlo = r0 - wr < 0 ? 0 : r0 - wr, rhi = r0 + wr >= gh ? gh - 1 : r0 + wr;
                    for (int64_t ch = 0; ch < W; ch += 8) {
                        v8i lane_ok; /* lanes in the window and in the grid's columns: the same on every row */
                        for (int l = 0; l < 8; l++) {
                            int64_t cc = c0 - wc + ch + l;
                            lane_ok[l] = (ch + l < W && cc >= 0 && cc < gw) ? -1 : 0;
                        }
                        v8i minus_inf = as_int(splat(-INFINITY)) & ~lane_ok;
                        for (int64_t rr = rlo; rr <= rhi; rr++) {
                            int64_t base = rr * gw + c0 - wc + ch;
                            const float *col = kTh + base;
                            v8f sum = splat(0.0f);
                            for (int64_t kk = 0; kk < d; kk++) sum += splat(qp[kk]) * load(col + kk * NP);
                            store(logit + used, as_float((as_int(sum * splat(scale)) & lane_ok) | minus_inf));
                            for (int l = 0; l < 8; l++) tok[used + l] = base + l; /* masked lanes: never read */
                            used += 8;
                        }
                    }
                } else { /* clamped entries repeat border keys: one dot product an entry */
                    for (int64_t dr = -wr; dr <= wr; dr++) {
                        int64_t rr = clampi(r0 + dr, gh - 1);
                        for (int64_t dc = -wc; dc <= wc; dc++) {
                            int64_t w = rr * gw + clampi(c0 + dc, gw - 1);
                            tok[used] = w;
                            logit[used++] = scale * dot(qp, k + (kbase + w * ks[4]) * d, d);
                        }
                    }
                    for (; used % 8; used++) logit[used] = -INFINITY; /* whole vectors: exp gives 0 */
                }
                v8f mx = splat(-INFINITY);
                for (int64_t e = 0; e < used; e += 8) {
                    v8f x = load(logit + e);
                    v8i gt = (v8i)(x > mx);
                    mx = as_float((as_int(x) & gt) | (as_int(mx) & ~gt));
                }
                float m = mx[0];
                for (int l = 1; l < 8; l++) m = mx[l] > m ? mx[l] : m;
                v8f zs = splat(0.0f), mv = splat(m);
                for (int64_t e = 0; e < used; e += 8) {
                    v8f x = vexp(load(logit + e) - mv);
                    store(logit + e, x);
                    zs += x;
                }
                float inv = 1.0f / hsum(zs);
                if (n_kept == 0) memset(acc, 0, dv * sizeof(float));
                if (!(inv > 0.0f) || !(m < INFINITY)) nan_row = 1; /* NaN or infinite logits: the row becomes NaN */
                int64_t nz = 0; /* the window's positive weights, compacted: (weight, value row); masked lanes are 0 */
                for (int64_t e = 0; e < used; e++)
                    if (logit[e] > 0.0f) {
                        logit[nz] = logit[e] * inv;
                        tok[nz++] = (vbase + tok[e] * vs[4]) * dv;
                    }
                int64_t jj = 0;
                for (; jj + 16 <= dv; jj += 16) { /* 16 output channels in registers over the window */
                    v8f a0 = splat(0.0f), a1 = splat(0.0f);
                    for (int64_t e = 0; e < nz; e++) {
                        v8f w = splat(logit[e]);
                        a0 += w * load(v + tok[e] + jj);
                        a1 += w * load(v + tok[e] + jj + 8);
                    }
                    store(acc + jj, load(acc + jj) + a0);
                    store(acc + jj + 8, load(acc + jj + 8) + a1);
                }
                for (; jj + 8 <= dv; jj += 8) {
                    v8f a0 = splat(0.0f);
                    for (int64_t e = 0; e < nz; e++) a0 += splat(logit[e]) * load(v + tok[e] + jj);
                    store(acc + jj, load(acc + jj) + a0);
                }
                if (jj < dv && dv >= 8) { /* the last 8 channels (overlapping the ones done), kept from jj on */
                    v8f a0 = splat(0.0f);
                    for (int64_t e = 0; e < nz; e++) a0 += splat(logit[e]) * load(v + tok[e] + dv - 8);
                    for (int64_t l = jj - (dv - 8); l < 8; l++) acc[dv - 8 + l] += a0[l];
                    jj = dv;
                }
                for (; jj < dv; jj++) {
                    float a = 0.0f;
                    for (int64_t e = 0; e < nz; e++) a += logit[e] * v[tok[e] + jj];
                    acc[jj] += a;
                }
                n_kept++;
            }
            if (n_kept == 0) continue;
            float *o = out + (os[0] + b * os[1] + i * os[2] + h * os[3] + p * os[4]) * dv;
            float share = (1.0f - eta) / (float)n_kept;
            if (nan_row) share = NAN;
            for (int64_t j = 0; j < dv; j++) o[j] = (scale_out ? eta * o[j] : o[j]) + share * acc[j];
        }
    }
}
