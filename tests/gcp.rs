//! The `gcp` provider (CPU standbys on Compute Engine) against a stateful fake of the Compute
//! API and its token endpoint: a pair whose hand-joined standby dies goes Degraded; `recover`
//! rents a Spot VM through a 429, an exhausted zone, a 503 after the create (settled by label,
//! not duplicated) and a VM that never boots; the standby is seeded from the GPU. Then GCE
//! preempts that VM: the pair goes Degraded by itself, a new standby is provisioned and seeded,
//! the preempted VM is deleted, and no VM is left that the pair does not own.

mod common;

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::fake_gce::{self, GceState};
use common::*;

#[test]
fn lost_and_preempted_standbys_are_replaced_on_compute_engine() {
    let t = tempfile::tempdir().unwrap();
    let fixture =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gcp-service-account.json");
    let mut st = GceState::new(
        "standby-test",
        &fixture,
        t.path().join("gce"),
        Path::new(AGENT_CPU).to_path_buf(),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/gcp-startup.sh"),
    );
    st.faults.insert_429 = 1;
    st.faults.exhausted.insert("us-central1-a".into());
    st.faults.insert_503 = 1;
    st.faults.never_boot = 1;
    let state = Arc::new(Mutex::new(st));
    let base = fake_gce::serve(state.clone());
    let _reaper = Reaper(state.clone());

    // The key file as the operator downloads it, pointing at the fake's token endpoint.
    let mut key: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&fixture).unwrap()).unwrap();
    key["token_uri"] = format!("{base}/token").into();
    let keyfile = t.path().join("sa.json");
    fs::write(&keyfile, key.to_string()).unwrap();
    let private_key = key["private_key"].as_str().unwrap().to_string();

    let cdir = t.path().join("coord");
    fs::create_dir_all(&cdir).unwrap();
    let toml = cdir.join("coordinator.toml");
    fs::write(
        &toml,
        format!(
            "[gcp]\nproject = \"standby-test\"\nzones = [\"us-central1-a\", \"us-central1-b\", \"us-central1-c\"]\n\
             credentials_file = \"{}\"\napi_url = \"{base}/compute/v1\"\npoll_interval = \"200ms\"\n",
            keyfile.display()
        ),
    )
    .unwrap();
    let coord = Coord::start(
        &cdir,
        &[
            "--provider",
            "local",
            "--cpu-provider",
            "gcp",
            "--boot-timeout",
            "10s",
            "--backoff-base",
            "200ms",
            "--config",
            toml.to_str().unwrap(),
        ],
    );
    let name = "gce";
    let (cpu, gpu) = hand_joined_pair(&coord, t.path(), name, 200);
    let ws = t.path().join("gpu-ws");

    // The hand-joined standby dies: nobody can say it is gone for good, so the pair is
    // Degraded and waits for an operator.
    drop(cpu);
    let ok = wait_until(Duration::from_secs(30), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Degraded")
    });
    assert!(
        ok,
        "not Degraded: {:?}\n{}",
        coord.pair(name),
        coord.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        state.lock().unwrap().instances.is_empty(),
        "nothing is rented without an operator"
    );
    let out = coord.admin(&["recover", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let first = wait_standby(&coord, name, &state);
    fs::write(
        ws.join("after-recover.txt"),
        b"written on the GPU after the standby was replaced",
    )
    .unwrap();
    assert!(flush(&gpu.state, "20s").status.success());
    {
        let st = state.lock().unwrap();
        assert_eq!(st.instances.len(), 1, "requests: {:#?}", st.log);
        let inst = &st.instances[&first];
        assert_eq!(
            inst.zone, "us-central1-c",
            "zone a is exhausted, the VM in b never booted"
        );
        assert_same(&ws, &inst.workspace);
        let inserts_b = st
            .log
            .iter()
            .filter(|l| l.contains("/zones/us-central1-b/instances") && l.starts_with("POST"))
            .count();
        assert_eq!(
            inserts_b, 1,
            "the create that answered 503 was not repeated"
        );
        assert!(
            st.log
                .iter()
                .any(|l| l.starts_with("DELETE") && l.contains("/zones/us-central1-b/")),
            "the VM that never booted was deleted"
        );
        assert!(
            st.boot_errors.lock().unwrap().is_empty(),
            "{:?}",
            st.boot_errors
        );
    }

    // GCE preempts the Spot VM: the provider says TERMINATED and its agent is silent.
    fake_gce::preempt(&state, &first);
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Degraded")
    });
    assert!(ok, "the preemption was not noticed: {}", coord.log_text());
    let second = wait_standby(&coord, name, &state);
    assert_ne!(first, second);
    assert!(flush(&gpu.state, "20s").status.success());
    // The preempted VM is deleted; only the pair's standby is left.
    let ok = wait_until(Duration::from_secs(30), || {
        state.lock().unwrap().instances.len() == 1
    });
    let st = state.lock().unwrap();
    assert!(
        ok,
        "instances left: {:?}",
        st.instances.keys().collect::<Vec<_>>()
    );
    let inst = &st.instances[&second];
    assert_same(&ws, &inst.workspace);
    assert!(inst.workspace.join("after-recover.txt").exists());
    let p = coord.pair(name).unwrap();
    assert_eq!(
        p["cpu"]["machine"],
        inst.metadata("standby-label").unwrap().as_str()
    );
    assert_eq!(p["epoch"], 1, "the GPU stayed primary throughout");
    // An access token is reused while it is valid; the key and tokens never reach the log.
    assert!(
        st.token_requests <= 2,
        "{} token requests",
        st.token_requests
    );
    let log = coord.log_text();
    assert!(!log.contains("ya29.fake"), "an access token was logged");
    assert!(
        !log.contains(&private_key[40..80]),
        "the private key was logged"
    );
    let events = String::from_utf8_lossy(&coord.admin(&["events", "--json"]).stdout).to_string();
    assert!(events.contains("ZONE_RESOURCE_POOL_EXHAUSTED"), "{events}");
    assert!(events.contains("did not join within 10 s"), "{events}");
    println!("standby replaced twice: {first} then {second}");
    drop(gpu);
}

/// Waits until the pair is Syncing again with a standby from the fake; returns its name.
fn wait_standby(coord: &Coord, pair: &str, state: &Arc<Mutex<GceState>>) -> String {
    let mut found = String::new();
    let ok = wait_until(Duration::from_secs(120), || {
        let Some(p) = coord.pair(pair) else {
            return false;
        };
        if p["state"] != "Syncing" {
            return false;
        }
        let label = p["cpu"]["machine"].as_str().unwrap_or("").to_string();
        let st = state.lock().unwrap();
        match st
            .instances
            .values()
            .find(|i| i.metadata("standby-label").as_deref() == Some(label.as_str()))
        {
            Some(i) if i.status == "RUNNING" => {
                found = i.name.clone();
                true
            }
            _ => false,
        }
    });
    let st = state.lock().unwrap();
    assert!(
        ok,
        "no standby: {:?}\n{}\nrequests: {:#?}\nboot errors: {:?}",
        coord.pair(pair),
        coord.log_text(),
        st.log,
        st.boot_errors
    );
    found
}

/// Kills the fake's agents when the test ends, passed or not.
struct Reaper(Arc<Mutex<GceState>>);

impl Drop for Reaper {
    fn drop(&mut self) {
        let st = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for i in st.instances.values() {
            fake_gce::kill_instance(i);
        }
    }
}
