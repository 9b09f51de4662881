/*
 * Native kernel of ebood.scores: per-row logit scores in one read of the logits.
 *
 * For every row z of a (rows, cols) matrix (float32, float16 or bfloat16, unit column stride,
 * any row stride) it keeps, in one pass:
 *   M   = max_j z_j                                  (and the first index of the max)
 *   S_T = sum_j exp((z_j - M) / T)
 *   S_1 = sum_j exp(z_j - M),  T_1 = sum_j exp(z_j - M) (z_j - M)
 * and writes energy = -(M + T log S_T), msp = -1/S_T, max_logit = -M,
 * entropy = log S_1 - T_1 / S_1 (both terms >= 0: no cancellation) and the argmax.
 *
 * A row is read in blocks of BLOCK values that stay in L1: first the block max (from memory),
 * then the exponential sums (from L1) relative to the running max; when a later block raises the
 * max, the running sums are rescaled once (the online normaliser of Milakov & Gimelshein, 2018).
 * Block sums are float32 in vector lanes (double in the plain-loop fallback), row sums double. Entries equal to the running max
 * contribute exactly 1; they are counted, not summed, so that the float32 block sums only hold the
 * small terms and confident rows keep full relative precision in their entropy.
 *
 * Rows whose max is not finite (a NaN, a +inf, or all -inf) take an exact scalar path.
 *
 * The AVX2+FMA(+F16C) variant is chosen at run time; a portable variant (GCC/Clang vector
 * extensions, plain loops elsewhere) serves every other CPU. Plain C99 + the CPython API: no torch headers, nothing but setuptools to build.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#define EBOOD_X86 1
#include <immintrin.h>
#endif

#define BLOCK 2048
/* exp(x) for x >= EXP_CLAMP: at EXP_CLAMP the power-of-two scale is 2^-127, built as 0.0f, so
 * every x below about -87.3 gives exactly 0 (the true value is < 1.2e-38, far below a float32
 * sum that holds at least 1) and x * exp(x) is 0, never 0 * -inf. */
#define EXP_CLAMP (-88.0f)
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f          /* 9 significant bits: n * LN2_HI is exact for |n| < 2^15 */
#define LN2_LO (-2.12194440054690583e-4f)
/* exp(r) ~ 1 + r + r^2 (C2 + C3 r + C4 r^2 + C5 r^3 + C6 r^4) on |r| <= ln2/2, relative error
 * 3e-9 (fitted for this kernel by iteratively reweighted least squares). */
#define C2 0.4999999403953552f
#define C3 0.1666652113199234f
#define C4 0.04166838899254799f
#define C5 0.008368710055947304f
#define C6 0.001381461275741458f

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
/* What the exponential pass accumulates. */
enum { MODE_T1 = 0,        /* T == 1: S_T is S_1 */
       MODE_T_ENTROPY = 1, /* T != 1, entropy wanted: two exponentials per value */
       MODE_T_ONLY = 2 };  /* T != 1, no entropy: S_T only */

typedef struct {
    double r_t, r_1, t_1; /* sums over the block's values below the running max */
    int64_t ties;        /* values equal to the running max (each contributes exactly 1) */
} block_sums;

typedef struct {
    void (*f16_to_float)(const uint16_t *src, int64_t n, float *dst);
    void (*bf16_to_float)(const uint16_t *src, int64_t n, float *dst);
    float (*max)(const float *p, int64_t n, int *has_nan);
    int64_t (*first_index)(const float *p, int64_t n, float v);
    void (*sums)(const float *p, int64_t n, float m, float inv_t, int mode, int with_ties, block_sums *out);
    const char *name;
} kernel_ops;

/* ---------------------------------------------------------------- portable variant ---------- */

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    float f;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent == 0) {
        f = ldexpf((float)mantissa, -24); /* zero or subnormal */
        return sign ? -f : f;
    } else {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    }
    memcpy(&f, &bits, sizeof f);
    return f;
}

