//! Pinned host memory and the RAM tier's honesty (issue 13 item 4), on the emulated device, which accounts pinning as
//! CUDA would: one page-aligned arena per model holding its RAM copy, registered once under a cap, unregistered
//! before it is freed; models beyond the cap or without a RAM copy say so in the stats and the log, and stream from
//! the memory map in large copies.

mod memory_support;

use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::sync::Mutex;

use candle_core::{DType, Device};
use lowvram::api::{Context, ContextOptions};
use lowvram::device::{align_up, page_size, DeviceAllocator, PinEvent, TENSOR_ALIGN};
use lowvram::log::{lowvram_log_level, LogSink};
use lowvram::memory::{ModelCache, WeightsFrom};
use lowvram::ResidentWeights;
use memory_support::*;

const KIB: u64 = 1024;
const WORK: u64 = 64 * KIB;
const GIB: f64 = (1u64 << 30) as f64;

fn reference(m: &TestModel) -> Vec<u32> {
    let r = ResidentWeights::load(&m.path, &Device::Cpu, DType::F32).unwrap();
    bits(&forward(&r, m).unwrap())
}

/// The tensors of a safetensors file from its own header: (name, byte length), in file order.
fn header_tensors(path: &std::path::Path) -> Vec<(String, usize, usize)> {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut v: Vec<(String, usize, usize)> = header
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .map(|(k, t)| {
            let o = &t["data_offsets"];
            (k, o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize)
        })
        .collect();
    v.sort_by_key(|t| t.1);
    v
}

/// The arena the RAM copy needs, from the file's header alone: blocks in the order of their first tensor, tensors in
/// file order within each, each at a multiple of TENSOR_ALIGN; whole pages.
fn expected_arena(path: &std::path::Path) -> (u64, u64) {
    let tensors = header_tensors(path);
    let block = |name: &str| name.rsplit_once('.').unwrap().0.to_string();
    let mut order: Vec<String> = Vec::new();
    for (n, _, _) in &tensors {
        if !order.contains(&block(n)) {
            order.push(block(n));
        }
    }
    let (mut end, mut sum) = (0usize, 0u64);
    for b in &order {
        for (_, s, e) in tensors.iter().filter(|t| block(&t.0) == *b) {
            end = align_up(end, TENSOR_ALIGN) + (e - s);
            sum += (e - s) as u64;
        }
    }
    (sum, align_up(end, page_size()) as u64)
}

/// Every arena registered was unregistered before it was freed, and nothing is left pinned.
fn assert_unregistered_before_free(alloc: &DeviceAllocator) {
    let events = alloc.pin_events();
    let mut registered = 0;
    for (i, e) in events.iter().enumerate() {
        if let PinEvent::Register { base, .. } = *e {
            registered += 1;
            let un = events[i..].iter().position(|x| *x == PinEvent::Unregister { base });
            let free = events[i..].iter().position(|x| *x == PinEvent::Free { base });
            let (Some(un), Some(free)) = (un, free) else {
                panic!("arena {base:#x} registered but not unregistered and freed: {events:?}")
            };
            assert!(un < free, "arena {base:#x} freed before it was unregistered: {events:?}");
        }
    }
    assert!(registered > 0, "nothing was pinned");
    assert_eq!(alloc.pin_violations(), 0);
    assert_eq!(alloc.pinned_bytes(), 0);
}

/// The RAM copy is one arena holding the model's tensors back to back, each aligned: its size matches what the file's
/// header says (computed here independently), and it is pinned as a whole, once.
#[test]
fn arena_holds_the_models_tensors_aligned_and_is_pinned_once() {
    let dir = TempDir::new("arena-size");
    // 33-, 65- and 70-wide biases are not multiples of the alignment: padding is needed between tensors.
    for (name, dims) in [("aligned", vec![64, 128, 256, 64]), ("padded", vec![33, 65, 70, 17])] {
        let m = write_model(dir.path(), name, &dims, 3);
        let (sum, arena) = expected_arena(&m.path);
        assert_eq!(sum, m.total());
        let cache = ModelCache::new(config("emulated:64MiB", WORK)).unwrap();
        let model = cache.load_model(&m.path, name).unwrap();
        let s = cache.stats();
        let ms = &s.models[0];
        eprintln!("{name}: tensors {} B, arena {arena} B (aligned tensors, whole pages)", m.total());
        assert_eq!(ms.ram_bytes, m.total());
        assert_eq!(ms.ram_arena_bytes, arena, "{name}: arena bytes");
        assert_eq!(ms.pinned_bytes, arena);
        assert_eq!(ms.weights_from, WeightsFrom::PinnedRam);
        assert_eq!(s.ram.pinned_bytes, arena);
        assert_eq!((s.ram.models_pinned, s.ram.models_unpinned, s.ram.models_without_ram_copy), (1, 0, 0));
        let registrations: Vec<PinEvent> = cache
            .allocator()
            .pin_events()
            .into_iter()
            .filter(|e| matches!(e, PinEvent::Register { .. }))
            .collect();
        assert_eq!(registrations.len(), 1, "one registration per model: {registrations:?}");
        if let PinEvent::Register { base, bytes } = registrations[0] {
            assert_eq!(base % page_size(), 0, "page-aligned");
            assert_eq!(bytes, arena);
        }
        drop(model);
    }
}

