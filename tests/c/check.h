/* The checks every C host test shares. CHECK counts a failure and says where, with the library's last error;
 * check_report ends main. Include it after the lowvram header the test builds against (include/lowvram.h or the
 * frozen v0.1 one): both declare lowvram_last_error_message and LOWVRAM_STATUS_OK. The count is atomic because
 * test_contract.c and test_stress.c check from several threads at once. */
#ifndef LOWVRAM_TESTS_CHECK_H
#define LOWVRAM_TESTS_CHECK_H

#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

static atomic_int failures = 0;

#define CHECK(cond)                                                                                          \
    do {                                                                                                     \
        if (!(cond)) {                                                                                       \
            fprintf(stderr, "%s:%d: CHECK failed: %s (last error: %s)\n", __FILE__, __LINE__, #cond,         \
                    lowvram_last_error_message());                                                           \
            atomic_fetch_add(&failures, 1);                                                                  \
        }                                                                                                    \
    } while (0)

#define CHECK_OK(call) CHECK((call) == LOWVRAM_STATUS_OK)
#define CHECK_MSG(text) CHECK(strstr(lowvram_last_error_message(), (text)) != NULL)

/* A failure that is not a CHECK (a missing fixture, say): the caller has said why on stderr. */
static inline void check_fail(void) { atomic_fetch_add(&failures, 1); }

/* main's return value: 0 when every check passed, else 1 with the count on stderr. */
static inline int check_report(const char *test) {
    int failed = atomic_load(&failures);
    if (failed) {
        fprintf(stderr, "%s: %d check(s) failed\n", test, failed);
        return 1;
    }
    printf("%s: all checks passed\n", test);
    return 0;
}

#endif
