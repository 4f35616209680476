/* Fused CPU kernels for the local pixel <-> superpixel cross-attention (kernels/cpu_backend.py).

   One pass per direction: logits, softmax and weighted sums are computed together, row by row,
   from rows that stay in the L1/L2 cache; nothing of size pixels x 9 is built but the
   probabilities the backward needs. Compiled on first use with the machine's C compiler (-O3
   -march=native), once per dtype: REAL is float or double.

   Speed comes from independent dependency chains: dot products and weighted sums run four
   rows at a time (a single running sum would wait on the FMA latency at every step). The
   pixel-direction forward instead takes a cell's pixels 16 at a time as the vector lanes (the
   block transposed once, for all heads): its 9 logits per pixel are then 9 x d multiply-adds
   across the lanes into 18 register accumulators, with no horizontal sums, and the softmax runs
   across the lanes too (1.5x faster than four-row dot products at SPFormer-S shapes).

   Threads: OpenMP. Loaded after torch, the library binds to the libgomp torch has loaded (same
   soname), so it shares torch's thread pool and its torch.set_num_threads() setting. The forward
   passes split the work by (image, row of superpixels), whose outputs are disjoint; the backward
   passes by image, since their superpixel-side gradients gather from 9 cells.

   Layouts (all contiguous, row-major), for a batch of B images:
     pixels          X, K, V   (B, h, w, n, c)    cell-major, n = cell * cell pixels per cell, or with
                               (B, H, W, c)       image != 0 the image's own layout (H = h * cell)
     superpixels     Q, K, V   (B, h, w, G, c)    heads-last
     bias                      (B, h, w, G)
     probabilities   P         (B, h, w, n, G, 9) entry [c][p][g][k]: pixel p of cell c and the
                                                  superpixel at offset k of c, head g (0 outside)
   Neighbour k in 0..8 is the cell at offset (k / 3 - 1, k % 3 - 1).

   At the end, two forward-only kernels of SPFormer's per-pixel maps around the attention (an SCA
   iteration's rescaled pixel features, conv_rescale_fwd; the superpixel init,
   cell_pooled_projection_fwd), each one pass over channels-last pixels (B, H, W, C). */
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
#else
#define SUFFIX f32
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

/* Two queries against the same rows, each row loaded once: out0[r] = <rows[r], q0>, out1[r] = <rows[r], q1>. */
static void dots2(const real *const *rows, idx count, const real *restrict q0, const real *restrict q1, idx c,
                  real *restrict out0, real *restrict out1) {
    idx r = 0;
    for (; r + 4 <= count; r += 4) {
        const real *restrict a = rows[r], *restrict b = rows[r + 1], *restrict e = rows[r + 2], *restrict f = rows[r + 3];
        real s0 = 0, s1 = 0, s2 = 0, s3 = 0, t0 = 0, t1 = 0, t2 = 0, t3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, t0, t1, t2, t3)
        for (idx i = 0; i < c; ++i) {
            const real x0 = q0[i], x1 = q1[i];
            s0 += a[i] * x0;
            s1 += b[i] * x0;
            s2 += e[i] * x0;
            s3 += f[i] * x0;
            t0 += a[i] * x1;
            t1 += b[i] * x1;
            t2 += e[i] * x1;
            t3 += f[i] * x1;
        }
        out0[r] = s0;
        out0[r + 1] = s1;
        out0[r + 2] = s2;
        out0[r + 3] = s3;
        out1[r] = t0;
        out1[r + 1] = t1;
        out1[r + 2] = t2;
        out1[r + 3] = t3;
    }
    for (; r < count; ++r) {
        out0[r] = dot(rows[r], q0, c);
        out1[r] = dot(rows[r], q1, c);
    }
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

/* Two weighted sums of the same rows, each row loaded once: y0 += sum_r coef0[r] rows[r], y1 likewise. */
static void combine2(real *restrict y0, real *restrict y1, const real *const *rows, const real *restrict coef0,
                     const real *restrict coef1, idx count, idx c) {
    idx r = 0;
    for (; r + 4 <= count; r += 4) {
        const real *restrict a = rows[r], *restrict b = rows[r + 1], *restrict e = rows[r + 2], *restrict f = rows[r + 3];
        const real a0 = coef0[r], b0 = coef0[r + 1], e0 = coef0[r + 2], f0 = coef0[r + 3];
        const real a1 = coef1[r], b1 = coef1[r + 1], e1 = coef1[r + 2], f1 = coef1[r + 3];
#pragma omp simd
        for (idx i = 0; i < c; ++i) {
            const real ai = a[i], bi = b[i], ei = e[i], fi = f[i];
            y0[i] += a0 * ai + b0 * bi + e0 * ei + f0 * fi;
            y1[i] += a1 * ai + b1 * bi + e1 * ei + f1 * fi;
        }
    }
    for (; r < count; ++r) {
        axpy(y0, coef0[r], rows[r], c);
        axpy(y1, coef1[r], rows[r], c);
    }
}

