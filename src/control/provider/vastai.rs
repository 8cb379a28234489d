//! The `vastai` provider: GPU machines rented on Vast.ai through its REST API (facts in
//! ARCHITECTURE.md, "Providers"). Instances carry our unique label; a create has no idempotency
//! key, so after a timeout or 5xx the coordinator looks the label up before anything else. The API key comes
//! from the environment (`VAST_API_KEY`) or a file and is never logged.

use std::time::Duration;

use serde_json::{Value, json};

use super::{Machine, MachineState, Offer, Provider, ProviderError, Startup};
use crate::types::Side;

/// The on-start script the instances run (installs and starts agent-gpu; idempotent).
pub const ONSTART: &str = include_str!("../../../deploy/vastai-onstart.sh");

/// Settings of the `vastai` provider (`coordinator.toml` `[vastai]` and flags).
#[derive(Clone, Default)]
pub struct VastSettings {
    /// API base URL.
    pub url: String,
    /// The API key (from `VAST_API_KEY` or a file); never logged.
    pub key: String,
    /// Docker image of the instances (empty: `pytorch/pytorch:latest`).
    pub image: String,
    /// Disk to allocate, GB (0: 100).
    pub disk_gb: u32,
    /// Where instances download agent-gpu from (passed to the on-start script), and its
    /// SHA-256, which the script requires before it runs a downloaded binary.
    pub agent_url: String,
    pub agent_sha256: String,
}

impl std::fmt::Debug for VastSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VastSettings")
            .field("url", &self.url)
            .field("key", &"<redacted>")
            .field("image", &self.image)
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub struct VastAi {
    s: VastSettings,
    http: reqwest::Client,
}

fn transient(e: reqwest::Error) -> ProviderError {
    ProviderError::Transient(format!("vast.ai: {}", crate::text::error_chain(&e)))
}

impl VastAi {
    /// Checks the settings (an API key; a SHA-256 with any download URL) and fills in defaults.
    pub fn new(mut s: VastSettings) -> Result<VastAi, ProviderError> {
        if s.key.trim().is_empty() {
            return Err(ProviderError::Rejected(
                "vast.ai: no API key (set VAST_API_KEY or vastai_api_key_file)".into(),
            ));
        }
        if !s.agent_url.is_empty() && s.agent_sha256.len() != 64 {
            return Err(ProviderError::Rejected(
                "vastai: agent_url needs agent_sha256, the 64-hex SHA-256 of agent-gpu \
                 (sha256sum agent-gpu)"
                    .into(),
            ));
        }
        s.url = s.url.trim_end_matches('/').to_string();
        s.key = s.key.trim().to_string();
        if s.image.is_empty() {
            s.image = "pytorch/pytorch:latest".into();
        }
        if s.disk_gb == 0 {
            s.disk_gb = 100;
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(transient)?;
        Ok(VastAi { s, http })
    }

    /// Sends a request and classifies the answer: 2xx JSON, or an error that says whether
    /// trying again can help.
    async fn call(&self, req: reqwest::RequestBuilder, what: &str) -> Result<Value, ProviderError> {
        let resp = req
            .bearer_auth(&self.s.key)
            .send()
            .await
            .map_err(transient)?;
        let status = resp.status();
        let body = resp.text().await.map_err(transient)?;
        if status.is_success() {
            return serde_json::from_str(&body).map_err(|e| {
                ProviderError::Transient(format!("vast.ai {what}: unexpected reply ({e})"))
            });
        }
        let short: String = body.chars().take(200).collect();
        let msg = format!("vast.ai {what}: HTTP {} {short}", status.as_u16());
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(ProviderError::Transient(msg));
        }
        Err(ProviderError::Rejected(msg))
    }

