/* A host built against the v0.1 header (tests/c/frozen/lowvram_v0_1.h, frozen when the ABI first grew) running
 * against this library: its smaller params structs (no cancel token, no release callbacks) and its output structs
 * must keep working, with the fields it does not know taking their defaults. The ABI policy is in lowvram.h.
 * Built with -std=c11 -Wall -Wextra -Wpedantic -Werror by scripts/test.sh; $LOWVRAM_REPO locates the repo. */
#include "frozen/lowvram_v0_1.h"
#include "check.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct progress {
    unsigned calls;
    unsigned cancel_at;
    lowvram_context *ctx;
};

static bool on_progress(uint32_t step, uint32_t total, void *user_data) {
    (void)total;
    struct progress *p = user_data;
    p->calls++;
    if (p->cancel_at && step == p->cancel_at) lowvram_context_cancel(p->ctx);
    return true;
}

int main(void) {
    alarm(300);
    const char *repo = getenv("LOWVRAM_REPO");
    char unet_dir[1100], vae_dir[1100];
    snprintf(unet_dir, sizeof unet_dir, "%s/tests/fixtures/tiny-sd-random/unet", repo ? repo : ".");
    snprintf(vae_dir, sizeof vae_dir, "%s/tests/fixtures/tiny-sd-random/vae", repo ? repo : ".");
    /* the v0.1 layout (LP64), as this host was compiled */
    CHECK(sizeof(lowvram_context_params) == 48 && sizeof(lowvram_denoise_params) == 64);
    CHECK(sizeof(lowvram_decode_params) == 16 && sizeof(lowvram_run_report) == 72);

    lowvram_context_params cp;
    CHECK_OK(lowvram_context_params_init(&cp, sizeof cp));
    CHECK(cp.struct_size == sizeof cp);
    cp.device = "emulated:64MiB";
    cp.config_yaml = "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n"; /* most blocks stream */
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&cp, &ctx));
    lowvram_model *unet = NULL, *vae = NULL;
    CHECK_OK(lowvram_model_load(ctx, unet_dir, &unet));
    CHECK_OK(lowvram_model_load(ctx, vae_dir, &vae));

    float cond[4 * 32];
    for (int i = 0; i < 4 * 32; i++) cond[i] = (float)(i % 7) * 0.1f - 0.3f;
    int64_t shape[3] = {1, 4, 32};
    lowvram_tensor *cond_t = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, cond, sizeof cond, &cond_t));

    lowvram_denoise_params dp;
    CHECK_OK(lowvram_denoise_params_init(&dp, sizeof dp));
    dp.steps = 4;
    dp.latent_width = dp.latent_height = 8;
    struct progress prog = {0, 0, ctx};
    dp.progress = on_progress;
    dp.progress_user_data = &prog;
    lowvram_run_report report;
    memset(&report, 0, sizeof report);
    report.struct_size = sizeof report;
    lowvram_tensor *latents = NULL;
    CHECK_OK(lowvram_denoise(ctx, unet, &dp, cond_t, NULL, NULL, &report, &latents));
    CHECK(prog.calls == 4 && report.struct_size == sizeof report && report.model_bytes > 0 && report.total_ms > 0);

    /* cancel through the v0.1 path: the context cancel from the progress callback */
    prog = (struct progress){0, 2, ctx};
    lowvram_tensor *none = NULL;
    CHECK(lowvram_denoise(ctx, unet, &dp, cond_t, NULL, NULL, &report, &none) == LOWVRAM_STATUS_CANCELLED);
    CHECK(none == NULL && prog.calls == 2);

    lowvram_decode_params dec;
    CHECK_OK(lowvram_decode_params_init(&dec, sizeof dec));
    dec.tile_latent = 4;
    lowvram_tensor *image = NULL;
    CHECK_OK(lowvram_vae_decode(ctx, vae, &dec, latents, &report, &image));
    CHECK(report.tile_latent == 4);
    int64_t ishape[LOWVRAM_MAX_DIMS];
    size_t ndim = 0;
    CHECK_OK(lowvram_tensor_info(image, NULL, ishape, LOWVRAM_MAX_DIMS, &ndim, NULL));
    CHECK(ndim == 4 && ishape[1] == 3);

    lowvram_cache_stats stats;
    stats.struct_size = sizeof stats;
    CHECK_OK(lowvram_context_stats(ctx, &stats));
    CHECK(stats.struct_size == sizeof stats && stats.model_count == 2 && stats.device_total_bytes == 64u << 20);
    lowvram_model_info info;
    info.struct_size = sizeof info;
    CHECK_OK(lowvram_model_get_info(vae, &info));
    CHECK(info.kind == LOWVRAM_MODEL_KIND_VAE && info.block_count > 0);
    static lowvram_system_info sys;
    sys.struct_size = sizeof sys;
    CHECK_OK(lowvram_system_stats(&sys));
    CHECK(sys.ram_total_bytes > 0);

    lowvram_tensor_free(image);
    lowvram_tensor_free(latents);
    lowvram_tensor_free(cond_t);
    lowvram_model_free(unet);
    lowvram_model_free(vae);
    lowvram_context_free(ctx);
    return check_report("test_frozen_abi");
}
