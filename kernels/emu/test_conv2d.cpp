// Emulator test of kernels/conv2d.cu (lowvram_conv2d_{f32,f16,bf16}) against a double-precision reference computed
// from the same rounded inputs. Shapes cover M / N / K tails, cout = 4 and 5 (small M), 8x8 images (small N),
// stride 2, 1x1 and 5x5 kernels, unpadded convs, several blocks in x and y, with and without bias, the 16-byte
// (vector) and element-wise weight paths, and the f32 16-byte / element-wise output paths.
//
// Tolerances (per output element, u = 2^-24, S = sum |w*x| + |bias|, the sum of absolute terms):
//   f32      : |y - ref| <= 2 * sqrt(K+1) * u * S          (f32 accumulation; also checked against the looser
//                                                           1e-5 * max(1,|ref|) * sqrt(K) / 3)
//   f16/bf16 : |y - ref| <= half an output ulp at |ref| + acc + 2 * sqrt(K+1) * u * S
//              (one rounding of the f32 result to T, plus the f32 accumulation error)
// Also: every output written (y is pre-filled with NaN), nothing written outside y (guards), and violated launch
// preconditions trap (checked in a forked child).
#include "common.cuh"
#include "conv2d.cu"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

static int g_failures = 0;

struct Shape {
    int b, cin, h, w, cout, k, s, p;
};

template <class T> struct Kern;
template <> struct Kern<float> {
    static constexpr const char* name = "f32";
    static constexpr auto fn = lowvram_conv2d_f32;
};
template <> struct Kern<__half> {
    static constexpr const char* name = "f16";
    static constexpr auto fn = lowvram_conv2d_f16;
};
template <> struct Kern<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr auto fn = lowvram_conv2d_bf16;
};

// Half an ulp of T at magnitude a (normal range; f16 subnormal spacing below 2^-14).
template <class T> static double half_ulp(double a) {
    if (std::is_same<T, float>::value) return 0.0;
    int e = 0;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1): floor(log2 a) = e - 1
    if (std::is_same<T, __half>::value) {
        if (a < std::ldexp(1.0, -14)) return std::ldexp(1.0, -25);
        return std::ldexp(1.0, e - 1 - 10 - 1);
    }
    return std::ldexp(1.0, e - 1 - 7 - 1);  // bf16
}

struct Result {
    double max_err = 0, max_ratio = 0, max_ulps = 0;
    double max_ulps_vs_rounded = 0;  // |y - T(ref)| in ulps of T at T(ref): 0 = correctly rounded
    long long not_rounded = 0, count = 0;
    long long bad = 0, unwritten = 0, guard = 0;
};

