//! Configuration: the memory keys of InvokeAI's low-VRAM mode, ComfyUI's VRAM states and Forge's aliases, read from
//! YAML at context creation and settable one by one (or as a partial YAML document) on a live context.
//!
//! Every key is listed in [`KEYS`]. Unknown keys and bad values give [`Error::InvalidArgument`] with a message that
//! names the key and the accepted values. `*_gb` keys are GiB (2^30 bytes); SIZE strings ([`parse_size`]) accept
//! plain bytes, KB/MB/GB (10^n) and KiB/MiB/GiB (2^n).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use crate::device::DeviceSpec;
use crate::error::{Error, Result};

/// One GiB, the unit of every `*_gb` key.
pub const GIB: u64 = 1 << 30;

/// The largest value a `*_gb` key takes: 2^20 GiB (1 PiB), far above any device or RAM, and small enough that sums
/// of every budget stay far below `u64::MAX` bytes.
pub(crate) const MAX_GB: f64 = (1u64 << 20) as f64;

/// Every key [`Config::set`] and the YAML readers accept, with what each takes (used in error messages too).
pub const KEYS: &[(&str, &str)] = &[
    ("enable_partial_loading", "true|false"),
    (
        "max_cache_ram_gb",
        "a number of GiB >= 0 and <= 1048576, or auto|null",
    ),
    (
        "max_cache_vram_gb",
        "a number of GiB >= 0 and <= 1048576, or auto|null",
    ),
    (
        "device_working_mem_gb",
        "a number of GiB >= 0 and <= 1048576",
    ),
    ("keep_ram_copy_of_weights", "true|false"),
    ("cuda_allocator", "pool|pool_keep"),
    ("pytorch_cuda_alloc_conf", "backend:cudaMallocAsync"),
    ("vram_state", "auto|high|normal|low|none|cpu"),
    ("reserve_vram_gb", "a number of GiB >= 0 and <= 1048576"),
    ("smart_memory", "true|false"),
    ("pin_memory", "true|false"),
    (
        "max_pinned_memory_gb",
        "a number of GiB >= 0 and <= 1048576, or auto|null",
    ),
    ("forge_pin_shared_memory", "Shared|CPU"),
    ("async_loading", "true|false"),
    ("forge_async_loading", "Async|Queue"),
    (
        "forge_inference_memory",
        "a number of MiB >= 0 and <= 1073741824",
    ),
    ("storage_dtype", "auto|fp32|fp16|bf16"),
    ("compute_dtype", "auto|fp32|fp16|bf16"),
    ("device", "auto|cpu|cuda|cuda:N|emulated:SIZE"),
];

/// ComfyUI's VRAM states (see DECISIONS.md "vram_state").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VramState {
    /// Partial loading as budgets require; unlocked models are evicted block by block, least recently used first.
    Auto,
    /// Keep whole models resident: evict whole other models rather than split one (split only as a last resort,
    /// and only with partial loading enabled).
    High,
    /// Whole models, loaded per use and unloaded from the device after each use; split only if
    /// `enable_partial_loading`.
    Normal,
    /// Always split to the budget (partial loading even when `enable_partial_loading` is false).
    Low,
    /// No resident weights beyond the block in use: stream everything.
    None,
    /// Same as `device: cpu` (an explicit `device` key wins).
    Cpu,
}

/// What the CUDA pool does with freed memory (DECISIONS.md "CUDA allocator").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaAllocator {
    /// Return freed memory to the driver at each synchronise.
    Pool,
    /// Keep freed memory in the pool (faster); kept bytes still count against the budget.
    PoolKeep,
}

/// A dtype choice for `storage_dtype` / `compute_dtype`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DtypeChoice {
    /// Storage: keep the file's dtype. Compute: fp16 on CUDA, fp32 on CPU.
    Auto,
    Fp32,
    Fp16,
    Bf16,
}

impl DtypeChoice {
    /// The candle dtype, or None for `auto`.
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            DtypeChoice::Auto => None,
            DtypeChoice::Fp32 => Some(candle_core::DType::F32),
            DtypeChoice::Fp16 => Some(candle_core::DType::F16),
            DtypeChoice::Bf16 => Some(candle_core::DType::BF16),
        }
    }
}

