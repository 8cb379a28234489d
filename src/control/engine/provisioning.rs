//! The engine's provider calls: creating the machine a pair's record asks for, destroying the
//! machines on its teardown list, watching the machines it owns, and sweeping orphans.
//!
//! Each call runs in its own task and comes back to the engine as a [`Msg::Provider`] input, so
//! the pair's machine decides what a result means. A call is started only once the intent is
//! durable (the record is written), and never twice at once ([`Call`] in `inflight`). An
//! ambiguous create is settled by listing its label, never by creating again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::events::event;
use super::{Actor, Inbox, Msg};
use crate::control::failover::Input;
use crate::control::metrics::{Metrics, OutcomeLabel, ProviderLabel};
use crate::control::provider::{
    Machine, MachineState, Offer, Provider, ProviderError, ProvisionConfig, Startup,
};
use crate::control::store::Store;
use crate::host::unix_ms_now;
use crate::proto::EventKind;
use crate::proto::state::{PairRecord, Phase};
use crate::types::Side;

/// What the engine needs to create and destroy machines.
pub struct Provisioning {
    /// Where GPU machines come from.
    pub gpu: Arc<dyn Provider>,
    /// Where CPU standbys come from (often the same provider as `gpu`).
    pub cpu: Arc<dyn Provider>,
    pub cfg: ProvisionConfig,
    /// The coordinators as new machines dial them.
    pub dial: Dial,
    pub token_key: Vec<u8>,
    pub fingerprint: String,
}

/// The coordinators as new machines dial them: this one's address and, with several
/// coordinators on etcd, every other whose membership record lives when the machine is created
/// (read then: whichever leads by the time the machine boots must be among its addresses).
/// ARCHITECTURE.md, "Highly available coordinators".
pub struct Dial {
    /// This coordinator's address (`--advertise`, else the bound one).
    pub own: String,
    /// The state, which knows the other coordinators (the file store knows none).
    pub group: Arc<dyn Store>,
}

impl Dial {
    /// The addresses, comma-separated, this coordinator's first. Membership records that
    /// cannot be read leave this coordinator's address alone (said in the log).
    pub fn addresses(&self) -> String {
        let members = match self.group.coordinators() {
            Ok(Some(c)) => c.members,
            Ok(None) => Vec::new(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other coordinators' addresses; a new machine is given this coordinator's only");
                Vec::new()
            }
        };
        dial_list(&self.own, &members)
    }
}

/// `own` first, then each other member once, comma-separated.
fn dial_list(own: &str, members: &[String]) -> String {
    let mut all = vec![own];
    for m in members {
        if !all.contains(&m.as_str()) {
            all.push(m);
        }
    }
    all.join(",")
}

impl Provisioning {
    pub fn provider(&self, side: Side) -> &Arc<dyn Provider> {
        match side {
            Side::Gpu => &self.gpu,
            Side::Cpu => &self.cpu,
        }
    }

    /// Each distinct provider once (the sweeper lists every one).
    pub fn providers(&self) -> Vec<Arc<dyn Provider>> {
        let mut v = vec![self.gpu.clone()];
        if !Arc::ptr_eq(&self.gpu, &self.cpu) {
            v.push(self.cpu.clone());
        }
        v
    }
}

/// A provider call under way, by the machine label it is about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum Call {
    Create(String),
    Destroy(String),
    Get(String),
    Sweep,
}

impl Actor {
    /// A provider call came back; what its outcome means (if anything) is the pair's input.
    pub(super) fn on_provider(&mut self, pair: &str, op: &Call, input: Option<Input>) {
        self.inflight.remove(op);
        if let Some(input) = input
            && let Some(e) = self.pairs.get_mut(pair)
        {
            e.m.wall_ms = unix_ms_now();
            let actions = e.m.step(input, &self.timing);
            self.act(pair, actions);
            self.drive_provider(pair);
        }
    }

    /// Starts the provider calls the pair's record asks for and that are not under way:
    /// creating the machine being provisioned (when its next try is due) and destroying
    /// machines on the teardown list.
    pub(super) fn drive_provider(&mut self, pair: &str) {
        let Some(prov) = self.prov.clone() else {
            return;
        };
        let Some(e) = self.pairs.get(pair) else {
            return;
        };
        if e.blocked {
            return; // the intent is not durable yet
        }
        self.start_create(&prov, pair);
        self.start_destroys(&prov, pair);
    }