/// A cap that fits one model: the second keeps an unpinned RAM copy and says why; results are bit-identical to the
/// reference, to a run where both are pinned and to a run with pinning off. Unloading unregisters each arena before
/// freeing it.
#[test]
fn pinned_cap_fits_one_model_and_results_are_bit_identical() {
    let dir = TempDir::new("pin-cap");
    let a = write_model(dir.path(), "a", &[64, 128, 256, 128, 192, 64], 5);
    let b = write_model(dir.path(), "b", &[32, 160, 160, 96, 48], 6);
    let (ra, rb) = (reference(&a), reference(&b));
    let arena_a = expected_arena(&a.path).1;
    let arena_b = expected_arena(&b.path).1;
    // Half the models' bytes on the device: blocks stream from the RAM copies every forward.
    let cap = WORK + (a.total() + b.total()) / 2;
    let run = |extra: &str| {
        let mut cfg = config(&format!("emulated:{cap}"), WORK);
        cfg.apply_yaml(extra).unwrap();
        let cache = ModelCache::new(cfg).unwrap();
        let (ma, mb) = (cache.load_model(&a.path, "a").unwrap(), cache.load_model(&b.path, "b").unwrap());
        for _ in 0..2 {
            let la = cache.lock(&ma, 0).unwrap();
            assert_eq!(bits(&forward(&la, &a).unwrap()), ra);
            drop(la);
            let lb = cache.lock(&mb, 0).unwrap();
            assert_eq!(bits(&forward(&lb, &b).unwrap()), rb);
        }
        let s = cache.stats();
        assert!(s.bytes_streamed_total > 0, "{extra}: the blocks must stream");
        assert_eq!(s.device.usage.refused_allocations, 0);
        let alloc = cache.allocator().clone();
        drop((ma, mb));
        cache.unload_all();
        (s, alloc)
    };
    // Room for a's arena and less than b's on top.
    let fits_one = format!("max_pinned_memory_gb: {}", (arena_a + arena_b / 2) as f64 / GIB);
    let (s, alloc) = run(&fits_one);
    assert_eq!(s.ram.pinned_bytes, arena_a);
    assert_eq!(s.ram.pinned_cap_bytes, Some(((arena_a + arena_b / 2) as f64 / GIB * GIB) as u64));
    assert_eq!((s.ram.models_pinned, s.ram.models_unpinned, s.ram.models_without_ram_copy), (1, 1, 0));
    let by_name = |n: &str| s.models.iter().find(|m| m.name == n).unwrap().clone();
    assert_eq!(by_name("a").weights_from, WeightsFrom::PinnedRam);
    let mb = by_name("b");
    assert_eq!(mb.weights_from, WeightsFrom::Ram);
    assert_eq!(mb.ram_bytes, b.total());
    assert_eq!(mb.pinned_bytes, 0);
    assert!(mb.weights_from_reason.contains("pinned-memory cap"), "{}", mb.weights_from_reason);
    assert_unregistered_before_free(&alloc);

    let (s, alloc) = run("max_pinned_memory_gb: 1");
    assert_eq!(s.ram.pinned_bytes, arena_a + arena_b);
    assert_eq!(s.ram.models_pinned, 2);
    assert_unregistered_before_free(&alloc);

    let (s, alloc) = run("pin_memory: false");
    assert_eq!((s.ram.pinned_bytes, s.ram.pinned_cap_bytes, s.ram.models_unpinned), (0, None, 2));
    assert!(s.models[0].weights_from_reason.contains("pin_memory: false"));
    assert!(alloc.pin_events().iter().all(|e| matches!(e, PinEvent::Free { .. })));
}

