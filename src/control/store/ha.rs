//! What a highly available coordinator needs to know about etcd (`serve --store etcd`). Plain
//! settings, compiled with or without the `etcd` feature, so the command line reads them either
//! way and a build without the feature can say so (ARCHITECTURE.md, "Highly available
//! coordinators").

use std::path::PathBuf;
use std::time::Duration;

/// Where the etcd cluster is and how to reach it.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://` or, with TLS, `https://`).
    pub endpoints: Vec<String>,
    /// Every key lives below it.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Each request's limit.
    pub timeout: Duration,
}

/// Client TLS towards etcd: the CA that signed the members' certificates, and this
/// coordinator's client certificate when etcd asks for one (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>) -> EtcdConfig {
        EtcdConfig {
            endpoints,
            prefix: "/standby/v1".into(),
            tls: None,
            timeout: Duration::from_secs(5),
        }
    }
}

/// The etcd side of `serve`: where etcd is and how long the leader's lease lives.
#[derive(Clone, Debug)]
pub struct HaOptions {
    pub etcd: EtcdConfig,
    /// The lease's TTL; the leader stops issuing commands after half of it without a renewal.
    pub lease: Duration,
}
