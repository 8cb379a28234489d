//! Standby: the shared engine of `agent-gpu`, `agent-cpu` and `coordinator`.
//!
//! The crate is layered (ARCHITECTURE.md, "Layers"). The dependency rule:
//! `types ← disk ← trust ← replication ← history ← backup ← agent`, and `control` uses the
//! foundations, `disk` and `trust` only, never `replication`, `history`, `backup` or `agent`
//! (checked by `tests/layers.rs`). What only the crate uses is `pub(crate)`. Modules, from the
//! bottom layer up:
//!
//! Foundations
//! - [`types`]: `Epoch`, `Generation`, `RelPath` (the confinement boundary), `Side`, `PerSide<T>`.
//! - [`text`]: hex digests and one-line error chains.
//! - [`host`]: this machine's name and wall clock.
//! - [`rate`]: a bandwidth limit (token bucket) for the replication stream and the uploads.
//! - [`systemd`]: `READY=1` / `STOPPING=1` to `$NOTIFY_SOCKET` (`Type=notify` units).
//! - [`cli`]: defaults, flag/environment/TOML layering (unknown keys refused), durations,
//!   logging (text or JSON), exit codes (`Exit`, listed in every `--help`).
//! - [`exposition`]: `/metrics` over HTTP: OpenMetrics for Prometheus, the 0.0.4 text format for
//!   other clients (the coordinator's and the agents').
//! - [`proto`]: the generated gRPC services and durable record types.
//!
//! [`disk`]
//! - `disk::crashsafe`: framed, checksummed, atomically replaced state files and records.
//! - [`disk::fsx`]: filesystem calls confined below a root; [`disk::xattr`]: extended
//!   attributes (read by path, written through a descriptor, never through a symlink).
//! - `disk::statedir`: one agent per state directory.
//! - [`disk::epoch`]: the durable fencing epoch; [`disk::term`]: the newest coordinator term.
//!
//! [`trust`]
//! - [`trust::identity`]: URI SAN identities, certificate facts. [`trust::pki`]: the CA.
//! - [`trust::tls`]: mutual TLS. [`trust::verify`]: the verifiers.
//! - [`trust::revocation`]: the deny list. [`trust::keys`]: the renewable certificate.
//! - [`trust::token`]: join tokens. [`trust::quota`]: counted permits per address or identity.
//! - [`trust::seal`]: the backup key, keyed object names, sealed (AEAD) backup objects.
//!
//! [`replication`]
//! - [`replication::manifest`]: what a replica holds and its blake3 root;
//!   [`replication::catalog`] keeps one durably (and `Catalog::peek` reads it without writing).
//! - `scan`: what changed; `watch`: inotify and the dirty set; [`replication::attrs`]: owner
//!   and extended attributes (what travels, limits, read at scan, applied on the replica).
//! - [`replication::chunkmap`]: the sender's content-defined chunk maps of big files (copies of the
//!   receiver's chunks instead of deltas); [`replication::delta`]: rsync deltas made safe for the
//!   network, the fallback; `compress`: zstd.
//! - `send` (folder): the sending side of a session, generation by generation.
//! - [`replication::receive`] (folder): the receiving side: admission (who may send, at which
//!   epoch), session, validation, staging, commit, [`replication::receive::apply`] (the roll-forward).
//! - `continuous`: the loop that watches, syncs, reconnects and answers flushes.
//!
//! [`history`]
//! - [`history::chunker`]: FastCDC chunks with blake3 ids; `pack`, `snapshot`: the two immutable
//!   file formats; `index`: chunk → pack, rebuilt from pack footers.
//! - [`history::Store`]: `record`, `restore`, `verify`, `prune` (crash-safe `forget`);
//!   [`history::retention`]: which snapshots to keep (pure).
//!
//! [`backup`]
//! - [`backup::layout`]: the snapshot store's files; the entry head inside each object.
//! - [`backup::bucket`]: an S3-compatible bucket (`object_store`). [`backup::journal`]: what
//!   this machine put there. [`backup::limit`]: the bandwidth limit.
//! - [`backup::upload`]: the mirror pass. [`backup::restore`]: disaster recovery from the bucket.
//!
//! [`agent`]
//! - [`agent::args`], [`agent::config`]: the agents' shared command line and configuration.
//! - [`agent::runtime`]: an agent from start to stop; `node`: the replica and its mode.
//! - `managed`, `link`, `report`: the coordinator link, heartbeats and commands.
//! - `endpoint`, `probe`: what the peer probes and how; `hooks`: `on_promote`/`on_demote`.
//! - `nvml`: GPU health; `join`: getting an identity; `renewal`: renewing it; `revocations`: the
//!   coordinator's deny list, kept on disk; [`agent::socket`]: the control socket (also the
//!   Python client's, `clients/python`).
//! - [`agent::metrics`]: the agent's own `/metrics` (`--metrics-listen`), from its heartbeats.
//!
//! [`control`]
//! - [`control::failover`] (folder): the pure per-pair state machine.
//! - `engine` (folder): the task that owns every pair; `store`: durable state (a file, or etcd
//!   with leader election: `store::etcd`); `wire`: enums as they travel.
//! - [`control::service`]: the gRPC service; [`control::metrics`]: Prometheus metrics.
//! - [`control::status`] (folder): the read-only status page and its JSON (`--status-listen`).
//! - [`control::notify`] (folder): `[[notify]]` webhooks: notices, bodies, signatures, queues.
//! - [`control::provider`] (folder): `local` (also `Local::stop_machines`, for `coordinator
//!   machines stop-all`), `vastai`, `gcp`, `command`.
//!
//! [`programs`] (the top: uses any layer, nothing uses it)
//! - `agent_gpu`, `agent_cpu`, `coordinator`: the three programs' command lines, from their own
//!   folders (`agent-gpu/src/program.rs`, ...), compiled once here for all three binaries.

pub mod agent;
pub mod backup;
pub mod cli;
pub mod control;
pub mod disk;
pub mod exposition;
pub mod history;
pub mod host;
pub mod programs;
pub mod rate;
pub mod replication;
pub mod systemd;
pub mod text;
pub mod trust;
pub mod types;

pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("standby.v1");

    pub mod state {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("standby.v1.state");
    }

    pub mod history {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("standby.v1.history");
    }

    /// The metadata key in which a follower coordinator names the leader (its advertised
    /// `host:port`) when it refuses a call (ARCHITECTURE.md, "Highly available coordinators").
    pub const LEADER_METADATA: &str = "standby-leader";

    /// The leader a follower's refusal names, if it names one.
    pub fn leader_named(status: &tonic::Status) -> Option<String> {
        let value = status
            .metadata()
            .get(LEADER_METADATA)?
            .to_str()
            .ok()?
            .trim();
        (!value.is_empty()).then(|| value.to_string())
    }

    /// The encoded descriptor set, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("standby_descriptor");
}
