// binaryconnect packed inference kernels: real-valued activations times binary weights, computed
// without multiplications. Plain C ABI (loaded through ctypes), no Python or torch headers, so the
// first build takes seconds. Built by binaryconnect/export/native.py with
//     g++ -O3 -std=c++17 -fPIC -shared -fopenmp bcnn_kernels.cpp -o libbcnn_kernels-<hash>.so
// Instruction sets are chosen at run time (__builtin_cpu_supports): AVX-512, AVX2 or portable code,
// the same source (lut_body.inc) compiled three times under `#pragma GCC target`.
//
// Layout of activations: feature-major. A linear layer reads X[K][cols] and writes Y[N][cols];
// a convolution reads X[C][B][H][W] and writes Y[N][B][OH][OW]. Columns (batch rows, or output
// pixels) are processed in tiles of V lanes, so every vector instruction serves V columns; a
// convolution gathers its tile's inputs straight from X (masked loads), with no im2col buffer.
//
// Packed weights, two copies of the same bits (bit i of byte g of output j is the sign of weight
// (j, 8g + i): 1 = +H, 0 = -H; pad bits are 0):
//   wr: row-major  [N][Kg]  (the file's layout; used by the portable and AVX2 one-column kernels)
//   wt: group-major [Kg][N] (used by the table-lookup kernels)
//   wq: [ceil(Kg/4)][N] uint32, wq[c][j] = bytes 4c..4c+3 of row j as a little-endian word (zero
//       beyond Kg); used by the AVX-512 one-column kernel
//   w3: [ceil(8Kg/30)][N] uint32, w3[c][j] = bits 30c..30c+29 of row j in bits 0..29; used by the
//       AVX2 one-column kernel
// Each layer computes  y_j = scale_j * (sum_{+1} x - sum_{-1} x) + offset_j  (H and the folded batch
// norm are inside scale_j and offset_j), then optionally max(y, 0). Three ways to get the sums, all
// with additions and subtractions only:
//   lut4_tile  tables of the 16 signed sums of 4 inputs, looked up with each half-byte of weights
//              (two vector additions per 8 weights and V columns; the tables stay in L1);
//   lut_tile   tables of the 256 signed sums of 8 inputs, looked up with each weight byte;
//   gemv       one column: AVX-512 (AVX2) holds the 16 (8) signed sums of 4 (3) inputs in one
//              register and looks them up for 16 (8) outputs at once with a permutation (vpermps);
//              portable code adds the inputs whose bit is 1: y = 2 * (that sum) - sum(x).
// A cost model (per instruction set, measured) picks one per layer call; `mode` can force one.

#include <immintrin.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

namespace {

struct Isa {
    const char* name;
    int V;     // columns per tile
    i64 Gc;    // groups of 8 inputs whose tables are kept at once
    // Cost model, in vector operations per group of 8 inputs (fitted to timings on a Sapphire-Rapids-
    // class Xeon, see BENCHMARKS.md; the choice only affects speed: all give the sums to float32 rounding):
    double gemv_cost;  // `gemv`, per output and column
    double lut_cost;   // `lut_tile`, per lookup (building its tables costs 264 per tile)
    void (*gather)(const float*, i64, i64, i64, const int32_t*, const int32_t*, const uint32_t*, float*, i64);
    void (*lut)(const float*, i64, const uint8_t*, i64, i64, i64, float*, float*, i64);
    void (*gemv)(const float*, i64, const uint8_t*, const uint32_t*, const uint32_t*, i64, i64, i64, float*, float*);
    void (*lut4)(const float*, i64, const uint8_t*, i64, i64, i64, float*, float*, i64);
    i64 Gc4;   // groups whose 16-entry tables are kept at once
    double lut4_cost;  // relative cost of a lookup in `lut4_tile`
    double gemv_build;  // cost of `gemv`'s per-column preparation, per group of 8 inputs
};

}  // namespace

