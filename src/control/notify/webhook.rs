//! `[[notify]]`: a webhook's settings as written in coordinator.toml, and the checked webhook
//! they become (its secret read, its URL parsed) before the coordinator binds a port.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::body::Format;
use super::notice::NoticeKind;
use super::sign::Secret;

/// One `[[notify]]` table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// The `webhook` label of its metrics and log lines (default: the URL's host).
    #[serde(default)]
    pub name: Option<String>,
    pub url: String,
    #[serde(default)]
    pub format: Format,
    /// What it is told (default: everything).
    #[serde(default = "all_kinds")]
    pub events: Vec<NoticeKind>,
    /// A file holding the HMAC secret (surrounding whitespace ignored).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// An environment variable of the coordinator holding the HMAC secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// PagerDuty's integration key, or a file holding it.
    #[serde(default)]
    pub routing_key: Option<String>,
    #[serde(default)]
    pub routing_key_file: Option<PathBuf>,
    /// How long one attempt may take.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Attempts after the first before a notice is given up.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// The first wait between attempts (doubling each time) and the longest.
    #[serde(default = "default_backoff")]
    pub backoff: String,
    #[serde(default = "default_backoff_max")]
    pub backoff_max: String,
    /// Notices waiting at most; when full, the oldest is dropped (and counted).
    #[serde(default = "default_queue")]
    pub queue: usize,
}

fn all_kinds() -> Vec<NoticeKind> {
    NoticeKind::ALL.to_vec()
}
fn default_timeout() -> String {
    "10s".into()
}
fn default_retries() -> u32 {
    10
}
fn default_backoff() -> String {
    "1s".into()
}
fn default_backoff_max() -> String {
    "60s".into()
}
fn default_queue() -> usize {
    1000
}

/// A `[[notify]]` table that cannot be used; each message names the webhook and the key.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("[[notify]] {name}: url {url:?}: {why} (an http:// or https:// URL)")]
    Url {
        name: String,
        url: String,
        why: String,
    },
    #[error("[[notify]] {name}: {key} {value:?}: {why}")]
    Setting {
        name: String,
        key: &'static str,
        value: String,
        why: String,
    },
    #[error("[[notify]] {name}: give secret_file or secret_env, not both")]
    TwoSecrets { name: String },
    #[error("[[notify]] {name}: reading {}: {source}", path.display())]
    Read {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("[[notify]] {name}: the secret from {from} is empty")]
    EmptySecret { name: String, from: String },
    #[error("[[notify]] {name}: format = \"pagerduty\" needs routing_key or routing_key_file")]
    NoRoutingKey { name: String },
    #[error("two [[notify]] webhooks are named {name:?}; give each a distinct `name`")]
    Duplicate { name: String },
}

/// A checked webhook. `Debug` never shows the secret or the routing key.
#[derive(Clone)]
pub struct Webhook {
    pub name: String,
    pub url: reqwest::Url,
    pub format: Format,
    pub events: Vec<NoticeKind>,
    pub secret: Option<Secret>,
    pub routing_key: String,
    pub timeout: Duration,
    pub retries: u32,
    pub backoff: Duration,
    pub backoff_max: Duration,
    pub queue: usize,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("name", &self.name)
            .field("url", &self.url_for_logs())
            .field("format", &self.format)
            .field("events", &self.events)
            .field("signed", &self.secret.is_some())
            .finish_non_exhaustive()
    }
}

impl Webhook {
    /// The URL without its path and query, which often hold a token (Slack's do).
    pub fn url_for_logs(&self) -> String {
        format!(
            "{}://{}",
            self.url.scheme(),
            self.url.host_str().unwrap_or("?")
        )
    }

