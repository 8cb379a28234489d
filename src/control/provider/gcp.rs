//! The `gcp` provider: CPU standbys as Spot e2 VMs on Google Compute Engine, through its REST API
//! (the API facts it relies on: ARCHITECTURE.md, "Providers"). It rents CPU machines only; GPUs
//! come from another provider (`--provider vastai --cpu-provider gcp`).
//!
//! - Auth: a service-account key file (`credentials_file` or `GOOGLE_APPLICATION_CREDENTIALS`)
//!   is turned into an RS256-signed JWT (iss = client_email, scope compute, aud = token_uri)
//!   and exchanged at the key's `token_uri` for an access token, cached until shortly before
//!   it expires. The private key and tokens are never logged.
//! - Create: `POST .../zones/{z}/instances?requestId=<uuid>` where the request id is derived
//!   from the machine's label, so a retried create of the same label is idempotent at the API
//!   as well; the returned Operation is polled until DONE. `ZONE_RESOURCE_POOL_EXHAUSTED`
//!   blocklists the zone, `QUOTA_EXCEEDED` the region.
//! - The instance name is the label when the label is a valid GCE name, otherwise a sanitised
//!   name with a hash; the label itself travels as the metadata item `standby-label`.
//! - A preempted Spot VM (`instanceTerminationAction: STOP`) reads TERMINATED; it is reported
//!   as stopped, and the log says whether a `compute.instances.preempted` operation names it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use super::{Machine, MachineState, Offer, Provider, ProviderError, Startup};
use crate::types::Side;

/// The start-up script the VMs run on every boot (installs and starts agent-cpu).
pub const STARTUP: &str = include_str!("../../../deploy/gcp-startup.sh");

const SCOPE: &str = "https://www.googleapis.com/auth/compute";

/// `[gcp]` in `coordinator.toml`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GcpSettings {
    pub project: String,
    /// Zones to create standbys in, tried cheapest first (all at the same price: in order).
    pub zones: Vec<String>,
    pub machine_type: String,
    pub image: String,
    pub disk_gb: u32,
    /// Spot VMs (the cheap default) or standard ones.
    pub spot: bool,
    /// What GCE does to a preempted Spot VM: STOP (keeps the disk) or DELETE.
    pub termination_action: String,
    pub network: String,
    /// Service-account key file; default: `GOOGLE_APPLICATION_CREDENTIALS`.
    pub credentials_file: Option<PathBuf>,
    pub api_url: String,
    /// Where the VMs download agent-cpu from, and its SHA-256 (checked when given).
    pub agent_url: String,
    pub agent_sha256: String,
    /// Estimated price of one VM, $/h (for ranking against other offers only).
    pub price_per_hour: f64,
    /// How often a pending Operation is polled.
    #[serde(deserialize_with = "super::de_duration")]
    pub poll_interval: Duration,
    /// How long create and destroy wait for their Operation before answering "still under
    /// way" (the caller then settles by label).
    #[serde(deserialize_with = "super::de_duration")]
    pub operation_timeout: Duration,
}

impl Default for GcpSettings {
    fn default() -> GcpSettings {
        GcpSettings {
            project: String::new(),
            zones: Vec::new(),
            machine_type: "e2-medium".into(),
            image: "projects/debian-cloud/global/images/family/debian-12".into(),
            disk_gb: 50,
            spot: true,
            termination_action: "STOP".into(),
            network: "global/networks/default".into(),
            credentials_file: None,
            api_url: "https://compute.googleapis.com/compute/v1".into(),
            agent_url: String::new(),
            agent_sha256: String::new(),
            price_per_hour: 0.01,
            poll_interval: Duration::from_secs(3),
            operation_timeout: Duration::from_secs(45),
        }
    }
}

/// The parts of a service-account key file we use.
#[derive(serde::Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: String,
    client_email: String,
    private_key: String,
    #[serde(default)]
    private_key_id: String,
    token_uri: String,
}

struct ServiceAccount {
    email: String,
    key_id: String,
    token_uri: String,
    key: ring::signature::RsaKeyPair,
}

