//! The fuzzing engine: a seeded generator, byte and JSON mutators, a message-guided corpus, the crash and hang
//! catcher of a worker process, and the supervisor that restarts a worker after a crash and adds up the counts.
//!
//! Coverage-agnostic (stable Rust has no coverage instrumentation to steer by): an input joins the corpus when
//! its outcome is new — a status with a message never seen before (digits folded), which tracks which check
//! rejected it well enough to reach deeper ones.

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

/// splitmix64: small, fast, and the same sequence on every machine for a seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    /// True with probability `1/n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers that sit on boundaries: sizes, signs, widths, powers of two.
pub const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    8,
    15,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    1023,
    1024,
    4095,
    4096,
    65535,
    65536,
    1 << 20,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 53) + 1,
    (1 << 62),
    (1 << 63) - 1,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

/// Generic byte mutations (AFL's "havoc"): 1–8 stacked edits, with tokens from `dict` and splices from `corpus`.
pub fn havoc(data: &mut Vec<u8>, corpus: &[Vec<u8>], dict: &[&str], rng: &mut Rng, max_len: usize) {
    let rounds = 1 << rng.below(4);
    for _ in 0..rounds {
        match rng.below(12) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = *rng.pick(&[
                    0u8, 0x7f, 0x80, 0xff, b'"', b'\\', b'{', b'[', b':', b',', b'-', b'9', b'\n',
                ]);
            }
            2 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next() as u8;
            }
            3 if !data.is_empty() => {
                // delete a range
                let i = rng.below(data.len());
                let n = 1 + rng.below((data.len() - i).min(64));
                data.drain(i..i + n);
            }
            4 if !data.is_empty() => {
                // duplicate a range
                let i = rng.below(data.len());
                let n = 1 + rng.below((data.len() - i).min(64));
                let chunk: Vec<u8> = data[i..i + n].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, chunk);
            }
            5 if !dict.is_empty() => {
                let tok = rng.pick(dict).as_bytes();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, tok.iter().copied());
            }
            6 if !dict.is_empty() && !data.is_empty() => {
                let tok = rng.pick(dict).as_bytes();
                let at = rng.below(data.len());
                let end = (at + tok.len()).min(data.len());
                data.splice(at..end, tok.iter().copied());
            }
            7 if data.len() >= 8 => {
                // an interesting little-endian integer of 1, 2, 4 or 8 bytes
                let w = 1 << rng.below(4);
                let at = rng.below(data.len() - w + 1);
                let v = rng.pick(INTERESTING).wrapping_add(rng.below(3) as u64).wrapping_sub(1);
                data[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
            }
            8 if !data.is_empty() => {
                let n = rng.below(data.len());
                data.truncate(n);
            }
            9 if !corpus.is_empty() => {
                // splice: our head, another input's tail
                let other = rng.pick(corpus);
                if !other.is_empty() {
                    let cut = rng.below(data.len() + 1);
                    let from = rng.below(other.len());
                    data.truncate(cut);
                    data.extend_from_slice(&other[from..]);
                }
            }
            10 => {
                // a decimal number where digits were
                if let Some(start) = data.iter().position(|b| b.is_ascii_digit()).map(|p| p + rng.below(4)) {
                    let start = start.min(data.len());
                    let end = data[start..]
                        .iter()
                        .position(|b| !b.is_ascii_digit())
                        .map_or(data.len(), |e| start + e);
                    let num = interesting_decimal(rng);
                    data.splice(start..end, num.bytes());
                }
            }
            _ => {
                let at = rng.below(data.len() + 1);
                let n = 1 + rng.below(16);
                let fill = rng.next() as u8;
                data.splice(at..at, std::iter::repeat_n(fill, n));
            }
        }
    }
    data.truncate(max_len);
}

