// lowvram C# binding: SafeHandle per handle, DllImport (Cdecl), Mono/Unity-safe callbacks.
// No LibraryImport or source generators, so Unity (Mono, IL2CPP) can use it.
using System;
using System.Runtime.InteropServices;
using System.Text;

namespace LowVram
{
    /// <summary>Stable status numbers of the C API (lowvram_status).</summary>
    public enum Status : uint
    {
        Ok = 0, NullArgument = 1, InvalidArgument = 2, Io = 3, Format = 4, OutOfDeviceMemory = 5,
        OutOfHostMemory = 6, BudgetTooSmall = 7, Cancelled = 8, Unsupported = 9, Panic = 10, BufferSize = 11,
        Internal = 12,
    }

    /// <summary>Log severity (lowvram_log_level).</summary>
    public enum LogLevel : uint { Error = 1, Warn = 2, Info = 3, Debug = 4 }

    /// <summary>A failed lowvram call: its status and the library's message.</summary>
    public sealed class LowVramException : Exception
    {
        public Status Status { get; }
        public LowVramException(Status status, string message) : base(status + ": " + message) { Status = status; }
    }

    /// <summary>Marks a static method as called from native code (IL2CPP needs it for AOT; Mono ignores it).</summary>
    [AttributeUsage(AttributeTargets.Method)]
    public sealed class MonoPInvokeCallbackAttribute : Attribute
    {
        public MonoPInvokeCallbackAttribute(Type delegateType) { DelegateType = delegateType; }
        public Type DelegateType { get; }
    }

    /// <summary>Raw P/Invoke declarations; prefer the wrapper classes.</summary>
    public static class Native
    {
#if UNITY_IOS && !UNITY_EDITOR
        public const string Lib = "__Internal";
#else
        public const string Lib = "lowvram";
#endif

        [UnmanagedFunctionPointer(CallingConvention.Cdecl)]
        public delegate void LogCallback(LogLevel level, IntPtr message, IntPtr userData);

        [StructLayout(LayoutKind.Sequential)]
        public struct ContextParams
        {
            public uint StructSize;
            public IntPtr Device;
            public IntPtr ConfigYaml;
            public IntPtr ConfigPath;
            public IntPtr LogCallback;
            public IntPtr LogUserData;
        }

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
        }

        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr lowvram_version();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr lowvram_status_name(uint status);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern IntPtr lowvram_last_error_message();
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_system_stats(ref SystemInfo info);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_set_log_callback(IntPtr callback, IntPtr userData);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_params_init(ref ContextParams p, UIntPtr structSize);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_new(ref ContextParams p, out IntPtr ctx);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern void lowvram_context_free(IntPtr ctx);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_cancel(IntPtr ctx);
        [DllImport(Lib, CallingConvention = CallingConvention.Cdecl)] public static extern Status lowvram_context_set_log_callback(IntPtr ctx, IntPtr callback, IntPtr userData);

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
    }

    /// <summary>Host RAM and CUDA devices.</summary>
    public sealed class SystemStats
    {
        public ulong RamTotalBytes, RamFreeBytes;
        public bool CudaAvailable;
        public string CudaReason;
        public int DeviceCount;

        public static unsafe SystemStats Probe()
        {
            var info = new Native.SystemInfo { StructSize = (uint)Marshal.SizeOf(typeof(Native.SystemInfo)) };
            Native.Check(Native.lowvram_system_stats(ref info));
            string reason;
            reason = Native.Utf8((IntPtr)info.CudaReason);
            return new SystemStats
            {
                RamTotalBytes = info.RamTotalBytes, RamFreeBytes = info.RamFreeBytes,
                CudaAvailable = info.CudaAvailable, CudaReason = reason, DeviceCount = (int)info.DeviceCount,
            };
        }
    }

    /// <summary>Owns a lowvram_context; ReleaseHandle frees it and never throws.</summary>
    public sealed class ContextHandle : SafeHandle
    {
        public ContextHandle() : base(IntPtr.Zero, true) { }
        public override bool IsInvalid { get { return handle == IntPtr.Zero; } }
        protected override bool ReleaseHandle() { Native.lowvram_context_free(handle); return true; }
        internal void Set(IntPtr raw) { SetHandle(raw); }
    }

    /// <summary>A model cache with its budgets. Dispose it (or let the finalizer free it).</summary>
    public sealed class Context : IDisposable
    {
        public delegate void LogHandler(LogLevel level, string message);

        // One static delegate for all contexts, kept alive for the process; the GCHandle in user_data finds the
        // context's handler (Mono/IL2CPP cannot marshal instance delegates to native code safely).
        private static readonly Native.LogCallback LogThunk = OnLog;
        private GCHandle _self;
        private readonly LogHandler _log;
        public ContextHandle Handle { get; } = new ContextHandle();

        public Context(string device = null, string configYaml = null, string configPath = null, LogHandler log = null)
        {
            _log = log;
            var p = new Native.ContextParams();
            Native.Check(Native.lowvram_context_params_init(ref p, (UIntPtr)Marshal.SizeOf(typeof(Native.ContextParams))));
            var dev = Native.AllocUtf8(device);
            var yaml = Native.AllocUtf8(configYaml);
            var path = Native.AllocUtf8(configPath);
            try
            {
                p.Device = dev; p.ConfigYaml = yaml; p.ConfigPath = path;
                if (log != null)
                {
                    _self = GCHandle.Alloc(this);
                    p.LogCallback = Marshal.GetFunctionPointerForDelegate(LogThunk);
                    p.LogUserData = GCHandle.ToIntPtr(_self);
                }
                IntPtr raw;
                var status = Native.lowvram_context_new(ref p, out raw);
                if (status != Status.Ok && _self.IsAllocated) _self.Free();
                Native.Check(status);
                Handle.Set(raw);
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
                var ctx = (Context)GCHandle.FromIntPtr(userData).Target;
                if (ctx != null && ctx._log != null) ctx._log(level, Native.Utf8(message));
            }
            catch (Exception)
            {
                // exceptions must not cross into native code
            }
        }

        /// <summary>Stop the call running on this context at its next step (from another thread).</summary>
        public void Cancel() { Native.Check(Native.lowvram_context_cancel(Handle.DangerousGetHandle())); }

        public void Dispose()
        {
            Handle.Dispose();
            if (_self.IsAllocated) _self.Free();
        }
    }

    /// <summary>Library-wide functions.</summary>
    public static class Library
    {
        public static string Version { get { return Native.Utf8(Native.lowvram_version()); } }
        public static string StatusName(Status s) { return Native.Utf8(Native.lowvram_status_name((uint)s)); }
    }
}
