/* Soft-DTW forward (R table) and backward (E recursion) on the CPU, vectorised over batch lanes.
 *
 * Plain C (no Python or torch headers), compiled four times by cpu_backend.py: -DSDTW_REAL=float or
 * double, -DLANES=8 or 16 (names end in _float_16 etc.). One call handles one group of up to LANES
 * pairs ("lanes"); the DP table of a
 * group is stored as R[N + 1][M + 1][LANES], so every cell update is one SIMD operation over the
 * lanes (gcc -O3 -ffast-math vectorises exp/log through glibc's libmvec). Python runs the groups on
 * separate threads (ctypes releases the GIL).
 *
 * Per lane l: cost matrix at address cost[l] with row stride stride[l] (elements) and tensor extent
 * rows[l] x cols[l]; pair lengths n[l] <= rows[l], m[l] <= cols[l]; band: cell (i, j), 1-based, is
 * inside iff |i * m - j * n| <= W[l]. BIG stands for +inf (see _common.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE__)
#include <xmmintrin.h>
/* exp() of very negative arguments gives subnormals, which are ~100x slower on x86: flush them to zero
 * (FTZ | DAZ) for the duration of a call; -ffast-math only does this for executables, not libraries. */
#define FLUSH_SUBNORMALS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040u)
#define FLUSH_SUBNORMALS_END _mm_setcsr(saved_csr)
#else
#define FLUSH_SUBNORMALS_BEGIN
#define FLUSH_SUBNORMALS_END
#endif

#ifndef SDTW_REAL
#define SDTW_REAL float
#endif
#ifndef LANES
#define LANES 16
#endif
#define BIG ((real)1e30)
#define CAT2(a, b, c) a##_##b##_##c
#define CAT(a, b, c) CAT2(a, b, c)

typedef SDTW_REAL real;
#define IS_FLOAT (sizeof(real) == sizeof(float))
#define EXP(v) (IS_FLOAT ? (real)expf((float)(v)) : (real)exp((double)(v)))
/* libmvec takes a slow scalar path for arguments below the exp underflow bound: clamp them there
 * (the result is then below the float epsilon relative to the 1 it is added to, or multiplies a 0). */
#define EXP_FLOOR (IS_FLOAT ? (real)-87 : (real)-700)
#define FLOORED(v) ((v) > EXP_FLOOR ? (v) : EXP_FLOOR)
#define LOG(v) (IS_FLOAT ? (real)logf((float)(v)) : (real)log((double)(v)))

/* Band rows of lane l for row i: columns [lo, hi] (as reals for vector compares); empty when i > n. */
static void band_row(int64_t i, const int64_t *n, const int64_t *m, const int64_t *W, int64_t lanes,
                     real *lo, real *hi) {
    for (int64_t l = 0; l < LANES; ++l) {
        if (l >= lanes || i > n[l]) { lo[l] = 1; hi[l] = 0; continue; }
        int64_t a = i * m[l] - W[l], b = i * m[l] + W[l];
        int64_t first = a <= 0 ? 1 : (a + n[l] - 1) / n[l];
        int64_t last = b / n[l];
        lo[l] = (real)(first < 1 ? 1 : first);
        hi[l] = (real)(last > m[l] ? m[l] : last);
    }
}

/* Row i (1-based) of every lane's cost into buf[j][l], j = 1..M; zeros where a lane has no data. */
static void load_cost_row(int64_t i, int64_t M, const int64_t *cost, const int64_t *stride,
                          const int64_t *n, const int64_t *m, int64_t lanes, real *buf) {
    memset(buf, 0, sizeof(real) * (size_t)(M + 2) * LANES);
    for (int64_t l = 0; l < lanes; ++l) {
        if (i > n[l]) continue;
        const real *src = (const real *)(intptr_t)cost[l] + (i - 1) * stride[l];
        for (int64_t j = 1; j <= m[l]; ++j) buf[j * LANES + l] = src[j - 1];
    }
}