    /// Checks every `[[notify]]` table: URLs, durations, secrets, distinct names.
    pub fn all(configs: &[WebhookConfig]) -> Result<Vec<Webhook>, WebhookError> {
        let hooks = configs
            .iter()
            .map(Webhook::from_config)
            .collect::<Result<Vec<_>, _>>()?;
        let mut names = std::collections::HashSet::new();
        for h in &hooks {
            if !names.insert(h.name.as_str()) {
                return Err(WebhookError::Duplicate {
                    name: h.name.clone(),
                });
            }
        }
        Ok(hooks)
    }

    pub fn from_config(c: &WebhookConfig) -> Result<Webhook, WebhookError> {
        let url = parse_url(c)?;
        let name = c
            .name
            .clone()
            .unwrap_or_else(|| url.host_str().unwrap_or("webhook").to_string());
        let duration = |key: &'static str, v: &str| {
            crate::cli::parse_duration(v).map_err(|why| WebhookError::Setting {
                name: name.clone(),
                key,
                value: v.to_string(),
                why,
            })
        };
        let hook = Webhook {
            url,
            format: c.format,
            events: c.events.clone(),
            secret: secret(c, &name)?,
            routing_key: routing_key(c, &name)?,
            timeout: duration("timeout", &c.timeout)?,
            retries: c.retries,
            backoff: duration("backoff", &c.backoff)?,
            backoff_max: duration("backoff_max", &c.backoff_max)?,
            queue: c.queue.max(1),
            name,
        };
        if hook.events.is_empty() {
            return Err(hook.setting("events", "[]", "lists no event (leave it out for all)"));
        }
        if hook.timeout.is_zero() {
            return Err(hook.setting("timeout", &c.timeout, "must be more than 0"));
        }
        if hook.backoff_max < hook.backoff {
            return Err(hook.setting("backoff_max", &c.backoff_max, "is less than backoff"));
        }
        Ok(hook)
    }

    fn setting(&self, key: &'static str, value: &str, why: &str) -> WebhookError {
        WebhookError::Setting {
            name: self.name.clone(),
            key,
            value: value.to_string(),
            why: why.to_string(),
        }
    }

    /// Whether this webhook is told news of `kind`.
    pub fn wants(&self, kind: NoticeKind) -> bool {
        self.events.contains(&kind)
    }
}