static float bfloat16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void f16_to_float_scalar(const uint16_t *src, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

static void bf16_to_float_scalar(const uint16_t *src, int64_t n, float *dst) {
    for (int64_t i = 0; i < n; i++) dst[i] = bfloat16_to_float(src[i]);
}

static int64_t first_index_scalar(const float *p, int64_t n, float v) {
    for (int64_t i = 0; i < n; i++)
        if (p[i] == v) return i;
    return 0;
}

#if defined(__GNUC__) || defined(__clang__)
/* GCC/Clang vector extensions: 4-float vectors, which every SIMD target has natively (SSE2 on
 * baseline x86-64, NEON on aarch64, ...); two of them per step, 8 lanes as in the AVX2 variant. */
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

static inline v4f v4_splat(float v) { return (v4f){v, v, v, v}; }
static inline v4f v4_load(const float *p) {
    v4f v;
    memcpy(&v, p, sizeof v); /* unaligned load */
    return v;
}
static inline v4f v4_select(v4i mask, v4f a, v4f b) { return (v4f)((mask & (v4i)a) | (~mask & (v4i)b)); }

/* exp(x) for x in [EXP_CLAMP, 0] (callers clamp; NaN never reaches it). */
static inline v4f v4_exp(v4f x) {
    const v4f round_magic = v4_splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    v4f n = (x * v4_splat(LOG2E) + round_magic) - round_magic;
    v4f r = (x - n * v4_splat(LN2_HI)) - n * v4_splat(LN2_LO);
    v4f p = v4_splat(C6) * r + v4_splat(C5);
    p = p * r + v4_splat(C4);
    p = p * r + v4_splat(C3);
    p = p * r + v4_splat(C2);
    v4f y = (p * (r * r) + r) + v4_splat(1.0f);
    v4i bits = (__builtin_convertvector(n, v4i) + 127) << 23; /* 2^n for n in [-126, 0]; 0 at -127 */
    return y * (v4f)bits;
}

static float max_portable(const float *p, int64_t n, int *has_nan) {
    v4f m0 = v4_splat(-INFINITY), m1 = m0;
    v4i nan_any = {0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v4f a = v4_load(p + i), b = v4_load(p + i + 4);
        nan_any |= (a != a) | (b != b);
        m0 = v4_select(a > m0, a, m0);
        m1 = v4_select(b > m1, b, m1);
    }
    float best = -INFINITY;
    int any_nan = 0;
    for (int l = 0; l < 4; l++) {
        any_nan |= nan_any[l] != 0;
        best = m0[l] > best ? m0[l] : best;
        best = m1[l] > best ? m1[l] : best;
    }
    for (; i < n; i++) {
        any_nan |= p[i] != p[i];
        best = p[i] > best ? p[i] : best;
    }
    *has_nan = any_nan;
    return best;
}

typedef struct {
    v4f r_t, r_1, t_1;
    v4i ties;
} v4_sums;

static inline void v4_accumulate(v4f z, v4f m, v4f inv_t, const int mode, v4_sums *acc) {
    const v4f lo = v4_splat(EXP_CLAMP), zero = v4_splat(0.0f);
    v4f d = z - m;
    v4i tie = d == zero; /* the max itself: counted, exactly 1 in every sum */
    acc->ties -= tie;
    if (mode != MODE_T_ONLY) {
        v4f dc = v4_select(d > lo, d, lo);
        v4f e = v4_select(tie, zero, v4_exp(dc));
        acc->r_1 += e;
        acc->t_1 += e * dc;
    }
    if (mode != MODE_T1) {
        v4f u = d * inv_t;
        acc->r_t += v4_select(tie, zero, v4_exp(v4_select(u > lo, u, lo)));
    }
}

static inline void sums_portable_impl(const float *p, int64_t n, float m_scalar, float inv_t_scalar, const int mode,
                                      block_sums *out) {
    const v4f m = v4_splat(m_scalar), inv_t = v4_splat(inv_t_scalar), zero = v4_splat(0.0f);
    v4_sums a = {zero, zero, zero, {0, 0, 0, 0}}, b = a;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v4_accumulate(v4_load(p + i), m, inv_t, mode, &a);
        v4_accumulate(v4_load(p + i + 4), m, inv_t, mode, &b);
    }
    if (i < n) { /* tail: pad with -inf, which contributes exactly 0 */
        float tail[8];
        for (int l = 0; l < 8; l++) tail[l] = i + l < n ? p[i + l] : -INFINITY;
        v4_accumulate(v4_load(tail), m, inv_t, mode, &a);
        v4_accumulate(v4_load(tail + 4), m, inv_t, mode, &b);
    }
    out->r_t = out->r_1 = out->t_1 = 0.0;
    out->ties = 0;
    for (int l = 0; l < 4; l++) {
        out->r_t += (double)a.r_t[l] + b.r_t[l];
        out->r_1 += (double)a.r_1[l] + b.r_1[l];
        out->t_1 += (double)a.t_1[l] + b.t_1[l];
        out->ties += (int64_t)a.ties[l] + b.ties[l];
    }
}

