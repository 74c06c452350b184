// Text to image through the C# binding: load the trained tiny pipeline shipped in the repo (tokenizer, CLIP text
// encoder, UNet, VAE), encode a prompt, denoise with Euler for 20 steps at guidance 7.5, decode, write a PNG.
//
//   mcs -unsafe -out:Prompt.exe bindings/csharp/LowVram.cs examples/Prompt.cs
//   LD_LIBRARY_PATH=target/release mono Prompt.exe models/tiny-sd "a red circle on a blue background" out.png
using System;
using LowVram;

public static class PromptExample
{
    public static int Main(string[] args)
    {
        var model = args.Length > 0 ? args[0] : "models/tiny-sd";
        var prompt = args.Length > 1 ? args[1] : "a red circle on a blue background";
        var outPath = args.Length > 2 ? args[2] : "prompt.png";
        try
        {
            using (var ctx = new Context(device: "cpu"))
            using (var pipeline = ctx.LoadPipeline(model))
            // The prompt and an empty negative: the conditioning classifier-free guidance needs.
            using (var cond = ctx.EncodePrompt(pipeline, prompt))
            // 64 x 64 pixels: this model's VAE downscales by 4 (SD's by 8).
            using (var latents = ctx.Denoise(pipeline, cond, new DenoiseOptions
                   {
                       Scheduler = Scheduler.Euler, Steps = 20, Guidance = 7.5f, Seed = 0, LatentWidth = 16,
                       LatentHeight = 16,
                   }))
            using (var image = ctx.Decode(pipeline, latents))
            {
                image.WritePng(outPath);
            }
            Console.WriteLine("wrote " + outPath + " (\"" + prompt + "\")");
            return 0;
        }
        catch (LowVramException e)
        {
            Console.Error.WriteLine("lowvram: " + e.Message);
            return 1;
        }
    }
}
