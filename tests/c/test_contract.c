/* The host contract, as an embedding host relies on it: ownership (a model runs only in its own context, may be freed
 * mid-run, outlives its context), cancel (per-call tokens, a context cancel that no starting call erases, cancel from
 * another thread in the middle of a load, a forward and a tiled decode), reservations that wait with a timeout and a
 * token in the middle of a streamed denoise, ABI growth both ways (older and newer
 * struct sizes, fields split by struct_size, bools as bytes, reports on failure), release callbacks for every
 * user_data, and no aborts on absurd sizes or hostile model folders.
 * Finds the repo through $LOWVRAM_REPO ("." otherwise). Built with -std=c11 -Wall -Wextra -Wpedantic -Werror -pthread
 * and run under valgrind by scripts/test.sh. */
#define _POSIX_C_SOURCE 200809L
#include "lowvram.h"
#include "check.h"

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char repo[1024], unet_dir[1100], vae_dir[1100];

static lowvram_context *new_ctx(const char *device) {
    lowvram_context_params p;
    lowvram_context_params_init(&p, sizeof p);
    p.device = device;
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&p, &ctx));
    return ctx;
}

static lowvram_model *load(lowvram_context *ctx, const char *dir) {
    lowvram_model *m = NULL;
    CHECK_OK(lowvram_model_load(ctx, dir, &m));
    return m;
}

/* cond embeddings [1, 4, 32] for the tiny UNet, a fixed pattern */
static lowvram_tensor *cond_tensor(void) {
    float v[4 * 32];
    for (int i = 0; i < 4 * 32; i++) v[i] = (float)sin(0.37 * i);
    int64_t shape[3] = {1, 4, 32};
    lowvram_tensor *t = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, v, sizeof v, &t));
    return t;
}

static void dparams(lowvram_denoise_params *dp, uint32_t steps, uint32_t side) {
    lowvram_denoise_params_init(dp, sizeof *dp);
    dp->steps = steps;
    dp->latent_width = side;
    dp->latent_height = side;
    dp->seed = 7;
}

static float *read_all(lowvram_tensor *t, size_t *n) {
    size_t bytes = 0;
    lowvram_tensor_info(t, NULL, NULL, 0, NULL, &bytes);
    float *v = malloc(bytes);
    CHECK_OK(lowvram_tensor_read(t, v, bytes));
    *n = bytes / sizeof(float);
    return v;
}

static int same_tensor(lowvram_tensor *a, lowvram_tensor *b) {
    size_t na, nb;
    float *x = read_all(a, &na), *y = read_all(b, &nb);
    int same = na == nb && memcmp(x, y, na * sizeof(float)) == 0;
    free(x);
    free(y);
    return same;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ---- a rendezvous between a callback on the calling thread and a test thread --------------------------------- */

struct gate {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int reached, released;
    unsigned stop_at; /* the callback waits when it reports this step */
    unsigned calls;
};

static void gate_init(struct gate *g, unsigned stop_at) {
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, NULL);
    g->reached = g->released = 0;
    g->stop_at = stop_at;
    g->calls = 0;
}

static void gate_destroy(struct gate *g) {
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
}

static void gate_wait_reached(struct gate *g) {
    pthread_mutex_lock(&g->mu);
    while (!g->reached) pthread_cond_wait(&g->cv, &g->mu);
    pthread_mutex_unlock(&g->mu);
}

