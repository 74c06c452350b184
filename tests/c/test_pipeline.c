/* The pipeline and conditioning entry points as a C host uses them: lowvram_pipeline_load with a text encoder
 * folder, a prompt encoded, denoised and decoded on the tiny SD 1.x model and compared with diffusers' reference
 * (tests/fixtures/prompt/sd1, written by scripts/make_prompt_fixtures.py); host-given conditioning through
 * lowvram_conditioning_new/set/get; NULL and wrong-name errors that leave outputs untouched; handles freed in
 * every order (a pipeline freed while its conditioning lives, a context freed before its pipeline); the tiny FLUX.1
 * dev and schnell folders from host conditioning against diffusers' FluxPipeline.
 * Finds the repo through $LOWVRAM_REPO (scripts/test.sh sets it; "." otherwise).
 * Built with -std=c11 -Wall -Wextra -Wpedantic -Werror and run under valgrind by scripts/test.sh. */
#include "lowvram.h"
#include "check.h"
#include "safetensors.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* The prompts of tests/fixtures/prompt/prompts.json ("sd1"); checked against the file below. */
static const char *PROMPT = "a photo of an astronaut riding a horse on the hill, best quality!";
static const char *NEGATIVE = "blurry, low quality, watermark";

/* A fixture tensor as a library tensor (NULL and a failure counted when absent). */
static lowvram_tensor *fixture_tensor(const struct st_file *f, const char *name, struct st_tensor *keep) {
    struct st_tensor t;
    if (!st_get(f, name, &t)) {
        fprintf(stderr, "fixture tensor %s missing (see tests/fixtures/prompt/README.md)\n", name);
        check_fail();
        return NULL;
    }
    lowvram_tensor *out = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, t.shape, t.ndim, t.data, t.count * sizeof(float), &out));
    if (keep) {
        *keep = t;
    } else {
        free(t.data);
    }
    return out;
}

/* The tensor's f32 data (malloc'd) and its element count; checks the shape against `ref` when given. */
static float *read_tensor(const lowvram_tensor *t, const struct st_tensor *ref, size_t *count) {
    lowvram_dtype dtype;
    int64_t shape[LOWVRAM_MAX_DIMS];
    size_t ndim = 0, bytes = 0;
    *count = 0;
    if (!t || lowvram_tensor_info(t, &dtype, shape, LOWVRAM_MAX_DIMS, &ndim, &bytes) != LOWVRAM_STATUS_OK) {
        check_fail();
        return NULL;
    }
    CHECK(dtype == LOWVRAM_DTYPE_F32);
    if (ref) {
        CHECK(ndim == ref->ndim);
        for (size_t i = 0; i < ndim && i < ref->ndim; i++) CHECK(shape[i] == ref->shape[i]);
    }
    float *data = malloc(bytes ? bytes : 1);
    CHECK_OK(lowvram_tensor_read(t, data, bytes));
    *count = bytes / sizeof(float);
    return data;
}

/* max |t - ref| ≤ tol · (relative ? max(1, max |ref|) : 1) */
static void check_close(const char *what, const lowvram_tensor *t, const struct st_tensor *ref, float tol, int relative) {
    size_t n = 0;
    float *got = read_tensor(t, ref, &n);
    if (!got) return;
    float err = 0.0f, scale = 1.0f;
    for (size_t i = 0; i < ref->count; i++) {
        if (relative && fabsf(ref->data[i]) > scale) scale = fabsf(ref->data[i]);
        if (i < n && fabsf(got[i] - ref->data[i]) > err) err = fabsf(got[i] - ref->data[i]);
    }
    printf("  %s: max abs err %.2e (scale %.3f)\n", what, (double)err, (double)scale);
    CHECK(n == ref->count);
    if (!(err <= tol * scale)) {
        fprintf(stderr, "%s: max abs err %g > %g x %g\n", what, (double)err, (double)tol, (double)scale);
        check_fail();
    }
    free(got);
}

static int same_bytes(const lowvram_tensor *a, const lowvram_tensor *b) {
    size_t na = 0, nb = 0;
    float *da = read_tensor(a, NULL, &na), *db = read_tensor(b, NULL, &nb);
    int same = da && db && na == nb && memcmp(da, db, na * sizeof(float)) == 0;
    free(da);
    free(db);
    return same;
}

static char repo[1024], model_dir[1200], encoder_dir[1200], fixtures[1200];

