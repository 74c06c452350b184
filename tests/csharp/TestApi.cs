// The C# binding as a Mono/Unity host uses it: handles, errors as exceptions, log and progress callbacks, and the
// tiny SD pipeline compared with the diffusers reference (tests/fixtures/tiny-sd/sample_euler.safetensors).
// Finds the repo through $LOWVRAM_REPO. Run with `mono --debug`.
using System;
using System.Collections.Generic;
using System.IO;
using System.Runtime.InteropServices;
using System.Text;
using LowVram;

public static class TestApi
{
    static int failures = 0;

    static void Check(bool cond, string what)
    {
        if (!cond) { Console.Error.WriteLine("CHECK failed: " + what); failures++; }
    }

    /// <summary>Run `body`, expecting a LowVramException with `status`; returns its native message.</summary>
    static string ExpectError(Status status, Action body, string what)
    {
        try
        {
            body();
        }
        catch (LowVramException e)
        {
            Check(e.Status == status, what + ": expected " + status + ", got " + e.Message);
            return e.NativeMessage;
        }
        Check(false, what + ": expected " + status + ", nothing thrown");
        return "";
    }

    static string Repo
    {
        get
        {
            var r = Environment.GetEnvironmentVariable("LOWVRAM_REPO");
            return string.IsNullOrEmpty(r) ? "." : r;
        }
    }

    static string Unet { get { return Path.Combine(Repo, "tests/fixtures/tiny-sd-random/unet"); } }
    static string Vae { get { return Path.Combine(Repo, "tests/fixtures/tiny-sd-random/vae"); } }

    sealed class StTensor { public long[] Shape; public float[] Data; }

    /// <summary>A minimal safetensors reader (F32 tensors; the host is little-endian like the file).</summary>
    static Dictionary<string, StTensor> ReadSafetensors(string path)
    {
        var bytes = File.ReadAllBytes(path);
        var hlen = (int)BitConverter.ToUInt64(bytes, 0);
        var header = Encoding.UTF8.GetString(bytes, 8, hlen);
        var result = new Dictionary<string, StTensor>();
        int pos = 0;
        while ((pos = header.IndexOf("\"dtype\"", pos, StringComparison.Ordinal)) >= 0)
        {
            int open = header.LastIndexOf('{', pos);
            int nameEnd = header.LastIndexOf('"', open);
            int nameBegin = header.LastIndexOf('"', nameEnd - 1);
            int close = header.IndexOf('}', pos);
            var name = header.Substring(nameBegin + 1, nameEnd - nameBegin - 1);
            var obj = header.Substring(open, close - open);
            pos = close;
            if (!obj.Contains("\"F32\"")) continue;
            var shape = Array.ConvertAll(Between(obj, "\"shape\""), long.Parse);
            var offsets = Array.ConvertAll(Between(obj, "\"data_offsets\""), int.Parse);
            long count = 1;
            foreach (var d in shape) count *= d;
            if (offsets[1] - offsets[0] != count * 4) throw new InvalidDataException("bad tensor " + name);
            var data = new float[count];
            Buffer.BlockCopy(bytes, 8 + hlen + offsets[0], data, 0, (int)count * 4);
            result[name] = new StTensor { Shape = shape, Data = data };
        }
        return result;
    }

    static string[] Between(string obj, string key)
    {
        int k = obj.IndexOf(key, StringComparison.Ordinal);
        int a = obj.IndexOf('[', k), b = obj.IndexOf(']', a);
        return obj.Substring(a + 1, b - a - 1).Split(new[] { ',', ' ' }, StringSplitOptions.RemoveEmptyEntries);
    }

    static float MaxAbsDiff(float[] a, float[] b)
    {
        if (a.Length != b.Length) return float.PositiveInfinity;
        float m = 0;
        for (int i = 0; i < a.Length; i++)
        {
            float d = Math.Abs(a[i] - b[i]);
            if (!(d <= m)) m = d;
        }
        return m;
    }

    static bool SameBits(float[] a, float[] b)
    {
        if (a.Length != b.Length) return false;
        for (int i = 0; i < a.Length; i++)
            if (BitConverter.DoubleToInt64Bits(a[i]) != BitConverter.DoubleToInt64Bits(b[i])) return false;
        return true;
    }

    static bool SameShape(long[] a, params long[] b)
    {
        if (a.Length != b.Length) return false;
        for (int i = 0; i < a.Length; i++) if (a[i] != b[i]) return false;
        return true;
    }

