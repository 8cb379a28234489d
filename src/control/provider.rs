//! Where machines come from: one trait over every provider (ARCHITECTURE.md, "Providers").
//!
//! The coordinator only ever asks a provider to search offers, create a machine with a unique
//! label, look machines up by id or label prefix, and destroy them. Labels are what make
//! provisioning safe: the intent (the label) is persisted before `create`, so an ambiguous
//! create (timeout, 5xx) is settled by listing the label, never by creating again, and the
//! sweeper can recognise machines that carry our prefix but belong to no pair.

pub mod command;
pub mod gcp;
pub mod local;
pub mod vastai;

use std::time::Duration;

use crate::types::Side;

/// A duration setting of a provider's TOML table, written as a human string ("120s").
pub(crate) fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    crate::cli::parse_duration(&s).map_err(serde::de::Error::custom)
}

/// Something a provider can rent.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct Offer {
    pub id: String,
    /// Host, machine or zone: what a failed boot blocklists besides the offer. A blocked
    /// `region` (quota) rules out every offer in it.
    pub place: String,
    pub region: String,
    pub gpu_name: String,
    pub num_gpus: u32,
    pub price_per_hour: f64,
    pub reliability: f64,
    pub disk_gb: f64,
    pub inet_down_mbps: f64,
}

/// What a new machine needs to become an agent of a pair.
#[derive(Clone, Debug)]
pub struct Startup {
    pub pair: String,
    pub role: Side,
    /// The coordinator as the machine should dial it.
    pub coordinator: String,
    pub join_token: String,
    /// The label doubles as the agent's machine name.
    pub label: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// Created, not running yet (loading, booting).
    Starting,
    Running,
    /// Stopped, preempted or terminated, but still known to the provider.
    Stopped,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub id: String,
    pub label: String,
    pub state: MachineState,
    pub place: String,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProviderError {
    /// The outcome is unknown or may change on retry: timeouts, 429, 5xx. A create that fails
    /// this way may still have created the machine.
    #[error("{0}")]
    Transient(String),
    /// The provider refused (offer gone, bad request): retrying the same thing will not help.
    #[error("{0}")]
    Rejected(String),
    /// No capacity or quota at `place` (a zone or a region) for now: blocklist the place, not
    /// just the offer.
    #[error("{message}")]
    Unavailable { place: String, message: String },
    /// A machine of that name exists already (a previous attempt of the same label created
    /// it): settle by label.
    #[error("{0}")]
    Conflict(String),
}

impl ProviderError {
    pub fn transient(&self) -> bool {
        matches!(self, ProviderError::Transient(_))
    }
}

/// One cloud, marketplace or local host.
#[tonic::async_trait]
pub trait Provider: Send + Sync {
    fn name(&self) -> &'static str;
    /// Offers for a machine of `role`, unfiltered (the coordinator filters and ranks).
    async fn search(&self, role: Side) -> Result<Vec<Offer>, ProviderError>;
    /// Creates a machine labelled `startup.label` from `offer` that starts an agent which joins
    /// with the token.
    async fn create(&self, offer: &Offer, startup: &Startup) -> Result<Machine, ProviderError>;
    /// The machine with this id; None when the provider no longer knows it.
    async fn get(&self, id: &str) -> Result<Option<Machine>, ProviderError>;
    /// Every machine whose label starts with `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<Machine>, ProviderError>;
    /// Destroys the machine (and its disk). Destroying one that is already gone succeeds.
    async fn destroy(&self, id: &str) -> Result<(), ProviderError>;
}

/// Which offers to consider and in what order (from `coordinator.toml`).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OfferFilter {
    /// Substring of the GPU model, case-insensitive (e.g. "RTX 4090").
    pub gpu_name: Option<String>,
    pub num_gpus: Option<u32>,
    pub max_price_per_hour: Option<f64>,
    pub min_reliability: Option<f64>,
    pub min_disk_gb: Option<f64>,
    pub min_inet_down_mbps: Option<f64>,
    /// Regions (or zones) never to use, matched as a prefix of the offer's region.
    pub exclude_regions: Vec<String>,
}