static void paths(void) {
    const char *r = getenv("LOWVRAM_REPO");
    snprintf(repo, sizeof repo, "%s", r && *r ? r : ".");
    /* The tiny SD 1.x pipeline the fixtures were made from (prompts.json: sd1_model), or where it may have moved. */
    snprintf(model_dir, sizeof model_dir, "%s/tests/fixtures/tiny-sd-random", repo);
    char probe[1300];
    snprintf(probe, sizeof probe, "%s/unet/config.json", model_dir);
    FILE *fp = fopen(probe, "rb");
    if (fp) {
        fclose(fp);
    } else {
        snprintf(model_dir, sizeof model_dir, "%s/tests/fixtures/tiny-sd/model", repo);
    }
    snprintf(encoder_dir, sizeof encoder_dir, "%s/tests/fixtures/prompt/sd1/text_encoder", repo);
    snprintf(fixtures, sizeof fixtures, "%s/tests/fixtures/prompt", repo);
}

static lowvram_context *new_context(void) {
    lowvram_context_params params;
    CHECK_OK(lowvram_context_params_init(&params, sizeof params));
    params.device = "cpu";
    lowvram_context *ctx = NULL;
    CHECK_OK(lowvram_context_new(&params, &ctx));
    return ctx;
}

static lowvram_pipeline *load(lowvram_context *ctx, const char *text_encoder) {
    lowvram_pipeline_params p;
    CHECK_OK(lowvram_pipeline_params_init(&p, sizeof p));
    CHECK(p.struct_size == sizeof p && p.path == NULL && p.text_encoder_path == NULL);
    p.path = model_dir;
    p.text_encoder_path = text_encoder;
    lowvram_pipeline *pipeline = NULL;
    CHECK_OK(lowvram_pipeline_load(ctx, &p, &pipeline));
    CHECK(pipeline != NULL);
    return pipeline;
}

static void denoise_params(lowvram_denoise_params *d, uint32_t scheduler) {
    CHECK_OK(lowvram_denoise_params_init(d, sizeof *d));
    d->scheduler = scheduler;
    d->steps = 8;
    d->guidance = 7.5f;
}

static void test_prompts_match_the_fixture(void) {
    char path[1300];
    snprintf(path, sizeof path, "%s/prompts.json", fixtures);
    size_t len = 0;
    char *json = (char *)read_file(path, &len);
    CHECK(json != NULL);
    if (!json) return;
    char quoted[256];
    snprintf(quoted, sizeof quoted, "\"prompt\": \"%s\"", PROMPT);
    CHECK(strstr(json, quoted) != NULL);
    snprintf(quoted, sizeof quoted, "\"negative_prompt\": \"%s\"", NEGATIVE);
    CHECK(strstr(json, quoted) != NULL);
    free(json);
}