    /// <summary>The C header's struct sizes on LP64 (tests/c/test_api.c asserts the same numbers).</summary>
    static void TestStructSizes()
    {
        Check(Marshal.SizeOf(typeof(Native.ContextParams)) == 56, "sizeof lowvram_context_params");
        Check(Marshal.SizeOf(typeof(CacheStats)) == 128, "sizeof lowvram_cache_stats");
        Check(Marshal.SizeOf(typeof(ModelInfo)) == 40, "sizeof lowvram_model_info");
        Check(Marshal.SizeOf(typeof(Native.ReservationParams)) == 24, "sizeof lowvram_reservation_params");
        Check(Marshal.SizeOf(typeof(Native.PipelineParams)) == 40, "sizeof lowvram_pipeline_params");
        Check(Marshal.SizeOf(typeof(Native.PromptParams)) == 32, "sizeof lowvram_prompt_params");
        Check(Marshal.SizeOf(typeof(Native.DenoiseParams)) == 80, "sizeof lowvram_denoise_params");
        Check(Marshal.SizeOf(typeof(Native.DecodeParams)) == 48, "sizeof lowvram_decode_params");
        Check(Marshal.SizeOf(typeof(Native.ModelLoadParams)) == 40, "sizeof lowvram_model_load_params");
        Check(Marshal.SizeOf(typeof(RunReport)) == 72, "sizeof lowvram_run_report");
        Check(Marshal.SizeOf(typeof(Native.SystemInfo)) == 2984, "sizeof lowvram_system_info");
        Check(Marshal.OffsetOf(typeof(Native.SystemInfo), "Backend").ToInt32() == 2720, "offsetof backend");
        Check(Marshal.SizeOf(typeof(Native.DeviceInfo)) == 152, "sizeof lowvram_device_info");
        // Field offsets the library reads by struct_size.
        Check(Marshal.OffsetOf(typeof(Native.DenoiseParams), "Seed").ToInt32() == 24, "offsetof seed");
        Check(Marshal.OffsetOf(typeof(Native.DenoiseParams), "Progress").ToInt32() == 48, "offsetof progress");
        Check(Marshal.OffsetOf(typeof(RunReport), "TileLatent").ToInt32() == 64, "offsetof tile_latent");
        Check(Marshal.OffsetOf(typeof(CacheStats), "ModelCount").ToInt32() == 96, "offsetof model_count");
        Check(Marshal.OffsetOf(typeof(CacheStats), "ModelsWithoutRamCopy").ToInt32() == 100, "offsetof models_without_ram_copy");
        Check(Marshal.OffsetOf(typeof(CacheStats), "PinnedBytes").ToInt32() == 104, "offsetof pinned_bytes");
        Check(Marshal.OffsetOf(typeof(CacheStats), "ModelsUnpinned").ToInt32() == 120, "offsetof models_unpinned");

        // The init functions accept our sizes and give the documented defaults.
        var p = new Native.DenoiseParams();
        Native.Check(Native.lowvram_denoise_params_init(ref p, (UIntPtr)Marshal.SizeOf(typeof(Native.DenoiseParams))));
        Check(p.StructSize == 80 && p.Steps == 20 && p.Guidance == 7.5f && !p.Karras && p.Scheduler == Scheduler.Euler,
            "denoise params defaults");
        Check(p.LatentWidth == 64 && p.LatentHeight == 64 && p.Progress == IntPtr.Zero, "denoise params defaults 2");
        var d = new Native.DecodeParams { NeverTile = true, TileLatent = 99 };
        Native.Check(Native.lowvram_decode_params_init(ref d, (UIntPtr)Marshal.SizeOf(typeof(Native.DecodeParams))));
        Check(d.StructSize == 48 && d.TileLatent == 0 && d.OverlapLatent == 0 && !d.NeverTile, "decode params defaults");
    }