/* y += a0 * x0 + a1 * x1 */
static inline void axpy2(real *restrict y, real a0, const real *restrict x0, real a1, const real *restrict x1, idx c) {
#pragma omp simd
    for (idx i = 0; i < c; ++i) y[i] += a0 * x0[i] + a1 * x1[i];
}

#ifdef REAL_IS_DOUBLE
static inline real exp_nonpositive(real x) { return exp(x); }
#else
/* exp(x) for x <= 0 (every softmax argument here is a logit minus its maximum), in a form the
   compiler vectorizes (libm's expf is a call per element): 2^n p(r), r = x - n ln2 in
   [-ln2/2, ln2/2], p Cephes' degree-6 polynomial (relative error ~1e-7). Below -87 it returns
   exp(-87) ~ 2e-38 instead of a denormal: nothing next to the maximum's 1. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  /* round to nearest */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { int i; float f; } scale = { .i = ((int)n + 127) << 23 };
    return p * scale.f;
}
#endif

/* Softmax over the (at most 9) neighbours of a pixel: plain loops (vectorized ones would spend
   their time in prologues and remainders). */
static inline void softmax9(real *restrict l, idx count) {
    real m = l[0], s = 0;
    for (idx r = 1; r < count; ++r) m = l[r] > m ? l[r] : m;
    for (idx r = 0; r < count; ++r) {
        l[r] = exp_nonpositive(l[r] - m);
        s += l[r];
    }
    const real inv = 1 / s;
    for (idx r = 0; r < count; ++r) l[r] *= inv;
}

/* Softmax of l[0..count) in place (a superpixel's up to 9 * n pixels). */
static void softmax(real *restrict l, idx count) {
    real m = l[0], s = 0;
#pragma omp simd reduction(max : m)
    for (idx r = 1; r < count; ++r) m = l[r] > m ? l[r] : m;
#pragma omp simd
    for (idx r = 0; r < count; ++r) l[r] = exp_nonpositive(l[r] - m);
#pragma omp simd reduction(+ : s)
    for (idx r = 0; r < count; ++r) s += l[r];
    const real inv = 1 / s;
#pragma omp simd
    for (idx r = 0; r < count; ++r) l[r] *= inv;
}

static inline int inside(idx y, idx x, idx h, idx w) { return y >= 0 && y < h && x >= 0 && x < w; }

/* The neighbours of cell (y, x) inside the grid: their superpixel indices nb and offsets k, in
   order; returns how many. */
static idx neighbours(idx y, idx x, idx h, idx w, idx nb[9], idx ks[9]) {
    idx count = 0;
    for (idx k = 0; k < 9; ++k)
        if (inside(y + k / 3 - 1, x + k % 3 - 1, h, w)) {
            nb[count] = (y + k / 3 - 1) * w + x + k % 3 - 1;
            ks[count++] = k;
        }
    return count;
}

/* Head g's key and value rows of those neighbours (superpixel tensors (h, w, G, c)). */
static void neighbour_rows(const real *K, const real *V, const idx *nb, idx count, idx G, idx g, idx d, idx dv,
                           const real **krows, const real **vrows) {
    for (idx r = 0; r < count; ++r) {
        krows[r] = K + (nb[r] * G + g) * d;
        vrows[r] = V + (nb[r] * G + g) * dv;
    }
}

/* Row of pixel p of cell c in a pixel-side tensor, cell-major or (image) in the image's raster order
   (W = w * cell pixels per row): cell_origin(c) + poff[p], poff from pixel_offsets, so that a loop
   over a cell's pixels divides by w and cell once, not per pixel (integer divisions cost tens of
   cycles). The probabilities are always cell-major, row c * n + p. */
static inline idx cell_origin(idx c, idx w, idx n, idx cell, int image) {
    return image ? (c / w) * cell * (w * cell) + (c % w) * cell : c * n;
}

static idx *pixel_offsets(idx w, idx n, idx cell, int image) {
    idx *poff = malloc((size_t)n * sizeof(idx));
    for (idx p = 0; p < n; ++p) poff[p] = image ? (p / cell) * (w * cell) + p % cell : p;
    return poff;
}

/* Pixels per block in the forward kernels' lane-wise logits: the vector lanes of the accumulators. */
#define PIXEL_BLOCK 16

