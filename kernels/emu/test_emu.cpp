// Self-test of the CPU emulator (kernels/emu/cuda_emu.hpp via kernels/common.cuh): barriers, warp ops, dynamic
// shared memory, f16/bf16 conversions, WMMA against a plain matmul, deadlock/trap reporting.
#include "common.cuh"

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <sys/wait.h>
#include <vector>

static int g_failures = 0;
#define CHECK(cond, ...)                                                                                               \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            std::printf("FAIL %s:%d: ", __FILE__, __LINE__);                                                           \
            std::printf(__VA_ARGS__);                                                                                  \
            std::printf("\n");                                                                                         \
            ++g_failures;                                                                                              \
        }                                                                                                              \
    } while (0)

// --- barrier + indices -------------------------------------------------------------------------------------------
extern "C" __global__ void k_barrier(int* out, int rounds) {
    __shared__ int s[1024];
    const int n = blockDim.x * blockDim.y * blockDim.z;
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int acc = 0;
    for (int r = 0; r < rounds; ++r) {
        s[t] = t * 7 + r + b;
        __syncthreads();
        acc += s[(t + r + 1) % n]; // written by another thread before the barrier
        __syncthreads();
    }
    out[(long long)b * n + t] = acc;
}

static void test_barrier() {
    const dim3 grids[] = {dim3(3, 2, 2), dim3(1), dim3(5)};
    const dim3 blocks[] = {dim3(256), dim3(8, 4, 3), dim3(100), dim3(1)};
    for (dim3 gr : grids)
        for (dim3 bl : blocks) {
            const int n = bl.x * bl.y * bl.z, nb = gr.x * gr.y * gr.z, rounds = 5;
            std::vector<int> out((size_t)n * nb, -1);
            lv_emu::launch(k_barrier, gr, bl, 0, out.data(), rounds);
            int bad = 0;
            for (int b = 0; b < nb; ++b)
                for (int t = 0; t < n; ++t) {
                    int e = 0;
                    for (int r = 0; r < rounds; ++r) e += ((t + r + 1) % n) * 7 + r + b;
                    bad += out[(size_t)b * n + t] != e;
                }
            CHECK(bad == 0, "barrier: %d wrong for block (%u,%u,%u) grid (%u,%u,%u)", bad, bl.x, bl.y, bl.z, gr.x, gr.y,
                  gr.z);
        }
}

// --- syncthreads_count / warp ops ---------------------------------------------------------------------------------
extern "C" __global__ void k_warp(float* out, int* iout) {
    const int t = threadIdx.x;
    const int lane = t % 32;
    float v = (float)(t + 1);
    float sum = v;
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    float bcast = __shfl_sync(0xffffffffu, v, 5);
    float down = __shfl_down_sync(0xffffffffu, v, 3);
    float up = __shfl_up_sync(0xffffffffu, v, 2);
    float x16 = __shfl_xor_sync(0xffffffffu, v, 8, 16);
    float sub = __shfl_sync(0xffffffffu, v, 3, 8);
    double dv = __shfl_xor_sync(0xffffffffu, (double)t * 0.5, 1);
    __half hv = __shfl_xor_sync(0xffffffffu, __float2half((float)t), 2);
    unsigned bal = __ballot_sync(0xffffffffu, lane % 3 == 0);
    int cnt = __syncthreads_count(t % 5 == 0);
    int any = __any_sync(0xffffffffu, lane == 7);
    int all = __all_sync(0xffffffffu, lane < 100);
    __syncwarp();
    float* o = out + t * 8;
    o[0] = sum;
    o[1] = bcast;
    o[2] = down;
    o[3] = up;
    o[4] = x16;
    o[5] = sub;
    o[6] = (float)dv;
    o[7] = __half2float(hv);
    int* io = iout + t * 4;
    io[0] = (int)bal;
    io[1] = cnt;
    io[2] = any;
    io[3] = all;
}

