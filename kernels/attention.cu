// lowvram CUDA kernels: flash attention (online softmax; the Nq x Nk score matrix is never materialised).
//
//   out = softmax(q kᵀ · scale) v, independently per (batch b, head h).
//
// Kernels (18): lowvram_flash_attn_<dtype>_d<D>, dtype ∈ {f32, f16, bf16}, D ∈ {40, 64, 80, 128, 160, 512}.
//   (const T* q, const T* k, const T* v, T* out, int nq, int nk, int heads,
//    long long q_sb, long long q_sn, long long k_sb, long long k_sn, long long v_sb, long long v_sn,
//    float scale, int smem_bytes)
//   T = float / __half / __nv_bfloat16 for f32 / f16 / bf16.
//
// Layout (strides in ELEMENTS, pointers already include the tensors' start offsets):
//   q element (b, n, h, d) at q[b*q_sb + n*q_sn + h*D + d]   (n < nq; the D features of a head are contiguous)
//   k element (b, n, h, d) at k[b*k_sb + n*k_sn + h*D + d]   (n < nk), v likewise with v_sb, v_sn.
//   out is contiguous [B, nq, heads*D]: element (b, n, h, d) at out[(b*nq + n)*heads*D + h*D + d].
//   Strides may be anything (e.g. q/k/v slices of one fused qkv buffer: q_sn = 3*heads*D). 16-byte vector loads are
//   used for a tensor when its (batch, head) base pointer and its row stride are 16-byte aligned, scalar loads
//   otherwise (decided at run time; no alignment requirement).
//
// Launch: grid (ceil(nq / BQ), heads, B), block (128, 1, 1), dynamic shared memory = smem_bytes (the value below;
//   the kernel traps if blockDim != (128,1,1) or smem_bytes is smaller than the formula). Shapes: nq ≥ 1, nk ≥ 0
//   (nk = 0 writes zeros), heads ≥ 1, B ≤ 65535, heads ≤ 65535. No scratch buffer.
//
// f16 / bf16 (tensor cores: WMMA 16x16x16, f32 accumulation; bf16 needs sm_80+, on sm_75 the bf16 kernels trap):
//   Dp = D rounded up to a multiple of 16 (40 -> 48; other D unchanged), SK = Dp + 8 (bf16/f16 row stride).
//   D ∈ {40, 64, 80, 128, 160}: BQ = 64 query rows per block (4 warps x 16 rows), BK = 64 keys per step
//     (BK = 48 for D = 160), SS = BK + 4, SP = BK + 8:
//       smem_bytes = 4*BK*SK + 4*64*SS + 2*64*SP + 4*64 + 32
//       = D40: 41248   D64: 45344   D80: 49440   D128: 61728   D160: 53024
//   D = 512 (VAE single-head): BQ = 16, BK = 32 (each warp owns 128 of the 512 output features):
//       smem_bytes = 2*16*520 + 2*32*520 + 4*2*16*36 + 2*16*40 + 4*16 + 32 = 55904
// f32 (plain FMA, no tensor cores), S1 = D + 1:
//   D ∈ {40, 64, 80, 128, 160}: BQ = 32, BK = 32:  smem_bytes = 4*32*S1 + 4*32*S1 + 4*32*36 + 4*32 + 32
//       = D40: 15264   D64: 21408   D80: 25504   D128: 37792   D160: 45984
//   D = 512: BQ = 16, BK = 8:                      smem_bytes = 4*16*513 + 4*8*513 + 4*16*12 + 4*16 + 32 = 50112
// (The trailing + 32 in every formula is alignment slack: the kernel rounds the buffer start up to 32 bytes for
// WMMA.) Every kernel needs ≤ 64 KiB of dynamic shared memory, so all 18 run on sm_75 (bf16 ones trap there: no bf16
// MMA before sm_80); the Rust side still sets the >48 KiB opt-in attribute where smem_bytes > 49152.
//
// Numerics: S = q kᵀ accumulated in f32 (from the T inputs), scale applied in f32, running row max and sum in f32,
// P = exp(S·scale − max) rounded to T for the P·V product (the row sum adds the rounded P values), O accumulated in
// f32 and divided by the row sum once at the end, written once as T. The running max is updated lazily: O and the
// sum are rescaled only when a row's block maximum exceeds the max in use by more than 8 (log2 units), so P ≤ 256
// (exact same result up to rounding; the rescale is rare, and done on data in shared memory, never by assuming a
// WMMA fragment element layout). f32 kernels: everything f32. Keys ≥ nk are masked to −inf; padded query rows,
// padded keys and the padded features Dp − D are zero-filled in shared memory and never written.
// Registers (ptxas, CUDA 13.0; no spills on sm_80 / sm_86 / sm_89 / sm_90; sm_75: f16 d512 spills 24 bytes):
// f16/bf16 126–168 (D ≤ 128, D = 512), 199–215 (D = 160); f32 80–167. No static shared memory.
// __launch_bounds__(128, 3) for the WMMA kernels (2 for D = 160); (128, 4) for f32 D ≤ 128, (128, 3) above.
#include "common.cuh"

