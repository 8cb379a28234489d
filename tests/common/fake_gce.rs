//! A stateful fake of the Compute Engine REST API and its OAuth token endpoint (the shapes in
//! ARCHITECTURE.md, "Providers"): service-account JWTs are verified (RS256 signature, iss, aud,
//! scope, expiry) before an access token is issued, and every API call needs one. Inserts are
//! idempotent by `requestId`, return Operations that finish a little later, and can be made to fail:
//! 429 rate limits, `ZONE_RESOURCE_POOL_EXHAUSTED`, a 503 after the instance was created, and
//! an instance whose startup script never runs. A booting instance runs the real startup script
//! from `deploy/` against the fake's metadata server, which starts a real agent-cpu. A test can
//! preempt a Spot VM: it goes TERMINATED, its agent dies, and a `compute.instances.preempted`
//! operation names it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

pub struct GceInstance {
    pub name: String,
    pub zone: String,
    pub status: String,
    pub body: Value,
    pub state_dir: PathBuf,
    pub workspace: PathBuf,
    pub boots: bool,
    pub booted: bool,
}

impl GceInstance {
    pub fn metadata(&self, key: &str) -> Option<String> {
        self.body["metadata"]["items"]
            .as_array()?
            .iter()
            .find(|i| i["key"] == key)
            .and_then(|i| i["value"].as_str())
            .map(str::to_string)
    }
}

#[derive(Default)]
pub struct GceFaults {
    /// Inserts answered 429 (nothing created).
    pub insert_429: u32,
    /// Zones whose inserts fail with ZONE_RESOURCE_POOL_EXHAUSTED.
    pub exhausted: HashSet<String>,
    /// Inserts that create the instance and then answer 503.
    pub insert_503: u32,
    /// The next N instances never run their startup script.
    pub never_boot: u32,
}

struct Op {
    json: Value,
    zone: String,
    due: Instant,
    /// What happens when it finishes.
    then: Then,
}

enum Then {
    Nothing,
    Boot(String),
    Delete(String),
}

pub struct GceState {
    pub project: String,
    pub client_email: String,
    /// DER of the service account's RSA public key.
    pub public_key: Vec<u8>,
    pub tokens: HashSet<String>,
    pub token_requests: u32,
    pub instances: BTreeMap<String, GceInstance>,
    ops: BTreeMap<String, Op>,
    request_ids: HashMap<String, String>,
    next: u64,
    pub faults: GceFaults,
    pub dir: PathBuf,
    pub agent_bin: PathBuf,
    pub script: PathBuf,
    pub base: String,
    /// Every request, as "METHOD path".
    pub log: Vec<String>,
    /// Startup scripts that failed (their stderr).
    pub boot_errors: Arc<Mutex<Vec<String>>>,
}

pub type Shared = Arc<Mutex<GceState>>;

impl GceState {
    pub fn new(
        project: &str,
        key_file: &std::path::Path,
        dir: PathBuf,
        agent_bin: PathBuf,
        script: PathBuf,
    ) -> GceState {
        let k: Value = serde_json::from_str(&std::fs::read_to_string(key_file).unwrap()).unwrap();
        let pem = k["private_key"].as_str().unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        use ring::signature::KeyPair;
        let kp = ring::signature::RsaKeyPair::from_pkcs8(&der).unwrap();
        GceState {
            project: project.into(),
            client_email: k["client_email"].as_str().unwrap().into(),
            public_key: kp.public_key().as_ref().to_vec(),
            tokens: HashSet::new(),
            token_requests: 0,
            instances: BTreeMap::new(),
            ops: BTreeMap::new(),
            request_ids: HashMap::new(),
            next: 1,
            faults: GceFaults::default(),
            dir,
            agent_bin,
            script,
            base: String::new(),
            log: Vec::new(),
            boot_errors: Arc::default(),
        }
    }

