/* Thread-safety, shown rather than asserted: on one context, threads run denoise and decode while others
 * reconfigure the budgets, read statistics, take and give back reservations, and start and cancel their own calls.
 * On `cpu` and on an `emulated:` device where most blocks stream. Every completed result must be bit-identical to
 * the single-threaded one, no call may fail other than as the contract allows, and a watchdog (alarm) turns a
 * deadlock into a failure. Built with -std=c11 -Wall -Wextra -Wpedantic -Werror -pthread by scripts/test.sh;
 * $LOWVRAM_REPO locates the repo. */
#define _POSIX_C_SOURCE 200809L
#include "lowvram.h"
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Iterations per worker; $LOWVRAM_STRESS_ITERATIONS overrides it (e.g. fewer under valgrind). */
static int ITERATIONS = 16;

struct shared {
    lowvram_context *ctx;
    lowvram_model *unet, *vae;
    lowvram_tensor *cond, *latents_in;
    float *ref_latents, *ref_image;
    size_t n_latents, n_image;
    atomic_int workers_left; /* the configure/stats/reserve threads run until the workers are done */
    atomic_int completed, cancelled;
};

static float *read_all(lowvram_tensor *t, size_t *n) {
    size_t bytes = 0;
    lowvram_tensor_info(t, NULL, NULL, 0, NULL, &bytes);
    float *v = malloc(bytes);
    CHECK_OK(lowvram_tensor_read(t, v, bytes));
    *n = bytes / sizeof(float);
    return v;
}

static void denoise_params(lowvram_denoise_params *dp) {
    lowvram_denoise_params_init(dp, sizeof *dp);
    dp->steps = 4;
    dp->latent_width = dp->latent_height = 8;
    dp->seed = 11;
}

static lowvram_status denoise(struct shared *s, lowvram_cancel_token *token, lowvram_tensor **out) {
    lowvram_denoise_params dp;
    denoise_params(&dp);
    dp.cancel_token = token;
    return lowvram_denoise(s->ctx, s->unet, &dp, s->cond, NULL, NULL, NULL, out);
}

static lowvram_status decode(struct shared *s, lowvram_tensor **out) {
    lowvram_decode_params p;
    lowvram_decode_params_init(&p, sizeof p);
    p.tile_latent = 4;
    return lowvram_vae_decode(s->ctx, s->vae, &p, s->latents_in, NULL, out);
}

static void sleep_us(long us) {
    struct timespec ts = {0, us * 1000L};
    nanosleep(&ts, NULL);
}

static int matches(lowvram_tensor *t, const float *ref, size_t n) {
    size_t m = 0;
    float *v = read_all(t, &m);
    int same = m == n && memcmp(v, ref, n * sizeof(float)) == 0;
    free(v);
    return same;
}

static void *denoise_worker(void *arg) {
    struct shared *s = arg;
    for (int i = 0; i < ITERATIONS; i++) {
        lowvram_tensor *out = NULL;
        CHECK_OK(denoise(s, NULL, &out));
        CHECK(out && matches(out, s->ref_latents, s->n_latents));
        lowvram_tensor_free(out);
        atomic_fetch_add(&s->completed, 1);
    }
    atomic_fetch_sub(&s->workers_left, 1);
    return NULL;
}

static void *decode_worker(void *arg) {
    struct shared *s = arg;
    for (int i = 0; i < ITERATIONS; i++) {
        lowvram_tensor *out = NULL;
        CHECK_OK(decode(s, &out));
        CHECK(out && matches(out, s->ref_image, s->n_image));
        lowvram_tensor_free(out);
        atomic_fetch_add(&s->completed, 1);
    }
    atomic_fetch_sub(&s->workers_left, 1);
    return NULL;
}

struct victim {
    struct shared *s;
    lowvram_cancel_token *token;
    lowvram_tensor *out;
    lowvram_status status;
};

static void *victim_run(void *arg) {
    struct victim *v = arg;
    v->status = denoise(v->s, v->token, &v->out);
    return NULL;
}

/* Starts calls with their own tokens and cancels them from this thread; the other workers must not notice. */
static void *cancel_worker(void *arg) {
    struct shared *s = arg;
    for (int i = 0; i < ITERATIONS; i++) {
        struct victim v = {s, NULL, NULL, 0};
        CHECK_OK(lowvram_cancel_token_new(&v.token));
        pthread_t th;
        pthread_create(&th, NULL, victim_run, &v);
        struct timespec ts = {0, (long)(1 + i * 7) * 1000000L};
        nanosleep(&ts, NULL);
        CHECK_OK(lowvram_cancel_token_cancel(v.token));
        pthread_join(th, NULL);
        CHECK(v.status == LOWVRAM_STATUS_OK || v.status == LOWVRAM_STATUS_CANCELLED);
        if (v.status == LOWVRAM_STATUS_OK) {
            CHECK(matches(v.out, s->ref_latents, s->n_latents));
            atomic_fetch_add(&s->completed, 1);
        } else {
            CHECK(v.out == NULL);
            atomic_fetch_add(&s->cancelled, 1);
        }
        lowvram_tensor_free(v.out);
        lowvram_cancel_token_free(v.token);
    }
    atomic_fetch_sub(&s->workers_left, 1);
    return NULL;
}