static void gate_release(struct gate *g) {
    pthread_mutex_lock(&g->mu);
    g->released = 1;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

/* A progress callback: at `stop_at` it tells the test thread and waits until released. */
static bool gate_progress(uint32_t step, uint32_t total, void *user_data) {
    (void)total;
    struct gate *g = user_data;
    pthread_mutex_lock(&g->mu);
    g->calls++;
    if (step == g->stop_at) {
        g->reached = 1;
        pthread_cond_broadcast(&g->cv);
        while (!g->released) pthread_cond_wait(&g->cv, &g->mu);
    }
    pthread_mutex_unlock(&g->mu);
    return true;
}

/* A denoise on its own thread. */
struct run {
    lowvram_context *ctx;
    lowvram_model *unet;
    lowvram_tensor *cond;
    lowvram_denoise_params dp;
    lowvram_tensor *out;
    lowvram_status status;
    pthread_t thread;
};

static void *run_denoise(void *arg) {
    struct run *r = arg;
    r->out = NULL;
    r->status = lowvram_denoise(r->ctx, r->unet, &r->dp, r->cond, NULL, NULL, NULL, &r->out);
    return NULL;
}

/* ---- ABI growth ----------------------------------------------------------------------------------------------- */

static void test_struct_sizes_both_ways(lowvram_context *ctx, lowvram_model *unet, lowvram_tensor *cond) {
    /* init accepts every size lowvram_context_new accepts: 40 = up to log_callback (a host before log_user_data) */
    lowvram_context_params cp;
    memset(&cp, 0xAB, sizeof cp);
    CHECK_OK(lowvram_context_params_init(&cp, 40));
    CHECK(cp.struct_size == 40 && cp.device == NULL && cp.log_callback == NULL);
    CHECK(cp.log_user_data == (void *)0xABABABABABABABABull); /* beyond 40: untouched */
    lowvram_context *c40 = NULL;
    cp.device = "cpu";
    CHECK_OK(lowvram_context_new(&cp, &c40));
    lowvram_context_free(c40);
    /* a struct_size that ends inside a pointer field is rejected (the half-copied pointer would be called) */
    CHECK(lowvram_context_params_init(&cp, offsetof(lowvram_context_params, log_user_data) + 4) ==
          LOWVRAM_STATUS_INVALID_ARGUMENT);
    lowvram_denoise_params dp;
    dparams(&dp, 2, 8);
    dp.progress = gate_progress; /* would be called through a half-copied pointer */
    dp.struct_size = (uint32_t)(offsetof(lowvram_denoise_params, progress) + 4);
    lowvram_tensor *out = NULL;
    CHECK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "inside a field") != NULL);
    CHECK(out == NULL);

    /* bools are bytes: 0x02, 0x80 and 0xFE are true (karras changes the result) */
    lowvram_tensor *ref_true = NULL, *ref_false = NULL;
    dparams(&dp, 3, 8);
    dp.karras = true;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &ref_true));
    dp.karras = false;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &ref_false));
    CHECK(!same_tensor(ref_true, ref_false));
    const unsigned char bytes[3] = {0x02, 0x80, 0xFE};
    for (int i = 0; i < 3; i++) {
        memcpy(&dp.karras, &bytes[i], 1);
        lowvram_tensor *t = NULL;
        CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &t));
        CHECK(t && same_tensor(t, ref_true));
        lowvram_tensor_free(t);
    }
    lowvram_tensor_free(ref_true);
    lowvram_tensor_free(ref_false);

    /* output structs: an older, smaller struct gets the whole fields it covers; a newer, larger one keeps its tail */
    unsigned char buf[sizeof(lowvram_cache_stats) + 64];
    memset(buf, 0xCD, sizeof buf);
    uint32_t small = (uint32_t)offsetof(lowvram_cache_stats, device_free_bytes); /* struct_size + device_total */
    memcpy(buf, &small, 4);
    CHECK_OK(lowvram_context_stats(ctx, (lowvram_cache_stats *)buf));
    uint32_t got;
    memcpy(&got, buf, 4);
    CHECK(got == small);
    CHECK(buf[small] == 0xCD && buf[sizeof buf - 1] == 0xCD);
    uint32_t large = (uint32_t)sizeof buf;
    memset(buf, 0xCD, sizeof buf);
    memcpy(buf, &large, 4);
    CHECK_OK(lowvram_context_stats(ctx, (lowvram_cache_stats *)buf));
    memcpy(&got, buf, 4);
    CHECK(got == sizeof(lowvram_cache_stats));
    CHECK(buf[sizeof(lowvram_cache_stats)] == 0xCD && buf[sizeof buf - 1] == 0xCD);
    uint32_t count;
    memcpy(&count, buf + offsetof(lowvram_cache_stats, model_count), 4);
    CHECK(count >= 1);

    unsigned char ibuf[sizeof(lowvram_model_info) + 16];
    memset(ibuf, 0xCD, sizeof ibuf);
    small = (uint32_t)offsetof(lowvram_model_info, resident_bytes); /* up to total_bytes */
    memcpy(ibuf, &small, 4);
    CHECK_OK(lowvram_model_get_info(unet, (lowvram_model_info *)ibuf));
    uint64_t total = 0;
    memcpy(&total, ibuf + offsetof(lowvram_model_info, total_bytes), 8);
    CHECK(total > 0 && ibuf[small] == 0xCD);

    static unsigned char sbuf[sizeof(lowvram_system_info) + 32];
    memset(sbuf, 0xCD, sizeof sbuf);
    small = (uint32_t)offsetof(lowvram_system_info, cuda_available); /* RAM figures only */
    memcpy(sbuf, &small, 4);
    CHECK_OK(lowvram_system_stats((lowvram_system_info *)sbuf));
    memcpy(&total, sbuf + offsetof(lowvram_system_info, ram_total_bytes), 8);
    CHECK(total > 0 && sbuf[small] == 0xCD);

    /* a run report of an older size */
    unsigned char rbuf[sizeof(lowvram_run_report)];
    memset(rbuf, 0xCD, sizeof rbuf);
    small = (uint32_t)offsetof(lowvram_run_report, peak_device_bytes); /* struct_size + total_ms */
    memcpy(rbuf, &small, 4);
    dparams(&dp, 2, 8);
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, (lowvram_run_report *)rbuf, &out));
    double ms = -1;
    memcpy(&ms, rbuf + offsetof(lowvram_run_report, total_ms), 8);
    CHECK(ms > 0 && rbuf[small] == 0xCD);
    lowvram_tensor_free(out);
}

/* ---- reports on failure --------------------------------------------------------------------------------------- */

static void test_report_on_failure(lowvram_context *ctx, lowvram_model *unet, lowvram_tensor *cond) {
    lowvram_model_info info;
    info.struct_size = sizeof info;
    CHECK_OK(lowvram_model_get_info(unet, &info));
    lowvram_cancel_token *token = NULL;
    CHECK_OK(lowvram_cancel_token_new(&token));
    CHECK_OK(lowvram_cancel_token_cancel(token));
    lowvram_denoise_params dp;
    dparams(&dp, 4, 8);
    dp.cancel_token = token;
    lowvram_run_report r;
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    lowvram_tensor *out = NULL;
    CHECK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, &r, &out) == LOWVRAM_STATUS_CANCELLED);
    CHECK(out == NULL);
    CHECK(r.struct_size == sizeof r && r.model_bytes == info.total_bytes && r.total_ms >= 0);
    lowvram_cancel_token_free(token);

    /* BUDGET_TOO_SMALL on a device far too small: the report says what was needed */
    lowvram_context *tiny = new_ctx("emulated:64KiB");
    lowvram_model *u = load(tiny, unet_dir);
    memset(&r, 0, sizeof r);
    r.struct_size = sizeof r;
    dparams(&dp, 2, 8);
    lowvram_status s = lowvram_denoise(tiny, u, &dp, cond, NULL, NULL, &r, &out);
    CHECK(s == LOWVRAM_STATUS_BUDGET_TOO_SMALL);
    CHECK(r.struct_size == sizeof r && r.model_bytes == info.total_bytes);
    printf("report on BUDGET_TOO_SMALL: model %llu bytes, %.2f ms, message: %s\n",
           (unsigned long long)r.model_bytes, r.total_ms, lowvram_last_error_message());
    lowvram_model_free(u);
    lowvram_context_free(tiny);
}