namespace lv_attn {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLazy = 8.0f; // rescale only when the row max grows by more than this (log2 units)

struct alignas(16) Vec16 {
    unsigned int a, b, c, d;
};

template <class T> struct alignas(16) VecOf {
    T x[16 / sizeof(T)];
};

__host__ __device__ constexpr int pad16(int d) { return (d + 15) / 16 * 16; }

// ---- shared-memory sizes (bytes); must match the header comment ----
// WMMA, D <= 160
__host__ __device__ constexpr int bk_mma(int d) { return d == 160 ? 48 : 64; }
__host__ __device__ constexpr int smem_mma(int d) {
    return 4 * bk_mma(d) * (pad16(d) + 8) + 4 * 64 * (bk_mma(d) + 4) + 2 * 64 * (bk_mma(d) + 8) + 4 * 64 + 32;
}
// WMMA, D = 512
__host__ __device__ constexpr int smem_mma512() {
    return 2 * 16 * 520 + 2 * 32 * 520 + 4 * 2 * 16 * 36 + 2 * 16 * 40 + 4 * 16 + 32;
}
// f32
__host__ __device__ constexpr int bq_f32(int d) { return d == 512 ? 16 : 32; }
__host__ __device__ constexpr int bk_f32(int d) { return d == 512 ? 8 : 32; }
__host__ __device__ constexpr int smem_f32(int d) {
    return 4 * bq_f32(d) * (d + 1) + 4 * bk_f32(d) * (d + 1) + 4 * bq_f32(d) * (bk_f32(d) + 4) + 4 * bq_f32(d) + 32;
}
static_assert(smem_mma(40) == 41248 && smem_mma(64) == 45344 && smem_mma(80) == 49440 && smem_mma(128) == 61728 &&
                  smem_mma(160) == 53024 && smem_mma512() == 55904,
              "header table");
static_assert(smem_f32(40) == 15264 && smem_f32(64) == 21408 && smem_f32(80) == 25504 && smem_f32(128) == 37792 &&
                  smem_f32(160) == 45984 && smem_f32(512) == 50112,
              "header table");

__device__ __forceinline__ unsigned char* align32(unsigned char* p) {
    return reinterpret_cast<unsigned char*>((reinterpret_cast<unsigned long long>(p) + 31ull) & ~31ull);
}

template <class T> __device__ __forceinline__ bool vec_ok(const T* base, long long row_stride) {
    const unsigned long long bytes = static_cast<unsigned long long>(row_stride * (long long)sizeof(T));
    return ((reinterpret_cast<unsigned long long>(base) | bytes) & 15ull) == 0;
}

// Copies rows [row0, row0 + ROWS) x features [0, D) of a (batch, head) slice into dst[ROWS][LD] (T elements),
// zero-filling rows >= n and features [D, DP). Chunks of 16 bytes; consecutive threads take consecutive chunks of a
// row (coalesced).
template <class T, int D, int DP, int LD, int ROWS>
__device__ __forceinline__ void load_tile(T* __restrict__ dst, const T* __restrict__ src, long long sn, int row0,
                                          int n, bool vec, int tid) {
    constexpr int W = 16 / (int)sizeof(T);
    static_assert(D % W == 0 && DP % W == 0, "D must be a multiple of the 16-byte chunk");
    constexpr int CPR = DP / W;
    constexpr bool kVecStore = (LD * (int)sizeof(T)) % 16 == 0;
    const int valid = min(ROWS, n - row0);
    for (int i = tid; i < ROWS * CPR; i += kThreads) {
        const int r = i / CPR;
        const int c = (i - r * CPR) * W;
        T* d = dst + r * LD + c;
        if (r < valid && c < D) {
            const T* s = src + (long long)(row0 + r) * sn + c;
            if (vec) {
                if constexpr (kVecStore) {
                    *reinterpret_cast<Vec16*>(d) = *reinterpret_cast<const Vec16*>(s);
                } else {
                    const VecOf<T> e = *reinterpret_cast<const VecOf<T>*>(s);
                    LV_UNROLL
                    for (int k = 0; k < W; ++k) d[k] = e.x[k];
                }
            } else {
                LV_UNROLL
                for (int k = 0; k < W; ++k) d[k] = s[k];
            }
        } else {
            if constexpr (kVecStore) {
                *reinterpret_cast<Vec16*>(d) = Vec16{0u, 0u, 0u, 0u};
            } else {
                LV_UNROLL
                for (int k = 0; k < W; ++k) d[k] = lv_from_float<T>(0.0f);
            }
        }
    }
}

// Online-softmax step for the 16 rows of one warp over a BK-key block of scores.
// S (f32, row stride ss; plus S2 if non-null: a second partial sum) holds raw q·k scores; keys c >= kvalid are
// masked. Writes P (row stride sp, T) — P may alias S for T = float (every lane rewrites exactly what it read) —,
// the per-row correction factor corr[r] for O, and updates m (max in use, log2 units) / l (sum) of row lane/2 (both
// lanes of a row hold the same values). Returns true (warp-uniform) when some row's O must be rescaled.
template <class T, int BK>
__device__ __forceinline__ bool softmax_block(const float* S, const float* S2, int ss, T* P, int sp, float* corr,
                                              float& m, float& l, int kvalid, float sl2, int lane) {
    constexpr int H = BK / 2;
    const int r = lane >> 1, hh = lane & 1, skew = r >> 3; // skew: rows r and r+8 hit different banks
    // Two passes over the scores in smem (max, then exponentials): re-reading is cheaper than holding H registers.
    float tmax = -INFINITY;
    LV_UNROLL
    for (int j = 0; j < H; ++j) {
        int jj = j + skew;
        if (jj >= H) jj -= H;
        const int c = 2 * jj + hh;
        float s = S[r * ss + c];
        if (S2) s += S2[r * ss + c];
        if (c < kvalid) tmax = fmaxf(tmax, s * sl2);
    }
    tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
    float m_new = m, cr = 1.0f;
    if (tmax > m + kLazy) { // m = -inf (nothing seen yet): O = 0 and l = 0, so the factor is irrelevant: keep 1
        if (m != -INFINITY) cr = exp2f(m - tmax);
        m_new = tmax;
    }
    const float mu = m_new == -INFINITY ? 0.0f : m_new; // all keys masked so far: every p = 0, never NaN
    float sum = 0.0f;
    LV_UNROLL
    for (int j = 0; j < H; ++j) {
        int jj = j + skew;
        if (jj >= H) jj -= H;
        const int c = 2 * jj + hh;
        float s = S[r * ss + c];
        if (S2) s += S2[r * ss + c];
        const T p = lv_from_float<T>(c < kvalid ? exp2f(s * sl2 - mu) : 0.0f);
        P[r * sp + c] = p; // for P == S (f32): this lane rewrites the element it has just read
        sum += lv_to_float(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * cr + sum;
    m = m_new;
    if (hh == 0) corr[r] = cr;
    float need = cr != 1.0f ? 1.0f : 0.0f;
    LV_UNROLL
    for (int o = 1; o < 32; o <<= 1) need = fmaxf(need, __shfl_xor_sync(0xffffffffu, need, o));
    return need != 0.0f;
}

using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Multiplies row r of the 16x16 tile held by `o` by corr[r], through a 16x16 f32 scratch (row stride ld).
__device__ __forceinline__ void rescale_frag(FragC& o, float* scratch, int ld, const float* corr, int lane) {
    wmma::store_matrix_sync(scratch, o, ld, wmma::mem_row_major);
    __syncwarp();
    LV_UNROLL
    for (int i = 0; i < 8; ++i) {
        const int e = lane + 32 * i, r = e >> 4, c = e & 15;
        scratch[r * ld + c] *= corr[r];
    }
    __syncwarp();
    wmma::load_matrix_sync(o, scratch, ld, wmma::mem_row_major);
    __syncwarp();
}

// ------------------------------------------------------------------------------------------------------------------
// WMMA kernel, D <= 160: 4 warps, warp w owns query rows [16w, 16w+16) of the block; Q fragments and the O
// accumulators live in registers. Per key block: K, V -> smem; S = Q Kᵀ (WMMA) -> smem f32; softmax (2 lanes per
// row) -> P (T) in smem + per-row factors; rare O rescale through smem; O += P V (WMMA).
template <class T, int D>
__device__ __forceinline__ void attn_mma(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                         T* __restrict__ out, int nq, int nk, int heads, long long q_sb,
                                         long long q_sn, long long k_sb, long long k_sn, long long v_sb,
                                         long long v_sn, float scale, int smem_bytes) {
    constexpr int BQ = 64, BK = bk_mma(D), DP = pad16(D), SK = DP + 8, SS = BK + 4, SP = BK + 8;
    constexpr int NB = BK / 16, ND = DP / 16;
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
    using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
    using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
    static_assert(BQ <= 2 * BK, "Q is staged in the K+V buffers");

    if (blockDim.x != kThreads || blockDim.y != 1 || blockDim.z != 1 || smem_bytes < smem_mma(D)) lv_trap();
    LV_DYNAMIC_SMEM(smem_raw);
    unsigned char* base = align32(smem_raw);
    T* Ks = reinterpret_cast<T*>(base);
    T* Vs = Ks + BK * SK;
    float* Ss = reinterpret_cast<float*>(Vs + BK * SK);
    T* Ps = reinterpret_cast<T*>(Ss + BQ * SS);
    float* Cs = reinterpret_cast<float*>(Ps + BQ * SP);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const T* qb = q + (long long)b * q_sb + (long long)h * D;
    const T* kb = k + (long long)b * k_sb + (long long)h * D;
    const T* vb = v + (long long)b * v_sb + (long long)h * D;
    const bool qvec = vec_ok(qb, q_sn), kvec = vec_ok(kb, k_sn), vvec = vec_ok(vb, v_sn);
    const bool active = q0 + 16 * warp < nq; // warp-uniform: rows of this warp exist
    const float sl2 = scale * kLog2e;

    // Q (staged in Ks/Vs) -> fragments.
    FragA qf[ND];
    load_tile<T, D, DP, SK, BQ>(Ks, qb, q_sn, q0, nq, qvec, tid);
    __syncthreads();
    LV_UNROLL
    for (int kk = 0; kk < ND; ++kk) wmma::load_matrix_sync(qf[kk], Ks + 16 * warp * SK + 16 * kk, SK);

    FragC o[ND];
    LV_UNROLL
    for (int j = 0; j < ND; ++j) wmma::fill_fragment(o[j], 0.0f);
    float m = -INFINITY, l = 0.0f;
    float* Sw = Ss + 16 * warp * SS;
    T* Pw = Ps + 16 * warp * SP;
    float* Cw = Cs + 16 * warp;

    for (int kv0 = 0; kv0 < nk; kv0 += BK) {
        __syncthreads(); // previous block's K/V (or Q staging) reads are done
        load_tile<T, D, DP, SK, BK>(Ks, kb, k_sn, kv0, nk, kvec, tid);
        load_tile<T, D, DP, SK, BK>(Vs, vb, v_sn, kv0, nk, vvec, tid);
        __syncthreads();
        if (!active) continue;
        const int kvalid = nk - kv0;
        LV_UNROLL
        for (int nb = 0; nb < NB; ++nb) {
            if (16 * nb >= kvalid) break; // all masked: softmax never reads these columns' values
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
            LV_UNROLL
            for (int kk = 0; kk < ND; ++kk) {
                FragBc kf;
                wmma::load_matrix_sync(kf, Ks + 16 * nb * SK + 16 * kk, SK);
                wmma::mma_sync(acc, qf[kk], kf, acc);
            }
            wmma::store_matrix_sync(Sw + 16 * nb, acc, SS, wmma::mem_row_major);
        }
        __syncwarp();
        const bool need = softmax_block<T, BK>(Sw, nullptr, SS, Pw, SP, Cw, m, l, kvalid, sl2, lane);
        __syncwarp();
        if (need) {
            LV_UNROLL
            for (int j = 0; j < ND; ++j) rescale_frag(o[j], Sw, SS, Cw, lane);
        }
        LV_UNROLL
        for (int nb = 0; nb < NB; ++nb) {
            if (16 * nb >= kvalid) break; // P = 0 and V = 0 there
            FragA pf;
            wmma::load_matrix_sync(pf, Pw + 16 * nb, SP);
            LV_UNROLL
            for (int j = 0; j < ND; ++j) {
                FragBr vf;
                wmma::load_matrix_sync(vf, Vs + 16 * nb * SK + 16 * j, SK);
                wmma::mma_sync(o[j], pf, vf, o[j]);
            }
        }
    }

    // Epilogue: O / l -> T, through the warp's S scratch in chunks of NB fragments.
    if (!active) return;
    __syncwarp();
    if ((lane & 1) == 0) Cw[lane >> 1] = l > 0.0f ? 1.0f / l : 0.0f;
    __syncwarp();
    const long long ostride = (long long)heads * D;
    T* ob = out + ((long long)b * nq + q0 + 16 * warp) * ostride + (long long)h * D;
    const int rows = min(16, nq - q0 - 16 * warp);
    constexpr int NCH = (ND + NB - 1) / NB;
    LV_UNROLL
    for (int ch = 0; ch < NCH; ++ch) {
        LV_UNROLL
        for (int jj = 0; jj < NB; ++jj)
            if (ch * NB + jj < ND) wmma::store_matrix_sync(Sw + 16 * jj, o[ch * NB + jj], SS, wmma::mem_row_major);
        __syncwarp();
        const int c0 = ch * BK;
        for (int r = 0; r < rows; ++r) {
            const float il = Cw[r];
            for (int c = lane; c < BK && c0 + c < D; c += 32)
                ob[r * ostride + c0 + c] = lv_from_float<T>(Sw[r * SS + c] * il);
        }
        __syncwarp();
    }
}

// ------------------------------------------------------------------------------------------------------------------
// WMMA kernel, D = 512 (VAE): 16 query rows per block; K then V share one smem buffer; S (16 x 32) is computed by
// the 4 warps as 2 key blocks x 2 halves of D (two partial sums); warp 0 runs the softmax; warp w owns output
// features [128w, 128w+128) (8 accumulator fragments).
template <class T>
__device__ __forceinline__ void attn_mma512(const T* __restrict__ q, const T* __restrict__ k,
                                            const T* __restrict__ v, T* __restrict__ out, int nq, int nk, int heads,
                                            long long q_sb, long long q_sn, long long k_sb, long long k_sn,
                                            long long v_sb, long long v_sn, float scale, int smem_bytes) {
    constexpr int D = 512, BQ = 16, BK = 32, SK = D + 8, SS = BK + 4, SP = BK + 8, NB = BK / 16;
    constexpr int NDW = D / 16 / 4; // output fragments per warp
    constexpr int KH = D / 16 / 2;  // k-steps per half
    using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
    using FragBc = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
    using FragBr = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;

    if (blockDim.x != kThreads || blockDim.y != 1 || blockDim.z != 1 || smem_bytes < smem_mma512()) lv_trap();
    LV_DYNAMIC_SMEM(smem_raw);
    unsigned char* base = align32(smem_raw);
    T* Qs = reinterpret_cast<T*>(base);
    T* KVs = Qs + BQ * SK;
    float* Ss = reinterpret_cast<float*>(KVs + BK * SK); // two partials [2][16][SS]
    T* Ps = reinterpret_cast<T*>(Ss + 2 * 16 * SS);
    float* Cs = reinterpret_cast<float*>(Ps + 16 * SP);

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const T* qb = q + (long long)b * q_sb + (long long)h * D;
    const T* kb = k + (long long)b * k_sb + (long long)h * D;
    const T* vb = v + (long long)b * v_sb + (long long)h * D;
    const bool kvec = vec_ok(kb, k_sn), vvec = vec_ok(vb, v_sn);
    const float sl2 = scale * kLog2e;

    load_tile<T, D, D, SK, BQ>(Qs, qb, q_sn, q0, nq, vec_ok(qb, q_sn), tid);

    FragC o[NDW];
    LV_UNROLL
    for (int j = 0; j < NDW; ++j) wmma::fill_fragment(o[j], 0.0f);
    float m = -INFINITY, l = 0.0f; // meaningful in warp 0
    const int snb = warp & 1, skh = warp >> 1;
    float* scratch = Ss + 256 * warp; // 16x16 (ld 16) per warp, over the dead S partials

    for (int kv0 = 0; kv0 < nk; kv0 += BK) {
        const int kvalid = nk - kv0;
        __syncthreads(); // previous V reads done
        load_tile<T, D, D, SK, BK>(KVs, kb, k_sn, kv0, nk, kvec, tid);
        __syncthreads();
        if (16 * snb < kvalid) {
            FragC acc;
            wmma::fill_fragment(acc, 0.0f);
            LV_UNROLL
            for (int kk = 0; kk < KH; ++kk) {
                const int ks = skh * KH + kk;
                FragA qf;
                FragBc kf;
                wmma::load_matrix_sync(qf, Qs + 16 * ks, SK);
                wmma::load_matrix_sync(kf, KVs + 16 * snb * SK + 16 * ks, SK);
                wmma::mma_sync(acc, qf, kf, acc);
            }
            wmma::store_matrix_sync(Ss + skh * 16 * SS + 16 * snb, acc, SS, wmma::mem_row_major);
        }
        __syncthreads(); // S partials complete, K reads done
        if (warp == 0) softmax_block<T, BK>(Ss, Ss + 16 * SS, SS, Ps, SP, Cs, m, l, kvalid, sl2, lane);
        load_tile<T, D, D, SK, BK>(KVs, vb, v_sn, kv0, nk, vvec, tid);
        __syncthreads();
        float need = Cs[lane & 15] != 1.0f ? 1.0f : 0.0f;
        LV_UNROLL
        for (int o2 = 1; o2 < 32; o2 <<= 1) need = fmaxf(need, __shfl_xor_sync(0xffffffffu, need, o2));
        if (need != 0.0f) {
            LV_UNROLL
            for (int j = 0; j < NDW; ++j) rescale_frag(o[j], scratch, 16, Cs, lane);
        }
        LV_UNROLL
        for (int nb = 0; nb < NB; ++nb) {
            if (16 * nb >= kvalid) break;
            FragA pf;
            wmma::load_matrix_sync(pf, Ps + 16 * nb, SP);
            LV_UNROLL
            for (int j = 0; j < NDW; ++j) {
                FragBr vf;
                wmma::load_matrix_sync(vf, KVs + 16 * nb * SK + 128 * warp + 16 * j, SK);
                wmma::mma_sync(o[j], pf, vf, o[j]);
            }
        }
    }

    __syncthreads(); // all V reads done: KVs becomes the output scratch
    if (warp == 0 && (lane & 1) == 0) Cs[lane >> 1] = l > 0.0f ? 1.0f / l : 0.0f;
    float* Ow = reinterpret_cast<float*>(KVs) + warp * 16 * 128; // [16][128] f32 per warp (32768 B <= 33280 B)
    LV_UNROLL
    for (int j = 0; j < NDW; ++j) wmma::store_matrix_sync(Ow + 16 * j, o[j], 128, wmma::mem_row_major);
    __syncthreads();
    const long long ostride = (long long)heads * D;
    T* ob = out + ((long long)b * nq + q0) * ostride + (long long)h * D + 128 * warp;
    const int rows = min(BQ, nq - q0);
    for (int r = 0; r < rows; ++r) {
        const float il = Cs[r];
        LV_UNROLL
        for (int c = lane; c < 128; c += 32) ob[r * ostride + c] = lv_from_float<T>(Ow[r * 128 + c] * il);
    }
}

// ------------------------------------------------------------------------------------------------------------------
// f32 kernel (FMA): BQ x BK score tile computed as SR x SC micro-tiles per thread into smem; softmax by warps
// (16 rows each, P overwrites S in place); each thread owns OR rows x OC features of O in registers (so the rescale
// is a register multiply). K then V share one smem buffer.
template <int D>
__device__ __forceinline__ void attn_f32(const float* __restrict__ q, const float* __restrict__ k,
                                         const float* __restrict__ v, float* __restrict__ out, int nq, int nk,
                                         int heads, long long q_sb, long long q_sn, long long k_sb, long long k_sn,
                                         long long v_sb, long long v_sn, float scale, int smem_bytes) {
    constexpr int BQ = bq_f32(D), BK = bk_f32(D), S1 = D + 1, SS = BK + 4;
    constexpr int SR = D == 512 ? 1 : 2, SC = D == 512 ? 1 : 4; // score micro-tile
    constexpr int KG = BK / SC;                                  // key groups
    static_assert((BQ / SR) * KG == kThreads, "score tiling");
    constexpr int OR = 2, ORG = BQ / OR, OCG = kThreads / ORG, OC = D / OCG; // O micro-tile
    static_assert(ORG * OCG == kThreads && OC * OCG == D, "output tiling");
    constexpr int NW = BQ / 16; // softmax warps

    if (blockDim.x != kThreads || blockDim.y != 1 || blockDim.z != 1 || smem_bytes < smem_f32(D)) lv_trap();
    LV_DYNAMIC_SMEM(smem_raw);
    float* Qs = reinterpret_cast<float*>(align32(smem_raw));
    float* KVs = Qs + BQ * S1;
    float* Ss = KVs + BK * S1;
    float* Cs = Ss + BQ * SS;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const float* qb = q + (long long)b * q_sb + (long long)h * D;
    const float* kb = k + (long long)b * k_sb + (long long)h * D;
    const float* vb = v + (long long)b * v_sb + (long long)h * D;
    const bool kvec = vec_ok(kb, k_sn), vvec = vec_ok(vb, v_sn);
    const float sl2 = scale * kLog2e;

    load_tile<float, D, D, S1, BQ>(Qs, qb, q_sn, q0, nq, vec_ok(qb, q_sn), tid);

    const int srg = tid / KG, skg = tid - srg * KG; // score rows srg*SR + i, keys skg + KG*j
    const int org = tid / OCG, ocg = tid - org * OCG; // O rows org*OR + i, features ocg + OCG*j
    float o[OR][OC];
    LV_UNROLL
    for (int i = 0; i < OR; ++i)
        LV_UNROLL
    for (int j = 0; j < OC; ++j) o[i][j] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int kv0 = 0; kv0 < nk; kv0 += BK) {
        const int kvalid = nk - kv0;
        __syncthreads();
        load_tile<float, D, D, S1, BK>(KVs, kb, k_sn, kv0, nk, kvec, tid);
        __syncthreads();
        {
            float acc[SR][SC];
            LV_UNROLL
            for (int i = 0; i < SR; ++i)
                LV_UNROLL
            for (int j = 0; j < SC; ++j) acc[i][j] = 0.0f;
            const float* qr = Qs + srg * SR * S1;
            const float* kr = KVs + skg * S1;
#pragma unroll 4
            for (int d = 0; d < D; ++d) {
                float a[SR], c[SC];
                LV_UNROLL
                for (int i = 0; i < SR; ++i) a[i] = qr[i * S1 + d];
                LV_UNROLL
                for (int j = 0; j < SC; ++j) c[j] = kr[j * KG * S1 + d];
                LV_UNROLL
                for (int i = 0; i < SR; ++i)
                    LV_UNROLL
                for (int j = 0; j < SC; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
            }
            LV_UNROLL
            for (int i = 0; i < SR; ++i)
                LV_UNROLL
            for (int j = 0; j < SC; ++j) Ss[(srg * SR + i) * SS + skg + KG * j] = acc[i][j];
        }
        __syncthreads(); // scores complete, K reads done
        if (warp < NW) {
            float* Sw = Ss + 16 * warp * SS;
            softmax_block<float, BK>(Sw, nullptr, SS, Sw, SS, Cs + 16 * warp, m, l, kvalid, sl2, lane);
        }
        load_tile<float, D, D, S1, BK>(KVs, vb, v_sn, kv0, nk, vvec, tid);
        __syncthreads();
        LV_UNROLL
        for (int i = 0; i < OR; ++i) {
            const float cr = Cs[org * OR + i];
            LV_UNROLL
            for (int j = 0; j < OC; ++j) o[i][j] *= cr;
        }
        const int kmax = min(BK, kvalid);
        for (int kk = 0; kk < kmax; ++kk) {
            float p[OR];
            LV_UNROLL
            for (int i = 0; i < OR; ++i) p[i] = Ss[(org * OR + i) * SS + kk];
            LV_UNROLL
            for (int j = 0; j < OC; ++j) {
                const float vv = KVs[kk * S1 + ocg + OCG * j];
                LV_UNROLL
                for (int i = 0; i < OR; ++i) o[i][j] = fmaf(p[i], vv, o[i][j]);
            }
        }
    }

    __syncthreads();
    if (warp < NW && (lane & 1) == 0) Cs[16 * warp + (lane >> 1)] = l > 0.0f ? 1.0f / l : 0.0f;
    __syncthreads();
    const long long ostride = (long long)heads * D;
    LV_UNROLL
    for (int i = 0; i < OR; ++i) {
        const int row = q0 + org * OR + i;
        if (row >= nq) continue;
        const float il = Cs[org * OR + i];
        float* orow = out + ((long long)b * nq + row) * ostride + (long long)h * D;
        LV_UNROLL
        for (int j = 0; j < OC; ++j) orow[ocg + OCG * j] = o[i][j] * il;
    }
}

} // namespace lv_attn

#define LV_ATTN_PARAMS(T)                                                                                              \
    const T *__restrict__ q, const T *__restrict__ k, const T *__restrict__ v, T *__restrict__ out, int nq, int nk,  \
        int heads, long long q_sb, long long q_sn, long long k_sb, long long k_sn, long long v_sb, long long v_sn,   \
        float scale, int smem_bytes
#define LV_ATTN_ARGS q, k, v, out, nq, nk, heads, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, scale, smem_bytes

// Minimum resident blocks per SM for ptxas (register budget 65536 / (128 * n)); matches what shared memory allows on
// sm_90 without spilling.
#define LV_ATTN_MINB_MMA(D) ((D) == 160 ? 2 : 3)
#define LV_ATTN_MINB_F32(D) ((D) <= 128 ? 4 : 3)

#define LV_ATTN_F16(D, IMPL)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128, LV_ATTN_MINB_MMA(D))                                           \
        lowvram_flash_attn_f16_d##D(LV_ATTN_PARAMS(__half)) {                                                        \
        IMPL(LV_ATTN_ARGS);                                                                                          \
    }
#define LV_ATTN_BF16(D, IMPL)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128, LV_ATTN_MINB_MMA(D))                                           \
        lowvram_flash_attn_bf16_d##D(LV_ATTN_PARAMS(__nv_bfloat16)) {                                                \
        LV_ATTN_BF16_BODY(IMPL)                                                                                      \
    }
