//! An S3-compatible bucket (R2, B2, S3, GCS interop, MinIO) through `object_store`'s S3 backend
//! (ARCHITECTURE.md, "Off-site backup"; README.md, "Off-site backups", for each provider's
//! settings).
//!
//! Only what every one of those providers implements is used: single-object PUT, GET (also of a
//! byte range), DELETE, ListObjectsV2 and multipart uploads whose parts all have one size except
//! the last (R2 requires equal parts; all require at least 5 MiB but the last). Conditional puts,
//! bulk deletes, tags and checksum headers are not used: object names are derived from immutable
//! local names, so a repeated PUT writes the same plaintext, and the AEAD tag checks every byte
//! end to end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};
use serde::Deserialize;

use super::layout::Kind;

/// Where the backup goes, as `[backup]` in the CPU agent's configuration says it.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// The provider's endpoint, e.g. `https://<account>.r2.cloudflarestorage.com`; empty for
    /// AWS S3 itself. `http://` is accepted only for loopback test servers and private networks.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// `auto` for R2 and GCS, e.g. `us-west-004` for B2; `AWS_REGION` or `us-east-1` when absent.
    #[serde(default)]
    pub region: Option<String>,
    /// `https://bucket.endpoint/key` instead of `https://endpoint/bucket/key`. Path style (the
    /// default) works with R2, B2, GCS and MinIO; AWS wants virtual-hosted for new buckets.
    #[serde(default)]
    pub virtual_hosted: bool,
    /// Per-request timeout (a stalled request fails and the pass counts a failure).
    #[serde(default = "default_timeout", with = "humantime_serde_lite")]
    pub timeout: Duration,
    /// Retries of one request before it counts as a failure.
    #[serde(default = "default_retries")]
    pub retries: usize,
}

fn default_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_retries() -> usize {
    3
}

/// Durations in TOML as humantime text ("30s").
mod humantime_serde_lite {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl BucketConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: &str) -> BucketConfig {
        BucketConfig {
            url: url.into(),
            endpoint: None,
            region: None,
            virtual_hosted: false,
            timeout: default_timeout(),
            retries: default_retries(),
        }
    }

    /// The bucket and the prefix (without slashes at either end) of `url`.
    pub fn bucket_and_prefix(&self) -> Result<(String, String), BucketError> {
        let rest = self.url.strip_prefix("s3://").ok_or_else(|| {
            BucketError::Config(format!(
                "backup url {:?} must start with s3:// (s3://bucket/prefix)",
                self.url
            ))
        })?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.';
        if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
            return Err(BucketError::Config(format!(
                "backup url {:?}: {bucket:?} is not a bucket name (3-63 of a-z 0-9 . -)",
                self.url
            )));
        }
        let prefix = prefix.trim_matches('/');
        if prefix.split('/').any(|p| p == ".." || p == ".") {
            return Err(BucketError::Config(format!(
                "backup url {:?}: the prefix may not hold . or ..",
                self.url
            )));
        }
        Ok((bucket.into(), prefix.into()))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BucketError {
    #[error("{0}")]
    Config(String),
    #[error("bucket {url}: {op} {object}: {source}")]
    Store {
        url: String,
        op: &'static str,
        object: String,
        // Boxed: object_store's error is large, and every `Result` here carries this type.
        #[source]
        source: Box<object_store::Error>,
    },
}

impl BucketError {
    /// The object does not exist (a delete of a missing object is not a failure).
    pub fn is_not_found(&self) -> bool {
        matches!(self, BucketError::Store { source, .. }
            if matches!(**source, object_store::Error::NotFound { .. }))
    }
}

/// The bucket's access key.
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, secret hidden)", self.access_key_id)
    }
}

