// Text to image through the C++ wrapper: load the trained tiny pipeline shipped in the repo (tokenizer, CLIP text
// encoder, UNet, VAE), encode a prompt, denoise with Euler for 20 steps at guidance 7.5, decode, write a PNG.
//
//   g++ -std=c++17 -I include -I bindings/cpp examples/prompt.cpp -L target/release -llowvram
//       -Wl,-rpath,target/release -o prompt_cpp
//   ./prompt_cpp models/tiny-sd "a red circle on a blue background" out.png
#include "lowvram.hpp"

#include <cstdio>
#include <string>

int main(int argc, char **argv) {
    const std::string model = argc > 1 ? argv[1] : "models/tiny-sd";
    const std::string prompt = argc > 2 ? argv[2] : "a red circle on a blue background";
    const std::string out_path = argc > 3 ? argv[3] : "prompt.png";
    try {
        lowvram::Context ctx({"cpu"});
        lowvram::Pipeline pipeline = ctx.load_pipeline({model});
        // The prompt and an empty negative: the conditioning classifier-free guidance needs.
        lowvram::Conditioning cond = ctx.encode_prompt(pipeline, prompt);

        lowvram::DenoiseOptions o;
        o.scheduler = LOWVRAM_SCHEDULER_EULER;
        o.steps = 20;
        o.guidance = 7.5f;
        o.seed = 0;
        // 64 x 64 pixels: this model's VAE downscales by 4 (SD's by 8).
        o.latent_width = 16;
        o.latent_height = 16;
        lowvram::Tensor latents = ctx.denoise(pipeline, cond, o);
        ctx.decode(pipeline, latents).write_png(out_path);
        std::printf("wrote %s (\"%s\")\n", out_path.c_str(), prompt.c_str());
    } catch (const lowvram::Error &e) {
        std::fprintf(stderr, "lowvram: %s\n", e.what());
        return 1;
    }
    return 0;
}