    fn machine(v: &Value) -> Result<Machine, ProviderError> {
        let id = match &v["id"] {
            Value::Number(n) => n.to_string(),
            Value::String(s) => s.clone(),
            _ => {
                return Err(ProviderError::Transient(
                    "vast.ai: instance without an id".into(),
                ));
            }
        };
        let actual = v["actual_status"].as_str().unwrap_or("");
        let msg = v["status_msg"].as_str().unwrap_or("");
        let state = match actual {
            "running" => MachineState::Running,
            "" | "loading" | "created" | "scheduling" => {
                if msg.contains("failed") {
                    MachineState::Stopped
                } else {
                    MachineState::Starting
                }
            }
            _ => MachineState::Stopped,
        };
        Ok(Machine {
            id,
            label: v["label"].as_str().unwrap_or("").to_string(),
            state,
            place: v["machine_id"]
                .as_u64()
                .map(|m| format!("machine-{m}"))
                .unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl Provider for VastAi {
    fn name(&self) -> &'static str {
        "vastai"
    }

    async fn search(&self, role: Side) -> Result<Vec<Offer>, ProviderError> {
        if role != Side::Gpu {
            return Err(ProviderError::Rejected(
                "vast.ai provides GPU machines; use gcp, local or command for CPU standbys".into(),
            ));
        }
        let body = json!({
            "verified": {"eq": true},
            "rentable": {"eq": true},
            "rented": {"eq": false},
            "direct_port_count": {"gte": 1},
            "type": "on-demand",
            "order": [["dph_total", "asc"]],
            "limit": 64,
            "allocated_storage": self.s.disk_gb,
        });
        let v = self
            .call(
                self.http
                    .post(format!("{}/api/v0/bundles/", self.s.url))
                    .json(&body),
                "search",
            )
            .await?;
        let Some(list) = v["offers"].as_array() else {
            return Err(ProviderError::Transient(
                "vast.ai search: reply without an offers list".into(),
            ));
        };
        Ok(list
            .iter()
            .filter_map(|o| {
                Some(Offer {
                    id: o["id"].as_u64()?.to_string(),
                    place: o["machine_id"]
                        .as_u64()
                        .map(|m| format!("machine-{m}"))
                        .unwrap_or_default(),
                    region: o["geolocation"].as_str().unwrap_or("").to_string(),
                    gpu_name: o["gpu_name"].as_str().unwrap_or("").to_string(),
                    num_gpus: o["num_gpus"].as_u64().unwrap_or(0) as u32,
                    price_per_hour: o["dph_total"].as_f64().unwrap_or(f64::MAX),
                    reliability: o["reliability2"]
                        .as_f64()
                        .or_else(|| o["reliability"].as_f64())
                        .unwrap_or(0.0),
                    disk_gb: o["disk_space"].as_f64().unwrap_or(0.0),
                    inet_down_mbps: o["inet_down"].as_f64().unwrap_or(0.0),
                })
            })
            .collect())
    }

    async fn create(&self, offer: &Offer, s: &Startup) -> Result<Machine, ProviderError> {
        let body = json!({
            "client_id": "me",
            "image": self.s.image,
            "disk": self.s.disk_gb,
            "label": s.label,
            "runtype": "ssh_direct",
            "env": {
                "STANDBY_COORDINATOR": s.coordinator,
                "STANDBY_JOIN_TOKEN": s.join_token,
                "STANDBY_MACHINE": s.label,
                "STANDBY_PAIR": s.pair,
                "STANDBY_AGENT_URL": self.s.agent_url,
                "STANDBY_AGENT_SHA256": self.s.agent_sha256,
                "-p 7702:7702": "1",
            },
            "onstart": ONSTART,
            "cancel_unavail": true,
        });
        let r = self
            .call(
                self.http
                    .put(format!("{}/api/v0/asks/{}/", self.s.url, offer.id))
                    .json(&body),
                "create",
            )
            .await;
        let v = match r {
            Err(ProviderError::Rejected(m)) if m.contains("no_such_ask") => {
                return Err(ProviderError::Rejected(format!(
                    "offer {} is gone ({m})",
                    offer.id
                )));
            }
            other => other?,
        };
        if v["success"] != json!(true) {
            return Err(ProviderError::Rejected(format!(
                "vast.ai create: not successful: {v}"
            )));
        }
        let id = match &v["new_contract"] {
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(ProviderError::Transient(format!(
                    "vast.ai create: no instance id in {v}"
                )));
            }
        };
        Ok(Machine {
            id,
            label: s.label.clone(),
            state: MachineState::Starting,
            place: offer.place.clone(),
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Machine>, ProviderError> {
        let r = self
            .call(
                self.http
                    .get(format!("{}/api/v0/instances/{id}/", self.s.url))
                    .query(&[("owner", "me")]),
                "show",
            )
            .await;
        let v = match r {
            Err(ProviderError::Rejected(m)) if m.contains("HTTP 404") => return Ok(None),
            other => other?,
        };
        match &v["instances"] {
            Value::Null => Ok(None),
            i @ Value::Object(_) => Self::machine(i).map(Some),
            _ => Err(ProviderError::Transient(
                "vast.ai show: reply without an instances field".into(),
            )),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<Machine>, ProviderError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..200 {
            let mut q = vec![("limit", "25".to_string())];
            if let Some(t) = &token {
                q.push(("next_token", t.clone()));
            }
            let v = self
                .call(
                    self.http
                        .get(format!("{}/api/v1/instances/", self.s.url))
                        .query(&q),
                    "list",
                )
                .await?;
            // A listing without the expected shape is an error, never "no instances".
            let Some(list) = v["instances"].as_array() else {
                return Err(ProviderError::Transient(
                    "vast.ai list: reply without an instances list".into(),
                ));
            };
            for i in list {
                let m = Self::machine(i)?;
                if m.label.starts_with(prefix) {
                    out.push(m);
                }
            }
            match v["next_token"].as_str() {
                Some(t) if !t.is_empty() => token = Some(t.to_string()),
                _ => return Ok(out),
            }
        }
        Err(ProviderError::Transient(
            "vast.ai list: too many pages".into(),
        ))
    }

    async fn destroy(&self, id: &str) -> Result<(), ProviderError> {
        let r = self
            .call(
                self.http
                    .delete(format!("{}/api/v0/instances/{id}/", self.s.url)),
                "destroy",
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(ProviderError::Rejected(m)) if m.contains("HTTP 404") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> VastSettings {
        crate::trust::tls::install_default_provider();
        VastSettings {
            url: "http://127.0.0.1:1/".into(),
            key: " k ".into(),
            ..VastSettings::default()
        }
    }

    #[test]
    fn a_download_without_its_sha256_or_a_missing_key_is_refused() {
        let no_sha = VastSettings {
            agent_url: "http://127.0.0.1:1/agent-gpu".into(),
            ..settings()
        };
        let e = VastAi::new(no_sha).unwrap_err().to_string();
        assert!(e.contains("agent_sha256"), "{e}");
        let no_key = VastSettings {
            key: " ".into(),
            ..settings()
        };
        assert!(
            VastAi::new(no_key)
                .unwrap_err()
                .to_string()
                .contains("API key")
        );
    }

    #[test]
    fn defaults_fill_what_is_not_set_and_the_key_is_never_shown() {
        let pinned = VastSettings {
            agent_url: "http://127.0.0.1:1/agent-gpu".into(),
            agent_sha256: "a".repeat(64),
            ..settings()
        };
        let v = VastAi::new(pinned).unwrap();
        assert_eq!(
            (
                v.s.url.as_str(),
                v.s.key.as_str(),
                v.s.image.as_str(),
                v.s.disk_gb
            ),
            ("http://127.0.0.1:1", "k", "pytorch/pytorch:latest", 100)
        );
        assert!(!format!("{v:?}").contains("\"k\""), "{v:?}");
    }
}
