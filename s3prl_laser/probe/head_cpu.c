/* The probe head's CPU kernels (s3prl_laser/probe/kernels.py calls them through ctypes, one group of clips
 * per thread).
 *
 * Layer mix, per clip x [L, F, C] (float16 or float32, contiguous):
 *   mix_forward:  out[f, c] = sum_l w[l] * x[l, f, c]            (float32 out, row by row: one out row
 *                 stays in L1 while the L layers' rows stream past, each read once)
 *   mix_backward: gw[l] = sum_{f, c} x[l, f, c] * g[f, c]       (float32 dot per row, summed in double)
 *
 * CTC, per clip: log-probabilities lp [T, V] (row stride V), target labels tgt [S], blank index. The
 * forward variables alpha and backward variables beta are kept in log space, as torch's ctc_loss keeps them
 * (alpha_t(s), beta_t(s) both include the emission of frame t), over the extended label sequence
 * l' = (blank, tgt[0], blank, ..., tgt[S-1], blank) of 2S+1 states:
 *   alpha_t(s) = lp[t, l'_s] + logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), alpha_{t-1}(s-2) if l'_s is a
 *                label different from l'_{s-2})
 *   beta_t(s)  = lp[t, l'_s] + logsumexp(beta_{t+1}(s), beta_{t+1}(s+1), beta_{t+1}(s+2) if l'_{s+2} is a
 *                label different from l'_s)
 *   log p = logsumexp(alpha_{T-1}(2S), alpha_{T-1}(2S-1)),  nll = -log p
 *   d nll / d lp[t, k] = -sum_{s : l'_s = k} exp(alpha_t(s) + beta_t(s) - lp[t, k] - log p)
 * This is the gradient with respect to the log-probabilities themselves (torch's ctc_loss returns one that
 * is only right once it has passed back through a log_softmax; after a log_softmax the two are equal).
 * "Minus infinity" is NEG, a finite stand-in, since the kernels are built with -ffast-math (which assumes
 * no infinities): a clip whose targets no alignment of its T frames can produce gets feasible = 0 (and
 * feasible = -1 if its work space could not be allocated). The caller keeps non-finite inputs out.
 * The log-sum-exp loops vectorise (glibc's libmvec expf/logf under -ffast-math), which is what makes this
 * faster than torch's scalar CPU loop.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) && defined(__AVX__)
#include <immintrin.h>
#define HAVE_F16C 1
#endif

#define NEG (-1e30f)
#define EXP_FLOOR (-80.0f)

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal half: normalise it */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400u)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* out[0:n] += w * row[0:n] */
static void axpy_f16(float w, const uint16_t *row, float *out, int64_t n) {
    int64_t c = 0;
#ifdef HAVE_F16C
    __m256 wv = _mm256_set1_ps(w);
    for (; c + 8 <= n; c += 8) {
        __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + c)));
        _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_loadu_ps(out + c), _mm256_mul_ps(wv, x)));
    }
#endif
    for (; c < n; c++) out[c] += w * half_to_float(row[c]);
}

static void axpy_f32(float w, const float *row, float *out, int64_t n) {
    for (int64_t c = 0; c < n; c++) out[c] += w * row[c];
}

static float dot_f16(const uint16_t *row, const float *g, int64_t n) {
    float total = 0.0f;
    int64_t c = 0;
#ifdef HAVE_F16C
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= n; c += 8) {
        __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + c)));
        acc = _mm256_add_ps(acc, _mm256_mul_ps(x, _mm256_loadu_ps(g + c)));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int k = 0; k < 8; k++) total += lanes[k];
#endif
    for (; c < n; c++) total += half_to_float(row[c]) * g[c];
    return total;
}

static float dot_f32(const float *row, const float *g, int64_t n) {
    float total = 0.0f;
    for (int64_t c = 0; c < n; c++) total += row[c] * g[c];
    return total;
}

/* Per element type T (suffix: f16 stores float16 bits as uint16_t, f32 floats):
 *   mix_forward_<suffix>:  out [F, C] = sum_l w[l] * x[l] for one clip x [L, F, C] (out's contents ignored)
 *   mix_backward_<suffix>: gw [L] = sum_{f, c} x[l, f, c] * g[f, c], g [F, C] the gradient of out */
