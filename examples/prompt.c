/* Text to image through the C API: load the trained tiny pipeline shipped in the repo (tokenizer, CLIP text
 * encoder, UNet, VAE), encode a prompt, denoise with Euler for 20 steps at guidance 7.5, decode, write a PNG.
 *
 *   cc -std=c11 -I include examples/prompt.c -L target/release -llowvram -Wl,-rpath,target/release -o prompt
 *   ./prompt models/tiny-sd "a red circle on a blue background" out.png
 */
#include "lowvram.h"

#include <stdio.h>

#define TRY(call)                                                                              \
    do {                                                                                       \
        lowvram_status s_ = (call);                                                            \
        if (s_ != LOWVRAM_STATUS_OK) {                                                         \
            fprintf(stderr, "%s failed: %s: %s\n", #call, lowvram_status_name(s_), lowvram_last_error_message()); \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

int main(int argc, char **argv) {
    const char *model = argc > 1 ? argv[1] : "models/tiny-sd";
    const char *prompt = argc > 2 ? argv[2] : "a red circle on a blue background";
    const char *out_path = argc > 3 ? argv[3] : "prompt.png";

    lowvram_context_params cp;
    TRY(lowvram_context_params_init(&cp, sizeof cp));
    cp.device = "cpu";
    lowvram_context *ctx = NULL;
    TRY(lowvram_context_new(&cp, &ctx));

    lowvram_pipeline_params pp;
    TRY(lowvram_pipeline_params_init(&pp, sizeof pp));
    pp.path = model;
    lowvram_pipeline *pipeline = NULL;
    TRY(lowvram_pipeline_load(ctx, &pp, &pipeline));

    /* prompt and empty negative -> the conditioning classifier-free guidance needs */
    lowvram_conditioning *cond = NULL;
    TRY(lowvram_pipeline_encode_prompt(ctx, pipeline, prompt, NULL, &cond));

    lowvram_denoise_params dp;
    TRY(lowvram_denoise_params_init(&dp, sizeof dp));
    dp.scheduler = LOWVRAM_SCHEDULER_EULER;
    dp.steps = 20;
    dp.guidance = 7.5;
    dp.seed = 0;
    /* 64 x 64 pixels: this model's VAE downscales by 4 (SD's by 8) */
    dp.latent_width = 16;
    dp.latent_height = 16;

    lowvram_tensor *latents = NULL, *image = NULL;
    TRY(lowvram_pipeline_denoise(ctx, pipeline, cond, &dp, NULL, NULL, &latents));
    TRY(lowvram_pipeline_decode(ctx, pipeline, NULL, latents, NULL, &image));
    TRY(lowvram_tensor_write_png(image, out_path));
    printf("wrote %s (\"%s\")\n", out_path, prompt);

    lowvram_tensor_free(image);
    lowvram_tensor_free(latents);
    lowvram_conditioning_free(cond);
    lowvram_pipeline_free(pipeline);
    lowvram_context_free(ctx);
    return 0;
}
