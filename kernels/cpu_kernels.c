/* Fused CPU kernels for the local pixel <-> superpixel cross-attention (kernels/cpu_backend.py).

   One pass per direction: logits, softmax and weighted sums are computed together, row by row,
   from rows that stay in the L1/L2 cache; nothing of size pixels x 9 is built but the
   probabilities the backward needs. Compiled on first use with the machine's C compiler (-O3
   -march=native), once per dtype: REAL is float or double.

   Speed comes from independent dependency chains: dot products and weighted sums run four
   rows at a time (a single running sum would wait on the FMA latency at every step).

   Threads: OpenMP. Loaded after torch, the library binds to the libgomp torch has loaded (same
   soname), so it shares torch's thread pool and its torch.set_num_threads() setting. The forward
   passes split the work by (image, row of superpixels), whose outputs are disjoint; the backward
   passes by image, since their superpixel-side gradients gather from 9 cells.

   Layouts (all contiguous, row-major), for a batch of B images:
     pixels          X, K, V   (B, h, w, n, c)    cell-major, n = cell * cell pixels per cell
     superpixels     Q, K, V   (B, h, w, G, c)    heads-last
     bias                      (B, h, w, G)
     probabilities   P         (B, h, w, n, G, 9) entry [c][p][g][k]: pixel p of cell c and the
                                                  superpixel at offset k of c, head g (0 outside)
   Neighbour k in 0..8 is the cell at offset (k / 3 - 1, k % 3 - 1). */
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#ifndef REAL
#define REAL float
#endif
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#ifdef REAL_IS_DOUBLE
#define SUFFIX f64
#define EXP exp
#else
#define SUFFIX f32
#define EXP expf
#endif
#define FN(name) CAT(name, SUFFIX)

typedef REAL real;
typedef ptrdiff_t idx;

static inline real dot(const real *restrict a, const real *restrict b, idx c) {
    real acc = 0;
#pragma omp simd reduction(+ : acc)
    for (idx i = 0; i < c; ++i) acc += a[i] * b[i];
    return acc;
}

static inline void axpy(real *restrict y, real a, const real *restrict x, idx c) {
#pragma omp simd
    for (idx i = 0; i < c; ++i) y[i] += a * x[i];
}

/* out[r] = <rows[r], q> for r < count */
static void dots(const real *const *rows, idx count, const real *restrict q, idx c, real *restrict out) {
    idx r = 0;
    for (; r + 4 <= count; r += 4) {
        const real *restrict a = rows[r], *restrict b = rows[r + 1], *restrict e = rows[r + 2], *restrict f = rows[r + 3];
        real s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
        for (idx i = 0; i < c; ++i) {
            const real qi = q[i];
            s0 += a[i] * qi;
            s1 += b[i] * qi;
            s2 += e[i] * qi;
            s3 += f[i] * qi;
        }
        out[r] = s0;
        out[r + 1] = s1;
        out[r + 2] = s2;
        out[r + 3] = s3;
    }
    for (; r < count; ++r) out[r] = dot(rows[r], q, c);
}

/* y += sum_r coef[r] * rows[r] */
static void combine(real *restrict y, const real *const *rows, const real *restrict coef, idx count, idx c) {
    idx r = 0;
    for (; r + 4 <= count; r += 4) {
        const real *restrict a = rows[r], *restrict b = rows[r + 1], *restrict e = rows[r + 2], *restrict f = rows[r + 3];
        const real ca = coef[r], cb = coef[r + 1], ce = coef[r + 2], cf = coef[r + 3];
#pragma omp simd
        for (idx i = 0; i < c; ++i) y[i] += ca * a[i] + cb * b[i] + ce * e[i] + cf * f[i];
    }
    for (; r < count; ++r) axpy(y, coef[r], rows[r], c);
}

