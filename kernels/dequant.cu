// lowvram: dequantisation of stored weights (GGML quantised blocks, fp8 bytes) into a dense f32/f16/bf16 tensor.
//
//   dst[e] = value of element e of the row-major tensor whose stored bytes are src, e in [0, n)
//   (then rounded to T to nearest even). Element order and arithmetic are gguf-py 0.19.0's gguf.quants.dequantize:
//   every product and sum rounded separately (__fmul_rn / __fadd_rn: nvcc must not fuse them into FMAs), so the
//   f32 output is bit-identical to the CPU decoders (src/ops/cpu/dequant.rs) and to gguf-py.
//
// Kernels: lowvram_dequant_<fmt>_<T>(const unsigned char* src, T* dst, long long n)
//   fmt: q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k f8_e4m3 f8_e5m2; T/suffix: float/f32, __half/f16,
//   __nv_bfloat16/bf16. n = elements, a multiple of the format's block (32 for q*_0/q*_1, 256 for *_k, 1 for fp8).
//   src holds n / block * block_bytes bytes (no alignment needed: bytes are read one at a time); dst n elements of T.
//   grid (any, 1, 1), block (256, 1, 1), dynamic shared memory 0: a grid-stride loop covers every element, each
//   written by exactly one thread; consecutive threads write consecutive elements (coalesced stores).
//   fp8: each block first fills a 256-entry table in shared memory (exact decoding of every byte; any sm), then looks
//   the bytes up. Static shared memory: 1 KiB (fp8 kernels only).
// Launch preconditions checked (lv_trap otherwise): blockDim == (256,1,1), n >= 0, n % block == 0.
#include "common.cuh"

#define LV_DQ_THREADS 256

__device__ __forceinline__ float lv_dq_h(const unsigned char* b) {
    return __half2float(__ushort_as_half((unsigned short)(b[0] | (b[1] << 8))));
}
__device__ __forceinline__ float lv_dq_sub(float a, float b) { return __fadd_rn(a, -b); }