    fn zone_link(&self, zone: &str) -> String {
        format!(
            "{}/compute/v1/projects/{}/zones/{zone}",
            self.base, self.project
        )
    }

    fn new_op(
        &mut self,
        zone: &str,
        kind: &str,
        target: &str,
        after: Duration,
        then: Then,
    ) -> Value {
        let name = format!("operation-{}-{}", self.next, kind);
        self.next += 1;
        let json = json!({
            "kind": "compute#operation",
            "id": self.next.to_string(),
            "name": name,
            "zone": self.zone_link(zone),
            "operationType": kind,
            "targetLink": format!("{}/instances/{target}", self.zone_link(zone)),
            "status": "RUNNING",
            "progress": 0,
            "selfLink": format!("{}/operations/{name}", self.zone_link(zone)),
        });
        self.ops.insert(
            name,
            Op {
                json: json.clone(),
                zone: zone.into(),
                due: Instant::now() + after,
                then,
            },
        );
        json
    }

    /// Finishes the operations that are due (GCE works on its own, polled or not).
    fn advance(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .ops
            .iter()
            .filter(|(_, o)| o.json["status"] != "DONE" && o.due <= now)
            .map(|(n, _)| n.clone())
            .collect();
        for name in due {
            let op = self.ops.get_mut(&name).unwrap();
            op.json["status"] = json!("DONE");
            op.json["progress"] = json!(100);
            match std::mem::replace(&mut op.then, Then::Nothing) {
                Then::Nothing => {}
                Then::Boot(inst) => self.boot(&inst),
                Then::Delete(inst) => {
                    if let Some(i) = self.instances.remove(&inst) {
                        kill_instance(&i);
                    }
                }
            }
        }
    }

    fn boot(&mut self, name: &str) {
        let base = self.base.clone();
        let (script, bin) = (self.script.clone(), self.agent_bin.clone());
        let Some(i) = self.instances.get_mut(name) else {
            return;
        };
        i.status = "RUNNING".into();
        if !i.boots {
            return;
        }
        i.booted = true;
        std::fs::create_dir_all(&i.state_dir).unwrap();
        let mut cmd = std::process::Command::new("bash");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("STANDBY_") {
                cmd.env_remove(k);
            }
        }
        cmd.arg(script)
            .env(
                "STANDBY_METADATA_URL",
                format!("{base}/metadata/{name}/computeMetadata/v1"),
            )
            .env("STANDBY_AGENT_BIN", bin)
            .env("STANDBY_STATE_DIR", &i.state_dir)
            .env("STANDBY_WORKSPACE", &i.workspace)
            .env("STANDBY_LISTEN_PORT", free_port().to_string())
            .env("STANDBY_LISTEN_HOST", "127.0.0.1")
            .env("STANDBY_USE_SYSTEMD", "0")
            .env("STANDBY_USER", super::test_user());
        // The script talks to the fake's metadata server: run it off the server's thread.
        let (errors, name) = (self.boot_errors.clone(), name.to_string());
        std::thread::spawn(move || {
            let out = cmd.output().unwrap();
            if !out.status.success() {
                errors
                    .lock()
                    .unwrap()
                    .push(format!("{name}: {}", String::from_utf8_lossy(&out.stderr)));
            }
        });
    }
}

type Reply = (StatusCode, String);

fn error(code: u16, reason: &str, message: &str) -> Reply {
    (
        StatusCode::from_u16(code).unwrap(),
        json!({"error": {"code": code, "message": message, "errors": [{"domain": "global", "reason": reason, "message": message}]}}).to_string(),
    )
}

fn authed(s: &GceState, h: &HeaderMap) -> Result<(), Reply> {
    let token = h
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        Some(t) if s.tokens.contains(t) => Ok(()),
        _ => Err(error(
            401,
            "authError",
            "Request had invalid authentication credentials.",
        )),
    }
}