/* np <= PIXEL_BLOCK pixels of a cell (rows origin + poff[i]) transposed into qt[ch][i] (d x PIXEL_BLOCK),
   lanes past np zero; their rows in the pixel tensor go to row[]. */
static void transpose_block(const real *X, idx origin, const idx *poff, idx np, idx d, real *restrict qt,
                            idx row[PIXEL_BLOCK]) {
    const real *src[PIXEL_BLOCK];
    for (idx i = 0; i < np; ++i) {
        row[i] = origin + poff[i];
        src[i] = X + row[i] * d;
    }
    /* channel-major loops: contiguous stores, and for a full block no test per element */
    if (np == PIXEL_BLOCK) {
        for (idx ch = 0; ch < d; ++ch)
            for (idx i = 0; i < PIXEL_BLOCK; ++i) qt[ch * PIXEL_BLOCK + i] = src[i][ch];
        return;
    }
    for (idx ch = 0; ch < d; ++ch)
        for (idx i = 0; i < PIXEL_BLOCK; ++i) qt[ch * PIXEL_BLOCK + i] = i < np ? src[i][ch] : 0;
}

/* L[k][i] = <rows[k], pixel i of the transposed block qt> for the 9 neighbours k (rows of missing
   neighbours point at zeros): 9 x d multiply-adds across the lanes into 18 register accumulators,
   no horizontal sums. */
static void lane_logits(const real *restrict qt, const real *const rows[9], idx d, real L[9][PIXEL_BLOCK]) {
    for (idx k = 0; k < 9; ++k)
        for (idx i = 0; i < PIXEL_BLOCK; ++i) L[k][i] = 0;
    for (idx ch = 0; ch < d; ++ch) {
        const real *qc = qt + ch * PIXEL_BLOCK;
        for (idx k = 0; k < 9; ++k) {
            const real kv = rows[k][ch];
#pragma omp simd
            for (idx i = 0; i < PIXEL_BLOCK; ++i) L[k][i] += kv * qc[i];
        }
    }
}

/* Superpixel queries over the pixels of their 3x3 cells (softmax over up to 9 * n pixels).
   out (B, h, w, G, dv); logits scale * <K_p, Q_j>. */
void FN(superpixel_fwd)(const real *Q, const real *K, const real *V, real *out, real *P,
                        idx B, idx h, idx w, idx n, idx G, idx d, idx dv, real scale, idx cell, int image) {
    const idx cells = h * w;
    idx *poff = pixel_offsets(w, n, cell, image);
#pragma omp parallel
    {
        /* per superpixel: its pixels' key and value rows, where their probabilities go, the logits */
        const real **krows = malloc((size_t)(9 * n) * sizeof(real *));
        const real **vrows = malloc((size_t)(9 * n) * sizeof(real *));
        idx *dest = malloc((size_t)(9 * n) * sizeof(idx));
        real *l = malloc((size_t)(18 * n) * sizeof(real));  /* the logits of two heads */
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
                        const idx c = cy * w + cx, origin = cell_origin(c, w, n, cell, image);
                        for (idx p = 0; p < n; ++p, ++count) {
                            const idx row = origin + poff[p];
                            krows[count] = Kb + row * d;
                            vrows[count] = Vb + row * dv;
                            dest[count] = (c * n + p) * G * 9 + k;
                        }
                    }
                    /* heads two at a time: each pixel row is loaded once for both */
                    for (idx g = 0; g < G; g += 2) {
                        const int pair = g + 1 < G;
                        real *l1 = l + 9 * n, *o = ob + (j * G + g) * dv;
                        if (pair)
                            dots2(krows, count, Qb + (j * G + g) * d, Qb + (j * G + g + 1) * d, d, l, l1);
                        else
                            dots(krows, count, Qb + (j * G + g) * d, d, l);
                        for (idx e = 0; e <= pair; ++e) {
                            real *le = e ? l1 : l;
                            for (idx r = 0; r < count; ++r) le[r] *= scale;
                            softmax(le, count);
                            for (idx r = 0; r < count; ++r) Pb[dest[r] + (g + e) * 9] = le[r];
                        }
                        memset(o, 0, (size_t)((1 + pair) * dv) * sizeof(real));
                        if (pair)
                            combine2(o, o + dv, vrows, l, l1, count, dv);
                        else
                            combine(o, vrows, l, count, dv);
                    }
                }
            }
        free(krows);
        free(vrows);
        free(dest);
        free(l);
    }
    free(poff);
}

/* Backward of superpixel_fwd. dK (B, h, w, n, d), dV (B, h, w, n, dv), dQ (B, h, w, G, d), all
   overwritten; dV may be dK (keys and values one tensor: both gradients add up there). */