    static void TestBasics()
    {
        Check(Library.Version.Split('.').Length == 3, "version has three parts: " + Library.Version);
        Check(Library.StatusName(Status.BudgetTooSmall) == "BUDGET_TOO_SMALL", "status name");

        var stats = SystemStats.Probe();
        Check(stats.RamTotalBytes > 0, "RAM total");
        Check(stats.CudaAvailable ? stats.DeviceCount > 0 : !string.IsNullOrEmpty(stats.CudaReason), "CUDA reason");
        Check(stats.Backend <= 2 && !string.IsNullOrEmpty(stats.BackendReason), "backend and its reason");

        var messages = new List<string>();
        using (var ctx = new Context(device: "cpu", log: (level, m) => messages.Add(level + " " + m)))
        {
            ctx.Cancel();
            Check(messages.Count > 0, "log callback fired at creation");
            var later = new List<string>();
            ctx.SetLogCallback((level, m) => later.Add(m));
            using (ctx.LoadModel(Vae)) { }
            Check(later.Exists(m => m.Contains("loaded")), "replaced log callback hears the load");
            ctx.SetLogCallback((level, m) => { throw new InvalidOperationException("from a log callback"); });
            using (ctx.LoadModel(Vae)) { } // the throwing callback does not cross into native code
            ctx.SetLogCallback(null);
        }

        var global = new List<string>();
        Library.SetLogCallback((level, m) => global.Add(m));
        using (new Context(device: "cpu")) { }
        Library.SetLogCallback(null);
        int seen = global.Count;
        Check(seen > 0, "process-wide log callback fired");
        using (new Context(device: "cpu")) { }
        Check(global.Count == seen, "removed process-wide callback hears nothing");

        var msg = ExpectError(Status.NullArgument, () => Native.Check(Native.lowvram_context_cancel(new ContextHandle())),
            "NULL context");
        Check(msg.Contains("ctx must not be NULL"), "message: " + msg);
    }

    static void TestTensors()
    {
        var data = new float[24];
        for (int i = 0; i < data.Length; i++) data[i] = i * 0.25f - 1;
        using (var t = Tensor.FromHost(data, 2, 3, 4))
        {
            DType dt; long[] shape; ulong bytes;
            t.Describe(out dt, out shape, out bytes);
            Check(dt == DType.F32 && bytes == 96 && SameShape(shape, 2, 3, 4), "tensor info");
            Check(SameBits(t.ReadFloats(), data), "tensor round trip");
            bool threw = false;
            try { t.ReadHalfs(); } catch (InvalidOperationException) { threw = true; }
            Check(threw, "ReadHalfs on F32 throws");
        }
        var halfs = new ushort[] { 0x3c00, 0xc000, 0x7bff, 0x0001 };
        using (var h = Tensor.FromHost(halfs, DType.F16, 4))
        {
            Check(h.DType == DType.F16, "f16 dtype");
            var back = h.ReadHalfs();
            Check(back.Length == 4 && back[0] == 0x3c00 && back[3] == 0x0001, "f16 round trip");
        }
        var m = ExpectError(Status.BufferSize, () => Tensor.FromHost(data, 5, 5), "wrong data length");
        Check(m.Contains("96") && m.Contains("100"), "buffer size message: " + m);
        ExpectError(Status.InvalidArgument, () => Tensor.FromHost(data, -1, 24), "negative dim");
        var t2 = Tensor.FromHost(data, 24);
        t2.Dispose();
        t2.Dispose(); // twice is fine
        Check(t2.Handle.IsClosed, "disposed handle is closed");
    }

