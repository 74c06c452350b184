//! Which build runs this process's work: the CPU one it is, or the CUDA build of the same artifact, installed
//! beside it and used at run time when a driver is present (ggml's model: one package, the CUDA build is a second
//! file). The C library forwards its exports to `liblowvram_cuda.so` (`ffi::backend`); the CLI re-executes
//! `lowvram-cuda`. Both decide here, once per process, and record why.
//!
//! The environment: `LOWVRAM_BACKEND` = `auto` (default) | `cpu` | `cuda` (as auto, but a CPU outcome is printed on
//! stderr) | `library` (use `LOWVRAM_BACKEND_LIBRARY` without probing the driver: for tests and custom backends).
//! `LOWVRAM_BACKEND_LIBRARY` = a backend file to use instead of the one beside this library.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde::Serialize;

/// The environment variable choosing the backend.
pub const ENV_BACKEND: &str = "LOWVRAM_BACKEND";
/// The environment variable naming a backend library file.
pub const ENV_LIBRARY: &str = "LOWVRAM_BACKEND_LIBRARY";

/// What runs the calls. The numbers are the C enum `lowvram_backend`'s (stable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The built-in CPU implementation.
    Cpu = 0,
    /// The CUDA build.
    Cuda = 1,
    /// A library named by `LOWVRAM_BACKEND_LIBRARY` in `library` mode.
    Library = 2,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Library => "library",
        }
    }
}

/// The process's backend and why it was chosen (`reason` is for people: the file, the driver, or what failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Choice {
    pub kind: BackendKind,
    /// The backend file forwarded to; None for the CPU.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    pub reason: String,
}

impl Choice {
    pub fn cpu(reason: impl Into<String>) -> Self {
        Self { kind: BackendKind::Cpu, path: None, reason: reason.into() }
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} — {}", self.kind.name(), self.reason)
    }
}

/// `LOWVRAM_BACKEND`'s values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Auto,
    Cpu,
    Cuda,
    Library,
}

impl Mode {
    /// The mode the environment asks for; an unknown value is an error naming the accepted ones.
    pub fn from_env() -> Result<Self, String> {
        match std::env::var(ENV_BACKEND) {
            Err(std::env::VarError::NotPresent) => Ok(Self::Auto),
            Ok(v) => match v.trim() {
                "" | "auto" => Ok(Self::Auto),
                "cpu" => Ok(Self::Cpu),
                "cuda" => Ok(Self::Cuda),
                "library" => Ok(Self::Library),
                other => Err(format!("{ENV_BACKEND}={other} is not one of auto, cpu, cuda, library")),
            },
            Err(e) => Err(format!("{ENV_BACKEND}: {e}")),
        }
    }
}

/// A backend file to load (or execute), found by [`locate`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub kind: BackendKind,
    pub path: PathBuf,
    /// What justified it, e.g. "driver 13.0, 1 device" or "LOWVRAM_BACKEND=library".
    pub detail: String,
}

/// Where to look for the CUDA build of an artifact.
pub struct Search<'a> {
    /// Its file name, e.g. "liblowvram_cuda.so".
    pub file_name: &'a str,
    /// An environment variable naming the file instead (None: the artifact has no override).
    pub override_var: Option<&'a str>,
    /// Folders searched in order (the first is where the running file is).
    pub dirs: Vec<PathBuf>,
    /// The running file: a target that is this same file is refused (forwarding to oneself never ends).
    pub own: Option<PathBuf>,
}

/// Decide where this process's work goes, without loading anything: Ok(target) or Err(why the CPU). `auto`/`cuda`
/// need the CUDA driver with at least one device and the file; `library` needs only the override variable.
pub fn locate(
    mode: Mode,
    search: &Search<'_>,
    driver: impl FnOnce() -> Result<crate::system::DriverInfo, String>,
) -> Result<Target, String> {
    let named =
        search.override_var.and_then(|v| std::env::var_os(v).filter(|p| !p.is_empty()).map(|p| (v, PathBuf::from(p))));
    let (kind, path, detail) = match mode {
        Mode::Cpu => return Err(format!("{ENV_BACKEND}=cpu")),
        Mode::Library => {
            let Some((var, path)) = named else {
                return Err(match search.override_var {
                    Some(var) => format!("{ENV_BACKEND}=library but {var} is not set"),
                    None => format!("{ENV_BACKEND}=library applies to the C library only"),
                });
            };
            if !path.is_file() {
                return Err(format!("{var}={}: no such file", path.display()));
            }
            (BackendKind::Library, path, format!("{ENV_BACKEND}=library"))
        }
        Mode::Auto | Mode::Cuda => {
            let info = driver()?;
            let path = match named {
                Some((_, path)) if path.is_file() => path,
                Some((var, path)) => return Err(format!("{var}={}: no such file", path.display())),
                None => match search.dirs.iter().map(|d| d.join(search.file_name)).find(|p| p.is_file()) {
                    Some(path) => path,
                    None => return Err(not_found(search)),
                },
            };
            let plural = if info.devices == 1 { "" } else { "s" };
            (BackendKind::Cuda, path, format!("driver {}, {} device{plural}", info.version, info.devices))
        }
    };
    if let Some(own) = &search.own {
        if same_file(&path, own) {
            return Err(format!("{} is this file itself ({})", path.display(), own.display()));
        }
    }
    Ok(Target { kind, path, detail })
}

