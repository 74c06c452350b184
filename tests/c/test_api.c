/* Uses the lowvram C ABI as a host would: handles, error paths, last-error messages, logging, system stats, and the
 * whole pipeline on the tiny SD model shipped in the repo (models, reservations, configuration, statistics, denoise,
 * cancel, VAE decode, PNG), compared with the diffusers reference in tests/fixtures/tiny-sd/sample_euler.safetensors.
 * Finds the repo through $LOWVRAM_REPO (scripts/test.sh sets it; "." otherwise).
 * Built with -std=c11 -Wall -Wextra -Wpedantic -Werror and run under valgrind by scripts/test.sh. */
#include "lowvram.h"
#include "check.h"
#include "safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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
    /* which backend runs the calls, and why (the CPU on a machine without a driver) */
    CHECK(info.backend == LOWVRAM_BACKEND_CPU || info.backend == LOWVRAM_BACKEND_CUDA || info.backend == LOWVRAM_BACKEND_LIBRARY);
    CHECK(strlen(info.backend_reason) > 0);
    if (!info.cuda_available && getenv("LOWVRAM_BACKEND") == NULL) CHECK(info.backend == LOWVRAM_BACKEND_CPU);
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

/* ---- the pipeline on the tiny model ------------------------------------------------------------------------ */

static char repo[1024];
static char unet_dir[1100], vae_dir[1100], fixture_path[1100];

static void init_paths(void) {
    const char *r = getenv("LOWVRAM_REPO");
    snprintf(repo, sizeof repo, "%s", r && *r ? r : ".");
    snprintf(unet_dir, sizeof unet_dir, "%s/tests/fixtures/tiny-sd-random/unet", repo);
    snprintf(vae_dir, sizeof vae_dir, "%s/tests/fixtures/tiny-sd-random/vae", repo);
    snprintf(fixture_path, sizeof fixture_path, "%s/tests/fixtures/tiny-sd/sample_euler.safetensors", repo);
}

/* The layout the C# binding must match (x86-64 / aarch64 LP64 numbers, asserted here and in TestApi.cs). */
static void test_struct_sizes(void) {
    printf("sizeof: context_params %zu, cache_stats %zu, model_info %zu, denoise_params %zu, decode_params %zu, "
           "run_report %zu, system_info %zu, device_info %zu\n",
           sizeof(lowvram_context_params), sizeof(lowvram_cache_stats), sizeof(lowvram_model_info),
           sizeof(lowvram_denoise_params), sizeof(lowvram_decode_params), sizeof(lowvram_run_report),
           sizeof(lowvram_system_info), sizeof(lowvram_device_info));
    CHECK(sizeof(lowvram_context_params) == 56);
    CHECK(sizeof(lowvram_cache_stats) == 128);
    CHECK(offsetof(lowvram_cache_stats, models_without_ram_copy) == 100); /* in 0.1's padding after model_count */
    CHECK(offsetof(lowvram_cache_stats, pinned_bytes) == 104);
    CHECK(offsetof(lowvram_cache_stats, models_unpinned) == 120);
    CHECK(sizeof(lowvram_model_info) == 40);
    CHECK(sizeof(lowvram_reservation_params) == 24);
    CHECK(sizeof(lowvram_denoise_params) == 80);
    CHECK(sizeof(lowvram_decode_params) == 48);
    CHECK(sizeof(lowvram_run_report) == 72);
    CHECK(sizeof(lowvram_system_info) == 2984);
    CHECK(sizeof(lowvram_device_info) == 152);
}

static lowvram_context *new_context(const char *device, const char *yaml) {
    lowvram_context_params p;
    CHECK_OK(lowvram_context_params_init(&p, sizeof p));
    p.device = device;
    p.config_yaml = yaml;
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&p, &ctx));
    return ctx;
}

static lowvram_tensor *tensor_of(const struct st_tensor *t) {
    lowvram_tensor *out = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, t->shape, t->ndim, t->data, t->count * sizeof(float), &out));
    return out;
}