/// Every API call: the state (operations that are due finished), the request logged, the
/// caller's access token checked.
fn enter<'a>(
    s: &'a Shared,
    h: &HeaderMap,
    line: String,
) -> Result<std::sync::MutexGuard<'a, GceState>, Reply> {
    let mut st = s.lock().unwrap();
    st.advance();
    st.log.push(line);
    authed(&st, h)?;
    Ok(st)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `POST /token`: the OAuth 2 JWT-bearer grant.
async fn token(State(s): State<Shared>, body: String) -> Reply {
    let mut st = s.lock().unwrap();
    st.log.push("POST /token".into());
    st.token_requests += 1;
    let form: HashMap<String, String> = url_decode_form(&body);
    let bad = |m: &str| {
        (
            StatusCode::BAD_REQUEST,
            json!({"error": "invalid_grant", "error_description": m}).to_string(),
        )
    };
    if form.get("grant_type").map(String::as_str)
        != Some("urn:ietf:params:oauth:grant-type:jwt-bearer")
    {
        return bad("unsupported grant_type");
    }
    let Some(jwt) = form.get("assertion") else {
        return bad("no assertion");
    };
    let parts: Vec<&str> = jwt.split('.').collect();
    if parts.len() != 3 {
        return bad("malformed JWT");
    }
    let dec = |p: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p);
    let (Ok(h), Ok(c), Ok(sig)) = (dec(parts[0]), dec(parts[1]), dec(parts[2])) else {
        return bad("malformed JWT");
    };
    let header: Value = serde_json::from_slice(&h).unwrap_or(Value::Null);
    let claims: Value = serde_json::from_slice(&c).unwrap_or(Value::Null);
    if header["alg"] != "RS256" {
        return bad("alg must be RS256");
    }
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        st.public_key.clone(),
    );
    if key
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .is_err()
    {
        return bad("Invalid JWT Signature.");
    }
    let now = now_unix();
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap_or(0),
        claims["exp"].as_u64().unwrap_or(0),
    );
    if claims["iss"] != st.client_email.as_str()
        || claims["aud"] != format!("{}/token", st.base).as_str()
        || !claims["scope"].as_str().is_some_and(|s| {
            s.split(' ')
                .any(|x| x == "https://www.googleapis.com/auth/compute")
        })
        || exp <= now
        || exp > iat + 3600
        || iat > now + 60
    {
        return bad("Invalid JWT: claims");
    }
    let t = format!("ya29.fake-{}", st.next);
    st.next += 1;
    st.tokens.insert(t.clone());
    (
        StatusCode::OK,
        json!({"access_token": t, "expires_in": 3599, "token_type": "Bearer"}).to_string(),
    )
}

fn url_decode_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap_or(b'?'));
                i += 2;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_lowercase()
        && b[b.len() - 1] != b'-'
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

fn instance_json(st: &GceState, i: &GceInstance) -> Value {
    let mut v = i.body.clone();
    v["kind"] = json!("compute#instance");
    v["zone"] = json!(st.zone_link(&i.zone));
    v["status"] = json!(i.status);
    v["selfLink"] = json!(format!("{}/instances/{}", st.zone_link(&i.zone), i.name));
    v["machineType"] = json!(format!(
        "{}/{}",
        st.zone_link(&i.zone),
        i.body["machineType"].as_str().unwrap_or("")
    ));
    v["networkInterfaces"][0]["accessConfigs"][0]["natIP"] = json!("127.0.0.1");
    v["networkInterfaces"][0]["networkIP"] = json!("10.128.0.2");
    v
}

type P3 = Path<(String, String)>;

