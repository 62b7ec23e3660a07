/* Direct sparse convolution for the CPU: sparseopt's compiled kernels.
 *
 * The weight of a convolution is kept per output channel as CSR rows of
 * (value, offset): the offset is where the weight's input element sits in a
 * zero-padded, phase-split copy of one image (see pack_input). For a grid of
 * output pixels laid out with the packed plane's pitch Wq, the output pixel p
 * of channel o is then
 *
 *     y[o, p] = bias[o] + sum_j val[j] * xpacked[off[j] + p]      (j in row o)
 *
 * so every active weight adds one broadcast-multiply of a *contiguous* run of
 * the packed input to a tile of output pixels held in vector registers, and no
 * patch matrix is ever built. This is the family of XNNPACK's sparse inference
 * (Elsen et al., "Fast Sparse ConvNets", CVPR 2020), with the spatial pixels as
 * the vector dimension and the stride handled by splitting the padded input
 * into stride*stride phases, each a dense plane, so stride 2 is as contiguous
 * as stride 1. Grid positions whose column is >= Wo are computed (they sit
 * between rows) but never stored.
 *
 * The epilogue adds the bias (the folded BatchNorm), an optional residual and
 * an optional ReLU before one masked store per output row the vector touches,
 * into a destination with its own strides (a plain NCHW tensor, or a view).
 *
 * Three code paths, chosen at run time: AVX-512 (16 lanes), AVX2 + FMA (8
 * lanes) and a portable one in plain C. Masked loads and stores keep every
 * access inside the tensors, so no slack is needed anywhere. Threads: OpenMP,
 * the count passed by the caller (torch.get_num_threads()); the library links
 * libgomp.so.1, the same soname torch's CPU wheels load, so one thread pool
 * serves both.
 *
 * Kept in plain C (no torch headers): it compiles in about a second, and is
 * called through ctypes with raw pointers (docs/deployment.md: why).
 */
#include "sparseopt.h"

typedef struct {
    const float *x;        /* packed input, image n at x + n * x_n */
    int64_t x_n;
    const float *val;      /* active weights, CSR by output channel */
    const int32_t *off;    /* their offsets into one packed image */
    const int32_t *rowptr; /* O + 1 */
    const float *bias;     /* O, or NULL */
    int64_t N, O;
    int64_t Ho, Wo, Wq;    /* output rows, valid columns, grid pitch (the packed plane's) */
    float *y;              /* output (n, o, row, col) at y + n*y_n + o*y_c + row*y_row + col */
    int64_t y_n, y_c, y_row;
    int64_t y_ph, y_pw;    /* a border of zeros to write around each output plane (the next layer's padding) */
    const float *r;        /* residual with the output's shape, or NULL */
    int64_t r_n, r_c, r_row;
    int64_t relu;
    int64_t threads;
} sconv_args;

int sparseopt_abi_version(void) { return SPARSEOPT_ABI_VERSION; }

/* ---- work split -------------------------------------------------------------
 * Items are (image, pixel tile, block of output channels), ordered so that the
 * items that read one input tile follow each other (it stays in cache). */
typedef struct { int64_t tiles, oblocks, ob, items; } split_t;

static split_t split_work(const sconv_args *a, int64_t tile) {
    split_t s;
    int64_t L = (a->Ho - 1) * a->Wq + a->Wo;
    s.tiles = (L + tile - 1) / tile;
    /* blocks of output channels: small enough for every thread to get several
     * items, large enough that the per-item overhead does not show */
    int64_t want = 8 * (a->threads > 0 ? a->threads : 1);
    int64_t per = a->N * s.tiles;
    s.ob = a->O;
    while (s.ob > 4 && per * ((a->O + s.ob - 1) / s.ob) < want) s.ob = (s.ob + 1) / 2;
    s.oblocks = (a->O + s.ob - 1) / s.ob;
    s.items = a->N * s.tiles * s.oblocks;
    return s;
}

/* ---- where a tile's lanes go ---------------------------------------------------
 * A vector of the grid covers pixels p .. p+VW-1, which may span several output
 * rows and the unused grid columns between them. Per tile (not per output channel:
 * that would cost two integer divisions per vector and channel, more than the
 * arithmetic of a 98%-sparse layer) the lanes are split into segments that each
 * lie in one output row; a segment is one masked store (and residual load). */
typedef struct {
    int64_t v, lo, hi;  /* vector v of the tile, its lanes [lo, hi) */
    int64_t y, r;       /* element offsets from the channel's output / residual base to lane 0 */
} seg_t;

#define MAX_SEGS(VW) (4 * ((VW) + 2))