impl Credentials {
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and, when set, `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<Credentials, BucketError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let (Some(id), Some(secret)) = (env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY"))
        else {
            return Err(BucketError::Config(
                "backup: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to the bucket's access key"
                    .into(),
            ));
        };
        Ok(Credentials {
            access_key_id: id,
            secret_access_key: secret,
            session_token: env("AWS_SESSION_TOKEN"),
        })
    }
}

/// One bucket and prefix. Objects live at `<prefix>/packs/<name>` and `<prefix>/snapshots/<name>`,
/// where `<name>` is the keyed hash `trust::seal` derives from the local name.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<AmazonS3>,
    prefix: String,
    url: String,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bucket({})", self.url)
    }
}

impl Bucket {
    /// Opens the bucket of `cfg`, with credentials from `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN` when set). Nothing is sent yet.
    pub fn open(cfg: &BucketConfig) -> Result<Bucket, BucketError> {
        Bucket::open_with(cfg, &Credentials::from_env()?)
    }

    /// Opens the bucket of `cfg` with the credentials given.
    pub fn open_with(cfg: &BucketConfig, creds: &Credentials) -> Result<Bucket, BucketError> {
        // reqwest's TLS takes the process's provider: make it ring (RUST-NOTES, "TLS").
        crate::trust::tls::install_default_provider();
        let (bucket, prefix) = cfg.bucket_and_prefix()?;
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let region = cfg
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .unwrap_or_else(|| "us-east-1".into());
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&bucket)
            .with_region(region)
            .with_access_key_id(&creds.access_key_id)
            .with_secret_access_key(&creds.secret_access_key)
            .with_virtual_hosted_style_request(cfg.virtual_hosted)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(cfg.timeout)
                    .with_connect_timeout(cfg.timeout.min(Duration::from_secs(10))),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: cfg.retries,
                retry_timeout: cfg.timeout * 2,
            });
        if let Some(token) = &creds.session_token {
            b = b.with_token(token);
        }
        if let Some(ep) = &cfg.endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
        }
        let store = b
            .build()
            .map_err(|e| BucketError::Config(format!("backup: {e}")))?;
        Ok(Bucket {
            store: Arc::new(store),
            prefix,
            url: cfg.url.clone(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The object's key relative to the prefix: what the AEAD binds, so a bucket can be moved
    /// under another prefix without resealing.
    pub fn relative(kind: Kind, name: &str) -> String {
        format!("{}/{name}", kind.folder())
    }

    fn path(&self, relative: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(relative)
        } else {
            ObjectPath::from(format!("{}/{relative}", self.prefix))
        }
    }

    fn err(
        &self,
        op: &'static str,
        object: &str,
    ) -> impl FnOnce(object_store::Error) -> BucketError + use<> {
        let (url, object) = (self.url.clone(), object.to_string());
        move |source| BucketError::Store {
            url,
            op,
            object,
            source: Box::new(source),
        }
    }

    /// Every object of `kind`: its name (the last part of its key) and size.
    pub async fn list(&self, kind: Kind) -> Result<BTreeMap<String, u64>, BucketError> {
        let dir = self.path(kind.folder());
        let mut out = BTreeMap::new();
        let mut s = self.store.list(Some(&dir));
        while let Some(meta) = s.next().await {
            let meta = meta.map_err(self.err("list", kind.folder()))?;
            if let Some(name) = meta.location.filename() {
                out.insert(name.to_string(), meta.size);
            }
        }
        Ok(out)
    }

    /// Writes a whole object in one request.
    pub async fn put(&self, relative: &str, bytes: Vec<u8>) -> Result<(), BucketError> {
        self.store
            .put(&self.path(relative), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(self.err("put", relative))
    }

    /// Starts a multipart upload with parts of `part_size` bytes.
    pub async fn put_multipart(
        &self,
        relative: &str,
        part_size: usize,
    ) -> Result<WriteMultipart, BucketError> {
        let up = self
            .store
            .put_multipart(&self.path(relative))
            .await
            .map_err(self.err("start multipart upload of", relative))?;
        Ok(WriteMultipart::new_with_chunk_size(up, part_size))
    }

    /// Names an error of a multipart upload started with [`Bucket::put_multipart`].
    pub fn multipart_error(&self, relative: &str, e: object_store::Error) -> BucketError {
        self.err("multipart upload of", relative)(e)
    }

    /// The object's bytes as they arrive.
    pub async fn get(
        &self,
        relative: &str,
    ) -> Result<BoxStream<'static, Result<Bytes, BucketError>>, BucketError> {
        let got = self
            .store
            .get(&self.path(relative))
            .await
            .map_err(self.err("get", relative))?;
        let (url, object) = (self.url.clone(), relative.to_string());
        Ok(got
            .into_stream()
            .map(move |r| {
                r.map_err(|source| BucketError::Store {
                    url: url.clone(),
                    op: "read",
                    object: object.clone(),
                    source: Box::new(source),
                })
            })
            .boxed())
    }

    /// Bytes `range` of an object.
    pub async fn get_range(
        &self,
        relative: &str,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, BucketError> {
        self.store
            .get_range(&self.path(relative), range)
            .await
            .map_err(self.err("get", relative))
    }

    pub async fn delete(&self, relative: &str) -> Result<(), BucketError> {
        match self.store.delete(&self.path(relative)).await {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            r => r.map_err(self.err("delete", relative)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_bucket_and_prefix() {
        let p = |u: &str| BucketConfig::new(u).bucket_and_prefix();
        assert_eq!(p("s3://backups").unwrap(), ("backups".into(), "".into()));
        assert_eq!(
            p("s3://backups/pairs/p1/").unwrap(),
            ("backups".into(), "pairs/p1".into())
        );
        for bad in [
            "https://x/y",
            "s3://",
            "s3://ab",
            "s3://Upper/x",
            "s3://bkt/../x",
        ] {
            let e = p(bad).unwrap_err();
            assert!(matches!(e, BucketError::Config(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn config_reads_from_toml_with_defaults() {
        let c: BucketConfig = toml::from_str(
            "url = \"s3://b-1/p\"\nendpoint = \"https://acct.r2.cloudflarestorage.com\"\nregion = \"auto\"\ntimeout = \"5s\"",
        )
        .unwrap();
        assert_eq!(c.timeout, Duration::from_secs(5));
        assert_eq!(c.retries, 3);
        assert!(!c.virtual_hosted);
        assert!(toml::from_str::<BucketConfig>("url = \"s3://b-1\"\nbogus = 1").is_err());
    }
}
