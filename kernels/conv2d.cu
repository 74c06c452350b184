// lowvram — conv2d as an implicit GEMM (no im2col column buffer, no scratch memory).
//
// ============================================================================================================
// KERNELS (all `extern "C" __global__`, identical ABI):
//
//   lowvram_conv2d_f16 (const __half* x, const __half* w, const __half* bias, __half* y,
//                       int batch, int cin, int h, int wd, int cout, int k, int stride, int pad, int oh, int ow)
//   lowvram_conv2d_bf16(... same with __nv_bfloat16 ...)
//   lowvram_conv2d_f32 (... same with float ...)
//
//   x    : contiguous NCHW [batch, cin, h, wd]
//   w    : contiguous [cout, cin, k, k]
//   bias : [cout], or NULL (0) for no bias
//   y    : contiguous NCHW [batch, cout, oh, ow]   (must not alias x, w or bias)
//   y[b,co,oy,ox] = bias[co] + sum_{ci,ky,kx} w[co,ci,ky,kx] * x[b, ci, oy*stride-pad+ky, ox*stride-pad+kx]
//   (x taken as 0 outside the image). Square kernel, any k >= 1, stride >= 1, symmetric pad >= 0.
//   oh = (h + 2*pad - k) / stride + 1 and ow = (wd + 2*pad - k) / stride + 1 exactly (checked, must be >= 1).
//   Products accumulated in f32; bias added in f32; output rounded once to T.
//
//   GEMM view: M = cout, N = batch*oh*ow (output pixels), K = cin*k*k.
//     A = w as [M, K] row-major;  B[kk, n] = x gathered on the fly into shared memory (never a global buffer).
//
//   Launch (the same for all three dtypes):
//     block = (256, 1, 1)                                   (checked)
//     grid  = (ceil(N / 128), ceil(M / 128), 1)             (checked: gridDim.x*128 >= N, gridDim.y*128 >= M;
//                                                             N on x, so 1024x1024 px VAE layers are fine)
//     dynamic shared memory = 0 bytes (static smem only: f16/bf16 37,888 B, f32 16,896 B per block)
//     scratch = none.
//   Requirements: batch, cin, h, wd, cout >= 1; N = batch*oh*ow < 2^31; K = cin*k*k < 2^31; one image of x
//     cin*h*wd < 2^31 (offsets within an image are 32-bit, across the batch 64-bit; a whole tensor may exceed 2^31);
//     no alignment requirement on any pointer beyond the element size (w's rows are read 16 bytes at a time
//     when w is 16-byte aligned and K % 8 == 0 (f16/bf16) or K % 4 == 0 (f32), otherwise element by element).
//     x / y offsets across the batch and y offsets are computed in 64 bits.
//   Violated preconditions call lv_trap().
//   bf16 needs sm_80+: on sm_75 lowvram_conv2d_bf16 compiles to a trap (do not launch it there).
//
// TILING
//   f16 / bf16 (tensor cores, WMMA 16x16x16, f32 accumulators):
//     block tile 128 (M) x 128 (N) x 32 (K), 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 = 4 x 2 fragments.
//     smem: A [2 stages][128][32+8] + B [2 stages][32][128+8] halves = 2*(5120+4352)*2 B = 37,888 B.
//       Row pads (+8 halves) make the ldmatrix-style fragment loads conflict free (80 B / 272 B row strides).
//     Pipeline: double-buffered smem; the next K slice is fetched global -> registers in two halves (A row p, B
//       rows of half p), each issued before one of the slice's two k16 MMA steps and stored to the other stage
//       after it; one __syncthreads per K slice. __launch_bounds__(256, 2): 128 registers, no spills (sm_75..90),
//       2 blocks (16 warps) per SM.
//     A loads: thread -> rows (tid/4, tid/4+64), 8 consecutive k at (tid%4)*8 (one 16 B load each when aligned).
//     B gather: thread -> output pixels n0 + 2*(tid%64) + {0,1} (coordinates (b, oy, ox) precomputed once),
//       K rows tid/64 + 4j, j = 0..7; the (ci, ky, kx) decomposition of its K row is advanced incrementally
//       (adds and two compare/subtract carries, no division in the K loop). Consecutive lanes read consecutive
//       pixels (coalesced along ow for stride 1); two pixels are stored as one 32-bit smem word.
//     Fragments whose 16 rows / 16 columns lie entirely past M / N are skipped (warp-uniform), so small-M layers
//       (cout = 3, 4) do not pay 8x the tensor work.
//     Epilogue: each warp stages its accumulators 16 rows x 32 columns at a time through smem (f32, row stride 36)
//       and lane l writes column l: for a fixed (b, co) consecutive lanes write consecutive pixels -> coalesced.
//   f32 (FMA, no tensor cores):
//     block tile 128 x 128 x 8, 256 threads as 16 x 16, each thread 8 x 8 outputs (rows ty*4+{0..3}, 64+ty*4+{0..3};
//     columns tx*4+{0..3}, 64+tx*4+{0..3}); smem A^T [2][8][128+4] + B [2][8][128+4] floats = 16,896 B; same
//     register prefetch / double buffering; B gather: pixel tid%128, K rows tid/128 + 2j, j = 0..3.
//     Epilogue: direct stores, 4 consecutive pixels per thread (one 16 B store when oh*ow % 4 == 0 and y is
//     16-byte aligned), consecutive lanes -> consecutive 16 B: already coalesced along ow, no staging needed.
// ============================================================================================================