#if LV_ARCH_BF16_MMA
#define LV_ATTN_BF16_BODY(IMPL) IMPL(LV_ATTN_ARGS);
#else
#define LV_ATTN_BF16_BODY(IMPL) lv_trap();
#endif
#define LV_ATTN_F32(D)                                                                                                 \
    extern "C" __global__ void __launch_bounds__(128, LV_ATTN_MINB_F32(D))                                           \
        lowvram_flash_attn_f32_d##D(LV_ATTN_PARAMS(float)) {                                                         \
        lv_attn::attn_f32<D>(LV_ATTN_ARGS);                                                                          \
    }

#define LV_ATTN_ALL(D, F16IMPL, BF16IMPL)                                                                              \
    LV_ATTN_F32(D)                                                                                                     \
    LV_ATTN_F16(D, F16IMPL)                                                                                            \
    LV_ATTN_BF16(D, BF16IMPL)

LV_ATTN_ALL(40, (lv_attn::attn_mma<__half, 40>), (lv_attn::attn_mma<__nv_bfloat16, 40>))
LV_ATTN_ALL(64, (lv_attn::attn_mma<__half, 64>), (lv_attn::attn_mma<__nv_bfloat16, 64>))
LV_ATTN_ALL(80, (lv_attn::attn_mma<__half, 80>), (lv_attn::attn_mma<__nv_bfloat16, 80>))
LV_ATTN_ALL(128, (lv_attn::attn_mma<__half, 128>), (lv_attn::attn_mma<__nv_bfloat16, 128>))
LV_ATTN_ALL(160, (lv_attn::attn_mma<__half, 160>), (lv_attn::attn_mma<__nv_bfloat16, 160>))
LV_ATTN_ALL(512, lv_attn::attn_mma512<__half>, lv_attn::attn_mma512<__nv_bfloat16>)