/// The memory configuration of one context. Build it with [`Config::default`], [`Config::from_yaml_str`],
/// [`Config::apply_yaml`] or [`Config::set`]; every field is documented with its key.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Config {
    /// `enable_partial_loading` (default true): a model that does not fit is split (some blocks resident, the rest
    /// streamed). False: a model must fit whole or the lock fails with `BudgetTooSmall`.
    pub enable_partial_loading: bool,
    /// `max_cache_ram_gb` in GiB; None = dynamic (DECISIONS.md rules, logged at creation).
    pub max_cache_ram_gb: Option<f64>,
    /// `max_cache_vram_gb` in GiB; None = dynamic (`free VRAM − working memory − reserve`, re-read at each lock).
    /// When set it caps the device cache and takes precedence over working memory (the seed's warning); an
    /// allocation the device then refuses goes through evict-and-retry.
    pub max_cache_vram_gb: Option<f64>,
    /// `device_working_mem_gb` (default 3; Forge's `forge_inference_memory` in MiB is an alias).
    pub device_working_mem_gb: f64,
    /// `keep_ram_copy_of_weights` (default true).
    pub keep_ram_copy_of_weights: bool,
    /// `cuda_allocator` (default pool; `pytorch_cuda_alloc_conf: "backend:cudaMallocAsync"` = pool).
    pub cuda_allocator: CudaAllocator,
    /// `vram_state` (default auto).
    pub vram_state: VramState,
    /// `reserve_vram_gb` (default 0): device memory left for other applications.
    pub reserve_vram_gb: f64,
    /// `smart_memory` (default true); false = unload a model's device weights after every run.
    pub smart_memory: bool,
    /// `pin_memory` (default true; Forge's `forge_pin_shared_memory: Shared|CPU`): false = nothing is pinned.
    pub pin_memory: bool,
    /// `max_pinned_memory_gb` in GiB: the cap on page-locked host bytes (RAM copies and staging slots); None =
    /// ComfyUI's default, a fraction of RAM (logged at creation). A model whose RAM copy would pass it keeps an
    /// unpinned copy.
    pub max_pinned_memory_gb: Option<f64>,
    /// `async_loading` (default true; Forge's `forge_async_loading: Async|Queue`).
    pub async_loading: bool,
    /// `storage_dtype` (default auto = the file's dtype).
    pub storage_dtype: DtypeChoice,
    /// `compute_dtype` (default auto = fp16 on CUDA, fp32 on CPU).
    pub compute_dtype: DtypeChoice,
    /// `device` (default auto).
    pub device: DeviceSpec,
    /// Whether `device` was set explicitly (an explicit device wins over `vram_state: cpu`).
    #[serde(skip)]
    pub device_explicit: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enable_partial_loading: true,
            max_cache_ram_gb: None,
            max_cache_vram_gb: None,
            device_working_mem_gb: 3.0,
            keep_ram_copy_of_weights: true,
            cuda_allocator: CudaAllocator::Pool,
            vram_state: VramState::Auto,
            reserve_vram_gb: 0.0,
            smart_memory: true,
            pin_memory: true,
            max_pinned_memory_gb: None,
            async_loading: true,
            storage_dtype: DtypeChoice::Auto,
            compute_dtype: DtypeChoice::Auto,
            device: DeviceSpec::Auto,
            device_explicit: false,
        }
    }
}

/// One YAML scalar, kept as text so YAML and [`Config::set`] share one parser.
struct Scalar(Option<String>);

impl<'de> serde::Deserialize<'de> for Scalar {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a scalar (bool, number, string or null)")
            }
            fn visit_bool<E>(self, v: bool) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_i64<E>(self, v: i64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_u64<E>(self, v: u64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_f64<E>(self, v: f64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_str<E>(self, v: &str) -> std::result::Result<Scalar, E> {
                Ok(Scalar(Some(v.to_string())))
            }
            fn visit_unit<E>(self) -> std::result::Result<Scalar, E> {
                Ok(Scalar(None))
            }
            fn visit_none<E>(self) -> std::result::Result<Scalar, E> {
                Ok(Scalar(None))
            }
        }
        d.deserialize_any(V)
    }
}

