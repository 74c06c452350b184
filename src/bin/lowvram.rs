//! The `lowvram` command line: generate images, decode latents, and report memory.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lowvram", version, about = "Run diffusion models on GPUs too small to hold them")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Host RAM and CUDA devices (never fails for lack of a GPU).
    SystemStats {
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lowvram: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> lowvram::Result<()> {
    match cli.command {
        Command::SystemStats { json } => {
            let stats = lowvram::system::system_stats();
            if json {
                println!("{}", serde_json::to_string(&stats).expect("stats serialise"));
            } else {
                let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
                println!("RAM: {:.2} GiB total, {:.2} GiB free", gib(stats.ram.total_bytes), gib(stats.ram.free_bytes));
                if stats.cuda.available {
                    for d in &stats.devices {
                        println!(
                            "cuda:{} {}: {:.2} GiB total, {:.2} GiB free",
                            d.index,
                            d.name,
                            gib(d.total_bytes),
                            gib(d.free_bytes)
                        );
                    }
                } else {
                    println!("CUDA: unavailable ({})", stats.cuda.reason);
                }
            }
            Ok(())
        }
    }
}
