// lowvram CUDA emulator: runs CUDA kernels from kernels/*.cu on the CPU for correctness tests (built with g++ and
// -DLOWVRAM_EMU; kernels include it through kernels/common.cuh). Not a performance tool.
//
// Execution model
//   * lv_emu::launch(kernel, grid, block, dynamic_smem_bytes, args...) runs the grid's blocks one after another
//     (blockIdx.x fastest, then y, then z) on the calling OS thread and returns when all are done (like a launch
//     followed by cudaDeviceSynchronize). lv_emu::launch_named("name", kernel, ...) is the same with a name for
//     messages (otherwise the kernel is named by its address / dladdr).
//   * Each CUDA thread of a block is a user-space fiber (own stack, cooperative switching; x86-64: a 20-instruction
//     register switch, elsewhere ucontext). A fiber runs until it blocks at a barrier (__syncthreads*, __syncwarp,
//     a shuffle/vote) or finishes; the scheduler then runs the next runnable fiber in linear thread order. So
//     execution is deterministic, and "thread t runs ahead to its next barrier before t+1 starts" makes most missing
//     barriers show up (a thread reading shared memory that a later thread writes before the barrier reads poison
//     or stale data). Fibers rather than one OS thread per CUDA thread: ~100x cheaper barriers on 2 cores, and
//     deadlocks are detected exactly instead of by timeout.
//   * Deadlock (e.g. __syncthreads reached by only some threads, a thread exiting while others wait at a barrier,
//     a warp op whose mask names a lane that never arrives): reported at once with kernel name, block, and what each
//     thread waits on, then abort(). Watchdog: a kernel making no scheduling progress for LV_EMU_WATCHDOG_S seconds
//     (default 20; e.g. a spin loop) is reported and aborted.
//   * Shared memory: `__shared__` expands to `static` (blocks run one at a time, so a function-local static is the
//     block's shared memory). Static shared arrays are NOT re-poisoned between blocks: they start zeroed and keep
//     the previous block's contents. Dynamic shared memory (LV_DYNAMIC_SMEM) is one 128-byte-aligned buffer per
//     launch of exactly the requested size, filled with 0xFF bytes (NaN for f32/f16/bf16) before every block.
//     Requested size must be <= lv_emu::max_dynamic_smem (227 KiB, the H100 limit).
//   * Warps: consecutive groups of 32 linear thread ids (tid = x + y*bx + z*bx*by), lane = tid % 32; a last
//     partial warp has fewer lanes. __syncwarp / __shfl*_sync / __ballot_sync / __any_sync / __all_sync are warp
//     barriers over (mask & existing lanes) with a double-buffered exchange buffer. Supported: all lanes of the mask
//     call the op, and concurrent warp ops within one warp use the same mask (e.g. full mask 0xffffffff: the normal
//     case). Two disjoint sub-masks syncing concurrently in one warp are NOT supported (reported as an error).
//     Reading from a lane outside the mask/warp returns the caller's own value.
//   * WMMA (nvcuda::wmma, m16n16k16, A/B in __half or __nv_bfloat16, float accumulator): every lane holds the whole
//     16x16 tile (num_elements = 256); load_matrix_sync reads the tile in every lane; mma_sync computes
//     d = a*b + c in f32 from the exact inputs (products are exact in f32, sums rounded in f32, k ascending);
//     store_matrix_sync is written by ONE lane: the LAST existing lane of the warp (lanes run in order, so a missing
//     __syncwarp/__syncthreads between the store and another lane's read makes that lane read unwritten memory).
//     Every load/store checks the hardware's operand rules (pointer 32-byte aligned, ldm a multiple of 16 bytes) and
//     fails the test if one is broken: a GPU would give undefined results there.
//   * Math: expf/__expf/exp2f/logf/__logf/... are the exact libm functions (the GPU's fast intrinsics are less
//     precise: test tolerances must allow for that). atomicAdd etc. are plain read-modify-writes (one OS thread).
//   * Limits: one launch at a time per process (a mutex serialises launches); fiber stack LV_EMU_STACK_KB KiB
//     (default 512, guard page below); blockDim.x*y*z <= 1024; grid.y, grid.z <= 65535.
//   * Compile: g++ -std=c++20 -pthread -DLOWVRAM_EMU -Ikernels -Wno-unknown-pragmas (g++ warns on `#pragma unroll`
//     and cannot be silenced from a header). Do not `using namespace std;` in code that includes this (the global
//     min/max below would become ambiguous).
#pragma once
#ifndef LOWVRAM_EMU
#error "cuda_emu.hpp is the CPU emulator: compile with -DLOWVRAM_EMU (kernels include kernels/common.cuh)"
#endif

#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <dlfcn.h>
#include <elf.h>
#include <fstream>
#include <sys/mman.h>
#include <unistd.h>