static void test_warp() {
    for (int n : {64, 48, 32, 7}) {
        std::vector<float> out(n * 8);
        std::vector<int> iout(n * 4);
        lv_emu::launch(k_warp, dim3(2), dim3(n), 0, out.data(), iout.data());
        int bad = 0;
        for (int t = 0; t < n; ++t) {
            const int w0 = t / 32 * 32, lanes = std::min(32, n - w0), lane = t % 32;
            auto val = [&](int l) { return (float)(w0 + l + 1); };
            float sum = 0;
            // xor butterfly over a partial warp: a lane whose partner does not exist keeps its own value
            std::vector<float> s(32);
            for (int l = 0; l < lanes; ++l) s[l] = val(l);
            for (int o = 16; o > 0; o >>= 1) {
                std::vector<float> ns(s);
                for (int l = 0; l < lanes; ++l) ns[l] = s[l] + ((l ^ o) < lanes ? s[l ^ o] : s[l]);
                s = ns;
            }
            sum = s[lane];
            auto own_or = [&](int src) { return src < lanes ? val(src) : val(lane); };
            const float e[8] = {sum,
                                own_or(5),
                                lane + 3 < 32 ? own_or(lane + 3) : val(lane),
                                lane >= 2 ? val(lane - 2) : val(lane),
                                own_or((lane ^ 8)),
                                own_or(lane / 8 * 8 + 3),
                                (float)(((t ^ 1) < n ? (t ^ 1) : t) * 0.5),
                                (float)(((t ^ 2) < n && (lane ^ 2) < lanes) ? (t ^ 2) : t)};
            for (int k = 0; k < 8; ++k) {
                if (out[t * 8 + k] != e[k]) {
                    if (bad < 5) std::printf("  warp n=%d t=%d op %d: got %g want %g\n", n, t, k, out[t * 8 + k], e[k]);
                    ++bad;
                }
            }
            unsigned bal = 0;
            for (int l = 0; l < lanes; ++l)
                if (l % 3 == 0) bal |= 1u << l;
            int cnt = 0;
            for (int u = 0; u < n; ++u) cnt += u % 5 == 0;
            bad += iout[t * 4] != (int)bal;
            bad += iout[t * 4 + 1] != cnt;
            bad += iout[t * 4 + 2] != (lanes > 7);
            bad += iout[t * 4 + 3] != 1;
        }
        CHECK(bad == 0, "warp ops: %d wrong (block %d)", bad, n);
    }
}

// --- dynamic shared memory ----------------------------------------------------------------------------------------
extern "C" __global__ void k_dsmem(int* out, int bytes) {
    LV_DYNAMIC_SMEM(smem);
    const int t = threadIdx.x;
    int poisoned = 1;
    for (int i = t; i < bytes; i += blockDim.x) poisoned &= smem[i] == 0xFF;
    __syncthreads();
    for (int i = t; i < bytes; i += blockDim.x) smem[i] = (unsigned char)(i + blockIdx.x);
    __syncthreads();
    int ok = 1;
    for (int i = t; i < bytes; i += blockDim.x) ok &= smem[(bytes - 1 - i)] == (unsigned char)(bytes - 1 - i + blockIdx.x);
    float* f = reinterpret_cast<float*>(smem);
    const int nan = f[0] != f[0]; // poison must be gone now, but check the float view works
    out[blockIdx.x * blockDim.x + t] =
        poisoned + 2 * ok + 4 * ((reinterpret_cast<uintptr_t>(smem) % 16) == 0) + 8 * (nan == 0);
}

extern "C" __global__ void k_read_poison(float* out) {
    LV_DYNAMIC_SMEM(smem);
    out[threadIdx.x] = reinterpret_cast<float*>(smem)[threadIdx.x];
    const __half h = reinterpret_cast<__half*>(smem)[threadIdx.x];
    const __nv_bfloat16 b = reinterpret_cast<__nv_bfloat16*>(smem)[threadIdx.x];
    out[32 + threadIdx.x] = lv_to_float(h) + lv_to_float(b);
}

static void test_dsmem() {
    const int bytes = 1000, n = 96, nb = 3;
    std::vector<int> out(n * nb);
    lv_emu::launch(k_dsmem, dim3(nb), dim3(n), bytes, out.data(), bytes);
    int bad = 0;
    for (int v : out) bad += v != 15;
    CHECK(bad == 0, "dynamic smem: %d threads saw wrong poison/contents/alignment", bad);
    std::vector<float> f(64, 0.f);
    lv_emu::launch(k_read_poison, dim3(1), dim3(32), 128, f.data());
    bad = 0;
    for (float v : f) bad += !(v != v);
    CHECK(bad == 0, "uninitialised dynamic smem does not read as NaN (%d)", bad);
}

// --- conversions --------------------------------------------------------------------------------------------------
// Reference: round double x to a format with `mant` explicit mantissa bits, min normal exponent emin, max finite mx.
static double round_ref(double x, int mant, int emin, double maxfinite) {
    if (x != x) return x;
    const double ax = std::fabs(x);
    int e;
    std::frexp(ax, &e); // ax = f * 2^e, f in [0.5, 1)
    int ex = e - 1;
    if (ex < emin) ex = emin;
    const double ulp = std::ldexp(1.0, ex - mant);
    double q = std::nearbyint(ax / ulp) * ulp; // ties to even (default rounding mode)
    const double overflow = maxfinite + std::ldexp(1.0, std::ilogb(maxfinite) - mant) * 0.5; // halfway to next
    if (ax >= overflow) q = INFINITY;
    return std::copysign(q, x);
}

