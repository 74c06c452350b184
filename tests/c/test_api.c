/* Uses the lowvram C ABI as a host would: handles, error paths, last-error messages, logging, system stats.
 * Built with -std=c11 -Wall -Wextra -Wpedantic -Werror and run under valgrind by scripts/test.sh. */
#include "lowvram.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond)                                                                        \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond, \
                    lowvram_last_error_message());                                          \
            failures++;                                                                    \
        }                                                                                  \
    } while (0)

#define CHECK_OK(call) CHECK((call) == LOWVRAM_STATUS_OK)

struct log_counter {
    int messages;
    int infos;
};

static void count_logs(lowvram_log_level level, const char *message, void *user_data) {
    struct log_counter *c = (struct log_counter *)user_data;
    c->messages++;
    if (level == LOWVRAM_LOG_LEVEL_INFO) c->infos++;
    (void)message;
}

static void test_version(void) {
    char expected[32];
    snprintf(expected, sizeof expected, "%d.%d.%d", LOWVRAM_VERSION_MAJOR, LOWVRAM_VERSION_MINOR,
             LOWVRAM_VERSION_PATCH);
    CHECK(strcmp(lowvram_version(), expected) == 0);
    CHECK(strcmp(lowvram_status_name(LOWVRAM_STATUS_BUDGET_TOO_SMALL), "BUDGET_TOO_SMALL") == 0);
    CHECK(strcmp(lowvram_status_name(9999), "UNKNOWN") == 0);
}

static void test_system_stats(void) {
    lowvram_system_info info;
    memset(&info, 0, sizeof info);
    /* struct_size not set: rejected, nothing written */
    CHECK(lowvram_system_stats(&info) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "struct_size") != NULL);
    CHECK(info.ram_total_bytes == 0);
    CHECK(lowvram_system_stats(NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "out") != NULL);

    info.struct_size = sizeof info;
    CHECK_OK(lowvram_system_stats(&info));
    CHECK(info.ram_total_bytes > 0);
    CHECK(info.ram_free_bytes > 0 && info.ram_free_bytes <= info.ram_total_bytes);
    if (info.cuda_available) {
        CHECK(info.device_count > 0);
        CHECK(info.devices[0].total_bytes > 0);
    } else {
        CHECK(info.device_count == 0);
        CHECK(strlen(info.cuda_reason) > 0);
    }
}

static void test_context_lifecycle(void) {
    struct log_counter counter = {0, 0};
    lowvram_context_params params;
    CHECK_OK(lowvram_context_params_init(&params, sizeof params));
    CHECK(params.struct_size == sizeof params);
    CHECK(params.device == NULL && params.log_callback == NULL);
    params.device = "cpu";
    params.log_callback = count_logs;
    params.log_user_data = &counter;

    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&params, &ctx));
    CHECK(ctx != NULL);
    CHECK(counter.infos > 0); /* creation logs the cache sizes */

    CHECK_OK(lowvram_context_cancel(ctx));
    lowvram_context_free(ctx);
    lowvram_context_free(NULL); /* no-op */
}

static void test_errors_leave_outputs_untouched(void) {
    lowvram_context *sentinel = (lowvram_context *)0x1;
    lowvram_context *ctx = sentinel;
    lowvram_context_params params;

    CHECK(lowvram_context_new(NULL, NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "out must not be NULL") != NULL);

    CHECK(lowvram_context_params_init(&params, 3) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "struct_size") != NULL);
    CHECK(lowvram_context_params_init(NULL, sizeof params) == LOWVRAM_STATUS_NULL_ARGUMENT);

    memset(&params, 0, sizeof params); /* not initialised: struct_size 0 */
    CHECK(lowvram_context_new(&params, &ctx) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(ctx == sentinel);

    CHECK(lowvram_context_cancel(NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "ctx must not be NULL") != NULL);
}

static void test_global_log_callback(void) {
    struct log_counter counter = {0, 0};
    CHECK_OK(lowvram_set_log_callback(count_logs, &counter));
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(NULL, &ctx)); /* no per-context callback: the global one hears it */
    CHECK(counter.messages > 0);
    int before = counter.messages;
    CHECK_OK(lowvram_set_log_callback(NULL, NULL));
    lowvram_context_free(ctx);
    CHECK_OK(lowvram_context_new(NULL, &ctx));
    CHECK(counter.messages == before); /* removed: nothing more arrives */
    lowvram_context_free(ctx);
}

int main(void) {
    test_version();
    test_system_stats();
    test_context_lifecycle();
    test_errors_leave_outputs_untouched();
    test_global_log_callback();
    if (failures) {
        fprintf(stderr, "test_api: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_api: all checks passed\n");
    return 0;
}