/* ---- cancel --------------------------------------------------------------------------------------------------- */

static void test_tokens_are_per_call(lowvram_context *ctx, lowvram_model *unet, lowvram_tensor *cond) {
    /* reference: 6 steps uncancelled */
    lowvram_denoise_params dp;
    dparams(&dp, 6, 8);
    lowvram_tensor *ref = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &ref));

    /* a token cancelled before the call starts is not lost */
    lowvram_cancel_token *early = NULL;
    CHECK_OK(lowvram_cancel_token_new(&early));
    CHECK_OK(lowvram_cancel_token_cancel(early));
    struct gate g;
    gate_init(&g, 1000);
    dp.progress = gate_progress;
    dp.progress_user_data = &g;
    dp.cancel_token = early;
    lowvram_tensor *out = NULL;
    CHECK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_CANCELLED);
    CHECK(g.calls == 0 && out == NULL);
    bool c = false;
    CHECK_OK(lowvram_cancel_token_is_cancelled(early, &c));
    CHECK(c);
    lowvram_cancel_token_free(early);
    gate_destroy(&g);

    /* two calls running together: cancelling A's token stops A only */
    struct gate ga, gb;
    gate_init(&ga, 2);
    gate_init(&gb, 2);
    lowvram_cancel_token *ta = NULL, *tb = NULL;
    CHECK_OK(lowvram_cancel_token_new(&ta));
    CHECK_OK(lowvram_cancel_token_new(&tb));
    struct run a = {ctx, unet, cond, dp, NULL, 0, 0}, b = {ctx, unet, cond, dp, NULL, 0, 0};
    a.dp.progress_user_data = &ga;
    a.dp.cancel_token = ta;
    b.dp.progress_user_data = &gb;
    b.dp.cancel_token = tb;
    pthread_create(&a.thread, NULL, run_denoise, &a);
    pthread_create(&b.thread, NULL, run_denoise, &b);
    gate_wait_reached(&ga);
    gate_wait_reached(&gb);
    CHECK_OK(lowvram_cancel_token_cancel(ta));
    lowvram_cancel_token_free(ta); /* the call holds its own reference */
    gate_release(&ga);
    gate_release(&gb);
    pthread_join(a.thread, NULL);
    pthread_join(b.thread, NULL);
    CHECK(a.status == LOWVRAM_STATUS_CANCELLED && a.out == NULL);
    CHECK(b.status == LOWVRAM_STATUS_OK && b.out && same_tensor(b.out, ref));
    lowvram_tensor_free(b.out);
    lowvram_cancel_token_free(tb);
    gate_destroy(&ga);
    gate_destroy(&gb);

    /* a context cancel stops the call running when it is issued; a call starting afterwards neither erases it nor
     * is stopped by it */
    struct gate gr;
    gate_init(&gr, 2);
    struct run r = {ctx, unet, cond, dp, NULL, 0, 0};
    r.dp.cancel_token = NULL;
    r.dp.progress_user_data = &gr;
    pthread_create(&r.thread, NULL, run_denoise, &r);
    gate_wait_reached(&gr);
    CHECK_OK(lowvram_context_cancel(ctx));
    lowvram_denoise_params later;
    dparams(&later, 6, 8);
    lowvram_tensor *after = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &later, cond, NULL, NULL, NULL, &after)); /* starts after the cancel */
    CHECK(after && same_tensor(after, ref));
    lowvram_tensor_free(after);
    gate_release(&gr);
    pthread_join(r.thread, NULL);
    CHECK(r.status == LOWVRAM_STATUS_CANCELLED && r.out == NULL);
    gate_destroy(&gr);
    lowvram_tensor_free(ref);
}

struct canceller {
    lowvram_cancel_token *token;
    double delay_s;
    pthread_t thread;
};

static void *cancel_later(void *arg) {
    struct canceller *c = arg;
    struct timespec ts = {(time_t)c->delay_s, (long)((c->delay_s - (double)(time_t)c->delay_s) * 1e9)};
    nanosleep(&ts, NULL);
    lowvram_cancel_token_cancel(c->token);
    return NULL;
}

/* Cancel from another thread while the only step's forward runs: the call stops at a UNet block boundary, long
 * before the forward would end (step-boundary cancel would let it finish and return OK). */
static void test_cancel_mid_forward(lowvram_context *ctx, lowvram_model *unet, lowvram_tensor *cond) {
    lowvram_denoise_params dp;
    dparams(&dp, 1, 64);
    dp.guidance = 1.0f;
    double t0 = now_s();
    lowvram_tensor *out = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out));
    double forward_s = now_s() - t0;
    lowvram_tensor_free(out);
    out = NULL;
    struct canceller c = {NULL, forward_s / 4, 0};
    CHECK_OK(lowvram_cancel_token_new(&c.token));
    dp.cancel_token = c.token;
    pthread_create(&c.thread, NULL, cancel_later, &c);
    t0 = now_s();
    lowvram_status s = lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out);
    double cancelled_s = now_s() - t0;
    pthread_join(c.thread, NULL);
    CHECK(s == LOWVRAM_STATUS_CANCELLED && out == NULL);
    CHECK(cancelled_s < forward_s * 0.8);
    printf("cancel mid-forward: one step %.3f s, cancelled after %.3f s (cancel sent at %.3f s)\n", forward_s,
           cancelled_s, forward_s / 4);
    lowvram_cancel_token_free(c.token);
}