#if !defined(__x86_64__) || defined(LV_EMU_UCONTEXT)
#define LV_EMU_USE_UCONTEXT 1
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------------------------
// CUDA keywords
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static
#define __constant__
#define __managed__
#define __align__(n) __attribute__((aligned(n)))

constexpr int warpSize = 32;

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
    constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
};

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};
inline dim3 gridDim{1, 1, 1};

// ---------------------------------------------------------------------------------------------------------------
// Vector types
#define LV_EMU_VEC2(T, N, A)                                                                                           \
    struct alignas(A) N##2 {                                                                                           \
        T x, y;                                                                                                        \
    };                                                                                                                 \
    inline N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define LV_EMU_VEC4(T, N, A)                                                                                           \
    struct alignas(A) N##4 {                                                                                           \
        T x, y, z, w;                                                                                                  \
    };                                                                                                                 \
    inline N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
LV_EMU_VEC2(float, float, 8)
LV_EMU_VEC4(float, float, 16)
LV_EMU_VEC2(int, int, 8)
LV_EMU_VEC4(int, int, 16)
LV_EMU_VEC2(unsigned, uint, 8)
LV_EMU_VEC4(unsigned, uint, 16)
LV_EMU_VEC2(double, double, 16)
LV_EMU_VEC2(long long, longlong, 16)
LV_EMU_VEC2(short, short, 4)
LV_EMU_VEC2(unsigned short, ushort, 4)
#undef LV_EMU_VEC2
#undef LV_EMU_VEC4
struct float3 {
    float x, y, z;
};
inline float3 make_float3(float x, float y, float z) { return float3{x, y, z}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return uint3{x, y, z}; }

// ---------------------------------------------------------------------------------------------------------------
// f16 / bf16 conversions (exact IEEE round-to-nearest-even; NaN -> canonical 0x7fff like CUDA)
namespace lv_emu {
inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_f16_bits(float f) {
    const uint32_t x = f32_bits(f);
    const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
    const uint32_t ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return 0x7fffu;                      // NaN
    if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u); // >= 65520 (incl. inf) -> inf
    if (ax < 0x38800000u) {                                    // below 2^-14: half subnormal (or zero)
        // |f| * 2^24 is exact in f32 (power-of-two scale, result < 1024); nearbyint rounds to nearest even.
        const float m = std::nearbyint(bits_f32(ax) * 16777216.0f);
        return static_cast<uint16_t>(sign | static_cast<uint16_t>(m)); // m == 1024 encodes the smallest normal
    }
    uint32_t h = (((ax >> 23) - 112u) << 10) | ((ax >> 13) & 0x3ffu);
    const uint32_t rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h; // carry into exponent is correct
    return static_cast<uint16_t>(sign | h);
}
inline float f16_bits_to_f32_slow(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = static_cast<float>(m) * (1.0f / 16777216.0f); // exact
        return sign ? -v : v;
    }
    if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}
inline const std::array<float, 65536>& f16_table() {
    static const std::array<float, 65536> t = [] {
        std::array<float, 65536> a{};
        for (uint32_t i = 0; i < 65536; ++i) a[i] = f16_bits_to_f32_slow(static_cast<uint16_t>(i));
        return a;
    }();
    return t;
}
inline float f16_bits_to_f32(uint16_t h) { return f16_table()[h]; }
inline uint16_t f32_to_bf16_bits(float f) {
    const uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu; // NaN
    return static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) { return bits_f32(static_cast<uint32_t>(b) << 16); }
} // namespace lv_emu

struct __half {
    unsigned short __x;
    __half() = default;
    constexpr __half(const __half&) = default;
    __half& operator=(const __half&) = default;
    __half(float f) : __x(lv_emu::f32_to_f16_bits(f)) {}
    __half(double d) : __x(lv_emu::f32_to_f16_bits(static_cast<float>(d))) {} // via f32 (may double-round)
    __half(int i) : __half(static_cast<float>(i)) {}
    __half(unsigned i) : __half(static_cast<float>(i)) {}
    __half(long long i) : __half(static_cast<float>(i)) {}
    operator float() const { return lv_emu::f16_bits_to_f32(__x); }
};
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(const __nv_bfloat16&) = default;
    __nv_bfloat16& operator=(const __nv_bfloat16&) = default;
    __nv_bfloat16(float f) : __x(lv_emu::f32_to_bf16_bits(f)) {}
    __nv_bfloat16(double d) : __x(lv_emu::f32_to_bf16_bits(static_cast<float>(d))) {}
    __nv_bfloat16(int i) : __nv_bfloat16(static_cast<float>(i)) {}
    __nv_bfloat16(unsigned i) : __nv_bfloat16(static_cast<float>(i)) {}
    __nv_bfloat16(long long i) : __nv_bfloat16(static_cast<float>(i)) {}
    operator float() const { return lv_emu::bf16_bits_to_f32(__x); }
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __half half;
struct alignas(4) __half2 {
    __half x, y;
};
struct alignas(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
};
typedef __nv_bfloat162 nv_bfloat162;
typedef __half2 half2;

inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __half2float(__half h) { return lv_emu::f16_bits_to_f32(h.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return lv_emu::bf16_bits_to_f32(b.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short u) {
    __half h;
    h.__x = u;
    return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) {
    __nv_bfloat16 h;
    h.__x = u;
    return h;
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__half(a), __half(b)}; }
inline __half2 __float22half2_rn(float2 v) { return __floats2half2_rn(v.x, v.y); }
inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 make_half2(__half a, __half b) { return __half2{a, b}; }
inline float2 __half22float2(__half2 v) { return float2{float(v.x), float(v.y)}; }
inline float __low2float(__half2 v) { return float(v.x); }
inline float __high2float(__half2 v) { return float(v.y); }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) {
    return __nv_bfloat162{__nv_bfloat16(a), __nv_bfloat16(b)};
}
inline __nv_bfloat162 __float22bfloat162_rn(float2 v) { return __floats2bfloat162_rn(v.x, v.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline float2 __bfloat1622float2(__nv_bfloat162 v) { return float2{float(v.x), float(v.y)}; }
inline float __low2float(__nv_bfloat162 v) { return float(v.x); }
inline float __high2float(__nv_bfloat162 v) { return float(v.y); }
// Scalar arithmetic like cuda_fp16.h / cuda_bf16.h (computed in f32, rounded once: exact for + - * /).
#define LV_EMU_HALF_OPS(H)                                                                                             \
    inline H operator+(const H& a, const H& b) { return H(float(a) + float(b)); }                                      \
    inline H operator-(const H& a, const H& b) { return H(float(a) - float(b)); }                                      \
    inline H operator*(const H& a, const H& b) { return H(float(a) * float(b)); }                                      \
    inline H operator/(const H& a, const H& b) { return H(float(a) / float(b)); }                                      \
    inline H operator-(const H& a) {                                                                                   \
        H r = a;                                                                                                       \
        r.__x ^= 0x8000u;                                                                                              \
        return r;                                                                                                      \
    }                                                                                                                  \
    inline H& operator+=(H& a, const H& b) { return a = a + b; }                                                       \
    inline H& operator-=(H& a, const H& b) { return a = a - b; }                                                       \
    inline H& operator*=(H& a, const H& b) { return a = a * b; }                                                       \
    inline H& operator/=(H& a, const H& b) { return a = a / b; }                                                       \
    inline bool operator==(const H& a, const H& b) { return float(a) == float(b); }                                    \
    inline bool operator!=(const H& a, const H& b) { return float(a) != float(b); }                                    \
    inline bool operator<(const H& a, const H& b) { return float(a) < float(b); }                                      \
    inline bool operator>(const H& a, const H& b) { return float(a) > float(b); }                                      \
    inline bool operator<=(const H& a, const H& b) { return float(a) <= float(b); }                                    \
    inline bool operator>=(const H& a, const H& b) { return float(a) >= float(b); }
LV_EMU_HALF_OPS(__half)
LV_EMU_HALF_OPS(__nv_bfloat16)
#undef LV_EMU_HALF_OPS
inline __half __hadd(__half a, __half b) { return a + b; }
inline __half __hsub(__half a, __half b) { return a - b; }
inline __half __hmul(__half a, __half b) { return a * b; }
inline __half __hneg(__half a) { return -a; }
inline __half __hmax(__half a, __half b) { return float(a) >= float(b) ? a : b; }
inline __half __hmin(__half a, __half b) { return float(a) <= float(b) ? a : b; }
inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return a + b; }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return a - b; }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return a * b; }
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return -a; }
inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) >= float(b) ? a : b; }
inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) { return float(a) <= float(b) ? a : b; }

// ---------------------------------------------------------------------------------------------------------------
// Math intrinsics (exact libm versions)
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __powf(float a, float b) { return std::pow(a, b); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : (x != x ? 0.0f : x)); }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float2int_rn(float f) { return static_cast<int>(std::nearbyint(f)); }
inline int __float2int_rz(float f) { return static_cast<int>(f); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((uint64_t(a) * b) >> 32); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(b) < static_cast<C>(a) ? static_cast<C>(b) : static_cast<C>(a);
}
template <class A, class B, std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>, int> = 0>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    return static_cast<C>(a) < static_cast<C>(b) ? static_cast<C>(b) : static_cast<C>(a);
}
inline void __threadfence() {}
inline void __threadfence_block() {}
// Atomics: one OS thread runs all fibers, and a fiber is never interrupted between two instructions.
template <class T> inline T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <class T> inline T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <class T> inline T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <class T> inline T atomicMax(T* p, T v) { T o = *p; if (o < v) *p = v; return o; }
template <class T> inline T atomicMin(T* p, T v) { T o = *p; if (v < o) *p = v; return o; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }

// ---------------------------------------------------------------------------------------------------------------
// Fiber machinery
#ifndef LV_EMU_USE_UCONTEXT
// void lv_emu_ctx_switch(void** save_sp, void* new_sp): saves callee-saved registers + MXCSR/x87 control word on
// the current stack, stores the stack pointer in *save_sp, switches to new_sp and restores the same from there.
__asm__(R"(
    .pushsection .text
    .weak lv_emu_ctx_switch
    .type lv_emu_ctx_switch, @function
lv_emu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size lv_emu_ctx_switch, .-lv_emu_ctx_switch
    .popsection
)");
extern "C" void lv_emu_ctx_switch(void** save_sp, void* new_sp);
#endif

namespace lv_emu {
inline size_t max_dynamic_smem = 227 * 1024;

namespace detail {
enum State : int { READY, WAIT_BLOCK, WAIT_WARP, DONE };

struct Fiber {
    void* sp = nullptr; // saved stack pointer (x86-64 path)
#ifdef LV_EMU_USE_UCONTEXT
    ucontext_t uc;
#endif
    char* stack = nullptr; // usable stack base (above the guard page)
    size_t stack_size = 0;
    int state = READY;
    const unsigned* wait_ptr = nullptr;
    unsigned wait_val = 0;
    uint3 tid{0, 0, 0};
    int lane = 0, warp = 0;
    int linear = 0;
};

struct Warp {
    unsigned exist = 0;    // lanes present in this warp
    unsigned arrived = 0;  // lanes arrived at the current episode
    unsigned expected = 0; // mask of the current episode
    unsigned gen = 0;
    uint64_t buf[2][32];
};

struct Emu {
    std::mutex launch_mutex;
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    int nthreads = 0;
    int cur = -1;
    void* sched_sp = nullptr;
#ifdef LV_EMU_USE_UCONTEXT
    ucontext_t sched_uc;
#endif
    unsigned block_arrived = 0, block_gen = 0;
    int block_acc[2] = {0, 0};
    void (*invoke)(void*) = nullptr;
    void* invoke_arg = nullptr;
    unsigned char* dsmem = nullptr;
    size_t dsmem_size = 0;
    std::string kernel_name;
    std::atomic<uint64_t> progress{0};
    std::atomic<int> in_launch{0};
    std::atomic<unsigned> cur_block[3] = {0, 0, 0};
    std::atomic<int> cur_thread{-1};
    pid_t watchdog_pid = 0;
    const void* kernel_fn = nullptr;
};
inline Emu g;

[[noreturn]] inline void die() {
    std::fflush(stdout);
    std::fflush(stderr);
    std::abort();
}

inline std::string name_of(const void* fn);
inline void where(FILE* f) {
    if (g.kernel_name.empty()) g.kernel_name = name_of(g.kernel_fn);
    std::fprintf(f, "kernel %s, grid (%u,%u,%u) block (%u,%u,%u), blockIdx (%u,%u,%u)", g.kernel_name.c_str(),
                 gridDim.x, gridDim.y, gridDim.z, blockDim.x, blockDim.y, blockDim.z, blockIdx.x, blockIdx.y,
                 blockIdx.z);
}

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "lv_emu: %s\n  in ", what);
    where(stderr);
    if (g.cur >= 0) {
        const Fiber& f = g.fibers[g.cur];
        std::fprintf(stderr, ", threadIdx (%u,%u,%u)", f.tid.x, f.tid.y, f.tid.z);
    }
    std::fprintf(stderr, "\n");
    die();
}

inline void switch_to_scheduler(Fiber& f) {
    g.progress.fetch_add(1, std::memory_order_relaxed);
#ifdef LV_EMU_USE_UCONTEXT
    swapcontext(&f.uc, &g.sched_uc);
#else
    lv_emu_ctx_switch(&f.sp, g.sched_sp);
#endif
}

inline void wait_on(const unsigned* p, unsigned val, int kind) {
    Fiber& f = g.fibers[g.cur];
    f.state = kind;
    f.wait_ptr = p;
    f.wait_val = val;
    switch_to_scheduler(f);
}

inline void fiber_main() {
    Fiber& f = g.fibers[g.cur];
    g.invoke(g.invoke_arg);
    f.state = DONE;
    switch_to_scheduler(f);
    std::fprintf(stderr, "lv_emu: finished fiber resumed\n");
    die();
}

inline size_t stack_bytes() {
    static const size_t s = [] {
        const char* e = std::getenv("LV_EMU_STACK_KB");
        size_t kb = e ? std::strtoul(e, nullptr, 10) : 512;
        if (kb < 64) kb = 64;
        return kb * 1024;
    }();
    return s;
}

inline void ensure_fibers(int n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t size = (stack_bytes() + page - 1) / page * page;
    while (static_cast<int>(g.fibers.size()) < n) {
        Fiber f;
        void* m = mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1,
                       0);
        if (m == MAP_FAILED) {
            std::fprintf(stderr, "lv_emu: mmap of a fiber stack failed\n");
            die();
        }
        mprotect(m, page, PROT_NONE); // guard page: a stack overflow faults instead of corrupting memory
        f.stack = static_cast<char*>(m) + page;
        f.stack_size = size;
        g.fibers.push_back(f);
    }
}

