// The C++ wrapper as a host uses it. The C header is included twice (directly and through the wrapper) to prove
// its include guard, and the wrapper twice to prove its own.
#include "lowvram.h"
#include "lowvram.hpp"
#include "lowvram.h"
#include "lowvram.hpp"

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

static int failures = 0;
#define CHECK(cond)                                                                    \
    do {                                                                               \
        if (!(cond)) {                                                                 \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            failures++;                                                                \
        }                                                                              \
    } while (0)

static void test_version_and_stats() {
    CHECK(lowvram::version() == std::to_string(LOWVRAM_VERSION_MAJOR) + "." + std::to_string(LOWVRAM_VERSION_MINOR) +
                                    "." + std::to_string(LOWVRAM_VERSION_PATCH));
    lowvram_system_info info = lowvram::system_stats();
    CHECK(info.ram_total_bytes > 0);
    CHECK(info.cuda_available ? info.device_count > 0 : std::strlen(info.cuda_reason) > 0);
}

static void test_context_and_logging() {
    std::vector<std::string> messages;
    {
        lowvram::ContextOptions options;
        options.device = "cpu";
        lowvram::Context ctx(options, [&](lowvram_log_level, const char *m) { messages.emplace_back(m); });
        CHECK(ctx.capi() != nullptr);
        ctx.cancel();
        lowvram::Context moved = std::move(ctx);
        CHECK(moved.capi() != nullptr);
        CHECK(ctx.capi() == nullptr);  // NOLINT: moved-from is empty by contract
    }
    CHECK(!messages.empty());
}

static void test_errors_throw_with_status_and_message() {
    bool threw = false;
    try {
        lowvram::check(lowvram_context_cancel(nullptr));
    } catch (const lowvram::Error &e) {
        threw = true;
        CHECK(e.status() == LOWVRAM_STATUS_NULL_ARGUMENT);
        CHECK(std::string(e.what()).find("ctx must not be NULL") != std::string::npos);
    }
    CHECK(threw);
}

int main() {
    test_version_and_stats();
    test_context_and_logging();
    test_errors_throw_with_status_and_message();
    if (failures) {
        std::fprintf(stderr, "test_api_cpp: %d check(s) failed\n", failures);
        return 1;
    }
    std::printf("test_api_cpp: all checks passed\n");
    return 0;
}