struct decode_run {
    lowvram_context *ctx;
    lowvram_model *vae;
    lowvram_tensor *latents;
    lowvram_decode_params p;
    lowvram_tensor *out;
    lowvram_status status;
};

static void *run_decode(void *arg) {
    struct decode_run *d = arg;
    d->status = lowvram_vae_decode(d->ctx, d->vae, &d->p, d->latents, NULL, &d->out);
    return NULL;
}

/* Cancel a decode (untiled and tiled) from another thread between decoder blocks; the decode's own progress
 * callback reports blocks. */
static void test_cancel_mid_decode(lowvram_context *ctx, lowvram_model *vae) {
    float z[4 * 16 * 16];
    for (int i = 0; i < 4 * 16 * 16; i++) z[i] = (float)cos(0.11 * i);
    int64_t shape[4] = {1, 4, 16, 16};
    lowvram_tensor *latents = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 4, z, sizeof z, &latents));
    for (uint32_t tile = 0; tile <= 4; tile += 4) {
        struct gate g;
        gate_init(&g, 3);
        struct decode_run d = {ctx, vae, latents, {0}, NULL, 0};
        lowvram_decode_params_init(&d.p, sizeof d.p);
        d.p.tile_latent = tile;
        d.p.progress = gate_progress;
        d.p.progress_user_data = &g;
        lowvram_cancel_token *token = NULL;
        CHECK_OK(lowvram_cancel_token_new(&token));
        d.p.cancel_token = token;
        pthread_t th;
        pthread_create(&th, NULL, run_decode, &d);
        gate_wait_reached(&g);
        CHECK_OK(lowvram_cancel_token_cancel(token));
        gate_release(&g);
        pthread_join(th, NULL);
        CHECK(d.status == LOWVRAM_STATUS_CANCELLED && d.out == NULL);
        CHECK(g.calls == 3);
        lowvram_cancel_token_free(token);
        gate_destroy(&g);
        /* uncancelled, the progress covers every block */
        gate_init(&g, 1000);
        d.p.cancel_token = NULL;
        d.out = NULL;
        run_decode(&d);
        CHECK(d.status == LOWVRAM_STATUS_OK && d.out != NULL && g.calls > 3);
        printf("decode (tile %u): %u block progress calls\n", tile, g.calls);
        lowvram_tensor_free(d.out);
        gate_destroy(&g);
    }
    lowvram_tensor_free(latents);
}

struct load_run {
    lowvram_context *ctx;
    const char *dir;
    lowvram_model_load_params p;
    lowvram_model *out;
    lowvram_status status;
};

static void *run_load(void *arg) {
    struct load_run *l = arg;
    l->status = lowvram_model_load_ex(l->ctx, l->dir, &l->p, &l->out);
    return NULL;
}

static int releases = 0;
static void count_release(void *user_data) {
    (void)user_data;
    releases++;
}

/* Cancel a load from another thread (token, then context cancel) between its phases. */
static void test_cancel_mid_load(lowvram_context *ctx) {
    for (int by_context = 0; by_context <= 1; by_context++) {
        struct gate g;
        gate_init(&g, 1);
        struct load_run l = {ctx, unet_dir, {0}, NULL, 0};
        CHECK_OK(lowvram_model_load_params_init(&l.p, sizeof l.p));
        l.p.progress = gate_progress;
        l.p.progress_user_data = &g;
        l.p.progress_user_data_release = count_release;
        lowvram_cancel_token *token = NULL;
        CHECK_OK(lowvram_cancel_token_new(&token));
        l.p.cancel_token = token;
        int before = releases;
        pthread_t th;
        pthread_create(&th, NULL, run_load, &l);
        gate_wait_reached(&g);
        if (by_context)
            CHECK_OK(lowvram_context_cancel(ctx));
        else
            CHECK_OK(lowvram_cancel_token_cancel(token));
        gate_release(&g);
        pthread_join(th, NULL);
        CHECK(l.status == LOWVRAM_STATUS_CANCELLED && l.out == NULL);
        CHECK(releases == before + 1);
        lowvram_cancel_token_free(token);
        gate_destroy(&g);
    }
    /* and it loads when nobody cancels, reporting each phase */
    struct gate g;
    gate_init(&g, 1000);
    struct load_run l = {ctx, vae_dir, {0}, NULL, 0};
    CHECK_OK(lowvram_model_load_params_init(&l.p, sizeof l.p));
    l.p.progress = gate_progress;
    l.p.progress_user_data = &g;
    run_load(&l);
    CHECK(l.status == LOWVRAM_STATUS_OK && l.out != NULL && g.calls == 3);
    lowvram_model_free(l.out);
    gate_destroy(&g);
}

/* ---- reservations with a timeout and a token, in the middle of a streamed denoise ------------------------------ */

struct reserve_run {
    lowvram_context *ctx;
    uint64_t bytes;
    lowvram_reservation_params p;
    lowvram_reservation *out;
    lowvram_status status;
    double returned_at;
    atomic_int done;
    pthread_t thread;
};

static void *run_reserve(void *arg) {
    struct reserve_run *r = arg;
    r->out = NULL;
    r->status = lowvram_reservation_new_ex(r->ctx, r->bytes, &r->p, &r->out);
    r->returned_at = now_s();
    atomic_store(&r->done, 1);
    return NULL;
}

