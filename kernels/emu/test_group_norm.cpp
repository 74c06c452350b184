// Emulator test of kernels/group_norm.cu: both kernels, every dtype, odd shapes and chunk counts, eps, SiLU on/off,
// against a double-precision reference computed from the same (rounded) inputs.
// Tolerances: f32 |y - ref| <= 2e-6 * max(1, |ref|); f16/bf16 |y - ref| <= 0.5 ulp_T(ref) + 2e-6 * max(1, |ref|)
// (i.e. the correctly rounded result, or its neighbour only when ref is within f32 noise of a rounding midpoint).
// Also: nothing written outside y / partial, deterministic, count/mean/M2 partials as documented.
#include "group_norm.cu"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

static int g_failures = 0;

template <class T> struct Info;
template <> struct Info<float> {
    static constexpr const char* name = "f32";
    static constexpr int mant = 23, emin = -126;
};
template <> struct Info<__half> {
    static constexpr const char* name = "f16";
    static constexpr int mant = 10, emin = -14;
};
template <> struct Info<__nv_bfloat16> {
    static constexpr const char* name = "bf16";
    static constexpr int mant = 7, emin = -126;
};

static void launch_stats(const float* x, float* p, int B, int C, int G, long long S, int ch) {
    lv_emu::launch(lowvram_group_norm_stats_f32, dim3(ch, G, B), dim3(256), 0, x, p, C, G, S, ch);
}
static void launch_stats(const __half* x, float* p, int B, int C, int G, long long S, int ch) {
    lv_emu::launch(lowvram_group_norm_stats_f16, dim3(ch, G, B), dim3(256), 0, x, p, C, G, S, ch);
}
static void launch_stats(const __nv_bfloat16* x, float* p, int B, int C, int G, long long S, int ch) {
    lv_emu::launch(lowvram_group_norm_stats_bf16, dim3(ch, G, B), dim3(256), 0, x, p, C, G, S, ch);
}
static void launch_apply(const float* x, const float* p, const float* w, const float* b, float* y, int B, int C,
                         int G, long long S, int ch, float eps, int silu) {
    lv_emu::launch(lowvram_group_norm_apply_f32, dim3(ch, G, B), dim3(256), 0, x, p, w, b, y, C, G, S, ch, eps, silu);
}
static void launch_apply(const __half* x, const float* p, const __half* w, const __half* b, __half* y, int B, int C,
                         int G, long long S, int ch, float eps, int silu) {
    lv_emu::launch(lowvram_group_norm_apply_f16, dim3(ch, G, B), dim3(256), 0, x, p, w, b, y, C, G, S, ch, eps, silu);
}
static void launch_apply(const __nv_bfloat16* x, const float* p, const __nv_bfloat16* w, const __nv_bfloat16* b,
                         __nv_bfloat16* y, int B, int C, int G, long long S, int ch, float eps, int silu) {
    lv_emu::launch(lowvram_group_norm_apply_bf16, dim3(ch, G, B), dim3(256), 0, x, p, w, b, y, C, G, S, ch, eps,
                   silu);
}

static double ulp_of(double v, int mant, int emin) {
    int e = std::ilogb(v == 0 ? 1e-300 : v);
    if (v == 0 || e < emin) e = emin;
    return std::ldexp(1.0, e - mant);
}

struct MaxErr {
    double abs_rel = 0; // max |y - ref| / max(1, |ref|)
    double ulps = 0;    // max |y - ref| / ulp_T(ref) over |ref| >= 2^-6 (near 0 the f32 absolute noise dominates)
    long long n = 0, not_rn = 0;
};

template <class T> static bool same_bits(const T& a, const T& b) { return std::memcmp(&a, &b, sizeof(T)) == 0; }

