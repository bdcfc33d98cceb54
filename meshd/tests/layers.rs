//! The dependency rule of `meshd/src`, checked: a module uses only modules
//! of a lower layer (see `lib.rs`), so shared helpers sit below the code
//! that uses them and there are no cycles.

use std::{collections::BTreeSet, path::Path};

/// Each top-level module's layer, lowest first. Modules of one layer do
/// not use each other.
const LAYERS: &[(&str, u32)] = &[
    ("net", 0),
    ("spiffe", 0),
    ("policy", 1),
    ("config", 2),
    ("state", 3),
    ("identity", 4),
    ("telemetry", 4),
    ("capture", 5),
    ("hbone", 5),
    ("discovery", 5),
    ("proxy", 6),
    ("admin", 7),
    ("app", 8),
    ("cli", 8),
];

fn layer(module: &str) -> u32 {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .unwrap_or_else(|| panic!("module {module} has no layer: add it to LAYERS and lib.rs"))
        .1
}

/// The top-level modules a source file names through `crate::`.
fn uses(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut rest = code.as_str();
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a::b, c, d::{e, f}}`: the first name of each item.
            let mut depth = 0;
            let mut item_start = true;
            let mut name = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        if !name.is_empty() {
                            found.insert(std::mem::take(&mut name));
                        }
                        item_start = true;
                    }
                    c if item_start && (c.is_alphanumeric() || c == '_') => name.push(c),
                    _ if item_start && !name.is_empty() => {
                        found.insert(std::mem::take(&mut name));
                        item_start = false;
                    }
                    _ => {}
                }
            }
            if !name.is_empty() {
                found.insert(name);
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            found.insert(name);
        }
    }
    found
}

fn walk(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            walk(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

#[test]
fn no_module_uses_one_of_its_own_layer_or_above() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    walk(&src, &mut files);
    let mut broken = Vec::new();
    for file in &files {
        let relative = file.strip_prefix(&src).expect("under src");
        let top = relative
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .expect("a name")
            .trim_end_matches(".rs")
            .to_owned();
        // The binaries (`main.rs`, `bin/`) sit above every layer.
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        let own = layer(&top);
        let text = std::fs::read_to_string(file).expect("read");
        for used in uses(&text) {
            if used == top || used.is_empty() {
                continue;
            }
            if layer(&used) >= own {
                broken.push(format!("{} uses crate::{used}", relative.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "modules that use one of their own layer or above:\n{}",
        broken.join("\n")
    );
    assert!(files.len() > 20, "found the sources");
}

#[test]
fn the_checker_sees_grouped_and_plain_paths() {
    let got = uses("use crate::{a::b, c, d::{e, f}};\nfn x() { crate::g::h(); }\n// crate::z\n");
    let want: BTreeSet<String> = ["a", "c", "d", "g"].iter().map(|s| s.to_string()).collect();
    assert_eq!(got, want);
}