/// A number as JSON or YAML text would hold it, biased to boundaries.
pub fn interesting_decimal(rng: &mut Rng) -> String {
    match rng.below(8) {
        0 => format!("-{}", rng.pick(INTERESTING)),
        1 => rng
            .pick(&[
                "0.5", "-0.0", "1e308", "-1e308", "1e-320", "3.4e38", "1e400", "NaN", "Infinity", "1.5", "0.0001",
            ])
            .to_string(),
        2 => format!("{}", rng.below(10)),
        3 => format!("{}e{}", rng.below(10), rng.below(30)),
        _ => format!("{}", rng.pick(INTERESTING)),
    }
}

/// JSON-aware mutation: change one value somewhere in the document (numbers to boundaries, types swapped, keys
/// dropped or added from `keys`, arrays shortened or grown, strings from `strings`).
pub fn mutate_json(v: &mut Value, keys: &[&str], strings: &[&str], rng: &mut Rng, max_number: Option<u64>) {
    // choose a node by a random walk
    let mut node = v;
    for _ in 0..rng.below(4) + 1 {
        let next_is_leaf = match node {
            Value::Object(m) if !m.is_empty() => {
                let k = m.keys().nth(rng.below(m.len())).cloned().unwrap();
                let child = m.get(&k).unwrap();
                if rng.one_in(2) || !(child.is_object() || child.is_array()) {
                    // mutate this member of the object
                    mutate_member(m, &k, keys, strings, rng, max_number);
                    return;
                }
                false
            }
            Value::Array(a) if !a.is_empty() => {
                if rng.one_in(3) {
                    match rng.below(3) {
                        0 => {
                            a.pop();
                        }
                        1 => {
                            let e = a[rng.below(a.len())].clone();
                            a.push(e);
                        }
                        _ => {
                            let i = rng.below(a.len());
                            a[i] = leaf(rng, strings, max_number);
                        }
                    }
                    return;
                }
                false
            }
            _ => true,
        };
        if next_is_leaf {
            break;
        }
        node = match node {
            Value::Object(m) => {
                let k = m.keys().nth(rng.below(m.len())).cloned().unwrap();
                m.get_mut(&k).unwrap()
            }
            Value::Array(a) => {
                let i = rng.below(a.len());
                &mut a[i]
            }
            _ => unreachable!(),
        };
    }
    match node {
        Value::Object(m) => {
            let k = if !keys.is_empty() && rng.one_in(2) {
                rng.pick(keys).to_string()
            } else {
                "x".into()
            };
            m.insert(k, leaf(rng, strings, max_number));
        }
        Value::Array(a) => a.push(leaf(rng, strings, max_number)),
        other => *other = leaf(rng, strings, max_number),
    }
}

fn mutate_member(
    m: &mut serde_json::Map<String, Value>,
    k: &str,
    keys: &[&str],
    strings: &[&str],
    rng: &mut Rng,
    max_number: Option<u64>,
) {
    match rng.below(8) {
        0 => {
            m.remove(k);
        }
        1 if !keys.is_empty() => {
            m.insert(rng.pick(keys).to_string(), leaf(rng, strings, max_number));
        }
        2 => {
            // the same value in a one-element list, or a list's first element alone
            let v = m.get(k).cloned().unwrap();
            let nv = match v {
                Value::Array(mut a) if !a.is_empty() => a.swap_remove(0),
                other => Value::Array(vec![other]),
            };
            m.insert(k.to_string(), nv);
        }
        _ => {
            let nv = match m.get(k).unwrap() {
                Value::Number(_) => number(rng, max_number),
                Value::Array(a) if !a.is_empty() && rng.one_in(2) => {
                    let mut a = a.clone();
                    let i = rng.below(a.len());
                    a[i] = if a[i].is_number() {
                        number(rng, max_number)
                    } else {
                        leaf(rng, strings, max_number)
                    };
                    Value::Array(a)
                }
                _ => leaf(rng, strings, max_number),
            };
            m.insert(k.to_string(), nv);
        }
    }
}

