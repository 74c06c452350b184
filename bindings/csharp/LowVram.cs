// lowvram C# binding: SafeHandle per handle, DllImport (Cdecl), Mono/Unity-safe callbacks.
// No LibraryImport or source generators, so Unity (Mono, IL2CPP) can use it.
//
//   using (var ctx = new Context(device: "emulated:512MiB"))
//   using (var unet = ctx.LoadModel("tests/fixtures/tiny-sd-random/unet"))
//   using (var vae = ctx.LoadModel("tests/fixtures/tiny-sd-random/vae"))
//   using (var cond = Tensor.FromHost(embeddings, 1, 77, 768))
//   using (var latents = ctx.Denoise(unet, new DenoiseOptions { Steps = 20, Progress = (s, n) => true }, cond))
//   using (var image = ctx.VaeDecode(vae, latents))
//       image.WritePng("out.png");
//
// From a prompt, through a pipeline folder (tokenizer, text encoders, denoiser, VAE):
//   using (var sd = ctx.LoadPipeline("models/tiny-sd"))
//   using (var cond = ctx.EncodePrompt(sd, "a red circle on a blue background"))
//   using (var latents = ctx.Denoise(sd, cond, new DenoiseOptions { LatentWidth = 16, LatentHeight = 16 }))
//   using (var image = ctx.Decode(sd, latents))
//       image.WritePng("out.png");
//
// Ownership: each wrapper owns one SafeHandle; Dispose frees it (the finalizer does if you forget). Models,
// pipelines and reservations may be disposed before or after their context. Callbacks are static methods that find their state
// through a GCHandle passed as user_data; an exception thrown by a progress callback cancels the run and is
// rethrown from Denoise; one thrown by a log callback is dropped (it must not unwind into native code).
using System;
using System.Runtime.ExceptionServices;
using System.Runtime.InteropServices;
using System.Text;
using System.Threading;

namespace LowVram
{
    /// <summary>Stable status numbers of the C API (lowvram_status).</summary>
    public enum Status : uint
    {
        Ok = 0, NullArgument = 1, InvalidArgument = 2, Io = 3, Format = 4, OutOfDeviceMemory = 5,
        OutOfHostMemory = 6, BudgetTooSmall = 7, Cancelled = 8, Unsupported = 9, Panic = 10, BufferSize = 11,
        Internal = 12, Timeout = 13,
    }

    /// <summary>Log severity (lowvram_log_level).</summary>
    public enum LogLevel : uint { Error = 1, Warn = 2, Info = 3, Debug = 4 }

    /// <summary>Element type of a tensor (lowvram_dtype).</summary>
    public enum DType : uint { F32 = 0, F16 = 1, BF16 = 2 }

    /// <summary>What a model is (lowvram_model_kind).</summary>
    public enum ModelKind : uint { Unet = 0, Vae = 1, TextEncoder = 2, Transformer = 3 }

    /// <summary>Samplers (lowvram_scheduler).</summary>
    public enum Scheduler : uint { Euler = 0, EulerA = 1, Ddim = 2, Dpmpp2m = 3, FlowEuler = 4 }

    /// <summary>A failed lowvram call: its status and the library's message.</summary>
    public sealed class LowVramException : Exception
    {
        public Status Status { get; }
        /// <summary>The library's message alone (Message is "Status: message").</summary>
        public string NativeMessage { get; }
        public LowVramException(Status status, string message) : base(status + ": " + message)
        {
            Status = status;
            NativeMessage = message;
        }
    }