// w_off / y_off: element offsets of w / y inside their buffers (1 = not 16-byte aligned -> element-wise paths).
template <class T>
static Result run_case(const Shape& sh, bool with_bias, int w_off, int y_off, std::mt19937& rng) {
    const int oh = (sh.h + 2 * sh.p - sh.k) / sh.s + 1, ow = (sh.w + 2 * sh.p - sh.k) / sh.s + 1;
    const int K = sh.cin * sh.k * sh.k, N = sh.b * oh * ow, M = sh.cout;
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    const size_t nx = (size_t)sh.b * sh.cin * sh.h * sh.w, nw = (size_t)M * K, ny = (size_t)sh.b * M * oh * ow;
    const float wscale = 1.0f / std::sqrt((float)K);

    std::vector<T> x(nx), wbuf(nw + w_off), bias(M);
    std::vector<double> xd(nx), wd(nw), bd(M, 0.0);
    for (size_t i = 0; i < nx; ++i) {
        x[i] = lv_from_float<T>(u(rng));
        xd[i] = lv_to_float(x[i]);
    }
    for (size_t i = 0; i < nw; ++i) {
        wbuf[w_off + i] = lv_from_float<T>(u(rng) * wscale);
        wd[i] = lv_to_float(wbuf[w_off + i]);
    }
    for (int i = 0; i < M; ++i) {
        bias[i] = lv_from_float<T>(0.5f * u(rng));
        if (with_bias) bd[i] = lv_to_float(bias[i]);
    }
    const int G = 64;  // guard elements around y
    std::vector<T> ybuf(ny + y_off + 2 * G, lv_from_float<T>(NAN));
    const T sentinel = lv_from_float<T>(12345.0f);
    const float sentinel_f = lv_to_float(sentinel);
    for (int i = 0; i < G + y_off; ++i) ybuf[i] = sentinel;
    for (int i = 0; i < G; ++i) ybuf[G + y_off + ny + i] = sentinel;
    T* y = ybuf.data() + G + y_off;

    const dim3 grid((N + 127) / 128, (M + 127) / 128, 1);
    lv_emu::launch_named(Kern<T>::name, Kern<T>::fn, grid, dim3(256), 0, (const T*)x.data(),
                         (const T*)(wbuf.data() + w_off), with_bias ? (const T*)bias.data() : (const T*)nullptr, y,
                         sh.b, sh.cin, sh.h, sh.w, M, sh.k, sh.s, sh.p, oh, ow);

    Result r;
    const double uu = std::ldexp(1.0, -24);
    for (int bb = 0; bb < sh.b; ++bb)
        for (int co = 0; co < M; ++co)
            for (int oy = 0; oy < oh; ++oy)
                for (int ox = 0; ox < ow; ++ox) {
                    double ref = bd[co], S = std::fabs(bd[co]);
                    for (int ci = 0; ci < sh.cin; ++ci)
                        for (int ky = 0; ky < sh.k; ++ky)
                            for (int kx = 0; kx < sh.k; ++kx) {
                                const int iy = oy * sh.s - sh.p + ky, ix = ox * sh.s - sh.p + kx;
                                if (iy < 0 || iy >= sh.h || ix < 0 || ix >= sh.w) continue;
                                const double t = wd[((size_t)co * sh.cin + ci) * sh.k * sh.k + ky * sh.k + kx] *
                                                 xd[(((size_t)bb * sh.cin + ci) * sh.h + iy) * sh.w + ix];
                                ref += t;
                                S += std::fabs(t);
                            }
                    const double got = lv_to_float(y[(((size_t)bb * M + co) * oh + oy) * ow + ox]);
                    if (std::isnan(got)) {
                        ++r.unwritten;
                        continue;
                    }
                    const double err = std::fabs(got - ref);
                    const double acc = 2.0 * std::sqrt((double)K + 1.0) * uu * S;
                    double tol = acc;
                    if (std::is_same<T, float>::value) {
                        const double brief = 1e-5 * std::max(1.0, std::fabs(ref)) * std::sqrt((double)K) / 3.0;
                        tol = std::min(tol, brief);
                    } else {
                        tol += half_ulp<T>(std::fabs(ref) + acc);
                        r.max_ulps = std::max(r.max_ulps, err / (2.0 * half_ulp<T>(std::fabs(ref))));
                        const double rt = lv_to_float(lv_from_float<T>((float)ref));
                        if (got != rt) {
                            ++r.not_rounded;
                            r.max_ulps_vs_rounded =
                                std::max(r.max_ulps_vs_rounded, std::fabs(got - rt) / (2.0 * half_ulp<T>(std::fabs(rt))));
                        }
                    }
                    ++r.count;
                    r.max_err = std::max(r.max_err, err);
                    r.max_ratio = std::max(r.max_ratio, err / tol);
                    if (err > tol) ++r.bad;
                }
    for (int i = 0; i < G + y_off; ++i) r.guard += lv_to_float(ybuf[i]) != sentinel_f;
    for (int i = 0; i < G; ++i) r.guard += lv_to_float(ybuf[G + y_off + ny + i]) != sentinel_f;
    return r;
}