/* Read a f32 tensor into a malloc'd buffer (free it), checking its shape. */
static float *read_f32(const lowvram_tensor *t, const int64_t *shape, size_t ndim, size_t *count) {
    lowvram_dtype dtype = LOWVRAM_DTYPE_BF16;
    int64_t got[LOWVRAM_MAX_DIMS] = {0};
    size_t got_ndim = 0, bytes = 0;
    *count = 0;
    if (lowvram_tensor_info(t, &dtype, got, LOWVRAM_MAX_DIMS, &got_ndim, &bytes) != LOWVRAM_STATUS_OK) {
        CHECK(!"lowvram_tensor_info");
        return NULL;
    }
    CHECK(dtype == LOWVRAM_DTYPE_F32);
    CHECK(got_ndim == ndim);
    CHECK(memcmp(got, shape, ndim * sizeof *shape) == 0);
    float *data = malloc(bytes);
    CHECK_OK(lowvram_tensor_read(t, data, bytes));
    *count = bytes / sizeof(float);
    return data;
}

static float max_abs_diff(const float *a, const float *b, size_t n) {
    float m = 0.0f;
    for (size_t i = 0; i < n; i++) {
        float d = a[i] > b[i] ? a[i] - b[i] : b[i] - a[i];
        if (!(d <= m)) m = d; /* NaN propagates as a failure */
    }
    return m;
}

struct progress_state {
    uint32_t calls;
    uint32_t last_step;
    uint32_t total;
    uint32_t stop_at;                /* return false at this step; 0 = never */
    const lowvram_context *cancel_ctx; /* call lowvram_context_cancel at stop_at instead of returning false */
};

static bool on_progress(uint32_t step, uint32_t total, void *user_data) {
    struct progress_state *s = (struct progress_state *)user_data;
    s->calls++;
    s->last_step = step;
    s->total = total;
    if (s->stop_at != 0 && step == s->stop_at) {
        if (s->cancel_ctx) return lowvram_context_cancel(s->cancel_ctx) != LOWVRAM_STATUS_OK;
        return false;
    }
    return true;
}

struct inputs {
    struct st_tensor noise, cond, uncond, latents, image;
    lowvram_tensor *noise_t, *cond_t, *uncond_t;
};

static int load_inputs(struct inputs *in) {
    struct st_file f;
    memset(in, 0, sizeof *in);
    if (!st_open(&f, fixture_path)) {
        fprintf(stderr, "cannot read %s (set LOWVRAM_REPO)\n", fixture_path);
        check_fail();
        return 0;
    }
    int ok = st_get(&f, "sampling.init_noise", &in->noise) && st_get(&f, "sampling.cond_embeddings", &in->cond) &&
             st_get(&f, "sampling.uncond_embeddings", &in->uncond) && st_get(&f, "latents", &in->latents) &&
             st_get(&f, "image", &in->image);
    st_close(&f);
    CHECK(ok);
    if (!ok) return 0;
    CHECK(in->noise.ndim == 4 && in->noise.shape[1] == 4 && in->noise.shape[2] == 8 && in->noise.shape[3] == 8);
    CHECK(in->cond.ndim == 3 && in->cond.shape[1] == 77 && in->cond.shape[2] == 32);
    CHECK(in->image.ndim == 4 && in->image.shape[1] == 3 && in->image.shape[2] == 64);
    in->noise_t = tensor_of(&in->noise);
    in->cond_t = tensor_of(&in->cond);
    in->uncond_t = tensor_of(&in->uncond);
    return 1;
}

static void free_inputs(struct inputs *in) {
    lowvram_tensor_free(in->noise_t);
    lowvram_tensor_free(in->cond_t);
    lowvram_tensor_free(in->uncond_t);
    free(in->noise.data);
    free(in->cond.data);
    free(in->uncond.data);
    free(in->latents.data);
    free(in->image.data);
}

static void euler_params(lowvram_denoise_params *dp) {
    CHECK_OK(lowvram_denoise_params_init(dp, sizeof *dp));
    dp->scheduler = LOWVRAM_SCHEDULER_EULER;
    dp->steps = 8;
    dp->guidance = 7.5f;
}