#else /* other compilers: plain loops with double sums */

static inline float exp_scalar(float x) {
    float n = floorf(x * LOG2E + 0.5f);
    float r = (x - n * LN2_HI) - n * LN2_LO;
    float p = ((((C6 * r + C5) * r + C4) * r + C3) * r + C2);
    float y = (p * (r * r) + r) + 1.0f;
    uint32_t bits = (uint32_t)((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return y * scale;
}

static float max_portable(const float *p, int64_t n, int *has_nan) {
    float m = -INFINITY;
    int nan_seen = 0;
    for (int64_t i = 0; i < n; i++) {
        nan_seen |= (p[i] != p[i]);
        m = p[i] > m ? p[i] : m;
    }
    *has_nan = nan_seen;
    return m;
}

static inline void sums_portable_impl(const float *p, int64_t n, float m, float inv_t, const int mode, block_sums *out) {
    double r_t = 0.0, r_1 = 0.0, t_1 = 0.0;
    int64_t ties = 0;
    for (int64_t i = 0; i < n; i++) {
        float d = p[i] - m;
        if (d == 0.0f) { /* the max itself: counted, exactly 1 in every sum */
            ties++;
            continue;
        }
        if (mode != MODE_T_ONLY) {
            float dc = d > EXP_CLAMP ? d : EXP_CLAMP;
            float e = exp_scalar(dc);
            r_1 += e;
            t_1 += e * dc;
        }
        if (mode != MODE_T1) {
            float u = d * inv_t;
            r_t += exp_scalar(u > EXP_CLAMP ? u : EXP_CLAMP);
        }
    }
    out->r_t = r_t;
    out->r_1 = r_1;
    out->t_1 = t_1;
    out->ties = ties;
}
#endif

static void sums_portable(const float *p, int64_t n, float m, float inv_t, int mode, int with_ties, block_sums *out) {
    (void)with_ties; /* blocks without the max have no d == 0: the tie test is then a no-op */
    if (mode == MODE_T1) sums_portable_impl(p, n, m, inv_t, MODE_T1, out);
    else if (mode == MODE_T_ENTROPY) sums_portable_impl(p, n, m, inv_t, MODE_T_ENTROPY, out);
    else sums_portable_impl(p, n, m, inv_t, MODE_T_ONLY, out);
}

static const kernel_ops portable_ops = {f16_to_float_scalar, bf16_to_float_scalar, max_portable,
                                        first_index_scalar,  sums_portable,        "portable"};

/* ---------------------------------------------------------------- AVX2 + FMA variant ---------- */
#ifdef EBOOD_X86
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX2_INLINE static inline __attribute__((always_inline, target("avx2,fma")))

__attribute__((target("avx2,fma,f16c"))) static void f16_to_float_f16c(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

AVX2 static void bf16_to_float_avx2(const uint16_t *src, int64_t n, float *dst) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16)));
    }
    for (; i < n; i++) dst[i] = bfloat16_to_float(src[i]);
}

AVX2_INLINE float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

AVX2 static float max_avx2(const float *p, int64_t n, int *has_nan) {
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0, nan_any = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(p + i), b = _mm256_loadu_ps(p + i + 8);
        m0 = _mm256_max_ps(m0, a); /* a NaN in a is dropped here ... */
        m1 = _mm256_max_ps(m1, b);
        nan_any = _mm256_or_ps(nan_any, _mm256_cmp_ps(a, b, _CMP_UNORD_Q)); /* ... and caught here */
    }
    float m = hmax8(_mm256_max_ps(m0, m1));
    int nan_seen = _mm256_movemask_ps(nan_any) != 0;
    for (; i < n; i++) {
        nan_seen |= (p[i] != p[i]);
        m = p[i] > m ? p[i] : m;
    }
    *has_nan = nan_seen;
    return m;
}