    static void TestModelsConfigureStatsReservations()
    {
        using (var ctx = new Context(device: "emulated:64MiB"))
        using (var unet = ctx.LoadModel(Unet))
        using (var vae = ctx.LoadModel(Vae))
        {
            var ui = unet.Info;
            Check(ui.StructSize == 40 && ui.Id > 0 && ui.Kind == ModelKind.Unet && ui.TotalBytes > 0 && ui.BlockCount > 1,
                "unet info");
            Check(ui.ResidentBytes == 0, "nothing resident before use");
            Check(vae.Info.Kind == ModelKind.Vae && vae.Info.TotalBytes > 0, "vae info");

            var m = ExpectError(Status.Io, () => ctx.LoadModel(Path.Combine(Repo, "models/no-such-model/unet")),
                "missing model");
            Check(m.Contains("no-such-model"), "IO message names the path: " + m);

            ctx.Configure("max_cache_vram_gb: 0.01\n");
            m = ExpectError(Status.InvalidArgument, () => ctx.Configure("no_such_key: 1\n"), "bad config key");
            Check(m.Contains("no_such_key"), "message names the key: " + m);

            var s = ctx.Stats();
            Check(s.StructSize == (uint)Marshal.SizeOf(typeof(CacheStats)), "stats struct_size from the library");
            Check(s.DeviceTotalBytes == 64UL << 20 && s.ModelCount == 2, "stats: capacity and models");
            var json = ctx.StatsJson();
            Check(json.StartsWith("{") && json.Contains("\"models\""), "stats json");

            ulong resident = ctx.LoadToDevice(unet, 512UL << 10);
            Check(resident > 0 && resident <= (512UL << 10), "partial load");
            Check(unet.Info.ResidentBytes == resident, "info agrees with the partial load");
            Check(ctx.Stats().DeviceUsedByCacheBytes == resident, "stats agree with the partial load");
            ulong freed = ctx.FreeMemory(1);
            Check(freed > 0 && freed <= resident, "free_memory");
            ctx.LoadToDevice(unet, 512UL << 10);
            Check(ctx.UnloadAll() >= resident, "unload_all");
            Check(unet.Info.ResidentBytes == 0, "nothing resident after unload_all");

            using (var r = ctx.Reserve(8UL << 20))
            {
                Check(r.Bytes == 8UL << 20, "reservation bytes");
                Check(ctx.Stats().DeviceUsedBytes >= 8UL << 20, "reservation counted");
                m = ExpectError(Status.BudgetTooSmall, () => ctx.Reserve(1UL << 30), "reservation over capacity");
                Check(m.Contains("reservation") && m.Contains("1073741824"), "budget message: " + m);
                ExpectError(Status.InvalidArgument, () => ctx.Reserve(0), "zero reservation");
            }
            Check(ctx.Stats().DeviceUsedBytes == 0, "reservation given back");
        }
        // a reservation and a model disposed after their context
        Reservation late;
        Model lateModel;
        using (var ctx = new Context(device: "emulated:64MiB"))
        {
            late = ctx.Reserve(1UL << 20);
            lateModel = ctx.LoadModel(Vae);
        }
        late.Dispose();
        lateModel.Dispose();
    }