// Element i of one block at b, per format.
__device__ __forceinline__ float lv_dq_q4_0(const unsigned char* b, int i) {
    const int q = i < 16 ? (b[2 + i] & 0xF) : (b[2 + i - 16] >> 4);
    return __fmul_rn(lv_dq_h(b), (float)(q - 8));
}
__device__ __forceinline__ float lv_dq_q4_1(const unsigned char* b, int i) {
    const int q = i < 16 ? (b[4 + i] & 0xF) : (b[4 + i - 16] >> 4);
    return __fadd_rn(__fmul_rn(lv_dq_h(b), (float)q), lv_dq_h(b + 2));
}
__device__ __forceinline__ unsigned lv_dq_u32(const unsigned char* p) {
    return (unsigned)p[0] | ((unsigned)p[1] << 8) | ((unsigned)p[2] << 16) | ((unsigned)p[3] << 24);
}
__device__ __forceinline__ float lv_dq_q5_0(const unsigned char* b, int i) {
    const unsigned qh = lv_dq_u32(b + 2);
    const int lo = i < 16 ? (b[6 + i] & 0xF) : (b[6 + i - 16] >> 4);
    const int q = lo | (int)(((qh >> i) & 1u) << 4);
    return __fmul_rn(lv_dq_h(b), (float)(q - 16));
}
__device__ __forceinline__ float lv_dq_q5_1(const unsigned char* b, int i) {
    const unsigned qh = lv_dq_u32(b + 4);
    const int lo = i < 16 ? (b[8 + i] & 0xF) : (b[8 + i - 16] >> 4);
    const int q = lo | (int)(((qh >> i) & 1u) << 4);
    return __fadd_rn(__fmul_rn(lv_dq_h(b), (float)q), lv_dq_h(b + 2));
}
__device__ __forceinline__ float lv_dq_q8_0(const unsigned char* b, int i) {
    return __fmul_rn((float)(signed char)b[2 + i], lv_dq_h(b));
}
__device__ __forceinline__ float lv_dq_q2_k(const unsigned char* b, int e) {
    const int j = e / 128, s = (e % 128) / 32, l = e % 32;
    const int sc = b[e / 16];
    const float dl = __fmul_rn(lv_dq_h(b + 80), (float)(sc & 0xF));
    const float ml = __fmul_rn(lv_dq_h(b + 82), (float)(sc >> 4));
    const int q = (b[16 + j * 32 + l] >> (2 * s)) & 3;
    return lv_dq_sub(__fmul_rn(dl, (float)q), ml);
}
__device__ __forceinline__ float lv_dq_q3_k(const unsigned char* b, int e) {
    const int j = e / 128, s = (e % 128) / 32, l = e % 32, g = e / 16;
    const unsigned char* sc = b + 96;
    const int lo = (sc[g % 8] >> (4 * (g / 8))) & 0xF;
    const int hi = (sc[8 + g % 4] >> (2 * (g / 4))) & 3;
    const float scale = __fmul_rn(lv_dq_h(b + 108), (float)((lo | (hi << 4)) - 32));
    const int ql = (b[32 + j * 32 + l] >> (2 * s)) & 3;
    const int qh = ((b[l] >> (e / 32)) & 1) ^ 1;
    return __fmul_rn(scale, (float)(ql - (qh << 2)));
}
// 6-bit scale and min of sub-block sb of a Q4_K/Q5_K block (scales at s, 12 bytes).
__device__ __forceinline__ void lv_dq_scale_min_k4(const unsigned char* s, int sb, int& sc, int& m) {
    if (sb < 4) {
        sc = s[sb] & 0x3F;
        m = s[4 + sb] & 0x3F;
    } else {
        sc = (s[8 + sb - 4] & 0x0F) | ((s[sb - 4] >> 2) & 0x30);
        m = (s[8 + sb - 4] >> 4) | ((s[4 + sb - 4] >> 2) & 0x30);
    }
}
__device__ __forceinline__ float lv_dq_q4_k(const unsigned char* b, int e) {
    const int sb = e / 32, l = e % 32, j = sb / 2, s = sb % 2;
    int sc, m;
    lv_dq_scale_min_k4(b + 4, sb, sc, m);
    const float dl = __fmul_rn(lv_dq_h(b), (float)sc), ml = __fmul_rn(lv_dq_h(b + 2), (float)m);
    const int q = (b[16 + j * 32 + l] >> (4 * s)) & 0xF;
    return lv_dq_sub(__fmul_rn(dl, (float)q), ml);
}
__device__ __forceinline__ float lv_dq_q5_k(const unsigned char* b, int e) {
    const int sb = e / 32, l = e % 32, j = sb / 2, s = sb % 2;
    int sc, m;
    lv_dq_scale_min_k4(b + 4, sb, sc, m);
    const float dl = __fmul_rn(lv_dq_h(b), (float)sc), ml = __fmul_rn(lv_dq_h(b + 2), (float)m);
    const int q = ((b[48 + j * 32 + l] >> (4 * s)) & 0xF) | (((b[16 + l] >> sb) & 1) << 4);
    return lv_dq_sub(__fmul_rn(dl, (float)q), ml);
}
__device__ __forceinline__ float lv_dq_q6_k(const unsigned char* b, int e) {
    const int j = e / 128, s = (e % 128) / 32, l = e % 32;
    const int lo = (b[j * 64 + (s % 2) * 32 + l] >> (4 * (s / 2))) & 0xF;
    const int hi = (b[128 + j * 32 + l] >> (2 * s)) & 3;
    const float d = __fmul_rn(lv_dq_h(b + 208), (float)(signed char)b[192 + e / 16]);
    return __fmul_rn(d, (float)((lo | (hi << 4)) - 32));
}

__device__ __forceinline__ bool lv_dq_check(long long n, int block) {
    return blockDim.x == LV_DQ_THREADS && blockDim.y == 1 && blockDim.z == 1 && n >= 0 && n % block == 0;
}