#include "common.cuh"

#ifdef LOWVRAM_EMU
#include <cstring>
#define LVCONV_LAUNCH_BOUNDS __launch_bounds__(256)
#else
#define LVCONV_LAUNCH_BOUNDS __launch_bounds__(256, 2)
#endif

namespace lvconv {

constexpr int kThreads = 256;

// 16-byte / 4-byte register packets used to move tiles global -> registers -> shared memory.
template <class T, int n>
struct alignas(sizeof(T) * n) Packet {
    T v[n];
};
struct alignas(32) Smem32 {
    unsigned int v[8];
};

// 16-byte aligned copy of a packet (a single 128-bit access on the GPU; memcpy in the emulator).
template <class P>
__device__ __forceinline__ void load_packet(P& dst, const void* src) {
#ifdef LOWVRAM_EMU
    std::memcpy(&dst, src, sizeof(P));
#else
    dst = *reinterpret_cast<const P*>(src);
#endif
}
template <class P>
__device__ __forceinline__ void store_packet(void* dst, const P& src) {
#ifdef LOWVRAM_EMU
    std::memcpy(dst, &src, sizeof(P));
#else
    *reinterpret_cast<P*>(dst) = src;
#endif
}

// Checks the launch preconditions shared by all three kernels; traps when violated.
__device__ __forceinline__ void check_launch(int batch, int cin, int h, int wd, int cout, int k, int stride, int pad,
                                             int oh, int ow) {
    bool ok = blockDim.x == kThreads && blockDim.y == 1 && blockDim.z == 1 && gridDim.z == 1;
    ok = ok && batch >= 1 && cin >= 1 && h >= 1 && wd >= 1 && cout >= 1 && k >= 1 && stride >= 1 && pad >= 0;
    if (ok) {
        const int eh = h + 2 * pad - k, ew = wd + 2 * pad - k;
        ok = eh >= 0 && ew >= 0 && oh == eh / stride + 1 && ow == ew / stride + 1;
    }
    if (ok) {
        const long long n = (long long)batch * oh * ow;
        const long long kk = (long long)cin * k * k;
        const long long chw = (long long)cin * h * wd;
        ok = n < 2147483647LL && kk < 2147483647LL && chw < 2147483647LL && (long long)gridDim.x * 128 >= n &&
             (long long)gridDim.y * 128 >= cout;
    }
    if (!ok) lv_trap();
}

// Incremental walk over the K dimension kk = (ci*k + ky)*k + kx for one thread's gather row: `advance()` moves the
// row by a fixed step S (set up once) with adds and two conditional carries; koff = ci*h*wd + ky*wd + kx.
struct KWalk {
    int left, ky, kx;  // left = K - kk: the row is inside K while left > 0
    // koff < cin*h*wd < 2^31 (checked) while the row is inside K; unsigned (modular) so that the walk past the end
    // of K and negative carries (k > wd or k > h) are well defined
    unsigned koff;
    // step constants
    unsigned s_off, carry_x, carry_y;
    int s_ky, s_kx, k;