AVX2 static int64_t first_index_avx2(const float *p, int64_t n, float v) {
    __m256 target = _mm256_set1_ps(v);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p + i), target, _CMP_EQ_OQ));
        if (mask) return i + __builtin_ctz((unsigned)mask);
    }
    for (; i < n; i++)
        if (p[i] == v) return i;
    return 0;
}

/* exp(x) for x in [EXP_CLAMP, 0]; 1 ulp class accuracy (Cody-Waite reduction + degree-6 poly). */
AVX2_INLINE __m256 exp_avx2(__m256 x) {
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(C6), r, _mm256_set1_ps(C5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(C2));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

typedef struct {
    __m256 r_t, r_1, t_1;
    __m256i ties;
} lane_sums;

/* One vector of values into the lane sums; mode and with_ties are compile-time constants after
 * inlining, so each specialisation keeps only the work it needs. */
AVX2_INLINE void accumulate8(__m256 z, __m256 m, __m256 inv_t, const int mode, const int with_ties, lane_sums *acc) {
    const __m256 lo = _mm256_set1_ps(EXP_CLAMP);
    __m256 d = _mm256_sub_ps(z, m);
    __m256 tie = _mm256_setzero_ps();
    if (with_ties) {
        tie = _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ);
        acc->ties = _mm256_sub_epi32(acc->ties, _mm256_castps_si256(tie)); /* -(-1) per tie */
    }
    if (mode != MODE_T_ONLY) {
        __m256 dc = _mm256_max_ps(d, lo);
        __m256 e = exp_avx2(dc);
        if (with_ties) e = _mm256_andnot_ps(tie, e);
        acc->r_1 = _mm256_add_ps(acc->r_1, e);
        acc->t_1 = _mm256_fmadd_ps(e, dc, acc->t_1);
    }
    if (mode != MODE_T1) {
        __m256 e = exp_avx2(_mm256_max_ps(_mm256_mul_ps(d, inv_t), lo));
        if (with_ties) e = _mm256_andnot_ps(tie, e);
        acc->r_t = _mm256_add_ps(acc->r_t, e);
    }
}

AVX2_INLINE void sums_avx2_impl(const float *p, int64_t n, float m_scalar, float inv_t_scalar, const int mode,
                                const int with_ties, block_sums *out) {
    __m256 m = _mm256_set1_ps(m_scalar), inv_t = _mm256_set1_ps(inv_t_scalar);
    lane_sums a = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_si256()};
    lane_sums b = a;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) { /* two independent accumulator sets hide the add latency */
        accumulate8(_mm256_loadu_ps(p + i), m, inv_t, mode, with_ties, &a);
        accumulate8(_mm256_loadu_ps(p + i + 8), m, inv_t, mode, with_ties, &b);
    }
    if (i < n) { /* tail: pad with -inf, which contributes exactly 0 */
        float tail[16];
        int64_t k = 0;
        for (; i + k < n; k++) tail[k] = p[i + k];
        for (; k < 16; k++) tail[k] = -INFINITY;
        accumulate8(_mm256_loadu_ps(tail), m, inv_t, mode, with_ties, &a);
        accumulate8(_mm256_loadu_ps(tail + 8), m, inv_t, mode, with_ties, &b);
    }
    out->r_t = hsum8(_mm256_add_ps(a.r_t, b.r_t));
    out->r_1 = hsum8(_mm256_add_ps(a.r_1, b.r_1));
    out->t_1 = hsum8(_mm256_add_ps(a.t_1, b.t_1));
    int32_t t[8];
    _mm256_storeu_si256((__m256i *)t, _mm256_add_epi32(a.ties, b.ties));
    out->ties = (int64_t)t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7];
}

AVX2 static void sums_avx2(const float *p, int64_t n, float m, float inv_t, int mode, int with_ties, block_sums *out) {
    if (with_ties) {
        if (mode == MODE_T1) sums_avx2_impl(p, n, m, inv_t, MODE_T1, 1, out);
        else if (mode == MODE_T_ENTROPY) sums_avx2_impl(p, n, m, inv_t, MODE_T_ENTROPY, 1, out);
        else sums_avx2_impl(p, n, m, inv_t, MODE_T_ONLY, 1, out);
    } else {
        if (mode == MODE_T1) sums_avx2_impl(p, n, m, inv_t, MODE_T1, 0, out);
        else if (mode == MODE_T_ENTROPY) sums_avx2_impl(p, n, m, inv_t, MODE_T_ENTROPY, 0, out);
        else sums_avx2_impl(p, n, m, inv_t, MODE_T_ONLY, 0, out);
    }
}