// ------------------------------------------------------------------------------------------------
// Portable code: V = 8 lanes in a plain struct (the compiler may still use SSE2).
namespace isa_scalar {
constexpr int V = 8;
struct vf { float v[V]; };
static inline vf vzero() { vf r; for (int i = 0; i < V; ++i) r.v[i] = 0.f; return r; }
static inline vf vload(const float* p) { vf r; for (int i = 0; i < V; ++i) r.v[i] = p[i]; return r; }
static inline void vstore(float* p, vf a) { for (int i = 0; i < V; ++i) p[i] = a.v[i]; }
static inline vf vadd(vf a, vf b) { for (int i = 0; i < V; ++i) a.v[i] += b.v[i]; return a; }
static inline vf vsub(vf a, vf b) { for (int i = 0; i < V; ++i) a.v[i] -= b.v[i]; return a; }
#include "lut_body.inc"

// Xt[(c*T + t)][r] = in[c*plane + off[t][r]] where lane r of tap t is valid, else 0; rows K..Kp zero.
static void gather(const float* in, i64 plane, i64 C, i64 T, const int32_t* off, const int32_t* base,
                   const uint32_t* mask, float* Xt, i64 Kp) {
    (void)base;
    for (i64 t = 0; t < T; ++t) {
        const int32_t* o = off + t * V;
        const uint32_t m = mask[t];
        for (i64 c = 0; c < C; ++c) {
            const float* src = in + c * plane;
            float* dst = Xt + (c * T + t) * V;
            for (int r = 0; r < V; ++r) dst[r] = ((m >> r) & 1) ? src[o[r]] : 0.f;
        }
    }
    std::memset(Xt + C * T * V, 0, sizeof(float) * (Kp - C * T) * V);
}

// One column: y[j] = sum_{+1} x - sum_{-1} x = 2 * (sum over set bits of x) - sum(x), for j0 <= j < j1.
static void gemv(const float* x, i64 Kg, const uint8_t* wr, const uint32_t*, const uint32_t*, i64, i64 j0, i64 j1,
                 float* y, float*) {
    float S = 0.f;
    for (i64 k = 0; k < Kg * 8; ++k) S += x[k];
    for (i64 j = j0; j < j1; ++j) {
        const uint8_t* w = wr + j * Kg;
        float pos = 0.f;
        for (i64 g = 0; g < Kg; ++g) {
            const unsigned b = w[g];
            const float* xg = x + g * 8;
            for (int i = 0; i < 8; ++i) pos += ((b >> i) & 1) ? xg[i] : 0.f;
        }
        y[j] = (pos + pos) - S;
    }
}
}  // namespace isa_scalar

// ------------------------------------------------------------------------------------------------
// AVX2: V = 8 lanes of __m256.
#pragma GCC push_options
#pragma GCC target("avx2")
namespace isa_avx2 {
constexpr int V = 8;
typedef __m256 vf;
static inline vf vzero() { return _mm256_setzero_ps(); }
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
#include "lut_body.inc"

static inline __m256i lane_mask(uint32_t m) {
    const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)m), bits), bits);
}

static void gather(const float* in, i64 plane, i64 C, i64 T, const int32_t* off, const int32_t* base,
                   const uint32_t* mask, float* Xt, i64 Kp) {
    for (i64 t = 0; t < T; ++t) {
        const __m256i m = lane_mask(mask[t]);
        if (base[t] != INT_MIN) {  // valid lanes read consecutive floats: one masked load
            for (i64 c = 0; c < C; ++c)
                vstore(Xt + (c * T + t) * V, _mm256_maskload_ps(in + c * plane + base[t], m));
        } else {
            const __m256i idx = _mm256_loadu_si256((const __m256i*)(off + t * V));
            for (i64 c = 0; c < C; ++c)
                vstore(Xt + (c * T + t) * V,
                       _mm256_mask_i32gather_ps(vzero(), in + c * plane, idx, _mm256_castsi256_ps(m), 4));
        }
    }
    std::memset(Xt + C * T * V, 0, sizeof(float) * (Kp - C * T) * V);
}

