/* The weight gradient of a direct sparse convolution, at the active weights only.
 *
 * With the layout of sparse_conv.c (a packed input image x, an output grid of pitch Wq, the
 * active weight j of output channel o reading x at offset off[j]), the forward is
 *
 *     y[n, o, p] = sum_j val[j] * x[n, off[j] + p]
 *
 * so the gradient of the loss with respect to val[j] is one dot product over the images and
 * the grid:
 *
 *     dval[j] = sum_n sum_p dy[n, o, p] * x[n, off[j] + p]
 *
 * where dy is the output gradient laid out on the same grid, with zeros in the grid columns
 * that are not output pixels (they lie between rows). That is the masked dense weight
 * gradient at the active positions, and nothing else is computed: nnz * N * pixels
 * multiply-adds, the forward's count.
 *
 * Per output channel, the active weights go in chunks of up to 8: one vector of dy is loaded
 * and multiplied with the chunk's eight shifted windows of x into eight accumulators, so a
 * multiply-add costs one load (as in the forward). The images are split into GROUPS fixed
 * groups, each summed into its own partial gradient, and the groups are added in a fixed order
 * at the end: the result is the same for any thread count, run after run (bit-exact resume).
 * Images of a group are taken a few at a time (a block that fits in the L2 cache), the
 * accumulators kept across the block, so the horizontal sums do not dominate small planes.
 */
#include "sparseopt.h"

#define GROUPS 16
#define BLOCK_BYTES (256 * 1024)

typedef struct {
    const float *x;        /* packed input, image n at x + n * x_n */
    int64_t x_n;
    const float *dy;       /* output gradient on the grid: plane (n, o) at dy + n * dy_n + o * dy_c */
    int64_t dy_n, dy_c;
    const int32_t *off;    /* offsets of the active weights, CSR by output channel */
    const int32_t *rowptr; /* O + 1 */
    int64_t N, O, L;       /* images, output channels, grid positions read (the last one is (Ho-1)*Wq + Wo - 1) */
    float *dval;           /* the gradient of the active weights, rowptr[O] floats */
    float *work;           /* GROUPS * rowptr[O] floats of scratch */
    int64_t threads;
} wgrad_args;

/* ---- portable ------------------------------------------------------------------------------- */
static void rows_portable(const wgrad_args *a, int64_t n0, int64_t n1, float *part) {
    for (int64_t o = 0; o < a->O; o++) {
        for (int32_t j = a->rowptr[o]; j < a->rowptr[o + 1]; j++) {
            float s = 0.0f;
            for (int64_t n = n0; n < n1; n++) {
                const float *d = a->dy + n * a->dy_n + o * a->dy_c, *x = a->x + n * a->x_n + a->off[j];
                for (int64_t p = 0; p < a->L; p++) s += d[p] * x[p];
            }
            part[j] += s;
        }
    }
}

#ifdef SPARSEOPT_X86
/* ---- AVX-512 -------------------------------------------------------------------------------- */
/* J accumulators (J a constant after inlining): part[j0 .. j0+J) += the chunk's dot products. */
AVX512_TARGET static inline __attribute__((always_inline)) void
chunk_avx512(const wgrad_args *a, int64_t o, int32_t j0, const int J, int64_t n0, int64_t n1, float *part) {
    __m512 acc[8];
#pragma GCC unroll 8
    for (int k = 0; k < J; k++) acc[k] = _mm512_setzero_ps();
    const int64_t full = a->L / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (a->L - full)) - 1u);
    for (int64_t n = n0; n < n1; n++) {
        const float *d = a->dy + n * a->dy_n + o * a->dy_c, *x = a->x + n * a->x_n;
        const float *src[8];
#pragma GCC unroll 8
        for (int k = 0; k < J; k++) src[k] = x + a->off[j0 + k];
        for (int64_t p = 0; p < full; p += 16) {
            const __m512 g = _mm512_loadu_ps(d + p);
#pragma GCC unroll 8
            for (int k = 0; k < J; k++) acc[k] = _mm512_fmadd_ps(g, _mm512_loadu_ps(src[k] + p), acc[k]);
        }
        if (tail) {
            const __m512 g = _mm512_maskz_loadu_ps(tail, d + full);
#pragma GCC unroll 8
            for (int k = 0; k < J; k++) acc[k] = _mm512_fmadd_ps(g, _mm512_maskz_loadu_ps(tail, src[k] + full), acc[k]);
        }
    }
#pragma GCC unroll 8
    for (int k = 0; k < J; k++) part[j0 + k] += _mm512_reduce_add_ps(acc[k]);
}