    fn start_create(&mut self, prov: &Arc<Provisioning>, pair: &str) {
        let e = &self.pairs[pair];
        let rec = &e.m.rec;
        let Some(p) = &rec.provision else {
            return;
        };
        // A failed machine is torn down before the next is tried (never two at once).
        if p.phase() != Phase::Create
            || p.next_try_unix_ms > unix_ms_now()
            || rec.teardown.iter().any(|t| t.role == p.role)
        {
            return;
        }
        let Some(m) = &p.machine else {
            return;
        };
        let op = Call::Create(m.label.clone());
        if !self.inflight.insert(op.clone()) {
            return;
        }
        let role = Side::from_record(p.role());
        let blocked = e.m.blocked();
        let label = m.label.clone();
        let (tx, pair) = (self.self_tx.clone(), pair.to_string());
        let (metrics, prov) = (self.metrics.clone(), prov.clone());
        let boot = self.policy.boot_timeout;
        tokio::spawn(async move {
            let input = create_machine(&prov, &pair, role, &label, &blocked, boot).await;
            count_attempt(&metrics, &input);
            let input = Some(input);
            let _ = tx.send(Msg::Provider { pair, op, input }).await;
        });
    }

    fn start_destroys(&mut self, prov: &Arc<Provisioning>, pair: &str) {
        for m in self.pairs[pair].m.rec.teardown.clone() {
            let op = Call::Destroy(m.label.clone());
            if !self.inflight.insert(op.clone()) {
                continue;
            }
            let (prov, tx, pair) = (prov.clone(), self.self_tx.clone(), pair.to_string());
            tokio::spawn(async move {
                let side = Side::from_record(m.role());
                let input = match destroy_machine(&prov, side, &m.label, &m.id).await {
                    Ok(()) => Some(Input::Destroyed { label: m.label }),
                    Err(e) => {
                        tracing::warn!(label = %m.label, error = %e, "destroying a machine failed; will retry");
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        None
                    }
                };
                let _ = tx.send(Msg::Provider { pair, op, input }).await;
            });
        }
    }

    /// Asks the provider about every machine a pair owns; one that is gone becomes an input.
    pub(super) fn poll_provider(&mut self) {
        let Some(prov) = self.prov.clone() else {
            return;
        };
        for (name, e) in &self.pairs {
            for (side, label, id) in watched(&e.m.rec) {
                let op = Call::Get(label.clone());
                if !self.inflight.insert(op.clone()) {
                    continue;
                }
                let (prov, tx, pair) = (prov.clone(), self.self_tx.clone(), name.clone());
                tokio::spawn(async move {
                    let input = if still_running(&prov, &pair, side, &label, &id).await {
                        None
                    } else {
                        Some(Input::ProviderGone(side, Instant::now()))
                    };
                    let _ = tx.send(Msg::Provider { pair, op, input }).await;
                });
            }
        }
    }

    /// Destroys machines that carry our label prefix but that no pair owns (a create that
    /// succeeded after it was given up, a coordinator that died between create and persist).
    pub(super) fn sweep(&mut self) {
        let Some(prov) = self.prov.clone() else {
            return;
        };
        if !self.inflight.insert(Call::Sweep) {
            return;
        }
        let tx = self.self_tx.clone();
        let prefix = format!("{}-", self.policy.label_prefix);
        tokio::spawn(async move {
            let mut destroyed = Vec::new();
            for provider in prov.providers() {
                let limit = prov.cfg.call_timeout;
                match sweep_one(&provider, limit, &prefix, &tx).await {
                    Some(labels) => {
                        destroyed.extend(labels.into_iter().map(|l| (l, provider.name())))
                    }
                    None => return, // the engine stopped
                }
            }
            let _ = tx.send(Msg::SweepDone { destroyed }).await;
        });
    }

