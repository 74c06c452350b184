/* The backend rule, from a host's side (scripts/test.sh runs it against an installed package):
 *
 *   test_backend cpu|cuda|library REASON [+FILE | -FILE]...
 *
 * checks that lowvram_system_stats reports that backend with REASON in its reason, that each +FILE is mapped into
 * this process and each -FILE is not (/proc/self/maps), and that calls work through whichever backend runs them:
 * thread-local last errors, tensors, a context with its log callback and release, and device "cuda" on the CPU.
 */
#include "lowvram.h"
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *backend_name(uint32_t b) {
    switch (b) {
    case LOWVRAM_BACKEND_CPU: return "cpu";
    case LOWVRAM_BACKEND_CUDA: return "cuda";
    case LOWVRAM_BACKEND_LIBRARY: return "library";
    default: return "unknown";
    }
}

/* Whether a line of /proc/self/maps names a file whose path contains `needle`. */
static int mapped(const char *needle) {
    FILE *f = fopen("/proc/self/maps", "r");
    char line[4096];
    int found = 0;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle)) found = 1;
    fclose(f);
    return found;
}

struct log_state {
    int messages;
    int released;
};

static void on_log(lowvram_log_level level, const char *message, void *user_data) {
    (void)level;
    (void)message;
    ((struct log_state *)user_data)->messages++;
}

static void on_release(void *user_data) { ((struct log_state *)user_data)->released++; }

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s cpu|cuda|library REASON [+FILE | -FILE]...\n", argv[0]);
        return 2;
    }
    const char *want = argv[1], *want_reason = argv[2];

    /* the first call chooses the backend for the process */
    char version[32];
    snprintf(version, sizeof version, "%d.%d.%d", LOWVRAM_VERSION_MAJOR, LOWVRAM_VERSION_MINOR, LOWVRAM_VERSION_PATCH);
    CHECK(strcmp(lowvram_version(), version) == 0);

    lowvram_system_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    CHECK_OK(lowvram_system_stats(&info));
    CHECK(info.struct_size == sizeof info);
    printf("backend: %s — %s\n", backend_name(info.backend), info.backend_reason);
    CHECK(strcmp(backend_name(info.backend), want) == 0);
    CHECK(strstr(info.backend_reason, want_reason) != NULL);
    CHECK(info.ram_total_bytes > 0);

    for (int i = 3; i < argc; i++) {
        int m = mapped(argv[i] + 1);
        if (argv[i][0] == '+') {
            if (m != 1) fprintf(stderr, "%s is not mapped\n", argv[i] + 1);
            CHECK(m == 1);
        } else {
            if (m != 0) fprintf(stderr, "%s is mapped\n", argv[i] + 1);
            CHECK(m == 0);
        }
    }

    /* errors come back with the backend's message, through this library's lowvram_last_error_message */
    CHECK(lowvram_system_stats(NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "out") != NULL);
    CHECK(strcmp(lowvram_status_name(LOWVRAM_STATUS_BUDGET_TOO_SMALL), "BUDGET_TOO_SMALL") == 0);

    /* a tensor made by the backend, read back and freed by it */
    const int64_t shape[2] = {2, 3};
    const float data[6] = {1, 2, 3, 4, 5, 6};
    float back[6] = {0};
    lowvram_tensor *t = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 2, data, sizeof data, &t));
    CHECK_OK(lowvram_tensor_read(t, back, sizeof back));
    CHECK(memcmp(data, back, sizeof data) == 0);
    lowvram_tensor_free(t);

    /* a context on the CPU logs to the process-wide callback; the release runs once when it is replaced */
    struct log_state log = {0, 0};
    CHECK_OK(lowvram_set_log_callback_ex(on_log, &log, on_release));
    lowvram_context_params cp;
    CHECK_OK(lowvram_context_params_init(&cp, sizeof cp));
    cp.device = "cpu";
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&cp, &ctx));
    CHECK(ctx != NULL);
    char *json = NULL;
    CHECK_OK(lowvram_context_stats_json(ctx, &json));
    CHECK(json != NULL && json[0] == '{');
    lowvram_string_free(json);
    lowvram_context_free(ctx);
    CHECK(log.messages > 0);
    CHECK_OK(lowvram_set_log_callback(NULL, NULL));
    CHECK(log.released == 1);

    /* device "cuda" keeps its meaning: on the CPU it is UNSUPPORTED, and the message says why */
    if (info.backend == LOWVRAM_BACKEND_CPU) {
        cp.device = "cuda";
        ctx = NULL;
        CHECK(lowvram_context_new(&cp, &ctx) == LOWVRAM_STATUS_UNSUPPORTED);
        CHECK(ctx == NULL);
        CHECK(strstr(lowvram_last_error_message(), info.backend_reason) != NULL);
    }

    return check_report("test_backend");
}