impl ServiceAccount {
    fn load(path: &Path) -> Result<ServiceAccount, ProviderError> {
        let rejected = |m: String| ProviderError::Rejected(format!("gcp credentials: {m}"));
        let text = std::fs::read_to_string(path)
            .map_err(|e| rejected(format!("reading {}: {e}", path.display())))?;
        let k: KeyFile = serde_json::from_str(&text).map_err(|e| {
            rejected(format!(
                "{} is not a service-account key file ({e})",
                path.display()
            ))
        })?;
        if k.kind != "service_account" {
            return Err(rejected(format!(
                "{} holds a {:?} credential, not a service_account key",
                path.display(),
                k.kind
            )));
        }
        let b64: String = k
            .private_key
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| rejected("private_key is not PEM".into()))?;
        let key = ring::signature::RsaKeyPair::from_pkcs8(&der)
            .map_err(|e| rejected(format!("private_key is not an RSA PKCS#8 key ({e})")))?;
        Ok(ServiceAccount {
            email: k.client_email,
            key_id: k.private_key_id,
            token_uri: k.token_uri,
            key,
        })
    }

    /// The signed JWT exchanged for an access token.
    fn assertion(&self, now_unix: u64) -> Result<String, ProviderError> {
        let b64 = |v: &Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string().as_bytes())
        };
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": self.key_id});
        let claims = json!({
            "iss": self.email,
            "scope": SCOPE,
            "aud": self.token_uri,
            "iat": now_unix,
            "exp": now_unix + 3600,
        });
        let msg = format!("{}.{}", b64(&header), b64(&claims));
        let mut sig = vec![0u8; self.key.public().modulus_len()];
        self.key
            .sign(
                &ring::signature::RSA_PKCS1_SHA256,
                &ring::rand::SystemRandom::new(),
                msg.as_bytes(),
                &mut sig,
            )
            .map_err(|_| ProviderError::Rejected("gcp: signing the token request failed".into()))?;
        Ok(format!(
            "{msg}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sig)
        ))
    }
}

pub struct Gcp {
    s: GcpSettings,
    base: String,
    sa: ServiceAccount,
    http: reqwest::Client,
    token: tokio::sync::Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Gcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gcp")
            .field("project", &self.s.project)
            .field("zones", &self.s.zones)
            .field("service_account", &self.sa.email)
            .finish_non_exhaustive()
    }
}

fn transient(e: reqwest::Error) -> ProviderError {
    ProviderError::Transient(format!("gcp: {}", crate::text::error_chain(&e)))
}