#define MIX_FUNCTIONS(suffix, T)                                                                          \
    void mix_forward_##suffix(const T *x, int64_t L, int64_t F, int64_t C, const float *w, float *out) {  \
        for (int64_t f = 0; f < F; f++) {                                                                 \
            memset(out + f * C, 0, sizeof(float) * C);                                                    \
            for (int64_t l = 0; l < L; l++) axpy_##suffix(w[l], x + (l * F + f) * C, out + f * C, C);    \
        }                                                                                                 \
    }                                                                                                     \
    void mix_backward_##suffix(const T *x, int64_t L, int64_t F, int64_t C, const float *g, float *gw) { \
        double acc[L];                                                                                    \
        for (int64_t l = 0; l < L; l++) acc[l] = 0.0;                                                     \
        for (int64_t f = 0; f < F; f++)                                                                   \
            for (int64_t l = 0; l < L; l++) acc[l] += dot_##suffix(x + (l * F + f) * C, g + f * C, C);    \
        for (int64_t l = 0; l < L; l++) gw[l] = (float)acc[l];                                            \
    }

MIX_FUNCTIONS(f16, uint16_t)
MIX_FUNCTIONS(f32, float)

/* e^x for x <= 0, floored at e^-80 (1.8e-35, far below float32's resolution next to the 1 it is added
 * to): an argument that would underflow sends libmvec's vector expf to its slow scalar path. */
static inline float exp_nonpositive(float x) {
    return expf(x > EXP_FLOOR ? x : EXP_FLOOR);
}

static inline float lse2(float a, float b) {
    float m = a > b ? a : b;
    return m + log1pf(exp_nonpositive((a > b ? b : a) - m));
}

/* log(e^a + e^b + e^c) with two exponentials: the largest term is e^0 = 1 */
static inline float lse3(float a, float b, float c) {
    float hi_ab = a > b ? a : b, lo_ab = a > b ? b : a;
    float top = hi_ab > c ? hi_ab : c, low = lo_ab < c ? lo_ab : c;
    float mid = hi_ab > c ? (lo_ab > c ? lo_ab : c) : hi_ab;
    return top + log1pf(exp_nonpositive(mid - top) + exp_nonpositive(low - top));
}

/* The states of frame t that lie on some complete alignment: at most two states further per frame from
 * state 0 or 1 at frame 0 (s <= 2t + 1), and able to reach state 2S or 2S - 1 by frame T - 1
 * (s >= 2S + 1 - 2(T - t)). Outside, alpha or beta is "minus infinity" (NEG), and so is their product. */
static inline int64_t window_lo(int64_t states, int64_t T, int64_t t) {
    int64_t lo = states - 2 * (T - t);
    return lo > 0 ? lo : 0;
}

static inline int64_t window_hi(int64_t states, int64_t t) {
    int64_t hi = 2 * t + 1;
    return hi < states - 1 ? hi : states - 1;
}

/* One clip's CTC: returns nll = -log p (feasible[0] = 1), or 0 with feasible[0] = 0 when no alignment of
 * the T frames yields the targets (-1: out of memory); grad [T, V] (zeroed by the caller), unless NULL, receives d nll / d lp. */