/* Softmax of l[0..count) in place; returns nothing, l holds the probabilities. */
static void softmax(real *l, idx count) {
    real m = l[0], s = 0;
    for (idx r = 1; r < count; ++r) m = l[r] > m ? l[r] : m;
    for (idx r = 0; r < count; ++r) {
        l[r] = EXP(l[r] - m);
        s += l[r];
    }
    const real inv = 1 / s;
    for (idx r = 0; r < count; ++r) l[r] *= inv;
}

static inline int inside(idx y, idx x, idx h, idx w) { return y >= 0 && y < h && x >= 0 && x < w; }

/* Superpixel queries over the pixels of their 3x3 cells (softmax over up to 9 * n pixels).
   out (B, h, w, G, dv); logits scale * <K_p, Q_j>. */
void FN(superpixel_fwd)(const real *Q, const real *K, const real *V, real *out, real *P,
                        idx B, idx h, idx w, idx n, idx G, idx d, idx dv, real scale) {
    const idx cells = h * w;
#pragma omp parallel
    {
        /* per superpixel: its pixels' key and value rows, where their probabilities go, the logits */
        const real **krows = malloc((size_t)(9 * n) * sizeof(real *));
        const real **vrows = malloc((size_t)(9 * n) * sizeof(real *));
        idx *dest = malloc((size_t)(9 * n) * sizeof(idx));
        real *l = malloc((size_t)(9 * n) * sizeof(real));
#pragma omp for collapse(2) schedule(static)
        for (idx b = 0; b < B; ++b)
            for (idx y = 0; y < h; ++y) {
                const real *Qb = Q + b * cells * G * d, *Kb = K + b * cells * n * d, *Vb = V + b * cells * n * dv;
                real *ob = out + b * cells * G * dv, *Pb = P + b * cells * n * G * 9;
                /* pairs of this row's cells whose superpixel lies outside the grid: probability 0 */
                for (idx x = 0; x < w; ++x)
                    for (idx k = 0; k < 9; ++k)
                        if (!inside(y + k / 3 - 1, x + k % 3 - 1, h, w))
                            for (idx p = 0; p < n; ++p)
                                for (idx g = 0; g < G; ++g) Pb[(((y * w + x) * n + p) * G + g) * 9 + k] = 0;
                for (idx x = 0; x < w; ++x) {
                    const idx j = y * w + x;
                    idx count = 0;
                    /* superpixel j is neighbour k of cell j - offset(k) */
                    for (idx k = 0; k < 9; ++k) {
                        const idx cy = y - (k / 3 - 1), cx = x - (k % 3 - 1);
                        if (!inside(cy, cx, h, w)) continue;
                        const idx c = cy * w + cx;
                        for (idx p = 0; p < n; ++p, ++count) {
                            krows[count] = Kb + (c * n + p) * d;
                            vrows[count] = Vb + (c * n + p) * dv;
                            dest[count] = (c * n + p) * G * 9 + k;
                        }
                    }
                    for (idx g = 0; g < G; ++g) {
                        dots(krows, count, Qb + (j * G + g) * d, d, l);
                        for (idx r = 0; r < count; ++r) l[r] *= scale;
                        softmax(l, count);
                        for (idx r = 0; r < count; ++r) Pb[dest[r] + g * 9] = l[r];
                        real *o = ob + (j * G + g) * dv;
                        memset(o, 0, (size_t)dv * sizeof(real));
                        combine(o, vrows, l, count, dv);
                    }
                }
            }
        free(krows);
        free(vrows);
        free(dest);
        free(l);
    }
}

/* Backward of superpixel_fwd. dK (B, h, w, n, d), dV (B, h, w, n, dv), dQ (B, h, w, G, d), all
   overwritten; dV may be dK (keys and values one tensor: both gradients add up there). */
