//! A stateful fake of the Vast.ai REST API (the shapes in ARCHITECTURE.md, "Providers"), with faults to inject:
//! 429s on search, offers that vanish (410 `no_such_ask`), instances whose agent never starts,
//! creates that answer 500 after creating, and a search or a create held unanswered until the
//! test releases it (to kill a coordinator mid-call). An instance that boots runs the real on-start
//! script from `deploy/`, which starts a real agent-gpu.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post, put};
use serde_json::{Value, json};

pub struct Instance {
    pub label: String,
    pub offer: u64,
    pub machine_id: u64,
    pub state_dir: PathBuf,
    pub workspace: PathBuf,
    pub booted: bool,
}

#[derive(Default)]
pub struct Faults {
    pub search_429: u32,
    pub gone: HashSet<u64>,
    pub never_boot: HashSet<u64>,
    pub create_500: HashSet<u64>,
    /// How long an instance takes to boot (its on-start script runs then; it shows as loading
    /// meanwhile); zero: at once, before the create answers.
    pub boot_after: std::time::Duration,
}

/// The call a [`Hold`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Held {
    /// An offer search: nothing is created yet.
    Search,
    /// A create, after its instance exists (and boots): its answer is what waits.
    Create,
}

/// The next request of one kind is held: its effect happens, its answer waits until the test
/// releases it (or the caller is gone).
pub struct Hold {
    pub at: Held,
    reached: AtomicBool,
    release: tokio::sync::Notify,
}

impl Hold {
    pub fn new(at: Held) -> Arc<Hold> {
        Arc::new(Hold {
            at,
            reached: AtomicBool::new(false),
            release: tokio::sync::Notify::new(),
        })
    }

    /// Whether the held request arrived (and its effect happened).
    pub fn reached(&self) -> bool {
        self.reached.load(Ordering::SeqCst)
    }

    /// Lets its answer go.
    pub fn release(&self) {
        self.release.notify_one();
    }

    async fn wait(&self) {
        self.reached.store(true, Ordering::SeqCst);
        self.release.notified().await;
    }
}

pub struct VastState {
    pub key: String,
    pub offers: Vec<Value>,
    pub faults: Faults,
    pub instances: BTreeMap<u64, Instance>,
    pub next_id: u64,
    pub dir: PathBuf,
    pub agent_bin: PathBuf,
    pub script: PathBuf,
    /// Every request, as "METHOD path".
    pub log: Vec<String>,
    /// The request held next (taken by the request it holds).
    pub hold: Option<Arc<Hold>>,
}

impl VastState {
    /// The hold for a request of kind `at`, taken (the next one goes through).
    fn take_hold(&mut self, at: Held) -> Option<Arc<Hold>> {
        if self.hold.as_ref().is_some_and(|h| h.at == at) {
            return self.hold.take();
        }
        None
    }
}

/// Waits for the test to release `hold` (if any), then answers `reply`.
async fn after(hold: Option<Arc<Hold>>, reply: Reply) -> Reply {
    if let Some(h) = hold {
        h.wait().await;
    }
    reply
}

pub type Shared = Arc<Mutex<VastState>>;

type Reply = (StatusCode, String);

fn ok(v: Value) -> Reply {
    (StatusCode::OK, v.to_string())
}

fn authed(s: &VastState, h: &HeaderMap) -> Result<(), Reply> {
    let want = format!("Bearer {}", s.key);
    if h.get("authorization").and_then(|v| v.to_str().ok()) == Some(want.as_str()) {
        Ok(())
    } else {
        Err((
            StatusCode::UNAUTHORIZED,
            json!({"success": false, "error": "auth_error", "msg": "Invalid user key"}).to_string(),
        ))
    }
}