static void used_bytes(lowvram_context *ctx, uint64_t *used, uint64_t *cache) {
    lowvram_cache_stats st;
    st.struct_size = sizeof st;
    CHECK_OK(lowvram_context_stats(ctx, &st));
    *used = st.device_used_bytes;
    *cache = st.device_used_by_cache_bytes;
}

static void test_reservation_waits(lowvram_tensor *cond) {
    const uint64_t cap = 64ull << 20;
    lowvram_context_params cp;
    lowvram_context_params_init(&cp, sizeof cp);
    cp.device = "emulated:64MiB";
    cp.config_yaml = "device_working_mem_gb: 0";
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&cp, &ctx));
    lowvram_model *unet = load(ctx, unet_dir);
    lowvram_denoise_params dp;
    dparams(&dp, 3, 8);
    lowvram_run_report rep;
    rep.struct_size = sizeof rep;
    lowvram_tensor *ref = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, &rep, &ref));
    uint64_t rest_used, rest_cache, used, cache;
    used_bytes(ctx, &rest_used, &rest_cache);

    /* params: init, NULL = defaults, a struct_size ending inside timeout_ms rejected */
    lowvram_reservation_params rp;
    memset(&rp, 0xAB, sizeof rp);
    CHECK_OK(lowvram_reservation_params_init(&rp, sizeof rp));
    CHECK(rp.timeout_ms == LOWVRAM_WAIT_FOREVER && rp.cancel_token == NULL);
    lowvram_reservation *res = NULL;
    CHECK_OK(lowvram_reservation_new_ex(ctx, 1u << 20, NULL, &res));
    lowvram_reservation_free(res);
    rp.struct_size = (uint32_t)offsetof(lowvram_reservation_params, timeout_ms) + 4;
    res = NULL;
    CHECK(lowvram_reservation_new_ex(ctx, 1u << 20, &rp, &res) == LOWVRAM_STATUS_INVALID_ARGUMENT && res == NULL);
    CHECK(strcmp(lowvram_status_name(LOWVRAM_STATUS_TIMEOUT), "TIMEOUT") == 0);

    /* (a) half the model's residency must go: granted once the paused run passes its next block boundary */
    struct gate g;
    gate_init(&g, 1);
    struct run r = {ctx, unet, cond, dp, NULL, 0, 0};
    r.dp.progress = gate_progress;
    r.dp.progress_user_data = &g;
    pthread_create(&r.thread, NULL, run_denoise, &r);
    gate_wait_reached(&g);
    used_bytes(ctx, &used, &cache);
    struct reserve_run a = {ctx, cap - used + rep.model_bytes / 2, {0}, NULL, 0, 0, 0, 0};
    CHECK_OK(lowvram_reservation_params_init(&a.p, sizeof a.p));
    a.p.timeout_ms = 30000;
    pthread_create(&a.thread, NULL, run_reserve, &a);
    struct timespec pause = {0, 300 * 1000 * 1000};
    nanosleep(&pause, NULL);
    double released = now_s();
    CHECK(!atomic_load(&a.done)); /* still waiting for the run's blocks */
    gate_release(&g);
    pthread_join(a.thread, NULL);
    pthread_join(r.thread, NULL);
    CHECK(a.status == LOWVRAM_STATUS_OK && a.out != NULL && a.returned_at >= released);
    CHECK(r.status == LOWVRAM_STATUS_OK && r.out && same_tensor(r.out, ref));
    lowvram_tensor_free(r.out);
    lowvram_reservation_free(a.out);
    gate_destroy(&g);

    /* (b) more than fits beside the run's working memory: TIMEOUT after timeout_ms, with the numbers */
    gate_init(&g, 1);
    r.out = NULL;
    pthread_create(&r.thread, NULL, run_denoise, &r);
    gate_wait_reached(&g);
    uint64_t held_used, held_cache;
    used_bytes(ctx, &held_used, &held_cache);
    uint64_t want = cap - rep.working_bytes / 2;
    CHECK_OK(lowvram_reservation_params_init(&rp, sizeof rp));
    rp.timeout_ms = 400;
    res = NULL;
    double t0 = now_s();
    CHECK(lowvram_reservation_new_ex(ctx, want, &rp, &res) == LOWVRAM_STATUS_TIMEOUT && res == NULL);
    double waited = now_s() - t0;
    CHECK(waited >= 0.4 && waited < 5.0);
    CHECK(strstr(lowvram_last_error_message(), "timed out") && strstr(lowvram_last_error_message(), "needs"));
    printf("reservation timeout after %.0f ms: %s\n", waited * 1e3, lowvram_last_error_message());
    used_bytes(ctx, &used, &cache);
    CHECK(used == held_used && cache == held_cache); /* nothing left behind */
    rp.timeout_ms = 0;
    t0 = now_s();
    CHECK(lowvram_reservation_new_ex(ctx, want, &rp, &res) == LOWVRAM_STATUS_TIMEOUT && res == NULL);
    CHECK(now_s() - t0 < 0.2);

    /* (c) cancelled by its token from another thread while it waits */
    lowvram_cancel_token *token = NULL;
    CHECK_OK(lowvram_cancel_token_new(&token));
    rp.timeout_ms = LOWVRAM_WAIT_FOREVER;
    rp.cancel_token = token;
    struct canceller c = {token, 0.2, 0};
    pthread_create(&c.thread, NULL, cancel_later, &c);
    t0 = now_s();
    CHECK(lowvram_reservation_new_ex(ctx, want, &rp, &res) == LOWVRAM_STATUS_CANCELLED && res == NULL);
    waited = now_s() - t0;
    CHECK(waited >= 0.15 && waited < 5.0);
    pthread_join(c.thread, NULL);
    used_bytes(ctx, &used, &cache);
    CHECK(used == held_used && cache == held_cache);
    /* a token cancelled before the call: CANCELLED at once */
    CHECK(lowvram_reservation_new_ex(ctx, 1u << 20, &rp, &res) == LOWVRAM_STATUS_CANCELLED && res == NULL);
    lowvram_cancel_token_free(token);
    gate_release(&g);
    pthread_join(r.thread, NULL);
    CHECK(r.status == LOWVRAM_STATUS_OK && r.out && same_tensor(r.out, ref));
    lowvram_tensor_free(r.out);
    gate_destroy(&g);

    /* at rest again: the accounting of before, and the bytes of (b) granted at once */
    used_bytes(ctx, &used, &cache);
    CHECK(used == rest_used && cache == rest_cache);
    rp.cancel_token = NULL;
    rp.timeout_ms = 0;
    CHECK_OK(lowvram_reservation_new_ex(ctx, want, &rp, &res));
    lowvram_reservation_free(res);
    lowvram_tensor_free(ref);
    lowvram_model_free(unet);
    lowvram_context_free(ctx);
}

