//! The `vastai` provider against a stateful fake of the Vast.ai API: a failed GPU is replaced
//! through 429s, a vanished offer, a boot that never joins and a create that answers 500 after
//! creating (settled by label, no duplicate); afterwards no instance exists that no pair owns.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_vast::{self, Faults, VastState};
use common::*;
use serde_json::json;

fn offer(id: u64, machine: u64, price: f64) -> serde_json::Value {
    json!({
        "id": id, "machine_id": machine, "host_id": machine * 10, "gpu_name": "RTX 4090",
        "num_gpus": 1, "gpu_ram": 24564, "dph_total": price, "reliability2": 0.99,
        "inet_down": 800.0, "disk_space": 200.0, "geolocation": "Oregon, US",
        "verified": true, "rentable": true,
    })
}

#[test]
fn replaces_a_failed_gpu_through_api_faults_without_leaking() {
    let t = tempfile::tempdir().unwrap();
    let agent = Path::new(AGENT_GPU);
    let state = Arc::new(Mutex::new(VastState {
        key: "sekrit-key".into(),
        offers: vec![
            offer(101, 1, 0.20), // vanishes before we can take it
            offer(102, 2, 0.25), // its instance never starts its agent
            offer(103, 3, 0.30), // create answers 500 after creating
            offer(104, 4, 0.90), // too dear for the filter
            offer(105, 5, 0.35),
        ],
        faults: Faults {
            search_429: 2,
            gone: HashSet::from([101]),
            never_boot: HashSet::from([102]),
            create_500: HashSet::from([103]),
            ..Faults::default()
        },
        instances: BTreeMap::new(),
        next_id: 5000,
        dir: t.path().join("vast"),
        agent_bin: agent.to_path_buf(),
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/vastai-onstart.sh"),
        log: Vec::new(),
        hold: None,
    }));
    let url = fake_vast::serve(state.clone());
    let _reaper = fake_vast::Reaper(state.clone());
    let cdir = t.path().join("coord");
    fs::create_dir_all(&cdir).unwrap();
    let keyfile = t.path().join("vast.key");
    fs::write(&keyfile, "sekrit-key\n").unwrap();
    // Only offers up to $0.50/h with 1+ GPUs.
    let toml = cdir.join("provision.toml");
    fs::write(
        &toml,
        "[provision.gpu]\ngpu_name = \"4090\"\nmax_price_per_hour = 0.5\nmin_reliability = 0.9\n",
    )
    .unwrap();
    let coord = Coord::start(
        &cdir,
        &[
            "--provider",
            "vastai",
            "--vastai-url",
            &url,
            "--vastai-api-key-file",
            keyfile.to_str().unwrap(),
            "--boot-timeout",
            "6s",
            "--backoff-base",
            "200ms",
            "--config",
            toml.to_str().unwrap(),
        ],
    );
    let name = "vast";
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), name, 200);
    drop(gpu);

    let ok = wait_until(Duration::from_secs(120), || {
        coord
            .pair(name)
            .is_some_and(|p| p["state"] == "Syncing" && p["epoch"] == 3)
    });
    let st = state.lock().unwrap();
    assert!(
        ok,
        "not recovered: {:?}\n{}\nrequests: {:?}",
        coord.pair(name),
        coord.log_text(),
        st.log
    );
    // Exactly one instance is left: the one the pair owns, from offer 103 (created once,
    // despite the 500), restored with the CPU's data.
    assert_eq!(st.instances.len(), 1, "requests: {:?}", st.log);
    let (id, inst) = st.instances.iter().next().unwrap();
    assert_eq!(inst.offer, 103);
    let creates_103 = st
        .log
        .iter()
        .filter(|l| *l == "PUT /api/v0/asks/103/")
        .count();
    assert_eq!(creates_103, 1, "the ambiguous create was not repeated");
    assert!(
        !st.log.iter().any(|l| l == "PUT /api/v0/asks/104/"),
        "filtered offer used"
    );
    assert!(st.log.iter().any(|l| l == "PUT /api/v0/asks/101/"));
    assert!(
        st.log
            .iter()
            .any(|l| l.starts_with("DELETE /api/v0/instances/")),
        "the instance that never joined was destroyed"
    );
    let p = coord.pair(name).unwrap();
    assert_eq!(p["gpu"]["machine"], inst.label.as_str());
    assert_same(&cpu.workspace, &inst.workspace);
    let events = String::from_utf8_lossy(&coord.admin(&["events", "--json"]).stdout).to_string();
    assert!(events.contains("did not join within 6 s"), "{events}");
    assert!(events.contains("is gone"), "{events}");
    // The key never appears in the coordinator's log.
    assert!(!coord.log_text().contains("sekrit-key"));
    println!("recovered on instance {id} ({})", inst.label);
}