fn instance_json(id: u64, i: &Instance) -> Value {
    let pid_alive = std::fs::read_to_string(i.state_dir.join("agent.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .is_some_and(|p| unsafe { libc::kill(p, 0) } == 0);
    json!({
        "id": id,
        "label": i.label,
        "machine_id": i.machine_id,
        "actual_status": if !i.booted { Value::Null } else if pid_alive { json!("running") } else { json!("exited") },
        "intended_status": "running",
        "status_msg": "",
        "public_ipaddr": "127.0.0.1\n",
        "dph_total": 0.3,
    })
}

async fn search(State(s): State<Shared>, h: HeaderMap, body: String) -> Reply {
    let (reply, hold) = {
        let mut s = s.lock().unwrap();
        let reply = search_now(&mut s, &h, &body);
        let hold = (reply.0 == StatusCode::OK)
            .then(|| s.take_hold(Held::Search))
            .flatten();
        (reply, hold)
    };
    after(hold, reply).await
}

fn search_now(s: &mut VastState, h: &HeaderMap, body: &str) -> Reply {
    s.log.push("POST /api/v0/bundles/".into());
    if let Err(e) = authed(s, h) {
        return e;
    }
    let q: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")),
    };
    if q["rentable"]["eq"] != json!(true) {
        return (StatusCode::BAD_REQUEST, "expected a rentable filter".into());
    }
    if s.faults.search_429 > 0 {
        s.faults.search_429 -= 1;
        return (StatusCode::TOO_MANY_REQUESTS, "Too many requests".into());
    }
    // Listings go stale: an offer that is gone still shows up (and 410s on create).
    let offers: Vec<Value> = s.offers.clone();
    ok(json!({ "offers": offers }))
}

async fn create(
    State(s): State<Shared>,
    Path(offer): Path<u64>,
    h: HeaderMap,
    body: String,
) -> Reply {
    let (reply, hold) = {
        let mut st = s.lock().unwrap();
        let before = st.instances.len();
        let mut later = None;
        let reply = create_now(&mut st, offer, &h, &body, &mut later);
        if let Some((id, cmd)) = later {
            boot_later(s.clone(), id, cmd, st.faults.boot_after);
        }
        let hold = (st.instances.len() > before)
            .then(|| st.take_hold(Held::Create))
            .flatten();
        (reply, hold)
    };
    after(hold, reply).await
}

/// Boots instance `id` after `delay`, unless it was destroyed meanwhile.
fn boot_later(s: Shared, id: u64, cmd: std::process::Command, delay: std::time::Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(delay);
        let mut st = s.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = st.instances.get_mut(&id) {
            run_on_start(cmd);
            i.booted = true;
        }
    });
}

/// A create; with a boot delay, `later` gets the instance and its on-start command.
fn create_now(
    st: &mut VastState,
    offer: u64,
    h: &HeaderMap,
    body: &str,
    later: &mut Option<(u64, std::process::Command)>,
) -> Reply {
    st.log.push(format!("PUT /api/v0/asks/{offer}/"));
    if let Err(e) = authed(st, h) {
        return e;
    }
    if st.faults.gone.contains(&offer) {
        return (
            StatusCode::GONE,
            json!({"success": false, "error": "no_such_ask", "msg": "Instance type no longer available"}).to_string(),
        );
    }
    let Some(o) = st.offers.iter().find(|o| o["id"] == offer).cloned() else {
        return (
            StatusCode::NOT_FOUND,
            json!({"success": false, "error": "invalid_args", "msg": "no_such_ask"}).to_string(),
        );
    };
    let req: Value = match serde_json::from_str(body) {
        Ok(v) => v,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("bad json: {e}")),
    };
    for k in ["image", "label", "onstart", "env"] {
        if req[k].is_null() {
            return (StatusCode::BAD_REQUEST, format!("missing {k}"));
        }
    }
    let id = st.next_id;
    st.next_id += 1;
    let dir = st.dir.join(id.to_string());
    let inst = Instance {
        label: req["label"].as_str().unwrap().to_string(),
        offer,
        machine_id: o["machine_id"].as_u64().unwrap(),
        state_dir: dir.join("state"),
        workspace: dir.join("workspace"),
        booted: false,
    };
    let boots = !st.faults.never_boot.contains(&offer);
    let delayed = boots && !st.faults.boot_after.is_zero();
    if boots {
        let cmd = on_start(st, &dir, &inst, &req["env"]);
        if delayed {
            *later = Some((id, cmd));
        } else {
            run_on_start(cmd);
        }
    }
    let inst = Instance {
        booted: boots && !delayed,
        ..inst
    };
    st.instances.insert(id, inst);
    if st.faults.create_500.remove(&offer) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal Server Error".into(),
        );
    }
    ok(json!({"success": true, "new_contract": id}))
}

