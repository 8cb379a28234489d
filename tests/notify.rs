//! Notifications end to end: a real coordinator with the `local` provider and `[[notify]]`
//! webhooks pointing at HTTP receivers on loopback (axum servers in this test: the receivers,
//! not stand-ins for our code). After a kill -9 of the GPU agent the failover notice arrives
//! signed (checked with ring's HMAC here, not with the coordinator's code), then the recovery
//! notice, in that order, then hibernated, woken and recovered again; a PagerDuty-shaped
//! receiver sees the failover's incident resolved by the recovery. A receiver that answers 503 for a while and one that is not listening
//! get the failover notice once they come back (retries); with them and one that accepts and
//! never answers, the failover is on time and the recovery goes ahead (the engine never waits).

mod common;

use std::fs;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::*;

/// Requests one receiver got: (timestamp header, signature header, body); and while `down`,
/// each request is answered 503 (and counted in `refused`).
#[derive(Default)]
struct Inbox {
    got: Mutex<Vec<(String, String, Bytes)>>,
    down: Mutex<bool>,
    refused: Mutex<u32>,
}

impl Inbox {
    /// The bodies received, parsed.
    fn bodies(&self) -> Vec<serde_json::Value> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, _, b)| serde_json::from_slice(b).ok())
            .collect()
    }

    /// The `kind` of each notice received for `pair`, in arrival order.
    fn kinds(&self, pair: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter_map(|(_, _, b)| serde_json::from_slice::<serde_json::Value>(b).ok())
            .filter(|v| v["pair"] == pair)
            .map(|v| v["kind"].as_str().unwrap_or("?").to_string())
            .collect()
    }
}

async fn receive(State(i): State<Arc<Inbox>>, h: HeaderMap, body: Bytes) -> StatusCode {
    if *i.down.lock().unwrap() {
        *i.refused.lock().unwrap() += 1;
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |k: &str| {
        h.get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    i.got.lock().unwrap().push((
        header("x-standby-timestamp"),
        header("x-standby-signature"),
        body,
    ));
    StatusCode::OK
}

/// Serves an inbox on `listener` from the test's runtime.
fn serve(rt: &tokio::runtime::Runtime, listener: TcpListener, inbox: Arc<Inbox>) {
    listener.set_nonblocking(true).unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(inbox);
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        axum::serve(l, app).await
    });
}

/// A listener that accepts connections and never answers (a hung receiver).
fn black_hole() -> (String, Arc<Mutex<Vec<std::net::TcpStream>>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            h.lock().unwrap().push(s);
        }
    });
    (addr, held)
}

fn hmac_ok(secret: &[u8], ts: &str, sig: &str, body: &[u8]) -> bool {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let mut msg = ts.as_bytes().to_vec();
    msg.push(b'.');
    msg.extend_from_slice(body);
    let want = ring::hmac::sign(&key, &msg);
    let hex: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    sig == format!("sha256={hex}")
}

