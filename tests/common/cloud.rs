//! Glue for the cloud tests: the directory-backed test cloud of the `command` provider
//! (`tests/command-cloud/`), its configuration and its machine listing.

use std::fs;
use std::path::{Path, PathBuf};

/// The scripts of the directory-backed test cloud (`tests/command-cloud/`).
pub fn command_cloud() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/command-cloud")
}

/// Writes `<dir>/coordinator.toml` pointing the `command` provider at the test cloud.
pub fn command_cloud_config(dir: &Path) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    let toml = dir.join("coordinator.toml");
    fs::write(
        &toml,
        format!(
            "[command]\ncreate = \"{0}/create\"\ndestroy = \"{0}/destroy\"\nlist = \"{0}/list\"\n\
             get = \"{0}/get\"\nsearch = [\"{0}/search\"]\ntimeout = \"30s\"\n",
            command_cloud().display()
        ),
    )
    .unwrap();
    toml
}

/// The machines of the test cloud under `cloud` (its directories; lock directories excluded).
pub fn cloud_machines(cloud: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(cloud)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The user running the tests: the on-start scripts run the agent as this user (as root they
/// would otherwise create the user `standby`, which cannot reach the tests' directories).
pub fn test_user() -> String {
    let out = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