    /// The sweeper is done: count and announce each orphan it destroyed.
    pub(super) fn on_sweep_done(&mut self, destroyed: Vec<(String, &'static str)>) {
        self.inflight.remove(&Call::Sweep);
        for (label, provider) in destroyed {
            self.metrics
                .orphans_destroyed
                .get_or_create(&ProviderLabel {
                    provider: provider.into(),
                })
                .inc();
            self.events.emit(event(
                "",
                EventKind::Orphan,
                format!("destroyed machine {label}: it carries our label but no pair owns it"),
            ));
        }
    }

    /// Whether any pair owns the machine labelled `label` (the sweeper asks).
    pub(super) fn owns(&self, label: &str) -> bool {
        self.pairs.values().any(|e| {
            let r = &e.m.rec;
            [&r.gpu_owned, &r.cpu_owned]
                .into_iter()
                .flatten()
                .chain(r.teardown.iter())
                .chain(r.provision.iter().filter_map(|p| p.machine.as_ref()))
                .any(|m| m.label == label)
        })
    }
}

fn count_attempt(metrics: &Metrics, input: &Input) {
    let outcome = match input {
        Input::Created { .. } => "created",
        _ => "failed",
    };
    metrics
        .provisioning_attempts
        .get_or_create(&OutcomeLabel {
            outcome: outcome.into(),
        })
        .inc();
}

/// The machines of a record to watch: the ones it owns and the one booting.
fn watched(r: &PairRecord) -> Vec<(Side, String, String)> {
    let mut watch: Vec<(Side, String, String)> = Vec::new();
    for (side, o) in [(Side::Gpu, &r.gpu_owned), (Side::Cpu, &r.cpu_owned)] {
        if let Some(o) = o {
            watch.push((side, o.label.clone(), o.id.clone()));
        }
    }
    if let Some(p) = &r.provision
        && p.phase() == Phase::Boot
        && let Some(m) = &p.machine
    {
        watch.push((Side::from_record(p.role()), m.label.clone(), m.id.clone()));
    }
    watch
}

/// False only when the provider says the machine is gone or stopped (an error or a timeout
/// proves nothing).
async fn still_running(prov: &Provisioning, pair: &str, side: Side, label: &str, id: &str) -> bool {
    let p = prov.provider(side);
    let limit = prov.cfg.call_timeout;
    let r = if id.is_empty() {
        // Its id is not known (the agent joined before the create returned, or the
        // coordinator restarted in between): find it by its label.
        tokio::time::timeout(limit, async {
            p.list(label)
                .await
                .map(|ms| ms.into_iter().find(|m| m.label == label))
        })
        .await
    } else {
        tokio::time::timeout(limit, p.get(id)).await
    };
    let how = match r {
        Ok(Ok(None)) => "gone",
        Ok(Ok(Some(m))) if m.state == MachineState::Stopped => "stopped",
        _ => return true,
    };
    tracing::warn!(%pair, %label, how, "the provider reports a machine not running");
    false
}

/// Destroys the orphans of one provider; the labels destroyed. None when the engine stopped.
async fn sweep_one(
    provider: &Arc<dyn Provider>,
    limit: Duration,
    prefix: &str,
    tx: &Inbox,
) -> Option<Vec<String>> {
    let machines = match tokio::time::timeout(limit, provider.list(prefix)).await {
        Ok(Ok(machines)) => machines,
        Ok(Err(e)) => {
            tracing::warn!(provider = provider.name(), error = %e, "sweeper: listing machines failed");
            return Some(vec![]);
        }
        Err(_) => {
            tracing::warn!(
                provider = provider.name(),
                "sweeper: listing machines timed out"
            );
            return Some(vec![]);
        }
    };
    let mut destroyed = Vec::new();
    for m in machines {
        let (reply, rx) = oneshot::channel();
        let label = m.label.clone();
        tx.send(Msg::Owned { label, reply }).await.ok()?;
        if rx.await.unwrap_or(true) {
            continue;
        }
        match destroy_with(provider, limit, &m.label, &m.id).await {
            Ok(()) => destroyed.push(m.label),
            Err(e) => {
                tracing::warn!(label = %m.label, error = %e, "cannot destroy an orphan")
            }
        }
    }
    Some(destroyed)
}

/// One provisioning attempt of one label.
struct Attempt<'a> {
    prov: &'a Provisioning,
    p: &'a Arc<dyn Provider>,
    pair: &'a str,
    role: Side,
    label: &'a str,
    limit: Duration,
    /// The boot timeout: how long the machine has to join once created.
    boot: Duration,
}

/// One provisioning attempt: settle what a previous attempt with this label left (by listing
/// the label), otherwise choose the best offer and create. An ambiguous failure is settled by
/// listing the label again, never by creating twice.
async fn create_machine(
    prov: &Provisioning,
    pair: &str,
    role: Side,
    label: &str,
    blocked: &[String],
    boot: Duration,
) -> Input {
    let a = Attempt {
        prov,
        p: prov.provider(role),
        pair,
        role,
        label,
        limit: prov.cfg.call_timeout,
        boot,
    };
    match a.find().await {
        Ok(Some(m)) => return a.created(m, None),
        Ok(None) => {}
        Err(e) => return a.failed(format!("cannot list machines: {e}"), vec![]),
    }
    let offer = match a.best_offer(blocked).await {
        Ok(offer) => offer,
        Err(failed) => return failed,
    };
    tracing::info!(%pair, %label, offer = %offer.id, price = offer.price_per_hour, "creating a machine");
    let r = tokio::time::timeout(a.limit, a.p.create(&offer, &a.startup())).await;
    a.settle(r, &offer).await
}