/* Prompt → conditioning → latents → image, each against diffusers; then the same conditioning given by the host. */
static void test_prompt_to_image(void) {
    printf("prompt to image (euler and dpmpp_2m)\n");
    char path[1300];
    struct st_file enc, samples[2];
    snprintf(path, sizeof path, "%s/sd1/encode.safetensors", fixtures);
    CHECK(st_open(&enc, path));
    const char *names[2] = {"euler", "dpmpp_2m"};
    const uint32_t kinds[2] = {LOWVRAM_SCHEDULER_EULER, LOWVRAM_SCHEDULER_DPMPP2M};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/sd1/sample_%s.safetensors", fixtures, names[i]);
        CHECK(st_open(&samples[i], path));
    }
    if (!enc.bytes || !samples[0].bytes || !samples[1].bytes) {
        st_close(&enc);
        st_close(&samples[0]);
        st_close(&samples[1]);
        return;
    }

    lowvram_context *ctx = new_context();
    lowvram_pipeline *pipeline = load(ctx, encoder_dir);
    lowvram_prompt_params pp;
    CHECK_OK(lowvram_prompt_params_init(&pp, sizeof pp));
    CHECK(pp.batch == 1 && pp.negative_prompt == NULL && pp.clip_skip == 0);
    pp.negative_prompt = NEGATIVE;
    pp.width = 64;
    pp.height = 64;
    lowvram_conditioning *cond = NULL;
    CHECK_OK(lowvram_pipeline_encode_prompt(ctx, pipeline, PROMPT, &pp, &cond));

    struct st_tensor ref_cond = {0}, ref_uncond = {0};
    lowvram_tensor *c = NULL, *u = NULL;
    CHECK_OK(lowvram_conditioning_get(cond, "sampling.cond_embeddings", &c));
    CHECK_OK(lowvram_conditioning_get(cond, "sampling.uncond_embeddings", &u));
    if (st_get(&enc, "prompt_embeds", &ref_cond) && st_get(&enc, "negative_prompt_embeds", &ref_uncond)) {
        check_close("cond embeddings", c, &ref_cond, 1e-4f, 1);
        check_close("uncond embeddings", u, &ref_uncond, 1e-4f, 1);
    } else {
        check_fail();
    }
    lowvram_tensor *none = (lowvram_tensor *)0x1;
    CHECK(lowvram_conditioning_get(cond, "sampling.cond_pooled", &none) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("sampling.cond_pooled");
    CHECK(none == (lowvram_tensor *)0x1);

    /* The host's copy of the prompt's tensors: the denoiser gives the same bytes. */
    lowvram_conditioning *host = NULL;
    CHECK_OK(lowvram_conditioning_new(&host));
    CHECK_OK(lowvram_conditioning_set(host, "sampling.cond_embeddings", u)); /* replaced below */
    CHECK_OK(lowvram_conditioning_set(host, "sampling.cond_embeddings", c));
    CHECK_OK(lowvram_conditioning_set(host, "sampling.uncond_embeddings", u));
    lowvram_tensor *back = NULL;
    CHECK_OK(lowvram_conditioning_get(host, "sampling.cond_embeddings", &back));
    CHECK(same_bytes(back, c));
    lowvram_tensor_free(back);

    for (int i = 0; i < 2; i++) {
        struct st_tensor ref_latents = {0}, ref_image = {0};
        lowvram_tensor *noise = fixture_tensor(&samples[i], "sampling.init_noise", NULL);
        CHECK(st_get(&samples[i], "latents", &ref_latents) && st_get(&samples[i], "image", &ref_image));
        lowvram_denoise_params d;
        denoise_params(&d, kinds[i]);
        lowvram_run_report report;
        memset(&report, 0, sizeof report);
        report.struct_size = sizeof report;
        lowvram_tensor *latents = NULL, *host_latents = NULL, *image = NULL;
        CHECK_OK(lowvram_pipeline_denoise(ctx, pipeline, cond, &d, noise, &report, &latents));
        CHECK(report.total_ms > 0.0 && report.model_bytes > 0 && report.refused_allocations == 0);
        CHECK_OK(lowvram_pipeline_denoise(ctx, pipeline, host, &d, noise, NULL, &host_latents));
        if (ref_latents.data && latents) {
            printf(" %s\n", names[i]);
            check_close("latents", latents, &ref_latents, 1e-3f, 1);
            CHECK(same_bytes(latents, host_latents));
            lowvram_decode_params dp;
            CHECK_OK(lowvram_decode_params_init(&dp, sizeof dp));
            CHECK_OK(lowvram_pipeline_decode(ctx, pipeline, &dp, latents, NULL, &image));
            if (ref_image.data) check_close("image", image, &ref_image, 3e-3f, 0);
        }
        lowvram_tensor_free(image);
        lowvram_tensor_free(latents);
        lowvram_tensor_free(host_latents);
        lowvram_tensor_free(noise);
        free(ref_latents.data);
        free(ref_image.data);
    }

    lowvram_tensor_free(c);
    lowvram_tensor_free(u);
    free(ref_cond.data);
    free(ref_uncond.data);
    lowvram_conditioning_free(host);
    lowvram_conditioning_free(cond);
    lowvram_pipeline_free(pipeline);
    lowvram_context_free(ctx);
    st_close(&enc);
    st_close(&samples[0]);
    st_close(&samples[1]);
}

/* FLUX.1 dev and schnell folders (tests/fixtures/flux-pipeline, scripts/fixtures_flux_pipeline.py): host-given T5
 * states and CLIP pooled vector, flow_euler from the fixture's init noise, latents and image against diffusers'
 * FluxPipeline; the prompt's T5 states and CLIP pooled vector against transformers'. */