static void *configure_worker(void *arg) {
    struct shared *s = arg;
    const char *yaml[2] = {"max_cache_vram_gb: 0.0005\n", "max_cache_vram_gb: 0.002\n"};
    for (int i = 0; atomic_load(&s->workers_left) > 0; i++) {
        CHECK_OK(lowvram_context_configure(s->ctx, yaml[i % 2]));
        sleep_us(2000);
    }
    return NULL;
}

static void *stats_worker(void *arg) {
    struct shared *s = arg;
    while (atomic_load(&s->workers_left) > 0) {
        lowvram_cache_stats st;
        st.struct_size = sizeof st;
        CHECK_OK(lowvram_context_stats(s->ctx, &st));
        CHECK(st.model_count == 2);
        char *json = NULL;
        CHECK_OK(lowvram_context_stats_json(s->ctx, &json));
        lowvram_string_free(json);
        lowvram_model_info info;
        info.struct_size = sizeof info;
        CHECK_OK(lowvram_model_get_info(s->unet, &info));
        sleep_us(1000);
    }
    return NULL;
}

static void *reserve_worker(void *arg) {
    struct shared *s = arg;
    while (atomic_load(&s->workers_left) > 0) {
        lowvram_reservation *r = NULL;
        lowvram_status st = lowvram_reservation_new(s->ctx, 256u << 10, &r);
        CHECK(st == LOWVRAM_STATUS_OK || st == LOWVRAM_STATUS_BUDGET_TOO_SMALL);
        sleep_us(1500);
        lowvram_reservation_free(r);
    }
    return NULL;
}

static void stress(const char *device, const char *yaml, const char *unet_dir, const char *vae_dir) {
    lowvram_context_params cp;
    lowvram_context_params_init(&cp, sizeof cp);
    cp.device = device;
    cp.config_yaml = yaml;
    struct shared s;
    memset(&s, 0, sizeof s);
    CHECK_OK(lowvram_context_new(&cp, &s.ctx));
    CHECK_OK(lowvram_model_load(s.ctx, unet_dir, &s.unet));
    CHECK_OK(lowvram_model_load(s.ctx, vae_dir, &s.vae));
    float cond[4 * 32];
    for (int i = 0; i < 4 * 32; i++) cond[i] = (float)((i * 37) % 17) / 17.0f - 0.5f;
    int64_t shape[3] = {1, 4, 32};
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, cond, sizeof cond, &s.cond));

    /* single-threaded references */
    lowvram_tensor *ref = NULL, *img = NULL;
    CHECK_OK(denoise(&s, NULL, &ref));
    s.ref_latents = read_all(ref, &s.n_latents);
    s.latents_in = ref;
    CHECK_OK(decode(&s, &img));
    s.ref_image = read_all(img, &s.n_image);
    lowvram_tensor_free(img);

    enum { DENOISERS = 3, DECODERS = 2, CANCELLERS = 1 };
    atomic_store(&s.workers_left, DENOISERS + DECODERS + CANCELLERS);
    pthread_t workers[DENOISERS + DECODERS + CANCELLERS], others[3];
    int w = 0;
    for (int i = 0; i < DENOISERS; i++) pthread_create(&workers[w++], NULL, denoise_worker, &s);
    for (int i = 0; i < DECODERS; i++) pthread_create(&workers[w++], NULL, decode_worker, &s);
    for (int i = 0; i < CANCELLERS; i++) pthread_create(&workers[w++], NULL, cancel_worker, &s);
    pthread_create(&others[0], NULL, configure_worker, &s);
    pthread_create(&others[1], NULL, stats_worker, &s);
    pthread_create(&others[2], NULL, reserve_worker, &s);
    for (int i = 0; i < w; i++) pthread_join(workers[i], NULL);
    for (int i = 0; i < 3; i++) pthread_join(others[i], NULL);

    lowvram_cache_stats st;
    st.struct_size = sizeof st;
    CHECK_OK(lowvram_context_stats(s.ctx, &st));
    printf("stress on %s: %d calls completed bit-identical, %d cancelled by their own token; %llu bytes streamed, "
           "%llu refused allocations\n",
           device, atomic_load(&s.completed), atomic_load(&s.cancelled), (unsigned long long)st.bytes_streamed_total,
           (unsigned long long)st.device_refused_allocations);
    CHECK(atomic_load(&s.completed) >= (DENOISERS + DECODERS) * ITERATIONS);
    free(s.ref_latents);
    free(s.ref_image);
    lowvram_tensor_free(ref);
    lowvram_tensor_free(s.cond);
    lowvram_model_free(s.unet);
    lowvram_model_free(s.vae);
    lowvram_context_free(s.ctx);
}

int main(void) {
    alarm(600); /* watchdog: a deadlock fails the test instead of hanging it */
    const char *iters = getenv("LOWVRAM_STRESS_ITERATIONS");
    if (iters && atoi(iters) > 0) ITERATIONS = atoi(iters);
    const char *repo = getenv("LOWVRAM_REPO");
    char unet_dir[1100], vae_dir[1100];
    snprintf(unet_dir, sizeof unet_dir, "%s/tests/fixtures/tiny-sd-random/unet", repo ? repo : ".");
    snprintf(vae_dir, sizeof vae_dir, "%s/tests/fixtures/tiny-sd-random/vae", repo ? repo : ".");
    stress("cpu", NULL, unet_dir, vae_dir);
    stress("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n", unet_dir, vae_dir);
    return check_report("test_stress");
}