static double ctc_clip(const float *lp, int64_t T, int64_t V, const int64_t *tgt, int64_t S, int64_t blank,
                       float *grad, int64_t *feasible) {
    /* grad == NULL: the loss alone (no backward variables) */
    const int64_t states = 2 * S + 1, width = states + 2; /* two padding states on each side */
    int64_t *label = malloc(sizeof(int64_t) * states);
    float *skip = malloc(sizeof(float) * width); /* 0: alpha may come from s - 2; NEG: it may not */
    float *skip_back = malloc(sizeof(float) * width); /* 0: beta may come from s + 2 */
    float *alpha = malloc(sizeof(float) * T * width);
    float *beta = malloc(sizeof(float) * 2 * width);
    float *emit = malloc(sizeof(float) * states);
    float *post = malloc(sizeof(float) * states);
    double nll = 0.0;
    *feasible = 0;
    if (!label || !skip || !skip_back || !alpha || !beta || !emit || !post) {
        *feasible = -1;
        goto done;
    }
    if (T <= 0) goto done;
    for (int64_t s = 0; s < states; s++) label[s] = s % 2 ? tgt[s / 2] : blank;
    for (int64_t s = 0; s < width; s++) skip[s] = skip_back[s] = NEG;
    for (int64_t s = 2; s < states; s++)
        if (s % 2 && label[s] != label[s - 2]) skip[s] = 0.0f;
    for (int64_t s = 0; s + 2 < states; s++)
        if ((s + 2) % 2 && label[s + 2] != label[s]) skip_back[s] = 0.0f;

    /* alpha, row t at alpha + t * width + 2: positions -2 and -1 hold NEG */
    for (int64_t t = 0; t < T; t++) {
        float *row = alpha + t * width + 2;
        row[-2] = row[-1] = NEG;
        const float *frame = lp + t * V;
        for (int64_t s = 0; s < states; s++) emit[s] = frame[label[s]];
        if (t == 0) {
            for (int64_t s = 0; s < states; s++) row[s] = NEG;
            row[0] = emit[0];
            if (states > 1) row[1] = emit[1];
            continue;
        }
        const float *prev = alpha + (t - 1) * width + 2;
        const int64_t lo = window_lo(states, T, t), hi = window_hi(states, t);
        for (int64_t s = 0; s < states; s++) row[s] = NEG;
        for (int64_t s = lo; s <= hi; s++) {
            float v = lse3(prev[s], prev[s - 1], prev[s - 2] + skip[s]) + emit[s];
            row[s] = v > NEG ? v : NEG;
        }
    }
    const float *last = alpha + (T - 1) * width + 2;
    float log_p = states > 1 ? lse2(last[states - 1], last[states - 2]) : last[0];
    if (!(log_p > 0.5f * NEG)) goto done;
    *feasible = 1;
    nll = -(double)log_p;
    if (!grad) goto done;

    /* beta, two rolling rows with two padding states after the end; the gradient of each frame as it goes */
    for (int64_t t = T - 1; t >= 0; t--) {
        float *row = beta + (t % 2) * width, *next = beta + ((t + 1) % 2) * width;
        const float *frame = lp + t * V;
        for (int64_t s = 0; s < states; s++) emit[s] = frame[label[s]];
        row[states] = row[states + 1] = NEG;
        if (t == T - 1) {
            for (int64_t s = 0; s < states; s++) row[s] = NEG;
            row[states - 1] = emit[states - 1];
            if (states > 1) row[states - 2] = emit[states - 2];
        } else {
            const int64_t lo = window_lo(states, T, t), hi = window_hi(states, t);
            for (int64_t s = 0; s < states; s++) row[s] = NEG;
            for (int64_t s = lo; s <= hi; s++) {
                float v = lse3(next[s], next[s + 1], next[s + 2] + skip_back[s]) + emit[s];
                row[s] = v > NEG ? v : NEG;
            }
        }
        const float *arow = alpha + t * width + 2;
        for (int64_t s = 0; s < states; s++) {
            float x = arow[s] + row[s] - emit[s] - log_p; /* log posterior, <= 0 up to rounding */
            post[s] = x > EXP_FLOOR ? exp_nonpositive(x) : 0.0f;
        }
        float *g = grad + t * V;
        float blanks = 0.0f; /* the blank states (even s) in one sum, not one chain of updates of g[blank] */
        for (int64_t s = 0; s < states; s += 2) blanks += post[s];
        g[blank] -= blanks;
        for (int64_t s = 1; s < states; s += 2) g[label[s]] -= post[s];
    }
done:
    free(label);
    free(skip);
    free(skip_back);
    free(alpha);
    free(beta);
    free(emit);
    free(post);
    return nll;
}

/* CTC of B clips: clip b's log-probabilities at lp + b * stride (T = frames[b] rows of V), its targets
 * targets[offsets[b] : offsets[b + 1]]; nll[b], feasible[b] and, unless grad is NULL, grad (same layout as
 * lp, zeroed by the caller) are written. */
void ctc_batch(int64_t B, const float *lp, int64_t stride, int64_t V, const int64_t *frames,
               const int64_t *targets, const int64_t *offsets, int64_t blank, float *grad, double *nll,
               int64_t *feasible) {
    for (int64_t b = 0; b < B; b++) {
        float *clip_grad = grad ? grad + b * stride : NULL;
        nll[b] = ctc_clip(lp + b * stride, frames[b], V, targets + offsets[b], offsets[b + 1] - offsets[b], blank,
                          clip_grad, feasible + b);
        if (clip_grad && feasible[b] != 1) memset(clip_grad, 0, sizeof(float) * frames[b] * V);
    }
}