    static void TestPipeline()
    {
        var refs = ReadSafetensors(Path.Combine(Repo, "tests/fixtures/tiny-sd/sample_euler.safetensors"));
        var rn = refs["sampling.init_noise"];
        var rc = refs["sampling.cond_embeddings"];
        var ru = refs["sampling.uncond_embeddings"];
        var rl = refs["latents"];
        var ri = refs["image"];
        Check(SameShape(rn.Shape, 1, 4, 8, 8) && SameShape(rc.Shape, 1, 77, 32) && SameShape(ri.Shape, 1, 3, 64, 64),
            "fixture shapes");

        var logs = new List<string>();
        using (var noise = Tensor.FromHost(rn.Data, rn.Shape))
        using (var cond = Tensor.FromHost(rc.Data, rc.Shape))
        using (var uncond = Tensor.FromHost(ru.Data, ru.Shape))
        using (var ctx = new Context(device: "cpu", log: (level, m) => logs.Add(m)))
        using (var unet = ctx.LoadModel(Unet))
        using (var vae = ctx.LoadModel(Vae))
        {
            var steps = new List<uint>();
            var o = new DenoiseOptions
            {
                Steps = 8, Guidance = 7.5f,
                Progress = (step, total) => { steps.Add(step); Check(total == 8, "total steps"); return true; },
            };
            RunReport report;
            float[] got;
            using (var latents = ctx.Denoise(unet, o, cond, uncond, noise, out report))
            {
                Check(steps.Count == 8 && steps[7] == 8, "progress called once per step");
                Check(report.StructSize == 72 && report.ModelBytes > 0 && report.TotalMs > 0, "report");
                Check(SameShape(latents.Shape, 1, 4, 8, 8), "latents shape");
                got = latents.ReadFloats();
                float err = MaxAbsDiff(got, rl.Data);
                Console.WriteLine("C# denoise (cpu, 8 Euler steps, guidance 7.5): max abs error vs diffusers latents {0:E3}", err);
                Check(err <= 1e-3f, "latents within 1e-3 of diffusers: " + err);

                RunReport dreport;
                using (var image = ctx.VaeDecode(vae, latents, new DecodeOptions(), out dreport))
                {
                    Check(SameShape(image.Shape, 1, 3, 64, 64), "image shape");
                    var pixels = image.ReadFloats();
                    float ierr = MaxAbsDiff(pixels, ri.Data);
                    Console.WriteLine("C# vae decode: max abs error vs diffusers image {0:E3}", ierr);
                    Check(ierr <= 1e-3f, "image within 1e-3 of diffusers: " + ierr);
                    Check(dreport.TileLatent == 0, "untiled decode");
                    using (var tiled = ctx.VaeDecode(vae, latents, new DecodeOptions { TileLatent = 4 }, out dreport))
                    {
                        float terr = MaxAbsDiff(tiled.ReadFloats(), pixels);
                        Console.WriteLine("C# tiled vae decode (4-latent tiles): max abs difference from untiled {0:E3}", terr);
                        Check(dreport.TileLatent == 4 && terr <= 1e-4f, "tiled decode matches untiled: " + terr);
                    }
                    var png = Path.Combine(Path.GetTempPath(), "lowvram_test_api_cs.png");
                    File.Delete(png);
                    image.WritePng(png);
                    var sig = new byte[8];
                    using (var f = File.OpenRead(png)) f.Read(sig, 0, 8);
                    Check(sig[0] == 0x89 && sig[1] == (byte)'P' && sig[2] == (byte)'N' && sig[3] == (byte)'G' &&
                          sig[4] == 13 && sig[5] == 10 && sig[6] == 26 && sig[7] == 10, "PNG signature");
                    File.Delete(png);
                }
            }

            // wrong-shape cond
            using (var bad = Tensor.FromHost(new float[77 * 31], 1, 77, 31))
            {
                var m = ExpectError(Status.InvalidArgument, () => ctx.Denoise(unet, new DenoiseOptions { Steps = 8 }, bad),
                    "wrong-shape cond");
                Check(m.Contains("31"), "message names the shape: " + m);
            }

            // cancel at step 3 by returning false; the context keeps working
            int calls = 0;
            var stop = new DenoiseOptions { Steps = 8, Progress = (step, total) => { calls++; return step < 3; } };
            ExpectError(Status.Cancelled, () => ctx.Denoise(unet, stop, cond, uncond, noise), "cancel from progress");
            Check(calls == 3, "progress stopped at step 3: " + calls);
            // a throwing progress callback cancels the run and its exception comes out of Denoise
            stop.Progress = (step, total) => { if (step == 2) throw new TimeoutException("host stop"); return true; };
            bool rethrown = false;
            try { ctx.Denoise(unet, stop, cond, uncond, noise).Dispose(); }
            catch (TimeoutException e) { rethrown = e.Message == "host stop"; }
            Check(rethrown, "progress exception rethrown");
            // Cancel() from inside the callback
            stop.Progress = (step, total) => { if (step == 1) ctx.Cancel(); return true; };
            ExpectError(Status.Cancelled, () => ctx.Denoise(unet, stop, cond, uncond, noise), "Cancel() in callback");
            using (var again = ctx.Denoise(unet, new DenoiseOptions { Steps = 8 }, cond, uncond, noise))
                Check(SameBits(again.ReadFloats(), got), "denoise after cancel gives the same latents");

            // a cancel token: cancelled before the call, it still stops it; the next call without it runs
            using (var token = new CancelToken())
            {
                Check(!token.IsCancelled, "new token not cancelled");
                token.Cancel();
                Check(token.IsCancelled, "token cancelled");
                int tokenCalls = 0;
                var withToken = new DenoiseOptions { Steps = 8, Cancel = token,
                    Progress = (step, total) => { tokenCalls++; return true; } };
                ExpectError(Status.Cancelled, () => ctx.Denoise(unet, withToken, cond, uncond, noise), "token cancel");
                Check(tokenCalls == 0, "a token cancelled before the call stops it before the first step");
                ExpectError(Status.Cancelled, () => ctx.LoadModel(Vae, null, token), "token cancels a load");
            }
            using (var again = ctx.Denoise(unet, new DenoiseOptions { Steps = 8 }, cond, uncond, noise))
            using (var decodeToken = new CancelToken())
            {
                Check(SameBits(again.ReadFloats(), got), "a token never stops another call");
                int blocks = 0;
                var dopts = new DecodeOptions { Cancel = decodeToken,
                    Progress = (done, total) => { blocks++; if (done == 2) decodeToken.Cancel(); return true; } };
                ExpectError(Status.Cancelled, () => ctx.VaeDecode(vae, again, dopts), "decode token cancel");
                Check(blocks == 2, "decode progress per block: " + blocks);
            }
            int phases = 0;
            using (ctx.LoadModel(Vae, (done, total) => { phases++; return true; }, null)) { }
            Check(phases == 3, "load reports its phases: " + phases);

            // streaming under a ~0.5 MiB cache on an emulated device: bit-identical latents
            using (var small = new Context(device: "emulated:64MiB",
                configYaml: "device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.0005\n"))
            using (var sunet = small.LoadModel(Unet))
            {
                RunReport sr;
                using (var streamed = small.Denoise(sunet, new DenoiseOptions { Steps = 8 }, cond, uncond, noise, out sr))
                {
                    Console.WriteLine("C# streamed denoise: {0} of {1} bytes resident, {2} streamed",
                        sr.ResidentBytes, sr.ModelBytes, sr.BytesStreamed);
                    Check(sr.BytesStreamed > 0 && sr.ResidentBytes < sr.ModelBytes, "streamed");
                    Check(sr.RefusedAllocations == 0, "no refused allocations");
                    Check(SameBits(streamed.ReadFloats(), got), "streamed latents bit-identical");
                }
                Check(small.Stats().BytesStreamedTotal >= sr.BytesStreamed, "stats count the streamed bytes");
            }
        }
        Check(logs.Count > 0, "pipeline context logged");
    }

