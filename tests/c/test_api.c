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

static void test_tensors(void) {
    const int64_t shape[3] = {2, 3, 4};
    float data[24];
    for (int i = 0; i < 24; i++) data[i] = (float)i * 0.5f - 3.0f;
    lowvram_tensor *t = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, data, sizeof data, &t));

    lowvram_dtype dtype = LOWVRAM_DTYPE_BF16;
    int64_t got_shape[LOWVRAM_MAX_DIMS] = {0};
    size_t ndim = 0, bytes = 0;
    CHECK_OK(lowvram_tensor_info(t, &dtype, got_shape, LOWVRAM_MAX_DIMS, &ndim, &bytes));
    CHECK(dtype == LOWVRAM_DTYPE_F32 && ndim == 3 && bytes == sizeof data);
    CHECK(got_shape[0] == 2 && got_shape[1] == 3 && got_shape[2] == 4);

    float back[24] = {0};
    CHECK_OK(lowvram_tensor_read(t, back, sizeof back));
    CHECK(memcmp(back, data, sizeof data) == 0);

    /* wrong sizes are rejected with both numbers in the message, nothing written */
    float small[23] = {0};
    CHECK(lowvram_tensor_read(t, small, sizeof small) == LOWVRAM_STATUS_BUFFER_SIZE);
    CHECK(strstr(lowvram_last_error_message(), "92") && strstr(lowvram_last_error_message(), "96"));
    CHECK(small[0] == 0.0f);
    CHECK(lowvram_tensor_info(t, NULL, got_shape, 2, NULL, NULL) == LOWVRAM_STATUS_BUFFER_SIZE);

    lowvram_tensor *bad = (lowvram_tensor *)0x1;
    CHECK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, data, sizeof data - 4, &bad) ==
          LOWVRAM_STATUS_BUFFER_SIZE);
    CHECK(bad == (lowvram_tensor *)0x1);
    CHECK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, NULL, 3, data, sizeof data, &bad) ==
          LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 0, data, sizeof data, &bad) ==
          LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(lowvram_tensor_from_host(7, shape, 3, data, sizeof data, &bad) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "dtype 7") != NULL);
    const int64_t negative[1] = {-4};
    CHECK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, negative, 1, data, 16, &bad) ==
          LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(bad == (lowvram_tensor *)0x1);
    CHECK(lowvram_tensor_read(NULL, back, sizeof back) == LOWVRAM_STATUS_NULL_ARGUMENT);

    /* f16 round trip keeps the bits */
    uint16_t halfs[4] = {0x3c00, 0xc000, 0x7bff, 0x0001};
    const int64_t hshape[1] = {4};
    lowvram_tensor *h = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F16, hshape, 1, halfs, sizeof halfs, &h));
    uint16_t hback[4] = {0};
    CHECK_OK(lowvram_tensor_read(h, hback, sizeof hback));
    CHECK(memcmp(halfs, hback, sizeof halfs) == 0);

    lowvram_tensor_free(h);
    lowvram_tensor_free(t);
    lowvram_tensor_free(NULL);
}

int main(void) {
    test_version();
    test_system_stats();
    test_context_lifecycle();
    test_errors_leave_outputs_untouched();
    test_global_log_callback();
    test_tensors();
    if (failures) {
        fprintf(stderr, "test_api: %d check(s) failed\n", failures);
        return 1;
    }
    printf("test_api: all checks passed\n");
    return 0;
}
