//! `cargo xtask fuzz`: every target in `fuzz/` for a bounded time each,
//! with the checked-in seeds (`fuzz/seeds/<target>`, which also hold every
//! crash found so far, replayed first) and a scratch corpus outside the
//! tree. A crash fails the run; its input is in `fuzz/artifacts/<target>`.

use std::{path::Path, process::Command};

use anyhow::Context as _;

/// The targets, as `fuzz/Cargo.toml` names them.
const TARGETS: [&str; 6] = [
    "config",
    "path_policy",
    "spiffe",
    "baggage",
    "sniffer",
    "observers",
];

pub fn run(seconds: u64, only: Option<&str>) -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?;
    let targets: Vec<&str> = match only {
        Some(one) => {
            anyhow::ensure!(
                TARGETS.contains(&one),
                "no fuzz target {one}; there are {TARGETS:?}"
            );
            vec![one]
        }
        None => TARGETS.to_vec(),
    };
    let scratch = std::env::temp_dir().join("meshd-fuzz-corpus");
    for target in targets {
        let corpus = scratch.join(target);
        std::fs::create_dir_all(&corpus)?;
        let seeds = root.join("fuzz").join("seeds").join(target);
        eprintln!("xtask: fuzzing {target} for {seconds} s");
        crate::run(
            Command::new("cargo")
                .current_dir(root.join("fuzz"))
                .args(["+nightly", "fuzz", "run", "--fuzz-dir", "."])
                .arg(target)
                .arg(&corpus)
                .arg(&seeds)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg("-rss_limit_mb=4096")
                .arg("-max_len=65536"),
        )?;
    }
    Ok(())
}