/* One forward cell (i, j) for every lane: r = c + softmin(diag, up, left), +inf (BIG) off the band. */
static inline void forward_cell(const real *diag, const real *up, const real *left, const real *c, real fj,
                                const real *lo, const real *hi, real gamma, real inv_gamma, real *r) {
#pragma GCC ivdep
    for (int64_t l = 0; l < LANES; ++l) {
        const real a = diag[l], b = up[l], e = left[l];
        const real ab_min = a < b ? a : b, ab_max = a < b ? b : a;
        const real lowest = ab_min < e ? ab_min : e;
        const real highest = ab_max < e ? e : ab_max;
        const real t = ab_max < e ? ab_max : e;
        const real middle = ab_min < t ? t : ab_min;
        const real s = 1 + EXP(FLOORED((lowest - middle) * inv_gamma))
                         + EXP(FLOORED((lowest - highest) * inv_gamma));
        const real v = c[l] + lowest - gamma * LOG(s);
        r[l] = (fj >= lo[l] && fj <= hi[l]) ? v : BIG;
    }
}

/* Forward: fills R[(N+1)(M+1)LANES] and out[l] = R[n_l, m_l] for l < lanes. buf: 2 * (M + 2) * LANES.
 * Rows go in pairs, skewed by one column: cells (i, j) and (i + 1, j - 1) are independent, so their
 * exp/log chains overlap in the pipeline. */
void CAT(sdtw_forward, SDTW_REAL, LANES)(int64_t lanes, int64_t N, int64_t M, const int64_t *n, const int64_t *m,
                                  const int64_t *W, const int64_t *cost, const int64_t *stride, real gamma,
                                  real *R, real *buf, real *out) {
    const real inv_gamma = (real)1 / gamma;
    const int64_t row = (M + 1) * LANES;
    real *buf2 = buf + (M + 2) * LANES;
    real lo[LANES], hi[LANES], lo2[LANES], hi2[LANES];
    FLUSH_SUBNORMALS_BEGIN;
    for (int64_t k = 0; k < row; ++k) R[k] = BIG;
    for (int64_t l = 0; l < LANES; ++l) R[l] = 0;
    for (int64_t i = 1; i <= N; i += 2) {
        real *prev = R + (i - 1) * row, *cur = R + i * row, *next = cur + row;
        load_cost_row(i, M, cost, stride, n, m, lanes, buf);
        band_row(i, n, m, W, lanes, lo, hi);
        for (int64_t l = 0; l < LANES; ++l) cur[l] = BIG;
        if (i == N) {  /* a last single row */
            for (int64_t j = 1; j <= M; ++j)
                forward_cell(prev + (j - 1) * LANES, prev + j * LANES, cur + (j - 1) * LANES, buf + j * LANES,
                             (real)j, lo, hi, gamma, inv_gamma, cur + j * LANES);
            break;
        }
        load_cost_row(i + 1, M, cost, stride, n, m, lanes, buf2);
        band_row(i + 1, n, m, W, lanes, lo2, hi2);
        for (int64_t l = 0; l < LANES; ++l) next[l] = BIG;
        for (int64_t j = 1; j <= M + 1; ++j) {
            if (j <= M)
                forward_cell(prev + (j - 1) * LANES, prev + j * LANES, cur + (j - 1) * LANES, buf + j * LANES,
                             (real)j, lo, hi, gamma, inv_gamma, cur + j * LANES);
            if (j >= 2) {
                const int64_t k = j - 1;
                forward_cell(cur + (k - 1) * LANES, cur + k * LANES, next + (k - 1) * LANES, buf2 + k * LANES,
                             (real)k, lo2, hi2, gamma, inv_gamma, next + k * LANES);
            }
        }
    }
    for (int64_t l = 0; l < lanes; ++l) out[l] = R[n[l] * row + m[l] * LANES + l];
    FLUSH_SUBNORMALS_END;
}

/* Backward: writes grad[l] * E into the lane's output matrix (same layout as its cost), zero outside
 * the pair. work: 4 * (M + 2) * LANES + (M + 2) * LANES for the cost row. */
