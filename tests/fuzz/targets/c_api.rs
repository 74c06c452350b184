//! Target `c_api`: every exported `lowvram_*` function, called in-process the way a C host would, with argument
//! values decoded from the input: random `struct_size`s, params bytes, enum numbers, sizes and shapes, NULL or
//! valid pointers. Within the contract (what the header makes the host's responsibility): pointers are NULL or
//! valid for the size the host declares, callbacks are NULL or real functions, handles are live.
//!
//! Checks besides "no crash, no hang": no PANIC status, a known status number with a message, out-parameters
//! untouched on failure, nothing read or written past a declared size (host buffers end at a guard page, so an
//! overrun faults at once), what goes in comes back out (tensor round trip), and finite latents.
//!
//! Each input is one host session: a fresh context, the tiny models loaded on first use, up to 12 calls, then
//! everything freed — so a saved input reproduces alone.

use std::ffi::{c_char, c_void, CStr};
use std::mem::{offset_of, size_of};
use std::ptr::{null, null_mut};

use lowvram::ffi::context::*;
use lowvram::ffi::error::lowvram_last_error_message;
use lowvram::ffi::log::lowvram_set_log_callback;
use lowvram::ffi::model::*;
use lowvram::ffi::cancel::*;
use lowvram::ffi::reservation::*;
use lowvram::ffi::run::*;
use lowvram::ffi::status::{lowvram_status, lowvram_status_name};
use lowvram::ffi::system::{lowvram_system_info, lowvram_system_stats, lowvram_version};
use lowvram::ffi::tensor::*;
use lowvram::log::lowvram_log_level;

use crate::engine::{feature, havoc, Outcome, Rng, Target, INTERESTING};
use crate::known;

/// Reads argument values from the input; past its end every read is 0.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
    fn below(&mut self, n: usize) -> usize {
        self.u8() as usize % n
    }
    fn pick<'b, T>(&mut self, items: &'b [T]) -> &'b T {
        &items[self.below(items.len())]
    }
    /// A size: small most of the time, a boundary value or raw bits otherwise.
    fn size(&mut self, small: usize) -> u64 {
        match self.below(8) {
            0 => *self.pick(INTERESTING),
            1 => self.u64(),
            _ => self.below(small + 1) as u64,
        }
    }
    fn exhausted(&self) -> bool {
        self.at >= self.data.len()
    }
}

/// Host memory of exactly `len` bytes that ends at an inaccessible page: reading or writing past the end faults.
struct Guarded {
    map: *mut u8,
    map_len: usize,
    ptr: *mut u8,
    len: usize,
}