static void test_conversions() {
    int bad = 0;
    // exhaustive half -> float -> half round trip and bf16 likewise
    for (uint32_t i = 0; i < 65536; ++i) {
        const __half h = __ushort_as_half((unsigned short)i);
        const float f = __half2float(h);
        const unsigned short back = __half_as_ushort(__float2half_rn(f));
        const bool nan = ((i >> 10) & 31) == 31 && (i & 1023);
        if (nan ? !(f != f) || back != 0x7fff : back != i) ++bad;
        const __nv_bfloat16 b = __ushort_as_bfloat16((unsigned short)i);
        const float fb = __bfloat162float(b);
        const bool bnan = ((i >> 7) & 255) == 255 && (i & 127);
        const unsigned short bb = __bfloat16_as_ushort(__float2bfloat16_rn(fb));
        if (bnan ? !(fb != fb) || bb != 0x7fff : bb != i) ++bad;
    }
    CHECK(bad == 0, "conversion round trips: %d wrong", bad);
    // random floats (wide exponent range, incl. subnormal halves and midpoints) vs the double reference
    std::mt19937_64 rng(7);
    bad = 0;
    for (int it = 0; it < 2000000; ++it) {
        float f;
        if (it % 4 == 0) { // exact midpoints between adjacent halves / bf16
            const uint16_t h = (uint16_t)(rng() & 0x7bff);
            const double a = __half2float(__ushort_as_half(h)), b = __half2float(__ushort_as_half((uint16_t)(h + 1)));
            f = (float)((a + b) / 2);
            if (rng() & 1) f = -f;
        } else {
            uint32_t u = (uint32_t)rng();
            const int e = 127 + (int)(rng() % 60) - 40; // 2^-40 .. 2^19
            u = (u & 0x807fffffu) | ((uint32_t)e << 23);
            f = lv_emu::bits_f32(u);
        }
        const double rh = round_ref(f, 10, -14, 65504.0);
        const double rb = round_ref(f, 7, -126, 3.3895313892515355e38);
        if ((double)__half2float(__float2half_rn(f)) != rh) {
            if (bad < 5) std::printf("  half(%a) = %a, want %a\n", f, __half2float(__float2half_rn(f)), rh);
            ++bad;
        }
        if ((double)__bfloat162float(__float2bfloat16_rn(f)) != rb) {
            if (bad < 5) std::printf("  bf16(%a) = %a, want %a\n", f, __bfloat162float(__float2bfloat16_rn(f)), rb);
            ++bad;
        }
    }
    const float specials[] = {INFINITY, -INFINITY, 65504.f, 65519.99f, 65520.f, -65520.f, 1e-8f, 2.98023224e-8f,
                              2.98023253e-8f, 5.96046448e-8f, -0.0f, 0.0f, 3.4e38f, 3.40282347e38f};
    for (float f : specials) {
        if ((double)__half2float(__float2half(f)) != round_ref(f, 10, -14, 65504.0)) ++bad;
        if ((double)__bfloat162float(__float2bfloat16(f)) != round_ref(f, 7, -126, 3.3895313892515355e38)) ++bad;
    }
    CHECK(std::signbit(__half2float(__float2half(-0.0f))), "half(-0) lost its sign");
    CHECK(__half_as_ushort(__float2half(NAN)) == 0x7fff && __bfloat16_as_ushort(__float2bfloat16(-NAN)) == 0x7fff,
          "NaN not canonical");
    CHECK(bad == 0, "float -> half/bf16 rounding: %d wrong", bad);
    CHECK(lv_to_float(lv_from_float<__half>(1.0f / 3)) == __half2float(__float2half_rn(1.0f / 3)) &&
              lv_to_float(lv_from_float<__nv_bfloat16>(1.0f / 3)) == __bfloat162float(__float2bfloat16_rn(1.0f / 3)) &&
              lv_from_float<float>(0.25f) == 0.25f,
          "lv_to_float/lv_from_float");
}