static void test_flux_folder(void) {
    const char *variants[2] = {"dev", "schnell"};
    const uint32_t steps[2] = {3, 2};
    for (int v = 0; v < 2; v++) {
        printf("flux %s folder from host conditioning (flow_euler)\n", variants[v]);
        char dir[1300], path[1400];
        snprintf(dir, sizeof dir, "%s/tests/fixtures/flux-pipeline/%s", repo, variants[v]);
        snprintf(path, sizeof path, "%s/reference.safetensors", dir);
        struct st_file ref;
        CHECK(st_open(&ref, path));
        if (!ref.bytes) continue;
        lowvram_context *ctx = new_context();
        lowvram_pipeline_params p;
        CHECK_OK(lowvram_pipeline_params_init(&p, sizeof p));
        p.path = dir;
        lowvram_pipeline *pipeline = NULL;
        CHECK_OK(lowvram_pipeline_load(ctx, &p, &pipeline));
        lowvram_conditioning *cond = NULL;
        CHECK_OK(lowvram_conditioning_new(&cond));
        lowvram_tensor *states = fixture_tensor(&ref, "prompt_embeds", NULL);
        lowvram_tensor *pooled = fixture_tensor(&ref, "pooled", NULL);
        lowvram_tensor *noise = fixture_tensor(&ref, "init_noise", NULL);
        CHECK_OK(lowvram_conditioning_set(cond, "sampling.cond_embeddings", states));
        CHECK_OK(lowvram_conditioning_set(cond, "sampling.cond_pooled", pooled));
        lowvram_denoise_params d;
        denoise_params(&d, LOWVRAM_SCHEDULER_FLOW_EULER);
        d.steps = steps[v];
        d.guidance = 3.5f; /* dev's distilled guidance; schnell takes none */
        lowvram_tensor *latents = NULL, *image = NULL;
        struct st_tensor ref_latents = {0}, ref_image = {0};
        CHECK(st_get(&ref, "latents", &ref_latents) && st_get(&ref, "image", &ref_image));
        CHECK_OK(lowvram_pipeline_denoise(ctx, pipeline, cond, &d, noise, NULL, &latents));
        if (latents && ref_latents.data) {
            check_close("latents", latents, &ref_latents, 1e-3f, 1);
            lowvram_decode_params dp;
            CHECK_OK(lowvram_decode_params_init(&dp, sizeof dp));
            CHECK_OK(lowvram_pipeline_decode(ctx, pipeline, &dp, latents, NULL, &image));
            if (image && ref_image.data) check_close("image", image, &ref_image, 3e-3f, 0);
        }
        /* The prompt through CLIP-L (pooled) and the tiny T5 (states) against transformers'. */
        lowvram_prompt_params pp;
        CHECK_OK(lowvram_prompt_params_init(&pp, sizeof pp));
        lowvram_conditioning *encoded = NULL;
        CHECK_OK(lowvram_pipeline_encode_prompt(ctx, pipeline, "a photo of a cat", &pp, &encoded));
        struct st_tensor ref_states = {0}, ref_pooled = {0};
        lowvram_tensor *got_states = NULL, *got_pooled = NULL;
        if (encoded && st_get(&ref, "t5_states", &ref_states) && st_get(&ref, "pooled", &ref_pooled)) {
            CHECK_OK(lowvram_conditioning_get(encoded, "sampling.cond_embeddings", &got_states));
            CHECK_OK(lowvram_conditioning_get(encoded, "sampling.cond_pooled", &got_pooled));
            check_close("T5 states", got_states, &ref_states, 1e-4f, 1);
            check_close("CLIP pooled", got_pooled, &ref_pooled, 1e-4f, 1);
        } else {
            check_fail();
        }
        free(ref_states.data);
        free(ref_pooled.data);
        lowvram_tensor_free(got_states);
        lowvram_tensor_free(got_pooled);
        lowvram_conditioning_free(encoded);
        free(ref_latents.data);
        free(ref_image.data);
        lowvram_tensor_free(image);
        lowvram_tensor_free(latents);
        lowvram_tensor_free(noise);
        lowvram_tensor_free(pooled);
        lowvram_tensor_free(states);
        lowvram_conditioning_free(cond);
        lowvram_pipeline_free(pipeline);
        lowvram_context_free(ctx);
        st_close(&ref);
    }
}

