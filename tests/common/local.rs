//! The `local` provider from a test's point of view: a coordinator that provisions machines as
//! agent processes under `<dir>/machines/<label>/`, and where to find each machine's files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{Coord, wait_until};

pub const BIN_DIR: &str = env!("CARGO_BIN_EXE_agent-gpu");

pub fn bin_dir() -> String {
    Path::new(BIN_DIR).parent().unwrap().display().to_string()
}

pub fn local_coord(dir: &Path) -> Coord {
    local_coord_with(dir, &[])
}

/// A coordinator with the `local` provider and more `serve` arguments.
pub fn local_coord_with(dir: &Path, extra: &[&str]) -> Coord {
    let bins = bin_dir();
    let mut args = vec![
        "--provider",
        "local",
        "--agent-bin-dir",
        &bins,
        "--boot-timeout",
        "60s",
    ];
    args.extend_from_slice(extra);
    Coord::start(dir, &args)
}

/// Machine directories of the local provider (each one a machine that exists).
pub fn machines(coord: &Coord) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(coord.dir.join("machines"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

pub fn state(coord: &Coord, name: &str) -> (String, u64) {
    let p = coord.pair(name).expect("pair listed");
    (
        p["state"].as_str().unwrap().to_string(),
        p["epoch"].as_u64().unwrap(),
    )
}

pub fn wait_state(coord: &Coord, name: &str, want: &str, epoch: u64, secs: u64, logs: &[&Path]) {
    let ok = wait_until(Duration::from_secs(secs), || {
        state(coord, name) == (want.to_string(), epoch)
    });
    if !ok {
        let mut msg = format!(
            "{name} did not reach {want} at epoch {epoch}: {:?}\n--- coordinator\n{}",
            coord.pair(name),
            coord.log_text()
        );
        for l in logs {
            msg.push_str(&format!(
                "\n--- {}\n{}",
                l.display(),
                fs::read_to_string(l).unwrap_or_default()
            ));
        }
        for m in machines(coord) {
            let l = coord.dir.join("machines").join(&m).join("agent.log");
            msg.push_str(&format!(
                "\n--- machine {m}\n{}",
                fs::read_to_string(l).unwrap_or_default()
            ));
        }
        panic!("{msg}");
    }
}

/// The GPU machine the pair has now (its label), from `pairs --json`.
pub fn gpu_machine(coord: &Coord, name: &str) -> String {
    coord.pair(name).unwrap()["gpu"]["machine"]
        .as_str()
        .unwrap()
        .to_string()
}

pub fn machine_ws(coord: &Coord, label: &str) -> PathBuf {
    coord.dir.join("machines").join(label).join("workspace")
}

pub fn machine_state(coord: &Coord, label: &str) -> PathBuf {
    coord.dir.join("machines").join(label).join("state")
}
