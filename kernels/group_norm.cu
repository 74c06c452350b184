// lowvram: fused GroupNorm (+ optional SiLU), PyTorch nn.GroupNorm semantics, for T in {f32, f16, bf16}.
//
//   y[b, c, s] = (x[b, c, s] - mean[b, g]) * rsqrt(var[b, g] + eps) * weight[c] + bias[c],   g = c / (C / G)
//   if silu:  y = y * sigmoid(y)                                  (computed in f32, written once as T)
//   mean, var over the group's n = (C/G)*S elements; var is the BIASED variance (divide by n); eps inside the sqrt.
//   Statistics in f32 with Welford/Chan merges (no sum-of-squares formula), so groups of millions of elements with a
//   non-zero mean keep their precision.
//
// Layout: x, y contiguous [B, C, S] of T (S = number of spatial elements, e.g. H*W); weight, bias [C] of T.
// Requirements: C % G == 0, C >= 1, G >= 1, S >= 1, chunks >= 1. Pointers: natural alignment of T only.
// Group (b, g) = the n = (C/G)*S contiguous elements starting at element (b*C + g*(C/G))*S. It is split into
// `chunks` chunks of L = ceil(n / chunks) elements: chunk c covers [c*L, min(n, (c+1)*L)) (possibly empty).
// Choose chunks so that B*G*chunks blocks fill the GPU (e.g. chunks = max(1, min(ceil(n / 4096), 1024))).
//
// Two launches, same grid, in this order on one stream:
//
// 1. lowvram_group_norm_stats_<T>(const T* x, float* partial, int C, int G, long long S, int chunks)
//      T/suffix: float/f32, __half/f16, __nv_bfloat16/bf16.
//      grid (chunks, G, B), block (256, 1, 1), dynamic shared memory 0 bytes.
//      Writes partial[((b*G + g)*chunks + c)*3 + {0, 1, 2}] = (count, mean, M2) of chunk c as floats
//      (M2 = sum of squared deviations from the chunk mean; an empty chunk writes (0, 0, 0)).
// 2. lowvram_group_norm_apply_<T>(const T* x, const float* partial, const T* weight, const T* bias, T* y, int C,
//                                 int G, long long S, int chunks, float eps, int silu)
//      grid (chunks, G, B), block (256, 1, 1), dynamic shared memory 0 bytes.
//      Each block merges its group's `chunks` partials (same order in every block: deterministic, identical
//      statistics for all chunks of a group), then normalises chunk c's elements. silu: 0 or 1. y may not alias x.
//
// Caller scratch: `partial` = B*G*chunks*3 floats (B*G*chunks*12 bytes), no initialisation needed.
// Launch preconditions checked (lv_trap otherwise): blockDim == (256,1,1), gridDim.x == chunks, gridDim.y == G,
// C % G == 0, C >= 1, G >= 1, S >= 1, chunks >= 1.
// Static shared memory: 3 KiB + 8 bytes per block. Access: consecutive threads read consecutive elements (coalesced).
#include "common.cuh"

#define LV_GN_THREADS 256

struct LvWelford {
    float n, mean, m2;
};

// Chan et al. merge of two partial statistics (order matters for rounding: callers use a fixed order).
__device__ __forceinline__ LvWelford lv_gn_merge(LvWelford a, LvWelford b) {
    if (b.n == 0.0f) return a;
    if (a.n == 0.0f) return b;
    const float n = a.n + b.n;
    const float fb = b.n / n;
    const float delta = b.mean - a.mean;
    LvWelford r;
    r.n = n;
    r.mean = a.mean + delta * fb;
    r.m2 = a.m2 + b.m2 + delta * delta * a.n * fb;
    return r;
}

// Merges the 256 threads' statistics; the result is valid in thread 0. One __syncthreads; all threads must call it.
__device__ __forceinline__ LvWelford lv_gn_block_merge(LvWelford v) {
    __shared__ float s_n[LV_GN_THREADS], s_mean[LV_GN_THREADS], s_m2[LV_GN_THREADS];
    const int t = threadIdx.x;
    s_n[t] = v.n;
    s_mean[t] = v.mean;
    s_m2[t] = v.m2;
    __syncthreads();
    LvWelford r = {0.0f, 0.0f, 0.0f};
    if (t < 32) {
        for (int k = t; k < LV_GN_THREADS; k += 32) { // fixed order: t, t+32, ..., t+224
            const LvWelford o = {s_n[k], s_mean[k], s_m2[k]};
            r = lv_gn_merge(r, o);
        }
        for (int off = 16; off > 0; off >>= 1) {
            LvWelford o;
            o.n = __shfl_xor_sync(0xffffffffu, r.n, off);
            o.mean = __shfl_xor_sync(0xffffffffu, r.mean, off);
            o.m2 = __shfl_xor_sync(0xffffffffu, r.m2, off);
            r = lv_gn_merge(r, o);
        }
    }
    return r;
}

__device__ __forceinline__ bool lv_gn_bad_launch(int C, int G, long long S, int chunks) {
    return blockDim.x != LV_GN_THREADS || blockDim.y != 1 || blockDim.z != 1 || C < 1 || G < 1 || C % G != 0 ||
           S < 1 || chunks < 1 || gridDim.x != (unsigned)chunks || gridDim.y != (unsigned)G;
}