fn bad(key: &str, value: &str) -> Error {
    let accepted = KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, a)| *a)
        .unwrap_or("?");
    Error::invalid(format!(
        "config key `{key}`: invalid value `{value}`; accepted: {accepted}"
    ))
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(bad(key, v)),
    }
}

/// A number from 0 to `max` (finite): `*_gb` keys take up to [`MAX_GB`].
fn parse_bounded(key: &str, v: &str, max: f64) -> Result<f64> {
    match v.trim().parse::<f64>() {
        Ok(x) if x.is_finite() && (0.0..=max).contains(&x) => Ok(x),
        _ => Err(bad(key, v)),
    }
}

fn parse_gb(key: &str, v: &str) -> Result<f64> {
    parse_bounded(key, v, MAX_GB)
}

fn parse_opt_gb(key: &str, v: Option<&str>) -> Result<Option<f64>> {
    match v.map(str::trim) {
        None | Some("auto") | Some("null") | Some("~") | Some("") => Ok(None),
        Some(s) => parse_gb(key, s).map(Some),
    }
}

fn parse_dtype(key: &str, v: &str) -> Result<DtypeChoice> {
    match v.trim().to_ascii_lowercase().as_str() {
        "auto" => Ok(DtypeChoice::Auto),
        "fp32" | "f32" | "float32" => Ok(DtypeChoice::Fp32),
        "fp16" | "f16" | "float16" => Ok(DtypeChoice::Fp16),
        "bf16" | "bfloat16" => Ok(DtypeChoice::Bf16),
        _ => Err(bad(key, v)),
    }
}

impl Config {
    /// Parse a whole YAML document (a mapping of the keys in [`KEYS`]) over the defaults.
    pub fn from_yaml_str(yaml: &str) -> Result<Self> {
        let mut c = Config::default();
        c.apply_yaml(yaml)?;
        Ok(c)
    }

    /// Apply a partial YAML document: only the keys it names change. All-or-nothing: on error `self` is unchanged.
    pub fn apply_yaml(&mut self, yaml: &str) -> Result<()> {
        if yaml.trim().is_empty() {
            return Ok(());
        }
        let map: Option<BTreeMap<String, Scalar>> = serde_saphyr::from_str(yaml).map_err(|e| {
            Error::invalid(format!(
                "config YAML: {e}; expected a mapping of keys to scalars"
            ))
        })?;
        let mut next = self.clone();
        for (k, v) in map.unwrap_or_default() {
            next.set_opt(&k, v.0.as_deref())?;
        }
        *self = next;
        Ok(())
    }

    /// Set one key from its text value (the same parser as YAML). `null`/`auto` clear the optional sizes.
    pub fn set(&mut self, key: &str, value: &str) -> Result<()> {
        self.set_opt(key, Some(value))
    }

