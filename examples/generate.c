/* End-to-end denoise-and-decode through the C API: load the random tiny SD pipeline of the test fixtures (it takes
 * the zero 77 x 32 conditioning below; the trained models/tiny-sd wants a prompt's, see
 * lowvram_pipeline_encode_prompt), denoise with Euler for 8 steps under a small emulated VRAM budget (so part of the
 * UNet streams), decode, write a PNG.
 *
 *   cc -std=c11 -I include examples/generate.c -L target/release -llowvram -Wl,-rpath,target/release -o generate
 *   ./generate tests/fixtures/tiny-sd-random out.png
 */
#include "lowvram.h"

#include <stdio.h>
#include <stdlib.h>

#define TRY(call)                                                                              \
    do {                                                                                       \
        lowvram_status s_ = (call);                                                            \
        if (s_ != LOWVRAM_STATUS_OK) {                                                         \
            fprintf(stderr, "%s failed: %s: %s\n", #call, lowvram_status_name(s_), lowvram_last_error_message()); \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

static bool on_step(uint32_t step, uint32_t total, void *user_data) {
    (void)user_data;
    fprintf(stderr, "\rstep %u/%u", step, total);
    if (step == total) fprintf(stderr, "\n");
    return true; /* false would cancel */
}

int main(int argc, char **argv) {
    const char *pipeline = argc > 1 ? argv[1] : "tests/fixtures/tiny-sd-random";
    const char *out_path = argc > 2 ? argv[2] : "example.png";
    char unet_dir[1024], vae_dir[1024];
    snprintf(unet_dir, sizeof unet_dir, "%s/unet", pipeline);
    snprintf(vae_dir, sizeof vae_dir, "%s/vae", pipeline);

    lowvram_context_params cp;
    TRY(lowvram_context_params_init(&cp, sizeof cp));
    cp.device = "emulated:64MiB";                                   /* a 64 MiB "GPU" */
    cp.config_yaml = "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.001\n"; /* ~1 MiB of resident weights */
    lowvram_context *ctx = NULL;
    TRY(lowvram_context_new(&cp, &ctx));

    lowvram_model *unet = NULL, *vae = NULL;
    TRY(lowvram_model_load(ctx, unet_dir, &unet));
    TRY(lowvram_model_load(ctx, vae_dir, &vae));

    /* conditioning: zeros here; a host passes its text encoder's output */
    const int64_t emb_shape[3] = {1, 77, 32};
    float *emb = calloc(77 * 32, sizeof(float));
    lowvram_tensor *cond = NULL;
    TRY(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, emb_shape, 3, emb, 77 * 32 * sizeof(float), &cond));
    free(emb);

    lowvram_denoise_params dp;
    TRY(lowvram_denoise_params_init(&dp, sizeof dp));
    dp.scheduler = LOWVRAM_SCHEDULER_EULER;
    dp.steps = 8;
    dp.seed = 42;
    dp.latent_width = 8;
    dp.latent_height = 8;
    dp.progress = on_step;

    lowvram_run_report report;
    report.struct_size = sizeof report;
    lowvram_tensor *latents = NULL, *image = NULL;
    TRY(lowvram_denoise(ctx, unet, &dp, cond, NULL, NULL, &report, &latents));
    printf("denoise: %.1f ms, %llu of %llu weight bytes resident, %llu bytes streamed, peak %llu device bytes\n",
           report.total_ms, (unsigned long long)report.resident_bytes, (unsigned long long)report.model_bytes,
           (unsigned long long)report.bytes_streamed, (unsigned long long)report.peak_device_bytes);
    TRY(lowvram_vae_decode(ctx, vae, NULL, latents, &report, &image));
    TRY(lowvram_tensor_write_png(image, out_path));
    printf("wrote %s\n", out_path);

    lowvram_tensor_free(image);
    lowvram_tensor_free(latents);
    lowvram_tensor_free(cond);
    lowvram_model_free(vae);
    lowvram_model_free(unet);
    lowvram_context_free(ctx);
    return 0;
}