async fn insert(
    State(s): State<Shared>,
    Path((project, zone)): P3,
    RawQuery(q): RawQuery,
    h: HeaderMap,
    body: String,
) -> Reply {
    let mut st = match enter(
        &s,
        &h,
        format!("POST /projects/{project}/zones/{zone}/instances"),
    ) {
        Ok(st) => st,
        Err(e) => return e,
    };
    if project != st.project {
        return error(404, "notFound", "The resource 'projects/x' was not found");
    }
    let q = url_decode_form(&q.unwrap_or_default());
    let rid = q.get("requestId").cloned().unwrap_or_default();
    if let Some(op) = st.request_ids.get(&rid) {
        // The same request again: the same operation.
        return (StatusCode::OK, st.ops[op].json.to_string());
    }
    if st.faults.insert_429 > 0 {
        st.faults.insert_429 -= 1;
        return error(429, "rateLimitExceeded", "Rate Limit Exceeded");
    }
    let b: Value = match serde_json::from_str(&body) {
        Ok(v) => v,
        Err(e) => return error(400, "parseError", &format!("Parse Error: {e}")),
    };
    let name = b["name"].as_str().unwrap_or("").to_string();
    if let Some(field) = invalid_field(&b, &name, &zone, &rid) {
        return error(
            400,
            "invalid",
            &format!("Invalid value for field '{field}'"),
        );
    }
    if st.instances.contains_key(&name) {
        return error(
            409,
            "alreadyExists",
            &format!(
                "The resource 'projects/{project}/zones/{zone}/instances/{name}' already exists"
            ),
        );
    }
    let op = if st.faults.exhausted.contains(&zone) {
        st.exhausted_op(&project, &zone, &name)
    } else {
        st.create(&name, &zone, b)
    };
    let op_name = op["name"].as_str().unwrap().to_string();
    st.request_ids.insert(rid, op_name);
    if st.faults.insert_503 > 0 && st.instances.contains_key(&name) {
        st.faults.insert_503 -= 1;
        return error(503, "backendError", "Service Unavailable");
    }
    (StatusCode::OK, op.to_string())
}

/// The first field of an insert's body (or its request id) that the real API would refuse.
fn invalid_field(b: &Value, name: &str, zone: &str, rid: &str) -> Option<&'static str> {
    let checks = [
        (valid_name(name), "name"),
        (
            b["machineType"]
                .as_str()
                .is_some_and(|m| m.starts_with(&format!("zones/{zone}/machineTypes/e2-"))),
            "machineType",
        ),
        (
            b["scheduling"]["provisioningModel"] == "SPOT",
            "provisioningModel",
        ),
        (
            b["scheduling"]["instanceTerminationAction"] == "STOP"
                || b["scheduling"]["instanceTerminationAction"] == "DELETE",
            "instanceTerminationAction",
        ),
        (
            b["disks"][0]["initializeParams"]["diskSizeGb"].is_string(),
            "diskSizeGb (int64 is a JSON string)",
        ),
        (
            b["networkInterfaces"][0]["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT",
            "accessConfigs",
        ),
        (
            b["metadata"]["items"]
                .as_array()
                .is_some_and(|i| i.iter().any(|x| x["key"] == "startup-script")),
            "startup-script",
        ),
        (
            rid.len() == 36 && rid.chars().filter(|c| *c == '-').count() == 4,
            "requestId (a UUID)",
        ),
    ];
    checks.iter().find(|(ok, _)| !ok).map(|(_, field)| *field)
}

impl GceState {
    /// An insert into an exhausted zone: an operation that ends in
    /// `ZONE_RESOURCE_POOL_EXHAUSTED`, nothing created.
    fn exhausted_op(&mut self, project: &str, zone: &str, name: &str) -> Value {
        let mut op = self.new_op(
            zone,
            "insert",
            name,
            Duration::from_millis(200),
            Then::Nothing,
        );
        let n = op["name"].as_str().unwrap().to_string();
        let err = json!({"errors": [{"code": "ZONE_RESOURCE_POOL_EXHAUSTED", "message": format!("The zone 'projects/{project}/zones/{zone}' does not have enough resources available to fulfill the request.")}]});
        self.ops.get_mut(&n).unwrap().json["error"] = err.clone();
        op["error"] = err;
        op
    }