inline void start_fiber(Fiber& f) {
#ifdef LV_EMU_USE_UCONTEXT
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = f.stack_size;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
#else
    // Initial frame popped by lv_emu_ctx_switch: [mxcsr, fpucw][r15 r14 r13 r12 rbx rbp][ret = fiber_main][0].
    uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
    uint64_t* s = reinterpret_cast<uint64_t*>(top);
    s[-1] = 0;                                                  // fake return address of fiber_main
    s[-2] = reinterpret_cast<uint64_t>(&fiber_main);            // popped by ret
    for (int i = 3; i <= 8; ++i) s[-i] = 0;                     // callee-saved registers
    s[-9] = 0x1F80ull | (0x037Full << 32);                      // MXCSR default, x87 control word default
    f.sp = &s[-9];
#endif
}

inline void resume(Fiber& f) {
#ifdef LV_EMU_USE_UCONTEXT
    swapcontext(&g.sched_uc, &f.uc);
#else
    lv_emu_ctx_switch(&g.sched_sp, f.sp);
#endif
}

inline const char* state_name(int s) {
    switch (s) {
    case READY: return "runnable";
    case WAIT_BLOCK: return "waiting at __syncthreads";
    case WAIT_WARP: return "waiting at a warp op (__syncwarp/__shfl*/vote)";
    default: return "exited";
    }
}

[[noreturn]] inline void report_deadlock() {
    std::fprintf(stderr, "lv_emu: DEADLOCK: no thread can proceed\n  in ");
    g.cur = -1;
    where(stderr);
    std::fprintf(stderr, "\n  (a barrier not reached by all threads of the block / lanes of the mask, or a thread "
                         "exited while others wait)\n");
    int shown = 0;
    for (int i = 0; i < g.nthreads && shown < 64; ++i) {
        const Fiber& f = g.fibers[i];
        // print runs of equal state compactly
        int j = i;
        while (j + 1 < g.nthreads && g.fibers[j + 1].state == f.state) ++j;
        std::fprintf(stderr, "  threads %d..%d: %s\n", i, j, state_name(f.state));
        i = j;
        ++shown;
    }
    if (g.block_arrived)
        std::fprintf(stderr, "  __syncthreads: %u of %d threads arrived\n", g.block_arrived, g.nthreads);
    die();
}

inline void watchdog_loop() {
    const char* e = std::getenv("LV_EMU_WATCHDOG_S");
    const long limit = e ? std::strtol(e, nullptr, 10) : 20;
    uint64_t last = g.progress.load();
    auto since = std::chrono::steady_clock::now();
    for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(250));
        const uint64_t p = g.progress.load(std::memory_order_relaxed);
        const auto now = std::chrono::steady_clock::now();
        if (p != last || !g.in_launch.load()) {
            last = p;
            since = now;
            continue;
        }
        if (limit > 0 && now - since > std::chrono::seconds(limit)) {
            if (g.kernel_name.empty()) g.kernel_name = name_of(g.kernel_fn);
            std::fprintf(stderr,
                         "lv_emu: WATCHDOG: kernel %s made no progress for %ld s (blockIdx (%u,%u,%u), linear thread "
                         "%d stuck: infinite loop / spin-wait?)\n",
                         g.kernel_name.c_str(), limit, g.cur_block[0].load(), g.cur_block[1].load(),
                         g.cur_block[2].load(), g.cur_thread.load());
            die();
        }
    }
}

inline void run_block() {
    const int n = g.nthreads;
    for (int i = 0; i < n; ++i) {
        Fiber& f = g.fibers[i];
        f.state = READY;
        start_fiber(f);
    }
    g.block_arrived = 0;
    for (auto& w : g.warps) w.arrived = 0;
    if (g.dsmem_size) std::memset(g.dsmem, 0xFF, g.dsmem_size);
    int done = 0;
    while (done < n) {
        bool progressed = false;
        for (int i = 0; i < n; ++i) {
            Fiber& f = g.fibers[i];
            if (f.state == DONE) continue;
            if (f.state != READY) {
                if (*f.wait_ptr == f.wait_val) continue; // its barrier has not been released
                f.state = READY;
            }
            g.cur = i;
            threadIdx = f.tid;
            g.cur_thread.store(i, std::memory_order_relaxed);
            resume(f);
            progressed = true;
            if (f.state == DONE) ++done;
        }
        if (!progressed) report_deadlock();
    }
    g.cur = -1;
    g.progress.fetch_add(1, std::memory_order_relaxed);
}