/// A number, bounded by `max_number` when given (to steer clear of known open findings).
pub fn number(rng: &mut Rng, max_number: Option<u64>) -> Value {
    let n = match rng.below(6) {
        0 => return Value::from(-(rng.below(5) as i64) - 1),
        1 => {
            return serde_json::Number::from_f64(*rng.pick(&[0.5, -0.0, 1e308, 1e-310, 3.4e38, 1.5, 1e-6]))
                .map_or(Value::Null, Value::Number)
        }
        2 => rng.below(9) as u64,
        _ => rng.pick(INTERESTING).wrapping_add(rng.below(3) as u64).wrapping_sub(1),
    };
    Value::from(match max_number {
        Some(max) if n > max => n % (max + 1),
        _ => n,
    })
}

fn leaf(rng: &mut Rng, strings: &[&str], max_number: Option<u64>) -> Value {
    match rng.below(7) {
        0 => Value::Null,
        1 => Value::Bool(rng.one_in(2)),
        2 | 3 => number(rng, max_number),
        4 if !strings.is_empty() => Value::String(rng.pick(strings).to_string()),
        5 => Value::Array((0..rng.below(5)).map(|_| number(rng, max_number)).collect()),
        _ => Value::String(String::new()),
    }
}

/// What one execution showed.
pub enum Outcome {
    /// A result worth a corpus entry if its text was never seen (a status and message, digits folded).
    Seen(String),
    /// A contract violation that did not crash (PANIC status, a write past a declared size, a wrong result):
    /// recorded with its input, and the run continues.
    Finding(String),
}

/// A fuzz target: seeds, a mutator, and one execution.
pub trait Target {
    fn name(&self) -> &'static str;
    fn seeds(&mut self) -> Vec<Vec<u8>>;
    fn mutate(&mut self, input: &mut Vec<u8>, corpus: &[Vec<u8>], rng: &mut Rng);
    /// Run one input. `avoid_known`: stay clear of the findings listed in `known.rs`.
    fn run(&mut self, input: &[u8], avoid_known: bool) -> Outcome;
}

/// Fold digits so `"42 bytes"` and `"43 bytes"` count as one outcome, and cut the text short.
pub fn feature(status: &str, message: &str) -> String {
    let mut s = String::with_capacity(96);
    s.push_str(status);
    s.push(':');
    let mut last_digit = false;
    for c in message.chars().take(160) {
        if c.is_ascii_digit() {
            if !last_digit {
                s.push('#');
            }
            last_digit = true;
        } else {
            s.push(c);
            last_digit = false;
        }
    }
    s
}

// --- the worker: crash, hang and panic catching --------------------------------------------------------------