void FN(superpixel_bwd)(const real *go, const real *out, const real *Q, const real *K, const real *V, const real *P,
                        real *dQ, real *dK, real *dV, idx B, idx h, idx w, idx n, idx G, idx d, idx dv, real scale) {
    const idx cells = h * w;
#pragma omp parallel
    {
        real *delta = malloc((size_t)(cells * G) * sizeof(real));
        const real **krows = malloc((size_t)n * sizeof(real *));
        const real **vrows = malloc((size_t)n * sizeof(real *));
        real *dl = malloc((size_t)n * sizeof(real));
#pragma omp for schedule(static)
        for (idx b = 0; b < B; ++b) {
            const real *gob = go + b * cells * G * dv, *outb = out + b * cells * G * dv, *Qb = Q + b * cells * G * d;
            const real *Kb = K + b * cells * n * d, *Vb = V + b * cells * n * dv, *Pb = P + b * cells * n * G * 9;
            real *dQb = dQ + b * cells * G * d, *dKb = dK + b * cells * n * d, *dVb = dV + b * cells * n * dv;
            for (idx j = 0; j < cells * G; ++j) delta[j] = dot(outb + j * dv, gob + j * dv, dv);
            memset(dQb, 0, (size_t)(cells * G * d) * sizeof(real));
            memset(dKb, 0, (size_t)(cells * n * d) * sizeof(real));
            if (dVb != dKb) memset(dVb, 0, (size_t)(cells * n * dv) * sizeof(real));
            for (idx y = 0; y < h; ++y)
                for (idx x = 0; x < w; ++x) {
                    const idx c = y * w + x;
                    for (idx p = 0; p < n; ++p) {
                        krows[p] = Kb + (c * n + p) * d;
                        vrows[p] = Vb + (c * n + p) * dv;
                    }
                    for (idx k = 0; k < 9; ++k) {
                        if (!inside(y + k / 3 - 1, x + k % 3 - 1, h, w)) continue;
                        const idx j = (y + k / 3 - 1) * w + x + k % 3 - 1;
                        for (idx g = 0; g < G; ++g) {
                            const real *gj = gob + (j * G + g) * dv, *q = Qb + (j * G + g) * d;
                            const real dj = delta[j * G + g];
                            dots(vrows, n, gj, dv, dl);
                            for (idx p = 0; p < n; ++p) {
                                const real pr = Pb[((c * n + p) * G + g) * 9 + k];
                                dl[p] = pr * (dl[p] - dj) * scale;
                                axpy(dVb + (c * n + p) * dv, pr, gj, dv);
                                axpy(dKb + (c * n + p) * d, dl[p], q, d);
                            }
                            combine(dQb + (j * G + g) * d, krows, dl, n, d);
                        }
                    }
                }
        }
        free(delta);
        free(krows);
        free(vrows);
        free(dl);
    }
}

/* Pixel queries over the superpixels of their 3x3 neighbourhood (softmax over up to 9).
   out (B, h, w, n, G, dv); logits scale * <Q_p, K_j> + bias_j (bias may be NULL). */
void FN(pixel_fwd)(const real *Qp, const real *K, const real *V, const real *bias, real *out, real *P,
                   idx B, idx h, idx w, idx n, idx G, idx d, idx dv, real scale) {
    const idx cells = h * w;
#pragma omp parallel for collapse(2) schedule(static)
    for (idx b = 0; b < B; ++b)
        for (idx y = 0; y < h; ++y) {
            const real *Qb = Qp + b * cells * n * d, *Kb = K + b * cells * G * d, *Vb = V + b * cells * G * dv;
            const real *bb = bias ? bias + b * cells * G : NULL;
            real *ob = out + b * cells * n * G * dv, *Pb = P + b * cells * n * G * 9;
            for (idx x = 0; x < w; ++x) {
                const idx c = y * w + x;
                idx nb[9], ks[9], count = 0;  /* the valid neighbours: superpixel index and k */
                for (idx k = 0; k < 9; ++k)
                    if (inside(y + k / 3 - 1, x + k % 3 - 1, h, w)) {
                        nb[count] = (y + k / 3 - 1) * w + x + k % 3 - 1;
                        ks[count++] = k;
                    }
                for (idx g = 0; g < G; ++g) {
                    const real *krows[9], *vrows[9];
                    for (idx r = 0; r < count; ++r) {
                        krows[r] = Kb + (nb[r] * G + g) * d;
                        vrows[r] = Vb + (nb[r] * G + g) * dv;
                    }
                    for (idx p = 0; p < n; ++p) {
                        real l[9];
                        dots(krows, count, Qb + (c * n + p) * d, d, l);
                        for (idx r = 0; r < count; ++r) l[r] = l[r] * scale + (bb ? bb[nb[r] * G + g] : 0);
                        softmax(l, count);
                        real *pr = Pb + ((c * n + p) * G + g) * 9;
                        memset(pr, 0, 9 * sizeof(real));
                        for (idx r = 0; r < count; ++r) pr[ks[r]] = l[r];
                        real *o = ob + ((c * n + p) * G + g) * dv;
                        memset(o, 0, (size_t)dv * sizeof(real));
                        combine(o, vrows, l, count, dv);
                    }
                }
            }
        }
}

