//! What meshd's command-line binaries share: exit statuses, how an error
//! is printed, and running a sibling binary.

use std::{ffi::OsString, os::unix::process::CommandExt as _};

/// Exit status for a configuration that does not validate.
pub const EXIT_CONFIG: u8 = 2;

/// The error and its causes on one line, skipping a cause whose text the
/// line already holds (many errors here already print their source).
pub fn render_chain(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// Replaces this process with the binary `name` installed beside this
/// one, given `args`; returns only the reason it could not.
pub fn run_beside(name: &str, args: &[OsString]) -> anyhow::Error {
    let path = match std::env::current_exe() {
        Ok(exe) => exe.with_file_name(name),
        Err(err) => return anyhow::anyhow!("cannot find this binary's directory: {err}"),
    };
    let err = std::process::Command::new(&path).args(args).exec();
    anyhow::anyhow!(
        "cannot run {}: {err} (it is built and installed with meshd)",
        path.display()
    )
}