// One column, 8 outputs per vector: the 8 signed sums of 3 inputs, T_q[n] = sum_{k<3} (bit k of n ?
// x_{3q+k} : -x_{3q+k}), fill one register, and a permutation (vpermps) looks them up for 8 outputs at
// once, indexed by each output's 3 weight bits: one permutation and one addition per 3 weights x 8
// outputs, y_j = sum_q T_q[bits 3q..3q+2 of output j].
// x: 30 * Kc floats, zero beyond K; w3: [Kc][N] uint32, w3[c][j] = bits 30c..30c+29 of output j in
// bits 0..29 (a re-grouping of the row, zero beyond K); tables: scratch of 80 * Kc floats.
static void gemv(const float* x, i64 Kg, const uint8_t*, const uint32_t*, const uint32_t* w3, i64 N, i64 j0, i64 j1,
                 float* y, float* tables) {
    const i64 Kc = (Kg * 8 + 29) / 30;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 m0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(1)),
                                                             _mm256_set1_epi32(1)));
    const __m256 m1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(2)),
                                                             _mm256_set1_epi32(2)));
    const __m256 m2 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(4)),
                                                             _mm256_set1_epi32(4)));
    for (i64 q = 0; q < 10 * Kc; ++q) {  // T_q: -(x0+x1+x2), plus 2 x_k in the lanes whose bit k is set
        const float* xq = x + 3 * q;
        vf t = _mm256_set1_ps(-(xq[0] + xq[1] + xq[2]));
        t = vadd(t, _mm256_and_ps(_mm256_set1_ps(xq[0] + xq[0]), m0));
        t = vadd(t, _mm256_and_ps(_mm256_set1_ps(xq[1] + xq[1]), m1));
        t = vadd(t, _mm256_and_ps(_mm256_set1_ps(xq[2] + xq[2]), m2));
        vstore(tables + 8 * q, t);
    }
    for (i64 j = j0; j < j1; j += 16) {  // two blocks of 8 outputs share every table load
        const i64 n0 = std::min<i64>(8, j1 - j), n1 = std::max<i64>(0, std::min<i64>(8, j1 - j - 8));
        const __m256i k0 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n0), lane);
        const __m256i k1 = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n1), lane);
        vf a0 = vzero(), b0 = vzero(), a1 = vzero(), b1 = vzero();
        const float* t = tables;
        for (i64 c = 0; c < Kc; ++c, t += 80) {
            __m256i i0 = _mm256_maskload_epi32(reinterpret_cast<const int*>(w3 + c * N + j), k0);
            __m256i i1 = n1 > 0 ? _mm256_maskload_epi32(reinterpret_cast<const int*>(w3 + c * N + j + 8), k1)
                                : _mm256_setzero_si256();
            for (int q = 0; q < 10; q += 2) {  // vpermps reads the low 3 bits of every lane
                const vf t0 = vload(t + 8 * q), t1 = vload(t + 8 * q + 8);
                a0 = vadd(a0, _mm256_permutevar8x32_ps(t0, i0));
                a1 = vadd(a1, _mm256_permutevar8x32_ps(t0, i1));
                i0 = _mm256_srli_epi32(i0, 3);
                i1 = _mm256_srli_epi32(i1, 3);
                b0 = vadd(b0, _mm256_permutevar8x32_ps(t1, i0));
                b1 = vadd(b1, _mm256_permutevar8x32_ps(t1, i1));
                i0 = _mm256_srli_epi32(i0, 3);
                i1 = _mm256_srli_epi32(i1, 3);
            }
        }
        _mm256_maskstore_ps(y + j, k0, vadd(a0, b0));
        if (n1 > 0) _mm256_maskstore_ps(y + j + 8, k1, vadd(a1, b1));
    }
}
}  // namespace isa_avx2
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------
// AVX-512: V = 16 lanes of __m512; masked loads for the tiles, masked additions for one column.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2")
namespace isa_avx512 {
constexpr int V = 16;
typedef __m512 vf;
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
#include "lut_body.inc"

static void gather(const float* in, i64 plane, i64 C, i64 T, const int32_t* off, const int32_t* base,
                   const uint32_t* mask, float* Xt, i64 Kp) {
    for (i64 t = 0; t < T; ++t) {
        const __mmask16 m = (__mmask16)mask[t];
        if (base[t] != INT_MIN) {  // masked lanes are never read, so base may point before the row
            const float* src = in + base[t];
            for (i64 c = 0; c < C; ++c) vstore(Xt + (c * T + t) * V, _mm512_maskz_loadu_ps(m, src + c * plane));
        } else {
            const __m512i idx = _mm512_loadu_si512(off + t * V);
            for (i64 c = 0; c < C; ++c)
                vstore(Xt + (c * T + t) * V, _mm512_mask_i32gather_ps(vzero(), m, idx, in + c * plane, 4));
        }
    }
    std::memset(Xt + C * T * V, 0, sizeof(float) * (Kp - C * T) * V);
}

// One column, 16 outputs per vector: the 16 signed sums of 4 inputs, T_q[n] = sum_{k<4} (bit k of n ?
// x_{4q+k} : -x_{4q+k}), fill exactly one register, so a permutation (vpermps) looks them up for 16
// outputs at once, indexed by each output's 4 weight bits: one permutation and one addition per 4
// weights x 16 outputs, y_j = sum_q T_q[bits 4q..4q+3 of output j].
// x: 32 * Kq floats, zero beyond K; wq: [Kq][N] uint32, wq[c][j] = bits 32c..32c+31 of output j (the
// row-major bits read as little-endian words, transposed); tables: scratch of 128 * Kq floats.
static inline vf perm(__m512i idx, vf table) {  // vpermps (the maskz form: GCC 12 warns on the plain one)
    return _mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, idx, table);
}