    /// A new instance, PROVISIONING until its insert operation finishes and boots it (unless
    /// the `never_boot` fault keeps its startup script from running).
    fn create(&mut self, name: &str, zone: &str, body: Value) -> Value {
        let boots = if self.faults.never_boot > 0 {
            self.faults.never_boot -= 1;
            false
        } else {
            true
        };
        let dir = self.dir.join(name);
        self.instances.insert(
            name.to_string(),
            GceInstance {
                name: name.to_string(),
                zone: zone.to_string(),
                status: "PROVISIONING".into(),
                body,
                state_dir: dir.join("state"),
                workspace: dir.join("workspace"),
                boots,
                booted: false,
            },
        );
        self.new_op(
            zone,
            "insert",
            name,
            Duration::from_millis(300),
            Then::Boot(name.to_string()),
        )
    }
}

async fn operation(
    State(s): State<Shared>,
    Path((project, zone, op)): Path<(String, String, String)>,
    h: HeaderMap,
) -> Reply {
    let st = match enter(
        &s,
        &h,
        format!("GET /projects/{project}/zones/{zone}/operations/{op}"),
    ) {
        Ok(st) => st,
        Err(e) => return e,
    };
    match st.ops.get(&op) {
        Some(o) if o.zone == zone => (StatusCode::OK, o.json.to_string()),
        _ => error(404, "notFound", "operation not found"),
    }
}

async fn operations(State(s): State<Shared>, Path((project, zone)): P3, h: HeaderMap) -> Reply {
    let st = match enter(
        &s,
        &h,
        format!("GET /projects/{project}/zones/{zone}/operations"),
    ) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let items: Vec<Value> = st
        .ops
        .values()
        .filter(|o| o.zone == zone)
        .map(|o| o.json.clone())
        .collect();
    (
        StatusCode::OK,
        json!({"kind": "compute#operationList", "items": items}).to_string(),
    )
}

async fn instance(
    State(s): State<Shared>,
    Path((project, zone, name)): Path<(String, String, String)>,
    h: HeaderMap,
) -> Reply {
    let st = match enter(
        &s,
        &h,
        format!("GET /projects/{project}/zones/{zone}/instances/{name}"),
    ) {
        Ok(st) => st,
        Err(e) => return e,
    };
    match st.instances.get(&name) {
        Some(i) if i.zone == zone => (StatusCode::OK, instance_json(&st, i).to_string()),
        _ => error(
            404,
            "notFound",
            &format!(
                "The resource 'projects/{project}/zones/{zone}/instances/{name}' was not found"
            ),
        ),
    }
}

async fn delete(
    State(s): State<Shared>,
    Path((project, zone, name)): Path<(String, String, String)>,
    h: HeaderMap,
) -> Reply {
    let mut st = match enter(
        &s,
        &h,
        format!("DELETE /projects/{project}/zones/{zone}/instances/{name}"),
    ) {
        Ok(st) => st,
        Err(e) => return e,
    };
    match st.instances.get_mut(&name) {
        Some(i) if i.zone == zone => {
            i.status = "STOPPING".into();
            kill_instance(i);
            let op = st.new_op(
                &zone,
                "delete",
                &name,
                Duration::from_millis(300),
                Then::Delete(name.clone()),
            );
            (StatusCode::OK, op.to_string())
        }
        _ => error(404, "notFound", "not found"),
    }
}

