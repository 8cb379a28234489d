//! The delivery task against a real HTTP receiver on loopback (axum): signatures, order,
//! retries through a receiver that fails for a while, refusals, and the drop-oldest queue.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use super::*;

/// What the receiver got, and how many requests it still answers with `fail_with`.
#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<(HeaderMap, Bytes)>>,
    fail_next: Mutex<u32>,
    fail_with: Mutex<u16>,
}

async fn hook(State(r): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut n = r.fail_next.lock().unwrap();
    if *n > 0 {
        *n -= 1;
        return StatusCode::from_u16(*r.fail_with.lock().unwrap()).unwrap();
    }
    r.got.lock().unwrap().push((headers, body));
    StatusCode::NO_CONTENT
}

async fn receiver() -> (String, Arc<Receiver>) {
    let r = Arc::new(Receiver::default());
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, r)
}

fn hook_config(url: &str, extra: &str) -> Webhook {
    #[derive(serde::Deserialize)]
    struct File {
        notify: Vec<WebhookConfig>,
    }
    let text = format!(
        "[[notify]]\nname = \"t\"\nurl = \"{url}\"\nsecret_env = \"STANDBY_NOTIFY_TEST_SECRET\"\n\
         timeout = \"2s\"\n{extra}"
    );
    // SAFETY of the test: every test here sets the same value.
    unsafe { std::env::set_var("STANDBY_NOTIFY_TEST_SECRET", "k3y") };
    let c = toml::from_str::<File>(&text).unwrap().notify;
    Webhook::all(&c).unwrap().remove(0)
}

/// Retries 10 ms apart, then 20, then 40.
const FAST: &str = "backoff = \"10ms\"\nbackoff_max = \"40ms\"";

fn origin() -> Origin {
    Origin {
        id: "sb-test".into(),
        host: "here".into(),
    }
}

fn count(m: &Metrics, outcome: &str) -> u64 {
    let l = crate::control::metrics::WebhookOutcomeLabel {
        webhook: "t".into(),
        outcome: outcome.into(),
    };
    m.notifications.get_or_create(&l).get()
}

async fn wait_for(mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out");
}

#[tokio::test]
async fn delivered_in_order_signed_after_the_receiver_fails_for_a_while() {
    let (url, r) = receiver().await;
    *r.fail_next.lock().unwrap() = 3;
    *r.fail_with.lock().unwrap() = 503;
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let n = Notifier::start(vec![hook_config(&url, FAST)], origin(), &metrics, &stop).unwrap();
    n.send(Notice::new("p", NoticeKind::Failover, 2, 1, "gone".into()));
    n.send(Notice::new("p", NoticeKind::Recovered, 3, 2, "back".into()));
    wait_for(|| r.got.lock().unwrap().len() == 2).await;
    let got = r.got.lock().unwrap().clone();
    let secret = Secret::new(b"k3y");
    let mut kinds = Vec::new();
    for (headers, body) in &got {
        let ts: u64 = headers[TIMESTAMP_HEADER].to_str().unwrap().parse().unwrap();
        let sig = headers[SIGNATURE_HEADER].to_str().unwrap();
        assert!(secret.verify(ts, body, sig), "bad signature {sig}");
        let now = crate::host::unix_ms_now() / 1000;
        assert!(ts <= now && now - ts < 60, "timestamp {ts} is not now");
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        kinds.push(v["kind"].as_str().unwrap().to_string());
    }
    assert_eq!(kinds, ["failover", "recovered"]);
    assert_eq!(count(&metrics, "delivered"), 2);
    assert_eq!(count(&metrics, "failed"), 0);
    stop.cancel();
}

#[tokio::test]
async fn a_refusal_is_not_retried_and_retries_end() {
    let (url, r) = receiver().await;
    *r.fail_next.lock().unwrap() = 1;
    *r.fail_with.lock().unwrap() = 400;
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let n = Notifier::start(
        vec![hook_config(&url, &format!("{FAST}\nretries = 2"))],
        origin(),
        &metrics,
        &stop,
    )
    .unwrap();
    n.send(Notice::new("p", NoticeKind::Degraded, 1, 1, "lost".into()));
    wait_for(|| count(&metrics, "rejected") == 1).await;
    assert!(r.got.lock().unwrap().is_empty(), "a 400 is not retried");
    // Always 500: the first try and two retries, then given up; the next notice still goes.
    *r.fail_next.lock().unwrap() = 3;
    *r.fail_with.lock().unwrap() = 500;
    n.send(Notice::new("p", NoticeKind::Degraded, 1, 2, "lost".into()));
    n.send(Notice::new("p", NoticeKind::Recovered, 1, 3, "back".into()));
    wait_for(|| count(&metrics, "failed") == 1 && count(&metrics, "delivered") == 1).await;
    assert_eq!(*r.fail_next.lock().unwrap(), 0, "exactly 3 attempts");
    let got = r.got.lock().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&got[0].1).unwrap();
    assert_eq!(v["kind"], "recovered");
    stop.cancel();
}

#[tokio::test]
async fn a_dead_receiver_never_blocks_send_and_the_oldest_are_dropped() {
    // Nothing listens on this port (bound, then closed).
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", l.local_addr().unwrap());
    drop(l);
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let n = Notifier::start(
        vec![hook_config(
            &url,
            "queue = 3\nevents = [\"failover\"]\nbackoff = \"1s\"\nbackoff_max = \"1s\"",
        )],
        origin(),
        &metrics,
        &stop,
    )
    .unwrap();
    let t = std::time::Instant::now();
    for i in 0..100 {
        n.send(Notice::new("p", NoticeKind::Failover, i, i, String::new()));
        // Not subscribed: never queued, never dropped.
        n.send(Notice::new("p", NoticeKind::Woken, i, i, String::new()));
    }
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "{:?}",
        t.elapsed()
    );
    let l = crate::control::metrics::WebhookLabel {
        webhook: "t".into(),
    };
    // 100 sent; the task holds one, the queue three: at least 96 dropped.
    let dropped = metrics.notifications_dropped.get_or_create(&l).get();
    assert!((96..=97).contains(&dropped), "{dropped}");
    stop.cancel();
}