static inline __m512i shr4(__m512i v) { return _mm512_maskz_srli_epi32((__mmask16)0xFFFF, v, 4); }

static void gemv(const float* x, i64 Kg, const uint8_t*, const uint32_t* wq, const uint32_t*, i64 N, i64 j0, i64 j1,
                 float* y, float* tables) {
    const i64 Kq = (Kg + 3) / 4;
    for (i64 q = 0; q < 8 * Kq; ++q) {  // T_q: start from -(x0+x1+x2+x3), add 2 x_k where bit k is set
        const float* xq = x + 4 * q;
        vf t = _mm512_set1_ps(-(xq[0] + xq[1] + xq[2] + xq[3]));
        t = _mm512_mask_add_ps(t, 0xAAAA, t, _mm512_set1_ps(xq[0] + xq[0]));
        t = _mm512_mask_add_ps(t, 0xCCCC, t, _mm512_set1_ps(xq[1] + xq[1]));
        t = _mm512_mask_add_ps(t, 0xF0F0, t, _mm512_set1_ps(xq[2] + xq[2]));
        t = _mm512_mask_add_ps(t, 0xFF00, t, _mm512_set1_ps(xq[3] + xq[3]));
        vstore(tables + 16 * q, t);
    }
    for (i64 j = j0; j < j1; j += 32) {  // two blocks of 16 outputs share every table load
        const i64 n0 = std::min<i64>(16, j1 - j), n1 = std::max<i64>(0, std::min<i64>(16, j1 - j - 16));
        const __mmask16 m0 = (__mmask16)((1u << n0) - 1), m1 = (__mmask16)((1u << n1) - 1);
        vf a0 = vzero(), b0 = vzero(), a1 = vzero(), b1 = vzero();
        const float* t = tables;
        for (i64 c = 0; c < Kq; ++c, t += 128) {
            __m512i i0 = _mm512_maskz_loadu_epi32(m0, wq + c * N + j);
            __m512i i1 = _mm512_maskz_loadu_epi32(m1, wq + c * N + j + 16);
            for (int q = 0; q < 8; q += 2) {  // vpermps reads the low 4 bits of every lane
                const vf t0 = vload(t + 16 * q), t1 = vload(t + 16 * q + 16);
                a0 = vadd(a0, perm(i0, t0));
                a1 = vadd(a1, perm(i1, t0));
                i0 = shr4(i0);
                i1 = shr4(i1);
                b0 = vadd(b0, perm(i0, t1));
                b1 = vadd(b1, perm(i1, t1));
                i0 = shr4(i0);
                i1 = shr4(i1);
            }
        }
        _mm512_mask_storeu_ps(y + j, m0, vadd(a0, b0));
        if (n1 > 0) _mm512_mask_storeu_ps(y + j + 16, m1, vadd(a1, b1));
    }
}
}  // namespace isa_avx512
#pragma GCC pop_options