void FN(superpixel_bwd)(const real *go, const real *out, const real *Q, const real *K, const real *V, const real *P,
                        real *dQ, real *dK, real *dV, idx B, idx h, idx w, idx n, idx G, idx d, idx dv, real scale, idx cell, int image) {
    const idx cells = h * w;
    idx *poff = pixel_offsets(w, n, cell, image);
#pragma omp parallel
    {
        real *delta = malloc((size_t)(cells * G) * sizeof(real));
        const real **krows = malloc((size_t)n * sizeof(real *));
        const real **vrows = malloc((size_t)n * sizeof(real *));
        real *dl = malloc((size_t)(2 * n) * sizeof(real));
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
                    const idx c = y * w + x, origin = cell_origin(c, w, n, cell, image);
                    for (idx p = 0; p < n; ++p) {
                        krows[p] = Kb + (origin + poff[p]) * d;
                        vrows[p] = Vb + (origin + poff[p]) * dv;
                    }
                    for (idx k = 0; k < 9; ++k) {
                        if (!inside(y + k / 3 - 1, x + k % 3 - 1, h, w)) continue;
                        const idx j = (y + k / 3 - 1) * w + x + k % 3 - 1;
                        /* heads two at a time: each pixel row is loaded once for both */
                        for (idx g = 0; g < G; g += 2) {
                            const int pair = g + 1 < G;
                            const idx g1 = pair ? g + 1 : g;
                            const real *gj = gob + (j * G + g) * dv, *q = Qb + (j * G + g) * d;
                            const real *gj1 = gob + (j * G + g1) * dv, *q1 = Qb + (j * G + g1) * d;
                            real *dl1 = dl + n;
                            if (pair)
                                dots2(vrows, n, gj, gj1, dv, dl, dl1);
                            else
                                dots(vrows, n, gj, dv, dl);
                            for (idx p = 0; p < n; ++p) {
                                const real *pr = Pb + ((c * n + p) * G + g) * 9 + k;
                                const idx row = origin + poff[p];
                                dl[p] = pr[0] * (dl[p] - delta[j * G + g]) * scale;
                                if (pair) {
                                    dl1[p] = pr[9] * (dl1[p] - delta[j * G + g1]) * scale;
                                    axpy2(dVb + row * dv, pr[0], gj, pr[9], gj1, dv);
                                    axpy2(dKb + row * d, dl[p], q, dl1[p], q1, d);
                                } else {
                                    axpy(dVb + row * dv, pr[0], gj, dv);
                                    axpy(dKb + row * d, dl[p], q, d);
                                }
                            }
                            if (pair)
                                combine2(dQb + (j * G + g) * d, dQb + (j * G + g1) * d, krows, dl, dl1, n, d);
                            else
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
    free(poff);
}

/* Pixel queries over the superpixels of their 3x3 neighbourhood (softmax over up to 9).
   out (B, h, w, n, G, dv); logits scale * <Q_p, K_j> + bias_j (bias may be NULL). */
void FN(pixel_fwd)(const real *Qp, const real *K, const real *V, const real *bias, real *out, real *P,
                   idx B, idx h, idx w, idx n, idx G, idx d, idx dv, real scale, idx cell, int image) {
    const idx cells = h * w;
    idx *poff = pixel_offsets(w, n, cell, image);
#pragma omp parallel
    {
        /* a block of up to PIXEL_BLOCK pixels of a cell, transposed (transpose_block) */
        real *qt = malloc((size_t)(d * PIXEL_BLOCK) * sizeof(real));
        real *zeros = calloc((size_t)d, sizeof(real));
#pragma omp for collapse(2) schedule(static)
        for (idx b = 0; b < B; ++b)
            for (idx y = 0; y < h; ++y) {
                const real *Qb = Qp + b * cells * n * d, *Kb = K + b * cells * G * d, *Vb = V + b * cells * G * dv;
                const real *bb = bias ? bias + b * cells * G : NULL;
                real *ob = out + b * cells * n * G * dv, *Pb = P + b * cells * n * G * 9;
                for (idx x = 0; x < w; ++x) {
                    const idx c = y * w + x, origin = cell_origin(c, w, n, cell, image);
                    idx nb[9], ks[9];
                    const idx count = neighbours(y, x, h, w, nb, ks);
                    int valid[9] = {0};
                    for (idx r = 0; r < count; ++r) valid[ks[r]] = 1;
                    for (idx p0 = 0; p0 < n; p0 += PIXEL_BLOCK) {
                        const idx np = n - p0 < PIXEL_BLOCK ? n - p0 : PIXEL_BLOCK;
                        idx row[PIXEL_BLOCK];
                        transpose_block(Qb, origin, poff + p0, np, d, qt, row);
                        for (idx g = 0; g < G; ++g) {
                            const real *krows[9], *vrows[9], *k9[9];
                            neighbour_rows(Kb, Vb, nb, count, G, g, d, dv, krows, vrows);
                            for (idx k = 0; k < 9; ++k) k9[k] = zeros;
                            for (idx r = 0; r < count; ++r) k9[ks[r]] = krows[r];
                            real L[9][PIXEL_BLOCK];
                            lane_logits(qt, k9, d, L);
                            /* softmax over the neighbours inside the grid, lane by lane */
                            real m[PIXEL_BLOCK], s[PIXEL_BLOCK];
                            for (idx i = 0; i < PIXEL_BLOCK; ++i) m[i] = -INFINITY, s[i] = 0;
                            for (idx k = 0; k < 9; ++k) {
                                if (!valid[k]) continue;
                                const real bk = bb ? bb[((y + k / 3 - 1) * w + x + k % 3 - 1) * G + g] : 0;
#pragma omp simd
                                for (idx i = 0; i < PIXEL_BLOCK; ++i) {
                                    L[k][i] = L[k][i] * scale + bk;
                                    m[i] = L[k][i] > m[i] ? L[k][i] : m[i];
                                }
                            }
                            for (idx k = 0; k < 9; ++k) {
                                if (!valid[k]) {
                                    for (idx i = 0; i < PIXEL_BLOCK; ++i) L[k][i] = 0;
                                    continue;
                                }
#pragma omp simd
                                for (idx i = 0; i < PIXEL_BLOCK; ++i) {
                                    L[k][i] = exp_nonpositive(L[k][i] - m[i]);
                                    s[i] += L[k][i];
                                }
                            }
                            for (idx i = 0; i < PIXEL_BLOCK; ++i) s[i] = 1 / s[i];
                            for (idx k = 0; k < 9; ++k)
#pragma omp simd
                                for (idx i = 0; i < PIXEL_BLOCK; ++i) L[k][i] *= s[i];
                            /* probabilities, and the outputs two pixels at a time (each value row loaded once for both) */
                            for (idx i = 0; i < np; i += 2) {
                                const int pair = i + 1 < np;
                                real coef[2][9];
                                for (idx e = 0; e <= pair; ++e) {
                                    real *pr = Pb + ((c * n + p0 + i + e) * G + g) * 9;
                                    for (idx k = 0; k < 9; ++k) pr[k] = L[k][i + e];
                                    for (idx r = 0; r < count; ++r) coef[e][r] = L[ks[r]][i + e];
                                    memset(ob + (row[i + e] * G + g) * dv, 0, (size_t)dv * sizeof(real));
                                }
                                real *o = ob + (row[i] * G + g) * dv;
                                if (pair)
                                    combine2(o, ob + (row[i + 1] * G + g) * dv, vrows, coef[0], coef[1], count, dv);
                                else
                                    combine(o, vrows, coef[0], count, dv);
                            }
                        }
                    }
                }
            }
        free(qt);
        free(zeros);
    }
    free(poff);
}

/* Backward of pixel_fwd. dQ (B, h, w, n, d), dK (B, h, w, G, d), dV (B, h, w, G, dv),
   dbias (B, h, w, G) or NULL: all overwritten. */
void FN(pixel_bwd)(const real *go, const real *Qp, const real *K, const real *V, const real *P,
                   real *dQ, real *dK, real *dV, real *dbias, idx B, idx h, idx w, idx n, idx G,
                   idx d, idx dv, real scale, idx cell, int image) {
    const idx cells = h * w;
    idx *poff = pixel_offsets(w, n, cell, image);
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
                const idx c = y * w + x, origin = cell_origin(c, w, n, cell, image);
                idx nb[9], ks[9];
                const idx count = neighbours(y, x, h, w, nb, ks);
                for (idx g = 0; g < G; ++g) {
                    const real *krows[9], *vrows[9];
                    neighbour_rows(Kb, Vb, nb, count, G, g, d, dv, krows, vrows);
                    /* pixels two at a time: each neighbour row is loaded once for both */
                    for (idx p = 0; p < n; p += 2) {
                        const int pair = p + 1 < n;
                        const idx row = origin + poff[p], row1 = origin + poff[pair ? p + 1 : p];
                        const idx prow = c * n + p, prow1 = pair ? prow + 1 : prow;  /* probabilities: cell-major */
                        const real *gp[2] = {gob + (row * G + g) * dv, gob + (row1 * G + g) * dv};
                        const real *pr[2] = {Pb + (prow * G + g) * 9, Pb + (prow1 * G + g) * 9};
                        real dp[2][9], ds[2][9], prob[2][9];
                        if (pair)
                            dots2(vrows, count, gp[0], gp[1], dv, dp[0], dp[1]);
                        else
                            dots(vrows, count, gp[0], dv, dp[0]);
                        for (idx e = 0; e <= pair; ++e) {
                            real t = 0;
                            for (idx r = 0; r < count; ++r) {
                                prob[e][r] = pr[e][ks[r]];
                                t += prob[e][r] * dp[e][r];
                            }
                            for (idx r = 0; r < count; ++r) {
                                ds[e][r] = prob[e][r] * (dp[e][r] - t);  /* logit gradient (the bias's) */
                                if (dbb) dbb[nb[r] * G + g] += ds[e][r];
                                ds[e][r] *= scale;
                            }
                        }
                        const real *q = Qb + row * d, *q1 = Qb + row1 * d;
                        for (idx r = 0; r < count; ++r) {
                            real *dk = dKb + (nb[r] * G + g) * d, *dvr = dVb + (nb[r] * G + g) * dv;
                            if (pair) {
                                axpy2(dk, ds[0][r], q, ds[1][r], q1, d);
                                axpy2(dvr, prob[0][r], gp[0], prob[1][r], gp[1], dv);
                            } else {
                                axpy(dk, ds[0][r], q, d);
                                axpy(dvr, prob[0][r], gp[0], dv);
                            }
                        }
                        if (pair)
                            combine2(dQb + row * d, dQb + row1 * d, krows, ds[0], ds[1], count, d);
                        else
                            combine(dQb + row * d, krows, ds[0], count, d);
                    }
                }
            }
    }
    free(poff);
}

/* Column blocks of the factor in conv_rescale_fwd: U z skips the blocks below U's diagonal. */
#define FACTOR_BLOCK 16
/* Pixels per tile of the vector code below, and per block of cell_pooled_projection_fwd. */
#define PIXEL_TILE 8

/* One or two (np) neighbouring pixels (b, y, x0 + e) of conv_rescale_fwd, any C; z and u hold 2 C
   values each. */
static void conv_rescale_pair(const real *restrict X, const real *restrict wt, const real *restrict bias,
                              const real *restrict Ut, real eps, real *restrict out, idx b, idx y, idx x0, idx np,
                              idx H, idx W, idx C, real *restrict z, real *restrict u) {
    for (idx e = 0; e < 2; ++e)
        for (idx c = 0; c < C; ++c) z[e * C + c] = e < np && bias ? bias[c] : 0, u[e * C + c] = 0;
    for (idx e = 0; e < np; ++e)
        for (idx t = 0; t < 9; ++t) {
            const idx yy = y + t / 3 - 1, xx = x0 + e + t % 3 - 1;
            if (!inside(yy, xx, H, W)) continue;
            const real *restrict xr = X + ((b * H + yy) * W + xx) * C, *restrict wr = wt + t * C;
            real *restrict ze = z + e * C;
#pragma omp simd
            for (idx c = 0; c < C; ++c) ze[c] += wr[c] * xr[c];
        }
    real *restrict u0 = u, *restrict u1 = u + C;
    for (idx blk = 0; blk * FACTOR_BLOCK < C; ++blk) {
        const idx end = (blk + 1) * FACTOR_BLOCK < C ? (blk + 1) * FACTOR_BLOCK : C;
        for (idx i = blk * FACTOR_BLOCK; i < end; ++i) {  /* row i of Ut is zero past column i */
            const real *restrict ur = Ut + i * C;
            const real a0 = z[i], a1 = z[C + i];
#pragma omp simd
            for (idx j = 0; j < end; ++j) {
                u0[j] += a0 * ur[j];
                u1[j] += a1 * ur[j];
            }
        }
    }
    for (idx e = 0; e < np; ++e) {
        const real *restrict ue = u + e * C, *restrict ze = z + e * C;
        real s = 0;
#pragma omp simd reduction(+ : s)
        for (idx j = 0; j < C; ++j) s += ue[j] * ue[j];
        const real r = 1 / sqrt(s + eps);
        real *restrict o = out + ((b * H + y) * W + x0 + e) * C;
#pragma omp simd
        for (idx c = 0; c < C; ++c) o[c] = r * ze[c];
    }
}

#if defined(__GNUC__) && !defined(REAL_IS_DOUBLE)
/* The same for float and C = 64 (SPFormer's pixel features), PIXEL_TILE pixels at a time, written
   with vector types (GCC/Clang; a 16-float vector is one AVX-512 register, two AVX2 ones): per 16
   columns of U z, the tile's accumulators stay in registers while the rows of Ut stream past, a
   register-blocked product (the portable loops above keep them in memory: ~1.6x slower here). */
typedef float vec16 __attribute__((vector_size(64)));
static inline vec16 load16(const float *p) { vec16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

static void conv_rescale_tile64(const float *restrict X, const float *restrict wt, const float *restrict bias,
                                const float *restrict Ut, float eps, float *restrict out, idx b, idx y, idx x0,
                                idx np, idx H, idx W) {
    float z[PIXEL_TILE][64];
    for (idx p = 0; p < PIXEL_TILE; ++p) {
        vec16 acc[4];
        for (int k = 0; k < 4; ++k) acc[k] = bias && p < np ? load16(bias + 16 * k) : (vec16){0};
        for (idx t = 0; t < 9 && p < np; ++t) {
            const idx yy = y + t / 3 - 1, xx = x0 + p + t % 3 - 1;
            if (!inside(yy, xx, H, W)) continue;
            const float *xr = X + ((b * H + yy) * W + xx) * 64, *wr = wt + t * 64;
            for (int k = 0; k < 4; ++k) acc[k] += load16(wr + 16 * k) * load16(xr + 16 * k);
        }
        for (int k = 0; k < 4; ++k) store16(z[p] + 16 * k, acc[k]);
    }
    vec16 sq[PIXEL_TILE] = {{0}};
    for (idx jb = 0; jb < 4; ++jb) {
        vec16 u[PIXEL_TILE] = {{0}};
        for (idx i = 16 * jb; i < 64; ++i) {  /* rows i < 16 jb of these columns are zero */
            const vec16 w = load16(Ut + i * 64 + 16 * jb);
            for (int p = 0; p < PIXEL_TILE; ++p) u[p] += z[p][i] * w;
        }
        for (int p = 0; p < PIXEL_TILE; ++p) sq[p] += u[p] * u[p];
    }
    for (idx p = 0; p < np; ++p) {
        float s = 0;
        for (int k = 0; k < 16; ++k) s += sq[p][k];
        const float r = 1 / sqrtf(s + eps);
        float *o = out + ((b * H + y) * W + x0 + p) * 64;
        for (int k = 0; k < 4; ++k) store16(o + 16 * k, r * load16(z[p] + 16 * k));
    }
}
#define VECTOR_TYPES 1
#endif

/* The pixel features an SCA iteration's attention reads, for inference, in one pass over the pixels
   (instead of a convolution, a product, a norm and a scaling, each a pass):
     z   = depthwise 3x3 convolution of X ('same', zero padding), taps wt (9, C) with the identity
           already in the centre tap, plus bias (C, or NULL);
     out = z (|U z|^2 + eps)^-1/2, U the upper-triangular C x C factor of the projection's Gram
           matrix (|U z|^2 = z^T G z), passed transposed: Ut[i][j] = U[j][i], zero for j > i.
   X and out channels-last (B, H, W, C), distinct. Pixels two at a time (C = 64: PIXEL_TILE at a
   time), so that each row of Ut is loaded once for all. */
void FN(conv_rescale_fwd)(const real *X, const real *wt, const real *bias, const real *Ut, real eps, real *out,
                          idx B, idx H, idx W, idx C) {
#pragma omp parallel
    {
        real *z = malloc((size_t)(4 * C) * sizeof(real)), *u = z + 2 * C;
#pragma omp for schedule(static)
        for (idx by = 0; by < B * H; ++by) {
            const idx b = by / H, y = by % H;
#ifdef VECTOR_TYPES
            if (C == 64) {
                for (idx x0 = 0; x0 < W; x0 += PIXEL_TILE)
                    conv_rescale_tile64(X, wt, bias, Ut, eps, out, b, y, x0, W - x0 < PIXEL_TILE ? W - x0 : PIXEL_TILE, H, W);
                continue;
            }
#endif
            for (idx x0 = 0; x0 < W; x0 += 2)
                conv_rescale_pair(X, wt, bias, Ut, eps, out, b, y, x0, x0 + 1 < W ? 2 : 1, H, W, C, z, u);
        }
        free(z);
    }
}

#ifdef REAL_IS_DOUBLE
static inline real gelu(real y) { return 0.5 * y * (1 + erf(y * 0.70710678118654752440)); }
#else
/* GELU(y) = y Phi(y) with erf from Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7) in a form
   the compiler vectorizes (libm's erff is a call per element). */
static inline float gelu(float y) {
    const float a = fabsf(y) * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    const float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    const float e = 1.0f - p * exp_nonpositive(-a * a);  /* erf(|y| / sqrt 2) */
    return 0.5f * y * (1.0f + (y < 0 ? -e : e));
}
#endif

/* t[p] = W x_p for np pixels (rows of xr, Cp channels): a rank-1 update per input channel. */
static void project_rows(const real *restrict xr, const real *restrict Wt, idx np, idx Cp, idx C, real *restrict t) {
    for (idx p = 0; p < np; ++p) memset(t + p * C, 0, (size_t)C * sizeof(real));
    for (idx k = 0; k < Cp; ++k) {
        const real *restrict wk = Wt + k * C;
        for (idx p = 0; p < np; ++p) {
            const real a = xr[p * Cp + k];
            real *restrict tp = t + p * C;
#pragma omp simd
            for (idx c = 0; c < C; ++c) tp[c] += a * wk[c];
        }
    }
}

#ifdef VECTOR_TYPES
/* The same for np <= PIXEL_TILE float pixels and C % 16 == 0: per 16 outputs, the tile's
   accumulators stay in registers while the rows of Wt stream past (~1.5x faster). */
static void project_tile16(const float *restrict xr, const float *restrict Wt, idx np, idx Cp, idx C, float *restrict t) {
    float xt[PIXEL_TILE * Cp];  /* the tile's inputs channel-major, xt[k][p], zeros past np */
    for (idx k = 0; k < Cp; ++k)
        for (idx p = 0; p < PIXEL_TILE; ++p) xt[k * PIXEL_TILE + p] = p < np ? xr[p * Cp + k] : 0.0f;
    for (idx ob = 0; ob < C; ob += 16) {
        vec16 acc[PIXEL_TILE] = {{0}};
        for (idx k = 0; k < Cp; ++k) {
            const vec16 wk = load16(Wt + k * C + ob);
            for (int p = 0; p < PIXEL_TILE; ++p) acc[p] += xt[k * PIXEL_TILE + p] * wk;
        }
        for (idx p = 0; p < np; ++p) store16(t + p * C + ob, acc[p]);
    }
}
#endif

/* The superpixel initialization for inference: out[b, i, j] = mean over the cell x cell pixels of
   cell (i, j) of GELU(LayerNorm(W x)), W (C, Cp) given transposed (Wt (Cp, C)), LayerNorm with
   gamma, beta over the C outputs. X channels-last (B, H, W, Cp), out (B, H / cell, W / cell, C).
   Without the C-wide map at every pixel: each pixel's C outputs live in a buffer of the thread,
   PIXEL_TILE pixels at a time, and only the cells' sums are written. One task per (image, row of
   cells). */
void FN(cell_pooled_projection_fwd)(const real *X, const real *Wt, const real *gamma, const real *beta, real eps,
                                    real *out, idx B, idx H, idx W, idx Cp, idx C, idx cell) {
    const idx h = H / cell, w = W / cell;
#pragma omp parallel
    {
        real *t = malloc((size_t)(PIXEL_TILE * C) * sizeof(real));
#pragma omp for schedule(static)
        for (idx bi = 0; bi < B * h; ++bi) {
            const idx b = bi / h, i = bi % h;
            real *o = out + (b * h + i) * w * C;
            memset(o, 0, (size_t)(w * C) * sizeof(real));
            for (idx y = i * cell; y < (i + 1) * cell; ++y)
                for (idx x0 = 0; x0 < W; x0 += PIXEL_TILE) {
                    const idx np = W - x0 < PIXEL_TILE ? W - x0 : PIXEL_TILE;
                    const real *xr = X + ((b * H + y) * W + x0) * Cp;
#ifdef VECTOR_TYPES
                    if (C % 16 == 0)
                        project_tile16(xr, Wt, np, Cp, C, t);
                    else
#endif
                        project_rows(xr, Wt, np, Cp, C, t);
                    for (idx p = 0; p < np; ++p) {
                        real *restrict tp = t + p * C, *restrict op = o + ((x0 + p) / cell) * C;
                        real mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
                        for (idx c = 0; c < C; ++c) mean += tp[c];
                        mean /= C;
#pragma omp simd reduction(+ : var)
                        for (idx c = 0; c < C; ++c) var += (tp[c] - mean) * (tp[c] - mean);
                        const real rstd = 1 / sqrt(var / C + eps);
#pragma omp simd
                        for (idx c = 0; c < C; ++c) op[c] += gelu((tp[c] - mean) * rstd * gamma[c] + beta[c]);
                    }
                }
            const real inv = (real)1 / (real)(cell * cell);
            for (idx c = 0; c < w * C; ++c) o[c] *= inv;
        }
        free(t);
    }
}