template <class T>
static bool run_case(int B, int C, int G, long long S, int chunks, float eps, int silu, float offset, float scale,
                     MaxErr& me, uint32_t seed) {
    const long long total = (long long)B * C * S;
    const int guard = 64;
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::uniform_real_distribution<double> ud(-1.0, 1.0);
    std::vector<T> x(total), w(C), bb(C);
    std::vector<double> xd(total), wd(C), bd(C);
    for (long long i = 0; i < total; ++i) {
        // per-channel offsets make channels of one group differ (stats must span channels)
        const double v = offset + 0.3 * ((i / S) % C % 5) + scale * nd(rng);
        x[i] = lv_from_float<T>((float)v);
        xd[i] = lv_to_float(x[i]);
    }
    for (int c = 0; c < C; ++c) {
        w[c] = lv_from_float<T>((float)(1.0 + 0.5 * ud(rng)));
        bb[c] = lv_from_float<T>((float)(0.5 * ud(rng)));
        wd[c] = lv_to_float(w[c]);
        bd[c] = lv_to_float(bb[c]);
    }
    const long long np = (long long)B * G * chunks * 3;
    std::vector<float> partial(np + guard, 12345.0f);
    const T sentinel = lv_from_float<T>(-777.0f);
    std::vector<T> y(total + guard, sentinel);
    launch_stats(x.data(), partial.data(), B, C, G, S, chunks);
    launch_apply(x.data(), partial.data(), w.data(), bb.data(), y.data(), B, C, G, S, chunks, eps, silu);
    bool ok = true;
    for (int k = 0; k < guard; ++k)
        if (partial[np + k] != 12345.0f || !same_bits(y[total + k], sentinel)) ok = false;
    if (!ok) std::printf("  wrote past the end of y or partial\n");

    const int cg = C / G;
    const long long n = (long long)cg * S, L = (n + chunks - 1) / chunks;
    for (int b = 0; b < B; ++b)
        for (int g = 0; g < G; ++g) {
            const long long base = ((long long)b * C + (long long)g * cg) * S;
            double mean = 0;
            for (long long i = 0; i < n; ++i) mean += xd[base + i];
            mean /= (double)n;
            double var = 0;
            for (long long i = 0; i < n; ++i) var += (xd[base + i] - mean) * (xd[base + i] - mean);
            var /= (double)n;
            // partials: count exact, chunk mean / M2 close
            for (int c = 0; c < chunks; ++c) {
                const float* p = &partial[(((long long)b * G + g) * chunks + c) * 3];
                const long long s0 = std::min((long long)c * L, n), s1 = std::min(n, s0 + L);
                double cm = 0, cm2 = 0;
                for (long long i = s0; i < s1; ++i) cm += xd[base + i];
                if (s1 > s0) cm /= (double)(s1 - s0);
                for (long long i = s0; i < s1; ++i) cm2 += (xd[base + i] - cm) * (xd[base + i] - cm);
                const double sd = std::sqrt(var) + 1e-30;
                if (p[0] != (float)(s1 - s0) || std::fabs(p[1] - cm) > 1e-5 * (std::fabs(cm) + sd) ||
                    std::fabs(p[2] - cm2) > 1e-5 * (cm2 + sd * sd)) {
                    if (ok) std::printf("  partial (b%d g%d c%d) = (%g, %g, %g), want (%lld, %g, %g)\n", b, g, c, p[0],
                                        p[1], p[2], s1 - s0, cm, cm2);
                    ok = false;
                }
            }
            const double rstd = 1.0 / std::sqrt(var + (double)eps);
            for (long long i = 0; i < n; ++i) {
                const int ch = g * cg + (int)(i / S);
                double r = (xd[base + i] - mean) * rstd * wd[ch] + bd[ch];
                if (silu) r = r / (1.0 + std::exp(-r));
                const double got = lv_to_float(y[base + i]);
                const double err = std::fabs(got - r);
                const double rel = err / std::max(1.0, std::fabs(r));
                const double ulp = ulp_of(std::fabs(r), Info<T>::mant, Info<T>::emin);
                me.abs_rel = std::max(me.abs_rel, rel);
                if (std::fabs(r) >= 1.0 / 64) me.ulps = std::max(me.ulps, err / ulp);
                me.n++;
                const bool is_rn = got == (double)lv_to_float(lv_from_float<T>((float)r)); // RN(f32(ref)) ~ RN(ref)
                me.not_rn += !is_rn;
                const bool pass = std::is_same_v<T, float> ? rel <= 2e-6 : err <= 0.5 * ulp + 2e-6 * std::max(1.0, std::fabs(r));
                if (!pass || got != got) {
                    if (ok)
                        std::printf("  y[b%d g%d i%lld] = %.9g, ref %.9g (err %.3g, %.3g ulp)\n", b, g, i, got, r, err,
                                    err / ulp);
                    ok = false;
                }
            }
        }
    // determinism: a second run gives bit-identical output (small cases only: time)
    if (total > (1 << 20) || (long long)B * G * chunks > 1024) return ok;
    std::vector<T> y2(total + guard, sentinel);
    std::vector<float> partial2(np + guard, 0.0f);
    launch_stats(x.data(), partial2.data(), B, C, G, S, chunks);
    launch_apply(x.data(), partial2.data(), w.data(), bb.data(), y2.data(), B, C, G, S, chunks, eps, silu);
    if (std::memcmp(y.data(), y2.data(), sizeof(T) * total) != 0) {
        std::printf("  not deterministic\n");
        ok = false;
    }
    return ok;
}

