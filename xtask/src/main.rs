//! `cargo xtask …`: everything from a fresh machine to a demo, the tests and
//! the benchmark. Each command installs what it is missing first.

mod bench;
mod demo;
mod fuzz;
mod setup;

use std::process::Command;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages meshd's build and tests need.
    Setup,
    /// Build meshd (with its eBPF programs) and the test tools.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up, build, then run every test (unit and privileged black-box).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up, build, and show pods' traffic captured by meshd.
    Demo,
    /// Set up, build (release), and measure meshd against a direct connection.
    Bench {
        /// Seconds per throughput run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Runs of each HTTP row: the median is shown, with the range.
        #[arg(long, default_value_t = 1)]
        runs: usize,
        /// Run one scenario only: `same-node`, `cross-node`, `http` or
        /// `scale`.
        #[arg(long)]
        only: Option<String>,
        /// Measure the `meshd` and `meshd-testkit` in this directory (say,
        /// a copy of another commit's release build, for before/after
        /// pairs) instead of building this tree's.
        #[arg(long)]
        bin_dir: Option<std::path::PathBuf>,
    },
    /// Install cargo-fuzz, then run every fuzz target (or one) for a while.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// One target only (see `fuzz/Cargo.toml`).
        #[arg(long)]
        target: Option<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::install(setup::Needs::Test),
        Task::Build { release } => build(release),
        Task::Test { args } => {
            setup::install(setup::Needs::Test)?;
            build(false)?;
            // The default members: everything but the eBPF crate, which
            // meshd's build script builds for its own target.
            cargo(&[&["test"], &strs(&args)[..]].concat())
        }
        Task::Demo => {
            setup::install(setup::Needs::Demo)?;
            build(false)?;
            demo::run()
        }
        Task::Bench {
            seconds,
            runs,
            only,
            bin_dir,
        } => {
            setup::install(setup::Needs::Bench)?;
            if bin_dir.is_none() {
                build(true)?;
            }
            bench::run(seconds, runs.max(1), only.as_deref(), bin_dir)
        }
        Task::Fuzz { seconds, target } => {
            setup::install(setup::Needs::Fuzz)?;
            fuzz::run(seconds, target.as_deref())
        }
    }
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn build(release: bool) -> anyhow::Result<()> {
    let mut args = vec!["build", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).args(args))
}

/// Runs a command, inheriting stdio, failing on a non-zero exit.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(())
}