/* ---- ownership ------------------------------------------------------------------------------------------------ */

static void test_ownership(lowvram_tensor *cond) {
    lowvram_context *a = new_ctx("cpu"), *b = new_ctx("cpu");
    lowvram_model *ua = load(a, unet_dir), *va = load(a, vae_dir);
    lowvram_denoise_params dp;
    dparams(&dp, 4, 8);
    lowvram_tensor *ref = NULL, *out = NULL;
    CHECK_OK(lowvram_denoise(a, ua, &dp, cond, NULL, NULL, NULL, &ref));
    /* another context's model is refused everywhere, naming the reason */
    CHECK(lowvram_denoise(b, ua, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "another context") != NULL);
    CHECK(lowvram_vae_decode(b, va, NULL, ref, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    uint64_t resident = 0;
    CHECK(lowvram_model_load_to_device(b, ua, 1u << 20, &resident) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(out == NULL);

    /* model ids are unique in the process: the same folders loaded in two contexts get four ids */
    {
        lowvram_model *ub = load(b, unet_dir), *vb = load(b, vae_dir), *again = load(a, unet_dir);
        lowvram_model *ms[5] = {ua, va, ub, vb, again};
        uint64_t ids[5];
        for (int i = 0; i < 5; i++) {
            lowvram_model_info mi;
            mi.struct_size = sizeof mi;
            CHECK_OK(lowvram_model_get_info(ms[i], &mi));
            CHECK(mi.struct_size == sizeof mi);
            ids[i] = mi.id;
        }
        for (int i = 0; i < 4; i++)
            for (int j = i + 1; j < 4; j++) CHECK(ids[i] != ids[j]);
        CHECK(ids[4] == ids[0]); /* a second load in one context is the cache's same model */
        lowvram_model_free(ub);
        lowvram_model_free(vb);
        lowvram_model_free(again);
    }

    /* freeing the model while a run uses it on another thread: the run holds its own reference */
    lowvram_model *extra = load(a, unet_dir);
    struct gate g;
    gate_init(&g, 2);
    struct run r = {a, extra, cond, dp, NULL, 0, 0};
    r.dp.progress = gate_progress;
    r.dp.progress_user_data = &g;
    pthread_create(&r.thread, NULL, run_denoise, &r);
    gate_wait_reached(&g);
    lowvram_model_free(extra);
    gate_release(&g);
    pthread_join(r.thread, NULL);
    CHECK(r.status == LOWVRAM_STATUS_OK && r.out && same_tensor(r.out, ref));
    lowvram_tensor_free(r.out);
    gate_destroy(&g);

    /* the context freed while model and reservation handles live: they keep working until freed */
    lowvram_reservation *res = NULL;
    CHECK_OK(lowvram_reservation_new(a, 1u << 20, &res));
    lowvram_context_free(a);
    lowvram_model_info info;
    info.struct_size = sizeof info;
    CHECK_OK(lowvram_model_get_info(ua, &info));
    CHECK(info.kind == LOWVRAM_MODEL_KIND_UNET && info.total_bytes > 0);
    uint64_t bytes = 0;
    CHECK_OK(lowvram_reservation_bytes(res, &bytes));
    CHECK(bytes == 1u << 20);
    CHECK(lowvram_denoise(b, ua, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    lowvram_reservation_free(res);
    lowvram_model_free(ua);
    lowvram_model_free(va);
    lowvram_tensor_free(ref);
    lowvram_context_free(b);
}

/* ---- release callbacks ---------------------------------------------------------------------------------------- */

static void quiet_log(lowvram_log_level level, const char *message, void *user_data) {
    (void)level;
    (void)message;
    (void)user_data;
}

static void test_release_callbacks(lowvram_model *unet, lowvram_context *ctx, lowvram_tensor *cond) {
    /* context params: released when the context is freed */
    releases = 0;
    lowvram_context_params p;
    lowvram_context_params_init(&p, sizeof p);
    p.device = "cpu";
    p.log_callback = quiet_log;
    p.log_user_data_release = count_release;
    lowvram_context *c = NULL;
    CHECK_OK(lowvram_context_new(&p, &c));
    CHECK(releases == 0);
    /* replacing the callback releases the old user_data once; the new one is released at free */
    CHECK_OK(lowvram_context_set_log_callback_ex(c, quiet_log, NULL, count_release));
    CHECK(releases == 1);
    CHECK_OK(lowvram_context_set_log_callback_ex(c, NULL, NULL, count_release)); /* NULL callback: at once */
    CHECK(releases == 3);
    CHECK_OK(lowvram_context_set_log_callback_ex(c, quiet_log, NULL, count_release));
    lowvram_context_free(c);
    CHECK(releases == 4);
    /* a failing lowvram_context_new releases too */
    p.device = "no-such-device";
    c = NULL;
    CHECK(lowvram_context_new(&p, &c) != LOWVRAM_STATUS_OK);
    CHECK(releases == 5 && c == NULL);
    /* process-wide callback */
    CHECK_OK(lowvram_set_log_callback_ex(quiet_log, NULL, count_release));
    CHECK_OK(lowvram_set_log_callback_ex(NULL, NULL, NULL));
    CHECK(releases == 6);
    /* progress user_data: exactly once per call, on success and on failure */
    lowvram_denoise_params dp;
    dparams(&dp, 2, 8);
    dp.progress_user_data_release = count_release;
    lowvram_tensor *out = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out));
    CHECK(releases == 7);
    lowvram_tensor_free(out);
    out = NULL;
    CHECK(lowvram_denoise(ctx, unet, &dp, NULL, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(releases == 8);
    lowvram_decode_params dec;
    lowvram_decode_params_init(&dec, sizeof dec);
    dec.progress_user_data_release = count_release;
    CHECK(lowvram_vae_decode(ctx, unet, &dec, NULL, NULL, &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(releases == 9);
    CHECK(lowvram_denoise(NULL, unet, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(releases == 10); /* even without a context */
    lowvram_model_load_params lp;
    lowvram_model_load_params_init(&lp, sizeof lp);
    lp.progress_user_data_release = count_release;
    lowvram_model *m = NULL;
    CHECK(lowvram_model_load_ex(ctx, NULL, &lp, &m) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(releases == 11 && m == NULL);
}

/* ---- absurd sizes and hostile folders ------------------------------------------------------------------------- */

static void test_empty_tensor_needs_no_data(void) {
    int64_t shape[2] = {0, 4};
    lowvram_tensor *t = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 2, NULL, 0, &t));
    size_t bytes = 1;
    CHECK_OK(lowvram_tensor_info(t, NULL, NULL, 0, NULL, &bytes));
    CHECK(bytes == 0);
    lowvram_tensor_free(t);
    int64_t one[1] = {1};
    t = NULL;
    CHECK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, one, 1, NULL, 4, &t) == LOWVRAM_STATUS_NULL_ARGUMENT && !t);
}

static void test_absurd_sizes(lowvram_model *unet, lowvram_context *ctx, lowvram_tensor *cond) {
    lowvram_denoise_params dp;
    lowvram_tensor *out = NULL;
    const char *devices[2] = {"cpu", "emulated:64MiB"};
    for (int i = 0; i < 2; i++) {
        lowvram_context *c = new_ctx(devices[i]);
        lowvram_model *u = load(c, unet_dir);
        dparams(&dp, 2, 65535);
        lowvram_status s = lowvram_denoise(c, u, &dp, cond, NULL, NULL, NULL, &out);
        CHECK(s == LOWVRAM_STATUS_OUT_OF_HOST_MEMORY || s == LOWVRAM_STATUS_BUDGET_TOO_SMALL ||
              s == LOWVRAM_STATUS_INVALID_ARGUMENT);
        printf("latent 65535x65535 on %s: %s: %s\n", devices[i], lowvram_status_name(s), lowvram_last_error_message());
        lowvram_model_free(u);
        lowvram_context_free(c);
    }
    dparams(&dp, UINT32_MAX, 8);
    CHECK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "4294967295") != NULL);
    dparams(&dp, 2, 8);
    dp.guidance = 1e38f;
    CHECK(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    dp.guidance = 900.0f; /* in range, but the latents overflow: a non-finite result is refused, not returned */
    lowvram_status s = lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, NULL, &out);
    if (s == LOWVRAM_STATUS_OK) {
        size_t n;
        float *v = read_all(out, &n);
        for (size_t k = 0; k < n; k++) CHECK(isfinite(v[k]));
        free(v);
        lowvram_tensor_free(out);
        out = NULL;
    } else {
        CHECK(s == LOWVRAM_STATUS_INVALID_ARGUMENT && strstr(lowvram_last_error_message(), "not finite"));
    }
    /* batch 10^6: [10^6, 1, 32] embeddings */
    size_t big = 1000000;
    float *zeros = calloc(big * 32, sizeof(float));
    int64_t shape[3] = {(int64_t)big, 1, 32};
    lowvram_tensor *huge = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, zeros, big * 32 * sizeof(float), &huge));
    free(zeros);
    dparams(&dp, 2, 64);
    s = lowvram_denoise(ctx, unet, &dp, huge, NULL, NULL, NULL, &out);
    CHECK(s == LOWVRAM_STATUS_OUT_OF_HOST_MEMORY || s == LOWVRAM_STATUS_INVALID_ARGUMENT ||
          s == LOWVRAM_STATUS_BUDGET_TOO_SMALL);
    printf("batch 10^6: %s: %s\n", lowvram_status_name(s), lowvram_last_error_message());
    lowvram_tensor_free(huge);
    CHECK(out == NULL);
}

static char *slurp(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    *len = fread(b, 1, (size_t)n, f);
    b[*len] = 0;
    fclose(f);
    return b;
}

static void spit(const char *path, const char *data, size_t len) {
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, len, f);
    fclose(f);
}

/* A copy of a component folder with `from` replaced by `to` in config.json (or, with `in_weights`, in the
 * safetensors header: a renamed tensor). */
static void hostile_folder(const char *src, const char *dst, const char *from, const char *to, int in_weights) {
    char path[1300], out[1300];
    mkdir(dst, 0755);
    const char *files[2] = {"config.json", "diffusion_pytorch_model.safetensors"};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/%s", src, files[i]);
        snprintf(out, sizeof out, "%s/%s", dst, files[i]);
        size_t len = 0;
        char *b = slurp(path, &len);
        if (!b) continue;
        if (i == in_weights) {
            char *at = NULL;
            for (size_t k = 0; k + strlen(from) <= len && !at; k++)
                if (memcmp(b + k, from, strlen(from)) == 0) at = b + k;
            CHECK(at != NULL);
            if (at) {
                size_t head = (size_t)(at - b), fl = strlen(from), tl = strlen(to);
                char *nb = malloc(len - fl + tl);
                memcpy(nb, b, head);
                memcpy(nb + head, to, tl);
                memcpy(nb + head + tl, at + fl, len - head - fl);
                free(b);
                b = nb;
                len = len - fl + tl;
            }
        }
        spit(out, b, len);
        free(b);
    }
}