/// `GET /projects/{p}/aggregated/instances`: one instance per page, to exercise paging.
async fn aggregated(
    State(s): State<Shared>,
    Path(project): Path<String>,
    RawQuery(q): RawQuery,
    h: HeaderMap,
) -> Reply {
    let st = match enter(
        &s,
        &h,
        format!("GET /projects/{project}/aggregated/instances"),
    ) {
        Ok(st) => st,
        Err(e) => return e,
    };
    let q = url_decode_form(&q.unwrap_or_default());
    let after = q.get("pageToken").cloned().unwrap_or_default();
    let mut names = st
        .instances
        .keys()
        .filter(|n| after.is_empty() || **n > after);
    let page = names.next().cloned();
    let more = names.next().is_some();
    let mut items = serde_json::Map::new();
    items.insert(
        "zones/antarctica-south1-a".into(),
        json!({"warning": {"code": "NO_RESULTS_ON_PAGE", "message": "There are no results for scope 'zones/antarctica-south1-a' on this page."}}),
    );
    if let Some(n) = &page {
        let i = &st.instances[n];
        items.insert(
            format!("zones/{}", i.zone),
            json!({"instances": [instance_json(&st, i)]}),
        );
    }
    let mut v = json!({"kind": "compute#instanceAggregatedList", "items": items});
    if more {
        v["nextPageToken"] = json!(page.unwrap());
    }
    (StatusCode::OK, v.to_string())
}

/// The metadata server as seen from inside instance `name`.
async fn metadata(
    State(s): State<Shared>,
    Path((name, path)): Path<(String, String)>,
    h: HeaderMap,
) -> Reply {
    let st = s.lock().unwrap();
    if h.get("metadata-flavor").and_then(|v| v.to_str().ok()) != Some("Google") {
        return (
            StatusCode::FORBIDDEN,
            "Missing Metadata-Flavor:Google header.".into(),
        );
    }
    let Some(i) = st.instances.get(&name) else {
        return (StatusCode::NOT_FOUND, "no such instance".into());
    };
    if let Some(key) = path.strip_prefix("instance/attributes/") {
        return match i.metadata(key) {
            Some(v) => (StatusCode::OK, v),
            None => (StatusCode::NOT_FOUND, "not found".into()),
        };
    }
    match path.as_str() {
        "instance/network-interfaces/0/access-configs/0/external-ip" => {
            (StatusCode::OK, "127.0.0.1".into())
        }
        "instance/preempted" => (
            StatusCode::OK,
            if i.status == "TERMINATED" {
                "TRUE"
            } else {
                "FALSE"
            }
            .into(),
        ),
        _ => (StatusCode::NOT_FOUND, "not found".into()),
    }
}

/// Preempts a Spot VM (STOP action): TERMINATED, its agent dies with it, and a
/// `compute.instances.preempted` operation names it.
pub fn preempt(s: &Shared, name: &str) {
    let mut st = s.lock().unwrap();
    let zone = {
        let i = st.instances.get_mut(name).expect("no such instance");
        i.status = "TERMINATED".into();
        kill_instance(i);
        i.zone.clone()
    };
    st.new_op(
        &zone,
        "compute.instances.preempted",
        name,
        Duration::ZERO,
        Then::Nothing,
    );
    st.advance();
}

pub fn kill_instance(i: &GceInstance) {
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

/// Serves the fake on loopback from a thread of its own; returns its base URL (the token
/// endpoint is `<base>/token`, the API `<base>/compute/v1`).
pub fn serve(state: Shared) -> String {
    let app = Router::new()
        .route("/token", post(token))
        .route("/compute/v1/projects/{p}/zones/{z}/instances", post(insert))
        .route(
            "/compute/v1/projects/{p}/zones/{z}/instances/{n}",
            get(instance).delete(delete),
        )
        .route(
            "/compute/v1/projects/{p}/zones/{z}/operations",
            get(operations),
        )
        .route(
            "/compute/v1/projects/{p}/zones/{z}/operations/{o}",
            get(operation),
        )
        .route(
            "/compute/v1/projects/{p}/aggregated/instances",
            get(aggregated),
        )
        .route("/metadata/{n}/computeMetadata/v1/{*path}", get(metadata))
        .with_state(state.clone());
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap();
    let base = format!("http://{addr}");
    state.lock().unwrap().base = base.clone();
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
    base
}
