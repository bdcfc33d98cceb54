//! Installs what is missing on a fresh machine: nightly's rust-src (the eBPF
//! programs build `core` from source), bpf-linker, and Debian packages.

use std::process::Command;

use anyhow::{bail, Context as _};

/// bpf-linker 0.10.x links with rustc's own LLVM; 0.11+ needs a system LLVM
/// newer than Debian 12 ships.
const BPF_LINKER: &str = "0.10.3";
/// Builds the fuzz targets (with nightly and the address sanitizer).
const CARGO_FUZZ: &str = "0.13.2";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Test,
    Demo,
    Bench,
    Fuzz,
}

impl Needs {
    /// Debian packages, as (package, a command it provides).
    fn packages(self) -> Vec<(&'static str, &'static str)> {
        let mut packages = vec![
            ("iproute2", "ip"),
            ("curl", "curl"),
            ("util-linux", "nsenter"),
        ];
        // The mTLS tests drive openssl as a real TLS client and server; the
        // L7 tests load meshd with h2load.
        packages.push(("openssl", "openssl"));
        packages.push(("nghttp2-client", "h2load"));
        // A real Prometheus scrapes meshd in the tests; promtool lints the output.
        packages.push(("prometheus", "promtool"));
        // `meshd graph --format dot` is checked by Graphviz's `dot`.
        packages.push(("graphviz", "dot"));
        if self == Self::Bench {
            packages.push(("iperf3", "iperf3"));
            packages.push(("haproxy", "haproxy"));
            packages.push(("nginx", "nginx"));
            packages.push(("wrk", "wrk"));
        }
        packages
    }
}

pub fn install(needs: Needs) -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    packages(&needs.packages())?;
    if needs == Needs::Test {
        kubernetes_validate()?;
    }
    // The tracing tests and the demo receive spans with the official
    // OpenTelemetry protobufs (Python).
    if matches!(needs, Needs::Test | Needs::Demo) {
        tracing_python()?;
    }
    if needs == Needs::Fuzz {
        cargo_fuzz()?;
    }
    Ok(())
}

fn cargo_fuzz() -> anyhow::Result<()> {
    let version = output(Command::new("cargo").args(["fuzz", "--version"])).unwrap_or_default();
    if version.contains(CARGO_FUZZ) {
        return Ok(());
    }
    eprintln!("xtask: installing cargo-fuzz {CARGO_FUZZ}");
    crate::run(Command::new("cargo").args([
        "install",
        &format!("cargo-fuzz@{CARGO_FUZZ}"),
        "--locked",
        "--force",
    ]))
}

/// Validates the Kubernetes manifests offline (the deploy tests run it).
const KUBERNETES_VALIDATE: &str = "1.37.0";
const VENV: &str = "/usr/local/lib/meshd-xtask/venv";

/// Installs kubernetes-validate from PyPI into a virtualenv of its own,
/// linked onto the PATH.
fn kubernetes_validate() -> anyhow::Result<()> {
    if output(Command::new("sh").args(["-c", "command -v kubernetes-validate"])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing kubernetes-validate {KUBERNETES_VALIDATE}");
    venv()?;
    crate::run(Command::new(format!("{VENV}/bin/pip")).args([
        "install",
        "-q",
        &format!("kubernetes-validate=={KUBERNETES_VALIDATE}"),
    ]))?;
    crate::run(Command::new("ln").args([
        "-sf",
        &format!("{VENV}/bin/kubernetes-validate"),
        "/usr/local/bin/kubernetes-validate",
    ]))
}

/// Makes the virtualenv the Python tools live in (with python3-venv from
/// apt where it is missing), unless it exists.
fn venv() -> anyhow::Result<()> {
    if std::path::Path::new(&format!("{VENV}/bin/python")).exists() {
        return Ok(());
    }
    if Command::new("python3")
        .args(["-m", "venv", VENV])
        .status()
        .map_or(true, |s| !s.success())
    {
        apt_install(&["python3", "python3-venv"])?;
        crate::run(Command::new("python3").args(["-m", "venv", VENV]))?;
    }
    Ok(())
}

/// The tracing tests' Python parts, pinned: an OTLP receiver built from
/// the official protobufs (grpcio, opentelemetry-proto) and an application
/// instrumented with the OpenTelemetry SDK and its OTLP exporter.
const TRACING_PYTHON: [&str; 4] = [
    "grpcio==1.85.3",
    "opentelemetry-proto==1.45.2",
    "opentelemetry-sdk==1.45.2",
    "opentelemetry-exporter-otlp-proto-grpc==1.45.2",
];

/// Installs `TRACING_PYTHON` into the virtualenv unless they import.
fn tracing_python() -> anyhow::Result<()> {
    let python = format!("{VENV}/bin/python");
    let imports = "import grpc, opentelemetry.sdk, opentelemetry.proto, \
                   opentelemetry.exporter.otlp.proto.grpc";
    if output(Command::new(&python).args(["-c", imports])).is_some() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", TRACING_PYTHON.join(" "));
    venv()?;
    let mut pip = Command::new(format!("{VENV}/bin/pip"));
    pip.args(["install", "-q"]).args(TRACING_PYTHON);
    crate::run(&mut pip)
}

fn output(command: &mut Command) -> Option<String> {
    let out = command.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is required to build meshd's eBPF programs")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("xtask: installing the nightly toolchain");
        crate::run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("xtask: adding rust-src to nightly");
        crate::run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER) {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker {BPF_LINKER} (about two minutes)");
    crate::run(Command::new("cargo").args([
        "install",
        &format!("bpf-linker@{BPF_LINKER}"),
        "--locked",
        "--force",
    ]))
}

fn packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(_, command)| {
            output(Command::new("sh").args(["-c", &format!("command -v {command}")])).is_none()
        })
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

fn apt_install(missing: &[&str]) -> anyhow::Result<()> {
    if output(Command::new("id").arg("-u"))
        .as_deref()
        .map(str::trim)
        != Some("0")
    {
        bail!(
            "missing packages {missing:?}; install them as root (apt-get install {})",
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