    __device__ __forceinline__ void init(int start, int step, int k_, int cin, int h, int wd) {
        k = k_;
        const int kk2 = k * k;
        const int hw = h * wd;
        left = cin * kk2 - start;
        const int ci = start / kk2, r = start - ci * kk2;
        ky = r / k;
        kx = r - ky * k;
        koff = (unsigned)(ci * hw + ky * wd + kx);
        const int s_ci = step / kk2, s_r = step - s_ci * kk2;
        s_ky = s_r / k;
        s_kx = s_r - s_ky * k;
        s_off = (unsigned)(s_ci * hw + s_ky * wd + s_kx);
        carry_x = (unsigned)wd - (unsigned)k;            // kx wraps: kx -= k, ky += 1
        carry_y = (unsigned)hw - (unsigned)k * (unsigned)wd;  // ky wraps: ky -= k, ci += 1
    }
    __device__ __forceinline__ void advance(int step) {
        left -= step;
        kx += s_kx;
        ky += s_ky;
        koff += s_off;
        if (kx >= k) { kx -= k; ++ky; koff += carry_x; }
        if (ky >= k) { ky -= k; koff += carry_y; }
    }
};

// Output-pixel coordinates of one GEMM column n: input row/column of the window's top-left tap and the element
// offset of that tap (may be outside the image; only used after the bounds check).
struct Pixel {
    int iy0, ix0;
    long long off;
    __device__ __forceinline__ void init(int n, int N, int cin, int h, int wd, int stride, int pad, int oh, int ow) {
        if (n < N) {
            const int ohw = oh * ow;
            const int b = n / ohw, rem = n - b * ohw;
            const int oy = rem / ow, ox = rem - oy * ow;
            iy0 = oy * stride - pad;
            ix0 = ox * stride - pad;
            off = (long long)b * cin * h * wd + (long long)iy0 * wd + ix0;
        } else {
            iy0 = -0x40000000;  // every tap fails the bounds check
            ix0 = 0;
            off = 0;
        }
    }
};

template <class T>
__device__ __forceinline__ T gather(const T* __restrict__ x, const Pixel& p, const KWalk& kw, int h, int wd, T zero) {
    const int iy = p.iy0 + kw.ky, ix = p.ix0 + kw.kx;
    const bool ok = kw.left > 0 && (unsigned)iy < (unsigned)h && (unsigned)ix < (unsigned)wd;
    return ok ? x[p.off + kw.koff] : zero;
}

// ------------------------------------------------------------------------------------------------------------
// f16 / bf16: WMMA implicit GEMM
// ------------------------------------------------------------------------------------------------------------
namespace mma {
constexpr int BM = 128, BN = 128, BK = 32;
constexpr int LDA = BK + 8;            // halves per A row in smem
constexpr int LDB = BN + 8;            // halves per B row in smem
constexpr int A_STAGE = BM * LDA;      // 5120 elements
constexpr int B_STAGE = BK * LDB;      // 4352 elements
constexpr int SMEM_BYTES = 2 * (A_STAGE + B_STAGE) * 2;  // 37,888 B
constexpr int LDS = 36;                // floats per staged epilogue row
static_assert(8 * 16 * LDS * 4 <= SMEM_BYTES, "epilogue staging must fit in the pipeline smem");
static_assert(SMEM_BYTES % 32 == 0, "");
}  // namespace mma

// One k16 step of the warp's 64 x 32 tile: acc[i][j] += A[i] * B[j] (a_s: the warp's A rows at this k, b_s: this
// k's B row at the warp's columns). FULL: all 4 x 2 fragments hold at least one valid row / column; otherwise
// fragments at i >= mi_cnt or j >= nj_cnt (entirely past M / N) are skipped.
template <bool FULL, class T>
__device__ __forceinline__ void mma_step(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[4][2], const T* a_s, const T* b_s,
    int mi_cnt, int nj_cnt) {
    using namespace nvcuda;
    using namespace mma;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[2];
#pragma unroll
    for (int j = 0; j < 2; ++j)
        if (FULL || j < nj_cnt) wmma::load_matrix_sync(bf[j], b_s + j * 16, LDB);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (FULL || i < mi_cnt) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> af;
            wmma::load_matrix_sync(af, a_s + i * 16 * LDA, LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j)
                if (FULL || j < nj_cnt) wmma::mma_sync(acc[i][j], af, bf[j], acc[i][j]);
        }
    }
}