// ------------------------------------------------------------------------------------------------
namespace {

const Isa ISAS[3] = {
    {"scalar", isa_scalar::V, 4, 8.0, 1.0, isa_scalar::gather, isa_scalar::lut_tile, isa_scalar::gemv,
     isa_scalar::lut4_tile, 8, 0.7, 1.0},
    {"avx2", isa_avx2::V, 4, 0.38, 1.0, isa_avx2::gather, isa_avx2::lut_tile, isa_avx2::gemv, isa_avx2::lut4_tile,
     8, 0.82, 19.0},
    {"avx512", isa_avx512::V, 8, 0.135, 1.0, isa_avx512::gather, isa_avx512::lut_tile, isa_avx512::gemv,
     isa_avx512::lut4_tile, 8, 0.52, 12.0},
};

bool isa_supported(int i) {
    __builtin_cpu_init();
    if (i == 0) return true;
    if (i == 1) return __builtin_cpu_supports("avx2");
    if (i == 2)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    return false;
}

int best_isa() {
    for (int i = 2; i > 0; --i)
        if (isa_supported(i)) return i;
    return 0;
}

int g_isa = -1;

const Isa& isa() {
    if (g_isa < 0) g_isa = best_isa();
    return ISAS[g_isa];
}

// Per-thread scratch, 64-byte aligned, grown on demand and kept between calls.
struct Scratch {
    float* p = nullptr;
    size_t n = 0;
    ~Scratch() { std::free(p); }
    float* get(size_t m) {
        if (m > n) {
            std::free(p);
            p = static_cast<float*>(std::aligned_alloc(64, ((m * sizeof(float) + 63) / 64) * 64));
            n = p ? m : 0;
        }
        return p;
    }
};
thread_local Scratch t_xt, t_tables, t_yt, t_idx;

struct Geom {
    i64 B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, OH, OW;
};

// Source offsets of the V columns (output pixels) p0.. of a tile, for every kernel tap t = dy*kw + dx:
// off[t][r] = b*H*W + iy*W + ix inside a channel plane, mask bit r set where the pixel is inside the
// input; base[t] = off[t][r] - r when all valid lanes read consecutive floats, else INT_MIN.
void tile_offsets(const Geom& g, i64 p0, i64 nv, int V, int32_t* off, int32_t* base, uint32_t* mask) {
    const i64 T = g.kh * g.kw, OHW = g.OH * g.OW;
    i64 bb[16], oy[16], ox[16];
    for (int r = 0; r < nv; ++r) {
        const i64 p = p0 + r, q = p % OHW;
        bb[r] = p / OHW;
        oy[r] = q / g.OW;
        ox[r] = q % g.OW;
    }
    for (i64 t = 0; t < T; ++t) {
        const i64 dy = t / g.kw, dx = t % g.kw;
        uint32_t m = 0;
        bool contiguous = true;
        i64 b0 = LLONG_MIN;
        for (int r = 0; r < V; ++r) {
            int32_t o = 0;
            if (r < nv) {
                const i64 iy = oy[r] * g.sh - g.ph + dy * g.dh, ix = ox[r] * g.sw - g.pw + dx * g.dw;
                if (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) {
                    const i64 full = (bb[r] * g.H + iy) * g.W + ix;
                    o = static_cast<int32_t>(full);
                    m |= 1u << r;
                    if (b0 == LLONG_MIN) b0 = full - r;
                    else if (full - r != b0) contiguous = false;
                }
            }
            off[t * V + r] = o;
        }
        mask[t] = m;
        base[t] = m == 0 ? 0 : (contiguous ? static_cast<int32_t>(b0) : INT_MIN);
    }
}

// y = scale * acc + offset (the folded batch norm, the only scaling), then max(y, 0) if relu.
void epilogue(const float* Yt, int V, i64 j0, i64 j1, i64 nv, const float* scale, const float* offset, int relu,
              float* Y, i64 ld, i64 col0) {
    for (i64 j = j0; j < j1; ++j) {
        const float s = scale[j], o = offset[j];
        const float* a = Yt + j * V;
        float* y = Y + j * ld + col0;
        if (relu) {
            for (i64 r = 0; r < nv; ++r) y[r] = std::max(a[r] * s + o, 0.f);
        } else {
            for (i64 r = 0; r < nv; ++r) y[r] = a[r] * s + o;
        }
    }
}

int nthreads_for(int requested) { return requested < 1 ? 1 : requested; }

}  // namespace