/// The same model computed from the CPU device's in-place RAM copy, the emulated device's arena (f32 and fp16
/// files, converted on arrival), and the memory map without a RAM copy: bit-identical.
#[test]
fn results_bit_identical_with_and_without_the_arena() {
    let dir = TempDir::new("pin-identical");
    for dtype in [DType::F32, DType::F16] {
        let m = write_model_as(dir.path(), &format!("m{dtype:?}"), &[48, 96, 200, 64, 80], 9, dtype);
        let r = ResidentWeights::load(&m.path, &Device::Cpu, DType::F32).unwrap();
        let want = bits(&forward(&r, &m).unwrap());
        let budget = WORK + m.total();
        for (device, yaml, from) in [
            ("cpu".to_string(), "", WeightsFrom::InPlace),
            (format!("emulated:{budget}"), "", WeightsFrom::PinnedRam),
            (format!("emulated:{}", WORK + 2 * m.max_block() * 2), "", WeightsFrom::PinnedRam),
            (format!("emulated:{budget}"), "keep_ram_copy_of_weights: false", WeightsFrom::File),
            (format!("emulated:{budget}"), "vram_state: none\nkeep_ram_copy_of_weights: false", WeightsFrom::File),
            (format!("emulated:{budget}"), "vram_state: none", WeightsFrom::PinnedRam),
        ] {
            let mut cfg = config(&device, WORK);
            cfg.apply_yaml(yaml).unwrap();
            let cache = ModelCache::new(cfg).unwrap();
            let model = cache.load_model(&m.path, "m").unwrap();
            let lock = cache.lock(&model, 0).unwrap();
            for _ in 0..2 {
                assert_eq!(bits(&forward(&lock, &m).unwrap()), want, "{dtype:?} {device} {yaml:?}");
            }
            assert_eq!(cache.stats().models[0].weights_from, from, "{dtype:?} {device} {yaml:?}");
        }
    }
}

/// Without a RAM copy, a streamed block is read from the memory map in one copy when its tensors lie back to back in
/// the file (each block of these files does: bias then weight), not one copy per tensor.
#[test]
fn no_ram_copy_streams_a_whole_block_per_copy() {
    let dir = TempDir::new("pin-large-copies");
    let m = write_model(dir.path(), "m", &[64, 128, 256, 128, 192, 64], 11);
    // Tensors of one block are adjacent in the file (an independent check of the premise).
    let tensors = header_tensors(&m.path);
    for w in tensors.windows(2) {
        assert_eq!(w[0].2, w[1].1, "the file is packed");
    }
    let blocks = m.blocks.len() as u64;
    let mut cfg = config(&format!("emulated:{}", WORK + m.total()), WORK);
    // No prefetch: a copy of the next forward's first block could land on either side of the counts.
    cfg.apply_yaml("keep_ram_copy_of_weights: false\nvram_state: none\nasync_loading: false").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let model = cache.load_model(&m.path, "m").unwrap();
    let lock = cache.lock(&model, 0).unwrap();
    let before = cache.stats();
    let forwards = 3u64;
    for _ in 0..forwards {
        assert_eq!(bits(&forward(&lock, &m).unwrap()), reference(&m));
    }
    let after = cache.stats();
    assert_eq!(after.ram.file_copies_total - before.ram.file_copies_total, forwards * blocks, "one copy per block");
    assert_eq!(
        after.bytes_read_from_files_total - before.bytes_read_from_files_total,
        forwards * m.total(),
        "every streamed byte read from the file"
    );
    assert_eq!(after.bytes_streamed_total - before.bytes_streamed_total, forwards * m.total());
    assert_eq!(after.ram.models_without_ram_copy, 1);
    assert_eq!(after.ram.cache_used_bytes, 0);
    drop((lock, model, cache));

    // Blocks placed on the device without a RAM copy pass through the staging ring: its slots are page-aligned
    // arenas, pinned (on the emulated device, accounted as CUDA would), at most `slots` of them each no larger than
    // the largest block in whole pages, and each unregistered before it is freed.
    let mut cfg = config(&format!("emulated:{}", WORK + m.total() / 2), WORK);
    cfg.set("keep_ram_copy_of_weights", "false").unwrap();
    let cache = ModelCache::new(cfg).unwrap();
    let model = cache.load_model(&m.path, "m").unwrap();
    let lock = cache.lock(&model, 0).unwrap();
    assert!(model.resident_bytes() > 0 && model.streamed_bytes_per_forward() > 0, "a partial plan");
    assert_eq!(bits(&forward(&lock, &m).unwrap()), reference(&m));
    let s = cache.stats();
    let slot_max = align_up(m.max_block() as usize, page_size()) as u64;
    assert!(s.ram.pinned_bytes > 0, "staging slots are pinned");
    assert!(s.ram.pinned_bytes <= s.ram.staging_slots as u64 * slot_max);
    assert!(s.ram.staging_peak_bytes <= s.ram.staging_slots as u64 * slot_max);
    assert_eq!(s.ram.models_pinned + s.ram.models_unpinned, 0, "no RAM copy to pin");
    let alloc = cache.allocator().clone();
    drop((lock, model, cache));
    assert_unregistered_before_free(&alloc);
}

