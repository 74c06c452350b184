// lowvram CUDA kernels: common definitions, identical for nvcc and for the CPU emulator (g++ -DLOWVRAM_EMU).
//   * types __half, __nv_bfloat16 (and float); lv_to_float(T) / lv_from_float<T>(float) (round-to-nearest-even, as
//     __float2half_rn / __float2bfloat16_rn);
//   * LV_DYNAMIC_SMEM(name): declares `unsigned char* name`-like storage at 16-byte-aligned dynamic shared memory;
//   * LV_ARCH_BF16_MMA: 1 where bf16 WMMA may be used (sm_80+, always in the emulator); on sm_75 bf16 kernels must
//     still compile (guard the body with `#if LV_ARCH_BF16_MMA ... #else lv_trap(); #endif`);
//   * lv_trap(): abort the kernel (CUDA __trap(); emulator: message with kernel/block/thread + abort) for violated
//     launch preconditions;
//   * LV_UNROLL: `#pragma unroll` under nvcc, nothing in the emulator (optional; plain `#pragma unroll` also works,
//     the emulator build passes -Wno-unknown-pragmas).
#pragma once

#if defined(LOWVRAM_EMU)
#include "emu/cuda_emu.hpp"
#define LV_DYNAMIC_SMEM(name) unsigned char* name = lv_emu::dynamic_smem()
#define lv_trap() lv_emu::trap(__FILE__, __LINE__)
#define LV_UNROLL
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define LV_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
__device__ __forceinline__ void lv_trap() { __trap(); }
#define LV_UNROLL _Pragma("unroll")
#endif

#if defined(LOWVRAM_EMU) || (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800)
#define LV_ARCH_BF16_MMA 1
#else
#define LV_ARCH_BF16_MMA 0
#endif

__device__ __forceinline__ float lv_to_float(float x) { return x; }
__device__ __forceinline__ float lv_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float lv_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T> __device__ __forceinline__ T lv_from_float(float x);
template <> __device__ __forceinline__ float lv_from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half lv_from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 lv_from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}