extern "C" {

// Name of the instruction set in use; bcnn_set_isa(i) forces 0 = scalar, 1 = avx2, 2 = avx512,
// -1 = the best one this CPU has. Returns the one now in use, or -1 if the CPU lacks the one asked.
const char* bcnn_isa_name() { return isa().name; }
int bcnn_isa_supported(int i) { return isa_supported(i) ? 1 : 0; }
int bcnn_set_isa(int i) {
    if (i < 0) i = best_isa();
    if (i > 2 || !isa_supported(i)) return -1;
    g_isa = i;
    return i;
}

// Binary convolution (a linear layer is the case H = W = kh = kw = 1, B = columns):
//   X [C][B][H][W] float32, wt [Kg][N] and wr [N][Kg] packed bits with K = C*kh*kw, k = (c*kh + dy)*kw + dx,
//   Y [N][B][OH][OW] = act(scale[n] * sum_k (+-x_k) + offset[n]).
// mode: 0 = choose, 1 = 256-entry table lookup, 2 = one column at a time (linear layers only),
// 3 = two 16-entry tables per byte.
// Returns 0, or a negative code: -1 bad geometry, -2 out of memory, -3 a channel plane over 2^31 floats.
int bcnn_conv2d(const float* X, i64 B, i64 C, i64 H, i64 W, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw,
                i64 dh, i64 dw, const uint8_t* wt, const uint8_t* wr, const uint32_t* wq, const uint32_t* w3, i64 N,
                const float* scale,
                const float* offset, int relu, float* Y, int nthreads, int mode) {
    Geom g{B, C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, 0, 0};
    if (B < 1 || C < 1 || H < 1 || W < 1 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 || dh < 1 ||
        dw < 1 || N < 1)
        return -1;
    g.OH = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
    g.OW = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
    if (g.OH < 1 || g.OW < 1) return -1;
    if (B * H * W >= (i64(1) << 31)) return -3;
    const Isa& I = isa();
    const int V = I.V;
    const i64 T = kh * kw, K = C * T, Kg = (K + 7) / 8, Kp = Kg * 8;
    const i64 P = B * g.OH * g.OW;  // output columns
    const i64 plane_in = B * H * W;
    const bool is_linear = (H == 1 && W == 1 && T == 1 && ph == 0 && pw == 0);  // padding adds output columns
    const i64 tiles = (P + V - 1) / V;
    // Kernel: by `mode`, or (mode 0) the cheapest by a cost model in vector operations per group of 8 inputs.
    const double cost_gemv = is_linear ? double(P) * (I.gemv_build + N * I.gemv_cost) : 1e300;
    const double cost_lut8 = double(tiles) * (264.0 + N * I.lut_cost);
    const double cost_lut4 = double(tiles) * (40.0 + 2.0 * N * I.lut4_cost);
    int kernel = mode;
    if (mode == 2 && !is_linear) return -1;
    if (mode < 1 || mode > 3) {
        kernel = cost_gemv <= std::min(cost_lut8, cost_lut4) ? 2 : (cost_lut8 <= cost_lut4 ? 1 : 3);
    }
    const bool use_gemv = kernel == 2;
    int nt = nthreads_for(nthreads);
    int status = 0;

    if (use_gemv) {
        // One column at a time; columns split among threads, or outputs when there are few columns.
        const i64 xlen = std::max(((Kg + 3) / 4) * 32, ((Kg * 8 + 29) / 30) * 30);
        const bool split_cols = P >= nt;
        const i64 NB = ((N + 31) / 32);  // outputs split among threads in blocks of 32
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
#ifdef _OPENMP
            const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
            const int tid = 0, nth = 1;
#endif
            float* x = t_xt.get(xlen);
            float* y = t_yt.get(N);
            float* gtab = t_tables.get(std::max(((Kg + 3) / 4) * 128, ((Kg * 8 + 29) / 30) * 80));
            if (!x || !y || !gtab) {
#pragma omp atomic write
                status = -2;
            } else {
                const i64 c0 = split_cols ? P * tid / nth : 0, c1 = split_cols ? P * (tid + 1) / nth : P;
                const i64 j0 = split_cols ? 0 : std::min(N, 32 * (NB * tid / nth));
                const i64 j1 = split_cols ? N : std::min(N, 32 * (NB * (tid + 1) / nth));
                std::memset(x, 0, sizeof(float) * xlen);
                for (i64 col = c0; col < c1; ++col) {
                    for (i64 k = 0; k < K; ++k) x[k] = X[k * P + col];
                    I.gemv(x, Kg, wr, wq, w3, N, j0, j1, y, gtab);
                    for (i64 j = j0; j < j1; ++j) {
                        float v = y[j] * scale[j] + offset[j];
                        if (relu) v = std::max(v, 0.f);
                        Y[j * P + col] = v;
                    }
                }
            }
        }
        return status;
    }

    // Table lookup on tiles of V columns; tiles split among threads, or outputs when there are few tiles.
    const bool split_tiles = tiles >= nt;
    const i64 NB = (N + 7) / 8;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int tid = 0, nth = 1;
#endif
        float* Xt = t_xt.get(Kp * V);
        float* tables = t_tables.get(std::max(I.Gc * 256, I.Gc4 * 32) * V);
        float* Yt = t_yt.get(N * V);
        int32_t* idx = reinterpret_cast<int32_t*>(t_idx.get(T * V + 2 * T));
        if (!Xt || !tables || !Yt || !idx) {
#pragma omp atomic write
            status = -2;
        } else {
            int32_t* base = idx + T * V;
            uint32_t* mask = reinterpret_cast<uint32_t*>(base + T);
            const i64 t0 = split_tiles ? tiles * tid / nth : 0, t1 = split_tiles ? tiles * (tid + 1) / nth : tiles;
            const i64 j0 = split_tiles ? 0 : std::min(N, 8 * (NB * tid / nth));
            const i64 j1 = split_tiles ? N : std::min(N, 8 * (NB * (tid + 1) / nth));
            if (j0 < j1) {
                for (i64 tile = t0; tile < t1; ++tile) {
                    const i64 p0 = tile * V, nv = std::min<i64>(V, P - p0);
                    tile_offsets(g, p0, nv, V, idx, base, mask);
                    I.gather(X, plane_in, C, T, idx, base, mask, Xt, Kp);
                    if (kernel == 3) I.lut4(Xt, Kg, wt, N, j0, j1, Yt, tables, I.Gc4);
                    else I.lut(Xt, Kg, wt, N, j0, j1, Yt, tables, I.Gc);
                    epilogue(Yt, V, j0, j1, nv, scale, offset, relu, Y, P, p0);
                }
            }
        }
    }
    return status;
}

