// Emulator test of kernels/attention.cu (lowvram_flash_attn_{f32,f16,bf16}_d{40,64,80,128,160,512}) against a
// double-precision reference computed from the same rounded inputs.
//
// Shapes (B, heads, nq, nk): (2,2,70,77), (1,1,1,5), (2,3,130,64), (1,2,33,1), (1,1,200,200) and a few more for
// D = 512 / lazy-rescale cases; layouts: separate contiguous tensors (16-byte vector loads), q/k/v as slices of one
// fused qkv buffer (q_sn = 3·heads·D; for nq != nk: padded row / batch strides), and pointers offset by one element
// (element-wise load path); scale 1/sqrt(D) and 1.0; a "growing keys" input whose row maxima rise from key block
// to key block by more than the lazy-rescale threshold (exercises the O rescale).
//
// Tolerance per output element, with R = max(1, |ref|):
//   f32  : |out - ref| <= 1e-5 · R      f16 : <= 1e-3 · R      bf16 : <= 8e-3 · R
// (f16/bf16 tightened from the brief's 2e-3 / 1.6e-2; measured maxima: f32 6.5e-6, f16 3.8e-4, bf16 3.0e-3,
// dominated by rounding P and the output to T).
// Scales: 1/sqrt(D), 1.0, and 4.0 with growing keys (logits spanning ~100 in log2 units: overflow / NaN check).
// Also: every output written (out pre-filled with NaN), nothing written outside out (guards), violated launch
// preconditions (blockDim, smem_bytes) trap (checked in forked children).
#include "common.cuh"
#include "attention.cu"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

static int g_failures = 0;

template <class T> struct Names;
template <> struct Names<float> {
    static constexpr const char* name = "f32";
    static constexpr double tol = 1e-5;
};
template <> struct Names<__half> {
    static constexpr const char* name = "f16";
    static constexpr double tol = 1e-3;
};
template <> struct Names<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr double tol = 8e-3;
};

template <class T> using AttnFn = void (*)(const T*, const T*, const T*, T*, int, int, int, long long, long long,
                                           long long, long long, long long, long long, float, int);

template <class T> static AttnFn<T> kernel_for(int D);
#define LV_T_CASES(TY, SUF)                                                                                            \
    template <> AttnFn<TY> kernel_for<TY>(int D) {                                                                     \
        switch (D) {                                                                                                   \
        case 40: return lowvram_flash_attn_##SUF##_d40;                                                                \
        case 64: return lowvram_flash_attn_##SUF##_d64;                                                                \
        case 80: return lowvram_flash_attn_##SUF##_d80;                                                                \
        case 128: return lowvram_flash_attn_##SUF##_d128;                                                              \
        case 160: return lowvram_flash_attn_##SUF##_d160;                                                              \
        case 512: return lowvram_flash_attn_##SUF##_d512;                                                              \
        }                                                                                                              \
        return nullptr;                                                                                                \
    }
LV_T_CASES(float, f32)
LV_T_CASES(__half, f16)
LV_T_CASES(__nv_bfloat16, bf16)

// The header's table (documented smem_bytes and BQ), checked against the kernel's own formulas.
template <class T> static int smem_for(int D) {
    if (std::is_same<T, float>::value) {
        switch (D) {
        case 40: return 15264;
        case 64: return 21408;
        case 80: return 25504;
        case 128: return 37792;
        case 160: return 45984;
        case 512: return 50112;
        }
    } else {
        switch (D) {
        case 40: return 41248;
        case 64: return 45344;
        case 80: return 49440;
        case 128: return 61728;
        case 160: return 53024;
        case 512: return 55904;
        }
    }
    return -1;
}
template <class T> static int bq_for(int D) {
    if (D == 512) return 16;
    return std::is_same<T, float>::value ? 32 : 64;
}

enum Layout { CONTIG = 0, FUSED = 1, UNALIGNED = 2 };
static const char* layout_name[] = {"contig", "fused", "unaligned"};

struct Case {
    int B, H, nq, nk;
    Layout layout;
    float scale_mul; // scale = scale_mul / sqrt(D), or 1.0 when scale_mul == 0
    bool growing; // keys grow along the sequence: row maxima rise from block to block (lazy rescale path)
};