template <class T> static void run_dtype(const std::vector<Shape>& shapes, std::mt19937& rng) {
    double worst_ratio = 0, worst_ulps = 0, worst_vs_rounded = 0;
    long long differ = 0, total = 0;
    for (const Shape& sh : shapes)
        for (int variant = 0; variant < 3; ++variant) {
            // variant 0: no bias; 1: bias; 2: bias, w and y offset by one element (element-wise weight / output
            // paths even when K is a multiple of 8)
            const bool with_bias = variant != 0;
            const int off = variant == 2 ? 1 : 0;
            const Result r = run_case<T>(sh, with_bias, off, off, rng);
            const bool ok = r.bad == 0 && r.unwritten == 0 && r.guard == 0;
            if (!ok) ++g_failures;
            worst_ratio = std::max(worst_ratio, r.max_ratio);
            worst_ulps = std::max(worst_ulps, r.max_ulps);
            std::printf("%s %-4s (b,cin,h,w,cout,k,s,p)=(%d,%d,%d,%d,%d,%d,%d,%d) %-12s max_err %.3e  err/tol %.3f",
                        ok ? "ok  " : "FAIL", Kern<T>::name, sh.b, sh.cin, sh.h, sh.w, sh.cout, sh.k, sh.s, sh.p,
                        variant == 0 ? "no-bias" : variant == 1 ? "bias" : "bias,unalign", r.max_err, r.max_ratio);
            if (!std::is_same<T, float>::value) {
                std::printf("  %.2f ulp(ref); vs T(ref): %lld/%lld differ, max %.2f ulp", r.max_ulps, r.not_rounded,
                            r.count, r.max_ulps_vs_rounded);
                worst_vs_rounded = std::max(worst_vs_rounded, r.max_ulps_vs_rounded);
                differ += r.not_rounded;
                total += r.count;
            }
            if (!ok)
                std::printf("  [%lld over tol, %lld unwritten, %lld guard]", r.bad, r.unwritten, r.guard);
            std::printf("\n");
        }
    std::printf("== %s: worst err/tol %.3f", Kern<T>::name, worst_ratio);
    if (!std::is_same<T, float>::value)
        std::printf(", worst %.2f ulp(ref); %lld of %lld outputs differ from T(ref), by at most %.2f ulp", worst_ulps,
                    differ, total, worst_vs_rounded);
    std::printf("\n");
}

// Violated launch preconditions must trap: run in a forked child, expect an abnormal exit.
static bool traps(int which) {
    std::fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        std::freopen("/dev/null", "w", stderr);
        std::freopen("/dev/null", "w", stdout);
        std::vector<float> x(64, 0.f), w(64, 0.f), y(256, 0.f);
        const dim3 block = which == 0 ? dim3(128) : dim3(256);
        const int oh = which == 1 ? 5 : 4;  // correct: (4 + 2 - 3) / 1 + 1 = 4
        const dim3 grid(1, 1, 1);
        const int cout = which == 2 ? 200 : 2;  // 200 rows need grid.y = 2
        std::vector<float> big(200 * 9 * 4, 0.f), ybig(200 * 16, 0.f);
        lv_emu::launch(lowvram_conv2d_f32, grid, block, 0, (const float*)x.data(), (const float*)big.data(),
                       (const float*)nullptr, ybig.data(), 1, 1, 4, 4, cout, 3, 1, 1, oh, 4);
        std::_Exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

int main() {
    const auto t0 = std::chrono::steady_clock::now();
    const std::vector<Shape> shapes = {
        {2, 4, 9, 7, 320, 3, 1, 1},   // SD first conv-like: cin 4 (K = 36, element-wise A), M tail, N = 126
        {1, 320, 8, 8, 4, 3, 1, 1},   // SD last conv-like: cout 4, 8x8 image, K = 2880 (90 K slices)
        {2, 64, 16, 16, 64, 3, 2, 1}, // stride 2 downsample
        {1, 40, 5, 5, 24, 1, 1, 0},   // 1x1
        {1, 17, 6, 11, 33, 3, 1, 1},  // odd everything
        {1, 3, 7, 7, 5, 3, 1, 0},     // unpadded, cin 3 (K = 27), cout 5
        {2, 8, 13, 17, 20, 3, 1, 1},  // N = 442: 4 blocks in x, tiles straddle images
        {1, 24, 20, 20, 136, 3, 1, 1},// 2 x 4 blocks, M tail 8 in the second block row
        {1, 6, 9, 9, 7, 5, 2, 2},     // 5x5, stride 2
        {1, 16, 4, 4, 8, 3, 3, 0},    // stride 3, a single output pixel (oh = ow = 1)
        {1, 64, 16, 16, 128, 3, 1, 1},// full 128 x 128 tiles, K = 576 (18 K slices)
        {1, 2, 3, 3, 4, 5, 1, 2},     // kernel larger than the image (negative K-walk carries)
    };
    std::mt19937 rng(1234);
    run_dtype<float>(shapes, rng);
    run_dtype<__half>(shapes, rng);
    run_dtype<__nv_bfloat16>(shapes, rng);

    const char* what[] = {"blockDim 128", "wrong oh", "grid.y too small"};
    for (int i = 0; i < 3; ++i) {
        const bool t = traps(i);
        std::printf("%s trap on %s\n", t ? "ok  " : "FAIL", what[i]);
        if (!t) ++g_failures;
    }
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("test_conv2d: %s (%d failures, %.1f s)\n", g_failures ? "FAILED" : "passed", g_failures, s);
    return g_failures ? 1 : 0;
}