impl OfferFilter {
    pub fn accepts(&self, o: &Offer) -> bool {
        if let Some(g) = &self.gpu_name
            && !o.gpu_name.to_lowercase().contains(&g.to_lowercase())
        {
            return false;
        }
        self.num_gpus.is_none_or(|n| o.num_gpus >= n)
            && self
                .max_price_per_hour
                .is_none_or(|p| o.price_per_hour <= p)
            && self.min_reliability.is_none_or(|r| o.reliability >= r)
            && self.min_disk_gb.is_none_or(|d| o.disk_gb >= d)
            && self
                .min_inet_down_mbps
                .is_none_or(|b| o.inet_down_mbps >= b)
            && !self
                .exclude_regions
                .iter()
                .any(|r| !r.is_empty() && o.region.starts_with(r.as_str()))
    }

    /// Offers that pass the filter and are not blocked, best first: cheapest, then most
    /// reliable, then fastest.
    pub fn rank(&self, offers: Vec<Offer>, blocked: &[String]) -> Vec<Offer> {
        let mut v: Vec<Offer> = offers
            .into_iter()
            .filter(|o| self.accepts(o))
            .filter(|o| {
                !blocked.iter().any(|b| {
                    b == &o.id
                        || (!o.place.is_empty() && b == &o.place)
                        || (!o.region.is_empty() && b == &o.region)
                })
            })
            .collect();
        v.sort_by(|a, b| {
            a.price_per_hour
                .total_cmp(&b.price_per_hour)
                .then(b.reliability.total_cmp(&a.reliability))
                .then(b.inet_down_mbps.total_cmp(&a.inet_down_mbps))
                .then(a.id.cmp(&b.id))
        });
        v
    }
}

/// Provisioning settings (from `coordinator.toml`, `[provision]`).
#[derive(Clone, Debug)]
pub struct ProvisionConfig {
    pub gpu: OfferFilter,
    pub cpu: OfferFilter,
    /// How often owned machines are checked with the provider (preemption, termination).
    pub poll_interval: Duration,
    /// How often machines carrying our label prefix but owned by no pair are destroyed.
    pub sweep_interval: Duration,
    /// Lifetime of the join token a new machine is given.
    pub token_ttl: Duration,
    /// Time limit of one provider call.
    pub call_timeout: Duration,
}

impl Default for ProvisionConfig {
    fn default() -> ProvisionConfig {
        ProvisionConfig {
            gpu: OfferFilter::default(),
            cpu: OfferFilter::default(),
            poll_interval: Duration::from_secs(5),
            sweep_interval: Duration::from_secs(60),
            token_ttl: Duration::from_secs(3600),
            call_timeout: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(id: &str, price: f64, rel: f64, region: &str) -> Offer {
        Offer {
            id: id.into(),
            place: format!("host-{id}"),
            region: region.into(),
            gpu_name: "RTX 4090".into(),
            num_gpus: 1,
            price_per_hour: price,
            reliability: rel,
            disk_gb: 100.0,
            inet_down_mbps: 500.0,
        }
    }

    #[test]
    fn filters_and_ranks_offers() {
        let f = OfferFilter {
            gpu_name: Some("4090".into()),
            max_price_per_hour: Some(0.5),
            min_reliability: Some(0.95),
            exclude_regions: vec!["CN".into()],
            ..Default::default()
        };
        let offers = vec![
            offer("a", 0.40, 0.99, "US-CA"),
            offer("b", 0.30, 0.97, "US-TX"),
            offer("c", 0.20, 0.90, "US-TX"), // unreliable
            offer("d", 0.60, 0.99, "US-TX"), // too dear
            offer("e", 0.10, 0.99, "CN-BJ"), // excluded region
            offer("f", 0.30, 0.99, "EU-DE"),
            offer("g", 0.25, 0.99, "EU-DE"), // blocked host
        ];
        let ranked: Vec<String> = f
            .rank(offers, &["host-g".into()])
            .into_iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(ranked, vec!["f", "b", "a"]);
        let mut wrong = offer("h", 0.1, 0.99, "US");
        wrong.gpu_name = "RTX 3090".into();
        assert!(!f.accepts(&wrong));
    }
}