    /// <summary>Median of `v` (the upper one for an even count, as the C++ test).</summary>
    static float Median(List<float> v)
    {
        if (v.Count == 0) return 0;
        v.Sort();
        return v[v.Count / 2];
    }

    /// <summary>The picture a prompt asks for, judged as tests/trained_model.rs judges it: the border's median colour
    /// is the background; the pixels far from it (the shape) have their own median colour. `image` [1, 3, h, w].</summary>
    static void Judge(float[] image, int h, int w, float[] bg, float[] fg, out int fgPixels)
    {
        Func<int, int, int, float> at = (c, y, x) =>
            (float)Math.Round((Math.Min(1f, Math.Max(-1f, image[(c * h + y) * w + x])) + 1f) * 127.5f);
        for (int c = 0; c < 3; c++)
        {
            var border = new List<float>();
            for (int y = 0; y < h; y++)
                for (int x = 0; x < w; x++)
                    if (y < 2 || y >= h - 2 || x < 2 || x >= w - 2) border.Add(at(c, y, x));
            bg[c] = Median(border);
        }
        var f = new[] { new List<float>(), new List<float>(), new List<float>() };
        for (int y = 0; y < h; y++)
            for (int x = 0; x < w; x++)
            {
                float d = 0;
                for (int c = 0; c < 3; c++) d += (at(c, y, x) - bg[c]) * (at(c, y, x) - bg[c]);
                if (Math.Sqrt(d) > 80)
                    for (int c = 0; c < 3; c++) f[c].Add(at(c, y, x));
            }
        fgPixels = f[0].Count;
        for (int c = 0; c < 3; c++) fg[c] = Median(f[c]);
    }

    static bool Reddish(float[] c) { return c[0] > 128 && c[0] > c[2] + 60 && c[0] > c[1] + 60; }
    static bool Bluish(float[] c) { return c[2] > 128 && c[2] > c[0] + 60 && c[2] > c[1] + 30; }

