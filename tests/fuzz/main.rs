//! The fuzzing harness (stable Rust, no cargo-fuzz): five targets over the library's input surfaces —
//! `safetensors` (weight files), `config_json` (config.json and scheduler_config.json readers and what they
//! build), `yaml` (the YAML configuration and the context sizing behind it), `model_load` (a whole component
//! folder through `lowvram_model_load` and a first run) and `c_api` (every exported function's argument decoding).
//! See RELIABILITY.md for the method and the results.
//!
//! `cargo test --release --test fuzz` is the CI smoke run: every target for a couple of seconds with a fixed
//! seed, failing on any crash, hang or finding. `scripts/fuzz.sh SECONDS` is the long run. Options (after `--`):
//!   --target NAME[,NAME]   targets to run (default: all)
//!   --seconds S            seconds per target (default: the smoke run's LOWVRAM_FUZZ_SMOKE_SECONDS or 2)
//!   --execs N              stop a target after N executions
//!   --seed N               first seed (a restarted worker takes the next)   --avoid-known   see known.rs
//!   --out DIR              crash and finding inputs, worker logs (default target/fuzz)
//!   --hang-ms MS --mem-mb MB --max-restarts N   hang limit per input, address-space cap per worker, restarts
//!   --leak-rounds N        after the budget, replay up to 256 corpus inputs N times: RSS must stay flat
//! Reproduce a saved input: `--target NAME --replay FILE`.

mod engine;
mod known;
mod targets;

use std::path::{Path, PathBuf};

use engine::{supervise, worker, SupervisorArgs, Target, WorkerArgs};

const TARGETS: &[&str] = &["safetensors", "config_json", "yaml", "model_load", "c_api"];

fn make(name: &str, scratch: &Path) -> Box<dyn Target> {
    match name {
        "safetensors" => Box::new(targets::safetensors::Safetensors::new(scratch)),
        "config_json" => Box::new(targets::config_json::ConfigJson),
        "yaml" => Box::new(targets::yaml::Yaml),
        "model_load" => Box::new(targets::model_load::ModelLoad::new(scratch)),
        "c_api" => Box::new(targets::c_api::CApi::new(scratch)),
        other => panic!("unknown target {other} (targets: {})", TARGETS.join(", ")),
    }
}

/// A per-process scratch folder for the files targets write, in memory when the machine has /dev/shm.
fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("lowvram-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch folder");
    dir
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |flag: &str, default: f64| {
        value(flag).map_or(default, |v| {
            v.parse().unwrap_or_else(|_| panic!("{flag} {v}: not a number"))
        })
    };
    let smoke = value("--seconds").is_none() && value("--worker").is_none() && value("--replay").is_none();
    let seconds = num(
        "--seconds",
        std::env::var("LOWVRAM_FUZZ_SMOKE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0),
    );
    let max_execs = num("--execs", u64::MAX as f64) as u64;
    let seed = num("--seed", 1.0) as u64;
    // Every finding in known.rs is fixed, so runs generate those inputs too; `--avoid-known` steers clear of the
    // open ones when there are some (`--include-known` is still accepted and is the default).
    let avoid_known = args.iter().any(|a| a == "--avoid-known");
    let out_dir =
        PathBuf::from(value("--out").unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/target/fuzz").into()));
    std::fs::create_dir_all(&out_dir).expect("output folder");
    let hang_ms = num("--hang-ms", 10_000.0) as u64;
    let mem_mb = num("--mem-mb", 4096.0) as u64;

    if let Some(name) = value("--worker") {
        let scratch = scratch_dir();
        let mut target = make(&name, &scratch);
        let run_index = num("--run-index", 0.0) as u32;
        worker(
            target.as_mut(),
            &WorkerArgs {
                seconds,
                max_execs,
                seed,
                avoid_known,
                out_dir,
                hang_ms,
                mem_mb,
                run_index,
                leak_rounds: num("--leak-rounds", 0.0) as u32,
            },
        );
        let _ = std::fs::remove_dir_all(&scratch);
        return;
    }
    if let Some(file) = value("--replay") {
        let name = value("--target").expect("--replay needs --target NAME");
        let scratch = scratch_dir();
        let mut target = make(&name, &scratch);
        let input = std::fs::read(&file).expect("replay input");
        engine::limit_memory(mem_mb); // as in a worker: a huge allocation fails here too
        let outcome = target.run(&input, avoid_known);
        let _ = std::fs::remove_dir_all(&scratch);
        match outcome {
            engine::Outcome::Seen(s) => println!("no finding; outcome: {s}"),
            engine::Outcome::Finding(f) => {
                println!("FINDING: {f}");
                std::process::exit(1);
            }
        }
        return;
    }

    let selected: Vec<String> = match value("--target") {
        Some(list) => list.split(',').map(str::to_string).collect(),
        None => TARGETS.iter().map(|s| s.to_string()).collect(),
    };
    let sup = SupervisorArgs {
        seconds,
        max_execs,
        seed,
        avoid_known,
        out_dir: out_dir.clone(),
        hang_ms,
        mem_mb,
        max_restarts: num("--max-restarts", if smoke { 0.0 } else { 20.0 }) as u32,
        leak_rounds: num("--leak-rounds", 0.0) as u32,
    };
    println!(
        "lowvram fuzz: {} s per target, seed {seed}, {}known findings {}, outputs in {}",
        seconds,
        if smoke { "smoke run, " } else { "" },
        if avoid_known { "avoided" } else { "included" },
        out_dir.display()
    );
    let mut total = 0u64;
    let mut bad = 0usize;
    let mut lines = Vec::new();
    for name in &selected {
        let s = supervise(name, &sup);
        total += s.execs;
        bad += s.crashes.len() + s.hangs.len() + s.findings.len();
        let line = format!(
            "{:<12} {:>11} execs {:>8.1} s {:>9.0}/s  outcomes {:>5}  crashes {}  hangs {}  findings {}  rss {} → {} KiB",
            s.target,
            s.execs,
            s.seconds,
            s.execs as f64 / s.seconds.max(1e-9),
            s.outcomes,
            s.crashes.len(),
            s.hangs.len(),
            s.findings.len(),
            s.rss_warm_kib,
            s.rss_end_kib
        );
        let line = match s.leak {
            Some((inputs, rounds, first, last)) => format!(
                "{line}\n             leak check: {inputs} inputs × {rounds} rounds, RSS {first} KiB after the first round, \
                 {last} KiB after the last ({:+} KiB)",
                last as i64 - first as i64
            ),
            None => line,
        };
        println!("{line}");
        for c in s.crashes.iter().chain(&s.hangs).chain(&s.findings) {
            println!("    {c}");
        }
        lines.push(line);
        lines.extend(
            s.crashes
                .iter()
                .chain(&s.hangs)
                .chain(&s.findings)
                .map(|c| format!("    {c}")),
        );
    }
    let last = format!("total        {total:>11} execs; {bad} crashes, hangs and findings");
    println!("{last}");
    lines.push(last);
    let _ = std::fs::write(out_dir.join("summary.txt"), lines.join("\n") + "\n");
    if bad > 0 {
        std::process::exit(1);
    }
}