/// The last segment of a resource URL (`.../zones/us-central1-a` → `us-central1-a`).
fn last(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

/// `us-central1-a` → `us-central1`.
pub fn region_of(zone: &str) -> &str {
    zone.rsplit_once('-').map_or(zone, |(r, _)| r)
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

/// The GCE instance name for a label: the label itself when it is a valid name, otherwise a
/// lower-cased, shortened form with a hash of the label (names allow `[a-z0-9-]`, 63 chars).
pub fn instance_name(label: &str) -> String {
    if valid_name(label) {
        return label.to_string();
    }
    let clean: String = label
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .take(45)
        .collect();
    let h = blake3::hash(label.as_bytes()).to_hex();
    let name = format!("{}-{}", clean.trim_end_matches('-'), &h[..12]);
    if name.as_bytes()[0].is_ascii_lowercase() {
        name
    } else {
        format!("sb{name}")
    }
}

/// A request id (a UUID, as GCE wants) derived from the label: retrying the create of one label
/// is the same request.
pub fn request_id(label: &str) -> String {
    let h = blake3::hash(format!("standby create {label}").as_bytes());
    let mut b: [u8; 16] = h.as_bytes()[..16].try_into().expect("16 bytes");
    b[6] = (b[6] & 0x0f) | 0x40; // version 4 layout
    b[8] = (b[8] & 0x3f) | 0x80;
    let x: String = b.iter().map(|v| format!("{v:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// The first error of an Operation that is DONE, as (code, message).
fn op_error(op: &Value) -> Option<(String, String)> {
    let e = op["error"]["errors"].as_array()?.first()?;
    Some((
        e["code"].as_str().unwrap_or("UNKNOWN").to_string(),
        e["message"].as_str().unwrap_or("").to_string(),
    ))
}

/// How an Operation's error should be treated, for an operation in `zone`.
fn classify(code: &str, message: &str, zone: &str, what: &str) -> ProviderError {
    let msg = format!("gcp {what} in {zone}: {code}: {message}");
    match code {
        "ZONE_RESOURCE_POOL_EXHAUSTED"
        | "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS"
        | "RESOURCE_POOL_EXHAUSTED"
        | "RESOURCE_NOT_AVAILABLE" => ProviderError::Unavailable {
            place: zone.to_string(),
            message: msg,
        },
        "QUOTA_EXCEEDED" | "REGION_QUOTA_EXCEEDED" => ProviderError::Unavailable {
            place: region_of(zone).to_string(),
            message: msg,
        },
        "RESOURCE_OPERATION_RATE_EXCEEDED" | "RATE_LIMIT_EXCEEDED" | "INTERNAL_ERROR" => {
            ProviderError::Transient(msg)
        }
        _ => ProviderError::Rejected(msg),
    }
}

impl Gcp {
    /// A client for `s`; `credentials` is the service-account key file.
    pub fn new(s: GcpSettings, credentials: &Path) -> Result<Gcp, ProviderError> {
        if s.project.trim().is_empty() {
            return Err(ProviderError::Rejected(
                "gcp: no project (set [gcp] project in coordinator.toml)".into(),
            ));
        }
        if s.zones.is_empty() {
            return Err(ProviderError::Rejected(
                "gcp: no zones (set [gcp] zones = [\"us-central1-a\", ...])".into(),
            ));
        }
        if !matches!(s.termination_action.as_str(), "STOP" | "DELETE") {
            return Err(ProviderError::Rejected(format!(
                "gcp: termination_action must be STOP or DELETE, not {:?}",
                s.termination_action
            )));
        }
        let sa = ServiceAccount::load(credentials)?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(transient)?;
        Ok(Gcp {
            base: s.api_url.trim_end_matches('/').to_string(),
            s,
            sa,
            http,
            token: tokio::sync::Mutex::new(None),
        })
    }

    /// The credentials file named by the settings or the environment.
    pub fn credentials_path(s: &GcpSettings) -> Result<PathBuf, ProviderError> {
        s.credentials_file
            .clone()
            .or_else(|| std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").map(PathBuf::from))
            .ok_or_else(|| {
                ProviderError::Rejected(
                    "gcp: no service-account key (set [gcp] credentials_file or GOOGLE_APPLICATION_CREDENTIALS)"
                        .into(),
                )
            })
    }

    async fn access_token(&self) -> Result<String, ProviderError> {
        let mut cached = self.token.lock().await;
        if let Some((t, until)) = &*cached
            && Instant::now() < *until
        {
            return Ok(t.clone());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let assertion = self.sa.assertion(now)?;
        let resp = self
            .http
            .post(&self.sa.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(transient)?;
        let status = resp.status();
        let body = resp.text().await.map_err(transient)?;
        if !status.is_success() {
            // The body names the OAuth error (invalid_grant, ...); it holds no secret.
            let short: String = body.chars().take(200).collect();
            let msg = format!(
                "gcp: the token endpoint refused the service account {}: HTTP {} {short}",
                self.sa.email,
                status.as_u16()
            );
            return Err(if status.as_u16() == 429 || status.is_server_error() {
                ProviderError::Transient(msg)
            } else {
                ProviderError::Rejected(msg)
            });
        }
        let v: Value = serde_json::from_str(&body).map_err(|_| {
            ProviderError::Transient("gcp: the token endpoint answered something else".into())
        })?;
        let Some(token) = v["access_token"].as_str() else {
            return Err(ProviderError::Transient(
                "gcp: the token endpoint answered without an access_token".into(),
            ));
        };
        let ttl = v["expires_in"].as_u64().unwrap_or(3600).max(120);
        *cached = Some((
            token.to_string(),
            Instant::now() + Duration::from_secs(ttl - 60),
        ));
        Ok(token.to_string())
    }

    /// Sends a Compute request and classifies the answer. `Ok(None)` is a 404.
    async fn call(
        &self,
        method: reqwest::Method,
        url: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        what: &str,
    ) -> Result<Option<Value>, ProviderError> {
        let token = self.access_token().await?;
        let mut req = self
            .http
            .request(method, url)
            .bearer_auth(&token)
            .query(query);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(transient)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transient)?;
        if status.is_success() {
            return serde_json::from_str(&text).map(Some).map_err(|e| {
                ProviderError::Transient(format!("gcp {what}: unexpected reply ({e})"))
            });
        }
        if status.as_u16() == 404 {
            return Ok(None);
        }
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let reason = v["error"]["errors"][0]["reason"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let message: String = v["error"]["message"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| text.chars().take(200).collect());
        if status.as_u16() == 401 {
            *self.token.lock().await = None; // a revoked or expired token: fetch a new one
            return Err(ProviderError::Transient(format!(
                "gcp {what}: HTTP 401 {message}"
            )));
        }
        let msg = format!("gcp {what}: HTTP {} {reason} {message}", status.as_u16());
        if status.as_u16() == 429
            || status.is_server_error()
            || matches!(
                reason.as_str(),
                "rateLimitExceeded" | "userRateLimitExceeded" | "resourceNotReady"
            )
        {
            return Err(ProviderError::Transient(msg));
        }
        if status.as_u16() == 409 {
            return Err(ProviderError::Conflict(msg));
        }
        Err(ProviderError::Rejected(msg))
    }

    fn zone_url(&self, zone: &str) -> String {
        format!("{}/projects/{}/zones/{zone}", self.base, self.s.project)
    }

    /// Polls an Operation until it is DONE or the operation timeout passes.
    async fn wait(&self, zone: &str, mut op: Value, what: &str) -> Result<Value, ProviderError> {
        let deadline = Instant::now() + self.s.operation_timeout;
        loop {
            if op["status"] == "DONE" {
                return Ok(op);
            }
            let name = op["name"].as_str().unwrap_or("").to_string();
            if name.is_empty() {
                return Err(ProviderError::Transient(format!(
                    "gcp {what}: an operation without a name"
                )));
            }
            if Instant::now() >= deadline {
                return Err(ProviderError::Transient(format!(
                    "gcp {what}: operation {name} still {} after {} s",
                    op["status"].as_str().unwrap_or("?"),
                    self.s.operation_timeout.as_secs()
                )));
            }
            tokio::time::sleep(self.s.poll_interval).await;
            let url = format!("{}/operations/{name}", self.zone_url(zone));
            op = self
                .call(reqwest::Method::GET, &url, &[], None, what)
                .await?
                .ok_or_else(|| {
                    ProviderError::Transient(format!("gcp {what}: operation {name} vanished"))
                })?;
        }
    }

    fn machine(v: &Value) -> Result<Machine, ProviderError> {
        let name = v["name"]
            .as_str()
            .ok_or_else(|| ProviderError::Transient("gcp: an instance without a name".into()))?;
        let zone = last(v["zone"].as_str().unwrap_or(""));
        if zone.is_empty() {
            return Err(ProviderError::Transient(format!(
                "gcp: instance {name} without a zone"
            )));
        }
        let label = v["metadata"]["items"]
            .as_array()
            .and_then(|items| {
                items
                    .iter()
                    .find(|i| i["key"] == "standby-label")
                    .and_then(|i| i["value"].as_str())
            })
            .unwrap_or(name);
        let state = match v["status"].as_str().unwrap_or("") {
            "RUNNING" => MachineState::Running,
            "PROVISIONING" | "STAGING" | "REPAIRING" | "PENDING" => MachineState::Starting,
            _ => MachineState::Stopped, // STOPPING, TERMINATED, SUSPENDING, SUSPENDED
        };
        Ok(Machine {
            id: format!("{zone}/{name}"),
            label: label.to_string(),
            state,
            place: zone.to_string(),
        })
    }

    fn split_id(id: &str) -> Result<(&str, &str), ProviderError> {
        id.split_once('/')
            .filter(|(z, n)| !z.is_empty() && !n.is_empty() && !n.contains('/'))
            .ok_or_else(|| {
                ProviderError::Rejected(format!("gcp: {id:?} is not a zone/name machine id"))
            })
    }

    async fn instance(&self, zone: &str, name: &str) -> Result<Option<Machine>, ProviderError> {
        let url = format!("{}/instances/{name}", self.zone_url(zone));
        match self
            .call(reqwest::Method::GET, &url, &[], None, "get")
            .await?
        {
            Some(v) => Ok(Some(Self::machine(&v)?)),
            None => Ok(None),
        }
    }

    /// Whether GCE preempted the instance (a `compute.instances.preempted` operation names it).
    async fn preempted(&self, zone: &str, name: &str) -> Result<bool, ProviderError> {
        let url = format!("{}/operations", self.zone_url(zone));
        let q = [(
            "filter",
            "operationType=\"compute.instances.preempted\"".to_string(),
        )];
        let v = self
            .call(reqwest::Method::GET, &url, &q, None, "list operations")
            .await?
            .unwrap_or(Value::Null);
        Ok(v["items"].as_array().is_some_and(|ops| {
            ops.iter().any(|o| {
                o["operationType"] == "compute.instances.preempted"
                    && o["targetLink"]
                        .as_str()
                        .is_some_and(|t| t.ends_with(&format!("/instances/{name}")))
            })
        }))
    }

    fn insert_body(&self, zone: &str, name: &str, s: &Startup) -> Value {
        let meta = |k: &str, v: &str| json!({"key": k, "value": v});
        let mut scheduling = json!({
            "onHostMaintenance": "TERMINATE",
            "automaticRestart": false,
        });
        if self.s.spot {
            scheduling["provisioningModel"] = json!("SPOT");
            scheduling["instanceTerminationAction"] = json!(self.s.termination_action);
        } else {
            scheduling["onHostMaintenance"] = json!("MIGRATE");
            scheduling["automaticRestart"] = json!(true);
        }
        let label_value = |v: &str| -> String {
            v.to_ascii_lowercase()
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '-'
                    }
                })
                .take(63)
                .collect()
        };
        json!({
            "name": name,
            "machineType": format!("zones/{zone}/machineTypes/{}", self.s.machine_type),
            "labels": {
                "standby-pair": label_value(&s.pair),
                "standby-role": s.role.as_str(),
            },
            "scheduling": scheduling,
            "disks": [{
                "boot": true,
                "autoDelete": true,
                "initializeParams": {
                    "sourceImage": self.s.image,
                    "diskSizeGb": self.s.disk_gb.to_string(),
                },
            }],
            "networkInterfaces": [{
                "network": self.s.network,
                "accessConfigs": [{"type": "ONE_TO_ONE_NAT", "name": "External NAT"}],
            }],
            "metadata": {"items": [
                meta("startup-script", STARTUP),
                meta("standby-label", &s.label),
                meta("standby-pair", &s.pair),
                meta("standby-role", s.role.as_str()),
                meta("standby-coordinator", &s.coordinator),
                meta("standby-join-token", &s.join_token),
                meta("standby-agent-url", &self.s.agent_url),
                meta("standby-agent-sha256", &self.s.agent_sha256),
            ]},
        })
    }
}

#[tonic::async_trait]
impl Provider for Gcp {
    fn name(&self) -> &'static str {
        "gcp"
    }

    async fn search(&self, role: Side) -> Result<Vec<Offer>, ProviderError> {
        if role == Side::Gpu {
            return Err(ProviderError::Rejected(
                "gcp rents CPU standbys only: take GPUs from another provider (e.g. --provider vastai --cpu-provider gcp)".into(),
            ));
        }
        Ok(self
            .s
            .zones
            .iter()
            .map(|z| Offer {
                id: z.clone(),
                place: z.clone(),
                region: region_of(z).to_string(),
                gpu_name: String::new(),
                num_gpus: 0,
                price_per_hour: self.s.price_per_hour,
                reliability: 1.0,
                disk_gb: self.s.disk_gb as f64,
                inet_down_mbps: 1000.0,
            })
            .collect())
    }

    async fn create(&self, offer: &Offer, s: &Startup) -> Result<Machine, ProviderError> {
        let zone = offer.id.as_str();
        if !self.s.zones.iter().any(|z| z == zone) {
            return Err(ProviderError::Rejected(format!(
                "gcp: zone {zone} is not configured"
            )));
        }
        let name = instance_name(&s.label);
        let url = format!("{}/instances", self.zone_url(zone));
        let body = self.insert_body(zone, &name, s);
        let q = [("requestId", request_id(&s.label))];
        match self
            .call(reqwest::Method::POST, &url, &q, Some(&body), "create")
            .await
        {
            Ok(Some(op)) => {
                let op = self.wait(zone, op, "create").await?;
                if let Some((code, message)) = op_error(&op)
                    && code != "RESOURCE_ALREADY_EXISTS"
                {
                    return Err(classify(&code, &message, zone, "create"));
                }
            }
            Ok(None) => {
                return Err(ProviderError::Rejected(format!(
                    "gcp create: project {} or zone {zone} not found",
                    self.s.project
                )));
            }
            // The name exists: a previous attempt of this label created it.
            Err(ProviderError::Conflict(_)) => {}
            Err(e) => return Err(e),
        }
        self.instance(zone, &name).await?.ok_or_else(|| {
            ProviderError::Transient(format!(
                "gcp create: {name} is not visible yet after its operation finished"
            ))
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Machine>, ProviderError> {
        let (zone, name) = Self::split_id(id)?;
        let m = self.instance(zone, name).await?;
        if let Some(m) = &m
            && m.state == MachineState::Stopped
        {
            match self.preempted(zone, name).await {
                Ok(true) => tracing::warn!(%id, "gcp: the Spot VM was preempted"),
                Ok(false) => tracing::warn!(%id, "gcp: the VM is stopped (not by preemption)"),
                Err(e) => tracing::debug!(%id, error = %e, "gcp: cannot tell why the VM stopped"),
            }
        }
        Ok(m)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Machine>, ProviderError> {
        let url = format!(
            "{}/projects/{}/aggregated/instances",
            self.base, self.s.project
        );
        let mut out = Vec::new();
        let mut page = String::new();
        for _ in 0..1000 {
            let mut q = vec![("maxResults", "500".to_string())];
            if !page.is_empty() {
                q.push(("pageToken", page.clone()));
            }
            let v = self
                .call(reqwest::Method::GET, &url, &q, None, "list")
                .await?
                .ok_or_else(|| {
                    ProviderError::Rejected(format!(
                        "gcp list: project {} not found",
                        self.s.project
                    ))
                })?;
            let Some(items) = v["items"].as_object() else {
                if v.get("items").is_some_and(|i| !i.is_null()) {
                    return Err(ProviderError::Transient(
                        "gcp list: malformed aggregated listing".into(),
                    ));
                }
                break;
            };
            for scope in items.values() {
                for inst in scope["instances"].as_array().into_iter().flatten() {
                    let m = Self::machine(inst)?;
                    if m.label.starts_with(prefix) {
                        out.push(m);
                    }
                }
            }
            match v["nextPageToken"].as_str() {
                Some(t) if !t.is_empty() => page = t.to_string(),
                _ => return Ok(out),
            }
        }
        Ok(out)
    }

    async fn destroy(&self, id: &str) -> Result<(), ProviderError> {
        let (zone, name) = Self::split_id(id)?;
        let url = format!("{}/instances/{name}", self.zone_url(zone));
        let Some(op) = self
            .call(reqwest::Method::DELETE, &url, &[], None, "destroy")
            .await?
        else {
            return Ok(()); // gone already
        };
        let op = self.wait(zone, op, "destroy").await?;
        match op_error(&op) {
            None => Ok(()),
            Some((code, _)) if code == "RESOURCE_NOT_FOUND" => Ok(()),
            Some((code, message)) => Err(ProviderError::Transient(format!(
                "gcp destroy {id}: {code}: {message}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests;