static int64_t tile_segments(const sconv_args *a, int64_t p0, int64_t nv, int64_t VW, seg_t *seg) {
    const int64_t L = (a->Ho - 1) * a->Wq + a->Wo;
    int64_t k = 0;
    for (int64_t v = 0; v < nv; v++) {
        int64_t p = p0 + v * VW, end = p + VW < L ? p + VW : L;
        int64_t row = p / a->Wq, start = row * a->Wq;
        for (; start < end; row++, start += a->Wq) {
            int64_t lo = start > p ? start : p, hi = start + a->Wo < end ? start + a->Wo : end;
            if (hi <= lo) continue;
            seg[k].v = v, seg[k].lo = lo - p, seg[k].hi = hi - p;
            seg[k].y = row * a->y_row - start + p;
            seg[k].r = row * a->r_row - start + p;
            k++;
        }
    }
    return k;
}

/* ---- portable path ----------------------------------------------------------- */
#define PTILE 32

static void tile_portable(const sconv_args *a, int64_t n, int64_t p0, int64_t o0, int64_t o1) {
    const int64_t L = (a->Ho - 1) * a->Wq + a->Wo;
    const int64_t len = L - p0 < PTILE ? L - p0 : PTILE;
    const float *x = a->x + n * a->x_n + p0;
    seg_t seg[MAX_SEGS(PTILE)];
    const int64_t ns = tile_segments(a, p0, 1, PTILE, seg);
    float acc[PTILE];
    for (int64_t o = o0; o < o1; o++) {
        float b = a->bias ? a->bias[o] : 0.0f;
        for (int64_t i = 0; i < len; i++) acc[i] = b;
        for (int32_t j = a->rowptr[o]; j < a->rowptr[o + 1]; j++) {
            const float w = a->val[j];
            const float *src = x + a->off[j];
            for (int64_t i = 0; i < len; i++) acc[i] += w * src[i];
        }
        float *yb = a->y + n * a->y_n + o * a->y_c;
        const float *rb = a->r ? a->r + n * a->r_n + o * a->r_c : NULL;
        for (int64_t k = 0; k < ns; k++) {
            for (int64_t i = seg[k].lo; i < seg[k].hi; i++) {
                float v = acc[i];
                if (rb) v += rb[seg[k].r + i];
                if (a->relu && v < 0.0f) v = 0.0f;
                yb[seg[k].y + i] = v;
            }
        }
    }
}

#ifdef SPARSEOPT_X86
/* ---- AVX-512 ----------------------------------------------------------------- */
#define V16 16
#define T16 (4 * V16)

static inline __mmask16 lanes16(int64_t lo, int64_t hi) {
    return (__mmask16)(((1u << hi) - 1u) & ~((1u << lo) - 1u));
}

/* A tile of NV vectors (NV a constant after inlining: 4 or 8). With 8 accumulators the two FMA
 * pipes of a Zen 4/5 or Xeon core each have a chain to work on while the other's result is four
 * cycles away, and the per-channel epilogue is shared by twice the pixels; small planes (ResNet's
 * 8x8 stage, batch-1 inference) keep 4, whose tile does not run past their grid. */
AVX512_TARGET static inline __attribute__((always_inline)) void
tile16(const sconv_args *a, int64_t n, int64_t p0, int64_t o0, int64_t o1, const int NV) {
    const int64_t L = (a->Ho - 1) * a->Wq + a->Wo;
    const float *x = a->x + n * a->x_n + p0;
    const int full = L - p0 >= NV * V16;  /* else the grid's last tile: masked loads, nothing past the grid is read */
    const int64_t nv = full ? NV : (L - p0 + V16 - 1) / V16;
    seg_t seg[8 * (V16 + 2)];
    __mmask16 sm[8 * (V16 + 2)];
    const int64_t ns = tile_segments(a, p0, nv, V16, seg);
    for (int64_t k = 0; k < ns; k++) sm[k] = lanes16(seg[k].lo, seg[k].hi);
    __mmask16 lm[8];  /* load masks: only lanes inside the grid are read (none past it: a zero mask loads nothing) */
    for (int v = 0; v < NV; v++) {
        int64_t left = L - p0 - v * V16;
        lm[v] = left >= V16 ? (__mmask16)0xffff : left > 0 ? lanes16(0, left) : 0;
    }
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t o = o0; o < o1; o++) {
        const __m512 b = _mm512_set1_ps(a->bias ? a->bias[o] : 0.0f);
        __m512 c[8];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) c[v] = b;
        const int32_t end = a->rowptr[o + 1];
        if (full) {  /* plain loads */
            for (int32_t j = a->rowptr[o]; j < end; j++) {
                const __m512 w = _mm512_set1_ps(a->val[j]);
                const float *src = x + a->off[j];
#pragma GCC unroll 8
                for (int v = 0; v < NV; v++) c[v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(src + v * V16), c[v]);
            }
        } else {
            for (int32_t j = a->rowptr[o]; j < end; j++) {
                const __m512 w = _mm512_set1_ps(a->val[j]);
                const float *src = x + a->off[j];
#pragma GCC unroll 8
                for (int v = 0; v < NV; v++)
                    c[v] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(lm[v], src + v * V16), c[v]);
            }
        }
        /* a copy for the epilogue's run-time index: c itself must only be indexed by constants, or the
         * compiler keeps the accumulators in memory through the loop above */
        __m512 cs[8];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) cs[v] = c[v];
        float *yb = a->y + n * a->y_n + o * a->y_c;
        const float *rb = a->r ? a->r + n * a->r_n + o * a->r_c : NULL;
        for (int64_t k = 0; k < ns; k++) {
            __m512 out = cs[seg[k].v];
            if (rb) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(sm[k], rb + seg[k].r));
            if (a->relu) out = _mm512_max_ps(out, zero);
            _mm512_mask_storeu_ps(yb + seg[k].y, sm[k], out);
        }
    }
}