impl Attempt<'_> {
    fn failed(&self, error: String, block: Vec<String>) -> Input {
        Input::CreateFailed {
            label: self.label.to_string(),
            error,
            block,
        }
    }

    /// The machine exists: from `offer`, or found by its label (offer unknown).
    fn created(&self, m: Machine, offer: Option<&Offer>) -> Input {
        let place = match offer {
            Some(o) if m.place.is_empty() => o.place.clone(),
            _ => m.place,
        };
        Input::Created {
            label: self.label.to_string(),
            id: m.id,
            offer: offer.map(|o| o.id.clone()).unwrap_or_default(),
            place,
        }
    }

    /// The machine carrying this attempt's label, if any.
    async fn find(&self) -> Result<Option<Machine>, String> {
        match tokio::time::timeout(self.limit, self.p.list(self.label)).await {
            Ok(Ok(ms)) => Ok(ms.into_iter().find(|m| m.label == self.label)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("listing machines timed out".to_string()),
        }
    }

    /// The cheapest acceptable offer not blocklisted; otherwise the failed attempt.
    async fn best_offer(&self, blocked: &[String]) -> Result<Offer, Input> {
        let filter = match self.role {
            Side::Gpu => &self.prov.cfg.gpu,
            Side::Cpu => &self.prov.cfg.cpu,
        };
        let offers = match tokio::time::timeout(self.limit, self.p.search(self.role)).await {
            Ok(Ok(o)) => filter.rank(o, blocked),
            Ok(Err(e)) => return Err(self.failed(format!("searching offers: {e}"), vec![])),
            Err(_) => return Err(self.failed("searching offers timed out".into(), vec![])),
        };
        offers.into_iter().next().ok_or_else(|| {
            self.failed(
                "no offer matches the configured filter (or all are blocklisted)".into(),
                vec![],
            )
        })
    }

    /// What the new machine needs to join: a join token for its pair and role, bound to this
    /// attempt's label, that expires two minutes after the attempt's boot deadline (the create
    /// call may take up to its limit before the deadline starts). Its nonce comes from the label,
    /// so the engine spends it when the attempt is torn down (`seats`).
    fn startup(&self) -> Startup {
        let role_id = super::seats::role_of(self.role);
        let exp = unix_ms_now() / 1000 + (self.limit + self.boot).as_secs() + 120;
        let token = crate::trust::token::Token {
            nonce: crate::trust::token::Token::attempt_nonce(self.label),
            ..crate::trust::token::Token::new(self.pair, role_id, exp, &self.prov.fingerprint)
        }
        .bound_to(self.label)
        .sign(&self.prov.token_key);
        Startup {
            pair: self.pair.to_string(),
            role: self.role,
            coordinator: self.prov.dial.addresses(),
            join_token: token,
            label: self.label.to_string(),
        }
    }

    /// What the create call's outcome means. A refusal blocklists the offer (and the place
    /// when it has no capacity); an ambiguous failure is settled by the label.
    async fn settle(
        &self,
        r: Result<Result<Machine, ProviderError>, tokio::time::error::Elapsed>,
        offer: &Offer,
    ) -> Input {
        let ambiguous = match r {
            Ok(Ok(m)) => return self.created(m, Some(offer)),
            Ok(Err(ProviderError::Rejected(e))) => return self.failed(e, vec![offer.id.clone()]),
            Ok(Err(ProviderError::Unavailable { place, message })) => {
                return self.failed(message, vec![offer.id.clone(), place]);
            }
            Ok(Err(e @ (ProviderError::Transient(_) | ProviderError::Conflict(_)))) => {
                format!("create failed ({e}); no machine carries the label")
            }
            Err(_) => "create timed out; no machine carries the label".to_string(),
        };
        match self.find().await {
            Ok(Some(m)) => self.created(m, Some(offer)),
            _ => self.failed(ambiguous, vec![]),
        }
    }
}

/// Destroys a machine by id, or finds it by label first when its id was never learnt.
async fn destroy_machine(
    prov: &Provisioning,
    side: Side,
    label: &str,
    id: &str,
) -> Result<(), String> {
    destroy_with(prov.provider(side), prov.cfg.call_timeout, label, id).await
}

async fn destroy_with(
    p: &Arc<dyn Provider>,
    limit: Duration,
    label: &str,
    id: &str,
) -> Result<(), String> {
    let ids: Vec<String> = if id.is_empty() {
        match tokio::time::timeout(limit, p.list(label)).await {
            Ok(Ok(ms)) => ms
                .into_iter()
                .filter(|m| m.label == label)
                .map(|m| m.id)
                .collect(),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("listing machines timed out".into()),
        }
    } else {
        vec![id.to_string()]
    };
    for id in ids {
        match tokio::time::timeout(limit, p.destroy(&id)).await {
            Ok(Ok(())) => tracing::info!(%label, %id, "machine destroyed"),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("destroy timed out".into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_machines_dial_this_coordinator_first_then_every_other_member() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(dial_list("10.0.0.1:7700", &[]), "10.0.0.1:7700");
        assert_eq!(
            dial_list(
                "10.0.0.2:7700",
                &m(&["10.0.0.1:7700", "10.0.0.2:7700", "10.0.0.3:7700"])
            ),
            "10.0.0.2:7700,10.0.0.1:7700,10.0.0.3:7700"
        );
    }
}
