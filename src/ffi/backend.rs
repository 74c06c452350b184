//! The CPU build's forwarding of every export to a backend library (the CUDA build, `liblowvram_cuda.so`, beside
//! this one), chosen once per process at the first C call. Compiled only without the `cuda` feature: the CUDA build
//! is the backend and forwards nothing.
//!
//! Rules (`crate::backend` decides, this module loads): the backend is opened with `RTLD_NOW | RTLD_LOCAL` (its
//! symbols never replace ours for other libraries), its `lowvram_version()` must equal ours exactly (the exports'
//! types are then the same), and every name in [`EXPORTS`] must resolve; otherwise the CPU runs the calls and the
//! reason is recorded. The backend is never unloaded: handles it made may live until the process ends.

use std::collections::HashMap;
use std::ffi::{c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use crate::backend::{locate, record, Choice, Mode, Search, Target, ENV_LIBRARY};

/// The backend's file name, looked for beside this library.
pub const BACKEND_FILE: &str = "liblowvram_cuda.so";

/// Every C export. Each one forwards (`forward!` at the top of its body); the unit test below checks this
/// list and the forward lines against the sources, so a new export cannot be forgotten.
pub const EXPORTS: &[&str] = &[
    "lowvram_cancel_token_cancel",
    "lowvram_cancel_token_free",
    "lowvram_cancel_token_is_cancelled",
    "lowvram_cancel_token_new",
    "lowvram_conditioning_free",
    "lowvram_conditioning_get",
    "lowvram_conditioning_new",
    "lowvram_conditioning_set",
    "lowvram_context_cancel",
    "lowvram_context_configure",
    "lowvram_context_free",
    "lowvram_context_free_memory",
    "lowvram_context_new",
    "lowvram_context_params_init",
    "lowvram_context_set_log_callback",
    "lowvram_context_set_log_callback_ex",
    "lowvram_context_stats",
    "lowvram_context_stats_json",
    "lowvram_context_unload_all",
    "lowvram_decode_params_init",
    "lowvram_denoise",
    "lowvram_denoise_params_init",
    "lowvram_last_error_message",
    "lowvram_model_free",
    "lowvram_model_get_info",
    "lowvram_model_load",
    "lowvram_model_load_ex",
    "lowvram_model_load_params_init",
    "lowvram_model_load_to_device",
    "lowvram_pipeline_decode",
    "lowvram_pipeline_denoise",
    "lowvram_pipeline_encode_prompt",
    "lowvram_pipeline_free",
    "lowvram_pipeline_load",
    "lowvram_pipeline_params_init",
    "lowvram_prompt_params_init",
    "lowvram_reservation_bytes",
    "lowvram_reservation_free",
    "lowvram_reservation_new",
    "lowvram_reservation_new_ex",
    "lowvram_reservation_params_init",
    "lowvram_set_log_callback",
    "lowvram_set_log_callback_ex",
    "lowvram_status_name",
    "lowvram_string_free",
    "lowvram_system_stats",
    "lowvram_tensor_free",
    "lowvram_tensor_from_host",
    "lowvram_tensor_info",
    "lowvram_tensor_read",
    "lowvram_tensor_write_png",
    "lowvram_vae_decode",
    "lowvram_version",
];

/// A resolved export's address (plain data; the library it points into is never unloaded).
#[derive(Clone, Copy)]
struct Address(*mut c_void);
// SAFETY: a function address is immutable and valid on every thread.
unsafe impl Send for Address {}
unsafe impl Sync for Address {}

/// The process's backend: the choice, and the loaded library's exports when forwarding.
struct State {
    choice: &'static Choice,
    symbols: Option<HashMap<&'static str, Address>>,
}

static STATE: OnceLock<State> = OnceLock::new();

fn state() -> &'static State {
    STATE.get_or_init(|| {
        // Runs before any export's panic guard: a panic here must not unwind into C.
        std::panic::catch_unwind(|| {
            let (choice, symbols) = choose();
            State { choice: record(choice), symbols }
        })
        .unwrap_or_else(|_| State { choice: record(Choice::cpu("choosing the backend panicked")), symbols: None })
    })
}

/// This process's backend choice (made now if no C call made it yet).
pub(crate) fn choice() -> &'static Choice {
    state().choice
}