static LOG: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

unsafe extern "C" fn capture(level: lowvram_log_level, message: *const c_char, user_data: *mut c_void) {
    let tag = user_data as usize as u32;
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    LOG.lock().unwrap().push((tag * 10 + level as u32, text));
}

/// The lines a context with log tag `tag` wrote at `level` that mention `what`.
fn logged(tag: u32, level: lowvram_log_level, what: &str) -> Vec<String> {
    LOG.lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| *t == tag * 10 + level as u32 && m.contains(what))
        .map(|(_, m)| m.clone())
        .collect()
}

fn context(tag: u32, yaml: &str) -> Context {
    Context::new(ContextOptions {
        device: Some("emulated:256MiB".into()),
        config_yaml: Some(yaml.into()),
        config_path: None,
        log: LogSink::new(Some(capture), tag as usize as *mut c_void),
    })
    .unwrap()
}

/// The SDXL-on-8GB case, made small: a model larger than the RAM cache gets no RAM copy. The load's log line says
/// so as a warning, with the limit; the stats count it and name the reason; the C stats struct carries the counts.
/// A model that fits says at Info that it streams from its pinned RAM copy; the cap is logged at creation.
#[test]
fn stats_and_log_say_where_weights_stream_from() {
    let unet = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd-random/unet");

    let ctx = context(2, "device_working_mem_gb: 0.001\n");
    let model = ctx.load_model(&unet).unwrap();
    let info = logged(2, lowvram_log_level::Info, "weights stream from its RAM copy, pinned");
    assert_eq!(info.len(), 1, "{:?}", LOG.lock().unwrap());
    assert!(logged(2, lowvram_log_level::Warn, "weights stream").is_empty());
    assert_eq!(logged(2, lowvram_log_level::Info, "pinned memory: cap").len(), 1);
    let s = ctx.stats();
    let bytes = s.models[0].total_bytes;
    assert_eq!((s.ram.models_pinned, s.ram.models_without_ram_copy), (1, 0));
    assert!(s.ram.pinned_bytes >= bytes && s.ram.pinned_bytes % page_size() as u64 == 0);
    eprintln!("tiny UNet: {bytes} B of weights, {} B pinned in one arena", s.ram.pinned_bytes);
    assert_eq!(s.ram.pinned_cap_bytes, s.sizing.pinned_cap_bytes);
    drop((model, ctx));

    // A RAM cache smaller than the UNet.
    let small = format!("max_cache_ram_gb: {}\ndevice_working_mem_gb: 0.001\n", (bytes / 2) as f64 / GIB);
    let ctx = context(1, &small);
    let model = ctx.load_model(&unet).unwrap();
    let warned = logged(1, lowvram_log_level::Warn, "weights stream from the memory map");
    assert_eq!(warned.len(), 1, "{:?}", LOG.lock().unwrap());
    assert!(warned[0].contains("exceed the RAM cache limit"), "{}", warned[0]);
    assert!(warned[0].contains(&format!("its {bytes} bytes")), "{}", warned[0]);
    let s = ctx.stats();
    assert_eq!((s.ram.models_without_ram_copy, s.ram.models_pinned, s.ram.pinned_bytes), (1, 0, 0));
    assert_eq!(s.models[0].weights_from, WeightsFrom::File);
    assert!(s.models[0].weights_from_reason.contains("exceed the RAM cache limit"));
    let json = serde_json::to_value(&s).unwrap();
    assert_eq!(json["models"][0]["weights_from"], "file");
    assert_eq!(json["ram"]["models_without_ram_copy"], 1);
    drop((model, ctx));

    // Through the C ABI, the stats struct grown at its end carries the same numbers (the SDXL-on-8GB case again).
    use lowvram::ffi::context::*;
    use lowvram::ffi::model::*;
    unsafe {
        let mut p = std::mem::MaybeUninit::<lowvram_context_params>::uninit();
        let size = std::mem::size_of::<lowvram_context_params>();
        assert_eq!(lowvram_context_params_init(p.as_mut_ptr(), size) as u32, 0);
        let mut p = p.assume_init();
        let device = std::ffi::CString::new("emulated:256MiB").unwrap();
        let yaml = std::ffi::CString::new(small.clone()).unwrap();
        p.device = device.as_ptr();
        p.config_yaml = yaml.as_ptr();
        let mut ctx = std::ptr::null_mut();
        assert_eq!(lowvram_context_new(&p, &mut ctx) as u32, 0);
        let path = std::ffi::CString::new(unet.to_str().unwrap()).unwrap();
        let mut model = std::ptr::null_mut();
        assert_eq!(lowvram_model_load(ctx, path.as_ptr(), &mut model) as u32, 0);
        let mut c = std::mem::MaybeUninit::<lowvram_cache_stats>::zeroed().assume_init();
        c.struct_size = std::mem::size_of::<lowvram_cache_stats>() as u32;
        assert_eq!(lowvram_context_stats(ctx, &mut c) as u32, 0);
        assert_eq!((c.models_unpinned, c.models_without_ram_copy, c.pinned_bytes), (0, 1, 0));
        assert!(c.pinned_cap_bytes > 0);
        lowvram_model_free(model);
        lowvram_context_free(ctx);
    }
}