// Symbol name of a function: dladdr (exported symbols), else the executable's own .symtab (read on error paths only).
inline std::string elf_symbol(const char* path, uintptr_t offset, uintptr_t abs) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return "";
    std::vector<char> file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    if (file.size() < sizeof(Elf64_Ehdr) || std::memcmp(file.data(), ELFMAG, SELFMAG) != 0 ||
        file[EI_CLASS] != ELFCLASS64)
        return "";
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(file.data());
    if (eh->e_shoff + size_t(eh->e_shnum) * sizeof(Elf64_Shdr) > file.size()) return "";
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(file.data() + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB || sh[i].sh_link >= eh->e_shnum) continue;
        const Elf64_Shdr& strs = sh[sh[i].sh_link];
        if (sh[i].sh_offset + sh[i].sh_size > file.size() || strs.sh_offset + strs.sh_size > file.size()) continue;
        const auto* sym = reinterpret_cast<const Elf64_Sym*>(file.data() + sh[i].sh_offset);
        const size_t n = sh[i].sh_size / sizeof(Elf64_Sym);
        for (size_t k = 0; k < n; ++k) {
            if (ELF64_ST_TYPE(sym[k].st_info) != STT_FUNC || sym[k].st_name >= strs.sh_size) continue;
            const uintptr_t want = eh->e_type == ET_DYN ? offset : abs;
            if (sym[k].st_value == want) return std::string(file.data() + strs.sh_offset + sym[k].st_name);
        }
    }
    return "";
}
inline std::string name_of(const void* fn) {
    Dl_info info;
    if (dladdr(fn, &info)) {
        if (info.dli_sname) return info.dli_sname;
        if (info.dli_fname && info.dli_fbase) {
            const uintptr_t off = reinterpret_cast<uintptr_t>(fn) - reinterpret_cast<uintptr_t>(info.dli_fbase);
            std::string s = elf_symbol("/proc/self/exe", off, reinterpret_cast<uintptr_t>(fn));
            if (!s.empty()) return s;
        }
    }
    char buf[64];
    std::snprintf(buf, sizeof buf, "kernel@%p", fn);
    return buf;
}

template <class Tuple, class K> struct Invoker {
    K k;
    Tuple* args;
    static void call(void* p) {
        auto* self = static_cast<Invoker*>(p);
        std::apply(self->k, *self->args); // each thread gets its own by-value copies (parameters are by value)
    }
};

template <class... P, class... A>
void launch_impl(std::string name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "lv_emu::launch: wrong number of kernel arguments");
    std::lock_guard<std::mutex> lock(g.launch_mutex);
    if (g.watchdog_pid != getpid()) { // one watchdog per process (a forked child needs its own)
        g.watchdog_pid = getpid();
        std::thread(watchdog_loop).detach();
    }
    g.kernel_name = std::move(name); // empty: resolved from kernel_fn when a message needs it
    g.kernel_fn = reinterpret_cast<const void*>(kernel);
    gridDim = grid;
    blockDim = block;
    blockIdx = uint3{0, 0, 0};
    g.cur = -1;
    const long long nt = static_cast<long long>(block.x) * block.y * block.z;
    if (nt <= 0 || nt > 1024) fail("launch: blockDim.x*y*z must be in [1, 1024]");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
        fail("launch: invalid grid dimensions");
    if (smem > max_dynamic_smem) fail("launch: dynamic shared memory above lv_emu::max_dynamic_smem (227 KiB)");
    g.nthreads = static_cast<int>(nt);
    ensure_fibers(g.nthreads);
    for (int i = 0; i < g.nthreads; ++i) {
        Fiber& f = g.fibers[i];
        f.linear = i;
        f.tid = uint3{static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
                      static_cast<unsigned>(i) / (block.x * block.y)};
        f.lane = i % 32;
        f.warp = i / 32;
    }
    const int nw = (g.nthreads + 31) / 32;
    g.warps.assign(nw, Warp{});
    for (int w = 0; w < nw; ++w) {
        const int lanes = std::min(32, g.nthreads - 32 * w);
        g.warps[w].exist = lanes == 32 ? 0xffffffffu : ((1u << lanes) - 1u);
    }
    unsigned char* buf = nullptr;
    if (smem) {
        buf = static_cast<unsigned char*>(std::aligned_alloc(128, (smem + 127) / 128 * 128));
        if (!buf) fail("launch: out of memory for dynamic shared memory");
    }
    g.dsmem = buf;
    g.dsmem_size = smem;
    std::tuple<std::decay_t<P>...> tup(std::forward<A>(args)...);
    using Inv = Invoker<decltype(tup), void (*)(P...)>;
    Inv inv{kernel, &tup};
    g.invoke = &Inv::call;
    g.invoke_arg = &inv;
    g.in_launch.store(1);
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = uint3{x, y, z};
                g.cur_block[0].store(x, std::memory_order_relaxed);
                g.cur_block[1].store(y, std::memory_order_relaxed);
                g.cur_block[2].store(z, std::memory_order_relaxed);
                run_block();
            }
    g.in_launch.store(0);
    std::free(buf);
    g.dsmem = nullptr;
    g.dsmem_size = 0;
}