template <class T>
__device__ __forceinline__ void conv_wmma(const T* __restrict__ x, const T* __restrict__ w,
                                          const T* __restrict__ bias, T* __restrict__ y, int batch, int cin, int h,
                                          int wd, int cout, int k, int stride, int pad, int oh, int ow) {
    using namespace nvcuda;
    using namespace mma;
    __shared__ Smem32 smem_raw[SMEM_BYTES / 32];

    check_launch(batch, cin, h, wd, cout, k, stride, pad, oh, ow);

    T* const As = reinterpret_cast<T*>(smem_raw);  // [2][BM][LDA]
    T* const Bs = As + 2 * A_STAGE;                // [2][BK][LDB]

    const int tid = threadIdx.x;
    const int warp = tid >> 5, lane = tid & 31;
    const int M = cout, K = cin * k * k, N = batch * oh * ow;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
    const T zero = lv_from_float<T>(0.0f);

    // ---- A (weights) loader: rows a_row, a_row + 64; k columns a_kc .. a_kc+7 of the slice.
    const int a_row = tid >> 2, a_kc = (tid & 3) * 8;
    const bool a_vec = (K % 8 == 0) && ((reinterpret_cast<unsigned long long>(w) & 15ULL) == 0);
    using PA = Packet<T, 8>;
    PA ra;  // one half (p = 0: row a_row, p = 1: row a_row + 64) of the thread's A share of a slice
    auto load_a = [&](int p, int k0) {
        const int co = m0 + a_row + 64 * p;
        const int kg = k0 + a_kc;
        const T* src = w + (long long)co * K + kg;
        if (a_vec) {
            if (co < M && kg < K) {
                load_packet(ra, src);
            } else {
#pragma unroll
                for (int e = 0; e < 8; ++e) ra.v[e] = zero;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) ra.v[e] = (co < M && kg + e < K) ? src[e] : zero;
        }
    };
    auto store_a = [&](int p, int stage) {
        store_packet(As + stage * A_STAGE + (a_row + 64 * p) * LDA + a_kc, ra);
    };

    // ---- B (input) gather: pixels n0 + b_col + {0,1}, K rows b_row0 + 4j (j = 0..7) of the slice, fetched in two
    // halves (p = 0: j = 0..3, p = 1: j = 4..7).
    const int b_col = (tid & 63) * 2, b_row0 = tid >> 6;
    Pixel px[2];
    px[0].init(n0 + b_col, N, cin, h, wd, stride, pad, oh, ow);
    px[1].init(n0 + b_col + 1, N, cin, h, wd, stride, pad, oh, ow);
    KWalk kw;
    kw.init(b_row0, 4, k, cin, h, wd);
    using PB = Packet<T, 2>;
    PB rb[4];
    auto load_b = [&]() {  // the walk continues from half to half and slice to slice: 4 steps of 4 = BK / 2
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            rb[j].v[0] = gather(x, px[0], kw, h, wd, zero);
            rb[j].v[1] = gather(x, px[1], kw, h, wd, zero);
            kw.advance(4);
        }
    };
    auto store_b = [&](int p, int stage) {
        T* dst = Bs + stage * B_STAGE + (b_row0 + 16 * p) * LDB + b_col;
#pragma unroll
        for (int j = 0; j < 4; ++j) *reinterpret_cast<PB*>(dst + 4 * j * LDB) = rb[j];
    };

    // ---- warp tile: rows wm*64 .. +64, columns wn*32 .. +32 of the block tile.
    const int wm = warp >> 2, wn = warp & 3;
    const int mi_cnt = min(4, max(0, (M - m0 - wm * 64 + 15) / 16));  // fragments with at least one row < M
    const int nj_cnt = min(2, max(0, (N - n0 - wn * 32 + 15) / 16));
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    const int nk = (K + BK - 1) / BK;
    const bool full = mi_cnt == 4 && nj_cnt == 2;  // interior warp tile: straight-line MMAs
    const bool any = mi_cnt > 0 && nj_cnt > 0;