impl Guarded {
    fn new(len: usize) -> Self {
        let page = 4096;
        let pages = len.div_ceil(page) + 2;
        let map_len = pages * page;
        unsafe {
            let map = libc::mmap(
                null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(map != libc::MAP_FAILED, "mmap for a guarded buffer");
            let map = map as *mut u8;
            let guard = map.add(map_len - page);
            libc::mprotect(guard.cast(), page, libc::PROT_NONE);
            // 8-byte aligned as a C struct would be; at most 7 accessible bytes follow the buffer.
            let ptr = ((guard as usize - len) & !7) as *mut u8;
            Self { map, map_len, ptr, len }
        }
    }
    fn bytes(&self) -> &mut [u8] {
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
    fn filled(len: usize, byte: u8) -> Self {
        let g = Self::new(len);
        g.bytes().fill(byte);
        g
    }
    fn as_ptr<T>(&self) -> *mut T {
        self.ptr.cast()
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        unsafe {
            libc::munmap(self.map.cast(), self.map_len);
        }
    }
}

unsafe extern "C" fn log_sink(_level: lowvram_log_level, message: *const c_char, _user_data: *mut c_void) {
    // touch the whole message, as a host would
    let _ = CStr::from_ptr(message).to_bytes().len();
}

thread_local! {
    /// A progress report with step > total (checked after the call: a callback must not panic into C).
    static BAD_PROGRESS: std::cell::Cell<Option<(u32, u32)>> = const { std::cell::Cell::new(None) };
}

unsafe extern "C" fn progress_continue(step: u32, total: u32, _user_data: *mut c_void) -> bool {
    if step > total || step == 0 {
        BAD_PROGRESS.with(|c| c.set(Some((step, total))));
    }
    true
}

unsafe extern "C" fn progress_cancel(_step: u32, _total: u32, _user_data: *mut c_void) -> bool {
    false
}

const DEVICES: &[&CStr] = &[
    c"cpu",
    c"emulated:64MiB",
    c"emulated:4MiB",
    c"emulated:1MiB",
    c"auto",
    c"emulated:0",
    c"emulated:",
    c"cuda:0",
    c"cuda:4294967296",
    c"",
    c"emulated:18446744073709551615",
    c"emulated:1e30GiB",
    c"CPU",
];
const YAMLS: &[&CStr] = &[
    c"device_working_mem_gb: 0.01\nmax_cache_vram_gb: 0.001\n",
    c"vram_state: none\n",
    c"keep_ram_copy_of_weights: false\n",
    c"storage_dtype: fp16\ncompute_dtype: fp32\n",
    c"compute_dtype: bf16\n",
    c"max_cache_ram_gb: 0\n",
    c"max_cache_vram_gb: 1e30\n",
    c"device_working_mem_gb: 1e-30\n",
    c"enable_partial_loading: false\nvram_state: high\n",
    c"device: cpu\n",
    c"unknown: 1\n",
    c"[1, 2",
    c"",
    c"reserve_vram_gb: 18446744073709551616\n",
];
const PATHS: &[&CStr] = &[
    c"tests/fixtures/tiny-sd-random/unet",
    c"tests/fixtures/tiny-sd-random/vae",
    c"tests/fixtures/tiny-sd-random",
    c"tests/fixtures/tiny-sd-random/unet/config.json",
    c"/nonexistent",
    c"",
    c"tests/fixtures/tiny-sd2/model/unet",
    c"tests/fixtures/tiny-sd2/model/vae",
    c"/dev/null",
    c".",
];
const CONFIG_PATHS: &[&CStr] = &[
    c"tests/data/small-working-memory.yaml",
    c"/nonexistent.yaml",
    c"/dev/null",
    c"models",
    c"tests/fixtures/tiny-sd-random/unet/config.json",
];
/// Largest pool tensor passed to a denoise or decode: a [2, 4, 16, 16] f32 latent, or [2, 77, 32] conditioning.
const RUN_INPUT_BYTES: usize = 2 * 77 * 32 * 4;
const NOT_UTF8: &[u8] = b"\xff\xfe/\xc0\x80\0";

/// A string argument: NULL, one of `items`, or a string that is not UTF-8.
fn str_arg(r: &mut Reader, items: &[&CStr]) -> *const c_char {
    match r.below(16) {
        0 => null(),
        1 => NOT_UTF8.as_ptr().cast(),
        _ => r.pick(items).as_ptr(),
    }
}

/// A declared `struct_size` for a struct of `full` bytes: the real one, an older or newer host's, or anything.
fn struct_size(r: &mut Reader, full: usize, avoid: &[(usize, usize)], avoid_known: bool) -> u32 {
    let s = match r.below(8) {
        0 | 1 | 2 => full as u32,
        3 => (r.below(full + 1) & !7) as u32,
        4 => (full + 8 * r.below(8)) as u32,
        5 => *r.pick(&[0u32, 1, 3, 4, 7, 8, 4096, 4097, 1 << 16]),
        _ => r.below(full + 16) as u32,
    };
    if avoid_known && known::struct_size_splits_a_field(s, avoid) {
        full as u32
    } else {
        s
    }
}

/// One session's handles; everything is freed on drop.
struct Session {
    ctx: *mut lowvram_context,
    other_ctx: *mut lowvram_context,
    unet: *mut lowvram_model,
    vae: *mut lowvram_model,
    tensors: Vec<*mut lowvram_tensor>,
    reservations: Vec<*mut lowvram_reservation>,
    scratch: std::path::PathBuf,
    findings: Vec<String>,
    seen: String,
}

impl Drop for Session {
    fn drop(&mut self) {
        unsafe {
            for t in self.tensors.drain(..) {
                lowvram_tensor_free(t);
            }
            for r in self.reservations.drain(..) {
                lowvram_reservation_free(r);
            }
            lowvram_model_free(self.unet);
            lowvram_model_free(self.vae);
            lowvram_context_free(self.ctx);
            lowvram_context_free(self.other_ctx);
            lowvram_set_log_callback(None, null_mut());
        }
    }
}

impl Session {
    /// Check what every call must do, and note the outcome.
    fn check(&mut self, call: &str, status: lowvram_status) -> bool {
        let msg = lowvram_last_error_message();
        if msg.is_null() {
            self.findings
                .push(format!("{call}: lowvram_last_error_message() is NULL"));
            return false;
        }
        let msg = unsafe { CStr::from_ptr(msg) }.to_string_lossy().into_owned();
        let name = unsafe { CStr::from_ptr(lowvram_status_name(status as u32)) }
            .to_string_lossy()
            .into_owned();
        if status == lowvram_status::Panic {
            self.findings.push(format!("{call} returned PANIC: {msg}"));
        } else if status != lowvram_status::Ok && msg.is_empty() {
            self.findings.push(format!("{call} returned {name} without a message"));
        }
        self.seen.push_str(&feature(
            &format!("|{call}:{name}"),
            if status == lowvram_status::Ok { "" } else { &msg },
        ));
        status == lowvram_status::Ok
    }

    fn model(&mut self, which: u8) -> *mut lowvram_model {
        let slot = if which % 2 == 0 { &mut self.unet } else { &mut self.vae };
        if slot.is_null() {
            let path = if which % 2 == 0 {
                c"tests/fixtures/tiny-sd-random/unet"
            } else {
                c"tests/fixtures/tiny-sd-random/vae"
            };
            let mut m = null_mut();
            let s = unsafe { lowvram_model_load(self.ctx, path.as_ptr(), &mut m) };
            if s == lowvram_status::Ok {
                *slot = m;
            } else {
                self.check("lowvram_model_load(tiny)", s);
            }
        }
        if which % 2 == 0 {
            self.unet
        } else {
            self.vae
        }
    }

    /// A tensor argument of at most `max_bytes` when it comes from the pool (a run's inputs: the CPU computes
    /// for real, and a valid 256×256 latent would take minutes; that is slow, not a bug).
    fn small_tensor(&mut self, r: &mut Reader, max_bytes: usize) -> *const lowvram_tensor {
        let t = self.tensor(r);
        let mut len = 0usize;
        unsafe { lowvram_tensor_info(t, null_mut(), null_mut(), 0, null_mut(), &mut len) };
        if len > max_bytes {
            null()
        } else {
            t
        }
    }

    fn tensor(&mut self, r: &mut Reader) -> *const lowvram_tensor {
        match r.below(8) {
            0 => null(),
            1 | 2 if !self.tensors.is_empty() => *r.pick(&self.tensors),
            _ => {
                // a well-formed one: [1, 77, 32] conditioning, [1, 4, h, w] latents or noise, or a small odd one
                let (dtype, shape): (u32, Vec<i64>) = match r.below(6) {
                    0 | 1 => (r.below(3) as u32, vec![1 + r.below(2) as i64, 77, 32]),
                    2 | 3 => (0, vec![1, 4, 1 + r.below(8) as i64, 1 + r.below(8) as i64]),
                    4 => (
                        0,
                        vec![
                            1 + r.below(3) as i64,
                            1 + r.below(2) as i64,
                            4,
                            1 + r.below(4) as i64,
                            1 + r.below(4) as i64,
                        ],
                    ),
                    _ => (
                        r.below(3) as u32,
                        (0..1 + r.below(5)).map(|_| r.below(6) as i64).collect(),
                    ),
                };
                let elems: i64 = shape.iter().product();
                let esize = if dtype == 0 { 4 } else { 2 };
                let data = Guarded::new((elems * esize) as usize);
                let fill = r.u8();
                for (i, b) in data.bytes().iter_mut().enumerate() {
                    // small values (a NaN-free pattern for f32/f16/bf16)
                    *b = if i % esize as usize == esize as usize - 1 {
                        0x3c & fill
                    } else {
                        i as u8
                    };
                }
                let mut t = null_mut();
                let s = unsafe {
                    lowvram_tensor_from_host(dtype, shape.as_ptr(), shape.len(), data.as_ptr(), data.len, &mut t)
                };
                if self.check("lowvram_tensor_from_host(valid)", s) {
                    self.tensors.push(t);
                    t
                } else {
                    null()
                }
            }
        }
    }

    fn run_op(&mut self, r: &mut Reader, avoid_known: bool) {
        let op = r.u8() % 25;
        if std::env::var_os("LOWVRAM_FUZZ_TRACE").is_some() {
            eprintln!("c_api: op {op} at input byte {}", r.at);
        }
        unsafe {
            match op {
                0 => self.op_context_new(r),
                1 => self.params_init(
                    r,
                    "lowvram_context_params_init",
                    size_of::<lowvram_context_params>(),
                    |p, n| lowvram_context_params_init(p.cast(), n),
                ),
                2 => self.params_init(
                    r,
                    "lowvram_denoise_params_init",
                    size_of::<lowvram_denoise_params>(),
                    |p, n| lowvram_denoise_params_init(p.cast(), n),
                ),
                3 => self.params_init(
                    r,
                    "lowvram_decode_params_init",
                    size_of::<lowvram_decode_params>(),
                    |p, n| lowvram_decode_params_init(p.cast(), n),
                ),
                4 => {
                    let yaml = str_arg(r, YAMLS);
                    let ctx = if r.below(8) == 0 { null() } else { self.ctx };
                    let s = lowvram_context_configure(ctx, yaml);
                    self.check("lowvram_context_configure", s);
                }
                5 => self.op_stats(r),
                6 => {
                    let ctx = if r.below(8) == 0 { null() } else { self.ctx };
                    let mut out: *mut c_char = 0x1 as *mut c_char;
                    let s = lowvram_context_stats_json(ctx, if r.below(8) == 0 { null_mut() } else { &mut out });
                    if self.check("lowvram_context_stats_json", s) {
                        if serde_json::from_slice::<serde_json::Value>(CStr::from_ptr(out).to_bytes()).is_err() {
                            self.findings.push("lowvram_context_stats_json: not JSON".into());
                        }
                        lowvram_string_free(out);
                    } else if out as usize != 0x1 {
                        self.findings
                            .push("lowvram_context_stats_json wrote *out_json on failure".into());
                    }
                }
                7 => {
                    let bytes = r.size(1 << 20);
                    let mut freed = 7u64;
                    let s = lowvram_context_free_memory(
                        self.ctx,
                        bytes,
                        if r.below(2) == 0 { null_mut() } else { &mut freed },
                    );
                    self.check("lowvram_context_free_memory", s);
                }
                8 => {
                    let mut freed = 7u64;
                    let s = lowvram_context_unload_all(self.ctx, if r.below(2) == 0 { null_mut() } else { &mut freed });
                    self.check("lowvram_context_unload_all", s);
                }
                9 => {
                    let s = lowvram_context_cancel(if r.below(8) == 0 { null() } else { self.ctx });
                    self.check("lowvram_context_cancel", s);
                }
                10 => {
                    let cb = if r.below(2) == 0 {
                        None
                    } else {
                        Some(log_sink as unsafe extern "C" fn(_, _, _))
                    };
                    let ud = r.u64() as usize as *mut c_void;
                    let s = if r.below(2) == 0 {
                        lowvram_context_set_log_callback(if r.below(8) == 0 { null() } else { self.ctx }, cb, ud)
                    } else {
                        lowvram_set_log_callback(cb, ud)
                    };
                    self.check("lowvram_*set_log_callback", s);
                }
                11 => {
                    let path = str_arg(r, PATHS);
                    let mut m: *mut lowvram_model = 0x1 as *mut _;
                    let s = lowvram_model_load(
                        if r.below(16) == 0 { null() } else { self.ctx },
                        path,
                        if r.below(16) == 0 { null_mut() } else { &mut m },
                    );
                    if self.check("lowvram_model_load", s) {
                        lowvram_model_free(m);
                    } else if m as usize != 0x1 {
                        self.findings.push("lowvram_model_load wrote *out on failure".into());
                    }
                }
                12 => self.op_model_info(r),
                13 => {
                    let w = r.u8();
                    let m = if r.below(8) == 0 { null_mut() } else { self.model(w) };
                    let max = r.size(4 << 20);
                    let mut out = 0xFFFF_FFFFu64;
                    let s = lowvram_model_load_to_device(
                        self.ctx,
                        m,
                        max,
                        if r.below(2) == 0 { null_mut() } else { &mut out },
                    );
                    self.check("lowvram_model_load_to_device", s);
                }
                14 => {
                    // drop the host's reference early; later calls load it again
                    let w = r.u8();
                    let slot = if w % 2 == 0 { &mut self.unet } else { &mut self.vae };
                    lowvram_model_free(std::mem::replace(slot, null_mut()));
                }
                15 => {
                    let bytes = r.size(8 << 20);
                    let mut res: *mut lowvram_reservation = 0x1 as *mut _;
                    let out = if r.below(16) == 0 { null_mut() } else { &mut res as *mut _ };
                    let s = if r.below(2) == 0 {
                        lowvram_reservation_new(self.ctx, bytes, out)
                    } else {
                        // The params as a host of any version may pass them: any struct_size, short waits (nothing
                        // else runs here, so no wait can be long), a token cancelled or not, or NULL.
                        let mut p = std::mem::MaybeUninit::<lowvram_reservation_params>::zeroed();
                        let size = match r.below(4) {
                            0 => r.below(40) as usize,
                            _ => std::mem::size_of::<lowvram_reservation_params>(),
                        };
                        let init = lowvram_reservation_params_init(p.as_mut_ptr(), size);
                        let mut p = p.assume_init();
                        p.timeout_ms = [0, 1, 20][r.below(3) as usize];
                        let mut token: *mut lowvram_cancel_token = null_mut();
                        if r.below(4) == 0 && lowvram_cancel_token_new(&mut token) == lowvram_status::Ok {
                            if r.below(2) == 0 {
                                lowvram_cancel_token_cancel(token);
                            }
                            p.cancel_token = token;
                        }
                        let params = if r.below(8) == 0 || init != lowvram_status::Ok { null() } else { &p as *const _ };
                        let s = lowvram_reservation_new_ex(self.ctx, bytes, params, out);
                        lowvram_cancel_token_free(token);
                        s
                    };
                    if self.check("lowvram_reservation_new", s) {
                        let mut b = 0u64;
                        let s = lowvram_reservation_bytes(res, &mut b);
                        self.check("lowvram_reservation_bytes", s);
                        if b != bytes {
                            self.findings.push(format!("reservation of {bytes} bytes reports {b}"));
                        }
                        self.reservations.push(res);
                    } else if res as usize != 0x1 {
                        self.findings
                            .push("lowvram_reservation_new wrote *out on failure".into());
                    }
                }
                16 => {
                    if let Some(res) = self.reservations.pop() {
                        lowvram_reservation_free(res);
                    }
                    let s = lowvram_reservation_bytes(null(), &mut 0);
                    self.check("lowvram_reservation_bytes(NULL)", s);
                }
                17 => self.op_tensor_from_host(r),
                18 => self.op_tensor_info(r),
                19 => self.op_tensor_read(r),
                20 => self.op_write_png(r),
                21 => self.op_denoise(r, avoid_known),
                22 => self.op_decode(r, avoid_known),
                23 => {
                    let n = r.u32();
                    let name = lowvram_status_name(n);
                    if name.is_null()
                        || CStr::from_ptr(name).to_bytes().is_empty()
                        || CStr::from_ptr(lowvram_version()).to_bytes().is_empty()
                    {
                        self.findings
                            .push(format!("lowvram_status_name({n}) or lowvram_version() is empty"));
                    }
                }
                _ => {
                    if r.below(16) == 0 {
                        // probes the CUDA driver: milliseconds, so rarely
                        let size = struct_size(r, size_of::<lowvram_system_info>(), &[], false);
                        let g = Guarded::filled((size as usize).max(4), 0xCD);
                        g.bytes()[..4].copy_from_slice(&size.to_ne_bytes());
                        let s = lowvram_system_stats(g.as_ptr());
                        if !self.check("lowvram_system_stats", s) && g.bytes()[4..].iter().any(|&b| b != 0xCD) {
                            self.findings.push("lowvram_system_stats wrote *out on failure".into());
                        }
                    }
                }
            }
        }
    }

    unsafe fn params_init(
        &mut self,
        r: &mut Reader,
        call: &str,
        full: usize,
        init: impl Fn(*mut u8, usize) -> lowvram_status,
    ) {
        let size = match r.below(6) {
            0 => r.size(full) as usize,
            _ => struct_size(r, full, &[], false) as usize,
        };
        // the host's buffer is `size` bytes (at least the struct_size field)
        let buf_len = size.clamp(4, 1 << 20);
        let g = Guarded::filled(buf_len, 0xAB);
        let p = if r.below(16) == 0 { null_mut() } else { g.as_ptr::<u8>() };
        let s = init(p, size);
        if self.check(call, s) {
            if u32::from_ne_bytes(g.bytes()[..4].try_into().unwrap()) as usize != size {
                self.findings.push(format!("{call}: struct_size not stored ({size})"));
            }
        } else if g.bytes().iter().any(|&b| b != 0xAB) {
            self.findings
                .push(format!("{call} wrote the params on failure (struct_size {size})"));
        }
    }

    unsafe fn op_context_new(&mut self, r: &mut Reader) {
        let full = size_of::<lowvram_context_params>();
        let mut p: lowvram_context_params = std::mem::zeroed();
        p.device = str_arg(r, DEVICES);
        p.config_yaml = str_arg(r, YAMLS);
        p.config_path = if r.below(4) == 0 {
            str_arg(r, CONFIG_PATHS)
        } else {
            null()
        };
        p.log_callback = if r.below(2) == 0 { None } else { Some(log_sink) };
        p.log_user_data = r.u64() as usize as *mut c_void;
        let size = struct_size(r, full, &[], false);
        p.struct_size = size;
        let g = Guarded::new((size as usize).clamp(4, 1 << 20));
        let n = (size as usize).clamp(4, full);
        std::ptr::copy_nonoverlapping((&p as *const lowvram_context_params).cast::<u8>(), g.ptr, n);
        for b in g.bytes().iter_mut().skip(full) {
            *b = 0xEE; // a newer host's fields
        }
        let params = if r.below(8) == 0 {
            null()
        } else {
            g.as_ptr::<lowvram_context_params>() as *const _
        };
        let mut ctx: *mut lowvram_context = 0x1 as *mut _;
        let s = lowvram_context_new(params, if r.below(16) == 0 { null_mut() } else { &mut ctx });
        if self.check("lowvram_context_new", s) {
            let mut stats: lowvram_cache_stats = std::mem::zeroed();
            stats.struct_size = size_of::<lowvram_cache_stats>() as u32;
            let s = lowvram_context_stats(ctx, &mut stats);
            self.check("lowvram_context_stats(new)", s);
            lowvram_context_free(ctx);
        } else if ctx as usize != 0x1 {
            self.findings.push("lowvram_context_new wrote *out on failure".into());
        }
    }

    unsafe fn op_stats(&mut self, r: &mut Reader) {
        let size = struct_size(r, size_of::<lowvram_cache_stats>(), &[], false);
        let g = Guarded::filled((size as usize).clamp(4, 1 << 20), 0xCD);
        g.bytes()[..4].copy_from_slice(&size.to_ne_bytes());
        let ctx = if r.below(8) == 0 { null() } else { self.ctx };
        let out = if r.below(16) == 0 { null_mut() } else { g.as_ptr() };
        let s = lowvram_context_stats(ctx, out);
        if !self.check("lowvram_context_stats", s) && g.bytes()[4..].iter().any(|&b| b != 0xCD) {
            self.findings.push(format!(
                "lowvram_context_stats wrote *out on failure (struct_size {size})"
            ));
        }
    }

    unsafe fn op_model_info(&mut self, r: &mut Reader) {
        let w = r.u8();
        let m = if r.below(8) == 0 { null_mut() } else { self.model(w) };
        let size = struct_size(r, size_of::<lowvram_model_info>(), &[], false);
        let g = Guarded::filled((size as usize).clamp(4, 1 << 20), 0xCD);
        g.bytes()[..4].copy_from_slice(&size.to_ne_bytes());
        let s = lowvram_model_get_info(m, if r.below(16) == 0 { null_mut() } else { g.as_ptr() });
        // Smaller (older) structs are accepted and get the fields they cover: read the whole struct only when the
        // buffer holds it.
        if self.check("lowvram_model_get_info", s) && size as usize >= size_of::<lowvram_model_info>() {
            let info = &*g.as_ptr::<lowvram_model_info>();
            // resident_bytes is in the compute dtype and may exceed total_bytes (storage dtype): an fp16 file in f32.
            if info.kind > 2 || info.resident_block_count > info.block_count {
                self.findings.push(format!(
                    "lowvram_model_get_info: inconsistent kind {} blocks {}/{} bytes {}/{}",
                    info.kind, info.resident_block_count, info.block_count, info.resident_bytes, info.total_bytes
                ));
            }
        } else if s != lowvram_status::Ok && g.bytes()[4..].iter().any(|&b| b != 0xCD) {
            self.findings.push(format!(
                "lowvram_model_get_info wrote *out on failure (struct_size {size})"
            ));
        }
    }

    unsafe fn op_tensor_from_host(&mut self, r: &mut Reader) {
        let dtype = match r.below(8) {
            0 => r.u32(),
            n => (n % 3) as u32,
        };
        let ndim = match r.below(8) {
            0 => r.below(17),
            _ => 1 + r.below(5),
        };
        let shape: Vec<i64> = (0..ndim)
            .map(|_| match r.below(8) {
                0 => *r.pick(INTERESTING) as i64,
                1 => -(r.below(3) as i64),
                _ => r.below(9) as i64,
            })
            .collect();
        let esize: u128 = if dtype == 0 { 4 } else { 2 };
        let exact: u128 = shape
            .iter()
            .try_fold(esize, |a, &d| (d >= 0).then(|| a.saturating_mul(d as u128)))
            .unwrap_or(0);
        let data_len = match r.below(8) {
            0 => r.size(64) as usize % (1 << 20),
            1 => (exact as usize).wrapping_add(1) % (1 << 20),
            _ if exact <= 1 << 20 => exact as usize,
            _ => r.below(64),
        };
        let data = Guarded::new(data_len);
        for (i, b) in data.bytes().iter_mut().enumerate() {
            *b = (i as u8) & 0x3f;
        }
        let shape_g = Guarded::new(ndim * 8);
        std::ptr::copy_nonoverlapping(shape.as_ptr().cast::<u8>(), shape_g.ptr, ndim * 8);
        let shape_ptr = if r.below(16) == 0 {
            null()
        } else {
            shape_g.as_ptr::<i64>() as *const i64
        };
        let data_ptr = if r.below(16) == 0 {
            null()
        } else {
            data.as_ptr::<c_void>() as *const c_void
        };
        let mut t: *mut lowvram_tensor = 0x1 as *mut _;
        let s = lowvram_tensor_from_host(
            dtype,
            shape_ptr,
            ndim,
            data_ptr,
            data_len,
            if r.below(16) == 0 { null_mut() } else { &mut t },
        );
        if self.check("lowvram_tensor_from_host", s) {
            self.tensors.push(t);
            // what goes in comes back out
            let mut d = 99u32;
            let mut dims = [0i64; LOWVRAM_MAX_DIMS];
            let (mut nd, mut len) = (0usize, 0usize);
            let s = lowvram_tensor_info(
                t,
                (&mut d as *mut u32).cast(),
                dims.as_mut_ptr(),
                dims.len(),
                &mut nd,
                &mut len,
            );
            if !self.check("lowvram_tensor_info(round trip)", s)
                || d != dtype
                || dims[..nd] != shape[..]
                || len != data_len
            {
                self.findings.push(format!(
                    "tensor round trip: dtype {dtype}→{d}, shape {shape:?}→{:?}, bytes {data_len}→{len}",
                    &dims[..nd.min(8)]
                ));
                return;
            }
            let back = Guarded::new(len);
            let s = lowvram_tensor_read(t, back.as_ptr(), len);
            if self.check("lowvram_tensor_read(round trip)", s) && back.bytes() != data.bytes() {
                self.findings
                    .push(format!("tensor round trip: the bytes differ (shape {shape:?})"));
            }
        } else if t as usize != 0x1 {
            self.findings
                .push("lowvram_tensor_from_host wrote *out on failure".into());
        }
    }

    unsafe fn op_tensor_info(&mut self, r: &mut Reader) {
        let t = self.tensor(r);
        let cap = r.below(11);
        let shape = Guarded::filled(cap * 8, 0xCD);
        let mut d = 0xCDCD_CDCDu32;
        let (mut nd, mut len) = (0xCDusize, 0xCDusize);
        let s = lowvram_tensor_info(
            t,
            if r.below(2) == 0 {
                null_mut()
            } else {
                (&mut d as *mut u32).cast()
            },
            if r.below(4) == 0 { null_mut() } else { shape.as_ptr() },
            cap,
            if r.below(2) == 0 { null_mut() } else { &mut nd },
            if r.below(2) == 0 { null_mut() } else { &mut len },
        );
        if !self.check("lowvram_tensor_info", s)
            && (d != 0xCDCD_CDCD || nd != 0xCD || len != 0xCD || shape.bytes().iter().any(|&b| b != 0xCD))
        {
            self.findings
                .push("lowvram_tensor_info wrote an out-parameter on failure".into());
        }
    }

    unsafe fn op_tensor_read(&mut self, r: &mut Reader) {
        let t = self.tensor(r);
        let mut len = 0usize;
        if !t.is_null() {
            lowvram_tensor_info(t, null_mut(), null_mut(), 0, null_mut(), &mut len);
        }
        let buf_len = match r.below(4) {
            0 => len.saturating_sub(1 + r.below(8)),
            1 => len + 1 + r.below(8),
            2 => r.size(64) as usize % (1 << 20),
            _ => len,
        };
        let buf = Guarded::filled(buf_len, 0xCD);
        let s = lowvram_tensor_read(t, if r.below(16) == 0 { null_mut() } else { buf.as_ptr() }, buf_len);
        if !self.check("lowvram_tensor_read", s) && buf.bytes().iter().any(|&b| b != 0xCD) {
            self.findings
                .push("lowvram_tensor_read wrote the buffer on failure".into());
        }
    }

    unsafe fn op_write_png(&mut self, r: &mut Reader) {
        let t = self.tensor(r);
        let mut dims = [0i64; LOWVRAM_MAX_DIMS];
        let mut nd = 0usize;
        if !t.is_null() {
            lowvram_tensor_info(t, null_mut(), dims.as_mut_ptr(), dims.len(), &mut nd, null_mut());
            if nd >= 1 && dims[0] > 4 {
                return; // one file per batch item: keep the run's disk use small
            }
        }
        let path = std::ffi::CString::new(self.scratch.join("fuzz.png").as_os_str().as_encoded_bytes()).unwrap();
        let p = match r.below(8) {
            0 => null(),
            1 => c"/nonexistent/dir/x.png".as_ptr(),
            2 => NOT_UTF8.as_ptr().cast(),
            _ => path.as_ptr(),
        };
        let s = lowvram_tensor_write_png(t, p);
        self.check("lowvram_tensor_write_png", s);
    }

    unsafe fn op_denoise(&mut self, r: &mut Reader, avoid_known: bool) {
        let full = size_of::<lowvram_denoise_params>();
        let mut p: lowvram_denoise_params = std::mem::zeroed();
        lowvram_denoise_params_init(&mut p, full);
        p.scheduler = if r.below(8) == 0 { r.u32() } else { r.below(4) as u32 };
        let karras = if r.below(8) == 0 { r.u8() } else { r.below(2) as u8 };
        let karras = if avoid_known && known::bool_byte_is_hostile(karras) {
            1
        } else {
            karras
        };
        p.steps = match r.below(8) {
            0 => r.u64() as u32,
            1 => *r.pick(&[0u32, 1000, 1001, u32::MAX]),
            _ => 1 + r.below(3) as u32,
        };
        p.guidance = *r.pick(&[7.5f32, 1.0, 0.0, -1.0, 2.5, 1e38, f32::NAN, f32::INFINITY, 1e7]);
        p.seed = r.u64();
        let side = |r: &mut Reader| match r.below(16) {
            0 => r.u32(),
            1 => *r.pick(&[0u32, 65535, 1 << 20]),
            _ => 1 + r.below(8) as u32,
        };
        p.latent_width = side(r);
        p.latent_height = side(r);
        if avoid_known
            && (known::denoise_size_is_hostile(p.steps, p.latent_width, p.latent_height)
                || known::guidance_is_hostile(p.guidance))
        {
            p.steps = p.steps.min(3);
            p.latent_width = p.latent_width.min(8);
            p.latent_height = p.latent_height.min(8);
            p.guidance = 7.5;
        }
        // work bound for valid sizes: the CPU runs these for real
        if p.steps <= 1000 && (p.latent_width as u64) * (p.latent_height as u64) <= 1 << 16 {
            p.steps = p.steps.min(3);
            p.latent_width = p.latent_width.min(16);
            p.latent_height = p.latent_height.min(16);
        }
        p.step_noise = if r.below(8) == 0 {
            self.small_tensor(r, RUN_INPUT_BYTES)
        } else {
            null()
        };
        p.progress = match r.below(4) {
            0 => None,
            1 => Some(progress_cancel),
            _ => Some(progress_continue),
        };
        p.progress_user_data = r.u64() as usize as *mut c_void;
        let pointer_fields = [
            (offset_of!(lowvram_denoise_params, step_noise), 8),
            (offset_of!(lowvram_denoise_params, progress), 8),
            (offset_of!(lowvram_denoise_params, progress_user_data), 8),
        ];
        let size = struct_size(r, full, &pointer_fields, avoid_known);
        p.struct_size = size;
        let g = Guarded::new((size as usize).clamp(4, 1 << 20));
        std::ptr::copy_nonoverlapping(
            (&p as *const lowvram_denoise_params).cast::<u8>(),
            g.ptr,
            (size as usize).clamp(4, full),
        );
        // the bool as the host's byte
        if (size as usize) > offset_of!(lowvram_denoise_params, karras) {
            g.bytes()[offset_of!(lowvram_denoise_params, karras)] = karras;
        }
        for b in g.bytes().iter_mut().skip(full) {
            *b = 0xEE;
        }
        let w = r.u8();
        let unet = if r.below(16) == 0 {
            null_mut()
        } else {
            self.model(if r.below(8) == 0 { w } else { 0 })
        };
        let cond = self.small_tensor(r, RUN_INPUT_BYTES);
        let uncond = if r.below(2) == 0 {
            null()
        } else {
            self.small_tensor(r, RUN_INPUT_BYTES)
        };
        let mut init_noise = if r.below(2) == 0 {
            null()
        } else {
            self.small_tensor(r, RUN_INPUT_BYTES)
        };
        let ctx = if !avoid_known && r.below(16) == 0 {
            self.other_context()
        } else {
            self.ctx
        };
        let (report, report_size) = self.report(r);
        let mut out: *mut lowvram_tensor = 0x1 as *mut _;
        let params: *const lowvram_denoise_params = if r.below(8) == 0 {
            null()
        } else {
            g.as_ptr::<lowvram_denoise_params>()
        };
        // Params that do not cover the latent size leave the default, 64×64 (a 512 px image: seconds per step on
        // the CPU, a valid but slow call). Noise of a small latent sets the size instead.
        if params.is_null() || (size as usize) < offset_of!(lowvram_denoise_params, latent_height) + 4 {
            init_noise = self.zeros(&[1, 4, 1 + r.below(8) as i64, 1 + r.below(8) as i64]);
        }
        if std::env::var_os("LOWVRAM_FUZZ_TRACE").is_some() {
            eprintln!(
                "c_api: denoise struct_size {size} scheduler {} karras {karras} steps {} guidance {} latent {}x{} step_noise {:?} progress {} params {:?} unet {unet:?} cond {cond:?} uncond {uncond:?} init_noise {init_noise:?} report {report_size}",
                p.scheduler, p.steps, p.guidance, p.latent_width, p.latent_height, p.step_noise, p.progress.is_some(), params
            );
            for (name, t) in [
                ("cond", cond),
                ("uncond", uncond),
                ("init_noise", init_noise),
                ("step_noise", p.step_noise),
            ] {
                let mut dims = [0i64; LOWVRAM_MAX_DIMS];
                let mut nd = 0usize;
                if !t.is_null() {
                    lowvram_tensor_info(t, null_mut(), dims.as_mut_ptr(), dims.len(), &mut nd, null_mut());
                    eprintln!("c_api:   {name} shape {:?}", &dims[..nd]);
                }
            }
        }
        let s = lowvram_denoise(
            ctx,
            unet,
            params,
            cond,
            uncond,
            init_noise,
            report.as_ref().map_or(null_mut(), |g| g.as_ptr()),
            if r.below(16) == 0 { null_mut() } else { &mut out },
        );
        let ok = self.check("lowvram_denoise", s);
        if let Some((step, total)) = BAD_PROGRESS.with(|c| c.take()) {
            self.findings
                .push(format!("lowvram_denoise reported progress step {step} of {total}"));
        }
        self.after_run("lowvram_denoise", ok, out, report.as_ref(), report_size);
        if ok && ctx != self.ctx as *const _ {
            self.findings
                .push("lowvram_denoise ran a model of one context on another".into());
        }
        if ok && !known::guidance_is_hostile(p.guidance) {
            self.check_finite(out, "lowvram_denoise");
        }
    }

    unsafe fn op_decode(&mut self, r: &mut Reader, avoid_known: bool) {
        let full = size_of::<lowvram_decode_params>();
        let mut p: lowvram_decode_params = std::mem::zeroed();
        lowvram_decode_params_init(&mut p, full);
        p.tile_latent = match r.below(8) {
            0 => r.u32(),
            1 | 2 => 1 + r.below(4) as u32,
            _ => 0,
        };
        p.overlap_latent = if r.below(8) == 0 { r.u32() } else { 0 };
        let never = if r.below(8) == 0 { r.u8() } else { r.below(2) as u8 };
        let never = if avoid_known && known::bool_byte_is_hostile(never) {
            1
        } else {
            never
        };
        let size = struct_size(r, full, &[], avoid_known);
        p.struct_size = size;
        let g = Guarded::new((size as usize).clamp(4, 1 << 20));
        std::ptr::copy_nonoverlapping(
            (&p as *const lowvram_decode_params).cast::<u8>(),
            g.ptr,
            (size as usize).clamp(4, full),
        );
        if (size as usize) > offset_of!(lowvram_decode_params, never_tile) {
            g.bytes()[offset_of!(lowvram_decode_params, never_tile)] = never;
        }
        for b in g.bytes().iter_mut().skip(full) {
            *b = 0xEE;
        }
        let w = r.u8();
        let vae = if r.below(16) == 0 {
            null_mut()
        } else {
            self.model(if r.below(8) == 0 { w } else { 1 })
        };
        let latents = self.small_tensor(r, RUN_INPUT_BYTES);
        let ctx = if !avoid_known && r.below(16) == 0 {
            self.other_context()
        } else {
            self.ctx
        };
        let (report, report_size) = self.report(r);
        let mut out: *mut lowvram_tensor = 0x1 as *mut _;
        let params = if r.below(8) == 0 {
            null()
        } else {
            g.as_ptr::<lowvram_decode_params>() as *const _
        };
        let s = lowvram_vae_decode(
            ctx,
            vae,
            params,
            latents,
            report.as_ref().map_or(null_mut(), |g| g.as_ptr()),
            if r.below(16) == 0 { null_mut() } else { &mut out },
        );
        let ok = self.check("lowvram_vae_decode", s);
        self.after_run("lowvram_vae_decode", ok, out, report.as_ref(), report_size);
        if ok && ctx != self.ctx as *const _ {
            self.findings
                .push("lowvram_vae_decode ran a model of one context on another".into());
        }
    }

    /// A new f32 tensor of zeros, kept in the pool.
    fn zeros(&mut self, shape: &[i64]) -> *const lowvram_tensor {
        let n = shape.iter().product::<i64>() as usize;
        let data = vec![0f32; n];
        let mut t = null_mut();
        let s =
            unsafe { lowvram_tensor_from_host(0, shape.as_ptr(), shape.len(), data.as_ptr().cast(), n * 4, &mut t) };
        if self.check("lowvram_tensor_from_host(zeros)", s) {
            self.tensors.push(t);
        }
        t
    }

    /// A second context, for calls that pass a model to the wrong one.
    unsafe fn other_context(&mut self) -> *const lowvram_context {
        if self.other_ctx.is_null() {
            lowvram_context_new(null(), &mut self.other_ctx);
        }
        self.other_ctx
    }

    fn report(&mut self, r: &mut Reader) -> (Option<Guarded>, u32) {
        if r.below(4) == 0 {
            return (None, 0);
        }
        let size = struct_size(r, size_of::<lowvram_run_report>(), &[], false);
        let g = Guarded::filled((size as usize).clamp(4, 1 << 20), 0xCD);
        g.bytes()[..4].copy_from_slice(&size.to_ne_bytes());
        (Some(g), size)
    }

    fn after_run(
        &mut self,
        call: &str,
        ok: bool,
        out: *mut lowvram_tensor,
        report: Option<&Guarded>,
        report_size: u32,
    ) {
        if ok {
            self.tensors.push(out);
        } else if out as usize != 0x1 {
            self.findings.push(format!("{call} wrote its output on failure"));
        }
        if let Some(g) = report {
            // Reports of any struct_size ≥ 4 are accepted (older hosts' smaller structs) and written on failure
            // too; only a struct_size below 4 is rejected, and then nothing may be written.
            if !ok && g.bytes()[4..].iter().any(|&b| b != 0xCD) && report_size < 4 {
                self.findings
                    .push(format!("{call} wrote a report it rejected (struct_size {report_size})"));
            }
        }
    }

    unsafe fn check_finite(&mut self, t: *mut lowvram_tensor, call: &str) {
        let mut len = 0usize;
        lowvram_tensor_info(t, null_mut(), null_mut(), 0, null_mut(), &mut len);
        let mut v = vec![0f32; len / 4];
        lowvram_tensor_read(t, v.as_mut_ptr().cast(), len);
        if v.iter().any(|x| !x.is_finite()) {
            self.findings.push(format!("{call} returned OK with non-finite values"));
        }
    }
}

pub struct CApi {
    scratch: std::path::PathBuf,
}

impl CApi {
    pub fn new(scratch: &std::path::Path) -> Self {
        // model paths in the dictionaries are relative to the repository
        std::env::set_current_dir(env!("CARGO_MANIFEST_DIR")).expect("cd to the repository");
        Self {
            scratch: scratch.to_path_buf(),
        }
    }
}

impl Target for CApi {
    fn name(&self) -> &'static str {
        "c_api"
    }
    fn seeds(&mut self) -> Vec<Vec<u8>> {
        // every op once with default-ish arguments, then a denoise + decode session
        let mut seeds: Vec<Vec<u8>> = (0..25u8)
            .map(|op| vec![0, 0, op, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
            .collect();
        seeds.push(vec![
            0, 2, 21, 0, 1, 0, 1, 0, 2, 2, 2, 2, 3, 3, 0, 0, 0, 2, 2, 2, 2, 22, 0, 3, 3, 3, 3, 3, 3, 3, 3,
        ]);
        seeds
    }
    fn mutate(&mut self, input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng) {
        havoc(input, corpus, &[], rng, 512);
    }
    fn run(&mut self, input: &[u8], avoid_known: bool) -> Outcome {
        let mut r = Reader { data: input, at: 0 };
        let mut s = Session {
            ctx: null_mut(),
            other_ctx: null_mut(),
            unet: null_mut(),
            vae: null_mut(),
            tensors: Vec::new(),
            reservations: Vec::new(),
            scratch: self.scratch.clone(),
            findings: Vec::new(),
            seen: String::new(),
        };
        unsafe {
            let mut p: lowvram_context_params = std::mem::zeroed();
            lowvram_context_params_init(&mut p, size_of::<lowvram_context_params>());
            p.device = r.pick(&[c"cpu", c"emulated:64MiB", c"emulated:8MiB", c"cpu"]).as_ptr();
            p.config_yaml = if r.below(4) == 0 {
                r.pick(YAMLS).as_ptr()
            } else {
                null()
            };
            let st = lowvram_context_new(&p, &mut s.ctx);
            if !s.check("lowvram_context_new(session)", st) {
                return Outcome::Seen(s.seen.clone());
            }
        }
        let mut calls = 0;
        while !r.exhausted() && calls < 12 {
            s.run_op(&mut r, avoid_known);
            calls += 1;
        }
        let findings = std::mem::take(&mut s.findings);
        let seen = std::mem::take(&mut s.seen);
        drop(s);
        match findings.into_iter().next() {
            Some(f) => Outcome::Finding(f),
            None => Outcome::Seen(seen),
        }
    }
}