static void test_hostile_folders(lowvram_context *ctx) {
    char tmp[] = "/tmp/lowvram-contract-XXXXXX";
    CHECK(mkdtemp(tmp) != NULL);
    struct {
        const char *src, *from, *to, *key;
        int in_weights;
    } cases[] = {
        {vae_dir, "\"layers_per_block\": 1", "\"layers_per_block\": 4294967295", "layers_per_block", 0},
        {unet_dir, "\"layers_per_block\": 2", "\"layers_per_block\": 4294967295", "layers_per_block", 0},
        {unet_dir, "\"downsample_padding\": 1", "\"downsample_padding\": 65535", "downsample_padding", 0},
        {unet_dir, "\"in_channels\": 4", "\"in_channels\": 4294967296", "in_channels", 0},
        {unet_dir, "\"cross_attention_dim\": 32", "\"cross_attention_dim\": 18446744073709551615",
         "cross_attention_dim", 0},
        {unet_dir, "conv_in.weight", "conv_in.weighx", "conv_in.weight", 1},
        {vae_dir, "decoder.conv_out.bias", "decoder.conv_out.biax", "decoder.conv_out.bias", 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char dir[1200];
        snprintf(dir, sizeof dir, "%s/case%zu", tmp, i);
        hostile_folder(cases[i].src, dir, cases[i].from, cases[i].to, cases[i].in_weights);
        lowvram_model *m = NULL;
        lowvram_status s = lowvram_model_load(ctx, dir, &m);
        CHECK(s == LOWVRAM_STATUS_FORMAT && m == NULL);
        CHECK(strstr(lowvram_last_error_message(), cases[i].key) != NULL);
        printf("hostile %s: %s: %s\n", cases[i].key, lowvram_status_name(s), lowvram_last_error_message());
        char f[1300];
        snprintf(f, sizeof f, "%s/config.json", dir);
        unlink(f);
        snprintf(f, sizeof f, "%s/diffusion_pytorch_model.safetensors", dir);
        unlink(f);
        rmdir(dir);
    }
    /* the scheduler beside a UNet */
    char dir[1200], f[1300];
    snprintf(dir, sizeof dir, "%s/unet", tmp);
    hostile_folder(unet_dir, dir, "\"in_channels\": 4", "\"in_channels\": 4", 0);
    snprintf(dir, sizeof dir, "%s/scheduler", tmp);
    mkdir(dir, 0755);
    snprintf(f, sizeof f, "%s/scheduler_config.json", dir);
    const char *sched = "{\"num_train_timesteps\": 4294967295}";
    spit(f, sched, strlen(sched));
    snprintf(dir, sizeof dir, "%s/unet", tmp);
    lowvram_model *m = NULL;
    CHECK(lowvram_model_load(ctx, dir, &m) == LOWVRAM_STATUS_FORMAT && m == NULL);
    CHECK(strstr(lowvram_last_error_message(), "num_train_timesteps") != NULL);
    unlink(f);
    snprintf(f, sizeof f, "%s/scheduler", tmp);
    rmdir(f);
    snprintf(f, sizeof f, "%s/unet/config.json", tmp);
    unlink(f);
    snprintf(f, sizeof f, "%s/unet/diffusion_pytorch_model.safetensors", tmp);
    unlink(f);
    snprintf(f, sizeof f, "%s/unet", tmp);
    rmdir(f);
    rmdir(tmp);
}

int main(void) {
    const char *r = getenv("LOWVRAM_REPO");
    snprintf(repo, sizeof repo, "%s", r ? r : ".");
    snprintf(unet_dir, sizeof unet_dir, "%s/tests/fixtures/tiny-sd-random/unet", repo);
    snprintf(vae_dir, sizeof vae_dir, "%s/tests/fixtures/tiny-sd-random/vae", repo);
    alarm(600); /* a hang is a failure */

    lowvram_context *ctx = new_ctx("cpu");
    lowvram_model *unet = load(ctx, unet_dir), *vae = load(ctx, vae_dir);
    lowvram_tensor *cond = cond_tensor();

    test_struct_sizes_both_ways(ctx, unet, cond);
    test_report_on_failure(ctx, unet, cond);
    test_tokens_are_per_call(ctx, unet, cond);
    test_cancel_mid_forward(ctx, unet, cond);
    test_cancel_mid_decode(ctx, vae);
    test_cancel_mid_load(ctx);
    test_ownership(cond);
    test_reservation_waits(cond);
    test_release_callbacks(unet, ctx, cond);
    test_empty_tensor_needs_no_data();
    test_absurd_sizes(unet, ctx, cond);
    test_hostile_folders(ctx);

    lowvram_tensor_free(cond);
    lowvram_model_free(unet);
    lowvram_model_free(vae);
    lowvram_context_free(ctx);
    return check_report("test_contract");
}