/* NULLs, missing components and wrong names: a clear status and message, outputs untouched. */
static void test_errors(void) {
    printf("errors\n");
    lowvram_context *ctx = new_context();
    lowvram_pipeline *const pipe_sentinel = (lowvram_pipeline *)0x1;
    lowvram_conditioning *const cond_sentinel = (lowvram_conditioning *)0x1;
    lowvram_tensor *const tensor_sentinel = (lowvram_tensor *)0x1;
    lowvram_pipeline *pipeline = pipe_sentinel;
    lowvram_pipeline_params p;

    CHECK(lowvram_pipeline_params_init(NULL, sizeof p) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_pipeline_params_init(&p, 2) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("struct_size");
    CHECK_OK(lowvram_pipeline_params_init(&p, sizeof p));
    CHECK(lowvram_pipeline_load(ctx, &p, &pipeline) == LOWVRAM_STATUS_NULL_ARGUMENT); /* path NULL */
    CHECK_MSG("params->path");
    CHECK(pipeline == pipe_sentinel);
    p.path = model_dir;
    CHECK(lowvram_pipeline_load(NULL, &p, &pipeline) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_pipeline_load(ctx, NULL, &pipeline) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("params");
    CHECK(lowvram_pipeline_load(ctx, &p, NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("out");
    CHECK(pipeline == pipe_sentinel);

    /* A text encoder folder that is not there: the error names it. */
    char missing[1300];
    snprintf(missing, sizeof missing, "%s/sd1/no_such_encoder", fixtures);
    p.text_encoder_path = missing;
    CHECK(lowvram_pipeline_load(ctx, &p, &pipeline) != LOWVRAM_STATUS_OK);
    CHECK_MSG("no_such_encoder");
    CHECK(pipeline == pipe_sentinel);

    /* Without a text encoder (the SD 2.x-style tiny pipeline has none; the shipped tiny model now carries one):
       loads (host conditioning only); encoding a prompt names the component. */
    char bare_dir[1300];
    snprintf(bare_dir, sizeof bare_dir, "%s/tests/fixtures/tiny-sd2/model", repo);
    lowvram_pipeline_params bp;
    CHECK_OK(lowvram_pipeline_params_init(&bp, sizeof bp));
    bp.path = bare_dir;
    lowvram_pipeline *bare = NULL;
    CHECK_OK(lowvram_pipeline_load(ctx, &bp, &bare));
    lowvram_conditioning *cond = cond_sentinel;
    CHECK(lowvram_pipeline_encode_prompt(ctx, bare, PROMPT, NULL, &cond) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("text_encoder");
    CHECK(cond == cond_sentinel);

    lowvram_pipeline *full = load(ctx, encoder_dir);
    CHECK(lowvram_pipeline_encode_prompt(ctx, full, NULL, NULL, &cond) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("prompt");
    CHECK(lowvram_pipeline_encode_prompt(ctx, NULL, PROMPT, NULL, &cond) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("pipeline");
    CHECK(lowvram_pipeline_encode_prompt(ctx, full, PROMPT, NULL, NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_pipeline_encode_prompt(NULL, full, PROMPT, NULL, &cond) == LOWVRAM_STATUS_NULL_ARGUMENT);
    lowvram_prompt_params pp;
    CHECK_OK(lowvram_prompt_params_init(&pp, sizeof pp));
    pp.batch = 0;
    CHECK(lowvram_pipeline_encode_prompt(ctx, full, PROMPT, &pp, &cond) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("batch");
    CHECK(cond == cond_sentinel);

    /* Conditioning entry points. */
    CHECK(lowvram_conditioning_new(NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    lowvram_conditioning *host = NULL;
    CHECK_OK(lowvram_conditioning_new(&host));
    float zeros[77 * 32];
    memset(zeros, 0, sizeof zeros);
    int64_t shape[3] = {1, 77, 32};
    lowvram_tensor *t = NULL;
    CHECK_OK(lowvram_tensor_from_host(LOWVRAM_DTYPE_F32, shape, 3, zeros, sizeof zeros, &t));
    CHECK(lowvram_conditioning_set(NULL, "sampling.cond_embeddings", t) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_conditioning_set(host, NULL, t) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("name");
    CHECK(lowvram_conditioning_set(host, "sampling.cond_embeddings", NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("tensor");
    CHECK(lowvram_conditioning_set(host, "cond_embeddings", t) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("sampling.");
    lowvram_tensor *out = tensor_sentinel;
    CHECK(lowvram_conditioning_get(host, "sampling.cond_embeddings", &out) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("no tensor sampling.cond_embeddings");
    CHECK(out == tensor_sentinel);
    CHECK(lowvram_conditioning_get(NULL, "sampling.cond_embeddings", &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_conditioning_get(host, NULL, &out) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(out == tensor_sentinel);

    /* Denoising checks the names and shapes against the family. */
    lowvram_denoise_params d;
    denoise_params(&d, LOWVRAM_SCHEDULER_EULER);
    d.steps = 2;
    d.latent_width = 8;
    d.latent_height = 8;
    lowvram_tensor *latents = tensor_sentinel;
    CHECK(lowvram_pipeline_denoise(ctx, full, host, &d, NULL, NULL, &latents) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("sampling.cond_embeddings [B, S, 32]");
    CHECK_OK(lowvram_conditioning_set(host, "sampling.cond_embeddings", t));
    CHECK_OK(lowvram_conditioning_set(host, "sampling.bogus", t));
    CHECK(lowvram_pipeline_denoise(ctx, full, host, &d, NULL, NULL, &latents) == LOWVRAM_STATUS_INVALID_ARGUMENT);
    CHECK_MSG("sampling.bogus");
    CHECK(latents == tensor_sentinel);
    CHECK(lowvram_pipeline_denoise(ctx, full, NULL, &d, NULL, NULL, &latents) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("cond");
    CHECK(lowvram_pipeline_denoise(ctx, NULL, host, &d, NULL, NULL, &latents) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(lowvram_pipeline_denoise(ctx, full, host, &d, NULL, NULL, NULL) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK(latents == tensor_sentinel);
    lowvram_tensor *image = tensor_sentinel;
    CHECK(lowvram_pipeline_decode(ctx, full, NULL, NULL, NULL, &image) == LOWVRAM_STATUS_NULL_ARGUMENT);
    CHECK_MSG("latents");
    CHECK(image == tensor_sentinel);

    lowvram_tensor_free(t);
    lowvram_conditioning_free(host);
    lowvram_conditioning_free(NULL);
    lowvram_pipeline_free(NULL);
    lowvram_pipeline_free(bare);
    lowvram_pipeline_free(full);
    lowvram_context_free(ctx);
}

/* Handles freed in every order: a conditioning outlives its pipeline and context; a pipeline outlives its context
 * (a new context's pipeline runs the old conditioning). */
static void test_free_order(void) {
    printf("free order\n");
    lowvram_context *ctx = new_context();
    lowvram_pipeline *pipeline = load(ctx, encoder_dir);
    lowvram_conditioning *cond = NULL;
    CHECK_OK(lowvram_pipeline_encode_prompt(ctx, pipeline, PROMPT, NULL, &cond));
    lowvram_pipeline_free(pipeline); /* the conditioning lives on */
    lowvram_tensor *c = NULL;
    CHECK_OK(lowvram_conditioning_get(cond, "sampling.cond_embeddings", &c));

    lowvram_pipeline *second = load(ctx, encoder_dir);
    lowvram_context_free(ctx); /* the pipeline handle outlives its context: freeing it stays valid */
    lowvram_pipeline_free(second);

    lowvram_context *ctx2 = new_context();
    lowvram_pipeline *third = load(ctx2, NULL);
    lowvram_denoise_params d;
    denoise_params(&d, LOWVRAM_SCHEDULER_EULER);
    d.steps = 2;
    d.latent_width = 8;
    d.latent_height = 8;
    lowvram_tensor *latents = NULL;
    CHECK_OK(lowvram_pipeline_denoise(ctx2, third, cond, &d, NULL, NULL, &latents));
    lowvram_conditioning_free(cond); /* before the tensors read from it */
    size_t n = 0;
    float *data = read_tensor(latents, NULL, &n);
    CHECK(n == 4 * 8 * 8);
    free(data);
    n = 0;
    data = read_tensor(c, NULL, &n);
    CHECK(n == 77 * 32);
    free(data);
    lowvram_context_free(ctx2); /* before its pipeline and tensors */
    lowvram_tensor_free(latents);
    lowvram_tensor_free(c);
    lowvram_pipeline_free(third);
}

int main(void) {
    paths();
    test_prompts_match_the_fixture();
    test_prompt_to_image();
    test_flux_folder();
    test_errors();
    test_free_order();
    return check_report("test_pipeline");
}