// --- WMMA ---------------------------------------------------------------------------------------------------------
// C[M x N] = A[M x K] * B[K x N]; A stored row- or col-major, B likewise; one warp per 16x16 output tile, K tiled.
template <class T, class LA, class LB>
__global__ void k_wmma(const T* A, const T* B, float* C, int M, int N, int K) {
    using namespace nvcuda;
    const int warp = threadIdx.x / 32, nwn = N / 16;
    const int tm = warp / nwn, tn = warp % nwn;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> b;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    constexpr bool arow = std::is_same_v<LA, wmma::row_major>, brow = std::is_same_v<LB, wmma::row_major>;
    for (int k = 0; k < K; k += 16) {
        wmma::load_matrix_sync(a, arow ? A + (size_t)tm * 16 * K + k : A + (size_t)k * M + tm * 16, arow ? K : M);
        wmma::load_matrix_sync(b, brow ? B + (size_t)k * N + tn * 16 : B + (size_t)tn * 16 * K + k, brow ? N : K);
        wmma::mma_sync(c, a, b, c);
    }
    for (int i = 0; i < c.num_elements; ++i) c.x[i] *= 2.0f; // layout-agnostic element-wise use
    LV_DYNAMIC_SMEM(smem);
    float* stage = reinterpret_cast<float*>(smem) + warp * 256;
    wmma::store_matrix_sync(stage, c, 16, wmma::mem_col_major);
    __syncwarp();
    const int lane = threadIdx.x % 32;
    for (int i = lane; i < 256; i += 32) { // element (r, n) at stage[n * 16 + r]
        const int r = i % 16, n = i / 16;
        C[(size_t)(tm * 16 + r) * N + tn * 16 + n] = stage[i];
    }
    // accumulator load/store round trip, row-major straight to global memory
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> d;
    __syncwarp();
    wmma::load_matrix_sync(d, stage, 16, wmma::mem_col_major);
    wmma::store_matrix_sync(C + (size_t)M * N + (size_t)tm * 16 * N + tn * 16, d, N, wmma::mem_row_major);
}

// Device allocations are 256-byte aligned (cudaMalloc); WMMA operands must be 32-byte aligned, which the emulator
// checks, so the host buffers standing in for device memory are aligned the same way.
template <class T> struct DeviceAlloc {
    using value_type = T;
    DeviceAlloc() = default;
    template <class U> DeviceAlloc(const DeviceAlloc<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(std::aligned_alloc(256, (n * sizeof(T) + 255) / 256 * 256)); }
    void deallocate(T* p, size_t) { std::free(p); }
    template <class U> bool operator==(const DeviceAlloc<U>&) const { return true; }
};
template <class T> using dvec = std::vector<T, DeviceAlloc<T>>;

template <class T, class LA, class LB> static void wmma_case(const char* name) {
    const int M = 32, N = 48, K = 64;
    std::mt19937 rng(11);
    std::uniform_real_distribution<float> dist(-2.f, 2.f);
    dvec<T> A(M * K), B(K * N);
    std::vector<float> Af(M * K), Bf(K * N); // logical row-major values
    constexpr bool arow = std::is_same_v<LA, nvcuda::wmma::row_major>,
                   brow = std::is_same_v<LB, nvcuda::wmma::row_major>;
    for (int m = 0; m < M; ++m)
        for (int k = 0; k < K; ++k) {
            const T v = lv_from_float<T>(dist(rng));
            Af[m * K + k] = lv_to_float(v);
            A[arow ? m * K + k : k * M + m] = v;
        }
    for (int k = 0; k < K; ++k)
        for (int n = 0; n < N; ++n) {
            const T v = lv_from_float<T>(dist(rng));
            Bf[k * N + n] = lv_to_float(v);
            B[brow ? k * N + n : n * K + k] = v;
        }
    dvec<float> C(2 * M * N, NAN);
    const int warps = (M / 16) * (N / 16);
    lv_emu::launch(k_wmma<T, LA, LB>, dim3(1), dim3(32 * warps), warps * 256 * sizeof(float), A.data(), B.data(),
                   C.data(), M, N, K);
    double maxerr = 0;
    for (int m = 0; m < M; ++m)
        for (int n = 0; n < N; ++n) {
            double ref = 0;
            for (int k = 0; k < K; ++k) ref += (double)Af[m * K + k] * Bf[k * N + n];
            ref *= 2;
            maxerr = std::max(maxerr, std::fabs(C[m * N + n] - ref));
            maxerr = std::max(maxerr, std::fabs(C[M * N + m * N + n] - ref));
        }
    CHECK(maxerr < 1e-4, "wmma %s: max error %g", name, maxerr);
}

static void test_wmma() {
    using namespace nvcuda;
    wmma_case<__half, wmma::row_major, wmma::row_major>("f16 rr");
    wmma_case<__half, wmma::row_major, wmma::col_major>("f16 rc");
    wmma_case<__half, wmma::col_major, wmma::row_major>("f16 cr");
    wmma_case<__nv_bfloat16, wmma::row_major, wmma::col_major>("bf16 rc");
    wmma_case<__nv_bfloat16, wmma::col_major, wmma::col_major>("bf16 cc");
}