#pragma unroll
    for (int p = 0; p < 2; ++p) {
        load_a(p, 0);
        load_b();
        store_a(p, 0);
        store_b(p, 0);
    }
    __syncthreads();

    // Per slice: the next slice's global loads are issued in two halves, each overlapped with one k16 MMA step,
    // and stored to the other stage after it (halves keep the prefetch registers low: 8 instead of 16).
    for (int t = 0; t < nk; ++t) {
        const int cur = t & 1;
        const bool more = t + 1 < nk;
        const T* a_s = As + cur * A_STAGE + (wm * 64) * LDA;
        const T* b_s = Bs + cur * B_STAGE + wn * 32;
#pragma unroll
        for (int p = 0; p < 2; ++p) {
            if (more) {
                load_a(p, (t + 1) * BK);
                load_b();
            }
            if (full)
                mma_step<true>(acc, a_s + p * 16, b_s + p * 16 * LDB, 4, 2);
            else if (any)
                mma_step<false>(acc, a_s + p * 16, b_s + p * 16 * LDB, mi_cnt, nj_cnt);  // M / N tail
            if (more) {
                store_a(p, cur ^ 1);
                store_b(p, cur ^ 1);
            }
        }
        __syncthreads();
    }

    // ---- epilogue: stage 16 x 32 per warp through smem, lane l writes pixel column l (coalesced along ow).
    float* const st = reinterpret_cast<float*>(smem_raw) + warp * 16 * LDS;
    const int n = n0 + wn * 32 + lane;
    const bool n_ok = n < N;
    long long ybase = 0;
    const int ohw = oh * ow;
    if (n_ok) {
        const int b = n / ohw;
        ybase = (long long)b * cout * ohw + (n - b * ohw);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (i < mi_cnt) {
            wmma::store_matrix_sync(st, acc[i][0], LDS, wmma::mem_row_major);
            wmma::store_matrix_sync(st + 16, acc[i][1], LDS, wmma::mem_row_major);
            __syncwarp();
            const int cob = m0 + wm * 64 + i * 16;
            for (int r = 0; r < 16; ++r) {
                const int co = cob + r;
                if (co < M && n_ok) {
                    float v = st[r * LDS + lane];
                    if (bias) v += lv_to_float(bias[co]);
                    y[ybase + (long long)co * ohw] = lv_from_float<T>(v);
                }
            }
            __syncwarp();
        }
    }
}