AVX512_TARGET static void tile_avx512(const sconv_args *a, int64_t n, int64_t p0, int64_t o0, int64_t o1) {
    tile16(a, n, p0, o0, o1, 4);
}

AVX512_TARGET static void tile_avx512_wide(const sconv_args *a, int64_t n, int64_t p0, int64_t o0, int64_t o1) {
    tile16(a, n, p0, o0, o1, 8);
}

/* ---- AVX2 + FMA -------------------------------------------------------------- */
#define V8 8
#define T8 (4 * V8)

AVX2_TARGET static inline __m256i lanes8(int64_t lo, int64_t hi) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i below = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)hi), iota);  /* lane < hi */
    __m256i before = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)lo), iota); /* lane < lo */
    return _mm256_andnot_si256(before, below);
}

AVX2_TARGET static void tile_avx2(const sconv_args *a, int64_t n, int64_t p0, int64_t o0, int64_t o1) {
    const int64_t L = (a->Ho - 1) * a->Wq + a->Wo;
    const float *x = a->x + n * a->x_n + p0;
    const int full = L - p0 >= T8;
    const int64_t nv = full ? 4 : (L - p0 + V8 - 1) / V8;
    seg_t seg[MAX_SEGS(V8)];
    __m256i sm[MAX_SEGS(V8)];
    const int64_t ns = tile_segments(a, p0, nv, V8, seg);
    for (int64_t k = 0; k < ns; k++) sm[k] = lanes8(seg[k].lo, seg[k].hi);
    __m256i lm[4];
    for (int64_t v = 0; v < 4; v++) {
        int64_t left = L - p0 - v * V8;
        lm[v] = lanes8(0, left >= V8 ? V8 : left > 0 ? left : 0);
    }
    const __m256 zero = _mm256_setzero_ps();
    for (int64_t o = o0; o < o1; o++) {
        const __m256 b = _mm256_set1_ps(a->bias ? a->bias[o] : 0.0f);
        __m256 c0 = b, c1 = b, c2 = b, c3 = b;
        const int32_t end = a->rowptr[o + 1];
        if (full) {
            for (int32_t j = a->rowptr[o]; j < end; j++) {
                const __m256 w = _mm256_set1_ps(a->val[j]);
                const float *src = x + a->off[j];
                c0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(src), c0);
                c1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(src + 8), c1);
                c2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(src + 16), c2);
                c3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(src + 24), c3);
            }
        } else {
            for (int32_t j = a->rowptr[o]; j < end; j++) {
                const __m256 w = _mm256_set1_ps(a->val[j]);
                const float *src = x + a->off[j];
                c0 = _mm256_fmadd_ps(w, _mm256_maskload_ps(src, lm[0]), c0);
                if (nv > 1) c1 = _mm256_fmadd_ps(w, _mm256_maskload_ps(src + 8, lm[1]), c1);
                if (nv > 2) c2 = _mm256_fmadd_ps(w, _mm256_maskload_ps(src + 16, lm[2]), c2);
                if (nv > 3) c3 = _mm256_fmadd_ps(w, _mm256_maskload_ps(src + 24, lm[3]), c3);
            }
        }
        const __m256 c[4] = {c0, c1, c2, c3};
        float *yb = a->y + n * a->y_n + o * a->y_c;
        const float *rb = a->r ? a->r + n * a->r_n + o * a->r_c : NULL;
        for (int64_t k = 0; k < ns; k++) {
            __m256 out = c[seg[k].v];
            if (rb) out = _mm256_add_ps(out, _mm256_maskload_ps(rb + seg[k].r, sm[k]));
            if (a->relu) out = _mm256_max_ps(out, zero);
            _mm256_maskstore_ps(yb + seg[k].y, sm[k], out);
        }
    }
}
#endif /* SPARSEOPT_X86 */