#define LV_DQ_KERNEL(fmt, BE, BB, T, suffix)                                                                       \
    extern "C" __global__ void lowvram_dequant_##fmt##_##suffix(const unsigned char* src, T* dst, long long n) {   \
        if (!lv_dq_check(n, BE)) lv_trap();                                                                        \
        const long long stride = (long long)gridDim.x * LV_DQ_THREADS;                                             \
        for (long long e = (long long)blockIdx.x * LV_DQ_THREADS + threadIdx.x; e < n; e += stride) {             \
            dst[e] = lv_from_float<T>(lv_dq_##fmt(src + (e / BE) * BB, (int)(e % BE)));                            \
        }                                                                                                          \
    }
#define LV_DQ_KERNELS(fmt, BE, BB)                                                                                  \
    LV_DQ_KERNEL(fmt, BE, BB, float, f32)                                                                          \
    LV_DQ_KERNEL(fmt, BE, BB, __half, f16)                                                                         \
    LV_DQ_KERNEL(fmt, BE, BB, __nv_bfloat16, bf16)

LV_DQ_KERNELS(q4_0, 32, 18)
LV_DQ_KERNELS(q4_1, 32, 20)
LV_DQ_KERNELS(q5_0, 32, 22)
LV_DQ_KERNELS(q5_1, 32, 24)
LV_DQ_KERNELS(q8_0, 32, 34)
LV_DQ_KERNELS(q2_k, 256, 84)
LV_DQ_KERNELS(q3_k, 256, 110)
LV_DQ_KERNELS(q4_k, 256, 144)
LV_DQ_KERNELS(q5_k, 256, 176)
LV_DQ_KERNELS(q6_k, 256, 210)

// fp8 byte -> f32, exact (every fp8 value is an f32): built from bits for normals, a multiplication by a power of
// two for subnormals.
__device__ __forceinline__ float lv_dq_f8_e4m3_value(unsigned v) {
    const unsigned sign = (v & 0x80u) << 24, e = (v >> 3) & 0xFu, m = v & 7u;
    if (e == 0xF && m == 7) return __uint_as_float(sign | 0x7FC00000u);
    if (e == 0) return __uint_as_float(sign | __float_as_uint((float)m * 0.001953125f)); // m * 2^-9
    return __uint_as_float(sign | ((e - 7 + 127) << 23) | (m << 20));
}
__device__ __forceinline__ float lv_dq_f8_e5m2_value(unsigned v) {
    const unsigned sign = (v & 0x80u) << 24, e = (v >> 2) & 0x1Fu, m = v & 3u;
    if (e == 0x1F) return __uint_as_float(sign | (m == 0 ? 0x7F800000u : 0x7FC00000u));
    if (e == 0) return __uint_as_float(sign | __float_as_uint((float)m * 1.52587890625e-05f)); // m * 2^-16
    return __uint_as_float(sign | ((e - 15 + 127) << 23) | (m << 21));
}

#define LV_DQ_F8_KERNEL(fmt, T, suffix)                                                                            \
    extern "C" __global__ void lowvram_dequant_##fmt##_##suffix(const unsigned char* src, T* dst, long long n) {   \
        if (!lv_dq_check(n, 1)) lv_trap();                                                                         \
        __shared__ float table[256];                                                                               \
        table[threadIdx.x] = lv_dq_##fmt##_value(threadIdx.x);                                                     \
        __syncthreads();                                                                                           \
        const long long stride = (long long)gridDim.x * LV_DQ_THREADS;                                             \
        for (long long e = (long long)blockIdx.x * LV_DQ_THREADS + threadIdx.x; e < n; e += stride) {             \
            dst[e] = lv_from_float<T>(table[src[e]]);                                                              \
        }                                                                                                          \
    }
#define LV_DQ_F8_KERNELS(fmt)                                                                                       \
    LV_DQ_F8_KERNEL(fmt, float, f32)                                                                               \
    LV_DQ_F8_KERNEL(fmt, __half, f16)                                                                              \
    LV_DQ_F8_KERNEL(fmt, __nv_bfloat16, bf16)

LV_DQ_F8_KERNELS(f8_e4m3)
LV_DQ_F8_KERNELS(f8_e5m2)