static void test_params_defaults(void) {
    lowvram_denoise_params dp;
    memset(&dp, 0xff, sizeof dp);
    CHECK_OK(lowvram_denoise_params_init(&dp, sizeof dp));
    CHECK(dp.struct_size == sizeof dp && dp.scheduler == LOWVRAM_SCHEDULER_EULER && !dp.karras);
    CHECK(dp.steps == 20 && dp.guidance == 7.5f && dp.seed == 0);
    CHECK(dp.latent_width == 64 && dp.latent_height == 64);
    CHECK(dp.step_noise == NULL && dp.progress == NULL && dp.progress_user_data == NULL);
    CHECK(lowvram_denoise_params_init(&dp, 2) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(lowvram_denoise_params_init(NULL, sizeof dp) == LOWVRAM_STATUS_NULL_ARGUMENT);

    lowvram_decode_params vp;
    memset(&vp, 0xff, sizeof vp);
    CHECK_OK(lowvram_decode_params_init(&vp, sizeof vp));
    CHECK(vp.struct_size == sizeof vp && vp.tile_latent == 0 && vp.overlap_latent == 0 && !vp.never_tile);
}

static void test_models(void) {
    lowvram_context *ctx = new_context("cpu", NULL);
    lowvram_model *unet = NULL, *vae = NULL;
    CHECK_OK(lowvram_model_load(ctx, unet_dir, &unet));
    CHECK_OK(lowvram_model_load(ctx, vae_dir, &vae));

    lowvram_model_info info;
    memset(&info, 0, sizeof info);
    CHECK(lowvram_model_get_info(unet, &info) == LOWVRAM_STATUS_INVALID_ARGUMENT); /* struct_size 0 */
    CHECK(strstr(lowvram_last_error_message(), "struct_size") != NULL);
    info.struct_size = sizeof info;
    CHECK_OK(lowvram_model_get_info(unet, &info));
    CHECK(info.struct_size == sizeof info);
    CHECK(info.kind == LOWVRAM_MODEL_KIND_UNET);
    CHECK(info.total_bytes > 0 && info.block_count > 1);
    CHECK(info.resident_bytes == 0 && info.resident_block_count == 0); /* nothing placed before use */
    uint64_t unet_bytes = info.total_bytes;
    CHECK_OK(lowvram_model_get_info(vae, &info));
    CHECK(info.kind == LOWVRAM_MODEL_KIND_VAE && info.total_bytes > 0);
    printf("models: unet %llu bytes, vae %llu bytes in %u blocks\n", (unsigned long long)unet_bytes,
           (unsigned long long)info.total_bytes, info.block_count);

    /* a missing folder: IO naming the path, out untouched */
    char missing[1200];
    snprintf(missing, sizeof missing, "%s/models/no-such-model/unet", repo);
    lowvram_model *sentinel = (lowvram_model *)0x1, *m = sentinel;
    CHECK(lowvram_model_load(ctx, missing, &m) == LOWVRAM_STATUS_IO);
    CHECK(strstr(lowvram_last_error_message(), "no-such-model") != NULL);
    CHECK(m == sentinel);
    CHECK(lowvram_model_load(ctx, NULL, &m) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_model_load(NULL, unet_dir, &m) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(m == sentinel);

    lowvram_model_free(vae);
    lowvram_model_free(unet);
    lowvram_model_free(NULL);
    lowvram_context_free(ctx);
}

static void test_configure_and_stats(void) {
    lowvram_context *ctx = new_context("emulated:64MiB", NULL);
    CHECK_OK(lowvram_context_configure(ctx, "max_cache_vram_gb: 0.01\n"));
    CHECK(lowvram_context_configure(ctx, "no_such_key: 1\n") == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "no_such_key") != NULL);
    CHECK(lowvram_context_configure(ctx, "max_cache_vram_gb: lots\n") == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "max_cache_vram_gb") != NULL);
    CHECK(lowvram_context_configure(ctx, NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);

    lowvram_model *unet = NULL;
    CHECK_OK(lowvram_model_load(ctx, unet_dir, &unet));

    lowvram_cache_stats stats;
    memset(&stats, 0, sizeof stats);
    CHECK(lowvram_context_stats(ctx, &stats) == LOWVRAM_STATUS_INVALID_ARGUMENT); /* struct_size unset */
    stats.struct_size = sizeof stats;
    CHECK_OK(lowvram_context_stats(ctx, &stats));
    CHECK(stats.struct_size == sizeof stats);
    CHECK(stats.device_total_bytes == 64u << 20);
    CHECK(stats.model_count == 1);
    CHECK(stats.device_used_by_cache_bytes == 0);
    /* the RAM copy is one pinned arena (the emulated device accounts pinning as CUDA would), under the cap */
    CHECK(stats.pinned_bytes >= stats.ram_cache_used_bytes && stats.pinned_bytes > 0);
    CHECK(stats.pinned_cap_bytes >= stats.pinned_bytes);
    CHECK(stats.models_unpinned == 0 && stats.models_without_ram_copy == 0);
    /* no RAM copy: the model streams from its file's memory map, and the stats say so */
    CHECK_OK(lowvram_context_configure(ctx, "keep_ram_copy_of_weights: false\n"));
    CHECK_OK(lowvram_context_stats(ctx, &stats));
    CHECK(stats.models_without_ram_copy == 1 && stats.pinned_bytes == 0 && stats.ram_cache_used_bytes == 0);
    CHECK_OK(lowvram_context_configure(ctx, "keep_ram_copy_of_weights: true\n"));

    /* an explicit partial load: resident bytes at most what was asked, and info agrees */
    uint64_t resident = 0;
    CHECK_OK(lowvram_model_load_to_device(ctx, unet, 512u << 10, &resident));
    lowvram_model_info info;
    info.struct_size = sizeof info;
    CHECK_OK(lowvram_model_get_info(unet, &info));
    CHECK(resident > 0 && resident <= (512u << 10));
    CHECK(info.resident_bytes == resident && info.resident_block_count > 0);
    CHECK_OK(lowvram_context_stats(ctx, &stats));
    CHECK(stats.device_used_by_cache_bytes == resident);

    char *json = NULL;
    CHECK_OK(lowvram_context_stats_json(ctx, &json));
    CHECK(json != NULL && json[0] == '{' && strstr(json, "\"models\"") != NULL);
    lowvram_string_free(json);
    lowvram_string_free(NULL);

    uint64_t freed = 0;
    CHECK_OK(lowvram_context_free_memory(ctx, 1, &freed));
    CHECK(freed > 0 && freed <= resident);
    CHECK_OK(lowvram_model_load_to_device(ctx, unet, 512u << 10, NULL));
    CHECK_OK(lowvram_context_unload_all(ctx, &freed));
    CHECK(freed >= resident);
    CHECK_OK(lowvram_model_get_info(unet, &info));
    CHECK(info.resident_bytes == 0);
    CHECK_OK(lowvram_context_unload_all(ctx, NULL));

    lowvram_model_free(unet);
    lowvram_context_free(ctx);
}

static void test_reservations(void) {
    lowvram_context *ctx = new_context("emulated:64MiB", NULL);
    lowvram_reservation *r = NULL;
    CHECK_OK(lowvram_reservation_new(ctx, 8u << 20, &r));
    uint64_t bytes = 0;
    CHECK_OK(lowvram_reservation_bytes(r, &bytes));
    CHECK(bytes == 8u << 20);
    lowvram_cache_stats stats;
    stats.struct_size = sizeof stats;
    CHECK_OK(lowvram_context_stats(ctx, &stats));
    CHECK(stats.device_used_bytes >= bytes);

    lowvram_reservation *sentinel = (lowvram_reservation *)0x1, *big = sentinel;
    CHECK(lowvram_reservation_new(ctx, 1ull << 30, &big) == LOWVRAM_STATUS_BUDGET_TOO_SMALL);
    CHECK(strstr(lowvram_last_error_message(), "reservation") != NULL);
    CHECK(strstr(lowvram_last_error_message(), "1073741824") != NULL); /* the bytes asked for */
    CHECK(big == sentinel);
    CHECK(lowvram_reservation_new(ctx, 0, &big) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(lowvram_reservation_bytes(NULL, &bytes) == LOWVRAM_STATUS_NULL_ARGUMENT);

    lowvram_reservation_free(r);
    CHECK_OK(lowvram_context_stats(ctx, &stats));
    CHECK(stats.device_used_bytes == 0);
    /* freed after its context is fine too */
    CHECK_OK(lowvram_reservation_new(ctx, 1u << 20, &r));
    lowvram_context_free(ctx);
    lowvram_reservation_free(r);
    lowvram_reservation_free(NULL);
}

/* Denoise 8 Euler steps from the reference's inputs: parity with diffusers, decode, PNG; the same run streaming
 * under a tiny budget is bit-identical; cancel from the progress callback; wrong shapes rejected. */
static void test_denoise_and_decode(void) {
    struct inputs in;
    if (!load_inputs(&in)) return;
    const int64_t latent_shape[4] = {1, 4, 8, 8};
    const int64_t image_shape[4] = {1, 3, 64, 64};

    lowvram_context *ctx = new_context("cpu", NULL);
    lowvram_model *unet = NULL, *vae = NULL;
    CHECK_OK(lowvram_model_load(ctx, unet_dir, &unet));
    CHECK_OK(lowvram_model_load(ctx, vae_dir, &vae));

    lowvram_denoise_params dp;
    euler_params(&dp);
    struct progress_state prog = {0, 0, 0, 0, NULL};
    dp.progress = on_progress;
    dp.progress_user_data = &prog;
    lowvram_run_report report;
    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    lowvram_tensor *latents = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, in.cond_t, in.uncond_t, in.noise_t, &report, &latents));
    CHECK(prog.calls == 8 && prog.last_step == 8 && prog.total == 8);
    CHECK(report.model_bytes > 0 && report.total_ms > 0.0);
    size_t n = 0;
    float *got = read_f32(latents, latent_shape, 4, &n);
    float err = got && n == in.latents.count ? max_abs_diff(got, in.latents.data, n) : 1e30f;
    printf("denoise (cpu, 8 Euler steps, guidance 7.5): max abs error vs diffusers latents %.3e\n", (double)err);
    CHECK(err <= 1e-3f);

    /* decode and compare with the reference image */
    lowvram_decode_params vp;
    CHECK_OK(lowvram_decode_params_init(&vp, sizeof vp));
    lowvram_run_report dreport;
    dreport.struct_size = sizeof dreport;
    lowvram_tensor *image = NULL;
    CHECK_OK(lowvram_vae_decode(ctx, vae, &vp, latents, &dreport, &image));
    CHECK(dreport.tile_latent == 0);
    size_t ni = 0;
    float *img = read_f32(image, image_shape, 4, &ni);
    float ierr = img && ni == in.image.count ? max_abs_diff(img, in.image.data, ni) : 1e30f;
    printf("vae decode: max abs error vs diffusers image %.3e\n", (double)ierr);
    CHECK(ierr <= 1e-3f);

    /* forced tiles of 4 latent pixels: exact tiling matches the untiled decode to float rounding */
    vp.tile_latent = 4;
    lowvram_tensor *tiled = NULL;
    CHECK_OK(lowvram_vae_decode(ctx, vae, &vp, latents, &dreport, &tiled));
    CHECK(dreport.tile_latent == 4);
    size_t nt = 0;
    float *timg = read_f32(tiled, image_shape, 4, &nt);
    float terr = timg && img && nt == ni ? max_abs_diff(timg, img, ni) : 1e30f;
    printf("tiled vae decode (4-latent tiles): max abs difference from untiled %.3e\n", (double)terr);
    CHECK(terr <= 1e-4f);
    free(timg);
    lowvram_tensor_free(tiled);
    free(img);

    /* PNG: a file that starts with the PNG signature */
    char png[1200];
    const char *tmp = getenv("TMPDIR");
    snprintf(png, sizeof png, "%s/lowvram_test_api_c.png", tmp && *tmp ? tmp : "/tmp");
    remove(png);
    CHECK_OK(lowvram_tensor_write_png(image, png));
    FILE *fp = fopen(png, "rb");
    unsigned char sig[8] = {0};
    CHECK(fp != NULL && fread(sig, 1, 8, fp) == 8);
    if (fp) fclose(fp);
    CHECK(memcmp(sig, "\x89PNG\r\n\x1a\n", 8) == 0);
    remove(png);
    CHECK(lowvram_tensor_write_png(image, NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    lowvram_tensor_free(image);

    /* a wrong-shape cond ([1, 77, 31] for a UNet with cross_attention_dim 32): INVALID_ARGUMENT, out untouched */
    float *bad = calloc(77 * 31, sizeof(float));
    const int64_t bad_shape[3] = {1, 77, 31};
    lowvram_tensor *bad_cond = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, bad_shape, 3, bad, 77 * 31 * sizeof(float), &bad_cond));
    free(bad);
    lowvram_tensor *sentinel = (lowvram_tensor *)0x1, *out = sentinel;
    CHECK(lowvram_denoise(ctx, unet, &dp, bad_cond, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(strstr(lowvram_last_error_message(), "31") != NULL);
    CHECK(out == sentinel);
    CHECK(lowvram_denoise(ctx, unet, &dp, in.cond_t, bad_cond, in.noise_t, NULL, &out) ==
          LOWVRAM_STATUS_INVALID_ARGUMENT); /* uncond differs from cond */
    CHECK(out == sentinel);
    lowvram_tensor_free(bad_cond);
    CHECK(lowvram_denoise(ctx, vae, &dp, in.cond_t, NULL, NULL, NULL, &out) != LOWVRAM_STATUS_OK); /* not a UNet */
    CHECK(lowvram_denoise(ctx, unet, &dp, NULL, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_vae_decode(ctx, vae, NULL, NULL, NULL, &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(out == sentinel);
    lowvram_run_report short_report;
    short_report.struct_size = 2; /* smaller than the struct_size field itself */
    CHECK(lowvram_denoise(ctx, unet, &dp, in.cond_t, in.uncond_t, in.noise_t, &short_report, &out) ==
          LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK(out == sentinel);

    /* cancel: the progress callback returns false at step 3 */
    prog = (struct progress_state){0, 0, 0, 3, NULL};
    CHECK(lowvram_denoise(ctx, unet, &dp, in.cond_t, in.uncond_t, in.noise_t, NULL, &out) ==
          LOWVRAM_STATUS_CANCELLED);
    CHECK(prog.calls == 3 && prog.last_step == 3);
    CHECK(out == sentinel);
    /* cancel: lowvram_context_cancel called from inside the callback */
    prog = (struct progress_state){0, 0, 0, 2, ctx};
    CHECK(lowvram_denoise(ctx, unet, &dp, in.cond_t, in.uncond_t, in.noise_t, NULL, &out) ==
          LOWVRAM_STATUS_CANCELLED);
    CHECK(prog.calls == 2);
    CHECK(out == sentinel);
    /* the context still works, and gives the same latents again */
    prog = (struct progress_state){0, 0, 0, 0, NULL};
    lowvram_tensor *again = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, in.cond_t, in.uncond_t, in.noise_t, NULL, &again));
    CHECK(prog.calls == 8);
    size_t na = 0;
    float *ag = read_f32(again, latent_shape, 4, &na);
    CHECK(ag && got && na == n && memcmp(ag, got, n * sizeof(float)) == 0);
    free(ag);
    lowvram_tensor_free(again);

    /* the same denoise on an emulated device with a ~0.5 MiB cache: most blocks stream, latents bit-identical */
    lowvram_context *small = new_context("emulated:64MiB", "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n");
    lowvram_model *sunet = NULL;
    CHECK_OK(lowvram_model_load(small, unet_dir, &sunet));
    dp.progress = NULL;
    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    lowvram_tensor *streamed = NULL;
    CHECK_OK(lowvram_denoise(small, sunet, &dp, in.cond_t, in.uncond_t, in.noise_t, &report, &streamed));
    printf("streamed denoise: %llu of %llu weight bytes resident, %llu bytes streamed, peak %llu device bytes, "
           "%llu refused\n",
           (unsigned long long)report.resident_bytes, (unsigned long long)report.model_bytes,
           (unsigned long long)report.bytes_streamed, (unsigned long long)report.peak_device_bytes,
           (unsigned long long)report.refused_allocations);
    CHECK(report.bytes_streamed > 0);
    CHECK(report.resident_bytes < report.model_bytes);
    CHECK(report.refused_allocations == 0);
    CHECK(report.peak_device_bytes <= 64u << 20);
    size_t ns = 0;
    float *st = read_f32(streamed, latent_shape, 4, &ns);
    CHECK(st && got && ns == n && memcmp(st, got, n * sizeof(float)) == 0);
    free(st);
    lowvram_cache_stats stats;
    stats.struct_size = sizeof stats;
    CHECK_OK(lowvram_context_stats(small, &stats));
    CHECK(stats.bytes_streamed_total >= report.bytes_streamed);
    lowvram_tensor_free(streamed);
    lowvram_model_free(sunet);
    lowvram_context_free(small);

    free(got);
    lowvram_tensor_free(latents);
    lowvram_model_free(vae);
    lowvram_model_free(unet);
    lowvram_context_free(ctx);
    free_inputs(&in);
}

int main(void) {
    init_paths();
    test_struct_sizes();
    test_version();
    test_system_stats();
    test_context_lifecycle();
    test_errors_leave_outputs_untouched();
    test_global_log_callback();
    test_tensors();
    test_params_defaults();
    test_models();
    test_configure_and_stats();
    test_reservations();
    test_denoise_and_decode();
    return check_report("test_api");
}