/* ---- dispatch ------------------------------------------------------------------ */
/* The best path this CPU runs (the caller may ask for a lower one). */
static int best_path = -1;

int sparseopt_best_path(void) {
    if (best_path >= 0) return best_path;
    best_path = PATH_PORTABLE;
#ifdef SPARSEOPT_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        best_path = PATH_AVX512;
    else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        best_path = PATH_AVX2;
#endif
    return best_path;
}

typedef void (*tile_fn)(const sconv_args *, int64_t, int64_t, int64_t, int64_t);

/* Zero the border of y_ph rows and y_pw columns around each output plane: the padding of an
 * output written straight into the layout the next convolution reads. */
static void zero_border(const sconv_args *a, int threads) {
    const int64_t ph = a->y_ph, pw = a->y_pw, Hp = a->Ho + 2 * ph, Wp = a->Wo + 2 * pw, planes = a->N * a->O;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && planes * Hp * Wp > 65536)
    for (int64_t q = 0; q < planes; q++) {
        float *plane = a->y + (q / a->O) * a->y_n + (q % a->O) * a->y_c - ph * a->y_row - pw;
        for (int64_t i = 0; i < Hp; i++) {
            float *row = plane + i * a->y_row;
            if (i < ph || i >= ph + a->Ho) {
                for (int64_t j = 0; j < Wp; j++) row[j] = 0.0f;
            } else {
                for (int64_t j = 0; j < pw; j++) row[j] = 0.0f;
                for (int64_t j = pw + a->Wo; j < Wp; j++) row[j] = 0.0f;
            }
        }
    }
}

static inline void run_item(const sconv_args *a, const split_t *s, tile_fn fn, int64_t tile, int64_t item) {
    int64_t ob = item % s->oblocks, rest = item / s->oblocks;
    int64_t t = rest % s->tiles, n = rest / s->tiles;
    int64_t o0 = ob * s->ob, o1 = o0 + s->ob < a->O ? o0 + s->ob : a->O;
    fn(a, n, t * tile, o0, o1);
}

/* y = conv(x) (+ residual) (ReLU): returns 0, or -1 for a path this CPU lacks. */
int sparseopt_sconv(const sconv_args *a, int path) {
    if (path > sparseopt_best_path()) return -1;
    tile_fn fn = tile_portable;
    int64_t tile = PTILE;
#ifdef SPARSEOPT_X86
    if (path == PATH_AVX512) {
        const int64_t L = (a->Ho - 1) * a->Wq + a->Wo;
        if (L >= 4 * T16) { fn = tile_avx512_wide; tile = 2 * T16; }  /* at least two wide tiles per image */
        else { fn = tile_avx512; tile = T16; }
    }
    else if (path == PATH_AVX2) { fn = tile_avx2; tile = T8; }
#endif
    if (a->N <= 0 || a->O <= 0 || a->Ho <= 0 || a->Wo <= 0) return 0;
    if (a->y_ph > 0 || a->y_pw > 0) zero_border(a, (int)(a->threads > 0 ? a->threads : 1));
    split_t s = split_work(a, tile);
    const int threads = (int)(a->threads > 0 ? a->threads : 1);
    /* Below about SERIAL_WORK multiply-adds a layer takes a few microseconds on one core, and waking
     * the other threads costs as much: ResNet-20 at batch 1 ran 1.5x slower on two threads than on
     * one before this rule. */
    const int64_t work = (int64_t)a->rowptr[a->O] * ((a->Ho - 1) * a->Wq + a->Wo) * a->N;
    if (threads == 1 || s.items == 1 || work < SERIAL_WORK) {  /* no parallel region at all */
        for (int64_t item = 0; item < s.items; item++) run_item(a, &s, fn, tile, item);
        return 0;
    }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < s.items; item++) run_item(a, &s, fn, tile, item);
    return 0;
}

/* Zero-padded, phase-split copy of x for a convolution of stride s:
 *     out[n][a][b][c][i][j] = xpad[n, c, i*s + a, j*s + b]     (a < PA, b < PB)
 * where xpad is x with pt rows on top and pl columns on the left of zeros (and
 * zeros wherever the index falls outside x). x is read through its strides, so a
 * channels-last tensor is packed as cheaply as a contiguous one. */
