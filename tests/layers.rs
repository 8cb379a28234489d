//! The dependency rule of ARCHITECTURE.md, "Layers": `types ← disk ← trust ← replication ←
//! history ← backup ← agent`, and `control` uses the foundations, `disk` and `trust` only; the
//! `programs` on top use any layer, and nothing names them.
//! Checked on the source text: every `crate::<layer>` a file names must be a layer below its own.

use std::path::{Path, PathBuf};

const LAYERS: [&str; 8] = [
    "disk",
    "trust",
    "replication",
    "history",
    "backup",
    "agent",
    "control",
    "programs",
];

/// The layers a file of `layer` may name.
fn allowed(layer: &str) -> &'static [&'static str] {
    match layer {
        "disk" => &[],
        "trust" => &["disk"],
        "replication" => &["disk", "trust"],
        "history" => &["disk", "trust", "replication"],
        "backup" => &["disk", "trust", "replication", "history"],
        "agent" => &["disk", "trust", "replication", "history", "backup"],
        "control" => &["disk", "trust"],
        "programs" => &LAYERS,
        // The foundations name no layer.
        _ => &[],
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The layer a source file belongs to: its top folder or file name under `src/`.
fn layer_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

fn named_layers(text: &str) -> Vec<&'static str> {
    LAYERS
        .into_iter()
        .filter(|l| {
            text.contains(&format!("crate::{l}::")) || text.contains(&format!("crate::{l}}}"))
        })
        .collect()
}

#[test]
fn every_layer_names_only_layers_below_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut broken = Vec::new();
    for f in &files {
        let layer = layer_of(&src, f);
        if layer == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for named in named_layers(&text) {
            if named != layer && !allowed(&layer).contains(&named) {
                broken.push(format!("{} ({layer}) names crate::{named}", f.display()));
            }
        }
    }
    assert!(files.len() > 30, "found only {} files", files.len());
    assert!(
        broken.is_empty(),
        "the dependency rule is broken:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_check_sees_a_forbidden_name() {
    assert_eq!(
        named_layers("use crate::replication::send::Sender;"),
        ["replication"]
    );
    assert!(!allowed("control").contains(&"replication"));
    assert!(allowed("agent").contains(&"replication"));
    assert!(allowed("agent").contains(&"history"));
    assert!(!allowed("control").contains(&"history"));
    assert!(!allowed("history").contains(&"agent"));
    assert!(!allowed("control").contains(&"backup"));
    assert!(!allowed("backup").contains(&"agent"));
    assert!(!allowed("agent").contains(&"programs"));
    assert!(!allowed("control").contains(&"programs"));
}