// --- error reporting (in child processes) -------------------------------------------------------------------------
extern "C" __global__ void k_divergent_sync(int* out) {
    if (threadIdx.x < 40) __syncthreads(); // only some threads: a deadlock on hardware
    out[threadIdx.x] = 1;
}
extern "C" __global__ void k_trap(int n) {
    if (blockDim.x != 64) lv_trap();
    (void)n;
}
extern "C" __global__ void k_wmma_misaligned(const __half* p, unsigned ldm) {
    nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
    nvcuda::wmma::load_matrix_sync(a, p, ldm);
}
extern "C" __global__ void k_spin(volatile int* flag) {
    if (threadIdx.x == 0)
        while (*flag == 0) {
        }
}

template <class F> static std::string run_child(F f, bool* aborted) {
    int pipefd[2];
    if (pipe(pipefd) != 0) return "";
    const pid_t pid = fork();
    if (pid == 0) {
        dup2(pipefd[1], 2);
        close(pipefd[0]);
        f();
        _exit(0);
    }
    close(pipefd[1]);
    std::string s;
    char buf[512];
    ssize_t k;
    while ((k = read(pipefd[0], buf, sizeof buf)) > 0) s.append(buf, (size_t)k);
    close(pipefd[0]);
    int status = 0;
    waitpid(pid, &status, 0);
    *aborted = WIFSIGNALED(status);
    return s;
}

static void test_errors() {
    bool ab = false;
    std::string msg = run_child(
        [] {
            std::vector<int> out(64);
            lv_emu::launch(k_divergent_sync, dim3(2), dim3(64), 0, out.data());
        },
        &ab);
    CHECK(ab && msg.find("DEADLOCK") != std::string::npos && msg.find("k_divergent_sync") != std::string::npos,
          "divergent __syncthreads not reported (aborted=%d): %s", ab, msg.c_str());
    msg = run_child([] { lv_emu::launch_named("my_trap", k_trap, dim3(1), dim3(32), 0, 3); }, &ab);
    CHECK(ab && msg.find("lv_trap") != std::string::npos && msg.find("my_trap") != std::string::npos,
          "lv_trap not reported: %s", msg.c_str());
    // WMMA operands break the hardware's rules: a pointer 16 bytes off the 32-byte alignment; an ldm of 12 halves.
    for (int c = 0; c < 2; ++c) {
        msg = run_child(
            [c] {
                dvec<__half> buf(16 * 40);
                lv_emu::launch(k_wmma_misaligned, dim3(1), dim3(32), 0, buf.data() + (c == 0 ? 8 : 0),
                               c == 0 ? 16u : 12u);
            },
            &ab);
        CHECK(ab && msg.find(c == 0 ? "32-byte aligned" : "multiple of 16 bytes") != std::string::npos,
              "misaligned WMMA operand (case %d) not reported: %s", c, msg.c_str());
    }
    setenv("LV_EMU_WATCHDOG_S", "1", 1);
    msg = run_child(
        [] {
            static int flag = 0;
            lv_emu::launch(k_spin, dim3(1), dim3(4), 0, &flag);
        },
        &ab);
    CHECK(ab && msg.find("WATCHDOG") != std::string::npos, "spin loop not caught by the watchdog: %s", msg.c_str());
}

// --- speed --------------------------------------------------------------------------------------------------------
extern "C" __global__ void k_sync_many(int rounds, float* out) {
    float v = (float)threadIdx.x;
    for (int r = 0; r < rounds; ++r) {
        __syncthreads();
        v += __shfl_xor_sync(0xffffffffu, v, 1);
    }
    if (threadIdx.x == 0) out[blockIdx.x] = v;
}

int main() {
    const auto t0 = std::chrono::steady_clock::now();
    test_conversions();
    test_barrier();
    test_warp();
    test_dsmem();
    test_wmma();
    test_errors();
    std::vector<float> out(16);
    const auto t1 = std::chrono::steady_clock::now();
    lv_emu::launch(k_sync_many, dim3(16), dim3(256), 0, 100, out.data());
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t1).count();
    std::printf("emu speed: %.2f us per (__syncthreads + shuffle) round of a 256-thread block (%.1f ns per thread "
                "switch)\n",
                us / 1600, us * 1000 / (1600.0 * 256 * 2));
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (g_failures) {
        std::printf("test_emu: %d FAILURES (%.1f s)\n", g_failures, secs);
        return 1;
    }
    std::printf("test_emu: all passed (%.1f s)\n", secs);
    return 0;
}