template <class T>
__device__ __forceinline__ void lv_gn_stats(const T* __restrict__ x, float* __restrict__ partial, int C, int G,
                                            long long S, int chunks) {
    if (lv_gn_bad_launch(C, G, S, chunks)) lv_trap();
    const int c = blockIdx.x, g = blockIdx.y, b = blockIdx.z, t = threadIdx.x;
    const int cg = C / G;
    const long long n = (long long)cg * S;
    const long long L = (n + chunks - 1) / chunks;
    const long long start = min((long long)c * L, n), end = min(n, start + L);
    const T* xg = x + ((long long)b * C + (long long)g * cg) * S;

    // Per thread: batches of up to 4 elements (i, i+256, i+512, i+768: coalesced), each batch's exact two-pass
    // statistics merged into the running ones (one division per batch instead of one per element).
    LvWelford acc = {0.0f, 0.0f, 0.0f};
    for (long long i = start + t; i < end; i += 4 * LV_GN_THREADS) {
        float v[4];
        int k = 0;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const long long j = i + (long long)u * LV_GN_THREADS;
            const bool ok = j < end;
            v[u] = ok ? lv_to_float(xg[j]) : 0.0f;
            k += ok ? 1 : 0;
        }
        const float kb = (float)k;
        const float mb = (v[0] + v[1] + v[2] + v[3]) / kb; // invalid slots hold 0
        float m2b = 0.0f;
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const float d = v[u] - mb;
            m2b += u < k ? d * d : 0.0f;
        }
        const LvWelford batch = {kb, mb, m2b};
        acc = lv_gn_merge(acc, batch);
    }
    const LvWelford r = lv_gn_block_merge(acc);
    if (t == 0) {
        float* p = partial + (((long long)b * G + g) * chunks + c) * 3;
        p[0] = r.n;
        p[1] = r.mean;
        p[2] = r.m2;
    }
}

template <class T>
__device__ __forceinline__ void lv_gn_apply(const T* __restrict__ x, const float* __restrict__ partial,
                                            const T* __restrict__ weight, const T* __restrict__ bias,
                                            T* __restrict__ y, int C, int G, long long S, int chunks, float eps,
                                            int silu) {
    if (lv_gn_bad_launch(C, G, S, chunks)) lv_trap();
    __shared__ float s_mean, s_rstd;
    const int c = blockIdx.x, g = blockIdx.y, b = blockIdx.z, t = threadIdx.x;
    const int cg = C / G;
    const long long n = (long long)cg * S;

    // 1. Group statistics from all chunks' partials, in the same order in every block.
    const float* p = partial + ((long long)b * G + g) * chunks * 3;
    LvWelford acc = {0.0f, 0.0f, 0.0f};
    for (int k = t; k < chunks; k += LV_GN_THREADS) {
        const LvWelford o = {p[3 * k], p[3 * k + 1], p[3 * k + 2]};
        acc = lv_gn_merge(acc, o);
    }
    const LvWelford r = lv_gn_block_merge(acc);
    if (t == 0) {
        const float var = fmaxf(r.m2 / r.n, 0.0f); // biased variance
        s_mean = r.mean;
        s_rstd = 1.0f / sqrtf(var + eps); // once per block: the correctly rounded form
    }
    __syncthreads();
    const float mean = s_mean, rstd = s_rstd;

    // 2. Normalise this chunk, one channel segment at a time (per-channel scale hoisted out of the element loop).
    const long long L = (n + chunks - 1) / chunks;
    const long long start = min((long long)c * L, n), end = min(n, start + L);
    const long long base = ((long long)b * C + (long long)g * cg) * S;
    const T* xg = x + base;
    T* yg = y + base;
    long long seg = start;
    while (seg < end) {
        const long long cl = seg / S; // channel within the group
        const long long seg_end = min(end, (cl + 1) * S);
        const int ch = g * cg + (int)cl;
        const float sc = rstd * lv_to_float(weight[ch]);
        const float sh = lv_to_float(bias[ch]);
        for (long long i = seg + t; i < seg_end; i += LV_GN_THREADS) {
            float v = (lv_to_float(xg[i]) - mean) * sc + sh;
            if (silu) v = v / (1.0f + expf(-v));
            yg[i] = lv_from_float<T>(v);
        }
        seg = seg_end;
    }
}

#define LV_GN_KERNELS(T, SUF)                                                                                          \
    extern "C" __global__ void __launch_bounds__(LV_GN_THREADS)                                                        \
        lowvram_group_norm_stats_##SUF(const T* __restrict__ x, float* __restrict__ partial, int C, int G,              \
                                       long long S, int chunks) {                                                      \
        lv_gn_stats<T>(x, partial, C, G, S, chunks);                                                                   \
    }                                                                                                                  \
    extern "C" __global__ void __launch_bounds__(LV_GN_THREADS) lowvram_group_norm_apply_##SUF(                         \
        const T* __restrict__ x, const float* __restrict__ partial, const T* __restrict__ weight,                     \
        const T* __restrict__ bias, T* __restrict__ y, int C, int G, long long S, int chunks, float eps, int silu) {   \
        lv_gn_apply<T>(x, partial, weight, bias, y, C, G, S, chunks, eps, silu);                                       \
    }

LV_GN_KERNELS(float, f32)
LV_GN_KERNELS(__half, f16)
LV_GN_KERNELS(__nv_bfloat16, bf16)
#undef LV_GN_KERNELS
