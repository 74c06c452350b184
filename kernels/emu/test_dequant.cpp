// Emulator test of kernels/dequant.cu: every format (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K, fp8 e4m3/e5m2) and
// output dtype, block counts 1..odd (tails of the grid-stride loop: grids smaller and larger than the work), against
//   (a) a float reference written like ggml-quants.c's dequantize_row_* loops (an independent element order): the
//       f32 output must be bit-identical, f16/bf16 outputs equal to it rounded to nearest even;
//   (b) a double-precision reference of the same formula: |f32 - ref| <= 4 ulp_f32(ref) + 1e-30 (the f32 formula
//       rounds at most three times).
// Random blocks: random bytes with finite fp16 scale fields (as real files have). Also: nothing written past n.
#include "dequant.cu"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

static int g_failures = 0;

struct Fmt {
    const char* name;
    int be, bb;
    void (*k32)(const unsigned char*, float*, long long);
    void (*k16)(const unsigned char*, __half*, long long);
    void (*kbf)(const unsigned char*, __nv_bfloat16*, long long);
    std::vector<int> f16_fields; // byte offsets of fp16 scale fields in a block
};

#define LV_FMT(n, be, bb, ...)                                                                                     \
    Fmt { #n, be, bb, lowvram_dequant_##n##_f32, lowvram_dequant_##n##_f16, lowvram_dequant_##n##_bf16, {__VA_ARGS__} }

static float h2f(const unsigned char* p) { return lv_emu::f16_bits_to_f32((uint16_t)(p[0] | (p[1] << 8))); }

static void scale_min_k4(int j, const unsigned char* q, int& d, int& m) {
    if (j < 4) {
        d = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

// (a) ggml-style float reference of one block into y; (b) the same in double into yd.
template <class R> static void ref_block(const char* f, const unsigned char* x, R* y) {
    const std::string n(f);
    if (n == "q4_0" || n == "q4_1") {
        const bool one = n == "q4_1";
        const R d = (R)h2f(x), m = one ? (R)h2f(x + 2) : 0;
        const unsigned char* qs = x + (one ? 4 : 2);
        for (int j = 0; j < 16; ++j) {
            const int x0 = (qs[j] & 0x0F) - (one ? 0 : 8), x1 = (qs[j] >> 4) - (one ? 0 : 8);
            y[j] = one ? (R)(x0 * d) + m : (R)(x0 * d);
            y[j + 16] = one ? (R)(x1 * d) + m : (R)(x1 * d);
        }
    } else if (n == "q5_0" || n == "q5_1") {
        const bool one = n == "q5_1";
        const R d = (R)h2f(x), m = one ? (R)h2f(x + 2) : 0;
        uint32_t qh;
        std::memcpy(&qh, x + (one ? 4 : 2), 4);
        const unsigned char* qs = x + (one ? 8 : 6);
        for (int j = 0; j < 16; ++j) {
            const int xh0 = ((qh >> (j + 0)) << 4) & 0x10, xh1 = ((qh >> (j + 12))) & 0x10;
            const int x0 = ((qs[j] & 0x0F) | xh0) - (one ? 0 : 16), x1 = ((qs[j] >> 4) | xh1) - (one ? 0 : 16);
            y[j] = one ? (R)(x0 * d) + m : (R)(x0 * d);
            y[j + 16] = one ? (R)(x1 * d) + m : (R)(x1 * d);
        }
    } else if (n == "q8_0") {
        const R d = (R)h2f(x);
        for (int j = 0; j < 32; ++j) y[j] = (R)(signed char)x[2 + j] * d;
    } else if (n == "q2_k") {
        const R d = (R)h2f(x + 80), mn = (R)h2f(x + 82);
        const unsigned char *q = x + 16, *sc = x;
        int is = 0;
        for (int nn = 0; nn < 256; nn += 128) {
            int shift = 0;
            for (int j = 0; j < 4; ++j) {
                int s = sc[is++];
                R dl = d * (R)(s & 0xF), ml = mn * (R)(s >> 4);
                for (int l = 0; l < 16; ++l) *y++ = dl * (R)((q[l] >> shift) & 3) - ml;
                s = sc[is++];
                dl = d * (R)(s & 0xF), ml = mn * (R)(s >> 4);
                for (int l = 0; l < 16; ++l) *y++ = dl * (R)((q[l + 16] >> shift) & 3) - ml;
                shift += 2;
            }
            q += 32;
        }
    } else if (n == "q3_k") {
        const uint32_t kmask1 = 0x03030303, kmask2 = 0x0f0f0f0f;
        uint32_t aux[4];
        std::memcpy(aux, x + 96, 12);
        const uint32_t tmp = aux[2];
        aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
        aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
        aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
        aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
        const signed char* scales = (const signed char*)aux;
        const R dall = (R)h2f(x + 108);
        const unsigned char *q = x + 32, *hm = x;
        int is = 0;
        unsigned m = 1;
        for (int nn = 0; nn < 256; nn += 128) {
            int shift = 0;
            for (int j = 0; j < 4; ++j) {
                R dl = dall * (R)(scales[is++] - 32);
                for (int l = 0; l < 16; ++l) *y++ = dl * (R)(((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
                dl = dall * (R)(scales[is++] - 32);
                for (int l = 0; l < 16; ++l)
                    *y++ = dl * (R)(((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
                shift += 2;
                m <<= 1;
            }
            q += 32;
        }
    } else if (n == "q4_k" || n == "q5_k") {
        const bool five = n == "q5_k";
        const R d = (R)h2f(x), mn = (R)h2f(x + 2);
        const unsigned char *sc = x + 4, *ql = x + (five ? 48 : 16), *qh = x + 16;
        int is = 0;
        unsigned u1 = 1, u2 = 2;
        for (int j = 0; j < 256; j += 64) {
            int s, m;
            scale_min_k4(is + 0, sc, s, m);
            const R d1 = d * (R)s, m1 = mn * (R)m;
            scale_min_k4(is + 1, sc, s, m);
            const R d2 = d * (R)s, m2 = mn * (R)m;
            for (int l = 0; l < 32; ++l) *y++ = d1 * (R)((ql[l] & 0xF) + (five && (qh[l] & u1) ? 16 : 0)) - m1;
            for (int l = 0; l < 32; ++l) *y++ = d2 * (R)((ql[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0)) - m2;
            ql += 32;
            is += 2;
            u1 <<= 2;
            u2 <<= 2;
        }
    } else if (n == "q6_k") {
        const R d = (R)h2f(x + 208);
        const unsigned char *ql = x, *qh = x + 128;
        const signed char* sc = (const signed char*)(x + 192);
        for (int nn = 0; nn < 256; nn += 128) {
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = (int)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * (R)sc[is + 0] * (R)q1;
                y[l + 32] = d * (R)sc[is + 2] * (R)q2;
                y[l + 64] = d * (R)sc[is + 4] * (R)q3;
                y[l + 96] = d * (R)sc[is + 6] * (R)q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    } else if (n == "f8_e4m3" || n == "f8_e5m2") {
        // value = (-1)^s * 2^(e - bias) * (1 + m / 2^mbits), subnormals 2^(1 - bias) * m / 2^mbits
        const bool e4 = n == "f8_e4m3";
        const int mb = e4 ? 3 : 2, bias = e4 ? 7 : 15, v = x[0];
        const int s = v >> 7, e = (v >> mb) & ((1 << (7 - mb)) - 1), m = v & ((1 << mb) - 1);
        double r;
        if (e4 && e == 15 && m == 7) r = NAN;
        else if (!e4 && e == 31) r = m ? NAN : INFINITY;
        else if (e == 0) r = std::ldexp((double)m, 1 - bias - mb);
        else r = std::ldexp(1.0 + m / (double)(1 << mb), e - bias);
        y[0] = (R)(s ? -r : r);
    }
}

static double ulp32(double v) {
    int e = std::ilogb(v == 0 ? 1e-300 : v);
    if (v == 0 || e < -126) e = -126;
    return std::ldexp(1.0, e - 23);
}

template <class T, class K>
static bool check_out(const Fmt& f, K kernel, const std::vector<unsigned char>& src, const std::vector<float>& ref,
                      long long n, int grid, const char* tname) {
    const int guard = 17;
    std::vector<T> dst(n + guard, lv_from_float<T>(-7.0f));
    lv_emu::launch(kernel, dim3(grid), dim3(256), 0, src.data(), dst.data(), n);
    for (long long i = 0; i < n; ++i) {
        const T want = lv_from_float<T>(ref[i]);
        const float a = lv_to_float(dst[i]), b = lv_to_float(want);
        if (std::memcmp(&dst[i], &want, sizeof(T)) != 0 && !(std::isnan(a) && std::isnan(b))) {
            std::printf("FAIL %s %s n=%lld grid=%d: [%lld] = %.9g, reference %.9g\n", f.name, tname, n, grid, i, a, b);
            return false;
        }
    }
    for (int i = 0; i < guard; ++i)
        if (lv_to_float(dst[n + i]) != -7.0f) {
            std::printf("FAIL %s %s n=%lld: wrote past the end\n", f.name, tname, n);
            return false;
        }
    return true;
}

static void run_format(const Fmt& f, std::mt19937_64& rng) {
    int cases = 0, failed = 0;
    double worst_ulps = 0;
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> scale(1e-3f, 5e-2f);
    for (int blocks : {1, 2, 3, 7, 37, 300}) {
        for (int grid : {1, 3, 64}) {
            const long long n = (long long)blocks * f.be;
            std::vector<unsigned char> src((size_t)blocks * f.bb);
            for (auto& b : src) b = (unsigned char)byte(rng);
            if (f.be == 1) // fp8: every byte value at least once
                for (size_t i = 0; i < src.size(); ++i) src[i] = (unsigned char)(i * 37 + blocks);
            for (int b = 0; b < blocks; ++b)
                for (int off : f.f16_fields) {
                    const float s = (b % 5 == 0 ? -1.0f : 1.0f) * scale(rng);
                    const uint16_t h = __half_as_ushort(__float2half_rn(s));
                    src[(size_t)b * f.bb + off] = (unsigned char)(h & 0xFF);
                    src[(size_t)b * f.bb + off + 1] = (unsigned char)(h >> 8);
                }
            std::vector<float> ref(n);
            std::vector<double> refd(n);
            for (int b = 0; b < blocks; ++b) {
                ref_block<float>(f.name, src.data() + (size_t)b * f.bb, ref.data() + (size_t)b * f.be);
                ref_block<double>(f.name, src.data() + (size_t)b * f.bb, refd.data() + (size_t)b * f.be);
            }
            bool ok = true;
            for (long long i = 0; i < n && ok; ++i) {
                if (std::isnan(refd[i]) || std::isinf(refd[i])) continue;
                const double err = std::fabs((double)ref[i] - refd[i]);
                worst_ulps = std::max(worst_ulps, err / ulp32(refd[i]));
                if (err > 4 * ulp32(refd[i]) + 1e-30) {
                    std::printf("FAIL %s: float reference [%lld] %.9g vs double %.12g\n", f.name, i, ref[i], refd[i]);
                    ok = false;
                }
            }
            ok = ok && check_out<float>(f, f.k32, src, ref, n, grid, "f32");
            ok = ok && check_out<__half>(f, f.k16, src, ref, n, grid, "f16");
            ok = ok && check_out<__nv_bfloat16>(f, f.kbf, src, ref, n, grid, "bf16");
            ++cases;
            failed += !ok;
        }
    }
    g_failures += failed;
    std::printf("%-8s: %d cases x 3 dtypes, %d failed; float vs double reference within %.2f ulp\n", f.name, cases,
                failed, worst_ulps);
}

int main() {
    const auto t0 = std::chrono::steady_clock::now();
    std::mt19937_64 rng(16);
    const Fmt fmts[] = {
        LV_FMT(q4_0, 32, 18, 0),          LV_FMT(q4_1, 32, 20, 0, 2),      LV_FMT(q5_0, 32, 22, 0),
        LV_FMT(q5_1, 32, 24, 0, 2),       LV_FMT(q8_0, 32, 34, 0),         LV_FMT(q2_k, 256, 84, 80, 82),
        LV_FMT(q3_k, 256, 110, 108),      LV_FMT(q4_k, 256, 144, 0, 2),    LV_FMT(q5_k, 256, 176, 0, 2),
        LV_FMT(q6_k, 256, 210, 208),      LV_FMT(f8_e4m3, 1, 1),           LV_FMT(f8_e5m2, 1, 1),
    };
    for (const auto& f : fmts) run_format(f, rng);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (g_failures) {
        std::printf("test_dequant: %d FAILED cases (%.1f s)\n", g_failures, secs);
        return 1;
    }
    std::printf("test_dequant: all passed, 12 formats (%.1f s)\n", secs);
    return 0;
}