/// The backend's export `name`, typed as the caller's own export `_ty`, or None when the CPU runs the calls.
///
/// `_ty` is the calling export's own function item cast to its function-pointer type, so the type cannot drift
/// from the signature; the backend's symbol has the same type because its version equals ours exactly.
pub(crate) fn resolve<F: Copy>(name: &'static str, _ty: F) -> Option<F> {
    let address = state().symbols.as_ref()?.get(name).copied()?;
    const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>(), "F must be a function pointer") };
    // SAFETY: F is an `extern "C" fn` pointer type (size checked) and `address` is the backend's definition of the
    // same export of the same version (see above).
    Some(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&address.0) })
}

fn choose() -> (Choice, Option<HashMap<&'static str, Address>>) {
    let own = own_file();
    let mode = match Mode::from_env() {
        Ok(mode) => mode,
        Err(reason) => return (Choice::cpu(reason), None),
    };
    let search = Search {
        file_name: BACKEND_FILE,
        override_var: Some(ENV_LIBRARY),
        dirs: own.as_ref().and_then(|p| p.parent()).map(|d| vec![d.to_path_buf()]).unwrap_or_default(),
        own: own.clone(),
    };
    let target = match locate(mode, &search, crate::system::cuda_driver) {
        Ok(target) => target,
        Err(reason) => return (Choice::cpu(reason), None),
    };
    match open(&target) {
        Ok(symbols) => {
            let reason = format!("{}, {}", target.path.display(), target.detail);
            (Choice { kind: target.kind, path: Some(target.path), reason }, Some(symbols))
        }
        Err(e) => (Choice::cpu(format!("cannot use {}: {e}", target.path.display())), None),
    }
}

fn open(target: &Target) -> Result<HashMap<&'static str, Address>, String> {
    use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};
    // SAFETY: loading runs the backend's initialisers; a lowvram build has none beyond Rust's own.
    let lib =
        unsafe { Library::open(Some(&target.path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| crate::system::dl_error(&e))?;
    let get = |name: &str| -> Result<Address, String> {
        // SAFETY: only the address is taken; it is called through a correctly typed pointer (`resolve`).
        unsafe { lib.get::<*mut c_void>(name) }
            .map(|s| Address(*s))
            .map_err(|_| format!("it lacks {name} (not a lowvram {} backend)", env!("CARGO_PKG_VERSION")))
    };
    let version = get("lowvram_version")?;
    // SAFETY: every lowvram version exports `lowvram_version` as this signature (ABI rule: never changes).
    let version = unsafe {
        let f: extern "C" fn() -> *const std::ffi::c_char = std::mem::transmute(version.0);
        CStr::from_ptr(f()).to_string_lossy().into_owned()
    };
    if version != env!("CARGO_PKG_VERSION") {
        return Err(format!(
            "its version is {version}, this library's is {} (they must be equal)",
            env!("CARGO_PKG_VERSION")
        ));
    }
    let symbols = EXPORTS.iter().map(|&name| get(name).map(|a| (name, a))).collect::<Result<_, _>>()?;
    // Never unloaded: objects it made may be freed (through it) until the process ends.
    std::mem::forget(lib);
    Ok(symbols)
}

/// The file this code was loaded from: liblowvram.so for a host, the executable for Rust programs.
fn own_file() -> Option<PathBuf> {
    // SAFETY: dladdr only reads the loader's tables; `info` is ours.
    let name = unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(own_file as *const c_void, &mut info) == 0 || info.dli_fname.is_null() {
            None
        } else {
            Some(PathBuf::from(OsStr::from_bytes(CStr::from_ptr(info.dli_fname).to_bytes())))
        }
    };
    // dladdr gives the main program's name as it was started (maybe relative): canonicalise, or ask the kernel.
    name.and_then(|p| std::fs::canonicalize(p).ok()).or_else(|| std::env::current_exe().ok())
}