#[test]
fn failover_and_recovery_are_notified_signed_in_order_through_receiver_outages() {
    let t = tempfile::tempdir().unwrap();
    let _reaper = MachineReaper(t.path().join("coord/machines"));
    let rt = tokio::runtime::Runtime::new().unwrap();

    // up: answers at once; flaky: 503 until told otherwise; late: nothing listens on its port
    // until after the failover; hung: accepts and never answers (the attempt times out).
    let up = Arc::new(Inbox::default());
    let up_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = up_l.local_addr().unwrap();
    serve(&rt, up_l, up.clone());
    let flaky = Arc::new(Inbox::default());
    *flaky.down.lock().unwrap() = true;
    let flaky_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let flaky_addr = flaky_l.local_addr().unwrap();
    serve(&rt, flaky_l, flaky.clone());
    let late_addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (hung_addr, _held) = black_hole();
    // pd: PagerDuty-shaped bodies.
    let pd = Arc::new(Inbox::default());
    let pd_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let pd_addr = pd_l.local_addr().unwrap();
    serve(&rt, pd_l, pd.clone());

    let secret = t.path().join("webhook.secret");
    fs::write(&secret, "whsec-test-0123456789\n").unwrap();
    let config = t.path().join("notify.toml");
    let retry = "retries = 1000\nbackoff = \"200ms\"\nbackoff_max = \"1s\"\ntimeout = \"2s\"";
    fs::write(
        &config,
        format!(
            "[[notify]]\nname = \"up\"\nurl = \"http://{up_addr}/hook\"\nsecret_file = \"{}\"\n{retry}\n\n\
             [[notify]]\nname = \"flaky\"\nurl = \"http://{flaky_addr}/hook\"\nevents = [\"failover\"]\n{retry}\n\n\
             [[notify]]\nname = \"late\"\nurl = \"http://{late_addr}/hook\"\nevents = [\"failover\"]\n{retry}\n\n\
             [[notify]]\nname = \"hung\"\nurl = \"http://{hung_addr}/hook\"\nevents = [\"failover\"]\n{retry}\n\n\
             [[notify]]\nname = \"pd\"\nurl = \"http://{pd_addr}/hook\"\nformat = \"pagerduty\"\nrouting_key = \"R0UT1NG\"\nevents = [\"failover\", \"recovered\"]\n{retry}\n",
            secret.display()
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();
    let coord = local_coord_with(&t.path().join("coord"), &["--config", &cfg]);

    let name = "hooked";
    let ws = t.path().join("gpu-ws");
    fs::create_dir_all(ws.join("ckpt")).unwrap();
    fs::write(ws.join("ckpt/step-100.pt"), vec![7u8; 1 << 20]).unwrap();
    let cpu = Managed::cpu(
        &coord.addr,
        Some(&coord.token(name, "cpu", "10m")),
        &t.path().join("cpu-ws"),
        &t.path().join("cpu-state"),
        &[],
    );
    let gpu = Managed::gpu(
        &coord.addr,
        Some(&coord.token(name, "gpu", "10m")),
        &ws,
        &t.path().join("gpu-state"),
        &["--debounce", "100ms"],
        &[],
    );
    let ok = wait_until(Duration::from_secs(60), || {
        coord.pair(name).is_some_and(|p| p["state"] == "Syncing")
            && flush(&gpu.state, "20s").status.success()
    });
    assert!(ok, "{}\n{}", coord.log_text(), gpu.log_text());
    assert!(up.kinds(name).is_empty(), "a new pair is no news");

    // kill -9 of the GPU agent.
    let killed = unix_ms();
    drop(gpu);
    let ok = wait_until(Duration::from_secs(20), || {
        up.kinds(name).contains(&"failover".into())
    });
    assert!(ok, "no failover notice: {}", coord.log_text());
    let noticed = unix_ms() - killed;

    // The failover itself was on time while three receivers were failing.
    let failover_at = failover_event_ms(&coord, name).expect("failover event");
    let detect = failover_at.saturating_sub(killed);
    println!("kill -9 to failover event: {detect} ms; to the notice at the receiver: {noticed} ms");
    assert!(detect < 8_000, "failover took {detect} ms");

    // The notice is signed over its timestamp and body, and says what happened.
    let (ts, sig, body) = up.got.lock().unwrap()[0].clone();
    assert!(
        hmac_ok(b"whsec-test-0123456789", &ts, &sig, &body),
        "signature {sig:?} does not verify"
    );
    assert!(!hmac_ok(b"another-secret", &ts, &sig, &body));
    let ts: u64 = ts.parse().unwrap();
    assert!(ts * 1000 + 1000 >= killed && ts * 1000 <= unix_ms(), "{ts}");
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["kind"], "failover");
    assert_eq!(v["pair"], name);
    assert_eq!(v["epoch"], 2);
    assert!(v["unix_ms"].as_u64().unwrap() >= killed);
    assert!(v["coordinator"]["id"].as_str().unwrap().starts_with("sb-"));
    assert!(!v["text"].as_str().unwrap().is_empty());

    // The flaky receiver was tried and refused; back up, it gets the notice (retries).
    let ok = wait_until(Duration::from_secs(10), || {
        *flaky.refused.lock().unwrap() >= 2
    });
    assert!(ok, "the flaky receiver was not retried");
    assert!(flaky.kinds(name).is_empty());
    *flaky.down.lock().unwrap() = false;
    // The late receiver starts listening on its port only now.
    let late = Arc::new(Inbox::default());
    serve(&rt, TcpListener::bind(late_addr).unwrap(), late.clone());
    let ok = wait_until(Duration::from_secs(10), || {
        flaky.kinds(name) == ["failover"] && late.kinds(name) == ["failover"]
    });
    assert!(
        ok,
        "flaky {:?}, late {:?}",
        flaky.kinds(name),
        late.kinds(name)
    );

    // A new GPU is provisioned, restored and cut over: the pair recovered, told after the
    // failover.
    wait_state(&coord, name, "Syncing", 3, 120, &[&cpu.log]);
    let ok = wait_until(Duration::from_secs(10), || {
        up.kinds(name).contains(&"recovered".into())
    });
    assert!(ok, "no recovery notice: {:?}", up.kinds(name));
    let kinds = up.kinds(name);
    let order: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| matches!(*k, "failover" | "recovered"))
        .collect();
    assert_eq!(order, ["failover", "recovered"], "all: {kinds:?}");
    for (ts, sig, body) in up.got.lock().unwrap().iter() {
        assert!(hmac_ok(b"whsec-test-0123456789", ts, sig, body));
    }
    // PagerDuty: the failover opened an incident for the pair; the recovery resolved it.
    let ok = wait_until(Duration::from_secs(10), || pd.bodies().len() == 2);
    assert!(ok, "{:?}", pd.bodies());
    let b = pd.bodies();
    assert_eq!(b[0]["event_action"], "trigger");
    assert_eq!(b[0]["routing_key"], "R0UT1NG");
    assert_eq!(b[0]["payload"]["severity"], "critical");
    assert_eq!(b[0]["payload"]["component"], name);
    assert_eq!(b[1]["event_action"], "resolve");
    assert_eq!(b[1]["dedup_key"], b[0]["dedup_key"]);

    // Hibernate and wake: told in order, each once.
    for (verb, state, epoch) in [("hibernate", "Hibernated", 4), ("wake", "Syncing", 5)] {
        let out = coord.admin(&[verb, name, "--follow"]);
        assert!(
            out.status.success(),
            "{verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_state(&coord, name, state, epoch, 120, &[&cpu.log]);
    }
    let want = ["failover", "recovered", "hibernated", "woken", "recovered"];
    let ok = wait_until(Duration::from_secs(10), || {
        up.kinds(name)
            .iter()
            .filter(|k| *k != "provisioning_failed")
            .count()
            == want.len()
    });
    let kinds = up.kinds(name);
    let told: Vec<&str> = kinds
        .iter()
        .map(String::as_str)
        .filter(|k| *k != "provisioning_failed")
        .collect();
    assert!(ok && told == want, "told {kinds:?}");

    let m = http_get(&coord.metrics, "/metrics");
    for want in [
        "standby_notifications_total{webhook=\"up\",outcome=\"delivered\"}",
        "standby_notifications_total{webhook=\"flaky\",outcome=\"delivered\"} 1",
        "standby_notifications_total{webhook=\"late\",outcome=\"delivered\"} 1",
    ] {
        assert!(m.contains(want), "{want} missing:\n{m}");
    }
    drop(cpu);
}

/// The unix time of the pair's failover event (`coordinator events --json`).
fn failover_event_ms(coord: &Coord, name: &str) -> Option<u64> {
    let out = coord.admin(&["events", "--json"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["pair"] == name && e["kind"] == "failover")
        .and_then(|e| e["unix_ms"].as_u64())
}