void sparseopt_pack(const float *x, int64_t N, int64_t C, int64_t H, int64_t W,
                    int64_t xs_n, int64_t xs_c, int64_t xs_h, int64_t xs_w,
                    int64_t pt, int64_t pl, int64_t s, int64_t PA, int64_t PB, int64_t Hq, int64_t Wq,
                    float *out, int64_t threads) {
    const int64_t plane = Hq * Wq, image = PA * PB * C * plane;
    const int64_t jobs = N * PA * PB * C;
#pragma omp parallel for schedule(static) num_threads((int)(threads > 0 ? threads : 1)) if (jobs * plane > 262144)
    for (int64_t job = 0; job < jobs; job++) {
        int64_t c = job % C, rest = job / C;
        int64_t b = rest % PB; rest /= PB;
        int64_t aa = rest % PA, n = rest / PA;
        float *dst = out + n * image + ((aa * PB + b) * C + c) * plane;
        const float *src = x + n * xs_n + c * xs_c;
        /* columns j with 0 <= j*s + b - pl < W: the same for every row */
        int64_t j0 = 0, j1 = Wq;
        while (j0 < Wq && j0 * s + b - pl < 0) j0++;
        while (j1 > j0 && (j1 - 1) * s + b - pl >= W) j1--;
        for (int64_t i = 0; i < Hq; i++) {
            float *drow = dst + i * Wq;
            int64_t h = i * s + aa - pt;
            if (h < 0 || h >= H) {
                for (int64_t j = 0; j < Wq; j++) drow[j] = 0.0f;
                continue;
            }
            /* plain loops, not memset/memcpy: rows are short, and a call per row costs more than the copy */
            const float *srow = src + h * xs_h + (b - pl) * xs_w;
            for (int64_t j = 0; j < j0; j++) drow[j] = 0.0f;
            if (s == 1 && xs_w == 1) {
                for (int64_t j = j0; j < j1; j++) drow[j] = srow[j];
            } else {
                for (int64_t j = j0; j < j1; j++) drow[j] = srow[j * s * xs_w];
            }
            for (int64_t j = j1; j < Wq; j++) drow[j] = 0.0f;
        }
    }
}


/* Max pooling of NCHW planes (kernel kh x kw, stride, zero-free padding as torch's: padded positions
 * never win), dilation 1, floor mode. torch's own NCHW max_pool2d takes 4.6 ms on ResNet-50's 64x112x112
 * stem output here (0.33 ms channels-last), more than the sparse convolutions around it. */
void sparseopt_maxpool(const float *x, int64_t N, int64_t C, int64_t H, int64_t W,
                       int64_t xs_n, int64_t xs_c, int64_t xs_h, int64_t xs_w,
                       int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw,
                       float *y, int64_t Ho, int64_t Wo, int64_t threads) {
    const int64_t planes = N * C;
#pragma omp parallel for schedule(static) num_threads((int)(threads > 0 ? threads : 1)) if (threads > 1 && planes * Ho * Wo > 65536)
    for (int64_t q = 0; q < planes; q++) {
        const float *src = x + (q / C) * xs_n + (q % C) * xs_c;
        float *dst = y + q * Ho * Wo;
        for (int64_t oy = 0; oy < Ho; oy++) {
            int64_t y0 = oy * sh - ph, y1 = y0 + kh;
            if (y0 < 0) y0 = 0;
            if (y1 > H) y1 = H;
            float *out = dst + oy * Wo;
            for (int64_t ox = 0; ox < Wo; ox++) out[ox] = -__builtin_inff();
            for (int64_t iy = y0; iy < y1; iy++) {
                const float *row = src + iy * xs_h;
                /* one tap column at a time over the output columns whose window holds it: no branch
                 * on the data (a data-dependent branch mispredicts every other tap on activations)
                 * and a loop the compiler vectorises */
                for (int64_t kx = 0; kx < kw; kx++) {
                    int64_t lo = pw - kx > 0 ? (pw - kx + sw - 1) / sw : 0;
                    int64_t hi = (W - 1 + pw - kx) >= 0 ? (W - 1 + pw - kx) / sw + 1 : 0;
                    if (hi > Wo) hi = Wo;
                    const float *base = row + (kx - pw) * xs_w;
                    for (int64_t ox = lo; ox < hi; ox++) {
                        float v = base[ox * sw * xs_w], m = out[ox];
                        out[ox] = (v != v) ? v : (v > m ? v : m);  /* NaN wins, as in torch */
                    }
                }
            }
        }
    }
}