// ------------------------------------------------------------------------------------------------------------
// f32: FMA implicit GEMM
// ------------------------------------------------------------------------------------------------------------
namespace fma32 {
constexpr int BM = 128, BN = 128, BK = 8;
constexpr int LDA = BM + 4;  // A^T [BK][LDA]
constexpr int LDB = BN + 4;  // B   [BK][LDB]
constexpr int A_STAGE = BK * LDA, B_STAGE = BK * LDB;
constexpr int SMEM_BYTES = 2 * (A_STAGE + B_STAGE) * 4;  // 16,896 B
static_assert(SMEM_BYTES % 32 == 0, "");
}  // namespace fma32

__device__ __forceinline__ void conv_f32(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ bias, float* __restrict__ y, int batch, int cin,
                                         int h, int wd, int cout, int k, int stride, int pad, int oh, int ow) {
    using namespace fma32;
    __shared__ Smem32 smem_raw[SMEM_BYTES / 32];

    check_launch(batch, cin, h, wd, cout, k, stride, pad, oh, ow);

    float* const As = reinterpret_cast<float*>(smem_raw);  // [2][BK][LDA] (transposed: k-major)
    float* const Bs = As + 2 * A_STAGE;                    // [2][BK][LDB]
    using F4 = Packet<float, 4>;

    const int tid = threadIdx.x;
    const int M = cout, K = cin * k * k, N = batch * oh * ow;
    const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;

    // A loader: row a_row, k columns a_kc .. a_kc+3.
    const int a_row = tid >> 1, a_kc = (tid & 1) * 4;
    const bool a_vec = (K % 4 == 0) && ((reinterpret_cast<unsigned long long>(w) & 15ULL) == 0);
    F4 ra;
    auto load_a = [&](int k0) {
        const int co = m0 + a_row, kg = k0 + a_kc;
        const float* src = w + (long long)co * K + kg;
        if (a_vec) {
            if (co < M && kg < K) {
                load_packet(ra, src);
            } else {
#pragma unroll
                for (int e = 0; e < 4; ++e) ra.v[e] = 0.0f;
            }
        } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) ra.v[e] = (co < M && kg + e < K) ? src[e] : 0.0f;
        }
    };
    auto store_a = [&](int stage) {
        float* dst = As + stage * A_STAGE + a_kc * LDA + a_row;
#pragma unroll
        for (int e = 0; e < 4; ++e) dst[e * LDA] = ra.v[e];
    };

    // B gather: pixel n0 + b_col, K rows b_row0 + 2j (j = 0..3).
    const int b_col = tid & 127, b_row0 = tid >> 7;
    Pixel px;
    px.init(n0 + b_col, N, cin, h, wd, stride, pad, oh, ow);
    KWalk kw;
    kw.init(b_row0, 2, k, cin, h, wd);
    float rb[4];
    auto load_b = [&]() {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            rb[j] = gather(x, px, kw, h, wd, 0.0f);
            kw.advance(2);
        }
    };
    auto store_b = [&](int stage) {
        float* dst = Bs + stage * B_STAGE + b_row0 * LDB + b_col;
#pragma unroll
        for (int j = 0; j < 4; ++j) dst[2 * j * LDB] = rb[j];
    };

    const int tx = tid & 15, ty = tid >> 4;
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

    const int nk = (K + BK - 1) / BK;
    load_a(0);
    load_b();
    store_a(0);
    store_b(0);
    __syncthreads();

    for (int t = 0; t < nk; ++t) {
        const int cur = t & 1;
        const bool more = t + 1 < nk;
        if (more) {
            load_a((t + 1) * BK);
            load_b();
        }
        const float* a_s = As + cur * A_STAGE + ty * 4;
        const float* b_s = Bs + cur * B_STAGE + tx * 4;
#pragma unroll
        for (int kq = 0; kq < BK; ++kq) {
            const F4 a0 = *reinterpret_cast<const F4*>(a_s + kq * LDA);
            const F4 a1 = *reinterpret_cast<const F4*>(a_s + kq * LDA + 64);
            const F4 b0 = *reinterpret_cast<const F4*>(b_s + kq * LDB);
            const F4 b1 = *reinterpret_cast<const F4*>(b_s + kq * LDB + 64);
            float av[8], bv[8];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                av[e] = a0.v[e];
                av[4 + e] = a1.v[e];
                bv[e] = b0.v[e];
                bv[4 + e] = b1.v[e];
            }
#pragma unroll
            for (int i = 0; i < 8; ++i)
#pragma unroll
                for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        if (more) {
            store_a(cur ^ 1);
            store_b(cur ^ 1);
        }
        __syncthreads();
    }

    // Epilogue: thread owns 4 consecutive pixels in each of two column groups; consecutive lanes write
    // consecutive 16 B (coalesced along ow without staging).
    const int ohw = oh * ow;
    const bool y_vec = (ohw % 4 == 0) && ((reinterpret_cast<unsigned long long>(y) & 15ULL) == 0);