static kernel_ops avx2_ops = {f16_to_float_scalar, bf16_to_float_avx2, max_avx2, first_index_avx2, sums_avx2, "avx2+fma"};
#endif /* EBOOD_X86 */

static const kernel_ops *active_ops = &portable_ops;

static void select_ops(void) {
#ifdef EBOOD_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        if (__builtin_cpu_supports("f16c")) avx2_ops.f16_to_float = f16_to_float_f16c;
        active_ops = &avx2_ops;
    }
#endif
}

/* ---------------------------------------------------------------- rows ----------------------- */

typedef struct {
    float *energy, *msp, *max_logit, *entropy; /* entropy may be NULL */
    int64_t *prediction;
} outputs;

static float element(const void *row, int dtype, int64_t j) {
    if (dtype == DT_F32) return ((const float *)row)[j];
    uint16_t h = ((const uint16_t *)row)[j];
    return dtype == DT_F16 ? half_to_float(h) : bfloat16_to_float(h);
}

/* Rows with a NaN, a +inf or only -inf (the semantics documented in ebood.scores). */
static void exact_special_row(const void *row, int dtype, int64_t cols, const outputs *out, int64_t r) {
    int64_t n_nan = 0, first_nan = 0, n_posinf = 0, first_posinf = 0;
    for (int64_t j = 0; j < cols; j++) {
        float v = element(row, dtype, j);
        if (v != v) {
            if (n_nan++ == 0) first_nan = j;
        } else if (v == INFINITY) {
            if (n_posinf++ == 0) first_posinf = j;
        }
    }
    float energy, msp, max_logit, entropy;
    int64_t prediction;
    if (n_nan) {
        energy = msp = max_logit = entropy = NAN;
        prediction = first_nan;
    } else if (n_posinf) { /* softmax is uniform over the k entries at +inf */
        energy = max_logit = -INFINITY;
        msp = (float)(-1.0 / (double)n_posinf);
        entropy = (float)log((double)n_posinf);
        prediction = first_posinf;
    } else { /* all -inf: softmax is undefined */
        energy = max_logit = INFINITY;
        msp = entropy = NAN;
        prediction = 0;
    }
    out->energy[r] = energy;
    out->msp[r] = msp;
    out->max_logit[r] = max_logit;
    if (out->entropy) out->entropy[r] = entropy;
    out->prediction[r] = prediction;
}

static void score_row(const kernel_ops *ops, const void *row, int dtype, int64_t cols, double temperature,
                      int want_entropy, float *scratch, const outputs *out, int64_t r) {
    const int mode = temperature == 1.0 ? MODE_T1 : (want_entropy ? MODE_T_ENTROPY : MODE_T_ONLY);
    const double inv_t = 1.0 / temperature;
    float m = -INFINITY;
    int64_t argmax = 0;
    double r_t = 0.0, r_1 = 0.0, t_1 = 0.0, ties = 0.0;
    int special = 0;
    for (int64_t start = 0; start < cols; start += BLOCK) {
        int64_t n = cols - start < BLOCK ? cols - start : BLOCK;
        const float *p = scratch;
        if (dtype == DT_F32) p = (const float *)row + start;
        else if (dtype == DT_F16) ops->f16_to_float((const uint16_t *)row + start, n, scratch);
        else ops->bf16_to_float((const uint16_t *)row + start, n, scratch);

        int has_nan = 0;
        float block_max = ops->max(p, n, &has_nan);
        if (has_nan || block_max == INFINITY) {
            special = 1;
            break;
        }
        if (block_max == -INFINITY) continue; /* contributes exactly 0 */
        if (block_max > m) {
            argmax = start + ops->first_index(p, n, block_max);
            if (m != -INFINITY) { /* move the running sums to the new max */
                double delta = (double)m - (double)block_max;
                double scale_1 = exp(delta), base_1 = r_1 + ties;
                t_1 = scale_1 * (t_1 + delta * base_1);
                r_1 = scale_1 * base_1;
                r_t = exp(delta * inv_t) * (r_t + ties);
                ties = 0.0;
            }
            m = block_max;
        }
        block_sums s;
        ops->sums(p, n, m, (float)inv_t, mode, block_max == m, &s);
        r_t += s.r_t;
        r_1 += s.r_1;
        t_1 += s.t_1;
        ties += (double)s.ties;
    }
    if (special || m == -INFINITY) {
        exact_special_row(row, dtype, cols, out, r);
        return;
    }
    if (mode == MODE_T1) r_t = r_1;
    double s_t = ties + r_t; /* ties >= 1: the max itself */
    out->energy[r] = (float)(-((double)m + temperature * log(s_t)));
    out->msp[r] = (float)(-1.0 / s_t);
    out->max_logit[r] = -m;
    if (out->entropy) out->entropy[r] = (float)(log1p((ties - 1.0) + r_1) - t_1 / (ties + r_1));
    out->prediction[r] = argmax;
}