inline Fiber& self() {
    if (g.cur < 0) {
        std::fprintf(stderr, "lv_emu: a device-side function was called outside lv_emu::launch\n");
        die();
    }
    return g.fibers[g.cur];
}

// Warp barrier over (mask & existing lanes); returns the episode number (its parity selects the exchange buffer).
inline unsigned warp_arrive(unsigned mask, uint64_t value) {
    Fiber& f = self();
    Warp& w = g.warps[f.warp];
    const unsigned eff = mask & w.exist;
    const unsigned bit = 1u << f.lane;
    if (!(eff & bit)) fail("warp op called by a lane that is not in its mask");
    if (w.arrived == 0)
        w.expected = eff;
    else if (w.expected != eff)
        fail("concurrent warp ops with different masks in one warp (the emulator supports one mask at a time)");
    const unsigned gen = w.gen;
    w.buf[gen & 1][f.lane] = value;
    w.arrived |= bit;
    if (w.arrived == eff) {
        w.arrived = 0;
        ++w.gen;
        return gen;
    }
    wait_on(&w.gen, gen, WAIT_WARP);
    return gen;
}

template <class T> inline uint64_t to_u64(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}
template <class T> inline T from_u64(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}
template <class T> inline T shfl_from(unsigned mask, T v, int src) {
    Fiber& f = self();
    const unsigned gen = warp_arrive(mask, to_u64(v));
    const Warp& w = g.warps[f.warp];
    if (src < 0 || src > 31 || !((mask & w.exist) >> src & 1u)) return v;
    return from_u64<T>(w.buf[gen & 1][src]);
}
} // namespace detail

// Launch (see top of file). Arguments are converted to the kernel's parameter types.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes, A&&... args) {
    detail::launch_impl(std::string(), kernel, grid, block,
                        dynamic_smem_bytes, std::forward<A>(args)...);
}
template <class... P, class... A>
void launch_named(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                  A&&... args) {
    detail::launch_impl(name, kernel, grid, block, dynamic_smem_bytes, std::forward<A>(args)...);
}

inline unsigned char* dynamic_smem() {
    detail::self();
    return detail::g.dsmem;
}

[[noreturn]] inline void trap(const char* file, int line) {
    char msg[512];
    std::snprintf(msg, sizeof msg, "lv_trap() at %s:%d (violated launch precondition)", file, line);
    detail::fail(msg);
}
} // namespace lv_emu

// ---------------------------------------------------------------------------------------------------------------
// Barriers, shuffles, votes
inline void __syncthreads() {
    using namespace lv_emu::detail;
    self();
    const unsigned gen = g.block_gen;
    if (++g.block_arrived == static_cast<unsigned>(g.nthreads)) {
        g.block_arrived = 0;
        ++g.block_gen;
        return;
    }
    wait_on(&g.block_gen, gen, WAIT_BLOCK);
}
inline int lv_emu_syncthreads_count(int pred) {
    using namespace lv_emu::detail;
    self();
    const unsigned gen = g.block_gen;
    if (g.block_arrived == 0) g.block_acc[gen & 1] = 0;
    g.block_acc[gen & 1] += pred != 0;
    if (++g.block_arrived == static_cast<unsigned>(g.nthreads)) {
        g.block_arrived = 0;
        ++g.block_gen;
    } else {
        wait_on(&g.block_gen, gen, WAIT_BLOCK);
    }
    return g.block_acc[gen & 1];
}
inline int __syncthreads_count(int pred) { return lv_emu_syncthreads_count(pred); }
inline int __syncthreads_or(int pred) { return lv_emu_syncthreads_count(pred) != 0; }
inline int __syncthreads_and(int pred) { return lv_emu_syncthreads_count(pred) == lv_emu::detail::g.nthreads; }
inline void __syncwarp(unsigned mask = 0xffffffffu) { lv_emu::detail::warp_arrive(mask, 0); }
inline unsigned __activemask() { return lv_emu::detail::g.warps[lv_emu::detail::self().warp].exist; }
inline unsigned __ballot_sync(unsigned mask, int pred) {
    using namespace lv_emu::detail;
    Fiber& f = self();
    const unsigned gen = warp_arrive(mask, pred != 0);
    const Warp& w = g.warps[f.warp];
    const unsigned eff = mask & w.exist;
    unsigned r = 0;
    for (int l = 0; l < 32; ++l)
        if ((eff >> l & 1u) && w.buf[gen & 1][l]) r |= 1u << l;
    return r;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
    using namespace lv_emu::detail;
    const unsigned eff = mask & g.warps[self().warp].exist;
    return __ballot_sync(mask, pred) == eff;
}
template <class T> inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32) {
    const int lane = lv_emu::detail::self().lane;
    const int src = (lane & ~(width - 1)) + (srcLane & (width - 1));
    return lv_emu::detail::shfl_from(mask, var, src);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32) {
    const int lane = lv_emu::detail::self().lane;
    int src = lane ^ laneMask;
    if (src >= (lane / width + 1) * width) src = lane;
    return lv_emu::detail::shfl_from(mask, var, src);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const int lane = lv_emu::detail::self().lane;
    const int src = (lane % width) + static_cast<int>(delta) >= width ? lane : lane + static_cast<int>(delta);
    return lv_emu::detail::shfl_from(mask, var, src);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32) {
    const int lane = lv_emu::detail::self().lane;
    const int src = (lane % width) < static_cast<int>(delta) ? lane : lane - static_cast<int>(delta);
    return lv_emu::detail::shfl_from(mask, var, src);
}