fn not_found(search: &Search<'_>) -> String {
    let dirs: Vec<String> = search.dirs.iter().map(|d| d.display().to_string()).collect();
    let own = search.own.as_ref().map_or_else(|| "this file".into(), |p| p.display().to_string());
    match dirs.as_slice() {
        [_] => format!("{} not found beside {own}", search.file_name),
        _ => format!("{} not found in {}", search.file_name, dirs.join(", ")),
    }
}

/// Whether two paths are one file (device and inode): a copy is a different file, a link is the same.
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

static CURRENT: OnceLock<Choice> = OnceLock::new();

/// Record the process's choice (the first recorded wins: the choice is made once) and return the one in force.
/// In `cuda` mode a CPU outcome is printed on stderr: the host asked for the GPU and does not get it.
pub fn record(choice: Choice) -> &'static Choice {
    let mut first = false;
    let c = CURRENT.get_or_init(|| {
        first = true;
        choice
    });
    if first && c.kind == BackendKind::Cpu && Mode::from_env() == Ok(Mode::Cuda) {
        eprintln!("lowvram: {ENV_BACKEND}=cuda, but running on the CPU: {}", c.reason);
    }
    c
}

/// The process's backend choice, once made (the C library makes it at its first call, the CLI at start).
pub fn current() -> Option<&'static Choice> {
    CURRENT.get()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::DriverInfo;

    fn one_gpu() -> Result<DriverInfo, String> {
        Ok(DriverInfo { version: "13.0".into(), devices: 1 })
    }

    fn no_driver() -> Result<DriverInfo, String> {
        Err("no NVIDIA driver: cannot load libcuda.so.1 (test)".into())
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lowvram-backend-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn search(dirs: Vec<PathBuf>, own: PathBuf) -> Search<'static> {
        Search { file_name: "liblowvram_cuda.so", override_var: None, dirs, own: Some(own) }
    }

    #[test]
    fn auto_needs_the_driver_then_the_file_beside_this_one() {
        let d = tmp("auto");
        let own = d.join("liblowvram.so");
        std::fs::write(&own, b"cpu").unwrap();
        let s = search(vec![d.clone()], own.clone());
        assert_eq!(locate(Mode::Auto, &s, no_driver).unwrap_err(), "no NVIDIA driver: cannot load libcuda.so.1 (test)");
        let err = locate(Mode::Auto, &s, one_gpu).unwrap_err();
        assert_eq!(err, format!("liblowvram_cuda.so not found beside {}", own.display()));
        std::fs::write(d.join("liblowvram_cuda.so"), b"cuda").unwrap();
        let t = locate(Mode::Cuda, &s, one_gpu).unwrap();
        assert_eq!(
            (t.kind, t.path, t.detail.as_str()),
            (BackendKind::Cuda, d.join("liblowvram_cuda.so"), "driver 13.0, 1 device")
        );
        assert_eq!(locate(Mode::Cpu, &s, one_gpu).unwrap_err(), "LOWVRAM_BACKEND=cpu");
    }

    #[test]
    fn later_folders_are_searched_and_named_when_nothing_is_found() {
        let (a, b) = (tmp("dirs-a"), tmp("dirs-b"));
        let s = Search { file_name: "lowvram-cuda", override_var: None, dirs: vec![a.clone(), b.clone()], own: None };
        let err = locate(Mode::Auto, &s, one_gpu).unwrap_err();
        assert_eq!(err, format!("lowvram-cuda not found in {}, {}", a.display(), b.display()));
        std::fs::write(b.join("lowvram-cuda"), b"x").unwrap();
        assert_eq!(locate(Mode::Auto, &s, one_gpu).unwrap().path, b.join("lowvram-cuda"));
    }

    #[test]
    fn a_target_that_is_this_file_is_refused_but_a_copy_is_not() {
        let d = tmp("self");
        let own = d.join("liblowvram.so");
        std::fs::write(&own, b"cpu").unwrap();
        std::fs::hard_link(&own, d.join("liblowvram_cuda.so")).unwrap();
        let s = search(vec![d.clone()], own.clone());
        let err = locate(Mode::Auto, &s, one_gpu).unwrap_err();
        assert!(err.contains("is this file itself"), "{err}");
        std::fs::remove_file(d.join("liblowvram_cuda.so")).unwrap();
        std::fs::copy(&own, d.join("liblowvram_cuda.so")).unwrap();
        assert!(locate(Mode::Auto, &s, one_gpu).is_ok());
    }

    #[test]
    fn library_mode_skips_the_driver_and_needs_its_file() {
        // A variable only this test sets: the process environment is shared by the test threads.
        let var = "LOWVRAM_TEST_BACKEND_LIBRARY_MODE";
        let d = tmp("library");
        let s = Search { file_name: "liblowvram_cuda.so", override_var: Some(var), dirs: vec![d.clone()], own: None };
        assert_eq!(
            locate(Mode::Library, &s, no_driver).unwrap_err(),
            format!("LOWVRAM_BACKEND=library but {var} is not set")
        );
        std::env::set_var(var, d.join("missing.so"));
        let err = locate(Mode::Library, &s, no_driver).unwrap_err();
        assert!(err.ends_with("missing.so: no such file"), "{err}");
        std::fs::write(d.join("custom.so"), b"x").unwrap();
        std::env::set_var(var, d.join("custom.so"));
        let t = locate(Mode::Library, &s, no_driver).unwrap();
        assert_eq!((t.kind, t.path), (BackendKind::Library, d.join("custom.so")));
        // auto with the variable set uses that file, but still needs the driver
        assert!(locate(Mode::Auto, &s, no_driver).is_err());
        assert_eq!(locate(Mode::Auto, &s, one_gpu).unwrap().path, d.join("custom.so"));
        std::env::remove_var(var);
    }
}