struct Result {
    double max_err = 0, max_rel = 0; // max |out-ref|, max |out-ref| / max(1,|ref|)
    long bad = 0, nan = 0, guard = 0;
};

template <class T> static Result run_case(int D, const Case& c, std::mt19937& rng) {
    const int B = c.B, H = c.H, nq = c.nq, nk = c.nk, HD = H * D;
    const int off = c.layout == UNALIGNED ? 1 : 0;
    // Row / batch strides and the buffers holding q, k, v.
    long long q_sn, k_sn, v_sn, q_sb, k_sb, v_sb;
    size_t q_base, k_base, v_base; // element offsets of the (0,0,0,0) elements in their buffers
    std::vector<T> qbuf, kbuf, vbuf;
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    if (c.layout == FUSED && nq == nk) {
        q_sn = k_sn = v_sn = 3LL * HD;
        q_sb = k_sb = v_sb = (long long)nq * 3 * HD;
        qbuf.assign((size_t)B * nq * 3 * HD, lv_from_float<T>(NAN));
        q_base = 0, k_base = HD, v_base = 2 * HD;
    } else if (c.layout == FUSED) {
        q_sn = HD + 24, k_sn = HD + 40, v_sn = HD + 8; // multiples of 8 elements: still 16-byte aligned
        q_sb = (long long)nq * q_sn + 16, k_sb = (long long)nk * k_sn + 8, v_sb = (long long)nk * v_sn + 32;
        q_base = k_base = v_base = 0;
    } else {
        q_sn = HD, k_sn = HD, v_sn = HD;
        q_sb = (long long)nq * HD, k_sb = (long long)nk * HD, v_sb = (long long)nk * HD;
        q_base = k_base = v_base = off;
    }
    const bool fused = c.layout == FUSED && nq == nk;
    if (!fused) {
        qbuf.assign((size_t)B * q_sb + q_base + 8, lv_from_float<T>(NAN));
        kbuf.assign((size_t)B * k_sb + k_base + 8, lv_from_float<T>(NAN));
        vbuf.assign((size_t)B * v_sb + v_base + 8, lv_from_float<T>(NAN));
    }
    T* qp = qbuf.data() + q_base;
    T* kp = (fused ? qbuf.data() : kbuf.data()) + k_base;
    T* vp = (fused ? qbuf.data() : vbuf.data()) + v_base;
    // Rounded inputs, and their double copies [B][H][n][D].
    std::vector<double> qd((size_t)B * H * nq * D), kd((size_t)B * H * nk * D), vd((size_t)B * H * nk * D);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h) {
            for (int n = 0; n < nq; ++n)
                for (int d = 0; d < D; ++d) {
                    const T x = lv_from_float<T>(u(rng));
                    qp[b * q_sb + n * q_sn + h * D + d] = x;
                    qd[(((size_t)b * H + h) * nq + n) * D + d] = lv_to_float(x);
                }
            for (int n = 0; n < nk; ++n) {
                const float g = c.growing ? 0.25f + 3.0f * n / nk : 1.0f;
                for (int d = 0; d < D; ++d) {
                    const T x = lv_from_float<T>(u(rng) * g), y = lv_from_float<T>(u(rng));
                    kp[b * k_sb + n * k_sn + h * D + d] = x;
                    vp[b * v_sb + n * v_sn + h * D + d] = y;
                    kd[(((size_t)b * H + h) * nk + n) * D + d] = lv_to_float(x);
                    vd[(((size_t)b * H + h) * nk + n) * D + d] = lv_to_float(y);
                }
            }
        }
    const size_t nout = (size_t)B * nq * HD, G = 64;
    std::vector<T> obuf(nout + 2 * G + off, lv_from_float<T>(NAN));
    const T sentinel = lv_from_float<T>(1232.0f); // exact in f16 and bf16
    const float sval = lv_to_float(sentinel);
    for (size_t i = 0; i < G + off; ++i) obuf[i] = sentinel;
    for (size_t i = 0; i < G; ++i) obuf[G + off + nout + i] = sentinel;
    T* op = obuf.data() + G + off;

    const float scale = c.scale_mul == 0.f ? 1.0f : c.scale_mul / std::sqrt((float)D);
    const int BQ = bq_for<T>(D);
    const dim3 grid((nq + BQ - 1) / BQ, H, B);
    std::string name = std::string("lowvram_flash_attn_") + Names<T>::name + "_d" + std::to_string(D);
    lv_emu::launch_named(name.c_str(), kernel_for<T>(D), grid, dim3(128), (size_t)smem_for<T>(D), (const T*)qp,
                         (const T*)kp, (const T*)vp, op, nq, nk, H, q_sb, q_sn, k_sb, k_sn, v_sb, v_sn, scale,
                         smem_for<T>(D));

    Result r;
    std::vector<double> s(nk), o(D);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int n = 0; n < nq; ++n) {
                const double* qr = &qd[(((size_t)b * H + h) * nq + n) * D];
                double mx = -INFINITY;
                for (int j = 0; j < nk; ++j) {
                    const double* kr = &kd[(((size_t)b * H + h) * nk + j) * D];
                    double acc = 0;
                    for (int d = 0; d < D; ++d) acc += qr[d] * kr[d];
                    s[j] = acc * (double)scale;
                    mx = std::max(mx, s[j]);
                }
                double sum = 0;
                for (int j = 0; j < nk; ++j) sum += (s[j] = std::exp(s[j] - mx));
                std::fill(o.begin(), o.end(), 0.0);
                for (int j = 0; j < nk; ++j) {
                    const double* vr = &vd[(((size_t)b * H + h) * nk + j) * D];
                    for (int d = 0; d < D; ++d) o[d] += s[j] * vr[d];
                }
                for (int d = 0; d < D; ++d) {
                    const double ref = o[d] / sum;
                    const double got = lv_to_float(op[((size_t)b * nq + n) * HD + h * D + d]);
                    if (std::isnan(got)) {
                        ++r.nan;
                        continue;
                    }
                    const double e = std::fabs(got - ref), rel = e / std::max(1.0, std::fabs(ref));
                    r.max_err = std::max(r.max_err, e);
                    r.max_rel = std::max(r.max_rel, rel);
                    if (!(rel <= Names<T>::tol)) ++r.bad;
                }
            }
    for (size_t i = 0; i < G + off; ++i) r.guard += lv_to_float(obuf[i]) != sval;
    for (size_t i = 0; i < G; ++i) r.guard += lv_to_float(obuf[G + off + nout + i]) != sval;
    return r;
}