static CURRENT_INPUT: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
static CURRENT_LEN: AtomicUsize = AtomicUsize::new(0);
static EXECS: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since `EPOCH` at which the running input started; 0 between inputs.
static STARTED_MS: AtomicU64 = AtomicU64::new(0);
static CRASH_PATH: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static EPOCH: once_cell::sync::Lazy<Instant> = once_cell::sync::Lazy::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// Write the input being run to `CRASH_PATH` and a line to stderr. Only async-signal-safe calls.
unsafe fn dump_current(kind: &[u8]) {
    let path = CRASH_PATH.load(Ordering::SeqCst);
    let input = CURRENT_INPUT.load(Ordering::SeqCst);
    let len = CURRENT_LEN.load(Ordering::SeqCst);
    if !path.is_null() && !input.is_null() {
        let fd = libc::open(path, libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC, 0o644);
        if fd >= 0 {
            libc::write(fd, input.cast(), len);
            libc::close(fd);
        }
    }
    let mut line = [0u8; 96];
    let mut n = 0;
    for &b in b"FUZZ-WORKER ".iter().chain(kind).chain(b" execs=") {
        line[n] = b;
        n += 1;
    }
    let mut digits = [0u8; 20];
    let mut d = 0;
    let mut v = EXECS.load(Ordering::SeqCst);
    loop {
        digits[d] = b'0' + (v % 10) as u8;
        d += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    while d > 0 {
        d -= 1;
        line[n] = digits[d];
        n += 1;
    }
    line[n] = b'\n';
    libc::write(1, line.as_ptr().cast(), n + 1);
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    unsafe {
        dump_current(b"CRASH");
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_crash_handlers(path: &Path) {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    CRASH_PATH.store(c.into_raw(), Ordering::SeqCst);
    for sig in [libc::SIGSEGV, libc::SIGBUS, libc::SIGABRT, libc::SIGFPE, libc::SIGILL] {
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as *const () as usize;
            sa.sa_flags = libc::SA_ONSTACK; // a stack overflow runs the handler on the alternate stack Rust set up
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// Cap the worker's address space, so a huge allocation fails (and aborts, which is caught as a crash) instead
/// of taking a shared machine's memory.
pub fn limit_memory(mb: u64) {
    let bytes = mb << 20;
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: bytes,
    };
    unsafe {
        libc::setrlimit(libc::RLIMIT_AS, &lim);
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<u64>().ok()))
        .map_or(0, |pages| {
            pages * (unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64) / 1024
        })
}

pub struct WorkerArgs {
    pub seconds: f64,
    pub max_execs: u64,
    pub seed: u64,
    pub avoid_known: bool,
    pub out_dir: PathBuf,
    pub hang_ms: u64,
    pub mem_mb: u64,
    pub run_index: u32,
    /// Rounds of the leak check after the budget (0: none).
    pub leak_rounds: u32,
}

/// Run `target` in this process until the time or execution budget is spent; print one `REPORT` line.
pub fn worker(target: &mut dyn Target, a: &WorkerArgs) {
    let name = target.name();
    let crash_path = a.out_dir.join(format!("crash-{name}-{}-{}.bin", a.seed, a.run_index));
    install_crash_handlers(&crash_path);
    limit_memory(a.mem_mb);
    // Panics inside the library are caught (by the C boundary or here) and recorded; keep their text off stderr.
    std::panic::set_hook(Box::new(|_| {}));
    let hang_ms = a.hang_ms;
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        let s = STARTED_MS.load(Ordering::SeqCst);
        if s != 0 && now_ms().saturating_sub(s) > hang_ms {
            unsafe {
                dump_current(b"HANG");
                libc::_exit(86);
            }
        }
    });

    let mut rng = Rng::new(a.seed);
    let mut corpus: Vec<Vec<u8>> = Vec::new();
    // Hashes, not texts: the set's own memory stays small, so the RSS samples show the library's.
    let mut seen: HashSet<u64> = HashSet::new();
    let mut findings: Vec<String> = Vec::new();
    let start = Instant::now();
    let mut rss_warm = 0u64;
    let mut rss_max = 0u64;
    let seeds = target.seeds();
    let mut pending: Vec<Vec<u8>> = seeds.clone();
    pending.reverse();
    let mut execs = 0u64;
    loop {
        if execs >= a.max_execs || (execs & 63 == 0 && start.elapsed().as_secs_f64() >= a.seconds) {
            break;
        }
        let input = match pending.pop() {
            Some(s) => s,
            None => {
                let pool: &[Vec<u8>] = if corpus.is_empty() { &seeds } else { &corpus };
                let mut input = if rng.one_in(8) {
                    rng.pick(&seeds).clone()
                } else {
                    rng.pick(pool).clone()
                };
                target.mutate(&mut input, pool, &mut rng);
                input
            }
        };
        CURRENT_INPUT.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
        CURRENT_LEN.store(input.len(), Ordering::SeqCst);
        STARTED_MS.store(now_ms(), Ordering::SeqCst);
        let outcome = catch_unwind(AssertUnwindSafe(|| target.run(&input, a.avoid_known)));
        STARTED_MS.store(0, Ordering::SeqCst);
        execs += 1;
        EXECS.store(execs, Ordering::SeqCst);
        let outcome = match outcome {
            Ok(o) => o,
            Err(p) => Outcome::Finding(format!("Rust panic outside the C boundary: {}", panic_text(&p))),
        };
        match outcome {
            Outcome::Seen(f) => {
                if seen.len() < 1_000_000 && seen.insert(hash(&f)) && corpus.len() < 4096 {
                    corpus.push(input.clone());
                }
            }
            Outcome::Finding(what) => {
                // one class per kind of violation, not per tensor name or number in the message
                let key: String = feature("", &what).chars().take(64).collect();
                if seen.insert(hash(&format!("finding:{key}"))) {
                    let path = a.out_dir.join(format!(
                        "finding-{name}-{}-{}-{}.bin",
                        a.seed,
                        a.run_index,
                        findings.len()
                    ));
                    let _ = std::fs::write(&path, &input);
                    println!("FUZZ-WORKER FINDING {what} (input: {})", path.display());
                    findings.push(what);
                }
            }
        }
        CURRENT_INPUT.store(std::ptr::null_mut(), Ordering::SeqCst);
        if execs & 1023 == 0 {
            let r = rss_kib();
            if rss_warm == 0 && start.elapsed().as_secs_f64() > a.seconds.min(60.0) * 0.2 {
                rss_warm = r;
            }
            rss_max = rss_max.max(r);
        }
    }
    let rss_end = rss_kib();
    // Leak check: replay a fixed set of corpus inputs round after round; after the first round (caches warm,
    // allocator pools grown) resident memory must stay flat. The corpus's own growth cannot hide a leak here.
    let mut leak = String::new();
    if a.leak_rounds > 0 {
        let set: Vec<Vec<u8>> = corpus.iter().chain(&seeds).take(256).cloned().collect();
        let mut first = 0;
        for round in 0..a.leak_rounds {
            for input in &set {
                CURRENT_INPUT.store(input.as_ptr() as *mut u8, Ordering::SeqCst);
                CURRENT_LEN.store(input.len(), Ordering::SeqCst);
                STARTED_MS.store(now_ms(), Ordering::SeqCst);
                let _ = catch_unwind(AssertUnwindSafe(|| target.run(input, a.avoid_known)));
                STARTED_MS.store(0, Ordering::SeqCst);
                CURRENT_INPUT.store(std::ptr::null_mut(), Ordering::SeqCst);
            }
            if round == 0 {
                first = rss_kib();
            }
        }
        leak = format!(
            " leak_inputs={} leak_rounds={} leak_rss_first_kib={first} leak_rss_last_kib={}",
            set.len(),
            a.leak_rounds,
            rss_kib()
        );
    }
    println!(
        "FUZZ-WORKER REPORT execs={execs} seconds={:.2} corpus={} outcomes={} findings={} rss_warm_kib={} rss_end_kib={rss_end} rss_max_kib={}{leak}",
        start.elapsed().as_secs_f64(),
        corpus.len(),
        seen.len(),
        findings.len(),
        if rss_warm == 0 { rss_end } else { rss_warm },
        rss_max.max(rss_end),
    );
    let _ = std::io::stdout().flush();
}

fn hash(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn panic_text(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

// --- the supervisor ------------------------------------------------------------------------------------------

/// What the workers of one target did, added up.
#[derive(Default)]
pub struct Summary {
    pub target: String,
    pub execs: u64,
    pub seconds: f64,
    pub crashes: Vec<String>,
    pub hangs: Vec<String>,
    pub findings: Vec<String>,
    pub rss_warm_kib: u64,
    pub rss_end_kib: u64,
    pub outcomes: u64,
    /// The leak check: inputs, rounds, RSS after the first and the last round.
    pub leak: Option<(u64, u64, u64, u64)>,
}

pub struct SupervisorArgs {
    pub seconds: f64,
    pub max_execs: u64,
    pub seed: u64,
    pub avoid_known: bool,
    pub out_dir: PathBuf,
    pub hang_ms: u64,
    pub mem_mb: u64,
    pub max_restarts: u32,
    pub leak_rounds: u32,
}

/// Run `target` in worker processes for the budget; restart after a crash or hang (with the next seed) until
/// the time is spent or `max_restarts` crashes were collected.
pub fn supervise(target: &str, a: &SupervisorArgs) -> Summary {
    let exe = std::env::current_exe().expect("own executable");
    let mut s = Summary {
        target: target.to_string(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut run = 0u32;
    loop {
        let left = a.seconds - start.elapsed().as_secs_f64();
        if left <= 0.05 || s.execs >= a.max_execs {
            break;
        }
        let log = a.out_dir.join(format!("worker-{target}-{run}.stderr"));
        let out = Command::new(&exe)
            .arg("--worker")
            .arg(target)
            .args(["--seconds", &format!("{left:.3}")])
            .args(["--execs", &(a.max_execs - s.execs).to_string()])
            .args(["--seed", &(a.seed + run as u64).to_string()])
            .args(["--run-index", &run.to_string()])
            .args(["--hang-ms", &a.hang_ms.to_string()])
            .args(["--mem-mb", &a.mem_mb.to_string()])
            .args(["--out", &a.out_dir.display().to_string()])
            .args(["--leak-rounds", &a.leak_rounds.to_string()])
            .args(if a.avoid_known { &["--avoid-known"][..] } else { &[][..] })
            .env("RAYON_NUM_THREADS", "1")
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("worker log"))
            .output()
            .expect("spawn worker");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut ended = false;
        for line in stdout.lines() {
            let Some(rest) = line.strip_prefix("FUZZ-WORKER ") else {
                continue;
            };
            if let Some(r) = rest.strip_prefix("REPORT ") {
                ended = true;
                let mut leak = (0u64, 0u64, 0u64, 0u64);
                for kv in r.split_whitespace() {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, "0"));
                    match k {
                        "leak_inputs" => leak.0 = v.parse().unwrap_or(0),
                        "leak_rounds" => leak.1 = v.parse().unwrap_or(0),
                        "leak_rss_first_kib" => leak.2 = v.parse().unwrap_or(0),
                        "leak_rss_last_kib" => {
                            leak.3 = v.parse().unwrap_or(0);
                            s.leak = Some(leak);
                        }
                        "execs" => s.execs += v.parse::<u64>().unwrap_or(0),
                        "outcomes" => s.outcomes = s.outcomes.max(v.parse().unwrap_or(0)),
                        "rss_warm_kib" => s.rss_warm_kib = v.parse().unwrap_or(0),
                        "rss_end_kib" => s.rss_end_kib = v.parse().unwrap_or(0),
                        _ => {}
                    }
                }
            } else if let Some(f) = rest.strip_prefix("FINDING ") {
                s.findings.push(f.to_string());
            } else if rest.starts_with("CRASH") || rest.starts_with("HANG") {
                let execs: u64 = rest.rsplit('=').next().and_then(|n| n.parse().ok()).unwrap_or(0);
                s.execs += execs.saturating_sub(1);
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                // the first lines say why (an allocation failure, a stack overflow); a backtrace may follow
                let why: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).take(2).collect();
                let input = a
                    .out_dir
                    .join(format!("crash-{target}-{}-{run}.bin", a.seed + run as u64));
                let what = format!(
                    "{} ({}) input {}; stderr: {}",
                    if rest.starts_with("CRASH") { "crash" } else { "hang" },
                    out.status,
                    input.display(),
                    why.join(" | ")
                );
                if rest.starts_with("CRASH") {
                    s.crashes.push(what);
                } else {
                    s.hangs.push(what);
                }
                ended = true;
            }
        }
        if !ended {
            s.crashes.push(format!(
                "worker ended without a report ({}); see {}",
                out.status,
                log.display()
            ));
        }
        run += 1;
        if out.status.success() || run > a.max_restarts {
            break;
        }
    }
    s.seconds = start.elapsed().as_secs_f64();
    s
}