/// `max_pinned_memory_gb` is bounded like every `*_gb` key; `auto`/null restore the default.
#[test]
fn pinned_cap_key_is_bounded() {
    let mut c = lowvram::config::Config::default();
    for bad in ["-1", "1e300", "nan", "lots"] {
        let e = c.set("max_pinned_memory_gb", bad).unwrap_err();
        assert!(e.to_string().contains("max_pinned_memory_gb"), "{e}");
    }
    c.set("max_pinned_memory_gb", "2.5").unwrap();
    assert_eq!(c.max_pinned_memory_bytes(), Some(5 << 29));
    c.apply_yaml("max_pinned_memory_gb: null").unwrap();
    assert_eq!(c.max_pinned_memory_bytes(), None);
}

/// The log line is repeated whenever where a model's weights stream from changes at a lock: the RAM copy dropped
/// (`keep_ram_copy_of_weights: false`, Info: the host chose it), then read again past a lowered cap (Warn), and not
/// repeated while nothing changes.
#[test]
fn a_changed_weights_source_is_logged_at_the_next_lock() {
    let dir = TempDir::new("pin-relog");
    let m = write_model(dir.path(), "m", &[64, 128, 256, 64], 12);
    let lines: std::sync::Arc<Mutex<Vec<(bool, String)>>> = Default::default();
    let cache = ModelCache::new(config("emulated:64MiB", WORK)).unwrap();
    let sink = lines.clone();
    cache.set_log(Some(std::sync::Arc::new(move |warn: bool, l: &str| {
        sink.lock().unwrap().push((warn, l.to_string()))
    })));
    let model = cache.load_model(&m.path, "m").unwrap();
    let run = || {
        let lock = cache.lock(&model, 0).unwrap();
        assert_eq!(bits(&forward(&lock, &m).unwrap()), reference(&m));
    };
    run();
    run();
    cache.configure("keep_ram_copy_of_weights: false").unwrap();
    run();
    run();
    cache.configure("keep_ram_copy_of_weights: true\nmax_pinned_memory_gb: 0").unwrap();
    run();
    let got = lines.lock().unwrap().clone();
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(!got[0].0 && got[0].1.contains("its RAM copy, pinned"), "{got:?}");
    assert!(!got[1].0 && got[1].1.contains("memory map") && got[1].1.contains("keep_ram_copy_of_weights: false"));
    assert!(got[2].0 && got[2].1.contains("not pinned: pinned-memory cap"), "{got:?}");
    assert_eq!(cache.stats().ram.models_unpinned, 1);
}
