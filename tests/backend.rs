//! The forwarding path of the backend rule, in one process: `LOWVRAM_BACKEND=library` with a copy of the CPU build
//! as the backend. Every C call of this test binary then runs in the copy (its own statics: last errors, the log
//! callback), while the Rust API keeps running here. One test only: the choice is made once per process, at the first
//! C call, so nothing may call the C API before the environment is set.
#![cfg(not(feature = "cuda"))]

use std::ffi::{c_char, c_void, CStr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use lowvram::ffi::context::{
    lowvram_context, lowvram_context_free, lowvram_context_new, lowvram_context_params, lowvram_context_params_init,
};
use lowvram::ffi::error::lowvram_last_error_message;
use lowvram::ffi::log::lowvram_set_log_callback;
use lowvram::ffi::status::lowvram_status;
use lowvram::ffi::system::{lowvram_backend, lowvram_system_info, lowvram_system_stats, lowvram_version};
use lowvram::ffi::tensor::{lowvram_tensor, lowvram_tensor_free, lowvram_tensor_from_host, lowvram_tensor_read};
use lowvram::log::lowvram_log_level;

static MESSAGES: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn count(_: lowvram_log_level, _: *const c_char, _: *mut c_void) {
    MESSAGES.fetch_add(1, Ordering::SeqCst);
}

/// The CPU build's shared library, built with this test (cargo builds the crate's cdylib beside the test binaries).
fn built_library() -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let lib = deps.join("liblowvram.so");
    assert!(lib.is_file(), "{} was not built", lib.display());
    lib
}

fn mapped(needle: &str) -> bool {
    std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| l.contains(needle))
}

#[test]
fn library_mode_forwards_every_call_to_the_named_library() {
    let dir = std::env::temp_dir().join(format!("lowvram-backend-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let copy = dir.join("liblowvram_backend_copy.so");
    std::fs::copy(built_library(), &copy).unwrap();
    assert!(!mapped("liblowvram_backend_copy.so"));
    std::env::set_var("LOWVRAM_BACKEND", "library");
    std::env::set_var("LOWVRAM_BACKEND_LIBRARY", &copy);

    unsafe {
        // The first call chooses: the copy is loaded, and reported with its path.
        assert_eq!(CStr::from_ptr(lowvram_version()).to_str().unwrap(), env!("CARGO_PKG_VERSION"));
        assert!(mapped("liblowvram_backend_copy.so"), "the backend library is not mapped");
        let mut info: lowvram_system_info = std::mem::zeroed();
        info.struct_size = std::mem::size_of::<lowvram_system_info>() as u32;
        assert_eq!(lowvram_system_stats(&mut info), lowvram_status::Ok);
        assert_eq!(info.struct_size as usize, std::mem::size_of::<lowvram_system_info>());
        assert_eq!(info.backend, lowvram_backend::Library as u32);
        let reason = CStr::from_ptr(info.backend_reason.as_ptr()).to_str().unwrap();
        assert_eq!(reason, format!("{}, LOWVRAM_BACKEND=library", copy.display()));
        assert!(info.ram_total_bytes > 0);

        // Errors are the copy's, read through the forwarded lowvram_last_error_message.
        assert_eq!(lowvram_system_stats(std::ptr::null_mut()), lowvram_status::NullArgument);
        let msg = CStr::from_ptr(lowvram_last_error_message()).to_string_lossy().into_owned();
        assert!(msg.contains("out"), "{msg}");

        // Handles made by the copy are used and freed by it.
        let data = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let mut back = [0.0f32; 6];
        let mut t: *mut lowvram_tensor = std::ptr::null_mut();
        let shape = [2i64, 3];
        assert_eq!(
            lowvram_tensor_from_host(0, shape.as_ptr(), 2, data.as_ptr().cast(), 24, &mut t),
            lowvram_status::Ok
        );
        assert_eq!(lowvram_tensor_read(t, back.as_mut_ptr().cast(), 24), lowvram_status::Ok);
        assert_eq!(back, data);
        lowvram_tensor_free(t);

        // The process-wide log callback is set in the copy: a context made through the C API (in the copy) logs to
        // it, one made by the Rust API (here, where no callback is set) does not.
        assert_eq!(lowvram_set_log_callback(Some(count), std::ptr::null_mut()), lowvram_status::Ok);
        let _local = lowvram::api::Context::new(lowvram::api::ContextOptions {
            device: Some("cpu".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(MESSAGES.load(Ordering::SeqCst), 0, "the Rust API logged to the copy's callback");
        let mut params = std::mem::MaybeUninit::<lowvram_context_params>::zeroed();
        let size = std::mem::size_of::<lowvram_context_params>();
        assert_eq!(lowvram_context_params_init(params.as_mut_ptr(), size), lowvram_status::Ok);
        let mut params = params.assume_init();
        params.device = c"cpu".as_ptr();
        let mut ctx: *mut lowvram_context = std::ptr::null_mut();
        assert_eq!(lowvram_context_new(&params, &mut ctx), lowvram_status::Ok);
        assert!(MESSAGES.load(Ordering::SeqCst) > 0, "the context made in the copy did not log");
        lowvram_context_free(ctx);
        assert_eq!(lowvram_set_log_callback(None, std::ptr::null_mut()), lowvram_status::Ok);
    }
    assert!(lowvram::backend::current().is_some_and(|c| c.kind == lowvram::backend::BackendKind::Library));
}
