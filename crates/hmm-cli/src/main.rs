//! `hmm`: the command line of the userspace HMM toolbox.
//!
//! - `hmm info [--json]`: what this machine's kernel offers the library;
//! - `hmm selftest [--filter PATTERN] [--json] [--strategy WHICH]`: the
//!   ported kernel HMM selftests, each in its own process, under the
//!   mirror's sequence protocol, its range lock, or both.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod info;
mod selftest;

/// Userspace Heterogeneous Memory Management: machine report, conformance suite, benchmarks.
#[derive(Debug, Parser)]
#[command(name = "hmm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Report the kernel features the library needs and whether they are present.
    Info {
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the conformance suite (the kernel's HMM selftests) on the built-in software device.
    Selftest {
        /// Run only cases whose `name` or `name/variant` contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Print a JSON array of results instead of a table.
        #[arg(long)]
        json: bool,
        /// Per-case timeout in seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// The mirror strategies to run every case under.
        #[arg(long, value_enum, default_value_t = selftest::Strategies::Both)]
        strategy: selftest::Strategies,
    },
    /// Measure the library beside the raw kernel primitives, in the same run.
    Bench {
        #[command(subcommand)]
        which: bench::BenchKind,
    },
}

/// Prints an error with its whole source chain.
fn report(err: &dyn std::error::Error) {
    eprintln!("error: {err}");
    let mut src = err.source();
    while let Some(s) = src {
        eprintln!("  caused by: {s}");
        src = s.source();
    }
}

fn main() -> ExitCode {
    // A conformance case re-executes this binary: run it and exit.
    hmm_conformance::child_main_if_requested();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Info { json } => info::run(json),
        Command::Selftest {
            filter,
            json,
            timeout,
            strategy,
        } => selftest::run(filter.as_deref(), json, timeout, strategy),
        Command::Bench { which } => bench::run(which),
    };
    match res {
        Ok(code) => code,
        Err(e) => {
            report(e.as_ref());
            ExitCode::FAILURE
        }
    }
}