fn parse_url(c: &WebhookConfig) -> Result<reqwest::Url, WebhookError> {
    let name = c.name.clone().unwrap_or_else(|| c.url.clone());
    let bad = |why: String| WebhookError::Url {
        name: name.clone(),
        url: c.url.clone(),
        why,
    };
    let url = reqwest::Url::parse(&c.url).map_err(|e| bad(e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(bad("not an http(s) URL with a host".into()));
    }
    Ok(url)
}

fn secret(c: &WebhookConfig, name: &str) -> Result<Option<Secret>, WebhookError> {
    let (text, from) = match (&c.secret_file, &c.secret_env) {
        (Some(_), Some(_)) => {
            return Err(WebhookError::TwoSecrets { name: name.into() });
        }
        (None, None) => return Ok(None),
        (Some(p), None) => (read(p, name)?, p.display().to_string()),
        (None, Some(var)) => (std::env::var(var).unwrap_or_default(), format!("${var}")),
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(WebhookError::EmptySecret {
            name: name.into(),
            from,
        });
    }
    Ok(Some(Secret::new(text.as_bytes())))
}

fn routing_key(c: &WebhookConfig, name: &str) -> Result<String, WebhookError> {
    let key = match (&c.routing_key, &c.routing_key_file) {
        (Some(k), _) => k.trim().to_string(),
        (None, Some(p)) => read(p, name)?.trim().to_string(),
        (None, None) => String::new(),
    };
    if c.format == Format::Pagerduty && key.is_empty() {
        return Err(WebhookError::NoRoutingKey { name: name.into() });
    }
    Ok(key)
}

fn read(p: &std::path::Path, name: &str) -> Result<String, WebhookError> {
    std::fs::read_to_string(p).map_err(|source| WebhookError::Read {
        name: name.into(),
        path: p.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> Vec<WebhookConfig> {
        #[derive(Deserialize)]
        struct File {
            notify: Vec<WebhookConfig>,
        }
        toml::from_str::<File>(toml_text).unwrap().notify
    }

    #[test]
    fn defaults_and_every_key() {
        let t = tempfile::tempdir().unwrap();
        let secret = t.path().join("secret");
        std::fs::write(&secret, "  hunter2\n").unwrap();
        let text = format!(
            r#"
            [[notify]]
            url = "https://hooks.example.com/T000/B000/XXXX"

            [[notify]]
            name = "pd"
            url = "https://events.pagerduty.com/v2/enqueue"
            format = "pagerduty"
            routing_key = "R0UT1NG"
            events = ["failover", "recovered"]
            secret_file = "{}"
            timeout = "2s"
            retries = 3
            backoff = "200ms"
            backoff_max = "1s"
            queue = 5
            "#,
            secret.display()
        );
        let hooks = Webhook::all(&config(&text)).unwrap();
        let a = &hooks[0];
        assert_eq!(a.name, "hooks.example.com");
        assert_eq!(a.format, Format::Json);
        assert_eq!(a.events, NoticeKind::ALL.to_vec());
        assert!(a.secret.is_none());
        assert_eq!(
            (a.timeout, a.retries, a.queue),
            (Duration::from_secs(10), 10, 1000)
        );
        let b = &hooks[1];
        assert_eq!(b.name, "pd");
        assert!(b.wants(NoticeKind::Recovered) && !b.wants(NoticeKind::Hibernated));
        let s = b.secret.as_ref().unwrap();
        assert!(s.verify(1, b"x", &Secret::new(b"hunter2").sign(1, b"x")));
        assert_eq!(b.routing_key, "R0UT1NG");
        assert_eq!(b.backoff, Duration::from_millis(200));
        let shown = format!("{b:?}");
        assert!(
            !shown.contains("R0UT1NG") && !shown.contains("hunter2"),
            "{shown}"
        );
        assert!(
            !format!("{a:?}").contains("XXXX"),
            "the URL's path is not logged"
        );
    }

    #[test]
    fn bad_tables_are_refused_with_the_key_named() {
        let err = |text: &str| Webhook::all(&config(text)).unwrap_err().to_string();
        let e = err("[[notify]]\nurl = \"ftp://x\"");
        assert!(e.contains("url") && e.contains("ftp://x"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a\"\ntimeout = \"soon\"");
        assert!(e.contains("timeout") && e.contains("soon"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a\"\nformat = \"pagerduty\"");
        assert!(e.contains("routing_key"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a\"\nsecret_file = \"/nonexistent/s\"");
        assert!(e.contains("/nonexistent/s"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a\"\nsecret_file = \"/x\"\nsecret_env = \"Y\"");
        assert!(e.contains("not both"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a\"\nsecret_env = \"STANDBY_TEST_UNSET_SECRET\"");
        assert!(
            e.contains("empty") && e.contains("STANDBY_TEST_UNSET_SECRET"),
            "{e}"
        );
        let e = err("[[notify]]\nurl = \"http://a\"\nbackoff = \"10s\"\nbackoff_max = \"1s\"");
        assert!(e.contains("backoff_max"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a\"\nevents = []");
        assert!(e.contains("events") && e.contains("no event"), "{e}");
        let e = err("[[notify]]\nurl = \"http://a/1\"\n[[notify]]\nurl = \"http://a/2\"");
        assert!(e.contains("\"a\"") && e.contains("name"), "{e}");
        // Unknown keys and kinds are configuration errors, not silently ignored.
        #[derive(Deserialize, Debug)]
        #[allow(dead_code)]
        struct File {
            notify: Vec<WebhookConfig>,
        }
        assert!(toml::from_str::<File>("[[notify]]\nurl = \"http://a\"\nurls = 1").is_err());
        assert!(
            toml::from_str::<File>("[[notify]]\nurl = \"http://a\"\nevents = [\"boom\"]").is_err()
        );
    }
}
