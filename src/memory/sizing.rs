//! Cache sizes when the config leaves them unset (DECISIONS.md "max_cache_ram_gb" / "max_cache_vram_gb"), with
//! log lines saying which rule applied.

use serde::Serialize;

use crate::config::{Config, GIB};
use crate::device::DeviceAllocator;

/// The cache sizes in force and how they were chosen.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Sizing {
    /// RAM cache limit in bytes.
    pub ram_limit_bytes: u64,
    /// Device cache cap in bytes when `max_cache_vram_gb` is set; None = dynamic (re-read at each lock).
    pub vram_cap_bytes: Option<u64>,
    /// Working memory per operation (`device_working_mem_gb`), bytes.
    pub working_mem_bytes: u64,
    /// The cap on pinned host bytes; None = no pinning (`pin_memory: false`, or the CPU device).
    pub pinned_cap_bytes: Option<u64>,
    /// One line per decision, for the log callback.
    pub log: Vec<String>,
}

/// Total host RAM in bytes (Linux /proc/meminfo; 16 GiB where it cannot be read).
pub fn host_ram_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(16 * GIB)
}

/// The default cap on pinned host memory as a fraction of RAM: ComfyUI's (`comfy/model_management.py`: 95% of RAM,
/// 45% on Windows, where the driver is said to refuse more than about half).
pub const PINNED_RAM_FRACTION: f64 = if cfg!(windows) { 0.45 } else { 0.95 };

fn gib(b: u64) -> String {
    format!("{:.2} GiB", b as f64 / GIB as f64)
}

/// Decide the cache sizes for `config` on the device of `alloc`.
pub fn compute(config: &Config, alloc: &DeviceAllocator) -> Sizing {
    let mut log = Vec::new();
    let working = config.working_mem_bytes();
    let ram_limit = match config.max_cache_ram_bytes() {
        Some(b) => {
            log.push(format!("RAM cache: {} (max_cache_ram_gb)", gib(b)));
            b
        }
        None => {
            let ram = host_ram_bytes();
            let half = (ram / 2).saturating_sub(2 * GIB);
            let (cap, why) = match (alloc.is_cuda(), alloc.capacity()) {
                (true, Some(vram)) => (
                    vram.saturating_sub(working),
                    format!("VRAM {} − working memory {}", gib(vram), gib(working)),
                ),
                _ => (32 * GIB, "32 GiB (no CUDA device)".to_string()),
            };
            let mut size = half.min(cap);
            let mut line = format!(
                "RAM cache: {} = min(50% of RAM {} − 2 GiB = {}, cap {} = {})",
                gib(size),
                gib(ram),
                gib(half),
                gib(cap),
                why
            );
            if size < 4 * GIB {
                size = 4 * GIB;
                line.push_str(", raised to the 4 GiB minimum");
            }
            log.push(line);
            size
        }
    };
    let vram_cap = config.max_cache_vram_bytes();
    match (vram_cap, alloc.mem_info()) {
        (Some(b), _) => log.push(format!(
            "device cache: {} (max_cache_vram_gb; takes precedence over working memory {})",
            gib(b),
            gib(working)
        )),
        (None, Some((free, _))) => log.push(format!(
            "device cache: dynamic = free {} − working memory {} − reserve {} = {} now (re-read at each lock)",
            gib(free),
            gib(working),
            gib(config.reserve_vram_bytes()),
            gib(free.saturating_sub(working).saturating_sub(config.reserve_vram_bytes()))
        )),
        (None, None) => log.push("device cache: unbounded (CPU device)".to_string()),
    }
    log.push(format!(
        "working memory: {} per operation (device_working_mem_gb)",
        gib(working)
    ));
    let pinned_cap = if !alloc.pins().transfers() {
        log.push("pinned memory: none (CPU device: nothing is copied to a device)".to_string());
        None
    } else if !config.pin_memory {
        log.push("pinned memory: none (pin_memory: false); blocks cross from pageable memory".to_string());
        None
    } else if let Some(b) = config.max_pinned_memory_bytes() {
        log.push(format!("pinned memory: cap {} (max_pinned_memory_gb)", gib(b)));
        Some(b)
    } else {
        let ram = host_ram_bytes();
        let cap = (ram as f64 * PINNED_RAM_FRACTION) as u64;
        log.push(format!(
            "pinned memory: cap {} = {:.0}% of RAM {} (ComfyUI's default; max_pinned_memory_gb)",
            gib(cap),
            PINNED_RAM_FRACTION * 100.0,
            gib(ram)
        ));
        Some(cap)
    };
    Sizing {
        ram_limit_bytes: ram_limit,
        vram_cap_bytes: vram_cap,
        working_mem_bytes: working,
        pinned_cap_bytes: pinned_cap,
        log,
    }
}