void CAT(sdtw_backward, SDTW_REAL, LANES)(int64_t lanes, int64_t N, int64_t M, const int64_t *n, const int64_t *m,
                                   const int64_t *W, const int64_t *cost, const int64_t *stride,
                                   const int64_t *rows, const int64_t *cols, const int64_t *out_ptr,
                                   const real *grad, real gamma, const real *R, real *work) {
    const real inv_gamma = (real)1 / gamma;
    const int64_t row = (M + 1) * LANES, width = (M + 2) * LANES;
    real *e_cur = work, *e_next = work + width, *s_cur = work + 2 * width, *s_next = work + 3 * width;
    real *buf = work + 4 * width;
    real lo[LANES], hi[LANES], last_row[LANES], last_col[LANES];
    FLUSH_SUBNORMALS_BEGIN;
    for (int64_t k = 0; k < width; ++k) { e_next[k] = 0; s_next[k] = -BIG; }
    for (int64_t l = 0; l < LANES; ++l) {
        last_row[l] = l < lanes ? (real)n[l] : -1;
        last_col[l] = l < lanes ? (real)m[l] : -1;
    }
    for (int64_t l = 0; l < lanes; ++l) {  /* rows past the group's grid: zero gradient */
        real *dst = (real *)(intptr_t)out_ptr[l];
        for (int64_t i = N + 1; i <= rows[l]; ++i) memset(dst + (i - 1) * stride[l], 0, sizeof(real) * cols[l]);
    }
    for (int64_t i = N; i >= 1; --i) {
        const real *r_row = R + i * row;
        const real fi = (real)i;
        load_cost_row(i, M, cost, stride, n, m, lanes, buf);
        band_row(i, n, m, W, lanes, lo, hi);
        for (int64_t j = 1; j <= M; ++j) {
            const real fj = (real)j;
#pragma GCC ivdep
            for (int64_t l = 0; l < LANES; ++l) {
                const int inside = fj >= lo[l] && fj <= hi[l];
                s_cur[j * LANES + l] = inside ? r_row[j * LANES + l] - buf[j * LANES + l] : -BIG;
            }
        }
        for (int64_t l = 0; l < LANES; ++l) { s_cur[(M + 1) * LANES + l] = -BIG; e_cur[(M + 1) * LANES + l] = 0; }
        for (int64_t j = M; j >= 1; --j) {
            const real fj = (real)j;
            const real *r = r_row + j * LANES;
            const real *s_down = s_next + j * LANES, *s_right = s_cur + (j + 1) * LANES;
            const real *s_diag = s_next + (j + 1) * LANES;
            const real *e_down = e_next + j * LANES, *e_right = e_cur + (j + 1) * LANES;
            const real *e_diag = e_next + (j + 1) * LANES;
            real *e = e_cur + j * LANES;
#pragma GCC ivdep
            for (int64_t l = 0; l < LANES; ++l) {
                const real x1 = s_down[l] - r[l], x2 = s_right[l] - r[l], x3 = s_diag[l] - r[l];
                /* softmin <= each argument: exponents are <= 0 up to rounding */
                const real w1 = EXP(FLOORED((x1 < 0 ? x1 : 0) * inv_gamma));
                const real w2 = EXP(FLOORED((x2 < 0 ? x2 : 0) * inv_gamma));
                const real w3 = EXP(FLOORED((x3 < 0 ? x3 : 0) * inv_gamma));
                const real seed = (fi == last_row[l] && fj == last_col[l]) ? 1 : 0;
                const real v = seed + e_down[l] * w1 + e_right[l] * w2 + e_diag[l] * w3;
                e[l] = (fj >= lo[l] && fj <= hi[l]) ? v : 0;
            }
        }
        for (int64_t l = 0; l < lanes; ++l) {
            if (i > rows[l]) continue;
            real *dst = (real *)(intptr_t)out_ptr[l] + (i - 1) * stride[l];
            const real g = grad[l];
            const int64_t stop = cols[l] < M ? cols[l] : M;
            for (int64_t j = 1; j <= stop; ++j) dst[j - 1] = g * e_cur[j * LANES + l];
            for (int64_t j = stop + 1; j <= cols[l]; ++j) dst[j - 1] = 0;
        }
        real *t = e_cur; e_cur = e_next; e_next = t;
        t = s_cur; s_cur = s_next; s_next = t;
    }
    FLUSH_SUBNORMALS_END;
}