/* ---------------------------------------------------------------- Python binding ------------- */

static PyObject *py_row_scores(PyObject *self, PyObject *args) {
    unsigned long long x_ptr, energy_ptr, msp_ptr, max_logit_ptr, entropy_ptr, prediction_ptr;
    long long rows, cols, row_stride;
    int dtype, want_entropy;
    double temperature;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiLLLdpKKKKK", &x_ptr, &dtype, &rows, &cols, &row_stride, &temperature,
                          &want_entropy, &energy_ptr, &msp_ptr, &max_logit_ptr, &entropy_ptr, &prediction_ptr))
        return NULL;
    if (dtype < DT_F32 || dtype > DT_BF16 || rows < 0 || cols < 1 || !(temperature > 0.0) || !isfinite(temperature)) {
        PyErr_SetString(PyExc_ValueError, "row_scores: invalid dtype code, shape or temperature");
        return NULL;
    }
    const size_t itemsize = dtype == DT_F32 ? 4 : 2;
    outputs out = {(float *)(uintptr_t)energy_ptr, (float *)(uintptr_t)msp_ptr, (float *)(uintptr_t)max_logit_ptr,
                   want_entropy ? (float *)(uintptr_t)entropy_ptr : NULL, (int64_t *)(uintptr_t)prediction_ptr};
    const kernel_ops *ops = active_ops;
    Py_BEGIN_ALLOW_THREADS
    float scratch[BLOCK];
    for (int64_t r = 0; r < rows; r++) {
        const void *row = (const char *)(uintptr_t)x_ptr + (size_t)(r * row_stride) * itemsize;
        score_row(ops, row, dtype, cols, temperature, want_entropy, scratch, &out, r);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* Test hook: switch the variant ("portable", or "avx2+fma" where the CPU has it). */
static PyObject *py_set_isa(PyObject *self, PyObject *args) { /* self: this module */
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const kernel_ops *previous = active_ops;
    if (strcmp(name, "portable") == 0) {
        active_ops = &portable_ops;
    } else {
        select_ops();
        if (strcmp(name, active_ops->name) != 0) {
            active_ops = previous;
            PyErr_Format(PyExc_ValueError, "instruction set %s is not available on this CPU", name);
            return NULL;
        }
    }
    if (PyModule_AddStringConstant(self, "isa", active_ops->name) < 0) return NULL;
    return PyUnicode_FromString(previous->name);
}

static PyMethodDef methods[] = {
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name) -> previous name. Test hook: use the 'portable' variant or the best one ('avx2+fma')."},
    {"row_scores", py_row_scores, METH_VARARGS,
     "row_scores(x_ptr, dtype, rows, cols, row_stride, temperature, want_entropy, energy_ptr, msp_ptr, "
     "max_logit_ptr, entropy_ptr, prediction_ptr)\n\n"
     "Per-row energy, msp, max_logit, entropy (float32) and argmax (int64) of a (rows, cols) matrix at\n"
     "x_ptr with unit column stride and the given row stride (in elements); dtype 0 = float32,\n"
     "1 = float16, 2 = bfloat16. Pointers are raw addresses; the caller keeps the buffers alive.\n"
     "Releases the GIL, so disjoint row ranges can run in parallel threads."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_scores", "Native kernel of ebood.scores.", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__scores(void) {
    select_ops();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddStringConstant(m, "isa", active_ops->name) < 0 || PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