/// What the container runs when it starts: the on-start script with the instance's environment
/// (the `STANDBY_*` variables of the request's `env`).
fn on_start(
    st: &VastState,
    dir: &std::path::Path,
    inst: &Instance,
    env: &Value,
) -> std::process::Command {
    std::fs::create_dir_all(dir).unwrap();
    let port = free_port();
    let mut cmd = std::process::Command::new("bash");
    cmd.arg(&st.script)
        .env("STANDBY_AGENT_BIN", &st.agent_bin)
        .env("STANDBY_STATE_DIR", &inst.state_dir)
        .env("STANDBY_WORKSPACE", &inst.workspace)
        .env("STANDBY_LISTEN_PORT", port.to_string())
        .env("PUBLIC_IPADDR", " 127.0.0.1\n")
        .env("STANDBY_USER", super::test_user())
        .env(format!("VAST_TCP_PORT_{port}"), port.to_string());
    for (k, v) in env.as_object().unwrap() {
        if k.starts_with("STANDBY_") {
            cmd.env(k, v.as_str().unwrap_or(""));
        }
    }
    cmd
}

fn run_on_start(mut cmd: std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "on-start script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn show(
    State(s): State<Shared>,
    Path(id): Path<u64>,
    h: HeaderMap,
    RawQuery(q): RawQuery,
) -> Reply {
    let mut s = s.lock().unwrap();
    s.log.push(format!("GET /api/v0/instances/{id}/"));
    if let Err(e) = authed(&s, &h) {
        return e;
    }
    if q.as_deref() != Some("owner=me") {
        return (StatusCode::BAD_REQUEST, "owner=me expected".into());
    }
    ok(json!({"instances": s.instances.get(&id).map(|i| instance_json(id, i))}))
}

async fn list(State(s): State<Shared>, h: HeaderMap, RawQuery(q): RawQuery) -> Reply {
    let mut s = s.lock().unwrap();
    s.log.push("GET /api/v1/instances/".into());
    if let Err(e) = authed(&s, &h) {
        return e;
    }
    // Pages of two, to exercise next_token.
    let q = q.unwrap_or_default();
    let after: u64 = q
        .split('&')
        .find_map(|kv| kv.strip_prefix("next_token="))
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let page: Vec<(u64, Value)> = s
        .instances
        .iter()
        .filter(|(id, _)| **id > after)
        .take(2)
        .map(|(id, i)| (*id, instance_json(*id, i)))
        .collect();
    let more = s
        .instances
        .keys()
        .any(|id| *id > page.last().map_or(u64::MAX, |p| p.0));
    let next = if more {
        json!(page.last().unwrap().0.to_string())
    } else {
        Value::Null
    };
    ok(json!({"instances": page.into_iter().map(|p| p.1).collect::<Vec<_>>(), "next_token": next}))
}

async fn old_list() -> Reply {
    (
        StatusCode::GONE,
        json!({"success": false, "error": "deprecated_endpoint"}).to_string(),
    )
}

async fn destroy(State(s): State<Shared>, Path(id): Path<u64>, h: HeaderMap) -> Reply {
    let mut s = s.lock().unwrap();
    s.log.push(format!("DELETE /api/v0/instances/{id}/"));
    if let Err(e) = authed(&s, &h) {
        return e;
    }
    match s.instances.remove(&id) {
        Some(i) => {
            kill_instance(&i);
            ok(json!({"success": true}))
        }
        None => (
            StatusCode::NOT_FOUND,
            json!({"success": false, "error": "not_found"}).to_string(),
        ),
    }
}

/// Kills the fake's instance agents when the test ends, passed or not.
pub struct Reaper(pub Shared);

impl Drop for Reaper {
    fn drop(&mut self) {
        let st = match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for i in st.instances.values() {
            kill_instance(i);
        }
    }
}

pub fn kill_instance(i: &Instance) {
    if let Some(pid) = std::fs::read_to_string(i.state_dir.join("agent.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Serves the fake on loopback from a thread of its own; returns its base URL.
pub fn serve(state: Shared) -> String {
    let app = Router::new()
        .route("/api/v0/bundles/", post(search))
        .route("/api/v0/asks/{id}/", put(create))
        .route("/api/v0/instances/{id}/", get(show).delete(destroy))
        .route("/api/v0/instances/", get(old_list))
        .route("/api/v1/instances/", get(list))
        .with_state(state);
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            axum::serve(l, app).await.unwrap();
        });
    });
    format!("http://{addr}")
}