template <class T> static void run_dtype(const std::vector<int>& Ds) {
    std::mt19937 rng(1234);
    for (int D : Ds) {
        std::vector<Case> cases = {
            {2, 2, 70, 77, CONTIG, 1.f, false},     {1, 1, 1, 5, CONTIG, 1.f, false},
            {2, 3, 130, 64, FUSED, 1.f, false},     {1, 2, 33, 1, UNALIGNED, 1.f, false},
            {1, 1, 200, 200, FUSED, 1.f, false},    {2, 2, 70, 77, FUSED, 0.f, false},
            {1, 1, 65, 130, UNALIGNED, 0.f, true},  {1, 2, 17, 150, CONTIG, 1.f, true},
            {2, 1, 90, 140, FUSED, 4.f, true},
        };
        if (D == 512) // the VAE's single head; fewer / smaller shapes (the emulator is slow at D = 512)
            cases = {
                {1, 1, 70, 77, CONTIG, 1.f, false},  {1, 1, 1, 5, UNALIGNED, 1.f, false},
                {2, 1, 33, 1, FUSED, 1.f, false},    {1, 1, 40, 40, FUSED, 0.f, false},
                {1, 1, 17, 100, CONTIG, 0.f, true},  {1, 2, 16, 64, UNALIGNED, 1.f, false},
                {1, 1, 20, 70, CONTIG, 4.f, true},
            };
        Result tot;
        const auto t0 = std::chrono::steady_clock::now();
        for (const Case& c : cases) {
            const Result r = run_case<T>(D, c, rng);
            tot.max_err = std::max(tot.max_err, r.max_err);
            tot.max_rel = std::max(tot.max_rel, r.max_rel);
            tot.bad += r.bad, tot.nan += r.nan, tot.guard += r.guard;
            if (r.bad || r.nan || r.guard) {
                std::printf("FAIL %s d%d B=%d H=%d nq=%d nk=%d %s scale=%g%s: max_rel %.3e bad %ld nan %ld "
                            "guard %ld\n",
                            Names<T>::name, D, c.B, c.H, c.nq, c.nk, layout_name[c.layout],
                            c.scale_mul == 0.f ? 1.0 : c.scale_mul / std::sqrt((double)D),
                            c.growing ? " growing" : "", r.max_rel, r.bad, r.nan,
                            r.guard);
                ++g_failures;
            }
        }
        const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        std::printf("%-4s d%-3d  max|err| %.3e  max|err|/max(1,|ref|) %.3e  (tol %.1e)  %zu cases  %.2fs  %s\n",
                    Names<T>::name, D, tot.max_err, tot.max_rel, Names<T>::tol, cases.size(), secs,
                    (tot.bad || tot.nan || tot.guard) ? "FAIL" : "ok");
    }
}