template <class T> static void run_dtype() {
    struct Shape {
        int B, C;
        long long S;
        int G;
    };
    const Shape shapes[] = {{2, 320, 64, 32}, {1, 128, 1000, 32}, {2, 6, 7, 3}, {1, 32, 1, 32}, {1, 12, 300, 4}};
    const int chunk_list[] = {1, 3, 64};
    MaxErr me;
    int idx = 0, cases = 0, failed = 0;
    for (const Shape& s : shapes)
        for (int chunks : chunk_list) {
            // one (eps, silu, offset) combination per case, cycling so that every dtype sees all of them
            const int silu = idx % 2;
            const float eps = (idx / 2) % 2 ? 1e-6f : 1e-5f;
            const float offset = (idx % 3 == 0) ? 0.0f : (idx % 3 == 1 ? 2.0f : -0.5f);
            const bool ok =
                run_case<T>(s.B, s.C, s.G, s.S, chunks, eps, silu, offset, 1.0f, me, 1000u + 7u * (uint32_t)idx);
            ++cases;
            if (!ok) {
                ++failed;
                std::printf("FAIL %s (B,C,S,G)=(%d,%d,%lld,%d) chunks=%d eps=%g silu=%d\n", Info<T>::name, s.B, s.C,
                            s.S, s.G, chunks, eps, silu);
            }
            ++idx;
        }
    // VAE-size group (4 Mi elements, mean 1, std 1, 64 chunks; and one chunk) — f32 statistics must stay precise.
    for (int chunks : {64, std::is_same_v<T, float> ? 1 : 0}) {
        if (chunks == 0) continue;
        const bool ok = run_case<T>(1, 4, 1, 1 << 20, chunks, 1e-6f, 1, 1.0f, 1.0f, me, 99u + (uint32_t)chunks);
        ++cases;
        if (!ok) {
            ++failed;
            std::printf("FAIL %s VAE-size group (1,4,1Mi,1) chunks=%d\n", Info<T>::name, chunks);
        }
    }
    g_failures += failed;
    std::printf("%-4s: %d cases, %d failed; %lld outputs: max |err|/max(1,|ref|) = %.3g; max err for |ref| >= 2^-6 = "
                "%.4f ulp of T; %lld (%.4f%%) differ from RN(ref)\n",
                Info<T>::name, cases, failed, me.n, me.abs_rel, me.ulps, me.not_rn, 100.0 * me.not_rn / me.n);
}

int main() {
    const auto t0 = std::chrono::steady_clock::now();
    run_dtype<float>();
    run_dtype<__half>();
    run_dtype<__nv_bfloat16>();
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (g_failures) {
        std::printf("test_group_norm: %d FAILED cases (%.1f s)\n", g_failures, secs);
        return 1;
    }
    std::printf("test_group_norm: all passed (%.1f s)\n", secs);
    return 0;
}
