// The C# binding as a Mono/Unity host uses it: handles, errors as exceptions, the log callback.
using System;
using System.Collections.Generic;
using LowVram;

public static class TestApi
{
    static int failures = 0;

    static void Check(bool cond, string what)
    {
        if (!cond) { Console.Error.WriteLine("CHECK failed: " + what); failures++; }
    }

    public static int Main()
    {
        Check(Library.Version.Split('.').Length == 3, "version has three parts: " + Library.Version);
        Check(Library.StatusName(Status.BudgetTooSmall) == "BUDGET_TOO_SMALL", "status name");

        var stats = SystemStats.Probe();
        Check(stats.RamTotalBytes > 0, "RAM total");
        Check(stats.CudaAvailable ? stats.DeviceCount > 0 : !string.IsNullOrEmpty(stats.CudaReason), "CUDA reason");

        var messages = new List<string>();
        using (var ctx = new Context(device: "cpu", log: (level, m) => messages.Add(level + " " + m)))
        {
            ctx.Cancel();
        }
        Check(messages.Count > 0, "log callback fired");

        try
        {
            Native.Check(Native.lowvram_context_cancel(IntPtr.Zero));
            Check(false, "NULL context must throw");
        }
        catch (LowVramException e)
        {
            Check(e.Status == Status.NullArgument, "status NullArgument");
            Check(e.Message.Contains("ctx must not be NULL"), "message: " + e.Message);
        }

        if (failures > 0) { Console.Error.WriteLine("TestApi: " + failures + " check(s) failed"); return 1; }
        Console.WriteLine("TestApi: all checks passed");
        return 0;
    }
}