AVX512_TARGET static void rows_avx512(const wgrad_args *a, int64_t n0, int64_t n1, float *part) {
    for (int64_t o = 0; o < a->O; o++) {
        int32_t j = a->rowptr[o];
        const int32_t end = a->rowptr[o + 1];
        for (; j + 8 <= end; j += 8) chunk_avx512(a, o, j, 8, n0, n1, part);
        if (j + 4 <= end) { chunk_avx512(a, o, j, 4, n0, n1, part); j += 4; }
        if (j + 2 <= end) { chunk_avx512(a, o, j, 2, n0, n1, part); j += 2; }
        if (j < end) chunk_avx512(a, o, j, 1, n0, n1, part);
    }
}

/* ---- AVX2 + FMA ----------------------------------------------------------------------------- */
AVX2_TARGET static inline __m256i tail8(int64_t count) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), iota);
}

AVX2_TARGET static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

AVX2_TARGET static inline __attribute__((always_inline)) void
chunk_avx2(const wgrad_args *a, int64_t o, int32_t j0, const int J, int64_t n0, int64_t n1, float *part) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int k = 0; k < J; k++) acc[k] = _mm256_setzero_ps();
    const int64_t full = a->L / 8 * 8;
    const __m256i tail = tail8(a->L - full);
    for (int64_t n = n0; n < n1; n++) {
        const float *d = a->dy + n * a->dy_n + o * a->dy_c, *x = a->x + n * a->x_n;
        const float *src[8];
#pragma GCC unroll 8
        for (int k = 0; k < J; k++) src[k] = x + a->off[j0 + k];
        for (int64_t p = 0; p < full; p += 8) {
            const __m256 g = _mm256_loadu_ps(d + p);
#pragma GCC unroll 8
            for (int k = 0; k < J; k++) acc[k] = _mm256_fmadd_ps(g, _mm256_loadu_ps(src[k] + p), acc[k]);
        }
        if (full < a->L) {
            const __m256 g = _mm256_maskload_ps(d + full, tail);
#pragma GCC unroll 8
            for (int k = 0; k < J; k++) acc[k] = _mm256_fmadd_ps(g, _mm256_maskload_ps(src[k] + full, tail), acc[k]);
        }
    }
#pragma GCC unroll 8
    for (int k = 0; k < J; k++) part[j0 + k] += hsum8(acc[k]);
}

AVX2_TARGET static void rows_avx2(const wgrad_args *a, int64_t n0, int64_t n1, float *part) {
    for (int64_t o = 0; o < a->O; o++) {
        int32_t j = a->rowptr[o];
        const int32_t end = a->rowptr[o + 1];
        for (; j + 8 <= end; j += 8) chunk_avx2(a, o, j, 8, n0, n1, part);
        if (j + 4 <= end) { chunk_avx2(a, o, j, 4, n0, n1, part); j += 4; }
        if (j + 2 <= end) { chunk_avx2(a, o, j, 2, n0, n1, part); j += 2; }
        if (j < end) chunk_avx2(a, o, j, 1, n0, n1, part);
    }
}
#endif /* SPARSEOPT_X86 */

typedef void (*rows_fn)(const wgrad_args *, int64_t, int64_t, float *);

/* dval = the weight gradient at the active positions: returns 0, or -1 for a path this CPU lacks. */
int sparseopt_wgrad(const wgrad_args *a, int path) {
    if (path > sparseopt_best_path()) return -1;
    rows_fn fn = rows_portable;
#ifdef SPARSEOPT_X86
    if (path == PATH_AVX512) fn = rows_avx512;
    else if (path == PATH_AVX2) fn = rows_avx2;
#endif
    const int64_t nnz = a->rowptr[a->O];
    if (nnz == 0) return 0;
    if (a->N <= 0 || a->L <= 0) {
        memset(a->dval, 0, (size_t)nnz * sizeof(float));
        return 0;
    }
    const int64_t groups = a->N < GROUPS ? a->N : GROUPS;
    /* images per block: the block's input stays in the L2 cache while every output channel reads it */
    int64_t block = BLOCK_BYTES / (a->x_n * (int64_t)sizeof(float) + 1);
    if (block < 1) block = 1;
    const int threads = (int)(a->threads > 0 ? a->threads : 1);
    const int64_t work = nnz * a->L * a->N;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && work >= SERIAL_WORK)
    for (int64_t g = 0; g < groups; g++) {
        float *part = a->work + g * nnz;
        memset(part, 0, (size_t)nnz * sizeof(float));
        /* group g: images [g*N/groups, (g+1)*N/groups), in blocks */
        const int64_t lo = g * a->N / groups, hi = (g + 1) * a->N / groups;
        for (int64_t n = lo; n < hi; n += block) fn(a, n, n + block < hi ? n + block : hi, part);
    }
    /* the groups in a fixed order: the same sum for any number of threads */
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && nnz * groups > 65536)
    for (int64_t j = 0; j < nnz; j++) {
        float s = 0.0f;
        for (int64_t g = 0; g < groups; g++) s += a->work[g * nnz + j];
        a->dval[j] = s;
    }
    return 0;
}