// ---------------------------------------------------------------------------------------------------------------
// WMMA subset (m16n16k16; every lane holds the whole tile, element i = row-major (i/16, i%16) of the M x K, K x N or
// M x N tile — kernels must not rely on that)
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void> struct fragment {
    static_assert(M == 16 && N == 16 && K == 16, "lv_emu WMMA: only m16n16k16");
    static_assert(std::is_same_v<Use, accumulator> ? std::is_same_v<T, float>
                                                   : (std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>),
                  "lv_emu WMMA: A/B in __half or __nv_bfloat16, accumulator float");
    static_assert(std::is_same_v<Use, accumulator> == std::is_same_v<Layout, void>,
                  "lv_emu WMMA: A/B need row_major/col_major, accumulator no layout");
    using element_type = T;
    using storage_element_type = T;
    static constexpr int num_elements = 256;
    T x[num_elements];
};

template <class Use, int M, int N, int K, class T, class L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const std::type_identity_t<T>& v) {
    for (int i = 0; i < 256; ++i) f.x[i] = v;
}
// The hardware's rules for WMMA memory operands (CUDA C++ Programming Guide, "Warp Matrix Functions"): the pointer
// 256-bit (32-byte) aligned, ldm a multiple of 16 bytes (8 halves / 4 floats). A GPU gives undefined results or a
// misaligned-address fault otherwise; the emulator would not notice, so it checks them.
template <class T> inline void check_wmma_operand(const T* p, unsigned ldm, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % 32 != 0) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "%s: pointer %p is not 32-byte aligned (WMMA needs 256-bit alignment)", what,
                      static_cast<const void*>(p));
        lv_emu::detail::fail(msg);
    }
    if ((size_t(ldm) * sizeof(T)) % 16 != 0) {
        char msg[160];
        std::snprintf(msg, sizeof msg, "%s: ldm %u elements is not a multiple of 16 bytes", what, ldm);
        lv_emu::detail::fail(msg);
    }
}
// A: element (r,k) at p[r*ldm+k] (row_major) / p[k*ldm+r] (col_major); B: (k,n) at p[k*ldm+n] / p[n*ldm+k].
template <class T, class L>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    lv_emu::detail::self();
    check_wmma_operand(p, ldm, "load_matrix_sync(matrix_a)");
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = std::is_same_v<L, row_major> ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}
template <class T, class L>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
    lv_emu::detail::self();
    check_wmma_operand(p, ldm, "load_matrix_sync(matrix_b)");
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = std::is_same_v<L, row_major> ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p, unsigned ldm,
                             layout_t layout) {
    lv_emu::detail::self();
    check_wmma_operand(p, ldm, "load_matrix_sync(accumulator)");
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c)
            f.x[r * 16 + c] = layout == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
}
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
    using namespace lv_emu::detail;
    const Fiber& me = self();
    check_wmma_operand(p, ldm, "store_matrix_sync");
    const unsigned exist = g.warps[me.warp].exist;
    if (me.lane != 31 - __builtin_clz(exist)) return; // the last lane of the warp writes
    for (int r = 0; r < 16; ++r)
        for (int c = 0; c < 16; ++c) {
            if (layout == mem_row_major)
                p[size_t(r) * ldm + c] = f.x[r * 16 + c];
            else
                p[size_t(c) * ldm + r] = f.x[r * 16 + c];
        }
}
template <class T, class LA, class LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
    lv_emu::detail::self();
    float A[256], B[256], D[256];
    for (int i = 0; i < 256; ++i) {
        A[i] = static_cast<float>(a.x[i]);
        B[i] = static_cast<float>(b.x[i]);
    }
    for (int r = 0; r < 16; ++r) {
        float acc[16];
        for (int n = 0; n < 16; ++n) acc[n] = c.x[r * 16 + n];
        for (int k = 0; k < 16; ++k) {
            const float av = A[r * 16 + k];
            for (int n = 0; n < 16; ++n) acc[n] += av * B[k * 16 + n]; // product exact in f32
        }
        for (int n = 0; n < 16; ++n) D[r * 16 + n] = acc[n];
    }
    for (int i = 0; i < 256; ++i) d.x[i] = D[i];
}
} // namespace wmma
} // namespace nvcuda