    /// <summary>Marks a static method as called from native code (IL2CPP needs it for AOT; Mono ignores it).</summary>
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type delegateType) { DelegateType = delegateType; }
        public Type DelegateType { get; }
    }

    /// <summary>lowvram_cache_stats: a snapshot of a context's memory statistics, bytes.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct CacheStats
    {
        public uint StructSize;
        public ulong DeviceTotalBytes;
        public ulong DeviceFreeBytes;
        public ulong DeviceUsedBytes;
        public ulong DeviceUsedByCacheBytes;
        public ulong DevicePeakBytes;
        public ulong DeviceRefusedAllocations;
        public ulong RamCacheUsedBytes;
        public ulong RamCacheLimitBytes;
        public ulong BytesStreamedTotal;
        public ulong CacheHits;
        public ulong CacheMisses;
        public uint ModelCount;
        /// <summary>Models without a RAM copy: streamed from the file's memory map (the log says why).</summary>
        public uint ModelsWithoutRamCopy;
        /// <summary>Host bytes page-locked now, and the cap on them (0 = nothing is pinned).</summary>
        public ulong PinnedBytes;
        public ulong PinnedCapBytes;
        /// <summary>Models whose RAM copy is not pinned (the cap, pin_memory: false, the driver refused).</summary>
        public uint ModelsUnpinned;
    }

    /// <summary>lowvram_model_info: a model's kind, sizes and residency, bytes.</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct ModelInfo
    {
        public uint StructSize;
        public ModelKind Kind;
        public ulong TotalBytes;
        public ulong ResidentBytes;
        public uint BlockCount;
        public uint ResidentBlockCount;
        /// <summary>Unique in the process: models of different contexts never share one (since 0.3).</summary>
        public ulong Id;
    }

    /// <summary>lowvram_run_report: what a denoise or decode measured (bytes, milliseconds).</summary>
    [StructLayout(LayoutKind.Sequential)]
    public struct RunReport
    {
        public uint StructSize;
        public double TotalMs;
        public ulong PeakDeviceBytes;
        public ulong BytesStreamed;
        public ulong ResidentBytes;
        public ulong ModelBytes;
        public ulong WorkingBytes;
        public ulong RefusedAllocations;
        /// <summary>Decode: tile edge used in latent pixels, 0 when untiled.</summary>
        public uint TileLatent;
    }

    /// <summary>Raw P/Invoke declarations and marshalling helpers; prefer the wrapper classes.</summary>
    public static class Native
    {
#if UNITY_IOS && !UNITY_EDITOR
        public const string Lib = "__Internal";
#else
        public const string Lib = "lowvram";
#endif

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        public delegate void LogCallback(LogLevel level, IntPtr message, IntPtr userData);

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        [return: MarshalAs(UnmanagedType.U1)]
        public delegate bool ProgressCallback(uint step, uint total, IntPtr userData);

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        public delegate void ReleaseCallback(IntPtr userData);

        [StructLayout(LayoutKind.Sequential)]
        public struct ContextParams
        {
            public uint StructSize;
            public IntPtr Device;
            public IntPtr ConfigYaml;
            public IntPtr ConfigPath;
            public IntPtr LogCallback;
            public IntPtr LogUserData;
            public IntPtr LogUserDataRelease;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct DenoiseParams
        {
            public uint StructSize;
            public Scheduler Scheduler;
            [MarshalAs(UnmanagedType.U1)] public bool Karras;
            public uint Steps;
            public float Guidance;
            public ulong Seed;
            public uint LatentWidth;
            public uint LatentHeight;
            public IntPtr StepNoise;
            public IntPtr Progress;
            public IntPtr ProgressUserData;
            public IntPtr CancelToken;
            public IntPtr ProgressUserDataRelease;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct DecodeParams
        {
            public uint StructSize;
            public uint TileLatent;
            public uint OverlapLatent;
            [MarshalAs(UnmanagedType.U1)] public bool NeverTile;
            public IntPtr Progress;
            public IntPtr ProgressUserData;
            public IntPtr CancelToken;
            public IntPtr ProgressUserDataRelease;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct ModelLoadParams
        {
            public uint StructSize;
            public IntPtr Progress;
            public IntPtr ProgressUserData;
            public IntPtr ProgressUserDataRelease;
            public IntPtr CancelToken;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct ReservationParams
        {
            public uint StructSize;
            public ulong TimeoutMs;
            public IntPtr CancelToken;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct PipelineParams
        {
            public uint StructSize;
            public IntPtr Path;
            public IntPtr VaePath;
            public IntPtr TextEncoderPath;
            public IntPtr TextEncoder2Path;
        }

        [StructLayout(LayoutKind.Sequential)]
        public struct PromptParams
        {
            public uint StructSize;
            public IntPtr NegativePrompt;
            public uint Batch;
            public uint Width;
            public uint Height;
            public uint ClipSkip;
        }

        /// <summary>ReservationParams.TimeoutMs: no bound (LOWVRAM_WAIT_FOREVER).</summary>
        public const ulong WaitForever = ulong.MaxValue;

        [StructLayout(LayoutKind.Sequential)]
        public unsafe struct DeviceInfo
        {
            public uint Index;
            public fixed byte Name[128];
            public ulong TotalBytes;
            public ulong FreeBytes;
        }

        [StructLayout(LayoutKind.Sequential)]
        public unsafe struct SystemInfo
        {
            public uint StructSize;
            public ulong RamTotalBytes;
            public ulong RamFreeBytes;
            [MarshalAs(UnmanagedType.U1)] public bool CudaAvailable;
            public fixed byte CudaReason[256];
            public uint DeviceCount;
            public DeviceInfo Device0, Device1, Device2, Device3, Device4, Device5, Device6, Device7,
                Device8, Device9, Device10, Device11, Device12, Device13, Device14, Device15;
            public uint Backend;
            public fixed byte BackendReason[256];
        }

        // library
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr lowvram_version();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr lowvram_status_name(uint status);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr lowvram_last_error_message();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_system_stats(ref SystemInfo info);
        // By pointer: Mono's marshaler copies the fields after the device array back wrong (backend, backend_reason).
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl, EntryPoint = "lowvram_system_stats")] public static extern unsafe Status lowvram_system_stats_ptr(SystemInfo* info);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_set_log_callback(IntPtr callback, IntPtr userData);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_string_free(IntPtr s);

        // context
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_params_init(ref ContextParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_new(ref ContextParams p, out ContextHandle ctx);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_context_free(IntPtr ctx);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_cancel(ContextHandle ctx);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_set_log_callback(ContextHandle ctx, IntPtr callback, IntPtr userData);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_set_log_callback_ex(ContextHandle ctx, IntPtr callback, IntPtr userData, IntPtr release);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_cancel_token_new(out CancelTokenHandle token);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_cancel_token_cancel(CancelTokenHandle token);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_cancel_token_is_cancelled(CancelTokenHandle token, [MarshalAs(UnmanagedType.U1)] out bool cancelled);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_cancel_token_free(IntPtr token);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_model_load_params_init(ref ModelLoadParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_model_load_ex(ContextHandle ctx, byte[] pathUtf8z, ref ModelLoadParams p, out ModelHandle model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_configure(ContextHandle ctx, byte[] yamlUtf8z);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_stats(ContextHandle ctx, ref CacheStats stats);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_stats_json(ContextHandle ctx, out IntPtr json);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_free_memory(ContextHandle ctx, ulong bytes, out ulong freed);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_unload_all(ContextHandle ctx, out ulong freed);

        // model
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_model_load(ContextHandle ctx, byte[] pathUtf8z, out ModelHandle model);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_model_get_info(ModelHandle model, ref ModelInfo info);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_model_load_to_device(ContextHandle ctx, ModelHandle model, ulong maxBytes, out ulong residentBytes);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_model_free(IntPtr model);

        // reservation
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_reservation_new(ContextHandle ctx, ulong bytes, out ReservationHandle reservation);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_reservation_bytes(ReservationHandle reservation, out ulong bytes);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_reservation_free(IntPtr reservation);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_reservation_params_init(ref ReservationParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_reservation_new_ex(ContextHandle ctx, ulong bytes, ref ReservationParams p, out ReservationHandle reservation);

        // pipeline and conditioning (optional tensors and the report are raw pointers: IntPtr.Zero = none)
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_pipeline_params_init(ref PipelineParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_prompt_params_init(ref PromptParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_pipeline_load(ContextHandle ctx, ref PipelineParams p, out PipelineHandle pipeline);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_pipeline_free(IntPtr pipeline);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_pipeline_encode_prompt(ContextHandle ctx, PipelineHandle pipeline, byte[] promptUtf8z, ref PromptParams p, out ConditioningHandle cond);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_pipeline_denoise(ContextHandle ctx, PipelineHandle pipeline, ConditioningHandle cond, ref DenoiseParams p, IntPtr initNoise, ref RunReport report, out TensorHandle latents);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_pipeline_decode(ContextHandle ctx, PipelineHandle pipeline, ref DecodeParams p, TensorHandle latents, ref RunReport report, out TensorHandle image);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_conditioning_new(out ConditioningHandle cond);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_conditioning_set(ConditioningHandle cond, byte[] nameUtf8z, TensorHandle tensor);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_conditioning_get(ConditioningHandle cond, byte[] nameUtf8z, out TensorHandle tensor);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_conditioning_free(IntPtr cond);

        // tensor
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_tensor_from_host(DType dtype, long[] shape, UIntPtr ndim, float[] data, UIntPtr dataLen, out TensorHandle tensor);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_tensor_from_host(DType dtype, long[] shape, UIntPtr ndim, ushort[] data, UIntPtr dataLen, out TensorHandle tensor);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_tensor_info(TensorHandle tensor, out DType dtype, [Out] long[] shape, UIntPtr shapeCap, out UIntPtr ndim, out UIntPtr byteLen);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_tensor_read(TensorHandle tensor, [Out] float[] buf, UIntPtr bufLen);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_tensor_read(TensorHandle tensor, [Out] ushort[] buf, UIntPtr bufLen);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_tensor_write_png(TensorHandle image, byte[] pathUtf8z);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_tensor_free(IntPtr tensor);

        // runs (optional tensors and the report are raw pointers: IntPtr.Zero = none)
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_denoise_params_init(ref DenoiseParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_decode_params_init(ref DecodeParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_denoise(ContextHandle ctx, ModelHandle unet, ref DenoiseParams p, TensorHandle cond, IntPtr uncond, IntPtr initNoise, ref RunReport report, out TensorHandle latents);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_vae_decode(ContextHandle ctx, ModelHandle vae, ref DecodeParams p, TensorHandle latents, ref RunReport report, out TensorHandle image);

        /// <summary>Read a NUL-terminated UTF-8 string owned by the library.</summary>
        public static string Utf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return null;
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }

        /// <summary>A NUL-terminated UTF-8 copy of `s` for a `const char *` argument (null stays null).</summary>
        public static byte[] Utf8z(string s)
        {
            if (s == null) return null;
            var bytes = new byte[Encoding.UTF8.GetByteCount(s) + 1];
            Encoding.UTF8.GetBytes(s, 0, s.Length, bytes, 0);
            return bytes;
        }

        /// <summary>Copy a string into unmanaged UTF-8 memory; free with Marshal.FreeHGlobal.</summary>
        public static IntPtr AllocUtf8(string s)
        {
            if (s == null) return IntPtr.Zero;
            var bytes = Encoding.UTF8.GetBytes(s);
            var p = Marshal.AllocHGlobal(bytes.Length + 1);
            Marshal.Copy(bytes, 0, p, bytes.Length);
            Marshal.WriteByte(p, bytes.Length, 0);
            return p;
        }

        /// <summary>Throw unless OK: the one place statuses become exceptions.</summary>
        public static void Check(Status status)
        {
            if (status != Status.Ok) throw new LowVramException(status, Utf8(lowvram_last_error_message()));
        }

        internal static UIntPtr SizeOf<T>() { return (UIntPtr)Marshal.SizeOf(typeof(T)); }
    }

    /// <summary>
    /// Keeps a SafeHandle alive while its raw pointer is used (optional arguments and struct fields, which
    /// P/Invoke cannot marshal as SafeHandles). A null handle gives IntPtr.Zero.
    /// </summary>
    internal struct Lease : IDisposable
    {
        private readonly SafeHandle _handle;
        private bool _added;
        public readonly IntPtr Ptr;

        public Lease(SafeHandle handle)
        {
            _handle = handle;
            _added = false;
            Ptr = IntPtr.Zero;
            if (handle != null)
            {
                handle.DangerousAddRef(ref _added);
                Ptr = handle.DangerousGetHandle();
            }
        }

        public void Dispose()
        {
            if (_added) _handle.DangerousRelease();
            _added = false;
        }
    }

    /// <summary>Host RAM and CUDA devices.</summary>
    public sealed class SystemStats
    {
        public ulong RamTotalBytes, RamFreeBytes;
        public bool CudaAvailable;
        public string CudaReason;
        public int DeviceCount;
        /// <summary>What runs this process's calls: 0 CPU, 1 CUDA, 2 a library (lowvram_backend).</summary>
        public uint Backend;
        /// <summary>Why that backend (the backend file and driver, or why the CPU).</summary>
        public string BackendReason;

        public static unsafe SystemStats Probe()
        {
            var info = new Native.SystemInfo { StructSize = (uint)Marshal.SizeOf(typeof(Native.SystemInfo)) };
            Native.Check(Native.lowvram_system_stats_ptr(&info));
            string reason;
            reason = Native.Utf8((IntPtr)info.CudaReason);
            return new SystemStats
            {
                RamTotalBytes = info.RamTotalBytes, RamFreeBytes = info.RamFreeBytes,
                CudaAvailable = info.CudaAvailable, CudaReason = reason, DeviceCount = (int)info.DeviceCount,
                Backend = info.Backend, BackendReason = Native.Utf8((IntPtr)info.BackendReason),
            };
        }
    }

    /// <summary>Owns a lowvram_context; ReleaseHandle never throws. The GCHandle of its log callback belongs to the
    /// library, which frees it (through a release callback) when it will never call the callback again.</summary>
    public sealed class ContextHandle : SafeHandle
    {
        public ContextHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }

        protected override bool ReleaseHandle()
        {
            Native.lowvram_context_free(handle);
            return true;
        }
    }

    /// <summary>Owns the host's reference to a lowvram_cancel_token (shared: calls hold their own).</summary>
    public sealed class CancelTokenHandle : SafeHandle
    {
        public CancelTokenHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_cancel_token_free(handle); return true; }
    }

    /// <summary>A cancel request for the calls it is given to (DenoiseOptions.Cancel, DecodeOptions.Cancel,
    /// Context.LoadModel): sticky, so cancelling before a call starts still stops it, and it never stops another
    /// call. Cancel() may be called from any thread.</summary>
    public sealed class CancelToken : IDisposable
    {
        public CancelTokenHandle Handle { get; }

        public CancelToken()
        {
            CancelTokenHandle h;
            var status = Native.lowvram_cancel_token_new(out h);
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            Handle = h;
        }

        public void Cancel() { Native.Check(Native.lowvram_cancel_token_cancel(Handle)); }

        public bool IsCancelled
        {
            get
            {
                bool c;
                Native.Check(Native.lowvram_cancel_token_is_cancelled(Handle, out c));
                return c;
            }
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>Owns a lowvram_model; ReleaseHandle never throws.</summary>
    public sealed class ModelHandle : SafeHandle
    {
        public ModelHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_model_free(handle); return true; }
    }

    /// <summary>Owns a lowvram_tensor; ReleaseHandle never throws.</summary>
    public sealed class TensorHandle : SafeHandle
    {
        public TensorHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_tensor_free(handle); return true; }
    }

    /// <summary>Owns a lowvram_reservation; ReleaseHandle gives the bytes back and never throws.</summary>
    public sealed class ReservationHandle : SafeHandle
    {
        public ReservationHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_reservation_free(handle); return true; }
    }

    /// <summary>Owns the host's reference to a lowvram_pipeline (shared: calls hold their own); never throws.</summary>
    public sealed class PipelineHandle : SafeHandle
    {
        public PipelineHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_pipeline_free(handle); return true; }
    }

    /// <summary>Owns a lowvram_conditioning; ReleaseHandle never throws.</summary>
    public sealed class ConditioningHandle : SafeHandle
    {
        public ConditioningHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_conditioning_free(handle); return true; }
    }

    /// <summary>Progress of a run: `step` of `total` done; return false to cancel (Denoise then throws Cancelled).</summary>
    public delegate bool ProgressHandler(uint step, uint total);

    /// <summary>Log callback; runs on the thread making the lowvram call.</summary>
    public delegate void LogHandler(LogLevel level, string message);

    /// <summary>Options of Context.Denoise; the defaults are the library's.</summary>
    public sealed class DenoiseOptions
    {
        public Scheduler Scheduler = Scheduler.Euler;
        public bool Karras = false;
        public uint Steps = 20;
        /// <summary>Classifier-free guidance; ≤ 1 runs the conditional batch only.</summary>
        public float Guidance = 7.5f;
        /// <summary>Seed of the initial noise when none is given, and of Euler ancestral's step noise.</summary>
        public ulong Seed = 0;
        /// <summary>Latent size (image size / 8) used when no initial noise is given.</summary>
        public uint LatentWidth = 64, LatentHeight = 64;
        /// <summary>[steps, B, 4, h, w] step noise for Euler ancestral; null = seeded.</summary>
        public Tensor StepNoise;
        /// <summary>Called after each step on the calling thread; null = none.</summary>
        public ProgressHandler Progress;
        /// <summary>Cancels this call only (also before it starts); null = none.</summary>
        public CancelToken Cancel;
    }

    /// <summary>Options of Context.VaeDecode; the defaults are the library's.</summary>
    public sealed class DecodeOptions
    {
        /// <summary>0 = automatic tiling; > 0 = always tile with this edge (latent pixels).</summary>
        public uint TileLatent = 0;
        public uint OverlapLatent = 0; // ignored: tiled decoding is exact
        /// <summary>Never tile (BudgetTooSmall when the whole decode cannot fit).</summary>
        public bool NeverTile = false;
        /// <summary>(blocks done, blocks) as each decoder block starts; return false to cancel; null = none.</summary>
        public ProgressHandler Progress;
        /// <summary>Cancels this call only (also before it starts); null = none.</summary>
        public CancelToken Cancel;
    }

    /// <summary>How long Context.Reserve waits (lowvram_reservation_params); the defaults are the library's.</summary>
    public sealed class ReservationOptions
    {
        /// <summary>Longest wait in milliseconds (0 = only if free now; Native.WaitForever = no bound); Timeout
        /// when it runs out.</summary>
        public ulong TimeoutMs = Native.WaitForever;
        /// <summary>Ends the wait with Cancelled (also before it starts); null = none.</summary>
        public CancelToken Cancel;
    }

    /// <summary>How Context.EncodePrompt encodes (lowvram_prompt_params); the defaults are the library's.</summary>
    public sealed class PromptOptions
    {
        /// <summary>What not to draw; null = none (SDXL: zeros).</summary>
        public string NegativePrompt;
        /// <summary>Images per prompt.</summary>
        public uint Batch = 1;
        /// <summary>Image size in pixels (SDXL's size conditioning).</summary>
        public uint Width = 512, Height = 512;
        /// <summary>Layers to skip from the end of the text encoder.</summary>
        public uint ClipSkip = 0;
    }

    /// <summary>A host tensor owned by the library: contiguous, row-major, immutable.</summary>
    public sealed class Tensor : IDisposable
    {
        public TensorHandle Handle { get; }

        private Tensor(TensorHandle handle) { Handle = handle; }

        internal static Tensor Own(TensorHandle handle) { return new Tensor(handle); }

        /// <summary>Copy F32 data of `shape` into a new tensor.</summary>
        public static Tensor FromHost(float[] data, params long[] shape)
        {
            if (data == null) throw new ArgumentNullException("data");
            TensorHandle h;
            var status = Native.lowvram_tensor_from_host(DType.F32, shape, (UIntPtr)(shape == null ? 0 : shape.Length),
                data, (UIntPtr)((long)data.Length * 4), out h);
            return Checked(status, h);
        }

        /// <summary>Copy 16-bit data (F16 or BF16 bits) of `shape` into a new tensor.</summary>
        public static Tensor FromHost(ushort[] data, DType dtype, params long[] shape)
        {
            if (data == null) throw new ArgumentNullException("data");
            if (dtype == DType.F32) throw new ArgumentException("ushort data is F16 or BF16", "dtype");
            TensorHandle h;
            var status = Native.lowvram_tensor_from_host(dtype, shape, (UIntPtr)(shape == null ? 0 : shape.Length),
                data, (UIntPtr)((long)data.Length * 2), out h);
            return Checked(status, h);
        }

        private static Tensor Checked(Status status, TensorHandle h)
        {
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            return new Tensor(h);
        }

        public DType DType { get { DType d; long[] s; ulong n; Describe(out d, out s, out n); return d; } }
        public long[] Shape { get { DType d; long[] s; ulong n; Describe(out d, out s, out n); return s; } }
        public ulong ByteLength { get { DType d; long[] s; ulong n; Describe(out d, out s, out n); return n; } }

        /// <summary>Dtype, shape and byte length in one call.</summary>
        public void Describe(out DType dtype, out long[] shape, out ulong byteLength)
        {
            var dims = new long[8]; // LOWVRAM_MAX_DIMS
            UIntPtr ndim, bytes;
            Native.Check(Native.lowvram_tensor_info(Handle, out dtype, dims, (UIntPtr)dims.Length, out ndim, out bytes));
            shape = new long[(int)ndim];
            Array.Copy(dims, shape, shape.Length);
            byteLength = (ulong)bytes;
        }

        /// <summary>Copy F32 data out (InvalidOperationException for a 16-bit tensor).</summary>
        public float[] ReadFloats()
        {
            DType d; long[] s; ulong n;
            Describe(out d, out s, out n);
            if (d != DType.F32) throw new InvalidOperationException("tensor is " + d + ": use ReadHalfs");
            var buf = new float[n / 4];
            Native.Check(Native.lowvram_tensor_read(Handle, buf, (UIntPtr)n));
            return buf;
        }

        /// <summary>Copy F16/BF16 bits out (InvalidOperationException for an F32 tensor).</summary>
        public ushort[] ReadHalfs()
        {
            DType d; long[] s; ulong n;
            Describe(out d, out s, out n);
            if (d == DType.F32) throw new InvalidOperationException("tensor is F32: use ReadFloats");
            var buf = new ushort[n / 2];
            Native.Check(Native.lowvram_tensor_read(Handle, buf, (UIntPtr)n));
            return buf;
        }

        /// <summary>Write a decoded image [B, 3, H, W] (values in [-1, 1]) as 8-bit RGB PNG.</summary>
        public void WritePng(string path)
        {
            Native.Check(Native.lowvram_tensor_write_png(Handle, Native.Utf8z(path)));
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>A loaded model component (UNet or VAE). May be disposed before or after its context.</summary>
    public sealed class Model : IDisposable
    {
        public ModelHandle Handle { get; }
        internal Model(ModelHandle handle) { Handle = handle; }

        /// <summary>Kind, sizes and residency now.</summary>
        public ModelInfo Info
        {
            get
            {
                var info = new ModelInfo { StructSize = (uint)Marshal.SizeOf(typeof(ModelInfo)) };
                Native.Check(Native.lowvram_model_get_info(Handle, ref info));
                return info;
            }
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>Device memory reserved for the host; Dispose gives it back. May outlive its context.</summary>
    public sealed class Reservation : IDisposable
    {
        public ReservationHandle Handle { get; }
        internal Reservation(ReservationHandle handle) { Handle = handle; }

        public ulong Bytes
        {
            get { ulong b; Native.Check(Native.lowvram_reservation_bytes(Handle, out b)); return b; }
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>A loaded pipeline (its family's tokenizers, text encoders, denoiser and VAE, each in the cache like
    /// any model). May be disposed before or after its context.</summary>
    public sealed class Pipeline : IDisposable
    {
        public PipelineHandle Handle { get; }
        internal Pipeline(PipelineHandle handle) { Handle = handle; }
        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>Named conditioning tensors ("sampling.cond_embeddings", "sampling.uncond_embeddings",
    /// "sampling.cond_pooled", ...): what Context.EncodePrompt returns, or built by the host. Reading is
    /// thread-safe; Set must not race other calls on the same conditioning.</summary>
    public sealed class Conditioning : IDisposable
    {
        public ConditioningHandle Handle { get; }
        internal Conditioning(ConditioningHandle handle) { Handle = handle; }

        /// <summary>An empty conditioning, for host-given tensors.</summary>
        public Conditioning()
        {
            ConditioningHandle h;
            var status = Native.lowvram_conditioning_new(out h);
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            Handle = h;
        }

        /// <summary>Set tensor `name` to a copy of `tensor` (the caller keeps `tensor`).</summary>
        public void Set(string name, Tensor tensor)
        {
            if (tensor == null) throw new ArgumentNullException("tensor");
            Native.Check(Native.lowvram_conditioning_set(Handle, Native.Utf8z(name), tensor.Handle));
        }

        /// <summary>A copy of tensor `name` (InvalidArgument when there is none).</summary>
        public Tensor Get(string name)
        {
            TensorHandle h;
            var status = Native.lowvram_conditioning_get(Handle, Native.Utf8z(name), out h);
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            return Tensor.Own(h);
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>A model cache with its budgets. Dispose it (or let the finalizer free it).</summary>
    public sealed class Context : IDisposable
    {
        // Static delegates for all contexts, kept alive for the process; the GCHandle in user_data finds the state
        // (Mono/IL2CPP cannot marshal instance delegates to native code safely).
        private static readonly Native.LogCallback LogThunk = OnLog;
        private static readonly Native.ProgressCallback ProgressThunk = OnProgress;
        private static readonly Native.ReleaseCallback ReleaseThunk = OnRelease;

        private sealed class LogState { public LogHandler Handler; }

        private sealed class ProgressState
        {
            public ProgressHandler Handler;
            public Exception Error;
        }

        public ContextHandle Handle { get; }

        public Context(string device = null, string configYaml = null, string configPath = null, LogHandler log = null)
        {
            var p = new Native.ContextParams();
            Native.Check(Native.lowvram_context_params_init(ref p, Native.SizeOf<Native.ContextParams>()));
            var dev = Native.AllocUtf8(device);
            var yaml = Native.AllocUtf8(configYaml);
            var path = Native.AllocUtf8(configPath);
            var state = log != null ? GCHandle.Alloc(new LogState { Handler = log }) : default(GCHandle);
            try
            {
                p.Device = dev; p.ConfigYaml = yaml; p.ConfigPath = path;
                if (log != null)
                {
                    // From here the library owns the GCHandle: it calls OnRelease exactly once, on every path.
                    p.LogCallback = Marshal.GetFunctionPointerForDelegate(LogThunk);
                    p.LogUserData = GCHandle.ToIntPtr(state);
                    p.LogUserDataRelease = Marshal.GetFunctionPointerForDelegate(ReleaseThunk);
                }
                ContextHandle h;
                var status = Native.lowvram_context_new(ref p, out h);
                if (status != Status.Ok)
                {
                    h.Dispose();
                    Native.Check(status);
                }
                Handle = h;
            }
            finally
            {
                Marshal.FreeHGlobal(dev); Marshal.FreeHGlobal(yaml); Marshal.FreeHGlobal(path);
            }
        }

        [MonoPInvokeCallback(typeof(Native.LogCallback))]
        private static void OnLog(LogLevel level, IntPtr message, IntPtr userData)
        {
            try
            {
                var state = (LogState)GCHandle.FromIntPtr(userData).Target;
                if (state != null && state.Handler != null) state.Handler(level, Native.Utf8(message));
            }
            catch (Exception)
            {
                // exceptions must not cross into native code
            }
        }

        [MonoPInvokeCallback(typeof(Native.ReleaseCallback))]
        private static void OnRelease(IntPtr userData)
        {
            try
            {
                GCHandle.FromIntPtr(userData).Free();
            }
            catch (Exception)
            {
                // exceptions must not cross into native code
            }
        }

        [MonoPInvokeCallback(typeof(Native.ProgressCallback))]
        private static bool OnProgress(uint step, uint total, IntPtr userData)
        {
            ProgressState state = null;
            try
            {
                state = (ProgressState)GCHandle.FromIntPtr(userData).Target;
                return state.Handler(step, total);
            }
            catch (Exception e)
            {
                if (state != null) state.Error = e; // rethrown by Denoise once the native call has returned
                return false;
            }
        }

        /// <summary>Replace this context's log callback (null: fall back to the process-wide one).</summary>
        /// The library frees the old callback's state once no message is being delivered to it (race-free).
        public void SetLogCallback(LogHandler log)
        {
            if (log == null)
            {
                Native.Check(Native.lowvram_context_set_log_callback_ex(Handle, IntPtr.Zero, IntPtr.Zero, IntPtr.Zero));
                return;
            }
            var state = GCHandle.Alloc(new LogState { Handler = log });
            // The library releases `state` on every path, failure included.
            Native.Check(Native.lowvram_context_set_log_callback_ex(Handle, Marshal.GetFunctionPointerForDelegate(LogThunk),
                GCHandle.ToIntPtr(state), Marshal.GetFunctionPointerForDelegate(ReleaseThunk)));
        }

        /// <summary>Apply YAML configuration (any subset of the keys) now; on error nothing changes.</summary>
        public void Configure(string yaml)
        {
            Native.Check(Native.lowvram_context_configure(Handle, Native.Utf8z(yaml)));
        }

        /// <summary>A snapshot of the cache's memory statistics.</summary>
        public CacheStats Stats()
        {
            var s = new CacheStats { StructSize = (uint)Marshal.SizeOf(typeof(CacheStats)) };
            Native.Check(Native.lowvram_context_stats(Handle, ref s));
            return s;
        }

        /// <summary>Everything the cache knows, as JSON (device, ram, models, plan, sizing).</summary>
        public string StatsJson()
        {
            IntPtr raw;
            Native.Check(Native.lowvram_context_stats_json(Handle, out raw));
            try { return Native.Utf8(raw); }
            finally { Native.lowvram_string_free(raw); }
        }

        /// <summary>Free at least `bytes` of device memory held by models not in use; returns bytes freed.</summary>
        public ulong FreeMemory(ulong bytes)
        {
            ulong freed;
            Native.Check(Native.lowvram_context_free_memory(Handle, bytes, out freed));
            return freed;
        }

        /// <summary>Unload every model not in use from the device and the RAM cache; returns bytes freed.</summary>
        public ulong UnloadAll()
        {
            ulong freed;
            Native.Check(Native.lowvram_context_unload_all(Handle, out freed));
            return freed;
        }

        /// <summary>Stop the call running on this context at its next step (from another thread or a callback).</summary>
        public void Cancel() { Native.Check(Native.lowvram_context_cancel(Handle)); }

        /// <summary>Load a component folder (".../unet" or ".../vae") into the cache.</summary>
        public Model LoadModel(string path)
        {
            ModelHandle h;
            var status = Native.lowvram_model_load(Handle, Native.Utf8z(path), out h);
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            return new Model(h);
        }

        /// <summary>LoadModel with progress (phases done, phases) and a cancel token; either may stop it
        /// (Cancelled).</summary>
        public Model LoadModel(string path, ProgressHandler progress, CancelToken cancel)
        {
            var p = new Native.ModelLoadParams();
            Native.Check(Native.lowvram_model_load_params_init(ref p, Native.SizeOf<Native.ModelLoadParams>()));
            var state = new ProgressState { Handler = progress };
            var gch = progress != null ? GCHandle.Alloc(state) : default(GCHandle);
            using (var t = new Lease(cancel == null ? null : cancel.Handle))
            {
                try
                {
                    p.CancelToken = t.Ptr;
                    if (gch.IsAllocated)
                    {
                        p.Progress = Marshal.GetFunctionPointerForDelegate(ProgressThunk);
                        p.ProgressUserData = GCHandle.ToIntPtr(gch);
                    }
                    ModelHandle h;
                    var status = Native.lowvram_model_load_ex(Handle, Native.Utf8z(path), ref p, out h);
                    if (state.Error != null)
                    {
                        h.Dispose();
                        ExceptionDispatchInfo.Capture(state.Error).Throw();
                    }
                    if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
                    return new Model(h);
                }
                finally
                {
                    if (gch.IsAllocated) gch.Free();
                }
            }
        }

        /// <summary>Place up to `maxBytes` of `model` on the device now; returns the bytes resident afterwards.</summary>
        public ulong LoadToDevice(Model model, ulong maxBytes)
        {
            ulong resident;
            Native.Check(Native.lowvram_model_load_to_device(Handle, model.Handle, maxBytes, out resident));
            return resident;
        }

        /// <summary>Reserve `bytes` of device memory for the host; returns once they are free.</summary>
        public Reservation Reserve(ulong bytes)
        {
            ReservationHandle h;
            var status = Native.lowvram_reservation_new(Handle, bytes, out h);
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            return new Reservation(h);
        }

        /// <summary>Reserve `bytes`, waiting at most `options.TimeoutMs` for running calls to release them (also
        /// for running calls to end when the bytes do not fit beside them). Throws Timeout, Cancelled or
        /// BudgetTooSmall (the message gives the bytes needed and available); nothing is held then.</summary>
        public Reservation Reserve(ulong bytes, ReservationOptions options)
        {
            options = options ?? new ReservationOptions();
            var p = new Native.ReservationParams();
            Native.Check(Native.lowvram_reservation_params_init(ref p, Native.SizeOf<Native.ReservationParams>()));
            p.TimeoutMs = options.TimeoutMs;
            using (var t = new Lease(options.Cancel == null ? null : options.Cancel.Handle))
            {
                p.CancelToken = t.Ptr;
                ReservationHandle h;
                var status = Native.lowvram_reservation_new_ex(Handle, bytes, ref p, out h);
                if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
                return new Reservation(h);
            }
        }

        /// <summary>Load a pipeline: a diffusers folder or a single-file checkpoint (`path`), with optional
        /// replacements for its VAE and text encoders. Components are memory-mapped; nothing is on the device yet.</summary>
        public Pipeline LoadPipeline(string path, string vaePath = null, string textEncoderPath = null,
            string textEncoder2Path = null)
        {
            if (path == null) throw new ArgumentNullException("path");
            var p = new Native.PipelineParams();
            Native.Check(Native.lowvram_pipeline_params_init(ref p, Native.SizeOf<Native.PipelineParams>()));
            var a = Native.AllocUtf8(path);
            var b = Native.AllocUtf8(vaePath);
            var c = Native.AllocUtf8(textEncoderPath);
            var d = Native.AllocUtf8(textEncoder2Path);
            try
            {
                p.Path = a; p.VaePath = b; p.TextEncoderPath = c; p.TextEncoder2Path = d;
                PipelineHandle h;
                var status = Native.lowvram_pipeline_load(Handle, ref p, out h);
                if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
                return new Pipeline(h);
            }
            finally
            {
                Marshal.FreeHGlobal(a); Marshal.FreeHGlobal(b); Marshal.FreeHGlobal(c); Marshal.FreeHGlobal(d);
            }
        }

        /// <summary>Encode `prompt` with the pipeline's text encoders into the conditioning its denoiser takes.</summary>
        public Conditioning EncodePrompt(Pipeline pipeline, string prompt, PromptOptions options = null)
        {
            if (pipeline == null) throw new ArgumentNullException("pipeline");
            if (prompt == null) throw new ArgumentNullException("prompt");
            options = options ?? new PromptOptions();
            var p = new Native.PromptParams();
            Native.Check(Native.lowvram_prompt_params_init(ref p, Native.SizeOf<Native.PromptParams>()));
            p.Batch = options.Batch;
            p.Width = options.Width;
            p.Height = options.Height;
            p.ClipSkip = options.ClipSkip;
            var neg = Native.AllocUtf8(options.NegativePrompt);
            try
            {
                p.NegativePrompt = neg;
                ConditioningHandle h;
                var status = Native.lowvram_pipeline_encode_prompt(Handle, pipeline.Handle, Native.Utf8z(prompt), ref p, out h);
                if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
                return new Conditioning(h);
            }
            finally
            {
                Marshal.FreeHGlobal(neg);
            }
        }

        /// <summary>Denoise with the pipeline's denoiser from `cond`; `initNoise` [B, C, h, w] or null (seeded, sized
        /// by `options`). Returns the final latents F32; errors and cancel as Denoise on a model.</summary>
        public Tensor Denoise(Pipeline pipeline, Conditioning cond, DenoiseOptions options, Tensor initNoise = null)
        {
            RunReport report;
            return Denoise(pipeline, cond, options, initNoise, out report);
        }

        /// <summary>As Denoise on a pipeline, also returning the run's measurements.</summary>
        public Tensor Denoise(Pipeline pipeline, Conditioning cond, DenoiseOptions options, Tensor initNoise,
            out RunReport report)
        {
            if (pipeline == null) throw new ArgumentNullException("pipeline");
            if (cond == null) throw new ArgumentNullException("cond");
            using (var n = new Lease(initNoise == null ? null : initNoise.Handle))
            {
                var noise = n.Ptr;
                return RunDenoise(options, out report, (ref Native.DenoiseParams p, ref RunReport r, out TensorHandle h) =>
                    Native.lowvram_pipeline_denoise(Handle, pipeline.Handle, cond.Handle, ref p, noise, ref r, out h));
            }
        }

        /// <summary>Decode latents with the pipeline's VAE into the image [B, 3, H, W] F32, ≈ [-1, 1].</summary>
        public Tensor Decode(Pipeline pipeline, Tensor latents, DecodeOptions options = null)
        {
            RunReport report;
            return Decode(pipeline, latents, options, out report);
        }

        /// <summary>As Decode, also returning the run's measurements.</summary>
        public Tensor Decode(Pipeline pipeline, Tensor latents, DecodeOptions options, out RunReport report)
        {
            if (pipeline == null) throw new ArgumentNullException("pipeline");
            if (latents == null) throw new ArgumentNullException("latents");
            return RunDecode(options, out report, (ref Native.DecodeParams p, ref RunReport r, out TensorHandle h) =>
                Native.lowvram_pipeline_decode(Handle, pipeline.Handle, ref p, latents.Handle, ref r, out h));
        }

        /// <summary>Run the sampler (see lowvram_denoise): `cond` [B, S, D]; `uncond` null = zeros; `initNoise`
        /// null = seeded. Returns the final latents [B, 4, h, w] F32.</summary>
        public Tensor Denoise(Model unet, DenoiseOptions options, Tensor cond, Tensor uncond = null, Tensor initNoise = null)
        {
            RunReport report;
            return Denoise(unet, options, cond, uncond, initNoise, out report);
        }

        /// <summary>As Denoise, also returning the run's measurements.</summary>
        public Tensor Denoise(Model unet, DenoiseOptions options, Tensor cond, Tensor uncond, Tensor initNoise,
            out RunReport report)
        {
            if (unet == null) throw new ArgumentNullException("unet");
            if (cond == null) throw new ArgumentNullException("cond");
            using (var u = new Lease(uncond == null ? null : uncond.Handle))
            using (var n = new Lease(initNoise == null ? null : initNoise.Handle))
            {
                IntPtr un = u.Ptr, noise = n.Ptr;
                return RunDenoise(options, out report, (ref Native.DenoiseParams p, ref RunReport r, out TensorHandle h) =>
                    Native.lowvram_denoise(Handle, unet.Handle, ref p, cond.Handle, un, noise, ref r, out h));
            }
        }

        private delegate Status DenoiseCall(ref Native.DenoiseParams p, ref RunReport report, out TensorHandle h);
        private delegate Status DecodeCall(ref Native.DecodeParams p, ref RunReport report, out TensorHandle h);

        /// <summary>The params of `options` (progress through a GCHandle, the token leased), the native call, the
        /// callback's exception first, then the status.</summary>
        private static Tensor RunDenoise(DenoiseOptions options, out RunReport report, DenoiseCall call)
        {
            options = options ?? new DenoiseOptions();
            var p = new Native.DenoiseParams();
            Native.Check(Native.lowvram_denoise_params_init(ref p, Native.SizeOf<Native.DenoiseParams>()));
            p.Scheduler = options.Scheduler;
            p.Karras = options.Karras;
            p.Steps = options.Steps;
            p.Guidance = options.Guidance;
            p.Seed = options.Seed;
            p.LatentWidth = options.LatentWidth;
            p.LatentHeight = options.LatentHeight;
            var state = new ProgressState { Handler = options.Progress };
            var gch = options.Progress != null ? GCHandle.Alloc(state) : default(GCHandle);
            report = new RunReport { StructSize = (uint)Marshal.SizeOf(typeof(RunReport)) };
            using (var s = new Lease(options.StepNoise == null ? null : options.StepNoise.Handle))
            using (var t = new Lease(options.Cancel == null ? null : options.Cancel.Handle))
            {
                try
                {
                    p.StepNoise = s.Ptr;
                    p.CancelToken = t.Ptr;
                    if (gch.IsAllocated)
                    {
                        p.Progress = Marshal.GetFunctionPointerForDelegate(ProgressThunk);
                        p.ProgressUserData = GCHandle.ToIntPtr(gch);
                    }
                    TensorHandle h;
                    var status = call(ref p, ref report, out h);
                    return Finish(status, h, state);
                }
                finally
                {
                    if (gch.IsAllocated) gch.Free();
                }
            }
        }

        private static Tensor RunDecode(DecodeOptions options, out RunReport report, DecodeCall call)
        {
            options = options ?? new DecodeOptions();
            var p = new Native.DecodeParams();
            Native.Check(Native.lowvram_decode_params_init(ref p, Native.SizeOf<Native.DecodeParams>()));
            p.TileLatent = options.TileLatent;
            p.OverlapLatent = options.OverlapLatent;
            p.NeverTile = options.NeverTile;
            report = new RunReport { StructSize = (uint)Marshal.SizeOf(typeof(RunReport)) };
            var state = new ProgressState { Handler = options.Progress };
            var gch = options.Progress != null ? GCHandle.Alloc(state) : default(GCHandle);
            using (var t = new Lease(options.Cancel == null ? null : options.Cancel.Handle))
            {
                try
                {
                    p.CancelToken = t.Ptr;
                    if (gch.IsAllocated)
                    {
                        p.Progress = Marshal.GetFunctionPointerForDelegate(ProgressThunk);
                        p.ProgressUserData = GCHandle.ToIntPtr(gch);
                    }
                    TensorHandle h;
                    var status = call(ref p, ref report, out h);
                    return Finish(status, h, state);
                }
                finally
                {
                    if (gch.IsAllocated) gch.Free();
                }
            }
        }

        private static Tensor Finish(Status status, TensorHandle h, ProgressState state)
        {
            if (state.Error != null)
            {
                h.Dispose();
                ExceptionDispatchInfo.Capture(state.Error).Throw();
            }
            if (status != Status.Ok) { h.Dispose(); Native.Check(status); }
            return Tensor.Own(h);
        }

        /// <summary>Decode latents (as Denoise returns them) into the image [B, 3, 8h, 8w] F32, ≈ [-1, 1].</summary>
        public Tensor VaeDecode(Model vae, Tensor latents, DecodeOptions options = null)
        {
            RunReport report;
            return VaeDecode(vae, latents, options, out report);
        }

        /// <summary>As VaeDecode, also returning the run's measurements.</summary>
        public Tensor VaeDecode(Model vae, Tensor latents, DecodeOptions options, out RunReport report)
        {
            if (vae == null) throw new ArgumentNullException("vae");
            if (latents == null) throw new ArgumentNullException("latents");
            return RunDecode(options, out report, (ref Native.DecodeParams p, ref RunReport r, out TensorHandle h) =>
                Native.lowvram_vae_decode(Handle, vae.Handle, ref p, latents.Handle, ref r, out h));
        }

        public void Dispose() { Handle.Dispose(); }
    }

    /// <summary>Library-wide functions.</summary>
    public static class Library
    {
        public static string Version { get { return Native.Utf8(Native.lowvram_version()); } }
        public static string StatusName(Status s) { return Native.Utf8(Native.lowvram_status_name((uint)s)); }

        // The process-wide log handler: swapped atomically, read by the static thunk (no user_data to dangle).
        private static LogHandler _globalLog;
        private static readonly Native.LogCallback GlobalLogThunk = OnGlobalLog;

        [MonoPInvokeCallback(typeof(Native.LogCallback))]
        private static void OnGlobalLog(LogLevel level, IntPtr message, IntPtr userData)
        {
            try
            {
                var h = Volatile.Read(ref _globalLog);
                if (h != null) h(level, Native.Utf8(message));
            }
            catch (Exception)
            {
                // exceptions must not cross into native code
            }
        }

        /// <summary>Set the process-wide log callback (contexts without their own); null removes it.</summary>
        public static void SetLogCallback(LogHandler log)
        {
            Volatile.Write(ref _globalLog, log);
            Native.Check(Native.lowvram_set_log_callback(
                log != null ? Marshal.GetFunctionPointerForDelegate(GlobalLogThunk) : IntPtr.Zero, IntPtr.Zero));
        }
    }
}