    fn set_opt(&mut self, key: &str, value: Option<&str>) -> Result<()> {
        let v = value.unwrap_or("null");
        let opt_ok = matches!(key, "max_cache_ram_gb" | "max_cache_vram_gb" | "max_pinned_memory_gb");
        if value.is_none() && !opt_ok && KEYS.iter().any(|(k, _)| *k == key) {
            return Err(bad(key, "null"));
        }
        match key {
            "enable_partial_loading" => self.enable_partial_loading = parse_bool(key, v)?,
            "max_cache_ram_gb" => self.max_cache_ram_gb = parse_opt_gb(key, value)?,
            "max_cache_vram_gb" => self.max_cache_vram_gb = parse_opt_gb(key, value)?,
            "device_working_mem_gb" => self.device_working_mem_gb = parse_gb(key, v)?,
            "forge_inference_memory" => {
                self.device_working_mem_gb = parse_bounded(key, v, MAX_GB * 1024.0)? / 1024.0
            }
            "keep_ram_copy_of_weights" => self.keep_ram_copy_of_weights = parse_bool(key, v)?,
            "cuda_allocator" => {
                self.cuda_allocator = match v.trim() {
                    "pool" => CudaAllocator::Pool,
                    "pool_keep" => CudaAllocator::PoolKeep,
                    _ => return Err(bad(key, v)),
                }
            }
            "pytorch_cuda_alloc_conf" => {
                if v.trim() != "backend:cudaMallocAsync" {
                    return Err(bad(key, v));
                }
                self.cuda_allocator = CudaAllocator::Pool;
            }
            "vram_state" => {
                self.vram_state = match v.trim().to_ascii_lowercase().as_str() {
                    "auto" => VramState::Auto,
                    "high" => VramState::High,
                    "normal" => VramState::Normal,
                    "low" => VramState::Low,
                    "none" => VramState::None,
                    "cpu" => VramState::Cpu,
                    _ => return Err(bad(key, v)),
                }
            }
            "reserve_vram_gb" => self.reserve_vram_gb = parse_gb(key, v)?,
            "smart_memory" => self.smart_memory = parse_bool(key, v)?,
            "pin_memory" => self.pin_memory = parse_bool(key, v)?,
            "max_pinned_memory_gb" => self.max_pinned_memory_gb = parse_opt_gb(key, value)?,
            "forge_pin_shared_memory" => {
                self.pin_memory = match v.trim() {
                    "Shared" => true,
                    "CPU" => false,
                    _ => return Err(bad(key, v)),
                }
            }
            "async_loading" => self.async_loading = parse_bool(key, v)?,
            "forge_async_loading" => {
                self.async_loading = match v.trim() {
                    "Async" => true,
                    "Queue" => false,
                    _ => return Err(bad(key, v)),
                }
            }
            "storage_dtype" => self.storage_dtype = parse_dtype(key, v)?,
            "compute_dtype" => self.compute_dtype = parse_dtype(key, v)?,
            "device" => {
                self.device = v.parse().map_err(|_| bad(key, v))?;
                self.device_explicit = true;
            }
            _ => {
                let names: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
                return Err(Error::invalid(format!(
                    "unknown config key `{key}`; accepted keys: {}",
                    names.join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The device this configuration selects: `device`, unless it is `auto` (not set explicitly) and
    /// `vram_state: cpu`, which selects the CPU.
    pub fn effective_device(&self) -> DeviceSpec {
        if self.vram_state == VramState::Cpu && !self.device_explicit {
            DeviceSpec::Cpu
        } else {
            self.device.clone()
        }
    }

    /// `device_working_mem_gb` in bytes.
    pub fn working_mem_bytes(&self) -> u64 {
        gib_to_bytes(self.device_working_mem_gb)
    }

    /// `reserve_vram_gb` in bytes.
    pub fn reserve_vram_bytes(&self) -> u64 {
        gib_to_bytes(self.reserve_vram_gb)
    }

    /// `max_cache_vram_gb` in bytes, if set.
    pub fn max_cache_vram_bytes(&self) -> Option<u64> {
        self.max_cache_vram_gb.map(gib_to_bytes)
    }

    /// `max_cache_ram_gb` in bytes, if set.
    pub fn max_cache_ram_bytes(&self) -> Option<u64> {
        self.max_cache_ram_gb.map(gib_to_bytes)
    }

    /// `max_pinned_memory_gb` in bytes, if set.
    pub fn max_pinned_memory_bytes(&self) -> Option<u64> {
        self.max_pinned_memory_gb.map(gib_to_bytes)
    }
}

/// GiB (fractional) to bytes, rounded down; saturates (values come bounded by [`MAX_GB`] from the parsers).
pub fn gib_to_bytes(gib: f64) -> u64 {
    (gib.clamp(0.0, MAX_GB) * GIB as f64) as u64
}

/// Parse a SIZE: plain bytes (`1048576`), KB/MB/GB/TB (powers of 10) or KiB/MiB/GiB/TiB (powers of 2), with an
/// optional space and fraction (`3.5GiB`, `512 MiB`). Units are case-insensitive except that `b` alone means bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    let err = || {
        Error::invalid(format!("invalid size `{s}`; accepted: bytes, or a number with KB|MB|GB|TB (10^n) or KiB|MiB|GiB|TiB (2^n)"))
    };
    let n: f64 = num.parse().map_err(|_| err())?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(err()),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(err());
    }
    if mult == 1 && num.contains('.') {
        return Err(err());
    }
    Ok(bytes.round() as u64)
}

impl FromStr for Config {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Config::from_yaml_str(s)
    }
}