// The same, with the layer's fixed parameters in a struct built once (fewer arguments per call).
struct bcnn_layer {
    i64 C, H, W, kh, kw, sh, sw, ph, pw, dh, dw, N;
    const uint8_t* wt;
    const uint8_t* wr;
    const uint32_t* wq;
    const uint32_t* w3;
    const float* scale;
    const float* offset;
    i64 relu;
};

int bcnn_layer_forward(const bcnn_layer* L, const float* X, i64 B, float* Y, int nthreads, int mode) {
    return bcnn_conv2d(X, B, L->C, L->H, L->W, L->kh, L->kw, L->sh, L->sw, L->ph, L->pw, L->dh, L->dw, L->wt, L->wr,
                       L->wq, L->w3, L->N, L->scale, L->offset, static_cast<int>(L->relu), Y, nthreads, mode);
}


// Max pooling (floor mode; padding never wins) of X [C][B][H][W] into Y [C][B][OH][OW], fused with the
// affine map of a batch norm that follows it (y = scale[c] * max + offset[c]; scale == nullptr: none)
// and a ReLU (relu != 0). One pass over X instead of PyTorch's pooling, affine and ReLU passes over
// feature-major planes (which its pooling handles slowly). A NaN in a window gives NaN, as PyTorch's.
// Returns 0, or -1 for a bad geometry (padding over half the kernel, an empty output).
int bcnn_maxpool2d(const float* X, i64 C, i64 B, i64 H, i64 W, i64 kh, i64 kw, i64 sh, i64 sw, i64 ph, i64 pw,
                   const float* scale, const float* offset, int relu, float* Y, int nthreads) {
    if (C < 1 || B < 1 || H < 1 || W < 1 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || ph < 0 || pw < 0 ||
        2 * ph > kh || 2 * pw > kw)
        return -1;
    const i64 OH = (H + 2 * ph - kh) / sh + 1, OW = (W + 2 * pw - kw) / sw + 1;
    if (OH < 1 || OW < 1) return -1;
    const i64 planes = C * B;
    const bool two = kh == 2 && kw == 2 && sh == 2 && sw == 2 && ph == 0 && pw == 0;
    const int nt = nthreads_for(nthreads);
#pragma omp parallel for num_threads(nt) if (nt > 1) schedule(static)
    for (i64 q = 0; q < planes; ++q) {
        const i64 c = q / B;
        const float s = scale ? scale[c] : 1.f, o = scale ? offset[c] : 0.f;
        const float* x = X + q * H * W;
        float* y = Y + q * OH * OW;
        for (i64 oy = 0; oy < OH; ++oy) {
            float* yr = y + oy * OW;
            if (two) {  // the common 2x2 window, stride 2: two input rows per output row
                const float* r0 = x + (2 * oy) * W;
                const float* r1 = r0 + W;
                for (i64 ox = 0; ox < OW; ++ox) {
                    float m = r0[2 * ox];
                    for (const float v : {r0[2 * ox + 1], r1[2 * ox], r1[2 * ox + 1]})
                        if (v > m || v != v) m = (m != m) ? m : v;
                    yr[ox] = m;
                }
            } else {
                const i64 y0 = oy * sh - ph, ya = std::max<i64>(y0, 0), yb = std::min(y0 + kh, H);
                for (i64 ox = 0; ox < OW; ++ox) {
                    const i64 x0 = ox * sw - pw, xa = std::max<i64>(x0, 0), xb = std::min(x0 + kw, W);
                    float m = x[ya * W + xa];
                    for (i64 iy = ya; iy < yb; ++iy)
                        for (i64 ix = xa; ix < xb; ++ix) {
                            const float v = x[iy * W + ix];
                            if (v > m || v != v) m = (m != m) ? m : v;
                        }
                    yr[ox] = m;
                }
            }
            if (scale) for (i64 ox = 0; ox < OW; ++ox) yr[ox] = yr[ox] * s + o;
            if (relu) for (i64 ox = 0; ox < OW; ++ox) yr[ox] = std::max(yr[ox], 0.f);
        }
    }
    return 0;
}

}  // extern "C"