#pragma unroll
    for (int g = 0; g < 2; ++g) {
        const int nb = n0 + g * 64 + tx * 4;  // multiple of 4
        if (nb >= N) continue;
        if (y_vec) {  // ohw % 4 == 0 and N % 4 == 0: the 4 pixels are in range, in one image, 16 B aligned
            const int b = nb / ohw;
            const long long base = (long long)b * cout * ohw + (nb - b * ohw);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int co = m0 + (i >> 2) * 64 + ty * 4 + (i & 3);
                if (co < M) {
                    const float bv = bias ? bias[co] : 0.0f;
                    F4 o;
#pragma unroll
                    for (int e = 0; e < 4; ++e) o.v[e] = acc[i][g * 4 + e] + bv;
                    store_packet(y + base + (long long)co * ohw, o);
                }
            }
        } else {
            long long base[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = nb + e;
                const int b = n / ohw;
                base[e] = n < N ? (long long)b * cout * ohw + (n - b * ohw) : -1;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int co = m0 + (i >> 2) * 64 + ty * 4 + (i & 3);
                if (co < M) {
                    const float bv = bias ? bias[co] : 0.0f;
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (base[e] >= 0) y[base[e] + (long long)co * ohw] = acc[i][g * 4 + e] + bv;
                }
            }
        }
    }
}

}  // namespace lvconv

extern "C" __global__ void LVCONV_LAUNCH_BOUNDS lowvram_conv2d_f16(const __half* __restrict__ x,
                                                                   const __half* __restrict__ w,
                                                                   const __half* __restrict__ bias,
                                                                   __half* __restrict__ y, int batch, int cin, int h,
                                                                   int wd, int cout, int k, int stride, int pad,
                                                                   int oh, int ow) {
    lvconv::conv_wmma<__half>(x, w, bias, y, batch, cin, h, wd, cout, k, stride, pad, oh, ow);
}

extern "C" __global__ void LVCONV_LAUNCH_BOUNDS lowvram_conv2d_bf16(const __nv_bfloat16* __restrict__ x,
                                                                    const __nv_bfloat16* __restrict__ w,
                                                                    const __nv_bfloat16* __restrict__ bias,
                                                                    __nv_bfloat16* __restrict__ y, int batch,
                                                                    int cin, int h, int wd, int cout, int k,
                                                                    int stride, int pad, int oh, int ow) {
#if LV_ARCH_BF16_MMA
    lvconv::conv_wmma<__nv_bfloat16>(x, w, bias, y, batch, cin, h, wd, cout, k, stride, pad, oh, ow);
#else
    lv_trap();  // bf16 WMMA needs sm_80+
#endif
}

extern "C" __global__ void LVCONV_LAUNCH_BOUNDS lowvram_conv2d_f32(const float* __restrict__ x,
                                                                   const float* __restrict__ w,
                                                                   const float* __restrict__ bias,
                                                                   float* __restrict__ y, int batch, int cin, int h,
                                                                   int wd, int cout, int k, int stride, int pad,
                                                                   int oh, int ow) {
    lvconv::conv_f32(x, w, bias, y, batch, cin, h, wd, cout, k, stride, pad, oh, ow);
}