// Violated launch preconditions must trap: run in a forked child, expect an abnormal exit.
// which: 0 = correct launch (must exit normally), 1 = blockDim 256, 2 = smem_bytes one byte short (f16 d64),
// 3 = smem_bytes short (f32 d128), 4 = blockDim (128, 2) (bf16 d512).
static bool traps(int which) {
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        std::freopen("/dev/null", "w", stderr);
        std::freopen("/dev/null", "w", stdout);
        std::vector<__half> h(64 * 64 * 4, lv_from_float<__half>(0.f));
        std::vector<float> f(64 * 128 * 4, 0.f);
        std::vector<__nv_bfloat16> bf(16 * 512 * 4, lv_from_float<__nv_bfloat16>(0.f));
        if (which <= 2) {
            const int sm = smem_for<__half>(64) - (which == 2 ? 1 : 0);
            lv_emu::launch(lowvram_flash_attn_f16_d64, dim3(1, 1, 1), dim3(which == 1 ? 256 : 128), (size_t)sm + 64,
                           (const __half*)h.data(), (const __half*)h.data(), (const __half*)h.data(), h.data(), 64,
                           64, 1, 0LL, 64LL, 0LL, 64LL, 0LL, 64LL, 1.0f, sm);
        } else if (which == 3) {
            const int sm = smem_for<float>(128) - 32;
            lv_emu::launch(lowvram_flash_attn_f32_d128, dim3(1, 1, 1), dim3(128), (size_t)sm + 64,
                           (const float*)f.data(), (const float*)f.data(), (const float*)f.data(), f.data(), 32, 32,
                           1, 0LL, 128LL, 0LL, 128LL, 0LL, 128LL, 1.0f, sm);
        } else {
            const int sm = smem_for<__nv_bfloat16>(512);
            lv_emu::launch(lowvram_flash_attn_bf16_d512, dim3(1, 1, 1), dim3(128, 2), (size_t)sm,
                           (const __nv_bfloat16*)bf.data(), (const __nv_bfloat16*)bf.data(),
                           (const __nv_bfloat16*)bf.data(), bf.data(), 16, 16, 1, 0LL, 512LL, 0LL, 512LL, 0LL, 512LL,
                           1.0f, sm);
        }
        std::_Exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main() {
    const auto t0 = std::chrono::steady_clock::now();
    static_assert(lv_attn::smem_mma(64) == 45344 && lv_attn::smem_f32(512) == 50112, "table");
    for (int D : {40, 64, 80, 128, 160}) {
        if (smem_for<__half>(D) != lv_attn::smem_mma(D) || smem_for<float>(D) != lv_attn::smem_f32(D)) {
            std::printf("FAIL smem table d%d\n", D);
            ++g_failures;
        }
    }
    if (smem_for<__half>(512) != lv_attn::smem_mma512() || smem_for<float>(512) != lv_attn::smem_f32(512)) {
        std::printf("FAIL smem table d512\n");
        ++g_failures;
    }
    const std::vector<int> Ds = {40, 64, 80, 128, 160, 512};
    run_dtype<float>(Ds);
    run_dtype<__half>(Ds);
    run_dtype<__nv_bfloat16>(Ds);
    if (traps(0)) {
        std::printf("FAIL a correct launch trapped\n");
        ++g_failures;
    }
    for (int w = 1; w <= 4; ++w)
        if (!traps(w)) {
            std::printf("FAIL violated launch precondition %d did not trap\n", w);
            ++g_failures;
        }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("test_attention: %s (%.1fs)\n", g_failures ? "FAILED" : "all passed", secs);
    return g_failures ? 1 : 0;
}