    /// <summary>A prompt through the pipeline API with the trained models/tiny-sd: a red shape on a blue
    /// background, written as a PNG; host-built conditioning; reservations with a timeout and a token.</summary>
    static void TestPrompt()
    {
        using (var ctx = new Context(device: "cpu"))
        using (var sd = ctx.LoadPipeline(Path.Combine(Repo, "models/tiny-sd")))
        using (var cond = ctx.EncodePrompt(sd, "a red circle on a blue background"))
        {
            using (var emb = cond.Get("sampling.cond_embeddings"))
                Check(emb.Shape.Length == 3 && emb.Shape[0] == 1, "prompt embeddings [1, S, D]");
            ExpectError(Status.InvalidArgument, () => cond.Get("sampling.no_such_tensor"), "missing conditioning");
            var o = new DenoiseOptions { Steps = 20, Guidance = 7.5f, LatentWidth = 16, LatentHeight = 16 };
            RunReport report;
            using (var latents = ctx.Denoise(sd, cond, o, null, out report))
            using (var image = ctx.Decode(sd, latents))
            {
                Check(report.ModelBytes > 0, "pipeline denoise report");
                var shape = image.Shape;
                Check(shape.Length == 4 && shape[1] == 3 && shape[2] == 64 && shape[3] == 64, "image [1, 3, 64, 64]");
                float[] bg = new float[3], fg = new float[3];
                int n;
                Judge(image.ReadFloats(), 64, 64, bg, fg, out n);
                Console.WriteLine("C# prompt \"a red circle on a blue background\": background rgb (" + bg[0] + ", " +
                    bg[1] + ", " + bg[2] + "), shape rgb (" + fg[0] + ", " + fg[1] + ", " + fg[2] + ") over " + n +
                    " pixels");
                Check(Bluish(bg), "the background is blue");
                Check(n >= 40 && Reddish(fg), "the shape is red");
                var png = Path.Combine(Path.GetTempPath(), "lowvram_test_prompt_cs.png");
                File.Delete(png);
                image.WritePng(png);
                var head = File.ReadAllBytes(png);
                Check(head.Length > 8 && head[0] == 0x89 && head[1] == (byte)'P' && head[2] == (byte)'N' &&
                    head[3] == (byte)'G', "a PNG was written");
                File.Delete(png);

                // The same tensors set by the host give the same latents; an empty conditioning is refused by name.
                using (var copy = new Conditioning())
                using (var c = cond.Get("sampling.cond_embeddings"))
                using (var u = cond.Get("sampling.uncond_embeddings"))
                {
                    var msg = ExpectError(Status.InvalidArgument, () => ctx.Denoise(sd, copy, o).Dispose(), "empty conditioning");
                    Check(msg.Contains("sampling.cond_embeddings"), "the message names the missing tensor");
                    copy.Set("sampling.cond_embeddings", c);
                    copy.Set("sampling.uncond_embeddings", u);
                    using (var again = ctx.Denoise(sd, copy, o))
                    {
                        float[] x = again.ReadFloats(), y = latents.ReadFloats();
                        bool same = x.Length == y.Length;
                        for (int i = 0; same && i < x.Length; i++) same = x[i] == y[i];
                        Check(same, "host conditioning gives the same latents");
                    }
                }
            }
        }

        using (var ctx = new Context(device: "emulated:64MiB", configYaml: "device_working_mem_gb: 0"))
        {
            using (var r = ctx.Reserve(8UL << 20, new ReservationOptions { TimeoutMs = 0 }))
                Check(r.Bytes == 8UL << 20, "a free reservation is granted at once");
            using (var token = new CancelToken())
            {
                token.Cancel();
                ExpectError(Status.Cancelled, () => ctx.Reserve(1UL << 20, new ReservationOptions { Cancel = token }).Dispose(),
                    "a cancelled token stops the reservation");
            }
            var m = ExpectError(Status.BudgetTooSmall, () => ctx.Reserve(1UL << 40, new ReservationOptions { TimeoutMs = 0 }).Dispose(),
                "more than the device");
            Check(m.Contains("reservation"), "the message names the reservation");
            // A run paused in its progress callback holds its working memory; another thread's reservation of the
            // rest times out.
            using (var unet = ctx.LoadModel(Unet))
            using (var cond = Tensor.FromHost(new float[4 * 32], 1, 4, 32))
            {
                string timedOut = null;
                var o = new DenoiseOptions { Steps = 2, LatentWidth = 8, LatentHeight = 8 };
                o.Progress = (step, total) =>
                {
                    if (step == 1)
                    {
                        var t = new System.Threading.Thread(() =>
                            timedOut = ExpectError(Status.Timeout,
                                () => ctx.Reserve((64UL << 20) - 4096, new ReservationOptions { TimeoutMs = 200 }).Dispose(),
                                "a reservation that does not fit beside the run"));
                        t.Start();
                        t.Join();
                    }
                    return true;
                };
                using (var latents = ctx.Denoise(unet, o, cond)) { }
                Check(timedOut != null && timedOut.Contains("timed out after"), "TIMEOUT with its message");
                Check(Library.StatusName(Status.Timeout) == "TIMEOUT", "status name TIMEOUT");
            }
        }
    }

    public static int Main()
    {
        try
        {
            TestStructSizes();
            TestBasics();
            TestTensors();
            TestModelsConfigureStatsReservations();
            TestPipeline();
            TestPrompt();
        }
        catch (Exception e)
        {
            Console.Error.WriteLine("unexpected exception: " + e);
            failures++;
        }
        GC.Collect();
        GC.WaitForPendingFinalizers();

        if (failures > 0) { Console.Error.WriteLine("TestApi: " + failures + " check(s) failed"); return 1; }
        Console.WriteLine("TestApi: all checks passed");
        return 0;
    }
}
