//! Config keys, SIZE strings and device specs: values, aliases, and errors that name the key and accepted values.

use lowvram::config::{parse_size, Config, CudaAllocator, DtypeChoice, VramState};
use lowvram::device::DeviceSpec;
use lowvram::Error;

#[test]
fn sizes() {
    assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
    assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
    assert_eq!(parse_size("3.5GiB").unwrap(), 3758096384);
    assert_eq!(parse_size("2 GB").unwrap(), 2_000_000_000);
    assert_eq!(parse_size("10kb").unwrap(), 10_000);
    assert_eq!(parse_size("1KiB").unwrap(), 1024);
    for bad in ["", "MiB", "-1GiB", "1.5", "12 parsecs", "1e3"] {
        assert!(
            matches!(parse_size(bad), Err(Error::InvalidArgument(_))),
            "{bad}"
        );
    }
    assert_eq!(
        "emulated:512MiB".parse::<DeviceSpec>().unwrap(),
        DeviceSpec::Emulated(512 << 20)
    );
    assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
    assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
    assert!("emulated:0".parse::<DeviceSpec>().is_err());
    assert!("tpu".parse::<DeviceSpec>().is_err());
}

#[test]
fn defaults_and_yaml() {
    let c = Config::default();
    assert!(c.enable_partial_loading && c.keep_ram_copy_of_weights && c.smart_memory);
    assert_eq!(c.device_working_mem_gb, 3.0);
    assert_eq!(c.working_mem_bytes(), 3 << 30);
    assert_eq!(c.max_cache_vram_gb, None);
    let c = Config::from_yaml_str(
        "enable_partial_loading: false\nmax_cache_ram_gb: 28\nmax_cache_vram_gb: 1.5\ndevice_working_mem_gb: 4\n\
         keep_ram_copy_of_weights: false\npytorch_cuda_alloc_conf: \"backend:cudaMallocAsync\"\nvram_state: low\n\
         reserve_vram_gb: 0.5\nsmart_memory: false\nforge_pin_shared_memory: CPU\nforge_async_loading: Queue\n\
         storage_dtype: bf16\ncompute_dtype: fp16\ndevice: emulated:256MiB\n",
    )
    .unwrap();
    assert!(
        !c.enable_partial_loading
            && !c.keep_ram_copy_of_weights
            && !c.smart_memory
            && !c.pin_memory
            && !c.async_loading
    );
    assert_eq!(c.max_cache_ram_bytes(), Some(28 << 30));
    assert_eq!(c.max_cache_vram_bytes(), Some(3 << 29));
    assert_eq!(c.cuda_allocator, CudaAllocator::Pool);
    assert_eq!(c.vram_state, VramState::Low);
    assert_eq!(c.reserve_vram_bytes(), 1 << 29);
    assert_eq!(
        (c.storage_dtype, c.compute_dtype),
        (DtypeChoice::Bf16, DtypeChoice::Fp16)
    );
    assert_eq!(c.effective_device(), DeviceSpec::Emulated(256 << 20));
    // Forge's working memory alias (MiB).
    let c =
        Config::from_yaml_str("forge_inference_memory: 4096\ncuda_allocator: pool_keep").unwrap();
    assert_eq!(c.working_mem_bytes(), 4 << 30);
    assert_eq!(c.cuda_allocator, CudaAllocator::PoolKeep);
    // vram_state cpu selects the CPU unless a device is set explicitly.
    assert_eq!(
        Config::from_yaml_str("vram_state: cpu")
            .unwrap()
            .effective_device(),
        DeviceSpec::Cpu
    );
    assert_eq!(
        Config::from_yaml_str("vram_state: cpu\ndevice: emulated:1GiB")
            .unwrap()
            .effective_device(),
        DeviceSpec::Emulated(1 << 30)
    );
    // null/auto clear an optional size.
    let mut c = Config::from_yaml_str("max_cache_vram_gb: 2").unwrap();
    c.apply_yaml("max_cache_vram_gb: null").unwrap();
    assert_eq!(c.max_cache_vram_gb, None);
    c.set("max_cache_ram_gb", "auto").unwrap();
    assert_eq!(c.max_cache_ram_gb, None);
    assert_eq!(Config::from_yaml_str("").unwrap(), Config::default());
}

fn invalid(r: Result<(), Error>) -> String {
    match r {
        Err(Error::InvalidArgument(m)) => m,
        Err(e) => panic!("expected InvalidArgument, got {e}"),
        Ok(()) => panic!("accepted"),
    }
}

#[test]
fn errors_name_key_and_accepted_values() {
    let mut c = Config::default();
    let m = invalid(c.set("vram_state", "medium"));
    assert!(
        m.contains("vram_state")
            && m.contains("auto|high|normal|low|none|cpu")
            && m.contains("medium"),
        "{m}"
    );
    let m = invalid(c.set("enable_partial_loading", "perhaps"));
    assert!(
        m.contains("enable_partial_loading") && m.contains("true|false"),
        "{m}"
    );
    let m = invalid(c.set("device_working_mem_gb", "-1"));
    assert!(
        m.contains("device_working_mem_gb") && m.contains(">= 0"),
        "{m}"
    );
    let m = invalid(c.set("pytorch_cuda_alloc_conf", "backend:native"));
    assert!(m.contains("backend:cudaMallocAsync"), "{m}");
    let m = invalid(c.set("device", "emulated:lots"));
    assert!(m.contains("device") && m.contains("emulated:SIZE"), "{m}");
    let m = invalid(c.set("storage_dtype", "fp8"));
    assert!(
        m.contains("storage_dtype") && m.contains("auto|fp32|fp16|bf16"),
        "{m}"
    );
    let m = invalid(c.set("max_cache_vram", "4"));
    assert!(
        m.contains("unknown config key `max_cache_vram`") && m.contains("max_cache_vram_gb"),
        "{m}"
    );
    let m = invalid(c.set("forge_async_loading", "Later"));
    assert!(m.contains("Async|Queue"), "{m}");
    // YAML: an unknown key fails the whole document and nothing changes.
    let before = c.clone();
    let m = invalid(c.apply_yaml("smart_memory: false\nturbo: true\n"));
    assert!(m.contains("turbo"), "{m}");
    assert_eq!(c, before);
    let m = invalid(c.apply_yaml("vram_state: [a, b]\n"));
    assert!(m.contains("scalar") || m.contains("YAML"), "{m}");
    let m = invalid(c.apply_yaml("smart_memory: null\n"));
    assert!(m.contains("smart_memory"), "{m}");
}