/* Backward of pixel_fwd. dQ (B, h, w, n, d), dK (B, h, w, G, d), dV (B, h, w, G, dv),
   dbias (B, h, w, G) or NULL: all overwritten. */
void FN(pixel_bwd)(const real *go, const real *Qp, const real *K, const real *V, const real *P,
                   real *dQ, real *dK, real *dV, real *dbias, idx B, idx h, idx w, idx n, idx G,
                   idx d, idx dv, real scale) {
    const idx cells = h * w;
#pragma omp parallel for schedule(static)
    for (idx b = 0; b < B; ++b) {
        const real *gob = go + b * cells * n * G * dv, *Qb = Qp + b * cells * n * d;
        const real *Kb = K + b * cells * G * d, *Vb = V + b * cells * G * dv, *Pb = P + b * cells * n * G * 9;
        real *dQb = dQ + b * cells * n * d, *dKb = dK + b * cells * G * d, *dVb = dV + b * cells * G * dv;
        real *dbb = dbias ? dbias + b * cells * G : NULL;
        memset(dQb, 0, (size_t)(cells * n * d) * sizeof(real));
        memset(dKb, 0, (size_t)(cells * G * d) * sizeof(real));
        memset(dVb, 0, (size_t)(cells * G * dv) * sizeof(real));
        if (dbb) memset(dbb, 0, (size_t)(cells * G) * sizeof(real));
        for (idx y = 0; y < h; ++y)
            for (idx x = 0; x < w; ++x) {
                const idx c = y * w + x;
                idx nb[9], ks[9], count = 0;
                for (idx k = 0; k < 9; ++k)
                    if (inside(y + k / 3 - 1, x + k % 3 - 1, h, w)) {
                        nb[count] = (y + k / 3 - 1) * w + x + k % 3 - 1;
                        ks[count++] = k;
                    }
                for (idx g = 0; g < G; ++g) {
                    const real *krows[9], *vrows[9];
                    for (idx r = 0; r < count; ++r) {
                        krows[r] = Kb + (nb[r] * G + g) * d;
                        vrows[r] = Vb + (nb[r] * G + g) * dv;
                    }
                    for (idx p = 0; p < n; ++p) {
                        const idx row = c * n + p;
                        const real *gp = gob + (row * G + g) * dv, *q = Qb + row * d, *pr = Pb + (row * G + g) * 9;
                        real dp[9], ds[9], t = 0;
                        dots(vrows, count, gp, dv, dp);
                        for (idx r = 0; r < count; ++r) t += pr[ks[r]] * dp[r];
                        for (idx r = 0; r < count; ++r) {
                            const real prob = pr[ks[r]];
                            ds[r] = prob * (dp[r] - t);  /* logit gradient (the bias's) */
                            if (dbb) dbb[nb[r] * G + g] += ds[r];
                            ds[r] *= scale;
                            axpy(dKb + (nb[r] * G + g) * d, ds[r], q, d);
                            axpy(dVb + (nb[r] * G + g) * dv, prob, gp, dv);
                        }
                        combine(dQb + row * d, krows, ds, count, d);
                    }
                }
            }
    }
}