/// Forward an export to the backend when there is one: `forward!(lowvram_x(a, b));` as the first statement of
/// `lowvram_x`'s body returns the backend's result. `forward!(lowvram_x(a), |status| ...)` passes the backend's
/// result through a closure first. The argument list must be the export's parameters, in order.
macro_rules! forward {
    ($name:ident($($arg:ident),* $(,)?)) => {
        $crate::ffi::backend::forward!($name($($arg),*), |r| r)
    };
    ($name:ident($($arg:ident),* $(,)?), $after:expr) => {
        if let Some(f) = $crate::ffi::backend::resolve(
            stringify!($name),
            $name as unsafe extern "C" fn($($crate::ffi::backend::forward!(@any $arg)),*) -> _,
        ) {
            #[allow(unused_unsafe)]
            // SAFETY: the backend's export has this export's signature; the host's arguments pass through.
            let r = unsafe { f($($arg),*) };
            return ($after)(r);
        }
    };
    (@any $arg:ident) => { _ };
}
pub(crate) use forward;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendKind;
    use crate::ffi::status::lowvram_status;
    use crate::ffi::system::{lowvram_backend, lowvram_system_info, lowvram_system_stats};

    /// Each `extern "C" fn lowvram_*` in src/ffi with its parameter names, and the first statement of its body.
    fn exports_in_sources() -> Vec<(String, Vec<String>, String)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/ffi");
        let mut found = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            for (at, _) in text.match_indices("extern \"C\" fn lowvram_") {
                let rest = &text[at + "extern \"C\" fn ".len()..];
                let open = rest.find('(').unwrap();
                let name = rest[..open].to_string();
                if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    continue; // prose, like this function's doc
                }
                let mut depth = 0;
                let close = rest[open..]
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '(' => 1,
                            ')' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .unwrap()
                    .0
                    + open;
                let params = rest[open + 1..close]
                    .split(',')
                    .filter_map(|p| p.split_once(':').map(|(n, _)| n.trim().to_string()))
                    .collect();
                let body = &rest[close..];
                let body = &body[body.find('{').unwrap() + 1..];
                let first = body.trim_start().lines().next().unwrap_or("").trim().to_string();
                found.push((name, params, first));
            }
        }
        found.sort();
        found
    }

    #[test]
    fn every_export_is_listed_and_forwards_first_with_its_own_parameters() {
        let found = exports_in_sources();
        let names: Vec<&str> = found.iter().map(|(n, _, _)| n.as_str()).collect();
        let mut listed = EXPORTS.to_vec();
        listed.sort();
        assert_eq!(names, listed, "EXPORTS must list exactly the exports in src/ffi");
        assert!(names.len() >= 51);
        for (name, params, first) in &found {
            let call = format!("forward!({name}({})", params.join(", "));
            assert!(
                *first == format!("{call});") || first.starts_with(&format!("{call}, |")),
                "{name}: its body must start with `{call});` (got `{first}`)"
            );
        }
    }

    #[test]
    fn system_stats_report_the_processes_backend_choice() {
        let c = choice();
        assert!(!c.reason.is_empty());
        let mut info: lowvram_system_info = unsafe { std::mem::zeroed() };
        info.struct_size = std::mem::size_of::<lowvram_system_info>() as u32;
        assert_eq!(unsafe { lowvram_system_stats(&mut info) }, lowvram_status::Ok);
        assert_eq!(info.backend, c.kind as u32);
        let reason = unsafe { CStr::from_ptr(info.backend_reason.as_ptr()) }.to_str().unwrap();
        assert_eq!(reason, c.reason);
        if std::env::var_os("LOWVRAM_BACKEND").is_none() && !info.cuda_available {
            // No driver: the CPU runs the calls, and says the driver is why.
            assert_eq!(info.backend, lowvram_backend::Cpu as u32);
            let cuda_reason = unsafe { CStr::from_ptr(info.cuda_reason.as_ptr()) }.to_str().unwrap();
            assert_eq!(reason, cuda_reason, "the backend reason is the driver probe's");
        }
    }

    #[test]
    fn device_cuda_on_the_cpu_backend_says_why() {
        use crate::ffi::context::{
            lowvram_context, lowvram_context_new, lowvram_context_params, lowvram_context_params_init,
        };
        if choice().kind != BackendKind::Cpu {
            return;
        }
        unsafe {
            let mut params = std::mem::MaybeUninit::<lowvram_context_params>::zeroed();
            let size = std::mem::size_of::<lowvram_context_params>();
            assert_eq!(lowvram_context_params_init(params.as_mut_ptr(), size), lowvram_status::Ok);
            let mut params = params.assume_init();
            params.device = c"cuda".as_ptr();
            let mut ctx: *mut lowvram_context = std::ptr::null_mut();
            assert_eq!(lowvram_context_new(&params, &mut ctx), lowvram_status::Unsupported);
            assert!(ctx.is_null());
            let msg = CStr::from_ptr(crate::ffi::error::lowvram_last_error_message()).to_string_lossy().into_owned();
            assert!(msg.contains(&format!("backend cpu — {}", choice().reason)), "{msg}");
        }
    }
}
